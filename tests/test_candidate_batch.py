"""Candidate batching (issue 25): several candidates' states stacked on the batch dimension and run once per
stage and mode. The plan and every score must be bit-identical to scoring one candidate at a time, and equal
to the naive reference (a full forward of every rewritten candidate)."""

from __future__ import annotations

import json

import pytest
import torch
from factories import FAMILIES, inputs
from test_search_speed import calibration, t5_case  # noqa: F401  (t5_case: the module fixture, reused)

import skrr_compile as skrr
from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.discrepancy import last_hidden_state
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import Evaluator, prefix_keys
from skrr_compile.blocksearch.run import search
from skrr_compile.blocksearch.runner import Config, StagedRunner
from skrr_compile.cli.main import main


def make(family, seed=3):
    """The family's tiny encoder with its MLP 48 wide (not 37): the vectorized kernels of this CPU then have
    no scalar tails, whose rows depend on the batch (the probe test keeps 37)."""
    model = FAMILIES[family].make(seed=seed)
    cfg = model.config
    for name in ("intermediate_size", "d_ff"):
        if getattr(cfg, name, None) not in (None, 48):
            setattr(cfg, name, 48)
    torch.manual_seed(seed)
    return type(model)(cfg).eval()


def same_lengths(batch=2, n=4, seq=9, seed=0):
    """Chunks of one shape (so states of different chunks stack), the last one smaller, and the null prompt."""
    chunks = [inputs(batch if i < n - 1 else 1, seq, seed=seed + i) for i in range(n)]
    return Calibration(prompts=["p"] * (batch * (n - 1) + 1), chunks=chunks,
                       null=inputs(1, 3, seed=99, pad_last=False))


def run(model, graph, cal, batch, sparsity=0.35, **kw):
    return search(model, None, cal, sparsity=sparsity, method="skrr", progress=False, graph=graph,
                  candidate_batch=batch, **kw)


def assert_identical(a, b):
    assert a.plan.skip == b.plan.skip and a.plan.reuse == b.plan.reuse and a.plan.order == b.plan.order
    assert a.plan.scores == b.plan.scores  # bit-identical, not approximately
    assert a.report["discrepancy"] == b.report["discrepancy"]
    assert a.report["calibration_report"] == b.report["calibration_report"]


@pytest.mark.parametrize("batch", [2, 3, 8])
def test_stacked_candidates_give_the_naive_plan_and_the_bit_identical_scores(t5_case, batch):  # noqa: F811
    model, cal, graph, want = t5_case
    one = run(model, graph, cal, 1)
    many = run(model, graph, cal, batch)
    assert_identical(one, many)
    assert set(many.plan.skip) == want["skip"] and many.plan.reuse == want["reuse"]  # the naive reference
    assert many.report["discrepancy"] == pytest.approx(want["score"], rel=1e-6, abs=1e-12)
    c = many.report["counter"]
    assert c["stacked_stage_runs"] > 0 and c["stacked_lanes"] >= 2 * c["stacked_stage_runs"]
    assert one.report["counter"]["stacked_stage_runs"] == 0
    used = many.report["candidate_batch"]
    assert used["asked"] == batch and used["used"] >= 2 and used["lane_peak_bytes"] > 0


@pytest.mark.parametrize("family", ["t5-relu", "umt5", "clip", "bert", "llama", "qwen2", "gemma2"])
def test_every_family_stacks_chunks_of_one_shape_to_the_identical_plan(family):
    model = make(family)
    graph = skrr.trace(model)
    cal = same_lengths()
    one, many = run(model, graph, cal, 1, sparsity=0.4), run(model, graph, cal, 4, sparsity=0.4)
    assert_identical(one, many)
    assert many.report["counter"]["stacked_stage_runs"] > 0


def evaluator(family, cal, model=None, **kw):
    model = model if model is not None else make(family, seed=5)
    graph = skrr.trace(model)
    return Evaluator(StagedRunner(graph), cal, None, last_hidden_state, **kw), graph


