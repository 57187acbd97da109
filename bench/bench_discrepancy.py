"""Benchmark of the discrepancy kernels: batched masked MSE and fused projection + MSE.

Providers: torch-eager (the plain formula: materialise everything, then reduce), skrr-torch (the kernels'
torch reference: what the dispatcher runs on CPU), torch.compile (of the plain formula) and triton.
Shapes come from real encoders: T5-XXL (L=300, D=4096, PixArt projection 4096 -> 1152 -> 1152) and
CLIP-L (L=77, D=768). Prints time, achieved GB/s over the ideal traffic and, on a GPU, the fraction of
the device's peak memory bandwidth (and TFLOP/s for the projection). The accuracy column is the largest
relative error of candidate 0's sums against the fp64 reference of tests/kernels_reference.py.

    python bench/bench_discrepancy.py              # GPU if present, else CPU with smaller C/B
    python bench/bench_discrepancy.py --interpret  # CPU: also run Triton under the interpreter, tiny shape
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--candidates", type=int, default=None, help="C (overrides the per-shape default)")
    parser.add_argument("--prompts", type=int, default=None, help="B (overrides the per-shape default)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions on CPU (default 5)")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="CPU: run the Triton kernels under the interpreter on a tiny shape",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--output", default=None, help="also write the printed report to this file")
    parser.add_argument(
        "--peak-gbps", type=float, default=None, help="device peak memory bandwidth (GB/s) if not detected"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak dense 16-bit TFLOP/s if not detected"
    )
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import torch  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from kernels_reference import masked_mse_sums_fp64, projected_mse_sums_fp64  # noqa: E402
from skrr_compile.kernels import ProjectionSpec, masked_mse_sums, projected_mse_sums  # noqa: E402
from skrr_compile.kernels.dispatch import triton  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense 16-bit tensor-core peaks (TFLOP/s), by device-name fragment; bandwidth comes from the device itself.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}
PEAK_GBPS_FALLBACK = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0}


@dataclass
class Case:
    kind: str  # "mse" | "projection"
    name: str
    candidates: int
    prompts: int
    length: int
    dim: int
    padded: bool = False  # realistic prompt lengths instead of all tokens
    hidden: int = 0
    out: int = 0
    tiny: bool = False  # the interpreter's shape


def default_cases(on_gpu: bool, interpret: bool) -> list[Case]:
    c_t5, b_t5, c_clip, b_clip, c_proj, b_proj = (48, 16, 48, 64, 16, 8) if on_gpu else (4, 2, 8, 8, 2, 1)
    cases = [
        Case("mse", "T5-XXL", c_t5, b_t5, 300, 4096),
        Case("mse", "T5-XXL", c_t5, b_t5, 300, 4096, padded=True),
        Case("mse", "CLIP-L", c_clip, b_clip, 77, 768),
        Case("projection", "T5-XXL -> PixArt", c_proj, b_proj, 300, 4096, hidden=1152, out=1152),
        Case("projection", "T5-XXL -> PixArt", c_proj, b_proj, 300, 4096, padded=True, hidden=1152, out=1152),
    ]
    if interpret:
        cases += [
            Case("mse", "tiny", 2, 2, 16, 64, padded=True, tiny=True),
            Case("projection", "tiny", 2, 1, 8, 64, padded=True, hidden=32, out=32, tiny=True),
        ]
    return cases


# --------------------------------------------------------------------------------------------- inputs


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape = (case.candidates, case.prompts, case.length, case.dim)
    reference = torch.randn(shape[1:], generator=gen)
    candidates = (reference + 0.3 * torch.randn(shape, generator=gen)).to(dtype)
    if case.padded:  # T5 prompts are mostly padding: 10-50 % of the 300 tokens
        lengths = torch.randint(case.length // 10, case.length // 2 + 1, (case.prompts,), generator=gen)
    else:
        lengths = torch.full((case.prompts,), case.length)
    mask = torch.arange(case.length)[None, :] < lengths[:, None]
    inputs = {"candidates": candidates.to(device), "mask": mask.to(device)}
    if case.kind == "mse":
        inputs["reference"] = reference.to(dtype).to(device)
        return inputs
    w1 = torch.randn(case.hidden, case.dim, generator=gen) / case.dim**0.5
    w2 = torch.randn(case.out, case.hidden, generator=gen) / case.hidden**0.5
    b1, b2 = 0.1 * torch.randn(case.hidden, generator=gen), 0.1 * torch.randn(case.out, generator=gen)
    spec = ProjectionSpec(
        *(t.to(dtype).to(device) for t in (w1, b1)),
        "gelu_tanh",
        w2.to(dtype).to(device),
        b2.to(dtype).to(device),
    )
    inputs["projection"] = spec
    with torch.no_grad():
        inputs["reference_projected"] = spec(reference.to(dtype).to(device))
    return inputs


def plain_masked_mse(candidates, reference, mask):
    """The eager formula: fp32 copies of everything, then reduce."""
    per_token = (candidates.float() - reference.float()).square().sum(dim=-1)
    return (per_token * mask).sum(dim=-1)


def plain_projected_mse(candidates, reference_projected, mask, w1, b1, w2, b2):
    """Projection of every token of every candidate, materialised, then the masked MSE."""
    hidden = torch.nn.functional.gelu(torch.nn.functional.linear(candidates, w1, b1), approximate="tanh")
    projected = torch.nn.functional.linear(hidden, w2, b2)
    return plain_masked_mse(projected, reference_projected, mask)


# --------------------------------------------------------------------------------------------- metrics


def ideal_bytes(case: Case, inputs: dict) -> float:
    """Bytes a perfect kernel must move: counted tokens of candidates and reference (+ weights)."""
    counted = int(inputs["mask"].sum())
    size = inputs["candidates"].element_size()
    if case.kind == "mse":
        return (case.candidates + 1) * counted * case.dim * size
    spec = inputs["projection"]
    weights = sum(t.numel() * t.element_size() for t in (spec.w1, spec.b1, spec.w2, spec.b2))
    return case.candidates * counted * case.dim * size + counted * case.out * size + weights


def useful_flops(case: Case, inputs: dict) -> float:
    counted = int(inputs["mask"].sum())
    return 2.0 * case.candidates * counted * (case.dim * case.hidden + case.hidden * case.out)


def time_call(fn, device: torch.device, reps: int) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        if triton is not None:
            from triton.testing import do_bench  # flushes L2 between runs

            return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gbps(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    return next((v for k, v in PEAK_GBPS_FALLBACK.items() if k in props.name), None)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def relative_error(sums: torch.Tensor, expected: torch.Tensor) -> float:
    got = sums.double().cpu()[0]
    return float(((got - expected[0]).abs() / expected[0].abs().clamp(min=1e-30)).max())


# --------------------------------------------------------------------------------------------- providers


def providers(case: Case, inputs: dict, device: torch.device, interpret: bool, use_compile: bool) -> dict:
    """name -> callable returning sums [C, B], or a string saying why the provider is skipped."""
    cands, mask = inputs["candidates"], inputs["mask"]
    maskf = mask.to(torch.float32)
    result: dict = {}
    if case.kind == "mse":
        ref = inputs["reference"]
        result["torch-eager"] = lambda: plain_masked_mse(cands, ref, maskf)
        result["skrr-torch"] = lambda: masked_mse_sums(cands, ref, mask, backend="torch")[0]
        compiled = torch.compile(plain_masked_mse) if use_compile else None
        result["torch.compile"] = (
            (lambda: compiled(cands, ref, maskf)) if use_compile else "skipped: --no-compile"
        )
        triton_fn = lambda: masked_mse_sums(cands, ref, mask, backend="triton")[0]  # noqa: E731
    else:
        refp, spec = inputs["reference_projected"], inputs["projection"]
        weights = (spec.w1, spec.b1, spec.w2, spec.b2)
        result["torch-eager"] = lambda: plain_projected_mse(cands, refp, maskf, *weights)
        result["skrr-torch"] = lambda: projected_mse_sums(cands, refp, mask, spec, backend="torch")[0]
        compiled = torch.compile(plain_projected_mse) if use_compile else None
        result["torch.compile"] = (
            (lambda: compiled(cands, refp, maskf, *weights)) if use_compile else "skipped: --no-compile"
        )
        triton_fn = lambda: projected_mse_sums(cands, refp, mask, spec, backend="triton")[0]  # noqa: E731
    if triton is None:
        result["triton"] = "skipped: triton not installed"
    elif device.type == "cuda" or (interpret and case.tiny):
        result["triton"] = triton_fn
    elif interpret:
        result["triton"] = "skipped: the interpreter runs only the tiny shape"
    else:
        result["triton"] = "skipped: no CUDA device"
    if case.tiny and device.type != "cuda":
        result["torch.compile"] = "skipped: tiny shape (interpreter check only)"
    return result


def run_case(case: Case, dtype, device, args, peaks, emit) -> dict[str, float]:
    """Times every provider on one case; returns name -> median seconds, and GB/s under "<name> GB/s"."""
    inputs = make_inputs(case, dtype, device)
    counted = int(inputs["mask"].sum())
    total_bytes = ideal_bytes(case, inputs)
    flops = useful_flops(case, inputs) if case.kind == "projection" else 0.0
    what = "masked MSE" if case.kind == "mse" else "projection + MSE"
    title = f"{what}  {case.name}  C={case.candidates} B={case.prompts} L={case.length} D={case.dim}"
    if case.kind == "projection":
        title += f" H={case.hidden} P={case.out} gelu_tanh"
    title += (
        f"  counted tokens {counted}/{case.prompts * case.length}, ideal traffic {total_bytes / 1e6:.1f} MB"
    )
    if flops:
        title += f", useful {flops / 1e9:.1f} GFLOP"
    emit("")
    emit(f"== {title}")
    header = f"{'provider':<14} {'time ms':>10} {'GB/s':>9} {'%peak BW':>9}"
    if flops:
        header += f" {'TFLOP/s':>8} {'%peak':>6}"
    emit(header + f" {'max rel err':>12}  notes")

    cand0 = inputs["candidates"][:1]
    if case.kind == "mse":
        expected = masked_mse_sums_fp64(cand0, inputs["reference"], inputs["mask"])[0]
    else:
        spec = inputs["projection"]
        expected = projected_mse_sums_fp64(
            cand0,
            inputs["reference_projected"],
            inputs["mask"],
            spec.w1,
            spec.b1,
            "gelu_tanh",
            spec.w2,
            spec.b2,
        )[0]
    reps = args.reps or (5 if case.kind == "mse" else 3)
    results: dict[str, float] = {}
    for name, fn in providers(case, inputs, device, args.interpret, not args.no_compile).items():
        if isinstance(fn, str):
            emit(f"{name:<14} {fn}")
            continue
        interpreted = case.tiny and name == "triton" and device.type != "cuda"
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                sums = fn()  # warm-up (and compilation)
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_call = time.perf_counter() - t0
            with torch.no_grad():
                seconds = time_call(fn, device, 1 if interpreted else reps)
        except Exception as error:  # a provider that cannot run here is reported, not fatal
            if device.type == "cuda":
                torch.cuda.empty_cache()
            emit(f"{name:<14} failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            continue
        note = f"first call (compiles) {first_call:.1f} s" if name == "torch.compile" else ""
        if interpreted:
            note = "Triton interpreter: numerics check, time meaningless"
        gbps = total_bytes / seconds / 1e9
        results[name], results[f"{name} GB/s"] = seconds, gbps
        row = f"{name:<14} {seconds * 1e3:>10.3f} {gbps:>9.2f} {_pct(gbps, peaks[0]):>9}"
        if flops:
            tflops = flops / seconds / 1e12
            row += f" {tflops:>8.3f} {_pct(tflops, peaks[1]):>6}"
        emit(row + f" {relative_error(sums, expected):>12.2e}  {note}".rstrip())
    return results


def _pct(value: float, peak: float | None) -> str:
    return f"{100 * value / peak:.1f}%" if peak else "-"


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{load}"


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if on_gpu and args.interpret:
        raise SystemExit("--interpret is for CPU runs: on a GPU the Triton kernels run natively")
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    tflops_peak = peak_tflops(device, args.peak_tflops) if dtype != torch.float32 else None
    peaks = (peak_gbps(device, args.peak_gbps), tflops_peak)
    report: list[str] = []

    def emit(line: str) -> None:
        report.append(line)
        print(line, flush=True)

    emit("skrr-compile discrepancy benchmark: " + " ".join(["python", *sys.argv]))
    emit(
        f"machine: {describe_machine(device)}; torch {torch.__version__}, "
        f"triton {triton.__version__ if triton else 'not installed'}, dtype {str(dtype).removeprefix('torch.')}"
    )
    if on_gpu:
        emit(f"peak memory bandwidth {_num(peaks[0])} GB/s, peak dense 16-bit {_num(peaks[1])} TFLOP/s")
    else:
        emit(
            "CPU run: smaller C/B than on a GPU (GPU: MSE T5 C=48 B=16, CLIP C=48 B=64; projection C=16 B=8);"
        )
        emit("no peak fractions. GPU figures are not measured by this run.")
    emit(
        "torch-eager/torch.compile reduce (and project) every token, padding too; skrr-torch and triton only"
    )
    emit("the counted ones. GB/s = ideal traffic / time; max rel err: candidate 0 against an fp64 reference.")
    results = {}
    for case in default_cases(on_gpu, args.interpret):
        if not case.tiny:
            case.candidates = args.candidates or case.candidates
            case.prompts = args.prompts or case.prompts
        results[(case.kind, case.padded, case.name)] = run_case(case, dtype, device, args, peaks, emit)
    emit("")
    for line in goal_lines(results, peaks, on_gpu):
        emit(line)
    if args.output:
        Path(args.output).write_text("\n".join(report) + "\n")


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def goal_lines(results: dict, peaks, on_gpu: bool) -> list[str]:
    """The issue's GPU goals: batched MSE >= 85% of peak bandwidth, fused projection >= 1.5x torch-eager."""
    if not on_gpu:
        return [
            "goals (H100/H200: MSE >= 85% of peak HBM bandwidth; fused projection+MSE >= 1.5x torch-eager):",
            "  not measured: no CUDA device",
        ]
    lines = []
    for (kind, padded, name), timings in results.items():
        if "triton" not in timings:
            continue
        label = f"{name}{' padded' if padded else ''}"
        if kind == "mse" and peaks[0]:
            fraction = timings["triton GB/s"] / peaks[0]
            verdict = "met" if fraction >= 0.85 else "NOT met"
            lines.append(
                f"goal MSE {label}: triton at {100 * fraction:.1f}% of peak bandwidth ({verdict}, >= 85%)"
            )
        if kind == "projection" and "torch-eager" in timings:
            speedup = timings["torch-eager"] / timings["triton"]
            verdict = "met" if speedup >= 1.5 else "NOT met"
            lines.append(f"goal projection {label}: triton {speedup:.2f}x torch-eager ({verdict}, >= 1.5x)")
    return lines


if __name__ == "__main__":
    main(ARGS)
