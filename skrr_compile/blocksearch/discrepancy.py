"""The T2I-tailored discrepancy of the Skrr paper (Eq. 1).

f = projection(encoder(prompt)); D = MSE over the calibration prompts + MSE over the null prompt "",
each MSE the mean of squared differences over every (token, channel) the consumer reads.
When the consumer reads several outputs (SDXL: penultimate hidden states and the pooled embedding),
D is the sum of that quantity over the outputs. Squared differences are summed by the kernels
dispatcher (Triton on CUDA, torch elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.reference import ReferenceStore
from skrr_compile.kernels import ProjectionSpec, masked_mse_sums, projected_mse_sums, select_backend

Selector = Callable[[object], "torch.Tensor | tuple[torch.Tensor, ...]"]


def last_hidden_state(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class DiscrepancyReport:
    discrepancy: float  # Σ_outputs (mse_prompts + mse_null) (paper Eq. 1)
    mse_prompts: float
    mse_null: float
    cosine: float  # mean over read tokens of cos(f_dense, f_pruned), first selected output
    null_norm_ratio: float  # ||f_null_pruned|| / ||f_null_dense||, the paper's failure signature
    backend: str

    def to_dict(self) -> dict:
        return asdict(self)


_DEFAULT = object()  # lets Discrepancy tell the (dense, calibration, ...) form's arguments apart


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class Discrepancy:
    """Projected dense reference embeddings for a calibration set, and scoring of candidates against them."""

    def __init__(self, calibration: Calibration, projection=None, select: Selector = _DEFAULT, *more):
        if not isinstance(calibration, Calibration):  # Discrepancy(dense_fn, calibration, projection, select)
            dense, calibration = calibration, projection
            projection = None if select is _DEFAULT else select
            select = more[0] if more else last_hidden_state
            self.__init__(calibration, projection, select)
            with torch.no_grad():
                self.set_reference((dense(ids, attention_mask=m) for ids, m in calibration.chunks),
                                   dense(calibration.null[0], attention_mask=calibration.null[1]))
            return
        self.calibration = calibration
        self.select = last_hidden_state if select is _DEFAULT else select
        self.projections = _as_tuple(projection)
        self.masks = [calibration.read_mask(m) for _, m in calibration.chunks]
        self.null_mask = calibration.read_mask(calibration.null[1])
        self.reference: list[tuple[torch.Tensor, ...]] | None = None
        self.null_reference: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def from_model(cls, dense: Callable, calibration: Calibration, projection=None,
                   select: Selector = last_hidden_state) -> Discrepancy:
        return cls(dense, calibration, projection, select)

    # selection and projection ----------------------------------------------------------------------
    def features(self, output) -> tuple[torch.Tensor, ...]:
        """The selected outputs as [B, L, C] tensors (a pooled [B, C] output counts as one token)."""
        selected = _as_tuple(self.select(output))
        if len(self.projections) not in (1, len(selected)):
            raise ValueError(f"{len(self.projections)} projections for {len(selected)} selected outputs")
        feats = []
        for t in selected:
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                raise ValueError("select must return [batch, tokens, channels] or [batch, channels] tensors")
            feats.append(t.unsqueeze(1) if t.dim() == 2 else t)
        return tuple(feats)

    def _projection(self, i: int):
        p = self.projections[i] if len(self.projections) > 1 else self.projections[0]
        return p if p is not None else nn.Identity()

    def project(self, i: int, h: torch.Tensor) -> torch.Tensor:
        try:
            return self._projection(i)(h)
        except RuntimeError as e:
            raise ValueError(f"the projection does not accept the encoder's output of width {h.shape[-1]}: {e}") from e

    def _mask_for(self, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask if feat.shape[1] == mask.shape[1] else torch.ones(feat.shape[:2], dtype=torch.bool,
                                                                         device=feat.device)

    def set_reference(self, chunk_outputs: Iterable, null_output, placement: str = "device", path=None) -> None:
        """Project the dense outputs (an iterable: consumed one chunk at a time) and keep them per
        `placement` (device, cpu, or disk: a safetensors file read back through a memory map)."""
        with torch.no_grad():
            self.null_reference = tuple(self.project(i, f) for i, f in enumerate(self.features(null_output)))
            self.reference = ReferenceStore(placement, path)
            for o in chunk_outputs:
                self.reference.append(tuple(self.project(i, f) for i, f in enumerate(self.features(o))))
                del o
            self.reference.finish()
        self.prompt_counts = [0.0] * len(self.null_reference)
        for ref, mask in zip(self.reference, self.masks):
            for i, r in enumerate(ref):
                self.prompt_counts[i] += float(self._mask_for(r, mask).sum()) * r.shape[-1]
        self.null_counts = [float(self._mask_for(r, self.null_mask).sum()) * r.shape[-1] for r in self.null_reference]
        self.specs = [
            ProjectionSpec.from_module(self._projection(i)) if isinstance(self._projection(i), nn.Module) else None
            for i in range(len(self.null_reference))
        ]
        self.backend = select_backend(self.null_reference[0].device)

    # scoring -----------------------------------------------------------------------------------------
    def _sums(self, chunk: int | None, output) -> list[float]:
        refs = self.null_reference if chunk is None else self.reference[chunk]
        mask = self.null_mask if chunk is None else self.masks[chunk]
        sums = []
        for i, (feat, ref) in enumerate(zip(self.features(output), refs)):
            m = self._mask_for(feat, mask)
            if self.specs[i] is not None:
                s, _ = projected_mse_sums(feat.unsqueeze(0), ref, m, self.specs[i])
            else:
                s, _ = masked_mse_sums(self.project(i, feat).unsqueeze(0), ref, m)
            sums.append(float(s.double().sum()))
        return sums

    def contribution(self, chunk: int | None, output) -> float:
        """This chunk's share of D (chunk None = the null prompt); D is the sum over all chunks and null."""
        counts = self.null_counts if chunk is None else self.prompt_counts
        return sum(s / c for s, c in zip(self._sums(chunk, output), counts))

    @torch.no_grad()
    def report_parts(self, chunk_outputs: Sequence, chunks: Sequence[int] | None = None) -> list[tuple[list[float], float, int]]:
        """Per chunk (`chunks`: the chunks the outputs are of; default all, in order): (squared-error sums per
        output, cosine sum, counted tokens), for `report_from_parts`."""
        parts = []
        for k, out in zip(range(len(self.masks)) if chunks is None else chunks, chunk_outputs):
            f = self.project(0, self.features(out)[0]).double()
            m = self._mask_for(f, self.masks[k])
            cos = torch.nn.functional.cosine_similarity(f, self.reference[k][0].double(), dim=-1)
            parts.append((self._sums(k, out), float(cos[m].sum()), int(m.sum())))
        return parts

    @torch.no_grad()
    def report_from_parts(self, parts: Sequence, null_output) -> DiscrepancyReport:
        """The report from every chunk's parts, summed in the order given (the global chunk order)."""
        prompt_sums = [0.0] * len(self.null_reference)
        cos_sum, cos_n = 0.0, 0
        for sums, c_sum, c_n in parts:
            for i, s in enumerate(sums):
                prompt_sums[i] += s
            cos_sum += c_sum
            cos_n += c_n
        null_sums = self._sums(None, null_output)
        mse_p = sum(s / c for s, c in zip(prompt_sums, self.prompt_counts))
        mse_n = sum(s / c for s, c in zip(null_sums, self.null_counts))
        f_null = self.project(0, self.features(null_output)[0]).double()
        m = self._mask_for(f_null, self.null_mask)
        dense_norm = float(self.null_reference[0].double()[m].norm())
        return DiscrepancyReport(
            discrepancy=mse_p + mse_n,
            mse_prompts=mse_p,
            mse_null=mse_n,
            cosine=cos_sum / max(cos_n, 1),
            null_norm_ratio=float(f_null[m].norm()) / dense_norm if dense_norm > 0 else float("nan"),
            backend=self.backend,
        )

    def report(self, chunk_outputs: Sequence, null_output) -> DiscrepancyReport:
        return self.report_from_parts(self.report_parts(chunk_outputs), null_output)

    @torch.no_grad()
    def evaluate(self, fn: Callable) -> DiscrepancyReport:
        """Full report for an encoder callable `fn(input_ids, attention_mask=...)`."""
        cal = self.calibration
        outs = (fn(ids, attention_mask=m) for ids, m in cal.chunks)  # streamed, one chunk at a time
        return self.report(outs, fn(cal.null[0], attention_mask=cal.null[1]))
