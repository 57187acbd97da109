"""Fused projection + MSE: the discrepancy taken after the denoiser's caption projection.

PixArt projects T5 embeddings with Linear(4096 -> 1152), GELU(tanh), Linear(1152 -> 1152). For C candidates
we need sum((proj(cand) - proj(ref))^2) per prompt, and proj(ref) is computed once by the caller.

Triton path, per chunk of rows (a row = one counted token of one candidate):
  1. ``_linear_kernel`` (gather rows, store): h = act(x @ w1^T + b1), rows gathered straight from the
     candidates through a token table, so padding tokens are never read or multiplied;
  2. ``_linear_kernel`` (MSE epilogue): y = h @ w2^T + b2 stays in registers; the epilogue subtracts the
     reference tile, squares and writes one fp32 partial per (row, output block).
The projected candidates [C, B, L, P] are never written; only the hidden activations of one chunk of rows
live in memory. Partials are summed in a second, tiny stage (deterministic, no atomics). A single Linear
(SD3/FLUX context_embedder) uses one launch with the MSE epilogue.

Numerics follow the module run in the weights' dtype: candidates are cast to the weights' dtype, matmuls
accumulate in fp32, h is stored in the weights' dtype and y is rounded to it before the subtraction (as
``module(x)`` would return it); squares and sums are fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._inputs import Candidates, check_mask, check_reference, token_index, tokens_per_prompt
from .dispatch import (
    check_kernel_runnable,
    interpreter_enabled,
    last_backend,
    record_backend,
    resolve_backend,
    tl,
    triton,
)
from .masked_mse import masked_mse_sums

__all__ = [
    "ACTIVATIONS",
    "ProjectionSpec",
    "projected_mse_sums",
    "projected_mse_sums_torch",
    "projected_mse_sums_triton",
]

ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "identity")
_TORCH_ACTIVATIONS = {
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "identity": lambda h: h,
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements of the largest temporary in the torch reference (16 MiB in fp32).
TORCH_CHUNK_ELEMENTS = 1 << 22
# Elements of the hidden-activation buffer of the Triton path (64 MiB in bf16).
TRITON_HIDDEN_ELEMENTS = 1 << 25
# Rows per chunk under the interpreter: small, so the tests cross chunk boundaries.
INTERPRET_CHUNK_ROWS = 40


@dataclass(frozen=True, eq=False)
class ProjectionSpec:
    """Linear -> activation -> Linear (or a single Linear, or identity), as plain tensors.

    w1 [H, D], b1 [H] or None, activation in ACTIVATIONS (applied after the first Linear),
    w2 [P, H] or None (None = single Linear, P = H), b2 [P] or None. ``w1=None`` is the identity
    projection (then everything else must be unset). All tensors share one dtype and device.
    """

    w1: torch.Tensor | None
    b1: torch.Tensor | None = None
    activation: str = "identity"
    w2: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    _kind: str = field(init=False, repr=False, default="")

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ProjectionSpec: activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.w1 is None:
            if (
                self.b1 is not None
                or self.w2 is not None
                or self.b2 is not None
                or self.activation != "identity"
            ):
                raise ValueError(
                    "ProjectionSpec: w1=None means the identity projection; b1, w2, b2 must be None"
                )
            object.__setattr__(self, "_kind", "identity")
            return
        tensors = {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}
        for name, t in tensors.items():
            if t is not None and not isinstance(t, torch.Tensor):
                raise ValueError(f"ProjectionSpec: {name} must be a tensor or None, got {type(t).__name__}")
        if self.w1.dim() != 2:
            raise ValueError(f"ProjectionSpec: w1 must be [H, D], got shape {tuple(self.w1.shape)}")
        hidden = self.w1.shape[0]
        if self.b1 is not None and tuple(self.b1.shape) != (hidden,):
            raise ValueError(f"ProjectionSpec: b1 must be [H] = [{hidden}], got shape {tuple(self.b1.shape)}")
        if self.w2 is None:
            if self.b2 is not None:
                raise ValueError("ProjectionSpec: b2 given without w2")
        else:
            if self.w2.dim() != 2 or self.w2.shape[1] != hidden:
                raise ValueError(
                    f"ProjectionSpec: w2 must be [P, H] with H = {hidden} (w1's rows), got shape {tuple(self.w2.shape)}"
                )
            if self.b2 is not None and tuple(self.b2.shape) != (self.w2.shape[0],):
                raise ValueError(
                    f"ProjectionSpec: b2 must be [P] = [{self.w2.shape[0]}], got shape {tuple(self.b2.shape)}"
                )
        present = {name: t for name, t in tensors.items() if t is not None}
        if self.w1.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"ProjectionSpec: weights must be fp32, fp16 or bf16, got {self.w1.dtype}")
        for name, t in present.items():
            if t.dtype != self.w1.dtype or t.device != self.w1.device:
                raise ValueError(
                    f"ProjectionSpec: {name} is {t.dtype} on {t.device} but w1 is {self.w1.dtype} on {self.w1.device}"
                )
        object.__setattr__(self, "_kind", "linear" if self.w2 is None else "mlp")

    # ------------------------------------------------------------------ description
    @property
    def is_identity(self) -> bool:
        return self._kind == "identity"

    @property
    def in_features(self) -> int | None:
        return None if self.w1 is None else self.w1.shape[1]

    @property
    def hidden_features(self) -> int | None:
        return None if self.w1 is None else self.w1.shape[0]

    @property
    def out_features(self) -> int | None:
        if self.w1 is None:
            return None
        return self.w1.shape[0] if self.w2 is None else self.w2.shape[0]

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self.w1 is None else self.w1.dtype

    @property
    def device(self) -> torch.device | None:
        return None if self.w1 is None else self.w1.device

    # ------------------------------------------------------------------ construction
    @classmethod
    def identity(cls) -> ProjectionSpec:
        return cls(w1=None)

    @classmethod
    def from_module(cls, module: nn.Module) -> ProjectionSpec | None:
        """Spec of a diffusers PixArtAlphaTextProjection, an nn.Linear or nn.Identity; None for anything else."""
        if isinstance(module, nn.Identity):
            return cls.identity()
        if type(module) is nn.Linear:
            return cls(w1=module.weight.detach(), b1=_detached(module.bias))
        class_names = {klass.__name__ for klass in type(module).__mro__}
        if "PixArtAlphaTextProjection" not in class_names:
            return None
        linear_1, act_1, linear_2 = (
            getattr(module, name, None) for name in ("linear_1", "act_1", "linear_2")
        )
        if type(linear_1) is not nn.Linear or type(linear_2) is not nn.Linear:
            return None
        activation = _activation_name(act_1)
        if activation is None:
            return None
        return cls(
            w1=linear_1.weight.detach(),
            b1=_detached(linear_1.bias),
            activation=activation,
            w2=linear_2.weight.detach(),
            b2=_detached(linear_2.bias),
        )

    # ------------------------------------------------------------------ torch application
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The projection in plain torch, in the weights' dtype (what the module computes)."""
        if self.w1 is None:
            return x
        h = F.linear(x.to(self.w1.dtype), self.w1, self.b1)
        h = _TORCH_ACTIVATIONS[self.activation](h)
        return h if self.w2 is None else F.linear(h, self.w2, self.b2)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _activation_name(act: nn.Module | None) -> str | None:
    if isinstance(act, nn.GELU):
        return {"tanh": "gelu_tanh", "none": "gelu"}.get(act.approximate)
    if isinstance(act, nn.SiLU) or type(act).__name__ == "FP32SiLU":  # diffusers' FP32SiLU: silu in fp32
        return "silu"
    if isinstance(act, nn.Identity):
        return "identity"
    return None


