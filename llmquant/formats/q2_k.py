"""Q2_K: sixteen 16-wide sub-blocks of 2-bit codes with 4-bit scales and mins.

With only four levels per weight, the choice of each sub-block's scale and
min decides most of the error, so llama.cpp searches for them (absolute
error weighted by |x| without an importance matrix, squared error weighted
by the imatrix with one). ``rtn`` follows ``quantize_row_q2_K_ref`` /
``quantize_row_q2_K_impl`` operation for operation so that round-to-nearest
files are byte-identical with ``llama-quantize``'s.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .base import QuantBlocks, f16_bytes, f16_exact, f16_from_bytes
from .kquant import QK_K, KQuantFormat, SuperGrid, nearest_int
from .qkx_search import F32, make_qkx_quants, make_qp_quants, requantize, row_sum, running_max

# block_q2_K, 84 bytes:
#
#   byte 0            16                          80    82     84
#        +------------+---------------------------+-----+------+
#        | scales[16] | qs[64]                    |  d  | dmin |
#        +------------+---------------------------+-----+------+
#                                                  fp16  fp16
#
#                  bit 7     4 3      0
#                  +--------+--------+
#   scales[j] =    |  m[j]  | sc[j]  |       (sub-block j = 0..15)
#                  +--------+--------+
#
#   the 256 codes go in two 128-wide halves h = 0..1; byte l (l = 0..31)
#   of half h holds code 128h + 32k + l in bits 2k, 2k+1 (k = 0..3):
#
#                  bit 7     6 5     4 3     2 1     0
#                  +--------+--------+--------+--------+
#   qs[32h + l] =  | q[+96] | q[+64] | q[+32] | q[+0]  |    (q[+o] = code 128h + o + l)
#                  +--------+--------+--------+--------+
#
#   w = (d·sc[j])·q − dmin·m[j],  q in [0, 3]


class Q2_K(KQuantFormat, qtype=GGMLQuantizationType.Q2_K):
    sub_size = 16
    qmin = 0
    qmax = 3
    has_min = True
    sc_min = 0
    sc_max = 15
    m_max = 15

    @classmethod
    def rtn(cls, blocks: np.ndarray, importance: np.ndarray | None = None) -> QuantBlocks:
        """float32 [n, 256] (and importance float32 [n, 256], the imatrix of
        each super-block's columns) -> QuantBlocks of n·16 sub-blocks."""
        x = np.asarray(blocks, dtype=F32).reshape(-1, QK_K)
        n = x.shape[0]
        xs = x.reshape(n * 16, 16)
        if importance is None:
            levels, scales, mins = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
            scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
            max_scale, max_min = running_max(scales), running_max(mins)
            has_s, has_m = (max_scale > 0)[:, None], (max_min > 0)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):  # 15/0 where C skips the block
                byte = np.where(has_s, nearest_int(F32(15) / max_scale[:, None] * scales) & 0xFF, 0)
                byte = byte | np.where(has_m, (nearest_int(F32(15) / max_min[:, None] * mins) << 4) & 0xFF, 0)
            d = np.where(max_scale > 0, f16_exact(max_scale / F32(15)), F32(0))
            dmin = np.where(max_min > 0, f16_exact(max_min / F32(15)), F32(0))
        else:
            qw = np.asarray(importance, dtype=F32)
            if qw.shape != x.shape:
                raise ValueError(f"{cls.name}: importance must be [{n}, 256] like the blocks, not {qw.shape}")
            qw = qw.reshape(n * 16, 16)
            sigma2 = row_sum((x * x).T) / F32(QK_K)
            weights = qw * np.sqrt(np.repeat(sigma2, 16)[:, None] + xs * xs)
            sw = row_sum(weights.T).reshape(n, 16)
            levels, scales, mins = make_qkx_quants(xs, weights, 3, -0.9, 0.05, 36, False)
            ls, d = make_qp_quants(scales.reshape(n, 16), sw, 15)
            lm, dmin = make_qp_quants(mins.reshape(n, 16), sw, 15)
            byte = (ls.astype(np.int32) | (lm.astype(np.int32) << 4)) & 0xFF
            d, dmin = f16_exact(d), f16_exact(dmin)
        sc, m = (byte & 0x0F).astype(np.int16), (byte >> 4).astype(np.int16)
        eff_d = (d[:, None] * sc.astype(F32)).reshape(-1)
        eff_m = (dmin[:, None] * m.astype(F32)).reshape(-1)
        codes = requantize(xs, levels, eff_d, eff_m, 3)
        return cls.make(codes, SuperGrid(d=d.astype(F32), sc=sc, dmin=dmin.astype(F32), m=m))

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        g = q.grid
        scales = g.sc.astype(np.uint8) | (g.m.astype(np.uint8) << np.uint8(4))
        c = q.codes.astype(np.uint8).reshape(-1, 2, 4, 32)  # [n, half, k, l]
        qs = (
            c[:, :, 0]
            | (c[:, :, 1] << np.uint8(2))
            | (c[:, :, 2] << np.uint8(4))
            | (c[:, :, 3] << np.uint8(6))
        )
        return np.concatenate([scales, qs.reshape(-1, 64), f16_bytes(g.d), f16_bytes(g.dmin)], axis=1)

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        scales = u8[:, :16]
        qs = u8[:, 16:80].reshape(-1, 2, 1, 32)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        codes = ((qs >> shifts) & np.uint8(3)).reshape(-1, QK_K).astype(np.int16)
        grid = SuperGrid(
            d=f16_from_bytes(u8[:, 80:82]),
            sc=(scales & np.uint8(0x0F)).astype(np.int16),
            dmin=f16_from_bytes(u8[:, 82:84]),
            m=(scales >> np.uint8(4)).astype(np.int16),
        )
        return cls.make(codes, grid)
