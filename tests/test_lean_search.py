"""Lean search (issue 10): search dtype, reference placement, weight offload, the memory plan, no leaks.

Every variant is checked against the plain search (identical plan, order and scores) and, for the dtype,
against the naive full-forward reference in that dtype.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import torch
from factories import FAMILIES, inputs
from safetensors import safe_open
from search_reference import NaiveScorer, naive_reuse_phase, naive_skip_phase

import skrr_compile as skrr
from skrr_compile.blocksearch.calibration import Calibration, read_prompts, tokenize
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import Evaluator
from skrr_compile.blocksearch.memory import padded_shapes, plan_memory
from skrr_compile.blocksearch.runner import Config, StagedRunner


def calibration(n_chunks=3, batch=4, seq=10, seed=0):
    chunks = [inputs(batch, seq, seed=seed + i) for i in range(n_chunks)]
    return Calibration(prompts=["p"] * (n_chunks * batch), chunks=chunks, null=inputs(1, 3, seed=99, pad_last=False))


def same_result(a, b):
    assert a.plan.skip == b.plan.skip and a.plan.reuse == b.plan.reuse and a.plan.order == b.plan.order
    assert a.plan.scores == b.plan.scores  # bit-identical: the same ops in the same order
    assert a.report["discrepancy"] == b.report["discrepancy"]


def run(model, cal, **kw):
    return skrr.search(model, None, cal, sparsity=kw.pop("sparsity", 0.3), progress=False, **kw)


@pytest.mark.parametrize("name", ["t5-gated", "clip", "umt5"])
def test_offloaded_search_within_a_budget_smaller_than_the_weights_is_identical(name):
    model = FAMILIES[name].make(seed=5)
    cal = calibration()
    plain = run(model, cal, method="skrr")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    graph = skrr.trace(model)
    shared = weights - sum(b.num_params for b in graph.blocks) * 4
    largest = max(b.num_params for b in graph.blocks) * 4
    budget = shared + 2 * largest  # far below the weights: at most two stages resident
    assert budget < 0.8 * weights
    off = run(model, cal, method="skrr", offload="cpu", device_budget_gb=budget / 2**30)
    same_result(plain, off)
    stats = off.report["memory"]["offload"]
    assert stats["peak_bytes"] <= budget
    assert stats["stage_loads"] > len(graph.blocks)  # stages really were moved in and out


def test_budget_too_small_for_one_stage_is_refused_before_the_search_starts():
    model = FAMILIES["t5-gated"].make(seed=5)
    with pytest.raises(SearchError, match="cannot hold the weights no sub-block owns .* give at least"):
        run(model, calibration(), offload="cpu", device_budget_gb=1e-6)


def _unused_disk_refusal():
    with pytest.raises(SearchError, match="disk offload is not implemented"):
        run(FAMILIES["clip"].make(seed=1), calibration(), offload="disk")


@pytest.mark.parametrize("placement", ["cpu", "disk"])
def test_reference_on_host_or_disk_gives_the_identical_search(placement, tmp_path):
    model = FAMILIES["clip"].make(seed=6)
    cal = calibration()
    plain = run(model, cal, method="skrr")
    other = run(model, cal, method="skrr", reference=placement, out_dir=tmp_path / "s")
    same_result(plain, other)
    assert other.report["memory"]["reference"] == placement
    assert not list((tmp_path / "s").glob(".reference*"))  # the scratch reference is gone afterwards


def test_disk_reference_is_a_safetensors_file_equal_to_the_dense_outputs(tmp_path):
    model = FAMILIES["t5-gated"].make(seed=7)
    cal = calibration(n_chunks=2)
    graph = skrr.trace(model)
    runner = StagedRunner(graph)
    ev = Evaluator(runner, cal, None, reference="disk", reference_path=tmp_path / "ref.safetensors")
    assert not (tmp_path / "ref.raw").exists()
    with safe_open(tmp_path / "ref.safetensors", framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(stored) == ["0.0", "1.0"]
    with torch.no_grad():
        for c, (ids, mask) in enumerate(cal.chunks):
            want = model(ids, attention_mask=mask).last_hidden_state  # independent: the HF model itself
            torch.testing.assert_close(stored[f"{c}.0"], want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ev.disc.reference[c][0], want, rtol=1e-5, atol=1e-6)
    ev.disc.reference.close()


def test_bf16_search_equals_the_naive_reference_in_bf16():
    model = FAMILIES["t5-gated"].make(seed=8).to(torch.bfloat16)
    cal = calibration()
    graph = skrr.trace(model)
    fast = run(model, cal, method="skrr", dtype="bf16", sparsity=0.3, graph=graph)
    assert fast.report["dtype"] == "bfloat16"
    scorer = NaiveScorer(model, graph, cal)
    skip, order, history, score = naive_skip_phase(scorer, 0.3, 3)
    assert set(fast.plan.skip) == skip and fast.plan.order == order
    for a, b in zip(fast.plan.scores, history):
        assert a == pytest.approx(b, rel=1e-6)
    reuse, score = naive_reuse_phase(scorer, skip, order, score)
    assert fast.plan.reuse == reuse
    assert fast.report["discrepancy"] == pytest.approx(score, rel=1e-5)


def test_fp32_model_searched_in_bf16_is_a_converted_copy():
    model = FAMILIES["clip"].make(seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = run(model, calibration(), dtype="bf16", method="skrr-skip")
    assert res.report["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SearchError, match="dtype must be one of fp32, bf16, fp16"):
        run(model, calibration(), dtype="int8")


def test_a_stage_leaves_no_reference_cycle_behind():
    """The leak behind the 15.6 GB LLM search: a self-referencing closure kept each stage's values."""
    model = FAMILIES["t5-gated"].make(seed=2)
    runner = StagedRunner(skrr.trace(model))
    ids, mask = inputs(2, 9)
    gc.collect()
    gc.disable()
    try:
        config = Config(frozenset({1, 4}), ((4, 2),))
        for _ in range(3):
            runner.forward(config, ids, mask)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_evaluator_keeps_chunk_contexts_only_within_an_eighth_of_the_cache_budget():
    """Contexts (embeddings, masks, position bias) are kept when all of them fit in an eighth of the budget;
    otherwise only token ids are kept per chunk and contexts are recomputed."""
    import torch.utils._pytree as pytree

    model = FAMILIES["t5-gated"].make(seed=2)
    runner = StagedRunner(skrr.trace(model))
    cal = calibration(n_chunks=4)
    ev = Evaluator(runner, cal, None)
    assert set(ev._contexts) == {-1, 0, 1, 2, 3}
    tensors = {id(t): t for ctx in ev._contexts.values() for t in pytree.tree_leaves(list(ctx.values()))
               if isinstance(t, torch.Tensor)}
    ctx_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert ev.budget.used["device"] >= ctx_bytes  # counted against the budget
    lean = Evaluator(runner, cal, None, cache_bytes=8 * ctx_bytes - 1)
    held = [v for v in vars(lean).values() if isinstance(v, dict) and len(v) >= 4 and all(isinstance(x, dict) for x in v.values())]
    assert not held  # only token ids per chunk: contexts are recomputed
    assert set(lean.inputs) == {-1, 0, 1, 2, 3}
    assert all(isinstance(v, tuple) and len(v) == 2 for v in lean.inputs.values())
    assert Evaluator(runner, cal, None, cache_bytes=8 * ctx_bytes)._contexts


