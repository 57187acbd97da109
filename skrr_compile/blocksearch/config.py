"""SearchConfig: every option of a search that is data (JSON), grouped, frozen and validated on creation.

The run-time objects of a search (model, tokenizer, prompts, the projection module, a `select` callable, the
graph, `out_dir`, `resume`, `progress`) are arguments of `search`, not options. Everything else lives here, so
that the CLI, `prune_pipeline`, the resume key and the report read one object instead of re-listing options:

    cfg = SearchConfig.from_kwargs(sparsity=0.4, beam=3, template="...{prompt}...", cache_gb=2)
    cfg.target.beam, cfg.reads.template, cfg.memory.cache_gb
    cfg.replace(sparsity=0.3)                 # a new config; flat names, routed to their group
    SearchConfig.from_json(cfg.to_json()) == cfg

Groups: `target` (what to remove and how to search), `reads` (what the denoiser reads), `calibration` (how the
prompts are tokenized and chunked), `memory` (dtype, devices, caches, offload), `heal` (the linear maps fitted
to the runs of skipped sub-blocks of the final plan: `heal="lstsq"`), `quantize` (quantization-aware search:
candidates scored with quantized weights, `quantize="int8"`; off by default).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import DISTRIBUTE, LEVERS  # how ranks share a search; speed levers
from skrr_compile.blocksearch.reference import PLACEMENTS  # where the projected dense reference lives

METHODS = ("skrr", "skrr-skip", "finercut", "shortgpt", "laco", "replaceme")
HEAL_METHODS = ("lstsq", "cosine")
OFFLOAD_MODES = ("none", "cpu", "disk")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
READS = ("mask", "all")
PADDINGS = ("longest", "max_length")


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # normalising a field of a frozen dataclass in __post_init__


def _positive_int(name: str, value, low: int = 1, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SearchError(f"{name} must be an integer >= {low}, got {value!r}")


def _number(name: str, value, low: float = 0.0, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise SearchError(f"{name} must be a number >= {low}, got {value!r}")


@dataclass(frozen=True)
class TargetConfig:
    """What to remove and how to search for it."""

    sparsity: float
    method: str = "skrr"
    beam: int = 3
    seed: int = 0
    laco_params: dict | None = None  # LaCo's I, M, L, H, T (blocksearch/laco.py LACO_DEFAULTS)
    levers: tuple[str, ...] | None = None  # for measurement: the exact speed levers used (default all)

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 < self.sparsity < 1.0:
            raise SearchError(f"sparsity must be in (0, 1), got {self.sparsity!r}")
        _set(self, "sparsity", float(self.sparsity))
        if self.method not in METHODS:
            raise SearchError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.beam, bool) or not isinstance(self.beam, int) or self.beam < 1:
            raise SearchError(f"beam must be >= 1, got {self.beam}")
        _positive_int("seed", self.seed, low=0, optional=False)
        if self.laco_params is not None:
            if not isinstance(self.laco_params, dict):
                raise SearchError(f"laco_params must be a dict of LaCo's I, M, L, H, T, got {self.laco_params!r}")
            _set(self, "laco_params", dict(self.laco_params))
        if self.levers is not None:
            if isinstance(self.levers, str) or not set(self.levers) <= set(LEVERS):
                raise SearchError(f"levers must be a list drawn from {', '.join(LEVERS)}, got {self.levers!r}")
            _set(self, "levers", tuple(self.levers))

    @property
    def width(self) -> int:
        """The beam width the search really keeps: FinerCut is greedy (1)."""
        return 1 if self.method == "finercut" else self.beam


@dataclass(frozen=True)
class ReadConfig:
    """What the denoiser reads of the encoder's output (LLM encoders: template, dropped tokens, hidden layer)."""

    read: str = "mask"  # "mask": the attention-mask tokens (PixArt); "all": every padded position (SD's CLIP)
    template: str | None = None  # "...{prompt}...", applied to the null prompt too
    drop_tokens: int = 0  # the first N tokens of each embedding left out of D (Qwen-Image: its system prefix)
    hidden_layer: int | str | tuple[int, ...] | None = None  # -2, or layers concatenated (FLUX.2: 10,20,30)

    def __post_init__(self):
        if self.read not in READS:
            raise SearchError(f"read must be one of {', '.join(READS)}, got {self.read!r}")
        if self.template is not None and (not isinstance(self.template, str) or "{prompt}" not in self.template):
            raise SearchError(f"the template must contain '{{prompt}}' where the prompt goes, got {self.template!r}")
        _positive_int("drop_tokens", self.drop_tokens, low=0, optional=False)
        if isinstance(self.hidden_layer, (list, tuple)):
            _set(self, "hidden_layer", tuple(int(x) for x in self.hidden_layer))
        if self.hidden_layer is not None:
            from skrr_compile.blocksearch.selectors import output_selector

            try:
                output_selector(self.hidden_layer)
            except ValueError as e:
                raise SearchError(str(e)) from e


