"""diffusers integration on tiny random pipelines of every supported family (tests/pipeline_factories.py).

The references are the pipelines themselves: what `encode_prompt` hands the denoiser, and the denoiser's
consumer modules applied to it.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from pipeline_factories import FACTORIES, T5_MAX_SEQUENCE, T5_PROMPT_CORPUS, generate  # noqa: E402

import skrr_compile as skrr  # noqa: E402
from skrr_compile import cli  # noqa: E402
from skrr_compile.core.storage import NotAPrunedModelError  # noqa: E402
from skrr_compile.deploy.pipelines.encoder import (
    SUPPORTED_PIPELINES,
    NoTextEncoderError,
    PrunedTextEncoder,
    UnsupportedPipelineError,
)
from skrr_compile.deploy.pipelines.prune import apply_to_pipeline
from skrr_compile.deploy.pipelines.specs import describe_pipeline
from skrr_compile.deploy.pipelines.storage import encoder_sizes, load_into, save_pipeline

HAS_SEARCH = importlib.util.find_spec("skrr_compile.blocksearch") is not None
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, digital art", ""]
PLAN = skrr.Plan(skip=[1, 2], reuse={2: 0})  # layer 0's FFN skipped; layer 1's attention re-uses layer 0's
# every encoder of PixArt, SD and SD3; one of SDXL (the one with a pooled output) and of FLUX (T5), so both
# "prune all" and "prune one" go through save/load (each pruned encoder costs two traces: apply and load)
PRUNED = {"sdxl": ["text_encoder_2"], "flux": ["text_encoder_2"]}


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    """Tiny ops: one thread avoids oversubscription when the machine is shared; quiet diffusers logs."""
    import diffusers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)


def _pipe(family):
    pipe = FACTORIES[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _view(pipe, spec, prompts):
    """What the search sees of one encoder: the spec's tokenizer, padding and mask, then its selected outputs."""
    tok = spec.calibration_tokenizer(pipe)
    enc = tok(prompts, padding=spec.padding, max_length=spec.max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = getattr(pipe, spec.component)(enc["input_ids"], attention_mask=enc["attention_mask"],
                                            output_hidden_states=True)
    sel = spec.select()(out)
    return (sel if isinstance(sel, tuple) else (sel,)), enc["attention_mask"]


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


def check_reads_what_the_pipeline_reads(family: str, pipe) -> None:
    """Each encoder's selected outputs (and projections) against what encode_prompt feeds the denoiser."""
    spec = describe_pipeline(pipe, max_sequence_length=T5_MAX_SEQUENCE)
    views = {name: _view(pipe, es, PROMPTS) for name, es in spec.encoders.items()}
    with torch.no_grad():
        if family.startswith("pixart"):
            emb, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                                 max_sequence_length=T5_MAX_SEQUENCE)
            (h,), m = views["text_encoder"]
            assert spec.encoders["text_encoder"].read == "mask"
            keep = m.bool()
            _close(h[keep], emb[:, : h.shape[1]][keep])
            assert torch.equal(mask[:, : m.shape[1]], m) and not mask[:, m.shape[1]:].any()
            proj = spec.encoders["text_encoder"].projections(pipe)
            assert proj is pipe.transformer.caption_projection
        elif family == "sd":
            emb = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
            (h,), m = views["text_encoder"]
            assert h.shape == emb.shape == (3, 77, 32) and bool(m.all())
            _close(h, emb)
        elif family == "sdxl":
            emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
            (h1,), _ = views["text_encoder"]
            (h2, p2), _ = views["text_encoder_2"]
            _close(torch.cat([h1, h2], dim=-1), emb)
            _close(p2, pooled)
            lin = pipe.unet.add_embedding.linear_1
            proj = spec.encoders["text_encoder_2"].projections(pipe)[1]
            time_part = torch.randn(3, lin.in_features - p2.shape[1])
            _close(proj(p2) + lin(torch.cat([torch.zeros_like(p2), time_part], -1)), lin(torch.cat([p2, time_part], -1)))
        elif family == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=T5_MAX_SEQUENCE)
            (hl, pl), _ = views["text_encoder"]
            (hg, pg), _ = views["text_encoder_2"]
            (t5,), _ = views["text_encoder_3"]
            ce = pipe.transformer.context_embedder
            lin = pipe.transformer.time_text_embed.text_embedder.linear_1
            projs = {n: spec.encoders[n].projections(pipe) for n in spec.encoders}
            # the consumer's output is the sum of each encoder's projected contribution plus its bias
            _close(ce(emb[:, :77]), projs["text_encoder"][0](hl) + projs["text_encoder_2"][0](hg) + ce.bias)
            _close(ce(emb[:, 77:]), projs["text_encoder_3"](t5) + ce.bias)
            _close(lin(pooled), projs["text_encoder"][1](pl) + projs["text_encoder_2"][1](pg) + lin.bias)
            _close(emb[:, 77:], t5)
        elif family == "flux":
            emb, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_MAX_SEQUENCE)
            (p,), _ = views["text_encoder"]
            (t5,), _ = views["text_encoder_2"]
            _close(p, pooled)
            _close(t5, emb)
            assert spec.encoders["text_encoder"].projections(pipe) is pipe.transformer.time_text_embed.text_embedder
        else:  # pragma: no cover
            raise AssertionError(family)


