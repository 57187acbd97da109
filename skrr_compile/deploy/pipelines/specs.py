"""Per family: what each text encoder feeds the denoiser (output, layer, mask, projection).

What each supported family feeds its denoiser, and so what the discrepancy of each encoder covers:

  family        component        reads                                  consumer (projection)
  PixArt-α/Σ    text_encoder     T5 last_hidden_state (masked tokens)   transformer.caption_projection
  SD 1.x/2.x    text_encoder     CLIP last_hidden_state (all 77)        identity (UNet cross-attention)
  SDXL          text_encoder     CLIP hidden_states[-2]                 identity
                text_encoder_2   CLIP hidden_states[-2], text_embeds    identity, unet.add_embedding.linear_1[:, :P]
  SD3           text_encoder     CLIP-L hidden_states[-2], text_embeds  context_embedder[:, :768], time_text_embed
                text_encoder_2   CLIP-G hidden_states[-2], text_embeds    .text_embedder.linear_1 column blocks
                text_encoder_3   T5 last_hidden_state (all tokens)      transformer.context_embedder
  FLUX          text_encoder     CLIP pooler_output                     transformer.time_text_embed.text_embedder
                text_encoder_2   T5 last_hidden_state (all tokens)      transformer.context_embedder
  Sana          text_encoder     Gemma-2 last_hidden_state behind the   transformer.caption_projection
                                 complex human instruction (masked)
  Lumina 2      text_encoder     Gemma-2 hidden_states[-2] behind the   transformer.time_caption_embed
                                 system prompt (masked)                   .caption_embedder (RMSNorm, Linear)
  Z-Image       text_encoder     Qwen3 hidden_states[-2] behind the     transformer.cap_embedder (RMSNorm, Linear)
                                 tokenizer's chat template (mask tokens)
  Chroma        text_encoder     T5 last_hidden_state (mask tokens)     transformer.context_embedder
  AuraFlow      text_encoder     UMT5 last_hidden_state x mask          transformer.context_embedder
  Wan           text_encoder     UMT5 last_hidden_state x mask          transformer(_2).condition_embedder
                                                                          .text_embedder (each present)
  HiDream       text_encoder     CLIP-L text_embeds (not by default)    transformer.p_embedder.pooled_embedder
                text_encoder_2   CLIP-G text_embeds (not by default)      .linear_1 column blocks
                text_encoder_3   T5 last_hidden_state (all tokens)      transformer.caption_projection[-1]
                text_encoder_4   Llama-3.1 hidden_states[1:][k] for k   transformer.caption_projection[i], one
                                 in llama_layers (all tokens)             per read layer (blockwise)
  FLUX.2        text_encoder     Mistral 3 hidden_states[10,20,30]      transformer.context_embedder
                                 behind the system chat (all tokens)
  FLUX.2 Klein  text_encoder     Qwen3 hidden_states[9,18,27] behind    transformer.context_embedder
                                 the chat template (all tokens)
  Qwen-Image    text_encoder     Qwen2.5-VL hidden_states[-1] behind    transformer.txt_norm -> transformer.txt_in
                                 its template, prefix dropped (mask)
  CogView4      text_encoder     GLM-4 hidden_states[-2], no mask, ids  transformer.patch_embed.text_proj
                                 left-padded to a multiple of 16 (all)

LLM encoders (issue 12) add what the pipeline wraps and drops: `template` ("...{prompt}...", the null prompt
goes through it too), `drop_tokens` (the first N tokens left out of D), `hidden_layer` (another layer than
the last, or a stack). Sana (`_get_gemma_prompt_embeds` + `encode_prompt`, diffusers 0.42) prepends the
"\n"-joined complex human instruction (C tokens with <bos>), pads to C + M - 2 and keeps position 0 plus the
last M - 1 positions: the instruction's last token and the prompt. The spec scores the same text and length
with drop_tokens = C - 1; the one position it leaves out that Sana keeps is <bos> at 0, whose causal output
is the same for every prompt. Sana encodes its negative prompt without the instruction; the null prompt of
D goes through the template like every other prompt. Its caption_projection is followed by caption_norm
(an RMSNorm), which the projection leaves out, as for PixArt's GELU.
Lumina 2 (`_get_gemma_prompt_embeds`, `encode_prompt`) wraps the prompt as
`system_prompt + " <Prompt Start> " + prompt`, pads to max_sequence_length (which counts the system prompt),
passes the mask and reads hidden_states[-2]; no token is dropped.
Z-Image (`_encode_prompt`) renders the prompt as one user turn through the tokenizer's own chat template
(add_generation_prompt=True, enable_thinking=True), pads to max_sequence_length (template included), reads
hidden_states[-2] and hands the denoiser only the mask tokens; the spec renders the template with the
placeholder "{prompt}" as the content, so a tokenizer's template that rewrites the content would be caught
by the spec test, not silently mis-scored.
Chroma (`_get_t5_prompt_embeds`) passes T5 the tokenizer's mask and un-masks, for the denoiser, the mask
tokens plus the first padding position; the spec scores the mask tokens and leaves that one padding
position out (T5 sees it masked, so it carries no prompt token of its own).
AuraFlow (`encode_prompt`) pads UMT5's input to max_sequence_length, passes the mask and zeroes the
embedding outside it: only mask tokens carry anything to the denoiser.
Wan (`_get_t5_prompt_embeds`) is AuraFlow's reading (UMT5, mask, zeroed beyond it), consumed by the text
embedder of each transformer present (Wan 2.2 has two: D sums both); it cleans prompts first (ftfy, HTML
unescape, whitespace), which the spec does not, so calibrate on clean prompts.
HiDream (`encode_prompt`) reads four encoders. Pooled CLIP-L|CLIP-G (position-extended CLIPs padded to min(M, 218),
no mask) enter p_embedder, added to the timestep embedding; T5 (mask passed, every padded position read) feeds
the last caption projection; Llama-3.1 (mask passed, every position read) hands the transformer
hidden_states[1:], of which block i reads layer llama_layers[i] through caption_projection[i]: the spec reads
those layers concatenated and projects block i with projection i, so D sums over every layer the denoiser
reads (memory: the reference holds len(llama_layers) x inner_dim channels per token; --reference disk).
By default only T5 and Llama are pruned: they are 94 % of the encoder weights (4.7 B and 7.5 B against
0.12 B and 0.69 B), while the CLIPs' one pooled vector modulates every block of the denoiser, so a CLIP
sub-block's error reaches every token for little memory saved; name them (`encoders=`, "all") to prune them.
FLUX.2 (`_get_mistral_3_small_prompt_embeds`) renders [system message, prompt] through the processor's chat
template (the template writes the BOS, so the spec tokenizes with `special_tokens=False`, as
apply_chat_template does), pads to max_sequence_length, passes the mask and reads hidden_states[10, 20, 30]
concatenated along the channels (`text_encoder_out_layers`) at every position. FLUX.2 Klein
(`_get_qwen3_prompt_embeds`) does the same with Qwen3 behind the chat template without thinking, layers
(9, 18, 27). Qwen-Image (`_get_qwen_prompt_embeds`) wraps the prompt in `prompt_template_encode`, reads
hidden_states[-1], keeps the mask tokens and drops the first `prompt_template_encode_start_idx` (34) of
them: the system turn and the user header; the spec's drop_tokens is that index.
The encoders of FLUX.2 (Mistral3ForConditionalGeneration), Qwen-Image (Qwen2_5_VLForConditionalGeneration),
Klein and HiDream (*ForCausalLM) are more than a text encoder; the pipelines call them with input ids and a
mask only and read hidden states, which their text model (`module`: `model.language_model`, `model`) computes
alone (for text, Qwen2.5-VL's rope index counts mask tokens from 0 and the text model alone every position:
the same under right padding, a shift that rotary attention cancels under left padding). That
text model is traced and pruned, and replaces the whole component: the LM head and vision tower the
pipeline never runs are dropped (FLUX.2's caption upsampling, which generates with the dense model, is
refused by the pruned encoder with the reason).

Where a consumer reads the concatenation of several encoders' outputs (SD3's context_embedder over the
padded CLIP-L|CLIP-G|T5 channels, pooled CLIP-L|CLIP-G), each encoder's projection is the block of the
consumer's first linear layer that multiplies its channels: the consumer's input is linear in each block,
so this is exactly that encoder's contribution (the bias cancels in a difference).
Encoders the pipeline calls without an attention mask (every CLIP, T5 in SD3 and FLUX) are calibrated the
same way: padded to the pipeline's length, all-ones mask, every position read.

CogView4 (`_get_glm_embeds`) tokenizes with padding "longest" (GLM-4's tokenizer pads on the left), left-pads
the ids with the pad token to a multiple of 16, and calls GlmModel without a mask: the pads are read and seen
by every prompt token, so the spec pads the same way (`pad_multiple`), passes all ones and scores every position;
a calibration chunk pads to its longest prompt, as the pipeline does for a list of prompts (chunk_size=1 is the
one-prompt call exactly).

Which family a class is (`resolve_family`), by what its code does, never by its name: class C resolves to F when,
against one of F's base classes (FAMILY_BASES), (1) its `text_encoder*`/`tokenizer*` __init__ parameters and their
annotated classes are the base's, (2) `encode_prompt`, every pipeline method it calls on `self` and every
pipeline-module function it calls (prompt cleaning), transitively, have the base's AST (docstrings, comments,
decorators, annotations and the `max_sequence_length` default left out: the spec takes the length from
`__call__`), and (3) C has the base's denoiser component (`transformer` / `unet`). So a subclass or a variant whose
encoding is `# Copied from` the base resolves; one whose code differs by a line is refused (the error says which
methods), and `spec="<family>"` / `--spec <family>` reads it as that family once its reading is checked.
ControlNet, T2I-Adapter and PAG variants resolve with the base's consumers: their extra network reads the same
prompt embeddings (a FLUX / SD3 ControlNet through its own copy of the context embedder, which D leaves out).

Variants whose text encoder reads more than text:
  Qwen-Image edit (Edit, EditPlus, EditInpaint): Qwen2.5-VL reads the input image with the prompt (vision tokens
    inside the template, 64 prefix tokens dropped), so what the denoiser reads is image-conditioned; skrr-compile
    calibrates on prompts only: refused (not scored on a text-only proxy).
  Wan image-to-video (and v2v, VACE, Animate, ChronoEdit, Lucy): the UMT5 reading is Wan's, and the CLIP image
    encoder beside it reads the input image, never the prompt, so only UMT5 is pruned, calibrated on text; their
    `basic_clean` calls ftfy unconditionally (Wan's only when installed), so the rule refuses them: with ftfy
    installed, spec="wan".
  FLUX Redux (FluxPriorReduxPipeline): no denoiser; its embeddings (T5 + the Redux image tokens) feed a separate
    FluxPipeline that holds the same CLIP and T5: prune that one (rule 3 refuses Redux).
  FLUX Fill / Kontext / Control / ControlNet img2img and inpaint: the image enters the denoiser's latents, not the
    encoders: FLUX's spec (FluxControlNetPipeline's `_get_t5_prompt_embeds` differs from FLUX's: refused).

Every diffusers 0.42 pipeline class with a text encoder (268: 100 supported, 168 refused; tests/test_pipeline_variants.py
enumerates them and fails on a class that is neither):

  Supported (100), by family (each variant: spec resolution + its encode_prompt against the base's on the base's
  tiny components; each family's base: spec vs encode_prompt, prune, generate, save, load):
    sd (37): AnimateDiffControlNetPipeline, AnimateDiffPAGPipeline, AnimateDiffPipeline,
      AnimateDiffSparseControlNetPipeline, CycleDiffusionPipeline, LatentConsistencyModelImg2ImgPipeline,
      LatentConsistencyModelPipeline, PIAPipeline, StableDiffusionAdapterPipeline,
      StableDiffusionAttendAndExcitePipeline, StableDiffusionControlNetImg2ImgPipeline,
      StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPAGInpaintPipeline,
      StableDiffusionControlNetPAGPipeline, StableDiffusionControlNetPipeline,
      StableDiffusionControlNetXSPipeline, StableDiffusionDepth2ImgPipeline, StableDiffusionDiffEditPipeline,
      StableDiffusionGLIGENPipeline, StableDiffusionGLIGENTextImagePipeline, StableDiffusionImg2ImgPipeline,
      StableDiffusionInpaintPipeline, StableDiffusionInpaintPipelineLegacy, StableDiffusionLDM3DPipeline,
      StableDiffusionModelEditingPipeline, StableDiffusionPAGImg2ImgPipeline,
      StableDiffusionPAGInpaintPipeline, StableDiffusionPAGPipeline, StableDiffusionPanoramaPipeline,
      StableDiffusionParadigmsPipeline, StableDiffusionPipeline, StableDiffusionPix2PixZeroPipeline,
      StableDiffusionSAGPipeline, StableDiffusionUpscalePipeline, TextToVideoSDPipeline,
      TextToVideoZeroPipeline, VideoToVideoSDPipeline
    wan (3): AnyFlowFARPipeline, AnyFlowPipeline, WanPipeline
    auraflow (1): AuraFlowPipeline
    chroma (2): ChromaImg2ImgPipeline, ChromaPipeline
    cogview4 (2): CogView4ControlPipeline, CogView4Pipeline
    flux2klein (2): Flux2KleinInpaintPipeline, Flux2KleinPipeline
    flux2 (1): Flux2Pipeline
    flux (11): FluxControlImg2ImgPipeline, FluxControlInpaintPipeline, FluxControlNetImg2ImgPipeline,
      FluxControlNetInpaintPipeline, FluxControlPipeline, FluxFillPipeline, FluxImg2ImgPipeline,
      FluxInpaintPipeline, FluxKontextInpaintPipeline, FluxKontextPipeline, FluxPipeline
    hidream (1): HiDreamImagePipeline
    lumina2 (1): Lumina2Pipeline
    pixart (3): PixArtAlphaPipeline, PixArtSigmaPAGPipeline, PixArtSigmaPipeline
    qwenimage (5): QwenImageControlNetInpaintPipeline, QwenImageControlNetPipeline, QwenImageImg2ImgPipeline,
      QwenImageInpaintPipeline, QwenImagePipeline
    sana (2): SanaControlNetPipeline, SanaPipeline
    sd3 (7): StableDiffusion3ControlNetInpaintingPipeline, StableDiffusion3ControlNetPipeline,
      StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3PAGImg2ImgPipeline,
      StableDiffusion3PAGPipeline, StableDiffusion3Pipeline
    sdxl (17): StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetImg2ImgPipeline,
      StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLControlNetPAGImg2ImgPipeline,
      StableDiffusionXLControlNetPAGPipeline, StableDiffusionXLControlNetPipeline,
      StableDiffusionXLControlNetUnionImg2ImgPipeline, StableDiffusionXLControlNetUnionInpaintPipeline,
      StableDiffusionXLControlNetUnionPipeline, StableDiffusionXLControlNetXSPipeline,
      StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPAGImg2ImgPipeline,
      StableDiffusionXLPAGInpaintPipeline, StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline,
      TextToVideoZeroSDXLPipeline
    zimage (5): ZImageControlNetInpaintPipeline, ZImageControlNetPipeline, ZImageImg2ImgPipeline,
      ZImageInpaintPipeline, ZImagePipeline

  Refused (168), by reason (REFUSED in this module; the error names the reason):
    [kolors] (3): KolorsImg2ImgPipeline, KolorsPAGPipeline, KolorsPipeline
    [kandinsky5] (4): Kandinsky5I2IPipeline, Kandinsky5I2VPipeline, Kandinsky5T2IPipeline,
      Kandinsky5T2VPipeline
    [hunyuanimage] (2): HunyuanImagePipeline, HunyuanImageRefinerPipeline
    [redux] (1): FluxPriorReduxPipeline
    [qwen_edit] (3): QwenImageEditInpaintPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline
    [onnx] (5): OnnxStableDiffusionImg2ImgPipeline, OnnxStableDiffusionInpaintPipeline,
      OnnxStableDiffusionPipeline, OnnxStableDiffusionUpscalePipeline, StableDiffusionOnnxPipeline
    [wan_ftfy] (6): ChronoEditPipeline, LucyEditPipeline, WanAnimatePipeline, WanImageToVideoPipeline,
      WanVACEPipeline, WanVideoToVideoPipeline
    [own_family] (63): AceStepPipeline, AltDiffusionImg2ImgPipeline, AltDiffusionPipeline, AudioLDM2Pipeline,
      BlipDiffusionControlNetPipeline, BlipDiffusionPipeline, BriaFibo2Pipeline, BriaFiboEditPipeline,
      BriaFiboPipeline, Cosmos2_5_PredictBasePipeline, Cosmos2_5_TransferPipeline, DreamLiteMobilePipeline,
      DreamLitePipeline, EasyAnimateControlPipeline, EasyAnimateInpaintPipeline, EasyAnimatePipeline,
      ErnieImagePipeline, GlmImagePipeline, HunyuanDiTControlNetPipeline, HunyuanDiTPAGPipeline,
      HunyuanDiTPipeline, HunyuanSkyreelsImageToVideoPipeline, HunyuanVideo15ImageToVideoPipeline,
      HunyuanVideo15Pipeline, HunyuanVideoFramepackPipeline, HunyuanVideoImageToVideoPipeline,
      HunyuanVideoPipeline, JoyImageEditPipeline, Kandinsky6TI2VAPipeline, Krea2Pipeline,
      LTX2ConditionPipeline, LTX2DFRPipeline, LTX2DFRTemporalRefinePipeline, LTX2HDRPipeline,
      LTX2ImageToVideoPipeline, LTX2InContextPipeline, LTX2Pipeline, LTXI2VLongMultiPromptPipeline,
      LongCatAudioDiTPipeline, LuminaPipeline, MotifVideoImage2VideoPipeline, MotifVideoPipeline,
      NucleusMoEImagePipeline, OvisImagePipeline, PRXPipeline, PRXPixelPipeline, QwenImage21Pipeline,
      SanaWMPipeline, SkyReelsV2DiffusionForcingImageToVideoPipeline, SkyReelsV2DiffusionForcingPipeline,
      SkyReelsV2DiffusionForcingVideoToVideoPipeline, SkyReelsV2ImageToVideoPipeline, SkyReelsV2Pipeline,
      StableAudio3AudioToAudioPipeline, StableAudio3InpaintPipeline, StableAudio3Pipeline,
      StableCascadeDecoderPipeline, StableCascadePriorPipeline, StableUnCLIPImg2ImgPipeline,
      StableUnCLIPPipeline, UniDiffuserPipeline, WuerstchenDecoderPipeline, WuerstchenPriorPipeline
    [differs:PixArtAlphaPipeline] (15): AllegroPipeline, CogVideoXFunControlPipeline,
      CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXVideoToVideoPipeline, CogView3PlusPipeline,
      IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline, IFInpaintingPipeline,
      IFInpaintingSuperResolutionPipeline, IFPipeline, IFSuperResolutionPipeline, Kandinsky3Img2ImgPipeline,
      Kandinsky3Pipeline, LattePipeline
    [no_encode_prompt] (32): AmusedImg2ImgPipeline, AmusedInpaintPipeline, AmusedPipeline, AudioLDMPipeline,
      JoyImageEditPlusPipeline, KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline,
      KandinskyImg2ImgPipeline, KandinskyInpaintCombinedPipeline, KandinskyInpaintPipeline, KandinskyPipeline,
      KandinskyPriorPipeline, KandinskyV22PriorEmb2EmbPipeline, KandinskyV22PriorPipeline,
      MarigoldDepthPipeline, MarigoldIntrinsicsPipeline, MarigoldNormalsPipeline, MusicLDMPipeline,
      SanaWMLTX2Refiner, SemanticStableDiffusionPipeline, ShapEPipeline, StableCascadeCombinedPipeline,
      StableDiffusionInstructPix2PixPipeline, StableDiffusionPipelineSafe, UnCLIPImageVariationPipeline,
      UnCLIPPipeline, VQDiffusionPipeline, VersatileDiffusionDualGuidedPipeline, VersatileDiffusionPipeline,
      VersatileDiffusionTextToImagePipeline, VisualClozePipeline, WuerstchenCombinedPipeline
    [differs:StableDiffusionXLPipeline] (3): AnimateDiffSDXLPipeline, LEditsPPPipelineStableDiffusionXL,
      StableDiffusionXLInstructPix2PixPipeline
    [differs:StableDiffusionPipeline] (5): AnimateDiffVideoToVideoControlNetPipeline,
      AnimateDiffVideoToVideoPipeline, I2VGenXLPipeline, LEditsPPPipelineStableDiffusion,
      StableDiffusionLatentUpscalePipeline
    [differs:ChromaPipeline] (11): BriaPipeline, ChromaInpaintPipeline, Cosmos2TextToImagePipeline,
      Cosmos2VideoToWorldPipeline, CosmosTextToWorldPipeline, CosmosVideoToWorldPipeline,
      LTXConditionPipeline, LTXImageToVideoPipeline, LTXPipeline, MochiPipeline, StableAudioPipeline
    [differs:Flux2KleinPipeline] (1): Flux2KleinKVPipeline
    [differs:FluxPipeline] (2): FluxControlNetPipeline, VisualClozeGenerationPipeline
    [differs:WanPipeline] (2): HeliosPipeline, HeliosPyramidPipeline
    [differs:ZImagePipeline] (2): Ideogram4Pipeline, ZImageOmniPipeline
    [differs:QwenImagePipeline] (3): LongCatImageEditPipeline, LongCatImagePipeline, QwenImageLayeredPipeline
    [differs:SanaPipeline] (5): SanaImageToVideoPipeline, SanaPAGPipeline, SanaSprintImg2ImgPipeline,
      SanaSprintPipeline, SanaVideoPipeline
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from skrr_compile.core.encoder import PrunedEncoder
from skrr_compile.deploy.pipelines.encoder import (
    TEXT_ENCODERS,
    NoTextEncoderError,
    UnsupportedPipelineError,
)


# ---------------------------------------------------------------------------------------------------
# what a pipeline reads from each encoder
# ---------------------------------------------------------------------------------------------------
class BlockwiseProjection(nn.Module):
    """Block i of the input channels through module i, outputs concatenated (HiDream: a projection per layer)."""

    def __init__(self, parts: list[nn.Module], width: int):
        super().__init__()
        self.parts, self.width = nn.ModuleList(parts), width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.split(self.width, dim=-1)
        if len(blocks) != len(self.parts):
            raise ValueError(f"expected {len(self.parts)} blocks of {self.width} channels, got {x.shape[-1]} channels")
        return torch.cat([part(b) for part, b in zip(self.parts, blocks)], dim=-1)


class ColumnProjection(nn.Linear):
    """The block of a consumer linear layer that multiplies one encoder's channels (no bias)."""

    def __init__(self, weight: torch.Tensor, consumer: str, columns: tuple[int, int]):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.consumer, self.columns = consumer, columns

    def extra_repr(self) -> str:
        return f"{self.consumer}[:, {self.columns[0]}:{self.columns[1]}]"


