"""Save / load pruned pipelines, and put pruned encoders into a dense pipeline."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from skrr_compile.core.encoder import PrunedEncoder
from skrr_compile.core.storage import MODEL_FILE, NotAPrunedModelError, read_model_meta
from skrr_compile.deploy.pipelines.encoder import (
    COMPONENT_CLASS,
    COMPONENT_PARAMS,
    SUMMARY_FILE,
    TEXT_ENCODERS,
    PrunedTextEncoder,
    record_component,
)
from skrr_compile.deploy.pipelines.prune import PipelinePlans
from skrr_compile.deploy.pipelines.specs import describe_pipeline, present_encoders
from skrr_compile.utils.files import follow_umask


# ---------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------
def save_pipeline(pipe, directory: str | Path, plans: PipelinePlans | None = None, **kwargs) -> Path:
    """`pipe.save_pretrained(directory)` plus a summary of the pruned encoders (skrr_pipeline.json)."""
    directory = Path(directory)
    pipe.save_pretrained(directory, **kwargs)
    pruned = {n: getattr(pipe, n) for n in TEXT_ENCODERS if isinstance(getattr(pipe, n, None), PrunedEncoder)}
    sizes = encoder_sizes(pipe) if pruned else {}
    keys = ("params", "dense_params", "sparsity", "text_model", "component", "component_params", "unused_params")
    summary = {
        "pipeline": type(pipe).__name__,
        "pruned": {n: {"plan": m.plan.to_dict(), **{k: sizes[n][k] for k in keys}} for n, m in pruned.items()},
    }
    if plans is not None:
        summary["reports"] = plans.reports
        if plans.spec is not None:
            summary["spec"] = plans.spec.to_dict()
    (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    for path in [directory, *directory.rglob("*")]:  # files some savers create 0600 follow the umask too
        if not path.is_symlink():
            follow_umask(path, 0o777 if path.is_dir() else 0o666)
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
        current = spec.encoders[name].encoder(pipe)  # the text model the plan was searched on
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
        record_component(loaded[name], getattr(pipe, name))
    pipe.register_modules(**loaded)
    return list(loaded)


def encoder_sizes(pipe) -> dict[str, dict]:
    """Parameters of each text encoder of `pipe`, dense or pruned, like with like.

    `params` / `dense_params` / `sparsity` count the text model the pipeline runs (`EncoderSpec.encoder`: the
    language model inside FLUX.2's, Qwen-Image's, Klein's and HiDream's LLM components), now and dense, so the
    sparsity is the pruned text model against the dense text model. `component_params` is the whole dense
    component (LM head, vision tower included; for a pruned encoder as recorded when it replaced the component,
    None when unknown) and `unused_params` = component_params - dense_params: what dropping the parts the pipeline
    never runs saves (or, dense, would save) on top of the pruning.
    """
    from skrr_compile.utils.tensors import param_numel

    try:
        specs = describe_pipeline(pipe).encoders
    except (ValueError, AttributeError):  # e.g. saved without its denoiser: each component counted as a text model
        specs = {}
    sizes = {}
    for name in present_encoders(pipe):
        module = getattr(pipe, name)
        spec = specs.get(name)
        if isinstance(module, PrunedEncoder):
            dense = module.info.get("dense_params")
            whole = module.info.get(COMPONENT_PARAMS)
            if whole is None and (spec is None or spec.module is None):
                whole = dense  # the component was the text model itself
            size = {"params": module.num_params, "dense_params": dense, "sparsity": module.sparsity,
                    "text_model": module.architecture, "component": module.info.get(COMPONENT_CLASS),
                    "component_params": whole, "pruned": True}
        else:
            text_model = spec.encoder(pipe) if spec is not None else module
            dense = whole = param_numel(text_model)
            if text_model is not module:
                whole = param_numel(module)
            size = {"params": dense, "dense_params": dense, "sparsity": 0.0, "text_model": type(text_model).__name__,
                    "component": type(module).__name__, "component_params": whole, "pruned": False}
        size["unused_params"] = None if size["component_params"] is None or dense is None else size["component_params"] - dense
        sizes[name] = size
    return sizes

