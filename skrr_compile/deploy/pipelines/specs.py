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
Families not listed are refused with UnsupportedPipelineError ( Chroma, AuraFlow, Wan,
HiDream, Flux2, Qwen-Image: not yet specified, issue 12 item 5).

Where a consumer reads the concatenation of several encoders' outputs (SD3's context_embedder over the
padded CLIP-L|CLIP-G|T5 channels, pooled CLIP-L|CLIP-G), each encoder's projection is the block of the
consumer's first linear layer that multiplies its channels: the consumer's input is linear in each block,
so this is exactly that encoder's contribution (the bias cancels in a difference).
Encoders the pipeline calls without an attention mask (every CLIP, T5 in SD3 and FLUX) are calibrated the
same way: padded to the pipeline's length, all-ones mask, every position read.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from skrr_compile.deploy.pipelines.encoder import (
    SUPPORTED_PIPELINES,
    TEXT_ENCODERS,
    NoTextEncoderError,
    UnsupportedPipelineError,
)


# ---------------------------------------------------------------------------------------------------
# what a pipeline reads from each encoder
# ---------------------------------------------------------------------------------------------------
class ColumnProjection(nn.Linear):
    """The block of a consumer linear layer that multiplies one encoder's channels (no bias)."""

    def __init__(self, weight: torch.Tensor, consumer: str, columns: tuple[int, int]):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.consumer, self.columns = consumer, columns

    def extra_repr(self) -> str:
        return f"{self.consumer}[:, {self.columns[0]}:{self.columns[1]}]"


@dataclass(frozen=True)
class EncoderOutput:
    """One output of a text encoder that the pipeline consumes."""

    name: str  # "last_hidden_state" | "pooler_output" | "text_embeds" | "hidden_states[-2]"
    consumer: str | None = None  # module path in the pipeline; None: read as is (identity)
    columns: tuple[int, int] | None = None  # block of the consumer's input features this output fills
    pooled: bool = False

    def read(self, out) -> torch.Tensor:
        if self.name.startswith("hidden_states["):
            hidden = getattr(out, "hidden_states", None)
            if hidden is None:
                raise ValueError(
                    f"{self.name} is read but the encoder returned no hidden states; call it with "
                    "output_hidden_states=True"
                )
            return hidden[int(self.name[len("hidden_states[") : -1])]
        value = getattr(out, self.name, None)
        if value is None:
            raise ValueError(f"the encoder output has no {self.name!r} (fields: {list(out.keys())})")
        return value

    def projection(self, pipe) -> nn.Module | None:
        if self.consumer is None:
            return None
        module = pipe
        for part in self.consumer.split("."):
            module = getattr(module, part)
        if self.columns is None:
            return module
        linear = module
        if not isinstance(linear, nn.Linear):
            raise UnsupportedPipelineError(f"{self.consumer} is a {type(linear).__name__}, expected nn.Linear")
        a, b = self.columns
        return ColumnProjection(linear.weight[:, a:b], self.consumer, (a, b))

    def describe(self) -> str:
        target = "identity" if self.consumer is None else self.consumer
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

    def calibration_tokenizer(self, pipe):
        tokenizer = getattr(pipe, self.tokenizer)
        if tokenizer is None:
            raise NoTextEncoderError(f"pipe.{self.tokenizer} (the tokenizer of {self.component}) is None")
        return tokenizer if self.attention_mask else UnmaskedTokenizer(tokenizer)

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