@dataclass(frozen=True)
class CalibrationConfig:
    """How prompts are tokenized and chunked (used when `search` is given prompts, not a Calibration)."""

    max_length: int | None = None  # default: the tokenizer's
    padding: str = "longest"
    chunk_size: int = 16
    min_tokens: int | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        _positive_int("max_length", self.max_length)
        if self.padding not in PADDINGS:
            raise SearchError(f"padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")
        _positive_int("chunk_size", self.chunk_size, optional=False)
        _positive_int("min_tokens", self.min_tokens, low=0)
        _positive_int("max_tokens", self.max_tokens)


@dataclass(frozen=True)
class MemoryConfig:
    """Dtype, devices, caches and weight offload (blocksearch/memory.py prints the plan they give)."""

    dtype: str | None = None  # fp32|bf16|fp16; None: bf16 on CUDA, fp32 on CPU
    reference: str = "device"
    cache_gb: float = 4.0  # boundary states kept on the device
    host_cache_gb: float | None = None  # more of them spilled to host memory (CUDA; default min(16, 4 x cache_gb))
    offload: str = "none"
    device: str | None = None  # default: where the model is
    device_budget_gb: float | None = None
    weights_path: str | None = None  # offload "disk": the checkpoint directory whose safetensors are read
    # candidates scored in one stacked forward (1: one at a time; "auto": sized by rows and the device budget)
    candidate_batch: int | str = 1
    # under torchrun: "candidates" (each rank scores its share of the candidates on every prompt chunk) or
    # "chunks" (each rank scores every candidate on its shard of the chunks, holding 1/world of the states)
    distribute: str = "candidates"

    def __post_init__(self):
        if isinstance(self.dtype, torch.dtype):
            names = {v: k for k, v in DTYPES.items()}
            if self.dtype not in names:
                raise SearchError(f"dtype must be one of {', '.join(DTYPES)} (or auto), got {self.dtype!r}")
            _set(self, "dtype", names[self.dtype])
        if self.dtype == "auto":
            _set(self, "dtype", None)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SearchError(f"dtype must be one of {', '.join(DTYPES)} (or auto), got {self.dtype!r}")
        if self.reference not in PLACEMENTS:
            raise SearchError(f"reference must be one of {', '.join(PLACEMENTS)}, got {self.reference!r}")
        _number("cache_gb", self.cache_gb, optional=False)
        _number("host_cache_gb", self.host_cache_gb)
        if self.offload not in OFFLOAD_MODES:
            raise SearchError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}")
        if self.device is not None:
            _set(self, "device", str(torch.device(self.device)))
        _number("device_budget_gb", self.device_budget_gb)
        if self.weights_path is not None:
            _set(self, "weights_path", str(self.weights_path))
        if self.candidate_batch != "auto":
            if isinstance(self.candidate_batch, str) and self.candidate_batch.isdigit():
                _set(self, "candidate_batch", int(self.candidate_batch))
            if isinstance(self.candidate_batch, bool) or not isinstance(self.candidate_batch, int) \
                    or self.candidate_batch < 1:
                raise SearchError(f"candidate_batch must be a number of candidates >= 1 or 'auto', "
                                  f"got {self.candidate_batch!r}")
        if self.distribute not in DISTRIBUTE:
            raise SearchError(f"distribute must be one of {', '.join(DISTRIBUTE)}, got {self.distribute!r}")
        if self.offload == "disk" and self.weights_path is None:
            raise SearchError("offload='disk' needs weights_path: the checkpoint directory whose safetensors are read")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype is not None else None


@dataclass(frozen=True)
class HealConfig:
    """Healing of the plan a search returns (blocksearch/heal.py): one d x d map per run of skipped sub-blocks,
    merged into the last kept sub-block's output projection. Off by default (method replaceme heals always)."""

    heal: str | None = None  # None | "lstsq" | "cosine" (gradient steps on a cosine loss, from lstsq)
    heal_ridge: float | str = "auto"  # ridge relative to the mean diagonal of f^T f; "auto": cross-validated
    heal_steps: int = 100  # cosine: full-batch Adam steps
    heal_lr: float = 1e-3  # cosine: Adam learning rate
    heal_tokens: int = 32768  # cosine and post-LN: calibration tokens kept in memory for gradient steps

    def __post_init__(self):
        if self.heal not in (None, *HEAL_METHODS):
            raise SearchError(f"heal must be one of {', '.join(HEAL_METHODS)} (or None), got {self.heal!r}")
        if self.heal_ridge != "auto":
            v = self.heal_ridge
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SearchError(f"heal_ridge must be 'auto' (cross-validated on the calibration prompts) or a "
                                  f"number >= 0, got {self.heal_ridge!r}")
            _set(self, "heal_ridge", float(self.heal_ridge))
        _positive_int("heal_steps", self.heal_steps, low=0, optional=False)
        _number("heal_lr", self.heal_lr, optional=False)
        _positive_int("heal_tokens", self.heal_tokens, optional=False)


