"""Distributed search: wall time and per-rank sub-block evaluations for 1 vs 2 ranks (issue 11).

Runs `python -m skrr_compile search` on the real all-MiniLM-L6-v2 with one thread per rank, ranks started
with the torch.distributed environment variables (what torchrun sets); on GPUs the same command runs
under torchrun. The plans must be identical; the script says so.

    python bench/bench_search_distributed.py [--prompts 32] [--sparsity 0.2] [--out bench/results/search_distributed_cpu.txt]
    python bench/bench_search_distributed.py --model builtin-llm --prompt-file ../shared/data/prompts/iiw_locnar_eval.jsonl \
        --field IIW-P5B --prompts 8 --max-length 32 --chunk-size 2 --sparsity 0.3 \
        --template $'<|im_start|>user\n{prompt}<|im_end|>' --out bench/results/search_distributed_smollm2_cpu.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_distributed_commands import run as launch  # noqa: E402


def run(world: int, args, out: Path, distribute: str = "candidates") -> tuple[float, dict]:
    argv = ["search", args.model, "--distribute", distribute, "--prompts", args.prompt_file, "--limit", str(args.prompts), "--chunk-size",
            str(args.chunk_size), "--sparsity", str(args.sparsity), "--quiet"]
    for flag, value in (("--field", args.field), ("--max-length", args.max_length), ("--template", args.template)):
        if value is not None:
            argv += [flag, str(value)]
    seconds = launch(world, argv, out)
    return seconds, json.loads((out / "report.json").read_text())


def find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            r = find(v, key)
            if r is not None:
                return r
    elif isinstance(obj, list):
        for v in obj:
            r = find(v, key)
            if r is not None:
                return r
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--prompt-file", default="builtin")
    ap.add_argument("--field")
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--template")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--distribute", default="candidates,chunks",
                    help="the ways 2 ranks share the search, comma-separated (candidates, chunks)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/search_distributed_cpu.txt"))
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world, mode in ((1, "-"), *((2, m) for m in args.distribute.split(","))):
            out = Path(tmp) / f"w{world}-{mode}"
            seconds, report = run(world, args, out, "candidates" if mode == "-" else mode)
            rows[world, mode] = (seconds, find(report, "distributed"), json.loads((out / "plan.json").read_text()))
    s1, d1, p1 = rows[1, "-"]

    def same(p) -> bool:
        return all(p1[k] == p[k] for k in ("skip", "reuse", "order", "scores"))
    lines = [
        "# bench/bench_search_distributed.py: one process vs 2 ranks (gloo), one thread per rank",
        "# command: python " + " ".join(shlex.quote(a) for a in sys.argv),
        f"# machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; model: {args.model}, "
        f"prompts: {args.prompt_file} ({args.prompts})",
        "",
        f"{'ranks':>5} {'split by':>10} {'wall s':>7} {'per-rank sub-block evaluations':>32} {'per-rank s':>14} "
        f"{'per-rank wait s':>16} {'wall x':>6} {'search x':>8} {'identical':>9}",
        *(f"{w:>5} {m:>10} {sw:>7.1f} {str([r['block_evals'] for r in d['ranks']]):>32} "
          f"{str([round(r['seconds'], 1) for r in d['ranks']]):>14} "
          f"{str([round(r.get('wait_seconds', 0.0), 1) for r in d['ranks']]):>16} {s1 / sw:>6.2f} "
          f"{d1['ranks'][0]['seconds'] / max(r['seconds'] for r in d['ranks']):>8.2f} {'yes' if same(p) else 'NO':>9}"
          for (w, m), (sw, d, p) in rows.items()),
        "",
        "wall x: one process's wall over this row's (start-up and model load in every process included); "
        "search x: the same for the search alone (slowest rank)",
        f"plan: skip {p1['skip']}, reuse {p1['reuse']}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0 if all(same(p) for _, _, p in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
