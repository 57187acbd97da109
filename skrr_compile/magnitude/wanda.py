"""Wanda calibration: input-feature norms recorded by hooks over calibration prompts (padding masked)."""

from __future__ import annotations

import contextlib
import copy
import functools
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


def input_norms(model: nn.Module, layers: Sequence[Layer], calibration, group=None) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature / channel of each layer over the calibration data.

    `calibration`: a Calibration (each chunk read inside `token_mask`, so padding is left out), a list of
    forward kwargs (denoisers), or one function `run(forward)` that calls `forward(*args, **kwargs)` on each
    batch; `forward` is the model itself, or for a graph module a copy with recording nodes.

    Distributed (`group`, default: the torch.distributed group when one is initialised): each rank runs its
    shard of the batches (every world-th one) in rounds of one batch per rank; each batch's squared sums
    (fp32 within the batch) are all-gathered and added in fp64 in global batch order, so every rank holds
    the very norms a single process computes. A `run` function is one batch (rank 0 runs it).
    """
    from skrr_compile.blocksearch.distributed import current_group

    batches = calibration_batches(calibration)
    group = group or current_group()
    forward, detach = _recording_forward(model, layers)
    total: dict[str, torch.Tensor] = {}
    try:
        for first in range(0, len(batches), group.world):
            i = first + group.rank
            part = _batch_sums(batches[i], forward) if i < len(batches) else None
            for got in group.gather_objects(part):  # rank order = global batch order within the round
                for name, sq in (got or {}).items():
                    total[name] = sq.double() if name not in total else total[name] + sq.double()
    finally:
        detach()
    missing = [layer.name for layer in layers if layer.name not in total]
    if missing:
        raise ValueError(f"the calibration run never reached {len(missing)} layers, e.g. {missing[:3]}")
    return {name: s.sqrt().float() for name, s in total.items()}


def _batch_sums(batch: Callable, forward: Callable) -> dict[str, torch.Tensor]:
    """Squared input sums of every layer over one calibration batch (on the host, ready to be gathered)."""
    sums: dict[str, torch.Tensor] = {}
    _RECORDING.append(sums)
    try:
        with torch.no_grad():
            batch(forward)
    finally:
        _RECORDING.pop()
    return {name: s.cpu() for name, s in sums.items()}


def _recording_forward(model: nn.Module, layers: Sequence[Layer]) -> tuple[Callable, Callable[[], None]]:
    """(forward that records every layer's input into _RECORDING[-1], a function that removes the recording)."""
    gm = _graph_module(model)
    if gm is None:
        handles = []
        for layer in layers:
            def hook(mod, args, _layer=layer):
                _record_input(args[0], _layer.name, _layer.kind)

            handles += [m.register_forward_pre_hook(hook) for m in layer.modules]
        return model, lambda: [h.remove() for h in handles]
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

    return forward, lambda: None


def calibration_batches(calibration) -> list[Callable[[Callable], None]]:
    """The calibration data as independent batches, each `batch(forward)`: one per chunk of a Calibration
    (text encoders; padding masked), one per kwargs of a list (denoisers), or a function run(forward) whole."""
    if callable(calibration) and not isinstance(calibration, (Calibration, Sequence)):
        return [calibration]
    if isinstance(calibration, Calibration):

        def chunk(forward, ids, mask):
            with token_mask(calibration.read_mask(mask)):
                forward(ids, attention_mask=mask)

        return [functools.partial(chunk, ids=ids, mask=mask) for ids, mask in calibration.chunks]
    if isinstance(calibration, Sequence) and calibration and all(isinstance(x, Mapping) for x in calibration):
        return [lambda forward, _kw=kwargs: forward(**_kw) for kwargs in calibration]
    raise TypeError(
        "Wanda needs calibration data: a Calibration (tokenized prompts), a non-empty list of forward kwargs, "
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
