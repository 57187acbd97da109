"""Sparse layouts for pruned weights: torch CSR and 2:4 semi-structured."""

from __future__ import annotations

import torch
from torch import nn

from skrr_compile.core.compressed import dense_to_csr
from skrr_compile.magnitude.layers import _zeros, find_layers
from skrr_compile.magnitude.prune import _set_weight

aten = torch.ops.aten


def to_sparse_layout(model: nn.Module, min_sparsity: float = 0.5) -> list[str]:
    """Replace Linear weights at least `min_sparsity` sparse by torch sparse CSR tensors (int32 indices).

    F.linear accepts them (forward only). Memory: CSR keeps nnz * (value + 4 bytes) plus row pointers, so it
    only saves RAM above 50 % sparsity for fp32 (above 67 % for fp16); speed on CPU is usually worse than
    dense (see bench/bench_magnitude.py). Returns the converted names.
    """
    converted = []
    for layer in find_layers(model):
        w = layer.weight
        if layer.kind != "linear" or w.layout != torch.strided or w.dim() != 2 or not w.numel():
            continue
        if _zeros(w) / w.numel() >= min_sparsity:
            _set_weight(model, layer, dense_to_csr(w.detach()))
            converted.append(layer.name)
    return converted


def is_nm_sparse(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Every m consecutive weights along the input dimension hold at most n non-zeros."""
    rows = w.shape[0]
    cols = w.numel() // rows if rows else 0
    if cols % m:
        return False
    return bool(((w.detach().reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


def to_semi_structured(model: nn.Module) -> dict:
    """Convert 2:4-sparse Linear weights to torch's semi-structured sparse tensors (CUDA, fp16/bf16/int8).

    Layers that are not 2:4, or whose shape/dtype torch's kernels do not take, stay dense and are listed under
    "skipped" with the reason. Raises RuntimeError off CUDA (torch has no CPU kernels for these tensors).
    """
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    layers = [layer for layer in find_layers(model) if layer.kind == "linear"]
    if not layers or not all(layer.weight.is_cuda for layer in layers):
        dev = layers[0].weight.device if layers else "none"
        raise RuntimeError(
            f"semi-structured (2:4) sparse tensors need the model on a CUDA device; its weights are on {dev}. "
            "Load with layout='dense' (or 'sparse_csr') on CPU"
        )
    constraints = getattr(SparseSemiStructuredTensor, "_DTYPE_SHAPE_CONSTRAINTS", {})
    converted, skipped = [], {}
    for layer in layers:
        w = layer.weight.detach()
        if not is_nm_sparse(w, 2, 4):
            skipped[layer.name] = "not 2:4 sparse"
            continue
        c = constraints.get(w.dtype)
        if c is None:
            skipped[layer.name] = f"dtype {w.dtype} has no semi-structured kernel (use fp16/bf16)"
            continue
        rows_min, cols_min = c.sparse_min_rows, c.sparse_min_cols
        if w.shape[0] % rows_min or w.shape[1] % cols_min:
            skipped[layer.name] = f"shape {tuple(w.shape)}: rows must be a multiple of {rows_min}, cols of {cols_min}"
            continue
        try:
            _set_weight(model, layer, to_sparse_semi_structured(w))
        except (RuntimeError, ValueError) as e:
            skipped[layer.name] = f"torch refused: {e}"
            continue
        converted.append(layer.name)
    return {"converted": converted, "skipped": skipped}
