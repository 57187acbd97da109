"""Issue 12: LLM text encoders (templates, dropped tokens, hidden layers), any encoder from the CLI, Phi-3,
GGUF checkpoints, and the built-in real LLM (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest
import torch
from factories import LLM_FAMILIES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core import check_plan, plans

import skrr_compile as skrr


# --- partition of LLM families (Phi-3's chunked gate_up projection, eval dropouts) --------------------------
@pytest.fixture(scope="module", params=sorted(LLM_FAMILIES))
def llm_graph(request):
    fam = LLM_FAMILIES[request.param]
    model = fam.make()
    return fam, model, skrr.trace(model)


def test_llm_block_tables_match_hand_written_ownership(llm_graph):
    fam, model, graph = llm_graph
    assert [b.kind for b in graph.blocks] == ["attn", "ffn"] * 3
    for b in graph.blocks:
        assert sorted(b.params) == sorted(fam.owned(model, b.index)), b
    check_plan(fam, model, graph, skrr.Plan())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_llm_random_plans_match_hand_patched_model(llm_graph, data):
    fam, model, graph = llm_graph
    check_plan(fam, model, graph, data.draw(plans(len(graph.blocks))))


def test_phi3_fixed_plans_match_hand_patched_model():
    """Phi-3 splits gate_up_proj with aten.chunk (a multi-output node) and keeps eval dropouts in the graph."""
    fam = LLM_FAMILIES["phi3"]
    model = fam.make(seed=3)
    graph = skrr.trace(model)
    ops = {n.target for n in graph.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.dropout.default in ops and torch.ops.aten.chunk.default in ops
    for plan in (skrr.Plan(skip=[1]), skrr.Plan(skip=[0, 3]), skrr.Plan(skip=[2, 3], reuse={3: 5}),
                 skrr.Plan(skip=[0, 1, 2, 3, 4])):
        check_plan(fam, model, graph, plan)
