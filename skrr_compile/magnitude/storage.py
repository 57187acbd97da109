"""Reading models and pipelines to prune, and saving / loading magnitude-pruned ones with compressed weights.

A pruned component directory holds its config (HF ``config.json`` or diffusers config), the weights in the
compressed sparse safetensors format (``skrr_sparse.safetensors``, see ``compressed.py``) and
``skrr_magnitude.json`` (library, class, prune report, sizes). A pruned pipeline directory is the original
pipeline directory with its pruned components replaced by such directories (a hybrid Skrr + magnitude text
encoder is saved with ``skrr_compile.save(..., compress=True)`` instead); ``load_pruned`` reads all three.
Loading builds the module on the meta device (nothing allocated) and assigns the decoded tensors, so RAM after
loading is what the chosen layout needs and no more.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from skrr_compile.core import storage as skrr_io
from skrr_compile.core.checkpoints import refuse_pruned_dir
from skrr_compile.core.compressed import CompressionStats, load_tensors, read_header, save_tensors
from skrr_compile.core.encoder import PrunedEncoder
from skrr_compile.magnitude.config import check_sparsity
from skrr_compile.magnitude.layers import find_layers
from skrr_compile.magnitude.layouts import to_semi_structured, to_sparse_layout
from skrr_compile.utils.files import umask_mode

MAGNITUDE_FORMAT = "skrr-compile-magnitude"
MAGNITUDE_VERSION = 1
MARKER = "skrr_magnitude.json"
SPARSE_WEIGHTS = "skrr_sparse.safetensors"
BUFFER_PREFIX = "__buffer__."
LAYOUTS = ("dense", "sparse_csr", "semi_structured")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".gguf")
SKIP_DIRS = ("onnx", "openvino", "coreml", "flax_model")
SINGLE = "model"  # the component name of a plain model directory


class UnknownComponentError(ValueError):
    """A component name the pipeline does not have (the message lists those it has)."""


# sources -----------------------------------------------------------------------------------------------
def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def pipeline_index(path: str | Path) -> dict[str, tuple[str, str]]:
    """Component name -> (library, class) from model_index.json (entries that name a class)."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    return {
        k: (v[0], v[1])
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1]
    }


def model_components(path: str | Path) -> list[str]:
    """The components of a pipeline that are torch models (could be pruned)."""
    out = []
    for name, (library, cls_name) in pipeline_index(path).items():
        cls = _class(library, cls_name, missing_ok=True)
        if cls is not None and isinstance(cls, type) and issubclass(cls, nn.Module):
            out.append(name)
    return out


def _class(library: str, name: str, missing_ok: bool = False):
    try:
        return getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError):
        if missing_ok:
            return None
        raise ValueError(f"cannot import {library}.{name}; is {library} installed?") from None


