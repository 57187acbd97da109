"""Tiny random diffusers pipelines of every family skrr-compile supports, built offline from configs.

Each factory returns a pipeline whose text encoders are real HF classes (T5, CLIP, CLIP with projection)
with a few thousand parameters, real tokenizers (a sentencepiece model trained here for T5, a byte-level
BPE vocabulary for CLIP), and consumers sized so that every encoder output reaches the denoiser:
  PixArt-Alpha/Sigma  T5 (d 32)                          -> transformer.caption_projection (32 -> 24)
  SD 1.x/2.x          CLIP (hidden 32)                   -> unet cross-attention (identity)
  SDXL                CLIP (32) + CLIP-proj (32, pooled) -> unet (64 channels) + add_embedding (pooled)
  SD3                 CLIP-L (16) + CLIP-G (24) + T5 (48) -> context_embedder (48 -> 32) + time_text_embed (40)
  FLUX                CLIP (pooled 32) + T5 (32)          -> time_text_embed (32) + context_embedder (32)
All weights are drawn from one seeded generator, so a factory builds the same pipeline every time.
"""

from __future__ import annotations

import functools
import os
import tempfile

import torch

T5_PROMPT_CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of fruit on a wooden table, oil painting",
    "the quick brown fox jumps over the lazy dog",
    "mountains at sunset with a lake and a small boat",
    "a city street at night in the rain with neon lights",
    "a portrait of an old man with a white beard",
    "two dogs playing in the snow",
]
GEN_KWARGS = {"num_inference_steps": 2, "height": 16, "width": 16, "guidance_scale": 2.0}
T5_MAX_SEQUENCE = 16  # max_sequence_length used when the pipelines run in tests


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte mapped to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=1)
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for a, b in [("t", "h"), ("th", "e</w>"), ("o", "n</w>"), ("i", "n"), ("a", "t</w>"), ("c", "at</w>"), ("a", "n</w>")]:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    tok.model_max_length = 77
    return tok


@functools.lru_cache(maxsize=1)
def _t5_tokenizer_dir() -> str:
    import sentencepiece as spm

    d = tempfile.mkdtemp(prefix="skrr_t5_tok_")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_PROMPT_CORPUS * 8),
        model_prefix=os.path.join(d, "spiece"),
        vocab_size=64,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return d


def t5_tokenizer():
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(_t5_tokenizer_dir())


def _randomize(*modules: torch.nn.Module, seed: int) -> None:
    """Redraw every weight (fresh HF inits leave norms at exactly 1, which ONNX/compilers may fold away)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                norm_weight = p.dim() == 1 and name.endswith("weight")
                std = 0.1 if norm_weight else min(0.2, 1.5 / p.shape[-1] ** 0.5)  # wide layers: smaller
                p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if norm_weight else 0.0))


def t5_encoder(d_model: int = 32, layers: int = 2, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    tok_len = len(t5_tokenizer())
    cfg = T5Config(
        vocab_size=max(160, tok_len), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    model = T5EncoderModel(cfg).eval()
    _randomize(model, seed=seed)
    return model


def clip_encoder(hidden: int = 32, layers: int = 2, projection: int | None = None, seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = _clip_vocab()
    cfg = CLIPTextConfig(
        vocab_size=len(vocab) + 2, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or hidden,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], hidden_act="gelu",
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = cls(cfg).eval()
    _randomize(model, seed=seed)
    return model


def _tiny_vae(latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    kwargs = dict(
        in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=2, sample_size=16,
    )
    if flow:
        kwargs.update(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(7)
    return AutoencoderKL(**kwargs).eval()


def make_pixart(sigma: bool = False):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(3)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    _randomize(transformer.caption_projection, seed=4)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return cls(
        tokenizer=t5_tokenizer(), text_encoder=t5_encoder(32), vae=_tiny_vae(), transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def make_sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=4,
    ).eval()
    return StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=clip_encoder(32), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def make_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(6)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=32 + 6 * 8, cross_attention_dim=32 + 32, norm_num_groups=2,
    ).eval()
    _randomize(unet.add_embedding, seed=8)
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=clip_encoder(32, seed=11), text_encoder_2=clip_encoder(32, projection=32, seed=12),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler(),
        force_zeros_for_empty_prompt=False,
    )


def make_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(9)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=48, pooled_projection_dim=16 + 24, out_channels=4,
    ).eval()
    _randomize(transformer.context_embedder, transformer.time_text_embed, seed=10)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(flow=True),
        text_encoder=clip_encoder(16, projection=16, seed=21), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(24, projection=24, seed=22), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(48, seed=23), tokenizer_3=t5_tokenizer(),
    )


def make_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(13)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()
    _randomize(transformer.context_embedder, transformer.time_text_embed, seed=14)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(latent_channels=1, flow=True),
        text_encoder=clip_encoder(32, seed=31), tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(32, seed=32),
        tokenizer_2=t5_tokenizer(), transformer=transformer,
    )


FACTORIES = {
    "pixart_alpha": make_pixart,
    "pixart_sigma": functools.partial(make_pixart, sigma=True),
    "sd": make_sd,
    "sdxl": make_sdxl,
    "sd3": make_sd3,
    "flux": make_flux,
}


def generate(pipe, prompt: str = "a photo of a cat", seed: int = 0) -> torch.Tensor:
    """Two denoising steps from a fixed seed; returns the final latents."""
    kwargs = dict(GEN_KWARGS)
    name = type(pipe).__name__
    if "PixArt" in name:
        kwargs.update(use_resolution_binning=False, max_sequence_length=T5_MAX_SEQUENCE)
    if name.startswith(("StableDiffusion3", "Flux")):
        kwargs.update(max_sequence_length=T5_MAX_SEQUENCE)
    with torch.no_grad():
        out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs)
    return out.images


# ---------------------------------------------------------------------------------------------------
# LLM-encoder pipelines (issue 12): a word-level tokenizer that adds <bos> like Gemma's
# ---------------------------------------------------------------------------------------------------
def llm_tokenizer(bos: bool = True):
    """A fast word-level tokenizer over the prompt corpus (+ instruction words); adds <bos> when `bos`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in T5_PROMPT_CORPUS for w in p.replace(",", " ,").split()})
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + words + [":", ".", "\n", "user", "prompt"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  bos_token="<bos>" if bos else None)
    tok.model_max_length = 512
    return tok


