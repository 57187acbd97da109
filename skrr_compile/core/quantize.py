"""Weight quantization of a pruned (or dense) encoder with torchao: config, tensors, exact byte accounting.

    q = quantize(pruned, "int8")                      # a new PrunedEncoder; the input is left untouched
    q = quantize(pruned, QuantConfig("int4", group_size=32, embeddings=True, keep=("*.wo",)))

Schemes (torchao 0.18 configs; `SCHEMES`):
- `int8`: weight-only, per output channel (`Int8WeightOnlyConfig`): int8 values, fp32 scale and int8 zero point
  per row;
- `int8-dynamic`: int8 weights as above, activations quantized per token at run time
  (`Int8DynamicActivationInt8WeightConfig`);
- `fp8`: weight-only e4m3 with an fp32 scale per row (`Float8WeightOnlyConfig`);
- `int4`: weight-only, symmetric, groups of `group_size` along the input (`IntxWeightOnlyConfig(int4,
  PerGroup)`). torchao keeps one int4 value per int8 byte in memory (its 4-bit `Int4WeightOnlyConfig` needs
  CUDA kernels); the saved file packs two values per byte, and ONNX Runtime's `MatMulNBits` runs it 4-bit on
  CPU (`skrr-compile export-onnx --quantize int4`).
Embeddings (`embeddings=True`) are int8 per row (int4 per group for `int4`) through `IntxWeightOnlyConfig`.
Only weights the graph reads as a Linear weight or an embedding table are quantized; a tensor shared by
re-use (or tied) is quantized once and stays one tensor.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata, util

import torch
from torch import fx

from skrr_compile.core.encoder import PrunedEncoder
from skrr_compile.passes.functional import to_functional, weight_uses
from skrr_compile.utils.quiet import drop_log_records
from skrr_compile.utils.tensors import bind_tensors, named_tensors, tensor_nbytes

SCHEMES = ("int8", "int8-dynamic", "fp8", "int4")
# what users ask for that does not run here: the reason, checked in `check_runnable`
NEEDS_GPU = {
    "fp8-dynamic": "fp8 activations need a CUDA GPU with fp8 units (compute capability 8.9+, e.g. L4/H100)",
    "nf4": "NF4 needs CUDA (bitsandbytes' 4-bit kernels)",
}
EXTRA = "pip install 'skrr-compile[quant]' (torchao)"
QUANT_FORMAT = "skrr-quant"
QUANT_VERSION = 1


class QuantizationError(ValueError):
    """A quantization request that cannot be honoured (unknown scheme, missing kernels, bad keep-list...)."""


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; frozen, validated on creation, JSON round trip (`to_dict` / `from_dict`)."""

    scheme: str = "int8"
    group_size: int = 32  # int4 only: values per scale along the input dimension
    embeddings: bool = False  # also the embedding tables (int8 per row; int4 per group for int4)
    keep: tuple[str, ...] = ()  # module paths kept in full precision: globs, or "re:<regex>"

    def __post_init__(self):
        if self.scheme in NEEDS_GPU:
            pass  # a known scheme that needs hardware: check_runnable says what is missing
        elif self.scheme not in SCHEMES:
            raise QuantizationError(f"unknown quantization scheme {self.scheme!r}; schemes: {', '.join(SCHEMES)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise QuantizationError(f"group_size must be an integer >= 2, got {self.group_size!r}")
        if not isinstance(self.embeddings, bool):
            raise QuantizationError(f"embeddings must be true or false, got {self.embeddings!r}")
        keep = (self.keep,) if isinstance(self.keep, str) else tuple(self.keep or ())
        for k in keep:
            if k.startswith("re:"):
                try:
                    re.compile(k[3:])
                except re.error as e:
                    raise QuantizationError(f"keep pattern {k!r} is not a valid regex: {e}") from e
        object.__setattr__(self, "keep", keep)

    def to_dict(self) -> dict:
        return {**asdict(self), "keep": list(self.keep)}

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        names = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) - names:
            raise QuantizationError(f"a quantization config has the keys {sorted(names)}, got {d!r}")
        return cls(**d)

    def kept(self, module_path: str) -> bool:
        return any(_match(k, module_path) for k in self.keep)


