"""Q4_K and Q5_K: eight 32-wide sub-blocks with 6-bit scales and mins.

Both types share the 12-byte packing of sixteen 6-bit integers and the same
quantizer shape (a per-sub-block scale/min search, 6-bit levels of the
results against the super-block maximum, one requantization pass on the
stored grid), differing only in the code width, the search's parameters and
one clamp. ``rtn_torch`` follows llama.cpp operation for operation — without an
importance matrix ``quantize_row_q{4,5}_K_ref``, with one
``quantize_row_q{4,5}_K_impl`` — so that a round-to-nearest file is
byte-identical with ``llama-quantize``'s.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import torch_grid as tg
from .base import QuantBlocks, f16_bytes, f16_from_bytes
from .kquant import QK_K, Ideal, KQuantFormat, SuperGrid
from .qkx_search import make_qkx_quants
from .torch_grid import Projection

# The 12 scale bytes shared by q4_K and q5_K: sc[j] and m[j] (j = 0..7) are
# 6-bit; j < 4 sit whole in bytes 0..7, j >= 4 are split into a low nibble
# (bytes 8..11) and two high bits (the top of bytes 0..7):
#
#                 bit 7  6 5          0
#                +-------+-------------+
#   byte j       |  hs   |   sc[j]     |    hs = sc[j+4] >> 4    (j = 0..3)
#   byte j+4     |  hm   |   m[j]      |    hm = m[j+4] >> 4
#                +-------+-------------+
#                 bit 7    4 3        0
#                +---------+-----------+
#   byte j+8     |  lm     |   ls      |    lm = m[j+4] & 15, ls = sc[j+4] & 15
#                +---------+-----------+


def pack_scale_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """int [n, 8] sub-scales and sub-mins -> uint8 [n, 12].

    Written with C's ``uint8_t`` assignments and ``|=``, so levels above 63
    (which only C's unsigned wrap-around produces) land where C puts them;
    :func:`unpack_scale_min_k4` of the result is C's ``get_scale_min_k4``.
    """
    ls = np.asarray(sc).astype(np.uint8)
    lm = np.asarray(m).astype(np.uint8)
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    six = np.uint8(6)
    return np.concatenate(
        [
            lo_s | ((hi_s >> np.uint8(4)) << six),
            lo_m | ((hi_m >> np.uint8(4)) << six),
            (hi_s & np.uint8(0x0F)) | ((hi_m & np.uint8(0x0F)) << np.uint8(4)),
        ],
        axis=1,
    )


def unpack_scale_min_k4(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 12] -> (sc, m) int16 [n, 8], as ``get_scale_min_k4``."""
    q = np.asarray(field, dtype=np.uint8)
    a, b, c = q[:, 0:4], q[:, 4:8], q[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc.astype(np.int16), m.astype(np.int16)


def _k4_round_trip(v: torch.Tensor) -> torch.Tensor:
    """int [n, 8] levels -> what ``unpack_scale_min_k4(pack_scale_min_k4(...))`` returns for them.

    The identity on [0, 63]; above that C's ``uint8_t`` fields mix the bits the
    way the packing above draws them (sub-scales and sub-mins never share bits).
    """
    u = v & 0xFF
    lo, hi = u[:, :4], u[:, 4:]
    head = (lo | ((hi >> 4) << 6)) & 0xFF  # bytes 0..3 (scales) or 4..7 (mins)
    return torch.cat([head & 63, (hi & 0x0F) | ((head >> 6) << 4)], dim=1)


class _Q45K(KQuantFormat):
    """What Q4_K and Q5_K share: everything but the code bits."""

    sub_size = 32
    qmin = 0
    has_min = True
    sc_min = 0
    sc_max = 63
    m_max = 63
    # quantize_row_q*_K_ref's make_qkx2_quants parameters
    ref_rmin: ClassVar[float]
    ref_nstep: ClassVar[int]
    # quantize_row_q5_K_impl clamps the make_qp_quants levels to 63, q4_K's does not
    impl_clamps: ClassVar[bool]

    @classmethod
    def search(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> Ideal:
        """llama.cpp's per-sub-block scale/min search, before the 6-bit projection.

        blocks: float32 [n, 256]; importance: float32 [n, 256], the imatrix of
        each super-block's columns, or None.
        """
        x = blocks.to(torch.float32).reshape(-1, QK_K)
        n = x.shape[0]
        xs = x.reshape(n * 8, 32)
        if importance is None:
            av_x = tg.sqrt(tg.row_sum(xs * xs) / tg.const(32.0, x))
            weights = av_x[:, None] + xs.abs()
            levels, scales, the_min = make_qkx_quants(xs, weights, cls.qmax, cls.ref_rmin, 0.1, cls.ref_nstep, False)
            return Ideal(levels, scales, -the_min)
        qw = importance.to(torch.float32).reshape(n * 8, 32)
        sigma2 = (tg.const(2.0, x) * tg.row_sum(x * x)) / tg.const(float(QK_K), x)
        weights = qw * tg.sqrt(sigma2.repeat_interleave(8)[:, None] + xs * xs)
        levels, scales, the_min = make_qkx_quants(xs, weights, cls.qmax, -0.9, 0.05, 36, False)
        return Ideal(levels, scales, -the_min, tg.row_sum(weights))

    @classmethod
    def project(cls, scales: torch.Tensor, mins: torch.Tensor | None = None,
                importance: torch.Tensor | None = None, *, saturate: bool = True) -> Projection:
        """6-bit sc and m under fp16 d, dmin (see ``KQuantFormat.project``).

        Without importance: ``d = max/63``, ``sc = min(63, nearest_int(63/max · s))``;
        with it, ``make_qp_quants`` weighted by it (q5_K clamps its levels to 63).
        Levels go through the 12-byte packing as C's ``uint8_t`` fields do.
        Positive ideal mins count as 0; so do negative ideal scales, except with
        ``saturate=False`` (rtn), where they wrap through the uint8 fields as in C
        (an imatrix search can fit a negative scale).
        """
        cls._check_mins(mins)
        s, t = cls._unsigned_rows(scales, mins, saturate)
        if importance is None:
            sixty3, zero = tg.const(63.0, s), tg.const(0.0, s)
            max_s, max_m = tg.running_max(s), tg.running_max(t)
            inv_s = torch.where(max_s > 0, sixty3 / max_s, zero)
            inv_m = torch.where(max_m > 0, sixty3 / max_m, zero)
            ls = torch.clamp_max(tg.nearest_int(inv_s[:, None] * s) & 0xFF, 63)
            lm = torch.clamp_max(tg.nearest_int(inv_m[:, None] * t) & 0xFF, 63)
            d, dmin = tg.f16_round(max_s / sixty3, saturate), tg.f16_round(max_m / sixty3, saturate)
        else:
            w = cls._sub_rows(importance)
            ls, d = tg.make_qp_quants(s, w, 63)
            lm, dmin = tg.make_qp_quants(t, w, 63)
            if cls.impl_clamps:
                ls, lm = torch.clamp_max(ls, 63), torch.clamp_max(lm, 63)
            d, dmin = tg.f16_round(d, saturate), tg.f16_round(dmin, saturate)
        return cls._projection(d, _k4_round_trip(ls), dmin, _k4_round_trip(lm))

    @classmethod
    def pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        """int [n, 256] codes -> uint8 [n, type_size - 16]."""
        raise NotImplementedError

    @classmethod
    def unpack_codes(cls, field: np.ndarray) -> np.ndarray:
        """uint8 [n, type_size - 16] -> int16 [n, 256]."""
        raise NotImplementedError

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        g = q.grid
        codes = q.codes.reshape(-1, QK_K)
        return np.concatenate(
            [f16_bytes(g.d), f16_bytes(g.dmin), pack_scale_min_k4(g.sc, g.m), cls.pack_codes(codes)], axis=1
        )

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        sc, m = unpack_scale_min_k4(u8[:, 4:16])
        grid = SuperGrid(d=f16_from_bytes(u8[:, 0:2]), sc=sc, dmin=f16_from_bytes(u8[:, 2:4]), m=m)
        return cls.make(cls.unpack_codes(u8[:, 16:]), grid)


# block_q4_K, 144 bytes:
#
#   byte 0    2      4            16                         144
#        +----+------+------------+---------------------------+
#        | d  | dmin | scales[12] | qs[128]                   |
#        +----+------+------------+---------------------------+
#         fp16  fp16   (see above)
#
#   the 256 codes go in four 64-wide chunks c = 0..3; byte l (l = 0..31) of
#   chunk c holds code 64c + l (sub-block 2c) and code 64c + 32 + l
#   (sub-block 2c + 1):
#
#                  bit 7          4 3          0
#                  +--------------+--------------+
#   qs[32c + l] =  | q[64c+32+l]  |  q[64c+l]    |
#                  +--------------+--------------+
#
#   w = (d·sc[j])·q − dmin·m[j],  q in [0, 15]


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """int [n, 256] -> uint8 [n, 128], the low 4 bits in q4_K's qs order."""
    c = codes.astype(np.uint8).reshape(-1, 4, 2, 32) & np.uint8(0x0F)
    return (c[:, :, 0] | (c[:, :, 1] << np.uint8(4))).reshape(-1, 128)


def _from_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 128] -> uint8 [n, 256]: inverse of :func:`_nibbles`."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & np.uint8(0x0F), q >> np.uint8(4)], axis=2).reshape(-1, QK_K)


class Q4_K(_Q45K, qtype=GGMLQuantizationType.Q4_K):
    sub_size = 32  # here, not only on _Q45K: registration defaults a class's own sub_size
    qmax = 15
    ref_rmin = -1.0
    ref_nstep = 20
    impl_clamps = False

    @classmethod
    def pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        return _nibbles(codes)

    @classmethod
    def unpack_codes(cls, field: np.ndarray) -> np.ndarray:
        return _from_nibbles(field).astype(np.int16)


# block_q5_K, 176 bytes:
#
#   byte 0    2      4            16        48                         176
#        +----+------+------------+---------+---------------------------+
#        | d  | dmin | scales[12] | qh[32]  | qs[128]                   |
#        +----+------+------------+---------+---------------------------+
#         fp16  fp16   (see above)
#
#   qs holds the low 4 bits of every code exactly as q4_K's qs; qh[l] holds
#   bit 4 of the l-th code of each of the 8 sub-blocks (l = 0..31):
#
#             bit 7                   1             0
#             +-------------+-- ... --+-------------+-------------+
#   qh[l] =   | q[224+l]>>4 |   ...   | q[32+l]>>4  | q[l]>>4     |
#             +-------------+-- ... --+-------------+-------------+
#
#   (bit b of qh[l] is bit 4 of code 32b + l, the l-th code of sub-block b)
#
#   w = (d·sc[j])·q − dmin·m[j],  q in [0, 31]


class Q5_K(_Q45K, qtype=GGMLQuantizationType.Q5_K):
    sub_size = 32
    qmax = 31
    ref_rmin = -0.5
    ref_nstep = 15
    impl_clamps = True

    @classmethod
    def pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        high = (codes.astype(np.uint8) >> np.uint8(4)).reshape(-1, 8, 32)  # [n, bit, l]
        qh = np.packbits(high.transpose(0, 2, 1), axis=2, bitorder="little").reshape(-1, 32)
        return np.concatenate([qh, _nibbles(codes)], axis=1)

    @classmethod
    def unpack_codes(cls, field: np.ndarray) -> np.ndarray:
        high = np.unpackbits(field[:, :32, None], axis=2, bitorder="little")  # [n, l, bit]
        high = high.transpose(0, 2, 1).reshape(-1, QK_K)
        return (_from_nibbles(field[:, 32:]) | (high << np.uint8(4))).astype(np.int16)