def gemma2_encoder(hidden: int = 16, layers: int = 3, seed: int = 41):
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(
        vocab_size=len(llm_tokenizer()) + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256, sliding_window=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma2Model(cfg).eval()
    _randomize(model, seed=seed)
    return model


SANA_INSTRUCTION = ["Given a user prompt , write a photo :", "user prompt :"]  # the pipeline's list, tiny


def make_sana():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(43)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
        sample_size=8,
    ).eval()
    _randomize(transformer.caption_projection, seed=44)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    return SanaPipeline(
        tokenizer=llm_tokenizer(), text_encoder=gemma2_encoder(), vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


LLM_MAX_SEQUENCE = 12  # max_sequence_length the LLM-encoder pipelines run with in tests


def generate_llm(pipe, prompt: str = "a photo of a cat", seed: int = 0) -> torch.Tensor:
    """Two steps at 16x16 (Sana, Z-Image: 32x32; Wan: 5 frames) from a fixed seed; returns the latents."""
    kwargs = dict(GEN_KWARGS)
    name = type(pipe).__name__
    if name.startswith("Sana"):
        kwargs.update(use_resolution_binning=False, max_sequence_length=LLM_MAX_SEQUENCE, height=32, width=32,
                      complex_human_instruction=SANA_INSTRUCTION)
    if name.startswith("Lumina2"):
        kwargs.update(max_sequence_length=LUMINA2_MAX_SEQUENCE, system_prompt=LUMINA2_SYSTEM)
    if name.startswith(("Chroma", "AuraFlow")):
        kwargs.update(max_sequence_length=T5_MAX_SEQUENCE)
    if name.startswith("ZImage"):
        kwargs.update(max_sequence_length=ZIMAGE_MAX_SEQUENCE, height=32, width=32)
    if name.startswith("Flux2"):
        kwargs.update(max_sequence_length=FLUX2_MAX_SEQUENCE, text_encoder_out_layers=KLEIN_LAYERS)
    if name.startswith("QwenImage"):
        kwargs.update(max_sequence_length=QWENIMAGE_MAX_SEQUENCE)
    if name.startswith("HiDream"):
        kwargs.update(max_sequence_length=T5_MAX_SEQUENCE)
    if name.startswith("Wan"):  # a short video: 5 frames -> 2 latent frames
        kwargs.update(max_sequence_length=T5_MAX_SEQUENCE, num_frames=5)
    with torch.no_grad():
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs)
    return out.frames if name.startswith("Wan") else out.images


LUMINA2_SYSTEM = "user prompt : a photo"  # Lumina 2's system_prompt, tiny
LUMINA2_MAX_SEQUENCE = 20  # counts the system prompt too


