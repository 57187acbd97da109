"""`skrr.quantize`: one verb for a PrunedEncoder, a dense HF encoder, or a diffusers pipeline's text encoders.

    q = skrr.quantize(pruned, "int8")                    # PrunedEncoder -> quantized PrunedEncoder
    q = skrr.quantize(hf_encoder, "fp8")                 # dense: applied with an empty plan first
    skrr.quantize(pipe, "int8", embeddings=True)         # every text encoder of the pipeline, in place
The schemes and options are `skrr_compile.core.quantize.QuantConfig`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from skrr_compile.core.quantize import QuantConfig, as_config
from skrr_compile.core.quantize import quantize as quantize_encoder
from skrr_compile.deploy.pipelines.prune import quantize_pipeline


def _is_pipeline(obj) -> bool:
    return hasattr(obj, "components") and hasattr(obj, "register_modules")


def quantize(model, scheme: str | QuantConfig = "int8", *, encoders: Sequence[str] | None = None, **options):
    """Quantize `model` (see the module docstring); a pipeline is changed in place and returned."""
    config = as_config(scheme, **options)
    if not _is_pipeline(model):
        return quantize_encoder(model, config)
    return quantize_pipeline(model, config, encoders)
