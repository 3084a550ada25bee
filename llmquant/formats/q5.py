"""Q5_0 and Q5_1: Q4's nibbles plus one high bit per weight in a 32-bit mask.

``rtn`` follows ``quantize_row_q5_{0,1}_ref`` operation for operation so that
round-to-nearest files are byte-identical with llama.cpp's (see ``q4``). Q5_0
is lopsided like Q4_0: the signed extreme of a block lands on code -16.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import legacy_weighted
from .base import BlockFormat, QuantBlocks, block_array, f16_from_bytes
from .q4 import (
    legacy_rows,
    min_rule,
    nibble_pairs,
    stored_bytes,
    symmetric_rule,
    unpack_nibbles,
)
from .torch_grid import Projection

# block_q5_0, 22 bytes:                         block_q5_1, 24 bytes:
#
#   byte 0    2         6              22         byte 0    2    4         8              24
#        +----+---------+--------------+               +----+----+---------+--------------+
#        | d  | qh      | qs[0..15]    |               | d  | m  | qh      | qs[0..15]    |
#        +----+---------+--------------+               +----+----+---------+--------------+
#         fp16  uint32 LE                               fp16 fp16  uint32 LE
#
#   q = 5-bit stored value of element j (j = 0..31):
#     bit 4 of q[j]  -> bit j of qh (little endian: byte j // 8, bit j % 8)
#     bits 0-3       -> nibbles of qs exactly as in q4_0:
#
#           bit 7            4 3            0
#           +---------------+---------------+
#   qs[i] = | q[i+16] & 0xF |  q[i] & 0xF   |      (i = 0..15)
#           +---------------+---------------+
#
#   q5_0: q = code + 16, code in [-16, 15];  w = d * code
#   q5_1: q = code,      code in [0, 31];    w = d * code + m


def pack_q5(codes: np.ndarray, offset: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """int [n, 32] codes, codes + offset in [0, 32) -> uint8 [n, 20] of code + offset: qh (4 bytes) then qs (16).

    In torch, like ``pack_nibbles``; out: uint8 [n, 20] (a column slice of the packed blocks) to write into.
    """
    s = stored_bytes(codes, offset)
    if out is None:
        out = np.empty((s.shape[0], 20), dtype=np.uint8)
    out[:, :4] = np.packbits((s >> 4).numpy(), axis=1, bitorder="little")
    nibble_pairs(s & 15, out[:, 4:])
    return out


def unpack_q5(field: np.ndarray) -> np.ndarray:
    """uint8 [n, 20] -> int16 [n, 32] stored values: inverse of :func:`pack_q5`."""
    high = np.unpackbits(field[:, :4], axis=1, bitorder="little")
    return (unpack_nibbles(field[:, 4:]) | (high << np.uint8(4))).astype(np.int16)


class Q5_0(BlockFormat, qtype=GGMLQuantizationType.Q5_0):
    qmin = -16
    qmax = 15
    has_min = False

    @classmethod
    def rtn_torch(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Projection]:
        return symmetric_rule(legacy_rows(cls, blocks, importance), 16)

    @classmethod
    def rtn_weighted_torch(cls, rows: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, Projection]:
        return legacy_weighted.symmetric(rows, importance, 16)

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        out, body = block_array(q.codes.shape[0], cls.type_size, q.scales)
        pack_q5(q.codes, 16, out=body)
        return out

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        return QuantBlocks(codes=unpack_q5(u8[:, 2:]) - 16, scales=f16_from_bytes(u8[:, :2]))


class Q5_1(BlockFormat, qtype=GGMLQuantizationType.Q5_1):
    qmin = 0
    qmax = 31
    has_min = True

    @classmethod
    def rtn_torch(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Projection]:
        return min_rule(cls, legacy_rows(cls, blocks, importance))

    @classmethod
    def rtn_weighted_torch(cls, rows: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, Projection]:
        return legacy_weighted.with_min(rows, importance, 31)

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        cls.check(q)
        out, body = block_array(q.codes.shape[0], cls.type_size, q.scales, q.mins)
        pack_q5(q.codes, out=body)
        return out

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        u8 = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
        return QuantBlocks(
            codes=unpack_q5(u8[:, 4:]), scales=f16_from_bytes(u8[:, :2]), mins=f16_from_bytes(u8[:, 2:4])
        )
