"""Analysis pass: find the MHA and FFN sub-blocks of a traced encoder from the graph itself.

A sub-block is a residual branch `h_out = h + branch(h)` inside one layer of the encoder's layer list.
Its residual add is found by data flow, not by per-model code:
  * the first add of a layer reads (through no-ops) a value made outside the layer, and its other
    operand depends on that value;
  * each later add reads the previous add, or a value reached from it through no-ops and norms
    (post-LN models such as BERT put a LayerNorm between sub-blocks).
A branch that contains attention (softmax / SDPA) is "attn", otherwise "ffn".
The parameters a sub-block owns are those that die when it alone is skipped (liveness), so shared
computations (T5's relative position bias, computed in layer 0 and read by every layer) are never owned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .graph_utils import (
    ATTENTION_TARGETS,
    NORM_TARGETS,
    depends_on,
    fetch_attr,
    is_noop,
    live_nodes,
    strip_noops,
    tensor_val,
)

aten = torch.ops.aten
META_KEY = "skrr"
CLAMP_TARGETS = {aten.clamp.Tensor, aten.clamp.default}  # HF T5 in fp16 clamps the stream between sub-blocks


class UnsupportedModelError(ValueError):
    """The model's graph does not have the structure skrr-compile can partition."""


@dataclass(frozen=True)
class SubBlock:
    index: int  # execution order; paper convention: even = MHA, odd = FFN
    kind: str  # "attn" | "ffn"
    layer: int
    path: str  # module path of the layer, e.g. "encoder.block.3"
    params: tuple[str, ...]  # parameter/buffer names this sub-block owns (dead when it alone is skipped)
    num_params: int
    residual: str  # node name of the residual input h
    output: str  # node name of the residual add h + branch(h)
    stream_out: str  # node name of the hidden state after this sub-block (after a post-LN norm, if any)

    def __repr__(self) -> str:
        return (
            f"SubBlock(index={self.index}, kind={self.kind!r}, layer={self.layer}, "
            f"params={self.num_params:,}, path={self.path!r})"
        )


@dataclass
class PartitionResult:
    graph_module: fx.GraphModule
    blocks: list[SubBlock]
    stream_in: str  # node name of the hidden state entering the first layer
    modified: bool = False  # an analysis pass only annotates node.meta


def _in_layer(node: fx.Node, layer_path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    for fqn, _cls in stack.values():
        if fqn == layer_path or fqn.startswith(layer_path + "."):
            return True
    return False


def _is_residual_add(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.add_.Tensor):
        return False
    if len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return False
    out, a, b = tensor_val(node), tensor_val(node.args[0]), tensor_val(node.args[1])
    if out is None or a is None or b is None or out.dim() < 3:
        return False
    return a.shape == out.shape and b.shape == out.shape and out.dtype.is_floating_point


def _stream_chain(start: fx.Node, within: set[fx.Node]) -> list[fx.Node]:
    """`start` and the nodes reached from it through no-ops, norms (post-LN) and clamps, in graph order."""
    chain, frontier = [start], [start]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user in within and user not in chain and user.args and user.args[0] is n:
                if is_noop(user) or user.target in NORM_TARGETS or user.target in CLAMP_TARGETS:
                    chain.append(user)
                    frontier.append(user)
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


def _get_attr_numel(gm: fx.GraphModule, targets: list[str]) -> int:
    seen, total = set(), 0
    for t in targets:
        tensor = fetch_attr(gm, t)
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def partition(gm: fx.GraphModule, layer_paths: list[str]) -> PartitionResult:
    """Find every sub-block of `gm` (a torch.export graph) in the layers named by `layer_paths`."""
    graph = gm.graph
    found: list[tuple[int, str, fx.Node, fx.Node, fx.Node]] = []  # (layer, path, residual, add, stream_out)
    stream_in = None
    for layer, path in enumerate(layer_paths):
        members = {n for n in graph.nodes if _in_layer(n, path)}
        if not members:
            raise UnsupportedModelError(f"layer {path!r} has no nodes in the traced graph")
        prev_add, chain = None, set()
        n_found = 0
        for node in graph.nodes:
            if node not in members or not _is_residual_add(node):
                continue
            a, b = node.args[0], node.args[1]
            for raw_res, branch in ((a, b), (b, a)):
                res = strip_noops(raw_res)
                ok_res = (res not in members) if prev_add is None else (res in chain)
                if ok_res and branch is not res and depends_on(branch, res):
                    if prev_add is None and layer == 0:
                        stream_in = res
                    found.append((layer, path, res, node, None))
                    n_found += 1
                    prev_add = node
                    chain = set(_stream_chain(node, members))
                    break
        if n_found == 0:
            raise UnsupportedModelError(
                f"no residual branch found in layer {path!r}; supported: pre-LN and post-LN transformer "
                "layers whose sub-blocks are `h + branch(h)`"
            )
        # The hidden state leaving the layer: the last node of the final add's chain inside the layer.
        last = found[-1]
        found[-1] = last[:4] + (_stream_chain(last[3], members)[-1],)
    # stream_out of a non-final sub-block: the residual input of the next one.
    for i in range(len(found) - 1):
        layer, path, res, add, out = found[i]
        if out is None:
            found[i] = (layer, path, res, add, found[i + 1][2])

    dense_live = live_nodes(graph)
    blocks: list[SubBlock] = []
    for index, (layer, path, res, add, out) in enumerate(found):
        dead = dense_live - live_nodes(graph, {add: res})
        kind = "attn" if any(n.op == "call_function" and n.target in ATTENTION_TARGETS for n in dead) else "ffn"
        params = sorted({n.target for n in dead if n.op == "get_attr"})
        for n in dead:
            n.meta[META_KEY] = {"block": index, "role": "branch"}
        add.meta[META_KEY] = {"block": index, "role": "residual_add"}
        blocks.append(
            SubBlock(
                index=index,
                kind=kind,
                layer=layer,
                path=path,
                params=tuple(params),
                num_params=_get_attr_numel(gm, params),
                residual=res.name,
                output=add.name,
                stream_out=out.name,
            )
        )
    kinds = [b.kind for b in blocks]
    expected = ["attn", "ffn"] * len(layer_paths)
    if kinds != expected:
        summary = ", ".join(f"{b.path}:{b.kind}" for b in blocks)
        raise UnsupportedModelError(
            f"expected one attention then one feed-forward sub-block per layer, found [{summary}]; "
            "supported layers: pre-LN (T5, UMT5, CLIP, Llama, Qwen2/3, Mistral, Phi-3, Gemma-2/3), sandwich-norm "
            "(Gemma) and post-LN (BERT, XLM-R)"
        )
    return PartitionResult(graph_module=gm, blocks=blocks, stream_in=stream_in.name)
