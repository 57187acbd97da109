"""One rank of a distributed search, for tests/test_distributed.py (env: RANK, WORLD_SIZE, MASTER_*).

    python tests/distributed_worker.py api OUT_JSON [STATE_DIR] [--resume]   # T5 with re-use, API (+ OUT.pt)
    python tests/distributed_worker.py cli ARGS...                            # the CLI (skrr_compile.cli.main)
    python tests/distributed_worker.py wanda OUT_PT                           # Wanda norms, masks, hybrid weights
    python tests/distributed_worker.py laco OUT_PT [STATE_DIR] [--resume]    # LaCo on T5, API
DISTRIBUTE=candidates|chunks, CANDIDATE_BATCH=N|auto, HEAL=lstsq|cosine: the api search's options.
SKRR_TEST_STOP_AFTER=N: Ctrl-C (KeyboardInterrupt) on every rank at the N-th selection (LaCo: N-th scored merge).
SKRR_TEST_DIE_RANK=R: rank R dies (os._exit) at the 2nd selection, or at its 1st Wanda calibration batch.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from skrr_compile.blocksearch import evaluator  # noqa: E402
from skrr_compile.blocksearch import laco as laco_module  # noqa: E402
from skrr_compile.magnitude import wanda  # noqa: E402

torch.set_num_threads(1)
rank = int(os.environ.get("RANK", "0"))
calls = {"n": 0}
real_select = evaluator.Evaluator.select


def select(self, *a, **k):
    calls["n"] += 1
    if os.environ.get("SKRR_TEST_DIE_RANK") == str(rank) and calls["n"] == 2:
        os._exit(3)
    if calls["n"] == int(os.environ.get("SKRR_TEST_STOP_AFTER", "0")):
        raise KeyboardInterrupt
    return real_select(self, *a, **k)


evaluator.Evaluator.select = select
real_batch_sums = wanda._batch_sums


def batch_sums(*a, **k):
    if os.environ.get("SKRR_TEST_DIE_RANK") == str(rank):
        os._exit(3)
    return real_batch_sums(*a, **k)


wanda._batch_sums = batch_sums
real_mean_cosine = laco_module._mean_cosine


def mean_cosine(*a, **k):
    calls["laco"] = calls.get("laco", 0) + 1
    if calls["laco"] == int(os.environ.get("SKRR_TEST_STOP_AFTER", "0")):
        raise KeyboardInterrupt
    return real_mean_cosine(*a, **k)


laco_module._mean_cosine = mean_cosine


def t5_calibration():
    from factories import inputs

    from skrr_compile.blocksearch.calibration import Calibration

    chunks = [inputs(3, 9 + i, seed=i) for i in range(5)]  # 5 chunks: shards of 3 and 2
    return Calibration(prompts=["p"] * 15, chunks=chunks, null=inputs(1, 3, seed=99, pad_last=False))


def wanda_results() -> dict:
    """Wanda on a T5 encoder (hooks), on a Skrr-pruned T5 graph (recording nodes) and on an MLP fed a list
    of forward kwargs, each calibrated on 5 / 5 / 3 batches (uneven shards over 2 ranks)."""
    from factories import FAMILIES

    from skrr_compile.core.plan import Plan
    from skrr_compile.magnitude.config import MagnitudeConfig
    from skrr_compile.magnitude.layers import select_layers
    from skrr_compile.magnitude.prune import compute_masks, hybrid

    config = MagnitudeConfig(0.5, "wanda")
    model, cal = FAMILIES["t5-gated"].make(seed=4), t5_calibration()
    out = {f"norm.{k}": v for k, v in wanda.input_norms(model, select_layers(model, config), cal).items()}
    out.update({f"mask.{k}": v for k, v in compute_masks(model, config, cal)[0].items()})
    pruned, _ = hybrid(FAMILIES["t5-gated"].make(seed=4), Plan(skip=[1], reuse={1: 3}), config, cal)
    out.update({f"hybrid.{k}": v for k, v in pruned.state_dict().items()})
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    batches = [{"input": torch.randn(4, 6)} for _ in range(3)]
    out.update({f"mlp.{k}": v for k, v in wanda.input_norms(mlp, select_layers(mlp, config), batches).items()})
    # a denoiser: Wanda on its fixed inputs (one batch each) and the noise-prediction discrepancy, sharded
    from diffusers import PixArtTransformer2DModel

    from skrr_compile.magnitude.denoiser import NoisePredictionDiscrepancy, denoiser_inputs
    from skrr_compile.magnitude.prune import prune

    torch.manual_seed(0)
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                      caption_channels=32, norm_type="ada_norm_single", num_embeds_ada_norm=1000).eval()
    inputs = denoiser_inputs(pixart, sample_size=8, timesteps=(0.9, 0.5, 0.1))
    metric = NoisePredictionDiscrepancy(pixart, inputs)
    prune(pixart, config, calibration=inputs)
    report = metric.evaluate(pixart)
    out.update({f"pixart.{k}": v for k, v in pixart.state_dict().items()})
    out["pixart_report"] = torch.tensor([report.discrepancy, report.relative_mse, report.cosine,
                                         *report.mse_per_timestep], dtype=torch.float64)
    return out


def main() -> int:
    mode = sys.argv[1]
    if mode == "cli":
        from skrr_compile.cli import main as cli_main

        return cli_main(sys.argv[2:])
    from factories import FAMILIES

    import skrr_compile as skrr

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    if mode == "wanda":
        results = wanda_results()
        if rank == 0:
            torch.save(results, sys.argv[2])
        return 0
    out, state = Path(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None)
    model = FAMILIES["t5-gated"].make(seed=4)
    if mode == "laco":  # 2 merges scored: the first accepted (cosine 0.80), the second refused (0.60)
        try:
            res = skrr.search(model, None, t5_calibration(), sparsity=0.45, method="laco", progress=False,
                              laco_params={"T": 0.7, "I": 1}, out_dir=state, resume="--resume" in sys.argv)
        except KeyboardInterrupt:
            return 130
        if rank == 0:
            torch.save({"plan": res.plan.to_json(), "log": json.dumps(res.report["laco_log"]),
                        "world": res.report["distributed"]["world_size"], "merged": res.overrides}, out)
        return 0
    try:
        batch = os.environ.get("CANDIDATE_BATCH", "1")
        res = skrr.search(model, None, t5_calibration(), sparsity=0.45, method="skrr", progress=False,
                          out_dir=state, resume="--resume" in sys.argv,
                          candidate_batch=batch if batch == "auto" else int(batch),
                          distribute=os.environ.get("DISTRIBUTE", "candidates"), heal=os.environ.get("HEAL") or None)
    except KeyboardInterrupt:
        return 130
    if rank == 0:
        out.write_text(json.dumps({"plan": res.plan.to_dict(), "discrepancy": res.report["discrepancy"],
                                   "report": res.report["calibration_report"],
                                   "distributed": res.report["distributed"], "counter": res.report["counter"],
                                   "reuse_steps": res.report.get("reuse_steps"), "heal": res.report.get("heal")}))
        torch.save(res.overrides, out.with_suffix(".pt"))
    return 0


if __name__ == "__main__":
    from skrr_compile.blocksearch.distributed import exit_rank

    code = 1
    try:
        code = main()
    except BaseException:
        import traceback

        traceback.print_exc()  # exit_rank ends the process before Python would print it
        raise
    finally:
        exit_rank(code)  # as the CLI does: a rank that finalizes the interpreter may abort (exit_rank)
    sys.exit(code)
