"""Tiny random pipelines for issue 24: the families added with it (CogView4) and variants built from a base.

A variant that shares its base's components is built from the base's tiny pipeline (`variant_of`), so only
the components a variant adds (a ControlNet, an image encoder) are left None: encode_prompt never reads them.
"""

from __future__ import annotations

import inspect

import torch
from pipeline_factories import _randomize, _tiny_vae, llm_tokenizer

COGVIEW4_MAX_SEQUENCE = 20  # the prompt is left-padded to a multiple of 16 with pad tokens the encoder sees


def glm_encoder(hidden: int = 16, layers: int = 3, seed: int = 131):
    """A GlmModel (GLM-4, CogView4's text encoder) over llm_tokenizer's vocabulary."""
    from transformers import GlmConfig, GlmModel

    cfg = GlmConfig(
        vocab_size=len(llm_tokenizer()) + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = GlmModel(cfg).eval()
    _randomize(model, seed=seed)
    return model


def make_cogview4():
    """CogView4: GLM (16, 3 layers) hidden_states[-2] -> transformer.patch_embed.text_proj (16 -> 16)."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(133)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(4, 4),
    ).eval()
    _randomize(transformer.patch_embed, seed=134)
    tokenizer = llm_tokenizer()
    tokenizer.padding_side = "left"  # GLM-4's tokenizer pads on the left
    return CogView4Pipeline(tokenizer=tokenizer, text_encoder=glm_encoder(), vae=_tiny_vae(latent_channels=4),
                            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())


def variant_of(cls, base):
    """`cls(**base.components)`, the components `cls` takes and the base lacks passed as None."""
    params = inspect.signature(cls.__init__).parameters
    components = dict(base.components)
    kwargs = {}
    for name, p in list(params.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in components:
            kwargs[name] = components[name]
        elif p.default is inspect.Parameter.empty:
            kwargs[name] = None
    try:
        pipe = cls(**kwargs)
    except (AttributeError, TypeError):
        # its __init__ derives something from a component left None (ControlNet-XS, Z-Image's ControlNet): the
        # class with the base's components and config, its __init__ skipped
        from diffusers import DiffusionPipeline

        pipe = cls.__new__(cls)
        DiffusionPipeline.__init__(pipe)
        pipe.register_modules(**{k: v for k, v in kwargs.items() if k in components})
        pipe.register_to_config(**{k: v for k, v in base.config.items() if not k.startswith("_") and k not in components})
        pipe.__dict__.update({k: v for k, v in base.__dict__.items() if not k.startswith("_") and k not in pipe.__dict__})
    for attr in ("prompt_template_encode_start_idx", "system_prompt", "system_message", "default_sample_size"):
        if attr in base.__dict__ and attr in pipe.__dict__:
            setattr(pipe, attr, getattr(base, attr))  # tiny-tokenizer values the base factory set
    pipe.set_progress_bar_config(disable=True)
    return pipe
