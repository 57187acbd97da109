"""fp64 references for the discrepancy kernels, written independently of skrr_compile.kernels.

Used by tests/test_kernels.py and by bench/bench_discrepancy.py (accuracy column), Liger-Kernel style.
"""

from __future__ import annotations

import math

import torch


def _stack64(candidates) -> torch.Tensor:
    if isinstance(candidates, torch.Tensor):
        return candidates.double()
    return torch.stack([c.double() for c in candidates])


def _counted(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool)
    return mask.cpu() != 0


def masked_mse_sums_fp64(candidates, reference, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [C, B], counts [B]) in fp64; tokens with mask 0 are ignored even if they hold NaN."""
    cands = _stack64(candidates).cpu()
    ref = reference.double().cpu()
    _, batch, length, dim = cands.shape
    counted = _counted(mask, batch, length)
    per_token = ((cands - ref) ** 2).sum(dim=-1)  # [C, B, L]
    sums = torch.where(counted, per_token, torch.zeros((), dtype=torch.float64)).sum(dim=-1)
    counts = counted.sum(dim=-1).double() * dim
    return sums, counts


def activation_fp64(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu_tanh":
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    if activation == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if activation == "silu":
        return h / (1.0 + torch.exp(-h))
    if activation == "identity":
        return h
    raise ValueError(activation)


def projection_fp64(x, w1, b1=None, activation="identity", w2=None, b2=None) -> torch.Tensor:
    """Linear -> activation -> Linear in fp64; x is first rounded to the weights' dtype, as the kernels do."""
    h = x.to(w1.dtype).double().cpu() @ w1.double().cpu().T
    if b1 is not None:
        h = h + b1.double().cpu()
    h = activation_fp64(h, activation)
    if w2 is None:
        return h
    y = h @ w2.double().cpu().T
    return y if b2 is None else y + b2.double().cpu()


def projected_mse_sums_fp64(
    candidates, reference_projected, mask, w1, b1=None, activation="identity", w2=None, b2=None
) -> tuple[torch.Tensor, torch.Tensor]:
    projected = projection_fp64(_stack64(candidates), w1, b1, activation, w2, b2)
    return masked_mse_sums_fp64(projected, reference_projected, mask)
