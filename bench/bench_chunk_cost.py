"""Time per prompt of a naive candidate (a full forward of its rewritten graph) by prompt-chunk size, side by side.

On CPU a forward of n prompts at once costs less per prompt than n forwards of one (larger matrix products),
so the naive search's fair wall-time baseline is its best chunk size, not the fast search's. The same
candidates (random skip sets, the same for every chunk size) are scored at each chunk size, the sizes taking
turns, and the best of the repetitions is kept.

    python bench/bench_chunk_cost.py --model smollm2 --max-length 32 --sizes 2,4,8,16,32 --threads 1
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from bench_search import NaiveScorer, add_setup_args, calibration, load

import skrr_compile as skrr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap, chunk_size=1)
    ap.add_argument("--sizes", default="1,2,4,8,16,32", help="prompt-chunk sizes to compare")
    ap.add_argument("--candidates", type=int, default=8, help="random skip sets scored at each size")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, what = load(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    graph = skrr.trace(model)
    K = len(graph.blocks)
    rng = random.Random(0)
    skips = [set(rng.sample(range(K), rng.randrange(K // 4, K // 2 + 1))) for _ in range(args.candidates)]
    scorers = {n: NaiveScorer(model, graph, calibration(args, tok, n)) for n in sizes}
    best = dict.fromkeys(sizes, float("inf"))
    scores: dict[int, list[float]] = {}
    for _ in range(args.repeats):
        for n in sizes:
            t = time.perf_counter()
            scores[n] = [scorers[n].score(s) for s in skips]
            best[n] = min(best[n], time.perf_counter() - t)
    stages = sum(K - len(s) for s in skips)
    print(f"encoder: {what}, {K} sub-blocks; {args.n} prompts of at most {args.max_length} tokens; "
          f"{args.candidates} candidates skipping {K // 4}-{K // 2} sub-blocks; {torch.get_num_threads()} threads; "
          f"best of {args.repeats}")
    ref = sizes[0]
    for n in sizes:
        per = best[n] / (stages * (args.n + 1))
        same = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(scores[n], scores[ref]))
        print(f"chunks of {n:3d}: {best[n]:7.2f} s = {1e6 * per:7.1f} us per prompt and sub-block; "
              f"{best[ref] / best[n]:.2f}x faster than chunks of {ref}; largest relative difference of D: {same:.1e}")


if __name__ == "__main__":
    main()
