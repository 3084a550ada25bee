"""Q2_K: sixteen 16-wide sub-blocks of 2-bit codes with 4-bit scales and mins.

With only four levels per weight, the choice of each sub-block's scale and
min decides most of the error, so llama.cpp searches for them (absolute
error weighted by |x| without an importance matrix, squared error weighted
by the imatrix with one). ``rtn_torch`` follows ``quantize_row_q2_K_ref`` /
``quantize_row_q2_K_impl`` operation for operation so that round-to-nearest
files are byte-identical with ``llama-quantize``'s.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import torch_grid as tg
from .base import QuantBlocks, f16_bytes, f16_from_bytes
from .kquant import QK_K, Ideal, KQuantFormat, SuperGrid
from .qkx_search import make_qkx_quants
from .torch_grid import Projection

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
    def search(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> Ideal:
        """llama.cpp's per-sub-block scale/min search, before the 4-bit projection.

        blocks: float32 [n, 256]; importance: float32 [n, 256], the imatrix of each
        super-block's columns, or None (``quantize_row_q2_K_ref``: |x|-weighted
        absolute error; with it ``quantize_row_q2_K_impl``: weighted squared error).
        """
        x = blocks.to(torch.float32).reshape(-1, QK_K)
        n = x.shape[0]
        xs = x.reshape(n * 16, 16)
        if importance is None:
            levels, scales, the_min = make_qkx_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
            return Ideal(levels, scales, -the_min)
        qw = importance.to(torch.float32).reshape(n * 16, 16)
        sigma2 = tg.row_sum(x * x) / tg.const(float(QK_K), x)
        weights = qw * tg.sqrt(sigma2.repeat_interleave(16)[:, None] + xs * xs)
        levels, scales, the_min = make_qkx_quants(xs, weights, 3, -0.9, 0.05, 36, False)
        return Ideal(levels, scales, -the_min, tg.row_sum(weights))

    @classmethod
    def project(cls, scales: torch.Tensor, mins: torch.Tensor | None = None,
                importance: torch.Tensor | None = None, *, saturate: bool = True) -> Projection:
        """4-bit sc and m under fp16 d, dmin (see ``KQuantFormat.project``).

        Without importance: ``d = max/15``, ``sc = nearest_int(15/max · s)``;
        with it, ``make_qp_quants`` weighted by it. Positive ideal mins (which
        unsigned m cannot hold) count as 0; so do negative ideal scales, except
        with ``saturate=False`` (rtn), where they wrap through the uint8 fields
        as in C (an imatrix search can fit a negative scale).
        """
        cls._check_mins(mins)
        s, t = cls._unsigned_rows(scales, mins, saturate)
        if importance is None:
            fifteen, zero = tg.const(15.0, s), tg.const(0.0, s)
            max_s, max_m = tg.running_max(s), tg.running_max(t)
            has_s, has_m = max_s > 0, max_m > 0
            # C writes sc, then ORs m << 4 into the same byte
            ls = torch.where(has_s[:, None], tg.nearest_int(fifteen / max_s[:, None] * s) & 0xFF, 0)
            lm = torch.where(has_m[:, None], (tg.nearest_int(fifteen / max_m[:, None] * t) << 4) & 0xFF, 0)
            byte = ls | lm
            d = torch.where(has_s, tg.f16_round(max_s / fifteen, saturate), zero)
            dmin = torch.where(has_m, tg.f16_round(max_m / fifteen, saturate), zero)
        else:
            w = cls._sub_rows(importance)
            ls, d = tg.make_qp_quants(s, w, 15)
            lm, dmin = tg.make_qp_quants(t, w, 15)
            byte = (ls | (lm << 4)) & 0xFF
            d, dmin = tg.f16_round(d, saturate), tg.f16_round(dmin, saturate)
        return cls._projection(d, byte & 0x0F, dmin, byte >> 4)

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
