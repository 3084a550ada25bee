"""Gemma 3 (text): ``Gemma3ForCausalLM``, llama.cpp's ``gemma3``, and the text part of
``Gemma3ForConditionalGeneration`` (see GEMMA3_MULTIMODAL at the end).

What it changes against the llama block, each a fact llama.cpp's gemma3 graph
computes the way transformers' Gemma3 code does:

- every RMSNorm computes ``x·(1 + w)`` (Gemma3RMSNorm): the file holds
  ``1 + w`` (``norm_offset``), which llama.cpp multiplies by;
- the embedding rows are multiplied by ``sqrt(hidden_size)`` before layer 0
  (Gemma3TextScaledWordEmbedding); llama.cpp does that itself, so the file
  holds the plain rows and only calibration scales them (``embed_scale``);
- four norms per layer: input (``attn_norm``), after attention
  (``post_attention_norm``, before the residual add), before the MLP
  (``ffn_norm``) and after it (``post_ffw_norm``), plus an RMS norm over each
  head of q and of k (``attn_q_norm``/``attn_k_norm`` [head_dim]) before RoPE;
- NeoX RoPE (no q/k row permute), with two bases: ``sliding_attention``
  layers rotate with the local base (``rope.freq_base_swa``, never scaled),
  ``full_attention`` layers with the global one (``rope.freq_base``, with
  linear scaling where the config has it);
- sliding-window attention on the layers ``layer_types`` marks sliding (a
  window of ``sliding_window`` tokens, the query's own included, in both):
  the file carries the per-layer pattern as an array;
- the MLP is ``down(gelu_tanh(gate(x)) · up(x))``;
- attention scores are scaled by ``query_pre_attn_scalar^-1/2``, where
  llama.cpp takes ``head_dim^-1/2`` (``(hidden/heads)^-1/2`` for its 62-layer
  27B): a config whose scalar differs is refused by name.

AWQ folds stay those of a pre-norm block: [q, k, v] take their scale from
``input_layernorm`` and [gate, up] from ``pre_feedforward_layernorm`` (both
offset norms: the fold acts on ``1 + w``), o_proj's from v_proj (q/k norms
act on q and k only), down_proj's from up_proj. The post norms sit on the
outputs of o_proj and down_proj, not on any group's input.
"""

from __future__ import annotations

import dataclasses
import math

import gguf

from ...errors import LlmquantError
from .base import DECODER_SIZES, ArchSpec, ConfigKey, config_int, register

GEMMA3_HEAD_DIM = 256  # transformers' Gemma3TextConfig defaults where config.json is silent
GEMMA3_KV_HEADS = 4
GEMMA3_CONTEXT = 131_072
GEMMA3_WINDOW = 4096
GEMMA3_PATTERN = 6  # legacy sliding_window_pattern: every 6th layer global
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0
SLIDING, FULL = "sliding_attention", "full_attention"
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")  # ggml_gelu is the tanh approximation

_LAYER = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_proj.weight",
    "self_attn.k_norm.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "post_feedforward_layernorm.weight",
)
_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_SMOOTH = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.o_proj": "self_attn.v_proj",
    "mlp.gate_proj": "pre_feedforward_layernorm",
    "mlp.down_proj": "mlp.up_proj",
}


def head_dim(cfg: dict) -> int:
    return config_int(cfg, "head_dim", GEMMA3_HEAD_DIM)


