"""Q3_K: 3-bit signed codes, 16 sub-blocks of 16 sharing a 6-bit signed scale.

``rtn_torch`` repeats llama.cpp's quantizer operation for operation, so a
round-to-nearest file is byte-identical with ``llama-quantize``'s and the
GPTQ/AWQ gains measured on q3_K are gains over llama.cpp itself:

* without an importance matrix, ``quantize_row_q3_K_ref``: each sub-block's
  scale from ``make_q3_quants`` (coordinate descent on an ``x²``-weighted
  error), the 16 scales mapped onto [-32, 31] by the largest one;
* with one, ``quantize_row_q3_K_impl``: sub-block scales from the weighted
  ``make_qx_quants``, and the super-scale from a second ``make_qx_quants``
  over the 16 scales themselves (weighted by each sub-block's total weight).

Both then re-round every weight on the final fp16 grid ``d·sc``, keeping the
search's codes only where that product is 0.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import torch_grid as tg
from .base import QuantBlocks, f16_bytes, f16_from_bytes
from .kquant import QK_K, Ideal, KQuantFormat, SuperGrid
from .qx_search import make_q3_quants
from .torch_grid import Projection

# block_q3_K, 110 bytes:
#
#   byte 0          32                    96             108  110
#        +----------+---------------------+--------------+----+
#        | hmask    | qs                  | scales       | d  |
#        +----------+---------------------+--------------+----+
#          32 bytes   64 bytes              12 bytes      fp16
#
#   element j (j = 0..255) of sub-block j / 16 stores q = code + 4 in [0, 7];
#   w = (d * sc[j / 16]) * code
#
#   high bit of q, element j = 32*b + k  (b = 0..7, k = 0..31):
#
#                    bit 7   bit 6         bit 1   bit 0
#                  +-------+-------+-----+-------+-------+
#       hmask[k] = | b = 7 | b = 6 | ... | b = 1 | b = 0 |
#                  +-------+-------+-----+-------+-------+
#
#   low 2 bits of q, element j = 128*h + 32*s + k  (h = 0..1, s = 0..3, k = 0..31):
#
#                    bit 7 6   5 4     3 2     1 0
#                  +-------+-------+-------+-------+
#    qs[32h + k] = | s = 3 | s = 2 | s = 1 | s = 0 |
#                  +-------+-------+-------+-------+
#
#   sub-scale j (j = 0..15) as u[j] = sc + 32 in [0, 63], 6 bits:
#
#                    bit 7  4 3  0
#                  +------+------+
#      scales[i] = |u[i+8]| u[i] |                     bits 0-3 of u,  i = 0..7
#                  +------+------+
#
#                    bit 7 6   5 4     3 2     1 0
#                  +-------+-------+-------+-------+
#    scales[8+i] = |u[i+12]| u[i+8]| u[i+4]|  u[i] |   bits 4-5 of u,  i = 0..3
#                  +-------+-------+-------+-------+


class Q3_K(KQuantFormat, qtype=GGMLQuantizationType.Q3_K):
    sub_size: ClassVar[int] = 16
    qmin: ClassVar[int] = -4
    qmax: ClassVar[int] = 3
    has_min: ClassVar[bool] = False
    sc_min: ClassVar[int] = -32
    sc_max: ClassVar[int] = 31

    @classmethod
    def search(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> Ideal:
        """llama.cpp's per-sub-block scale search, before the 6-bit projection.

        blocks: float32 [n, 256]; importance: float32 [n, 256] imatrix of each
        column, or None (``make_q3_quants``; with it the weighted ``make_qx_quants``).
        """
        x = blocks.to(torch.float32).reshape(-1, QK_K)
        n = x.shape[0]
        if importance is None:
            codes, scales = make_q3_quants(x.reshape(n * 16, 16), 4)
            return Ideal(codes, scales)
        x2 = x * x
        sigma2 = (tg.const(2.0, x) * tg.row_sum(x2)) / tg.const(float(QK_K), x)
        weight = (importance.to(torch.float32).reshape(n, QK_K) * tg.sqrt(sigma2[:, None] + x2)).reshape(n * 16, 16)
        codes, scales = tg.make_qx_quants(x.reshape(n * 16, 16), 4, weight)
        return Ideal(codes, scales, weights=tg.row_sum(weight))

    @classmethod
    def project(cls, scales: torch.Tensor, mins: torch.Tensor | None = None,
                importance: torch.Tensor | None = None, *, saturate: bool = True) -> Projection:
        """Signed 6-bit sc in [-32, 31] under an fp16 d (see ``KQuantFormat.project``).

        Without importance the signed largest sub-scale lands on -32
        (``d = max/-32``; an all-zero super-block gets d = 0, sc = -32); with it
        a second ``make_qx_quants`` over the 16 sub-scales weighted by it.
        """
        cls._check_mins(mins)
        s = cls._sub_rows(scales)
        if importance is None:
            _, max_s = tg.signed_max(s)
            live = max_s != 0
            iscale = tg.const(-32.0, s) / torch.where(live, max_s, tg.const(1.0, s))
            l8 = tg.int8_wrap(tg.nearest_int(iscale[:, None] * s))  # C: int8_t l = nearest_int(...)
            sc = torch.where(live[:, None], l8.clamp(-32, 31), -32)
            d = torch.where(live, tg.f16_round(tg.const(1.0, s) / iscale, saturate), tg.const(0.0, s))
        else:
            sc, d = tg.make_qx_quants(s, 32, cls._sub_rows(importance))
            d = tg.f16_round(d, saturate)
        return cls._projection(d, sc)

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        g = q.grid
        n = g.d.shape[0]
        u = (q.codes.reshape(n, QK_K) + 4).astype(np.uint8)
        bit = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        hmask = np.bitwise_or.reduce((u >> np.uint8(2)).reshape(n, 8, 32) << bit, axis=1)
        shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
        qs = np.bitwise_or.reduce((u & np.uint8(3)).reshape(n, 2, 4, 32) << shift, axis=2).reshape(n, 64)
        s = (g.sc + 32).astype(np.uint8)
        low = (s[:, :8] & np.uint8(0x0F)) | ((s[:, 8:] & np.uint8(0x0F)) << np.uint8(4))
        shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)
        high = np.bitwise_or.reduce((s >> np.uint8(4)).reshape(n, 4, 4) << shift, axis=1)
        return np.concatenate([hmask, qs, low, high, f16_bytes(g.d)], axis=1)

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        n = u8.shape[0]
        hmask, qs, low, high = u8[:, :32], u8[:, 32:96], u8[:, 96:104], u8[:, 104:108]
        bit = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        hb = (hmask[:, None, :] >> bit) & np.uint8(1)  # [n, 8, 32]: element 32·b + k
        shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
        lb = (qs.reshape(n, 2, 1, 32) >> shift) & np.uint8(3)  # [n, 2, 4, 32]: 128·h + 32·s + k
        codes = (lb.reshape(n, QK_K).astype(np.int16) | (hb.reshape(n, QK_K).astype(np.int16) << 2)) - 4
        shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)
        s = np.concatenate([low & np.uint8(0x0F), low >> np.uint8(4)], axis=1).astype(np.int16)
        s |= (((high[:, None, :] >> shift) & np.uint8(3)).reshape(n, 16).astype(np.int16)) << 4
        grid = SuperGrid(d=f16_from_bytes(u8[:, 108:110]), sc=s - 32)
        return cls.make(codes, grid)
