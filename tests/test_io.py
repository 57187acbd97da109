"""Plan validation, save/load (safetensors, shared weights once), bad input, packaging."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from factories import FAMILIES, inputs
from safetensors import safe_open

import skrr_compile as skrr
from skrr_compile.cli.main import main as cli_main
from skrr_compile.utils.tensors import param_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def t5():
    model = FAMILIES["t5-gated"].make()
    return model, skrr.trace(model)


@pytest.mark.parametrize(
    "plan",
    [
        skrr.Plan(),
        skrr.Plan(skip=[3, 5], reuse={5: 1}),
        skrr.Plan(skip=[0, 2], reuse={0: 4}, method="skrr", order=(2, 0), scores=(0.5, 0.25), info={"k": 3}),
    ],
)
def test_plan_json_round_trip(plan, tmp_path):
    assert skrr.Plan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    assert skrr.Plan.load(tmp_path / "plan.json") == plan


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"skip": [1], "reuse": {2: 1}}, "not skipped"),
        ({"skip": [1, 3], "reuse": {1: 3}}, "itself skipped"),
        ({"skip": [1, 1]}, "twice"),
        ({"skip": [-1]}, ">= 0"),
        ({"skip": [1, 2], "order": [1]}, "order"),
        ({"skip": ["x"]}, "list of ints"),
    ],
)
def test_malformed_plans_are_refused(kwargs, match):
    with pytest.raises(skrr.PlanError, match=match):
        skrr.Plan(**kwargs)


@pytest.mark.parametrize(
    "plan, match",
    [
        (skrr.Plan(skip=[6]), "out of range"),
        (skrr.Plan(skip=[1], reuse={1: 2}), "same kind"),
        (skrr.Plan(skip=list(range(6))), "skips all"),
    ],
)
def test_plans_that_do_not_fit_the_model_are_refused(t5, plan, match):
    with pytest.raises(skrr.PlanError, match=match):
        skrr.apply(t5[1], plan)


def test_plan_for_another_model_is_refused(t5):
    pruned = skrr.apply(t5[1], skrr.Plan(skip=[1]))
    assert pruned.plan.fingerprint == t5[1].fingerprint
    other = skrr.trace(FAMILIES["t5-relu"].make())
    with pytest.raises(skrr.PlanError, match="made for another model"):
        skrr.apply(other, pruned.plan)


def test_save_load_round_trip_shares_weights_once(t5, tmp_path):
    model, graph = t5
    plan = skrr.Plan(skip=[1, 2, 5], reuse={2: 4, 5: 3})
    pruned = skrr.apply(graph, plan)
    out = skrr.save(pruned, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "skrr_model.json", "skrr_plan.json"
    ]
    removed = FAMILIES["t5-gated"].removed_params(model, plan.skip)
    expected_bytes = param_bytes(model) - 4 * removed
    assert pruned.num_bytes == expected_bytes
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    param_names = {n for n, _ in pruned.graph_module.named_parameters()}
    assert sum(t.numel() * t.element_size() for k, t in stored.items() if k in param_names) == expected_bytes
    assert not any(".block.1.layer.0." in k or ".block.2.layer.1." in k for k in stored)  # re-used: not stored

    loaded = skrr.load(out)
    assert loaded.num_bytes == expected_bytes  # RAM after loading: unique parameter bytes
    assert loaded.plan == pruned.plan
    for batch, seq in [(2, 8), (4, 5)]:
        ids, mask = inputs(batch, seq, seed=3)
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).last_hidden_state,
            pruned(ids, attention_mask=mask).last_hidden_state, atol=1e-6, rtol=1e-6,
        )


def test_save_is_atomic_and_refuses_non_empty_dirs(t5, tmp_path):
    pruned = skrr.apply(t5[1], skrr.Plan(skip=[1]))

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        skrr.save(pruned, tmp_path / "out", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []  # no half-written directory, no temp leftovers
    skrr.save(pruned, tmp_path / "out")
    with pytest.raises(FileExistsError, match="not empty"):
        skrr.save(pruned, tmp_path / "out")


def test_load_refuses_what_is_not_a_pruned_model(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        skrr.load(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a pruned model saved by skrr-compile"):
        skrr.load(tmp_path)


def test_real_minilm_apply_save_load_with_tokenizer(tmp_path):
    from skrr_compile.core.checkpoints import builtin_model_dir, load_encoder, load_tokenizer

    model, tok = load_encoder("builtin"), load_tokenizer("builtin")
    plan = skrr.Plan(skip=[2, 4, 9], reuse={4: 6})
    pruned = skrr.apply(model, plan)
    skrr.save(pruned, tmp_path / "minilm", tokenizer=tok)
    loaded = skrr.load(tmp_path / "minilm")
    assert (tmp_path / "minilm" / "tokenizer.json").is_file()
    enc = tok(["a red bicycle leaning on a wall", "two dogs"], padding=True, return_tensors="pt")
    got = loaded(enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, pruned(**enc).last_hidden_state, atol=1e-6, rtol=1e-6)
    assert builtin_model_dir().is_dir()
    assert loaded.num_params == 22_713_216 - 591_360 * 2 - 1_181_568


def test_cli_apply_with_bad_plan_writes_nothing(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"skip": [1], "reuse": {"1": 2}}))
    out = tmp_path / "out"
    assert cli_main(["apply", "builtin", "--plan", str(plan), "--out", str(out)]) == 2
    assert "same kind" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(["apply", str(tmp_path / "nope"), "--plan", str(plan), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_inspect_config_json_on_meta(tmp_path, capsys):
    import transformers as tf

    cfg = tf.T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", architectures=["T5EncoderModel"])
    cfg.save_pretrained(tmp_path)
    assert cli_main(["inspect", str(tmp_path / "config.json"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [b["kind"] for b in table["blocks"]] == ["attn", "ffn", "attn", "ffn"]
    assert table["blocks"][0]["params"] == 4 * 64 * 64 + 64


def test_wheel_installs_passes_and_kernels_under_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("skrr_compile-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    expected = {f"skrr_compile/{f.relative_to(ROOT / 'skrr_compile').as_posix()}" for f in (ROOT / "skrr_compile").rglob("*.py")}
    expected |= {f"skrr_compile/{d}/{f.name}" for d, src in (("passes", "passes"), ("kernels", "skrr_kernels"))
                 for f in (ROOT / src).glob("*.py")}
    missing = sorted(expected - set(names))
    assert not missing, f"modules missing from the wheel (add their package to pyproject): {missing}"
    assert len(expected) > 40  # every subpackage: core, blocksearch, magnitude, deploy, cli, utils, passes, kernels
    assert "skrr_compile/data/prompts.txt" in names
    assert "skrr_compile/passes/README.md" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "skrr-compile = skrr_compile.cli:main" in text
    assert "skrr = skrr_compile.deploy.compile_backend:skrr_backend" in text
    assert not any(n.startswith(("passes/", "kernels/", "skrr_kernels/", "tests/", "bench/")) for n in names)