# --------------------------------------------------------------------------------------------- public wrapper


def projected_mse_sums(
    candidates: torch.Tensor | Sequence[torch.Tensor],
    reference_projected: torch.Tensor,
    mask: torch.Tensor | None,
    projection: ProjectionSpec,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over counted tokens and P channels of (projection(candidate) - reference_projected)^2, per prompt.

    candidates: [C, B, L, D] or a sequence of [B, L, D]; reference_projected: [B, L, P] = projection(reference),
    computed once by the caller; mask: [B, L] (nonzero = counted) or None.
    Returns (sums [C, B] float32, counts [B] float32 = counted tokens * P).
    """
    op = "projected_mse_sums"
    if not isinstance(projection, ProjectionSpec):
        raise ValueError(
            f"{op}: projection must be a ProjectionSpec (see ProjectionSpec.from_module), got {type(projection).__name__}"
        )
    if projection.is_identity:
        result = masked_mse_sums(candidates, reference_projected, mask, backend=backend)
        record_backend(op, last_backend("masked_mse_sums"))
        return result
    cands = Candidates(candidates, op)
    if cands.dim != projection.in_features:
        raise ValueError(
            f"{op}: candidates have D = {cands.dim} channels but projection.w1 is "
            f"{tuple(projection.w1.shape)} [H, D], expecting D = {projection.in_features}"
        )
    if projection.device != cands.device:
        raise ValueError(
            f"{op}: projection weights are on {projection.device} but candidates are on {cands.device}"
        )
    check_reference(reference_projected, cands, op, name="reference_projected")
    expected = (cands.batch, cands.length, projection.out_features)
    if tuple(reference_projected.shape) != expected:
        raise ValueError(
            f"{op}: reference_projected has shape {tuple(reference_projected.shape)} but [B, L, P] = {expected} "
            "(B, L from the candidates, P from the projection)"
        )
    keep = check_mask(mask, cands, op)
    counts = tokens_per_prompt(keep, cands) * projection.out_features
    if resolve_backend(backend, cands.device, op) == "triton":
        return projected_mse_sums_triton(cands, reference_projected, keep, projection), counts
    return projected_mse_sums_torch(cands, reference_projected, keep, projection), counts


# --------------------------------------------------------------------------------------------- torch reference


@torch.no_grad()
def projected_mse_sums_torch(
    cands: Candidates,
    reference_projected: torch.Tensor,
    keep: torch.Tensor | None,
    projection: ProjectionSpec,
) -> torch.Tensor:
    """Projection applied to chunks of counted tokens of one candidate at a time; fp32 differences and sums."""
    sums = torch.zeros(cands.count, cands.batch, dtype=torch.float32, device=cands.device)
    tokens = token_index(keep, cands)
    widest = max(cands.dim, projection.hidden_features, projection.out_features, 1)
    tokens_per_chunk = max(1, TORCH_CHUNK_ELEMENTS // widest)
    for start in range(0, tokens.count, tokens_per_chunk):
        stop = min(start + tokens_per_chunk, tokens.count)
        prompt = tokens.prompt[start:stop]
        ref32 = tokens.rows(reference_projected, start, stop).float()
        for c, cand in enumerate(cands.items):
            diff = projection(tokens.rows(cand, start, stop)) - ref32  # promotes to fp32
            sums[c].index_add_(0, prompt, diff.square_().sum(dim=1))
    return sums


# --------------------------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _activate(x, ACTIVATION: tl.constexpr):
        if ACTIVATION == "gelu_tanh":
            # 0.5 * (1 + tanh(z)) == sigmoid(2z): no cancellation near 0
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            out = x * tl.sigmoid(2.0 * inner)
        elif ACTIVATION == "gelu":
            out = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        elif ACTIVATION == "silu":
            out = x * tl.sigmoid(x)
        else:
            out = x
        return out

    @triton.jit
    def _linear_kernel(
        x_ptr,
        x_token_offsets_ptr,
        x_stride_candidate,
        x_stride_row,
        x_stride_k,
        w_ptr,
        w_stride_n,
        w_stride_k,
        bias_ptr,
        out_ptr,
        out_stride_m,
        ref_ptr,
        ref_token_offsets_ptr,
        ref_stride_n,
        partials_ptr,
        partials_stride_m,
        row_start,
        num_rows,
        tokens_per_candidate,
        N,
        K,
        GATHER_ROWS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,
        MSE_EPILOGUE: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """act(x @ w^T + bias) for rows [row_start, row_start + num_rows) of the C*N (candidate, token) rows.

        GATHER_ROWS: row r reads candidate r // N at token r % N through x_token_offsets (element offsets);
        otherwise x is a [num_rows, K] buffer. MSE_EPILOGUE: instead of storing the [BLOCK_M, BLOCK_N] tile,
        write sum over the tile's columns of (y - ref)^2 to partials[row, pid_n].
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(num_rows, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering: GROUP_M row tiles share the weight columns they read (L2 reuse).
        pids_per_group = GROUP_M * num_pid_n
        first_pid_m = (pid // pids_per_group) * GROUP_M
        group_rows = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % pids_per_group) % group_rows
        pid_n = (pid % pids_per_group) // group_rows

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        global_rows = row_start + rows
        candidate = global_rows // tokens_per_candidate
        token = global_rows - candidate * tokens_per_candidate
        if GATHER_ROWS:
            token_offset = tl.load(x_token_offsets_ptr + token, mask=row_ok, other=0)
            x_rows = candidate.to(tl.int64) * x_stride_candidate + token_offset
        else:
            x_rows = rows.to(tl.int64) * x_stride_row
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                x_ptr + x_rows[:, None] + ks[None, :] * x_stride_k,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + cols[None, :] * w_stride_n + ks[:, None] * w_stride_k,
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            a = a.to(w_ptr.dtype.element_ty)
            # The interpreter's dot mishandles bf16; products of 16-bit floats are exact in fp32 anyway.
            if DOT_IN_FP32:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = _activate(acc, ACTIVATION)

        if MSE_EPILOGUE:
            y = acc.to(w_ptr.dtype.element_ty).to(tl.float32)  # what module(x) returns in the weights' dtype
            ref_rows = tl.load(ref_token_offsets_ptr + token, mask=row_ok, other=0)
            tile_ok = row_ok[:, None] & col_ok[None, :]
            ref = tl.load(ref_ptr + ref_rows[:, None] + cols[None, :] * ref_stride_n, mask=tile_ok, other=0.0)
            diff = tl.where(tile_ok, y - ref.to(tl.float32), 0.0)
            tl.store(
                partials_ptr + rows * partials_stride_m + pid_n, tl.sum(diff * diff, axis=1), mask=row_ok
            )
        else:
            out = out_ptr + rows.to(tl.int64)[:, None] * out_stride_m + cols[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class _GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def _gemm_config(dtype: torch.dtype, interpret: bool) -> _GemmConfig:
    if interpret:
        return _GemmConfig(16, 16, 16, 2, 1, 1)
    if dtype == torch.float32:
        return _GemmConfig(64, 64, 32, 8, 4, 3)
    return _GemmConfig(128, 128, 64, 8, 8, 3)


def _input_precision(dtype: torch.dtype) -> str | None:
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def projected_mse_sums_triton(
    cands: Candidates,
    reference_projected: torch.Tensor,
    keep: torch.Tensor | None,
    projection: ProjectionSpec,
) -> torch.Tensor:
    """Two launches per chunk of rows (one for a single Linear), then sum partials and scatter to [C, B]."""
    if triton is None:
        raise RuntimeError("projected_mse_sums: the triton backend needs triton installed")
    x = cands.as_tensor()
    device = x.device
    check_kernel_runnable(_linear_kernel, device)
    num_candidates = cands.count
    sums = torch.zeros(num_candidates, cands.batch, dtype=torch.float32, device=device)
    tokens = token_index(keep, cands)
    total_rows = num_candidates * tokens.count
    if total_rows == 0:
        return sums

    interpret = interpreter_enabled() and device.type != "cuda"
    dtype = projection.dtype
    cfg = _gemm_config(dtype, interpret)
    hidden, out_features = projection.hidden_features, projection.out_features
    two_layers = projection.w2 is not None
    # Element offsets of each counted token inside one candidate / inside reference_projected.
    x_token_offsets = tokens.prompt * x.stride(1) + tokens.position * x.stride(2)
    ref_stride_b, ref_stride_l, _ = reference_projected.stride()
    ref_token_offsets = tokens.prompt * ref_stride_b + tokens.position * ref_stride_l

    if interpret:
        chunk_rows = INTERPRET_CHUNK_ROWS
    else:
        chunk_rows = max(cfg.block_m, TRITON_HIDDEN_ELEMENTS // max(hidden, 1) // cfg.block_m * cfg.block_m)
    chunk_rows = min(chunk_rows, total_rows)
    hidden_buffer = torch.empty(chunk_rows, hidden, dtype=dtype, device=device) if two_layers else None
    partials = torch.empty(
        chunk_rows, triton.cdiv(out_features, cfg.block_n), dtype=torch.float32, device=device
    )
    row_sums = torch.empty(total_rows, dtype=torch.float32, device=device)
    common = dict(
        DOT_IN_FP32=interpret,
        INPUT_PRECISION=_input_precision(dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )

    def launch(row_start, rows, x_ptr, gather, x_strides, w, bias, activation, hidden_out=None):
        """One _linear_kernel launch; without hidden_out it runs the MSE epilogue into partials."""
        n, k = w.shape
        out = partials if hidden_out is None else hidden_out
        grid = (triton.cdiv(rows, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _linear_kernel[grid](
            x_ptr, x_token_offsets, *x_strides,
            w, w.stride(0), w.stride(1), w if bias is None else bias,
            out, out.stride(0),
            reference_projected, ref_token_offsets, reference_projected.stride(2),
            partials, partials.stride(0),
            row_start, rows, tokens.count, n, k,
            GATHER_ROWS=gather,
            HAS_BIAS=bias is not None,
            ACTIVATION=activation,
            MSE_EPILOGUE=hidden_out is None,
            **common,
        )  # fmt: skip

    candidate_strides = (x.stride(0), 0, x.stride(3))
    first_layer = (x, True, candidate_strides, projection.w1, projection.b1, projection.activation)
    if two_layers:
        hidden_strides = (0, *hidden_buffer.stride())
        second_layer = (hidden_buffer, False, hidden_strides, projection.w2, projection.b2, "identity")
    for row_start in range(0, total_rows, chunk_rows):
        rows = min(chunk_rows, total_rows - row_start)
        if two_layers:
            launch(row_start, rows, *first_layer, hidden_out=hidden_buffer)
            launch(row_start, rows, *second_layer)
        else:
            launch(row_start, rows, *first_layer)
        row_sums[row_start : row_start + rows] = partials[:rows].sum(dim=1)
    return sums.index_add_(1, tokens.prompt, row_sums.view(num_candidates, tokens.count))
