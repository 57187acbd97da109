"""The T2I-tailored discrepancy of the Skrr paper (Eq. 1).

f = projection(encoder(prompt)); D = MSE over the calibration prompts + MSE over the null prompt "",
each MSE the mean of squared differences over every (token, channel) the consumer reads.
Squared differences are summed by the kernels dispatcher (Triton on CUDA, torch elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from skrr_compile.kernels import ProjectionSpec, masked_mse_sums, projected_mse_sums, select_backend

from .calibration import Calibration

Selector = Callable[[object], torch.Tensor]


def last_hidden_state(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class DiscrepancyReport:
    discrepancy: float  # mse_prompts + mse_null (paper Eq. 1)
    mse_prompts: float
    mse_null: float
    cosine: float  # mean over read tokens of cos(f_dense, f_pruned)
    null_norm_ratio: float  # ||f_null_pruned|| / ||f_null_dense||, the paper's failure signature
    backend: str

    def to_dict(self) -> dict:
        return asdict(self)


class Discrepancy:
    """Dense reference embeddings (after the projection) for a calibration set, and scoring against them."""

    def __init__(
        self,
        dense: Callable,
        calibration: Calibration,
        projection: Callable | None = None,
        select: Selector = last_hidden_state,
    ):
        self.calibration = calibration
        self.projection = projection if projection is not None else nn.Identity()
        self.spec = ProjectionSpec.from_module(self.projection) if isinstance(self.projection, nn.Module) else None
        self.select = select
        with torch.no_grad():
            self.reference = [self.project(self.embed(dense, ids, mask)) for ids, mask in calibration.chunks]
            self.null_reference = self.project(self.embed(dense, *calibration.null))
        self.masks = [calibration.read_mask(m) for _, m in calibration.chunks]
        self.null_mask = calibration.read_mask(calibration.null[1])
        width = self.null_reference.shape[-1]
        self.prompt_count = float(sum(int(m.sum()) for m in self.masks) * width)
        self.null_count = float(int(self.null_mask.sum()) * width)
        self.backend = select_backend(self.null_reference.device)

    def embed(self, fn: Callable, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.select(fn(ids, attention_mask=mask))
        if out.dim() != 3:
            raise ValueError(f"the selected encoder output must be [batch, tokens, channels], got {tuple(out.shape)}")
        return out

    def project(self, h: torch.Tensor) -> torch.Tensor:
        try:
            return self.projection(h)
        except RuntimeError as e:
            raise ValueError(
                f"the projection does not accept the encoder's output of width {h.shape[-1]}: {e}"
            ) from e

    def chunk_sums(self, chunk: int | None, embeddings: torch.Tensor) -> torch.Tensor:
        """Sum of squared differences per candidate for one chunk (None = the null prompt).

        `embeddings` are encoder outputs before the projection, [C, B, L, D] or [B, L, D]; returns [C].
        """
        if embeddings.dim() == 3:
            embeddings = embeddings.unsqueeze(0)
        ref = self.null_reference if chunk is None else self.reference[chunk]
        mask = self.null_mask if chunk is None else self.masks[chunk]
        if self.spec is not None:
            sums, _ = projected_mse_sums(embeddings, ref, mask, self.spec)
        else:
            projected = torch.stack([self.project(e) for e in embeddings])
            sums, _ = masked_mse_sums(projected, ref, mask)
        return sums.sum(dim=1).double()

    @torch.no_grad()
    def evaluate(self, fn: Callable) -> DiscrepancyReport:
        """Full discrepancy report of an encoder callable against the dense reference."""
        total = 0.0
        dot = norm_a = norm_b = 0.0
        cos_sum, cos_n = 0.0, 0
        for k, (ids, mask) in enumerate(self.calibration.chunks):
            f = self.project(self.embed(fn, ids, mask))
            total += float(masked_mse_sums(f.unsqueeze(0), self.reference[k], self.masks[k])[0].sum())
            cos = torch.nn.functional.cosine_similarity(f.double(), self.reference[k].double(), dim=-1)
            cos_sum += float(cos[self.masks[k]].sum())
            cos_n += int(self.masks[k].sum())
        f_null = self.project(self.embed(fn, *self.calibration.null))
        null_sum = float(masked_mse_sums(f_null.unsqueeze(0), self.null_reference, self.null_mask)[0].sum())
        m = self.null_mask
        norm_a = float(f_null[m].double().norm())
        norm_b = float(self.null_reference[m].double().norm())
        del dot
        mse_p, mse_n = total / self.prompt_count, null_sum / self.null_count
        return DiscrepancyReport(
            discrepancy=mse_p + mse_n,
            mse_prompts=mse_p,
            mse_null=mse_n,
            cosine=cos_sum / max(cos_n, 1),
            null_norm_ratio=norm_a / norm_b if norm_b > 0 else float("nan"),
            backend=self.backend,
        )

    def total(self, prompt_sum: float, null_sum: float) -> float:
        """D from the summed squared differences over all prompt chunks and over the null prompt."""
        return prompt_sum / self.prompt_count + null_sum / self.null_count
