"""torch.compile backend: the plan applied inside torch.compile equals the eager pruned module, without
recompiles across batch and sequence sizes (dynamic=True), registered by name, and clear errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentencepiece")
from pipeline_factories import clip_encoder, t5_encoder  # noqa: E402

import skrr_compile as skrr  # noqa: E402
from skrr_compile.deploy.compile_backend import SkrrBackend, param_fqn, resolve_plan  # noqa: E402

SHAPES = [(2, 7), (3, 12), (5, 4)]  # sizes >= 2: Dynamo specialises sizes 0 and 1 by design


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def t5():
    model = t5_encoder(32, layers=2, seed=1)
    plan = skrr.Plan(skip=[0, 3], reuse={3: 1})  # attention 0 (its position bias stays); FFN 1 re-uses FFN 0
    return model, skrr.apply(model, plan)


def _inputs(vocab, batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0
    return ids, mask


def test_inductor_equals_eager_pruned_without_recompiles(t5):
    model, pruned = t5
    backend = skrr.backend(pruned.plan)
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for k, (batch, seq) in enumerate(SHAPES):
            ids, mask = _inputs(model.config.vocab_size, batch, seq, seed=k)
            got = compiled(ids, attention_mask=mask).last_hidden_state
            ref = pruned(ids, attention_mask=mask).last_hidden_state
            dense = model(ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            assert (ref - dense).abs().max() > 1e-2  # the plan matters
    assert backend.compiles == 1, backend.reports  # one graph served every batch and sequence length
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 1
    report = backend.reports[0]
    assert report["applied"] and report["architecture"] == "T5EncoderModel" and report["layers"] == "encoder.block"
    assert report["kept_params"] == pruned.num_params and report["dense_params"] == pruned.info["dense_params"]


def test_plan_from_directory_all_outputs_eager_inner(tmp_path):
    model = clip_encoder(32, layers=3, projection=16, seed=2)
    pruned = skrr.apply(model, skrr.Plan(skip=[1, 2, 5], reuse={2: 0}))
    skrr.save(pruned, tmp_path / "pruned")
    backend = skrr.backend(tmp_path / "pruned", inner="eager")  # the rewritten ATen graph run as is
    assert backend.plan.skip == (1, 2, 5)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for k, (batch, seq) in enumerate(SHAPES):
            ids, mask = _inputs(model.config.vocab_size, batch, seq, seed=10 + k)
            got = compiled(ids, attention_mask=mask, output_hidden_states=True)
            ref = pruned(ids, attention_mask=mask, output_hidden_states=True)
            torch.testing.assert_close(got.text_embeds, ref.text_embeds, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=1e-6, atol=1e-6)
            for a, b in zip(got.hidden_states, ref.hidden_states, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert backend.compiles == 1 and backend.reports[0]["architecture"] == "CLIPTextModelWithProjection"


def test_registered_by_name(t5, tmp_path):
    assert "skrr" in torch._dynamo.list_backends(exclude_tags=())
    model, pruned = t5
    plan_path = tmp_path / "plan.json"
    pruned.plan.save(plan_path)
    compiled = torch.compile(model, backend="skrr", options={"plan": str(plan_path), "inner": "eager"})
    ids, mask = _inputs(model.config.vocab_size, 2, 6, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask).last_hidden_state,
                                   pruned(ids, attention_mask=mask).last_hidden_state, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="needs a plan"):
        torch.compile(model, backend="skrr")(ids, attention_mask=mask)


def test_plan_for_another_model_is_refused(t5):
    plan = t5[1].plan  # fingerprint of a 2-layer T5
    other = t5_encoder(32, layers=3, seed=5)
    ids, mask = _inputs(other.config.vocab_size, 2, 5, seed=1)
    with pytest.raises(Exception, match="another model"):
        torch.compile(other, backend=skrr.backend(plan, inner="eager"))(ids, attention_mask=mask)
    with pytest.raises(Exception, match="out of range"):
        torch.compile(other, backend=skrr.backend(skrr.Plan(skip=[40]), inner="eager"))(ids, attention_mask=mask)


def test_graph_without_encoder_passes_through():
    backend = SkrrBackend(skrr.Plan(skip=[1]), inner="eager")

    def f(x):
        return torch.nn.functional.gelu(x) * 2

    x = torch.randn(3, 4)
    torch.testing.assert_close(torch.compile(f, backend=backend)(x), f(x))
    assert backend.compiles == 1 and not backend.reports[0]["applied"]


def test_helpers_and_bad_arguments(tmp_path):
    assert param_fqn("L['self']._modules['encoder']._modules['block']._modules['0']._parameters['weight']") == "encoder.block.0.weight"
    assert param_fqn("L['args'][0]") is None
    plan = skrr.Plan(skip=[1], reuse={})
    assert resolve_plan(plan) is plan and resolve_plan(plan.to_dict()) == plan
    with pytest.raises(TypeError, match="plan must be"):
        resolve_plan(3)
    with pytest.raises(ValueError, match="inner backend"):
        skrr.backend(plan, inner="tvm")
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="not a pruned model"):
        resolve_plan(tmp_path / "x")