def as_config(scheme: str | QuantConfig | dict | None = "int8", **options) -> QuantConfig:
    if isinstance(scheme, QuantConfig):
        return QuantConfig(**{**scheme.to_dict(), **options}) if options else scheme
    if isinstance(scheme, dict):
        return QuantConfig.from_dict({**scheme, **options})
    return QuantConfig(scheme=scheme or "int8", **options)


def _match(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


# --- the library -------------------------------------------------------------------------------------
def require_torchao():
    """Import torchao (its CUDA-only extensions log 'Failed to load' on CPU: dropped) or raise one line."""
    if util.find_spec("torchao") is None:
        raise QuantizationError(f"quantization needs torchao, which is not installed: {EXTRA}")
    drop_log_records("torchao", "Failed to load", ".so")
    drop_log_records("torch.utils._pytree", "<enum", "Enum subclass")
    import torchao
    import torchao.quantization

    return torchao


def library_version() -> str:
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_runnable(config: QuantConfig, device: torch.device | str = "cpu") -> None:
    """Refuse, in one line, a scheme the device or the installed kernels cannot run."""
    device = torch.device(device)
    if config.scheme in NEEDS_GPU:
        ok = False
        if config.scheme == "fp8-dynamic" and device.type == "cuda" and torch.cuda.is_available():
            ok = torch.cuda.get_device_capability(device) >= (8, 9)
        if not ok:
            raise QuantizationError(
                f"scheme {config.scheme!r} cannot run here ({device.type}): {NEEDS_GPU[config.scheme]}; "
                f"what runs here: {', '.join(SCHEMES)} (fp8 weight-only storage runs on CPU)"
            )
        raise QuantizationError(f"scheme {config.scheme!r} is not implemented yet; schemes: {', '.join(SCHEMES)}")
    require_torchao()


def torchao_config(config: QuantConfig, kind: str):
    """The torchao config for a weight of `kind` ("linear" or "embedding")."""
    require_torchao()
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    if config.scheme == "int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(config.group_size))
    if kind == "embedding":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    return {"int8": Int8WeightOnlyConfig, "int8-dynamic": Int8DynamicActivationInt8WeightConfig,
            "fp8": Float8WeightOnlyConfig}[config.scheme]()


def quantize_tensor(weight: torch.Tensor, config: QuantConfig, kind: str) -> torch.Tensor:
    """torchao's `quantize_` on a one-layer module holding `weight` (a Linear or an Embedding)."""
    from torchao.quantization import quantize_

    w = weight.detach()
    if kind == "embedding":
        mod = torch.nn.Embedding(*w.shape, device="meta", dtype=w.dtype)
        filter_fn = lambda m, fqn: isinstance(m, torch.nn.Embedding)  # noqa: E731
    else:
        mod = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
        filter_fn = None
    mod.weight = torch.nn.Parameter(w, requires_grad=False)
    quantize_(mod, torchao_config(config, kind), filter_fn=filter_fn)
    return mod.weight


# --- which tensors -----------------------------------------------------------------------------------
@dataclass
class Selection:
    quantize: dict[str, str] = field(default_factory=dict)  # canonical name -> "linear" | "embedding"
    kept: dict[str, str] = field(default_factory=dict)  # canonical name -> why it stays full precision
    aliases: dict[str, str] = field(default_factory=dict)  # other name of the same tensor -> canonical


def is_quantized(t) -> bool:
    return isinstance(t, torch.Tensor) and type(t).__name__ in ("Int8Tensor", "Float8Tensor", "IntxUnpackedToInt8Tensor")


def select_tensors(gm: fx.GraphModule, config: QuantConfig) -> Selection:
    """The weights to quantize: read only as a Linear weight (or an embedding table, when asked), not kept by
    the keep-list, shapes the scheme takes (int4: input size divisible by the group). By tensor identity."""
    tensors = named_tensors(gm)
    uses = weight_uses(gm)
    by_id: dict[int, list[str]] = {}
    for name in sorted(tensors):
        by_id.setdefault(id(tensors[name]), []).append(name)
    sel = Selection()
    matched = set()
    for names in by_id.values():
        canonical = names[0]
        for other in names[1:]:
            sel.aliases[other] = canonical
        t = tensors[canonical]
        kinds = set().union(*(uses.get(n, set()) for n in names))
        if is_quantized(t):
            raise QuantizationError(
                f"this model is already quantized ({canonical} is a {type(t).__name__}); quantize the "
                "full-precision model instead (skrr.load the unquantized directory, or re-run apply)"
            )
        if not t.is_floating_point() or t.dim() != 2 or kinds - {"linear", "embedding"} or len(kinds) != 1:
            continue
        kind = next(iter(kinds))
        if kind == "embedding" and not config.embeddings:
            sel.kept[canonical] = "embedding (embeddings=False)"
            continue
        paths = [n.rpartition(".")[0] for n in names]
        hits = [k for k in config.keep if any(_match(k, p) for p in paths)]
        if hits:
            matched.update(hits)
            sel.kept[canonical] = f"keep-list {hits[0]!r}"
            continue
        if config.scheme == "int4" and t.shape[1] % config.group_size:
            sel.kept[canonical] = f"input size {t.shape[1]} not divisible by group_size {config.group_size}"
            continue
        sel.quantize[canonical] = kind
    unmatched = [k for k in config.keep if k not in matched]
    if unmatched:
        some = sorted({n.rpartition(".")[0] for n in tensors})[:3]
        raise QuantizationError(
            f"keep pattern {unmatched[0]!r} matches no quantizable module path (paths look like "
            f"{', '.join(some)}; globs match the whole path, 're:...' searches a regex)"
        )
    return sel


def quantized_tensors(gm: fx.GraphModule, config: QuantConfig) -> tuple[dict[str, torch.Tensor], Selection]:
    """name -> quantized tensor for every selected weight (aliases map to the same object)."""
    require_torchao()
    sel = select_tensors(gm, config)
    tensors = named_tensors(gm)
    out = {name: quantize_tensor(tensors[name], config, kind) for name, kind in sel.quantize.items()}
    for alias, canonical in sel.aliases.items():
        if canonical in out:
            out[alias] = out[canonical]
    return out, sel


# --- the verb ------------------------------------------------------------------------------------------
def quantize(model, scheme: str | QuantConfig = "int8", **options) -> PrunedEncoder:
    """A quantized copy of a PrunedEncoder (or of a dense HF encoder, applied with an empty plan).

    Options: `group_size`, `embeddings`, `keep` (QuantConfig). The graph is copied (the input keeps its
    weights); shared weights stay one tensor.
    """
    config = as_config(scheme, **options)
    if not isinstance(model, PrunedEncoder):
        from skrr_compile.core.encoder import apply
        from skrr_compile.core.plan import Plan

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"quantize expects a PrunedEncoder or a HF encoder, got {type(model).__name__}")
        model = apply(model, Plan())
    if model.info.get("quantization"):
        q = model.info["quantization"]
        raise QuantizationError(
            f"this model is already quantized ({q.get('scheme')}); quantizing twice stacks the errors: quantize "
            "the full-precision model instead"
        )
    check_runnable(config, model.device)
    gm = fx.GraphModule(model.graph_module, _copy_graph(model.graph_module))  # tensors shared, graph copied
    for key in ("_in_spec", "_out_spec"):
        if hasattr(model.graph_module, key):
            setattr(gm, key, getattr(model.graph_module, key))
    gm.recompile()
    to_functional(gm)
    q, sel = quantized_tensors(gm, config)
    tensors = {**named_tensors(model.graph_module), **q}
    bind_tensors(gm, tensors)
    info = {**model.info, "quantization": describe(config, sel)}
    out = PrunedEncoder(gm, model.config, model.plan, model.architecture, info)
    return out