def _module(pipe, path: str) -> nn.Module:
    module = pipe
    for part in path.split("."):
        module = getattr(module, part)
    return module


@dataclass(frozen=True)
class EncoderOutput:
    """One output of a text encoder that the pipeline consumes."""

    name: str  # "last_hidden_state" | "pooler_output" | "text_embeds" | "hidden_states[-2]" | "hidden_states[10,20]"
    consumer: str | tuple[str, ...] | None = None  # module path in the pipeline (a tuple: applied in turn); None: identity
    columns: tuple[int, int] | None = None  # block of the consumer's input features this output fills
    pooled: bool = False
    blockwise: int = 0  # with a tuple consumer: module i reads the i-th block of this many channels (not in turn)

    def read(self, out) -> torch.Tensor:
        if self.name.startswith("hidden_states["):
            hidden = getattr(out, "hidden_states", None)
            if hidden is None:
                raise ValueError(
                    f"{self.name} is read but the encoder returned no hidden states; call it with "
                    "output_hidden_states=True"
                )
            layers = [int(k) for k in self.name[len("hidden_states[") : -1].split(",")]
            return hidden[layers[0]] if len(layers) == 1 else torch.cat([hidden[k] for k in layers], dim=-1)
        value = getattr(out, self.name, None)
        if value is None:
            raise ValueError(f"the encoder output has no {self.name!r} (fields: {list(out.keys())})")
        return value

    def projection(self, pipe) -> nn.Module | None:
        if self.consumer is None:
            return None
        if isinstance(self.consumer, tuple):
            modules = [_module(pipe, path) for path in self.consumer]
            if self.blockwise:
                return BlockwiseProjection(modules, self.blockwise)
            return nn.Sequential(*modules)
        module = _module(pipe, self.consumer)
        if self.columns is None:
            return module
        linear = module
        if not isinstance(linear, nn.Linear):
            raise UnsupportedPipelineError(f"{self.consumer} is a {type(linear).__name__}, expected nn.Linear")
        a, b = self.columns
        return ColumnProjection(linear.weight[:, a:b], self.consumer, (a, b))

    def describe(self) -> str:
        target = "identity" if self.consumer is None else self.consumer
        if isinstance(target, tuple):
            target = (f"per {self.blockwise}-channel block: " + ", ".join(target)) if self.blockwise else " -> ".join(target)
        if self.columns is not None:
            target += f"[:, {self.columns[0]}:{self.columns[1]}]"
        return f"{self.name} -> {target}"


