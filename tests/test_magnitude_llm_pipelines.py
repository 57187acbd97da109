"""`skrr-compile magnitude` on pipelines whose text encoder is an LLM (issue 23 item 5), checked against the
pipeline's own encode_prompt: Wanda calibrates on the token ids the pipeline feeds (template applied, dropped
tokens left out of the norms), only the Linear layers upstream of the hidden state it reads are pruned (not the
last decoder layer under hidden_states[-2], never an LM head or a vision tower), and the sparsity counts the
text model the pipeline runs.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

from pipeline_factories import QWENIMAGE_MAX_SEQUENCE, T5_PROMPT_CORPUS, make_lumina2, make_qwenimage  # noqa: E402

LUMINA2_LENGTH = 48  # max_sequence_length, the pipeline's own (long) system prompt included


def _lumina2_encode(pipe, prompt):
    embeds, mask, *_ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=LUMINA2_LENGTH)
    return embeds


def _qwenimage_encode(pipe, prompt):
    return pipe.encode_prompt(prompt, device="cpu", max_sequence_length=QWENIMAGE_MAX_SEQUENCE)[0]


# family: (factory, the text model inside the component, CLI flags, encode, tokens the pipeline drops,
#          decoder layers whose output reaches what it reads)
FAMILIES = {
    # Gemma-2 (3 layers), hidden_states[-2] behind the system prompt: layer 2 and the final norm are never read
    "lumina2": (make_lumina2, "", ["--max-length", str(LUMINA2_LENGTH)], _lumina2_encode, lambda p: 0, (0, 1)),
    # Qwen2.5-VL: its language model's hidden_states[-1] (every layer), template prefix dropped; LM head and
    # vision tower never run
    "qwenimage": (make_qwenimage, "model.language_model", [], _qwenimage_encode,
                  lambda p: int(p.prompt_template_encode_start_idx), (0, 1, 2)),
}


def _linear_weights(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}.weight": m.weight for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def _unique_params(module) -> int:
    return sum(p.numel() for p in {p.data_ptr(): p for p in module.parameters()}.values())


def _pipeline_feed(pipe, encode, prompts, drop: int, linears: dict[str, torch.nn.Linear]):
    """What the pipeline's own encode_prompt feeds its text encoder for each prompt: (ids of the mask tokens,
    ids of the tokens that reach the denoiser), and the squared input sums of `linears` over those tokens."""
    fed, sums, read = [], {}, []

    def component_hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        mask = kwargs["attention_mask"].bool()
        keep = mask & (mask.long().cumsum(-1) > drop)  # the first `drop` mask tokens never reach the denoiser
        fed.append((ids[mask].tolist(), ids[keep].tolist()))
        read[:] = [keep]

    def linear_hook(name):
        def hook(module, args):
            x = args[0][read[0]].double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
        return hook

    handles = [pipe.text_encoder.register_forward_pre_hook(component_hook, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(linear_hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for prompt in prompts:
                encode(pipe, prompt)
    finally:
        for h in handles:
            h.remove()
    return fed, sums


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_magnitude_wanda_on_an_llm_pipeline_prunes_what_it_reads(family, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    import skrr_compile.magnitude.prune as prune_module
    from skrr_compile.cli.main import main
    from skrr_compile.magnitude import wanda
    from skrr_compile.magnitude.masks import rowwise_mask
    from skrr_compile.magnitude.storage import load_pruned

    make, inner, flags, encode, drop_of, read_layers = FAMILIES[family]
    made = make()
    made.save_pretrained(tmp_path / "pipe")
    if family == "qwenimage":  # the tiny tokenizer's prefix length (34 under Qwen's), which __init__ sets again
        init, start = type(made).__init__, made.prompt_template_encode_start_idx

        @functools.wraps(init)  # diffusers reads the components off the signature
        def tiny_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.prompt_template_encode_start_idx = start

        monkeypatch.setattr(type(made), "__init__", tiny_init)
    dense = DiffusionPipeline.from_pretrained(tmp_path / "pipe")  # the pipeline as the CLI loads it
    component = dense.text_encoder
    text = component.get_submodule(inner) if inner else component
    prefix = f"{inner}." if inner else ""
    prompts = T5_PROMPT_CORPUS[:3]
    (tmp_path / "calib.txt").write_text("\n".join(prompts) + "\n")

    seen = []  # what Wanda's calibration fed the text model: (input ids, mask, tokens counted)
    real_norms = prune_module.input_norms

    def recording_norms(model, layers, calibration, *a, **k):
        def hook(module, args, kwargs):
            seen.append((args[0], kwargs["attention_mask"], wanda._TOKEN_MASK[-1]))

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return real_norms(model, layers, calibration, *a, **k)
        finally:
            handle.remove()

    monkeypatch.setattr(prune_module, "input_norms", recording_norms)
    out = tmp_path / "out"
    assert main(["magnitude", str(tmp_path / "pipe"), "--target", "text_encoder=0.5", "--criterion", "wanda",
                 "--calib-prompts", str(tmp_path / "calib.txt"), *flags, "--out", str(out), "--json"]) == 0

    # Wanda's inputs are the pipeline's own token ids (template applied), its norms over the tokens it reads
    all_linears = {n: m for n, m in text.named_modules() if isinstance(m, torch.nn.Linear)}
    fed, sums = _pipeline_feed(dense, encode, prompts, drop_of(dense), all_linears)
    assert seen, "Wanda never ran the text model"
    ours = [(ids[m.bool()].tolist(), ids[counted].tolist())
            for ids_b, mask_b, counted_b in seen for ids, m, counted in zip(ids_b, mask_b, counted_b)]
    assert ours == fed
    if drop_of(dense):
        assert all(len(masked) - len(read) == drop_of(dense) for masked, read in fed)

    # exactly the Linear layers upstream of the hidden state read are pruned; every other tensor is bit-identical
    pruned = load_pruned(out)
    after = dict(pruned.text_encoder.named_parameters())
    before = dict(component.named_parameters())
    assert after.keys() == before.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {n for n in _linear_weights(text, prefix)
                if any(n.startswith(f"{prefix}layers.{i}.") for i in read_layers)}
    assert changed == expected
    unread = set(_linear_weights(text, prefix)) - expected
    assert (len(unread) > 0) == (family == "lumina2")
    for n in changed:  # zeros where Wanda's row-wise scores over the pipeline's tokens are smallest, else dense
        w = before[n]
        scores = w.abs().double() * sums[n[len(prefix):].removesuffix(".weight")].sqrt().view(1, -1)
        assert torch.equal(after[n] == 0, rowwise_mask(scores, 0.5))
        assert torch.equal(torch.where(after[n] == 0, torch.zeros_like(w), w), after[n])

    # the sparsity counts the text model the pipeline runs: zeros in the pruned layers over its parameters
    summary = json.loads((out / "skrr_magnitude.json").read_text())["components"]["text_encoder"]
    zeros = sum(int((after[n] == 0).sum()) for n in changed)
    assert all(int((p == 0).sum()) == 0 for p in text.parameters())  # the dense text model holds no zero
    params, linear = _unique_params(text), sum(w.numel() for w in _linear_weights(text, "").values())
    sp = summary["sparsity"]
    assert sp["sparsity_all_params"] == pytest.approx(zeros / params, rel=1e-12)
    assert sp["sparsity_linear"] == pytest.approx(zeros / linear, rel=1e-12)
    assert sp["linear_params"] + sp["other_params"] == params
    whole = _unique_params(component)
    assert summary["text_model"] == type(text).__name__ and summary["text_model_params"] == params
    assert summary["component_params"] == whole and summary["unused_params"] == whole - params
    assert (whole > params) == (family == "qwenimage")  # Qwen-Image's LM head and vision tower: left as they are
    assert sorted(summary["unread_layers"]) == sorted(n[len(prefix):] for n in unread)
    assert summary["layers_pruned"] == len(expected) and summary["config"]["exclude"] == []
    assert summary["calibration"]["prompts"] == len(prompts) and summary["calibration"]["drop_tokens"] == drop_of(dense)

    # encode_prompt differs from dense only through the pruned layers
    prompt = "two dogs playing in the snow with a red boat at night"
    with torch.no_grad():
        ref, got = encode(dense, prompt), encode(pruned, prompt)
        assert not torch.allclose(ref, got, atol=1e-4)
        for n in changed:
            after[n].copy_(before[n])
        torch.testing.assert_close(encode(pruned, prompt), ref, rtol=0, atol=0)
        for n in unread:  # what the pipeline never reads: zeroing it changes nothing
            after[n].zero_()
        torch.testing.assert_close(encode(pruned, prompt), ref, rtol=0, atol=0)


def test_layers_read_follows_the_data_flow_and_restores_requires_grad():
    """layers_read: the layers the outputs depend on, by the autograd graph (a branch whose output is computed
    but not returned is not read, even though it runs); the weights' requires_grad flags come back as they were."""
    from skrr_compile.magnitude.layers import find_layers, layers_read

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 2)})
    model.b.weight.requires_grad_(False)
    x = torch.randn(3, 4)

    def forward():
        h = model.b(model.a(x))
        model.head(h)  # runs, but its output is not what is read
        return {"hidden": (h,)}

    layers = find_layers(model)
    with torch.no_grad():
        read = layers_read(layers, forward)
    assert [layer.name for layer in read] == ["a.weight", "b.weight"]
    assert [model[n].weight.requires_grad for n in ("a", "b", "head")] == [True, False, True]
