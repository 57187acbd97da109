"""A T5-XXL-shaped search on one GPU (random init, bf16): measured peak memory against the dry-run
estimate, and time per candidate. Part of bench/gpu_check.sh; on CPU it only prints the memory plan.

    python bench/gpu_xxl_search.py [--prompts 256] [--length 256] [--sparsity 0.04]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import transformers as tf

import skrr_compile as skrr
from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.memory import padded_shapes, plan_memory
from skrr_compile.blocksearch.runner import StagedRunner

XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
           feed_forward_proj="gated-gelu")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.04, help="0.04: two or three skips on T5-XXL")
    ap.add_argument("--cache-gb", type=float, default=4.0)
    args = ap.parse_args()
    cfg = tf.T5Config(**XXL)
    with torch.device("meta"):
        meta = tf.T5EncoderModel(cfg).to(torch.bfloat16)
    dry = plan_memory(StagedRunner(skrr.trace(meta)), padded_shapes(args.prompts, args.length, args.chunk_size),
                      projection_width=1152, dtype=torch.bfloat16, cache_bytes=int(args.cache_gb * 2**30), beam=3,
                      device="cuda")
    print("\n".join(dry.lines()), flush=True)
    if not torch.cuda.is_available():
        print("no CUDA device: stopping after the memory plan")
        return 0
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.T5EncoderModel(cfg).to(torch.bfloat16).eval()
        proj = torch.nn.Sequential(torch.nn.Linear(4096, 1152), torch.nn.GELU(approximate="tanh"),
                                   torch.nn.Linear(1152, 1152)).to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    chunks = []
    for start in range(0, args.prompts, args.chunk_size):
        b = min(args.chunk_size, args.prompts - start)
        ids = torch.randint(5, 32000, (b, args.length), device="cuda", generator=g)
        chunks.append((ids, torch.ones_like(ids)))
    null = (torch.tensor([[1]], device="cuda"), torch.ones(1, 1, dtype=torch.long, device="cuda"))
    cal = Calibration(prompts=["p"] * args.prompts, chunks=chunks, null=null)
    torch.cuda.synchronize()
    t = time.perf_counter()
    res = skrr.search(model, None, cal, sparsity=args.sparsity, method="skrr-skip", projection=proj,
                      dtype="bf16", cache_gb=args.cache_gb, progress=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    c = res.report["counter"]
    peak = res.report["memory"]["measured_peak"]["bytes"]
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"plan: skip {list(res.plan.skip)} order {list(res.plan.order)} sparsity {res.report['sparsity']:.4f}")
    print(f"measured peak (torch.cuda.max_memory_allocated): {peak / 2**30:.2f} GiB; "
          f"dry-run estimate {dry.peak / 2**30:.2f} GiB; ratio {peak / dry.peak:.2f}")
    print(f"{c['candidates']} candidates, {c['abandoned']} abandoned, {c['block_evals']} sub-block evaluations "
          f"in {seconds:.0f} s: {seconds / max(1, c['candidates']):.2f} s per candidate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
