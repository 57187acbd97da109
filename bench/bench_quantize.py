"""Pruned and quantized in one artefact (issue 21): one table per model, every row measured end to end.

Rows: dense fp32, dense+int8, pruned (Skrr at --sparsity), pruned+int8 quantized after the search,
pruned+int8 with the embeddings quantized too, pruned+int8 of the quantization-aware search (every candidate
scored with int8 weights against the dense fp32 reference), pruned+fp8 and pruned+int4 (groups of 32; the
4-bit runtime is ONNX Runtime's MatMulNBits: torchao's CPU int4 keeps one value per int8 byte in memory).
Columns: bytes in memory (unique tensors: values, scales, zero points), on disk (safetensors of skrr.save),
in ONNX (file + external data; fp8 has no ONNX Runtime kernel), eager and torch.compile (inductor) latency of
one forward of 8 held-out prompts (median of 5, after one warm-up / the compilation), held-out D, cosine and
null-prompt norm ratio against the dense fp32 model.

    python bench/bench_quantize.py --model minilm --sparsity 0.4 --n 32 --chunk-size 1 --threads 1
    python bench/bench_quantize.py --model smollm2 --sparsity 0.4 --n 8 --max-length 32 --chunk-size 2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_search import TEMPLATES, add_setup_args, calibration, load  # noqa: E402

import skrr_compile as skrr  # noqa: E402
from skrr_compile.blocksearch.run import heldout_report, prepare_calibration, search  # noqa: E402
from skrr_compile.core.quantize import tensor_bytes  # noqa: E402
from skrr_compile.deploy.onnx import export_onnx  # noqa: E402
from skrr_compile.deploy.onnx_quant import export_quantized_onnx  # noqa: E402


def memory_bytes(m) -> int:
    seen, total = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def disk_bytes(m, tmp: Path, name: str) -> int:
    out = tmp / name
    skrr.save(m, out)
    return sum(p.stat().st_size for p in out.rglob("*.safetensors"))


def onnx_bytes(m, tmp: Path, name: str, quantized: bool) -> int | str:
    path = tmp / f"{name}.onnx"
    try:
        rep = export_quantized_onnx(m, path) if quantized else export_onnx(m, path)
    except Exception as e:  # fp8: refused with its one-line reason
        return f"- ({str(e).splitlines()[0][:60]})"
    return rep.file_bytes


def latency(m, ids, mask, compiled: bool) -> float:
    fn = torch.compile(m) if compiled else m
    with torch.no_grad():
        fn(ids, attention_mask=mask)  # warm-up (compiles)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn(ids, attention_mask=mask)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(ap, chunk_size=1)
    ap.add_argument("--heldout-limit", type=int, default=32)
    ap.add_argument("--no-compile", default="", help="rows (comma-separated names) whose compiled latency is not measured")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsity = float(args.sparsity.split(",")[0])
    model, tok, what = load(args.model)
    cal = calibration(args, tok)
    held = prepare_calibration(tok, "builtin-heldout", limit=args.heldout_limit, max_length=args.max_length,
                               chunk_size=args.chunk_size, template=TEMPLATES.get(args.model))
    import torchao

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, torchao "
          f"{torchao.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start")
    print(f"encoder: {what}; calibration: {cal.num_prompts} prompts from {args.prompts} (+ the null prompt), at most "
          f"{args.max_length} tokens, chunks of {args.chunk_size}; held-out: {held.num_prompts} builtin-heldout prompts")
    graph = skrr.trace(model)
    t0 = time.perf_counter()
    plain = search(model, tok, cal, sparsity=sparsity, progress=False, graph=graph)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    aware = search(model, tok, cal, sparsity=sparsity, progress=False, graph=graph, quantize="int8")
    t_aware = time.perf_counter() - t0
    print(f"search ({sparsity:.0%}): plain skip={list(plain.plan.skip)} reuse={dict(plain.plan.reuse)} "
          f"({t_plain:.0f} s); int8-aware skip={list(aware.plan.skip)} reuse={dict(aware.plan.reuse)} ({t_aware:.0f} s)")
    dense = skrr.apply(graph, skrr.Plan(skip=[]))
    pruned = skrr.apply(graph, plain.plan)
    aware_pruned = skrr.apply(graph, aware.plan)
    rows = [("dense fp32", dense, False), ("dense+int8", skrr.quantize(skrr.apply(graph, skrr.Plan(skip=[])), "int8"), True),
            (f"pruned {sparsity:.0%}", pruned, False),
            ("pruned+int8", skrr.quantize(skrr.apply(graph, plain.plan), "int8"), True),
            ("pruned+int8 +emb", skrr.quantize(skrr.apply(graph, plain.plan), "int8", embeddings=True), True),
            ("pruned+int8 aware", skrr.quantize(aware_pruned, "int8"), True),
            ("pruned+fp8", skrr.quantize(skrr.apply(graph, plain.plan), "fp8"), True),
            ("pruned+int4 g32", skrr.quantize(skrr.apply(graph, plain.plan), "int4", group_size=32), True)]
    ids, mask = prepare_calibration(tok, "builtin-heldout", limit=8, max_length=args.max_length, chunk_size=8,
                                    template=TEMPLATES.get(args.model)).chunks[0]
    skip_compile = set(filter(None, args.no_compile.split(",")))
    print(f"latency: one forward of {ids.shape[0]} x {ids.shape[1]} tokens\n")
    head = (f"{'row':<18} {'RAM bytes':>13} {'disk bytes':>13} {'ONNX bytes':>13} {'x dense':>7} {'eager ms':>9} "
            f"{'compiled ms':>11} {'held-out D':>11} {'cosine':>7} {'null':>6}")
    print(head)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m, quantized in rows:
            ram = memory_bytes(m)
            disk = disk_bytes(m, Path(tmp), name.replace(" ", "_").replace("%", "").replace("+", "_"))
            onnx = onnx_bytes(m, Path(tmp), name.replace(" ", "_").replace("%", "").replace("+", "_"), quantized)
            eager = latency(m, ids, mask, False)
            comp = latency(m, ids, mask, True) if name not in skip_compile else float("nan")
            rep = heldout_report(model, m, held)
            results[name] = {"ram": ram, "disk": disk, "D": rep["discrepancy"]}
            dense_ram = results["dense fp32"]["ram"]
            print(f"{name:<18} {ram:>13,} {disk:>13,} {onnx if isinstance(onnx, str) else f'{onnx:,}':>13} "
                  f"{ram / dense_ram:>6.3f}x {eager:>9.1f} {comp:>11.1f} {rep['discrepancy']:>11.5g} "
                  f"{rep['cosine']:>7.4f} {rep['null_norm_ratio']:>6.3f}", flush=True)
            del m
    d = results
    dense_ram = d["dense fp32"]["ram"]
    p, q, qe, qa = d[f"pruned {sparsity:.0%}"], d["pruned+int8"], d["pruned+int8 +emb"], d["pruned+int8 aware"]
    print("\ngoals (issue 21):")
    print(f"  pruned+int8 at {sparsity:.0%}, embeddings quantized: {qe['ram'] / dense_ram:.3f}x dense fp32 bytes "
          f"(goal <= 0.16x on SmolLM2) -> {'MET' if qe['ram'] / dense_ram <= 0.16 else 'NOT MET'}")
    print(f"  pruned+int8 at {sparsity:.0%}, embeddings fp32: {q['ram'] / dense_ram:.3f}x (goal <= 0.32x on SmolLM2) -> "
          f"{'MET' if q['ram'] / dense_ram <= 0.32 else 'NOT MET'}")
    add = q["D"] / p["D"] - 1
    print(f"  int8 adds {add:+.2%} to the pruned model's held-out D ({p['D']:.5g} -> {q['D']:.5g}; goal <= 3 %) -> "
          f"{'MET' if add <= 0.03 else 'NOT MET'}")
    print(f"  quantization-aware plan: held-out D {qa['D']:.5g} vs quantize-after {q['D']:.5g} (goal: never worse) -> "
          f"{'MET' if qa['D'] <= q['D'] else 'NOT MET'}")


if __name__ == "__main__":
    main()
