"""Fast Skrr search vs the naive algorithm (a full forward of every candidate), side by side in one run.

Real trained encoders: all-MiniLM-L6-v2 (`minilm`, 12 sub-blocks) and SmolLM2-135M-Instruct (`smollm2`, 60
sub-blocks, GGUF Q4_1 dequantized, behind its chat template since its tokenizer adds no BOS); `t5-base` is
the older random-init T5-base shape. Calibration: the first N long captions of IIW (../shared), truncated to
--max-length tokens. For each sparsity it prints the fast search's wall time and sub-block evaluations
(per chunk and per prompt), the naive search's (measured over the whole search, or with --naive-steps over
the same first beam steps; its evaluations are always also counted over the whole trajectory, which the
naive search follows exactly), the ratios, whether the plans (or the first steps' scores) are identical,
and with --ablate what each lever buys (the fast search with that one lever off).

    python bench/bench_search.py --model minilm --sparsity 0.3,0.4 --chunk-size 1 --naive-chunk-size 1,8 --ablate
    python bench/bench_search.py --model smollm2 --sparsity 0.3 --max-length 32 --chunk-size 2 --naive-steps 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from search_reference import NaiveScorer, naive_reuse_phase, naive_skip_phase  # noqa: E402

import skrr_compile as skrr  # noqa: E402
from skrr_compile.blocksearch.calibration import read_prompts, tokenize  # noqa: E402
from skrr_compile.blocksearch.evaluator import LEVERS  # noqa: E402
from skrr_compile.blocksearch.run import search  # noqa: E402
from skrr_compile.core.checkpoints import load_encoder, load_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "prompts"
SOURCES = {
    "iiw": (SHARED / "iiw_locnar_eval.jsonl", "IIW-P5B"),
    "geneval": (SHARED / "geneval_metadata.jsonl", "prompt"),
    "parti": (SHARED / "partiprompts.tsv", "Prompt"),
    "builtin": ("builtin", None),
}
TEMPLATES = {"smollm2": "<|im_start|>user\n{prompt}<|im_end|>"}


def load(name: str):
    if name == "t5-base":
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                          feed_forward_proj="relu")
        return tf.T5EncoderModel(cfg).eval(), load_tokenizer("builtin"), "T5-base shape, random init"
    path = {"minilm": "builtin", "smollm2": "builtin-llm"}[name]
    model = load_encoder(path)
    model = model[0] if isinstance(model, tuple) else model
    what = {"minilm": "all-MiniLM-L6-v2, trained", "smollm2": "SmolLM2-135M-Instruct, trained (GGUF Q4_1, dequantized)"}
    return model.eval(), load_tokenizer(path), what[name]


def add_setup_args(ap: argparse.ArgumentParser, chunk_size: int) -> None:
    """The model, prompts, calibration and search flags every search benchmark takes."""
    ap.add_argument("--model", default="minilm", choices=["minilm", "smollm2", "t5-base"])
    ap.add_argument("--prompts", default="iiw", choices=sorted(SOURCES))
    ap.add_argument("--n", type=int, default=32, help="calibration prompts")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=chunk_size)
    ap.add_argument("--sparsity", default="0.3,0.4")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--method", default="skrr", choices=["skrr", "skrr-skip"])
    ap.add_argument("--threads", type=int, default=None)


def calibration(args, tok, chunk_size: int | None = None):
    """The first --n prompts of --prompts, tokenized as the benchmark's model reads them."""
    source, field = SOURCES[args.prompts]
    prompts = read_prompts(source, field=field, limit=args.n)
    return tokenize(tok, prompts, max_length=args.max_length, chunk_size=chunk_size or args.chunk_size,
                    template=TEMPLATES.get(args.model))


def naive_counts(report: dict, K: int, n_chunks: int, n_prompts: int, n_tokens: int,
                 steps: int | None = None) -> tuple[int, int, int]:
    """The naive search's sub-block evaluations (per chunk, per prompt, per token) over the fast search's trajectory: a
    candidate of step s skips s sub-blocks and runs the other K - s on every chunk; re-use adds one back."""
    per_chunk = 0
    for s, h in enumerate(report["depth_history"][:steps], 1):
        per_chunk += h["candidates"] * (K - s)
    if steps is None:
        depth, reused = len(report["skip"]), 0
        for r in report.get("reuse_steps", []):
            per_chunk += sum(x is not None for x in (r["left"], r["right"])) * (K - depth + reused + 1)
            reused += r["chosen"] is not None
    return per_chunk * n_chunks, per_chunk * (n_prompts + 1), per_chunk * n_tokens


