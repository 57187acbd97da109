"""Graph core: trace, partition, rewrite against hand-patched eager HF models; exact parameter accounting."""

from __future__ import annotations

import pytest
import torch
from factories import FAMILIES, inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skrr_compile as skrr
from skrr_compile.utils.tensors import param_numel

SHAPES = [(2, 8), (3, 13)]  # the traced example shape, and one never seen at trace time


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_graph(request):
    fam = FAMILIES[request.param]
    model = fam.make()
    return fam, model, skrr.trace(model)


def plans(n_blocks: int):
    """Random valid plans: a proper subset skipped, some skipped ones re-using a kept one of their kind."""

    @st.composite
    def build(draw):
        skip = draw(st.sets(st.integers(0, n_blocks - 1), min_size=1, max_size=n_blocks - 1))
        kept = [i for i in range(n_blocks) if i not in skip]
        reuse = {}
        for i in sorted(skip):
            same = [j for j in kept if j % 2 == i % 2]
            if same and draw(st.booleans()):
                reuse[i] = draw(st.sampled_from(same))
        return skrr.Plan(skip=sorted(skip), reuse=reuse)

    return build()


def _outputs(out):
    names = ("last_hidden_state", "pooler_output", "text_embeds")
    return {k: getattr(out, k) for k in names if getattr(out, k, None) is not None}


def check_plan(fam, model, graph, plan):
    pruned = skrr.apply(graph, plan)
    ref = fam.reference(model, plan.skip, plan.reuse)
    for batch, seq in SHAPES:
        ids, mask = inputs(batch, seq, seed=batch * seq)
        with torch.no_grad():
            got, want = pruned(ids, attention_mask=mask), ref(ids, attention_mask=mask)
        got_o, want_o = _outputs(got), _outputs(want)
        assert got_o.keys() == want_o.keys() and got_o
        for key in want_o:
            torch.testing.assert_close(got_o[key], want_o[key], atol=1e-5, rtol=1e-5, msg=f"{key} {plan}")
    dense = param_numel(model)
    assert pruned.num_params == dense - fam.removed_params(model, plan.skip)
    assert graph.removed_params(plan) == dense - pruned.num_params
    return pruned


def test_block_table_matches_hand_written_ownership(family_graph):
    fam, model, graph = family_graph
    n_layers = len(model.get_submodule(fam.layers))
    assert [b.kind for b in graph.blocks] == ["attn", "ffn"] * n_layers
    assert [b.index for b in graph.blocks] == list(range(2 * n_layers))
    for b in graph.blocks:
        assert sorted(b.params) == sorted(fam.owned(model, b.index)), b
        assert b.layer == b.index // 2 and b.path == f"{fam.layers}.{b.layer}"
    assert graph.total_params == param_numel(model)


def test_dense_graph_matches_eager(family_graph):
    fam, model, graph = family_graph
    check_plan(fam, model, graph, skrr.Plan())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_plans_match_hand_patched_model(family_graph, data):
    fam, model, graph = family_graph
    check_plan(fam, model, graph, data.draw(plans(len(graph.blocks))))


@pytest.mark.parametrize("name", ["t5-gated", "umt5"])
def test_t5_position_bias_kept_when_mha0_skipped_or_reused(name):
    fam = FAMILIES[name]
    model = fam.make(seed=1)
    graph = skrr.trace(model)
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    skipped = check_plan(fam, model, graph, skrr.Plan(skip=[0]))
    reused = check_plan(fam, model, graph, skrr.Plan(skip=[0], reuse={0: 2}))
    from_zero = check_plan(fam, model, graph, skrr.Plan(skip=[2], reuse={2: 0}))
    names = lambda p: {n for n, _ in p.graph_module.named_parameters()}  # noqa: E731
    # T5: layer 0 owns the shared bias table, so it survives any skip of MHA 0; UMT5: each layer owns its own
    assert (bias in names(skipped)) == (name != "umt5")
    assert (bias in names(reused)) == (name != "umt5")
    assert bias in names(from_zero)


def test_reuse_shares_storage_and_adds_zero_bytes():
    fam = FAMILIES["t5-gated"]
    model = fam.make()
    graph = skrr.trace(model)
    only_skip = skrr.apply(graph, skrr.Plan(skip=[1, 2]))
    with_reuse = skrr.apply(graph, skrr.Plan(skip=[1, 2], reuse={1: 3, 2: 4}))
    assert with_reuse.num_bytes == only_skip.num_bytes
    gm = with_reuse.graph_module
    users = {n.target for n in gm.graph.nodes if n.op == "get_attr" and "block.2.layer.1.DenseReluDense.wo" in n.target}
    assert users == {"encoder.block.2.layer.1.DenseReluDense.wo.weight"}
    assert not any("block.1.layer.0" in n for n, _ in gm.named_parameters())


def test_t5_xxl_figures_on_meta_device():
    """The paper's T5-v1.1-XXL accounting, built on the meta device (nothing allocated)."""
    import transformers as tf

    cfg = tf.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = tf.T5EncoderModel(cfg)
    graph = skrr.trace(model)
    assert graph.total_params == 4_762_310_656
    assert {b.num_params for b in graph.blocks if b.kind == "attn"} == {67_112_960}
    assert {b.num_params for b in graph.blocks if b.kind == "ffn"} == {125_833_216}
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert all(bias not in b.params for b in graph.blocks)
    mixed = skrr.Plan(skip=[2 * i for i in range(1, 12)] + [2 * i + 1 for i in range(10)])
    assert round(100 * graph.sparsity(mixed), 2) == 41.92
    assert bias in graph.live_param_names(mixed)
    six_layers = skrr.Plan(skip=[k for layer in range(6) for k in (2 * layer, 2 * layer + 1)])
    assert round(100 * graph.sparsity(six_layers), 2) == 24.31
    assert graph.removed_params(six_layers) == 6 * (67_112_960 + 125_833_216)


