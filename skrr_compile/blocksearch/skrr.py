"""Skrr: beam skip (Algorithm 1; FinerCut is its width-1 case) and the re-use phase (Algorithm 2)."""

from __future__ import annotations

import time

from skrr_compile.blocksearch.checkpoint import Checkpoint
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import Beam, Candidate, Evaluator
from skrr_compile.blocksearch.runner import Config
from skrr_compile.blocksearch.target import removed_by_skip
from skrr_compile.core.trace import EncoderGraph


# --- skip phase (Algorithm 1) ---------------------------------------------------------------------------
def extensions(beams: list[Beam], K: int, finished) -> list[tuple[Beam, int]]:
    """The next step's (parent, j): each unfinished beam plus one more sub-block, each skip set once
    (from the first beam in score order that reaches it), never all K."""
    seen: set[frozenset] = {b.config.skip for b in beams if finished(b)}
    out = []
    for b in sorted(beams, key=lambda b: b.key):
        if finished(b):
            continue
        for j in range(K):
            s = b.config.skip | {j}
            if j in b.config.skip or len(s) == K or s in seen:
                continue
            seen.add(s)
            out.append((b, j))
    return out


def beam_skip(graph: EncoderGraph, ev: Evaluator, target: int, beam: int, ckpt: Checkpoint,
              progress: bool = True) -> tuple[Beam, list[dict]]:
    K = len(graph.blocks)
    memo: dict = {}
    reaches = lambda skip: removed_by_skip(graph, skip, memo) >= target  # noqa: E731
    finished = lambda b: reaches(b.config.skip)  # noqa: E731
    st = ckpt.state
    if st.get("beams"):
        beams = [Beam.from_dict(d) for d in st["beams"]]
        history = st.get("history", [])
        delta = {int(k): v for k, v in st.get("delta", {}).items()}
    else:
        beams, history, delta = [Beam(Config(), (), 0.0)], [], {}
    for b in beams:
        if not finished(b):
            ev.warm(b.config)
    while not all(finished(b) for b in beams):
        t0 = time.perf_counter()
        carried = [b for b in beams if finished(b)]
        cands = extensions(beams, K, finished)
        cands.sort(key=lambda bj: (bj[0].score + delta.get(bj[1], 0.0), bj[1]))
        specs = [Candidate(parent.config.with_skip(j), j, tuple(sorted(parent.config.skip | {j})),
                           (parent.score + delta.get(j, 0.0), j), parent.shares) for parent, j in cands]
        known = [(b.score, tuple(sorted(b.config.skip))) for b in carried]
        # when every candidate reaches the target, this step is the last and only its best is returned:
        # the exact best needs no exact second and third (a tighter bar, the same result)
        # (counting parameters is a graph walk: the candidates least likely to reach it are tried first)
        likely = sorted(cands, key=lambda pj: removed_by_skip(graph, pj[0].config.skip, memo) + graph.blocks[pj[1]].num_params)
        last = all(reaches(parent.config.skip | {j}) for parent, j in likely)
        scores = ev.select(specs, 1 if last else beam, known, desc=f"skip step {len(history) + 1}")
        complete = [(b.score, tuple(sorted(b.config.skip)), b) for b in carried]
        for i, d in scores.items():
            parent, j = cands[i]
            complete.append((d, specs[i].tie, Beam(specs[i].config, parent.order + (j,), d, ev.shares[i])))
            delta[j] = d - parent.score
        if not complete:
            raise SearchError("no candidate could be scored (every extension would skip all sub-blocks)")
        beams = [c[2] for c in sorted(complete, key=lambda c: c[:2])[:1 if last else beam]]
        best = beams[0]
        history.append({"depth": len(best.order), "candidates": len(cands), "scored": len(scores),
                        "skip": sorted(best.config.skip), "order": list(best.order),
                        "score": best.score, "sparsity": removed_by_skip(graph, best.config.skip, memo) / graph.total_params})
        live = [b for b in beams if not finished(b)]
        # the next step starts from the live beams; after the last one, the re-use phase from the best
        ev.retain([b.config for b in live] or [best.config],
                  [p.config.with_skip(j) for p, j in extensions(beams, K, finished)])
        now = time.perf_counter()
        history[-1].update(seconds=now - t0, elapsed=now - ev.started, counter=ev.runner.counter.to_dict())
        if progress:
            c = history[-1]["counter"]
            print(f"skip step {len(history)}: {len(cands)} candidates, {len(scores)} scored in full, best D "
                  f"{best.score:.4g} (skip {sorted(best.config.skip)}); {now - t0:.1f} s, {c['block_evals']:,} "
                  f"sub-block evaluations so far ({c['abandoned']:,} candidates abandoned, {c['memo_starts']:,} "
                  "chunks started from a shared state)", flush=True)
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
    ev.retain([current.config])  # the skip phase's last states: only the best beam's are read now
    for pos, i in enumerate(best.order):
        if pos < len(steps):
            continue
        left = [j for j in range(i - 1, -1, -1) if j not in skip and kinds[j] == kinds[i]][:1]
        right = [j for j in range(i + 1, len(kinds)) if j not in skip and kinds[j] == kinds[i]][:1]
        options = left + right
        specs = [Candidate(current.config.with_reuse(i, j), i, n, (n,), current.shares)
                 for n, j in enumerate(options)]
        # ties keep skipping, then prefer left over right
        scored = ev.select(specs, 1, [(current.score, -1)], desc=f"re-use {i}")
        scores = {"skip": current.score, **{options[n]: scored.get(n) for n in range(len(options))}}
        best_choice, best_score = None, current.score
        for n in sorted(scored, key=lambda n: (scored[n], n))[:1]:
            if scored[n] < best_score:
                best_choice, best_score = options[n], scored[n]
        steps.append({"block": i, "left": left[0] if left else None, "right": right[0] if right else None,
                      "scores": {str(k): v for k, v in scores.items()}, "chosen": best_choice})
        if progress:  # one line per step, as the skip steps print
            tried = ", ".join(f"via {j} {scores[j]:.4g}" if scores[j] is not None else f"via {j} abandoned"
                              for j in options)
            print(f"re-use step {pos + 1} (sub-block {i}): skipped D {current.score:.4g}"
                  + (f", {tried}" if tried else ", no kept sub-block of its kind") + "; "
                  + (f"re-uses {best_choice}" if best_choice is not None else "stays skipped"), flush=True)
        if best_choice is not None:
            n = options.index(best_choice)
            current = Beam(current.config.with_reuse(i, best_choice), current.order, best_score, ev.shares[n])
        ev.retain([current.config])
        ckpt.save(phase="reuse", reuse_beam=current.to_dict(), reuse_steps=steps,
                  counter=ev.runner.counter.to_dict())
    return current, steps
