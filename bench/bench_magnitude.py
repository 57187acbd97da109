"""Magnitude pruning on the real all-MiniLM-L6-v2: the sparsity sweep with its knee, and what the savings are.

    .venv/bin/python bench/bench_magnitude.py                 # both parts, into bench/results/magnitude_minilm/
    .venv/bin/python bench/bench_magnitude.py --part sweep    # only the sweep (the `skrr-compile sweep` CLI)
    .venv/bin/python bench/bench_magnitude.py --part savings  # only file size / RAM / speed

The sweep part runs exactly the CLI command it records (report.json, report.md, sweep.png, command.txt).
The savings part writes savings.json and savings.md next to it: files on disk (original checkpoint, compressed
file, and the Linear weights alone), resident memory after loading in a fresh process (VmRSS from
/proc/self/status; dense vs torch sparse CSR), and forward latency of each layout. Run the sweep first: it
replaces the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skrr_compile.blocksearch.calibration import read_prompts, tokenize  # noqa: E402
from skrr_compile.cli.main import main as cli_main  # noqa: E402
from skrr_compile.core.checkpoints import builtin_model_dir, load_encoder  # noqa: E402
from skrr_compile.core.compressed import save_tensors  # noqa: E402
from skrr_compile.magnitude.config import MagnitudeConfig  # noqa: E402
from skrr_compile.magnitude.layers import measure_sparsity  # noqa: E402
from skrr_compile.magnitude.prune import prune  # noqa: E402
from skrr_compile.magnitude.storage import SPARSE_WEIGHTS, load_pruned, save_pruned  # noqa: E402
from skrr_compile.utils.files import atomic_write_text  # noqa: E402

OUT = ROOT / "bench" / "results" / "magnitude_minilm"
PROMPTS = "../shared/data/prompts/partiprompts.tsv"


def sweep_command(out: Path, prompts: str, limit: int, sparsity: str) -> list[str]:
    return ["sweep", "builtin", "--sparsity", sparsity, "--prompts", prompts, "--limit", str(limit),
            "--criterion", "magnitude,global,wanda", "--calib-prompts", "builtin",
            "--title", "all-MiniLM-L6-v2: discrepancy vs sparsity of its Linear layers", "--out", str(out),
            "--overwrite"]


def run_sweep(out: Path, prompts: str, limit: int, sparsity: str) -> None:
    argv = sweep_command(out, prompts, limit, sparsity)
    print("skrr-compile " + shlex.join(argv), flush=True)
    t = time.perf_counter()
    rc = cli_main(argv)
    if rc:
        raise SystemExit(rc)
    print(f"sweep took {time.perf_counter() - t:.0f} s", flush=True)


RSS_CHILD = r"""
import gc, json, sys, time, torch
torch.set_num_threads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
def rss():
    return status("VmRSS")
import ctypes
import transformers  # imports first (the model class too), so they are not counted as the model's memory
from transformers import BertModel
from skrr_compile.magnitude.storage import load_pruned
from skrr_compile.core.checkpoints import load_encoder
kind, path = sys.argv[1], sys.argv[2]
trim = ctypes.CDLL("libc.so.6").malloc_trim
gc.collect(); trim(0); before = rss(); t = time.perf_counter()
if kind == "original":
    model = load_encoder(path)
else:
    model = load_pruned(path, layout=kind)
seconds = time.perf_counter() - t
gc.collect(); after = rss(); peak = status("VmHWM")
trim(0)  # hand freed heap pages back, so RSS shows what is still held
trimmed = rss()
with torch.no_grad():  # one forward touches every weight page the model uses (mapped files included)
    model(torch.tensor([[101, 1037, 2417, 4937, 2006, 1037, 2630, 3082, 102]]))
gc.collect(); trim(0); used = rss()
tensors = {id(p): p for p in list(model.parameters()) + list(model.buffers())}.values()
def nbytes(t):
    if t.layout == torch.sparse_csr:
        return sum(x.numel() * x.element_size() for x in (t.crow_indices(), t.col_indices(), t.values()))
    return t.numel() * t.element_size()
print(json.dumps({"rss_delta_bytes": after - before, "rss_delta_after_trim_bytes": trimmed - before,
                  "rss_delta_after_forward_bytes": used - before,
                  "peak_delta_bytes": peak - before, "tensor_bytes": sum(nbytes(t) for t in tensors),
                  "load_seconds": seconds}))
