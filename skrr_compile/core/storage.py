"""Save / load a pruned encoder: plan + HF config + tokenizer + remaining weights (safetensors, no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from skrr_compile.core.compressed import load_tensors, save_tensors
from skrr_compile.core.encoder import PrunedEncoder
from skrr_compile.core.errors import NotAPrunedModelError
from skrr_compile.core.plan import Plan
from skrr_compile.core.rebuild import build_graph_module
from skrr_compile.utils.files import follow_umask, write_dir_atomically
from skrr_compile.utils.tensors import bind_tensors, named_tensors, retarget_devices

FORMAT = "skrr-compile"
FORMAT_VERSION = 1
MODEL_FILE, WEIGHTS_FILE, PLAN_FILE = "skrr_model.json", "model.safetensors", "skrr_plan.json"









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
    (see `skrr_compile.core.compressed`); `load` reads both forms. `extra_files` (name -> text) are written too.
    """
    if not isinstance(pruned, PrunedEncoder):
        raise TypeError(f"save expects a PrunedEncoder (from skrr.apply or skrr.load), got {type(pruned).__name__}")
    quantized = bool(pruned.info.get("quantization"))
    if quantized:  # torchao tensors: values, scales and zero points as plain tensors (int4 packed)
        from skrr_compile.core.quantize import require_torchao
        from skrr_compile.core.quantized_io import flatten

        require_torchao()
        unique, tensor_meta, aliases = flatten(named_tensors(pruned.graph_module))
    else:
        unique, aliases = _dedup(named_tensors(pruned.graph_module))

    def fill(tmp: Path) -> None:
        if quantized:
            save_file(unique, str(tmp / WEIGHTS_FILE), metadata={**tensor_meta, "format": "pt", "producer": FORMAT})
            follow_umask(tmp / WEIGHTS_FILE)
        elif compress:
            save_tensors(unique, tmp / WEIGHTS_FILE, metadata={"producer": FORMAT})
        else:
            save_file(unique, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": FORMAT})
            follow_umask(tmp / WEIGHTS_FILE)  # safetensors writes 0600
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
    if meta.get("quantization"):
        from skrr_compile.core.quantize import load_quantized_tensors

        tensors = load_quantized_tensors(gm, d / WEIGHTS_FILE, meta["quantization"], device)
    else:
        tensors = load_tensors(d / WEIGHTS_FILE, device=str(device))  # plain or compressed safetensors
    for alias, canonical in meta.get("aliases", {}).items():
        tensors[alias] = tensors[canonical]
    bind_tensors(gm, tensors)
    retarget_devices(gm, torch.device(device))
    info = {k: meta[k] for k in ("dense_params", "dense_bytes", "removed_params", "fingerprint", "blocks",
                                 "quantization") if k in meta}
    pruned = PrunedEncoder(gm, config, plan, meta["architecture"], info)
    if dtype is not None and dtype != saved_dtype:
        pruned = pruned.to(dtype)
    return pruned
