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
]
__version__ = "0.1.0"
