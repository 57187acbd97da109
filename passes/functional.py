"""functional: ATen linear / embedding nodes -> torch.nn.functional calls, so tensor-subclass weights dispatch.

Quantized weights (torchao's Int8Tensor, Float8Tensor, IntxUnpackedToInt8Tensor) implement `F.linear` and
`F.embedding` through `__torch_function__`; the traced graph calls `aten.linear.default` (composite: it
decomposes to `aten.t` + `aten.addmm` before the subclass sees it) and `aten.embedding.default`. For plain
tensors `F.linear` / `F.embedding` call exactly those ATen ops, so the rewrite changes no value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

_LINEAR = torch.ops.aten.linear.default
_EMBEDDING = torch.ops.aten.embedding.default


@dataclass
class FunctionalResult:
    graph_module: fx.GraphModule
    linear: int  # nodes rewritten
    embedding: int


def to_functional(gm: fx.GraphModule) -> FunctionalResult:
    """In place: every `aten.linear(x, w, b)` -> `F.linear(x, w, b)`, `aten.embedding(w, ids, pad, ...)` ->
    `F.embedding(ids, w)` (padding_idx only matters for gradients). Returns how many nodes changed."""
    linear = embedding = 0
    for mod in gm.modules():  # nested graphs too
        if not isinstance(mod, fx.GraphModule):
            continue
        for node in list(mod.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is _LINEAR:
                node.target = F.linear
                linear += 1
            elif node.target is _EMBEDDING:
                weight, ids = node.args[0], node.args[1]
                node.target = F.embedding
                node.args, node.kwargs = (ids, weight), {}
                embedding += 1
        mod.recompile()
    return FunctionalResult(gm, linear, embedding)


def weight_uses(gm: fx.GraphModule) -> dict[str, set[str]]:
    """get_attr target -> how the graph reads it: "linear" (a weight of F.linear / aten.linear), "embedding"
    (the table of F.embedding / aten.embedding) or "other" (anything else, e.g. a bias, a norm, a matmul)."""
    uses: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        kinds = uses.setdefault(node.target, set())
        for user in node.users:
            if user.target in (_LINEAR, F.linear) and len(user.args) > 1 and user.args[1] is node \
                    and user.args[0] is not node:
                kinds.add("linear")
            elif user.target is _EMBEDDING and user.args[0] is node:
                kinds.add("embedding")
            elif user.target is F.embedding and len(user.args) > 1 and user.args[1] is node:
                kinds.add("embedding")
            else:
                kinds.add("other")
    return uses
