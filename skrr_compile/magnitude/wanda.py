"""Wanda calibration: input-feature norms recorded by hooks over calibration prompts (padding masked)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx, nn

from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.magnitude.layers import Layer, _graph_module

aten = torch.ops.aten


# Wanda activations -------------------------------------------------------------------------------------
_TOKEN_MASK: list[torch.Tensor | None] = [None]


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None):
    """While active, Linear inputs shaped [batch, tokens, ...] count only the tokens where `mask` is True."""
    _TOKEN_MASK.append(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.pop()


def _accumulate(sums: dict, name: str, kind: str, x: torch.Tensor) -> None:
    x = x.detach()
    if kind == "linear":
        mask = _TOKEN_MASK[-1]
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device).bool()]
        sq = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
    else:  # conv: [batch, channels, *spatial]
        sq = x.float().pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1)
    sums[name] = sq if name not in sums else sums[name] + sq


def _record_input(x: torch.Tensor, name: str, kind: str) -> None:
    _accumulate(_RECORDING[-1], name, kind, x)


_RECORDING: list[dict] = []


def input_norms(model: nn.Module, layers: Sequence[Layer], run: Callable[[Callable], None]) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature / channel of each layer over the calibration data.

    `run(forward)` must call `forward(*args, **kwargs)` on each calibration batch (inside `token_mask(...)` to
    exclude padding); `forward` is the model itself, or for a graph module a copy with recording nodes.
    """
    sums: dict[str, torch.Tensor] = {}
    gm = _graph_module(model)
    if gm is not None:
        rec = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        for key in ("_in_spec", "_out_spec"):
            if hasattr(gm, key):
                setattr(rec, key, getattr(gm, key))
        by_name = {node.name: layer for layer in layers for node in layer.nodes}
        for node in list(rec.graph.nodes):
            if node.op == "call_function" and node.name in by_name:
                layer = by_name[node.name]
                with rec.graph.inserting_before(node):
                    rec.graph.call_function(_record_input, (node.args[0], layer.name, layer.kind))
        rec.recompile()

        def forward(input_ids, attention_mask=None, **_):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            return rec(input_ids, attention_mask=attention_mask.to(input_ids.dtype))

        _RECORDING.append(sums)
        try:
            with torch.no_grad():
                run(forward)
        finally:
            _RECORDING.pop()
    else:
        handles = []
        for layer in layers:
            def hook(mod, args, _layer=layer):
                _accumulate(sums, _layer.name, _layer.kind, args[0])

            handles += [m.register_forward_pre_hook(hook) for m in layer.modules]
        try:
            with torch.no_grad():
                run(model)
        finally:
            for h in handles:
                h.remove()
    missing = [layer.name for layer in layers if layer.name not in sums]
    if missing:
        raise ValueError(f"the calibration run never reached {len(missing)} layers, e.g. {missing[:3]}")
    return {name: s.sqrt() for name, s in sums.items()}


def calibration_runner(calibration) -> Callable[[Callable], None]:
    """`run(forward)` for `input_norms` from a Calibration (text encoders) or a list of kwargs (denoisers)."""
    if callable(calibration) and not isinstance(calibration, (Calibration, Sequence)):
        return calibration
    if isinstance(calibration, Calibration):

        def run(forward):
            for ids, mask in calibration.chunks:
                with token_mask(calibration.read_mask(mask)):
                    forward(ids, attention_mask=mask)

        return run
    if isinstance(calibration, Sequence) and all(isinstance(x, Mapping) for x in calibration):

        def run(forward):
            for kwargs in calibration:
                forward(**kwargs)

        return run
    raise TypeError(
        "Wanda needs calibration data: a Calibration (tokenized prompts), a list of forward kwargs, "
        f"or a function run(forward); got {type(calibration).__name__}"
    )


def wanda_scores(layer: Layer, norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j|| broadcast over the input dimension (input channels for a convolution)."""
    w = layer.weight.detach().abs().float()
    if layer.kind == "linear":
        return w * norm.to(w.device).view(1, -1)
    if layer.groups != 1:
        raise ValueError(f"{layer.name}: Wanda on a grouped convolution (groups={layer.groups}) is not supported")
    return w * norm.to(w.device).view(1, -1, *([1] * (w.dim() - 2)))