@dataclass(frozen=True)
class EncoderSpec:
    """How the pipeline calls one text encoder and what it reads from it."""

    component: str
    tokenizer: str
    outputs: tuple[EncoderOutput, ...]
    attention_mask: bool  # the pipeline passes the tokenizer's mask (else the encoder sees all ones)
    read: str  # "mask": only attention-mask tokens reach the denoiser; "all": every padded position
    padding: str  # "longest" (mask-respecting encoders) or "max_length" (the pipeline pads)
    max_length: int
    template: str | None = None  # "...{prompt}...": the text the pipeline wraps each prompt in (LLM encoders)
    drop_tokens: int = 0  # the first N tokens of each embedding never reach the denoiser
    hidden_layer: int | tuple[int, ...] | None = None  # hidden_states index (or stack) read instead of the last
    module: str | None = None  # the text model inside the component that is traced and pruned (an LLM's ".model")
    special_tokens: bool = True  # False: the template already holds them (a chat template's BOS), add none
    pad_multiple: int = 0  # the pipeline left-pads the ids with pad tokens to a multiple of this (CogView4: 16)
    default: bool = True  # pruned when prune_pipeline is not told which encoders to prune

    @property
    def hidden_states(self) -> bool:
        return any(o.name.startswith("hidden_states[") for o in self.outputs)

    def select(self) -> Callable:
        outputs = self.outputs

        def select(out):
            values = tuple(o.read(out) for o in outputs)
            return values[0] if len(values) == 1 else values

        select.outputs = [o.name for o in outputs]  # type: ignore[attr-defined]
        return select

    def projections(self, pipe):
        projections = tuple(o.projection(pipe) for o in self.outputs)
        return projections[0] if len(projections) == 1 else projections

    def encoder(self, pipe) -> nn.Module:
        """The module that is traced and pruned: the component, or the text model inside it (`module`).

        The pipeline calls the component with input_ids and a mask only and reads hidden states that the text
        model alone computes, so the pruned text model replaces the whole component (an LM head or a vision
        tower the pipeline never calls is left out).
        """
        component = getattr(pipe, self.component)
        if self.module is None or isinstance(component, PrunedEncoder):
            return component
        try:
            return component.get_submodule(self.module)
        except AttributeError as e:
            raise UnsupportedPipelineError(
                f"pipe.{self.component} is a {type(component).__name__} without .{self.module}, the text model "
                f"this pipeline's encoder runs ({e})"
            ) from e

    def calibration_tokenizer(self, pipe):
        tokenizer = getattr(pipe, self.tokenizer)
        if tokenizer is None:
            raise NoTextEncoderError(f"pipe.{self.tokenizer} (the tokenizer of {self.component}) is None")
        from transformers import ProcessorMixin

        if isinstance(tokenizer, ProcessorMixin):  # FLUX.2's processor: its text goes through its tokenizer
            tokenizer = tokenizer.tokenizer
        if self.attention_mask and self.special_tokens and not self.pad_multiple:
            return tokenizer
        return PipelineTokenizer(tokenizer, mask=self.attention_mask, special_tokens=self.special_tokens,
                                 pad_multiple=self.pad_multiple)

    def to_dict(self) -> dict:
        return {
            "component": self.component,
            "tokenizer": self.tokenizer,
            "outputs": [o.describe() for o in self.outputs],
            "attention_mask": self.attention_mask,
            "read": self.read,
            "padding": self.padding,
            "max_length": self.max_length,
            "template": self.template,
            "drop_tokens": self.drop_tokens,
            "hidden_layer": self.hidden_layer,
            "module": self.module,
            "special_tokens": self.special_tokens,
            "pad_multiple": self.pad_multiple,
            "default": self.default,
        }


