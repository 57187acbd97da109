"""Magnitude pruning (per matrix, global, Wanda, 2:4), hybrid with Skrr plans, pipelines, sweeps, CLI errors.

References are independent of the implementation: numpy sorts for thresholds, hand-computed Wanda scores,
module walks for layer counts, and files on disk for sizes.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import BertConfig, BertModel

from skrr_compile.blocksearch.calibration import Calibration, read_prompts, tokenize
from skrr_compile.blocksearch.discrepancy import Discrepancy, last_hidden_state
from skrr_compile.cli.main import main
from skrr_compile.core import storage as skrr_io
from skrr_compile.core.plan import Plan
from skrr_compile.magnitude.config import MagnitudeConfig, SemiStructuredShapeError, get_preset
from skrr_compile.magnitude.denoiser import NoisePredictionDiscrepancy, denoiser_inputs
from skrr_compile.magnitude.layers import find_layers, measure_sparsity, select_layers
from skrr_compile.magnitude.layouts import is_nm_sparse, to_semi_structured, to_sparse_layout
from skrr_compile.magnitude.masks import global_masks, kth_smallest_abs, magnitude_mask, n_pruned
from skrr_compile.magnitude.prune import compute_masks, hybrid, prune
from skrr_compile.magnitude.storage import (
    SPARSE_WEIGHTS,
    UnknownComponentError,
    load_pruned,
    parse_targets,
    resolve_targets,
    save_pruned,
)
from skrr_compile.magnitude.sweep import find_knee, parse_sparsities, sweep, write_sweep_report
from skrr_compile.magnitude.wanda import token_mask

warnings.filterwarnings("ignore", message=".*accelerate.*")


# fixtures ----------------------------------------------------------------------------------------------
def tiny_bert(seed: int = 0, intermediate: int = 64) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=intermediate, max_position_embeddings=64)
    return BertModel(cfg).eval()


def fake_calibration(n_chunks: int = 2, batch: int = 4, length: int = 9, seed: int = 0, vocab: int = 120):
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for _ in range(n_chunks):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        lengths = torch.randint(2, length + 1, (batch,), generator=g)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        chunks.append((ids * mask, mask))
    null = (torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long))
    return Calibration(prompts=[f"p{i}" for i in range(n_chunks * batch)], chunks=chunks, null=null)


def clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in bytes_to_unicode().values():
            vocab.setdefault(c + suffix, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.model_max_length = 77
    return tok


def tiny_sd_pipeline(intermediate: int = 64):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4)
    te = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                      intermediate_size=intermediate, num_attention_heads=4, num_hidden_layers=2,
                                      vocab_size=len(tok.get_vocab())))
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te.eval(), tokenizer=tok, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd") / "pipe"
    tiny_sd_pipeline().save_pretrained(d)
    return d


def generate(pipe):
    return pipe("a red cube on a blue sphere", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


# config validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_sparsity_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="sparsity"):
        MagnitudeConfig(sparsity=bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 0.5, "criterion": "random"}, "criterion"),
        ({"sparsity": 0.3, "pattern": "2:4"}, "fixes the sparsity at 0.5"),
        ({"pattern": "2:4", "criterion": "global"}, "global threshold"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "two:four"}, "N:M"),
        ({"sparsity": 0.5, "wanda_group": "column"}, "wanda_group"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagnitudeConfig(**kwargs)


@pytest.mark.parametrize(
    "config",
    [
        MagnitudeConfig(0.475),
        MagnitudeConfig(0.35, "global", include_conv=True),
        MagnitudeConfig(criterion="wanda", pattern="2:4", exclude=("*.proj_out.weight",)),
        MagnitudeConfig(0.6, "wanda", wanda_group="matrix"),
    ],
)
def test_config_json_round_trip(config):
    again = MagnitudeConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert MagnitudeConfig(pattern="2:4").sparsity == 0.5


def test_preset_is_the_study_recommendation():
    p = get_preset("sd2-study")
    assert p["targets"] == {"text_encoder": 0.475, "unet": 0.35}
    assert p["criterion"] == "magnitude" and p["include_conv"] is False
    assert get_preset("recommended") == p
    with pytest.raises(ValueError, match="sd2-study"):
        get_preset("nope")


# per-matrix magnitude ----------------------------------------------------------------------------------
@given(rows=st.integers(1, 30), cols=st.integers(1, 30), sparsity=st.floats(0, 0.999), seed=st.integers(0, 999),
       coarse=st.booleans())
@settings(max_examples=80, deadline=None)
def test_per_matrix_sparsity_within_one_weight_and_smallest_first(rows, cols, sparsity, seed, coarse):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if coarse:  # many ties, no exact zeros
        w = torch.round(w * 2) / 2 + 0.25
    lin = nn.Linear(cols, rows, bias=False)
    lin.weight.data.copy_(w)
    prune(nn.Sequential(lin), MagnitudeConfig(sparsity))
    pruned = lin.weight == 0
    n = w.numel()
    zeros = int(pruned.sum())
    assert zeros == int(np.floor(sparsity * n + 0.5))  # round(s * n), exactly
    assert abs(zeros / n - sparsity) <= 0.5 / n + 1e-12  # so within half a weight of the target
    a = w.abs().numpy().reshape(-1)
    mask = pruned.numpy().reshape(-1)
    if mask.any() and (~mask).any():
        assert a[mask].max() <= a[~mask].min()  # nothing kept is smaller than anything pruned
    kept = lin.weight.detach().numpy().reshape(-1)[~mask]
    assert np.array_equal(kept, w.numpy().reshape(-1)[~mask])  # kept weights unchanged


def test_ties_prune_lower_indices_first():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.5, 2.0]])
    assert magnitude_mask(scores, 0.5).tolist() == [[False, True, True, False, True, False]]
    assert magnitude_mask(torch.ones(10), 0.3).tolist() == [True] * 3 + [False] * 7
    assert n_pruned(10, 0.25) == 3 and n_pruned(10, 0.24) == 2 and n_pruned(7, 0.0) == 0


# global ------------------------------------------------------------------------------------------------
@given(sizes=st.lists(st.integers(1, 200), min_size=1, max_size=5), sparsity=st.floats(0.001, 0.999),
       seed=st.integers(0, 999), half=st.booleans())
@settings(max_examples=25, deadline=None)
def test_kth_smallest_abs_matches_numpy(sizes, sparsity, seed, half):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.round(torch.randn(n, generator=g) * 8) / 8 for n in sizes]  # with duplicates and zeros
    if half:
        ts = [t.half() for t in ts]
    flat = np.sort(np.concatenate([np.abs(t.float().numpy()) for t in ts]))
    k = max(1, n_pruned(flat.size, sparsity))
    assert kth_smallest_abs(ts, k) == float(flat[k - 1])


def test_global_threshold_is_the_kth_smallest_and_counts_are_exact():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(30, 40, generator=g) * 0.1)  # small weights: pruned more
        model[2].weight.copy_(torch.randn(20, 30, generator=g) * 1.0)
    before = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    biases = [model[0].bias.detach().clone(), model[2].bias.detach().clone()]
    result = prune(model, MagnitudeConfig(0.6, "global"))
    a = np.sort(np.concatenate([b.abs().numpy().reshape(-1) for b in before]))
    k = n_pruned(a.size, 0.6)
    assert result.threshold == float(a[k - 1])
    zeros = [int((model[i].weight == 0).sum()) for i in (0, 2)]
    assert sum(zeros) == k
    assert zeros[0] / 1200 > 0.8 and zeros[1] / 600 < 0.3  # one threshold, very different per-layer sparsity
    for b, i in zip(before, (0, 2)):
        w = model[i].weight.detach()
        assert (b.abs()[w == 0] <= result.threshold).all() and (b.abs()[w != 0] >= result.threshold).all()
    assert torch.equal(model[0].bias, biases[0]) and torch.equal(model[2].bias, biases[1])  # biases untouched
    assert int((model[0].bias == 0).sum()) == 0


def test_global_ties_at_the_threshold():
    ws = [torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 3.0])]
    masks, t = global_masks(ws, 0.6)  # k = 3: the 1.0 and the first two 2.0s
    assert t == 2.0
    assert masks[0].tolist() == [True, True, True] and masks[1].tolist() == [False, False]


# Wanda -------------------------------------------------------------------------------------------------
W = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
X = torch.tensor([[[3.0, 0.0, 2.0, 0.0], [4.0, 1.0, 0.0, 0.5]]])  # ||X_j|| = 5, 1, 2, 0.5


def wanda_model():
    lin = nn.Linear(4, 2, bias=False)
    lin.weight.data.copy_(W)
    return nn.Sequential(lin)


def test_wanda_against_hand_computed_scores():
    # scores |W| * ||X_j||: row 0 = 5, 2, 6, 0.25; row 1 = 20, 1, 2, 1. Per row prune the 2 smallest.
    model = wanda_model()
    prune(model, MagnitudeConfig(0.5, "wanda"), calibration=lambda forward: forward(X))
    assert (model[0].weight == 0).tolist() == [[False, True, False, True], [False, True, False, True]]
    # plain magnitude disagrees: row 0 = 1, 2, 3, 0.5 -> prune 0 and 3; row 1 = 4, 1, 1, 2 -> prune 1 and 2
    mag = wanda_model()
    prune(mag, MagnitudeConfig(0.5))
    assert (mag[0].weight == 0).tolist() == [[True, False, False, True], [False, True, True, False]]
    # whole-matrix comparison: 0.25, 1, 1 and then the first 2 (flat index 1)
    mat = wanda_model()
    prune(mat, MagnitudeConfig(0.5, "wanda", wanda_group="matrix"), calibration=lambda forward: forward(X))
    assert (mat[0].weight == 0).reshape(-1).tolist() == [False, True, False, True, False, True, False, True]


def test_wanda_ignores_padding_tokens():
    padded = torch.cat([X, torch.tensor([[[100.0, 0.0, 0.0, 0.0]]])], dim=1)  # a huge padding token
    mask = torch.tensor([[True, True, False]])

    def run(forward):
        with token_mask(mask):
            forward(padded)

    model = wanda_model()
    prune(model, MagnitudeConfig(0.5, "wanda", wanda_group="matrix"), calibration=run)
    assert (model[0].weight == 0).reshape(-1).tolist() == [False, True, False, True, False, True, False, True]


def test_wanda_counts_every_use_of_a_shared_weight():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
    b.weight = a.weight  # one weight, two uses (as a Skrr re-use makes)
    model = nn.Sequential(a, b)
    x = torch.randn(5, 6)
    with torch.no_grad():
        h = a(x)
        w = a.weight.detach().clone()
    norms = (x.pow(2).sum(0) + h.pow(2).sum(0)).sqrt()
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(w.abs() * norms, dim=1, stable=True)[:, :3], True)
    result = prune(model, MagnitudeConfig(0.5, "wanda"), calibration=lambda forward: forward(x))
    assert [r.name for r in result.layers] == ["0.weight"]
    assert torch.equal(a.weight == 0, expected) and b.weight is a.weight


def test_wanda_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        prune(wanda_model(), MagnitudeConfig(0.5, "wanda"))


def test_wanda_on_a_text_encoder_uses_real_activation_norms():
    model, cal = tiny_bert(), fake_calibration()
    layer = model.encoder.layer[1].intermediate.dense
    seen = []
    h = layer.register_forward_hook(lambda m, a, o: seen.append(a[0][cal_mask[len(seen)].bool()]))
    cal_mask = [m for _, m in cal.chunks]
    with torch.no_grad():
        for ids, m in cal.chunks:
            model(ids, attention_mask=m)
    h.remove()
    norms = torch.cat(seen).pow(2).sum(0).sqrt()  # independent: hook on the real tokens only
    w = layer.weight.detach().clone()
    prune(model, MagnitudeConfig(0.5, "wanda"), calibration=cal)
    scores = w.abs() * norms[None, :]
    k = n_pruned(w.shape[1], 0.5)
    expected = torch.zeros_like(w, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    assert torch.equal(layer.weight == 0, expected)


# 2:4 ---------------------------------------------------------------------------------------------------
def test_two_four_keeps_the_two_largest_of_every_four():
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune(model, MagnitudeConfig(pattern="2:4"))
    assert result.sparsity.linear == 0.5
    for layer in find_layers(model):
        w, b = layer.weight.detach(), before[layer.name]
        assert is_nm_sparse(w, 2, 4)
        groups = b.abs().reshape(w.shape[0], -1, 4)
        kept = (w != 0).reshape(groups.shape)
        top2 = torch.zeros_like(kept)
        top2.scatter_(-1, groups.topk(2, dim=-1).indices, True)
        assert torch.equal(kept, top2)


def test_two_four_on_a_shape_that_cannot_take_it():
    model = tiny_bert(intermediate=37)  # the FFN output layer has 37 inputs per row
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(SemiStructuredShapeError, match=r"output\.dense\.weight.*\(32, 37\).*multiple of 4"):
        prune(model, MagnitudeConfig(pattern="2:4"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing changed
    result = prune(model, MagnitudeConfig(pattern="2:4", exclude=("*.output.dense.weight",)))
    assert all(r.name.endswith(("query.weight", "key.weight", "value.weight", "intermediate.dense.weight",
                                "pooler.dense.weight", "attention.output.dense.weight")) for r in result.layers)


def test_semi_structured_needs_cuda_on_cpu():
    model = tiny_bert()
    prune(model, MagnitudeConfig(pattern="2:4"))
    with pytest.raises(RuntimeError, match="CUDA"):
        to_semi_structured(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_on_cuda():  # pragma: no cover - CPU CI
    lin = nn.Sequential(nn.Linear(128, 128)).half().cuda()
    prune(lin, MagnitudeConfig(pattern="2:4"))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    ref = lin(x)
    report = to_semi_structured(lin)
    assert report["converted"] == ["0.weight"], report
    torch.testing.assert_close(lin(x), ref, rtol=1e-2, atol=1e-2)


# layer selection and sparsity both ways -----------------------------------------------------------------
def test_unet_linear_only_vs_conv_counts(sd_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    lin = [m.weight for m in unet.modules() if isinstance(m, nn.Linear)]
    conv = [m.weight for m in unet.modules() if isinstance(m, nn.Conv2d)]
    n_lin, n_conv = sum(w.numel() for w in lin), sum(w.numel() for w in conv)
    n_all = sum(p.numel() for p in unet.parameters())
    result = prune(unet, MagnitudeConfig(0.35))
    assert len(result.layers) == len(lin)
    z_lin = sum(int((w == 0).sum()) for w in lin)
    assert result.sparsity.linear_params == n_lin and result.sparsity.conv_params == n_conv
    assert result.sparsity.linear == pytest.approx(z_lin / n_lin) and abs(z_lin / n_lin - 0.35) < 0.01
    assert result.sparsity.linear_conv == pytest.approx(z_lin / (n_lin + n_conv))
    all_zeros = sum(int((p == 0).sum()) for p in unet.parameters())
    assert result.sparsity.all_params == pytest.approx(all_zeros / n_all)
    assert all(int((w == 0).sum()) == 0 for w in conv)  # the study's definition leaves convolutions alone
    with_conv = prune(unet, MagnitudeConfig(0.35, include_conv=True))
    assert len(with_conv.layers) == len(lin) + len(conv)
    assert with_conv.sparsity.linear_conv == pytest.approx(0.35, abs=0.01)


def test_exclude_globs():
    model = tiny_bert()
    result = prune(model, MagnitudeConfig(0.5, exclude=("*.query.weight", "pooler.*")))
    names = {r.name for r in result.layers}
    assert not any(n.endswith("query.weight") or n.startswith("pooler") for n in names)
    assert int((model.encoder.layer[0].attention.self.query.weight == 0).sum()) == 0
    with pytest.raises(ValueError, match="no Linear"):
        prune(model, MagnitudeConfig(0.5, exclude=("*",)))


# hybrid -----------------------------------------------------------------------------------------------
def test_hybrid_counts_sparsity_once_and_leaves_the_dense_model(tmp_path):
    model = tiny_bert()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_total = sum(p.numel() for p in model.parameters())
    plan = Plan(skip=[1, 3], reuse={3: 5})  # FFN of layer 0 removed, FFN of layer 1 re-uses layer 2's
    pruned, result = hybrid(model, plan, MagnitudeConfig(0.5))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense_state.items())  # dense model untouched
    rep = result.sparsity
    kept = {id(p): p for p in pruned.graph_module.parameters()}.values()  # shared weights once
    kept_params = sum(p.numel() for p in kept)
    kept_zeros = sum(int((p == 0).sum()) for p in kept)
    assert rep.dense_params == dense_total
    assert rep.removed_params == dense_total - kept_params
    assert rep.total == pytest.approx((dense_total - kept_params + kept_zeros) / dense_total)
    assert rep.linear == pytest.approx(0.5, abs=1e-9)
    # kept Linears by hand: 3 attentions x 4, layer 2's FFN (2, shared with layer 1's slot), the pooler
    assert len(result.layers) == 3 * 4 + 2 + 1
    assert not any(r.name.startswith(("encoder.layer.0.intermediate", "encoder.layer.1.intermediate"))
                   for r in result.layers)
    # the re-used FFN weight feeds two linear ops but is one tensor, pruned once, listed once
    ffn = "encoder.layer.2.intermediate.dense.weight"
    uses = [n for n in pruned.graph_module.graph.nodes
            if n.op == "call_function" and "linear" in str(n.target) and n.args[1].target == ffn]
    assert len(uses) == 2 and [r.name for r in result.layers].count(ffn) == 1
    # saved compressed, loaded back bit-exact
    cal = fake_calibration()
    ids, mask = cal.chunks[0]
    ref = pruned(ids, attention_mask=mask).last_hidden_state
    skrr_io.save(pruned, tmp_path / "plain", overwrite=True)
    skrr_io.save(pruned, tmp_path / "comp", compress=True)
    loaded = skrr_io.load(tmp_path / "comp")
    assert torch.equal(loaded(ids, attention_mask=mask).last_hidden_state, ref)
    size = lambda d: (d / skrr_io.WEIGHTS_FILE).stat().st_size  # noqa: E731
    assert size(tmp_path / "comp") < size(tmp_path / "plain")
    loaded_again = load_pruned(tmp_path / "comp", layout="sparse_csr")
    assert any(p.layout == torch.sparse_csr for p in loaded_again.graph_module.parameters())
    torch.testing.assert_close(loaded_again(ids, attention_mask=mask).last_hidden_state, ref, rtol=1e-5, atol=1e-5)


def test_hybrid_wanda_uses_the_pruned_graph():
    model, cal = tiny_bert(), fake_calibration()
    pruned, result = hybrid(model, Plan(skip=[0]), MagnitudeConfig(0.5, "wanda"), cal)
    assert result.sparsity.linear == pytest.approx(0.5)
    assert not any("layer.0.attention.self" in r.name for r in result.layers)  # removed, not pruned


# denoisers ---------------------------------------------------------------------------------------------
def tiny_denoisers():
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    return {
        "pixart": PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                           caption_channels=32, norm_type="ada_norm_single", num_embeds_ada_norm=1000),
        "sd3": SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                     pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16),
        "flux": FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
    }


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux", "unet"])
def test_denoisers_prune_and_noise_prediction_mse(name, sd_dir):
    if name == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(sd_dir / "unet").eval()
    else:
        model = tiny_denoisers()[name].eval()
    inputs = denoiser_inputs(model, sample_size=8, timesteps=(0.8, 0.2))
    metric = NoisePredictionDiscrepancy(model, inputs)
    assert metric.evaluate(model).discrepancy == 0.0
    with torch.no_grad():
        dense = [model(**kw, return_dict=False)[0].clone() for kw in inputs]
    result = prune(model, MagnitudeConfig(0.5, "wanda"), calibration=inputs)
    assert result.sparsity.linear == pytest.approx(0.5, abs=0.01)
    report = metric.evaluate(model)
    with torch.no_grad():
        pruned = [model(**kw, return_dict=False)[0] for kw in inputs]
    expected = [float((p.double() - d.double()).pow(2).mean()) for p, d in zip(pruned, dense)]
    assert report.mse_per_timestep == pytest.approx(expected)
    assert report.discrepancy == pytest.approx(sum(expected) / 2) and report.discrepancy > 0


def test_unsupported_denoiser():
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        denoiser_inputs(tiny_bert())


# pipelines: prune, save, load, generate -----------------------------------------------------------------
def test_pipeline_preset_prune_save_load_generate(sd_dir, tmp_path):
    out = tmp_path / "pruned"
    assert main(["magnitude", str(sd_dir), "--preset", "sd2-study", "--out", str(out)]) == 0
    pipe = load_pruned(out)
    # the loaded weights have the preset's per-matrix sparsity (within one weight per matrix)
    for name, target in (("text_encoder", 0.475), ("unet", 0.35)):
        comp = getattr(pipe, name)
        for m in comp.modules():
            if isinstance(m, nn.Linear):
                n = m.weight.numel()
                assert abs(int((m.weight == 0).sum()) - target * n) <= 1.0
            elif isinstance(m, nn.Conv2d):
                assert int((m.weight == 0).sum()) == 0
    # same images as pruning in memory, and different from the dense pipeline
    ref = tiny_sd_pipeline()
    dense_images = generate(ref)
    prune(ref.text_encoder, MagnitudeConfig(0.475))
    prune(ref.unet, MagnitudeConfig(0.35))
    assert all(torch.equal(a, b) for a, b in zip(ref.unet.state_dict().values(), pipe.unet.state_dict().values()))
    images = generate(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert np.array_equal(images, generate(ref))
    assert not np.array_equal(images, dense_images)
    # the weight files of the text encoder shrank; the untouched VAE is copied as is
    te_file = (out / "text_encoder" / SPARSE_WEIGHTS).stat().st_size
    assert te_file < (sd_dir / "text_encoder" / "model.safetensors").stat().st_size
    assert not (out / "text_encoder" / "model.safetensors").exists()
    vae_name = "diffusion_pytorch_model.safetensors"
    assert (out / "vae" / vae_name).read_bytes() == (sd_dir / "vae" / vae_name).read_bytes()
    summary = json.loads((out / "skrr_magnitude.json").read_text())
    assert summary["components"]["unet"]["sparsity"]["sparsity_linear"] == pytest.approx(0.35, abs=1e-3)
    assert summary["components"]["unet"]["sparsity"]["sparsity_linear_conv"] < 0.2  # convs dominate the tiny UNet


def test_pipeline_sparse_csr_layout(sd_dir, tmp_path):
    out = tmp_path / "p"
    assert main(["magnitude", str(sd_dir), "--target", "text_encoder=0.7", "--out", str(out)]) == 0
    dense = load_pruned(out)
    sparse = load_pruned(out, layout="sparse_csr")
    layouts = {m.weight.layout for m in sparse.text_encoder.modules() if isinstance(m, nn.Linear)}
    assert layouts == {torch.sparse_csr}  # every Linear is 70 % sparse: all are CSR
    ids = torch.tensor([[0, 5, 9, 1]])
    torch.testing.assert_close(sparse.text_encoder(ids)[0], dense.text_encoder(ids)[0], rtol=1e-5, atol=1e-5)


def test_pipeline_hybrid_text_encoder(sd_dir, tmp_path):
    plan = tmp_path / "plan.json"
    Plan(skip=[1]).save(plan)
    out = tmp_path / "h"
    assert main(["magnitude", str(sd_dir), "--target", "text_encoder=0.5", "--plan", str(plan),
                 "--out", str(out)]) == 0
    pipe = load_pruned(out)
    assert type(pipe.text_encoder).__name__ == "PrunedEncoder"
    summary = json.loads((out / "skrr_magnitude.json").read_text())["components"]["text_encoder"]
    assert summary["hybrid"] and summary["sparsity"]["removed_params"] > 0
    assert summary["sparsity"]["sparsity_total"] > summary["sparsity"]["sparsity_all_params"]
    assert generate(pipe).shape == (1, 32, 32, 3)


# CLI errors --------------------------------------------------------------------------------------------
def test_unknown_component_lists_the_pipelines_components(sd_dir, tmp_path, capsys):
    assert main(["magnitude", str(sd_dir), "--target", "text_encoder=0.3,transformer=0.4",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no component 'transformer'" in err
    for name in ("scheduler", "text_encoder", "tokenizer", "unet", "vae"):
        assert name in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(UnknownComponentError, match="not a torch model"):
        resolve_targets(sd_dir, {"tokenizer": 0.5})


@pytest.mark.parametrize("spec", ["unet=1.0", "unet=-0.2", "unet=1.5", "unet=abc", "unet=0.3,unet=0.4"])
def test_bad_sparsity_on_the_cli(sd_dir, tmp_path, capsys, spec):
    assert main(["magnitude", str(sd_dir), "--target", spec, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("[0, 1)" in err or "not a number" in err or "twice" in err)


def test_two_four_bad_shape_on_the_cli(tmp_path, capsys):
    d = tmp_path / "pipe37"
    tiny_sd_pipeline(intermediate=37).save_pretrained(d)
    assert main(["magnitude", str(d), "--target", "text_encoder", "--pattern", "2:4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "fc2.weight" in err and "(32, 37)" in err and "multiple of 4" in err
    assert not (tmp_path / "o").exists()


def test_non_empty_out_is_refused_before_any_work(sd_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["magnitude", str(sd_dir), "--target", "unet=0.3", "--out", str(out)]) == 2
    assert main(["sweep", str(sd_dir), "--target", "unet", "--sparsity", "0.3", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_parse_targets():
    assert parse_targets("text_encoder=0.475,unet=0.35") == {"text_encoder": 0.475, "unet": 0.35}
    assert parse_targets("0.5") == {"model": 0.5}
    assert parse_targets("unet") == {"unet": None}
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        parse_targets("unet=1")


# single model directory --------------------------------------------------------------------------------
def test_single_model_dir_cli_round_trip(tmp_path):
    src = tmp_path / "bert"
    model = tiny_bert()
    model.save_pretrained(src)
    out = tmp_path / "out"
    assert main(["magnitude", str(src), "--target", "0.5", "--criterion", "global", "--out", str(out)]) == 0
    loaded = load_pruned(out)
    expected = tiny_bert()
    prune(expected, MagnitudeConfig(0.5, "global"))
    for (k, a), (k2, b) in zip(sorted(loaded.state_dict().items()), sorted(expected.state_dict().items())):
        assert k == k2 and torch.equal(a, b)
    assert main(["magnitude", str(src), "--target", "unet=0.5,text_encoder=0.2", "--out", str(tmp_path / "o2")]) == 2


def test_t5_encoder_with_tied_embeddings_round_trip(tmp_path):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu")
    src = tmp_path / "t5"
    T5EncoderModel(cfg).eval().save_pretrained(src)
    out = tmp_path / "out"
    assert main(["magnitude", str(src), "--target", "0.6", "--out", str(out)]) == 0
    loaded = load_pruned(out)
    assert loaded.shared.weight is loaded.encoder.embed_tokens.weight  # tied, stored once
    expected = T5EncoderModel.from_pretrained(src).eval()
    prune(expected, MagnitudeConfig(0.6))
    ids = torch.tensor([[5, 9, 13, 1]])
    with torch.no_grad():  # (with grad enabled, SDPA may pick another CPU kernel for requires_grad weights)
        assert torch.equal(loaded(ids).last_hidden_state, expected(ids).last_hidden_state)
    for layer in find_layers(loaded):  # wi_0, wi_1, wo, q, k, v, o: each within one weight of 60 %
        assert abs(int((layer.weight == 0).sum()) - 0.6 * layer.weight.numel()) <= 0.5


# sweeps ------------------------------------------------------------------------------------------------
def test_parse_sparsities():
    s = parse_sparsities("0.3:0.7:0.025")
    assert len(s) == 17 and s[0] == 0.3 and s[-1] == 0.7 and s[8] == pytest.approx(0.5)
    assert parse_sparsities("0.5,0.1") == [0.1, 0.5]
    for bad in ("0.3:1.0:0.1", "0.5:0.3:0.1", "0.1:0.5:0", "a,b", "0.1:0.5"):
        with pytest.raises(ValueError):
            parse_sparsities(bad)


def test_knee_on_the_studys_numbers_and_on_smooth_curves():
    # SD2 text encoder in the study: FID about 20 up to 57.5 %, 134 at 65 %
    xs = [0.5, 0.525, 0.55, 0.575, 0.6, 0.625, 0.65]
    fid = [20.0, 20.4, 20.9, 21.3, 60.0, 120.0, 134.0]
    k = find_knee(xs, fid)
    assert k["found"] and k["sharp"] and k["knee_sparsity"] == 0.575 and k["collapse_sparsity"] == 0.6
    smooth = find_knee([i / 10 for i in range(10)], [(i / 10) ** 2 for i in range(10)])
    assert smooth["found"] and not smooth["sharp"] and smooth["jump_factor"] < 3
    steep_but_smooth = find_knee([i / 40 for i in range(37)], [(i / 40) ** 4 for i in range(37)])
    assert steep_but_smooth["found"] and not steep_but_smooth["sharp"]
    noisy_start = find_knee([0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 1e-6, 1e-4, 0.5, 1.0])  # tiny rises do not count
    assert noisy_start["sharp"] and noisy_start["knee_sparsity"] == 0.2
    concave = find_knee([0.1, 0.2, 0.3, 0.4], [1.0, 1.8, 2.2, 2.3])
    assert not concave["found"] and not concave["sharp"]
    assert not find_knee([0.1, 0.2], [1, 2])["found"]


def test_sweep_restores_the_model_and_writes_reports(tmp_path):
    model, cal = tiny_bert(), fake_calibration()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    metric = Discrepancy(model, cal, None, last_hidden_state)
    results = [
        sweep(model, [0.0, 0.3, 0.6, 0.9], metric.evaluate, criterion=c, calibration=cal)
        for c in ("magnitude", "global", "wanda")
    ]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())
    for r in results:
        assert [p["sparsity"] for p in r.points] == [0.0, 0.3, 0.6, 0.9]
        assert r.points[0]["discrepancy"] == 0.0 and r.points[-1]["discrepancy"] > r.points[1]["discrepancy"] > 0
        assert r.points[2]["sparsity_linear"] == pytest.approx(0.6, abs=0.5 / 32)  # Wanda rounds per row of 32
        # each point is what pruning that model independently gives
        fresh = tiny_bert()
        prune(fresh, MagnitudeConfig(0.6, r.criterion), calibration=cal)
        assert r.points[2]["discrepancy"] == pytest.approx(metric.evaluate(fresh).discrepancy, rel=1e-9)
    out = write_sweep_report(tmp_path / "rep", results, "skrr-compile sweep tiny --sparsity 0,0.3,0.6,0.9")
    data = json.loads((out / "report.json").read_text())
    assert data["results"][0]["knee"] == find_knee([0.0, 0.3, 0.6, 0.9], [p["discrepancy"] for p in results[0].points])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| target %" in (out / "report.md").read_text()


def test_sweep_cli_on_a_pipeline_denoiser(sd_dir, tmp_path):
    out = tmp_path / "sw"
    assert main(["sweep", str(sd_dir), "--target", "unet", "--sparsity", "0.2:0.6:0.2", "--latent-size", "8",
                 "--criterion", "magnitude,wanda", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert [r["criterion"] for r in data["results"]] == ["magnitude", "wanda"]
    assert data["metric"].startswith("noise-prediction MSE")
    assert len(data["results"][0]["points"]) == 3
    assert "--criterion magnitude,wanda" in (out / "command.txt").read_text()


def test_sweep_cli_on_a_pipeline_text_encoder(sd_dir, tmp_path):
    out = tmp_path / "swt"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na red dog on a mat\nthree apples\n")
    assert main(["sweep", str(sd_dir), "--target", "text_encoder", "--sparsity", "0.3,0.6", "--prompts",
                 str(prompts), "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["read"] == "all" and data["num_prompts"] == 3  # CLIP in a pipeline: all 77 positions read
    assert data["reads"] == ["last_hidden_state -> identity"]  # what SD's UNet reads, from describe_pipeline
    assert main(["sweep", str(sd_dir), "--sparsity", "0.3", "--out", str(tmp_path / "n")]) == 2


# real weights: all-MiniLM-L6-v2 -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from skrr_compile.core.checkpoints import builtin_model_dir, load_encoder, load_tokenizer

    try:
        d = builtin_model_dir()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 is not installed")
    return d, load_encoder(d), load_tokenizer(d)


def test_minilm_half_sparsity_file_size_and_discrepancy(minilm, tmp_path):
    d, model, tok = minilm
    model = type(model).from_pretrained(d).eval()
    cal = tokenize(tok, read_prompts("builtin", limit=16), chunk_size=16)
    metric = Discrepancy(model, cal, None, last_hidden_state)
    result = prune(model, MagnitudeConfig(0.5))
    for r in result.layers:  # every matrix within one weight of 50 %
        assert abs(r.zeros - 0.5 * r.params) <= 1
    report = metric.evaluate(model)
    assert 0 < report.discrepancy and 0.5 < report.cosine < 0.95
    sizes = save_pruned(tmp_path / "m", d, {"model": model})
    file_bytes = (tmp_path / "m" / SPARSE_WEIGHTS).stat().st_size
    original = (d / "model.safetensors").stat().st_size
    assert sizes["model"]["file_bytes"] == file_bytes
    # the pruned Linear weights (47 % of MiniLM; the embeddings are 52 % and stay dense, as in the study)
    linear = [r for r in result.layers]
    n_lin = sum(r.params for r in linear)
    n_all = sum(p.numel() for p in model.parameters())
    expected = (4 * (n_all - n_lin) + n_lin / 8 + 4 * n_lin / 2) / (4 * n_all)
    assert file_bytes / original == pytest.approx(expected, abs=0.01)
    from safetensors.torch import save_file

    from skrr_compile.core.compressed import save_tensors

    weights = {r.name: model.get_parameter(r.name).detach() for r in linear}
    save_file(weights, str(tmp_path / "lin_dense.safetensors"))
    stats = save_tensors(weights, tmp_path / "lin_comp.safetensors")
    assert stats.file_bytes <= 0.60 * (tmp_path / "lin_dense.safetensors").stat().st_size
    loaded = load_pruned(tmp_path / "m")
    ids, mask = cal.chunks[0]
    assert torch.equal(loaded(ids, attention_mask=mask).last_hidden_state,
                       model(ids, attention_mask=mask).last_hidden_state)
    assert math.isclose(measure_sparsity(loaded).linear, 0.5)


@pytest.mark.slow
def test_minilm_sweep_cli(minilm, tmp_path):
    d, _, _ = minilm
    out = tmp_path / "sweep"
    assert main(["sweep", "builtin", "--sparsity", "0.3:0.7:0.1", "--prompts", "builtin", "--limit", "32",
                 "--criterion", "magnitude,wanda", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    for r in data["results"]:
        ds = [p["discrepancy"] for p in r["points"]]
        assert ds == sorted(ds)  # on real weights the discrepancy grows with sparsity
        assert r["knee"] == find_knee([p["sparsity"] for p in r["points"]], ds)


def test_compute_masks_does_not_touch_the_model():
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    masks, _ = compute_masks(model, MagnitudeConfig(0.5))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert set(masks) == {layer.name for layer in select_layers(model, MagnitudeConfig(0.5))}


def test_sparse_layout_forward_matches_dense():
    model = tiny_bert()
    prune(model, MagnitudeConfig(0.6))
    cal = fake_calibration()
    ids, mask = cal.chunks[0]
    ref = model(ids, attention_mask=mask).last_hidden_state
    converted = to_sparse_layout(model)
    assert len(converted) == len(find_layers(model))
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP spinning makes them slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