def test_memory_plan_and_measured_peak_are_in_the_report():
    res = run(FAMILIES["clip"].make(seed=3), calibration(), method="skrr-skip")
    mem = res.report["memory"]
    assert mem["plan"]["peak"] > mem["plan"]["weights"] > 0
    assert mem["measured_peak"]["bytes"] > 0 and "RSS" in mem["measured_peak"]["what"]
    assert mem["cache"]["peak_bytes"]["device"] <= mem["cache"]["limit_bytes"]["device"]


def test_cache_budget_is_respected_and_recomputation_keeps_the_result():
    model = FAMILIES["t5-gated"].make(seed=4)
    cal = calibration(n_chunks=3, batch=4, seq=12)
    plain = run(model, cal, method="skrr")
    one_state = 4 * 12 * 32 * 4  # bytes of one chunk's boundary state
    tiny = run(model, cal, method="skrr", cache_gb=3 * one_state / 2**30)
    same_result(plain, tiny)
    assert tiny.report["memory"]["cache"]["peak_bytes"]["device"] <= 3 * one_state
    assert tiny.report["counter"]["recompute_evals"] > plain.report["counter"]["recompute_evals"]


def test_memory_plan_working_set_matches_the_graph_shapes():
    model = FAMILIES["t5-gated"].make(seed=1)
    runner = StagedRunner(skrr.trace(model))
    small = plan_memory(runner, padded_shapes(64, 16, 16), projection_width=None, dtype=torch.float32,
                        cache_bytes=1 << 30, beam=3)
    big = plan_memory(runner, padded_shapes(64, 32, 16), projection_width=None, dtype=torch.float32,
                      cache_bytes=1 << 30, beam=3)
    # attention scores grow with L^2: doubling L grows the working set by more than 2x, the reference by 2x
    assert big.working_set > 2 * small.working_set
    assert big.reference == 2 * small.reference == 2 * 64 * 16 * 32 * 4
    assert small.weights == sum(p.numel() for p in model.parameters()) * 4


