"""Skrr search (beam Skip + Re-use) and the paper's baselines, exact and cheap.

Exactness: every candidate is scored with the same ops as a full forward of its rewritten graph; the
speed comes from (1) stages: a candidate that differs from its parent beam from sub-block j on starts at
the parent's cached hidden state s_j; (2) early abandoning: D is a sum over the null prompt and prompt
chunks, so a candidate whose partial sum already exceeds the k-th best complete score cannot survive and
is dropped (strictly greater: ties are never cut); (3) promising candidates first (last step's costs),
so the bar is set early.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from skrr_compile.passes.graph_utils import fetch_attr

from .calibration import Calibration, read_prompts, tokenize
from .discrepancy import Discrepancy, last_hidden_state
from .graph import EncoderGraph, trace
from .io import atomic_write_text
from .plan import Plan
from .staged import Config, StagedRunner

METHODS = ("skrr", "skrr-skip", "finercut", "shortgpt", "laco")
STATE_FILE = "search_state.json"
LACO_DEFAULTS = {"I": 2, "M": 2, "L": 1, "H": 24, "T": 0.7}


class SearchError(ValueError):
    """Search inputs that cannot give a result (unreachable sparsity, mismatched resume state, ...)."""


@dataclass
class SearchResult:
    plan: Plan
    report: dict
    overrides: dict = field(default_factory=dict)  # LaCo: merged parameter values by name


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


def _removed(graph: EncoderGraph, skip, memo: dict) -> int:
    key = frozenset(skip)
    if key not in memo:
        memo[key] = graph.removed_params(Plan(skip=sorted(key)))
    return memo[key]


def check_sparsity(graph: EncoderGraph, sparsity: float) -> int:
    """Removed-parameter target for `sparsity`; errors when no plan can reach it."""
    if not (0.0 < sparsity < 1.0):
        raise SearchError(f"sparsity must be in (0, 1), got {sparsity}")
    total = graph.total_params
    target = math.ceil(sparsity * total)
    best = max(graph.removed_params(Plan(skip=[b.index for b in graph.blocks if b.index != keep.index]))
               for keep in graph.blocks)
    if best < target:
        raise SearchError(
            f"sparsity {sparsity:.3f} cannot be reached: removing every sub-block but one removes at most "
            f"{best / total:.3f} of the parameters (embeddings and norms stay)"
        )
    return target


class Checkpoint:
    """Search state after every step, written atomically; resumable after a crash or Ctrl-C."""

    def __init__(self, path: Path | None, key: str, resume: bool):
        self.path, self.key = path, key
        self.state: dict = {}
        if path is None:
            return
        if path.exists():
            if not resume:
                raise SearchError(f"{path} exists: pass --resume (resume=True) to continue it, or use a new --out")
            state = json.loads(path.read_text())
            if state.get("key") != key:
                raise SearchError(
                    f"{path} was written for other inputs (model, prompts, sparsity, method or beam differ); "
                    "use a new --out"
                )
            self.state = state

    def save(self, **state) -> None:
        self.state.update(state)
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"key": self.key, **self.state}, indent=1))


def _input_key(graph: EncoderGraph, calibration: Calibration, **kw) -> str:
    h = hashlib.sha256()
    h.update(graph.fingerprint.encode())
    for ids, mask in [calibration.null, *calibration.chunks]:
        h.update(ids.cpu().numpy().tobytes())
        h.update(mask.cpu().numpy().tobytes())
    h.update(json.dumps(kw, sort_keys=True, default=str).encode())
    return h.hexdigest()


# --- skip phase (Algorithm 1) ---------------------------------------------------------------------------
def beam_skip(graph: EncoderGraph, ev: Evaluator, target: int, beam: int, ckpt: Checkpoint,
              progress: bool = True) -> tuple[Beam, list[dict]]:
    K = len(graph.blocks)
    memo: dict = {}
    finished = lambda b: _removed(graph, b.config.skip, memo) >= target  # noqa: E731
    st = ckpt.state
    if st.get("beams"):
        beams = [Beam.from_dict(d) for d in st["beams"]]
        history = st.get("history", [])
        delta = {int(k): v for k, v in st.get("delta", {}).items()}
    else:
        beams, history, delta = [Beam(Config(), (), 0.0)], [], {}
    caches = {b.config: ev.cache(b.config) for b in beams if not finished(b)}
    while not all(finished(b) for b in beams):
        pool: dict[frozenset, tuple] = {}
        carried = []
        for b in sorted(beams, key=lambda b: b.key):
            if finished(b):
                carried.append(b)
                pool[b.config.skip] = None
                continue
            for j in range(K):
                s = b.config.skip | {j}
                if j in b.config.skip or len(s) == K or s in pool:
                    continue
                pool[s] = (b, j)
        cands = [v for v in pool.values() if v is not None]
        cands.sort(key=lambda bj: (bj[0].score + delta.get(bj[1], 0.0), bj[1]))
        specs = []
        for parent, j in cands:
            config = parent.config.with_skip(j)
            specs.append((config, j, caches[parent.config], tuple(sorted(config.skip)),
                          (parent.score + delta.get(j, 0.0), j)))
        known = [(b.score, tuple(sorted(b.config.skip))) for b in carried]
        scores = ev.select(specs, beam, known, desc=f"skip step {len(history) + 1}")
        complete = [(b.score, tuple(sorted(b.config.skip)), b) for b in carried]
        origin = {}
        for i, d in scores.items():
            parent, j = cands[i]
            complete.append((d, specs[i][3], Beam(specs[i][0], parent.order + (j,), d)))
            origin[specs[i][0]] = (i, j, caches[parent.config])
            delta[j] = d - parent.score
        if progress:
            best_now = min(complete, key=lambda c: c[:2])
            print(f"skip step {len(history) + 1}: {len(cands)} candidates, {len(scores)} scored in full, "
                  f"best D {best_now[0]:.4g} (skip {list(best_now[1])})", flush=True)
        if not complete:
            raise SearchError("no candidate could be scored (every extension would skip all sub-blocks)")
        survivors = [c[2] for c in sorted(complete, key=lambda c: c[:2])[:beam]]
        best = survivors[0]
        history.append({"depth": len(best.order), "candidates": len(cands), "scored": len(scores),
                        "skip": sorted(best.config.skip), "order": list(best.order),
                        "score": best.score, "sparsity": _removed(graph, best.config.skip, memo) / graph.total_params})
        beams = survivors
        caches = {
            b.config: caches.get(b.config) or ev.cache_from(origin[b.config][0], b.config, *origin[b.config][1:])
            for b in beams if not finished(b)
        }
        ckpt.save(phase="skip", beams=[b.to_dict() for b in beams], history=history,
                  delta={str(k): v for k, v in delta.items()}, counter=ev.runner.counter.to_dict())
    return min(beams, key=lambda b: b.key), history


# --- re-use phase (Algorithm 2) -------------------------------------------------------------------------
def reuse_phase(graph: EncoderGraph, ev: Evaluator, best: Beam, ckpt: Checkpoint,
                progress: bool = True) -> tuple[Beam, list[dict]]:
    kinds = [b.kind for b in graph.blocks]
    skip = best.config.skip
    st = ckpt.state
    current = Beam.from_dict(st["reuse_beam"]) if st.get("reuse_beam") else best
    steps = st.get("reuse_steps", [])
    cache = ev.cache(current.config)
    for pos, i in enumerate(best.order):
        if pos < len(steps):
            continue
        left = [j for j in range(i - 1, -1, -1) if j not in skip and kinds[j] == kinds[i]][:1]
        right = [j for j in range(i + 1, len(kinds)) if j not in skip and kinds[j] == kinds[i]][:1]
        options = left + right
        specs = [(current.config.with_reuse(i, j), i, cache, n, (n,)) for n, j in enumerate(options)]
        # ties keep skipping, then prefer left over right
        scored = ev.select(specs, 1, [(current.score, -1)], desc=f"re-use {i}")
        scores = {"skip": current.score, **{options[n]: scored.get(n) for n in range(len(options))}}
        best_choice, best_score = None, current.score
        for n in sorted(scored, key=lambda n: (scored[n], n))[:1]:
            if scored[n] < best_score:
                best_choice, best_score = options[n], scored[n]
        steps.append({"block": i, "left": left[0] if left else None, "right": right[0] if right else None,
                      "scores": {str(k): v for k, v in scores.items()}, "chosen": best_choice})
        if best_choice is not None:
            current = Beam(current.config.with_reuse(i, best_choice), current.order, best_score)
            cache = ev.cache_from(options.index(best_choice), current.config, i, cache)
        ckpt.save(phase="reuse", reuse_beam=current.to_dict(), reuse_steps=steps,
                  counter=ev.runner.counter.to_dict())
    return current, steps


# --- baselines ----------------------------------------------------------------------------------------
def shortgpt(graph: EncoderGraph, ev: Evaluator, target: int) -> tuple[list[int], list[dict]]:
    """Whole layers ranked once by block influence BI = 1 - cos(h_in, h_out), padding masked."""
    r = ev.runner
    n_layers = len(graph.blocks) // 2
    bi_sum, count = [0.0] * n_layers, 0
    for c in ev.chunks:
        if c < 0:
            continue
        ctx = ev.ctx[c]
        mask = ev.disc.masks[c]
        h = ctx["s0"]
        states = [h]
        for k in range(r.num_blocks):
            h = r.stage(k, h, ctx, "keep")
            states.append(h)
        for layer in range(n_layers):
            cos = torch.nn.functional.cosine_similarity(states[2 * layer].double(), states[2 * layer + 2].double(), -1)
            bi_sum[layer] += float((1 - cos)[mask].sum())
        count += int(mask.sum())
    bi = [s / max(count, 1) for s in bi_sum]
    ranking = sorted(range(n_layers), key=lambda layer: (bi[layer], layer))
    skip: list[int] = []
    memo: dict = {}
    for layer in ranking:
        if _removed(graph, skip, memo) >= target:
            break
        if len(skip) + 2 >= len(graph.blocks):
            break
        skip += [2 * layer, 2 * layer + 1]
    return sorted(skip), [{"layer": layer, "block_influence": bi[layer]} for layer in ranking]


def laco(graph: EncoderGraph, ev: Evaluator, target: int, params: dict) -> tuple[list[int], dict, list[dict]]:
    """Layer collapse: merge the parameter differences of the following layers into a base layer.

    Skrr's T2I setting: M = layers merged per step (base + M-1 following), [L, H] = 1-indexed range of the
    base layer, I = how far the base moves down after a merge, T = output-cosine threshold.
    """
    p = {**LACO_DEFAULTS, **params}
    r = ev.runner
    n_layers = len(graph.blocks) // 2
    layers_path = graph.layers_path
    gm = graph.graph_module
    names = [n for n, _ in gm.named_parameters()]
    layer_params = {
        layer: [n for n in names if n.startswith(f"{layers_path}.{layer}.")] for layer in range(n_layers)
    }
    present = list(range(n_layers))
    overrides: dict[str, torch.Tensor] = {}
    skip: set[int] = set()
    log = []
    memo: dict = {}
    base = min(int(p["H"]), n_layers) - int(p["M"])  # 0-indexed base of the first merge
    while base >= int(p["L"]) - 1 and _removed(graph, skip, memo) < target:
        if base not in present:
            base -= 1
            continue
        pos = present.index(base)
        following = present[pos + 1: pos + int(p["M"])]
        if not following:
            base -= 1
            continue
        trial = dict(overrides)
        for name in layer_params[base]:
            theta = overrides.get(name, fetch_attr(gm, name)).detach()
            merged = theta.clone()
            for f in following:
                other = name.replace(f"{layers_path}.{base}.", f"{layers_path}.{f}.", 1)
                merged += overrides.get(other, fetch_attr(gm, other)).detach() - theta
            trial[name] = merged
        trial_skip = skip | {2 * f + s for f in following for s in (0, 1)}
        if len(trial_skip) >= len(graph.blocks):
            break
        with r.overridden(trial):
            outs, _ = ev.outputs(Config(frozenset(trial_skip)))
            cos = _mean_cosine(ev, outs)
        accepted = cos > p["T"]
        log.append({"base": base, "merged": following, "cosine": cos, "accepted": accepted})
        if accepted:
            overrides, skip = trial, trial_skip
            present = [x for x in present if x not in following]
            base -= int(p["I"])
        else:
            base -= 1
    return sorted(skip), overrides, log


def _mean_cosine(ev: Evaluator, outs) -> float:
    total, n = 0.0, 0
    for k, out in enumerate(outs):
        f = ev.disc.project(0, ev.disc.features(out)[0]).double()
        ref = ev.disc.reference[k][0].double()
        cos = torch.nn.functional.cosine_similarity(f, ref, dim=-1)
        m = ev.disc._mask_for(f, ev.disc.masks[k])
        total += float(cos[m].sum())
        n += int(m.sum())
    return total / max(n, 1)


# --- entry point ----------------------------------------------------------------------------------------
def prepare_calibration(tokenizer, prompts, *, max_length=None, padding="longest", chunk_size=16,
                        min_tokens=None, max_tokens=None, read="mask", field=None, limit=None) -> Calibration:
    if isinstance(prompts, Calibration):
        return prompts
    if tokenizer is None:
        raise SearchError("a tokenizer is needed to tokenize the prompts (or pass a Calibration)")
    texts = read_prompts(prompts, field=field, limit=limit)
    return tokenize(tokenizer, texts, max_length=max_length, padding=padding, chunk_size=chunk_size,
                    min_tokens=min_tokens, max_tokens=max_tokens, read=read)


def search(
    model,
    tokenizer,
    prompts: Sequence[str] | str | Calibration,
    *,
    sparsity: float,
    method: str = "skrr",
    beam: int = 3,
    projection=None,
    select: Callable = last_hidden_state,
    read: str = "mask",
    max_length: int | None = None,
    padding: str = "longest",
    chunk_size: int = 16,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    cache_gb: float = 4.0,
    laco_params: dict | None = None,
    seed: int = 0,
    graph: EncoderGraph | None = None,
) -> SearchResult:
    """Find a plan that removes at least `sparsity` of the encoder's parameters (paper accounting)."""
    if method not in METHODS:
        raise SearchError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if beam < 1:
        raise SearchError(f"beam must be >= 1, got {beam}")
    torch.manual_seed(seed)
    graph = graph or trace(model)
    target = check_sparsity(graph, sparsity)
    calibration = prepare_calibration(tokenizer, prompts, max_length=max_length, padding=padding,
                                      chunk_size=chunk_size, min_tokens=min_tokens, max_tokens=max_tokens, read=read)
    calibration = calibration.to(graph.graph_module.parameters().__next__().device)
    width = "finercut" if method == "finercut" else beam
    key = _input_key(graph, calibration, sparsity=sparsity, method=method, beam=width, read=read,
                     laco=laco_params, projection=_describe(projection))
    ckpt = Checkpoint(Path(out_dir) / STATE_FILE if out_dir else None, key, resume)
    if ckpt.state.get("phase") == "done":
        return SearchResult(Plan.from_dict(ckpt.state["plan"]), ckpt.state["report"])
    t0 = time.perf_counter()
    runner = StagedRunner(graph)
    ev = Evaluator(runner, calibration, projection, select, cache_bytes=int(cache_gb * (1 << 30)),
                   beam=1 if method == "finercut" else beam, progress=progress)
    report: dict = {"method": method, "target_sparsity": sparsity, "beam": 1 if method == "finercut" else beam}
    overrides: dict = {}
    if method in ("skrr", "skrr-skip", "finercut"):
        best, history = beam_skip(graph, ev, target, 1 if method == "finercut" else beam, ckpt, progress)
        report["depth_history"] = history
        if method == "skrr":
            best, steps = reuse_phase(graph, ev, best, ckpt, progress)
            report["reuse_steps"] = steps
        plan = Plan(skip=sorted(best.config.skip), reuse=best.config.reuse_map, method=method, order=best.order,
                    scores=tuple(h["score"] for h in history), fingerprint=graph.fingerprint)
        report["discrepancy"] = best.score
    elif method == "shortgpt":
        skip, ranking = shortgpt(graph, ev, target)
        plan = Plan(skip=skip, method=method, fingerprint=graph.fingerprint)
        report["layer_ranking"] = ranking
    else:
        skip, overrides, log = laco(graph, ev, target, laco_params or {})
        plan = Plan(skip=skip, method=method, fingerprint=graph.fingerprint,
                    info={"laco": {**LACO_DEFAULTS, **(laco_params or {})}, "merged_params": sorted(overrides)})
        report["laco_log"] = log
    removed = graph.removed_params(plan)
    report.update({
        "sparsity": removed / graph.total_params,
        "removed_params": removed,
        "total_params": graph.total_params,
        "skip": list(plan.skip),
        "reuse": {str(k): v for k, v in plan.reuse.items()},
        "order": list(plan.order or ()),
        "counter": runner.counter.to_dict(),
        "seconds": time.perf_counter() - t0,
        "kernels_backend": ev.disc.backend,
        "cache": {"stride": ev.stride, "boundary_bytes": ev.per_boundary_bytes,
                  "note": f"every {ev.stride}. boundary of each beam kept ({ev.per_boundary_bytes / 2**20:.1f} MiB each)"},
        "calibration": {"prompts": calibration.num_prompts, "truncated": calibration.truncated,
                        "dropped": calibration.dropped, "read": calibration.read},
    })
    with runner.overridden(overrides):
        outs, null = ev.outputs(Config(frozenset(plan.skip), tuple(sorted(plan.reuse.items()))))
        report["calibration_report"] = ev.disc.report(outs, null).to_dict()
    if method != "laco":
        report["discrepancy"] = report["calibration_report"]["discrepancy"]
    result = SearchResult(plan, report, overrides)
    if not overrides:
        ckpt.save(phase="done", plan=plan.to_dict(), report=report)
    return result