@dataclass
class PipelineSpec:
    pipeline: str
    family: str
    encoders: dict[str, EncoderSpec]

    def to_dict(self) -> dict:
        return {
            "pipeline": self.pipeline,
            "family": self.family,
            "encoders": {k: v.to_dict() for k, v in self.encoders.items()},
        }


class PipelineTokenizer:
    """The tokenizer as the pipeline uses it: an all-ones mask for an encoder it calls without one (`mask=False`),
    no special tokens added to a text whose template already holds them (`special_tokens=False`), padded ids
    left-padded with the pad token to a multiple of `pad_multiple` (CogView4, whose encoder sees them unmasked)."""

    def __init__(self, tokenizer, mask: bool = False, special_tokens: bool = True, pad_multiple: int = 0):
        self._tokenizer, self._mask, self._special = tokenizer, mask, special_tokens
        self._multiple = pad_multiple

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        if not self._special:
            kwargs["add_special_tokens"] = False
        enc = self._tokenizer(*args, **kwargs)
        ids = enc.get("input_ids") if hasattr(enc, "get") else None
        if self._multiple and kwargs.get("padding") and isinstance(ids, torch.Tensor):
            extra = -ids.shape[-1] % self._multiple
            if extra:
                pad = torch.full((*ids.shape[:-1], extra), self._tokenizer.pad_token_id, dtype=ids.dtype)
                enc["input_ids"] = torch.cat([pad, ids], dim=-1)
                mask = enc.get("attention_mask")
                if mask is not None:
                    enc["attention_mask"] = torch.cat([torch.zeros_like(pad).to(mask.dtype), mask], dim=-1)
        mask = enc.get("attention_mask") if hasattr(enc, "get") else None
        if mask is not None and not self._mask:
            if isinstance(mask, torch.Tensor):
                enc["attention_mask"] = torch.ones_like(mask)
            else:
                enc["attention_mask"] = [[1] * len(row) for row in mask] if mask and isinstance(mask[0], list) else [1] * len(mask)
        return enc

    def __repr__(self) -> str:
        return (f"PipelineTokenizer({type(self._tokenizer).__name__}, mask={self._mask}, special_tokens={self._special}, "
                f"pad_multiple={self._multiple})")


# ---------------------------------------------------------------------------------------------------
# which family a pipeline class belongs to: by what its code does, not by its name
# ---------------------------------------------------------------------------------------------------
# family -> (its base pipeline classes, the denoiser component its consumers live in)
FAMILY_BASES: dict[str, tuple[tuple[str, ...], str]] = {
    "pixart": (("PixArtAlphaPipeline", "PixArtSigmaPipeline"), "transformer"),
    "sd": (("StableDiffusionPipeline",), "unet"),
    "sdxl": (("StableDiffusionXLPipeline",), "unet"),
    "sd3": (("StableDiffusion3Pipeline",), "transformer"),
    "flux": (("FluxPipeline",), "transformer"),
    "sana": (("SanaPipeline",), "transformer"),
    "lumina2": (("Lumina2Pipeline",), "transformer"),
    "zimage": (("ZImagePipeline",), "transformer"),
    "chroma": (("ChromaPipeline",), "transformer"),
    "auraflow": (("AuraFlowPipeline",), "transformer"),
    "wan": (("WanPipeline",), "transformer"),
    "hidream": (("HiDreamImagePipeline",), "transformer"),
    "flux2": (("Flux2Pipeline",), "transformer"),
    "flux2klein": (("Flux2KleinPipeline",), "transformer"),
    "qwenimage": (("QwenImagePipeline",), "transformer"),
    "cogview4": (("CogView4Pipeline",), "transformer"),
}
ENTRY = "encode_prompt"  # where a pipeline's prompt encoding starts


