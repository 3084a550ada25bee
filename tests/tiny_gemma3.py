"""A tiny random Gemma 3 built from Gemma3TextConfig: layout and loading, not quality."""

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

    settings = dict(
        vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden + 64, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        layer_types=list(LAYER_TYPES), sliding_window=WINDOW, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    settings.update(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.2)
    return save_tiny(model, out, tokenizer_dir)