def layer_types(cfg: dict) -> list[str]:
    """Each layer's attention kind, from ``layer_types`` or (older configs) ``sliding_window_pattern``."""
    n = config_int(cfg, "num_hidden_layers")
    types = cfg.get("layer_types")
    if types is None:
        pattern = config_int(cfg, "sliding_window_pattern", GEMMA3_PATTERN)
        return [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if len(types) != n or not all(t in (SLIDING, FULL) for t in types):
        raise LlmquantError(f"config.json has layer_types={types!r}; expected {n} entries, each "
                            f"{SLIDING!r} or {FULL!r}")
    return list(types)


def rope_params(cfg: dict) -> tuple[dict, dict]:
    """(full_attention, sliding_attention) RoPE parameters, each with its ``rope_theta``.

    transformers 5 writes ``rope_parameters`` keyed by layer type; older configs
    have ``rope_theta`` (global), ``rope_local_base_freq`` and ``rope_scaling``
    (global layers only).
    """
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        if not set(params) <= {SLIDING, FULL} or not all(isinstance(v, (dict, type(None))) for v in params.values()):
            raise LlmquantError(f"config.json has rope_parameters={params!r}; expected an object keyed by "
                                f"{FULL!r} and {SLIDING!r}")
        full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    else:
        full, local = dict(cfg.get("rope_scaling") or {}), {}
        full.setdefault("rope_theta", cfg.get("rope_theta", GLOBAL_THETA))
        local["rope_theta"] = cfg.get("rope_local_base_freq", LOCAL_THETA)
    full.setdefault("rope_theta", GLOBAL_THETA)
    local.setdefault("rope_theta", LOCAL_THETA)
    for kind, p in ((FULL, full), (SLIDING, local)):
        theta = p["rope_theta"]
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
            raise LlmquantError(f"config.json has a {kind} rope_theta={theta!r}; expected a positive number")
    return full, local


def _rope_kind(p: dict) -> str:
    return p.get("rope_type", p.get("type", "default")) or "default"


def linear_factor(full: dict) -> float | None:
    """The global layers' linear RoPE factor, None for plain RoPE; any other scaling is refused."""
    kind = _rope_kind(full)
    if kind == "default":
        return None
    factor = full.get("factor")
    if kind != "linear":
        raise LlmquantError(f"rope scaling type {kind!r} of the {FULL} layers is not supported yet")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise LlmquantError(f"config.json has a linear rope scaling with factor={factor!r}; expected a positive number")
    return float(factor)


def check_gemma3_features(cfg: dict) -> None:
    """Refuse, by name, what llama.cpp's gemma3 graph would not compute as transformers does."""
    act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in _GELU_TANH:
        raise LlmquantError(f"config.json has hidden_activation={act!r}; llama.cpp's gemma3 block computes "
                            "gelu_pytorch_tanh only")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if cfg.get(key):
            raise LlmquantError(f"config.json has {key}=true; llama.cpp's gemma3 block has no such feature")
    if cfg.get("attn_logit_softcapping") is not None:
        raise LlmquantError("config.json sets attn_logit_softcapping; llama.cpp's gemma3 block does not cap "
                            "attention logits")
    full, local = rope_params(cfg)
    linear_factor(full)
    if _rope_kind(local) != "default":
        raise LlmquantError(f"rope scaling type {_rope_kind(local)!r} of the {SLIDING} layers is not supported "
                            "(llama.cpp never scales their RoPE)")
    types = layer_types(cfg)
    if SLIDING in types and cfg.get("sliding_window", GEMMA3_WINDOW) is None:
        raise LlmquantError("config.json has sliding_attention layers but sliding_window=null")
    n_layers, heads = config_int(cfg, "num_hidden_layers"), config_int(cfg, "num_attention_heads")
    # llama.cpp's gemma3 fixes the attention scale: 1/sqrt(hidden/heads) for its 62-layer 27B, else 1/sqrt(head_dim)
    wanted = config_int(cfg, "hidden_size") / heads if n_layers == 62 else head_dim(cfg)
    scalar = cfg.get("query_pre_attn_scalar", GEMMA3_HEAD_DIM)
    if float(scalar) != float(wanted):
        raise LlmquantError(f"config.json has query_pre_attn_scalar={scalar}; llama.cpp's gemma3 scales attention "
                            f"by 1/sqrt({wanted:g}) for this model, so it would compute another model")


def write_gemma3_hparams(w: gguf.GGUFWriter, cfg: dict) -> None:
    """The keys llama.cpp's gemma3 reads (its attention scale it derives from the head size)."""
    hd = head_dim(cfg)
    full, local = rope_params(cfg)
    types = layer_types(cfg)
    w.add_context_length(config_int(cfg, "max_position_embeddings", GEMMA3_CONTEXT))
    w.add_embedding_length(config_int(cfg, "hidden_size"))
    w.add_block_count(config_int(cfg, "num_hidden_layers"))
    w.add_feed_forward_length(config_int(cfg, "intermediate_size"))
    w.add_head_count(config_int(cfg, "num_attention_heads"))
    w.add_head_count_kv(config_int(cfg, "num_key_value_heads", GEMMA3_KV_HEADS))
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(float(full["rope_theta"]))
    factor = linear_factor(full)
    if factor is not None:  # llama.cpp applies it to the full-attention layers only, as transformers
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    if SLIDING in types:
        w.add_sliding_window(config_int(cfg, "sliding_window", GEMMA3_WINDOW))
        w.add_sliding_window_pattern([t == SLIDING for t in types])
        w.add_rope_freq_base_swa(float(local["rope_theta"]))
    cap = cfg.get("final_logit_softcapping")
    if cap:
        w.add_final_logit_softcapping(float(cap))
    w.add_vocab_size(config_int(cfg, "vocab_size"))


def gemma3_layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The HF shape config.json implies for each tensor of one decoder layer."""
    hidden, n_head = config_int(cfg, "hidden_size"), config_int(cfg, "num_attention_heads")
    n_kv, hd = config_int(cfg, "num_key_value_heads", GEMMA3_KV_HEADS), head_dim(cfg)
    ff = config_int(cfg, "intermediate_size")
    if hd % 2:
        raise LlmquantError(f"config.json has head_dim={hd}; RoPE needs an even head size")
    q, kv = n_head * hd, n_kv * hd
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    return {
        **{f"{n}.weight": (hidden,) for n in norms},
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.k_norm.weight": (hd,),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, q),
        "mlp.gate_proj.weight": (ff, hidden),
        "mlp.up_proj.weight": (ff, hidden),
        "mlp.down_proj.weight": (hidden, ff),
    }


def embed_scale(cfg: dict) -> float:
    """Gemma3TextScaledWordEmbedding's factor: sqrt(hidden_size)."""
    return math.sqrt(config_int(cfg, "hidden_size"))


_NUMBER = ConfigKey(float, low=0, above=True)
_CONFIG_KEYS = {
    **DECODER_SIZES,
    "num_key_value_heads": ConfigKey(int, low=1),
    "head_dim": ConfigKey(int, low=1),
    "max_position_embeddings": ConfigKey(int, low=1),
    "rms_norm_eps": _NUMBER,
    "rope_theta": _NUMBER,
    "rope_local_base_freq": _NUMBER,
    "rope_parameters": ConfigKey(dict, nullable=True),
    "rope_scaling": ConfigKey(dict, nullable=True),
    "tie_word_embeddings": ConfigKey(bool),
    "hidden_activation": ConfigKey(str),
    "attention_bias": ConfigKey(bool),
    "use_bidirectional_attention": ConfigKey(bool, nullable=True),
    "sliding_window": ConfigKey(int, nullable=True, low=1),
    "sliding_window_pattern": ConfigKey(int, low=1),
    "layer_types": ConfigKey(list, nullable=True),
    "query_pre_attn_scalar": _NUMBER,
    "final_logit_softcapping": ConfigKey(float, nullable=True, low=0, above=True),
    "attn_logit_softcapping": ConfigKey(float, nullable=True, low=0, above=True),
}

GEMMA3 = register(
    ArchSpec(
        hf_architectures=("Gemma3ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.GEMMA3,
        write_hparams=write_gemma3_hparams,
        layer_tensors=_LAYER,
        sequential_groups=_GROUPS,
        smooth_from=_SMOOTH,
        layer_shapes=gemma3_layer_shapes,
        check_features=check_gemma3_features,
        config_keys=_CONFIG_KEYS,
        norm_offset=1.0,
        embed_scale=embed_scale,
        tie_default=True,  # Gemma3TextConfig's default
    )
)


def check_gemma3_multimodal(cfg: dict) -> None:
    """The wrapper's language model is its text_config (read_config hands the spec that config)."""
    if not isinstance(cfg.get("text_config"), dict):
        raise LlmquantError("config.json of a Gemma3ForConditionalGeneration has no text_config object, the "
                            "config of its language model")
    check_gemma3_features(cfg)


# Gemma3ForConditionalGeneration (the multimodal 4B/12B/27B): its text part is this very language
# model, and llama.cpp's text GGUF of it (its converter's Gemma3Model) holds only that part: the text
# config from text_config, the tensors without their ``language_model`` prefix, the vision tower and
# projector left for a separate mmproj file. Checkpoints come in two layouts: the one transformers
# saves (``language_model.model.layers.N``, ``language_model.lm_head``, ``vision_tower``,
# ``multi_modal_projector``) and its module names (``model.language_model.layers.N``, ``lm_head``,
# ``model.vision_tower``, ``model.multi_modal_projector``); both load the same model.
GEMMA3_MULTIMODAL = register(
    dataclasses.replace(
        GEMMA3,
        hf_architectures=("Gemma3ForConditionalGeneration",),
        text_config="text_config",
        check_features=check_gemma3_multimodal,
        tie_default=True,  # Gemma3Config's (the top level's tie_word_embeddings is the one transformers reads)
        checkpoint_renames=(
            (r"^language_model\.model\.", "model."),
            (r"^language_model\.lm_head\.", "lm_head."),
            (r"^model\.language_model\.", "model."),
        ),
        skipped_tensors=(
            (r"(?:model\.)?(?:vision_tower|multi_modal_projector)\..+",
             "the vision tower and its projector: llama.cpp's text model has none; its converter writes them "
             "to a separate mmproj file"),
        ),
    )
)
