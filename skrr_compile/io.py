"""Save / load a pruned encoder: plan + HF config + tokenizer + remaining weights (safetensors, no pickle)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from .compressed import load_tensors, save_tensors
from .graph import apply_to_graph, trace
from .module import PrunedEncoder, bind_tensors, named_tensors, retarget_devices
from .plan import Plan

FORMAT = "skrr-compile"
FORMAT_VERSION = 1
MODEL_FILE, WEIGHTS_FILE, PLAN_FILE = "skrr_model.json", "model.safetensors", "skrr_plan.json"


class NotAPrunedModelError(ValueError):
    """A directory that does not hold a model saved by skrr-compile."""


# atomic writes ----------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dir_atomically(out_dir: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Build the directory in a temporary sibling, then move it into place; on error nothing is left."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{str(out_dir)!r} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} is not empty; choose a new directory or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        fill(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# save -------------------------------------------------------------------------------------------------
def _dedup(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One entry per storage; the other names become aliases of it."""
    unique, aliases, first = {}, {}, {}
    for name in sorted(tensors):
        t = tensors[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def save(
    pruned: PrunedEncoder, out_dir: str | Path, tokenizer=None, overwrite: bool = False, compress: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a directory that `load` rebuilds without the original checkpoint.

    `compress=True` stores sparse (e.g. magnitude-pruned) weights as values + bitmask / CSR
    (see `skrr_compile.compressed`); `load` reads both forms. `extra_files` (name -> text) are written too.
    """
    if not isinstance(pruned, PrunedEncoder):
        raise TypeError(f"save expects a PrunedEncoder (from skrr.apply or skrr.load), got {type(pruned).__name__}")
    unique, aliases = _dedup(named_tensors(pruned.graph_module))

    def fill(tmp: Path) -> None:
        if compress:
            save_tensors(unique, tmp / WEIGHTS_FILE, metadata={"producer": FORMAT})
        else:
            save_file(unique, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": FORMAT})
        pruned.config.save_pretrained(tmp)
        (tmp / PLAN_FILE).write_text(pruned.plan.to_json())
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "architecture": pruned.architecture,
            "dtype": str(pruned.dtype).removeprefix("torch."),
            "aliases": aliases,
            "params": pruned.num_params,
            "bytes": pruned.num_bytes,
            **{k: v for k, v in pruned.info.items()},
        }
        (tmp / MODEL_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return write_dir_atomically(out_dir, fill, overwrite=overwrite)


# load -------------------------------------------------------------------------------------------------
def model_class(architecture: str):
    cls = getattr(transformers, architecture, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise NotAPrunedModelError(f"unknown architecture {architecture!r}: not a transformers model class")
    return cls


def build_graph_module(config, architecture: str, plan: Plan, dtype: torch.dtype = torch.float32):
    """Trace the architecture on the meta device (nothing allocated) and apply `plan` to it."""
    cls = model_class(architecture)
    with torch.device("meta"):
        model = cls(config).to(dtype).eval()
    return apply_to_graph(trace(model), plan)


def read_model_meta(directory: str | Path) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise NotAPrunedModelError(f"{str(d)!r} is not a directory")
    meta_path = d / MODEL_FILE
    if not meta_path.is_file():
        raise NotAPrunedModelError(
            f"{str(d)!r} is not a pruned model saved by skrr-compile (no {MODEL_FILE}); "
            "make one with `skrr-compile apply` or skrr.save"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise NotAPrunedModelError(f"{meta_path} has format {meta.get('format')} v{meta.get('version')}")
    return meta


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> PrunedEncoder:
    """Rebuild the pruned graph from the saved config (meta device) and load the remaining weights."""
    d = Path(directory)
    meta = read_model_meta(d)
    config = transformers.AutoConfig.from_pretrained(d)
    plan = Plan.load(d / PLAN_FILE)
    saved_dtype = getattr(torch, meta["dtype"])
    gm = build_graph_module(config, meta["architecture"], plan, dtype=saved_dtype)
    tensors = load_tensors(d / WEIGHTS_FILE, device=str(device))  # plain or compressed safetensors
    for alias, canonical in meta.get("aliases", {}).items():
        tensors[alias] = tensors[canonical]
    bind_tensors(gm, tensors)
    retarget_devices(gm, torch.device(device))
    info = {k: meta[k] for k in ("dense_params", "dense_bytes", "removed_params", "fingerprint", "blocks") if k in meta}
    pruned = PrunedEncoder(gm, config, plan, meta["architecture"], info)
    if dtype is not None and dtype != saved_dtype:
        pruned = pruned.to(dtype)
    return pruned