def parse_targets(spec: str | Mapping | None) -> dict[str, float | None]:
    """ "text_encoder=0.475,unet=0.35" -> {name: sparsity}; a bare name (or number) leaves the sparsity open."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq:
                try:  # a bare number: the sparsity of a plain model directory
                    items.append((SINGLE, float(name)))
                    continue
                except ValueError:
                    items.append((name.strip(), None))
                    continue
            try:
                items.append((name.strip(), float(value)))
            except ValueError:
                raise ValueError(f"target {part!r}: the sparsity {value!r} is not a number") from None
    out = {}
    for name, value in items:
        if name in out:
            raise ValueError(f"target {name!r} is given twice")
        out[name] = None if value is None else check_sparsity(value, f"target {name!r} sparsity")
    return out


def resolve_targets(path: str | Path, targets: Mapping[str, float | None]) -> dict[str, float | None]:
    """Check target names against the pipeline (or a plain model directory, whose one component is "model")."""
    if not is_pipeline_dir(path):
        names = set(targets)
        aliases = {SINGLE, "text_encoder", "encoder", "unet", "transformer", "denoiser"}
        if len(names) > 1 or not names <= aliases:
            raise UnknownComponentError(
                f"{str(path)!r} is a single model, not a pipeline (no model_index.json): give one sparsity, "
                f"e.g. --target 0.5 or --target model=0.5; got {sorted(names)}"
            )
        return {SINGLE: next(iter(targets.values()), None)} if targets else {SINGLE: None}
    available = list(pipeline_index(path))
    models = model_components(path)
    for name in targets:
        if name not in available:
            raise UnknownComponentError(
                f"pipeline {str(path)!r} has no component {name!r}; its components are: {', '.join(available)} "
                f"(prunable: {', '.join(models)})"
            )
        if name not in models:
            raise UnknownComponentError(
                f"component {name!r} of {str(path)!r} is not a torch model; prunable components: {', '.join(models)}"
            )
    return dict(targets)


def load_source_component(path: str | Path, name: str = SINGLE, dtype: torch.dtype | None = None):
    """A component as the original checkpoint has it: pipeline component `name`, or the model in `path`."""
    path = Path(path)
    refuse_pruned_dir(path)  # a pruned output loads as a dense model with what was removed re-initialised
    if is_pipeline_dir(path) and name in pipeline_index(path):
        refuse_pruned_dir(path / name)
    if is_pipeline_dir(path):
        library, cls_name = pipeline_index(path)[name]
        cls = _class(library, cls_name)
        kwargs = {} if dtype is None else ({"torch_dtype": dtype} if library == "diffusers" else {"dtype": dtype})
        obj = cls.from_pretrained(path / name, **kwargs)
        return obj.eval() if isinstance(obj, nn.Module) else obj
    config_path = path / "config.json"
    if config_path.is_file() and "_class_name" in json.loads(config_path.read_text()):
        cls = _class("diffusers", json.loads(config_path.read_text())["_class_name"])
        return cls.from_pretrained(path, **({} if dtype is None else {"torch_dtype": dtype})).eval()
    from skrr_compile.core.checkpoints import load_encoder

    return load_encoder(path, dtype=dtype or torch.float32)


def load_source_tokenizer(path: str | Path, component: str = SINGLE):
    """The tokenizer that feeds `component` (tokenizer_2 for text_encoder_2, ...), or None."""
    path = Path(path)
    if not is_pipeline_dir(path):
        from skrr_compile.core.checkpoints import load_tokenizer

        return load_tokenizer(path)
    suffix = component.removeprefix("text_encoder")
    name = f"tokenizer{suffix}"
    if name in pipeline_index(path):
        return load_source_component(path, name)
    return None


# save --------------------------------------------------------------------------------------------------
def _library_and_class(model: nn.Module) -> tuple[str, str]:
    return type(model).__module__.split(".")[0], type(model).__name__


def save_component(model: nn.Module, directory: str | Path, report: Mapping | None = None) -> CompressionStats:
    """Write config + compressed weights + skrr_magnitude.json into `directory` (created; not atomic by itself:
    call it inside `io.write_dir_atomically`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    library, cls_name = _library_and_class(model)
    if library not in ("transformers", "diffusers"):
        raise TypeError(f"save_component saves transformers / diffusers models, got {library}.{cls_name}")
    state = model.state_dict()
    persistent = set(state)
    tensors = dict(state)
    for name, buf in model.named_buffers():
        if name not in persistent:  # non-persistent buffers are rebuilt from config by __init__, not on meta
            tensors[BUFFER_PREFIX + name] = buf
    stats = save_tensors(tensors, d / SPARSE_WEIGHTS, metadata={"producer": MAGNITUDE_FORMAT})
    if library == "transformers":
        model.config.save_pretrained(d)
    else:
        model.save_config(d)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    marker = {
        "format": MAGNITUDE_FORMAT,
        "version": MAGNITUDE_VERSION,
        "library": library,
        "class": cls_name,
        "dtype": str(dtype).removeprefix("torch."),
        "compression": stats.to_dict(),
        "magnitude": dict(report or {}),
    }
    (d / MARKER).write_text(json.dumps(marker, indent=2, default=str))
    return stats


def _copy_entry(src: Path, dst: Path) -> None:
    """Copy as `cp` does: contents and times, the mode under the user's umask (not the source's as is)."""
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=False, copy_function=_copy_file)
        for d in [dst, *(p for p in dst.rglob("*") if p.is_dir())]:
            d.chmod(umask_mode(0o777))
    else:
        _copy_file(src, dst)


