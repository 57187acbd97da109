"""The exact speed levers of the search (issue 13): each one, alone or with the others, gives the naive
reference's plan and scores; the state memo only ever holds what a fresh forward computes; the counters
show each lever at work."""

from __future__ import annotations

import pytest
import torch
from factories import FAMILIES, inputs
from search_reference import NaiveScorer, naive_reuse_phase, naive_skip_phase, oracle_search

import skrr_compile as skrr
from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import LEVERS, Beam, Candidate, Evaluator, prefix_keys
from skrr_compile.blocksearch.run import search
from skrr_compile.blocksearch.runner import Config, StagedRunner


def calibration(lengths=(10, 6, 12, 8), batch=3, seed=0):
    """Chunks of different lengths (so chunk costs differ) and the null prompt."""
    chunks = [inputs(batch, n, seed=seed + i) for i, n in enumerate(lengths)]
    return Calibration(prompts=["p"] * (batch * len(lengths)), chunks=chunks, null=inputs(1, 3, seed=99, pad_last=False))


@pytest.fixture(scope="module")
def t5_case():
    """A small T5 whose search re-uses a sub-block (layer 2's FFN is a copy of layer 1's, so re-using it for a
    skipped layer-1 FFN wins), its naive search (a full forward per candidate) computed once."""
    model = FAMILIES["t5-gated"].make(seed=12)
    with torch.no_grad():
        for a, b in zip(model.encoder.block[2].layer[1].parameters(), model.encoder.block[1].layer[1].parameters()):
            a.copy_(b)
    cal = calibration()
    graph = skrr.trace(model)
    scorer = NaiveScorer(model, graph, cal, family=FAMILIES["t5-gated"])
    skip, order, history, score = naive_skip_phase(scorer, 0.35, 3)
    reuse, final = naive_reuse_phase(scorer, skip, order, score)
    assert reuse  # the re-use phase is exercised
    return model, cal, graph, {"skip": skip, "order": order, "history": history, "reuse": reuse, "score": final,
                               "block_evals": scorer.block_evals}


SUBSETS = [()] + [(lever,) for lever in LEVERS] + [LEVERS]