def test_drop_in_module_behaves_like_hf():
    fam = FAMILIES["clip-proj"]
    model = fam.make()
    pruned = skrr.apply(model, skrr.Plan(skip=[3]))
    ids, mask = inputs(2, 9)
    out = pruned(ids)  # no mask: all tokens
    ref = fam.reference(model, [3], {})(ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(out.text_embeds, ref.text_embeds, atol=1e-5, rtol=1e-5)
    assert type(out).__name__ == type(ref).__name__
    assert out.hidden_states is None
    hs = pruned(ids, output_hidden_states=True).hidden_states
    assert len(hs) == len(model.text_model.encoder.layers) + 1
    as_tuple = pruned(ids, attention_mask=mask, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert pruned.config is model.config and pruned.device.type == "cpu" and pruned.dtype == torch.float32
    with pytest.raises(ValueError, match="input_ids and attention_mask only"):
        pruned(ids, position_ids=torch.zeros_like(ids))


def test_to_dtype_retraces_and_stays_correct():
    fam = FAMILIES["t5-gated"]
    model = fam.make()
    pruned = skrr.apply(model, skrr.Plan(skip=[1], reuse={1: 3}))
    ids, mask = inputs(2, 6)
    want = pruned(ids, attention_mask=mask).last_hidden_state
    pruned.to(torch.float64)
    got = pruned(ids, attention_mask=mask).last_hidden_state
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-5)


def test_unsupported_models_get_clear_errors():
    with pytest.raises(skrr.UnsupportedModelError, match="expected a HF text encoder"):
        skrr.trace(torch.nn.Linear(4, 4))
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                   num_heads=4))
    with pytest.raises(skrr.UnsupportedModelError, match="encoder-decoder"):
        skrr.trace(t5)


def test_t5_in_fp16_partitions_through_the_clamp():
    """HF T5 clamps fp16 hidden states after each sub-block; the stream is followed through the clamp."""
    fam = FAMILIES["t5-gated"]
    model = fam.make().to(torch.float16)
    graph = skrr.trace(model)
    assert [b.kind for b in graph.blocks] == ["attn", "ffn"] * 3
    with torch.no_grad():  # layer 1's FFN output overflows fp16: HF clamps the stream to finfo.max - 1000
        ff = model.encoder.block[1].layer[1].DenseReluDense
        for lin in (ff.wi_0, ff.wi_1, ff.wo):
            lin.weight.mul_(40)
    pruned = skrr.apply(graph, skrr.Plan(skip=[1, 2], reuse={2: 4}))
    ref = fam.reference(model, [1, 2], {2: 4})  # a deep copy, still fp16 (model.float() would convert the
    overflowed = []                               # shared parameters in place and the fp16 graph would not run)
    ref.encoder.block[1].layer[1].register_forward_hook(
        lambda m, a, out: overflowed.append(bool(torch.isinf(out[0] if isinstance(out, tuple) else out).any())))
    ids, mask = inputs(2, 7)
    with torch.no_grad():
        got = pruned(ids, attention_mask=mask).last_hidden_state
        want = ref(ids, attention_mask=mask).last_hidden_state
    assert overflowed == [True]  # the clamp is exercised, not only traced
    assert got.dtype == want.dtype == torch.float16 and pruned.dtype == torch.float16
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hidden_states_and_eos_pooling_match_hand_patched(name):
    """Every hidden state (SDXL / SD3 read hidden_states[-2]) against the hand-patched model; CLIP pools at the
    EOS token, which the inputs now contain at a different position in each row (issue 14)."""
    fam = FAMILIES[name]
    model = fam.make(seed=3)
    graph = skrr.trace(model)
    n = len(graph.blocks)
    plan = skrr.Plan(skip=[1, n - 2], reuse={n - 2: n - 4})  # an FFN skipped, the last attention re-using
    pruned = skrr.apply(graph, plan)
    ref = fam.reference(model, plan.skip, plan.reuse)
    ids, mask = inputs(3, 9, seed=11)
    eos_at = [4, 8, 2]
    eos = getattr(model.config, "eos_token_id", None)
    if name.startswith("clip"):
        for row, pos in enumerate(eos_at):
            ids[row, pos] = eos
    with torch.no_grad():
        got = pruned(ids, attention_mask=mask, output_hidden_states=True)
        want = ref(ids, attention_mask=mask, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == n // 2 + 1
    for k, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"hidden_states[{k}]")
    if name.startswith("clip"):
        last = want.last_hidden_state if name == "clip" else ref.text_model(ids, attention_mask=mask).last_hidden_state
        at_eos = last[torch.arange(3), torch.tensor(eos_at)]
        pooled_ref = want.pooler_output if name == "clip" else ref.text_model(ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(pooled_ref, at_eos)  # the reference pools at EOS, not at position 0
        assert not torch.allclose(at_eos, last[:, 0])
        got_pooled = got.pooler_output if name == "clip" else got.text_embeds
        want_pooled = want.pooler_output if name == "clip" else want.text_embeds
        torch.testing.assert_close(got_pooled, want_pooled, atol=1e-5, rtol=1e-5)
