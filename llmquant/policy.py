"""Which ggml type each tensor gets: llama.cpp's file-type recipes, held as data.

A user asks for a *file type*: a single ggml type (``q4_0``, ``q6_k``, …) or
one of llama.cpp's mixtures (``Q4_K_M``, ``Q3_K_S``, …). Each is a
``Recipe``: a base ggml type plus per-role rules, transcribed from
``llama_tensor_get_type`` of the pinned llama.cpp so that a file differs from
``llama-quantize``'s only where a method chose other codes. What follows the
rules, for every recipe:

- 1-D tensors (norms) stay f32; float file types keep every weight in that type;
- the output head, or the token embedding when it serves as the head, takes
  q6_K unless the base is q8_0 (q8_0 where its row is not a multiple of the
  base type's block);
- a row that does not fit the chosen type's block falls back as llama.cpp
  does (``FALLBACK``), and to f16 where not even 32 fits; every fallback is
  noted on the tensor, so the summary can say what fell back and why;
- ``pure``: every 2-D weight in the base type (fallbacks still apply).

Counters in llama.cpp (``i_attention_wv``, ``i_ffn_down``) count tensors of a
role in file order; with one such tensor per decoder layer they are the layer
index, which is what the rules here use.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

FLOAT_TYPES = ("f32", "f16", "bf16")
LEGACY_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
K_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
# where a row is not a multiple of the type's block (llama.cpp's tensor_type_fallback)
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

# conditions a rule may name; each reads (layer, n_layers, model facts)
CONDITIONS = {
    "always": lambda i, n, m: True,
    # llama.cpp's use_more_bits: the first and last eighth, and every third layer between
    "more_bits": lambda i, n, m: i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2,
    "first_8th": lambda i, n, m: i < n // 8,
    "first_16th": lambda i, n, m: i < n // 16,
    "layer<2": lambda i, n, m: i < 2,
    "layer<4": lambda i, n, m: i < 4,
    "gqa>=4": lambda i, n, m: m.n_gqa >= 4,
    "70b": lambda i, n, m: m.is_70b,
    # llama.cpp guards the first ffn_down layers of q4_0/q5_0 only when it has an imatrix
    "imatrix_first_8th": lambda i, n, m: m.has_imatrix and i < n // 8,
}


@dataclass(frozen=True)
class Rule:
    """For tensors of ``role``: take ``type`` when ``when`` holds.

    Among plain rules of a role the first that holds wins; a rule with
    ``only_from`` is applied afterwards, and only to a tensor whose type so far
    is one of those (llama.cpp's 70B attn_v bump).
    """

    role: str
    type: str
    when: str = "always"
    only_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    name: str  # lower case, as the user may type it in any case
    base: str
    file_type: gguf.LlamaFileType
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's rules read of the model besides a tensor's role and layer."""

    n_layers: int
    n_gqa: int = 1  # attention heads per kv head
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B (80 layers; llama with grouped kv heads, qwen2)
    has_imatrix: bool = False  # quantized with an importance matrix (llama.cpp's qs.has_imatrix)


_BUMP_70B = Rule("attn_v", "q5_k", "70b", only_from=("q3_k", "q4_k"))
_LFT = gguf.LlamaFileType


def _recipe(name: str, base: str, ft: gguf.LlamaFileType, *rules: Rule) -> Recipe:
    return Recipe(name, base, ft, (*rules, _BUMP_70B))


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("f32", "f32", _LFT.ALL_F32),
        Recipe("f16", "f16", _LFT.MOSTLY_F16),
        Recipe("bf16", "bf16", _LFT.MOSTLY_BF16),
        _recipe("q8_0", "q8_0", _LFT.MOSTLY_Q8_0),
        _recipe("q4_0", "q4_0", _LFT.MOSTLY_Q4_0, Rule("ffn_down", "q4_1", "imatrix_first_8th")),
        _recipe("q4_1", "q4_1", _LFT.MOSTLY_Q4_1),
        _recipe("q5_0", "q5_0", _LFT.MOSTLY_Q5_0, Rule("ffn_down", "q5_1", "imatrix_first_8th")),
        _recipe("q5_1", "q5_1", _LFT.MOSTLY_Q5_1),
        _recipe("q2_k", "q2_k", _LFT.MOSTLY_Q2_K,
                Rule("attn_v", "q4_k", "gqa>=4"), Rule("attn_v", "q3_k"),
                Rule("ffn_down", "q3_k"), Rule("attn_output", "q3_k")),
        _recipe("q3_k_s", "q3_k", _LFT.MOSTLY_Q3_K_S),
        _recipe("q3_k_m", "q3_k", _LFT.MOSTLY_Q3_K_M,
                Rule("attn_v", "q5_k", "layer<2"), Rule("attn_v", "q4_k"),
                Rule("ffn_down", "q5_k", "first_16th"), Rule("ffn_down", "q4_k"),
                Rule("attn_output", "q4_k")),
        _recipe("q3_k_l", "q3_k", _LFT.MOSTLY_Q3_K_L,
                Rule("attn_v", "q5_k"), Rule("ffn_down", "q5_k"), Rule("attn_output", "q5_k")),
        _recipe("q4_k_s", "q4_k", _LFT.MOSTLY_Q4_K_S,
                Rule("attn_v", "q5_k", "layer<4"), Rule("ffn_down", "q5_k", "first_8th")),
        _recipe("q4_k_m", "q4_k", _LFT.MOSTLY_Q4_K_M,
                Rule("attn_v", "q6_k", "more_bits"), Rule("ffn_down", "q6_k", "more_bits")),
        _recipe("q5_k_s", "q5_k", _LFT.MOSTLY_Q5_K_S),
        _recipe("q5_k_m", "q5_k", _LFT.MOSTLY_Q5_K_M,
                Rule("attn_v", "q6_k", "more_bits"), Rule("ffn_down", "q6_k", "more_bits")),
        _recipe("q6_k", "q6_k", _LFT.MOSTLY_Q6_K),
    )
}
# llama-quantize's aliases: a bare k-quant name is its _M mixture
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
ALL_TYPES = tuple(RECIPES)
# q8_K exists in ggml only for activations (the other side of k-quant dot products): no file type uses it
NOT_OFFERED = {"q8_k": "q8_K is llama.cpp's activation type for k-quant dot products; no file type stores weights in it"}