def _copy_graph(gm: fx.GraphModule) -> fx.Graph:
    import copy

    from skrr_compile.utils.quiet import dependency_warnings_silenced

    with dependency_warnings_silenced():
        return copy.deepcopy(gm.graph)


def describe(config: QuantConfig, sel: Selection) -> dict:
    """What `skrr_model.json` and the report keep about a quantization."""
    return {"format": QUANT_FORMAT, "version": QUANT_VERSION, **config.to_dict(), "library": "torchao",
            "library_version": library_version(), "modules": sorted(sel.quantize),
            "kinds": {n: k for n, k in sorted(sel.quantize.items())}, "kept": dict(sorted(sel.kept.items()))}


# --- exact bytes ---------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds in memory: a tensor subclass counts its inner tensors (values, scales, zero points)."""
    return tensor_nbytes(t)


def scheme_bytes(shape, dtype: torch.dtype, config: QuantConfig, kind: str, packed: bool = False) -> int:
    """Exact bytes of one weight of `shape` ([out, in] / [vocab, dim]) under `config`, as torchao stores it
    (`packed`: int4 as the saved file holds it, two values per byte): values + scales + zero points."""
    n, k = int(shape[0]), int(shape[1])
    elem = torch.tensor([], dtype=dtype).element_size()
    if config.scheme == "int4":
        groups = n * (k // config.group_size)
        return ((n * k + 1) // 2 if packed else n * k) + groups * (elem + 1)
    if kind == "embedding":
        return n * k + n * (elem + 1)  # Intx int8 per row: scale in the weight's dtype, int8 zero point
    if config.scheme == "fp8":
        return n * k + n * 4  # e4m3 values, fp32 scale per row
    return n * k + n * 5  # int8 values, fp32 scale and int8 zero point per row


def deployed_bytes(gm: fx.GraphModule, config: QuantConfig | None, packed: bool = False) -> dict:
    """Exact bytes of the unique tensors `gm` reads, as they would be after `config` (works on meta).

    Returns {"total", "quantized", "full_precision", "quantized_params", "params"}."""
    tensors = named_tensors(gm)
    seen, total, quant, qparams, params = set(), 0, 0, 0, 0
    sel = select_tensors(gm, config) if config is not None else Selection()
    for name in sorted(tensors):
        t = tensors[name]
        if id(t) in seen:
            continue
        seen.add(id(t))
        params += t.numel()
        if name in sel.quantize:
            b = scheme_bytes(t.shape, t.dtype, config, sel.quantize[name], packed)
            quant += b
            qparams += t.numel()
        elif is_quantized(t):
            b = tensor_bytes(t)
            if packed and getattr(t, "target_dtype", None) == torch.int4:
                b -= t.qdata.numel() - (t.qdata.numel() + 1) // 2
            quant += b
            qparams += t.numel()
        else:
            b = t.numel() * t.element_size()
        total += b
    return {"total": total, "quantized": quant, "full_precision": total - quant, "quantized_params": qparams,
            "params": params}


def scheme_table(gm: fx.GraphModule, embeddings: bool | None = None, group_size: int = 32) -> list[dict]:
    """Deployed bytes of `gm` for every scheme (both embedding choices unless given)."""
    rows = [{"scheme": "none", "embeddings": None, **deployed_bytes(gm, None)}]
    for scheme in SCHEMES:
        for emb in ((False, True) if embeddings is None else (embeddings,)):
            cfg = QuantConfig(scheme, group_size=group_size, embeddings=emb)
            rows.append({"scheme": scheme, "embeddings": emb, **deployed_bytes(gm, cfg, packed=True)})
    return rows


def quant_available() -> bool:
    return util.find_spec("torchao") is not None


# --- loading -------------------------------------------------------------------------------------------
def load_quantized_tensors(gm: fx.GraphModule, path, description: dict, device="cpu") -> dict[str, torch.Tensor]:
    """Read a quantized weights file for `gm` (rebuilt on meta): rewrites `gm` to functional calls (in place)
    and returns name -> tensor (torchao tensors for the quantized ones)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from skrr_compile.core.quantized_io import unflatten

    if description.get("format") != QUANT_FORMAT or description.get("version") != QUANT_VERSION:
        raise QuantizationError(f"{path}: unknown quantization format {description.get('format')} "
                                f"v{description.get('version')}")
    try:
        require_torchao()
    except QuantizationError as e:
        raise QuantizationError(
            f"{path} holds {description.get('scheme')} weights quantized with torchao "
            f"{description.get('library_version')}, which is not installed: {EXTRA}"
        ) from e
    to_functional(gm)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = unflatten(load_file(str(path), device="cpu"), metadata)
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors
