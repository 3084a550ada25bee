"""llama.cpp's scale searches for the k-quants, vectorized over sub-blocks.

``make_qkx2_quants`` (and its imatrix twin ``make_qkx3_quants``) picks each
sub-block's scale and min by trying a fan of candidate scales and refitting
by weighted least squares (``torch_grid.make_qp_quants`` then picks a
super-block's sub-scale levels in the projection). The bytes of a k-quant file depend on every
comparison these searches make, and a comparison flips on the last bit of a
float32 sum, so the port keeps C's float32 operations and their order:
products left to right (``w*l*x`` is ``(w·l)·x``), sums added one element at
a time (see ``kquant.sequential_sum``), integers converted to float before
they are multiplied, no fused multiply-add. Everything else — the candidate
loop, the per-sub-block choice — runs over all sub-blocks at once with masks.

Internally an array of sub-blocks is held transposed, ``[n, N]`` (element,
sub-block), so that a sequential sum walks contiguous rows.
"""

from __future__ import annotations

import numpy as np

from .kquant import nearest_int

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def row_sum(a: np.ndarray, first: bool = False) -> np.ndarray:
    """Sequential float32 sum over axis -2 of ``[..., n, N]`` -> ``[..., N]``.

    C accumulates ``acc = 0; acc += a[i]``; with ``first`` it starts from
    ``a[0]`` instead (``make_qkx2_quants``' ``sum_w = weights[0]``), which
    differs only in the sign of an all-zero sum.
    """
    acc = a[..., 0, :].copy() if first else np.zeros(a.shape[:-2] + a.shape[-1:], dtype=F32) + a[..., 0, :]
    for i in range(1, a.shape[-2]):
        acc = acc + a[..., i, :]
    return acc


def _clip(levels: np.ndarray, nmax: int) -> np.ndarray:
    """``MAX(0, MIN(nmax, l))`` as float32 (the value C multiplies with)."""
    return np.clip(levels, 0, nmax).astype(F32)


def make_qkx_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (with weights) for every sub-block at once.

    x, weights: float32 [N, n] (N sub-blocks of n elements)
    -> levels int16 [N, n] in [0, nmax], scale float32 [N], the_min float32 [N]
    (the sub-block is ``scale · level − the_min``).

    With non-null weights the two C functions perform the same operations;
    ``qkx3``'s ``max <= min`` test equals ``qkx2``'s ``max == min`` because
    ``min`` is the smallest element (or 0 below it).
    """
    xt = np.ascontiguousarray(np.asarray(x, dtype=F32).T)
    wt = np.ascontiguousarray(np.asarray(weights, dtype=F32).T)
    n = xt.shape[0]
    fmax = F32(nmax)
    with np.errstate(all="ignore"):
        lo = xt[0].copy()
        hi = xt[0].copy()
        for i in range(1, n):
            lo = np.where(xt[i] < lo, xt[i], lo)
            hi = np.where(xt[i] > hi, xt[i], hi)
        lo = np.where(lo > 0, F32(0), lo)
        flat = hi == lo
        sum_w = row_sum(wt, first=True)
        sum_x = row_sum(wt * xt, first=True)

        def error(scale: np.ndarray, mn: np.ndarray, lv: np.ndarray) -> np.ndarray:
            diff = (scale * lv + mn) - xt
            return row_sum(wt * (np.abs(diff) if use_mad else diff * diff))

        iscale = fmax / (hi - lo)
        scale = F32(1) / iscale
        levels = _clip(nearest_int(iscale * (xt - lo)), nmax)
        best = error(scale, lo, levels)
        mn = lo
        for step in range(nstep + 1):
            # C's candidates use the current ``min``: once a candidate wins,
            # later ones are placed relative to its fitted min, not the data's.
            iscale = ((F32(rmin) + F32(rdelta) * F32(step)) + fmax) / (hi - mn)
            lv = _clip(nearest_int(iscale * (xt - mn)), nmax)
            wl = wt * lv
            sums = row_sum(np.stack([wl, wl * lv, wl * xt]))
            sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, lv)
            take = (det > 0) & (cur < best) & ~flat
            levels = np.where(take, lv, levels)
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
        levels = np.where(flat, F32(0), levels)
        scale = np.where(flat, F32(0), scale)
    return levels.T.astype(np.int16), scale.astype(F32), (-mn).astype(F32)


def requantize(x: np.ndarray, levels: np.ndarray, d: np.ndarray, dm: np.ndarray, nmax: int) -> np.ndarray:
    """The final pass of every k-quant with a min: codes on the stored grid.

    x: float32 [N, n]; levels: int16 [N, n] from the search; d, dm: float32
    [N], the effective ``d·sc`` and ``dmin·m`` -> int16 [N, n]. Sub-blocks
    with ``d == 0`` keep the search's levels, as C ``continue``s past them.
    """
    with np.errstate(all="ignore"):
        lv = np.clip(nearest_int((x + dm[:, None]) / d[:, None]), 0, nmax)
    return np.where((d == 0)[:, None], levels, lv).astype(np.int16)


def rtn_with_mins(fmt, blocks: np.ndarray, importance: np.ndarray | None = None):
    """RTN of a k-quant with mins (q2_K, q4_K, q5_K): the type's search, its projection, then
    codes on the stored grid, the order every ``quantize_row_q*_K`` follows.

    fmt: the KQuantFormat; blocks float32 [n, 256] (importance float32 [n, 256]) ->
    QuantBlocks of n·256/sub_size sub-blocks.
    """
    import torch

    x = np.asarray(blocks, dtype=F32).reshape(-1, 256)
    ideal = fmt.search(x, importance)
    p = fmt.project(*ideal.tensors(), saturate=False)
    codes = requantize(x.reshape(-1, fmt.sub_size), ideal.levels, p.scales.numpy(), (-p.mins).numpy(), fmt.qmax)
    return fmt.blocks(torch.from_numpy(codes), p)
