"""Quantization (issue 21): numerics against the hand-quantized HF model, exact bytes, shared weights, save/load
in a fresh process, the quantization-aware search against a naive loop, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from factories import FAMILIES, inputs
from search_reference import NaiveScorer, naive_reuse_phase, naive_skip_phase

import skrr_compile as skrr
from skrr_compile.blocksearch.config import SearchConfig
from skrr_compile.core.quantize import (
    QuantConfig,
    QuantizationError,
    deployed_bytes,
    is_quantized,
    scheme_bytes,
    tensor_bytes,
    torchao_config,
)
from skrr_compile.core.quantized_io import pack_int4, unpack_int4
from skrr_compile.utils.tensors import named_tensors

pytest.importorskip("torchao")
PLAN = skrr.Plan(skip=[1, 2], reuse={2: 4})
SCHEMES = ["int8", "int8-dynamic", "fp8", "int4"]
_CACHE: dict = {}


def _pruned(family):
    """(family, dense model, pruned model) traced once per family: tracing is what a test here costs."""
    if family not in _CACHE:
        fam = FAMILIES[family]
        model = fam.make()
        _CACHE[family] = (fam, model, skrr.apply(model, PLAN))
    return _CACHE[family]


def _hand_quantized(fam, model, plan, cfg):
    """torchao's quantize_ on the hand-patched HF model (tests/factories.py): the independent reference."""
    from torchao.quantization import quantize_

    ref = fam.reference(model, plan.skip, plan.reuse)
    g = cfg.group_size

    def take(mod, fqn):
        return isinstance(mod, torch.nn.Linear) and (cfg.scheme != "int4" or mod.in_features % g == 0)

    quantize_(ref, torchao_config(cfg, "linear"), filter_fn=take)
    return ref


_SLOW = pytest.mark.slow  # the same code on another family / scheme: fast ones cover every path
FAMILY_SCHEMES = [("t5-gated", s) for s in SCHEMES] + [("llama", "int8")] + [
    pytest.param(f, s, marks=_SLOW) for f in ("llama", "bert") for s in SCHEMES if (f, s) != ("llama", "int8")]


