"""Tiny random HF encoders of every supported family, and a hand-written reference for each.

The reference does not use the graph passes: a skipped sub-block's branch is forced to output zeros by
a forward hook on the HF module (h + 0 = h; post-LN: LN(h + 0)), and re-use i <- j copies sub-block j's
weights into sub-block i's modules. The parameter names each sub-block owns are listed by hand here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import transformers as tf

VOCAB = 99


def _t5(ff="gated-gelu", layers=3):
    return tf.T5EncoderModel(
        tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=layers, num_heads=4,
                    feed_forward_proj=ff, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    )


def _umt5():
    return tf.UMT5EncoderModel(
        tf.UMT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=3, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    )


def _clip(with_projection=False):
    cfg = tf.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=24,
                            bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=1)
    return tf.CLIPTextModelWithProjection(cfg) if with_projection else tf.CLIPTextModel(cfg)


def _bert():
    return tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=64))


def _qwen2():
    return tf.Qwen2Model(tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def _llama():
    return tf.LlamaModel(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def _gemma2():
    return tf.Gemma2Model(tf.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          max_position_embeddings=128, sliding_window=4))


def _first(out, fn):
    """Apply fn to the first element of a module output (tensor or tuple)."""
    if isinstance(out, tuple):
        return (fn(out[0]),) + tuple(out[1:])
    return fn(out)


@dataclass
class Family:
    name: str
    build: callable
    layers: str  # path of the layer list
    # per kind: (module to silence, relative to the layer; parameter prefixes owned, relative to the layer)
    attn: tuple[str, tuple[str, ...]]
    ffn: tuple[str, tuple[str, ...]]
    shared_bias: bool = False  # T5: layer 0's relative position bias is read by every layer

    def make(self, seed=0):
        torch.manual_seed(seed)
        model = self.build().eval()
        with torch.no_grad():  # untrained norms are all-ones; randomise so every parameter matters
            for name, p in model.named_parameters():
                if "norm" in name.lower() or "LayerNorm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        return model

    def owned(self, model, index: int) -> list[str]:
        layer, kind = divmod(index, 2)
        prefixes = (self.attn if kind == 0 else self.ffn)[1]
        base = f"{self.layers}.{layer}."
        names = [n for n, _ in model.named_parameters() if any(n.startswith(base + p) for p in prefixes)]
        if self.shared_bias:
            names = [n for n in names if "relative_attention_bias" not in n]
        return names

    def reference(self, model, skip, reuse):
        """Hand-patched eager model: silenced branches for skips, copied weights for re-use."""
        ref = copy.deepcopy(model)
        layers = ref.get_submodule(self.layers)
        params = dict(ref.named_parameters())
        for i in skip:
            if i in reuse:
                j = reuse[i]
                li, lj = f"{self.layers}.{i // 2}.", f"{self.layers}.{j // 2}."
                with torch.no_grad():
                    for name in self.owned(model, i):
                        params[name].copy_(params[lj + name[len(li):]])
            else:
                target = (self.attn if i % 2 == 0 else self.ffn)[0]
                module = layers[i // 2].get_submodule(target)
                module.register_forward_hook(lambda m, a, out: _first(out, torch.zeros_like))
        return ref

    def removed_params(self, model, skip) -> int:
        names = {n for i in skip for n in self.owned(model, i)}
        n_layers = len(model.get_submodule(self.layers))
        if self.shared_bias and all(2 * k in skip for k in range(n_layers)):
            names |= {n for n, _ in model.named_parameters() if "relative_attention_bias" in n}
        params = dict(model.named_parameters())
        return sum(params[n].numel() for n in names)


FAMILIES = {
    "t5-gated": Family("t5-gated", lambda: _t5("gated-gelu"), "encoder.block",
                       ("layer.0.SelfAttention.o", ("layer.0.",)), ("layer.1.DenseReluDense", ("layer.1.",)), True),
    "t5-relu": Family("t5-relu", lambda: _t5("relu"), "encoder.block",
                      ("layer.0.SelfAttention.o", ("layer.0.",)), ("layer.1.DenseReluDense", ("layer.1.",)), True),
    "umt5": Family("umt5", _umt5, "encoder.block",
                   ("layer.0.SelfAttention.o", ("layer.0.",)), ("layer.1.DenseReluDense", ("layer.1.",))),
    "clip": Family("clip", _clip, "encoder.layers",
                   ("self_attn", ("layer_norm1.", "self_attn.")), ("mlp", ("layer_norm2.", "mlp."))),
    "clip-proj": Family("clip-proj", lambda: _clip(True), "text_model.encoder.layers",
                        ("self_attn", ("layer_norm1.", "self_attn.")), ("mlp", ("layer_norm2.", "mlp."))),
    "bert": Family("bert", _bert, "encoder.layer",
                   ("attention.output.dense", ("attention.self.", "attention.output.dense.")),
                   ("output.dense", ("intermediate.", "output.dense."))),
    "qwen2": Family("qwen2", _qwen2, "layers",
                    ("self_attn", ("input_layernorm.", "self_attn.")), ("mlp", ("post_attention_layernorm.", "mlp."))),
    "llama": Family("llama", _llama, "layers",
                    ("self_attn", ("input_layernorm.", "self_attn.")), ("mlp", ("post_attention_layernorm.", "mlp."))),
    "gemma2": Family("gemma2", _gemma2, "layers",
                     ("self_attn", ("input_layernorm.", "self_attn.", "post_attention_layernorm.")),
                     ("mlp", ("pre_feedforward_layernorm.", "mlp.", "post_feedforward_layernorm."))),
}


def inputs(batch, seq, seed=0, pad_last=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_last and batch > 1:
        mask[-1, seq // 2 + 1:] = 0  # right padding on the last prompt
    return ids, mask


# LLM encoders of today's T2I pipelines (issue 12); checked in tests/test_llm_encoders.py --------------
def _small(cfg_cls, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return cfg_cls(**base)


def _phi3():
    return tf.Phi3Model(_small(tf.Phi3Config, intermediate_size=36))


def _qwen3():
    return tf.Qwen3Model(_small(tf.Qwen3Config, head_dim=8))


def _gemma3():
    return tf.Gemma3TextModel(_small(tf.Gemma3TextConfig, head_dim=8, sliding_window=4))


def _mistral():
    return tf.MistralModel(_small(tf.MistralConfig, head_dim=8))


_PRE_LN = (("self_attn", ("input_layernorm.", "self_attn.")), ("mlp", ("post_attention_layernorm.", "mlp.")))
_SANDWICH = (("self_attn", ("input_layernorm.", "self_attn.", "post_attention_layernorm.")),
             ("mlp", ("pre_feedforward_layernorm.", "mlp.", "post_feedforward_layernorm.")))
LLM_FAMILIES = {
    "phi3": Family("phi3", _phi3, "layers", *_PRE_LN),
    "qwen3": Family("qwen3", _qwen3, "layers", *_PRE_LN),
    "gemma3_text": Family("gemma3_text", _gemma3, "layers", *_SANDWICH),
    "mistral": Family("mistral", _mistral, "layers", *_PRE_LN),
}


# --- a tiny GGUF file (llama.cpp layout), written with the gguf package -------------------------------------
GGUF_WORDS = ["<pad>", "<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "Ġa", "Ġc", "at", "Ġcat"]


def write_tiny_llama_gguf(path, seed=0, quant="Q8_0"):
    """A tiny Llama encoder as llama.cpp writes it (q/k rows permuted, `blk.N.*` names), its matrices quantized
    to `quant`, with a byte-level BPE tokenizer that adds no BOS. Returns the independent reference: an HF
    LlamaModel holding the dequantized weights (dequantized by the gguf package, not by transformers)."""
    import gguf
    import numpy as np

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tf.LlamaModel(cfg).eval()
    qtype = getattr(gguf.GGMLQuantizationType, quant)

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    tokens = GGUF_WORDS + [f"<extra_{i}>" for i in range(VOCAB - len(GGUF_WORDS))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (VOCAB - 3))
    writer.add_token_merges(["Ġ a", "Ġ c", "a t", "Ġc at"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    dequantized = {}

    def put(name, hf_name, w, quantize=True):
        w = np.ascontiguousarray(w)
        if quantize and w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(w, qtype)
            writer.add_tensor(name, q, raw_dtype=qtype)
            back = gguf.quants.dequantize(q, qtype)
        else:
            writer.add_tensor(name, w)
            back = w
        dequantized[hf_name] = back

    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    put("token_embd.weight", "embed_tokens.weight", sd["embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        put(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", permute(sd[p + "self_attn.q_proj.weight"], nh))
        put(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", permute(sd[p + "self_attn.k_proj.weight"], nkv))
        put(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", "norm.weight", sd["norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def unpermute(w, n_head):  # the dequantized q/k rows back in HF order
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    ref = tf.LlamaModel(cfg).eval()
    state = {}
    for k, v in dequantized.items():
        if k.endswith("q_proj.weight"):
            v = unpermute(v, nh)
        elif k.endswith("k_proj.weight"):
            v = unpermute(v, nkv)
        state[k] = torch.from_numpy(np.ascontiguousarray(v)).float()
    missing = ref.load_state_dict(state, strict=False).missing_keys
    assert not [k for k in missing if "rotary" not in k], missing
    return ref, model
