"""llama.cpp's file-type recipes: our per-tensor plan equals llama_tensor_get_type's, tensor for tensor.

The oracle is llama.cpp itself: our f32 file goes through ``llama_model_quantize``
with each file type, and the type of every tensor it wrote is compared with the
type our plan gives that tensor. The tiny llama has 16+ layers (so the
use_more_bits / first-eighth / first-sixteenth layer patterns show), rows that
are multiples of 256 (k-quants apply) except its 576-wide ffn_down rows (fallbacks
apply), an untied head, and GQA 4 (Q2_K's attn_v rule); the default model has
GQA 3, a tied head and 576-wide rows.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from tiny import build_tiny_model

from llmquant import quantize
from llmquant.errors import LlmquantError
from llmquant.export.arch import get_arch
from llmquant.loading.source import read_config
from llmquant.loading.weights import WeightStore
from llmquant.plan import plan_tensors
from llmquant.policy import RECIPES, get_recipe

K_RECIPES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]


def llama_cpp_types(src: Path, dst: Path, recipe: str, pure: bool = False) -> dict[str, str]:
    """The type llama.cpp gives every tensor of ``src`` for ``recipe``, from its own dry run.

    ``llama_model_quantize`` with ``dry_run`` decides every tensor's type exactly as
    a real run does and logs it (``[  3/ 272] blk.0.attn_v.weight - [...], type =
    f32, size = ... -> ... (q6_K)``; no parenthesis: kept as it is), without
    quantizing anything; the log is read through llama.cpp's own log callback.
    """
    import ctypes
    import re

    import llama_cpp
    from llama_cpp import _logger

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        chunks.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(RECIPES[recipe].file_type)
    params.pure = pure
    params.dry_run = True
    params.nthread = 1
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    assert not dst.exists()  # a dry run writes nothing
    found = re.findall(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =[^\n]*?(?:\((\w+)\))?\n", "".join(chunks))
    return {name: (new or old).lower() for name, old, new in found}


def our_types(model: Path, recipe: str, pure: bool = False) -> dict[str, str]:
    config = read_config(model)
    plan = plan_tensors(get_arch(config), config, WeightStore(model), get_recipe(recipe), pure)
    return {t.name: t.type for t in plan.tensors}


@pytest.fixture(scope="module")
def deep_k(smollm2_dir, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("recipes")
    model = build_tiny_model(d / "deep", "llama", smollm2_dir, hidden=256, layers=17, tied=False,
                             intermediate=576, heads=8, kv_heads=2)
    f32 = d / "deep-f32.gguf"
    quantize(model, f32, type="f32", progress=False)
    return model, f32


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_dir, tmp_path_factory) -> Path:
    f32 = tmp_path_factory.mktemp("recipes-smol") / "smollm2-f32.gguf"
    quantize(smollm2_dir, f32, type="f32", progress=False)
    return f32


def _diff(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    assert ours.keys() == theirs.keys()
    return [f"{n}: ours {ours[n]}, llama.cpp {theirs[n]}" for n in ours if ours[n] != theirs[n]]


@pytest.mark.parametrize("recipe", K_RECIPES + ["q4_0", "q8_0", "q5_1"])
def test_plan_equals_llama_cpp_on_a_deep_model(recipe, deep_k, tmp_path):
    model, f32 = deep_k
    assert _diff(our_types(model, recipe), llama_cpp_types(f32, tmp_path / "q.gguf", recipe)) == []


@pytest.mark.parametrize("recipe", K_RECIPES + ["q4_0"])
def test_plan_equals_llama_cpp_on_the_default_model(recipe, smollm2_dir, smollm2_f32, tmp_path):
    ours = our_types(smollm2_dir, recipe)
    assert _diff(ours, llama_cpp_types(smollm2_f32, tmp_path / "q.gguf", recipe)) == []


def test_pure_plan_equals_llama_cpp(deep_k, tmp_path):
    model, f32 = deep_k
    assert _diff(our_types(model, "q4_k_m", pure=True), llama_cpp_types(f32, tmp_path / "q.gguf", "q4_k_m", True)) == []


def test_recipe_names_any_case_and_aliases():
    assert get_recipe("Q4_K_M") is RECIPES["q4_k_m"]
    assert get_recipe("q4_k") is RECIPES["q4_k_m"]  # llama-quantize's alias
    assert get_recipe("Q6_K").base == "q6_k"
    with pytest.raises(LlmquantError, match="unknown type 'Q4_K_X'; choose one of .*Q4_K_M"):
        get_recipe("Q4_K_X")
    with pytest.raises(LlmquantError, match="activation type"):
        get_recipe("q8_K")


# together these write every k-quant type (q2_K … q6_K) and both kinds of fallback; the plan of
# every other recipe is checked above and the bytes of every type in the format tests
@pytest.mark.parametrize("recipe", ["q2_k", "q3_k_m", "q4_k_m", "q5_k_s"])
def test_rtn_file_is_byte_identical_to_llama_cpp_and_runs(recipe, deep_k, tmp_path):
    """Whole file: the same tensor types and bytes as llama-quantize's, and it generates."""
    import llama_cpp
    import numpy as np

    from llmquant.generate import generate

    model, f32 = deep_k
    ours = tmp_path / "ours.gguf"
    report = quantize(model, ours, type=recipe, progress=False)
    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(RECIPES[recipe].file_type), 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    differ = [n for n in a if a[n].tensor_type != b[n].tensor_type
              or not np.array_equal(a[n].data.view(np.uint8), b[n].data.view(np.uint8))]
    assert differ == []
    weights = {t.type for t in report.tensors if t.name.startswith("blk.")} - {"f32"}
    # the layer patterns and fallbacks really show: the mixtures put several types in the layers
    assert len(weights) >= (2 if recipe == "q5_k_s" else 3), weights
    assert report.file_size == ours.stat().st_size
    assert gguf.GGUFReader(ours).fields["general.file_type"].parts[-1][0] == int(RECIPES[recipe].file_type)
    assert generate(ours, "The capital of France is", max_tokens=4)  # loads and runs in llama.cpp
    # inspect names the same fallbacks the run noted (llama.cpp's own file: the same again)
    from collections import Counter

    from llmquant.inspect_gguf import describe

    noted = Counter(t.note.split(":")[0] for t in report.tensors if t.note)
    for path in (ours, theirs):
        line = [ln for ln in describe(path).splitlines() if "fell back" in ln]
        if noted:
            assert line == ["  fell back (row not a multiple of the type's block): "
                            + ", ".join(f"{k} x{v}" for k, v in sorted(noted.items()))]
        else:
            assert line == [f"  no tensor fell back from the {recipe.upper()} recipe's types"]