def _copy_file(src, dst) -> None:
    shutil.copyfile(src, dst)
    shutil.copystat(src, dst)
    os.chmod(dst, umask_mode(stat.S_IMODE(os.stat(src).st_mode)))


def save_pruned(
    out_dir: str | Path,
    source: str | Path,
    components: Mapping[str, nn.Module],
    reports: Mapping[str, Mapping] | None = None,
    summary: Mapping | None = None,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Write the pruned model (plain model directory) or pipeline to `out_dir`, atomically.

    `components` maps component names ("model" for a plain directory) to pruned modules: HF / diffusers models
    (compressed with `save_component`) or PrunedEncoders (hybrid; `io.save(..., compress=True)`). Everything
    else of `source` is copied (original weight files of pruned components are not). Returns per-component
    sizes: dense payload bytes, compressed file bytes.
    """
    source, reports = Path(source), dict(reports or {})
    sizes: dict[str, dict] = {}

    def write(model: nn.Module, sub: Path, name: str, tokenizer=None) -> None:
        if isinstance(model, PrunedEncoder):
            skrr_io.save(model, sub, tokenizer=tokenizer, overwrite=True, compress=True)
            weights = sub / skrr_io.WEIGHTS_FILE
            header = read_header(weights)
            dense = sum(
                torch.empty((), dtype=getattr(torch, e["dtype"])).element_size() * _numel(e["shape"])
                for e in header["tensors"].values()
            )
            sizes[name] = {"dense_bytes": dense, "file_bytes": weights.stat().st_size}
        else:
            stats = save_component(model, sub, reports.get(name))
            sizes[name] = {"dense_bytes": stats.dense_bytes, "file_bytes": stats.file_bytes,
                           "encodings": stats.encodings}

    def fill(tmp: Path) -> None:
        if is_pipeline_dir(source):
            for entry in sorted(source.iterdir()):
                if entry.name in components or entry.name == MARKER:
                    continue
                _copy_entry(entry, tmp / entry.name)
            for name, model in components.items():
                write(model, tmp / name, name)
        else:
            if len(components) != 1:
                raise ValueError(f"a plain model directory has one component, got {sorted(components)}")
            model = next(iter(components.values()))
            for entry in sorted(source.iterdir()):
                if entry.name.endswith(WEIGHT_SUFFIXES) or entry.name.endswith(".index.json"):
                    continue
                if entry.is_dir() and entry.name in SKIP_DIRS or entry.name in (MARKER, "config.json"):
                    continue
                _copy_entry(entry, tmp / entry.name)
            if isinstance(model, PrunedEncoder):  # io.save owns the directory layout: write it, then add ours
                write(model, tmp / "_skrr", SINGLE)
                for f in (tmp / "_skrr").iterdir():
                    f.rename(tmp / f.name)
                (tmp / "_skrr").rmdir()
            else:
                write(model, tmp, SINGLE)
        root = {
            "format": MAGNITUDE_FORMAT,
            "version": MAGNITUDE_VERSION,
            **dict(summary or {}),
            "sizes": sizes,
        }
        if is_pipeline_dir(source) or isinstance(next(iter(components.values())), PrunedEncoder):
            (tmp / MARKER).write_text(json.dumps({**root, "kind": "summary"}, indent=2, default=str))
        else:  # the component marker is the root marker: add the summary to it
            marker = json.loads((tmp / MARKER).read_text())
            marker.update({k: v for k, v in root.items() if k not in marker})
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, default=str))

    skrr_io.write_dir_atomically(out_dir, fill, overwrite=overwrite)
    return sizes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# load --------------------------------------------------------------------------------------------------
def read_marker(directory: str | Path) -> dict:
    path = Path(directory) / MARKER
    if not path.is_file():
        raise skrr_io.NotAPrunedModelError(
            f"{str(directory)!r} is not a magnitude-pruned model (no {MARKER}); make one with "
            "`skrr-compile magnitude`"
        )
    marker = json.loads(path.read_text())
    if marker.get("format") != MAGNITUDE_FORMAT or marker.get("version") != MAGNITUDE_VERSION:
        raise skrr_io.NotAPrunedModelError(f"{path} has format {marker.get('format')} v{marker.get('version')}")
    return marker


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def load_component(directory: str | Path, device: str | torch.device = "cpu", layout: str = "dense") -> nn.Module:
    """Rebuild a component saved by `save_component`: built on the meta device, tensors assigned.

    layout "dense": bit-exact dense weights; "sparse_csr": Linear weights stored sparse come back as torch
    sparse CSR tensors (int32 indices; forward only); "semi_structured": 2:4 Linear weights become torch
    semi-structured sparse tensors (CUDA only). The model comes back in eval mode with requires_grad off.
    """
    _check_layout(layout)
    d = Path(directory)
    marker = read_marker(d)
    if "class" not in marker:
        raise skrr_io.NotAPrunedModelError(f"{d / MARKER} describes a pipeline or hybrid, not one component")
    cls = _class(marker["library"], marker["class"])
    if marker["library"] == "transformers":
        import transformers

        config = transformers.AutoConfig.from_pretrained(d)
        with torch.device("meta"):
            model = cls(config)
    else:
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(d))
    linear = {layer.name for layer in find_layers(model) if layer.kind == "linear"}
    header = read_header(d / SPARSE_WEIGHTS) or {"tensors": {}}

    def sparse(name: str) -> bool:  # CSR only pays for itself in RAM above 50 % sparsity
        e = header["tensors"].get(name)
        return name in linear and e is not None and e["nnz"] <= 0.5 * _numel(e["shape"])

    tensors = load_tensors(
        d / SPARSE_WEIGHTS, device=device, layout="sparse_csr" if layout == "sparse_csr" else "dense", sparse=sparse
    )
    buffers = {k[len(BUFFER_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(BUFFER_PREFIX)}
    model.load_state_dict(tensors, strict=True, assign=True)
    _retie(model, header.get("aliases", {}))
    for name, buf in buffers.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[leaf] = buf
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise skrr_io.NotAPrunedModelError(f"{d}: no saved tensor for {left[:5]} ({len(left)} in all)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if layout == "semi_structured":
        model.skrr_semi_structured = to_semi_structured(model)
    return model


def _retie(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Make tied weights (stored once, as aliases) one Parameter again, as the original model had them."""
    for alias, canonical in aliases.items():
        if alias.startswith(BUFFER_PREFIX) or canonical.startswith(BUFFER_PREFIX):
            continue
        owner_name, _, leaf = alias.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if leaf in owner._parameters:
            owner._parameters[leaf] = model.get_parameter(canonical)


def load_pipeline(directory: str | Path, device: str | torch.device = "cpu", layout: str = "dense", **kwargs):
    """A pruned pipeline saved by `save_pruned`: pruned components rebuilt by us, the rest by diffusers."""
    from diffusers import DiffusionPipeline

    _check_layout(layout)
    d = Path(directory)
    loaded, graphs = {}, {}
    for name in pipeline_index(d):
        sub = d / name
        if (sub / MARKER).is_file():
            loaded[name] = load_component(sub, device=device, layout=layout)
        elif (sub / skrr_io.MODEL_FILE).is_file():
            graphs[name] = _load_hybrid(sub, device, layout)
    pipe = DiffusionPipeline.from_pretrained(d, **loaded, **dict.fromkeys(graphs), **kwargs)
    if graphs:
        pipe.register_modules(**graphs)
    return pipe.to(device)


def _load_hybrid(directory: Path, device, layout: str) -> PrunedEncoder:
    pruned = skrr_io.load(directory, device=device)
    if layout == "sparse_csr":
        to_sparse_layout(pruned)
    elif layout == "semi_structured":
        pruned.skrr_semi_structured = to_semi_structured(pruned)
    return pruned


def load_pruned(directory: str | Path, device: str | torch.device = "cpu", layout: str = "dense", **kwargs):
    """Load what `skrr-compile magnitude` wrote: a pipeline, a hybrid PrunedEncoder, or a single model."""
    _check_layout(layout)
    d = Path(directory)
    if is_pipeline_dir(d):
        return load_pipeline(d, device=device, layout=layout, **kwargs)
    if (d / skrr_io.MODEL_FILE).is_file():
        return _load_hybrid(d, device, layout)
    return load_component(d, device=device, layout=layout)
