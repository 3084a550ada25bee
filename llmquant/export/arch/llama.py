"""Llama family (Llama 2/3.x, SmolLM, Mistral) and Qwen2; the helpers Qwen3 (qwen3.py) shares.

Both share llama.cpp's llama-style block; Llama uses interleaved RoPE, so
llama.cpp wants q/k rows permuted; Qwen2 uses NeoX RoPE and q/k/v biases.
Llama 3.1+'s ``llama3`` rope scaling is no GGUF key: llama.cpp's llama graph
divides each rotary frequency by a per-frequency factor read from a generated
``rope_freqs`` tensor (its qwen2/qwen3 graphs read none, so there it is refused).
llama.cpp's llama also reads the optional o_proj and MLP biases
(``attention_bias``, ``mlp_bias``); its qwen2 reads q/k/v biases only. Neither
has sliding-window attention: a Mistral or Qwen2 config with a window gets a
file that declares the window as its context, within which full causal
attention is exactly the sliding one.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import gguf
import numpy as np
import torch

from ...errors import LlmquantError
from .base import DECODER_SIZES, ArchSpec, ConfigKey, config_int, register


def rope_theta(cfg: dict) -> float:
    """From rope_parameters (transformers 5) or the top-level key; a non-number is refused by name."""
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)) if isinstance(params, dict)
                 else cfg.get("rope_theta", 10000.0))


# rope scaling types llama.cpp's graphs compute as transformers does: llama3 needs the rope_freqs tensor
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_llama_features(cfg: dict, rope_types: tuple[str, ...] = ROPE_TYPES, arch: str = "llama") -> None:
    """Refuse, by name, what llama.cpp's llama/qwen2/qwen3 graph would not compute as transformers does."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise LlmquantError(f"config.json has hidden_act={act!r}; llama.cpp's {arch} block computes silu only")
    key, params = _rope_params(cfg)
    kind = _rope_kind(params)
    if kind not in rope_types:
        raise LlmquantError(f"config.json has {key} of type {kind!r}, which llmquant does not carry into llama.cpp's "
                            f"{arch}; supported rope scaling types: {', '.join(rope_types)}")
    if kind in ("linear", "llama3"):
        for name in ("factor",) if kind == "linear" else _LLAMA3_KEYS:
            if params.get(name) is None:
                expected = "a positive integer" if name == "original_max_position_embeddings" else "a positive number"
                raise LlmquantError(f"config.json has a {kind} {key} with {name}=None; expected {expected}")
    if kind == "llama3" and not params["low_freq_factor"] < params["high_freq_factor"]:
        raise LlmquantError(f"config.json has a llama3 {key} with low_freq_factor={params['low_freq_factor']} and "
                            f"high_freq_factor={params['high_freq_factor']}; expected low_freq_factor < high_freq_factor")


def _rope_params(cfg: dict) -> tuple[str, dict]:
    """(config key, its object): transformers 5's rope_parameters, else the older rope_scaling.

    The values' types and ranges are the spec's config_keys (rope_parameters.factor, ...), checked before.
    """
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = cfg.get(key) or {}
    return key, params


def _rope_kind(params: dict) -> str:
    kind = params.get("rope_type", params.get("type"))
    return "default" if kind is None else kind


def _rope_scaling(w: gguf.GGUFWriter, cfg: dict) -> None:
    """The rope scaling keys llama.cpp reads: linear's factor; llama3 writes none (its rope_freqs carries it)."""
    _, params = _rope_params(cfg)
    if _rope_kind(params) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))


