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
import dataclasses
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.discrepancy import Discrepancy, last_hidden_state
from skrr_compile.blocksearch.distributed import Solo, fold, shard
from skrr_compile.blocksearch.runner import Config, StagedRunner
from skrr_compile.utils.progress import progress_bar


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


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CacheBudget:
    """Bytes of boundary states held on the device (up to `device_bytes`), then on the host, then none.

    A state that fits neither is not kept: the search recomputes it from the nearest stored boundary.
    Tensors are counted once however many beam caches hold them (reference counts by identity).
    """

    def __init__(self, device: torch.device, device_bytes: int, host_bytes: int = 0):
        self.device = torch.device(device)
        self.limit = {"device": int(device_bytes), "host": int(host_bytes) if self.device.type != "cpu" else 0}
        self.used = {"device": 0, "host": 0}
        self.peak = {"device": 0, "host": 0}
        self._held: dict[int, list] = {}  # id -> [tensor, tier, refcount]

    def place(self, t: torch.Tensor, share: float = 1.0) -> torch.Tensor | None:
        """Hold `t` within `share` of each tier's limit (beam caches: half), or return None."""
        entry = self._held.get(id(t))
        if entry is not None and entry[0] is t:
            entry[2] += 1
            return t
        size = nbytes(t)
        for tier in ("device", "host"):
            if self.used[tier] + size <= self.limit[tier] * share:
                self.used[tier] += size
                self.peak[tier] = max(self.peak[tier], self.used[tier])
                held = t if tier == "device" else t.to("cpu")
                self._held[id(held)] = [held, tier, 1]
                return held
        return None

    def release(self, t: torch.Tensor) -> None:
        entry = self._held.get(id(t))
        if entry is None or entry[0] is not t:
            return
        entry[2] -= 1
        if entry[2] == 0:
            self.used[entry[1]] -= nbytes(t)
            del self._held[id(t)]

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device, non_blocking=True)

    def to_dict(self) -> dict:
        return {"limit_bytes": dict(self.limit), "peak_bytes": dict(self.peak)}


class BoundaryCache:
    """Hidden states of one configuration at sub-block boundaries 1..K-1 (s_0 comes from the prefix),
    for every chunk (null prompt = -1); each state on the device or spilled to the host."""

    def __init__(self, config: Config, values: dict[int, dict[int, torch.Tensor]]):
        self.config, self.values = config, values

    def nbytes(self) -> int:
        return sum(nbytes(t) for per in self.values.values() for t in per.values())

    def release(self, budget: CacheBudget) -> None:
        for per in self.values.values():
            for t in per.values():
                budget.release(t)
        self.values = {}


