"""Phi-3 (``Phi3ForCausalLM``), llama.cpp's ``phi3``: the llama block with fused projections.

What it changes against the llama block, each as llama.cpp's phi3 graph and
its converter (``Phi3MiniModel``) have it:

- one ``self_attn.qkv_proj`` [q + 2 kv, hidden] instead of q/k/v: the file
  keeps it fused as ``attn_qkv``, whose rows llama.cpp views as q, k, v in
  that order, as transformers slices them;
- one ``mlp.gate_up_proj`` [2 ff, hidden], gate rows first: the file keeps it
  as ``ffn_up`` [2 ff], which llama.cpp's swiglu splits the same way
  (silu of the first half times the second);
- NeoX RoPE (no q/k row permute), over the first ``partial_rotary_factor`` of
  each head (Phi-4-mini: 0.75);
- the attention width is the model's: llama.cpp's phi3 shapes q and o_proj
  [hidden, hidden], so a head_dim other than hidden/heads is refused;
- ``sliding_window``: transformers applies it in every layer, llama.cpp's phi3
  has it disabled (it reads the key and attends to every earlier token), so,
  as for Mistral, the file declares the window as its context, within which
  full causal attention is exactly the sliding one; the key itself is written
  as the converter writes it (0 for none);
- ``longrope`` (the 128k variants) is refused: llama.cpp picks its long or
  short factors by the context it is given, transformers by each input's
  length, so the two compute different models on short inputs of a long
  context.

Calibrated methods quantize [qkv] -> [o] -> [gate_up] -> [down]. AWQ folds
the scale of qkv_proj into input_layernorm and that of gate_up_proj into
post_attention_layernorm (each the whole input of its fused linear). o_proj
and down_proj read a slice of a fused linear's output (v, up), so their
producer is no whole module: they get no smooth.
"""

from __future__ import annotations

import gguf

from ...errors import LlmquantError
from .base import DECODER_SIZES, ArchSpec, ConfigKey, config_int, register
from .llama import _CONFIG_KEYS as _LLAMA_KEYS
from .llama import (
    _SKIPPED,
    RESIDUAL_BEFORE,
    _rope_params,
    check_llama_features,
    declared_context,
    mistral_window,
    rope_theta,
)

PHI3_ORIGINAL_CONTEXT = 4096  # transformers' Phi3Config default

_LAYER = (
    "input_layernorm.weight",
    "self_attn.qkv_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
)
_GROUPS = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)
_SMOOTH = {
    "self_attn.qkv_proj": "input_layernorm",
    "mlp.gate_up_proj": "post_attention_layernorm",
}


def rotary_factor(cfg: dict) -> float:
    """The rotated share of each head: rope_parameters' partial_rotary_factor, else the top-level key, else 1."""
    _, params = _rope_params(cfg)
    value = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return 1.0 if value is None else float(value)


def rotary_dim(cfg: dict) -> int:
    """transformers' ``int(head_dim * partial_rotary_factor)``; llama.cpp's ``rope.dimension_count``."""
    return int(config_int(cfg, "hidden_size") // config_int(cfg, "num_attention_heads") * rotary_factor(cfg))


def check_phi3_features(cfg: dict) -> None:
    """Refuse, by name, what llama.cpp's phi3 graph would not compute as transformers does."""
    check_llama_features(cfg, rope_types=("default",), arch="phi3")
    hidden, n_head = config_int(cfg, "hidden_size"), config_int(cfg, "num_attention_heads")
    if hidden % n_head:
        raise LlmquantError(f"config.json has hidden_size={hidden} and num_attention_heads={n_head}; "
                            "llama.cpp's phi3 needs heads of hidden_size / num_attention_heads")
    head = cfg.get("head_dim")
    if head is not None and head != hidden // n_head:
        raise LlmquantError(f"config.json has head_dim={head}; llama.cpp's phi3 computes heads of "
                            f"hidden_size / num_attention_heads = {hidden // n_head} only")
    factor = rotary_factor(cfg)
    if not 0 < factor <= 1 or rotary_dim(cfg) % 2 or rotary_dim(cfg) == 0:
        raise LlmquantError(f"config.json has partial_rotary_factor={factor}; expected a share of the head "
                            "(0 < factor <= 1) that rotates an even, nonzero number of dimensions")


def write_phi3_hparams(w: gguf.GGUFWriter, cfg: dict) -> None:
    """The keys llama.cpp's converter writes for phi3 (its attention scale is 1/sqrt(head size))."""
    n_head = config_int(cfg, "num_attention_heads")
    window = cfg.get("sliding_window")
    w.add_context_length(declared_context(cfg, mistral_window))
    w.add_rope_scaling_orig_ctx_len(config_int(cfg, "original_max_position_embeddings", PHI3_ORIGINAL_CONTEXT))
    w.add_embedding_length(config_int(cfg, "hidden_size"))
    w.add_feed_forward_length(config_int(cfg, "intermediate_size"))
    w.add_block_count(config_int(cfg, "num_hidden_layers"))
    w.add_head_count(n_head)
    w.add_head_count_kv(config_int(cfg, "num_key_value_heads", n_head))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_dimension_count(rotary_dim(cfg))
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_sliding_window(0 if window is None else int(window))  # llama.cpp reads it and attends fully
    w.add_vocab_size(config_int(cfg, "vocab_size"))


def phi3_layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The HF shape config.json implies for each tensor of one decoder layer."""
    hidden, n_head = config_int(cfg, "hidden_size"), config_int(cfg, "num_attention_heads")
    n_kv = config_int(cfg, "num_key_value_heads", n_head)
    ff = config_int(cfg, "intermediate_size")
    kv = n_kv * (hidden // n_head)
    return {
        "input_layernorm.weight": (hidden,),
        "self_attn.qkv_proj.weight": (hidden + 2 * kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_up_proj.weight": (2 * ff, hidden),
        "mlp.down_proj.weight": (hidden, ff),
    }


_READ = ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
         "rope_parameters", "rope_scaling", "tie_word_embeddings", "hidden_act", "sliding_window")
_FACTOR = ConfigKey(float, low=0, above=True)
_CONFIG_KEYS = {
    **DECODER_SIZES,
    **{key: _LLAMA_KEYS[key] for key in _READ},
    **{key: rule for key, rule in _LLAMA_KEYS.items() if key.startswith(("rope_parameters.", "rope_scaling."))},
    "original_max_position_embeddings": ConfigKey(int, low=1),
    "partial_rotary_factor": _FACTOR,
    "rope_parameters.partial_rotary_factor": _FACTOR,
    "rope_scaling.partial_rotary_factor": _FACTOR,
}

PHI3 = register(
    ArchSpec(
        hf_architectures=("Phi3ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.PHI3,
        write_hparams=write_phi3_hparams,
        layer_tensors=_LAYER,
        sequential_groups=_GROUPS,
        smooth_from=_SMOOTH,
        residual_before=RESIDUAL_BEFORE,
        layer_shapes=phi3_layer_shapes,
        skipped_tensors=_SKIPPED,
        check_features=check_phi3_features,
        config_keys=_CONFIG_KEYS,
    )
)
