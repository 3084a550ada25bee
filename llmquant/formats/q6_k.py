"""Q6_K: 6-bit signed codes, 16 sub-blocks of 16 sharing an int8 scale.

``rtn_torch`` repeats llama.cpp's ``quantize_row_q6_K_ref`` (no importance matrix)
and ``quantize_row_q6_K_impl`` (with one) operation for operation, so that a
round-to-nearest q6_K file is byte-identical with ``llama-quantize``'s: each
sub-block's scale comes from ``make_qx_quants`` (weighted by ``x²`` or by the
imatrix column), the 16 scales are mapped onto int8 by the largest one
(``d = max / -128``), and every weight is re-rounded on the final fp16 grid.

The two paths differ only in the search weights; llama.cpp deliberately
feeds the imatrix values unscaled to q6_K (its ``sigma2`` weighting is left
commented out), unlike q3_K.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import torch_grid as tg
from .base import QuantBlocks, f16_bytes, f16_from_bytes
from .kquant import QK_K, Ideal, KQuantFormat, SuperGrid
from .torch_grid import Projection

# block_q6_K, 210 bytes:
#
#   byte 0                 128          192        208  210
#        +-----------------+------------+----------+----+
#        | ql              | qh         | scales   | d  |
#        +-----------------+------------+----------+----+
#          128 bytes         64 bytes     16 x int8  fp16
#
#   stored value q = code + 32 in [0, 63]; w = (d * scales[j / 16]) * code
#
#   element j = 128*h + 32*s + k  (h = 0..1, s = 0..3, k = 0..31), of sub-block j / 16:
#
#   low 4 bits of q:
#                           bit 7    4 3    0
#                         +--------+--------+
#      ql[64h + k]      = | s = 2  | s = 0  |
#      ql[64h + 32 + k] = | s = 3  | s = 1  |
#                         +--------+--------+
#
#   high 2 bits of q:
#                           bit 7 6   5 4     3 2     1 0
#                         +-------+-------+-------+-------+
#      qh[32h + k]      = | s = 3 | s = 2 | s = 1 | s = 0 |
#                         +-------+-------+-------+-------+


class Q6_K(KQuantFormat, qtype=GGMLQuantizationType.Q6_K):
    sub_size: ClassVar[int] = 16
    qmin: ClassVar[int] = -32
    qmax: ClassVar[int] = 31
    has_min: ClassVar[bool] = False
    sc_min: ClassVar[int] = -128
    sc_max: ClassVar[int] = 127

    @classmethod
    def search(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> Ideal:
        """llama.cpp's per-sub-block scale search (``make_qx_quants``, weighted by x²
        or by the imatrix column), before the int8 projection.

        blocks: float32 [n, 256]; importance: float32 [n, 256] imatrix of each column, or None.
        """
        x = blocks.to(torch.float32).reshape(-1, 16)
        qw = None if importance is None else importance.to(torch.float32).reshape(-1, 16)
        codes, scales = tg.make_qx_quants(x, 32, qw)
        return Ideal(codes, scales)

    @classmethod
    def project(cls, scales: torch.Tensor, mins: torch.Tensor | None = None,
                importance: torch.Tensor | None = None, *, saturate: bool = True) -> Projection:
        """int8 sc under an fp16 d: the signed largest sub-scale lands on -128 (``d = max/-128``).

        Both of llama.cpp's paths project this way, so ``importance`` is ignored.
        A super-block whose sub-scales are all below 1e-15 in magnitude gets d = 0, sc = 0.
        """
        cls._check_mins(mins)
        s = cls._sub_rows(scales)
        max_abs, max_s = tg.signed_max(s)
        empty = max_abs < tg.GROUP_MAX_EPS  # C: memset(0) of the whole block
        iscale = tg.const(-128.0, s) / torch.where(empty, tg.const(1.0, s), max_s)
        d = torch.where(empty, tg.const(0.0, s), tg.f16_round(tg.const(1.0, s) / iscale, saturate))
        # C: int8 field = MIN(127, nearest_int(...)), no lower clamp
        sc = tg.int8_wrap(torch.clamp_max(tg.nearest_int(iscale[:, None] * s), 127))
        return cls._projection(d, torch.where(empty[:, None], 0, sc))

    @classmethod
    def codes_on_grid(cls, x: torch.Tensor, ideal: Ideal, p: Projection) -> torch.Tensor:
        """``KQuantFormat.codes_on_grid``, and a super-block whose ideal sub-scales are all below
        1e-15 in magnitude is stored zeroed: codes -32 (with d = 0, sc = 0 from ``project``), C's memset."""
        codes = super().codes_on_grid(x, ideal, p).reshape(-1, QK_K)
        empty = tg.signed_max(ideal.scales.reshape(-1, 16))[0] < tg.GROUP_MAX_EPS
        return torch.where(empty[:, None], cls.qmin, codes).reshape(-1, cls.sub_size)

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        g = q.grid
        n = g.d.shape[0]
        u = (q.codes.reshape(n, 2, 4, 32) + 32).astype(np.uint8)  # [n, h, s, k]
        lo = u & np.uint8(0x0F)
        ql = (lo[:, :, :2] | (lo[:, :, 2:] << np.uint8(4))).reshape(n, 128)
        shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
        qh = np.bitwise_or.reduce((u >> np.uint8(4)) << shift, axis=2).reshape(n, 64)
        sc = g.sc.astype(np.int8).view(np.uint8)
        return np.concatenate([ql, qh, sc, f16_bytes(g.d)], axis=1)

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        n = u8.shape[0]
        ql = u8[:, :128].reshape(n, 2, 2, 32)  # [n, h, s & 1, k]
        lo = np.concatenate([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=2)  # [n, h, s, k]
        shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
        hi = (u8[:, 128:192].reshape(n, 2, 1, 32) >> shift) & np.uint8(3)
        codes = (lo.astype(np.int16) | (hi.astype(np.int16) << 4)).reshape(n, QK_K) - 32
        sc = np.ascontiguousarray(u8[:, 192:208]).view(np.int8).astype(np.int16)
        return cls.make(codes, SuperGrid(d=f16_from_bytes(u8[:, 208:210]), sc=sc))
