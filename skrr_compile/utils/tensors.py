"""Tensor accounting and binding for graph modules: counts, bytes, named tensors, device constants."""

from __future__ import annotations

import torch
from torch import fx, nn

from skrr_compile.passes.graph_utils import unique_tensors


def param_numel(module: nn.Module) -> int:
    return sum(t.numel() for t in unique_tensors(module.parameters()))


def param_bytes(module: nn.Module) -> int:
    return sum(tensor_nbytes(t) for t in unique_tensors(module.parameters()))


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (a quantized weight) counts its inner tensors (values, scales,
    zero points), not the logical dtype's size."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def retarget_devices(gm: fx.GraphModule, device: torch.device) -> None:
    """Point device constants baked into the graph at trace time (arange(device=...), .to(device)) to `device`."""

    def fix(a):
        if isinstance(a, torch.device):
            return device
        if isinstance(a, (list, tuple)):
            return type(a)(fix(x) for x in a)
        if isinstance(a, dict):
            return {k: fix(v) for k, v in a.items()}
        return a

    for mod in gm.modules():  # nested graphs too (autocast / grad-mode regions become submodules)
        if isinstance(mod, fx.GraphModule):
            for node in mod.graph.nodes:
                node.args, node.kwargs = fix(node.args), fix(node.kwargs)
            mod.recompile()


def named_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor a get_attr node reads, by name (tied/shared names map to the same tensor)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor):
                out[node.target] = obj
    return out


def bind_tensors(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the (meta) tensors `gm` reads by `tensors`, keeping parameters as parameters."""
    needed = set(named_tensors(gm))
    missing = sorted(needed - set(tensors))
    if missing:
        raise ValueError(f"weights missing for {len(missing)} tensors, e.g. {missing[:5]}")
    wrapped: dict[int, torch.Tensor] = {}
    for name in needed:
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        t = tensors[name]
        if leaf in owner._parameters:
            key = id(t)
            if key not in wrapped:  # one Parameter per tensor: shared weights stay shared
                wrapped[key] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
            owner._parameters[leaf] = wrapped[key]
        elif leaf in owner._buffers:
            owner._buffers[leaf] = t
        else:
            setattr(owner, leaf, t)
