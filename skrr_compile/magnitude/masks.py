"""Pruning masks from scores: per matrix, per row, global threshold, N:M."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from skrr_compile.magnitude.config import SemiStructuredShapeError

aten = torch.ops.aten


# masks (True = set to zero) ----------------------------------------------------------------------------
def n_pruned(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity prunes: round(s * n), half up, so within half a weight."""
    return min(numel, int(math.floor(sparsity * numel + 0.5)))


def _smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest entries (1 <= k <= cols) of each row of a 2-D `scores`; ties: lower column first.

    The row's threshold is its k-th smallest score (the largest of the k smallest, from topk); entries below it
    are taken, then entries equal to it from the left until the row has exactly k.
    """
    thresholds = torch.topk(scores, k, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    less = scores < thresholds
    eq = scores == thresholds
    need = k - less.sum(dim=1, keepdim=True)
    return less | (eq & (eq.cumsum(dim=1) <= need))


def magnitude_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly round(s * n) entries of smallest score (ties: lower flat index first)."""
    flat = scores.reshape(1, -1)
    k = n_pruned(flat.numel(), sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return _smallest_k(flat, k).view(scores.shape)


def rowwise_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune round(s * cols) entries of smallest score in each output row (Wanda's comparison group)."""
    s2 = scores.reshape(scores.shape[0], -1)
    k = n_pruned(s2.shape[1], sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return _smallest_k(s2, k).view(scores.shape)


def check_nm_shape(name: str, shape: tuple[int, ...], n: int, m: int) -> None:
    rows = shape[0] if shape else 0
    cols = math.prod(shape) // rows if rows else 0
    if not rows or cols % m:
        raise SemiStructuredShapeError(
            f"{name}: shape {shape} cannot take a {n}:{m} pattern: its input dimension ({cols} weights per "
            f"output row) is not a multiple of {m}; exclude this layer (--exclude) or prune it unstructured"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Keep the n largest scores of every m consecutive entries along the input dimension."""
    check_nm_shape(name, tuple(scores.shape), n, m)
    rows = scores.shape[0]
    cols = scores.numel() // rows
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, torch.argsort(groups, dim=-1, stable=True)[..., : m - n], True)
    return mask.view(scores.shape)


def _abs_bits(t: torch.Tensor) -> torch.Tensor:
    """|t| as float32 bit patterns (int32): for non-negative floats, integer order = float order."""
    return t.detach().abs().float().reshape(-1).view(torch.int32)


def kth_smallest_abs(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The k-th smallest |w| (1-based) over all `tensors`, exactly, without concatenating them.

    Two-pass radix select on the float32 bit patterns: a 2^16-bin histogram of the high half-words locates the
    bucket of the k-th value, a second histogram of the low half-words inside that bucket pins it down.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    device = tensors[0].device
    hist = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for t in tensors:
        hist += torch.bincount(_abs_bits(t) >> 16, minlength=1 << 16)
    cum = hist.cumsum(0)
    hi = int(torch.searchsorted(cum, torch.tensor(k, device=device)))
    before = int(cum[hi - 1]) if hi else 0
    hist_lo = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for t in tensors:
        bits = _abs_bits(t)
        hist_lo += torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo = int(torch.searchsorted(hist_lo.cumsum(0), torch.tensor(k - before, device=device)))
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32))


def global_masks(weights: Sequence[torch.Tensor], sparsity: float) -> tuple[list[torch.Tensor], float | None]:
    """Masks pruning exactly round(s * N) weights of smallest |w| over all `weights`, and the threshold.

    Everything below the threshold (the k-th smallest |w|) is pruned; entries equal to it are pruned in order
    (tensor order, then flat index) until k are.
    """
    total = sum(w.numel() for w in weights)
    k = n_pruned(total, sparsity)
    if k == 0:
        return [torch.zeros_like(w, dtype=torch.bool) for w in weights], None
    threshold = kth_smallest_abs(weights, k)
    masks = [w.detach().abs().float() < threshold for w in weights]
    remaining = k - sum(int(m.sum()) for m in masks)
    for w, m in zip(weights, masks):
        if remaining <= 0:
            break
        eq = (w.detach().abs().float() == threshold).reshape(-1).nonzero().squeeze(1)[:remaining]
        m.view(-1)[eq] = True
        remaining -= eq.numel()
    return masks, threshold
