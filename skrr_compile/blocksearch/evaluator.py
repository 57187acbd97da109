"""Scores configurations exactly and cheaply: boundary caches, best-first early abandoning.

Exactness: every candidate is scored with the same ops as a full forward of its rewritten graph; the
speed comes from (1) stages: a candidate that differs from its parent beam from sub-block j on starts at
the parent's cached hidden state s_j; (2) early abandoning: D is a sum over the null prompt and prompt
chunks, so a candidate whose partial sum already exceeds the k-th best complete score cannot survive and
is dropped (strictly greater: ties are never cut); (3) promising candidates first (last step's costs),
so the bar is set early.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.discrepancy import Discrepancy, last_hidden_state
from skrr_compile.blocksearch.runner import Config, StagedRunner


@dataclass
class Beam:
    config: Config
    order: tuple
    score: float

    @property
    def key(self):
        return (self.score, tuple(sorted(self.config.skip)))

    def to_dict(self):
        return {"skip": sorted(self.config.skip), "reuse": [list(p) for p in self.config.reuse],
                "order": list(self.order), "score": self.score}

    @classmethod
    def from_dict(cls, d):
        return cls(Config(frozenset(d["skip"]), tuple(tuple(p) for p in d["reuse"])), tuple(d["order"]), d["score"])


class BoundaryCache:
    """Hidden states of one configuration at sub-block boundaries, for every chunk (null prompt = -1)."""

    def __init__(self, config: Config, values: dict[int, dict[int, torch.Tensor]]):
        self.config, self.values = config, values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for per in self.values.values() for t in per.values())


class Evaluator:
    """Scores configurations on a calibration set through the staged runner."""

    def __init__(self, runner: StagedRunner, calibration: Calibration, projection=None,
                 select: Callable = last_hidden_state, cache_bytes: int = 4 << 30, beam: int = 3,
                 progress: bool = False):
        self.runner = runner
        self.progress = progress
        runner.restrict_outputs(select)
        self.chunks = [-1] + list(range(len(calibration.chunks)))  # -1: the null prompt, scored first
        inputs = {-1: calibration.null, **dict(enumerate(calibration.chunks))}
        self.ctx = {c: runner.prefix(*inputs[c]) for c in self.chunks}
        self.disc = Discrepancy(calibration, projection, select)
        dense = {c: runner.forward(Config(), *inputs[c], ctx=self.ctx[c]) for c in self.chunks}
        self.disc.set_reference([dense[c] for c in self.chunks if c >= 0], dense[-1])
        K = runner.num_blocks
        per_boundary = sum(self.ctx[c]["s0"].numel() * self.ctx[c]["s0"].element_size() for c in self.chunks)
        fit = max(1, cache_bytes // max(1, per_boundary * beam))
        self.stride = max(1, math.ceil((K + 1) / fit))
        self.per_boundary_bytes = per_boundary
        self.cache_bytes = cache_bytes
        self.states: dict = {}
        self.runner.counter.block_evals = 0  # the reference forward is not part of the search's cost

    def stored(self, k: int) -> bool:
        return k % self.stride == 0 or k in self.runner.suffix_boundaries

    def cache(self, config: Config) -> BoundaryCache:
        """Full forward of `config` on every chunk, keeping the boundaries the stride allows."""
        values = {}
        r = self.runner
        for c in self.chunks:
            h = self.ctx[c]["s0"]
            keep = {0: h}
            for k in range(r.num_blocks):
                before = r.counter.block_evals
                h = r.stage(k, h, self.ctx[c], config.mode(k))
                r.counter.recompute_evals += r.counter.block_evals - before
                if self.stored(k + 1):
                    keep[k + 1] = h
            values[c] = keep
        return BoundaryCache(config, values)

    def chunk_contribution(self, config: Config, start: int, parent: BoundaryCache | None, c: int,
                           keep: dict | None = None) -> float:
        """Chunk c's share of D for `config`, which equals `parent`'s configuration on sub-blocks < start.

        With `keep`, the boundaries this evaluation computes (that the stride stores) are put there, so a
        candidate that survives needs no second forward to become a beam.
        """
        r = self.runner
        ctx = self.ctx[c]
        cached = parent.values[c] if parent is not None else {0: ctx["s0"]}
        i0 = max(k for k in cached if k <= start)
        h = cached[i0]
        bvals = {k: v for k, v in cached.items() if k in r.suffix_boundaries and k <= i0}
        for k in range(i0, r.num_blocks):
            before = r.counter.block_evals
            h = r.stage(k, h, ctx, config.mode(k))
            if k < start:
                r.counter.recompute_evals += r.counter.block_evals - before
            if k + 1 in r.suffix_boundaries:
                bvals[k + 1] = h
            if keep is not None and k >= start and self.stored(k + 1):
                keep[k + 1] = h
        r.counter.chunk_evals += 1
        return self.disc.contribution(None if c < 0 else c, r.suffix(bvals, ctx))

    def select(self, cands: Sequence[tuple], k: int, complete: list[tuple], desc: str = "") -> dict[int, float]:
        """Exact k best of `cands` and `complete`, scoring as few (candidate, chunk) pairs as possible.

        cands: (config, start, parent cache, tie key, priority); complete: (score, tie key) already known.
        Best-first over partial sums: the candidate with the lowest partial sum (a lower bound of its D) is
        advanced by one chunk; once k scores are complete, a candidate whose partial sum exceeds the k-th
        best is abandoned (strictly: equal partial sums are always finished, so ties are decided exactly).
        Returns the complete scores by candidate position.
        """
        r = self.runner
        r.counter.candidates += len(cands)
        heap = [(0.0, cand[4], i) for i, cand in enumerate(cands)]
        heapq.heapify(heap)
        progress, partial, done = [0] * len(cands), [0.0] * len(cands), {}
        self.states = {}  # candidate -> {chunk: {boundary: h}}: beam caches for the survivors, within budget
        held = 0
        finished = sorted(complete)
        bar = tqdm(total=len(cands) * len(self.chunks), desc=desc, disable=not self.progress, leave=False,
                   unit="chunk")
        while heap:
            lower, prio, i = heapq.heappop(heap)
            if len(finished) >= k and lower > finished[k - 1][0]:
                r.counter.abandoned += 1 + len(heap)
                break
            config, start, parent, tie, _ = cands[i]
            c = self.chunks[progress[i]]
            keep = {} if (i in self.states or progress[i] == 0) else None
            partial[i] += self.chunk_contribution(config, start, parent, c, keep)
            if keep is not None:
                size = sum(t.numel() * t.element_size() for t in keep.values())
                if held + size <= self.cache_bytes:
                    self.states.setdefault(i, {})[c] = keep
                    held += size
                elif i in self.states:
                    held -= sum(t.numel() * t.element_size() for v in self.states.pop(i).values() for t in v.values())
            progress[i] += 1
            bar.update(1)
            if progress[i] == len(self.chunks):
                done[i] = partial[i]
                bisect.insort(finished, (partial[i], tie))
                bar.set_postfix(best=f"{finished[0][0]:.4g}", scored=len(done))
            else:
                heapq.heappush(heap, (partial[i], prio, i))
        bar.close()
        self.states = {i: v for i, v in self.states.items() if i in done}
        return done

    def cache_from(self, i: int, config: Config, start: int, parent: BoundaryCache) -> BoundaryCache:
        """Beam cache of candidate i of the last `select`: its kept boundaries, or a fresh forward."""
        kept = self.states.get(i)
        if kept is None or len(kept) != len(self.chunks):
            return self.cache(config)
        values = {}
        for c in self.chunks:
            values[c] = {k: v for k, v in parent.values[c].items() if k <= start}
            values[c].update(kept[c])
        return BoundaryCache(config, values)

    def outputs(self, config: Config):
        """(chunk outputs, null output) of `config` on the calibration set, for reports."""
        r = self.runner
        outs = [r.forward(config, None, None, ctx=self.ctx[c]) for c in self.chunks if c >= 0]
        return outs, r.forward(config, None, None, ctx=self.ctx[-1])