@pytest.mark.parametrize("family", ["t5-gated", "llama", "bert"])
def test_a_stacked_batch_equals_each_configuration_alone_bit_for_bit(family):
    """Members on different chunks of one shape, with skip, re-use and keep modes, starting at different
    depths from states a parent left in the memo: each output equals the configuration's own forward."""
    cal = same_lengths()
    ev, graph = evaluator(family, cal)
    K = len(graph.blocks)
    kinds = [b.kind for b in graph.blocks]
    parent = Config(frozenset({1}))
    ev.warm(parent)
    j = next(j for j in range(3, K) if kinds[j] == kinds[1])
    configs = [parent.with_skip(3), parent.with_skip(4), Config(frozenset({1, 2})).with_reuse(1, j),
               Config(frozenset({0, 5})), parent.with_skip(3)]
    chunks = [0, 1, 2, 0, 1]
    members = [(cfg, min(cfg.skip), prefix_keys(cfg, K), c) for cfg, c in zip(configs, chunks)]
    outs = ev.run_batch(members)
    for (cfg, _, _, c), out in zip(members, outs):
        alone = ev.runner.forward(cfg, *cal.chunks[c])
        assert torch.equal(out.last_hidden_state, alone.last_hidden_state), (cfg, c)
    assert ev.runner.counter.stacked_stage_runs > 0


@pytest.mark.parametrize("family", ["t5-gated", "llama"])
def test_stacked_contexts_equal_the_prefix_of_the_stacked_rows(family):
    """The stacking plan (per-row values concatenated, shared values once, row counts scaled) gives what the
    prefix computes on the stacked inputs; with no plan the prefix runs, to the same outputs."""
    cal = same_lengths()
    ev, _ = evaluator(family, cal)
    plan = ev.stacking_plan()
    assert plan is not None and "rows" in plan.values()
    if family == "llama":  # the traced graph reads the batch size off its inputs: a scaled int
        assert any(isinstance(kind, int) and not isinstance(kind, bool) for kind in plan.values())
    stacked = ev.batch_context((0, 2, 1), {})
    ids = torch.cat([cal.chunks[c][0] for c in (0, 2, 1)])
    mask = torch.cat([cal.chunks[c][1] for c in (0, 2, 1)])
    want = ev.runner.prefix(ids, mask)
    assert stacked.keys() == want.keys()
    for key, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(stacked[key].expand_as(v), v), key
        else:
            assert stacked[key] == v, key
    cfg = Config(frozenset({1}))
    members = [(cfg, 0, prefix_keys(cfg, ev.runner.num_blocks), c) for c in (0, 2)]
    planned = ev.run_batch(members)
    ev._stacking_plan = None
    fallback = ev.run_batch(members)
    assert all(torch.equal(a.last_hidden_state, b.last_hidden_state) for a, b in zip(planned, fallback))


def test_the_batch_is_sized_to_the_device_budget_and_auto_to_the_rows():
    cal = same_lengths(batch=2)
    ev, graph = evaluator("llama", cal, candidate_batch="auto")
    rows, seq = 2, 9
    hidden = make("llama", seed=5).config
    # the lane peak holds at least the MLP's intermediate activation of the largest chunk (fp32)
    assert ev.lane_bytes >= rows * seq * hidden.intermediate_size * 4
    assert ev.candidate_batch == 4 // rows  # AUTO_ROWS["cpu"] = 4 prompt rows per stacked forward
    small, _ = evaluator("llama", cal, candidate_batch=8, cache_bytes=ev.lane_bytes * 8 * 3)
    assert small.candidate_batch == 3  # an eighth of the budget holds 3 lanes: 8 asked, 3 used


@pytest.mark.parametrize("bad", [0, -2, "many", True, 1.5])
def test_a_bad_candidate_batch_is_refused_in_one_line(bad):
    model = make("llama", seed=5)
    with pytest.raises(SearchError, match="candidate_batch must be a number of candidates >= 1 or 'auto'"):
        search(model, None, same_lengths(), sparsity=0.3, progress=False, candidate_batch=bad)


