"""The denoiser's discrepancy: noise-prediction MSE of a pruned denoiser against the dense one on a few fixed
latents and timesteps (the text encoder's counterpart is `skrr_compile.blocksearch.discrepancy.Discrepancy`).

Inputs are built from the denoiser's config, seeded, for UNet2DConditionModel (SD 1.x/2.x, SDXL's text-time
conditioning) and the DiT transformers PixArtTransformer2DModel, SD3Transformer2DModel and
FluxTransformer2DModel. The conditioning is real text-encoder output when given (``encoder_hidden_states``),
else seeded unit-variance noise of the right width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

DENOISERS = ("UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
DEFAULT_TIMESTEPS = (0.9, 0.5, 0.1)  # fractions of the schedule: noisy, middle, nearly clean


def is_denoiser(model) -> bool:
    return type(model).__name__ in DENOISERS


def _cfg(model, key, default=None):
    return getattr(model.config, key, default)


def denoiser_inputs(
    model: nn.Module,
    *,
    batch: int = 2,
    timesteps: Sequence[float] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    sample_size: int | None = 32,
    text_tokens: int = 16,
    encoder_hidden_states: torch.Tensor | None = None,
) -> list[dict]:
    """One forward-kwargs dict per timestep (fractions in (0, 1] of the 1000-step schedule).

    `sample_size` is the latent height/width (capped at the model's own; None = the model's). The latents and
    conditioning are the same at every timestep.
    """
    name = type(model).__name__
    if name not in DENOISERS:
        raise ValueError(f"{name} is not a supported denoiser; supported: {', '.join(DENOISERS)}")
    if not timesteps or any(not 0 < float(t) <= 1 for t in timesteps):
        raise ValueError(f"timesteps are fractions in (0, 1], got {list(timesteps)}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    own = _cfg(model, "sample_size") or 32
    own = own[0] if isinstance(own, (list, tuple)) else own
    size = min(sample_size or own, own) if name != "FluxTransformer2DModel" else (sample_size or 32)
    if name == "UNet2DConditionModel":
        width = _cfg(model, "encoder_hid_dim") or _cfg(model, "cross_attention_dim")
        width = width[0] if isinstance(width, (list, tuple)) else width
    elif name == "PixArtTransformer2DModel":
        width = _cfg(model, "caption_channels") or _cfg(model, "cross_attention_dim")
    else:
        width = _cfg(model, "joint_attention_dim")
    if encoder_hidden_states is not None:
        ehs = encoder_hidden_states.to(device=device, dtype=dtype)
        if ehs.shape[-1] != width:
            raise ValueError(f"encoder_hidden_states have width {ehs.shape[-1]}; {name} expects {width}")
        batch = ehs.shape[0]
    else:
        ehs = randn(batch, text_tokens, width)
    common: dict = {}
    if name == "UNet2DConditionModel":
        if _cfg(model, "class_embed_type") is not None or _cfg(model, "num_class_embeds") is not None:
            raise ValueError("UNets with class embeddings (class_embed_type / num_class_embeds) are not supported")
        sample = randn(batch, _cfg(model, "in_channels"), size, size)
        if _cfg(model, "addition_embed_type") == "text_time":  # SDXL: pooled text + size/crop ids
            pooled = _cfg(model, "projection_class_embeddings_input_dim") - 6 * _cfg(model, "addition_time_embed_dim")
            ids = torch.tensor([1024.0, 1024, 0, 0, 1024, 1024], device=device, dtype=dtype).repeat(batch, 1)
            common["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled), "time_ids": ids}
        elif _cfg(model, "addition_embed_type") is not None:
            raise ValueError(f"UNet addition_embed_type {_cfg(model, 'addition_embed_type')!r} is not supported")
        key = "sample"
    elif name == "PixArtTransformer2DModel":
        sample = randn(batch, _cfg(model, "in_channels"), size, size)
        if getattr(model, "use_additional_conditions", False):
            res = torch.tensor([[size * 8.0, size * 8.0]], device=device, dtype=dtype).repeat(batch, 1)
            ar = torch.ones(batch, 1, device=device, dtype=dtype)
            common["added_cond_kwargs"] = {"resolution": res, "aspect_ratio": ar}
        else:
            common["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        key = "hidden_states"
    elif name == "SD3Transformer2DModel":
        sample = randn(batch, _cfg(model, "in_channels"), size, size)
        common["pooled_projections"] = randn(batch, _cfg(model, "pooled_projection_dim"))
        key = "hidden_states"
    else:  # Flux: packed 2x2 latent patches and rotary position ids
        half = size // 2
        sample = randn(batch, half * half, _cfg(model, "in_channels"))
        img_ids = torch.zeros(half, half, 3)
        img_ids[..., 1] = torch.arange(half)[:, None]
        img_ids[..., 2] = torch.arange(half)[None, :]
        common["img_ids"] = img_ids.reshape(-1, 3).to(device=device, dtype=dtype)
        common["txt_ids"] = torch.zeros(ehs.shape[1], 3, device=device, dtype=dtype)
        common["pooled_projections"] = randn(batch, _cfg(model, "pooled_projection_dim"))
        if _cfg(model, "guidance_embeds"):
            common["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        key = "hidden_states"
    out = []
    for t in timesteps:
        # UNet / PixArt / SD3 take t on the 0..1000 scale; Flux takes t / 1000 (its pipeline divides)
        value = float(t) if name == "FluxTransformer2DModel" else float(t) * 1000.0
        ts = torch.full((batch,), value, device=device, dtype=dtype if name != "UNet2DConditionModel" else torch.float32)
        out.append({key: sample, "encoder_hidden_states": ehs, "timestep": ts, **common})
    return out


def _prediction(model: nn.Module, kwargs: Mapping) -> torch.Tensor:
    out = model(**kwargs, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class DenoiserReport:
    discrepancy: float  # noise-prediction MSE over all inputs
    relative_mse: float  # MSE / mean square of the dense prediction
    cosine: float  # mean over samples of cos(dense, pruned) of the flattened prediction
    mse_per_timestep: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


class NoisePredictionDiscrepancy:
    """Dense noise predictions on fixed inputs, and the MSE of a candidate's predictions against them.

    Distributed (`group`, default: the torch.distributed group when one is initialised): each rank predicts
    its shard of the inputs (every world-th one); the per-input figures are all-gathered and combined in
    input order, so every rank returns the very report a single process computes.
    """

    def __init__(self, dense: nn.Module, inputs: Sequence[Mapping], group=None):
        from skrr_compile.blocksearch.distributed import current_group, shard

        if not inputs:
            raise ValueError("NoisePredictionDiscrepancy needs at least one input")
        self.group = group or current_group()
        self.mine = shard(len(inputs), self.group.rank, self.group.world)
        self.inputs = [inputs[i] for i in self.mine]
        self.count = len(inputs)
        with torch.no_grad():
            self.reference = [_prediction(dense, kw).detach().double() for kw in self.inputs]
        squares = self._in_order([float(r.pow(2).mean()) for r in self.reference])
        self.scale = sum(squares) / self.count

    def _in_order(self, values: list) -> list:
        """Every rank's per-input values, in input order."""
        pairs = sorted(p for rank_pairs in self.group.gather_objects(list(zip(self.mine, values))) for p in rank_pairs)
        return [v for _, v in pairs]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> DenoiserReport:
        mine = []
        for kw, ref in zip(self.inputs, self.reference):
            pred = _prediction(model, kw).double()
            mine.append((float((pred - ref).pow(2).mean()),
                         torch.nn.functional.cosine_similarity(pred.flatten(1), ref.flatten(1), dim=1).tolist()))
        per_input = self._in_order(mine)
        per_t = [mse for mse, _ in per_input]
        cos = [c for _, cosines in per_input for c in cosines]
        mse = sum(per_t) / len(per_t)
        return DenoiserReport(
            discrepancy=mse,
            relative_mse=mse / self.scale if self.scale > 0 else float("nan"),
            cosine=sum(cos) / len(cos),
            mse_per_timestep=per_t,
        )
