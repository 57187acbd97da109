"""Input validation and normalisation shared by the discrepancy kernels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class TokenIndex:
    """The counted tokens of a [B, L] mask, in (prompt, position) order."""

    prompt: torch.Tensor  # [N] int64, prompt index b of each counted token
    position: torch.Tensor  # [N] int64, token position l
    length: int  # L
    all_tokens: bool  # every token is counted (no mask, or an all-nonzero one)

    @property
    def count(self) -> int:
        return int(self.prompt.numel())

    def rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """[stop - start, D] rows of counted tokens start..stop of ``x`` [B, L, D]: a view when possible."""
        if x.stride(0) == self.length * x.stride(1) or 1 in x.shape[:2]:  # (B, L) flattens to a view
            flat = x.flatten(0, 1)
            if self.all_tokens:
                return flat[start:stop]
            return flat.index_select(0, self.prompt[start:stop] * self.length + self.position[start:stop])
        return x[self.prompt[start:stop], self.position[start:stop]]


class Candidates:
    """C candidates of shape [B, L, D], given as one [C, B, L, D] tensor or a sequence of [B, L, D] tensors."""

    def __init__(self, candidates: torch.Tensor | Sequence[torch.Tensor], op: str):
        if isinstance(candidates, torch.Tensor):
            if candidates.dim() != 4:
                raise ValueError(
                    f"{op}: candidates must be a [C, B, L, D] tensor or a sequence of [B, L, D] tensors, "
                    f"got a tensor of shape {tuple(candidates.shape)}"
                )
            self.tensor: torch.Tensor | None = candidates
            self.items: list[torch.Tensor] = list(candidates.unbind(0))
            shape, dtype, device = tuple(candidates.shape[1:]), candidates.dtype, candidates.device
        else:
            self.tensor = None
            self.items = list(candidates)
            if not self.items:
                raise ValueError(f"{op}: no candidates given")
            first = self.items[0]
            for i, item in enumerate(self.items):
                if not isinstance(item, torch.Tensor) or item.dim() != 3:
                    what = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                    raise ValueError(f"{op}: candidate {i} must be a [B, L, D] tensor, got {what}")
                if item.shape != first.shape or item.dtype != first.dtype or item.device != first.device:
                    raise ValueError(
                        f"{op}: candidate {i} is {tuple(item.shape)} {item.dtype} on {item.device}, but "
                        f"candidate 0 is {tuple(first.shape)} {first.dtype} on {first.device}"
                    )
            shape, dtype, device = tuple(first.shape), first.dtype, first.device
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: candidates must be floating point, got {dtype}")
        self.count = len(self.items)
        self.batch, self.length, self.dim = shape
        self.dtype, self.device = dtype, device

    def as_tensor(self) -> torch.Tensor:
        """[C, B, L, D]: the given tensor, a zero-copy view of equally spaced list items, or a stacked copy."""
        if self.tensor is None:
            self.tensor = _view_or_stack(self.items)
        return self.tensor


def _view_or_stack(items: list[torch.Tensor]) -> torch.Tensor:
    first = items[0]
    if len(items) == 1:
        return first.unsqueeze(0)
    storage = first.untyped_storage().data_ptr()
    step = items[1].storage_offset() - first.storage_offset()
    same_layout = all(
        t.untyped_storage().data_ptr() == storage
        and t.stride() == first.stride()
        and t.storage_offset() == first.storage_offset() + i * step
        for i, t in enumerate(items)
    )
    if same_layout and step > 0:
        return first.as_strided((len(items), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(items)


def check_reference(reference: torch.Tensor, cands: Candidates, op: str, name: str = "reference") -> None:
    if not isinstance(reference, torch.Tensor) or reference.dim() != 3:
        what = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise ValueError(f"{op}: {name} must be a [B, L, D] tensor, got {what}")
    if reference.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be floating point, got {reference.dtype}")
    if reference.device != cands.device:
        raise ValueError(f"{op}: {name} is on {reference.device} but candidates are on {cands.device}")


def check_same_bld(reference: torch.Tensor, cands: Candidates, op: str) -> None:
    expected = (cands.batch, cands.length, cands.dim)
    if tuple(reference.shape) != expected:
        raise ValueError(
            f"{op}: reference has shape {tuple(reference.shape)} [B, L, D] but each candidate has shape "
            f"{expected}"
        )


def check_mask(mask: torch.Tensor | None, cands: Candidates, op: str) -> torch.Tensor | None:
    """``mask`` ([B, L], nonzero = counted) as a bool tensor; None stays None (all tokens)."""
    if mask is None:
        return None
    expected = (cands.batch, cands.length)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected:
        what = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{op}: mask must have shape [B, L] = {expected}, got {what}")
    if mask.device != cands.device:
        raise ValueError(f"{op}: mask is on {mask.device} but candidates are on {cands.device}")
    if mask.is_complex():
        raise ValueError(f"{op}: mask must be bool, integer or floating point, got {mask.dtype}")
    return mask != 0


def tokens_per_prompt(keep: torch.Tensor | None, cands: Candidates) -> torch.Tensor:
    """[B] float32 number of counted tokens of each prompt."""
    if keep is None:
        return torch.full((cands.batch,), float(cands.length), dtype=torch.float32, device=cands.device)
    return keep.sum(dim=1, dtype=torch.float32)


def token_index(keep: torch.Tensor | None, cands: Candidates) -> TokenIndex:
    """Counted tokens in (prompt, position) order (synchronises with the device once)."""
    if keep is None:
        keep = torch.ones(cands.batch, cands.length, dtype=torch.bool, device=cands.device)
    prompt, position = keep.nonzero(as_tuple=True)
    return TokenIndex(prompt, position, keep.shape[1], prompt.numel() == keep.numel())
