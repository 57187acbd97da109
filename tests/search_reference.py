"""Naive reference of the Skrr search: every candidate is a full forward of its rewritten model.

Written from the definition in the issue, not from the fast implementation; the benchmark imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import skrr_compile as skrr
from skrr_compile.blocksearch.checkpoint import Checkpoint
from skrr_compile.blocksearch.discrepancy import Discrepancy, last_hidden_state
from skrr_compile.blocksearch.distributed import fold
from skrr_compile.blocksearch.evaluator import Candidate, Evaluator, prefix_keys
from skrr_compile.blocksearch.runner import StagedRunner
from skrr_compile.blocksearch.skrr import beam_skip, reuse_phase
from skrr_compile.blocksearch.target import check_sparsity
from skrr_compile.utils.tensors import param_numel


def plain_discrepancy(dense, candidate, calibration, projection=None, select=last_hidden_state) -> float:
    """Eq. 1 from its definition, in float64 with plain torch, on the models' own outputs.

    D = MSE over the calibration prompts + MSE over the null prompt, each the mean of squared differences over
    every (token, channel) the consumer reads; the prompt MSE is normalised over all chunks together (one mean,
    not a mean of chunk means). Shares nothing with skrr_compile.blocksearch.discrepancy.
    """
    import torch

    def feats(model, ids, mask):
        with torch.no_grad():
            h = select(model(ids, attention_mask=mask))
            return (projection(h) if projection is not None else h).double()

    def sums(ids, mask):
        read = mask.bool() if calibration.read == "mask" else torch.ones_like(mask, dtype=torch.bool)
        diff = (feats(dense, ids, mask) - feats(candidate, ids, mask))[read]
        return float(diff.pow(2).sum()), diff.numel()

    total, count = 0.0, 0
    for ids, mask in calibration.chunks:
        s, n = sums(ids, mask)
        total, count = total + s, count + n
    null_sum, null_count = sums(*calibration.null)
    return total / count + null_sum / null_count


class NaiveScorer:
    """Every candidate a full forward. With `family` (tests/factories.py) the candidates are the hand-patched HF
    models and D is `plain_discrepancy`: independent of skrr.apply and of the project's Discrepancy."""

    def __init__(self, model, graph, calibration, projection=None, select=last_hidden_state, family=None):
        self.graph = graph
        self.model, self.calibration, self.projection, self.select = model, calibration, projection, select
        self.family = family
        self.disc = Discrepancy(model, calibration, projection, select)  # dense reference: the HF model itself
        self.dense_params = param_numel(model)
        self.n_chunks = len(calibration.chunks) + 1
        self.block_evals = 0
        self.candidates = 0

    def pruned(self, skip, reuse=None):
        return skrr.apply(self.graph, skrr.Plan(skip=sorted(skip), reuse=reuse or {}))

    def score(self, skip, reuse=None) -> float:
        self.candidates += 1
        self.block_evals += (len(self.graph.blocks) - len(skip) + len(reuse or {})) * self.n_chunks
        if self.family is not None:
            candidate = self.family.reference(self.model, sorted(skip), reuse or {})
            return plain_discrepancy(self.model, candidate, self.calibration, self.projection, self.select)
        return self.disc.evaluate(self.pruned(skip, reuse)).discrepancy

    def removed(self, skip) -> int:
        return self.dense_params - self.pruned(skip).num_params


