"""The fast Skrr search against the naive reference; resume; Algorithm 2; baselines; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_PROMPTS
from factories import FAMILIES, inputs
from search_reference import NaiveScorer, naive_reuse_phase, naive_skip_phase

import skrr_compile as skrr
from skrr_compile.blocksearch import evaluator as search_mod
from skrr_compile.blocksearch.calibration import Calibration, PromptError, read_prompts, tokenize
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.run import search


def calibration(n_chunks=3, batch=4, seq=10, seed=0):
    chunks = [inputs(batch, seq, seed=seed + i) for i in range(n_chunks)]
    null = inputs(1, 3, seed=99, pad_last=False)
    return Calibration(prompts=["p"] * (n_chunks * batch), chunks=chunks, null=null)


def assert_same_as_naive(model, cal, sparsity, beam=3, reuse=True, projection=None, family=None):
    """family: score the naive reference on hand-patched HF models with its own plain-torch Eq. 1."""
    graph = skrr.trace(model)
    method = "skrr" if reuse else "skrr-skip"
    fast = search(model, None, cal, sparsity=sparsity, method=method, beam=beam, projection=projection,
                  progress=False, graph=graph)
    scorer = NaiveScorer(model, graph, cal, projection, family=family)
    skip, order, history, score = naive_skip_phase(scorer, sparsity, beam)
    assert set(fast.plan.skip) == skip
    assert fast.plan.order == order
    assert len(fast.plan.scores) == len(history)
    for a, b in zip(fast.plan.scores, history):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-12)
    want_reuse = {}
    if reuse:
        want_reuse, score = naive_reuse_phase(scorer, skip, order, score)
    assert fast.plan.reuse == want_reuse
    assert fast.report["discrepancy"] == pytest.approx(score, rel=1e-6, abs=1e-12)
    assert fast.report["counter"]["block_evals"] < scorer.block_evals
    return fast, scorer


@pytest.mark.parametrize("name", ["t5-gated", "clip"])
def test_fast_search_equals_naive_reference(name):
    model = FAMILIES[name].make(seed=2)
    fast, scorer = assert_same_as_naive(model, calibration(), sparsity=0.3, reuse=(name == "t5-gated"),
                                        family=FAMILIES[name])
    assert fast.report["sparsity"] >= 0.3


def test_fast_search_equals_naive_with_a_projection():
    model = FAMILIES["bert"].make(seed=3)
    proj = torch.nn.Sequential(torch.nn.Linear(32, 20), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(20, 20))
    assert_same_as_naive(model, calibration(n_chunks=2), sparsity=0.25, beam=2, projection=proj,
                         family=FAMILIES["bert"])


def test_two_argument_discrepancy_equals_the_plain_definition():
    """Discrepancy(dense, calibration[, projection]) against Eq. 1 computed from the definition (issue 14)."""
    from search_reference import plain_discrepancy

    from skrr_compile.blocksearch.discrepancy import Discrepancy

    fam = FAMILIES["bert"]
    model = fam.make(seed=3)
    cal = calibration(n_chunks=3, batch=3)
    proj = torch.nn.Sequential(torch.nn.Linear(32, 20), torch.nn.GELU(approximate="tanh"))
    ref = fam.reference(model, [1, 4], {4: 2})
    pruned = skrr.apply(model, skrr.Plan(skip=[1, 4], reuse={4: 2}))
    for projection in (None, proj):
        want = plain_discrepancy(model, ref, cal, projection)
        assert want > 0
        disc = Discrepancy(model, cal) if projection is None else Discrepancy(model, cal, projection)
        assert disc.evaluate(pruned).discrepancy == pytest.approx(want, rel=1e-6)
        assert disc.evaluate(ref).discrepancy == pytest.approx(want, rel=1e-6)


def test_fast_search_equals_naive_on_real_minilm():
    from skrr_compile.core.checkpoints import load_encoder, load_tokenizer

    model, tok = load_encoder("builtin"), load_tokenizer("builtin")
    prompts = read_prompts("builtin")[:4]  # two chunks; 7% takes three beam steps and re-uses two blocks
    cal = tokenize(tok, prompts, chunk_size=2)
    fast, scorer = assert_same_as_naive(model, cal, sparsity=0.07, beam=2)
    assert len(fast.plan.order) >= 3 and fast.plan.reuse
    assert fast.report["counter"]["block_evals"] * 2 < scorer.block_evals


def test_resume_after_interruption_gives_identical_plan(tmp_path, monkeypatch):
    model = FAMILIES["t5-gated"].make(seed=4)
    graph = skrr.trace(model)
    cal = calibration()
    whole = search(model, None, cal, sparsity=0.45, progress=False, graph=graph)

    real_select, calls = search_mod.Evaluator.select, {"n": 0}

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second beam step
            raise KeyboardInterrupt
        return real_select(self, *a, **k)

    monkeypatch.setattr(search_mod.Evaluator, "select", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(model, None, cal, sparsity=0.45, progress=False, graph=graph, out_dir=tmp_path)
    state = json.loads((tmp_path / "search_state.json").read_text())
    assert state["phase"] == "skip" and len(state["history"]) == 1
    monkeypatch.setattr(search_mod.Evaluator, "select", real_select)
    with pytest.raises(SearchError, match="--resume"):
        search(model, None, cal, sparsity=0.45, progress=False, graph=graph, out_dir=tmp_path)
    with pytest.raises(SearchError, match="other inputs"):
        search(model, None, cal, sparsity=0.5, progress=False, graph=graph, out_dir=tmp_path, resume=True)
    resumed = search(model, None, cal, sparsity=0.45, progress=False, graph=graph, out_dir=tmp_path, resume=True)
    assert resumed.plan == whole.plan
    assert resumed.plan.scores == whole.plan.scores


def test_resume_continues_where_it_stopped_in_both_phases(tmp_path, monkeypatch):
    """Resume does only the steps not done yet (a restart from scratch would redo them), in both phases."""
    model = FAMILIES["t5-gated"].make(seed=4)
    graph = skrr.trace(model)
    cal = calibration()
    real_select, calls = search_mod.Evaluator.select, {"n": 0, "stop": None}

    def counting(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return real_select(self, *a, **k)

    monkeypatch.setattr(search_mod.Evaluator, "select", counting)
    whole = search(model, None, cal, sparsity=0.45, progress=False, graph=graph)
    total, depths = calls["n"], len(whole.report["depth_history"])
    assert total == depths + len(whole.plan.order) and len(whole.plan.order) >= 2
    for stop, phase in ((2, "skip"), (depths + 2, "reuse")):
        out = tmp_path / phase
        calls.update(n=0, stop=stop)
        with pytest.raises(KeyboardInterrupt):
            search(model, None, cal, sparsity=0.45, progress=False, graph=graph, out_dir=out)
        state = json.loads((out / "search_state.json").read_text())
        assert state["phase"] == phase
        calls.update(n=0, stop=None)
        resumed = search(model, None, cal, sparsity=0.45, progress=False, graph=graph, out_dir=out, resume=True)
        assert resumed.plan == whole.plan and resumed.plan.scores == whole.plan.scores
        assert resumed.report["discrepancy"] == whole.report["discrepancy"]
        assert calls["n"] == total - (stop - 1), phase  # the stop - 1 finished steps are not redone


def test_corrupt_search_state_is_refused(tmp_path):
    model = FAMILIES["t5-gated"].make(seed=4)
    (tmp_path / "search_state.json").write_text('{"key": "0123", "phase": "sk')
    with pytest.raises(SearchError, match="not a readable search state"):
        search(model, None, calibration(), sparsity=0.45, progress=False, out_dir=tmp_path, resume=True)
    (tmp_path / "search_state.json").write_text("[1, 2]")
    with pytest.raises(SearchError, match="other inputs"):
        search(model, None, calibration(), sparsity=0.45, progress=False, out_dir=tmp_path, resume=True)


def test_laco_merge_is_not_a_copy_and_lands_in_the_applied_model():
    """With two following layers the merge theta_b + sum(theta_f - theta_b) differs from every layer's weights."""
    from skrr_compile.blocksearch.run import materialize

    model = FAMILIES["clip"].make(seed=6)
    cal = calibration(n_chunks=2)
    graph = skrr.trace(model)
    res = search(model, None, cal, sparsity=0.3, method="laco", laco_params={"T": -1.0, "I": 1, "M": 3},
                 progress=False, graph=graph)
    assert res.plan.skip == (2, 3, 4, 5)  # base 0, layers 1 and 2 merged into it
    params = dict(model.named_parameters())
    assert res.overrides and all(name.startswith("encoder.layers.0.") for name in res.overrides)
    for name, merged in res.overrides.items():
        t0, t1, t2 = (params[name.replace("layers.0.", f"layers.{k}.")] for k in range(3))
        torch.testing.assert_close(merged, t0 + (t1 - t0) + (t2 - t0))
        if t0.dim() == 2:
            assert not any(torch.allclose(merged, t) for t in (t0, t1, t2)), name
    pruned = materialize(graph, res)
    bound = dict(pruned.graph_module.named_parameters())
    for name, merged in res.overrides.items():
        assert torch.equal(bound[name], merged), name
    ids, mask = cal.chunks[0]
    with torch.no_grad():
        plain = skrr.apply(graph, skrr.Plan(skip=res.plan.skip))(ids, attention_mask=mask).last_hidden_state
        got = pruned(ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(got, plain)  # the merged weights change the output: not a plain skip
    with pytest.raises(skrr.PlanError, match="needs their merged weights"):
        skrr.apply(graph, res.plan)  # the LaCo plan alone would be a plain skip: refused


def test_early_abandoning_happens_and_exact_ties_go_to_the_lower_index():
    """Two attention branches that output zero: skipping either costs exactly 0 (a tie, broken by index), and
    every other candidate is abandoned once its partial sum passes 0."""
    model = FAMILIES["t5-gated"].make(seed=4)
    with torch.no_grad():
        for layer in (1, 2):
            model.encoder.block[layer].layer[0].SelfAttention.o.weight.zero_()
    graph = skrr.trace(model)
    cal = calibration(n_chunks=4)
    sparsity = 0.99 * graph.blocks[2].num_params / graph.total_params  # one attention sub-block reaches it
    fast, scorer = assert_same_as_naive(model, cal, sparsity, beam=1, reuse=False)
    assert fast.plan.skip == (2,) and fast.plan.scores == (0.0,)
    counter = fast.report["counter"]
    others = len(graph.blocks) - 2  # every candidate but the two zero-cost ones
    assert counter["abandoned"] >= others - 1, counter  # (the first one may be scored before a 0 is complete)
    assert counter["abandoned"] > 0


def test_shortgpt_ranks_layers_by_block_influence():
    fam = FAMILIES["bert"]
    model = fam.make(seed=5)
    cal = calibration(n_chunks=2)
    result = search(model, None, cal, sparsity=0.2, method="shortgpt", progress=False)
    # hand computation from HF hidden states: BI_l = mean over real tokens of 1 - cos(h_l, h_{l+1})
    sums, n = [0.0] * 3, 0
    for ids, mask in cal.chunks:
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        m = mask.bool()
        for layer in range(3):
            cos = torch.nn.functional.cosine_similarity(hs[layer].double(), hs[layer + 1].double(), dim=-1)
            sums[layer] += float((1 - cos)[m].sum())
        n += int(m.sum())
    bi = [s / n for s in sums]
    ranking = [r["layer"] for r in result.report["layer_ranking"]]
    assert ranking == sorted(range(3), key=lambda layer: bi[layer])
    for r in result.report["layer_ranking"]:
        assert r["block_influence"] == pytest.approx(bi[r["layer"]], rel=1e-6)
    first = ranking[0]
    assert result.plan.skip == (2 * first, 2 * first + 1)  # one layer (~23%) reaches 20%


def test_laco_merges_parameter_differences_into_the_base_layer():
    fam = FAMILIES["clip"]
    model = fam.make(seed=6)
    cal = calibration(n_chunks=2)
    res = search(model, None, cal, sparsity=0.2, method="laco", laco_params={"T": -1.0, "I": 1, "M": 2},
                 progress=False)
    # T = -1 accepts the first merge: base = 3 - 2 = 1, layer 2 merged into layer 1
    assert res.plan.skip == (4, 5)
    params = dict(model.named_parameters())
    for name, merged in res.overrides.items():
        other = name.replace("layers.1.", "layers.2.")
        torch.testing.assert_close(merged, params[name] + (params[other] - params[name]))
    log = res.report["laco_log"]
    assert log[0]["base"] == 1 and log[0]["merged"] == [2] and log[0]["accepted"]
    rejected = search(model, None, cal, sparsity=0.2, method="laco", laco_params={"T": 1.01}, progress=False)
    assert rejected.plan.skip == () and not any(e["accepted"] for e in rejected.report["laco_log"])


def test_finercut_is_greedy_beam_one():
    model = FAMILIES["t5-relu"].make(seed=7)
    graph = skrr.trace(model)
    cal = calibration()
    fc = search(model, None, cal, sparsity=0.3, method="finercut", progress=False, graph=graph)
    scorer = NaiveScorer(model, graph, cal)
    skip, order, _, _ = naive_skip_phase(scorer, 0.3, beam=1)
    assert set(fc.plan.skip) == skip and fc.plan.order == order and fc.plan.reuse == {}


def test_bad_inputs_get_clear_errors(tmp_path):
    model = FAMILIES["t5-gated"].make()
    cal = calibration(n_chunks=1)
    with pytest.raises(SearchError, match=r"in \(0, 1\)"):
        search(model, None, cal, sparsity=1.2, progress=False)
    with pytest.raises(SearchError, match="cannot be reached"):
        search(model, None, cal, sparsity=0.95, progress=False)
    with pytest.raises(SearchError, match="unknown method"):
        search(model, None, cal, sparsity=0.3, method="magic", progress=False)
    with pytest.raises(ValueError, match="width 32"):
        search(model, None, cal, sparsity=0.3, projection=torch.nn.Linear(48, 8), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        read_prompts(empty)
    with pytest.raises(PromptError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "a cat"}\n')
    with pytest.raises(PromptError, match="field 'prompt' does not exist"):
        read_prompts(bad, field="prompt")
    with pytest.raises(PromptError, match="unsupported prompt file type"):
        read_prompts(tmp_path / "x.parquet") if (tmp_path / "x.parquet").write_text("x") else None
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(PromptError, match="cannot read"):
        read_prompts(binary)


@pytest.mark.skipif(not SHARED_PROMPTS.is_dir(), reason="../shared/data/prompts not present")
def test_reads_the_shared_prompt_sets():
    assert len(read_prompts(SHARED_PROMPTS / "partiprompts.tsv")) == 1632
    assert len(read_prompts(SHARED_PROMPTS / "geneval_metadata.jsonl")) == 553
    with pytest.raises(PromptError, match="available"):
        read_prompts(SHARED_PROMPTS / "partiprompts.tsv", field="prompt")
    iiw = read_prompts(SHARED_PROMPTS / "iiw_locnar_eval.jsonl")
    assert len(iiw) == 1000


def test_tokenize_warns_on_truncation_and_filters_by_length():
    from skrr_compile.core.checkpoints import load_tokenizer

    tok = load_tokenizer("builtin")
    prompts = read_prompts("builtin")
    with pytest.warns(UserWarning, match="truncated"):
        cal = tokenize(tok, prompts, max_length=16, chunk_size=8)
    assert cal.truncated > 0 and cal.null[0].shape[0] == 1
    long_only = tokenize(tok, prompts, min_tokens=40)
    assert 0 < long_only.num_prompts < len(prompts) and long_only.dropped == len(prompts) - long_only.num_prompts


def test_reuse_phase_picks_what_brute_force_picks():
    """Sub-block 5 (layer 2 FFN) is given layer 1's FFN weights: re-using it for a skipped sub-block 3
    reproduces the dense model exactly, so Algorithm 2 must pick right = 5 for 3; for 2 it must pick what
    a brute-force comparison of {skip, left, right} picks."""
    from skrr_compile.blocksearch.checkpoint import Checkpoint
    from skrr_compile.blocksearch.evaluator import Beam, Evaluator
    from skrr_compile.blocksearch.runner import Config, StagedRunner
    from skrr_compile.blocksearch.skrr import reuse_phase

    model = FAMILIES["t5-gated"].make(seed=8)
    with torch.no_grad():
        ffn1, ffn2 = model.encoder.block[1].layer[1], model.encoder.block[2].layer[1]
        for a, b in zip(ffn2.parameters(), ffn1.parameters()):
            a.copy_(b)
    graph = skrr.trace(model)
    cal = calibration()
    ev = Evaluator(StagedRunner(graph), cal)
    scorer = NaiveScorer(model, graph, cal)
    skip, order = {2, 3}, (3, 2)
    d0 = scorer.score(skip)
    best, steps = reuse_phase(graph, ev, Beam(Config(frozenset(skip)), order, d0), Checkpoint(None, "", False),
                              progress=False)
    want, _ = naive_reuse_phase(scorer, skip, order, d0)
    assert best.config.reuse_map == want
    assert want[3] == 5 and steps[0]["chosen"] == 5
    assert best.score == pytest.approx(scorer.score(skip, want), rel=1e-6, abs=1e-12)