@pytest.mark.parametrize("levers", SUBSETS, ids=lambda s: "+".join(s) or "none")
def test_every_lever_subset_gives_the_naive_plan_and_scores(t5_case, levers):
    model, cal, graph, want = t5_case
    fast = search(model, None, cal, sparsity=0.35, method="skrr", progress=False, graph=graph, levers=levers)
    assert set(fast.plan.skip) == want["skip"] and fast.plan.order == want["order"]
    assert fast.plan.reuse == want["reuse"]
    assert len(fast.plan.scores) == len(want["history"])
    for a, b in zip(fast.plan.scores, want["history"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-12)
    assert fast.report["discrepancy"] == pytest.approx(want["score"], rel=1e-6, abs=1e-12)
    c = fast.report["counter"]
    assert (c["abandoned"] > 0) == ("abandon" in levers)
    assert (c["memo_starts"] > 0) == ("memo" in levers)
    assert c["block_evals"] < want["block_evals"]


def test_each_lever_saves_work_and_the_report_keeps_the_counters(t5_case):
    model, cal, graph, _ = t5_case
    runs = {name: search(model, None, cal, sparsity=0.35, method="skrr-skip", progress=False, graph=graph,
                         levers=[x for x in LEVERS if x != name])
            for name in (None, *LEVERS)}
    work = {name: r.report["counter"]["prompt_block_evals"] for name, r in runs.items()}
    assert work[None] < work["abandon"] and work[None] < work["memo"], work
    steps = runs[None].report["depth_history"]
    assert all(h["seconds"] >= 0 and h["counter"]["candidates"] > 0 for h in steps)
    assert [h["counter"]["block_evals"] for h in steps] == sorted(h["counter"]["block_evals"] for h in steps)


def test_unknown_lever_is_refused_with_the_known_ones(t5_case):
    model, cal, graph, _ = t5_case
    with pytest.raises(SearchError, match="levers must be a list drawn from abandon, memo, order"):
        search(model, None, cal, sparsity=0.35, progress=False, graph=graph, levers=["batch"])


def test_prefix_keys_name_the_modes_below_each_boundary():
    keys = prefix_keys(Config(frozenset({1, 4}), ((4, 2),)), 6)
    assert keys[0] == keys[1] == ()
    assert keys[2] == keys[4] == ((1, "skip"),)
    assert keys[5] == keys[6] == ((1, "skip"), (4, 2))


def test_every_memo_state_equals_a_fresh_forward_of_its_prefix():
    """The memo's invariant: (chunk, k, modes below k) -> exactly the s_k any configuration with those modes
    below k computes from scratch (bit for bit), after a skip step and the retain that follows it."""
    model = FAMILIES["t5-gated"].make(seed=12)
    runner = StagedRunner(skrr.trace(model))
    ev = Evaluator(runner, calibration(), None)
    K = runner.num_blocks
    parents = [Beam(Config(frozenset({1})), (1,), 0.0), Beam(Config(frozenset({4})), (4,), 0.0)]
    cands = [Candidate(p.config.with_skip(j), j, tuple(sorted(p.config.skip | {j})), (0.0, j))
             for p in parents for j in range(K) if j not in p.config.skip]
    for p in parents:
        ev.warm(p.config)
    ev.select(cands, 2, [])
    assert runner.counter.memo_starts > 0  # (1, j) and (4, j) share states below 1 and 4, and j < 1 or 4 ...
    ev.retain([cands[0].config], [cands[0].config.with_skip(j) for j in (3, 5)])
    assert ev.memo
    for (c, k, key), held in ev.memo.items():
        config = Config(frozenset(i for i, _ in key), tuple((i, m) for i, m in key if m != "skip"))
        ctx = runner.prefix(*ev.inputs[c])
        h = ctx["s0"]
        for stage in range(k):
            h = runner.stage(stage, h, ctx, config.mode(stage))
        assert torch.equal(held, h), (c, k, key)


def test_chunks_are_scored_by_the_parents_share_per_token_largest_first():
    model = FAMILIES["t5-gated"].make(seed=13)
    ev = Evaluator(StagedRunner(skrr.trace(model)), calibration(lengths=(10, 6, 12, 8)), None)
    tokens = {c: ev.inputs[c][0].numel() for c in ev.chunks}
    assert tokens == {-1: 3, 0: 30, 1: 18, 2: 36, 3: 24}
    shares = {-1: 0.003, 0: 0.6, 1: 0.36, 2: 0.36, 3: 0.72}  # per token: 0.001, 0.02, 0.02, 0.01, 0.03
    assert ev.chunk_order(shares) == [3, 0, 1, 2, -1]  # equal ratios: lower chunk first
    assert ev.chunk_order(None) == [-1, 0, 1, 2, 3]
    assert Evaluator(ev.runner, calibration(), None, levers=["memo"]).chunk_order(shares) == [-1, 0, 1, 2, 3]


def test_reuse_that_ties_with_the_skip_keeps_the_skip():
    """FFNs of layers 1 and 2 output zero: re-using layer 2's FFN for a skipped layer-1 FFN scores exactly what
    the skip scores; ties keep skipping (an exact tie in the re-use phase once compared a tuple with an int)."""
    model = FAMILIES["t5-gated"].make(seed=14)
    with torch.no_grad():
        for layer in (1, 2):
            model.encoder.block[layer].layer[1].DenseReluDense.wo.weight.zero_()
    graph = skrr.trace(model)
    cal = calibration()
    sparsity = 0.99 * graph.blocks[3].num_params / graph.total_params
    fast = search(model, None, cal, sparsity=sparsity, method="skrr", beam=1, progress=False, graph=graph)
    scorer = NaiveScorer(model, graph, cal)
    skip, order, _, score = naive_skip_phase(scorer, sparsity, 1)
    reuse, _ = naive_reuse_phase(scorer, skip, order, score)
    assert set(fast.plan.skip) == skip == {3} and fast.plan.scores == (0.0,)
    assert fast.plan.reuse == reuse == {}
    step = fast.report["reuse_steps"][0]
    assert step["right"] == 5 and step["scores"]["5"] == step["scores"]["skip"] == 0.0 and step["chosen"] is None


def test_the_skip_phase_inside_a_skrr_result_is_the_skrr_skip_result(t5_case):
    """compare derives its skrr-skip rows from the skrr search instead of searching twice."""
    from skrr_compile.blocksearch.run import skip_phase_result

    model, cal, graph, _ = t5_case
    both = search(model, None, cal, sparsity=0.35, method="skrr", progress=False, graph=graph)
    alone = search(model, None, cal, sparsity=0.35, method="skrr-skip", progress=False, graph=graph)
    derived = skip_phase_result(both)
    assert both.plan.reuse  # the re-use phase changed something, so the two results really differ
    assert derived.plan.to_dict() == alone.plan.to_dict()
    for key in ("sparsity", "removed_params", "discrepancy", "calibration_report", "skip", "order", "reuse"):
        assert derived.report[key] == alone.report[key], key
    assert derived.report["method"] == "skrr-skip" and "reuse_steps" not in derived.report


def test_the_dense_reference_pass_leaves_the_dense_beams_states():
    """The reference forward stores the dense states (the first step starts from them): no stage is run
    twice for the dense beam, and each stored state is what a fresh forward computes."""
    model = FAMILIES["t5-gated"].make(seed=12)
    runner = StagedRunner(skrr.trace(model))
    ev = Evaluator(runner, calibration(), None)
    K = runner.num_blocks
    assert sorted(ev.memo) == sorted((c, k, ()) for c in ev.chunks for k in range(1, K))
    assert runner.counter.block_evals == runner.counter.token_block_evals == 0  # the reference is not search work
    for c in ev.chunks:
        ctx = runner.prefix(*ev.inputs[c])
        h = ctx["s0"]
        for k in range(1, K):
            h = runner.stage(k - 1, h, ctx)
            assert torch.equal(ev.memo[(c, k, ())], h)
    ev.warm(Config())
    assert runner.counter.recompute_evals == 0


def test_the_last_step_selects_only_the_best(t5_case, monkeypatch):
    """When every candidate of a step reaches the target, the search ends there and returns the best: that
    step selects k = 1 (a tighter bar), and the result is still the naive one."""
    model, cal, graph, want = t5_case
    calls = []
    select = Evaluator.select

    def spy(self, cands, k, complete, desc=""):
        calls.append((desc, k, len(cands)))
        return select(self, cands, k, complete, desc)

    monkeypatch.setattr(Evaluator, "select", spy)
    fast = search(model, None, cal, sparsity=0.35, method="skrr-skip", progress=False, graph=graph)
    steps = [k for desc, k, _ in calls if desc.startswith("skip step")]
    assert steps[:-1] == [3] * (len(steps) - 1) and steps[-1] == 1
    assert set(fast.plan.skip) == want["skip"] and fast.plan.order == want["order"]
    for a, b in zip(fast.plan.scores, want["history"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-12)


def test_chunk_contexts_are_kept_when_they_fit_and_recomputed_when_not(t5_case):
    model, cal, graph, _ = t5_case
    kept = search(model, None, cal, sparsity=0.35, method="skrr-skip", progress=False, graph=graph)
    tight = search(model, None, cal, sparsity=0.35, method="skrr-skip", progress=False, graph=graph,
                   cache_gb=2e-6)  # ~2 KB: no context fits in an eighth of it
    assert kept.report["counter"]["prefix_evals"] == 0
    assert tight.report["counter"]["prefix_evals"] >= tight.report["counter"]["chunk_evals"] > 0
    assert kept.plan.to_dict() == tight.plan.to_dict()


def test_chunks_with_a_deeper_memo_state_are_scored_first_at_equal_share():
    """Work-aware order: at equal parent share per token, the chunk another configuration left a deep state
    for (fewer stages to run) comes first."""
    model = FAMILIES["t5-gated"].make(seed=13)
    runner = StagedRunner(skrr.trace(model))
    ev = Evaluator(runner, calibration(lengths=(10, 10, 10, 10)), None)
    K = runner.num_blocks
    cand = Candidate(Config(frozenset({1})), 1, (1,), (0.0, 1))
    keys = prefix_keys(cand.config, K)
    shares = {c: 0.01 * ev.tokens[c] for c in ev.chunks}  # equal per token
    assert ev.chunk_order(shares, cand, keys) == [-1, 0, 1, 2, 3]  # every chunk starts at s_1 (dense state)
    ev.run_chunk(Config(frozenset({1, K - 1})), 2, keys=prefix_keys(Config(frozenset({1, K - 1})), K))
    assert ev.chunk_order(shares, cand, keys) == [2, -1, 0, 1, 3]  # chunk 2 starts at s_{K-1}
    assert Evaluator(runner, calibration(lengths=(10, 10, 10, 10)), None, levers=["abandon", "memo"]).chunk_order(
        shares, cand, keys) == [-1, 0, 1, 2, 3]


def test_the_counters_weigh_a_stage_by_prompts_and_by_tokens():
    model = FAMILIES["t5-gated"].make(seed=13)
    runner = StagedRunner(skrr.trace(model))
    ev = Evaluator(runner, calibration(lengths=(10, 6)), None)
    K = runner.num_blocks
    config = Config(frozenset({0}))  # from s_0: stage 0 skipped, K - 1 stages run on 3 prompts of 6 tokens
    ev.run_chunk(config, 1, start=0)
    c = runner.counter
    assert (c.block_evals, c.prompt_block_evals, c.token_block_evals) == (K - 1, 3 * (K - 1), 3 * 6 * (K - 1))


def test_the_fast_search_needs_about_what_an_oracle_needs(t5_case):
    """The oracle (a perfect bar, each candidate's own shares as its chunk order; bench/search_floor.py) finds
    the naive plan with its score, needs no more evaluations than the fast search, and the fast search's
    best-first abandoning on its parent's shares stays close to it (here 317 vs 287 per prompt: 4 coarse
    chunks; on MiniLM with 33 chunks of one prompt 1.003x)."""
    model, cal, graph, want = t5_case
    fast = search(model, None, cal, sparsity=0.35, method="skrr", progress=False, graph=graph)
    best, oracle, _ = oracle_search(graph, cal, 0.35)
    assert set(best.config.skip) == want["skip"] and best.config.reuse_map == want["reuse"]
    assert best.score == pytest.approx(want["score"], rel=1e-6, abs=1e-12)
    ours, floor = fast.report["counter"]["prompt_block_evals"], oracle.prompt_block_evals
    assert oracle.abandoned > 0
    assert floor <= ours <= 1.15 * floor
