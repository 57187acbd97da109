"""PrunedTextEncoder, the class diffusers instantiates for a pruned pipeline component; the families."""

from __future__ import annotations

import torch

from skrr_compile.core.encoder import PrunedEncoder
from skrr_compile.core.storage import load as load_pruned
from skrr_compile.core.storage import read_model_meta
from skrr_compile.core.storage import save as save_pruned
from skrr_compile.utils.quiet import drop_log_records

SUPPORTED_PIPELINES = {
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "FluxInpaintPipeline": "flux",
    "SanaPipeline": "sana",
    "Lumina2Pipeline": "lumina2",
    "ZImagePipeline": "zimage",
    "ChromaPipeline": "chroma",
    "AuraFlowPipeline": "auraflow",
    "WanPipeline": "wan",
    "HiDreamImagePipeline": "hidream",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2klein",
    "QwenImagePipeline": "qwenimage",
    "CogView4Pipeline": "cogview4",
}  # base classes by name, for callers that cannot import diffusers; every variant: specs.resolve_family


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")


SUMMARY_FILE = "skrr_pipeline.json"


class UnsupportedPipelineError(ValueError):
    """A pipeline class skrr-compile does not know how to prune."""


class NoTextEncoderError(ValueError):
    """A pipeline without any text encoder to prune."""


# ---------------------------------------------------------------------------------------------------
# the pruned encoder as a diffusers pipeline component
# ---------------------------------------------------------------------------------------------------
# diffusers checks loaded components against the pipeline's type hints (T5EncoderModel, CLIPTextModel) and warns
# on every load of a pruned pipeline; PrunedTextEncoder is a drop-in for them. Only that warning is dropped.
drop_log_records("diffusers.pipelines.pipeline_utils", "Expected types for", "PrunedTextEncoder")


class PrunedTextEncoder(PrunedEncoder):
    """A PrunedEncoder that diffusers can save and load as a pipeline component.

    `pipe.save_pretrained` writes it in the skrr format (`skrr.save`) into the component's folder, and
    `DiffusionPipeline.from_pretrained` loads it back once `skrr_compile` is imported.
    """

    @classmethod
    def from_pruned(cls, pruned: PrunedEncoder) -> PrunedTextEncoder:
        if isinstance(pruned, cls):
            return pruned
        new = cls(pruned.graph_module, pruned.config, pruned.plan, pruned.architecture, pruned.info)
        new.train(pruned.training)
        return new

    def forward(self, *args, output_attentions: bool | None = None, **kwargs):
        """PrunedEncoder.forward; `output_attentions` is accepted and gives no attention maps (HiDream asks for
        them from its Llama encoder and never reads them)."""
        return super().forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        raise NotImplementedError(
            f"the pruned {self.architecture} is the text model of an encoder: it cannot generate text (FLUX.2's "
            "caption_upsample_temperature needs the dense text encoder)"
        )

    def save_pretrained(self, save_directory, **kwargs) -> None:
        save_pruned(self, save_directory, overwrite=True)

    @classmethod
    def from_pretrained(cls, directory, torch_dtype: torch.dtype | None = None, device=None, **kwargs):
        pruned = cls.from_pruned(load_pruned(directory, device=device or "cpu", dtype=torch_dtype))
        meta = read_model_meta(directory)  # the component it replaced, as noted by record_component
        pruned.info.update({k: meta[k] for k in (COMPONENT_PARAMS, COMPONENT_CLASS) if k in meta})
        return pruned


COMPONENT_PARAMS, COMPONENT_CLASS = "component_params", "component_class"  # PrunedEncoder.info keys, saved with it


def record_component(pruned: PrunedEncoder, component) -> PrunedEncoder:
    """Note in `pruned.info` (saved with it) the size and class of the dense component it replaces in a pipeline:
    an LLM component (LM head, vision tower) is replaced by its pruned text model (`pipelines.encoder_sizes`)."""
    from skrr_compile.utils.tensors import param_numel

    if not isinstance(component, PrunedEncoder):
        pruned.info[COMPONENT_PARAMS] = param_numel(component)
        pruned.info[COMPONENT_CLASS] = type(component).__name__
    return pruned


def _register_with_diffusers() -> None:
    """Let DiffusionPipeline.save_pretrained/from_pretrained treat PrunedTextEncoder as a loadable class."""
    from diffusers.pipelines import pipeline_loading_utils as loading

    methods = ["save_pretrained", "from_pretrained"]
    loading.LOADABLE_CLASSES.setdefault("skrr_compile", {})["PrunedTextEncoder"] = methods
    loading.ALL_IMPORTABLE_CLASSES["PrunedTextEncoder"] = methods


_register_with_diffusers()
