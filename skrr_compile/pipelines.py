"""diffusers integration: find each text encoder of a pipeline and what reads its output, prune, save, load.

    plans = skrr.prune_pipeline(pipe, prompts, sparsity=0.4)            # search + swap every text encoder
    skrr.apply_to_pipeline(pipe, {"text_encoder_3": plan})               # or explicit plans
    pipe.save_pretrained(out)                                            # pruned encoders saved in skrr format
    pipe = DiffusionPipeline.from_pretrained(out)                        # after `import skrr_compile`
    skrr.load_into(dense_pipe, out)                                      # or: put pruned encoders into a pipeline

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

Where a consumer reads the concatenation of several encoders' outputs (SD3's context_embedder over the
padded CLIP-L|CLIP-G|T5 channels, pooled CLIP-L|CLIP-G), each encoder's projection is the block of the
consumer's first linear layer that multiplies its channels: the consumer's input is linear in each block,
so this is exactly that encoder's contribution (the bias cancels in a difference).
Encoders the pipeline calls without an attention mask (every CLIP, T5 in SD3 and FLUX) are calibrated the
same way: padded to the pipeline's length, all-ones mask, every position read.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .io import MODEL_FILE, NotAPrunedModelError, read_model_meta
from .io import load as load_pruned
from .io import save as save_pruned
from .module import PrunedEncoder, apply
from .plan import Plan

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
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
SUMMARY_FILE = "skrr_pipeline.json"


class UnsupportedPipelineError(ValueError):
    """A pipeline class skrr-compile does not know how to prune."""


class NoTextEncoderError(ValueError):
    """A pipeline without any text encoder to prune."""


# ---------------------------------------------------------------------------------------------------
# the pruned encoder as a diffusers pipeline component
# ---------------------------------------------------------------------------------------------------
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

    def save_pretrained(self, save_directory, **kwargs) -> None:
        save_pruned(self, save_directory, overwrite=True)

    @classmethod
    def from_pretrained(cls, directory, torch_dtype: torch.dtype | None = None, device=None, **kwargs):
        return cls.from_pruned(load_pruned(directory, device=device or "cpu", dtype=torch_dtype))


def _register_with_diffusers() -> None:
    """Let DiffusionPipeline.save_pretrained/from_pretrained treat PrunedTextEncoder as a loadable class."""
    from diffusers.pipelines import pipeline_loading_utils as loading

    methods = ["save_pretrained", "from_pretrained"]
    loading.LOADABLE_CLASSES.setdefault("skrr_compile", {})["PrunedTextEncoder"] = methods
    loading.ALL_IMPORTABLE_CLASSES["PrunedTextEncoder"] = methods


_register_with_diffusers()


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


def family_of(pipe) -> str:
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED_PIPELINES:
            return SUPPORTED_PIPELINES[cls.__name__]
    raise UnsupportedPipelineError(
        f"{type(pipe).__name__} is not a supported pipeline; supported: {', '.join(SUPPORTED_PIPELINES)} "
        "(and their subclasses)"
    )


def _present_encoders(pipe) -> list[str]:
    return [n for n in TEXT_ENCODERS if isinstance(getattr(pipe, n, None), nn.Module)]


def _call_default(pipe, name: str, fallback: int) -> int:
    try:
        param = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        param = None
    if param is not None and isinstance(param.default, int):
        return param.default
    return fallback


def _model_max_length(tokenizer, fallback: int = 77) -> int:
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 100_000 else fallback


def _config(module) -> object:
    return getattr(module, "config", None)


def describe_pipeline(pipe, max_sequence_length: int | None = None) -> PipelineSpec:
    """Each text encoder of `pipe`, how the pipeline calls it, and the module that consumes each output.

    `max_sequence_length`: the T5 length the pipeline will be called with (default: the pipeline's default).
    """
    present = _present_encoders(pipe)
    if not present:
        components = sorted(k for k, v in getattr(pipe, "components", {}).items() if v is not None)
        raise NoTextEncoderError(
            f"{type(pipe).__name__} has no text encoder to prune (looked for {', '.join(TEXT_ENCODERS)}; "
            f"its components: {', '.join(components) or 'none'})"
        )
    family = family_of(pipe)
    builder = {"pixart": _pixart, "sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}[family]
    specs = builder(pipe, max_sequence_length)
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


# ---------------------------------------------------------------------------------------------------
# apply / prune
# ---------------------------------------------------------------------------------------------------
def _resolve_plan(plan) -> Plan:
    from .compile_backend import resolve_plan

    return resolve_plan(plan)


def apply_to_pipeline(pipe, plans: Mapping[str, Plan | str | Path | dict]):
    """Replace each named text encoder of `pipe` by its pruned version under the given plan; returns `pipe`.

    `plans` maps component names (`text_encoder`, `text_encoder_2`, ...) to a Plan, a plan JSON file, a plan
    dict or a pruned model directory (its plan is applied to the pipeline's own encoder).
    """
    spec = describe_pipeline(pipe)
    if not plans:
        raise ValueError(f"no plans given; this pipeline's text encoders: {', '.join(spec.encoders)}")
    unknown = [name for name in plans if name not in spec.encoders]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} has no text encoder {unknown}; its text encoders: {', '.join(spec.encoders)}")
    resolved = {name: _resolve_plan(plan) for name, plan in plans.items()}
    pruned = {}
    for name, plan in resolved.items():  # prune all before swapping any: a bad plan leaves the pipe as it was
        encoder = getattr(pipe, name)
        if isinstance(encoder, PrunedEncoder):
            raise ValueError(f"pipe.{name} is already pruned (plan skip={list(encoder.plan.skip)}); plans apply to dense encoders")
        pruned[name] = PrunedTextEncoder.from_pruned(apply(encoder, plan))
    pipe.register_modules(**pruned)
    return pipe


class PipelinePlans(dict):
    """component name -> Plan, with the search reports (`.reports`) and the pipeline description (`.spec`)."""

    def __init__(self, plans: Mapping[str, Plan], reports: Mapping[str, dict] | None = None, spec: PipelineSpec | None = None):
        super().__init__(plans)
        self.reports = dict(reports or {})
        self.spec = spec

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict() if self.spec else None,
            "plans": {k: v.to_dict() for k, v in self.items()},
            "reports": self.reports,
        }


@dataclass
class _HiddenStatesOn:
    """Temporarily make an HF encoder return hidden states by default (its config flag)."""

    module: nn.Module
    on: bool
    _saved: object = field(default=None, init=False)

    def __enter__(self):
        cfg = getattr(self.module, "config", None)
        if self.on and cfg is not None:
            self._saved = getattr(cfg, "output_hidden_states", None)
            cfg.output_hidden_states = True
        return self

    def __exit__(self, *exc):
        cfg = getattr(self.module, "config", None)
        if self.on and cfg is not None:
            cfg.output_hidden_states = self._saved
        return False


def search_arguments(pipe, spec: EncoderSpec) -> dict:
    """The keyword arguments of skrr_compile.search.search that make it score what the pipeline reads."""
    return {
        "select": spec.select(),
        "projection": spec.projections(pipe),
        "read": spec.read,
        "padding": spec.padding,
        "max_length": spec.max_length,
    }


def prune_pipeline(
    pipe,
    prompts,
    sparsity: float | Mapping[str, float],
    encoders: Sequence[str] | str | None = None,
    method: str = "skrr",
    *,
    max_sequence_length: int | None = None,
    apply_plans: bool = True,
    out_dir: str | Path | None = None,
    overrides: Mapping[str, dict] | None = None,
    **search_kwargs,
) -> PipelinePlans:
    """Search a plan for each (or the named) text encoder(s) of `pipe` and swap in the pruned encoders.

    The discrepancy of each encoder covers every output the pipeline reads from it, through the module that
    consumes it (see the module docstring). `sparsity` is per encoder (a float, or a dict per component).
    `prompts`: a list, or a .txt/.jsonl/.tsv/.csv file. Further keyword arguments go to
    `skrr_compile.search.search` (e.g. beam, chunk_size); `overrides[component]` to that encoder's search only.
    Returns component -> Plan (with `.reports`); `apply_plans=False` leaves the pipeline dense.
    """
    try:
        from .search import search
    except ImportError as e:
        raise ImportError(
            f"prune_pipeline needs the plan search (skrr_compile.search), which this build lacks ({e}); "
            "apply known plans with apply_to_pipeline(pipe, {component: plan})"
        ) from e
    from .calibration import read_prompts

    spec = describe_pipeline(pipe, max_sequence_length)
    names = _select_encoders(spec, encoders)
    prompts = read_prompts(prompts)
    overrides = dict(overrides or {})
    plans, reports = {}, {}
    for name in names:
        es = spec.encoders[name]
        encoder = getattr(pipe, name)
        if isinstance(encoder, PrunedEncoder):
            raise ValueError(f"pipe.{name} is already pruned; load the dense pipeline to search again")
        target = sparsity[name] if isinstance(sparsity, Mapping) else sparsity
        kwargs = {**search_arguments(pipe, es), **search_kwargs, **overrides.get(name, {})}
        if out_dir is not None:
            kwargs["out_dir"] = Path(out_dir) / name
        with _HiddenStatesOn(encoder, es.hidden_states):
            result = search(encoder, es.calibration_tokenizer(pipe), prompts, sparsity=target, method=method, **kwargs)
        plans[name] = result.plan
        reports[name] = {**dict(result.report or {}), "reads": [o.describe() for o in es.outputs]}
    if apply_plans:
        apply_to_pipeline(pipe, plans)
    return PipelinePlans(plans, reports, spec)


def _select_encoders(spec: PipelineSpec, encoders) -> list[str]:
    if encoders is None or encoders == "all":
        return list(spec.encoders)
    names = [encoders] if isinstance(encoders, str) else list(encoders)
    unknown = [n for n in names if n not in spec.encoders]
    if unknown:
        raise ValueError(f"{spec.pipeline} has no text encoder {unknown}; its text encoders: {', '.join(spec.encoders)}")
    return names


# ---------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------
def save_pipeline(pipe, directory: str | Path, plans: PipelinePlans | None = None, **kwargs) -> Path:
    """`pipe.save_pretrained(directory)` plus a summary of the pruned encoders (skrr_pipeline.json)."""
    directory = Path(directory)
    pipe.save_pretrained(directory, **kwargs)
    pruned = {n: getattr(pipe, n) for n in TEXT_ENCODERS if isinstance(getattr(pipe, n, None), PrunedEncoder)}
    summary = {
        "pipeline": type(pipe).__name__,
        "pruned": {
            n: {"plan": m.plan.to_dict(), "params": m.num_params, "dense_params": m.info.get("dense_params"),
                "sparsity": m.sparsity}
            for n, m in pruned.items()
        },
    }
    if plans is not None:
        summary["reports"] = plans.reports
        if plans.spec is not None:
            summary["spec"] = plans.spec.to_dict()
    (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return directory


def load_pipeline(directory: str | Path, **kwargs):
    """DiffusionPipeline.from_pretrained for a pipeline saved with pruned encoders."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(directory), **kwargs)


_SHAPE_KEYS = ("hidden_size", "d_model", "num_hidden_layers", "num_layers", "vocab_size", "projection_dim")


def load_into(pipe, directory: str | Path, components: Sequence[str] | str | None = None) -> list[str]:
    """Put pruned encoders saved under `directory` into `pipe` (on its encoders' device and dtype).

    `directory` is a saved pipeline (its `text_encoder*/` folders in the skrr format are loaded) or one pruned
    encoder directory (name the component: `components="text_encoder_2"`). Returns the components replaced.
    """
    spec = describe_pipeline(pipe)
    directory = Path(directory)
    if not directory.is_dir():
        raise NotAPrunedModelError(f"{str(directory)!r} is not a directory")
    if (directory / MODEL_FILE).is_file():
        if components is None and len(spec.encoders) == 1:
            components = list(spec.encoders)
        if components is None or (not isinstance(components, str) and len(components) != 1):
            raise ValueError(
                f"{directory} holds one pruned encoder; name the component it replaces "
                f"(one of {', '.join(spec.encoders)})"
            )
        name = components if isinstance(components, str) else components[0]
        sources = {name: directory}
    else:
        sources = {n: directory / n for n in TEXT_ENCODERS if (directory / n / MODEL_FILE).is_file()}
        if components is not None:
            wanted = [components] if isinstance(components, str) else list(components)
            missing = [n for n in wanted if n not in sources]
            if missing:
                raise NotAPrunedModelError(f"{directory} has no pruned encoder for {missing} (found: {sorted(sources)})")
            sources = {n: sources[n] for n in wanted}
        if not sources:
            raise NotAPrunedModelError(
                f"{directory} holds no pruned text encoder (no {', '.join(f'{n}/{MODEL_FILE}' for n in TEXT_ENCODERS)})"
            )
    unknown = [n for n in sources if n not in spec.encoders]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} has no text encoder {unknown}; its text encoders: {', '.join(spec.encoders)}")
    loaded = {}
    for name, src in sources.items():
        current = getattr(pipe, name)
        meta = read_model_meta(src)
        arch = getattr(current, "architecture", type(current).__name__)
        if meta["architecture"] != arch:
            raise ValueError(f"{src} holds a pruned {meta['architecture']}, but pipe.{name} is a {arch}")
        saved_cfg = json.loads((src / "config.json").read_text())
        cfg = current.config.to_dict()
        diff = {k: (saved_cfg.get(k), cfg.get(k)) for k in _SHAPE_KEYS if k in cfg and saved_cfg.get(k) != cfg.get(k)}
        if diff:
            raise ValueError(f"{src} was pruned from another {arch} than pipe.{name}: (saved, pipeline) {diff}")
        device = next(current.parameters()).device
        dtype = next(p for p in current.parameters() if p.is_floating_point()).dtype
        loaded[name] = PrunedTextEncoder.from_pretrained(src, torch_dtype=dtype, device=device)
    pipe.register_modules(**loaded)
    return list(loaded)


def encoder_sizes(pipe) -> dict[str, dict]:
    """Parameters of each text encoder of `pipe`, dense or pruned."""
    from .graph import param_numel

    sizes = {}
    for name in _present_encoders(pipe):
        module = getattr(pipe, name)
        if isinstance(module, PrunedEncoder):
            sizes[name] = {"params": module.num_params, "dense_params": module.info.get("dense_params"),
                           "sparsity": module.sparsity, "pruned": True}
        else:
            sizes[name] = {"params": param_numel(module), "dense_params": param_numel(module), "sparsity": 0.0,
                           "pruned": False}
    return sizes


__all__ = [
    "PrunedTextEncoder",
    "EncoderOutput",
    "EncoderSpec",
    "PipelineSpec",
    "PipelinePlans",
    "UnmaskedTokenizer",
    "UnsupportedPipelineError",
    "NoTextEncoderError",
    "SUPPORTED_PIPELINES",
    "describe_pipeline",
    "search_arguments",
    "apply_to_pipeline",
    "prune_pipeline",
    "save_pipeline",
    "load_pipeline",
    "load_into",
    "encoder_sizes",
]
