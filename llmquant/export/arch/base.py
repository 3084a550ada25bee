"""One declarative, immutable spec per architecture.

Everything that differs between decoder architectures lives here: where the
weights are, how HF names map to GGUF names, which hyper-parameters llama.cpp
reads, how tensors are transformed for it, and the true-sequential groups the
calibrated methods quantize in order. Methods and the pipeline never branch on
an architecture name; they read a spec.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import gguf
import numpy as np

from ...errors import LlmquantError

HParamWriter = Callable[[gguf.GGUFWriter, dict], None]
ShapeRule = Callable[[dict], dict[str, tuple[int, ...]]]


def config_int(config: dict, key: str, default: int | None = None) -> int:
    """A positive integer from config.json, or a one-line error naming the key."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise LlmquantError(f"config.json has no {key}")
        return default
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if not whole or value <= 0:
        raise LlmquantError(f"config.json has {key}={value!r}; expected a positive integer")
    return int(value)


@dataclass(frozen=True)
class ConfigKey:
    """What one config.json key a spec reads must hold."""

    kind: type  # int, float, bool, str, dict or list
    required: bool = False
    nullable: bool = False  # null has a meaning (transformers' default), as absent
    low: float | None = None  # smallest allowed value (numbers)
    above: bool = False  # low itself is excluded (rms_norm_eps > 0)

    def expected(self) -> str:
        if self.kind is int:
            return {1: "a positive integer", 0: "a whole number >= 0"}.get(self.low, "an integer")
        if self.kind is float:
            return "a positive number" if self.low == 0 and self.above else "a number"
        return {bool: "true or false", str: "a string", dict: "an object", list: "a list"}[self.kind]

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or self.kind is bool:
            return isinstance(value, bool) and self.kind is bool
        if self.kind in (int, float):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return False
            if self.kind is int and not float(value).is_integer():
                return False
            return self.low is None or (value > self.low if self.above else value >= self.low)
        return isinstance(value, self.kind)


