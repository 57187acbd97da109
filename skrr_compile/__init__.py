"""skrr-compile: shrink the text encoders of text-to-image diffusion models by FX graph rewriting.

One verb per step of the data flow:

    graph = skrr.trace(model)                                    # torch.export graph + sub-block table
    result = skrr.search(model, tokenizer, prompts, sparsity=0.4)  # Skrr beam skip + re-use -> Plan
    result = skrr.search(model, tokenizer, prompts, skrr.SearchConfig.from_kwargs(sparsity=0.4, beam=3))
    pruned = skrr.apply(model, result.plan)                      # rewritten graph, drop-in module
    skrr.save(pruned, "out/"); pruned = skrr.load("out/")
    skrr.magnitude_prune(model, skrr.MagnitudeConfig(sparsity=0.475))
    skrr.export_onnx(pruned, "encoder.onnx"); skrr.prune_pipeline(pipe, prompts, sparsity=0.4)

Subpackages, in data-flow order: `core` (trace, plan, apply, save/load), `blocksearch` (calibration,
discrepancy, staged runner, Skrr and baselines), `magnitude`, `deploy` (ONNX, torch.compile, diffusers),
`cli`; graph passes in `skrr_compile.passes`, Triton kernels in `skrr_compile.kernels`.
"""

from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.config import SearchConfig
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.heal import heal
from skrr_compile.blocksearch.run import SearchResult, search
from skrr_compile.core.encoder import PrunedEncoder, apply
from skrr_compile.core.plan import Plan, PlanError
from skrr_compile.core.storage import load, save
from skrr_compile.core.trace import EncoderGraph, trace
from skrr_compile.magnitude.config import MagnitudeConfig
from skrr_compile.magnitude.prune import magnitude_prune
from skrr_compile.passes.partition import SubBlock, UnsupportedModelError

__all__ = [
    # the verbs, in data-flow order
    "trace",
    "search",
    "apply",
    "save",
    "load",
    "magnitude_prune",
    "export_onnx",
    "prune_pipeline",
    "quantize",
    "heal",
    # configs and results
    "Plan",
    "SearchConfig",
    "MagnitudeConfig",
    "QuantConfig",
    "Calibration",
    "SearchResult",
    "EncoderGraph",
    "PrunedEncoder",
    "SubBlock",
    # errors
    "PlanError",
    "SearchError",
    "UnsupportedModelError",
    # deployment and storage helpers (loaded on first use: diffusers / onnx / torch._dynamo only then)
    "backend",
    "apply_to_pipeline",
    "load_into",
    "save_pipeline",
    "load_pipeline",
    "describe_pipeline",
    "PrunedTextEncoder",
    "save_pruned",
    "load_pruned",
    "save_tensors",
    "load_tensors",
]
__version__ = "0.1.0"

_LAZY = {
    "export_onnx": "skrr_compile.deploy.onnx",
    "quantize": "skrr_compile.deploy.quantize",
    "QuantConfig": "skrr_compile.core.quantize",
    "backend": "skrr_compile.deploy.compile_backend",
    "prune_pipeline": "skrr_compile.deploy.pipelines",
    "apply_to_pipeline": "skrr_compile.deploy.pipelines",
    "load_into": "skrr_compile.deploy.pipelines",
    "save_pipeline": "skrr_compile.deploy.pipelines",
    "load_pipeline": "skrr_compile.deploy.pipelines",
    "describe_pipeline": "skrr_compile.deploy.pipelines",
    "PrunedTextEncoder": "skrr_compile.deploy.pipelines",  # diffusers resolves saved pipelines' encoders here
    "save_pruned": "skrr_compile.magnitude.storage",
    "load_pruned": "skrr_compile.magnitude.storage",
    "save_tensors": "skrr_compile.core.compressed",
    "load_tensors": "skrr_compile.core.compressed",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skrr_compile' has no attribute {name!r}")
