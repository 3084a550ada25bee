"""Qwen3 (dense): Qwen2's block with an RMS norm over each head of q and of k, before RoPE.

llama.cpp's qwen3 graph reads ``attn_q_norm``/``attn_k_norm`` [head_dim] and
uses NeoX RoPE, so q/k rows keep HF's order (no permute). It reads optional
q/k/v biases but no o_proj bias, so ``attention_bias=True`` (which gives o_proj
one too) is refused by the plan as a tensor with no place. Qwen3's head_dim is
explicit; where config.json leaves it out transformers takes 128, not
hidden/heads. Like qwen2, no sliding-window attention and no rope_freqs (so no
llama3 rope scaling).

AWQ folds stay those of the llama block: q_norm and k_norm act per head on
q_proj's and k_proj's *outputs*, so the input scale of [q, k, v] still folds
into input_layernorm, and v_proj (no norm after it) still takes o_proj's.
"""

from __future__ import annotations

import functools

import gguf

from .base import ArchSpec, ConfigKey, register
from .llama import (
    _BIASES,
    _CONFIG_KEYS,
    _GROUPS,
    _LAYER,
    _SKIPPED,
    _SMOOTH,
    RESIDUAL_BEFORE,
    check_llama_features,
    llama_layer_shapes,
    qwen2_window,
    write_llama_hparams,
)

QWEN3_HEAD_DIM = 128  # transformers' Qwen3Config default

_QWEN3_LAYER = (*_LAYER[:7], "self_attn.q_norm.weight", "self_attn.k_norm.weight", *_LAYER[7:])

QWEN3 = register(
    ArchSpec(
        hf_architectures=("Qwen3ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.QWEN3,
        write_hparams=functools.partial(write_llama_hparams, window=qwen2_window, default_head_dim=QWEN3_HEAD_DIM),
        layer_tensors=_QWEN3_LAYER,
        optional_layer_tensors=_BIASES & frozenset(_LAYER),
        sequential_groups=_GROUPS,
        smooth_from=_SMOOTH,
        residual_before=RESIDUAL_BEFORE,
        layer_shapes=functools.partial(llama_layer_shapes, default_head_dim=QWEN3_HEAD_DIM),
        skipped_tensors=_SKIPPED,
        check_features=functools.partial(check_llama_features, rope_types=("default", "linear"), arch="qwen3"),
        # null head_dim breaks transformers' Qwen3Attention; absent means 128
        config_keys={**_CONFIG_KEYS, "head_dim": ConfigKey(int, low=1)},
    )
)
