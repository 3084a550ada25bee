"""Tiny random models built from configs: they prove layout and loading, not quality."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_tiny_model(out: Path, arch: str, tokenizer_dir: Path, *, hidden: int = 64, layers: int = 2,
                     tied: bool = True, seed: int = 0, intermediate: int | None = None, heads: int = 4,
                     kv_heads: int = 2, random_norms: bool = False, **config) -> Path:
    """A random ``arch`` (llama | mistral | qwen2 | qwen3 | phi3) checkpoint in ``out`` with a real tokenizer.

    config: further config keywords (attention_bias=True, sliding_window=16, ...).
    random_norms: draw every norm weight around 1 (1 + N(0, 0.3)) instead of keeping it at 1,
    so that a norm written in the wrong place (q_norm for k_norm) changes the logits.
    """
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden + 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    common.update(config)
    if arch == "qwen3":  # Qwen3Config's head_dim defaults to 128, not hidden / heads
        common.setdefault("head_dim", hidden // heads)
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "phi3": Phi3Config}
    config = classes[arch](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than the init's 0.02 so that the logits are not flat
        for name, p in model.named_parameters():
            if p.dim() == 2 or (p.dim() == 1 and "norm" not in name):  # norms keep their init of 1
                p.normal_(0, 0.2)
            elif random_norms:
                p.normal_(1, 0.3)
    return save_tiny(model, out, tokenizer_dir)


def save_tiny(model, out: Path, tokenizer_dir: Path) -> Path:
    """``model``'s checkpoint in ``out`` with the tokenizer files of ``tokenizer_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out