def get_recipe(name: str) -> Recipe:
    """The recipe for a user's --type (any case, llama.cpp's aliases), or a one-line error."""
    from .errors import LlmquantError

    key = str(name).strip().lower()
    if key in NOT_OFFERED:
        raise LlmquantError(f"--type {name}: {NOT_OFFERED[key]}")
    key = ALIASES.get(key, key)
    if key not in RECIPES:
        shown = ", ".join(r if r in FLOAT_TYPES or r in LEGACY_TYPES else r.upper() for r in RECIPES)
        raise LlmquantError(f"unknown type {name!r}; choose one of {shown}")
    return RECIPES[key]


@dataclass(frozen=True)
class TypeChoice:
    ggml_type: str
    note: str = ""


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name.upper()]


def block_of(name: str) -> int:
    return gguf.GGML_QUANT_SIZES[ggml_type(name)][0]


def tensor_role(gguf_name: str) -> str:
    """llama.cpp's tensor category from a GGUF tensor name (``blk.3.attn_v.weight`` -> ``attn_v``)."""
    if gguf_name == "output.weight":
        return "output"
    if gguf_name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for role in ("attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{role}.weight" in gguf_name:
            return role
    for role in ("ffn_up", "ffn_gate", "ffn_down"):
        if role in gguf_name:
            return role
    return "other"


def layer_index(gguf_name: str) -> int | None:
    parts = gguf_name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None


def _apply_rules(recipe: Recipe, role: str, layer: int | None, facts: ModelFacts) -> str:
    chosen = recipe.base
    if layer is None:
        return chosen
    # llama.cpp's attn_v branch catches fused qkv and kv_b tensors too (category_is_attn_v)
    role = "attn_v" if role in ("attn_qkv", "attn_kv_b") else role
    picked = False
    for r in (r for r in recipe.rules if r.role == role):
        holds = CONDITIONS[r.when](layer, facts.n_layers, facts)
        if r.only_from:
            if holds and chosen in r.only_from:
                chosen = r.type
        elif not picked and holds:
            chosen, picked = r.type, True
    return chosen


def choose_type(gguf_name: str, shape: tuple[int, ...], recipe: Recipe, facts: ModelFacts, *, pure: bool,
                is_head: bool) -> TypeChoice:
    """The type of one tensor: shape is the HF (numpy) shape, rows last ([co, ci]); is_head
    marks the output head, or the token embedding when it is tied to the head."""
    if len(shape) < 2 or recipe.base == "f32":
        return TypeChoice("f32")
    if recipe.base in FLOAT_TYPES:
        return TypeChoice(recipe.base)
    row = shape[-1]
    target = recipe.base
    if pure:
        pass
    elif is_head:
        if row % block_of(recipe.base):
            target = "q8_0"
        elif recipe.base != "q8_0":
            target = "q6_k"
    else:
        target = _apply_rules(recipe, tensor_role(gguf_name), layer_index(gguf_name), facts)
    if row % block_of(target) == 0:
        return TypeChoice(target)
    fallback = FALLBACK.get(target, target)
    if row % block_of(fallback):
        fallback = "f16"
    why = f"row of {row} is not a multiple of {block_of(target)}"
    return TypeChoice(fallback, f"{target} -> {fallback}: {why} (llama.cpp's fallback)")
