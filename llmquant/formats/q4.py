"""Q4_0 and Q4_1: 4-bit codes, symmetric and with a per-block minimum.

``rtn`` mirrors llama.cpp's ``quantize_row_q4_{0,1}_ref`` operation for
operation (fp32 ``1/d``, truncation of ``v + 0.5``, fp16 only on store), so a
round-to-nearest file is byte-identical with ``llama-quantize``'s and GPTQ/AWQ
gains are measured against the real baseline, not a near copy of it.

Q4_0's grid is lopsided on purpose: the reference maps the signed extreme of
each block to code -8 (``d = max / -8``), so the largest magnitude is exact and
the other side reaches only +7.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from . import legacy_weighted
from .base import BlockFormat, QuantBlocks, f16_bytes, f16_exact, f16_from_bytes

# block_q4_0, 18 bytes:                  block_q4_1, 20 bytes:
#
#   byte 0    2                18         byte 0    2    4                20
#        +----+----------------+               +----+----+----------------+
#        | d  | qs[0..15]      |               | d  | m  | qs[0..15]      |
#        +----+----------------+               +----+----+----------------+
#         fp16                                  fp16 fp16
#
#   each qs byte j (j = 0..15) holds elements j and j + 16:
#
#           bit 7      4 3      0
#           +---------+---------+
#   qs[j] = | q[j+16] |  q[j]   |
#           +---------+---------+
#
#   q4_0: q = code + 8, code in [-8, 7];  w = d * code
#   q4_1: q = code,     code in [0, 15];  w = d * code + m


def pack_nibbles(stored: np.ndarray) -> np.ndarray:
    """uint [n, 32] values < 16 -> uint8 [n, 16]: element j low, j + 16 high."""
    s = stored.astype(np.uint8)
    return s[:, :16] | (s[:, 16:] << np.uint8(4))


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> uint8 [n, 32]: inverse of :func:`pack_nibbles`."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def signed_extreme(x: np.ndarray) -> np.ndarray:
    """Per row, the signed value of largest magnitude; the first one on ties.

    The reference scans with ``amax < fabsf(v)``, so of ``-a`` and ``+a`` the
    earlier wins, which is what ``argmax`` returns too.
    """
    i = np.abs(x).argmax(axis=1)
    return x[np.arange(x.shape[0]), i]


def reciprocal(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def truncate_codes(v: np.ndarray, hi: int) -> np.ndarray:
    """``MIN(hi, (int)v)`` for v >= 0: C's float-to-int conversion truncates."""
    return np.minimum(np.trunc(v), hi).astype(np.int16)


def as_blocks(blocks: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(blocks, dtype=np.float32).reshape(-1, n)


class Q4_0(BlockFormat, qtype=GGMLQuantizationType.Q4_0):
    qmin = -8
    qmax = 7
    has_min = False

    @classmethod
    def rtn(cls, blocks: np.ndarray) -> QuantBlocks:
        x = as_blocks(blocks, cls.block_size)
        d = signed_extreme(x) / np.float32(-8)
        stored = truncate_codes(x * reciprocal(d)[:, None] + np.float32(8.5), 15)
        return QuantBlocks(codes=stored - 8, scales=f16_exact(d))

    @classmethod
    def rtn_weighted(cls, rows: np.ndarray, importance: np.ndarray) -> QuantBlocks:
        return legacy_weighted.symmetric(rows, importance, 8)

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        return np.concatenate([f16_bytes(q.scales), pack_nibbles(q.codes + 8)], axis=1)

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        codes = unpack_nibbles(u8[:, 2:]).astype(np.int16) - 8
        return QuantBlocks(codes=codes, scales=f16_from_bytes(u8[:, :2]))


class Q4_1(BlockFormat, qtype=GGMLQuantizationType.Q4_1):
    qmin = 0
    qmax = 15
    has_min = True

    @classmethod
    def rtn(cls, blocks: np.ndarray) -> QuantBlocks:
        x = as_blocks(blocks, cls.block_size)
        lo = x.min(axis=1)
        d = (x.max(axis=1) - lo) / np.float32(15)
        codes = truncate_codes((x - lo[:, None]) * reciprocal(d)[:, None] + np.float32(0.5), 15)
        return QuantBlocks(codes=codes, scales=f16_exact(d), mins=f16_exact(lo))

    @classmethod
    def rtn_weighted(cls, rows: np.ndarray, importance: np.ndarray) -> QuantBlocks:
        return legacy_weighted.with_min(rows, importance, 15)

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        return np.concatenate([f16_bytes(q.scales), f16_bytes(q.mins), pack_nibbles(q.codes)], axis=1)

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        codes = unpack_nibbles(u8[:, 4:]).astype(np.int16)
        return QuantBlocks(codes=codes, scales=f16_from_bytes(u8[:, :2]), mins=f16_from_bytes(u8[:, 2:4]))
