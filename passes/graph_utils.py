"""Small helpers shared by the passes: no-op detection, data-flow reachability, liveness."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import fx

aten = torch.ops.aten

# Ops that return their input unchanged in eval mode (same values, shape and dtype).
NOOP_TARGETS = {
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.detach.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten.type_as.default,
    aten.dropout.default,
}
NORM_TARGETS = {aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default}
ATTENTION_TARGETS = {
    aten.scaled_dot_product_attention.default,
    aten._softmax.default,
    aten.softmax.int,
    aten._safe_softmax.default,
}
# Nodes that only check things at run time; they carry no data and are dropped after tracing.
ASSERT_TARGETS = {aten._assert_tensor_metadata.default}


def tensor_val(node: fx.Node):
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def is_tensor_node(node) -> bool:
    return isinstance(node, fx.Node) and tensor_val(node) is not None


def carries_tensors(node) -> bool:
    """A tensor, or a multi-output op's list of tensors (aten.chunk / split / unbind, read by getitem)."""
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val)


def _is_identity_dropout(node: fx.Node) -> bool:
    """aten.dropout(x, p, train) in eval mode (train False) or with p == 0."""
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    return train is False or (isinstance(p, (int, float)) and p == 0)


def is_noop(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in NOOP_TARGETS or not node.args:
        return False
    src = node.args[0]
    if not is_tensor_node(src) or tensor_val(node) is None:
        return False
    if node.target is aten.dropout.default and not _is_identity_dropout(node):
        return False
    a, b = tensor_val(src), tensor_val(node)
    return a.dtype == b.dtype and a.shape == b.shape


def strip_noops(node: fx.Node) -> fx.Node:
    """Walk back through no-op nodes (casts to the same dtype, eval dropout, aliases) to the real value."""
    while is_noop(node):
        node = node.args[0]
    return node


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if carries_tensors(n)]


def depends_on(node: fx.Node, ancestor: fx.Node, stop: set[fx.Node] | None = None) -> bool:
    """True when `ancestor` reaches `node` through tensor data flow (shape-only edges ignored)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is ancestor:
            return True
        if n in seen or (stop and n in stop):
            continue
        seen.add(n)
        todo.extend(tensor_inputs(n))
    return False


def graph_roots(graph: fx.Graph) -> list[fx.Node]:
    """The output node and every user-less node with an effect (shape guards, runtime asserts).

    A user-less node that produces a value (a tensor, a SymInt) is pure and therefore dead.
    """
    roots = []
    for n in graph.nodes:
        effect = n.op == "call_module" or (n.op == "call_function" and n.meta.get("val") is None)
        if n.op == "output" or (effect and not n.users):
            roots.append(n)
    return roots


def live_nodes(graph: fx.Graph, redirect: Mapping[fx.Node, fx.Node] | None = None) -> set[fx.Node]:
    """Nodes reachable backwards from the roots; an input `a` read through `redirect[a]` instead.

    This simulates a rewrite (skip = the residual add read as its residual input; re-use = a parameter
    read as another one) without touching the graph.
    """
    redirect = redirect or {}
    live: set[fx.Node] = set()
    todo = graph_roots(graph)
    while todo:
        n = todo.pop()
        n = redirect.get(n, n)
        if n in live:
            continue
        live.add(n)
        todo.extend(n.all_input_nodes)
    return live


def fetch_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors deduplicated by storage (by identity on the meta device, which has no storage)."""
    seen, out = set(), []
    for t in tensors:
        subclass = type(t) not in (torch.Tensor, torch.nn.Parameter)  # e.g. quantized: no storage of its own
        key = id(t) if t.device.type == "meta" or subclass else (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out