"""


def rss_after_loading(kind: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, kind, str(path)], capture_output=True, text=True,
                             env=env, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {
        "rss_delta_bytes": int(med("rss_delta_bytes")),
        "rss_delta_after_trim_bytes": int(med("rss_delta_after_trim_bytes")),
        "rss_delta_after_forward_bytes": int(med("rss_delta_after_forward_bytes")),
        "peak_delta_bytes": int(med("peak_delta_bytes")),
        "tensor_bytes": runs[0]["tensor_bytes"],
        "load_seconds": med("load_seconds"),
    }


def latencies_ms(models: dict, ids, mask, rounds: int = 10) -> dict:
    """Best of `rounds` forwards of each model, the models interleaved round by round, so load from other
    processes on the machine hits them alike (the minimum is the least disturbed run)."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(ids, attention_mask=mask)  # warm up
        for _ in range(rounds):
            for k, m in models.items():
                t = time.perf_counter()
                m(ids, attention_mask=mask)
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * min(v) for k, v in times.items()}


def run_savings(out: Path) -> dict:
    src = builtin_model_dir()
    original_file = (src / "model.safetensors").stat().st_size
    tokenizer_dir = src
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cal = tokenize(tok, read_prompts(ROOT / PROMPTS)[::50][:32], chunk_size=32)  # 32 prompts across categories
    ids, mask = cal.chunks[0]
    threads = torch.get_num_threads()
    results: dict = {"model": "all-MiniLM-L6-v2 (BertModel, 22.7 M params, fp32)", "original_file_bytes": original_file,
                     "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
                     "torch_threads": threads, "batch": list(ids.shape), "cases": []}
    timed = {"original": load_encoder(src)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, config, dtype in (
            ("magnitude 50 %", MagnitudeConfig(0.5), torch.float32),
            ("magnitude 70 %", MagnitudeConfig(0.7), torch.float32),
            ("global 50 %", MagnitudeConfig(0.5, "global"), torch.float32),
            ("2:4", MagnitudeConfig(pattern="2:4"), torch.float32),
            ("magnitude 50 %, fp16", MagnitudeConfig(0.5), torch.float16),
        ):
            model = load_encoder(src, dtype=dtype)
            result = prune(model, config)
            d = tmp / label.replace(" ", "_").replace("%", "").replace(":", "-").replace(",", "")
            sizes = save_pruned(d, src, {"model": model}, {"model": result.to_dict(per_layer=False)})
            file_bytes = (d / SPARSE_WEIGHTS).stat().st_size
            linear = {r.name: model.get_parameter(r.name).detach() for r in result.layers}
            from safetensors.torch import save_file

            save_file(linear, str(tmp / "lin_dense.safetensors"))
            lin_stats = save_tensors(linear, tmp / "lin_comp.safetensors")
            lin_dense = (tmp / "lin_dense.safetensors").stat().st_size
            case = {
                "case": label,
                "config": config.to_dict(),
                "sparsity_linear": result.sparsity.linear,
                "sparsity_all_params": result.sparsity.all_params,
                "dense_payload_bytes": sizes["model"]["dense_bytes"],
                "file_bytes": file_bytes,
                "file_vs_original": file_bytes / original_file,
                "file_vs_dense_payload": file_bytes / sizes["model"]["dense_bytes"],
                "linear_dense_file_bytes": lin_dense,
                "linear_compressed_file_bytes": lin_stats.file_bytes,
                "linear_file_ratio": lin_stats.file_bytes / lin_dense,
                "encodings": sizes["model"]["encodings"],
            }
            if dtype == torch.float32:
                loaded = load_pruned(d)
                assert measure_sparsity(loaded).linear == result.sparsity.linear
                sparse = load_pruned(d, layout="sparse_csr")
                timed[(label, "dense")], timed[(label, "csr")] = loaded, sparse
                case["max_abs_diff_csr_vs_dense"] = float(
                    (sparse(ids, attention_mask=mask).last_hidden_state
                     - loaded(ids, attention_mask=mask).last_hidden_state).abs().max()
                )
                case["ram_dense_layout"] = rss_after_loading("dense", d)
                case["ram_sparse_csr"] = rss_after_loading("sparse_csr", d)
            results["cases"].append(case)
            print(json.dumps({k: v for k, v in case.items() if k not in ("config", "encodings")}), flush=True)
        results["ram_original"] = rss_after_loading("original", src)
        ms = latencies_ms(timed, ids, mask)
        results["original_forward_ms"] = ms["original"]
        for case in results["cases"]:
            if (case["case"], "dense") in ms:
                case["forward_ms_dense_layout"] = ms[(case["case"], "dense")]
                case["forward_ms_sparse_csr"] = ms[(case["case"], "csr")]
        print(json.dumps({str(k): round(v, 1) for k, v in ms.items()}), flush=True)
    atomic_write_text(out / "savings.json", json.dumps(results, indent=2))
    atomic_write_text(out / "savings.md", savings_markdown(results))
    return results


def savings_markdown(r: dict) -> str:
    mb = lambda b: f"{b / 1e6:.1f}"  # noqa: E731
    lines = [
        "# Savings of magnitude pruning on all-MiniLM-L6-v2 (CPU, measured)",
        "",
        f"Command: `.venv/bin/python bench/bench_magnitude.py --part savings` ({r['torch_threads']} torch threads, "
        f"batch {r['batch'][0]} x {r['batch'][1]} tokens of PartiPrompts). Original checkpoint "
        f"{mb(r['original_file_bytes'])} MB; its forward {r['original_forward_ms']:.1f} ms (best of 10); loading "
        f"it with transformers adds {mb(r['ram_original']['rss_delta_after_trim_bytes'])} MB RSS, "
        f"{mb(r['ram_original']['rss_delta_after_forward_bytes'])} MB after one forward "
        f"({r['ram_original']['load_seconds']:.2f} s; transformers maps the file, so pages nothing has touched, "
        "such as unused embedding rows, are not resident).",
        "",
        "Only Linear weights are pruned (the study's definition); the word-embedding table (11.7 M of the 22.7 M "
        "parameters) stays dense, so the whole file cannot shrink as much as the pruned weights do.",
        "",
        "| case | Linear sparsity | all params | file MB | file / original | Linear weights file / dense |"
        " fwd dense layout ms | fwd CSR ms | tensors dense MB | tensors CSR MB | RSS dense MB | RSS CSR MB |"
        " RSS after a forward, dense / CSR MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["cases"]:
        lines.append(
            f"| {c['case']} | {100 * c['sparsity_linear']:.1f} % | {100 * c['sparsity_all_params']:.1f} % | "
            f"{mb(c['file_bytes'])} | {c['file_vs_original']:.3f} | {c['linear_file_ratio']:.3f} | "
            + (f"{c['forward_ms_dense_layout']:.1f} | {c['forward_ms_sparse_csr']:.1f} | "
               f"{mb(c['ram_dense_layout']['tensor_bytes'])} | {mb(c['ram_sparse_csr']['tensor_bytes'])} | "
               f"{mb(c['ram_dense_layout']['rss_delta_after_trim_bytes'])} | "
               f"{mb(c['ram_sparse_csr']['rss_delta_after_trim_bytes'])} | "
               f"{mb(c['ram_dense_layout']['rss_delta_after_forward_bytes'])} / "
               f"{mb(c['ram_sparse_csr']['rss_delta_after_forward_bytes'])} |"
               if "forward_ms_dense_layout" in c else "n/a | " * 7)
        )
    lines += ["", "| case | load s (dense layout) | load s (CSR) | peak RSS growth dense MB | peak RSS growth CSR MB |",
              "|---|---|---|---|---|"]
    for c in r["cases"]:
        if "ram_dense_layout" in c:
            dl, cl = c["ram_dense_layout"], c["ram_sparse_csr"]
            lines.append(f"| {c['case']} | {dl['load_seconds']:.2f} | {cl['load_seconds']:.2f} | "
                         f"{mb(dl['peak_delta_bytes'])} | {mb(cl['peak_delta_bytes'])} |")
    lines += [
        "",
        "Forward: best of 10 rounds on the batch, all models interleaved in each round (the machine is shared, "
        "so absolute times vary between runs; compare within a run). Dense layout = zeros stored as dense "
        "(no speed-up, as expected). "
        "Tensors MB: bytes the loaded model's tensors hold; RSS MB: growth of the process's resident memory "
        "from loading, after malloc_trim, and again after one short forward (fresh process, median of 3; "
        "see savings.json for the raw and peak figures and load times).",
        "The fp16 row compares with the fp32 original checkpoint (so half of its ratio is the dtype).",
        "torch sparse CSR (int32 indices) needs value + index per kept weight: it saves RAM only above 50 % "
        "sparsity for fp32, and its CPU matmul is slower than dense at these sparsities. 2:4 semi-structured "
        "kernels need CUDA (fp16/bf16); no GPU was available for this run, so they are not measured here.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "sweep", "savings"), default="all")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--prompts", default=PROMPTS, help="evaluation prompts (relative to the repo root)")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--sparsity", default="0:0.9:0.025")
    args = ap.parse_args()
    os.chdir(ROOT)
    if args.out.is_absolute() and args.out.is_relative_to(ROOT):
        args.out = args.out.relative_to(ROOT)  # the recorded command stays valid in any checkout
    if args.part in ("all", "sweep"):
        run_sweep(args.out, args.prompts, args.limit, args.sparsity)
    if args.part in ("all", "savings"):
        args.out.mkdir(parents=True, exist_ok=True)
        run_savings(args.out)


if __name__ == "__main__":
    main()