@pytest.mark.parametrize("family", list(FACTORIES))
def test_prune_generate_save_load(family, tmp_path):
    pipe = _pipe(family)
    check_reads_what_the_pipeline_reads(family, pipe)  # the dense pipeline
    dense_latents = generate(pipe)
    names = PRUNED.get(family, list(describe_pipeline(pipe).encoders))
    untouched = {n: getattr(pipe, n) for n in describe_pipeline(pipe).encoders if n not in names}
    dense_params = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in names}

    apply_to_pipeline(pipe, dict.fromkeys(names, PLAN))
    for n in names:
        enc = getattr(pipe, n)
        assert isinstance(enc, PrunedTextEncoder) and enc.plan.skip == (1, 2) and enc.plan.reuse == {2: 0}
        assert pipe.config[n] == ["skrr_compile", "PrunedTextEncoder"] or tuple(pipe.config[n]) == ("skrr_compile", "PrunedTextEncoder")
        assert enc.num_params < dense_params[n]
    assert all(getattr(pipe, n) is m for n, m in untouched.items())
    sizes = encoder_sizes(pipe)
    assert all(sizes[n]["pruned"] == (n in names) for n in sizes) and all(0 < sizes[n]["sparsity"] < 1 for n in names)
    check_reads_what_the_pipeline_reads(family, pipe)  # the pruned encoders behave as HF ones in the pipeline
    latents = generate(pipe)
    assert latents.shape == dense_latents.shape and torch.isfinite(latents).all()
    assert not torch.allclose(latents, dense_latents, atol=1e-4), "pruning had no effect on the generation"

    if family == "pixart_sigma":  # saves and loads exactly as PixArt-Alpha (one T5 trace less)
        return
    with torch.no_grad():
        before = pipe.encode_prompt(PROMPTS[0], **_encode_kwargs(pipe))
    save_pipeline(pipe, tmp_path / "pruned")
    summary = json.loads((tmp_path / "pruned" / "skrr_pipeline.json").read_text())
    assert sorted(summary["pruned"]) == sorted(names)
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pruned")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for n in names:
        enc, orig = getattr(loaded, n), getattr(pipe, n)
        assert isinstance(enc, PrunedTextEncoder)
        assert enc.plan.skip == orig.plan.skip and enc.plan.reuse == orig.plan.reuse
        assert enc.num_params == orig.num_params
    with torch.no_grad():
        after = loaded.encode_prompt(PROMPTS[0], **_encode_kwargs(loaded))
    for a, b in zip(before, after):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), "the reloaded encoders do not reproduce the embeddings exactly"
    _close(generate(loaded), latents)  # same seed, same initial latents; the denoiser reloads to ~1e-7

    if family == "sdxl":  # load_into with one saved encoder directory, and its errors (no trace until the end)
        one = tmp_path / "pruned" / "text_encoder_2"
        with pytest.raises(ValueError, match="name the component"):
            load_into(_pipe("sdxl"), one)
        with pytest.raises(ValueError, match="but pipe.text_encoder is a CLIPTextModel"):  # CLIP-G into the CLIP-L slot
            load_into(_pipe("sdxl"), one, components="text_encoder")
        with pytest.raises(ValueError, match="another"):  # SDXL's CLIP-G of width 32 into SD3's of width 24
            load_into(_pipe("sd3"), one, components="text_encoder_2")
        with pytest.raises(NotAPrunedModelError):
            load_into(_pipe("sdxl"), tmp_path / "pruned", components="text_encoder")
        with pytest.raises(ValueError, match="already pruned"):
            apply_to_pipeline(loaded, {"text_encoder_2": PLAN})
        fresh = _pipe("sdxl")
        assert load_into(fresh, one, components="text_encoder_2") == ["text_encoder_2"]
        with torch.no_grad():
            again = fresh.encode_prompt(PROMPTS[0], **_encode_kwargs(fresh))
        assert all(torch.equal(a, b) for a, b in zip(before, again) if isinstance(a, torch.Tensor))

    if family == "sd":  # the pruned pipeline decodes images too
        with torch.no_grad():
            image = loaded("a photo of a cat", num_inference_steps=2, height=16, width=16, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images
        assert image.shape == (1, 16, 16, 3) and (image >= 0).all() and (image <= 1).all()


def _encode_kwargs(pipe) -> dict:
    name = type(pipe).__name__
    if name.startswith("PixArt"):
        return {"do_classifier_free_guidance": False, "max_sequence_length": T5_MAX_SEQUENCE}
    if name == "StableDiffusionPipeline":
        return {"device": "cpu", "num_images_per_prompt": 1, "do_classifier_free_guidance": False}
    if name == "StableDiffusionXLPipeline":
        return {"do_classifier_free_guidance": False}
    if name == "StableDiffusion3Pipeline":
        return {"prompt_2": None, "prompt_3": None, "do_classifier_free_guidance": False,
                "max_sequence_length": T5_MAX_SEQUENCE}
    return {"prompt_2": None, "max_sequence_length": T5_MAX_SEQUENCE}


# --- the search, scoring what the pipeline reads -------------------------------------------------
@pytest.mark.skipif(not HAS_SEARCH, reason="skrr_compile.blocksearch (issue 3) is not in this build")
def test_prune_pipeline_search_scores_every_consumed_output():
    from skrr_compile.deploy.pipelines.prune import prune_pipeline

    pipe = _pipe("sd3")
    dense = {"text_encoder": pipe.text_encoder}
    spec = describe_pipeline(pipe, max_sequence_length=T5_MAX_SEQUENCE)
    prompts = T5_PROMPT_CORPUS[:5]
    plans = prune_pipeline(pipe, prompts, sparsity=0.2, encoders=["text_encoder"],
                           max_sequence_length=T5_MAX_SEQUENCE, progress=False, chunk_size=2, beam=2)
    assert sorted(plans) == ["text_encoder"]
    assert not isinstance(pipe.text_encoder_2, PrunedTextEncoder) and not isinstance(pipe.text_encoder_3, PrunedTextEncoder)
    for name, plan in plans.items():
        report = plans.reports[name]
        assert report["sparsity"] >= 0.2 and isinstance(getattr(pipe, name), PrunedTextEncoder)
        assert getattr(pipe, name).plan.skip == plan.skip
        # independent recomputation of the paper's D over everything the pipeline reads from this encoder:
        # sum over outputs of (MSE over prompts + MSE over the null prompt), after each output's projection
        es = spec.encoders[name]
        total = 0.0
        for texts in (prompts, [""]):
            ref, _ = _view_with(pipe, es, texts, dense[name])
            got, _ = _view_with(pipe, es, texts, getattr(pipe, name))
            projs = es.projections(pipe)
            projs = projs if isinstance(projs, tuple) else (projs,)
            for p, r, g in zip(projs, ref, got):
                p = p or (lambda x: x)
                total += float(((p(g) - p(r)) ** 2).double().mean())
        assert report["discrepancy"] == pytest.approx(total, rel=1e-4)
        assert len(report["reads"]) == len(es.outputs) == 2  # hidden_states[-2] and the pooled text_embeds
    assert torch.isfinite(generate(pipe)).all()


def _view_with(pipe, es, texts, encoder):
    tok = es.calibration_tokenizer(pipe)
    enc = tok(texts, padding=es.padding, max_length=es.max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = encoder(enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    sel = es.select()(out)
    return (sel if isinstance(sel, tuple) else (sel,)), enc["attention_mask"]


@pytest.mark.skipif(HAS_SEARCH, reason="only meaningful without skrr_compile.blocksearch")
def test_prune_pipeline_without_search_says_so():  # pragma: no cover - depends on the build
    from skrr_compile.deploy.pipelines.prune import prune_pipeline

    with pytest.raises(ImportError, match="apply_to_pipeline"):
        prune_pipeline(_pipe("sd"), ["a cat"], sparsity=0.2)


# --- bad input -------------------------------------------------------------------------------------
def test_unknown_pipeline_class_lists_supported():
    from diffusers import DiffusionPipeline

    class MyPipeline(DiffusionPipeline):
        def __init__(self, text_encoder, tokenizer):
            super().__init__()
            self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)

    pipe = _pipe("sd")
    custom = MyPipeline(pipe.text_encoder, pipe.tokenizer)
    with pytest.raises(UnsupportedPipelineError) as e:
        describe_pipeline(custom)
    msg = str(e.value)
    assert "MyPipeline" in msg and all(name in msg for name in ("PixArtSigmaPipeline", "StableDiffusion3Pipeline", "FluxPipeline"))
    with pytest.raises(UnsupportedPipelineError):
        apply_to_pipeline(custom, {"text_encoder": PLAN})
    assert len(SUPPORTED_PIPELINES) >= 6


def test_pipeline_without_text_encoder():
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=2)
    with pytest.raises(NoTextEncoderError, match="no text encoder"):
        describe_pipeline(DDPMPipeline(unet=unet, scheduler=DDIMScheduler()))
    pixart = _pipe("pixart_alpha")
    pixart.register_modules(text_encoder=None)  # used with precomputed embeddings
    with pytest.raises(NoTextEncoderError, match="text_encoder"):
        apply_to_pipeline(pixart, {"text_encoder": PLAN})


def test_bad_plans_leave_the_pipeline_unchanged(tmp_path):
    pipe = _pipe("sdxl")
    enc1, enc2 = pipe.text_encoder, pipe.text_encoder_2
    with pytest.raises(ValueError, match="text_encoder_3"):
        apply_to_pipeline(pipe, {"text_encoder_3": PLAN})
    with pytest.raises(ValueError, match="no plans"):
        apply_to_pipeline(pipe, {})
    with pytest.raises(skrr.PlanError):
        apply_to_pipeline(pipe, {"text_encoder_2": skrr.Plan(skip=[1, 40]), "text_encoder": PLAN})
    assert pipe.text_encoder is enc1 and pipe.text_encoder_2 is enc2
    with pytest.raises(NotAPrunedModelError):
        load_into(pipe, tmp_path)


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_inspect_and_prune_with_plans(tmp_path, capsys):
    pipe = _pipe("sd")
    pipe.save_pretrained(tmp_path / "sd")
    assert cli.main(["inspect-pipeline", str(tmp_path / "sd")]) == 0
    out = capsys.readouterr().out
    assert "StableDiffusionPipeline (sd)" in out and "last_hidden_state -> identity" in out
    PLAN.save(tmp_path / "plan.json")
    (tmp_path / "plans.json").write_text(json.dumps({"text_encoder": "plan.json"}))
    code = cli.main(["prune-pipeline", str(tmp_path / "sd"), "--plans", str(tmp_path / "plans.json"),
                     "--out", str(tmp_path / "out")])
    assert code == 0
    assert "text_encoder:" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["text_encoder"] == ["skrr_compile", "PrunedTextEncoder"]
    fresh = _pipe("sd")  # a dense pipeline + the pruned encoders of a saved pipeline directory
    assert load_into(fresh, tmp_path / "out") == ["text_encoder"]
    assert isinstance(fresh.text_encoder, PrunedTextEncoder) and fresh.text_encoder.plan.skip == (1, 2)
    reference = _pipe("sd")  # without a trace: the loaded encoder must differ from the dense one
    assert not torch.allclose(generate(fresh), generate(reference), atol=1e-4)
    # errors: not a pipeline directory, non-empty output, neither plans nor a search
    assert cli.main(["prune-pipeline", str(tmp_path), "--plans", str(tmp_path / "plans.json"),
                     "--out", str(tmp_path / "o2")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert cli.main(["prune-pipeline", str(tmp_path / "sd"), "--plans", str(tmp_path / "plans.json"),
                     "--out", str(tmp_path / "out")]) == 2
    assert cli.main(["prune-pipeline", str(tmp_path / "sd"), "--out", str(tmp_path / "o3")]) == 2
    assert "--prompts and --sparsity" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_SEARCH, reason="skrr_compile.blocksearch (issue 3) is not in this build")
def test_cli_prune_pipeline_search(tmp_path, capsys):
    pipe = _pipe("sd")
    pipe.save_pretrained(tmp_path / "sd")
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in T5_PROMPT_CORPUS[:3]))
    code = cli.main(["prune-pipeline", str(tmp_path / "sd"), "--prompts", str(tmp_path / "calib.jsonl"),
                     "--sparsity", "0.2", "--out", str(tmp_path / "out"), "--quiet", "--beam", "1"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "skrr_pipeline.json").read_text())
    assert summary["pruned"]["text_encoder"]["sparsity"] >= 0.2
    assert summary["reports"]["text_encoder"]["reads"] == ["last_hidden_state -> identity"]


