"""Rebuild a pruned graph from a HF config alone: trace on the meta device, apply the plan."""

from __future__ import annotations

import torch
import transformers

from skrr_compile.core.errors import NotAPrunedModelError
from skrr_compile.core.plan import Plan
from skrr_compile.core.trace import apply_to_graph, trace


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
