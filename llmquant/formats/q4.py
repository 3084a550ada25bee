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
import torch
from gguf import GGMLQuantizationType

from . import legacy_weighted
from . import torch_grid as tg
from .base import BlockFormat, QuantBlocks, block_array, f16_from_bytes
from .torch_grid import Projection

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


def pack_nibbles(stored: np.ndarray, offset: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """int [n, 32] values in [-offset, 16 - offset) -> uint8 [n, 16] of value + offset: element j low, j + 16 high.

    In torch, on its intra-op threads: the packing of every weight of the model
    is one of the few passes over all of them that rtn makes. out: uint8 [n, 16]
    (a column slice of the packed blocks) to write into instead of a new array.
    """
    return nibble_pairs(stored_bytes(stored, offset), out)


def stored_bytes(codes: np.ndarray, offset: int = 0) -> torch.Tensor:
    """int codes [n, 32] -> code + offset as a uint8 tensor (sharing nothing with codes)."""
    s = torch.from_numpy(np.ascontiguousarray(codes))
    return (s + offset if offset else s).to(torch.uint8)


def nibble_pairs(s: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 tensor [n, 32] of values < 16 -> uint8 [n, 16] (into out where given): element j low, j + 16 high."""
    if out is None:
        out = np.empty((s.shape[0], 16), dtype=np.uint8)
    torch.bitwise_or(s[:, :16], s[:, 16:].bitwise_left_shift(4), out=torch.from_numpy(out))
    return out


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> uint8 [n, 32]: inverse of :func:`pack_nibbles`."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def reciprocal(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f`` in float32 (a true division, not ``torch.reciprocal``'s)."""
    return tg.divide_or_zero(tg.const(1.0, d).expand_as(d), d)


def truncate_codes(v: torch.Tensor, hi: int) -> torch.Tensor:
    """``MIN(hi, (int)v)`` for v >= 0, as int32: the conversion truncates, as C's does, and
    clamping before it is the same as after (``hi`` is an integer).

    v is consumed (clamped in place): callers pass the fresh tensor of an expression.
    """
    return v.clamp_max_(hi).to(torch.int32)


def stored(d: torch.Tensor, lo: torch.Tensor | None = None) -> Projection:
    """The reference's float32 scale (and min) [n], stored as fp16 the way llama.cpp stores it (inf past range)."""
    return Projection(scales=tg.f16_round(d, saturate=False),
                      mins=None if lo is None else tg.f16_round(lo, saturate=False))


def min_rule(fmt: type[BlockFormat], x: torch.Tensor) -> tuple[torch.Tensor, Projection]:
    """``quantize_row_q{4,5}_1_ref`` on blocks x [n, 32]: d = (max - min)/qmax, codes trunc((x - min)/d + 0.5)."""
    lo = x.amin(dim=1)
    d = (x.amax(dim=1) - lo) / tg.const(float(fmt.qmax), x)
    v = (x - lo[:, None]).mul_(reciprocal(d)[:, None])
    codes = truncate_codes(v.add_(tg.const(0.5, x)), fmt.qmax)
    return codes, stored(d, lo)


def symmetric_rule(x: torch.Tensor, half: int) -> tuple[torch.Tensor, Projection]:
    """``quantize_row_q{4,5}_0_ref`` on blocks x [n, 32]: d = max / -half from the signed extreme
    (the first on ties, as C scans), codes trunc(x/d + half + 0.5) - half in [-half, half - 1]."""
    d = tg.signed_max(x)[1] / tg.const(-float(half), x)
    v = x * reciprocal(d)[:, None]
    q = truncate_codes(v.add_(tg.const(half + 0.5, x)), 2 * half - 1)  # in place: the same two roundings
    return q.sub_(half), stored(d)


def legacy_rows(fmt: type[BlockFormat], blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """The float32 [n, 32] blocks of a legacy type's ``rtn_torch``, which takes no per-element importance."""
    if importance is not None:
        raise ValueError(f"{fmt.name}: an importance matrix weighs whole rows here (rtn_rows), not blocks")
    return blocks.to(torch.float32).reshape(-1, fmt.block_size)


class Q4_0(BlockFormat, qtype=GGMLQuantizationType.Q4_0):
    qmin = -8
    qmax = 7
    has_min = False

    @classmethod
    def rtn_torch(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Projection]:
        return symmetric_rule(legacy_rows(cls, blocks, importance), 8)

    @classmethod
    def rtn_weighted_torch(cls, rows: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, Projection]:
        return legacy_weighted.symmetric(rows, importance, 8)

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        out, body = block_array(q.codes.shape[0], cls.type_size, q.scales)
        pack_nibbles(q.codes, 8, out=body)  # in place of a concatenation: one copy fewer
        return out

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
    def rtn_torch(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Projection]:
        return min_rule(cls, legacy_rows(cls, blocks, importance))

    @classmethod
    def rtn_weighted_torch(cls, rows: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, Projection]:
        return legacy_weighted.with_min(rows, importance, 15)

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        out, body = block_array(q.codes.shape[0], cls.type_size, q.scales, q.mins)
        pack_nibbles(q.codes, out=body)
        return out

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        codes = unpack_nibbles(u8[:, 4:]).astype(np.int16)
        return QuantBlocks(codes=codes, scales=f16_from_bytes(u8[:, :2]), mins=f16_from_bytes(u8[:, 2:4]))
