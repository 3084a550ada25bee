"""Tiny random Gemma 3 models (Gemma3ForCausalLM, Gemma3ForConditionalGeneration): layout and loading, not quality."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import save_tiny

# sliding and global layers, first and last of each kind; the window is short so that most
# positions of a test sequence lie beyond it
LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
WINDOW = 8


def build_tiny_gemma3(out: Path, tokenizer_dir: Path, *, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                      head_dim: int = 32, seed: int = 0, tied: bool = True, **config) -> Path:
    """A random Gemma3ForCausalLM checkpoint in ``out`` with the tokenizer of ``tokenizer_dir``.

    Every weight is drawn, norms too (N(0, 0.3) around Gemma's 1 + w), so a norm written
    without its offset, or in another norm's place, changes the logits. config: further
    Gemma3TextConfig keywords (rope_parameters=..., final_logit_softcapping=30.0, ...).
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    settings = text_settings(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, tied=tied, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**settings))
    _draw(model)
    return save_tiny(model, out, tokenizer_dir)


def text_settings(*, hidden: int = 64, heads: int = 4, kv_heads: int = 2, head_dim: int = 32, tied: bool = True,
                  **config) -> dict:
    """The Gemma3TextConfig keywords of the tiny model."""
    settings = dict(
        vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden + 64, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        layer_types=list(LAYER_TYPES), sliding_window=WINDOW, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    settings.update(config)
    return settings


def _draw(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.2)


# the two layouts of a Gemma3ForConditionalGeneration checkpoint: the one transformers saves, and its
# module names (the text model's tensors under model.language_model, the head at the top)
MODULE_NAMES = ((r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
                (r"^(vision_tower|multi_modal_projector)\.", r"model.\1."))


def build_tiny_gemma3_multimodal(out: Path, tokenizer_dir: Path, *, seed: int = 0, tied: bool = True,
                                 module_names: bool = False, **config) -> Path:
    """A random Gemma3ForConditionalGeneration checkpoint in ``out``, as transformers saves it (or with
    ``module_names``, in the other layout): a one-layer SigLIP vision tower of width 32 and its projector
    around a text model equal to ``build_tiny_gemma3(..., seed=seed, tied=tied, **config)``'s, weight
    for weight. Its config.json's tie_word_embeddings is the top level's, as transformers reads it."""
    import json
    import re

    from safetensors.torch import load_file, save_file
    from transformers import (
        AutoModelForCausalLM,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
    )

    text = text_settings(tied=tied, **config)
    torch.manual_seed(seed)
    twin = AutoModelForCausalLM.from_config(Gemma3TextConfig(**text))
    _draw(twin)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                                                        tie_word_embeddings=tied))
    _draw(model)
    with torch.no_grad():
        model.model.language_model.load_state_dict(twin.model.state_dict())
        model.lm_head.weight.copy_(twin.lm_head.weight)
    save_tiny(model, out, tokenizer_dir)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in cfg
    if module_names:
        weights = load_file(out / "model.safetensors")
        renamed = {}
        for name, t in weights.items():
            renamed[next((re.sub(p, r, name) for p, r in MODULE_NAMES if re.match(p, name)), name)] = t
        save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out