@pytest.mark.parametrize("family, scheme", FAMILY_SCHEMES)
def test_quantized_pruned_model_equals_the_hand_quantized_hf_model(family, scheme):
    fam, model, pruned = _pruned(family)
    cfg = QuantConfig(scheme, group_size=8)
    q = skrr.quantize(pruned, cfg)
    ref = _hand_quantized(fam, model, PLAN, cfg)
    ids, mask = inputs(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(q(ids, attention_mask=mask).last_hidden_state,
                                   ref(ids, attention_mask=mask).last_hidden_state, atol=1e-6, rtol=1e-6)
    assert q.info["quantization"]["scheme"] == scheme and q.info["quantization"]["modules"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_byte_counts_are_exact_per_scheme(scheme):
    _, _, pruned = _pruned("llama")
    for emb in (False, True):
        cfg = QuantConfig(scheme, group_size=8, embeddings=emb)
        q = skrr.quantize(pruned, cfg)
        tensors = named_tensors(q.graph_module)
        for name, kind in q.info["quantization"]["kinds"].items():
            t = tensors[name]
            assert is_quantized(t)
            assert tensor_bytes(t) == scheme_bytes(t.shape, torch.float32, cfg, kind), name
        # the prediction from the full-precision graph equals what the quantized model holds
        assert deployed_bytes(pruned.graph_module, cfg)["total"] == deployed_bytes(q.graph_module, None)["total"]
        assert q.num_bytes < pruned.num_bytes
    # int8 weight-only, per row: out*in values + out*(4 + 1) bytes of scale and zero point
    w = named_tensors(pruned.graph_module)["layers.2.mlp.up_proj.weight"]
    assert scheme_bytes(w.shape, torch.float32, QuantConfig("int8"), "linear") == 37 * 32 + 37 * 5
    assert scheme_bytes((37, 32), torch.float32, QuantConfig("int4", group_size=8), "linear", packed=True) \
        == 37 * 16 + 37 * 4 * 5


def test_shared_weights_stay_one_tensor_in_memory_and_in_the_file(tmp_path):
    q = skrr.quantize(_pruned("llama")[2], "int8")  # 2 re-uses 4: layer 1 attn <- layer 2
    t = named_tensors(q.graph_module)
    a, b = "layers.1.self_attn.q_proj.weight", "layers.2.self_attn.q_proj.weight"
    reads = [n for n in t if t[n] is t[b]]
    assert is_quantized(t[b]) and (a not in t or t[a] is t[b]) and reads
    skrr.save(q, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "skrr_model.json").read_text())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        stored = list(f.keys())
    assert sum("_weight_qdata" in k for k in stored) == len(q.info["quantization"]["modules"])
    assert all(v in q.info["quantization"]["modules"] or "." in v for v in meta["aliases"].values())


def test_int4_packs_two_values_per_byte():
    q = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.numel() == 18
    assert torch.equal(unpack_int4(p, q.shape), q)


_LOAD = """
import sys, torch, skrr_compile as skrr
q = skrr.load(sys.argv[1])
ids = torch.load(sys.argv[2])
out = q(ids[0], attention_mask=ids[1]).last_hidden_state
torch.save(out, sys.argv[3])
print(q.info["quantization"]["scheme"], q.num_bytes)
"""


@pytest.mark.parametrize("scheme", ["int4", pytest.param("int8", marks=_SLOW)])
def test_saved_quantized_model_loads_in_a_fresh_process(tmp_path, scheme):
    q = skrr.quantize(_pruned("t5-gated")[2], scheme, group_size=8, embeddings=True)
    out = skrr.save(q, tmp_path / "q")
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")) == []
    ids = inputs(2, 9)
    torch.save(ids, tmp_path / "ids.pt")
    r = subprocess.run([sys.executable, "-c", _LOAD, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == scheme and int(r.stdout.split()[1]) == q.num_bytes
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "o.pt"), q(*ids).last_hidden_state, atol=0, rtol=0)
    if scheme == "int4":  # packed in the file: fewer bytes than the int8 values torchao holds in memory
        from safetensors.torch import load_file

        stored = load_file(str(out / "model.safetensors"))
        packed = [k for k in stored if k.endswith("_qdata")]
        assert packed and all(stored[k].dtype == torch.uint8 for k in packed)


def test_bad_input_is_refused_in_one_line(tmp_path, monkeypatch):
    pruned = _pruned("llama")[2]
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'int3'; schemes: int8"):
        skrr.quantize(pruned, "int3")
    for scheme, missing in (("fp8-dynamic", "fp8 units"), ("nf4", "CUDA")):
        with pytest.raises(QuantizationError, match=f"{missing}.*what runs here: int8, int8-dynamic, fp8, int4"):
            skrr.quantize(pruned, scheme)
    q = skrr.quantize(pruned, "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        skrr.quantize(q, "int8")
    with pytest.raises(QuantizationError, match="keep pattern '\\*.wo' matches no"):
        skrr.quantize(pruned, "int8", keep=["*.wo"])
    kept = skrr.quantize(pruned, "int8", keep=["re:mlp\\.down_proj"])
    assert not any("down_proj" in n for n in kept.info["quantization"]["modules"])
    out = tmp_path / "q"
    skrr.save(q, out)
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(QuantizationError, match=r"not installed: pip install 'skrr-compile\[quant\]'"):
        skrr.load(out)
    with pytest.raises(QuantizationError, match=r"skrr-compile\[quant\]"):
        skrr.quantize(pruned, "int8")
    monkeypatch.undo()
    with pytest.raises(FileExistsError):  # nothing half-written over an existing directory
        skrr.save(q, out)


def test_search_config_quantize_group_round_trips_and_keys_resume_only_when_set():
    off = SearchConfig.from_kwargs(sparsity=0.3)
    on = off.replace(quantize="int4", group_size=16, quantize_keep=["*.wo"], quantize_embeddings=True)
    assert SearchConfig.from_json(on.to_json()) == on
    assert "quantize" not in off.resume_fields()
    assert on.resume_fields()["quantize"] == {"scheme": "int4", "group_size": 16, "embeddings": True, "keep": ["*.wo"]}
    with pytest.raises(skrr.SearchError, match="unknown quantization scheme"):
        off.replace(quantize="int2")


class _QuantizedNaive(NaiveScorer):
    """The naive loop: apply the candidate's plan, quantize the pruned model, score against dense fp32."""

    def __init__(self, *a, quant=None, **kw):
        super().__init__(*a, **kw)
        self.quant = quant

    def score(self, skip, reuse=None) -> float:
        self.candidates += 1
        return self.disc.evaluate(skrr.quantize(self.pruned(skip, reuse), self.quant)).discrepancy


def test_quantization_aware_search_equals_the_naive_quantize_each_candidate_loop():
    from skrr_compile.blocksearch.calibration import Calibration

    model = FAMILIES["llama"].make()
    chunks = [inputs(3, 8, seed=i) for i in range(2)]
    cal = Calibration(prompts=["p"] * 6, chunks=chunks, null=inputs(1, 3, seed=99, pad_last=False))
    quant = QuantConfig("int8")
    res = skrr.search(model, None, cal, sparsity=0.3, beam=2, quantize="int8", progress=False)
    naive = _QuantizedNaive(model, skrr.trace(model), cal, quant=quant)
    skip, order, _, score = naive_skip_phase(naive, 0.3, 2)
    reuse, score = naive_reuse_phase(naive, skip, order, score)
    assert sorted(res.plan.skip) == sorted(skip) and res.plan.reuse == reuse
    assert res.report["quantization"]["scheme"] == "int8"
    assert res.report["discrepancy"] == pytest.approx(score, rel=1e-5)


# --- the CLI (prune/search --quantize, inspect, --dry-run), torch.compile, pipelines -----------------------
@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A 4-layer T5 encoder (d_model 32) with its sentencepiece tokenizer, saved for the CLI."""
    from pipeline_factories import t5_encoder, t5_tokenizer

    d = tmp_path_factory.mktemp("t5") / "t5"
    t5_encoder(32, layers=4).save_pretrained(d)
    t5_tokenizer().save_pretrained(d)
    (d.parent / "p.txt").write_text("a photo of a cat\na red car in the rain\nan astronaut on a horse\n")
    return d


def _cli(*argv):
    from skrr_compile.cli.main import main

    assert main([str(a) for a in argv]) == 0


def test_cli_prune_quantize_after_and_aware_with_exact_deployed_bytes(tiny_t5_dir, tmp_path, capsys):
    from skrr_compile.cli.quantize import deployed_table
    from skrr_compile.core.checkpoints import load_encoder

    base = ["prune", tiny_t5_dir, "--prompts", tiny_t5_dir.parent / "p.txt", "--sparsity", "0.3", "--beam", "1",
            "--quiet", "--quantize", "int8"]
    _cli(*base, "--out", tmp_path / "after")
    assert "int8 (quantized after the search)" in capsys.readouterr().out
    q = skrr.load(tmp_path / "after")
    dense = load_encoder(tiny_t5_dir)
    plain = skrr.apply(dense, q.plan)
    ref = skrr.quantize(plain, "int8")  # the saved model is the plan's pruned model, quantized
    ids, mask = inputs(2, 7)
    with torch.no_grad():
        assert torch.equal(q(ids, attention_mask=mask).last_hidden_state, ref(ids, attention_mask=mask).last_hidden_state)
    report = json.loads((tmp_path / "after" / "report.json").read_text())
    row = report["rows"][0]
    table = deployed_table(plain.graph_module)
    assert row["deployed_bytes"] == table and row["bytes"] == table["int8"] == deployed_bytes(q.graph_module, None)["total"]
    assert row["quantization"]["aware"] is False and "quantization" not in report["search"]
    assert f"deployed size int8 (exact): {table['int8']:,} bytes" in (tmp_path / "after" / "report.md").read_text()
    _cli("inspect", tmp_path / "after", "--json")
    shown = json.loads(capsys.readouterr().out)
    assert shown["deployed_bytes"] == table and shown["quantization"] == "int8"  # rebuilt on meta, same bytes

    _cli(*base, "--quantize-aware", "--out", tmp_path / "aware")
    assert "int8 (scored quantized in the search)" in capsys.readouterr().out
    report = json.loads((tmp_path / "aware" / "report.json").read_text())
    assert report["search"]["quantization"]["scheme"] == "int8" and report["rows"][0]["quantization"]["aware"]
    from skrr_compile.cli.main import main

    assert main(["prune", str(tiny_t5_dir), "--prompts", "builtin", "--sparsity", "0.3", "--quantize-aware",
                 "--out", str(tmp_path / "x")]) != 0
    assert "--quantize-aware needs --quantize" in capsys.readouterr().err
    assert main(["prune", str(tiny_t5_dir), "--prompts", "builtin", "--sparsity", "0.3", "--quantize", "int8",
                 "--keep", "*.nothing", "--out", str(tmp_path / "y")]) != 0
    assert "matches no" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_search_cli_quantize_is_quantization_aware():
    import argparse

    from skrr_compile.cli import search as cli_search

    parser = argparse.ArgumentParser()
    cli_search.register(parser.add_subparsers())
    args = parser.parse_args(["search", "m", "--prompts", "p", "--sparsity", "0.3", "--quantize", "int4",
                              "--group-size", "16", "--keep", "*.wo", "--quantize-embeddings"])
    cfg = cli_search.search_config(args)
    assert cfg.quantize.quant_config() == QuantConfig("int4", group_size=16, embeddings=True, keep=("*.wo",))
    args = parser.parse_args(["prune", "m", "--prompts", "p", "--sparsity", "0.3", "--quantize", "int8"])
    assert cli_search.search_config(args).quantize.quantize is None  # prune quantizes after, unless aware


@pytest.mark.slow
def test_dry_run_quantize_int8_on_the_t5_xxl_config_prints_about_2_8_gb(tmp_path, capsys):
    import resource

    import transformers as tf

    cfg = tf.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", architectures=["T5EncoderModel"])
    cfg.save_pretrained(tmp_path / "t5xxl")
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _cli("search", tmp_path / "t5xxl", "--prompts", tmp_path / "p.txt", "--max-length", "64", "--sparsity",
         "0.4192", "--dtype", "bf16", "--quantize", "int8", "--quantize-embeddings", "--dry-run")
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "int8 (embeddings quantized too)" in ln)
    assert 2.7e9 < int(line.split("(")[2].split()[0].replace(",", "")) < 2.85e9, line  # "about 2.8 GB"
    assert "int8 (embeddings full precision): about 2.90 GB" in out  # bf16 embedding table
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20 < 2.0  # 9.5 GB never allocated


def _compiled_equals_eager(backend):
    q = skrr.quantize(_pruned("llama")[2], "int4", group_size=8, embeddings=True)
    ids, mask = inputs(2, 9)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = q(ids, attention_mask=mask).last_hidden_state
        compiled = torch.compile(q, backend=backend)(ids, attention_mask=mask).last_hidden_state
    return eager, compiled, q


def test_torch_compile_of_the_quantized_model_equals_eager_and_dtype_change_is_refused():
    eager, compiled, q = _compiled_equals_eager("aot_eager")  # dynamo + AOT through torchao's subclasses
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    for change in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)):
        with pytest.raises(ValueError, match=r"quantized \(int4\) in float32: \.to\(torch\.\w+\) is refused"):
            change(q)
    assert q.to("cpu") is q and q.float() is q  # the device, or the dtype it has, is fine


@pytest.mark.slow
def test_torch_compile_inductor_of_the_quantized_model_equals_eager():
    eager, compiled, _ = _compiled_equals_eager("inductor")
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_pipeline_with_a_quantized_encoder_saves_loads_and_generates(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import DiffusionPipeline
    from pipeline_factories import generate, make_pixart

    from skrr_compile.deploy.pipelines.prune import apply_to_pipeline

    pipe = make_pixart()
    pipe.set_progress_bar_config(disable=True)
    apply_to_pipeline(pipe, {"text_encoder": skrr.Plan(skip=[1, 2], reuse={2: 0})})
    skrr.quantize(pipe, "int8")
    assert pipe.text_encoder.info["quantization"]["scheme"] == "int8"
    latents = generate(pipe)
    pipe.save_pretrained(tmp_path / "p")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    enc = loaded.text_encoder
    first = enc.info["quantization"]["modules"][0]
    assert enc.info["quantization"]["scheme"] == "int8" and is_quantized(named_tensors(enc.graph_module)[first])
    torch.testing.assert_close(generate(loaded), latents, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme, op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_quantized_onnx_quantizes_re_used_weights_once_and_verifies(tmp_path, scheme, op):
    """A re-used sub-block's weights (read by two MatMuls, kept as Transpose(weight) by the exporter) are
    quantized too, one initializer each; ONNX Runtime's output is checked against torch at unseen shapes, and
    the file is within 2 % of the exact deployed bytes (ONNX Runtime's own int8 quantizes the pooler Gemm too)."""
    import numpy as np

    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from skrr_compile.core.checkpoints import builtin_model_dir, load_encoder
    from skrr_compile.deploy.onnx_quant import export_quantized_onnx

    try:
        builtin_model_dir()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 is not installed")
    model = load_encoder("builtin")
    graph = skrr.trace(model[0] if isinstance(model, tuple) else model)
    plan = skrr.Plan(skip=list(range(11)), reuse={7: 11})  # FFN 5 runs twice: its weights are read twice
    q = skrr.quantize(skrr.apply(graph, plan), scheme, **({"group_size": 32} if scheme == "int4" else {}))
    rep = export_quantized_onnx(q, tmp_path / "q.onnx", verify=True)
    assert rep.verification["ok"], rep.verification
    m = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert [n for n in m.graph.node if n.op_type == "MatMul" and any(i in inits for i in n.input)] == []
    assert not [n for n in m.graph.node if n.op_type == "Transpose" and n.input[0] in inits
                and inits[n.input[0]].ndim == 2 and inits[n.input[0]].size > 64]
    assert sum(n.op_type == op for n in m.graph.node) >= 4  # the re-used FFN's 2 x 2 MatMuls
    for w in ("layer.5.intermediate.dense.weight", "layer.5.output.dense.weight"):
        copies = [k for k, a in inits.items() if w in k and a.dtype in (np.int8, np.uint8) and a.size >= 384 * 384 // 2]
        floats = [k for k, a in inits.items() if w in k and a.dtype == np.float32 and a.size >= 384 * 384]
        assert len(copies) == 1 and not floats, (copies, floats)
    ideal = deployed_bytes(q.graph_module, None, packed=True)["total"]
    assert abs(rep.file_bytes - ideal) / ideal < 0.02, (rep.file_bytes, ideal)
