"""The CLI commands that share their work across ranks (issue 23 item 4), 1 process vs 2 gloo ranks.

For each command on the real all-MiniLM-L6-v2, one thread per process: wall time for one process and for 2
ranks (started with the torch.distributed environment variables, as torchrun sets them), the speed-up, and
whether the outputs are identical (tensors bit for bit, reports without their timings). Wall time includes
each process's start-up and model load.

    python bench/bench_distributed_commands.py [--commands wanda,sweep,compare,search] [--prompts 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(n: int) -> dict[str, list[str]]:
    """Each command's arguments (before --out), and what it computes on every rank."""
    common = ["--prompts", "builtin", "--limit", str(n)]
    return {
        "wanda": ["magnitude", "builtin", "--target", "0.5", "--criterion", "wanda", "--calib-limit", str(4 * n)],
        "sweep": ["sweep", "builtin", "--sparsity", "0.3,0.5", *common, "--chunk-size", "4",
                  "--criterion", "magnitude,wanda", "--calib-limit", str(2 * n)],
        "compare": ["compare", "builtin", *common, "--chunk-size", "2", "--heldout", "builtin-heldout",
                    "--heldout-limit", str(n), "--sparsity", "0.2", "--methods", "laco,shortgpt,skrr-skip", "--quiet"],
        "search": ["search", "builtin", *common, "--chunk-size", "1", "--sparsity", "0.3", "--quiet"],
    }


def run(world: int, argv: list[str], out: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "skrr_compile", *argv, "--out", str(out)]
    t0 = time.perf_counter()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate()[1] for p in procs]
    failed = [(rank, err) for rank, (p, err) in enumerate(zip(procs, errs)) if p.returncode != 0]
    if failed:
        raise SystemExit(f"{' '.join(cmd)} (world {world}) failed:\n" +
                         "\n".join(f"--- rank {rank} (exit {procs[rank].returncode}):\n{err[-3000:]}" for rank, err in failed))
    return time.perf_counter() - t0


# what legitimately differs between 1 and 2 ranks: timings, the clock, per-rank counters, and the search's effort
# (how many candidates of a step were scored to the end, and the last D change seen per sub-block, which only
# orders the next step's candidates: ranks splitting candidates abandon on each other's scores a gather later)
NOT_COMPARED = {"seconds", "prune_seconds", "eval_seconds", "block_evals", "elapsed", "command", "distributed",
           "counter", "ranks", "share_of_seconds", "memory", "created", "scored", "delta"}


def canonical(obj, out: Path):
    """A report without what legitimately differs between 1 and 2 ranks (timings, per-rank counters, its path)."""
    if isinstance(obj, dict):
        return {k: canonical(v, out) for k, v in obj.items() if k not in NOT_COMPARED}
    if isinstance(obj, list):
        return [canonical(v, out) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(out), "OUT")
    return obj


def fingerprint(out: Path) -> dict:
    """Every output file: tensors hashed bit for bit, JSON canonicalized."""
    import torch
    from safetensors import safe_open

    result = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.suffix in (".png", ".md") or p.name.startswith("."):
            continue
        name = str(p.relative_to(out))
        if p.suffix == ".safetensors":
            with safe_open(p, "pt") as f:
                result[name] = {k: hashlib.sha256(f.get_tensor(k).contiguous().view(-1).view(torch.uint8)
                                                  .numpy().tobytes()).hexdigest() for k in sorted(f.keys())}
        elif p.suffix == ".json":
            result[name] = canonical(json.loads(p.read_text()), out)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", default="wanda,sweep,compare,search")
    ap.add_argument("--prompts", type=int, default=64)
    args = ap.parse_args()
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, one thread per "
          f"process, load average {os.getloadavg()[0]:.2f} at start; model: all-MiniLM-L6-v2 (builtin), "
          f"{args.prompts} builtin prompts")
    print(f"{'command':>8} {'1 process s':>11} {'2 ranks s':>9} {'speed-up':>8}  identical outputs")
    table = commands(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.commands.split(","):
            outs = {w: Path(tmp) / f"{name}{w}" for w in (1, 2)}
            t1 = run(1, table[name], outs[1])
            t2 = run(2, table[name], outs[2])
            a, b = fingerprint(outs[1]), fingerprint(outs[2])
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            print(f"{name:>8} {t1:>11.1f} {t2:>9.1f} {t1 / t2:>7.2f}x  "
                  + ("yes" if not diff else f"NO: {', '.join(diff)}") + f"  ({len(a)} files)", flush=True)
            print(f"         skrr-compile {' '.join(table[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
