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


def run(world: int, args, out: Path) -> tuple[float, dict]:
    argv = ["search", args.model, "--prompts", args.prompt_file, "--limit", str(args.prompts), "--chunk-size",
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
    ap.add_argument("--out", default=str(ROOT / "bench/results/search_distributed_cpu.txt"))
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            seconds, report = run(world, args, Path(tmp) / f"w{world}")
            plan = json.loads((Path(tmp) / f"w{world}" / "plan.json").read_text())
            rows[world] = (seconds, find(report, "distributed"), plan)
    (s1, d1, p1), (s2, d2, p2) = rows[1], rows[2]
    same = all(p1[k] == p2[k] for k in ("skip", "reuse", "order", "scores"))
    lines = [
        "# bench/bench_search_distributed.py: one process vs 2 ranks (gloo), one thread per rank",
        "# command: python " + " ".join(shlex.quote(a) for a in sys.argv),
        f"# machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; model: {args.model}, "
        f"prompts: {args.prompt_file} ({args.prompts})",
        "",
        f"{'ranks':>5} {'wall s':>7} {'per-rank sub-block evaluations':>32} {'per-rank s':>14} "
        f"{'per-rank wait s':>16}",
        *(f"{w:>5} {sw:>7.1f} {str([r['block_evals'] for r in d['ranks']]):>32} "
          f"{str([round(r['seconds'], 1) for r in d['ranks']]):>14} "
          f"{str([round(r.get('wait_seconds', 0.0), 1) for r in d['ranks']]):>16}"
          for w, (sw, d, _) in sorted(rows.items())),
        "",
        f"speed-up {s1 / s2:.2f}x wall (includes start-up and model load in every process); search alone "
        f"{d1['ranks'][0]['seconds'] / max(r['seconds'] for r in d2['ranks']):.2f}x (slowest rank)",
        f"identical plan, order and scores: {'yes' if same else 'NO'} (skip {p2['skip']}, reuse {p2['reuse']})",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