def _function_node(fn):
    """The function's AST without its docstring, decorators, comments, type annotations and the default of
    `max_sequence_length` (the spec takes the length from `__call__`, which passes it down)."""
    import ast
    import textwrap

    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    node.decorator_list, node.returns = [], None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
    args = node.args
    for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
        if a is not None:
            a.annotation = None
    positional = [*args.posonlyargs, *args.args]
    for i in range(len(args.defaults)):
        if positional[len(positional) - len(args.defaults) + i].arg == "max_sequence_length":
            args.defaults[i] = ast.Constant(None)
    for i, a in enumerate(args.kwonlyargs):
        if a.arg == "max_sequence_length" and args.kw_defaults[i] is not None:
            args.kw_defaults[i] = ast.Constant(None)
    return node


def prompt_encoding(cls) -> dict[str, str | None]:
    """`encode_prompt` and every method it calls on `self` and every diffusers pipeline-module function it calls
    by name (prompt cleaning: `basic_clean`, `prompt_clean`), transitively, as normalized ASTs (`_function_node`).

    Only methods of pipeline classes count: a loader mixin's (textual inversion's `maybe_convert_prompt`, which
    encode_prompt calls only on pipelines that have it) acts only on what the user loads into the pipeline.
    """
    import ast

    from diffusers import DiffusionPipeline

    seen, todo, reading = set(), [(ENTRY, None)], {}
    while todo:
        name, scope = todo.pop()
        key = name if scope is None else f"{name}()"
        if key in seen:
            continue
        seen.add(key)
        if scope is None:  # a method
            owner = next((c for c in cls.__mro__ if name in c.__dict__), None)
            if owner is None or owner is DiffusionPipeline or not issubclass(owner, DiffusionPipeline):
                continue
            fn = owner.__dict__[name]
            fn = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn
        else:  # a module-level function of the pipeline's module
            fn = scope.get(name)
            if not inspect.isfunction(fn) or not fn.__module__.startswith("diffusers.pipelines"):
                continue
        if not inspect.isfunction(fn):
            continue
        try:
            node = _function_node(fn)
        except (OSError, TypeError, SyntaxError):
            reading[key] = None  # no source: never equal to a base's
            continue
        reading[key] = ast.dump(node)
        for n in ast.walk(node):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self":
                todo.append((n.attr, None))
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
                todo.append((n.func.id, fn.__globals__))
    return reading


def text_components(cls) -> tuple[tuple[str, str], ...]:
    """The `text_encoder*` / `tokenizer*` parameters of the class's `__init__` with their annotated classes."""
    params = inspect.signature(cls.__init__).parameters
    return tuple((n, str(p.annotation)) for n, p in params.items() if n.startswith(("text_encoder", "tokenizer")))


def _init_params(cls) -> set[str]:
    try:
        return set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return set()


@functools.cache
def _base_readings() -> dict[str, tuple[str, tuple, dict]]:
    import diffusers

    bases = {}
    for family, (names, _) in FAMILY_BASES.items():
        for name in names:
            cls = getattr(diffusers, name, None)
            if cls is not None:
                bases[name] = (family, text_components(cls), prompt_encoding(cls))
    return bases


@functools.cache
def resolve_family(cls) -> str | None:
    """The family whose spec reads `cls`'s text encoders, or None.

    The rule: `cls` resolves to family F when, against one of F's base classes (`FAMILY_BASES`),
      1. its text components (`text_encoder*` / `tokenizer*` in `__init__`, with their annotated classes) are
         the base's,
      2. its prompt encoding is the base's: `encode_prompt`, every pipeline method it calls on `self` and every
         pipeline-module function it calls (prompt cleaning), transitively, have the same AST as the base's
         (`prompt_encoding`: docstrings, comments, decorators, type annotations and the `max_sequence_length`
         default left out),
      3. it has the base's denoiser component (`transformer` / `unet`), where the family's consumers live.
    A subclass that overrides none of these resolves like its base; a variant whose encode_prompt is
    `# Copied from` the base's resolves; one whose code differs by a line does not (pass `spec=`).
    """
    if not isinstance(cls, type):
        return None
    try:
        components, reading = text_components(cls), prompt_encoding(cls)
    except (TypeError, ValueError, OSError):
        return None
    if not reading:
        return None
    params = _init_params(cls)
    for family, base_components, base_reading in _base_readings().values():
        if (base_components == components and base_reading == reading
                and FAMILY_BASES[family][1] in params):
            return family
    return None


def closest_family(cls) -> tuple[str, list[str]] | None:
    """(the base class with the same text components and methods whose code differs least, the methods that
    differ), for the refusal message; None when no base has the same components."""
    try:
        components, reading = text_components(cls), prompt_encoding(cls)
    except (TypeError, ValueError, OSError):
        return None
    best = None
    for name, (_family, base_components, base_reading) in _base_readings().items():
        if base_components != components:
            continue
        differ = sorted(m for m in set(reading) | set(base_reading) if reading.get(m) != base_reading.get(m))
        if best is None or len(differ) < len(best[1]):
            best = (name, differ)
    return best


def unsupported_message(cls) -> str:
    """One line: why `cls` is refused, the supported families, and how to pass an explicit spec."""
    name = cls.__name__
    reason = REFUSED.get(name)
    if reason is None:
        near = closest_family(cls)
        if near is not None and near[1]:
            reason = f"its {', '.join(near[1])} differ(s) from {near[0]}'s"
        elif near is not None:
            reason = f"it has no {FAMILY_BASES[_base_readings()[near[0]][0]][1]} (the denoiser {near[0]}'s spec reads through)"
        else:
            reason = "its text encoders and encode_prompt are no supported family's"
    else:
        reason = refusal_reason(reason)
    families = "; ".join(f"{family}: {'/'.join(names)}" for family, (names, _) in FAMILY_BASES.items())
    return (
        f"{name} is not a supported pipeline ({reason}). Supported: {families}, and every class that encodes prompts "
        "as one of them. A pipeline that reads its encoders as a family does: spec='<family>' (describe_pipeline, "
        "prune_pipeline, apply_to_pipeline) or --spec <family> (prune-pipeline, inspect-pipeline); a custom "
        "reading: spec=PipelineSpec(...)"
    )


