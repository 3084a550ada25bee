"""Every tensor of the output file, in file order, planned once from the spec and the config.

The plan is the one place that decides what the file holds: the checkpoint's
tensors the architecture's layout places (embedding, each decoder layer's
tensors, final norm, head unless tied), and the tensors llama.cpp needs that the
checkpoint lacks, generated from config.json (Llama 3's ``rope_freqs``). Each
entry carries its GGUF name, shape, ggml type, llama.cpp role and layer index;
the pipeline walks the entries in this order and never re-derives it, and the
GGUF tensor table is declared from it before any weight is read.

Generated tensors come first, as llama.cpp's converter writes them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import LlmquantError
from .export.arch import ArchSpec, config_int
from .export.gguf_file import PlannedTensor
from .loading.weights import WeightStore
from .policy import ModelFacts, Recipe, choose_type, layer_index, tensor_role


@dataclass(frozen=True, eq=False)
class PlanEntry:
    """One output tensor: what the file declares, and where its values come from."""

    tensor: PlannedTensor
    source: str | None  # full HF name in the checkpoint; None: generated from the config
    role: str  # llama.cpp's tensor category (token_embd, attn_v, ffn_down, output, other, ...)
    layer: int | None  # decoder layer index; None outside the layers
    by_rows: bool = False  # streamed in row chunks (embedding and head: vocab x hidden)
    values: np.ndarray | None = None  # generated tensors: float32 values, shape == tensor.shape


@dataclass(frozen=True, eq=False)
class TensorPlan:
    """The entries in file order, with lookups by checkpoint name for the pipeline and the methods."""

    entries: tuple[PlanEntry, ...]
    n_layers: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_source", {e.source: e for e in self.entries if e.source is not None})

    @property
    def tensors(self) -> list[PlannedTensor]:
        """What the GGUF's tensor table declares, in file order."""
        return [e.tensor for e in self.entries]

    def __contains__(self, hf_name: str) -> bool:
        return hf_name in self._by_source

    def __getitem__(self, hf_name: str) -> PlannedTensor:
        return self._by_source[hf_name].tensor

    def entry(self, hf_name: str) -> PlanEntry:
        return self._by_source[hf_name]

    def layer(self, i: int) -> list[PlanEntry]:
        return [e for e in self.entries if e.layer == i]

    def outside_layers(self, before: bool) -> Iterator[PlanEntry]:
        """Entries before the first decoder layer's (before=True) or after the last one's."""
        first = next((k for k, e in enumerate(self.entries) if e.layer is not None), len(self.entries))
        last = max((k for k, e in enumerate(self.entries) if e.layer is not None), default=first - 1)
        return iter(self.entries[:first] if before else self.entries[last + 1:])