def head_dim(cfg: dict, default: int | None = None) -> int:
    """Rotary (and attention) head size: config.json's head_dim, else ``default``, else hidden/heads."""
    hidden, n_head = config_int(cfg, "hidden_size"), config_int(cfg, "num_attention_heads")
    return config_int(cfg, "head_dim", default or hidden // n_head or 1)


def llama3_rope_freqs(cfg: dict) -> dict[str, np.ndarray]:
    """llama3 rope scaling as llama.cpp's llama graph reads it: ``rope_freqs.weight`` f32 [head_dim/2].

    transformers (``_compute_llama3_parameters``) rescales each inverse frequency inv_i [head_dim/2]
    by its wavelength 2 pi / inv_i against the original context L = original_max_position_embeddings:
    short ones (< L / high_freq_factor) stay, long ones (> L / low_freq_factor) are divided by
    ``factor``, and those between blend the two with s = (L / wavelength - low) / (high - low):
    inv_i * ((1 - s) / factor + s). llama.cpp divides inv_i by the tensor's value, so each value is
    the reciprocal of that multiplier. Computed in float32, as both sides compute it.
    Other rope types: no tensor.
    """
    _, params = _rope_params(cfg)
    if _rope_kind(params) != "llama3":
        return {}
    dim = head_dim(cfg)
    factor, low, high = (float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old = int(params["original_max_position_embeddings"])
    inv_freq = 1.0 / (rope_theta(cfg) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [dim/2]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    values = torch.where(wavelen < old / high, torch.ones_like(wavelen),
                         torch.where(wavelen > old / low, torch.full_like(wavelen, factor), blended))
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": values.numpy()}


def mistral_window(cfg: dict) -> int | None:
    """MistralForCausalLM applies ``sliding_window`` in every layer when it is set."""
    return None if cfg.get("sliding_window") is None else config_int(cfg, "sliding_window")


def qwen2_window(cfg: dict) -> int | None:
    """Qwen2ForCausalLM: a window only in the layers ``layer_types`` marks sliding (from
    ``use_sliding_window`` and ``max_window_layers`` in older configs)."""
    types = cfg.get("layer_types")
    if isinstance(types, list):
        sliding = "sliding_attention" in types
    else:
        first = cfg.get("max_window_layers") or 0  # checked by the spec's config_keys
        sliding = bool(cfg.get("use_sliding_window")) and first < config_int(cfg, "num_hidden_layers")
    return config_int(cfg, "sliding_window") if sliding and cfg.get("sliding_window") is not None else None


def declared_context(cfg: dict, window: Callable[[dict], int | None] | None = None) -> int:
    """The context the file declares: max_position_embeddings, or a shorter sliding window (with a warning)
    for a graph that attends to every earlier token, where full causal attention is the sliding one."""
    context = int(cfg.get("max_position_embeddings", 2048))
    span = window(cfg) if window else None
    if span is not None and span < context:
        warnings.warn(f"sliding_window={span}: llama.cpp has no sliding-window attention for this architecture; "
                      f"the file declares a context of {span} tokens (not max_position_embeddings={context}), "
                      "within which it computes exactly what transformers does", stacklevel=3)
        context = span
    return context


def write_llama_hparams(w: gguf.GGUFWriter, cfg: dict, window: Callable[[dict], int | None] | None = None,
                        default_head_dim: int | None = None) -> None:
    n_head = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head = head_dim(cfg, default_head_dim)
    w.add_context_length(declared_context(cfg, window))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    w.add_rope_dimension_count(head)
    if head != hidden // n_head:
        w.add_key_length(head)
        w.add_value_length(head)
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
# llama.cpp's llama (not its qwen2) also reads the o_proj and MLP biases: attention_bias, mlp_bias
_LLAMA_LAYER = (
    *_LAYER[:8], "self_attn.o_proj.bias", _LAYER[8],
    "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias",
    "mlp.down_proj.weight", "mlp.down_proj.bias",
)
# old checkpoints store RoPE's inverse frequencies; llama.cpp computes them from rope_theta, as transformers does
_SKIPPED = ((r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "RoPE frequencies, recomputed from rope_theta"),)


def llama_layer_shapes(cfg: dict, default_head_dim: int | None = None) -> dict[str, tuple[int, ...]]:
    """The HF shape config.json implies for each tensor of one decoder layer."""
    hidden, n_head = config_int(cfg, "hidden_size"), config_int(cfg, "num_attention_heads")
    n_kv = config_int(cfg, "num_key_value_heads", n_head)
    head = head_dim(cfg, default_head_dim)
    ff = config_int(cfg, "intermediate_size")
    if head % 2:
        raise LlmquantError(f"config.json implies head_dim={head}; RoPE needs an even head size")
    q, kv = n_head * head, n_kv * head
    return {
        "self_attn.q_norm.weight": (head,),
        "self_attn.k_norm.weight": (head,),
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (hidden, q),
        "self_attn.o_proj.bias": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (ff, hidden),
        "mlp.gate_proj.bias": (ff,),
        "mlp.up_proj.weight": (ff, hidden),
        "mlp.up_proj.bias": (ff,),
        "mlp.down_proj.weight": (hidden, ff),
        "mlp.down_proj.bias": (hidden,),
    }


_BIASES = frozenset(t for t in _LLAMA_LAYER if t.endswith(".bias"))
_SMOOTH = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.o_proj": "self_attn.v_proj",
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.down_proj": "mlp.up_proj",
}
# pre-norm blocks: o_proj adds into the layer's input, down_proj into the stream the MLP's norm reads
RESIDUAL_BEFORE = {"self_attn.o_proj": None, "mlp.down_proj": "post_attention_layernorm"}
_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

_POSITIVE = ConfigKey(int, low=1)
_CONFIG_KEYS = {
    **DECODER_SIZES,
    "num_key_value_heads": ConfigKey(int, nullable=True, low=1),  # null: one per attention head
    "head_dim": ConfigKey(int, nullable=True, low=1),  # null: hidden_size / num_attention_heads
    "max_position_embeddings": _POSITIVE,
    "rms_norm_eps": ConfigKey(float, low=0, above=True),
    "rope_theta": ConfigKey(float, low=0, above=True),
    "rope_parameters": ConfigKey(dict, nullable=True),
    "rope_scaling": ConfigKey(dict, nullable=True),
    "tie_word_embeddings": ConfigKey(bool),
    "hidden_act": ConfigKey(str),
    "attention_bias": ConfigKey(bool),
    "mlp_bias": ConfigKey(bool),
    "sliding_window": ConfigKey(int, nullable=True, low=1),
    "use_sliding_window": ConfigKey(bool),
    "max_window_layers": ConfigKey(int, nullable=True, low=0),
    "layer_types": ConfigKey(list, nullable=True),
}
# inside rope_parameters (transformers 5) or rope_scaling (older configs): what the rope types read
_ROPE_KEYS = {
    "rope_type": ConfigKey(str),
    "type": ConfigKey(str),
    "rope_theta": ConfigKey(float, low=0, above=True),
    "factor": ConfigKey(float, low=0, above=True),
    "low_freq_factor": ConfigKey(float, low=0, above=True),
    "high_freq_factor": ConfigKey(float, low=0, above=True),
    "original_max_position_embeddings": ConfigKey(int, low=1),
}
_CONFIG_KEYS.update({f"{parent}.{k}": rule for parent in ("rope_parameters", "rope_scaling") for k, rule in _ROPE_KEYS.items()})

_LLAMA_FAMILY = dict(
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    layer_tensors=_LLAMA_LAYER,
    optional_layer_tensors=_BIASES,
    sequential_groups=_GROUPS,
    smooth_from=_SMOOTH,
    residual_before=RESIDUAL_BEFORE,
    permute_rows={"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"},
    layer_shapes=llama_layer_shapes,
    skipped_tensors=_SKIPPED,
    check_features=check_llama_features,
    generated_tensors=llama3_rope_freqs,
    config_keys=_CONFIG_KEYS,
)

LLAMA = register(ArchSpec(hf_architectures=("LlamaForCausalLM",), write_hparams=write_llama_hparams, **_LLAMA_FAMILY))

MISTRAL = register(ArchSpec(hf_architectures=("MistralForCausalLM",),
                            write_hparams=functools.partial(write_llama_hparams, window=mistral_window), **_LLAMA_FAMILY))

QWEN2 = register(
    ArchSpec(
        hf_architectures=("Qwen2ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.QWEN2,
        write_hparams=functools.partial(write_llama_hparams, window=qwen2_window),
        layer_tensors=_LAYER,
        optional_layer_tensors=_BIASES & frozenset(_LAYER),
        sequential_groups=_GROUPS,
        smooth_from=_SMOOTH,
        residual_before=RESIDUAL_BEFORE,
        layer_shapes=llama_layer_shapes,
        skipped_tensors=_SKIPPED,
        # llama.cpp's qwen2 graph reads no rope_freqs: no llama3 scaling
        check_features=functools.partial(check_llama_features, rope_types=("default", "linear"), arch="qwen2"),
        config_keys=_CONFIG_KEYS,
    )
)
