"""Peak memory of a search against the number of calibration prompts (issue 10).

Each prompt count runs in its own process: a T5 encoder (d_model 256, 4 layers, gated-gelu, 47 MB),
long IIW captions up to 256 tokens (T5 tokenizer), chunks of 16, --cache-gb 0.25, skrr-skip to 0.15.
Prints the peak RSS growth over the loaded model, the memory plan's estimate, and the slope per prompt.
Goal on CPU: growth <= cache budget + 2 x weights + 3 hidden states per prompt, slope <= 0.5 MB/prompt.

    python bench/bench_search_memory.py [--prompts 16,64,256] [--out bench/results/search_memory_cpu.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
from transformers import T5Config, T5EncoderModel, T5TokenizerFast
import skrr_compile as skrr
from skrr_compile.blocksearch.memory import peak_rss
n, shared = int(sys.argv[1]), sys.argv[2]
tok = T5TokenizerFast(tokenizer_file=f"{shared}/tokenizers/t5/tokenizer.json")
prompts = [json.loads(l)["IIW-P5B"] for l in open(f"{shared}/prompts/iiw_locnar_eval.jsonl")][:n]
cfg = T5Config(d_model=256, d_kv=64, num_heads=4, d_ff=1024, num_layers=4, feed_forward_proj="gated-gelu",
               vocab_size=32128)
model = T5EncoderModel(cfg).eval()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
cal = skrr.blocksearch.run.prepare_calibration(tok, prompts, max_length=256, chunk_size=16)
loaded = peak_rss()
t = time.perf_counter()
res = skrr.search(model, tok, cal, sparsity=0.15, method="skrr-skip", cache_gb=0.25, progress=False)
mem = res.report["memory"]
tokens = sum(int(m.sum()) for _, m in cal.chunks)
padded = sum(ids.numel() for ids, _ in cal.chunks)
print(json.dumps({"prompts": n, "weights": weights, "loaded_rss": loaded, "peak_rss": peak_rss(),
                  "estimate": mem["plan"]["peak"], "seconds": time.perf_counter() - t, "tokens": tokens,
                  "padded_tokens": padded, "hidden_bytes_per_prompt": padded / n * 256 * 4,
                  "cache_peak": mem["cache"]["peak_bytes"]["device"], "counter": res.report["counter"],
                  "skip": list(res.plan.skip)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="16,64,256")
    ap.add_argument("--out", default=str(ROOT / "bench/results/search_memory_cpu.txt"))
    args = ap.parse_args()
    if not (SHARED / "prompts/iiw_locnar_eval.jsonl").is_file():
        print(f"needs the shared prompt sets and tokenizers in {SHARED}", file=sys.stderr)
        return 2
    rows = []
    for n in [int(x) for x in args.prompts.split(",")]:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(SHARED)], capture_output=True, text=True,
                             env=env, cwd=ROOT)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{n} prompts done in {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    mb = 1e6
    lines = [
        "# bench/bench_search_memory.py: peak RSS growth of a search over the loaded model (each row its own process)",
        f"# command: python bench/bench_search_memory.py --prompts {args.prompts}",
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch threads 1; {time.strftime('%Y-%m-%d')}",
        "# model: T5 d_model 256, 4 layers, gated-gelu (random init); IIW captions <= 256 T5 tokens; chunks of 16;",
        "#        --cache-gb 0.25, skrr-skip, sparsity 0.15, fp32 on CPU",
        "",
        f"{'prompts':>7} {'weights MB':>10} {'growth MB':>9} {'goal MB':>8} {'estimate MB':>11} {'cache peak MB':>13} "
        f"{'seconds':>7}  skip",
    ]
    for r in rows:
        growth = (r["peak_rss"] - r["loaded_rss"]) / mb
        goal = (0.25 * 2**30 + 2 * r["weights"] + 3 * r["hidden_bytes_per_prompt"] * r["prompts"]) / mb
        r["growth_mb"], r["goal_mb"] = growth, goal
        lines.append(f"{r['prompts']:>7} {r['weights'] / mb:>10.1f} {growth:>9.0f} {goal:>8.0f} {r['estimate'] / mb:>11.0f} "
                     f"{r['cache_peak'] / mb:>13.0f} {r['seconds']:>7.0f}  {r['skip']}")
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        slope = (b["growth_mb"] - a["growth_mb"]) / (b["prompts"] - a["prompts"])
        slope_all = (rows[-1]["growth_mb"] - rows[0]["growth_mb"]) / (rows[-1]["prompts"] - rows[0]["prompts"])
        rest = [(r["growth_mb"] - r["cache_peak"] / mb) for r in (a, b)]
        lines += ["", f"without the boundary caches (which fill up to --cache-gb as prompts grow): slope "
                  f"{(rest[1] - rest[0]) / (b['prompts'] - a['prompts']):.3f} MB per prompt"]
        lines += [f"slope {a['prompts']}->{b['prompts']} prompts: {slope:.3f} MB per prompt "
                  f"(over all rows {slope_all:.3f}; goal <= 0.5; one hidden state is "
                  f"{b['hidden_bytes_per_prompt'] / mb:.3f} MB per prompt)"]
    ok = all(r["growth_mb"] <= r["goal_mb"] for r in rows)
    lines.append(f"growth within cache budget + 2 x weights + 3 hidden states per prompt: {'yes' if ok else 'NO'}")
    lines.append("the estimate is the memory plan's 'estimated peak device memory' (weights included); growth excludes "
                 "the weights and the runtime already resident after loading")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
