"""Batched masked MSE: C candidates against one reference, per-candidate per-prompt sums of squared errors.

Layers (as in Liger-Kernel): a Triton kernel (``_masked_mse_partials_kernel``), its launcher
(``masked_mse_sums_triton``), the torch reference (``masked_mse_sums_torch``) and the public wrapper
(``masked_mse_sums``) that validates inputs and dispatches. The reduction is two-stage (FlagGems style):
each program writes one fp32 partial per (candidate, prompt, token block) and a tiny second pass sums them,
so results are deterministic. Tokens whose mask is zero are never read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._inputs import Candidates, check_mask, check_reference, check_same_bld, token_index, tokens_per_prompt
from .dispatch import check_kernel_runnable, interpreter_enabled, resolve_backend, tl, triton

__all__ = ["masked_mse_sums", "masked_mse_sums_torch", "masked_mse_sums_triton"]

# Elements of one fp32 temporary in the torch reference (4 MiB: bounded memory, cache friendly).
TORCH_CHUNK_ELEMENTS = 1 << 20


def masked_mse_sums(
    candidates: torch.Tensor | Sequence[torch.Tensor],
    reference: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared errors of each candidate against ``reference``, per prompt, over counted tokens.

    candidates: [C, B, L, D] tensor or a sequence of C [B, L, D] tensors (fp32/fp16/bf16, any strides).
    reference: [B, L, D]. mask: [B, L], nonzero = token counted; None counts every token.
    backend: "torch" | "triton" | "auto" | None (None: ``SKRR_KERNELS``, else auto).
    Returns (sums [C, B] float32, counts [B] float32 = counted tokens * D); MSE = sums / counts.
    """
    op = "masked_mse_sums"
    cands = Candidates(candidates, op)
    check_reference(reference, cands, op)
    check_same_bld(reference, cands, op)
    keep = check_mask(mask, cands, op)
    counts = tokens_per_prompt(keep, cands) * cands.dim
    if resolve_backend(backend, cands.device, op) == "triton":
        return masked_mse_sums_triton(cands, reference, keep), counts
    return masked_mse_sums_torch(cands, reference, keep), counts


# --------------------------------------------------------------------------------------------- torch reference


@torch.no_grad()
def masked_mse_sums_torch(
    cands: Candidates, reference: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """Plain torch over chunks of counted tokens (views when unmasked): fp32 differences, squares and sums."""
    sums = torch.zeros(cands.count, cands.batch, dtype=torch.float32, device=cands.device)
    if cands.dim == 0:
        return sums
    tokens = token_index(keep, cands)
    tokens_per_chunk = max(1, TORCH_CHUNK_ELEMENTS // cands.dim)
    for start in range(0, tokens.count, tokens_per_chunk):
        stop = min(start + tokens_per_chunk, tokens.count)
        prompt = tokens.prompt[start:stop]
        ref32 = tokens.rows(reference, start, stop).float()
        for c, cand in enumerate(cands.items):
            # bf16/fp16 - fp32 promotes to fp32 without an extra upcast copy.
            diff = tokens.rows(cand, start, stop) - ref32
            sums[c].index_add_(0, prompt, diff.square_().sum(dim=1))
    return sums


# --------------------------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _masked_mse_partials_kernel(
        cand_ptr,
        ref_ptr,
        mask_ptr,
        partials_ptr,
        num_candidates,
        num_prompts,
        length,
        dim,
        cand_stride_c,
        cand_stride_b,
        cand_stride_l,
        cand_stride_d,
        ref_stride_b,
        ref_stride_l,
        ref_stride_d,
        mask_stride_b,
        mask_stride_l,
        HAS_MASK: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (candidate, token block, prompt); candidates vary fastest so programs running
        # together read the same reference tile (it stays in L2).
        pid = tl.program_id(0)
        num_token_blocks = tl.cdiv(length, BLOCK_L)
        cand_idx = pid % num_candidates
        rest = pid // num_candidates
        token_block = rest % num_token_blocks
        prompt = rest // num_token_blocks

        tokens = token_block * BLOCK_L + tl.arange(0, BLOCK_L)
        counted = tokens < length
        if HAS_MASK:
            flags = tl.load(mask_ptr + prompt * mask_stride_b + tokens * mask_stride_l, mask=counted, other=0)
            counted = counted & (flags != 0)

        tokens64 = tokens.to(tl.int64)
        cand_rows = (
            cand_ptr
            + cand_idx.to(tl.int64) * cand_stride_c
            + prompt.to(tl.int64) * cand_stride_b
            + tokens64[:, None] * cand_stride_l
        )
        ref_rows = ref_ptr + prompt.to(tl.int64) * ref_stride_b + tokens64[:, None] * ref_stride_l

        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for d0 in tl.range(0, dim, BLOCK_D):
            channels = d0 + tl.arange(0, BLOCK_D)
            load_mask = counted[:, None] & (channels[None, :] < dim)
            x = tl.load(cand_rows + channels[None, :] * cand_stride_d, mask=load_mask, other=0.0)
            y = tl.load(ref_rows + channels[None, :] * ref_stride_d, mask=load_mask, other=0.0)
            diff = x.to(tl.float32) - y.to(tl.float32)
            acc += diff * diff
        partial = tl.sum(tl.sum(acc, axis=1), axis=0)
        out_index = (cand_idx * num_prompts + prompt) * num_token_blocks + token_block
        tl.store(partials_ptr + out_index, partial)


def _masked_mse_config(dim: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_D, num_warps): about 4096 elements per step, BLOCK_D dividing D where possible."""
    if interpret:  # small tiles so the tests exercise several token blocks and channel steps
        return 8, min(32, triton.next_power_of_2(dim)), 1
    block_d = min(512, triton.next_power_of_2(dim))
    while block_d > 128 and dim % block_d:
        block_d //= 2
    block_l = max(1, 4096 // block_d)
    num_warps = 8 if block_l * block_d >= 4096 else 4
    return block_l, block_d, num_warps


def masked_mse_sums_triton(
    cands: Candidates, reference: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """Launch the partials kernel once for all candidates, then sum the partials."""
    if triton is None:
        raise RuntimeError("masked_mse_sums: the triton backend needs triton installed")
    x = cands.as_tensor()
    num_candidates, batch, length, dim = x.shape
    device = x.device
    check_kernel_runnable(_masked_mse_partials_kernel, device)
    block_l, block_d, num_warps = _masked_mse_config(dim, interpreter_enabled() and device.type != "cuda")
    num_token_blocks = triton.cdiv(length, block_l)
    if num_candidates * batch * num_token_blocks == 0 or dim == 0:
        return torch.zeros(num_candidates, batch, dtype=torch.float32, device=device)
    partials = torch.empty(num_candidates, batch, num_token_blocks, dtype=torch.float32, device=device)
    if keep is None:
        mask_arg, mask_strides = reference, (0, 0)  # unused pointer
    else:
        mask_arg = keep.view(torch.uint8)
        mask_strides = mask_arg.stride()
    grid = (num_candidates * num_token_blocks * batch,)
    _masked_mse_partials_kernel[grid](
        x,
        reference,
        mask_arg,
        partials,
        num_candidates,
        batch,
        length,
        dim,
        *x.stride(),
        *reference.stride(),
        *mask_strides,
        HAS_MASK=keep is not None,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return partials.sum(dim=2)
