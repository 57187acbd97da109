"""Pipelines whose text encoders are LLMs (issue 12 item 5), as tiny random pipelines that generate.

Each: the spec reads what the pipeline's own encode_prompt hands the denoiser (template, dropped tokens,
length, mask) -> prune_pipeline / apply_to_pipeline -> the pipeline generates -> the pruned encoder equals
skrr.apply(encoder, plan) -> save/load reproduces its outputs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

from pipeline_factories import (  # noqa: E402
    LLM_MAX_SEQUENCE,
    LUMINA2_MAX_SEQUENCE,
    LUMINA2_SYSTEM,
    SANA_INSTRUCTION,
    T5_MAX_SEQUENCE,
    T5_PROMPT_CORPUS,
    ZIMAGE_MAX_SEQUENCE,
    generate_llm,
    make_auraflow,
    make_chroma,
    make_lumina2,
    make_sana,
    make_zimage,
)

import skrr_compile as skrr  # noqa: E402
from skrr_compile.deploy.pipelines.encoder import PrunedTextEncoder  # noqa: E402
from skrr_compile.deploy.pipelines.specs import describe_pipeline  # noqa: E402

HAS_SEARCH = importlib.util.find_spec("skrr_compile.blocksearch") is not None
SANA_KWARGS = {"complex_human_instruction": SANA_INSTRUCTION}


def _spec_embedding(pipe, spec, prompt: str, encoder=None) -> torch.Tensor:
    """The embedding the spec says the denoiser reads: template, length, mask, first drop_tokens left out."""
    tok = getattr(pipe, spec.tokenizer)
    text = prompt if spec.template is None else spec.template.replace("{prompt}", prompt)
    enc = tok([text], padding="max_length", max_length=spec.max_length, truncation=True, return_tensors="pt")
    encoder = encoder if encoder is not None else getattr(pipe, spec.component)
    with torch.no_grad():
        out = encoder(enc.input_ids, attention_mask=enc.attention_mask if spec.attention_mask else None,
                      output_hidden_states=spec.hidden_states)
    return spec.select()(out)[:, spec.drop_tokens:], enc.attention_mask[:, spec.drop_tokens:]


def test_sana_spec_reads_what_encode_prompt_produces():
    pipe = make_sana()
    spec = describe_pipeline(pipe, LLM_MAX_SEQUENCE, **SANA_KWARGS).encoders["text_encoder"]
    n_chi = len(pipe.tokenizer.encode("\n".join(SANA_INSTRUCTION)))
    assert spec.template == "\n".join(SANA_INSTRUCTION) + "{prompt}" and spec.drop_tokens == n_chi - 1
    assert spec.max_length == n_chi + LLM_MAX_SEQUENCE - 2 and spec.read == "mask" and spec.attention_mask
    assert spec.to_dict()["outputs"] == ["last_hidden_state -> transformer.caption_projection"]
    for prompt in ("a photo of a cat", "two dogs playing in the snow with a red boat at night"):
        with torch.no_grad():
            embeds, mask, *_ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                  max_sequence_length=LLM_MAX_SEQUENCE, **SANA_KWARGS)
        ours, our_mask = _spec_embedding(pipe, spec, prompt)
        # Sana keeps position 0 (<bos>) and the last M - 1 positions; the spec scores those M - 1
        assert torch.equal(mask[:, 1:], our_mask)
        torch.testing.assert_close(embeds[:, 1:], ours, rtol=0, atol=0)
    # without the instruction: no template, every position read
    bare = describe_pipeline(pipe, LLM_MAX_SEQUENCE, complex_human_instruction=None).encoders["text_encoder"]
    assert bare.template is None and bare.drop_tokens == 0 and bare.max_length == LLM_MAX_SEQUENCE
    # the pipeline's own default instruction is picked up when none is given
    default = describe_pipeline(pipe).encoders["text_encoder"]
    assert default.template is not None and default.template.endswith("{prompt}") and default.drop_tokens > 10


LUMINA2_KWARGS = {"system_prompt": LUMINA2_SYSTEM}


def test_lumina2_spec_reads_what_encode_prompt_produces():
    pipe = make_lumina2()
    spec = describe_pipeline(pipe, LUMINA2_MAX_SEQUENCE, **LUMINA2_KWARGS).encoders["text_encoder"]
    assert spec.template == LUMINA2_SYSTEM + " <Prompt Start> {prompt}" and spec.drop_tokens == 0
    assert spec.hidden_layer == -2 and spec.hidden_states and spec.read == "mask"
    assert spec.to_dict()["outputs"] == ["hidden_states[-2] -> transformer.time_caption_embed.caption_embedder"]
    for prompt in ("a photo of a cat", "two dogs playing in the snow with a red boat at night"):
        with torch.no_grad():
            embeds, mask, *_ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                  max_sequence_length=LUMINA2_MAX_SEQUENCE, **LUMINA2_KWARGS)
        ours, our_mask = _spec_embedding(pipe, spec, prompt)
        assert torch.equal(mask, our_mask)
        torch.testing.assert_close(embeds, ours, rtol=0, atol=0)
    assert describe_pipeline(pipe).encoders["text_encoder"].template.startswith(pipe.system_prompt)


def test_lumina2_apply_generate_save_load(tmp_path):
    pipe = make_lumina2()
    dense = pipe.text_encoder
    spec = describe_pipeline(pipe, LUMINA2_MAX_SEQUENCE, **LUMINA2_KWARGS).encoders["text_encoder"]
    dense_latents = generate_llm(pipe)
    plan = skrr.Plan(skip=[1, 2], reuse={2: 0})
    skrr.apply_to_pipeline(pipe, {"text_encoder": plan})
    latents = _check_pruned(pipe, spec, plan, dense, tmp_path)
    assert latents.shape == dense_latents.shape
    assert not torch.allclose(latents, dense_latents, atol=1e-4), "pruning had no effect on the generation"


@pytest.mark.skipif(not HAS_SEARCH, reason="skrr_compile.blocksearch is not in this build")
def test_lumina2_prune_pipeline_search(tmp_path):
    pipe = make_lumina2()
    dense = pipe.text_encoder
    spec = describe_pipeline(pipe, LUMINA2_MAX_SEQUENCE, **LUMINA2_KWARGS).encoders["text_encoder"]
    plans = skrr.prune_pipeline(pipe, T5_PROMPT_CORPUS[:4], sparsity=0.15, beam=1, chunk_size=4,
                                max_sequence_length=LUMINA2_MAX_SEQUENCE, pipeline_kwargs=LUMINA2_KWARGS)
    assert len(plans["text_encoder"].skip) >= 1
    _check_pruned(pipe, spec, plans["text_encoder"], dense, tmp_path)


def test_zimage_spec_reads_what_encode_prompt_produces():
    pipe = make_zimage()
    spec = describe_pipeline(pipe, ZIMAGE_MAX_SEQUENCE).encoders["text_encoder"]
    assert spec.template.startswith("<|im_start|>user\n{prompt}<|im_end|>") and spec.hidden_layer == -2
    assert spec.to_dict()["outputs"] == ["hidden_states[-2] -> transformer.cap_embedder"] and spec.read == "mask"
    for prompt in ("a photo of a cat", "two dogs playing in the snow with a red boat at night"):
        with torch.no_grad():
            embeds = pipe._encode_prompt(prompt, device="cpu", max_sequence_length=ZIMAGE_MAX_SEQUENCE)
        ours, our_mask = _spec_embedding(pipe, spec, prompt)
        torch.testing.assert_close(embeds[0], ours[0][our_mask[0].bool()], rtol=0, atol=0)  # mask tokens only


def test_zimage_prune_generate_save_load(tmp_path):
    pipe = make_zimage()
    dense = pipe.text_encoder
    spec = describe_pipeline(pipe, ZIMAGE_MAX_SEQUENCE).encoders["text_encoder"]
    dense_latents = generate_llm(pipe)
    if HAS_SEARCH:
        plans = skrr.prune_pipeline(pipe, T5_PROMPT_CORPUS[:4], sparsity=0.15, beam=1, chunk_size=4,
                                    max_sequence_length=ZIMAGE_MAX_SEQUENCE)
        plan = plans["text_encoder"]
        assert len(plan.skip) >= 1
    else:  # pragma: no cover - depends on the build
        plan = skrr.Plan(skip=[1, 2], reuse={2: 0})
        skrr.apply_to_pipeline(pipe, {"text_encoder": plan})
    latents = _check_pruned(pipe, spec, plan, dense, tmp_path)
    assert latents.shape == dense_latents.shape


def test_chroma_spec_reads_what_encode_prompt_produces():
    pipe = make_chroma()
    spec = describe_pipeline(pipe, T5_MAX_SEQUENCE).encoders["text_encoder"]
    assert spec.template is None and spec.read == "mask" and spec.attention_mask
    for prompt in ("a cat", "two dogs playing in the snow"):
        with torch.no_grad():
            embeds, mask = pipe._get_t5_prompt_embeds(prompt, max_sequence_length=T5_MAX_SEQUENCE, device="cpu")
        ours, our_mask = _spec_embedding(pipe, spec, prompt)
        keep = our_mask[0].bool()
        assert mask[0].sum() == min(keep.sum() + 1, keep.numel())  # Chroma un-masks the first padding position too
        torch.testing.assert_close(embeds[0][keep], ours[0][keep], rtol=0, atol=0)


def test_chroma_prune_generate_save_load(tmp_path):
    pipe = make_chroma()
    dense = pipe.text_encoder
    spec = describe_pipeline(pipe, T5_MAX_SEQUENCE).encoders["text_encoder"]
    dense_latents = generate_llm(pipe)
    plan = skrr.Plan(skip=[1, 2], reuse={2: 0})
    if HAS_SEARCH:
        plan = skrr.prune_pipeline(pipe, T5_PROMPT_CORPUS[:4], sparsity=0.15, beam=2, chunk_size=4,
                                   max_sequence_length=T5_MAX_SEQUENCE)["text_encoder"]
        assert len(plan.skip) >= 1
    else:  # pragma: no cover - depends on the build
        skrr.apply_to_pipeline(pipe, {"text_encoder": plan})
    latents = _check_pruned(pipe, spec, plan, dense, tmp_path)
    assert latents.shape == dense_latents.shape


def test_auraflow_spec_reads_what_encode_prompt_produces():
    pipe = make_auraflow()
    spec = describe_pipeline(pipe, T5_MAX_SEQUENCE).encoders["text_encoder"]
    assert spec.template is None and spec.read == "mask" and spec.attention_mask
    assert spec.to_dict()["outputs"] == ["last_hidden_state -> transformer.context_embedder"]
    for prompt in ("a cat", "two dogs playing in the snow"):
        with torch.no_grad():
            embeds, mask, *_ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_MAX_SEQUENCE, device="cpu")
        ours, our_mask = _spec_embedding(pipe, spec, prompt)
        keep = our_mask[0].bool()
        assert torch.equal(mask.view(1, keep.numel(), -1)[0, :, 0].bool(), keep) and (embeds[0][~keep] == 0).all()  # mask: embedding-shaped
        torch.testing.assert_close(embeds[0][keep], ours[0][keep], rtol=0, atol=0)


def test_auraflow_apply_generate_save_load(tmp_path):
    pipe = make_auraflow()
    dense = pipe.text_encoder
    spec = describe_pipeline(pipe, T5_MAX_SEQUENCE).encoders["text_encoder"]
    dense_latents = generate_llm(pipe)
    plan = skrr.Plan(skip=[1, 2], reuse={2: 0})  # UMT5: the re-used attention brings its own position table
    skrr.apply_to_pipeline(pipe, {"text_encoder": plan})
    latents = _check_pruned(pipe, spec, plan, dense, tmp_path)
    assert latents.shape == dense_latents.shape
    assert not torch.allclose(latents, dense_latents, atol=1e-4), "pruning had no effect on the generation"


def _check_pruned(pipe, spec, plan, dense_encoder, tmp_path):
    enc = pipe.text_encoder
    assert isinstance(enc, PrunedTextEncoder) and enc.plan.skip == plan.skip and enc.plan.reuse == plan.reuse
    reference = skrr.apply(dense_encoder, plan)
    for prompt in T5_PROMPT_CORPUS[:2]:
        ours, _ = _spec_embedding(pipe, spec, prompt)
        ref, _ = _spec_embedding(pipe, spec, prompt, encoder=reference)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    latents = generate_llm(pipe)
    assert torch.isfinite(latents).all()
    skrr.save_pipeline(pipe, tmp_path / "pruned")
    loaded = skrr.load_pipeline(tmp_path / "pruned")
    assert isinstance(loaded.text_encoder, PrunedTextEncoder) and loaded.text_encoder.plan.skip == plan.skip
    for prompt in T5_PROMPT_CORPUS[:2]:
        torch.testing.assert_close(_spec_embedding(loaded, spec, prompt)[0], _spec_embedding(pipe, spec, prompt)[0],
                                   rtol=0, atol=0)
    return latents


def test_sana_apply_generate_save_load(tmp_path):
    pipe = make_sana()
    dense = pipe.text_encoder
    spec = describe_pipeline(pipe, LLM_MAX_SEQUENCE, **SANA_KWARGS).encoders["text_encoder"]
    dense_latents = generate_llm(pipe)
    plan = skrr.Plan(skip=[1, 2], reuse={2: 0})
    skrr.apply_to_pipeline(pipe, {"text_encoder": plan})
    assert pipe.text_encoder.num_params < sum(p.numel() for p in dense.parameters())
    latents = _check_pruned(pipe, spec, plan, dense, tmp_path)
    assert latents.shape == dense_latents.shape == (1, 4, 16, 16)
    assert not torch.allclose(latents, dense_latents, atol=1e-4), "pruning had no effect on the generation"


@pytest.mark.skipif(not HAS_SEARCH, reason="skrr_compile.blocksearch is not in this build")
def test_sana_prune_pipeline_search(tmp_path):
    pipe = make_sana()
    dense = pipe.text_encoder
    spec = describe_pipeline(pipe, LLM_MAX_SEQUENCE, **SANA_KWARGS).encoders["text_encoder"]
    plans = skrr.prune_pipeline(pipe, T5_PROMPT_CORPUS[:4], sparsity=0.15, beam=1, chunk_size=4,
                                max_sequence_length=LLM_MAX_SEQUENCE, pipeline_kwargs=SANA_KWARGS)
    plan = plans["text_encoder"]
    assert len(plan.skip) >= 1
    assert plans.spec.encoders["text_encoder"].template == spec.template
    _check_pruned(pipe, spec, plan, dense, tmp_path)


def test_not_yet_specified_llm_pipelines_are_refused_with_the_reason():
    from skrr_compile.deploy.pipelines.encoder import UnsupportedPipelineError
    from skrr_compile.deploy.pipelines.specs import family_of

    WanPipeline = type("WanPipeline", (), {})  # noqa: N806 - only the class name is looked at
    with pytest.raises(UnsupportedPipelineError, match="Wan .*not written yet"):
        family_of(WanPipeline())
