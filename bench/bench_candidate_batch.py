"""Candidate batching (issue 25): the fast Skrr search with candidates scored one at a time and stacked 2, 4,
8 and auto per forward, side by side in one run, on the real MiniLM / SmolLM2 (or T5-base shape).

Each setting runs in a fresh process (its peak RSS is its own), one after another, in the order given, for
each sparsity; the table gives wall time, sub-block evaluations, the stacking counters, peak RSS and the
peak of the boundary-state memo, ratios against one at a time, and whether the plan, every beam step's score
and D are bit-identical to it.

    python bench/bench_candidate_batch.py --model minilm --sparsity 0.3,0.4 --chunk-size 1 --threads 1
    python bench/bench_candidate_batch.py --model smollm2 --n 8 --max-length 32 --chunk-size 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def child(args) -> None:
    """One search; prints one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from bench_search import calibration, load

    import skrr_compile as skrr
    from skrr_compile.blocksearch.run import search

    model, tok, what = load(args.model)
    device = torch.device(args.device)
    model = model.to(device)
    cal = calibration(args, tok)  # SmolLM2: behind its chat template, as bench_search.py reads it
    cal = cal.to(device) if device.type != "cpu" else cal
    graph = skrr.trace(model)
    stage_times: dict = {}
    if args.stage_times:  # time every stage run by its stacked rows and mode (where the per-row cost goes)
        from skrr_compile.blocksearch.runner import StagedRunner

        run_stage = StagedRunner.stage

        def timed(self, k, h, ctx, mode="keep", capture=None):
            t = time.perf_counter()
            out = run_stage(self, k, h, ctx, mode, capture)
            if device.type == "cuda":
                torch.cuda.synchronize()
            e = stage_times.setdefault(f"{h.shape[0]} {mode if mode in ('keep', 'skip') else 'reuse'}", [0, 0.0])
            e[0] += 1
            e[1] += time.perf_counter() - t
            return out

        StagedRunner.stage = timed
    batch = args.child if args.child == "auto" else int(args.child)
    t0 = time.perf_counter()
    res = search(model, tok, cal, sparsity=args.one_sparsity, method=args.method, progress=False, graph=graph,
                 candidate_batch=batch)
    wall = time.perf_counter() - t0
    rep = res.report
    print(json.dumps({"what": what, "wall": wall, "counter": rep["counter"], "skip": list(res.plan.skip),
                      "reuse": {str(k): v for k, v in res.plan.reuse.items()}, "scores": list(res.plan.scores),
                      "D": rep["discrepancy"], "sparsity": rep["sparsity"], "batch": rep["candidate_batch"],
                      "memo_peak": rep["memory"]["cache"]["peak_bytes"],
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                      "stage_times": stage_times, "prompts": cal.num_prompts, "chunks": len(cal.chunks),
                      "tokens": int(sum(int(ids.numel()) for ids, _ in cal.chunks))}))


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from bench_search import add_setup_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(ap, chunk_size=1)
    ap.add_argument("--batches", default="1,2,4,8,auto", help="settings, one at a time first")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the search runs where the model is)")
    ap.add_argument("--stage-times", action="store_true", help="also time every stage run by stacked rows and mode")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--one-sparsity", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start")
    print(f"calibration: {args.n} prompts from {args.prompts} (+ the null prompt), at most {args.max_length} "
          f"tokens, chunks of {args.chunk_size}; {args.method}, beam {args.beam}; each setting a fresh process")
    settings = args.batches.split(",")
    base_argv = [sys.executable, __file__, "--model", args.model, "--prompts", args.prompts, "--n", str(args.n),
                 "--max-length", str(args.max_length), "--chunk-size", str(args.chunk_size), "--beam",
                 str(args.beam), "--method", args.method, "--device", args.device] + (["--stage-times"] if args.stage_times else []) + (["--threads", str(args.threads)] if args.threads else [])
    summary = []
    for sp in [float(x) for x in args.sparsity.split(",")]:
        rows = {}
        for s in settings:
            out = subprocess.run(base_argv + ["--child", s, "--one-sparsity", str(sp)], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"setting {s} failed:\n{out.stderr[-3000:]}")
                sys.exit(1)
            rows[s] = json.loads(out.stdout.strip().splitlines()[-1])
        ref = rows[settings[0]]
        if sp == float(args.sparsity.split(",")[0]):
            print(f"encoder: {ref['what']}; {ref['prompts']} prompts in {ref['chunks']} chunks, {ref['tokens']} tokens")
        print(f"\n=== sparsity {sp}: plan skip={ref['skip']} reuse={ref['reuse']} D={ref['D']:.6g} "
              f"(sparsity {ref['sparsity']:.4f})")
        print(f"{'batch':>6} {'used':>4} {'wall s':>8} {'speed-up':>8} {'evals/prompt':>12} {'x evals':>7} "
              f"{'stacked runs':>12} {'lanes/run':>9} {'peak MB':>11} {'x peak':>6} {'memo MB':>8} vs one at a time")
        peak = "cuda_peak_mb" if ref.get("cuda_peak_mb") else "rss_mb"  # device memory on CUDA, else RSS
        for s, r in rows.items():
            c = r["counter"]
            plan_same = r["skip"] == ref["skip"] and r["reuse"] == ref["reuse"]
            bits = r["scores"] == ref["scores"] and r["D"] == ref["D"]
            rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r["scores"] + [r["D"]], ref["scores"] + [ref["D"]])) \
                if len(r["scores"]) == len(ref["scores"]) else float("inf")
            same = plan_same and bits
            lanes = c["stacked_lanes"] / c["stacked_stage_runs"] if c["stacked_stage_runs"] else 0.0
            st = r["batch"]["stacking"]
            note = "" if st is None or st["bit_identical"] else f" (stacked rows differ: {st['max_relative_difference']:.1e})"
            print(f"{s:>6} {r['batch']['used']:>4} {r['wall']:>8.1f} {ref['wall'] / r['wall']:>7.2f}x "
                  f"{c['prompt_block_evals']:>12,} {c['prompt_block_evals'] / ref['counter']['prompt_block_evals']:>6.3f}x "
                  f"{c['stacked_stage_runs']:>12,} {lanes:>9.2f} {r[peak]:>11.0f} {r[peak] / ref[peak]:>5.2f}x "
                  f"{r['memo_peak']['device'] / 2**20:>8.1f} plan {'yes' if plan_same else 'NO'}, scores "
                  f"{'bit-identical' if bits else f'within {rel:.1e}'}{note}")
            if r["stage_times"]:
                cost = {key: v for key, v in r["stage_times"].items() if key.endswith("keep")}
                print("        keep stages by stacked rows: " + ", ".join(
                    f"{key.split()[0]} rows x {v[0]:,} runs: {v[1] / v[0] / int(key.split()[0]) * 1e3:.3f} ms/row"
                    for key, v in sorted(cost.items(), key=lambda kv: int(kv[0].split()[0]))))
            summary.append((sp, s, ref["wall"] / r["wall"], c["prompt_block_evals"] / ref["counter"]["prompt_block_evals"],
                            r[peak] / ref[peak], plan_same, bits))
    best = [x for x in summary if x[1] != settings[0]]
    print(f"\ngoal ({args.device}): >= 1.25x less wall time at the same evaluations, identical plan, <= 10 % more "
          "peak memory (peak RSS on CPU, peak allocated device memory on CUDA)")
    for sp, s, speed, evals, rss, same, bits in best:
        ok = speed >= 1.25 and same and bits and rss <= 1.10
        print(f"  sparsity {sp} batch {s}: {speed:.2f}x wall, {evals:.3f}x evaluations, {rss:.2f}x peak memory, "
              f"plan {'identical' if same else 'DIFFERENT'}, scores {'bit-identical' if bits else 'not bit-identical'} -> "
              f"{'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
