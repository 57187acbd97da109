"""Scores configurations exactly and cheaply: a memo of boundary states, best-first early abandoning.

Exactness: every candidate is scored with the same ops as a full forward of its rewritten graph, and the
boundary state s_k of a chunk depends only on the configuration's modes on sub-blocks < k. The levers:
(1) the state memo keeps s_k by (chunk, k, those modes), so a candidate starts from the deepest state that
any configuration agreeing with it below k computed: its parent beam's (the classic boundary cache), a
candidate of another beam with the same prefix (same step), or the previous step's candidate that
differed from it only past k (the next step starts where this one stopped); (2) early abandoning: D is a
sum over the null prompt and the prompt chunks, so a candidate whose partial sum already exceeds the k-th
best complete score is dropped (strictly greater: ties are never cut); (3) each candidate scores first
the chunks with the most expected share of D (its parent's) per unit of work (tokens times the stages to
run from the deepest state the memo holds for that chunk), so its partial sum passes the bar with the least
work; promising candidates (last step's costs) first. None changes a value: shares are folded in global
chunk order whatever order they were computed in.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.discrepancy import Discrepancy, last_hidden_state
from skrr_compile.blocksearch.distributed import Exchange, Solo, fold, shard
from skrr_compile.blocksearch.runner import Config, StagedRunner
from skrr_compile.utils.progress import progress_bar


@dataclass
class Beam:
    config: Config
    order: tuple
    score: float
    shares: dict | None = None  # global chunk -> share of D (orders the chunks of its candidates)

    @property
    def key(self):
        return (self.score, tuple(sorted(self.config.skip)))

    def to_dict(self):
        return {"skip": sorted(self.config.skip), "reuse": [list(p) for p in self.config.reuse],
                "order": list(self.order), "score": self.score,
                "shares": None if self.shares is None else [[c, v] for c, v in sorted(self.shares.items())]}

    @classmethod
    def from_dict(cls, d):
        shares = {int(c): v for c, v in d["shares"]} if d.get("shares") else None
        return cls(Config(frozenset(d["skip"]), tuple(tuple(p) for p in d["reuse"])), tuple(d["order"]), d["score"],
                   shares)


@dataclass(frozen=True)
class Candidate:
    """A configuration to score: it equals its parent below `start`; `tie` decides equal scores (lower
    first); `priority` orders first evaluations; `shares` are the parent's shares of D by global chunk."""

    config: Config
    start: int
    tie: object
    priority: tuple
    shares: dict | None = None


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def prefix_keys(config: Config, num_blocks: int) -> list[tuple]:
    """keys[k] = the modes of the sub-blocks < k that are not kept: what s_k depends on, k = 0..K."""
    special = sorted((i, config.mode(i)) for i in config.skip)
    keys, n = [], 0
    for k in range(num_blocks + 1):
        while n < len(special) and special[n][0] < k:
            n += 1
        keys.append(tuple(special[:n]))
    return keys


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

    def reserve(self, size: int, share: float) -> bool:
        """Count `size` bytes held elsewhere (never released) on the device tier if they fit in `share`."""
        if self.used["device"] + size > self.limit["device"] * share:
            return False
        self.used["device"] += size
        self.peak["device"] = max(self.peak["device"], self.used["device"])
        return True

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


# The exact speed levers (each can be turned off to measure what it buys; none changes a result):
# abandon: stop scoring a candidate once its partial sum exceeds the k-th best complete score;
# memo: start from any configuration's state that agrees below k (not only the parent's boundary), and
#       keep the states the next step starts from;
# order: score next each candidate's chunk with the largest parent's share of D per unit of work (tokens x
#        stages from the deepest state in the memo).
LEVERS = ("abandon", "memo", "order")
# candidate batching "auto": prompt rows per stacked forward, by device kind, and the most candidates in one
AUTO_ROWS = {"cpu": 4, "cuda": 256}
AUTO_MAX = 32
DIST_STEP = 8  # several ranks splitting chunks: candidates advanced per step (one collective each step)
DISTRIBUTE = ("candidates", "chunks")  # how several ranks share a search (distributed.py)