def naive_skip_phase(scorer: NaiveScorer, sparsity: float, beam: int, max_steps: int | None = None):
    """Algorithm 1 as the issue defines it; returns (best skip set, order, best score per step, best score).
    With `max_steps`, it stops after that many beam steps (benchmarks time the first steps only)."""
    K = len(scorer.graph.blocks)
    target = math.ceil(sparsity * scorer.dense_params)
    removed = {}

    def finished(skip):
        key = frozenset(skip)
        if key not in removed:
            removed[key] = scorer.removed(skip)
        return removed[key] >= target

    beams = [(0.0, (), ())]  # (score, sorted skip, order)
    history = []
    while not all(finished(b[1]) for b in beams):
        pool = {}
        for score, skip, order in sorted(beams):
            if finished(skip):
                pool[frozenset(skip)] = (score, skip, order)
                continue
            for j in range(K):
                new = frozenset(skip) | {j}
                if j in skip or len(new) == K or new in pool:
                    continue
                pool[new] = (None, tuple(sorted(new)), order + (j,))
        scored = [(s if s is not None else scorer.score(skip), skip, order) for s, skip, order in pool.values()]
        beams = sorted(scored)[:beam]
        history.append(beams[0][0])
        if max_steps is not None and len(history) >= max_steps:
            break
    best = min(beams)
    return set(best[1]), best[2], history, best[0]


def naive_reuse_phase(scorer: NaiveScorer, skip, order, score):
    """Algorithm 2: for each skipped block in skip order, keep skip / left / right, whichever is strictly lowest."""
    kinds = [b.kind for b in scorer.graph.blocks]
    reuse: dict[int, int] = {}
    current = score
    for i in order:
        left = [j for j in range(i - 1, -1, -1) if j not in skip and kinds[j] == kinds[i]][:1]
        right = [j for j in range(i + 1, len(kinds)) if j not in skip and kinds[j] == kinds[i]][:1]
        options = [(scorer.score(skip, {**reuse, i: j}), n, j) for n, j in enumerate(left + right)]
        if options:
            best_score, _, j = min(options)
            if best_score < current:
                reuse[i] = j
                current = best_score
    return reuse, current


# --- the exact floor: the fast search driven by an oracle (bench/search_floor.py says what it shows) --------
class OracleEvaluator(Evaluator):
    """`select` with a perfect bar and each candidate's own shares as its chunk order."""

    def __init__(self, truth: Evaluator, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.truth = truth

    def select(self, cands: Sequence[Candidate], k: int, complete: list[tuple], desc: str = "") -> dict[int, float]:
        true = self.truth.select(cands, k, complete)  # every candidate in full: the truth has no abandoning
        true_shares = self.truth.shares
        bar = sorted([(d, cands[i].tie) for i, d in true.items()] + list(complete))[k - 1][0]
        counter = self.runner.counter
        counter.candidates += len(cands)
        done, self.shares = {}, {}
        # the candidates within the bar first (their states are the memo's deepest), then the others
        for i in sorted(range(len(cands)), key=lambda i: (true[i] > bar, cands[i].priority)):
            cand = cands[i]
            keys = prefix_keys(cand.config, self.runner.num_blocks)
            order = self.chunk_order(true_shares[i], cand, keys)
            pairs = []
            for c in order:
                pairs.append((self.global_id[c], self.chunk_contribution(cand.config, c, cand.start, keys)))
                if fold(pairs) > bar:
                    break
            if len(pairs) == len(order):
                done[i], self.shares[i] = fold(pairs), dict(pairs)
                assert done[i] == true[i], "the oracle's score differs from the truth's"
            else:
                counter.abandoned += 1
        return done

    def retain(self, beams, upcoming=()) -> None:
        super().retain(beams, upcoming)
        self.truth.retain(beams, upcoming)  # the truth's memo follows the search's (it would outgrow the budget)


def oracle_search(graph, cal, sparsity: float, beam: int = 3, method: str = "skrr"):
    """The Skrr search (skip phase, then re-use) driven by the oracle; returns (its best beam, the oracle's
    counter, the number of beam steps)."""
    levers = ("memo", "order")  # the truth: every candidate in full (no abandoning), its own runner
    truth = Evaluator(StagedRunner(graph), cal, levers=levers)
    ev = OracleEvaluator(truth, StagedRunner(graph), cal)
    ckpt = Checkpoint(None, "oracle", False)
    best, history = beam_skip(graph, ev, check_sparsity(graph, sparsity), beam, ckpt, progress=False)
    if method == "skrr":
        best, _ = reuse_phase(graph, ev, best, ckpt, progress=False)
    return best, ev.runner.counter, len(history)