# ---------------------------------------------------------------------------------------------------
# every other diffusers 0.42 class with a text encoder: refused, with the reason (tests/test_pipeline_variants.py
# fails on a class that neither resolves nor is listed here)
# ---------------------------------------------------------------------------------------------------
REASONS: dict[str, str] = {
    "kolors": "Kolors reads ChatGLM3 (diffusers' kolors.text_encoder.ChatGLMModel, a port of THUDM's remote code, "
              "no transformers class): a pruned encoder is rebuilt from its config through transformers, which has "
              "no ChatGLM, so it could not be loaded back",
    "kandinsky5": "Kandinsky 5 reads Qwen2.5-VL behind a template it truncates by decoded text and packs by "
                  "cu_seqlens, plus CLIP's pooled output: no spec for that reading yet",
    "hunyuanimage": "HunyuanImage reads Qwen2.5-VL plus a ByT5 glyph encoder fed only the quoted text of each prompt "
                    "(_get_byt5_prompt_embeds); calibrating ByT5 needs prompts with quoted glyph text: no spec yet",
    "redux": "FLUX Redux has no denoiser: its prompt embeddings (T5, the Redux image tokens concatenated) feed a "
             "separate FluxPipeline holding the same CLIP and T5; prune that pipeline (family flux)",
    "qwen_edit": "Qwen-Image edit feeds Qwen2.5-VL the input image with the prompt (vision tokens inside the "
                 "template, 64 prefix tokens dropped); the denoiser reads image-conditioned states, and skrr-compile "
                 "calibrates on prompts only (no calibration images): refused rather than scored on a text-only proxy",
    "onnx": "an ONNX pipeline: its encoders are ONNX Runtime sessions, not torch modules (prune the torch pipeline, "
            "then export)",
    "wan_ftfy": "its basic_clean calls ftfy unconditionally (Wan's only when ftfy is installed); the rest of its "
                "prompt encoding is Wan's: with ftfy installed pass spec='wan' (UMT5 pruned, calibrated on text; an "
                "i2v CLIP image encoder reads the input image, never the prompt, and stays dense)",
    "own_family": "a family of its own (its encoders and encode_prompt are no supported family's): no spec yet",
    "no_encode_prompt": "no encode_prompt: it encodes prompts inline in __call__, or through sub-pipelines, or not at "
                        "all (a prior / combined / image-conditioned pipeline)",
}
REFUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "kolors": (
        "KolorsImg2ImgPipeline", "KolorsPAGPipeline", "KolorsPipeline",
    ),
    "kandinsky5": (
        "Kandinsky5I2IPipeline", "Kandinsky5I2VPipeline", "Kandinsky5T2IPipeline", "Kandinsky5T2VPipeline",
    ),
    "hunyuanimage": (
        "HunyuanImagePipeline", "HunyuanImageRefinerPipeline",
    ),
    "redux": (
        "FluxPriorReduxPipeline",
    ),
    "qwen_edit": (
        "QwenImageEditInpaintPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline",
    ),
    "onnx": (
        "OnnxStableDiffusionImg2ImgPipeline", "OnnxStableDiffusionInpaintPipeline", "OnnxStableDiffusionPipeline",
        "OnnxStableDiffusionUpscalePipeline", "StableDiffusionOnnxPipeline",
    ),
    "wan_ftfy": (
        "ChronoEditPipeline", "LucyEditPipeline", "WanAnimatePipeline", "WanImageToVideoPipeline", "WanVACEPipeline",
        "WanVideoToVideoPipeline",
    ),
    "own_family": (
        "AceStepPipeline", "AltDiffusionImg2ImgPipeline", "AltDiffusionPipeline", "AudioLDM2Pipeline",
        "BlipDiffusionControlNetPipeline", "BlipDiffusionPipeline", "BriaFibo2Pipeline", "BriaFiboEditPipeline",
        "BriaFiboPipeline", "Cosmos2_5_PredictBasePipeline", "Cosmos2_5_TransferPipeline", "DreamLiteMobilePipeline",
        "DreamLitePipeline", "EasyAnimateControlPipeline", "EasyAnimateInpaintPipeline", "EasyAnimatePipeline",
        "ErnieImagePipeline", "GlmImagePipeline", "HunyuanDiTControlNetPipeline", "HunyuanDiTPAGPipeline",
        "HunyuanDiTPipeline", "HunyuanSkyreelsImageToVideoPipeline", "HunyuanVideo15ImageToVideoPipeline",
        "HunyuanVideo15Pipeline", "HunyuanVideoFramepackPipeline", "HunyuanVideoImageToVideoPipeline",
        "HunyuanVideoPipeline", "JoyImageEditPipeline", "Kandinsky6TI2VAPipeline", "Krea2Pipeline",
        "LTX2ConditionPipeline", "LTX2DFRPipeline", "LTX2DFRTemporalRefinePipeline", "LTX2HDRPipeline",
        "LTX2ImageToVideoPipeline", "LTX2InContextPipeline", "LTX2Pipeline", "LTXI2VLongMultiPromptPipeline",
        "LongCatAudioDiTPipeline", "LuminaPipeline", "MotifVideoImage2VideoPipeline", "MotifVideoPipeline",
        "NucleusMoEImagePipeline", "OvisImagePipeline", "PRXPipeline", "PRXPixelPipeline", "QwenImage21Pipeline",
        "SanaWMPipeline", "SkyReelsV2DiffusionForcingImageToVideoPipeline", "SkyReelsV2DiffusionForcingPipeline",
        "SkyReelsV2DiffusionForcingVideoToVideoPipeline", "SkyReelsV2ImageToVideoPipeline", "SkyReelsV2Pipeline",
        "StableAudio3AudioToAudioPipeline", "StableAudio3InpaintPipeline", "StableAudio3Pipeline",
        "StableCascadeDecoderPipeline", "StableCascadePriorPipeline", "StableUnCLIPImg2ImgPipeline",
        "StableUnCLIPPipeline", "UniDiffuserPipeline", "WuerstchenDecoderPipeline", "WuerstchenPriorPipeline",
    ),
    "differs:PixArtAlphaPipeline": (
        "AllegroPipeline", "CogVideoXFunControlPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXPipeline",
        "CogVideoXVideoToVideoPipeline", "CogView3PlusPipeline", "IFImg2ImgPipeline",
        "IFImg2ImgSuperResolutionPipeline", "IFInpaintingPipeline", "IFInpaintingSuperResolutionPipeline", "IFPipeline",
        "IFSuperResolutionPipeline", "Kandinsky3Img2ImgPipeline", "Kandinsky3Pipeline", "LattePipeline",
    ),
    "no_encode_prompt": (
        "AmusedImg2ImgPipeline", "AmusedInpaintPipeline", "AmusedPipeline", "AudioLDMPipeline",
        "JoyImageEditPlusPipeline", "KandinskyCombinedPipeline", "KandinskyImg2ImgCombinedPipeline",
        "KandinskyImg2ImgPipeline", "KandinskyInpaintCombinedPipeline", "KandinskyInpaintPipeline", "KandinskyPipeline",
        "KandinskyPriorPipeline", "KandinskyV22PriorEmb2EmbPipeline", "KandinskyV22PriorPipeline",
        "MarigoldDepthPipeline", "MarigoldIntrinsicsPipeline", "MarigoldNormalsPipeline", "MusicLDMPipeline",
        "SanaWMLTX2Refiner", "SemanticStableDiffusionPipeline", "ShapEPipeline", "StableCascadeCombinedPipeline",
        "StableDiffusionInstructPix2PixPipeline", "StableDiffusionPipelineSafe", "UnCLIPImageVariationPipeline",
        "UnCLIPPipeline", "VQDiffusionPipeline", "VersatileDiffusionDualGuidedPipeline", "VersatileDiffusionPipeline",
        "VersatileDiffusionTextToImagePipeline", "VisualClozePipeline", "WuerstchenCombinedPipeline",
    ),
    "differs:StableDiffusionXLPipeline": (
        "AnimateDiffSDXLPipeline", "LEditsPPPipelineStableDiffusionXL", "StableDiffusionXLInstructPix2PixPipeline",
    ),
    "differs:StableDiffusionPipeline": (
        "AnimateDiffVideoToVideoControlNetPipeline", "AnimateDiffVideoToVideoPipeline", "I2VGenXLPipeline",
        "LEditsPPPipelineStableDiffusion", "StableDiffusionLatentUpscalePipeline",
    ),
    "differs:ChromaPipeline": (
        "BriaPipeline", "ChromaInpaintPipeline", "Cosmos2TextToImagePipeline", "Cosmos2VideoToWorldPipeline",
        "CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline", "LTXConditionPipeline", "LTXImageToVideoPipeline",
        "LTXPipeline", "MochiPipeline", "StableAudioPipeline",
    ),
    "differs:Flux2KleinPipeline": (
        "Flux2KleinKVPipeline",
    ),
    "differs:FluxPipeline": (
        "FluxControlNetPipeline", "VisualClozeGenerationPipeline",
    ),
    "differs:WanPipeline": (
        "HeliosPipeline", "HeliosPyramidPipeline",
    ),
    "differs:ZImagePipeline": (
        "Ideogram4Pipeline", "ZImageOmniPipeline",
    ),
    "differs:QwenImagePipeline": (
        "LongCatImageEditPipeline", "LongCatImagePipeline", "QwenImageLayeredPipeline",
    ),
    "differs:SanaPipeline": (
        "SanaImageToVideoPipeline", "SanaPAGPipeline", "SanaSprintImg2ImgPipeline", "SanaSprintPipeline",
        "SanaVideoPipeline",
    ),
}

REFUSED: dict[str, str] = {name: reason for reason, names in REFUSED_GROUPS.items() for name in names}


def refusal_reason(key: str) -> str:
    if key.startswith("differs:"):
        base = key.split(":", 1)[1]
        return (f"its prompt encoding differs from {base}'s, the family with the same text components (a variant "
                "rewritten, or a family of its own): no spec until its reading is checked")
    return REASONS[key]


def family_of(pipe) -> str:
    family = resolve_family(type(pipe))
    if family is None:
        raise UnsupportedPipelineError(unsupported_message(type(pipe)))
    return family


def present_encoders(pipe) -> list[str]:
    return [n for n in TEXT_ENCODERS if isinstance(getattr(pipe, n, None), nn.Module)]


def _call_default(pipe, name: str, fallback: int) -> int:
    param = _call_parameter(pipe, name)
    if param is not None and isinstance(param.default, int):
        return param.default
    return fallback


def _call_value(pipe, name: str, fallback):
    param = _call_parameter(pipe, name)
    return fallback if param is None or param.default in (None, inspect.Parameter.empty) else param.default


def _call_parameter(pipe, name: str):
    try:
        return inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None


def _model_max_length(tokenizer, fallback: int = 77) -> int:
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 100_000 else fallback