def fmt_counter(c: dict) -> str:
    return (f"{c['block_evals']:>9,} sub-block evals ({c['prompt_block_evals']:,} per prompt, "
            f"{c['token_block_evals']:,} per token); "
            f"{c['candidates']} candidates, {c['abandoned']} abandoned early, {c['memo_starts']:,} chunk "
            f"evaluations started from another configuration's state ({c['memo_stages_saved']:,} stages saved), "
            f"{c['recompute_evals']:,} stages recomputed for beams")


def sample_naive(model, graph, cal_naive, naive_chunk: int, rep: dict, K: int, n: int, per_pass: int, t_fast: float) -> None:
    """Naive candidates (the best beam of step s-1 plus one more sub-block, drawn at random) timed with full
    forwards over `cal_naive` (its own chunking); their seconds per sub-block run over the whole calibration set
    times the naive search's count of such runs (`per_pass`) estimate the naive search."""
    import random

    rng = random.Random(0)
    hist = rep["depth_history"]
    t1 = time.perf_counter()
    scorer = NaiveScorer(model, graph, cal_naive)
    t_ref = time.perf_counter() - t1
    seconds, evals = 0.0, 0
    for i in range(n):
        s = 1 + (i * len(hist)) // n  # steps spread over the search
        parent = set(hist[s - 2]["skip"]) if s >= 2 else set()
        j = rng.choice([b for b in range(K) if b not in parent])
        before = scorer.block_evals
        t1 = time.perf_counter()
        scorer.score(parent | {j})
        seconds += time.perf_counter() - t1
        evals += scorer.block_evals - before
    rate = seconds / (evals / scorer.n_chunks)  # one sub-block over every prompt
    estimate = t_ref + rate * per_pass
    print(f"naive sampled (chunks of {naive_chunk}): {n} candidates, {evals:,} sub-block evals in {seconds:.1f} s = "
          f"{1000 * rate:.1f} ms per sub-block over all prompts; whole naive search = dense reference {t_ref:.1f} s "
          f"+ {per_pass:,} x that = {estimate:.0f} s")
    print(f"  -> wall time naive (sampled estimate) / fast (measured): {estimate / t_fast:.2f}x  (goal >= 5x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap, chunk_size=8)
    ap.add_argument("--naive-chunk-size", default=None,
                    help="prompts per forward of the naive search, or a comma list (one naive run each; default: "
                         "--chunk-size); larger chunks make its forwards cheaper per prompt on CPU, so a fair "
                         "wall-time baseline uses its best")
    ap.add_argument("--naive-steps", type=int, default=None,
                    help="time the naive search over only this many first beam steps (and the fast one's same steps)")
    ap.add_argument("--naive-sample", type=int, default=0,
                    help="also time this many naive candidates drawn along the trajectory (at each --naive-chunk-size), "
                         "and give the naive wall time of the whole search as their time per sub-block evaluation x "
                         "the counted evaluations")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--ablate", action="store_true", help="also run the fast search with each lever off")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, what = load(args.model)
    cal = calibration(args, tok)
    naive_chunks = [int(x) for x in str(args.naive_chunk_size or args.chunk_size).split(",")]
    cal_naive = {n: cal if n == args.chunk_size else calibration(args, tok, n) for n in naive_chunks}
    n_tokens = sum(int(m.sum()) for _, m in cal.chunks)
    all_tokens = sum(ids.numel() for ids, _ in [*cal.chunks, cal.null])  # padded: the work of a stage
    graph = skrr.trace(model)
    K = len(graph.blocks)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start")
    print(f"encoder: {what}, {K} sub-blocks, {graph.total_params:,} params, fp32")
    print(f"calibration: {cal.num_prompts} prompts from {args.prompts} (+ the null prompt), {n_tokens} tokens "
          f"(at most {args.max_length} each), chunks of {args.chunk_size} (naive: {', '.join(map(str, naive_chunks))})"
          + (f", template {TEMPLATES[args.model]!r}" if args.model in TEMPLATES else ""))
    print(f"search: {args.method}, beam {args.beam}, levers {', '.join(LEVERS)}")
    for sparsity in (float(s) for s in args.sparsity.split(",")):
        print(f"\n=== sparsity {sparsity}")
        t0 = time.perf_counter()
        fast = search(model, None, cal, sparsity=sparsity, beam=args.beam, method=args.method, progress=False,
                      graph=graph)
        t_fast = time.perf_counter() - t0
        rep, c = fast.report, fast.report["counter"]
        hist = rep["depth_history"]
        print(f"fast : {t_fast:8.1f} s {fmt_counter(c)}")
        print(f"       plan skip={list(fast.plan.skip)} reuse={fast.plan.reuse} D={rep['discrepancy']:.6g} "
              f"sparsity={rep['sparsity']:.4f}, {len(hist)} beam steps")
        n_chunk, n_prompt, n_token = naive_counts(rep, K, len(cal.chunks) + 1, cal.num_prompts, all_tokens)
        print(f"naive, counted over the whole search (same trajectory): {n_chunk:,} sub-block evals "
              f"({n_prompt:,} per prompt, {n_token:,} per token)")
        print(f"  -> evaluations naive / fast: {n_chunk / c['block_evals']:.2f}x per chunk, "
              f"{n_prompt / c['prompt_block_evals']:.2f}x per prompt, {n_token / c['token_block_evals']:.2f}x per token"
              "  (goal >= 5x)")
        for name in LEVERS if args.ablate else ():
            t1 = time.perf_counter()
            off = search(model, None, cal, sparsity=sparsity, beam=args.beam, method=args.method, progress=False,
                         graph=graph, levers=[x for x in LEVERS if x != name])
            t_off = time.perf_counter() - t1
            co = off.report["counter"]
            same = off.plan.skip == fast.plan.skip and off.plan.reuse == fast.plan.reuse and off.plan.scores == fast.plan.scores
            print(f"without {name:8s}: {t_off:8.1f} s {co['block_evals']:>9,} sub-block evals "
                  f"({co['prompt_block_evals']:,} per prompt) -> the lever buys {co['prompt_block_evals'] / c['prompt_block_evals']:.2f}x "
                  f"evaluations, {t_off / t_fast:.2f}x wall; identical plan and scores: {same}")
        for naive_chunk in naive_chunks if args.naive_sample else ():
            sample_naive(model, graph, cal_naive[naive_chunk], naive_chunk, rep, K, args.naive_sample,
                         n_chunk // (len(cal.chunks) + 1), t_fast)
        if args.skip_naive:
            continue
        steps = args.naive_steps if args.naive_steps and args.naive_steps < len(hist) else None
        for naive_chunk in naive_chunks:
            run_naive(args, model, graph, cal, cal_naive[naive_chunk], naive_chunk, fast, t_fast, K, steps, all_tokens)


def run_naive(args, model, graph, cal, cal_naive, naive_chunk: int, fast, t_fast: float, K: int, steps, all_tokens) -> None:
    rep, hist = fast.report, fast.report["depth_history"]
    t1 = time.perf_counter()
    scorer = NaiveScorer(model, graph, cal_naive)
    skip, order, history, score = naive_skip_phase(scorer, fast.report["target_sparsity"], args.beam, max_steps=steps)
    reuse = {}
    if steps is None and args.method == "skrr":
        reuse, score = naive_reuse_phase(scorer, skip, order, score)
    t_naive = time.perf_counter() - t1
    print(f"naive (chunks of {naive_chunk}): {t_naive:8.1f} s {scorer.block_evals:>9,} sub-block evals measured "
          f"({scorer.candidates} candidates, each a full forward of its rewritten graph"
          + (f"; first {steps} beam steps only)" if steps else ")"))
    if steps is None:
        same = set(fast.plan.skip) == skip and fast.plan.reuse == reuse and fast.plan.order == order
        print(f"identical plan: {same}  (naive skip={sorted(skip)} reuse={reuse} D={score:.6g})")
        print(f"  -> wall time naive / fast: {t_naive / t_fast:.2f}x  (goal >= 5x; whole searches)")
    else:
        same = all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip([h["score"] for h in hist[:steps]], history))
        t_fast_steps = hist[steps - 1]["elapsed"]
        _, m_prompt, m_token = naive_counts(rep, K, len(cal.chunks) + 1, cal.num_prompts, all_tokens, steps)
        f = hist[steps - 1]["counter"]
        print(f"identical best scores over the first {steps} steps: {same}; over these steps naive "
              f"{m_prompt:,} sub-block evals per prompt (counted; measured {scorer.block_evals:,} in its chunks of "
              f"{naive_chunk}) vs fast {f['prompt_block_evals']:,} = {m_prompt / f['prompt_block_evals']:.2f}x "
              f"per prompt, {m_token / f['token_block_evals']:.2f}x per token")
        print(f"  -> wall time naive / fast over the first {steps} beam steps: {t_naive:.1f} s / {t_fast_steps:.1f} s"
              f" = {t_naive / t_fast_steps:.2f}x  (goal >= 5x)")


if __name__ == "__main__":
    main()
