"""Magnitude pruning in place (prune / magnitude_prune) and the hybrid with a Skrr plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from skrr_compile.core.encoder import PrunedEncoder, apply
from skrr_compile.core.plan import Plan
from skrr_compile.magnitude.config import MagnitudeConfig
from skrr_compile.magnitude.layers import (
    Layer,
    SparsityReport,
    _graph_module,
    _zeros,
    measure_sparsity,
    select_layers,
)
from skrr_compile.magnitude.masks import check_nm_shape, global_masks, magnitude_mask, nm_mask, rowwise_mask
from skrr_compile.magnitude.wanda import input_norms, wanda_scores
from skrr_compile.utils.tensors import bind_tensors, named_tensors

aten = torch.ops.aten


# pruning -----------------------------------------------------------------------------------------------
@dataclass
class LayerResult:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    pruned: int  # weights this call set to zero (or kept zero)
    zeros: int  # zeros in the weight afterwards

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


@dataclass
class PruneResult:
    config: MagnitudeConfig
    layers: list[LayerResult]
    sparsity: SparsityReport
    threshold: float | None = None  # the global criterion's |w| threshold
    info: dict = field(default_factory=dict)

    def to_dict(self, per_layer: bool = True) -> dict:
        d = {
            "config": self.config.to_dict(),
            "threshold": self.threshold,
            "layers_pruned": len(self.layers),
            "sparsity": self.sparsity.to_dict(),
            **self.info,
        }
        if per_layer:
            d["layers"] = [
                {"name": r.name, "kind": r.kind, "shape": list(r.shape), "params": r.params, "zeros": r.zeros}
                for r in self.layers
            ]
        return d


def compute_masks(
    model: nn.Module,
    config: MagnitudeConfig,
    calibration=None,
    norms: Mapping[str, torch.Tensor] | None = None,
    layers: Sequence[Layer] | None = None,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """The masks (True = zero) `config` gives for each selected layer, without touching the model."""
    layers = list(layers) if layers is not None else select_layers(model, config)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear{' or conv' if config.include_conv else ''} layers to prune"
            + (f" (all excluded by {list(config.exclude)})" if config.exclude else "")
        )
    nm = config.nm
    if nm is not None:  # check every shape before changing anything
        for layer in layers:
            check_nm_shape(layer.name, layer.shape, *nm)
    if config.criterion == "wanda" and norms is None:
        if calibration is None:
            raise ValueError("criterion 'wanda' needs calibration data (prompts for a text encoder, inputs for a denoiser)")
        norms = input_norms(model, layers, calibration)
    if config.criterion == "global":
        masks, threshold = global_masks([layer.weight for layer in layers], config.sparsity)
        return {layer.name: m for layer, m in zip(layers, masks)}, threshold
    out = {}
    for layer in layers:
        if config.criterion == "wanda":
            scores = wanda_scores(layer, norms[layer.name])
        else:
            scores = layer.weight.detach().abs()
        if nm is not None:
            out[layer.name] = nm_mask(scores, *nm, name=layer.name)
        elif config.criterion == "wanda" and config.wanda_group == "row":
            out[layer.name] = rowwise_mask(scores, config.sparsity)
        else:
            out[layer.name] = magnitude_mask(scores, config.sparsity)
    return out, None


@torch.no_grad()
def prune(
    model: nn.Module,
    config: MagnitudeConfig | float,
    calibration=None,
    norms: Mapping[str, torch.Tensor] | None = None,
) -> PruneResult:
    """Zero the weights `config` selects, in place; returns per-layer counts and the sparsity report.

    `model`: a HF text encoder, a diffusers denoiser (any nn.Module), or a PrunedEncoder (then only the
    weights the plan kept are pruned). `calibration` (Wanda only): a Calibration, a list of forward kwargs,
    or run(forward). `norms`: precomputed Wanda input norms (as `input_norms` returns).
    """
    if not isinstance(config, MagnitudeConfig):
        config = MagnitudeConfig(sparsity=config)
    layers = select_layers(model, config)
    masks, threshold = compute_masks(model, config, calibration, norms, layers)
    results = []
    for layer in layers:
        mask = masks[layer.name]
        layer.weight.masked_fill_(mask.to(layer.weight.device), 0)
        results.append(
            LayerResult(layer.name, layer.kind, layer.shape, layer.weight.numel(), int(mask.sum()), _zeros(layer.weight))
        )
    return PruneResult(config, results, measure_sparsity(model), threshold)


magnitude_prune = prune  # the name skrr_compile exports


def snapshot(layers: Sequence[Layer]) -> dict[str, torch.Tensor]:
    """Copies of the layers' weights, to restore with `restore` (a sweep prunes the same model many times)."""
    return {layer.name: layer.weight.detach().clone() for layer in layers}


@torch.no_grad()
def restore(layers: Sequence[Layer], saved: Mapping[str, torch.Tensor]) -> None:
    for layer in layers:
        layer.weight.copy_(saved[layer.name])


# hybrid: Skrr plan + magnitude -------------------------------------------------------------------------
def _own_weights(pruned: PrunedEncoder, names: set[str]) -> None:
    """Give the PrunedEncoder its own copies of `names` (shared tensors stay shared) so pruning them leaves the
    dense model it was made from untouched."""
    tensors = named_tensors(pruned.graph_module)
    copies: dict[int, torch.Tensor] = {}
    new = {}
    for name, t in tensors.items():
        if name in names:
            if id(t) not in copies:
                copies[id(t)] = nn.Parameter(t.detach().clone(), requires_grad=False)
            new[name] = copies[id(t)]
        else:
            new[name] = t
    bind_tensors(pruned.graph_module, new)


def hybrid(model, plan: Plan | None, config: MagnitudeConfig | float, calibration=None) -> tuple[PrunedEncoder, PruneResult]:
    """Apply a Skrr plan, then magnitude-prune the Linear weights of the kept sub-blocks (and embeddings-side
    Linears such as a pooler), on copies. The sparsity report counts each parameter once: removed by the plan,
    zero in what is kept, or neither (`SparsityReport.total`)."""
    if not isinstance(config, MagnitudeConfig):
        config = MagnitudeConfig(sparsity=config)
    if isinstance(model, PrunedEncoder) and plan is None:
        pruned = model
    else:
        pruned = apply(model, plan if plan is not None else Plan())
    layers = select_layers(pruned, config)
    _own_weights(pruned, {n for layer in layers for n in (layer.name, *layer.aliases)})
    result = prune(pruned, config, calibration)
    result.info["plan"] = {"skip": list(pruned.plan.skip), "reuse": {str(k): v for k, v in pruned.plan.reuse.items()}}
    pruned.info["magnitude"] = result.to_dict(per_layer=False)
    return pruned, result


# layouts after loading ---------------------------------------------------------------------------------
def _set_weight(model: nn.Module, layer: Layer, tensor: torch.Tensor) -> None:
    param = nn.Parameter(tensor, requires_grad=False)
    gm = _graph_module(model)
    if gm is not None:
        for name in (layer.name, *layer.aliases):
            owner_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            owner._parameters[leaf] = param
    else:
        for m in layer.modules:
            m.weight = param
    layer.weight = param
