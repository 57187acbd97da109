"""Dense vs pruned text-encoder inference: latency and peak memory in torch eager, torch.compile and
onnxruntime, plus file sizes, on a T5-base-shaped encoder at 40 % sparsity. Prints the ratios side by side.

    .venv/bin/python bench/bench_inference.py                      # T5-base shape, batch 4 x 128 tokens
    .venv/bin/python bench/bench_inference.py --tiny --runs 2      # a smoke run of the script itself

Every (runtime, model) pair runs in its own subprocess, so its peak memory is its own: the worker records
its resident set after imports, resets the high-water mark (/proc/self/clear_refs), loads the model from
disk, runs warm-up and timed calls, and reports VmHWM - baseline (weights + activations + runtime arenas).
The pruned plan is fixed (not searched: the search is benchmarked in bench_search.py): whole sub-blocks
are skipped from the last layers down until the target sparsity is reached, and one skipped attention
re-uses a kept one (so the sharing path is exercised; it adds that sub-block's compute back).
Memory: transformers memory-maps safetensors, so weights the compiled graph never reads (the dense module
under skrr.backend) need not become resident; the peak counts resident pages only.
Weights are random (seeded); latency and memory do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("eager", "compile", "onnx")


# ---------------------------------------------------------------------------------------------------
# worker: one runtime, one model, one process
# ---------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    runtime, variant, work = args.worker[0], args.worker[1], Path(args.workdir)
    if runtime == "onnx":
        import onnxruntime as ort
    else:
        import transformers

        import skrr_compile as skrr
        if runtime == "compile":
            import torch._dynamo  # noqa: F401  (imports before the baseline)
            import torch._inductor.compile_fx  # noqa: F401
    gen = torch.Generator().manual_seed(0)
    vocab = json.loads((work / "dense_hf" / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)

    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    if runtime == "onnx":
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(work / f"{variant}.onnx"), opts, providers=["CPUExecutionProvider"])
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

        def call():
            return session.run(None, feed)[0]
    else:
        if variant == "dense":
            model = transformers.T5EncoderModel.from_pretrained(work / "dense_hf").eval()
        elif variant == "pruned-backend":  # the dense module, rewritten inside torch.compile
            model = transformers.T5EncoderModel.from_pretrained(work / "dense_hf").eval()
        else:
            model = skrr.load(work / "pruned")
        if runtime == "compile":
            if variant == "pruned-backend":
                model = torch.compile(model, backend=skrr.backend(work / "plan.json"), dynamic=False)
            else:
                model = torch.compile(model, dynamic=False)

        def call():
            with torch.no_grad():
                return model(ids, attention_mask=mask).last_hidden_state.numpy()
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = call()  # includes the compilation for torch.compile
    first_s = time.perf_counter() - t1
    for _ in range(max(0, args.warmup - 1)):
        call()
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - t))
    np.save(work / f"out_{runtime}_{variant}.npy", np.asarray(out, dtype=np.float32))
    peak = _status_kib("VmHWM")
    print(json.dumps({
        "runtime": runtime, "variant": variant, "ms": times, "load_s": load_s, "first_call_s": first_s,
        "baseline_mib": baseline / 1024, "peak_mib": (peak - baseline) / 1024 if reset else float("nan"),
    }))


# ---------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------
def build(args, work: Path) -> dict:
    import torch
    import transformers

    import skrr_compile as skrr

    if args.tiny:
        cfg = transformers.T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=256, num_layers=4, num_heads=4)
    else:  # T5-base: 12 layers, d_model 768, 12 heads, relu FFN 3072, 32128 tokens (~110 M parameters)
        cfg = transformers.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                                    feed_forward_proj="relu")
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():  # norms away from exactly 1 (an exporter may fold a multiplication by ones)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.01 * torch.randn_like(p))
    graph = skrr.trace(model)
    plan = fixed_plan(graph, args.sparsity)
    pruned = skrr.apply(graph, plan)
    dense_as_pruned = skrr.apply(graph, skrr.Plan())
    model.save_pretrained(work / "dense_hf")
    skrr.save(pruned, work / "pruned")
    skrr.save(dense_as_pruned, work / "dense_skrr")
    pruned.plan.save(work / "plan.json")
    info = {
        "config": {k: getattr(cfg, k) for k in ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size")},
        "dense_params": graph.total_params,
        "pruned_params": pruned.num_params,
        "sparsity": graph.sparsity(plan),
        "skip": list(plan.skip),
        "reuse": plan.reuse,
        "blocks": len(graph.blocks),
        "sizes": {
            "safetensors_dense_hf": _dir_bytes(work / "dense_hf", ".safetensors"),
            "safetensors_dense": _dir_bytes(work / "dense_skrr", ".safetensors"),
            "safetensors_pruned": _dir_bytes(work / "pruned", ".safetensors"),
            "param_bytes_dense": dense_as_pruned.num_bytes,
            "param_bytes_pruned": pruned.num_bytes,
        },
    }
    if not args.skip_onnx:
        from skrr_compile.deploy.onnx import export_onnx

        for name, m in (("dense", dense_as_pruned), ("pruned", pruned)):
            report = export_onnx(m, work / f"{name}.onnx", verify=True)
            info["sizes"][f"onnx_{name}"] = report.file_bytes
            info[f"onnx_{name}"] = {"export_s": report.export_seconds, "max_abs_err": report.verification["max_abs_err"],
                                    "weight_bytes": report.weight_bytes, "param_bytes": report.param_bytes}
    return info


def fixed_plan(graph, target: float):
    """Skip sub-blocks from the last layer down (attention, then FFN) until `target` of the parameters go;
    the deepest skipped attention re-uses the deepest kept one."""
    import skrr_compile as skrr

    order = []
    for layer in reversed(range(len(graph.blocks) // 2)):
        order += [2 * layer, 2 * layer + 1]
    skip: list[int] = []
    for i in order:
        skip.append(i)
        if graph.sparsity(skrr.Plan(skip=skip)) >= target:
            break
    kept_attn = [b.index for b in graph.blocks if b.kind == "attn" and b.index not in skip]
    skipped_attn = sorted((i for i in skip if graph.blocks[i].kind == "attn"), reverse=True)
    reuse = {skipped_attn[0]: kept_attn[-1]} if kept_attn and skipped_attn else {}
    return skrr.Plan(skip=skip, reuse=reuse, method="bench-fixed")


def _dir_bytes(d: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.name.endswith(suffix))


def run_worker(args, work: Path, runtime: str, variant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", runtime, variant, "--workdir", str(work),
           "--batch", str(args.batch), "--seq", str(args.seq), "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {runtime}/{variant} failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    result = json.loads(line)
    result["wall_s"] = time.perf_counter() - t
    print(f"  {runtime:<8} {variant:<15} median {statistics.median(result['ms']):9.1f} ms  "
          f"peak {result['peak_mib']:8.1f} MiB  first call {result['first_call_s']:6.1f} s", flush=True)
    return result


def _fmt_ratio(a: float, b: float) -> str:
    return f"{b / a:6.3f}" if a else "   n/a"


def report_text(args, info: dict, results: dict, errors: dict, load: tuple) -> str:
    cfg = info["config"]
    med = {k: statistics.median(v["ms"]) for k, v in results.items()}
    lines = [
        "skrr-compile inference benchmark (bench/bench_inference.py)",
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch threads {args.threads}; "
        f"load average at start {load[0]:.2f}, at end {load[1]:.2f} (the machine is shared: other jobs ran too)",
        f"encoder: T5-base-shaped (d_model {cfg['d_model']}, {cfg['num_layers']} layers, {cfg['num_heads']} heads, "
        f"FFN {cfg['d_ff']}, vocab {cfg['vocab_size']}), random weights, fp32",
        f"plan: skip {len(info['skip'])} of {info['blocks']} sub-blocks {info['skip']}, re-use {info['reuse']} -> "
        f"{info['pruned_params']:,} of {info['dense_params']:,} params kept ({100 * info['sparsity']:.1f}% removed)",
        f"input: batch {args.batch} x {args.seq} tokens; {args.warmup} warm-up + {args.runs} timed calls, "
        "median (min-max); peak = resident high-water mark of the worker process minus its baseline after imports",
        "",
        f"{'runtime':<34} {'dense ms':>18} {'pruned ms':>18} {'pruned/dense':>12} {'dense MiB':>10} {'pruned MiB':>10} {'ratio':>7}",
    ]
    rows = [("torch eager", "eager", "dense", "pruned"),
            ("torch.compile(PrunedEncoder)", "compile", "dense", "pruned"),
            ("torch.compile(dense, skrr.backend)", "compile", "dense", "pruned-backend"),
            ("onnxruntime (CPU EP)", "onnx", "dense", "pruned")]
    for label, runtime, dv, pv in rows:
        d, p = results.get((runtime, dv)), results.get((runtime, pv))
        if d is None or p is None:
            continue

        def span(r):
            return f"{statistics.median(r['ms']):7.1f} ({min(r['ms']):.0f}-{max(r['ms']):.0f})"

        lines.append(
            f"{label:<34} {span(d):>18} {span(p):>18} {_fmt_ratio(med[(runtime, dv)], med[(runtime, pv)]):>12} "
            f"{d['peak_mib']:10.1f} {p['peak_mib']:10.1f} {_fmt_ratio(d['peak_mib'], p['peak_mib']):>7}"
        )
    comp = [(k, v["first_call_s"]) for k, v in results.items() if k[0] == "compile"]
    if comp:
        lines.append("first call incl. compilation: " + ", ".join(f"{v} {s:.1f} s" for (_, v), s in comp))
    if ("eager", "dense") in med and ("onnx", "pruned") in med:
        lines.append(f"pruned onnxruntime vs dense torch eager: {med[('onnx', 'pruned')] / med[('eager', 'dense')]:.3f}x latency")
    s = info["sizes"]
    lines += ["", "files (bytes)                       dense        pruned   pruned/dense"]
    lines.append(f"safetensors (skrr.save)      {s['safetensors_dense']:>12,} {s['safetensors_pruned']:>13,} "
                 f"{s['safetensors_pruned'] / s['safetensors_dense']:>10.3f}   (HF save_pretrained dense: {s['safetensors_dense_hf']:,})")
    lines.append(f"unique parameter bytes       {s['param_bytes_dense']:>12,} {s['param_bytes_pruned']:>13,} "
                 f"{s['param_bytes_pruned'] / s['param_bytes_dense']:>10.3f}")
    if "onnx_dense" in s:
        lines.append(f"onnx file                    {s['onnx_dense']:>12,} {s['onnx_pruned']:>13,} "
                     f"{s['onnx_pruned'] / s['onnx_dense']:>10.3f}   (file / unique param bytes: dense "
                     f"{s['onnx_dense'] / s['param_bytes_dense']:.4f}, pruned {s['onnx_pruned'] / s['param_bytes_pruned']:.4f})")
        lines.append(f"onnx export: dense {info['onnx_dense']['export_s']:.1f} s, pruned {info['onnx_pruned']['export_s']:.1f} s; "
                     f"--verify max |ORT - torch| dense {info['onnx_dense']['max_abs_err']:.2e}, pruned {info['onnx_pruned']['max_abs_err']:.2e}")
    if errors:
        lines += ["", "agreement of the runtimes on the benchmark input (max |a - b| of last_hidden_state):"]
        lines += [f"  {k}: {v:.2e}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--tiny", action="store_true", help="a 4-layer d_model 64 T5 (smoke run)")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--workdir", default=None, help="keep the models here (default: a temporary directory)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "inference_cpu.txt"))
    p.add_argument("--worker", nargs=2, metavar=("RUNTIME", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import numpy as np

    load_start = os.getloadavg()[0]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="skrr_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        info = build(args, work)
        print(f"built and exported in {time.perf_counter() - t:.1f} s: {100 * info['sparsity']:.1f}% removed, "
              f"skip {info['skip']} reuse {info['reuse']}", flush=True)
        jobs = [("eager", "dense"), ("eager", "pruned")]
        if not args.skip_onnx:
            jobs += [("onnx", "dense"), ("onnx", "pruned")]
        if not args.skip_compile:
            jobs += [("compile", "dense"), ("compile", "pruned"), ("compile", "pruned-backend")]
        results = {job: run_worker(args, work, *job) for job in jobs}
        outs = {job: np.load(work / f"out_{job[0]}_{job[1]}.npy") for job in jobs}
        errors = {}
        for job in jobs:
            ref = ("eager", "dense") if job[1] == "dense" else ("eager", "pruned")
            if job != ref:
                errors[f"{job[0]} {job[1]} vs eager {ref[1]}"] = float(np.abs(outs[job] - outs[ref]).max())
        errors["eager pruned vs eager dense (the plan's effect)"] = float(
            np.abs(outs[("eager", "pruned")] - outs[("eager", "dense")]).max())
        text = report_text(args, info, results, errors, (load_start, os.getloadavg()[0]))
        print()
        print(text)
        if not args.tiny:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(f"written to {args.out}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
