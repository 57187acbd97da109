"""skrr-compile: shrink the text encoders of text-to-image diffusion models by FX graph rewriting."""

from skrr_compile.passes.partition import SubBlock, UnsupportedModelError

from .graph import EncoderGraph, trace
from .io import load, save
from .module import PrunedEncoder, apply
from .plan import Plan, PlanError

__all__ = [
    "trace",
    "apply",
    "save",
    "load",
    "Plan",
    "EncoderGraph",
    "PrunedEncoder",
    "SubBlock",
    "PlanError",
    "UnsupportedModelError",
    # deployment (loaded on first use: diffusers / onnx / torch._dynamo are imported only then)
    "export_onnx",
    "backend",
    "prune_pipeline",
    "apply_to_pipeline",
    "load_into",
    "save_pipeline",
    "load_pipeline",
    "describe_pipeline",
    "PrunedTextEncoder",
    # magnitude pruning and compressed sparse weights (issue 6)
    "MagnitudeConfig",
    "magnitude_prune",
    "save_pruned",
    "load_pruned",
    "save_tensors",
    "load_tensors",
]
__version__ = "0.1.0"

_LAZY = {
    "export_onnx": "skrr_compile.export",
    "backend": "skrr_compile.compile_backend",
    "prune_pipeline": "skrr_compile.pipelines",
    "apply_to_pipeline": "skrr_compile.pipelines",
    "load_into": "skrr_compile.pipelines",
    "save_pipeline": "skrr_compile.pipelines",
    "load_pipeline": "skrr_compile.pipelines",
    "describe_pipeline": "skrr_compile.pipelines",
    "PrunedTextEncoder": "skrr_compile.pipelines",  # diffusers resolves saved pipelines' encoders here
    "MagnitudeConfig": "skrr_compile.magnitude",
    "magnitude_prune": "skrr_compile.magnitude",
    "save_pruned": "skrr_compile.magnitude_io",
    "load_pruned": "skrr_compile.magnitude_io",
    "save_tensors": "skrr_compile.compressed",
    "load_tensors": "skrr_compile.compressed",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skrr_compile' has no attribute {name!r}")