@dataclass(frozen=True)
class QuantizeConfig:
    """Quantization-aware search: every candidate is scored with quantized weights against the dense
    full-precision reference (core/quantize.py QuantConfig: scheme, group size, embeddings, keep-list). Off
    (None) by default."""

    quantize: str | None = None  # int8 | int8-dynamic | fp8 | int4
    group_size: int = 32
    quantize_embeddings: bool = False
    quantize_keep: tuple[str, ...] = ()

    def __post_init__(self):
        keep = (self.quantize_keep,) if isinstance(self.quantize_keep, str) else tuple(self.quantize_keep or ())
        _set(self, "quantize_keep", keep)
        if self.quantize is not None:
            try:
                self.quant_config()
            except ValueError as e:
                raise SearchError(str(e)) from e

    def quant_config(self):
        """The core QuantConfig, or None when off."""
        if self.quantize is None:
            return None
        from skrr_compile.core.quantize import QuantConfig

        return QuantConfig(self.quantize, group_size=self.group_size, embeddings=self.quantize_embeddings,
                           keep=self.quantize_keep)


GROUPS = {"target": TargetConfig, "reads": ReadConfig, "calibration": CalibrationConfig, "memory": MemoryConfig,
          "heal": HealConfig, "quantize": QuantizeConfig}
# flat option name -> its group (names are unique across the groups)
OPTION_GROUP = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class SearchConfig:
    target: TargetConfig
    reads: ReadConfig = ReadConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    memory: MemoryConfig = MemoryConfig()
    heal: HealConfig = HealConfig()
    quantize: QuantizeConfig = QuantizeConfig()

    def __post_init__(self):
        for name, cls in GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise SearchError(f"SearchConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.target.method == "laco" and self.memory.offload == "disk":
            raise SearchError("LaCo merges weights in memory: use offload='cpu' or 'none' for method laco")
        if (self.heal.heal is not None or self.target.method == "replaceme") and self.memory.offload == "disk":
            raise SearchError("healing merges maps into weights in memory: use offload='cpu' or 'none' with heal")

    # --- flat views ----------------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, **options) -> SearchConfig:
        """A config from flat option names (those of `skrr.search`); `sparsity` is required."""
        if "sparsity" not in options:
            raise SearchError("sparsity is required: the fraction of the encoder's parameters to remove, in (0, 1)")
        _check_names(options)
        groups = {g: {} for g in GROUPS}
        for name, value in options.items():
            groups[OPTION_GROUP[name]][name] = value
        return cls(**{g: GROUPS[g](**kw) for g, kw in groups.items()})

    def replace(self, **options) -> SearchConfig:
        """A copy with the given flat options changed (validated again)."""
        _check_names(options)
        if not options:
            return self
        changed = {}
        for g in GROUPS:
            kw = {k: v for k, v in options.items() if OPTION_GROUP[k] == g}
            if kw:
                changed[g] = dataclasses.replace(getattr(self, g), **kw)
        return dataclasses.replace(self, **changed)

    def flat(self) -> dict[str, Any]:
        """Every option by its flat name."""
        return {f.name: getattr(getattr(self, g), f.name) for g, c in GROUPS.items() for f in dataclasses.fields(c)}

    # --- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {g: _jsonable(dataclasses.asdict(getattr(self, g))) for g in GROUPS}

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        if not isinstance(d, dict) or "target" not in d:
            raise SearchError(f"a search config is a dict with the groups {', '.join(GROUPS)}, got {d!r}")
        unknown = set(d) - set(GROUPS)
        if unknown:
            raise SearchError(f"unknown search config groups {sorted(unknown)}; groups: {', '.join(GROUPS)}")
        out = {}
        for g, c in GROUPS.items():
            kw = dict(d.get(g) or {})
            names = {f.name for f in dataclasses.fields(c)}
            if set(kw) - names:
                raise SearchError(f"unknown options {sorted(set(kw) - names)} in group {g!r}; it has: {', '.join(sorted(names))}")
            out[g] = c(**kw)
        return cls(**out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SearchConfig:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise SearchError(f"a search config must be JSON ({e})") from e
        return cls.from_dict(d)

    # --- what a search state is keyed to ---------------------------------------------------------------
    def resume_fields(self) -> dict:
        """The options that change the result of a search and so key its resumable state (with the weights,
        the calibration tokens, the projection and the selection, added by `search`). The memory options
        and the levers change the work done, never the plan: a search may resume with other ones."""
        t = self.target
        fields = {"sparsity": t.sparsity, "method": t.method, "beam": t.width, "read": self.reads.read,
                  "laco": t.laco_params}
        if self.heal.heal is not None or t.method == "replaceme":  # only when set: older states stay resumable
            fields["heal"] = dataclasses.asdict(self.heal)
        if self.quantize.quantize is not None:  # only when set, likewise
            fields["quantize"] = self.quantize.quant_config().to_dict()
        return fields


def _check_names(options: dict) -> None:
    unknown = sorted(set(options) - set(OPTION_GROUP))
    if unknown:
        raise TypeError(f"unknown search option(s) {', '.join(unknown)}; options: {', '.join(sorted(OPTION_GROUP))}")


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v) for k, v in d.items()}
