"""Transform pass for healing: find a sub-block's output projection (and any post-LN norms), merge a map into it.

Healing (skrr_compile/blocksearch/heal.py) replaces a run of skipped sub-blocks by a d x d map T applied to
the output f of the last kept sub-block's output projection, merged into that projection's weights:
`f T = x (W^T T) + b T`, so W <- T^T W and b <- T^T b (linear layout [out, in]). The healed model has exactly
the parameters of the pruned one. Everything here is found from the graph, never from module names:
  * the output projection of sub-block i is the Linear (aten.linear, or addmm / mm / matmul with a weight
    `get_attr`) whose output reaches i's residual add through no-ops only (eval dropout, same-dtype casts),
    or through one RMS norm (Gemma-2/3's sandwich norm: the add reads norm(f), `OutputProjection.post_norm`):
    a scale-invariant norm keeps the map's direction, so the fit targets its pre-image at f's own scale;
    anything else between them (a LayerNorm, a scale, a gate) makes the map non-linear in f: unsupported;
  * post-LN norms: the norms on the stream between i's residual add and its `stream_out` (BERT: the
    LayerNorm after each sub-block), which a skip keeps; only `aten.layer_norm` is inverted by the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .graph_utils import NORM_TARGETS, fetch_attr, is_noop, strip_noops
from .partition import CLAMP_TARGETS, SubBlock

aten = torch.ops.aten
LINEAR_TARGETS = {aten.linear.default}
MATMUL_TARGETS = {aten.addmm.default, aten.mm.default, aten.matmul.default}
TRANSPOSE_TARGETS = {aten.t.default, aten.transpose.int, aten.permute.default}


class HealUnsupported(ValueError):
    """A sub-block whose output projection cannot carry a merged map (the message says why)."""


@dataclass(frozen=True)
class OutputProjection:
    block: int
    node: str  # node name of the projection's output: f
    weight: str  # get_attr target of the weight
    bias: str | None  # get_attr target of the bias, if any
    layout: str  # "out_in": f = x W^T + b (aten.linear); "in_out": f = x W + b
    post_norm: str | None = None  # sandwich norm: the node of norm(f), what the residual add reads
    post_norm_eps: float = 0.0  # its epsilon (under the rsqrt)


@dataclass(frozen=True)
class PostNorm:
    """A norm on the stream after a sub-block's residual add (post-LN): y = LN(x) * weight + bias."""

    kind: str  # "layer_norm"
    shape: tuple[int, ...]
    weight: str | None
    bias: str | None
    eps: float


def _by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _weight_attr(node) -> tuple[str, bool] | None:
    """(get_attr target, transposed) of a weight operand: the get_attr itself or its transpose."""
    if not isinstance(node, fx.Node):
        return None
    node = strip_noops(node)
    if node.op == "get_attr":
        return node.target, False
    if node.op == "call_function" and node.target in TRANSPOSE_TARGETS and isinstance(node.args[0], fx.Node):
        src = strip_noops(node.args[0])
        if src.op == "get_attr" and getattr(fetch_attr(node.graph.owning_module, src.target), "dim", lambda: 0)() == 2:
            return src.target, True
    return None


# the ops of an RMS norm written out (HF's Gemma/Llama RMSNorm): x * rsqrt(mean(x^2) + eps) * gain
RMS_OPS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.pow.Tensor_Scalar, aten.mean.dim,
           aten.add.Tensor, aten.add.Scalar, aten.rsqrt.default, aten.mul.Tensor, aten.rms_norm.default}


def _projection_under_rms_norm(p: fx.Node) -> tuple[fx.Node, float] | None:
    """(the value normalised, eps) when `p` is an RMS norm of one tensor (written out or aten.rms_norm), else None.
    Every op between them must be a cast, x^2, a mean, + eps, rsqrt or a product with the gain parameter."""
    if p.op == "call_function" and p.target is aten.rms_norm.default:
        x = p.args[0]
        eps = p.args[3] if len(p.args) > 3 and p.args[3] is not None else 1e-6
        return (strip_noops(x), float(eps)) if isinstance(x, fx.Node) else None
    sources, eps, stack, seen, has_rsqrt = set(), None, [p], set(), False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            continue
        if n.op != "call_function" or n.target not in RMS_OPS:
            sources.add(n)
            continue
        if n.target is aten.rsqrt.default:
            has_rsqrt = True
        if n.target is aten.add.Tensor and any(isinstance(a, float) for a in n.args[:2]) \
                and any(isinstance(a, fx.Node) and a.target is aten.mean.dim for a in n.args[:2]):
            eps = next(float(a) for a in n.args[:2] if isinstance(a, float))
        stack.extend(a for a in n.args if isinstance(a, fx.Node))
    if not has_rsqrt or len(sources) != 1:
        return None
    return next(iter(sources)), (1e-6 if eps is None else eps)


def output_projection(gm: fx.GraphModule, block: SubBlock) -> OutputProjection:
    """The Linear whose output is the branch `block` adds to the stream (raises HealUnsupported)."""
    nodes = _by_name(gm)
    add, residual = nodes[block.output], nodes[block.residual]
    branch = [a for a in add.args[:2] if isinstance(a, fx.Node) and strip_noops(a) is not strip_noops(residual)]
    if len(branch) != 1:
        raise HealUnsupported(f"sub-block {block.index}: its residual add has no single branch operand")
    p = strip_noops(branch[0])
    normed = _projection_under_rms_norm(p)
    if normed is not None:  # sandwich norm: find the Linear under it, then say where norm(f) is
        try:
            inner = _linear_at(normed[0], block)
        except HealUnsupported:
            pass
        else:
            return OutputProjection(block.index, inner.node, inner.weight, inner.bias, inner.layout,
                                    post_norm=p.name, post_norm_eps=normed[1])
    return _linear_at(p, block)


