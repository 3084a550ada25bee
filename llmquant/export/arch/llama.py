"""Llama family (Llama 2/3, SmolLM, Mistral without sliding window) and Qwen2.

Both share llama.cpp's llama-style block; Llama uses interleaved RoPE, so
llama.cpp wants q/k rows permuted; Qwen2 uses NeoX RoPE and q/k/v biases.
"""

from __future__ import annotations

import gguf

from ...errors import LlmquantError
from .base import ArchSpec, config_int, register


def rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _rope_scaling(w: gguf.GGUFWriter, cfg: dict) -> None:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
        return
    raise LlmquantError(f"rope scaling type {kind!r} is not supported yet")


def write_llama_hparams(w: gguf.GGUFWriter, cfg: dict) -> None:
    n_head = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_vocab_size(int(cfg["vocab_size"]))
    _rope_scaling(w, cfg)


_LAYER = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def llama_layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The HF shape config.json implies for each tensor of one decoder layer."""
    hidden, n_head = config_int(cfg, "hidden_size"), config_int(cfg, "num_attention_heads")
    n_kv = config_int(cfg, "num_key_value_heads", n_head)
    head_dim = config_int(cfg, "head_dim", hidden // n_head or 1)
    ff = config_int(cfg, "intermediate_size")
    if head_dim % 2:
        raise LlmquantError(f"config.json implies head_dim={head_dim}; RoPE needs an even head size")
    q, kv = n_head * head_dim, n_kv * head_dim
    return {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (hidden, q),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (ff, hidden),
        "mlp.up_proj.weight": (ff, hidden),
        "mlp.down_proj.weight": (hidden, ff),
    }


_BIASES = frozenset(t for t in _LAYER if t.endswith(".bias"))
_SMOOTH = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.o_proj": "self_attn.v_proj",
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.down_proj": "mlp.up_proj",
}
_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

LLAMA = register(
    ArchSpec(
        hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        write_hparams=write_llama_hparams,
        layer_tensors=_LAYER,
        optional_layer_tensors=_BIASES,
        sequential_groups=_GROUPS,
        smooth_from=_SMOOTH,
        permute_rows={"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"},
        layer_shapes=llama_layer_shapes,
    )
)

QWEN2 = register(
    ArchSpec(
        hf_architectures=("Qwen2ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.QWEN2,
        write_hparams=write_llama_hparams,
        layer_tensors=_LAYER,
        optional_layer_tensors=_BIASES,
        sequential_groups=_GROUPS,
        smooth_from=_SMOOTH,
        layer_shapes=llama_layer_shapes,
    )
)