def model_facts(spec: ArchSpec, config: dict) -> ModelFacts:
    """The model-level facts llama.cpp's recipes read (layer count, GQA ratio, its 70B type)."""
    n_layers = config_int(config, "num_hidden_layers")
    heads = config_int(config, "num_attention_heads")
    kv = config_int(config, "num_key_value_heads", heads)
    # llama.cpp: an 80-layer llama with grouped kv heads, or any 80-layer qwen2, is LLM_TYPE_70B
    is_70b = n_layers == 80 and (spec.gguf_name != "llama" or heads != kv)
    return ModelFacts(n_layers=n_layers, n_gqa=heads // kv if heads % kv == 0 else 1, is_70b=is_70b)


def plan_tensors(spec: ArchSpec, config: dict, store: WeightStore, recipe: Recipe, pure: bool, *,
                 has_imatrix: bool = False) -> TensorPlan:
    """Every output tensor in file order, each checked against the config and typed by the recipe.

    has_imatrix: the run quantizes with an importance matrix, which changes llama.cpp's plan
    (q4_0/q5_0 put the first eighth of ffn_down in q4_1/q5_1).
    """
    n_layers = config_int(config, "num_hidden_layers")
    facts = dataclasses.replace(model_facts(spec, config), has_imatrix=has_imatrix)
    has_head = _has_own_head(spec, config, store)
    checkpoint = _checkpoint_names(spec, config, store, n_layers, has_head)
    shapes = _expected_shapes(spec, config, checkpoint)

    def typed(gguf_name: str, shape: tuple[int, ...], is_head: bool) -> PlannedTensor:
        choice = choose_type(gguf_name, shape, recipe, facts, pure=pure, is_head=is_head)
        return PlannedTensor(gguf_name, shape, choice.ggml_type, choice.note)

    entries = []
    for gguf_name, values in (spec.generated_tensors(config) if spec.generated_tensors else {}).items():
        values = np.ascontiguousarray(values, dtype=np.float32)
        entries.append(PlanEntry(typed(gguf_name, values.shape, False), None, tensor_role(gguf_name),
                                 layer_index(gguf_name), values=values))
    for n, layer in checkpoint:
        shape = store.shape(n)
        if n in shapes and shape != shapes[n]:
            raise LlmquantError(f"{n} has shape {list(shape)} but config.json implies {list(shapes[n])}")
        is_head = n == spec.head or (n == spec.embed and not has_head)
        gguf_name = spec.gguf_tensor_name(n, n_layers)
        entries.append(PlanEntry(typed(gguf_name, shape, is_head), n, tensor_role(gguf_name), layer,
                                 by_rows=n in (spec.embed, spec.head)))
    return TensorPlan(tuple(entries), n_layers)


def _has_own_head(spec: ArchSpec, config: dict, store: WeightStore) -> bool:
    """Whether the model's output head is a tensor of its own, as transformers decides it.

    tie_word_embeddings (where config.json omits it, the default of the architecture's config
    class: ``spec.tie_default``) ties the head to the embedding unless the checkpoint holds a head
    with other values; untied, the head must be in the checkpoint (transformers would draw a
    random one).
    """
    tied = config.get("tie_word_embeddings", spec.tie_default)
    if spec.head not in store:
        if not tied:
            said = "has tie_word_embeddings=false" if "tie_word_embeddings" in config else \
                f"omits tie_word_embeddings, which for {(config.get('architectures') or spec.hf_architectures)[0]} means false"
            raise LlmquantError(f"tensor {spec.head} is missing from the checkpoint, and config.json {said}: "
                                "transformers would give the model a random output head")
        return False
    return not tied or not store.same_values(spec.embed, spec.head)


def _checkpoint_names(spec: ArchSpec, config: dict, store: WeightStore, n_layers: int,
                      has_head: bool) -> list[tuple[str, int | None]]:
    """(HF name, layer index) of every checkpoint tensor the file holds, in file order; the rest checked."""
    names: list[tuple[str, int | None]] = [(spec.embed, None)]
    for i in range(n_layers):
        names += [(n, i) for n in spec.layer_names(i, store.__contains__)]
    names.append((spec.final_norm, None))
    if has_head:
        names.append((spec.head, None))
    for n in (spec.embed, spec.final_norm):
        if n not in store:
            raise LlmquantError(f"tensor {n} is missing from the checkpoint")
    vocab, hidden = config_int(config, "vocab_size"), config_int(config, "hidden_size")
    if store.shape(spec.embed) != (vocab, hidden):
        raise LlmquantError(
            f"{spec.embed} has shape {list(store.shape(spec.embed))} but config.json says vocab_size={vocab}, hidden_size={hidden}"
        )
    if f"{spec.layer_prefix.format(i=n_layers)}{spec.layer_tensors[0]}" in store:
        raise LlmquantError(f"the checkpoint has more layers than num_hidden_layers={n_layers} in config.json")
    _check_every_tensor_used(spec, store, {n for n, _ in names}, tied=spec.head in store and not has_head)
    return names


def _expected_shapes(spec: ArchSpec, config: dict, names: list[tuple[str, int | None]]) -> dict[str, tuple[int, ...]]:
    """The HF shape config.json implies for each planned checkpoint tensor it says anything about."""
    vocab, hidden = config_int(config, "vocab_size"), config_int(config, "hidden_size")
    layer_shapes = spec.layer_shapes(config) if spec.layer_shapes else {}
    expected = {spec.final_norm: (hidden,), spec.head: (vocab, hidden)}
    for n, i in names:
        if i is not None:
            rel = n[len(spec.layer_prefix.format(i=i)):]
            if rel in layer_shapes:
                expected[n] = layer_shapes[rel]
    return expected


def _check_every_tensor_used(spec: ArchSpec, store: WeightStore, written: set[str], tied: bool) -> None:
    """Every checkpoint tensor is written or skipped on purpose (said in a warning); else stop, naming it.

    A tensor the layout does not hold (an o_proj bias of a qwen2, a q_norm of a llama, ...) changes what
    the model computes: dropping it silently would give a file that runs, and computes another model.
    """
    skipped: dict[str, list[str]] = {}
    unknown = []
    for name in store.entries:
        if name in written:
            continue
        why = "the embedding's values: tie_word_embeddings ties the head to it" if tied and name == spec.head \
            else spec.skip_reason(name)
        if why is None:
            unknown.append(name)
        else:
            skipped.setdefault(why, []).append(name)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise LlmquantError(f"tensor {unknown[0]}{more} of the checkpoint has no place in llama.cpp's {spec.gguf_name} "
                            "layout; refusing to write a file that would compute a different model")
    for why, names in skipped.items():
        warnings.warn(f"not written: {names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''} ({why})",
                      stacklevel=4)
