"""Quantization-aware search: candidates scored with quantized weights against the dense full-precision reference.

The dense reference is computed first, with the full-precision weights; then every weight the quantization
selects is replaced, in the staged runner, by its torchao tensor, and the boundary states computed so far are
dropped. Weight quantization is per tensor, so quantizing the whole model and then skipping or re-using
sub-blocks gives exactly the tensors of quantizing each candidate's pruned model: the search's scores are
those of the naive loop "apply the plan, quantize, score" (test: tests/test_quantize.py).
"""

from __future__ import annotations

import dataclasses

from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.core.quantize import QuantConfig, check_runnable, describe, quantized_tensors
from skrr_compile.core.trace import EncoderGraph
from skrr_compile.passes.functional import to_functional


def functional_graph(graph: EncoderGraph, config: QuantConfig, offload: str, device) -> EncoderGraph:
    """A copy of the traced graph whose Linear / embedding calls dispatch to tensor subclasses."""
    if offload != "none":
        raise SearchError("a quantization-aware search keeps the quantized weights in memory: use offload='none'")
    try:
        check_runnable(config, device)
    except ValueError as e:
        raise SearchError(str(e)) from e
    gm = graph.copy_graph_module()
    to_functional(gm)
    return dataclasses.replace(graph, graph_module=gm)


def quantize_evaluator(ev, graph: EncoderGraph, config: QuantConfig) -> dict:
    """Swap the quantized weights into `ev`'s runner (after its dense reference) and drop every state computed
    with the full-precision ones. Returns the quantization's description for the report."""
    tensors, selection = quantized_tensors(graph.graph_module, config)
    runner = ev.runner
    for node in list(runner.attrs):
        if node.target in tensors:
            runner.attrs[node] = tensors[node.target]
    runner._reuse_cache.clear()
    ev.clear()  # the memo's states were computed with full-precision weights
    ev._contexts.clear()  # so were the kept contexts (embeddings, when they are quantized)
    ev.keep_contexts()
    return describe(config, selection)
