"""Issue 24: every diffusers pipeline class with a text encoder resolves to a family's spec or is refused.

- every class in diffusers that has a text encoder is either resolved (`resolve_family`) or listed in
  `REFUSED` with its reason, and named in the spec table (specs.py docstring, README);
- every resolved variant, built from its base's tiny pipeline, gets the base's spec and its own encode_prompt
  hands the denoiser exactly what the base's does (the base's spec is checked against encode_prompt, then
  prune / generate / save / load, in tests/test_pipelines.py and tests/test_pipelines_llm.py);
- CogView4 (GLM-4), the family added here: spec against `_get_glm_embeds`, prune, generate, save, load.
"""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from pipeline_factories import (  # noqa: E402
    FLUX2_MAX_SEQUENCE,
    KLEIN_LAYERS,
    LLM_MAX_SEQUENCE,
    LUMINA2_MAX_SEQUENCE,
    QWENIMAGE_MAX_SEQUENCE,
    SANA_INSTRUCTION,
    T5_MAX_SEQUENCE,
    T5_PROMPT_CORPUS,
    ZIMAGE_MAX_SEQUENCE,
    make_chroma,
    make_flux,
    make_flux2klein,
    make_pixart,
    make_qwenimage,
    make_sana,
    make_sd,
    make_sd3,
    make_sdxl,
    make_wan,
    make_zimage,
)
from pipeline_variant_factories import COGVIEW4_MAX_SEQUENCE, make_cogview4, variant_of  # noqa: E402

import skrr_compile as skrr  # noqa: E402
from skrr_compile.deploy.pipelines import specs  # noqa: E402
from skrr_compile.deploy.pipelines.encoder import PrunedTextEncoder, UnsupportedPipelineError  # noqa: E402
from skrr_compile.deploy.pipelines.specs import describe_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a cat"


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    import diffusers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)


@functools.cache
def text_pipeline_classes() -> dict[str, type]:
    """Every DiffusionPipeline class diffusers exports that has a text encoder (a `text_encoder*` component or
    an encode_prompt)."""
    import diffusers
    from diffusers import DiffusionPipeline

    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in dir(diffusers):
            try:
                cls = getattr(diffusers, name)
            except Exception:  # an optional dependency missing: that class is not in this install  # noqa: S112
                continue
            if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)) or cls is DiffusionPipeline:
                continue
            params = specs._init_params(cls)
            if any(p.startswith("text_encoder") for p in params) or hasattr(cls, "encode_prompt"):
                found[name] = cls
    return found


def test_every_pipeline_class_is_resolved_or_refused_with_a_listed_reason():
    classes = text_pipeline_classes()
    assert len(classes) > 200  # diffusers 0.42
    resolved = {n: specs.resolve_family(c) for n, c in classes.items()}
    supported = sorted(n for n, f in resolved.items() if f)
    refused = sorted(n for n, f in resolved.items() if not f)
    unlisted = [n for n in refused if n not in specs.REFUSED]
    assert not unlisted, f"neither resolved nor refused with a reason in specs.REFUSED: {unlisted}"
    both = [n for n in supported if n in specs.REFUSED]
    assert not both, f"resolved, yet listed as refused: {both}"
    stale = sorted(set(specs.REFUSED) - set(classes))
    assert not stale, f"listed as refused but not in this diffusers: {stale}"
    for key in set(specs.REFUSED.values()):
        assert specs.refusal_reason(key)
    # the spec table (specs.py docstring, README) names every class, supported or refused
    readme = (ROOT / "README.md").read_text()
    for where, text in (("specs.py docstring", specs.__doc__), ("README.md", readme)):
        missing = [n for n in classes if n not in text]
        assert not missing, f"{where} does not list {missing}"
    for family, (bases, _) in specs.FAMILY_BASES.items():
        assert all(resolved[b] == family for b in bases)
    assert len(supported) == 100 and len(refused) == 168, (len(supported), len(refused))  # the counts in the table


