"""The removed-parameter target a sparsity asks for (paper accounting), and whether any plan reaches it."""

from __future__ import annotations

import math

from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.core.plan import Plan
from skrr_compile.core.trace import EncoderGraph


def removed_by_skip(graph: EncoderGraph, skip, memo: dict) -> int:
    key = frozenset(skip)
    if key not in memo:
        memo[key] = graph.removed_params(Plan(skip=sorted(key)))
    return memo[key]


def check_sparsity(graph: EncoderGraph, sparsity: float) -> int:
    """Removed-parameter target for `sparsity`; errors when no plan can reach it."""
    if not (0.0 < sparsity < 1.0):
        raise SearchError(f"sparsity must be in (0, 1), got {sparsity}")
    total = graph.total_params
    target = math.ceil(sparsity * total)
    best = max(graph.removed_params(Plan(skip=[b.index for b in graph.blocks if b.index != keep.index]))
               for keep in graph.blocks)
    if best < target:
        raise SearchError(
            f"sparsity {sparsity:.3f} cannot be reached: removing every sub-block but one removes at most "
            f"{best / total:.3f} of the parameters (embeddings and norms stay)"
        )
    return target
