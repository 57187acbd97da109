"""Naive reference of the Skrr search: every candidate is a full forward of its rewritten model.

Written from the definition in the issue, not from the fast implementation; the benchmark imports it.
"""

from __future__ import annotations

import math

import skrr_compile as skrr
from skrr_compile.blocksearch.discrepancy import Discrepancy, last_hidden_state
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
