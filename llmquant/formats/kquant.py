"""The k-quants' two-level grid: 256-wide super-blocks over 16- or 32-wide sub-blocks.

A k-quant super-block stores one fp16 super-scale ``d`` (and ``dmin`` for the
types with a min) and, per sub-block, a small integer scale ``sc`` (and
``m``). llama.cpp dequantizes sub-block ``j`` of super-block ``i`` as

    w = (d_i · sc_ij) · code + (−(dmin_i · m_ij))        (float32, in this order)

so each sub-block has one *effective* float32 scale ``d·sc`` and min
``−dmin·m``: the flat view. ``QuantBlocks`` of a k-quant carries both: the
flat view in ``scales``/``mins`` (one per sub-block, what methods score
against and what ``dequantize`` multiplies with) and the stored integers in
``grid`` (what ``pack`` writes). ``make`` derives the flat view from the grid,
so the two can never disagree, and ``check`` refuses blocks where they do.

Each type's ``rtn_torch`` is llama.cpp's quantizer in three steps, torch on
any device: ``search`` (the per-sub-block scale/min searches) gives ideal
float scales, ``project`` turns them into the stored ``d``, ``sc`` (``dmin``,
``m``) exactly as llama.cpp does, and ``requantize`` rounds every weight on
that grid; a method that chooses its own ideal scales (tuning, GPTQ) projects
them with the same function.

Layout per type (``sub_size``, code range, sub-scale range, min):

    q2_K  16  [0, 3]     sc, m in [0, 15]   yes
    q3_K  16  [-4, 3]    sc in [-32, 31]    no    (stored as sc + 32, 6 bits)
    q4_K  32  [0, 15]    sc, m in [0, 63]   yes
    q5_K  32  [0, 31]    sc, m in [0, 63]   yes
    q6_K  16  [-32, 31]  sc in [-128, 127]  no    (int8)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from . import torch_grid as tg
from .base import BlockFormat, QuantBlocks, as_torch, f16_exact
from .torch_grid import Projection, cat_projections, flat_view, map_rows, serial, slice_rows

QK_K = 256
# Super-blocks per search pass (1M weights): a search holds a dozen float32 temporaries the size of
# its input, so a whole embedding row chunk at once would need several times the chunk's memory.
# Passes run side by side on torch's threads (``map_rows``).
SEARCH_SUPERS = 4096
SLICE_SUPERS_MIN = 256


@dataclass(frozen=True)
class SuperGrid:
    """The stored parameters of ``n`` super-blocks.

    d:    float32 [n], fp16-exact super-scale of the sub-scales
    sc:   int16 [n, n_sub] integer sub-block scales
    dmin: float32 [n], fp16-exact super-scale of the sub-mins (None: symmetric type)
    m:    int16 [n, n_sub] integer sub-block mins (None: symmetric type)
    """

    d: np.ndarray
    sc: np.ndarray
    dmin: np.ndarray | None = None
    m: np.ndarray | None = None


@dataclass(frozen=True)
class Ideal:
    """A k-quant search's result for N sub-blocks, before its projection onto the stored grid.

    Tensors on the searched blocks' device:
    levels:  int32 [N, sub] the search's codes (kept where the stored scale is 0)
    scales:  float32 [N] ideal sub-block scales
    mins:    float32 [N] ideal additive sub-block mins (w = s·code + min), None for symmetric types
    weights: float32 [N] each sub-block's total search weight (imatrix path), or None
    """

    levels: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class KQuantFormat(BlockFormat):
    """Base of q2_K … q6_K. Subclasses set the layout ClassVars and implement
    ``search``, ``project``, ``pack`` and ``unpack`` (vectorized over all super-blocks)."""

    sub_size: ClassVar[int]
    sc_min: ClassVar[int]
    sc_max: ClassVar[int]
    m_max: ClassVar[int] = 0

    @classmethod
    def search(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> Ideal:
        """llama.cpp's per-sub-block scale (and min) search, before the projection onto the stored grid.

        blocks: float32 [n, 256]; importance: float32 [n, 256], the imatrix of each
        super-block's columns, or None (each type's ``quantize_row_*_ref``; with it
        ``quantize_row_*_impl``). Torch on the blocks' device.
        """
        raise NotImplementedError

    @classmethod
    def rtn_torch(cls, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Projection]:
        """llama.cpp's quantizer in the order every ``quantize_row_q*_K`` follows: ``search``, ``project``
        (``saturate=False``: inf past fp16's range, as C stores it), then codes re-rounded on the stored grid.

        blocks: float32 [n, 256]; importance: float32 [n, 256] or None
        -> codes int32 [n·n_sub, sub_size] and their Projection, on the blocks' device
        (on a CPU in the calling thread alone: ``torch_grid.serial``).
        """
        x = blocks.to(torch.float32).reshape(-1, QK_K)
        qw = None
        if importance is not None:
            qw = importance.to(device=x.device, dtype=torch.float32)
            if tuple(qw.shape) != tuple(x.shape):
                raise ValueError(f"{cls.name}: importance must be {list(x.shape)} like the blocks, "
                                 f"not {list(qw.shape)}")
        rows = slice_rows(x.shape[0], SEARCH_SUPERS, SLICE_SUPERS_MIN, x)
        if rows < x.shape[0]:  # super-blocks are independent: the same bytes, bounded temporaries
            parts = map_rows(cls.rtn_torch, (x, qw), rows)
            return torch.cat([codes for codes, _ in parts]), cat_projections([p for _, p in parts])
        with serial(x):
            ideal = cls.search(x, qw)
            p = cls.project(ideal.scales, ideal.mins, ideal.weights, saturate=False)
            return cls.codes_on_grid(x, ideal, p), p

    @classmethod
    def codes_on_grid(cls, x: torch.Tensor, ideal: Ideal, p: Projection) -> torch.Tensor:
        """The last step of ``rtn_torch``: x float32 [n, 256] re-rounded on the projection ``p``
        of the search ``ideal`` (``requantize``) -> codes int32 [n·n_sub, sub_size]."""
        return requantize(x.reshape(-1, cls.sub_size), ideal.levels, p.scales, p.mins, cls.qmin, cls.qmax)

    @classmethod
    def rtn_weighted_torch(cls, rows: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, Projection]:
        """Every k-quant's ``rtn_torch`` takes the imatrix per element of its super-blocks: the same
        column importance [c] for every row of rows [r, c]."""
        r, c = rows.shape
        per_element = importance.reshape(1, c).expand(r, c).reshape(-1, cls.block_size)
        return cls.rtn_torch(rows.reshape(-1, cls.block_size), per_element)

    @classmethod
    def n_sub(cls) -> int:
        return cls.block_size // cls.sub_size

    @classmethod
    def flat(cls, grid: SuperGrid) -> tuple[np.ndarray, np.ndarray | None]:
        """Effective float32 scale and min per sub-block, [n·n_sub] each, as ggml computes them."""
        has_min = grid.m is not None
        scales, mins = flat_view(as_torch(grid.d, np.float32), as_torch(grid.sc),
                                 as_torch(grid.dmin, np.float32) if has_min else None,
                                 as_torch(grid.m) if has_min else None)
        return scales.numpy(), None if mins is None else mins.numpy()

    @classmethod
    def project(cls, scales: torch.Tensor, mins: torch.Tensor | None = None,
                importance: torch.Tensor | None = None, *, saturate: bool = True) -> Projection:
        """Ideal sub-block scales (and mins) [n·n_sub], super-block major -> the nearest stored grid.

        The super-block's fp16 ``d`` (and ``dmin``) and the integer sub-scales
        (and sub-mins) under it, chosen exactly as llama.cpp's quantizer turns its
        search's scales into stored ones: without ``importance`` from the largest
        sub-scale, with it (float32 [n·n_sub], the weight of each sub-block, what
        llama.cpp's imatrix path sums per sub-block) by its weighted fit where the
        type has one. mins are additive like the flat view's (w = s·code + min), so
        a k-quant's stored ``m`` comes from ``−min``. Any device; returns the flat
        view (``flat_view`` of the grid) with the grid. saturate: see
        ``BlockFormat.project``.
        """
        raise NotImplementedError

    @classmethod
    def project_under(cls, start: QuantBlocks, scales: torch.Tensor, mins: torch.Tensor | None = None) -> Projection:
        """Sub-scales (and sub-mins) nearest to ideal ones [n·n_sub] under ``start``'s super-scales d (dmin).

        ``sc = clip(round(s / d), sc_min, sc_max)``, ``m = clip(round(−min / dmin), 0, m_max)``, ties
        to even, 0 under a zero super-scale: for ``start``'s own flat scales this is ``start``'s grid
        (``project`` would re-derive d from the largest sub-scale, another grid).
        """
        cls._check_mins(mins)
        g = start.grid
        s = cls._sub_rows(scales)
        d = as_torch(g.d, np.float32).to(s.device)

        def levels(v: torch.Tensor, sup: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            ok = sup != 0
            lv = torch.round(v / torch.where(ok, sup, torch.ones_like(sup))[:, None]).clamp_(lo, hi)
            return torch.where(ok[:, None], lv, torch.zeros_like(lv)).to(torch.int32)

        sc = levels(s, d, cls.sc_min, cls.sc_max)
        if mins is None:
            return cls._projection(d, sc)
        dmin = as_torch(g.dmin, np.float32).to(s.device)
        return cls._projection(d, sc, dmin, levels(-cls._sub_rows(mins), dmin, 0, cls.m_max))

    @classmethod
    def _projection(cls, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor | None = None,
                    m: torch.Tensor | None = None) -> Projection:
        scales, mins = flat_view(d, sc, dmin, m)
        return Projection(scales=scales, mins=mins, d=d, sc=sc, dmin=dmin, m=m)

    @classmethod
    def _sub_rows(cls, v: torch.Tensor) -> torch.Tensor:
        """[n·n_sub] -> float32 [n, n_sub] (one row per super-block)."""
        if v.numel() % cls.n_sub():
            raise ValueError(f"{cls.name}: {v.numel()} sub-block values are not whole super-blocks")
        return v.to(torch.float32).reshape(-1, cls.n_sub())

    @classmethod
    def _unsigned_rows(cls, scales: torch.Tensor, mins: torch.Tensor, saturate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The types with unsigned sc and m: ideal scales and additive mins [n·n_sub] -> the scales and
        the subtracted mins C's projection reads, float32 [n, n_sub] each.

        Positive mins count as 0. C hands a negative search scale to its uint8 fields as it is (they
        wrap), so rtn (``saturate=False``) keeps it; a method's ideal scales stay on the unsigned grid.
        """
        s, t = cls._sub_rows(scales), cls._sub_rows(-mins).clamp_min(0)
        return (s.clamp_min(0) if saturate else s), t

    @classmethod
    def blocks(cls, codes: torch.Tensor, p: Projection) -> QuantBlocks:
        def cpu(t, dtype):
            return None if t is None else t.detach().to("cpu", dtype).numpy()

        grid = SuperGrid(d=cpu(p.d, torch.float32), sc=cpu(p.sc, torch.int16), dmin=cpu(p.dmin, torch.float32),
                         m=cpu(p.m, torch.int16))
        return cls.make(cpu(codes, torch.int16), grid)

    @classmethod
    def make(cls, codes: np.ndarray, grid: SuperGrid) -> QuantBlocks:
        """QuantBlocks from codes (any shape with n·256 elements, super-block major) and a grid."""
        scales, mins = cls.flat(grid)
        return QuantBlocks(codes=np.asarray(codes, dtype=np.int16).reshape(-1, cls.sub_size), scales=scales,
                           mins=mins, grid=grid)

    @classmethod
    def check(cls, q: QuantBlocks) -> None:
        g = q.grid
        if g is None:
            raise ValueError(f"{cls.name}: blocks carry no super-block grid")
        ns = cls.n_sub()
        n = g.d.shape[0]
        if q.codes.shape != (n * ns, cls.sub_size) or g.sc.shape != (n, ns):
            raise ValueError(f"{cls.name}: codes must be [n·{ns}, {cls.sub_size}] and sc [n, {ns}]")
        if q.codes.size and (q.codes.min() < cls.qmin or q.codes.max() > cls.qmax):
            raise ValueError(f"{cls.name}: codes outside [{cls.qmin}, {cls.qmax}]")
        if g.sc.size and (g.sc.min() < cls.sc_min or g.sc.max() > cls.sc_max):
            raise ValueError(f"{cls.name}: sub-scales outside [{cls.sc_min}, {cls.sc_max}]")
        if (g.m is not None) != cls.has_min or (g.dmin is not None) != cls.has_min:
            raise ValueError(f"{cls.name}: dmin and m must be {'given' if cls.has_min else 'None'}")
        supers = (g.d,) if g.dmin is None else (g.d, g.dmin)
        if any(not np.array_equal(f16_exact(v), v, equal_nan=True) for v in supers):
            raise ValueError(f"{cls.name}: d/dmin must be exactly representable in fp16")
        if g.m is not None and (g.m.shape != (n, ns) or g.m.min() < 0 or g.m.max() > cls.m_max):
            raise ValueError(f"{cls.name}: sub-mins must be [n, {ns}] in [0, {cls.m_max}]")
        scales, mins = cls.flat(g)
        if not np.array_equal(scales, q.scales) or (mins is not None and not np.array_equal(mins, q.mins)):
            raise ValueError(f"{cls.name}: the flat scales/mins are not the grid's d·sc, −dmin·m")


def requantize(x: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
               lo: int, hi: int) -> torch.Tensor:
    """The final pass of every k-quant: codes re-rounded on the stored grid.

    x: float32 [N, sub]; levels: int32 [N, sub] from the search; scales, mins: float32
    [N], the flat view ``d·sc`` and ``−dmin·m`` (None for symmetric types)
    -> int32 [N, sub], ``clamp(nearest_int((x + dmin·m) / (d·sc)), lo, hi)``. Sub-blocks
    with ``d·sc == 0`` keep the search's levels, as C ``continue``s past them.
    """
    v = x if mins is None else x - mins[:, None]  # x − (−dm) is C's x + dm, bit for bit
    fresh = tg.nearest_int(v / scales[:, None]).clamp(lo, hi)
    return torch.where((scales == 0)[:, None], levels.to(torch.int32), fresh)
