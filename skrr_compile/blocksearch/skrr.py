"""Skrr: beam skip (Algorithm 1; FinerCut is its width-1 case) and the re-use phase (Algorithm 2)."""

from __future__ import annotations

from skrr_compile.blocksearch.checkpoint import Checkpoint
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import Beam, Evaluator
from skrr_compile.blocksearch.runner import Config
from skrr_compile.blocksearch.target import removed_by_skip
from skrr_compile.core.trace import EncoderGraph


# --- skip phase (Algorithm 1) ---------------------------------------------------------------------------
def beam_skip(graph: EncoderGraph, ev: Evaluator, target: int, beam: int, ckpt: Checkpoint,
              progress: bool = True) -> tuple[Beam, list[dict]]:
    K = len(graph.blocks)
    memo: dict = {}
    finished = lambda b: removed_by_skip(graph, b.config.skip, memo) >= target  # noqa: E731
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
                        "score": best.score, "sparsity": removed_by_skip(graph, best.config.skip, memo) / graph.total_params})
        beams = survivors
        new_caches = {
            b.config: caches.get(b.config) or ev.cache_from(origin[b.config][0], b.config, *origin[b.config][1:])
            for b in beams if not finished(b)
        }
        ev.release_states()
        for config, old in caches.items():
            if config not in new_caches:
                old.release(ev.budget)
        caches = new_caches
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
            new_cache = ev.cache_from(options.index(best_choice), current.config, i, cache)
            cache.release(ev.budget)
            cache = new_cache
        ev.release_states()
        ckpt.save(phase="reuse", reuse_beam=current.to_dict(), reuse_steps=steps,
                  counter=ev.runner.counter.to_dict())
    return current, steps
