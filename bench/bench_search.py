"""Fast Skrr search vs the naive algorithm (a full forward per candidate), side by side in one run.

T5-base-shaped encoder (d_model 768, 12 layers = 24 sub-blocks, d_ff 3072, 12 heads; random init, since no
trained T5 weights exist offline) with 64 real calibration prompts. T5 has no offline tokenizer, so the
prompts are tokenized with the built-in MiniLM (BERT) vocabulary; its ids are valid T5 ids (30522 < 32128),
and lengths and padding are those of the real prompts. Prints sub-block evaluations and wall time of both,
their ratios, and checks that both return the identical plan.

    python bench/bench_search.py [--prompts geneval|parti|iiw|builtin] [--n 64] [--sparsity 0.3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from search_reference import NaiveScorer, naive_reuse_phase, naive_skip_phase  # noqa: E402

import skrr_compile as skrr  # noqa: E402
from skrr_compile.blocksearch.calibration import read_prompts, tokenize  # noqa: E402
from skrr_compile.blocksearch.run import search  # noqa: E402
from skrr_compile.core.checkpoints import load_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "prompts"
SOURCES = {
    "geneval": (SHARED / "geneval_metadata.jsonl", "prompt"),
    "parti": (SHARED / "partiprompts.tsv", "Prompt"),
    "iiw": (SHARED / "iiw_locnar_eval.jsonl", "IIW-P5B"),
    "builtin": ("builtin", None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="geneval", choices=sorted(SOURCES))
    ap.add_argument("--n", type=int, default=64, help="calibration prompts")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--skip-naive", action="store_true", help="only the fast search")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=args.layers, num_heads=12,
                      feed_forward_proj="relu")
    model = tf.T5EncoderModel(cfg).eval()
    source, field = SOURCES[args.prompts]
    prompts = read_prompts(source, field=field, limit=args.n)
    cal = tokenize(load_tokenizer("builtin"), prompts, max_length=args.max_length, chunk_size=args.chunk_size)
    n_tokens = sum(int(m.sum()) for _, m in cal.chunks)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"encoder: T5-base-shaped, {args.layers} layers = {2 * args.layers} sub-blocks, "
          f"{sum(p.numel() for p in model.parameters()):,} params, fp32, random init")
    print(f"calibration: {cal.num_prompts} prompts from {args.prompts} (+ the null prompt), {n_tokens} tokens, "
          f"chunks of {args.chunk_size}, padded to longest per chunk (max {args.max_length})")
    print(f"search: skrr (skip beam {args.beam} + re-use) to sparsity {args.sparsity}")

    graph = skrr.trace(model)
    t0 = time.perf_counter()
    fast = search(model, None, cal, sparsity=args.sparsity, beam=args.beam, progress=False, graph=graph)
    t_fast = time.perf_counter() - t0
    c = fast.report["counter"]
    print(f"\nfast : {t_fast:8.1f} s  {c['block_evals']:>8,} sub-block evals  ({c['candidates']} candidates, "
          f"{c['abandoned']} abandoned early, {c['recompute_evals']:,} evals spent on beam caches)")
    print(f"       plan skip={list(fast.plan.skip)} reuse={fast.plan.reuse} D={fast.report['discrepancy']:.6g} "
          f"sparsity={fast.report['sparsity']:.4f}")
    n_chunks = len(cal.chunks) + 1
    K = 2 * args.layers
    steps = fast.report["depth_history"]
    naive_skip = sum(h["candidates"] * (K - h["depth"]) * n_chunks for h in steps)
    naive_reuse = sum(len([x for x in (r["left"], r["right"]) if x is not None]) for r in fast.report.get("reuse_steps", []))
    depth = len(fast.plan.skip)
    naive_count = naive_skip + naive_reuse * (K - depth + 1) * n_chunks  # upper bound for re-use candidates
    print(f"naive (counted, same trajectory): {naive_count:,} sub-block evals -> naive / fast = "
          f"{naive_count / c['block_evals']:.2f}x")
    if args.skip_naive:
        return

    t0 = time.perf_counter()
    scorer = NaiveScorer(model, graph, cal)
    skip, order, history, score = naive_skip_phase(scorer, args.sparsity, args.beam)
    reuse, score = naive_reuse_phase(scorer, skip, order, score)
    t_naive = time.perf_counter() - t0
    print(f"naive: {t_naive:8.1f} s  {scorer.block_evals:>8,} sub-block evals  ({scorer.candidates} candidates, "
          "each a full forward of its rewritten graph)")
    print(f"       plan skip={sorted(skip)} reuse={reuse} D={score:.6g}")
    same = set(fast.plan.skip) == skip and fast.plan.reuse == reuse and fast.plan.order == order
    print(f"\nidentical plan: {same}")
    print(f"sub-block evaluations: naive / fast = {scorer.block_evals / c['block_evals']:.2f}x  (goal >= 5x)")
    print(f"wall time:             naive / fast = {t_naive / t_fast:.2f}x  (goal >= 3x)")


if __name__ == "__main__":
    main()
