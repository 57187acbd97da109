"""LaCo baseline: layer collapse by merging parameter differences into a base layer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from skrr_compile.blocksearch.checkpoint import Checkpoint, read_tensors_checked, write_tensors_atomically
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import Evaluator
from skrr_compile.blocksearch.runner import Config
from skrr_compile.blocksearch.target import removed_by_skip
from skrr_compile.core.plan import Plan, PlanError
from skrr_compile.core.trace import EncoderGraph
from skrr_compile.passes.graph_utils import fetch_attr

LACO_DEFAULTS = {"I": 2, "M": 2, "L": 1, "H": 24, "T": 0.7}


def laco(graph: EncoderGraph, ev: Evaluator, target: int, params: dict,
         ckpt: Checkpoint | None = None) -> tuple[list[int], dict, list[dict]]:
    """Layer collapse: merge the parameter differences of the following layers into a base layer.

    Skrr's T2I setting: M = layers merged per step (base + M-1 following), [L, H] = 1-indexed range of the
    base layer, I = how far the base moves down after a merge, T = output-cosine threshold.
    With `ckpt`, the state (and the merged weights, in a safetensors file next to it) is written after every
    step, and a resumed search continues from the last one.

    Distributed (`ev.group`): every rank computes the same merges (elementwise arithmetic on the same
    weights: bit-identical) and scores them on its own shard of the prompt chunks; the per-chunk cosine
    sums are gathered and added in global chunk order, so every rank takes the very decisions, and
    returns the very merged weights, of one process. On resume, rank 0 reads the merged weights and
    broadcasts them.
    """
    p = {**LACO_DEFAULTS, **params}
    r = ev.runner
    n_layers = len(graph.blocks) // 2
    layers_path = graph.layers_path
    gm = graph.graph_module
    names = [n for n, _ in gm.named_parameters()]
    known = set(names)
    layer_params = {
        layer: [n for n in names if n.startswith(f"{layers_path}.{layer}.")] for layer in range(n_layers)
    }
    present = list(range(n_layers))
    overrides: dict[str, torch.Tensor] = {}
    skip: set[int] = set()
    log = []
    memo: dict = {}
    base = min(int(p["H"]), n_layers) - int(p["M"])  # 0-indexed base of the first merge
    saved = ckpt.state.get("laco") if ckpt is not None else None
    if saved:  # resume: the step after the last one written
        device = next(iter(gm.parameters())).device
        base, present, skip, log = saved["base"], list(saved["present"]), set(saved["skip"]), list(saved["log"])
        g = ev.group
        overrides = ckpt.load_tensors("laco", device) if g.is_writer else None
        overrides = {k: v.to(device) for k, v in g.broadcast_object(overrides).items()}
        if sorted(overrides) != sorted(saved["merged"]):
            raise SearchError(f"{ckpt.path}: the merged LaCo weights do not match the state; use a new --out")
    while base >= int(p["L"]) - 1 and removed_by_skip(graph, skip, memo) < target:
        if base not in present:
            base -= 1
            continue
        pos = present.index(base)
        following = present[pos + 1: pos + int(p["M"])]
        if not following:
            base -= 1
            continue
        trial = dict(overrides)
        for name in layer_params[base]:
            theta = overrides.get(name, fetch_attr(gm, name)).detach()
            merged = theta.clone()
            for f in following:
                other = name.replace(f"{layers_path}.{base}.", f"{layers_path}.{f}.", 1)
                if other not in known:  # a parameter only the base layer has (T5 block 0's position bias)
                    continue
                merged += overrides.get(other, fetch_attr(gm, other)).detach() - theta
            trial[name] = merged
        trial_skip = skip | {2 * f + s for f in following for s in (0, 1)}
        if len(trial_skip) >= len(graph.blocks):
            break
        with r.overridden(trial):
            cos = _mean_cosine(ev, Config(frozenset(trial_skip)))
        accepted = cos > p["T"]
        log.append({"base": base, "merged": following, "cosine": cos, "accepted": accepted})
        if accepted:
            overrides, skip = trial, trial_skip
            present = [x for x in present if x not in following]
            base -= int(p["I"])
        else:
            base -= 1
        if ckpt is not None:
            if accepted:
                ckpt.save_tensors("laco", overrides)
            ckpt.save(laco={"base": base, "present": present, "skip": sorted(skip), "log": log,
                            "merged": sorted(overrides)})
    return sorted(skip), overrides, log


# --- a LaCo plan carries its merged weights ---------------------------------------------------------------
MERGED_SUFFIX = ".merged.safetensors"


def save_plan(plan: Plan, overrides: dict[str, torch.Tensor], path: str | Path) -> Plan:
    """Write `plan` to `path`; a LaCo plan's merged weights go to <plan stem>.merged.safetensors next to it.

    The plan names the file and its sha256 (info["merged_weights"]), so `apply` gives the model the search
    scored, and refuses when the file is missing or another one.
    """
    path = Path(path)
    if overrides:
        weights = path.with_name(path.stem + MERGED_SUFFIX)
        digest = write_tensors_atomically(weights, overrides)
        plan = replace(plan, info={**plan.info, "merged_params": sorted(overrides),
                                   "merged_weights": {"file": weights.name, "sha256": digest}})
    plan.save(path)
    return plan


def merged_weights(plan: Plan, path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The merged weights a LaCo plan (loaded from `path`) needs; {} for other plans."""
    names = list(plan.info.get("merged_params") or ())
    if not names:
        return {}
    entry = plan.info.get("merged_weights")
    if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
        raise PlanError(
            f"{path}: this LaCo plan merges {len(names)} parameters but does not carry the merged weights; "
            "applying it would only skip the layers. Search again with this skrr-compile (it writes "
            f"<plan>{MERGED_SUFFIX}), or use the pruned model directory `prune` wrote"
        )
    weights = Path(path).parent / entry["file"]
    if not weights.is_file():
        raise PlanError(f"{path}: the merged LaCo weights {str(weights)!r} are missing; keep them next to the plan")
    try:
        tensors = read_tensors_checked(weights, entry["sha256"], device, what=str(path))
    except SearchError as e:
        raise PlanError(str(e)) from e
    if sorted(tensors) != sorted(names):
        raise PlanError(f"{weights}: holds other parameters than the plan's merged_params")
    return tensors


def _mean_cosine(ev: Evaluator, config: Config) -> float:
    """Mean output cosine to the dense reference over the read tokens of every rank's chunks: each chunk's
    sum is gathered and the sums are added in global chunk order (as one process adds them)."""
    parts = []
    for k in (c for c in ev.owned if c >= 0):  # the null prompt is not part of LaCo's criterion
        out = ev.runner.forward(config, None, None, ctx=ev.context(k))
        f = ev.disc.project(0, ev.disc.features(out)[0]).double()
        ref = ev.disc.reference[k][0].double()
        cos = torch.nn.functional.cosine_similarity(f, ref, dim=-1)
        m = ev.disc._mask_for(f, ev.disc.masks[k])
        parts.append((ev.global_id[k], float(cos[m].sum()), int(m.sum())))
        del out, f, ref, cos
    total, n = 0.0, 0
    for _, s, count in sorted(p for rank_parts in ev.group.gather_objects(parts) for p in rank_parts):
        total += s
        n += count
    return total / max(n, 1)
