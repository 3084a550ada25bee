"""Q8_0: one fp16 scale per 32 signed bytes, llama.cpp's near-lossless type.

Kept byte-identical with ``quantize_row_q8_0_ref`` so that an ``rtn`` file
from llmquant and one from ``llama-quantize`` / ``gguf.quants`` agree, which
is what makes our own GPTQ/AWQ results comparable with llama.cpp's.

Grid: the layout stores the code as an ``int8``, and llama.cpp dequantizes
every value of it, -128 included, as ``d * code`` (its x86 ``sign_epi8`` dot
product takes the weight's sign from the weight itself, so -128 is fine on the
weight side). So ``qmin = -128`` here, for methods that may move a weight
past the reference extreme. The reference quantizer itself is symmetric: it
sets ``d = amax / 127`` and ``roundf`` never produces -128, so ``rtn`` codes
stay in [-127, 127].
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import torch_grid as tg
from .base import BlockFormat, QuantBlocks, block_array, f16_from_bytes
from .q4 import legacy_rows, reciprocal, stored
from .torch_grid import Projection

# block_q8_0, 34 bytes:
#
#   byte  0      2                                     34
#         +------+-------------------------------------+
#         |  d   | qs[0] qs[1] ...             qs[31]  |
#         +------+-------------------------------------+
#          fp16    int8 code of element j at byte 2 + j
#
#   w[j] = d * qs[j]


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` for |v| < 2**23: nearest integer, ties away from zero (not torch's to-even).

    ``trunc(|v| + h)`` with h the float just below 0.5: with 0.5 itself,
    0.49999997f + 0.5f rounds up to 1; with h every tie k + 0.5 still reaches
    k + 1 and nothing below a tie does (q8_0's |v| is at most 127). One new
    tensor, where splitting the fraction off takes three.
    """
    a = v.abs()
    return a.add_(tg.const(_BELOW_HALF, a)).trunc_().copysign_(v)


_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


class Q8_0(BlockFormat, qtype=GGMLQuantizationType.Q8_0):
    qmin = -128
    qmax = 127
    has_min = False

    @classmethod
    def rtn_torch(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Projection]:
        x = legacy_rows(cls, blocks, importance)
        d = tg.abs_max(x) / tg.const(127.0, x)
        return roundf(x * reciprocal(d)[:, None]).to(torch.int32), stored(d)

    @classmethod
    def rtn_weighted_torch(cls, rows: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, Projection]:
        """llama.cpp's ``quantize_q8_0`` ignores an importance matrix: the reference rule."""
        return cls.rtn_torch(rows.reshape(-1, cls.block_size))

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        out, body = block_array(q.codes.shape[0], cls.type_size, q.scales)
        np.copyto(body.view(np.int8), q.codes, casting="unsafe")  # in range (check): exact, no concatenation
        return out

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        codes = np.ascontiguousarray(u8[:, 2:]).view(np.int8).astype(np.int16)
        return QuantBlocks(codes=codes, scales=f16_from_bytes(u8[:, :2]))
