"""Pipelines whose text encoders are LLMs (issue 12 item 5), as tiny random pipelines that generate.

Each: the spec reads what the pipeline's own encode_prompt hands the denoiser (template, dropped tokens,
length, mask) -> prune_pipeline / apply_to_pipeline -> the pipeline generates -> the pruned encoder equals
skrr.apply(encoder, plan) -> save/load reproduces its outputs.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

from pipeline_factories import (  # noqa: E402
    FLUX2_MAX_SEQUENCE,
    HIDREAM_LLAMA_LAYERS,
    KLEIN_LAYERS,
    LLM_MAX_SEQUENCE,
    LUMINA2_MAX_SEQUENCE,
    LUMINA2_SYSTEM,
    QWENIMAGE_MAX_SEQUENCE,
    SANA_INSTRUCTION,
    T5_MAX_SEQUENCE,
    T5_PROMPT_CORPUS,
    ZIMAGE_MAX_SEQUENCE,
    generate_llm,
    make_auraflow,
    make_chroma,
    make_flux2,
    make_flux2klein,
    make_hidream,
    make_lumina2,
    make_qwenimage,
    make_sana,
    make_wan,
    make_zimage,
    text_processor,
)

import skrr_compile as skrr  # noqa: E402
from skrr_compile.deploy.pipelines.encoder import PrunedTextEncoder  # noqa: E402
from skrr_compile.deploy.pipelines.specs import describe_pipeline  # noqa: E402

HAS_SEARCH = importlib.util.find_spec("skrr_compile.blocksearch") is not None
SANA_KWARGS = {"complex_human_instruction": SANA_INSTRUCTION}


def _spec_embedding(pipe, spec, prompt: str, encoder=None) -> torch.Tensor:
    """The embedding the spec says the denoiser reads: template, length, mask, first drop_tokens left out."""
    tok = spec.calibration_tokenizer(pipe)  # the tokenizer as the pipeline calls it (mask, special tokens)
    text = prompt if spec.template is None else spec.template.replace("{prompt}", prompt)
    enc = tok([text], padding="max_length", max_length=spec.max_length, truncation=True, return_tensors="pt")
    encoder = encoder if encoder is not None else getattr(pipe, spec.component)
    with torch.no_grad():
        out = encoder(enc.input_ids, attention_mask=enc.attention_mask if spec.attention_mask else None,
                      output_hidden_states=spec.hidden_states)
    return spec.select()(out)[:, spec.drop_tokens:], enc.attention_mask[:, spec.drop_tokens:]


def _prune(pipe, max_sequence_length: int, component: str = "text_encoder", **kwargs) -> skrr.Plan:
    """prune_pipeline (a Skrr search on 4 prompts to 15 %) where the build has the search, else a fixed plan."""
    plan = skrr.Plan(skip=[1, 2], reuse={2: 0})
    if not HAS_SEARCH:  # pragma: no cover - depends on the build
        skrr.apply_to_pipeline(pipe, {component: plan})
        return plan
    plans = skrr.prune_pipeline(pipe, T5_PROMPT_CORPUS[:4], sparsity=0.15, chunk_size=4,
                                max_sequence_length=max_sequence_length, **kwargs)
    assert len(plans[component].skip) >= 1
    return plans[component]


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
    plan = _prune(pipe, ZIMAGE_MAX_SEQUENCE, beam=1)
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
    plan = _prune(pipe, T5_MAX_SEQUENCE, beam=2)
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


def test_wan_spec_reads_what_encode_prompt_produces():
    pipe = make_wan()
    spec = describe_pipeline(pipe, T5_MAX_SEQUENCE).encoders["text_encoder"]
    assert spec.template is None and spec.read == "mask" and spec.attention_mask and spec.module is None
    assert spec.to_dict()["outputs"] == ["last_hidden_state -> transformer.condition_embedder.text_embedder"]
    assert describe_pipeline(pipe).encoders["text_encoder"].max_length == 512  # WanPipeline.__call__'s default
    for prompt in ("a cat", "a red sofa at night"):
        with torch.no_grad():
            embeds = pipe._get_t5_prompt_embeds(prompt, max_sequence_length=T5_MAX_SEQUENCE, device="cpu")
        ours, our_mask = _spec_embedding(pipe, spec, prompt)
        keep = our_mask[0].bool()
        assert (embeds[0][~keep] == 0).all() and keep.sum() < keep.numel()  # Wan zeroes the padding
        torch.testing.assert_close(embeds[0][keep], ours[0][keep], rtol=0, atol=0)
    pipe.register_modules(transformer_2=copy.deepcopy(pipe.transformer))  # Wan 2.2: a low-noise transformer too
    both = describe_pipeline(pipe, T5_MAX_SEQUENCE).encoders["text_encoder"]
    assert both.to_dict()["outputs"] == [f"last_hidden_state -> {t}.condition_embedder.text_embedder"
                                         for t in ("transformer", "transformer_2")]
    assert both.projections(pipe)[1] is pipe.transformer_2.condition_embedder.text_embedder


def test_wan_prune_generate_video_save_load(tmp_path):
    pipe = make_wan()
    dense = pipe.text_encoder
    spec = describe_pipeline(pipe, T5_MAX_SEQUENCE).encoders["text_encoder"]
    dense_video = generate_llm(pipe)
    plan = _prune(pipe, T5_MAX_SEQUENCE, beam=2)
    video = _check_pruned(pipe, spec, plan, dense, tmp_path)
    assert video.shape == dense_video.shape and video.shape[2] == 2  # latent frames of a 5-frame video
    assert not torch.allclose(video, dense_video, atol=1e-4), "pruning had no effect on the generation"


def test_hidream_specs_read_what_encode_prompt_produces():
    pipe = make_hidream()
    specs = describe_pipeline(pipe, T5_MAX_SEQUENCE).encoders
    assert [n for n, es in specs.items() if es.default] == ["text_encoder_3", "text_encoder_4"]  # CLIPs: when named
    assert specs["text_encoder_4"].module == "model" and specs["text_encoder_4"].hidden_layer == (1, 3, 3)
    for prompt in ("a cat", "a red sofa at night"):
        with torch.no_grad():
            t5, _, llama, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                             max_sequence_length=T5_MAX_SEQUENCE, device="cpu")
            ours = {n: _spec_embedding(pipe, es, prompt)[0] for n, es in specs.items()}
            torch.testing.assert_close(torch.cat([ours["text_encoder"], ours["text_encoder_2"]], -1), pooled,
                                       rtol=0, atol=0)
            torch.testing.assert_close(ours["text_encoder_3"], t5, rtol=0, atol=0)  # every padded position
            read = torch.cat([llama[k] for k in HIDREAM_LLAMA_LAYERS], dim=-1)  # the transformer's llama_layers
            torch.testing.assert_close(ours["text_encoder_4"], read, rtol=0, atol=0)
            # each read layer through its own caption projection, as the transformer applies them
            projected = specs["text_encoder_4"].projections(pipe)(ours["text_encoder_4"])
            expected = [pipe.transformer.caption_projection[i](llama[k]) for i, k in enumerate(HIDREAM_LLAMA_LAYERS)]
            torch.testing.assert_close(projected, torch.cat(expected, -1), rtol=0, atol=0)
            proj_t5 = specs["text_encoder_3"].projections(pipe)
            torch.testing.assert_close(proj_t5(t5), pipe.transformer.caption_projection[-1](t5), rtol=0, atol=0)


def test_hidream_prune_generate_save_load(tmp_path):
    pipe = make_hidream()
    clips, t5, llama = (pipe.text_encoder, pipe.text_encoder_2), pipe.text_encoder_3, pipe.text_encoder_4.model
    specs = describe_pipeline(pipe, T5_MAX_SEQUENCE).encoders
    dense_latents = generate_llm(pipe)
    if HAS_SEARCH:  # the default: T5 and Llama
        plans = skrr.prune_pipeline(pipe, T5_PROMPT_CORPUS[:4], sparsity=0.15, beam=2, chunk_size=4,
                                    max_sequence_length=T5_MAX_SEQUENCE)
        assert sorted(plans) == ["text_encoder_3", "text_encoder_4"] and all(len(p.skip) >= 1 for p in plans.values())
    else:  # pragma: no cover - depends on the build
        plans = {"text_encoder_3": skrr.Plan(skip=[1, 2]), "text_encoder_4": skrr.Plan(skip=[1, 2], reuse={2: 0})}
        skrr.apply_to_pipeline(pipe, plans)
    assert (pipe.text_encoder, pipe.text_encoder_2) == clips  # the CLIPs stay dense
    if HAS_SEARCH:  # a CLIP when named (here by a per-encoder sparsity), scored through its p_embedder columns
        clip = skrr.prune_pipeline(pipe, T5_PROMPT_CORPUS[:4], sparsity={"text_encoder": 0.15}, beam=2,
                                   chunk_size=4, max_sequence_length=T5_MAX_SEQUENCE, apply_plans=False)
        assert list(clip) == ["text_encoder"] and clip.reports["text_encoder"]["reads"] == [
            "text_embeds -> transformer.p_embedder.pooled_embedder.linear_1[:, 0:16]"]
    assert pipe.text_encoder_4.num_params < sum(p.numel() for p in llama.parameters())  # no LM head either
    latents = _check_pruned(pipe, specs["text_encoder_4"], plans["text_encoder_4"], llama, tmp_path,
                            (specs["text_encoder_3"], plans["text_encoder_3"], t5))
    assert latents.shape == dense_latents.shape
    assert not torch.allclose(latents, dense_latents, atol=1e-4), "pruning had no effect on the generation"


KLEIN_KWARGS = {"text_encoder_out_layers": KLEIN_LAYERS}


def test_flux2klein_spec_reads_what_encode_prompt_produces():
    pipe = make_flux2klein()
    spec = describe_pipeline(pipe, FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS).encoders["text_encoder"]
    assert spec.module == "model" and spec.hidden_layer == KLEIN_LAYERS and spec.read == "all"
    assert spec.template.startswith("<|im_start|>user\n{prompt}<|im_end|>") and "</think>" in spec.template
    assert describe_pipeline(pipe).encoders["text_encoder"].hidden_layer == (9, 18, 27)  # the pipeline's default
    for prompt in ("a photo of a cat", "two dogs playing in the snow with a red boat at night"):
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS)
        ours, our_mask = _spec_embedding(pipe, spec, prompt)
        assert our_mask[0, -1] == 0  # padded: every position, padding included, reaches the context embedder
        torch.testing.assert_close(embeds, ours, rtol=0, atol=0)


def test_flux2klein_prune_generate_save_load(tmp_path):
    pipe = make_flux2klein()
    dense = pipe.text_encoder.model
    spec = describe_pipeline(pipe, FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS).encoders["text_encoder"]
    dense_latents = generate_llm(pipe)
    plan = _prune(pipe, FLUX2_MAX_SEQUENCE, beam=2, pipeline_kwargs=KLEIN_KWARGS)
    assert pipe.text_encoder.architecture == "Qwen3Model"  # the text model replaces the causal LM (no LM head)
    latents = _check_pruned(pipe, spec, plan, dense, tmp_path)
    assert latents.shape == dense_latents.shape
    assert not torch.allclose(latents, dense_latents, atol=1e-4), "pruning had no effect on the generation"


def test_qwenimage_spec_reads_what_encode_prompt_produces():
    pipe = make_qwenimage()
    spec = describe_pipeline(pipe, QWENIMAGE_MAX_SEQUENCE).encoders["text_encoder"]
    drop = pipe.prompt_template_encode_start_idx
    assert spec.drop_tokens == drop > 0 and spec.template == pipe.prompt_template_encode.replace("{}", "{prompt}")
    assert spec.module == "model.language_model" and spec.max_length == QWENIMAGE_MAX_SEQUENCE + drop
    assert spec.to_dict()["outputs"] == ["hidden_states[-1] -> transformer.txt_norm -> transformer.txt_in"]
    for prompt in ("a cat", "a photo of a cat sitting on a red sofa"):
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=QWENIMAGE_MAX_SEQUENCE)
            ours, our_mask = _spec_embedding(pipe, spec, prompt)  # the system prefix (drop_tokens) left out
            keep = our_mask[0].bool()
            assert mask is None or torch.equal(mask[0].bool(), keep[: mask.shape[1]])
            torch.testing.assert_close(embeds[0], ours[0][keep], rtol=0, atol=0)
            # the language model alone (what is pruned) computes what the VL model hands the pipeline
            text_model = _spec_embedding(pipe, spec, prompt, encoder=spec.encoder(pipe))[0]
            torch.testing.assert_close(text_model[0][keep], embeds[0], rtol=0, atol=0)
            projected = spec.projections(pipe)(ours)
            torch.testing.assert_close(projected, pipe.transformer.txt_in(pipe.transformer.txt_norm(ours)))


def test_qwenimage_prune_generate_save_load(tmp_path):
    pipe = make_qwenimage()
    dense = pipe.text_encoder.model.language_model
    spec = describe_pipeline(pipe, QWENIMAGE_MAX_SEQUENCE).encoders["text_encoder"]
    dense_latents = generate_llm(pipe)
    plan = _prune(pipe, QWENIMAGE_MAX_SEQUENCE, beam=2)
    assert pipe.text_encoder.architecture == "Qwen2_5_VLTextModel"  # the vision tower is never run: left out
    latents = _check_pruned(pipe, spec, plan, dense, tmp_path)
    fresh = make_qwenimage()  # the saved text model also goes into a dense pipeline (checked against its text model)
    assert skrr.load_into(fresh, tmp_path / "pruned") == ["text_encoder"]
    torch.testing.assert_close(_spec_embedding(fresh, spec, "a cat")[0], _spec_embedding(pipe, spec, "a cat")[0],
                               rtol=0, atol=0)
    assert latents.shape == dense_latents.shape
    assert not torch.allclose(latents, dense_latents, atol=1e-4), "pruning had no effect on the generation"


def test_flux2_spec_reads_what_encode_prompt_produces():
    pipe = make_flux2()
    spec = describe_pipeline(pipe, FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS).encoders["text_encoder"]
    assert spec.module == "model.language_model" and spec.hidden_layer == KLEIN_LAYERS and spec.read == "all"
    assert pipe.system_message in spec.template and spec.template.startswith(pipe.tokenizer.bos_token)
    assert not spec.special_tokens  # the template renders <bos>; the tokenizer must not add a second one
    assert describe_pipeline(pipe).encoders["text_encoder"].hidden_layer == (10, 20, 30)  # the pipeline's default
    for prompt in ("a photo of a cat", "two dogs playing in the snow"):
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS)
            ours, our_mask = _spec_embedding(pipe, spec, prompt)
            assert our_mask[0, -1] == 0  # padded: every position reaches the context embedder
            torch.testing.assert_close(embeds, ours, rtol=0, atol=0)
            # the language model alone (what is pruned) computes what the VL model hands the pipeline
            text_model = _spec_embedding(pipe, spec, prompt, encoder=spec.encoder(pipe))[0]
            torch.testing.assert_close(text_model, embeds, rtol=0, atol=0)
    pipe.register_modules(tokenizer=text_processor(pipe.tokenizer))  # as FLUX.2 ships it: a processor
    spec = describe_pipeline(pipe, FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS).encoders["text_encoder"]
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("a cat", device="cpu", max_sequence_length=FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS)
    torch.testing.assert_close(embeds, _spec_embedding(pipe, spec, "a cat")[0], rtol=0, atol=0)


def test_flux2_prune_generate_save_load(tmp_path):
    pipe = make_flux2()
    dense = pipe.text_encoder.model.language_model
    spec = describe_pipeline(pipe, FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS).encoders["text_encoder"]
    dense_latents = generate_llm(pipe)
    plan = _prune(pipe, FLUX2_MAX_SEQUENCE, beam=2, pipeline_kwargs=KLEIN_KWARGS)
    assert pipe.text_encoder.architecture == "MistralModel"  # the Pixtral tower is never run: left out
    with pytest.raises(NotImplementedError, match="MistralModel .*cannot generate text"):  # caption upsampling
        pipe.text_encoder.generate(torch.ones(1, 2, dtype=torch.long))
    latents = _check_pruned(pipe, spec, plan, dense, tmp_path)
    assert latents.shape == dense_latents.shape
    assert not torch.allclose(latents, dense_latents, atol=1e-4), "pruning had no effect on the generation"


def _check_pruned(pipe, spec, plan, dense_encoder, tmp_path, *more):
    """The pruned encoder(s) (spec, plan, dense encoder; `more` as triples) equal skrr.apply on the same plan;
    the pipeline generates, saves and loads with them."""
    pruned = [(spec, plan, dense_encoder), *more]
    for spec_, plan_, dense_ in pruned:
        enc = getattr(pipe, spec_.component)
        assert isinstance(enc, PrunedTextEncoder) and enc.plan.skip == plan_.skip and enc.plan.reuse == plan_.reuse
        reference = skrr.apply(dense_, plan_)
        for prompt in T5_PROMPT_CORPUS[:2]:
            ours, _ = _spec_embedding(pipe, spec_, prompt)
            ref, _ = _spec_embedding(pipe, spec_, prompt, encoder=reference)
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    latents = generate_llm(pipe)
    assert torch.isfinite(latents).all()
    skrr.save_pipeline(pipe, tmp_path / "pruned")
    loaded = skrr.load_pipeline(tmp_path / "pruned")
    for spec_, plan_, _ in pruned:
        saved = getattr(loaded, spec_.component)
        assert isinstance(saved, PrunedTextEncoder) and saved.plan.skip == plan_.skip
        for prompt in T5_PROMPT_CORPUS[:2]:
            torch.testing.assert_close(_spec_embedding(loaded, spec_, prompt)[0],
                                       _spec_embedding(pipe, spec_, prompt)[0], rtol=0, atol=0)
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


# ---------------------------------------------------------------------------------------------------
# the magnitude sweep's text metric measures what the denoiser reads (as the Skrr search scores it)
# ---------------------------------------------------------------------------------------------------
def _encode_prompt_discrepancy(pipe, prompts, encode, project, pruned_component) -> tuple[float, float]:
    """(mse_prompts, mse_null) computed from the pipeline's own encode_prompt: the embeddings it hands the
    denoiser with its dense component and with `pruned_component`, through `project`, over the tokens its
    mask keeps (all when it returns none), squared errors summed over prompts then divided by the count."""
    dense_component = pipe.text_encoder

    def embeddings(prompt):
        with torch.no_grad():
            embeds, mask = encode(pipe, prompt)
            projected = project(embeds)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        return projected, mask

    parts = []
    for group in (prompts, [""]):
        sq, count = 0.0, 0.0
        for prompt in group:
            pipe.register_modules(text_encoder=dense_component)
            ref, mask = embeddings(prompt)
            pipe.register_modules(text_encoder=pruned_component)
            ours, mask2 = embeddings(prompt)
            assert torch.equal(mask, mask2)
            sq += float(((ours.double() - ref.double()) ** 2)[mask].sum())
            count += float(mask.sum()) * ref.shape[-1]
        parts.append(sq / count)
    pipe.register_modules(text_encoder=dense_component)
    return parts[0], parts[1]


def _magnitude_pruned(component, inner: str | None, sparsity: float):
    """A copy of the component whose text model (`inner`, or the component itself) is magnitude-pruned."""
    from skrr_compile.magnitude.config import MagnitudeConfig
    from skrr_compile.magnitude.prune import prune

    pruned = copy.deepcopy(component)
    prune(pruned.get_submodule(inner) if inner else pruned, MagnitudeConfig(sparsity, "magnitude"))
    return pruned


def test_sweep_cli_text_metric_on_lumina2_equals_encode_prompt(tmp_path):
    """`skrr-compile sweep` on Lumina 2 (hidden_states[-2] behind the system prompt): each point's discrepancy is
    the MSE between encode_prompt's caption embeddings with the dense and the magnitude-pruned Gemma-2, through
    the caption embedder (before: KeyError 'select', since the spec reads another hidden layer)."""
    import json

    from skrr_compile.cli.main import main

    pipe = make_lumina2()
    pipe.save_pretrained(tmp_path / "pipe")
    prompts = T5_PROMPT_CORPUS[:3]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "sweep"
    m = 48  # max_sequence_length, the system prompt included
    assert main(["sweep", str(tmp_path / "pipe"), "--target", "text_encoder", "--sparsity", "0.3,0.6",
                 "--prompts", str(tmp_path / "p.txt"), "--chunk-size", "2", "--max-length", str(m),
                 "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["reads"] == ["hidden_states[-2] -> transformer.time_caption_embed.caption_embedder"]
    assert data["spec"]["template"] == pipe.system_prompt + " <Prompt Start> {prompt}" and data["num_prompts"] == 3
    points = data["results"][0]["points"]
    # the last decoder layer is past hidden_states[-2]: left dense and out of the sweep, as `magnitude` does
    last = len(pipe.text_encoder.layers) - 1
    want_unread = sorted(f"{n}.weight" for n, mod in pipe.text_encoder.named_modules()
                         if isinstance(mod, torch.nn.Linear) and n.startswith(f"layers.{last}."))
    assert sorted(data["unread_layers"]) == want_unread and want_unread
    weights = {f"{n}.weight": mod.weight.numel() for n, mod in pipe.text_encoder.named_modules()
               if isinstance(mod, torch.nn.Linear)}
    read_share = 1 - sum(weights[n] for n in want_unread) / sum(weights.values())
    assert points[0]["sparsity_linear"] == pytest.approx(0.3 * read_share, abs=1e-3)  # zeros only where read

    def encode(p, prompt):
        embeds, mask, *_ = p.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=m)
        return embeds, mask

    project = pipe.transformer.time_caption_embed.caption_embedder
    for point, s in zip(points, (0.3, 0.6)):
        mse_p, mse_n = _encode_prompt_discrepancy(pipe, prompts, encode, project,
                                                  _magnitude_pruned(pipe.text_encoder, None, s))
        assert mse_p > 0 and mse_n > 0
        assert point["mse_prompts"] == pytest.approx(mse_p, rel=1e-4)
        assert point["mse_null"] == pytest.approx(mse_n, rel=1e-4)
        assert point["discrepancy"] == pytest.approx(mse_p + mse_n, rel=1e-4)
    assert points[1]["discrepancy"] > points[0]["discrepancy"]


def _klein_encode(p, prompt):
    embeds, _ = p.encode_prompt(prompt, device="cpu", max_sequence_length=FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS)
    return embeds, None  # every padded position reaches the context embedder


def _qwenimage_encode(p, prompt):
    return p.encode_prompt(prompt, device="cpu", max_sequence_length=QWENIMAGE_MAX_SEQUENCE)


@pytest.mark.parametrize("family", ["flux2klein", "qwenimage"])
def test_spec_scoring_measures_the_text_model_the_pipeline_reads(family):
    """spec_scoring (what the sweep's metric and the search score) on encoders inside a larger component
    (Klein's Qwen3ForCausalLM: a stack of layers, no special tokens added by the template's owner; Qwen-Image's
    VL model: the template's prefix dropped): the text model is what is pruned and scored, and the discrepancy
    equals encode_prompt's embeddings of the dense vs the pruned pipeline through the context embedder."""
    from skrr_compile.blocksearch.discrepancy import Discrepancy
    from skrr_compile.deploy.pipelines.prune import spec_scoring

    if family == "flux2klein":
        pipe, encode = make_flux2klein(), _klein_encode
        spec = describe_pipeline(pipe, FLUX2_MAX_SEQUENCE, **KLEIN_KWARGS).encoders["text_encoder"]
        project, inner, text_model = pipe.transformer.context_embedder, "model", "Qwen3Model"
    else:
        pipe, encode = make_qwenimage(), _qwenimage_encode
        spec = describe_pipeline(pipe, QWENIMAGE_MAX_SEQUENCE).encoders["text_encoder"]
        t = pipe.transformer
        project, inner, text_model = (lambda x: t.txt_in(t.txt_norm(x))), "model.language_model", "Qwen2_5_VLTextModel"
    prompts = T5_PROMPT_CORPUS[:3]
    scoring = spec_scoring(pipe, spec, prompts, chunk_size=2)
    assert type(scoring.model).__name__ == text_model and scoring.model is pipe.text_encoder.get_submodule(inner)
    metric = Discrepancy(scoring.call(scoring.model), scoring.calibration, scoring.projection, scoring.select)
    pruned = _magnitude_pruned(pipe.text_encoder, inner, 0.5)
    report = metric.evaluate(scoring.call(pruned.get_submodule(inner)))
    mse_p, mse_n = _encode_prompt_discrepancy(pipe, prompts, encode, project, pruned)
    assert mse_p > 0 and mse_n > 0
    assert report.mse_prompts == pytest.approx(mse_p, rel=1e-4)
    assert report.mse_null == pytest.approx(mse_n, rel=1e-4)


@pytest.mark.skipif(not HAS_SEARCH, reason="skrr_compile.blocksearch is not in this build")
def test_prune_pipeline_cli_encoders_default_is_the_familys(tmp_path, capsys):
    """`prune-pipeline` without --encoders prunes the family's default (HiDream: T5 and Llama, not the CLIPs);
    `--encoders all` prunes every text encoder (before: the flag defaulted to "all" but meant the default)."""
    from skrr_compile.cli.main import main

    dense = make_hidream()
    dense.save_pretrained(tmp_path / "pipe")
    llama = dense.text_encoder_4  # a LlamaForCausalLM: its pruned text model leaves the LM head out
    head = _unique_params(llama) - _unique_params(llama.model)
    (tmp_path / "p.txt").write_text("\n".join(T5_PROMPT_CORPUS[:2]) + "\n")
    common = ["prune-pipeline", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "p.txt"), "--sparsity", "0.15",
              "--method", "shortgpt", "--max-sequence-length", str(T5_MAX_SEQUENCE), "--quiet"]
    pruned = {}
    for label, extra in (("default", []), ("all", ["--encoders", "all"]), ("named", ["--encoders", "text_encoder_2"])):
        assert main([*common, *extra, "--out", str(tmp_path / label)]) == 0
        loaded = skrr.load_pipeline(tmp_path / label)
        pruned[label] = sorted(n for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
                               if isinstance(getattr(loaded, n), PrunedTextEncoder))
        printed = capsys.readouterr().out
        lines = {line.split(":")[0]: line for line in printed.splitlines() if " kept (" in line}
        assert sorted(lines) == pruned[label]
        if "text_encoder_4" in lines:  # sizes of the text model, and what dropping the LM head saved
            assert f" of {_unique_params(llama.model):,} params of the LlamaModel kept" in lines["text_encoder_4"]
            assert (f"the LlamaForCausalLM ({_unique_params(llama):,} params) also held {head:,} params the "
                    "pipeline never runs") in lines["text_encoder_4"]
    assert pruned == {"default": ["text_encoder_3", "text_encoder_4"],
                      "all": ["text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"],
                      "named": ["text_encoder_2"]}
    with pytest.raises(SystemExit):
        main(["prune-pipeline", "--help"])
    assert "default: the family's default" in " ".join(capsys.readouterr().out.split())


def _unique_params(module) -> int:
    return sum(p.numel() for p in {p.data_ptr(): p for p in module.parameters()}.values())


@pytest.mark.parametrize("family", ["qwenimage", "flux2klein"])
def test_encoder_sizes_compare_the_text_model_with_itself(family, tmp_path):
    """encoder_sizes counts the text model dense and pruned (before: the dense count was the whole component,
    vision tower and LM head included, against a pruned text model), and separately what dropping the unused
    parts saved; the same after save/load and load_into."""
    from skrr_compile.deploy.pipelines.storage import encoder_sizes

    make, inner, arch, component_class = {
        "qwenimage": (make_qwenimage, "model.language_model", "Qwen2_5_VLTextModel", "Qwen2_5_VLForConditionalGeneration"),
        "flux2klein": (make_flux2klein, "model", "Qwen3Model", "Qwen3ForCausalLM"),
    }[family]
    pipe = make()
    component = pipe.text_encoder
    text = component.get_submodule(inner)
    whole, dense = _unique_params(component), _unique_params(text)
    assert whole > dense  # an LM head (and Qwen-Image's vision tower) the pipeline never runs
    expected_dense = {"params": dense, "dense_params": dense, "sparsity": 0.0, "text_model": arch,
                      "component": component_class, "component_params": whole, "unused_params": whole - dense,
                      "pruned": False}
    assert encoder_sizes(pipe)["text_encoder"] == expected_dense
    # skip FFN 0 and MHA 1 (pre-LN: each with its norm), MHA 1 re-using MHA 0: both sub-blocks' weights removed
    plan = skrr.Plan(skip=[1, 2], reuse={2: 0})
    layers = text.layers
    removed = sum(_unique_params(m) for m in (layers[0].mlp, layers[0].post_attention_layernorm,
                                              layers[1].self_attn, layers[1].input_layernorm))
    skrr.apply_to_pipeline(pipe, {"text_encoder": plan})
    expected = {"params": dense - removed, "dense_params": dense, "sparsity": pytest.approx(removed / dense),
                "text_model": arch, "component": component_class, "component_params": whole,
                "unused_params": whole - dense, "pruned": True}
    assert encoder_sizes(pipe)["text_encoder"] == expected
    skrr.save_pipeline(pipe, tmp_path / "pruned")
    assert encoder_sizes(skrr.load_pipeline(tmp_path / "pruned"))["text_encoder"] == expected
    summary = json.loads((tmp_path / "pruned" / "skrr_pipeline.json").read_text())["pruned"]["text_encoder"]
    assert summary["dense_params"] == dense and summary["unused_params"] == whole - dense
    fresh = make()
    skrr.load_into(fresh, tmp_path / "pruned")
    assert encoder_sizes(fresh)["text_encoder"] == expected
