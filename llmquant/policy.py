"""Which ggml type each tensor gets: llama.cpp's own choices, or ``pure``.

Without ``pure`` we follow ``llama_tensor_get_type`` for the types llmquant
writes, so a file differs from llama.cpp's only where our method chose other
codes: 1-D tensors stay f32; the output head (or the tied token embedding that
serves as the head) is raised to q6_K unless the type is q8_0, falling back to
q8_0 where a row is not a multiple of 256. Until q6_K lands in ``formats/``
llmquant writes q8_0 there and says so in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
ALL_TYPES = FLOAT_TYPES + QUANT_TYPES

FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
}


@dataclass(frozen=True)
class TypeChoice:
    ggml_type: str
    note: str = ""


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name.upper()]


def choose_type(gguf_name: str, shape: tuple[int, ...], base: str, *, pure: bool, is_head: bool) -> TypeChoice:
    """The type for one tensor.

    shape is the HF (numpy) shape, rows last: [co, ci]; is_head marks the
    output head, or the token embedding when it is tied to the head.
    """
    if len(shape) < 2 or base == "f32":
        return TypeChoice("f32")
    if base in ("f16", "bf16"):
        return TypeChoice(base)
    row = shape[-1]
    target = base
    note = ""
    if is_head and not pure and base != "q8_0":
        if row % 256 == 0:
            note = "llama.cpp would use q6_K; llmquant writes q8_0 until q6_K lands"
        target = "q8_0"
    block = gguf.GGML_QUANT_SIZES[ggml_type(target)][0]
    if row % block != 0:
        return TypeChoice("f16", f"row of {row} is not a multiple of {block}: f16 instead of {target}")
    return TypeChoice(target, note)
