"""The block-format contract shared by every ggml type.

A format knows a grid and a byte layout, never how codes were chosen:
methods (rtn, gptq, awq) pick ``QuantBlocks``; ``pack`` turns them into the
exact bytes llama.cpp reads. Every quantized weight in a block is

    w = scale * code + min            (min is 0 for symmetric types)

with ``code`` an integer in ``[qmin, qmax]`` and ``scale``/``min`` values
that fp16 represents exactly (the file stores them as fp16), so
``dequantize(q)`` equals what llama.cpp computes bit for bit.

The grid steps are torch, on any device (``torch_grid``): ``project`` takes
ideal per-block scales (and mins) to the nearest ones the file stores,
``nearest_codes`` rounds weights onto them, ``dequantize_torch`` and the
differentiable ``fake_quant`` compute the weights llama.cpp reads back.
llama.cpp's own rules (``rtn_torch``, the k-quant searches) are torch too, bit
for bit the C reference; numpy stays at the edge: ``rtn``, ``pack``/``unpack``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import torch_grid
from .torch_grid import Projection

if TYPE_CHECKING:
    from .kquant import SuperGrid


@dataclass(frozen=True)
class QuantBlocks:
    """Codes and per-block grid of one tensor, flattened to blocks.

    codes:  int16 [n_blocks, sub_size], each in [qmin, qmax]
    scales: float32 [n_blocks], fp16-exact (k-quants: the effective d·sc)
    mins:   float32 [n_blocks], fp16-exact (k-quants: −dmin·m), or None for symmetric types
    grid:   k-quants only: the stored super-block parameters the flat scales/mins come from

    A "block" here is the unit that shares one scale: a whole ggml block for
    the legacy types, a 16- or 32-wide sub-block of a 256-wide super-block for
    the k-quants (``formats.kquant``).
    """

    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None
    grid: SuperGrid | None = None


_REGISTRY: dict[str, type[BlockFormat]] = {}


class BlockFormat:
    """One ggml block type. Subclasses register with ``qtype=``.

    Subclasses define ``qmin``, ``qmax``, ``has_min`` and implement
    ``rtn_torch`` (and ``rtn_weighted_torch``) in torch, ``pack`` and
    ``unpack`` in numpy, vectorized over all blocks at once.

    Layout: ``block_size`` input columns make one ggml block (``type_size``
    bytes); ``sub_size`` of them share one scale (and min); a method that
    walks columns must fix the grid of all ``block_size`` columns of a block
    at once (a k-quant's sub-scales hang on one super-scale).
    """

    qtype: ClassVar[GGMLQuantizationType]
    name: ClassVar[str]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    sub_size: ClassVar[int]
    qmin: ClassVar[int]
    qmax: ClassVar[int]
    has_min: ClassVar[bool]

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kw) -> None:
        super().__init_subclass__(**kw)
        if qtype is None:
            return
        cls.qtype = qtype
        cls.name = qtype.name.lower()
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        if getattr(cls, "sub_size", None) is None:  # k-quants set it (maybe on a shared base)
            cls.sub_size = cls.block_size
        _REGISTRY[cls.name] = cls

    @classmethod
    def rtn_torch(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Projection]:
        """Round-to-nearest exactly as llama.cpp's reference quantizer, in torch on ``blocks``' device.

        blocks: float32 [n, block_size]; importance: float32 [n, block_size], a
        weight per element (k-quants only: the imatrix path of their searches;
        the legacy types weigh by whole rows, ``rtn_rows_torch``)
        -> codes int32 [n·block_size/sub_size, sub_size] in [qmin, qmax] and
        their ``Projection`` (the flat view; k-quants also the stored grid).
        Scales past fp16's range are stored as inf, as llama.cpp does
        (``project(saturate=False)``). The single implementation: ``rtn`` is
        this plus ``blocks`` at the numpy edge, and methods call it on their device.
        """
        raise NotImplementedError

    @classmethod
    def rtn_weighted_torch(cls, rows: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, Projection]:
        """``rtn_rows_torch`` with an importance matrix: rows float32 [r, c], importance float32 [c]."""
        raise NotImplementedError

    @classmethod
    def rtn_rows_torch(cls, rows: torch.Tensor,
                       importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Projection]:
        """llama-quantize on whole rows: its reference rule, or with an importance matrix its weighted search.

        rows: float32 [r, c] (c a multiple of block_size); importance: float32 [c], the mean
        squared input of each column (what ``llama-quantize --imatrix`` reads), or None.
        With importance llama.cpp runs a different quantizer (``quantize_row_*_impl``), whose
        weights depend on the whole row (the legacy types' sigma2), hence rows, not blocks.
        Returns what ``rtn_torch`` returns, blocks in row-major ggml order.
        """
        x = rows.to(torch.float32)
        if importance is None:
            return cls.rtn_torch(x.reshape(-1, cls.block_size))
        qw = importance.to(device=x.device, dtype=torch.float32)
        if x.ndim != 2 or tuple(qw.shape) != (x.shape[1],):
            raise ValueError(f"{cls.name}: importance must be [{x.shape[-1]}] for rows [r, c], not {tuple(qw.shape)}")
        return cls.rtn_weighted_torch(x, qw)

    @classmethod
    def rtn(cls, blocks: np.ndarray, importance: np.ndarray | None = None) -> QuantBlocks:
        """``rtn_torch`` at the numpy edge: float32 [n, block_size] (importance likewise) -> QuantBlocks."""
        x = as_torch(blocks, np.float32).reshape(-1, cls.block_size)
        qw = None if importance is None else as_torch(importance, np.float32).reshape(-1, cls.block_size)
        return cls.blocks(*cls.rtn_torch(x, qw))

    @classmethod
    def rtn_rows(cls, rows: np.ndarray, importance: np.ndarray | None = None) -> QuantBlocks:
        """``rtn_rows_torch`` at the numpy edge: rows float32 [r, c], importance float32 [c] or None."""
        qw = None if importance is None else as_torch(importance, np.float32)
        return cls.blocks(*cls.rtn_rows_torch(as_torch(rows, np.float32), qw))

    @classmethod
    def pack(cls, q: QuantBlocks) -> np.ndarray:
        """QuantBlocks -> uint8 [n_blocks, type_size], llama.cpp's layout."""
        raise NotImplementedError

    @classmethod
    def unpack(cls, data: np.ndarray) -> QuantBlocks:
        """uint8 [n_blocks, type_size] -> QuantBlocks (inverse of pack)."""
        raise NotImplementedError

    @classmethod
    def dequantize(cls, q: QuantBlocks) -> np.ndarray:
        """QuantBlocks -> float32 [n_blocks, sub_size], as llama.cpp computes it (``dequantize_torch``)."""
        mins = None if q.mins is None else as_torch(q.mins, np.float32)
        return cls.dequantize_torch(as_torch(q.codes), as_torch(q.scales, np.float32), mins).numpy()

    @classmethod
    def dequantize_torch(cls, codes: torch.Tensor, scales: torch.Tensor,
                         mins: torch.Tensor | None = None) -> torch.Tensor:
        """codes [..., n, sub_size] on grids scales, mins [..., n] (the flat view) -> weights [..., n, sub_size].

        Any device, differentiable in scales and mins; the same float32
        operations in the same order as ggml's dequantize_row_*: one rounding for
        the product, one for the sum (no fused multiply-add).
        """
        return torch_grid.dequantize(codes, scales, mins)

    @classmethod
    def project(cls, scales: torch.Tensor, mins: torch.Tensor | None = None,
                importance: torch.Tensor | None = None, *, saturate: bool = True) -> Projection:
        """Ideal per-block scales (and mins) [n] -> the nearest ones the file stores, any device.

        Legacy types store each block's scale and min as fp16: round each to
        nearest (ties to even); ``importance`` does not change a per-value
        rounding and is ignored. saturate: clamp to the largest finite fp16
        (llama.cpp's quantizer stores inf past it: ``saturate=False``).
        """
        cls._check_mins(mins)
        return Projection(scales=torch_grid.f16_round(scales, saturate),
                          mins=None if mins is None else torch_grid.f16_round(mins, saturate))

    @classmethod
    def project_under(cls, start: QuantBlocks, scales: torch.Tensor, mins: torch.Tensor | None = None) -> Projection:
        """Ideal per-block scales (and mins) [n] -> stored ones, keeping what ``start`` fixed above the blocks.

        A method that moves block scales a little at a time (tuning) needs a
        projection that gives back ``start``'s own grid for ``start``'s own
        scales. Legacy types have nothing above the block: ``project``.
        """
        return cls.project(scales, mins)

    @classmethod
    def blocks(cls, codes: torch.Tensor, p: Projection) -> QuantBlocks:
        """Codes (n·sub_size values, block major) on a projection -> the numpy QuantBlocks pack takes."""
        return QuantBlocks(codes=codes.detach().to("cpu", torch.int16).reshape(-1, cls.sub_size).numpy(),
                           scales=p.scales.detach().to("cpu", torch.float32).numpy(),
                           mins=None if p.mins is None else p.mins.detach().to("cpu", torch.float32).numpy())

    @classmethod
    def fake_quant(cls, W: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                   importance: torch.Tensor | None = None, *, project: bool = True,
                   lsq: bool = False) -> torch.Tensor:
        """W [rows, cols] -> its weights on this grid, differentiable: ``torch_grid.fake_quant``."""
        return torch_grid.fake_quant(cls, W, scales, mins, importance, project=project, lsq=lsq)

    @classmethod
    def _check_mins(cls, mins: torch.Tensor | None) -> None:
        if (mins is not None) != cls.has_min:
            raise ValueError(f"{cls.name}: mins must be {'given' if cls.has_min else 'None'}")

    @classmethod
    def nearest_codes(cls, x: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> torch.Tensor:
        """The one definition of "nearest code": ``clip(round((x - mins) / scales), qmin, qmax)``.

        Ties round half to even (``torch.round``); code 0 (never -0.0) wherever it rounds to 0
        or ``scales == 0``;
        torch broadcasting (pass ``scales[..., None]`` for per-block grids), any
        device, float codes of x's dtype. This is round-to-nearest on the grid that
        llama.cpp dequantizes with (the fp16 scale, or a k-quant's effective
        ``d·sc``), the step GPTQ/AWQ take. It is *not* ``rtn``: the reference
        quantizers multiply by the float32 ``1/d`` of the scale *before* its fp16
        rounding, and q4/q5 truncate ``v + 0.5``.
        """
        v = x if mins is None else x - mins
        c = (v / scales).round_().clamp_(cls.qmin, cls.qmax)  # in place on the one new tensor
        zero = scales == 0
        if scales.device.type != "cpu" or zero.any():  # rare on a CPU: skip a pass over c (no sync on a GPU)
            c = torch.where(zero, torch.zeros((), dtype=c.dtype, device=c.device), c)
        # + 0: an integer code has no sign of zero (round(-0.3) is -0.0, and -0.0 · d
        # would not be the 0 · d that llama.cpp computes from the packed code)
        return c.add_(0.0)

    @classmethod
    def check(cls, q: QuantBlocks) -> None:
        """Raise ValueError unless ``q`` lies on this format's grid (pack calls it)."""
        n = cls.block_size
        if q.codes.ndim != 2 or q.codes.shape[1] != n or q.scales.shape != (q.codes.shape[0],):
            raise ValueError(f"{cls.name}: codes must be [n, {n}] and scales [n]")
        if not np.issubdtype(q.codes.dtype, np.integer):
            raise ValueError(f"{cls.name}: codes must be integers, not {q.codes.dtype}")
        if q.codes.size and (q.codes.min() < cls.qmin or q.codes.max() > cls.qmax):
            raise ValueError(f"{cls.name}: codes outside [{cls.qmin}, {cls.qmax}]")
        if (q.mins is not None) != cls.has_min:
            raise ValueError(f"{cls.name}: mins must be {'given' if cls.has_min else 'None'}")
        for v in (q.scales,) if q.mins is None else (q.scales, q.mins):
            if v.shape != q.scales.shape or not np.array_equal(f16_exact(v), v, equal_nan=True):
                raise ValueError(f"{cls.name}: scales/mins must be [n] and exactly representable in fp16")


def as_torch(a: np.ndarray, dtype: type | None = None) -> torch.Tensor:
    """A numpy array as a CPU tensor (shared memory where numpy allows it, a copy where read-only)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def f16_exact(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to fp16 (nearest-even, as GGML_FP32_TO_FP16, inf past fp16's range), as float32."""
    a = np.array(values, dtype=np.float32)  # a copy: torch shares it
    return torch_grid.f16_round(torch.from_numpy(a), saturate=False).numpy()


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """float [n] -> uint8 [n, 2]: the little-endian fp16 field of each block."""
    return np.asarray(values, dtype=np.float32).astype("<f2").view(np.uint8).reshape(-1, 2)


def block_array(n: int, type_size: int, *fp16_fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, type_size] packed blocks whose first columns hold the fp16 fields given (each [n]:
    a scale, then a min), and the column slice after them, where the caller packs the codes."""
    out = np.empty((n, type_size), dtype=np.uint8)
    for i, values in enumerate(fp16_fields):
        out[:, 2 * i : 2 * i + 2] = f16_bytes(values)
    return out, out[:, 2 * len(fp16_fields) :]


def f16_from_bytes(field: np.ndarray) -> np.ndarray:
    """uint8 [n, 2] -> float32 [n]: inverse of :func:`f16_bytes`."""
    return np.ascontiguousarray(field, dtype=np.uint8).view("<f2").reshape(-1).astype(np.float32)


def get_format(name: str) -> type[BlockFormat]:
    """The block format for a ggml type name such as ``q4_0``."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"no block format {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def block_formats() -> dict[str, type[BlockFormat]]:
    return dict(_REGISTRY)