def make_lumina2():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(45)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=1, num_refiner_layers=1,
        num_attention_heads=1, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(64, 32, 32), cap_feat_dim=16,
    ).eval()
    _randomize(transformer.time_caption_embed.caption_embedder, seed=46)
    return Lumina2Pipeline(
        transformer=transformer, vae=_tiny_vae(latent_channels=4), scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=gemma2_encoder(seed=47), tokenizer=llm_tokenizer(),
    )


LLM_FACTORIES = {"sana": make_sana, "lumina2": make_lumina2}  # kept out of FACTORIES (tests/test_pipelines.py)


QWEN_CHAT_TEMPLATE = (  # Qwen3's chat template, reduced to what Z-Image renders (one user turn + generation prompt)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer():
    """The word-level tokenizer without <bos> (as Qwen's), with Qwen's chat markers and a chat template."""
    tok = llm_tokenizer(bos=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.add_tokens(["assistant"])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def qwen3_encoder(hidden: int = 16, layers: int = 3, seed: int = 51, lm: bool = False):
    """A Qwen3Model (Z-Image), or with `lm` a Qwen3ForCausalLM (FLUX.2 Klein)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    cfg = Qwen3Config(
        vocab_size=len(qwen_tokenizer()) + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = (Qwen3ForCausalLM if lm else Qwen3Model)(cfg).eval()
    _randomize(model, seed=seed)
    return model


ZIMAGE_MAX_SEQUENCE = 24  # counts the chat template too


def make_zimage():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(53)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 2, 2], axes_lens=[64, 32, 32],
    ).eval()
    _randomize(transformer.cap_embedder, seed=54)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(latent_channels=4), text_encoder=qwen3_encoder(),
        tokenizer=qwen_tokenizer(), transformer=transformer,
    )


LLM_FACTORIES["zimage"] = make_zimage


def make_chroma():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(61)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()
    _randomize(transformer.context_embedder, seed=62)
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(latent_channels=1, flow=True),
        text_encoder=t5_encoder(32, seed=63), tokenizer=t5_tokenizer(), transformer=transformer,
    )


LLM_FACTORIES["chroma"] = make_chroma


def umt5_encoder(d_model: int = 32, layers: int = 2, seed: int = 71):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=max(160, len(t5_tokenizer())), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    model = UMT5EncoderModel(cfg).eval()
    _randomize(model, seed=seed)
    return model


def make_auraflow():
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(73)
    transformer = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64,
    ).eval()
    _randomize(transformer.context_embedder, seed=74)
    return AuraFlowPipeline(
        tokenizer=t5_tokenizer(), text_encoder=umt5_encoder(), vae=_tiny_vae(latent_channels=4),
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )


LLM_FACTORIES["auraflow"] = make_auraflow


def make_wan():
    """Wan 2.1 text-to-video: UMT5 (d 32) -> condition_embedder.text_embedder (32 -> 24); a 3-D VAE."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(81)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    _randomize(transformer.condition_embedder.text_embedder, seed=82)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    return WanPipeline(tokenizer=t5_tokenizer(), text_encoder=umt5_encoder(seed=83), vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


LLM_FACTORIES["wan"] = make_wan


def llama_lm(hidden: int = 16, layers: int = 3, seed: int = 91):
    """A LlamaForCausalLM (HiDream's text_encoder_4 class) over llm_tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(llm_tokenizer()) + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=2, eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model, seed=seed)
    return model


HIDREAM_LLAMA_LAYERS = (0, 2, 2)  # transformer.config.llama_layers: hidden_states[1:][k] per block, one repeated


def make_hidream():
    """HiDream: CLIP-L (16) + CLIP-G (24) pooled -> p_embedder; T5 (32) and Llama (16, layers 1, 3, 3) -> one
    caption projection each."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
    )

    torch.manual_seed(93)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[32, 16], text_emb_dim=16 + 24, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=HIDREAM_LLAMA_LAYERS,
    ).eval()
    _randomize(transformer.caption_projection, transformer.p_embedder, seed=94)
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(latent_channels=4),
        text_encoder=clip_encoder(16, projection=16, seed=95), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(24, projection=24, seed=96), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(32, seed=97), tokenizer_3=t5_tokenizer(),
        text_encoder_4=llama_lm(), tokenizer_4=llm_tokenizer(), transformer=transformer,
    )
    pipe.default_sample_size = 16  # HiDream rescales every request to this area (default 128 x 128 latents)
    return pipe


LLM_FACTORIES["hidream"] = make_hidream


