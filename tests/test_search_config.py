"""SearchConfig (issue 22's first step): frozen, grouped, validated on creation, JSON round trip; `search` with a
config gives what the same options as keywords give; the resume key and the report read the config."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from factories import FAMILIES, inputs

import skrr_compile as skrr
from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.checkpoint import STATE_FILE, input_key
from skrr_compile.blocksearch.config import OPTION_GROUP, SearchConfig
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.run import search

CONFIGS = [
    {"sparsity": 0.4},
    {"sparsity": 0.25, "method": "finercut", "beam": 1, "seed": 3, "levers": ["abandon", "memo"]},
    {"sparsity": 0.3, "method": "laco", "laco_params": {"I": 1, "T": 0.5}},
    {"sparsity": 0.5, "read": "all", "template": "<s>{prompt}</s>", "drop_tokens": 2, "hidden_layer": [10, 20, 30]},
    {"sparsity": 0.5, "hidden_layer": -2, "max_length": 77, "padding": "max_length", "chunk_size": 4,
     "min_tokens": 0, "max_tokens": 250},
    {"sparsity": 0.1, "dtype": torch.bfloat16, "reference": "disk", "cache_gb": 0.5, "host_cache_gb": 2,
     "offload": "disk", "device": torch.device("cpu"), "device_budget_gb": 1.5, "weights_path": "/ckpt"},
    {"sparsity": 0.3, "heal": "lstsq"},
    {"sparsity": 0.4, "method": "replaceme", "heal": "cosine", "heal_ridge": 0.01, "heal_steps": 20, "heal_lr": 1e-4,
     "heal_tokens": 4096},
]


@pytest.mark.parametrize("options", CONFIGS)
def test_json_round_trip(options):
    cfg = SearchConfig.from_kwargs(**options)
    again = SearchConfig.from_json(cfg.to_json())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert json.loads(cfg.to_json()) == cfg.to_dict()
    for name, value in options.items():  # every flat option lands in its group, normalised
        got = getattr(getattr(cfg, OPTION_GROUP[name]), name)
        want = {torch.bfloat16: "bf16", torch.device("cpu"): "cpu"}.get(value, value) \
            if not isinstance(value, (list, dict)) else value
        assert (list(got) if isinstance(got, tuple) else got) == want, name


def test_frozen_grouped_and_replace():
    cfg = SearchConfig.from_kwargs(sparsity=0.4, template="x {prompt}", cache_gb=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.target.beam = 5
    other = cfg.replace(beam=2, chunk_size=4)
    assert (other.target.beam, other.calibration.chunk_size, other.reads.template) == (2, 4, "x {prompt}")
    assert cfg.target.beam == 3 and cfg.calibration.chunk_size == 16  # the original is untouched
    assert set(cfg.flat()) == set(OPTION_GROUP) and cfg.flat()["cache_gb"] == 1.0
    assert SearchConfig.from_kwargs(**cfg.flat()) == cfg


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, r"sparsity must be in \(0, 1\)"),
    ({"sparsity": 0.3, "method": "sleb"}, "unknown method 'sleb'; choose one of skrr, skrr-skip"),
    ({"sparsity": 0.3, "beam": 0}, "beam must be >= 1"),
    ({"sparsity": 0.3, "levers": "memo"}, "levers must be a list drawn from abandon, memo, order"),
    ({"sparsity": 0.3, "read": "some"}, "read must be one of mask, all"),
    ({"sparsity": 0.3, "template": "no slot"}, r"the template must contain '\{prompt\}'"),
    ({"sparsity": 0.3, "hidden_layer": "a,b"}, "hidden"),
    ({"sparsity": 0.3, "chunk_size": 0}, "chunk_size must be an integer >= 1"),
    ({"sparsity": 0.3, "cache_gb": float("nan")}, "cache_gb must be a number >= 0"),
    ({"sparsity": 0.3, "dtype": "int8"}, "dtype must be one of fp32, bf16, fp16"),
    ({"sparsity": 0.3, "reference": "gpu"}, "reference must be one of device, cpu, disk"),
    ({"sparsity": 0.3, "offload": "disk"}, "offload='disk' needs weights_path"),
    ({"sparsity": 0.3, "method": "laco", "offload": "cpu", "weights_path": "x"}, None),
    ({"sparsity": 0.3, "method": "laco", "offload": "disk", "weights_path": "x"}, "LaCo merges weights in memory"),
])
def test_bad_options_are_one_line_errors(options, message):
    if message is None:
        SearchConfig.from_kwargs(**options)
        return
    with pytest.raises(SearchError, match=message) as e:
        SearchConfig.from_kwargs(**options)
    assert "\n" not in str(e.value)


def test_unknown_names_are_refused_with_the_accepted_ones():
    with pytest.raises(TypeError, match="unknown search option.*beams.*options: beam, cache_gb"):
        SearchConfig.from_kwargs(sparsity=0.3, beams=3)
    with pytest.raises(SearchError, match="sparsity is required"):
        SearchConfig.from_kwargs(beam=3)
    with pytest.raises(SearchError, match=r"unknown options \['beams'\] in group 'target'"):
        SearchConfig.from_dict({"target": {"sparsity": 0.3, "beams": 2}})
    with pytest.raises(SearchError, match="unknown search config groups"):
        SearchConfig.from_dict({"target": {"sparsity": 0.3}, "healing": {}})


def _calibration():
    chunks = [inputs(3, 8 + i, seed=i) for i in range(3)]
    return Calibration(prompts=["p"] * 9, chunks=chunks, null=inputs(1, 3, seed=99, pad_last=False))


def test_search_with_a_config_equals_search_with_keywords(tmp_path):
    model, cal = FAMILIES["t5-gated"].make(seed=4), _calibration()
    graph = skrr.trace(model)
    by_kw = search(model, None, cal, sparsity=0.3, beam=2, cache_gb=1.0, progress=False, graph=graph,
                   out_dir=tmp_path / "kw")
    cfg = skrr.SearchConfig.from_kwargs(sparsity=0.3, beam=2, cache_gb=1.0)
    by_cfg = search(model, None, cal, cfg, progress=False, graph=graph, out_dir=tmp_path / "cfg")
    assert by_cfg.plan.to_dict() == by_kw.plan.to_dict()
    assert by_cfg.report["discrepancy"] == by_kw.report["discrepancy"]
    assert by_cfg.report["config"] == cfg.to_dict() == by_kw.report["config"]
    # keywords change a given config: the same as that config with the change made first
    via = search(model, None, cal, cfg, beam=1, progress=False, graph=graph)
    assert via.report["config"]["target"]["beam"] == 1 and via.report["beam"] == 1
    # the resume key is the one the separate options gave (states written before the config stay resumable)
    key = json.loads((tmp_path / "cfg" / STATE_FILE).read_text())["key"]
    assert key == json.loads((tmp_path / "kw" / STATE_FILE).read_text())["key"]
    assert key == input_key(graph, cal, sparsity=0.3, method="skrr", beam=2, read="mask", laco=None,
                            projection="identity")


def test_the_config_records_what_a_given_calibration_scores():
    model = FAMILIES["t5-gated"].make(seed=4)
    cal = dataclasses.replace(_calibration(), read="all")
    res = search(model, None, cal, sparsity=0.2, method="skrr-skip", beam=1, progress=False)
    assert res.report["config"]["reads"]["read"] == "all" == res.report["calibration"]["read"]


def test_the_memory_options_do_not_key_the_state(tmp_path):
    """A search resumes with another cache size (the plan does not depend on it); not with another beam."""
    model, cal = FAMILIES["t5-gated"].make(seed=4), _calibration()
    graph = skrr.trace(model)
    whole = search(model, None, cal, sparsity=0.3, beam=2, cache_gb=1.0, progress=False, graph=graph,
                   out_dir=tmp_path / "a")
    resumed = search(model, None, cal, sparsity=0.3, beam=2, cache_gb=0.001, progress=False, graph=graph,
                     out_dir=tmp_path / "a", resume=True)
    assert resumed.plan.to_dict() == whole.plan.to_dict()
    with pytest.raises(SearchError, match="written for other inputs"):
        search(model, None, cal, sparsity=0.3, beam=3, progress=False, graph=graph, out_dir=tmp_path / "a",
               resume=True)
