"""llama.cpp's scale searches for the k-quants, vectorized over sub-blocks.

``make_qkx2_quants`` (and its imatrix twin ``make_qkx3_quants``) picks each
sub-block's scale and min by trying a fan of candidate scales and refitting
by weighted least squares; ``make_qp_quants`` picks a super-block's
sub-scale levels the same way. The bytes of a k-quant file depend on every
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


def make_qp_quants(x: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants``: a weighted scale for non-negative values on levels [0, nmax].

    x, weights: float32 [N, n] (a super-block's n sub-scales or sub-mins)
    -> levels int16 [N, n] (C's ``uint8_t`` levels, so 0..255), scale float32 [N].

    The greedy refinement visits the n values in order and updates the running
    sums after each accepted change, so it loops over n (and at most 5 passes),
    masking out super-blocks whose pass changed nothing, as C ``break``s.
    """
    xt = np.ascontiguousarray(np.asarray(x, dtype=F32).T)
    wt = np.ascontiguousarray(np.asarray(weights, dtype=F32).T)
    n = xt.shape[0]
    fmax = F32(nmax)
    with np.errstate(all="ignore"):
        hi = np.zeros(xt.shape[1], dtype=F32)
        for i in range(n):
            hi = np.where(hi > xt[i], hi, xt[i])
        zero = hi < GROUP_MAX_EPS

        def mse(scale: np.ndarray, lv: np.ndarray) -> np.ndarray:
            diff = xt - scale * lv
            return row_sum(wt * diff * diff)

        iscale = fmax / hi
        start = (nearest_int(iscale * xt) & 0xFF).astype(F32)
        best = mse(F32(1) / iscale, start)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (F32(0.1) * F32(step) + fmax) / hi
            lv = np.minimum(nmax, nearest_int(iscale_is * xt)).astype(F32)
            cur = mse(F32(1) / iscale_is, lv)
            better = cur < best
            best = np.where(better, cur, best)
            iscale = np.where(better, iscale_is, iscale)
        lv_int = np.minimum(nmax, nearest_int(iscale * xt))
        lv = lv_int.astype(F32)
        wx = wt * xt
        sumlx = row_sum(wx * lv)
        suml2 = row_sum(wt * lv * lv)
        levels = (lv_int & 0xFF).astype(np.int32)
        active = ~zero
        for _ in range(5):
            changed = np.zeros_like(active)
            for i in range(n):
                w, xi, cur_l = wt[i], xt[i], levels[i].astype(F32)
                slx = sumlx - wx[i] * cur_l
                sl2 = suml2 - w * cur_l * cur_l
                new_int = np.minimum(nmax, nearest_int(xi * sl2 / slx))
                new_l = new_int.astype(F32)
                move = active & (slx > 0) & (sl2 > 0) & (new_int != levels[i])
                slx = slx + wx[i] * new_l
                sl2 = sl2 + w * new_l * new_l
                accept = move & (slx * slx * suml2 > sumlx * sumlx * sl2)
                levels[i] = np.where(accept, new_int & 0xFF, levels[i])
                sumlx = np.where(accept, slx, sumlx)
                suml2 = np.where(accept, sl2, suml2)
                changed |= accept
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
        levels = np.where(zero, 0, levels)
        scale = np.where(zero, F32(0), scale)
    return levels.T.astype(np.int16), scale.astype(F32)


def running_max(values: np.ndarray) -> np.ndarray:
    """``m = 0; for j: if (v[j] > m) m = v[j]`` over axis -1 of float32 [N, k] -> [N].

    Unlike ``max`` it never returns ``-0.0``, which would flip the sign bit
    of an fp16 super-scale.
    """
    acc = np.zeros(values.shape[:-1], dtype=F32)
    for j in range(values.shape[-1]):
        acc = np.where(values[..., j] > acc, values[..., j], acc)
    return acc


def requantize(x: np.ndarray, levels: np.ndarray, d: np.ndarray, dm: np.ndarray, nmax: int) -> np.ndarray:
    """The final pass of every k-quant with a min: codes on the stored grid.

    x: float32 [N, n]; levels: int16 [N, n] from the search; d, dm: float32
    [N], the effective ``d·sc`` and ``dmin·m`` -> int16 [N, n]. Sub-blocks
    with ``d == 0`` keep the search's levels, as C ``continue``s past them.
    """
    with np.errstate(all="ignore"):
        lv = np.clip(nearest_int((x + dm[:, None]) / d[:, None]), 0, nmax)
    return np.where((d == 0)[:, None], levels, lv).astype(np.int16)