# the sizes every decoder config must give (transformers has no default for them that fits a checkpoint)
DECODER_SIZES = {key: ConfigKey(int, required=True, low=1) for key in (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}


def check_config(config: dict, keys: dict[str, ConfigKey]) -> None:
    """Every key a spec reads against its rule, once, before any work: one line naming the key.

    A dotted key (``rope_scaling.factor``) is one inside an object; it is checked where that
    object and the key are there (never required: what a feature needs of it, the feature checks).
    """
    for key, rule in keys.items():
        parent, dot, name = key.rpartition(".")
        holder = config.get(parent) if dot else config
        if not isinstance(holder, dict) or name not in holder:
            if rule.required and not dot:
                raise LlmquantError(f"config.json has no {key}")
            continue
        value = holder[name]
        if value is None and rule.nullable:
            continue
        if value is None or not rule.accepts(value):
            shown = json.dumps(value) if _jsonable(value) else repr(value)
            raise LlmquantError(f"config.json has {key}={shown}; expected {rule.expected()}")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class ArchSpec:
    """Layout of one HF decoder family and its GGUF twin."""

    hf_architectures: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    write_hparams: HParamWriter
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    head: str = "lm_head.weight"
    layer_prefix: str = "model.layers.{i}."
    # tensors of one decoder layer (relative to layer_prefix), in file order
    layer_tensors: tuple[str, ...] = ()
    optional_layer_tensors: frozenset[str] = frozenset()
    # linears quantized together, in true-sequential order; members share an input
    sequential_groups: tuple[tuple[str, ...], ...] = ()
    # first member of a group -> the module that produces the group's input (AWQ folds scales into it)
    smooth_from: dict[str, str] = field(default_factory=dict)
    # linear that adds its output straight into the residual stream -> the module whose input is
    # that stream just before the add (None: the layer's input), for ``--gptq-target stream``; a
    # linear whose output passes a norm of its own first (Gemma 3's post-norms) is not listed
    residual_before: dict[str, str | None] = field(default_factory=dict)
    # relative tensor name -> config key giving the head count for llama.cpp's Q/K row permute
    permute_rows: dict[str, str] = field(default_factory=dict)
    # config -> shape (HF layout) that config.json implies for each layer tensor, by relative name
    layer_shapes: ShapeRule | None = None
    # checkpoint tensors deliberately not written: (regex on the full name, why); any other tensor
    # of the checkpoint that the layout does not hold stops the run
    skipped_tensors: tuple[tuple[str, str], ...] = ()
    # config -> None, or a one-line error naming a config feature llama.cpp would not compute
    check_features: Callable[[dict], None] | None = None
    # config -> tensors llama.cpp reads that the checkpoint lacks: GGUF name -> float32 values
    # (llama.cpp's layout), written before every checkpoint tensor, as llama.cpp's converter does
    generated_tensors: Callable[[dict], dict[str, np.ndarray]] | None = None
    # every config.json key the spec (and the plan built from it) reads, with what it must hold
    config_keys: dict[str, ConfigKey] = field(default_factory=dict)
    # the model computes x·(norm_offset + w) with the checkpoint's w for every norm weight whose full
    # HF name matches norm_pattern (Gemma's RMSNorm: 1 + w); llama.cpp multiplies by its file's
    # weight, so the file holds norm_offset + w, and AWQ folds a scale into (norm_offset + w)
    norm_offset: float = 0.0
    norm_pattern: str = r"(?:.+\.)?\w*norm\.weight"
    # config -> the factor the model multiplies its embedding rows by before layer 0 (Gemma: sqrt(hidden),
    # which llama.cpp applies itself, so the file holds the plain rows); None: none. Calibration feeds
    # layer 0 the scaled rows
    embed_scale: Callable[[dict], float] | None = None
    # what transformers' config class of the architecture assumes when config.json omits
    # tie_word_embeddings (llama, mistral, qwen2/3: untied; Gemma 3: tied)
    tie_default: bool = False
    # (regex, replacement) pairs that bring the names of other checkpoint layouts to the spec's, the
    # first matching one per tensor, as transformers' checkpoint conversion mapping renames them on load
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # the config.json key holding the language model's config (a multimodal checkpoint whose text part
    # is quantized); read_config hands the spec that config, with transformers' defaults filled in
    text_config: str | None = None

    def check_config(self, config: dict) -> None:
        """The config's keys against ``config_keys``, then the features llama.cpp must compute."""
        check_config(config, self.config_keys)
        if self.check_features:
            self.check_features(config)

    def skip_reason(self, hf_name: str) -> str | None:
        """Why the spec leaves this checkpoint tensor out of the file, or None if it does not."""
        return next((why for pattern, why in self.skipped_tensors if re.fullmatch(pattern, hf_name)), None)

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def gguf_tensor_name(self, hf_name: str, n_layers: int) -> str:
        base, _, suffix = hf_name.rpartition(".")
        mapped = _tensor_name_map(self.gguf_arch, n_layers).get_name(base)
        if mapped is None:
            raise LlmquantError(f"no GGUF name for tensor {hf_name} in architecture {self.gguf_name}")
        return f"{mapped}.{suffix}"

    def layer_names(self, i: int, present: Callable[[str], bool]) -> list[str]:
        """Full HF names of layer i's tensors that the checkpoint holds, in file order."""
        prefix = self.layer_prefix.format(i=i)
        names = []
        for rel in self.layer_tensors:
            full = prefix + rel
            if present(full):
                names.append(full)
            elif rel not in self.optional_layer_tensors:
                raise LlmquantError(f"tensor {full} is missing from the checkpoint")
        return names

    def norm_shift(self, hf_name: str) -> float:
        """What llama.cpp's copy of this tensor adds to the checkpoint's values (``norm_offset`` on norms)."""
        return self.norm_offset if self.norm_offset and re.fullmatch(self.norm_pattern, hf_name) else 0.0

    def to_gguf_rows(self, hf_name: str, rows: np.ndarray, config: dict) -> np.ndarray:
        """Reorder output rows the way llama.cpp expects (rows: [co, ...], any trailing layout).

        Works on float weights and on per-row quantized blocks alike, because
        the permute only moves whole rows. A norm of an offset architecture
        (float rows [n]) also gets its ``norm_offset`` added.
        """
        shift = self.norm_shift(hf_name)
        if shift:
            if rows.dtype.kind != "f":
                raise LlmquantError(f"{hf_name} is a norm weight; it can only be written as floats")
            rows = rows + rows.dtype.type(shift)
        rel = hf_name.rsplit(".", 1)[0].split(".")[-2:]
        key = self.permute_rows.get(".".join(rel))
        if key is None:
            return rows
        n_head = int(config.get(key) or config["num_attention_heads"])  # HF: no kv count = one per head
        co = rows.shape[0]
        return (
            rows.reshape(n_head, 2, co // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2)
            .reshape(rows.shape)
        )


_REGISTRY: dict[str, ArchSpec] = {}


@functools.lru_cache(maxsize=8)
def _tensor_name_map(arch: gguf.MODEL_ARCH, n_layers: int) -> gguf.TensorNameMap:
    """gguf's HF -> GGUF name table, built once per model: building it expands every
    architecture's patterns for every layer, far more work than the lookups."""
    return gguf.get_tensor_name_map(arch, n_layers)


def register(spec: ArchSpec) -> ArchSpec:
    for name in spec.hf_architectures:
        _REGISTRY[name] = spec
    return spec


def get_arch(config: dict) -> ArchSpec:
    """The spec for a config's ``architectures[0]``, or a one-line error."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise LlmquantError(f"config.json has architectures={json.dumps(archs)}; expected a list of class names")
    name = archs[0] if archs else config.get("model_type", "?")
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise LlmquantError(f"unsupported architecture {name}; llmquant supports {known}") from None


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)