def _linear_at(p: fx.Node, block: SubBlock) -> OutputProjection:
    """The OutputProjection whose output is the node `p` (raises HealUnsupported)."""
    if p.op == "call_function" and p.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) \
            and p.args and isinstance(p.args[0], fx.Node) and strip_noops(p.args[0]).target in MATMUL_TARGETS:
        p = strip_noops(p.args[0])  # addmm on the flattened tokens, viewed back to [B, L, d]
    if p.op == "call_function" and p.target in LINEAR_TARGETS:
        w = p.args[1] if len(p.args) > 1 else p.kwargs.get("weight")
        b = p.args[2] if len(p.args) > 2 else p.kwargs.get("bias")
        if isinstance(w, fx.Node) and strip_noops(w).op == "get_attr" \
                and (b is None or (isinstance(b, fx.Node) and strip_noops(b).op == "get_attr")):
            return OutputProjection(block.index, p.name, strip_noops(w).target,
                                    strip_noops(b).target if b is not None else None, "out_in")
    if p.op == "call_function" and p.target in MATMUL_TARGETS:
        if p.target is aten.addmm.default:
            bias, w = p.args[0], p.args[2]
        else:
            bias, w = None, p.args[1]
        found = _weight_attr(w)
        if found is not None and (bias is None or strip_noops(bias).op == "get_attr"):
            target, transposed = found
            return OutputProjection(block.index, p.name, target, strip_noops(bias).target if bias is not None else None,
                                    "out_in" if transposed else "in_out")
    what = p.target if p.op == "call_function" else p.op
    raise HealUnsupported(
        f"sub-block {block.index} ({block.path}, {block.kind}): its branch does not end in a Linear with a weight "
        f"parameter (found {what} before the residual add, e.g. a LayerNorm or a scale after the output "
        "projection), so a map cannot be merged into it"
    )


def post_norms(gm: fx.GraphModule, block: SubBlock) -> tuple[PostNorm, ...]:
    """The norms a skip of `block` keeps on the stream (post-LN), in order; () for pre-LN sub-blocks."""
    nodes = _by_name(gm)
    add, end = nodes[block.output], nodes[block.stream_out]
    chain, n = [], end
    while n is not add:  # walk back from stream_out to the add through no-ops, clamps and norms
        if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
            return ()  # stream_out is not reached from the add along the stream (pre-LN: the next residual)
        if n.target in NORM_TARGETS:
            chain.append(n)
        elif not (is_noop(n) or n.target in CLAMP_TARGETS):
            return ()
        n = n.args[0]
    norms = []
    for node in reversed(chain):
        if node.target is not aten.layer_norm.default:
            raise HealUnsupported(f"sub-block {block.index}: a {node.target} sits on the stream after it (post-norm); "
                                  "healing inverts only LayerNorm")
        args = list(node.args) + [None] * 5
        w, b = args[2], args[3]
        eps = args[4] if args[4] is not None else node.kwargs.get("eps", 1e-5)
        norms.append(PostNorm("layer_norm", tuple(args[1]), w.target if isinstance(w, fx.Node) else None,
                              b.target if isinstance(b, fx.Node) else None, float(eps)))
    return tuple(norms)


# --- pure functions on tensors ------------------------------------------------------------------------------
def merge_map(weight: torch.Tensor, bias: torch.Tensor | None, T: torch.Tensor,
              layout: str = "out_in") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The projection's weight and bias with the map T merged (computed in float64, stored in their dtype)."""
    Td = T.double().to(weight.device)
    w = weight.double()
    merged = (Td.T @ w) if layout == "out_in" else (w @ Td)
    b = None if bias is None else (Td.T @ bias.double()).to(bias.dtype)
    return merged.to(weight.dtype), b


def apply_norms(x: torch.Tensor, norms, tensors) -> torch.Tensor:
    """`norms` (PostNorm) applied in order to x; `tensors` maps their parameter names to values."""
    for nm in norms:
        w = tensors[nm.weight] if nm.weight else None
        b = tensors[nm.bias] if nm.bias else None
        x = torch.nn.functional.layer_norm(x, nm.shape, None if w is None else w.to(x.dtype),
                                           None if b is None else b.to(x.dtype), nm.eps)
    return x


def invert_norms(target: torch.Tensor, inputs: list[torch.Tensor], norms, tensors) -> torch.Tensor:
    """A pre-image of `target` under `norms` (applied in order), with each norm's lost per-token mean and
    scale taken from `inputs[i]`, the value that norm i normalises in the current (pruned) model."""
    x = target
    for nm, cur in zip(reversed(norms), reversed(inputs)):
        w = tensors[nm.weight].to(x.dtype) if nm.weight else 1.0
        b = tensors[nm.bias].to(x.dtype) if nm.bias else 0.0
        xhat = (x - b) / w
        mean = cur.mean(-1, keepdim=True)
        std = (cur.var(-1, unbiased=False, keepdim=True) + nm.eps).sqrt()
        x = xhat * std + mean
    return x
