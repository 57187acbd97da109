"""How few sub-block evaluations any exact partial-sum search needs: an oracle run of the same Skrr search.

The fast search (skrr_compile.blocksearch.evaluator) proves a candidate out of the beam by its partial sum
over the chunks scored so far passing the k-th best complete score (the bar). An exact search of that kind
cannot do better than an oracle that knows, before it scores anything, every candidate's D and every
chunk's share of it:
  - it scores the candidates that stay within the bar in full (their D must be known exactly: without an
    upper bound, nothing else shows they are in the beam), and
  - it scores each other candidate only on its largest shares per unit of work, just until they pass the
    bar (greedy by share / (tokens x stages to run from the deepest state the memo holds): the work-aware
    order of the fast search, fed the candidate's own shares instead of its parent's).
The oracle goes through the same Evaluator (same memo, same counters, same beam steps and re-use phase),
so its count is the fast search's count with a perfect bar and the best chunk order (with chunks of equal
cost, largest shares first is the cheapest way past the bar; with unequal costs the greedy order is close to
it, not provably equal). The truth it peeks at
comes from a second, separate evaluator that scores every candidate in full (not counted).

    python bench/search_floor.py --model minilm --sparsity 0.3,0.4 --chunk-size 1
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_search import add_setup_args, calibration, load, naive_counts  # noqa: E402  (puts tests/ on the path)
from search_reference import oracle_search  # noqa: E402

import skrr_compile as skrr  # noqa: E402
from skrr_compile.blocksearch.run import search  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap, chunk_size=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, what = load(args.model)
    cal = calibration(args, tok)
    all_tokens = sum(ids.numel() for ids, _ in [*cal.chunks, cal.null])
    graph = skrr.trace(model)
    K = len(graph.blocks)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"encoder: {what}, {K} sub-blocks; calibration: {cal.num_prompts} prompts from {args.prompts} "
          f"(+ the null prompt), at most {args.max_length} tokens, chunks of {args.chunk_size}; {args.method}, "
          f"beam {args.beam}")
    for sparsity in (float(s) for s in args.sparsity.split(",")):
        print(f"\n=== sparsity {sparsity}")
        t0 = time.perf_counter()
        fast = search(model, None, cal, sparsity=sparsity, beam=args.beam, method=args.method, progress=False,
                      graph=graph)
        t1 = time.perf_counter()
        best, oc, steps = oracle_search(graph, cal, sparsity, args.beam, args.method)
        t2 = time.perf_counter()
        rep, c = fast.report, fast.report["counter"]
        same = set(best.config.skip) == set(fast.plan.skip) and best.config.reuse_map == fast.plan.reuse
        _, n_prompt, n_token = naive_counts(rep, K, len(cal.chunks) + 1, cal.num_prompts, all_tokens)
        print(f"naive (counted, same trajectory): {n_prompt:>9,} sub-block evals per prompt, {n_token:,} per token")
        print(f"fast  ({t1 - t0:6.1f} s):         {c['prompt_block_evals']:>9,} per prompt, {c['token_block_evals']:,} per "
              f"token -> naive / fast {n_prompt / c['prompt_block_evals']:.2f}x per prompt, "
              f"{n_token / c['token_block_evals']:.2f}x per token")
        print(f"oracle ({t2 - t1:6.1f} s):        {oc.prompt_block_evals:>9,} per prompt, {oc.token_block_evals:,} per "
              f"token -> naive / oracle {n_prompt / oc.prompt_block_evals:.2f}x per prompt, "
              f"{n_token / oc.token_block_evals:.2f}x per token; {oc.abandoned} of {oc.candidates} candidates cut; "
              f"same plan as the fast search: {same}")
        print(f"  -> the fast search does {c['prompt_block_evals'] / oc.prompt_block_evals:.3f}x the oracle's "
              "evaluations per prompt")


if __name__ == "__main__":
    main()