def _describe(projection) -> str:
    if projection is None:
        return "identity"
    parts = projection if isinstance(projection, (tuple, list)) else (projection,)
    desc = []
    for p in parts:
        if isinstance(p, torch.nn.Module):
            s = sum(float(t.double().sum()) for t in p.parameters())
            desc.append(f"{type(p).__name__}:{s:.6e}")
        else:
            desc.append(repr(p))
    return "|".join(desc)


# --- results as models, held-out evaluation, comparison ------------------------------------------------
def materialize(graph: EncoderGraph, result: SearchResult):
    """The PrunedEncoder of a search result (LaCo's merged parameters bound in place of the originals)."""
    from .module import apply, bind_tensors, named_tensors

    pruned = apply(graph, result.plan)
    if result.overrides:
        tensors = named_tensors(pruned.graph_module)
        tensors.update({k: v.clone() for k, v in result.overrides.items()})
        bind_tensors(pruned.graph_module, tensors)
    return pruned


def heldout_report(dense, pruned, calibration: Calibration, projection=None, select=last_hidden_state) -> dict:
    """Discrepancy of `pruned` against the dense HF model on a held-out calibration set."""
    return Discrepancy(dense, calibration, projection, select).evaluate(pruned).to_dict()


def result_row(graph: EncoderGraph, result: SearchResult, pruned, heldout: dict | None = None) -> dict:
    cal = result.report.get("calibration_report", {})
    return {
        "method": result.plan.method,
        "target": result.report["target_sparsity"],
        "sparsity": result.report["sparsity"],
        "params": pruned.num_params,
        "mb": pruned.num_bytes / 1e6,
        "calib_discrepancy": cal.get("discrepancy"),
        "calib_cosine": cal.get("cosine"),
        "calib_null_norm_ratio": cal.get("null_norm_ratio"),
        "heldout_discrepancy": (heldout or {}).get("discrepancy"),
        "heldout_cosine": (heldout or {}).get("cosine"),
        "heldout_null_norm_ratio": (heldout or {}).get("null_norm_ratio"),
        "skip": list(result.plan.skip),
        "reuse": {str(k): v for k, v in result.plan.reuse.items()},
        "order": list(result.plan.order or ()),
        "block_evals": result.report["counter"]["block_evals"],
        "seconds": result.report["seconds"],
    }