def _config(module) -> object:
    return getattr(module, "config", None)


SPEC_ATTRIBUTE = "_skrr_spec"  # an explicit spec given once sticks to the pipeline object (apply, save, sizes)


def describe_pipeline(pipe, max_sequence_length: int | None = None, *, spec=None, **call_kwargs) -> PipelineSpec:
    """Each text encoder of `pipe`, how the pipeline calls it, and the module that consumes each output.

    `max_sequence_length`: the T5 length the pipeline will be called with (default: the pipeline's default).
    `call_kwargs`: other arguments the pipeline will be called with that change what it encodes (Sana:
    `complex_human_instruction`); unset ones take the pipeline's defaults.
    `spec`: for a pipeline the resolution (`resolve_family`) refuses: a family name (its builder reads the
    pipeline as that family's), or a `PipelineSpec` (a custom reading, used as given). It sticks to `pipe`, so
    that apply_to_pipeline, save_pipeline and encoder_sizes on the same object use it too.
    """
    present = present_encoders(pipe)
    if not present:
        components = sorted(k for k, v in getattr(pipe, "components", {}).items() if v is not None)
        raise NoTextEncoderError(
            f"{type(pipe).__name__} has no text encoder to prune (looked for {', '.join(TEXT_ENCODERS)}; "
            f"its components: {', '.join(components) or 'none'})"
        )
    if spec is None:
        spec = getattr(pipe, SPEC_ATTRIBUTE, None)
    elif isinstance(spec, (str, PipelineSpec)):
        object.__setattr__(pipe, SPEC_ATTRIBUTE, spec)
    else:
        raise TypeError(f"spec must be a family name ({', '.join(BUILDERS)}) or a PipelineSpec, got {type(spec).__name__}")
    if isinstance(spec, PipelineSpec):
        encoders = {name: es for name, es in spec.encoders.items() if name in present}
        if not encoders:
            raise NoTextEncoderError(f"{type(pipe).__name__}: none of the spec's text encoders is loaded")
        return PipelineSpec(pipeline=type(pipe).__name__, family=spec.family, encoders=encoders)
    if spec is not None and spec not in BUILDERS:
        raise UnsupportedPipelineError(f"spec={spec!r} is no family; the families: {', '.join(BUILDERS)}")
    family = spec or family_of(pipe)
    builder = BUILDERS[family]
    unexpected = sorted(set(call_kwargs) - set(list(inspect.signature(builder).parameters)[2:]))
    if unexpected:
        raise TypeError(f"{type(pipe).__name__}: unexpected pipeline arguments {unexpected}")
    try:
        specs = builder(pipe, max_sequence_length, **call_kwargs)
    except AttributeError as e:  # a consumer module the family reads through is missing
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} read as {family}: {e} (the {family} spec reads its encoders through that module)"
        ) from e
    encoders = {name: es for name, es in specs.items() if name in present}
    if not encoders:
        raise NoTextEncoderError(f"{type(pipe).__name__}: none of its text encoders is loaded")
    return PipelineSpec(pipeline=type(pipe).__name__, family=family, encoders=encoders)


def _pixart(pipe, max_seq):
    n = max_seq or _call_default(pipe, "max_sequence_length", 120)
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer", (EncoderOutput("last_hidden_state", "transformer.caption_projection"),),
            attention_mask=True, read="mask", padding="longest", max_length=n,
        )
    }


def _clip_len(pipe, tokenizer_name: str) -> int:
    return _model_max_length(getattr(pipe, tokenizer_name, None))


def _sd(pipe, max_seq):
    cfg = _config(pipe.text_encoder)
    with_mask = bool(getattr(cfg, "use_attention_mask", False))
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer", (EncoderOutput("last_hidden_state"),), attention_mask=with_mask,
            read="mask" if with_mask else "all", padding="max_length", max_length=_clip_len(pipe, "tokenizer"),
        )
    }


def _sdxl(pipe, max_seq):
    specs = {}
    if getattr(pipe, "text_encoder", None) is not None:
        specs["text_encoder"] = EncoderSpec(
            "text_encoder", "tokenizer", (EncoderOutput("hidden_states[-2]"),), attention_mask=False,
            read="all", padding="max_length", max_length=_clip_len(pipe, "tokenizer"),
        )
    enc2 = getattr(pipe, "text_encoder_2", None)
    if enc2 is not None:
        width = int(_config(enc2).projection_dim)
        specs["text_encoder_2"] = EncoderSpec(
            "text_encoder_2", "tokenizer_2",
            (EncoderOutput("hidden_states[-2]"),
             EncoderOutput("text_embeds", "unet.add_embedding.linear_1", (0, width), pooled=True)),
            attention_mask=False, read="all", padding="max_length", max_length=_clip_len(pipe, "tokenizer_2"),
        )
    return specs


def _clamped(columns: tuple[int, int], limit: int) -> tuple[int, int] | None:
    a, b = columns[0], min(columns[1], limit)
    return (a, b) if b > a else None


def _sd3(pipe, max_seq):
    joint = int(pipe.transformer.config.joint_attention_dim)
    pooled_in = int(pipe.transformer.time_text_embed.text_embedder.linear_1.in_features)
    n = max_seq or _call_default(pipe, "max_sequence_length", 256)
    specs = {}
    hidden_offset = pooled_offset = 0
    for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        enc = getattr(pipe, name, None)
        if enc is None:
            continue
        cfg = _config(enc)
        hidden = _clamped((hidden_offset, hidden_offset + int(cfg.hidden_size)), joint)
        pooled = _clamped((pooled_offset, pooled_offset + int(cfg.projection_dim)), pooled_in)
        hidden_offset += int(cfg.hidden_size)
        pooled_offset += int(cfg.projection_dim)
        outputs = []
        if hidden is not None:  # SD3 pads CLIP channels to T5's width, or crops them when they are wider
            outputs.append(EncoderOutput("hidden_states[-2]", "transformer.context_embedder", hidden))
        if pooled is not None:
            outputs.append(EncoderOutput("text_embeds", "transformer.time_text_embed.text_embedder.linear_1", pooled, pooled=True))
        specs[name] = EncoderSpec(
            name, tok, tuple(outputs), attention_mask=False, read="all", padding="max_length",
            max_length=_clip_len(pipe, tok),
        )
    if getattr(pipe, "text_encoder_3", None) is not None:
        d = int(_config(pipe.text_encoder_3).d_model)
        specs["text_encoder_3"] = EncoderSpec(
            "text_encoder_3", "tokenizer_3",
            (EncoderOutput("last_hidden_state", "transformer.context_embedder", (0, min(d, joint))),),
            attention_mask=False, read="all", padding="max_length", max_length=n,
        )
    return specs


def _flux(pipe, max_seq):
    n = max_seq or _call_default(pipe, "max_sequence_length", 512)
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer",
            (EncoderOutput("pooler_output", "transformer.time_text_embed.text_embedder", pooled=True),),
            attention_mask=False, read="all", padding="max_length", max_length=_clip_len(pipe, "tokenizer"),
        ),
        "text_encoder_2": EncoderSpec(
            "text_encoder_2", "tokenizer_2", (EncoderOutput("last_hidden_state", "transformer.context_embedder"),),
            attention_mask=False, read="all", padding="max_length", max_length=n,
        ),
    }


_UNSET = object()


def _sana(pipe, max_seq, complex_human_instruction=_UNSET):
    """Sana: Gemma-2 behind the complex human instruction; position 0 and the last M - 1 positions read."""
    m = max_seq or _call_default(pipe, "max_sequence_length", 300)
    chi = complex_human_instruction
    if chi is _UNSET:
        param = _call_parameter(pipe, "complex_human_instruction")
        chi = param.default if param is not None and param.default is not inspect.Parameter.empty else None
    tokenizer = pipe.tokenizer
    if not chi:
        template, drop, length = None, 0, m
    else:
        text = "\n".join(chi)
        c = len(tokenizer.encode(text))
        template, drop, length = text + "{prompt}", c - 1, c + m - 2
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer", (EncoderOutput("last_hidden_state", "transformer.caption_projection"),),
            attention_mask=True, read="mask", padding="longest", max_length=length, template=template,
            drop_tokens=drop,
        )
    }