class UnmaskedTokenizer:
    """The tokenizer as the pipeline uses it for an encoder it calls without a mask: an all-ones mask."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        enc = self._tokenizer(*args, **kwargs)
        mask = enc.get("attention_mask") if hasattr(enc, "get") else None
        if mask is not None:
            if isinstance(mask, torch.Tensor):
                enc["attention_mask"] = torch.ones_like(mask)
            else:
                enc["attention_mask"] = [[1] * len(row) for row in mask] if mask and isinstance(mask[0], list) else [1] * len(mask)
        return enc

    def __repr__(self) -> str:
        return f"UnmaskedTokenizer({type(self._tokenizer).__name__})"


# LLM-encoder families of issue 12 whose denoiser reads are not specified yet: refused with the reason
NOT_YET_SPECIFIED = {
    "WanPipeline": "Wan (UMT5, text-to-video): its spec is not written yet",
    "HiDreamImagePipeline": "HiDream (CLIP-L, CLIP-G, T5, Llama-3.1): its spec is not written yet",
    "Flux2Pipeline": "FLUX.2 (Mistral, a stack of layers): whether its encoder traces is not checked yet",
    "Flux2KleinPipeline": "FLUX.2 Klein: whether its encoder traces is not checked yet",
    "QwenImagePipeline": "Qwen-Image (Qwen2.5-VL): whether its encoder traces is not checked yet",
}


def family_of(pipe) -> str:
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED_PIPELINES:
            return SUPPORTED_PIPELINES[cls.__name__]
    for cls in type(pipe).__mro__:
        if cls.__name__ in NOT_YET_SPECIFIED:
            raise UnsupportedPipelineError(
                f"{type(pipe).__name__} is not supported yet: {NOT_YET_SPECIFIED[cls.__name__]}; "
                f"supported: {', '.join(SUPPORTED_PIPELINES)}"
            )
    raise UnsupportedPipelineError(
        f"{type(pipe).__name__} is not a supported pipeline; supported: {', '.join(SUPPORTED_PIPELINES)} "
        "(and their subclasses)"
    )


def present_encoders(pipe) -> list[str]:
    return [n for n in TEXT_ENCODERS if isinstance(getattr(pipe, n, None), nn.Module)]


def _call_default(pipe, name: str, fallback: int) -> int:
    param = _call_parameter(pipe, name)
    if param is not None and isinstance(param.default, int):
        return param.default
    return fallback


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


def describe_pipeline(pipe, max_sequence_length: int | None = None, **call_kwargs) -> PipelineSpec:
    """Each text encoder of `pipe`, how the pipeline calls it, and the module that consumes each output.

    `max_sequence_length`: the T5 length the pipeline will be called with (default: the pipeline's default).
    `call_kwargs`: other arguments the pipeline will be called with that change what it encodes (Sana:
    `complex_human_instruction`); unset ones take the pipeline's defaults.
    """
    present = present_encoders(pipe)
    if not present:
        components = sorted(k for k, v in getattr(pipe, "components", {}).items() if v is not None)
        raise NoTextEncoderError(
            f"{type(pipe).__name__} has no text encoder to prune (looked for {', '.join(TEXT_ENCODERS)}; "
            f"its components: {', '.join(components) or 'none'})"
        )
    family = family_of(pipe)
    builders = {"pixart": _pixart, "sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}
    if family in ("chroma", "auraflow"):
        specs = _chroma(pipe, max_sequence_length)  # AuraFlow reads its UMT5 the same way (mask tokens)
    elif family in ("sana", "lumina2", "zimage"):
        specs = {"sana": _sana, "lumina2": _lumina2, "zimage": _zimage}[family](pipe, max_sequence_length, **call_kwargs)
    else:
        if call_kwargs:
            raise TypeError(f"{type(pipe).__name__}: unexpected pipeline arguments {sorted(call_kwargs)}")
        specs = builders[family](pipe, max_sequence_length)
    encoders = {name: spec for name, spec in specs.items() if name in present}
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


def _zimage(pipe, max_seq):
    """Z-Image: Qwen3's penultimate layer behind the tokenizer's chat template, mask tokens only."""
    m = max_seq or _call_default(pipe, "max_sequence_length", 512)
    tokenizer = pipe.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__}: its tokenizer has no chat template, which Z-Image renders every prompt through"
        )
    template = tokenizer.apply_chat_template(
        [{"role": "user", "content": "{prompt}"}], tokenize=False, add_generation_prompt=True, enable_thinking=True,
    )
    if template.count("{prompt}") != 1:
        raise UnsupportedPipelineError(f"{type(pipe).__name__}: the chat template does not keep the prompt verbatim")
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