@pytest.mark.slow
def test_dry_run_on_the_t5_xxl_config_allocates_no_weights_and_fits_24_gb(tmp_path):
    import transformers as tf

    cfg = tf.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", architectures=["T5EncoderModel"])
    cfg.save_pretrained(tmp_path / "t5xxl")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a photo of cat number {i}" for i in range(1000)))
    code = ("import resource, sys; from skrr_compile.cli import main; rc = main(sys.argv[1:]); "
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = subprocess.run(
        [sys.executable, "-c", code, "search", str(tmp_path / "t5xxl"), "--prompts", str(prompts),
         "--max-length", "256", "--padding", "max_length", "--sparsity", "0.4", "--dtype", "bf16",
         "--device", "cuda", "--projection-width", "1152", "--dry-run"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("estimated peak device memory:"))
    gib = float(line.split(":")[1].split()[0])
    assert 9.0 < gib <= 22.0  # more than the 8.87 GiB of bf16 weights, and it fits a 24 GB card
    assert "1000 prompts in 63 chunks, largest 16 x 256 tokens" in out.stdout
    maxrss_gb = int(out.stdout.split("maxrss_kb")[1].split()[0]) / 2**20
    assert maxrss_gb < 3.0  # the weights (8.9 GiB in bf16) were never allocated (torch + torchao: about 2 GB)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_offloaded_search_on_real_minilm_is_identical():
    from skrr_compile.core.checkpoints import load_encoder, load_tokenizer

    model, tok = load_encoder("builtin"), load_tokenizer("builtin")
    cal = tokenize(tok, read_prompts("builtin")[:4], chunk_size=2)  # two chunks; three steps, then re-use
    plain = run(model, cal, method="skrr", sparsity=0.07)
    assert len(plain.plan.order) >= 3 and plain.plan.reuse
    graph = skrr.trace(model)
    owned = sum(b.num_params for b in graph.blocks) * 4
    shared = sum(p.numel() for p in model.parameters()) * 4 - owned
    off = run(model, cal, method="skrr", sparsity=0.07, offload="cpu", reference="disk",
              device_budget_gb=(shared + 2 * max(b.num_params for b in graph.blocks) * 4) / 2**30)
    same_result(plain, off)
    assert json.dumps(off.report["memory"]["plan"])  # serialisable for report.json


def test_disk_offload_reads_the_checkpoint_and_gives_the_identical_search(tmp_path):
    from accelerate import init_empty_weights

    model = FAMILIES["t5-gated"].make(seed=11)
    model.save_pretrained(tmp_path / "ckpt")
    cal = calibration()
    plain = run(model, cal, method="skrr")
    with init_empty_weights(include_buffers=False):
        empty = type(model)(model.config).eval()
    empty.tie_weights()  # as from_pretrained does: one embedding, counted once
    assert all(p.is_meta for p in empty.parameters())
    assert skrr.trace(empty).total_params == skrr.trace(model).total_params
    graph = skrr.trace(empty)
    largest = max(b.num_params for b in graph.blocks) * 4
    shared = (graph.total_params - sum(b.num_params for b in graph.blocks)) * 4
    disk = run(empty, cal, method="skrr", offload="disk", weights_path=tmp_path / "ckpt", device="cpu",
               device_budget_gb=(shared + 2 * largest) / 2**30, graph=graph)
    same_result(plain, disk)
    assert disk.report["memory"]["offload"]["peak_bytes"] <= shared + 2 * largest
    from skrr_compile.blocksearch.run import materialize

    pruned = materialize(graph, disk)  # weights bound from the memory-mapped checkpoint
    ids, mask = cal.chunks[0]
    want = skrr.apply(model, disk.plan)(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(pruned(ids, attention_mask=mask).last_hidden_state, want)
    with pytest.raises(SearchError, match="needs weights_path"):
        run(empty, cal, offload="disk", device="cpu")


def test_cli_disk_offload_search_equals_the_plain_cli_search(tmp_path):
    from transformers import BertTokenizerFast

    from skrr_compile.cli import main

    model = FAMILIES["bert"].make(seed=12)
    d = tmp_path / "bert"
    model.save_pretrained(d)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(model.config.vocab_size - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(d)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + i % 5)) for i in range(12)))
    base = ["search", str(d), "--prompts", str(prompts), "--sparsity", "0.25", "--chunk-size", "4", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--offload", "disk", "--device", "cpu"]) == 0
    a, b = (json.loads((tmp_path / x / "plan.json").read_text()) for x in ("a", "b"))
    assert (a["skip"], a["reuse"], a["order"], a["scores"]) == (b["skip"], b["reuse"], b["order"], b["scores"])