def _flux2_transformer(joint_attention_dim: int, guidance_embeds: bool, seed: int):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    ).eval()
    _randomize(transformer.context_embedder, seed=seed + 1)
    return transformer


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(7)
    return AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


KLEIN_LAYERS = (1, 3)  # text_encoder_out_layers in tests (the pipeline's default (9, 18, 27) needs 27 layers)
FLUX2_MAX_SEQUENCE = 24  # counts the chat template too


def make_flux2klein():
    """FLUX.2 Klein: Qwen3ForCausalLM (16, 3 layers), layers 1 and 3 concatenated -> context_embedder (32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux2_vae(), tokenizer=qwen_tokenizer(),
        text_encoder=qwen3_encoder(seed=101, lm=True),
        transformer=_flux2_transformer(16 * len(KLEIN_LAYERS), guidance_embeds=False, seed=102),
    )


LLM_FACTORIES["flux2klein"] = make_flux2klein


def qwen25vl_encoder(hidden: int = 16, layers: int = 3, seed: int = 111):
    """A Qwen2_5_VLForConditionalGeneration (Qwen-Image's encoder) with a one-block vision tower it never runs."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = len(qwen_tokenizer()) + 4
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=0,
        ),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=hidden, intermediate_size=32, num_heads=2,
                           fullatt_block_indexes=[0]),
        vocab_size=vocab, image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    _randomize(model, seed=seed)
    return model


QWENIMAGE_MAX_SEQUENCE = 12  # prompt tokens the denoiser reads (after the dropped system prefix)


def make_qwenimage():
    """Qwen-Image: Qwen2.5-VL (16) behind its template, the system prefix dropped -> txt_norm -> txt_in (24)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(113)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=3,
        joint_attention_dim=16, axes_dims_rope=(4, 2, 2),
    ).eval()
    _randomize(transformer.txt_norm, transformer.txt_in, seed=114)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=qwen25vl_encoder(),
                             tokenizer=qwen_tokenizer(), transformer=transformer)
    # the pipeline drops the 34 tokens before the prompt under Qwen's tokenizer (system turn, user header); here the
    # same text's count under the tiny tokenizer
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(pipe.prompt_template_encode.split("{}")[0]).input_ids)
    return pipe


LLM_FACTORIES["qwenimage"] = make_qwenimage


MISTRAL_CHAT_TEMPLATE = (  # Mistral Small 3.1's template reduced to text turns: it renders the BOS itself
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}"
    "[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}[/INST]{% endif %}{% endfor %}"
)


def mistral_tokenizer():
    """The word-level tokenizer that adds <bos> (as Mistral's), with Mistral's turn markers and chat template."""
    tok = llm_tokenizer(bos=True)
    tok.add_special_tokens({"additional_special_tokens": ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]})
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def mistral3_encoder(hidden: int = 16, layers: int = 3, seed: int = 121):
    """A Mistral3ForConditionalGeneration (FLUX.2's encoder) with a one-layer Pixtral tower it never runs."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    vocab = len(mistral_tokenizer()) + 4
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=16, patch_size=4),
        image_token_index=vocab - 1, spatial_merge_size=1,
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(cfg).eval()
    _randomize(model, seed=seed)
    return model


def text_processor(tokenizer):
    """A processor around `tokenizer` (FLUX.2's tokenizer is a PixtralProcessor, whose text path this is; the
    real one needs torchvision): its chat template renders, its tokenizer tokenizes."""
    from transformers import ProcessorMixin

    class TextProcessor(ProcessorMixin):
        attributes = ["tokenizer"]
        tokenizer_class = "AutoTokenizer"

        def __init__(self, tokenizer, chat_template=None):
            super().__init__(tokenizer, chat_template=chat_template)

        def __call__(self, images=None, text=None, **kwargs):  # PixtralProcessor's order: images first
            return self.tokenizer(text, **kwargs)

    return TextProcessor(tokenizer, chat_template=tokenizer.chat_template)


FLUX2_SYSTEM = "user prompt : a photo"  # Flux2Pipeline.system_message, tiny


def make_flux2():
    """FLUX.2: Mistral 3 (16, 3 layers) behind the system message, layers 1 and 3 -> context_embedder (32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux2_vae(), tokenizer=mistral_tokenizer(),
        text_encoder=mistral3_encoder(), transformer=_flux2_transformer(16 * len(KLEIN_LAYERS), guidance_embeds=True,
                                                                        seed=122),
    )
    pipe.system_message = FLUX2_SYSTEM
    return pipe


LLM_FACTORIES["flux2"] = make_flux2