# --- variants built from their base's tiny pipeline ------------------------------------------------
FACTORIES = {
    "sd": make_sd, "sdxl": make_sdxl, "sd3": make_sd3, "flux": make_flux, "pixart": functools.partial(make_pixart, sigma=True),
    "sana": make_sana, "zimage": make_zimage, "chroma": make_chroma, "wan": make_wan, "flux2klein": make_flux2klein,
    "qwenimage": make_qwenimage, "cogview4": make_cogview4,
}
LENGTHS = {"sana": LLM_MAX_SEQUENCE, "zimage": ZIMAGE_MAX_SEQUENCE, "flux2klein": FLUX2_MAX_SEQUENCE,
           "qwenimage": QWENIMAGE_MAX_SEQUENCE, "cogview4": COGVIEW4_MAX_SEQUENCE, "lumina2": LUMINA2_MAX_SEQUENCE}
CALL_KWARGS = {"sana": {"complex_human_instruction": SANA_INSTRUCTION},
               "flux2klein": {"text_encoder_out_layers": KLEIN_LAYERS}}


@functools.cache
def _base(family):
    pipe = FACTORIES[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _variants() -> list[tuple[str, str]]:
    bases = {b for names, _ in specs.FAMILY_BASES.values() for b in names}
    return sorted((f, n) for n, c in text_pipeline_classes().items()
                  if (f := specs.resolve_family(c)) is not None and n not in bases)


def _encode(pipe, family):
    """The pipeline's own encode_prompt on PROMPT: no guidance, the test length, every other argument default."""
    params = inspect.signature(pipe.encode_prompt).parameters
    given = {"prompt": PROMPT, "device": "cpu", "do_classifier_free_guidance": False, "num_images_per_prompt": 1,
             "max_sequence_length": LENGTHS.get(family, T5_MAX_SEQUENCE), **CALL_KWARGS.get(family, {})}
    kwargs = {k: v for k, v in given.items() if k in params}
    kwargs.update({k: None for k, p in params.items() if k not in kwargs and p.default is inspect.Parameter.empty
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)})
    with torch.no_grad():
        out = pipe.encode_prompt(**kwargs)
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize(("family", "name"), _variants())
def test_variant_reads_as_its_base(family, name):
    """The variant resolves to its base's family and spec, and its encode_prompt equals the base's on the same
    components (the base's spec equals the base's encode_prompt: tests/test_pipelines*.py)."""
    import diffusers

    if family not in FACTORIES:  # pragma: no cover - every family with variants has a tiny base
        pytest.fail(f"no tiny {family} pipeline to build {name} from")
    base = _base(family)
    variant = variant_of(getattr(diffusers, name), base)
    length = LENGTHS.get(family, T5_MAX_SEQUENCE)
    ours = describe_pipeline(variant, length, **CALL_KWARGS.get(family, {}))
    theirs = describe_pipeline(base, length, **CALL_KWARGS.get(family, {}))
    assert ours.family == family and ours.pipeline == name
    assert {k: v.to_dict() for k, v in ours.encoders.items()} == {k: v.to_dict() for k, v in theirs.encoders.items()}
    for a, b in zip(_encode(variant, family), _encode(base, family), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- refusals and an explicit spec -------------------------------------------------------------------
@pytest.mark.parametrize(("name", "reason"), [
    ("KolorsPipeline", "ChatGLM"), ("FluxPriorReduxPipeline", "no denoiser"), ("QwenImageEditPipeline", "input image"),
    ("Kandinsky5T2IPipeline", "cu_seqlens"), ("HunyuanImagePipeline", "ByT5"), ("CogVideoXPipeline", "differs from"),
])
def test_refused_classes_say_why_and_how_to_pass_a_spec(name, reason):
    import diffusers

    msg = specs.unsupported_message(getattr(diffusers, name))
    assert "\n" not in msg and name in msg and reason in msg
    assert "spec='<family>'" in msg and "--spec" in msg and "flux: FluxPipeline" in msg


def test_explicit_spec_for_a_refused_variant(tmp_path, capsys):
    """ChromaInpaintPipeline re-writes Chroma's encode_prompt (renamed variables): refused by the rule; with
    spec="chroma" (sticks to the object) it reads as Chroma, and its encode_prompt agrees; the CLI's --spec."""
    from diffusers import ChromaInpaintPipeline

    from skrr_compile.cli.main import main

    base = _base("chroma")
    pipe = variant_of(ChromaInpaintPipeline, base)
    with pytest.raises(UnsupportedPipelineError, match="differs from ChromaPipeline's"):
        describe_pipeline(pipe)
    spec = describe_pipeline(pipe, T5_MAX_SEQUENCE, spec="chroma")
    assert spec.family == "chroma" and describe_pipeline(pipe).family == "chroma"  # it sticks
    for a, b in zip(_encode(pipe, "chroma"), _encode(base, "chroma"), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(UnsupportedPipelineError, match="is no family"):
        describe_pipeline(pipe, spec="kolors")
    fresh = variant_of(ChromaInpaintPipeline, base)
    fresh.save_pretrained(tmp_path / "inpaint")
    assert main(["inspect-pipeline", str(tmp_path / "inpaint")]) == 2
    assert "--spec <family>" in capsys.readouterr().err
    assert main(["inspect-pipeline", str(tmp_path / "inpaint"), "--spec", "chroma", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "chroma"


# --- CogView4 (GLM-4): the family added with this issue ------------------------------------------------
def test_cogview4_spec_prune_generate_save_load(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = _base("cogview4")
    spec = describe_pipeline(pipe, COGVIEW4_MAX_SEQUENCE).encoders["text_encoder"]
    assert spec.to_dict()["outputs"] == ["hidden_states[-2] -> transformer.patch_embed.text_proj"]
    assert (spec.pad_multiple, spec.attention_mask, spec.read, spec.hidden_layer) == (16, False, "all", -2)
    assert describe_pipeline(pipe).encoders["text_encoder"].max_length == 1024  # CogView4Pipeline.__call__'s default
    long = " ".join(T5_PROMPT_CORPUS[:3])  # truncated to 20 tokens, left-padded to 32

    def spec_embedding(p, prompt):
        enc = spec.calibration_tokenizer(p)([prompt], padding=spec.padding, max_length=spec.max_length,
                                            truncation=True, return_tensors="pt")
        assert bool(enc.attention_mask.all()) and enc.input_ids.shape[1] % 16 == 0
        with torch.no_grad():
            return spec.select()(p.text_encoder(enc.input_ids, attention_mask=enc.attention_mask,
                                                output_hidden_states=True))

    dense = {}
    for prompt in (PROMPT, long):
        with torch.no_grad():
            embeds = pipe._get_glm_embeds(prompt, COGVIEW4_MAX_SEQUENCE, device="cpu")
        torch.testing.assert_close(spec_embedding(pipe, prompt), embeds, rtol=0, atol=0)
        dense[prompt] = embeds
    assert dense[long].shape[1] == 32

    kwargs = {"num_inference_steps": 2, "height": 16, "width": 16, "guidance_scale": 2.0,
              "max_sequence_length": COGVIEW4_MAX_SEQUENCE, "output_type": "latent"}

    def generate(p):
        with torch.no_grad():
            return p(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images

    dense_latents = generate(pipe)
    pipe = make_cogview4()
    pipe.set_progress_bar_config(disable=True)
    plan = skrr.Plan(skip=[1, 2], reuse={2: 0})
    skrr.apply_to_pipeline(pipe, {"text_encoder": plan})
    assert isinstance(pipe.text_encoder, PrunedTextEncoder)
    reference = skrr.apply(make_cogview4().text_encoder, plan)
    with torch.no_grad():
        ref = spec.select()(reference(torch.tensor([[1, 2, 3]]), output_hidden_states=True))
        got = spec.select()(pipe.text_encoder(torch.tensor([[1, 2, 3]]), output_hidden_states=True))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    latents = generate(pipe)
    assert latents.shape == dense_latents.shape and torch.isfinite(latents).all()
    assert not torch.allclose(latents, dense_latents, atol=1e-4), "pruning had no effect on the generation"
    skrr.save_pipeline(pipe, tmp_path / "pruned")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pruned")  # skrr_compile is imported
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "CogView4Pipeline" and isinstance(loaded.text_encoder, PrunedTextEncoder)
    with torch.no_grad():
        torch.testing.assert_close(loaded._get_glm_embeds(long, COGVIEW4_MAX_SEQUENCE, device="cpu"),
                                   pipe._get_glm_embeds(long, COGVIEW4_MAX_SEQUENCE, device="cpu"), rtol=0, atol=0)
    torch.testing.assert_close(generate(loaded), latents, rtol=1e-5, atol=1e-5)