def _lumina2(pipe, max_seq, system_prompt=None):
    """Lumina 2: Gemma-2's penultimate layer behind the system prompt, every mask token read."""
    m = max_seq or _call_default(pipe, "max_sequence_length", 256)
    system = system_prompt if system_prompt is not None else pipe.system_prompt
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer",
            (EncoderOutput("hidden_states[-2]", "transformer.time_caption_embed.caption_embedder"),),
            attention_mask=True, read="mask", padding="longest", max_length=m,
            template=system + " <Prompt Start> {prompt}", hidden_layer=-2,
        )
    }


def _chat_template(pipe, messages: list[dict], **kwargs) -> str:
    """The pipeline's chat template rendered with the placeholder "{prompt}" as the prompt's text.

    A template that rewrites the content would be caught here or by the spec test, not silently mis-scored.
    """
    tokenizer = pipe.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__}: its tokenizer has no chat template, which the pipeline renders every prompt through"
        )
    template = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    if template.count("{prompt}") != 1:
        raise UnsupportedPipelineError(f"{type(pipe).__name__}: the chat template does not keep the prompt verbatim")
    return template


def _zimage(pipe, max_seq):
    """Z-Image: Qwen3's penultimate layer behind the tokenizer's chat template, mask tokens only."""
    m = max_seq or _call_default(pipe, "max_sequence_length", 512)
    template = _chat_template(pipe, [{"role": "user", "content": "{prompt}"}], add_generation_prompt=True,
                              enable_thinking=True)
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer", (EncoderOutput("hidden_states[-2]", "transformer.cap_embedder"),),
            attention_mask=True, read="mask", padding="longest", max_length=m, template=template, hidden_layer=-2,
        )
    }


def _chroma(pipe, max_seq):
    """Chroma (T5) and AuraFlow (UMT5): the last hidden state of the mask tokens -> context_embedder."""
    n = max_seq or _call_default(pipe, "max_sequence_length", 256 if type(pipe).__name__.startswith("Aura") else 512)
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer", (EncoderOutput("last_hidden_state", "transformer.context_embedder"),),
            attention_mask=True, read="mask", padding="longest", max_length=n,
        )
    }


def _wan(pipe, max_seq):
    """Wan: UMT5's last hidden state, zeroed beyond the mask -> each transformer's text embedder."""
    n = max_seq or _call_default(pipe, "max_sequence_length", 512)
    outputs = tuple(
        EncoderOutput("last_hidden_state", f"{t}.condition_embedder.text_embedder")
        for t in ("transformer", "transformer_2") if getattr(pipe, t, None) is not None
    )
    return {
        "text_encoder": EncoderSpec("text_encoder", "tokenizer", outputs, attention_mask=True, read="mask",
                                    padding="longest", max_length=n)
    }


def _hidream(pipe, max_seq):
    """HiDream: pooled CLIP-L|CLIP-G -> p_embedder; T5 and every Llama layer the transformer reads -> its own
    caption projection. T5 and Llama are pruned by default, the CLIPs when named (module docstring)."""
    n = max_seq or _call_default(pipe, "max_sequence_length", 128)
    projections = len(pipe.transformer.caption_projection)
    pooled_in = int(pipe.transformer.p_embedder.pooled_embedder.linear_1.in_features)
    specs = {}
    for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        enc = getattr(pipe, name, None)
        if enc is None:
            continue
        width = int(_config(enc).projection_dim)  # pooled = [CLIP-L | CLIP-G]
        columns = (0, width) if name == "text_encoder" else (pooled_in - width, pooled_in)
        specs[name] = EncoderSpec(
            name, tok,
            (EncoderOutput("text_embeds", "transformer.p_embedder.pooled_embedder.linear_1", columns, pooled=True),),
            attention_mask=False, read="all", padding="max_length", max_length=min(n, 218), default=False,
        )
    specs["text_encoder_3"] = EncoderSpec(
        "text_encoder_3", "tokenizer_3",
        (EncoderOutput("last_hidden_state", f"transformer.caption_projection.{projections - 1}"),),
        attention_mask=True, read="all", padding="max_length",
        max_length=min(n, _model_max_length(pipe.tokenizer_3, n)),
    )
    if getattr(pipe, "text_encoder_4", None) is None:
        return specs
    # the transformer reads stack[k] of hidden_states[1:] for each k in llama_layers, each through its own projection
    layers = tuple(k + 1 if k >= 0 else k for k in pipe.transformer.config.llama_layers)
    llama = EncoderOutput(
        _stack(layers), tuple(f"transformer.caption_projection.{i}" for i in range(len(layers))),
        blockwise=int(_config(pipe.text_encoder_4).hidden_size),
    )
    specs["text_encoder_4"] = EncoderSpec(
        "text_encoder_4", "tokenizer_4", (llama,), attention_mask=True, read="all", padding="max_length",
        max_length=min(n, _model_max_length(pipe.tokenizer_4, n)), hidden_layer=layers, module="model",
    )
    return specs


def _stack(layers) -> str:
    return f"hidden_states[{','.join(map(str, layers))}]"


def _flux2(pipe, max_seq, text_encoder_out_layers=None):
    """FLUX.2: Mistral's layers (10, 20, 30) concatenated along the channels, behind the system message's chat
    template, every padded position -> context_embedder."""
    n = max_seq or _call_default(pipe, "max_sequence_length", 512)
    layers = tuple(text_encoder_out_layers or _call_value(pipe, "text_encoder_out_layers", (10, 20, 30)))
    messages = [{"role": "system", "content": [{"type": "text", "text": pipe.system_message}]},
                {"role": "user", "content": [{"type": "text", "text": "{prompt}"}]}]
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer", (EncoderOutput(_stack(layers), "transformer.context_embedder"),),
            attention_mask=True, read="all", padding="max_length", max_length=n,
            template=_chat_template(pipe, messages, add_generation_prompt=False), hidden_layer=layers,
            module="model.language_model", special_tokens=False,
        )
    }


def _flux2klein(pipe, max_seq, text_encoder_out_layers=None):
    """FLUX.2 Klein: Qwen3's layers (9, 18, 27) concatenated, behind the chat template without thinking."""
    n = max_seq or _call_default(pipe, "max_sequence_length", 512)
    layers = tuple(text_encoder_out_layers or _call_value(pipe, "text_encoder_out_layers", (9, 18, 27)))
    template = _chat_template(pipe, [{"role": "user", "content": "{prompt}"}], add_generation_prompt=True,
                              enable_thinking=False)
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer", (EncoderOutput(_stack(layers), "transformer.context_embedder"),),
            attention_mask=True, read="all", padding="max_length", max_length=n, template=template,
            hidden_layer=layers, module="model",
        )
    }


def _qwenimage(pipe, max_seq):
    """Qwen-Image: Qwen2.5-VL's language model behind the template, system prefix dropped, mask tokens
    -> txt_norm -> txt_in."""
    m = min(max_seq or _call_default(pipe, "max_sequence_length", 512), int(pipe.tokenizer_max_length))
    template, drop = pipe.prompt_template_encode, int(pipe.prompt_template_encode_start_idx)
    if template.count("{}") != 1 or template.count("{") != 1:
        raise UnsupportedPipelineError(f"{type(pipe).__name__}: prompt_template_encode must hold one '{{}}' for the prompt")
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer",
            (EncoderOutput("hidden_states[-1]", ("transformer.txt_norm", "transformer.txt_in")),),
            attention_mask=True, read="mask", padding="longest", max_length=m + drop,
            template=template.replace("{}", "{prompt}"), drop_tokens=drop, hidden_layer=-1,
            module="model.language_model",
        )
    }


def _cogview4(pipe, max_seq):
    """CogView4: GLM-4's penultimate layer, no mask, ids left-padded to a multiple of 16 (all read)
    -> transformer.patch_embed.text_proj."""
    n = max_seq or _call_default(pipe, "max_sequence_length", 1024)
    return {
        "text_encoder": EncoderSpec(
            "text_encoder", "tokenizer", (EncoderOutput("hidden_states[-2]", "transformer.patch_embed.text_proj"),),
            attention_mask=False, read="all", padding="longest", max_length=n, hidden_layer=-2, pad_multiple=16,
        )
    }


BUILDERS = {
    "pixart": _pixart, "sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "sana": _sana, "lumina2": _lumina2,
    "zimage": _zimage, "chroma": _chroma, "auraflow": _chroma, "wan": _wan, "hidream": _hidream, "flux2": _flux2,
    "flux2klein": _flux2klein, "qwenimage": _qwenimage, "cogview4": _cogview4,
}