def test_cli_candidate_batch_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "builtin", "--prompts", "builtin", "--sparsity", "0.3", "--candidate-batch", "0",
              "--out", str(tmp_path / "bad")])
    assert e.value.code == 2
    assert "--candidate-batch: must be a number of candidates >= 1 or 'auto', got '0'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    out, threads = tmp_path / "auto", torch.get_num_threads()
    torch.set_num_threads(1)  # MiniLM's rows are bit-identical stacked with one thread (several split by batch)
    try:
        assert main(["search", "builtin", "--prompts", "builtin", "--limit", "6", "--chunk-size", "1",
                     "--max-length", "16", "--sparsity", "0.3", "--candidate-batch", "auto",
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "candidate batching: 4 candidates per stacked forward (rows bit-identical" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())["search"]
    assert report["candidate_batch"]["asked"] == "auto" and report["candidate_batch"]["used"] == 4
    assert report["counter"]["stacked_stage_runs"] > 0


def test_where_stacked_rows_differ_at_every_shape_candidates_are_scored_alone_and_the_log_says_so(capsys, monkeypatch):
    """Where the probe finds every chunk shape's stacked rows different from rows alone (which shapes do
    is the kernels' business: the next test checks the probe against them), auto and an explicit N score one
    candidate at a time, with one-at-a-time's plan and scores, and the log says why."""
    model = make("llama", seed=5)
    graph = skrr.trace(model)
    cal = same_lengths()
    monkeypatch.setattr(Evaluator, "probe", lambda ev, width: {ev.shape_of(c): 2e-7 for c in ev.chunks})
    ev, _ = evaluator("llama", cal, model=model, candidate_batch="auto")
    assert ev.candidate_batch == 1 and ev.stacking["bit_identical"] is False
    assert ev.stacking["shapes_alone"] == ev.stacking["shapes"] == 2  # the prompt chunks' shape and the null's
    one = run(model, graph, cal, 1, sparsity=0.4)
    forced = search(model, None, cal, sparsity=0.4, method="skrr", progress=True, graph=graph, candidate_batch=4)
    assert ("candidate batching 4: off (stacked rows differ from rows alone by up to 2.0e-07 (relative) on this "
            "backend at every chunk shape") in capsys.readouterr().out
    st = forced.report["candidate_batch"]
    assert st["used"] == 1 and st["stacking"]["bit_identical"] is False
    assert forced.report["counter"]["stacked_stage_runs"] == 0
    assert_identical(one, forced)


def stacks_alone_exactly(rows, width=32, copies=2):
    """Whether this CPU's linear layer computes `rows` rows alone as it does stacked with copies of them (an
    independent measure of the kernels, outside the search)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, width, generator=g), torch.randn(width, width, generator=g)
    return torch.equal(torch.nn.functional.linear(x, w), torch.nn.functional.linear(x.repeat(copies, 1), w)[:rows])


def test_a_shape_whose_stacked_rows_differ_runs_alone_while_the_others_stack():
    """The null prompt of 1 x 3 tokens is 3 rows per GEMM: MKL on AVX-512 takes another path below 4 rows,
    elsewhere it may not; the probe's verdict for that shape follows the kernels' own, the other shape (2 x 9
    tokens) stacks, and the plan and scores equal one at a time's either way."""
    cal = same_lengths()
    ev, graph = evaluator("llama", cal, candidate_batch=4)
    null_shape = ev.shape_of(-1)
    with torch.inference_mode():
        alone_here = not stacks_alone_exactly(3)
    assert (null_shape in ev.alone_shapes) == alone_here
    assert ev.shape_of(0) not in ev.alone_shapes and ev.candidate_batch == 4
    assert ev.stacking["shapes"] == 2 and ev.stacking["shapes_alone"] == int(alone_here)
    model = make("llama", seed=5)
    one, many = run(model, graph, cal, 1, sparsity=0.4), run(model, graph, cal, 4, sparsity=0.4)
    assert_identical(one, many)
    assert many.report["counter"]["stacked_stage_runs"] > 0
