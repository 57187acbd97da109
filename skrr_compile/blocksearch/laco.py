"""LaCo baseline: layer collapse by merging parameter differences into a base layer."""

from __future__ import annotations

import torch

from skrr_compile.blocksearch.evaluator import Evaluator
from skrr_compile.blocksearch.runner import Config
from skrr_compile.blocksearch.target import removed_by_skip
from skrr_compile.core.trace import EncoderGraph
from skrr_compile.passes.graph_utils import fetch_attr

LACO_DEFAULTS = {"I": 2, "M": 2, "L": 1, "H": 24, "T": 0.7}


def laco(graph: EncoderGraph, ev: Evaluator, target: int, params: dict) -> tuple[list[int], dict, list[dict]]:
    """Layer collapse: merge the parameter differences of the following layers into a base layer.

    Skrr's T2I setting: M = layers merged per step (base + M-1 following), [L, H] = 1-indexed range of the
    base layer, I = how far the base moves down after a merge, T = output-cosine threshold.
    """
    p = {**LACO_DEFAULTS, **params}
    r = ev.runner
    n_layers = len(graph.blocks) // 2
    layers_path = graph.layers_path
    gm = graph.graph_module
    names = [n for n, _ in gm.named_parameters()]
    layer_params = {
        layer: [n for n in names if n.startswith(f"{layers_path}.{layer}.")] for layer in range(n_layers)
    }
    present = list(range(n_layers))
    overrides: dict[str, torch.Tensor] = {}
    skip: set[int] = set()
    log = []
    memo: dict = {}
    base = min(int(p["H"]), n_layers) - int(p["M"])  # 0-indexed base of the first merge
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
                merged += overrides.get(other, fetch_attr(gm, other)).detach() - theta
            trial[name] = merged
        trial_skip = skip | {2 * f + s for f in following for s in (0, 1)}
        if len(trial_skip) >= len(graph.blocks):
            break
        with r.overridden(trial):
            outs, _ = ev.outputs(Config(frozenset(trial_skip)))
            cos = _mean_cosine(ev, outs)
        accepted = cos > p["T"]
        log.append({"base": base, "merged": following, "cosine": cos, "accepted": accepted})
        if accepted:
            overrides, skip = trial, trial_skip
            present = [x for x in present if x not in following]
            base -= int(p["I"])
        else:
            base -= 1
    return sorted(skip), overrides, log


def _mean_cosine(ev: Evaluator, outs) -> float:
    total, n = 0.0, 0
    for k, out in enumerate(outs):
        f = ev.disc.project(0, ev.disc.features(out)[0]).double()
        ref = ev.disc.reference[k][0].double()
        cos = torch.nn.functional.cosine_similarity(f, ref, dim=-1)
        m = ev.disc._mask_for(f, ev.disc.masks[k])
        total += float(cos[m].sum())
        n += int(m.sum())
    return total / max(n, 1)