def deal(cands: Sequence[Candidate], world: int) -> list[int]:
    """The rank that scores each candidate, when ranks split candidates: by the sub-block it starts at, so
    candidates that share states (one start, the next step's from this one's) land on one rank, dealt in
    snake order over the starts (0, 1, 1, 0, ...: each rank gets early, costly starts and late, cheap ones);
    candidates that all start at one sub-block (a re-use step) are dealt by position."""
    starts = sorted({c.start for c in cands})
    if len(starts) == 1:
        return [i % world for i in range(len(cands))]
    snake = {s: n % world if (n // world) % 2 == 0 else world - 1 - n % world for n, s in enumerate(starts)}
    return [snake[c.start] for c in cands]


class Evaluator:
    """Scores configurations on a calibration set through the staged runner.

    Memory: per chunk only its token ids are kept; its context (embeddings, masks, position bias) is
    recomputed when the chunk is scored. The projected dense reference lives where `reference` says
    (device, cpu or disk). Boundary states (the memo) stay within `cache_bytes` on the device plus
    `host_cache_bytes` on the host; the rest is recomputed.
    """

    def __init__(self, runner: StagedRunner, calibration: Calibration, projection=None,
                 select: Callable = last_hidden_state, cache_bytes: int = 4 << 30, beam: int = 3,
                 progress: bool = False, host_cache_bytes: int = 0, reference: str = "device",
                 reference_path=None, group=None, levers: Sequence[str] | None = None,
                 candidate_batch: int | str = 1, distribute: str = "candidates"):
        self.started = time.perf_counter()  # per-step "elapsed" in the report counts from here
        self.levers = frozenset(LEVERS if levers is None else levers)
        if not self.levers <= set(LEVERS):
            raise ValueError(f"unknown search levers {sorted(self.levers - set(LEVERS))}; known: {', '.join(LEVERS)}")
        if distribute not in DISTRIBUTE:
            raise ValueError(f"distribute must be one of {', '.join(DISTRIBUTE)}, got {distribute!r}")
        self.runner = runner
        self.group = group or Solo()
        self.progress = progress and self.group.is_writer
        runner.restrict_outputs(select)
        g = self.group
        n_total = len(calibration.chunks)
        # by chunks: this rank holds and scores its shard; by candidates: it holds every chunk
        self.by_chunks = g.world > 1 and distribute == "chunks"
        mine = shard(n_total, g.rank, g.world) if self.by_chunks else list(range(n_total))
        if self.by_chunks:
            calibration = dataclasses.replace(calibration, chunks=[calibration.chunks[i] for i in mine])
        self.global_id = {-1: -1, **dict(enumerate(mine))}  # local chunk -> global chunk
        # the null prompt (-1) is scored once, on rank 0, when chunks are split; every rank knows it for reports
        self.chunks = ([-1] if g.rank == 0 or not self.by_chunks else []) + list(range(len(mine)))
        # the chunks whose report parts (reports, healing statistics, baselines' sums) this rank contributes
        own = set(shard(n_total, g.rank, g.world))
        self.owned = self.chunks if self.by_chunks else \
            ([-1] if g.rank == 0 else []) + [c for c in range(n_total) if c in own]
        # a candidate is complete after as many rounds as the largest shard has chunks (a round: one per rank)
        self.rounds = max((r == 0) + len(shard(n_total, r, g.world)) for r in range(g.world)) if self.by_chunks \
            else len(self.chunks)
        self.inputs = {-1: calibration.null, **dict(enumerate(calibration.chunks))}
        self.disc = Discrepancy(calibration, projection, select)
        self.tokens = {c: max(1, self.inputs[c][0].numel()) for c in self.chunks}  # cost of scoring a chunk
        K = runner.num_blocks
        device = calibration.null[0].device
        self.budget = CacheBudget(device, cache_bytes, host_cache_bytes)
        self._contexts: dict[int, dict] = {}
        per_boundary = self.keep_contexts()
        # beams' states take at most half the budget; the other half keeps the states of candidates being
        # scored (survivors become beams without a second forward; the next step starts from them)
        fit = (self.budget.limit["device"] + self.budget.limit["host"]) // max(1, 2 * per_boundary * beam)
        # boundaries 1..K-1 are storable; when not even one fits for every chunk, the chunks that fit keep it
        # (the smallest stride that stores at most `fit` of them: the budget is used, not left idle)
        self.stride = (K - 1) // (max(1, fit) + 1) + 1
        self.per_boundary_bytes = per_boundary
        self.memo: dict[tuple, torch.Tensor] = {}  # (chunk, k, prefix_keys(config)[k]) -> s_k
        # the dense reference: its states go into the memo as the dense beam's (the first step starts there)
        dense_keys = prefix_keys(Config(), K)
        null_out = self.run_chunk(Config(), -1, keys=dense_keys, share=0.5) if -1 in self.chunks else None
        if null_out is None:  # ranks > 0 do not score the null prompt; a forward gives its reference shape
            null_out = runner.forward(Config(), None, None, ctx=self.context(-1))
        self.disc.set_reference((self.run_chunk(Config(), c, keys=dense_keys, share=0.5) for c in self.chunks if c >= 0),
                                null_out, placement=reference, path=reference_path)
        del null_out
        if self.by_chunks:  # token counts over every rank's chunks (integers: exact in any order)
            counts = g.gather_objects(self.disc.prompt_counts)
            self.disc.prompt_counts = [float(sum(int(c[i]) for c in counts)) for i in range(len(counts[0]))]
        self.shares: dict[int, dict] = {}
        # the reference forward is not part of the search's cost (the naive search runs one too)
        self.candidate_batch = self.resolve_candidate_batch(candidate_batch)
        self.wait_seconds = 0.0  # several ranks: time spent waiting in the scoring collectives
        for name in ("block_evals", "prompt_block_evals", "token_block_evals", "chunk_evals", "prefix_evals"):
            setattr(runner.counter, name, 0)

    def resolve_candidate_batch(self, n: int | str) -> int:
        """How many candidates one stacked forward carries: at most as many as fit in an eighth of the device
        budget at the largest chunk's activation peak (`lane_peak_bytes`); "auto": also about AUTO_ROWS
        prompt rows per stacked forward (by device kind: where the per-prompt cost of a stage stops
        falling), at most AUTO_MAX. Either way only chunk shapes whose rows stacked are bit-identical to
        rows alone (`probe`) stack; the others are scored one candidate at a time, so the search stays exact
        (1 where no shape stacks exactly). Every rank uses the smallest of the ranks' sizes (they pick the
        same batches)."""
        self.lane_bytes, self.stacking, self.alone_shapes = 0, None, set()
        width = 1
        if n != 1:
            self.lane_bytes = self.lane_peak_bytes()
            fit = max(1, int(self.budget.limit["device"] // 8 // max(1, self.lane_bytes)))
            if n == "auto":
                rows = max(self.inputs[c][0].shape[0] for c in self.chunks)
                n = min(AUTO_MAX, max(1, AUTO_ROWS.get(self.budget.device.type, AUTO_ROWS["cpu"]) // rows))
            width = max(1, min(int(n), fit))
            if width > 1:
                diffs = self.probe(width)
                self.alone_shapes = {shape for shape, d in diffs.items() if d}
                self.stacking = {"bit_identical": not self.alone_shapes, "max_relative_difference": max(diffs.values()),
                                 "shapes": len(diffs), "shapes_alone": len(self.alone_shapes)}
                if len(self.alone_shapes) == len(diffs):
                    width = 1
        if self.group.world > 1:
            width = min(self.group.gather_objects(width))
        return width

    def dense_stream(self, chunks: tuple[int, ...], measure: bool = False) -> tuple[torch.Tensor, int]:
        """The dense s_K of the chunks' rows stacked (one chunk: alone) and, with `measure`, the most bytes
        alive in one of its stages (the runner's count of live values; weights not included)."""
        r, peak = self.runner, 0
        ctx = self.batch_context(chunks, {})
        h = ctx["s0"]
        for k in range(r.num_blocks):
            r.live = 0 if measure else None
            h = r.stage(k, h, ctx, "keep")
            peak = max(peak, r.live or 0)
        r.live = None
        return h, peak

    def probe(self, width: int) -> dict[tuple, float]:
        """By chunk shape, the largest relative difference between the dense stream of its chunk with the
        fewest rows scored alone and stacked with copies of itself (2 and `width` copies): 0.0 where this
        backend computes a row the same whatever the batch. Kernels pick their path by the rows of a GEMM
        (MKL on AVX-512: 1-3 rows differ from 4 or more; one CPU thread, as several split by the batch), so
        a short null prompt may differ where the prompt chunks do not."""
        fewest: dict[tuple, int] = {}
        for c in self.chunks:
            shape = self.shape_of(c)
            if shape not in fewest or self.inputs[c][0].shape[0] < self.inputs[fewest[shape]][0].shape[0]:
                fewest[shape] = c
        diffs = {}
        for shape, c in fewest.items():
            alone = self._alone.pop(c, None)
            alone = alone if alone is not None else self.dense_stream((c,))[0]
            scale = float(alone.abs().max()) or 1.0
            diffs[shape] = 0.0
            for n in sorted({2, width}):
                h = self.dense_stream((c,) * n)[0]
                diffs[shape] = max(diffs[shape], *(float((part - alone).abs().max()) / scale
                                                   for part in h.split(alone.shape[0])))
        self._alone = {}
        return diffs

    def lane_peak_bytes(self) -> int:
        """Bytes alive at the peak of the costliest stage on the largest chunk (one candidate's share of a
        stacked forward); its dense stream is kept for `probe`."""
        c = max(self.chunks, key=lambda c: self.tokens[c])
        h, peak = self.dense_stream((c,), measure=True)
        self._alone = {c: h}
        return peak

    def context(self, c: int) -> dict:
        """Chunk c's prefix values (embeddings, masks, position bias): kept ones, else recomputed."""
        ctx = self._contexts.get(c)
        if ctx is None:
            self.runner.counter.prefix_evals += 1
            ctx = self.runner.prefix(*self.inputs[c])
        return ctx

    def keep_contexts(self, share: float = 0.125) -> int:
        """Keep the chunks' contexts when all of them fit in `share` of the device budget (the naive search
        recomputes a chunk's context for every candidate); chunks are visited one at a time, so a large set
        never holds more than that share. Returns the bytes of one boundary state over all chunks (a state
        has the shape of the chunk's s_0, the residual stream)."""
        per_boundary, held, seen, size = 0, {}, set(), 0
        fits = True
        for c in self.chunks:
            ctx = self.context(c)
            per_boundary += nbytes(ctx["s0"])
            if fits:
                for t in pytree.tree_leaves(list(ctx.values())):
                    if isinstance(t, torch.Tensor) and id(t) not in seen:
                        seen.add(id(t))
                        size += nbytes(t)
                held[c] = ctx
                fits = size <= self.budget.limit["device"] * share
                if not fits:
                    held.clear()
            del ctx
        if fits and self.budget.reserve(size, share):
            self._contexts = held
        return per_boundary

    def stored(self, k: int) -> bool:
        if not 0 < k < self.runner.num_blocks:
            return False  # s_0 is recomputed with the prefix; s_K is never a starting point
        return k % self.stride == 0 or k in self.runner.suffix_boundaries

    # the state memo -------------------------------------------------------------------------------------
    def _put(self, key: tuple, h: torch.Tensor, share: float = 1.0) -> bool:
        if key in self.memo:
            return True
        placed = self.budget.place(h, share)
        if placed is None:
            return False
        self.memo[key] = placed
        return True

    def _drop(self, key: tuple) -> None:
        t = self.memo.pop(key, None)
        if t is not None:
            self.budget.release(t)

    def _deepest(self, c: int, keys: list[tuple], limit: int | None = None) -> int:
        """The deepest boundary <= limit whose state (and every suffix boundary before it) the memo holds
        for chunk c; 0 (s_0, from the prefix) when there is none."""
        suffix = [b for b in self.runner.suffix_boundaries if b > 0]
        top = self.runner.num_blocks - 1 if limit is None else limit
        for k in range(top, 0, -1):
            if (c, k, keys[k]) in self.memo and all((c, b, keys[b]) in self.memo for b in suffix if b <= k):
                return k
        return 0

    def _stages(self, config: Config, c: int, keys: list[tuple], ctx: dict, i0: int, stop: int, start: int,
                share: float) -> torch.Tensor:
        """s_stop from the memo's s_i0 (or s_0), storing the states it passes while the budget allows."""
        r, counter = self.runner, self.runner.counter
        h = self.budget.fetch(self.memo[(c, i0, keys[i0])]) if i0 else ctx["s0"]
        rows = self.inputs[c][0].shape[0]
        storing = True
        for k in range(i0, stop):
            before = counter.block_evals
            h = r.stage(k, h, ctx, config.mode(k))
            ran = counter.block_evals - before
            counter.prompt_block_evals += ran * rows
            counter.token_block_evals += ran * self.tokens[c]
            if k < start:
                counter.recompute_evals += ran
            if storing and self.stored(k + 1):
                storing = self._put((c, k + 1, keys[k + 1]), h, share)
        return h

    def run_chunk(self, config: Config, c: int, start: int = 0, keys: list[tuple] | None = None,
                  share: float = 1.0):
        """The output of `config` on chunk c, from the deepest state in the memo; the states it computes at
        stored boundaries go into the memo while the budget allows. Stages before `start` (where `config`
        leaves its parent) count as recomputation."""
        keys = keys or prefix_keys(config, self.runner.num_blocks)
        return self.run_batch([(config, start, keys, c)], share)[0]

    def shape_of(self, c: int) -> tuple:
        """What must agree for chunks' states to stack on the batch dimension: all but the rows."""
        return tuple(self.inputs[c][0].shape[1:])

    def batch_context(self, chunks: tuple[int, ...], made: dict) -> dict:
        """The context of the chunks' rows stacked in this order (one chunk: its own); `made` keeps the ones
        this batch built. Each value is what the prefix gives for those rows stacked: per-row values are
        concatenated, values that do not depend on the rows taken once, sizes that count the rows scaled
        (`stacking_plan`); where a value fits none of these the prefix runs on the stacked inputs."""
        if len(chunks) == 1:
            return self.context(chunks[0])
        if chunks not in made:
            plan = self.stacking_plan()
            if plan is None:
                self.runner.counter.prefix_evals += 1
                made[chunks] = self.runner.prefix(torch.cat([self.inputs[c][0] for c in chunks]),
                                                  torch.cat([self.inputs[c][1] for c in chunks]))
            else:
                ctxs = [self.context(c) for c in chunks]
                rows = sum(self.inputs[c][0].shape[0] for c in chunks)
                made[chunks] = {key: (torch.cat([ctx[key] for ctx in ctxs]) if kind == "rows" else
                                      kind * rows if isinstance(kind, int) else ctxs[0][key])
                                for key, kind in plan.items()}
        return made[chunks]

    def stacking_plan(self) -> dict | None:
        """How each context value stacks, probed once on the largest chunk: the prefix of its rows twice vs
        once. "rows": stacked on dim 0; "shared": equal (also on a second chunk of that shape, when there is
        one); an int a: a size of a x rows. None when some value fits none of them."""
        if hasattr(self, "_stacking_plan"):
            return self._stacking_plan
        c = max(self.chunks, key=lambda c: self.tokens[c])
        ids, mask = self.inputs[c]
        one = self.runner.prefix(ids, mask)
        two = self.runner.prefix(torch.cat([ids, ids]), torch.cat([mask, mask]))
        other = next((d for d in self.chunks if d != c and self.shape_of(d) == self.shape_of(c)), None)
        again = self.runner.prefix(*self.inputs[other]) if other is not None else one
        rows, plan = ids.shape[0], {}
        for key, v in one.items():
            w = two.get(key)
            if isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor):
                if v.dim() and w.shape[0] == 2 * v.shape[0] and w.shape[1:] == v.shape[1:]:
                    plan[key] = "rows"
                elif w.shape == v.shape and torch.equal(w, v) and torch.equal(again[key], v):
                    plan[key] = "shared"
                else:
                    plan = None
                    break
            elif isinstance(v, int) and isinstance(w, int) and not isinstance(v, bool):
                if w == v and again[key] == v:
                    plan[key] = "shared"
                elif w == 2 * v and v % rows == 0:
                    plan[key] = v // rows
                else:
                    plan = None
                    break
            elif type(v) is type(w) and v == w:
                plan[key] = "shared"
            else:
                plan = None
                break
        self._stacking_plan = plan
        return plan

    def run_batch(self, members: Sequence[tuple[Config, int, list[tuple], int]], share: float = 1.0) -> list:
        """The outputs of several (config, start, keys, chunk) whose chunks have one shape, their states
        stacked on the batch dimension: at each stage the distinct states (one per chunk and prefix key:
        configurations that agree below k share s_k) are grouped by the mode they run it in, and each group is
        one forward. Each member starts from the deepest state the memo holds for it, as in `run_chunk`; the
        states computed at stored boundaries go into the memo while the budget allows. The rows of a stacked
        forward are computed as when alone where the backend's kernels do not depend on the batch size
        (measured bit-identical on CPU: bench/results/chunk_cost_cpu.txt, candidate_batch_*_cpu.txt)."""
        r, counter, K = self.runner, self.runner.counter, self.runner.num_blocks
        ctxs = {c: self.context(c) for *_, c in members}
        made: dict = {}
        starts = []
        for config, start, keys, c in members:
            i0 = self._deepest(c, keys, None if "memo" in self.levers else start)
            if i0 > start:
                counter.memo_starts += 1
                counter.memo_stages_saved += sum(1 for k in range(start, i0) if config.mode(k) != "skip")
            starts.append(i0)
        bvals = []
        for (_, _, keys, c), i0 in zip(members, starts):
            b = {b: self.budget.fetch(self.memo[(c, b, keys[b])]) for b in r.suffix_boundaries if 0 < b <= i0}
            if 0 in r.suffix_boundaries:
                b[0] = ctxs[c]["s0"]
            bvals.append(b)
        lanes: dict[tuple, torch.Tensor] = {}  # (chunk, prefix key at the current boundary) -> that state
        stacked: dict[tuple, torch.Tensor] = {}  # consecutive lanes -> the stacked state they are parts of
        storing = True
        for k in range(min(starts), K):
            for (_, _, keys, c), i0 in zip(members, starts):
                if i0 == k and (c, keys[k]) not in lanes:
                    lanes[(c, keys[k])] = self.budget.fetch(self.memo[(c, k, keys[k])]) if k else ctxs[c]["s0"]
            groups: dict = {}  # mode -> {lane at k: [lane at k+1, the first start among its members]}
            for (config, start, keys, c), i0 in zip(members, starts):
                if i0 <= k:
                    lane = groups.setdefault(config.mode(k), {}).setdefault((c, keys[k]), [(c, keys[k + 1]), start])
                    lane[1] = min(lane[1], start)
            nxt, nxt_stacked = {}, {}
            for mode, group in groups.items():
                ids = tuple(group)
                h = lanes[ids[0]] if len(ids) == 1 else stacked.get(ids)
                if h is None:
                    h = torch.cat([lanes[lane] for lane in ids])
                h = r.stage(k, h, self.batch_context(tuple(c for c, _ in ids), made), mode)
                if mode != "skip":
                    counter.block_evals += len(ids) - 1
                    counter.prompt_block_evals += sum(self.inputs[c][0].shape[0] for c, _ in ids)
                    counter.token_block_evals += sum(self.tokens[c] for c, _ in ids)
                    counter.recompute_evals += sum(1 for _, first in group.values() if k < first)
                    counter.stacked_stage_runs += len(ids) > 1
                    counter.stacked_lanes += len(ids) if len(ids) > 1 else 0
                outs = [lane[0] for lane in group.values()]
                if len(ids) > 1:
                    nxt_stacked[tuple(outs)] = h
                    nxt.update(zip(outs, h.split([self.inputs[c][0].shape[0] for c, _ in ids])))
                else:
                    nxt[outs[0]] = h
                del h
            lanes, stacked = nxt, nxt_stacked
            if storing and self.stored(k + 1):
                parts = {lane for ids in stacked for lane in ids}
                for (c, key), h in lanes.items():  # a part of a stacked state is stored as its own copy
                    if (c, k + 1, key) not in self.memo:
                        storing = self._put((c, k + 1, key), h.clone() if (c, key) in parts else h, share)
                        if not storing:
                            break
            if k + 1 in r.suffix_boundaries:
                for (_, _, keys, c), i0, b in zip(members, starts, bvals):
                    if i0 <= k:
                        b[k + 1] = lanes[(c, keys[k + 1])]
        counter.chunk_evals += len(members)
        outs = [r.suffix(b, ctxs[c]) for b, (*_, c) in zip(bvals, members)]
        del lanes, stacked, bvals, ctxs, made
        return outs

    def chunk_contribution(self, config: Config, c: int, start: int = 0, keys: list[tuple] | None = None) -> float:
        """Chunk c's share of D for `config` (c = -1: the null prompt)."""
        return self.disc.contribution(None if c < 0 else c, self.run_chunk(config, c, start, keys))

    def warm(self, config: Config) -> None:
        """Make the memo hold `config`'s states at every stored boundary of every chunk (a beam's cache),
        computing only the missing ones (counted as recomputation); beams take at most half the budget."""
        K = self.runner.num_blocks
        keys = prefix_keys(config, K)
        wanted = [k for k in range(1, K) if self.stored(k)]
        for c in self.chunks:
            missing = [k for k in wanted if (c, k, keys[k]) not in self.memo]
            if missing:
                ctx = self.context(c)
                self._stages(config, c, keys, ctx, self._deepest(c, keys, missing[0] - 1), missing[-1], K, 0.5)
                del ctx

    def retain(self, beams: Sequence[Config], upcoming: Sequence[Config] = ()) -> None:
        """Keep only the states the next step can start from (every state on the path of a beam or of an
        upcoming configuration: those a candidate starts from, and those it needs once it is a beam); then
        warm the beams."""
        K = self.runner.num_blocks
        paths = set()
        for config in list(beams) + (list(upcoming) if "memo" in self.levers else []):
            keys = prefix_keys(config, K)
            paths |= {(k, keys[k]) for k in range(1, K)}
        for key in [key for key in self.memo if key[1:] not in paths]:
            self._drop(key)
        for config in beams:
            self.warm(config)

    def clear(self) -> None:
        for key in list(self.memo):
            self._drop(key)

    # selection ---------------------------------------------------------------------------------------
    def chunk_order(self, shares: dict | None, cand: Candidate | None = None, keys: list[tuple] | None = None) -> list[int]:
        """This rank's chunks, the most expected share of D (the parent's) per unit of work first; the work
        is the chunk's tokens, times (for `cand`) the stages it runs from the deepest state the memo holds
        for that chunk (states other configurations left make some chunks cheap). Without shares: the null
        prompt first, then chunk order."""
        if not shares or "order" not in self.levers:
            return list(self.chunks)
        stages = dict.fromkeys(self.chunks, 1)
        if cand is not None:
            K, limit = self.runner.num_blocks, None if "memo" in self.levers else cand.start
            running = [k for k in range(K) if cand.config.mode(k) != "skip"]
            keys = keys or prefix_keys(cand.config, K)
            for c in self.chunks:
                i0 = self._deepest(c, keys, limit)
                stages[c] = max(1, len(running) - bisect.bisect_left(running, i0))
        return sorted(self.chunks, key=lambda c: (-shares.get(self.global_id[c], 0.0) / (self.tokens[c] * stages[c]), c))

    def select(self, cands: Sequence[Candidate], k: int, complete: list[tuple], desc: str = "") -> dict[int, float]:
        """Exact k best of `cands` and `complete`, scoring as few (candidate, chunk) pairs as possible.

        complete: (score, tie key) already known. Best-first over partial sums: the candidate with the lowest
        partial sum (a lower bound of its D) is advanced by one chunk (one per rank); once k scores are
        complete, a candidate whose partial sum exceeds the k-th best is abandoned (strictly: equal partial
        sums are always finished, so ties are decided exactly). Returns the complete scores by candidate
        position; `self.shares[i]` holds each complete candidate's shares by global chunk.

        Several ranks splitting candidates: each runs this best-first over its own (`deal`) on every chunk,
        abandoning on the k-th best of the scores any rank finished (`Exchange`: they arrive while it scores);
        the scores and shares of every rank are returned on every rank.
        """
        r = self.runner
        exchange = None
        if self.group.world > 1 and not self.by_chunks:
            owner = deal(cands, self.group.world)
            exchange = Exchange(self.group)
        mine = [i for i in range(len(cands)) if exchange is None or owner[i] == self.group.rank]
        r.counter.candidates += len(mine)
        heap = [(0.0, cands[i].priority, i) for i in mine]
        heapq.heapify(heap)
        progress, partial, done = [0] * len(cands), [0.0] * len(cands), {}
        orders: dict[int, list[int]] = {}
        keys: dict[int, list[tuple]] = {}
        finished = sorted(complete)
        received: list[list] = [[] for _ in cands]  # (global chunk, share of D) from every rank
        self.shares = {}
        bar = progress_bar(total=len(mine) * self.rounds, desc=desc, disable=not self.progress, unit="round")
        width = self.candidate_batch  # candidates stacked in one forward
        # under several ranks, the lowest partial sums advance `step` at a time with one collective for all:
        # ranks wait for each other once per step (the slowest rank's sum of chunk costs, not per candidate)
        step = max(width, DIST_STEP) if self.by_chunks else width
        gather = self.group.gather_batch if self.by_chunks else Solo().gather_batch

        def arrive(pairs) -> None:  # scores other ranks finished
            for i, score in pairs:
                done[i] = score
                bisect.insort(finished, (score, cands[i].tie))

        def order(i: int) -> list[int]:
            if i not in orders:
                keys[i] = prefix_keys(cands[i].config, r.num_blocks)
                orders[i] = self.chunk_order(cands[i].shares, cands[i], keys[i])
            return orders[i]

        def stacks_with(i: int):
            """What must agree for i to stack with other candidates: the shape of its next chunk here;
            across ranks (whose chunks differ) its progress and parent, which every rank knows (candidates of
            one parent score their chunks in about one order)."""
            if self.by_chunks:
                return progress[i], id(cands[i].shares)
            o = order(i)
            shape = self.shape_of(o[progress[i]]) if progress[i] < len(o) else None
            return None if shape in self.alone_shapes else shape

        while True:
            if heap and "abandon" in self.levers and len(finished) >= k and heap[0][0] > finished[k - 1][0]:
                r.counter.abandoned += len(heap)
                heap = []
            if not heap:
                if exchange is None or exchange.over:
                    break
                t_wait = time.perf_counter()  # idle: wait for the next gather (the other ranks' scores)
                arrive(exchange.poll(idle=True, block=True))
                self.wait_seconds += time.perf_counter() - t_wait
                continue
            batch = [heapq.heappop(heap)]
            if step > 1 and heap:
                # companions: the next lowest partial sums (those best-first scores next) that pass the
                # bar and, to be stacked, whose next chunks stack with the first one's
                cut = finished[k - 1][0] if "abandon" in self.levers and len(finished) >= k else float("inf")
                want = stacks_with(batch[0][2]) if width > 1 else None
                picks = [] if width > 1 and want is None else heapq.nsmallest(
                    step - 1, (e for e in heap if e[0] <= cut and (width == 1 or stacks_with(e[2]) == want)))
                if picks:
                    taken = {e[2] for e in picks}
                    heap = [e for e in heap if e[2] not in taken]
                    heapq.heapify(heap)
                    batch += picks
            by_shape: dict[tuple, list[int]] = {}  # shape of this rank's next chunk -> members scoring one
            for _, _, i in batch:
                o = order(i)
                if progress[i] < len(o):
                    by_shape.setdefault(self.shape_of(o[progress[i]]), []).append(i)
            pairs: dict[int, tuple[float, float]] = {}
            for shape, members in by_shape.items():
                chunks = [orders[i][progress[i]] for i in members]
                if len(members) == 1 or width == 1 or shape in self.alone_shapes:  # each member's own forward
                    values = [self.chunk_contribution(cands[i].config, c, cands[i].start, keys[i])
                              for i, c in zip(members, chunks)]
                else:
                    outs = self.run_batch([(cands[i].config, cands[i].start, keys[i], c) for i, c in zip(members, chunks)])
                    values = [self.disc.contribution(None if c < 0 else c, out) for c, out in zip(chunks, outs)]
                    del outs
                pairs.update((i, (float(self.global_id[c]), v)) for i, c, v in zip(members, chunks, values))
            t_wait = time.perf_counter()
            arrived = gather([pairs.get(i) for _, _, i in batch])  # by chunks: one collective a step
            self.wait_seconds += time.perf_counter() - t_wait
            for (_, prio, i), got in zip(batch, arrived):
                cand = cands[i]
                received[i] += got
                partial[i] = fold(received[i])  # in global chunk order: a lower bound, and at the end D itself
                progress[i] += 1
                bar.update(1)
                if progress[i] == self.rounds:
                    done[i] = partial[i]
                    self.shares[i] = dict(received[i])
                    del orders[i], keys[i]
                    bisect.insort(finished, (partial[i], cand.tie))
                    bar.set_postfix(best=f"{finished[0][0]:.4g}", scored=len(done))
                    if exchange is not None:
                        exchange.send(i, partial[i])
                else:
                    heapq.heappush(heap, (partial[i], prio, i))
            if exchange is not None:
                arrive(exchange.poll())
        if exchange is not None:  # every rank's shares of the candidates it finished
            for shares in self.group.gather_objects(dict(self.shares)):
                self.shares.update(shares)
        bar.close()
        return done

    def report(self, config: Config) -> dict:
        """The discrepancy report of `config` over every rank's chunks, folded in global chunk order."""
        outs, null = self.outputs(config)
        own = [c for c in self.owned if c >= 0]
        parts = [(self.global_id[k], part) for k, part in zip(own, self.disc.report_parts(outs, own))]
        everything = [p for rank_parts in self.group.gather_objects(parts) for p in rank_parts]
        return self.disc.report_from_parts([part for _, part in sorted(everything, key=lambda p: p[0])], null)

    def outputs(self, config: Config):
        """(chunk outputs, null output) of `config` on the calibration set, for reports."""
        r = self.runner
        outs = [r.forward(config, None, None, ctx=self.context(c)) for c in self.owned if c >= 0]
        return outs, r.forward(config, None, None, ctx=self.context(-1))