def test_saved_pipeline_files_follow_the_umask(tmp_path):
    import os
    import stat

    pipe = FACTORIES["pixart_alpha"]() if "pixart_alpha" in FACTORIES else FACTORIES[sorted(FACTORIES)[0]]()
    enc = next(n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None)
    skrr.apply_to_pipeline(pipe, {enc: skrr.Plan(skip=[1])})
    old = os.umask(0o027)
    try:
        save_pipeline(pipe, tmp_path / "p")
    finally:
        os.umask(old)
    paths = [tmp_path / "p", *(tmp_path / "p").rglob("*")]
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths
             if stat.S_IMODE(p.stat().st_mode) != (0o750 if p.is_dir() else 0o640)}
    assert not wrong
    assert any(p.name.endswith(".safetensors") for p in paths)


def test_cli_prune_pipeline_heals_as_the_api_does_and_the_saved_pipeline_carries_the_maps(tmp_path, capsys):
    from skrr_compile.deploy.pipelines.prune import prune_pipeline

    prompts = T5_PROMPT_CORPUS[:6]
    (tmp_path / "calib.txt").write_text("\n".join(prompts) + "\n")
    _pipe("sd").save_pretrained(tmp_path / "sd")
    assert cli.main(["prune-pipeline", str(tmp_path / "sd"), "--prompts", str(tmp_path / "calib.txt"),
                     "--sparsity", "0.3", "--heal", "lstsq", "--candidate-batch", "2", "--quiet",
                     "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    api, plain = _pipe("sd"), _pipe("sd")
    healed = prune_pipeline(api, prompts, sparsity=0.3, progress=False, heal="lstsq")
    prune_pipeline(plain, prompts, sparsity=0.3, progress=False)
    heal = healed.reports["text_encoder"]["heal"]  # the search healed its plan, and lowered D
    assert heal["healed_runs"] >= 1 and heal["discrepancy_after"] < heal["discrepancy_before"]
    fresh = _pipe("sd")
    assert load_into(fresh, tmp_path / "out") == ["text_encoder"]
    assert fresh.text_encoder.plan.skip == api.text_encoder.plan.skip
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        got = fresh.text_encoder(ids).last_hidden_state
        want = api.text_encoder(ids).last_hidden_state
        unhealed = plain.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, unhealed)  # the maps are in the saved weights