class Evaluator:
    """Scores configurations on a calibration set through the staged runner.

    Memory: per chunk only its token ids are kept; its context (embeddings, masks, position bias) is
    recomputed when the chunk is scored. The projected dense reference lives where `reference` says
    (device, cpu or disk). Boundary states stay within `cache_bytes` on the device plus
    `host_cache_bytes` on the host; the rest is recomputed.
    """

    def __init__(self, runner: StagedRunner, calibration: Calibration, projection=None,
                 select: Callable = last_hidden_state, cache_bytes: int = 4 << 30, beam: int = 3,
                 progress: bool = False, host_cache_bytes: int = 0, reference: str = "device",
                 reference_path=None, group=None):
        self.runner = runner
        self.group = group or Solo()
        self.progress = progress and self.group.is_writer
        runner.restrict_outputs(select)
        g = self.group
        n_total = len(calibration.chunks)
        mine = shard(n_total, g.rank, g.world)  # this rank's prompt chunks (global indices)
        if g.world > 1:
            calibration = dataclasses.replace(calibration, chunks=[calibration.chunks[i] for i in mine])
        self.global_id = {-1: -1, **dict(enumerate(mine))}  # local chunk -> global chunk
        # the null prompt (-1) is scored once, on rank 0; every rank knows it for reports
        self.chunks = ([-1] if g.rank == 0 else []) + list(range(len(mine)))
        # a candidate is complete after as many rounds as the largest shard has chunks (a round: one per rank)
        self.rounds = max((r == 0) + len(shard(n_total, r, g.world)) for r in range(g.world))
        self.inputs = {-1: calibration.null, **dict(enumerate(calibration.chunks))}
        self.disc = Discrepancy(calibration, projection, select)
        per_boundary = [0]

        def dense_outputs(chunks):
            for c in chunks:
                ctx = runner.prefix(*self.inputs[c])
                per_boundary[0] += nbytes(ctx["s0"])
                yield runner.forward(Config(), None, None, ctx=ctx)
                del ctx

        null_out = next(dense_outputs([-1]))
        self.disc.set_reference(dense_outputs([c for c in self.chunks if c >= 0]), null_out,
                                placement=reference, path=reference_path)
        del null_out
        if g.world > 1:  # token counts over every rank's chunks (integers: exact in any order)
            counts = g.gather_objects(self.disc.prompt_counts)
            self.disc.prompt_counts = [float(sum(int(c[i]) for c in counts)) for i in range(len(counts[0]))]
        K = runner.num_blocks
        device = calibration.null[0].device
        self.budget = CacheBudget(device, cache_bytes, host_cache_bytes)
        # beam caches take at most half the budget; the other half keeps the states of candidates being
        # scored, so that survivors become beams without a second forward
        fit = (self.budget.limit["device"] + self.budget.limit["host"]) // max(1, 2 * per_boundary[0] * beam)
        # boundaries 1..K-1 are storable; when not even one fits for every chunk, the chunks that fit keep it
        # (the smallest stride that stores at most `fit` of them: the budget is used, not left idle)
        self.stride = (K - 1) // (max(1, fit) + 1) + 1
        self.per_boundary_bytes = per_boundary[0]
        self.states: dict = {}
        self.runner.counter.block_evals = 0  # the reference forward is not part of the search's cost

    def context(self, c: int) -> dict:
        self.runner.counter.prefix_evals += 1
        return self.runner.prefix(*self.inputs[c])

    def stored(self, k: int) -> bool:
        if not 0 < k < self.runner.num_blocks:
            return False  # s_0 is recomputed with the prefix; s_K is never a starting point
        return k % self.stride == 0 or k in self.runner.suffix_boundaries

    def _keep(self, into: dict, k: int, h: torch.Tensor, share: float = 1.0) -> bool:
        placed = self.budget.place(h, share)
        if placed is None:
            return False
        into[k] = placed
        return True

    def cache(self, config: Config) -> BoundaryCache:
        """Full forward of `config` on every chunk, keeping the boundaries the stride and budget allow."""
        values = {}
        r = self.runner
        for c in self.chunks:
            ctx = self.context(c)
            h = ctx["s0"]
            keep: dict = {}
            for k in range(r.num_blocks - 1):
                before = r.counter.block_evals
                h = r.stage(k, h, ctx, config.mode(k))
                r.counter.recompute_evals += r.counter.block_evals - before
                if self.stored(k + 1):
                    self._keep(keep, k + 1, h, share=0.5)  # beam caches: at most half the budget
            values[c] = keep
            del ctx, h
        return BoundaryCache(config, values)

    def chunk_contribution(self, config: Config, start: int, parent: BoundaryCache | None, c: int,
                           keep: dict | None = None) -> float:
        """Chunk c's share of D for `config`, which equals `parent`'s configuration on sub-blocks < start.

        With `keep`, the boundaries this evaluation computes (that the stride stores) are put there, so a
        candidate that survives needs no second forward to become a beam.
        """
        r = self.runner
        ctx = self.context(c)
        cached = parent.values.get(c, {}) if parent is not None else {}
        i0 = max([k for k in cached if k <= start], default=0)
        h = self.budget.fetch(cached[i0]) if i0 else ctx["s0"]
        bvals = {k: self.budget.fetch(v) for k, v in cached.items() if k in r.suffix_boundaries and k <= i0}
        if 0 in r.suffix_boundaries:
            bvals[0] = ctx["s0"]
        for k in range(i0, r.num_blocks):
            before = r.counter.block_evals
            h = r.stage(k, h, ctx, config.mode(k))
            if k < start:
                r.counter.recompute_evals += r.counter.block_evals - before
            if k + 1 in r.suffix_boundaries:
                bvals[k + 1] = h
            if keep is not None and k >= start and self.stored(k + 1):
                if not self._keep(keep, k + 1, h):
                    keep["incomplete"] = True
        r.counter.chunk_evals += 1
        out = r.suffix(bvals, ctx)
        del ctx, h, bvals
        return self.disc.contribution(None if c < 0 else c, out)

    def _drop_state(self, i: int) -> None:
        for v in self.states.pop(i, {}).values():
            for k, t in v.items():
                if k != "incomplete":
                    self.budget.release(t)

    def select(self, cands: Sequence[tuple], k: int, complete: list[tuple], desc: str = "") -> dict[int, float]:
        """Exact k best of `cands` and `complete`, scoring as few (candidate, chunk) pairs as possible.

        cands: (config, start, parent cache, tie key, priority); complete: (score, tie key) already known.
        Best-first over partial sums: the candidate with the lowest partial sum (a lower bound of its D) is
        advanced by one chunk; once k scores are complete, a candidate whose partial sum exceeds the k-th
        best is abandoned (strictly: equal partial sums are always finished, so ties are decided exactly).
        Returns the complete scores by candidate position. Boundary states computed on the way are kept
        (within the cache budget) for the candidates still in the running, so survivors need no second
        forward to become beams.
        """
        r = self.runner
        r.counter.candidates += len(cands)
        heap = [(0.0, cand[4], i) for i, cand in enumerate(cands)]
        heapq.heapify(heap)
        progress, partial, done = [0] * len(cands), [0.0] * len(cands), {}
        for i in list(self.states):
            self._drop_state(i)
        finished = sorted(complete)
        received: list[list] = [[] for _ in cands]  # (global chunk, share of D) from every rank
        bar = progress_bar(total=len(cands) * self.rounds, desc=desc, disable=not self.progress, unit="round")
        while heap:
            lower, prio, i = heapq.heappop(heap)
            if len(finished) >= k and lower > finished[k - 1][0]:
                r.counter.abandoned += 1 + len(heap)
                for _, _, j in heap:
                    self._drop_state(j)
                self._drop_state(i)
                break
            config, start, parent, tie, _ = cands[i]
            pair = None
            if progress[i] < len(self.chunks):
                c = self.chunks[progress[i]]
                keep = {} if (i in self.states or progress[i] == 0) else None
                pair = (float(self.global_id[c]), self.chunk_contribution(config, start, parent, c, keep))
                if keep is not None:
                    self.states.setdefault(i, {})[c] = keep
                    if keep.get("incomplete"):
                        self._drop_state(i)  # out of budget: this candidate would be recomputed as a beam
            received[i] += self.group.gather_pairs(pair)
            partial[i] = fold(received[i])  # in global chunk order: a lower bound, and at the end D itself
            progress[i] += 1
            bar.update(1)
            if progress[i] == self.rounds:
                done[i] = partial[i]
                bisect.insort(finished, (partial[i], tie))
                bar.set_postfix(best=f"{finished[0][0]:.4g}", scored=len(done))
                if len(finished) > k and (partial[i], tie) > finished[k - 1]:
                    self._drop_state(i)  # complete but not among the k best: it cannot become a beam
            else:
                heapq.heappush(heap, (partial[i], prio, i))
        bar.close()
        for i in [i for i in self.states if i not in done]:
            self._drop_state(i)
        return done

    def release_states(self, keep: set[int] = frozenset()) -> None:
        for i in [i for i in self.states if i not in keep]:
            self._drop_state(i)

    def cache_from(self, i: int, config: Config, start: int, parent: BoundaryCache) -> BoundaryCache:
        """Beam cache of candidate i of the last `select`: its kept boundaries, or a fresh forward."""
        kept = self.states.get(i)
        if kept is None or len(kept) != len(self.chunks):
            self._drop_state(i)
            return self.cache(config)
        self.states.pop(i)
        values = {}
        for c in self.chunks:
            values[c] = {}
            for k, v in parent.values.get(c, {}).items():
                if k <= start:
                    placed = self.budget.place(v)  # shared with the parent, counted for this beam too
                    if placed is not None:
                        values[c][k] = placed
            values[c].update(kept[c])
        return BoundaryCache(config, values)

    def report(self, config: Config) -> dict:
        """The discrepancy report of `config` over every rank's chunks, folded in global chunk order."""
        outs, null = self.outputs(config)
        parts = [(self.global_id[k], part) for k, part in enumerate(self.disc.report_parts(outs))]
        everything = [p for rank_parts in self.group.gather_objects(parts) for p in rank_parts]
        return self.disc.report_from_parts([part for _, part in sorted(everything, key=lambda p: p[0])], null)

    def outputs(self, config: Config):
        """(chunk outputs, null output) of `config` on the calibration set, for reports."""
        r = self.runner
        outs = [r.forward(config, None, None, ctx=self.context(c)) for c in self.chunks if c >= 0]
        return outs, r.forward(config, None, None, ctx=self.context(-1))
