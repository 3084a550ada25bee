"""llama.cpp's scale/min search (``make_qkx2_quants``, ``make_qkx3_quants``) in torch, over all sub-blocks at once.

``make_qkx_quants`` picks each sub-block's scale and min by trying a fan of
candidate scales and refitting by weighted least squares (q2_K, q4_K and q5_K
run it on their sub-blocks, q4_1 and q5_1 on their blocks with an imatrix;
``torch_grid.make_qp_quants`` then picks a super-block's sub-scale levels in
the projection). The bytes of a file depend on every comparison this search
makes, and a comparison flips on the last bit of a float32 sum, so it keeps
C's float32 operations and their order (``torch_grid``'s rules): products
left to right (``w*l*x`` is ``(w·l)·x``), sums added one element at a time
(``torch_grid.col_sum``), integers converted to float before they are
multiplied, one rounding per op. Everything else — the candidate loop, the per-sub-block
choice — runs over all sub-blocks at once with masks, on the input's device.

Internally an array of sub-blocks is held transposed, ``[n, N]`` (element,
sub-block), so that a sequential sum walks contiguous rows.
"""

from __future__ import annotations

import torch

from . import torch_grid as tg


def qkx_levels(xt: torch.Tensor, iscale: torch.Tensor, mn: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
               ignore: torch.Tensor, nmax: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``MAX(0, MIN(nmax, nearest_int(iscale·(x − min))))`` as float32, the value C multiplies with.

    xt: float32 [n, N] (element, sub-block); iscale, mn, hi, lo (each sub-block's
    largest and smallest element), ignore (sub-blocks whose levels are never used): [N].

    Rounding is monotone, so no |iscale·(x − min)| exceeds |iscale|·(the larger
    of |hi − min|, |lo − min|). Where that bound is below 2^22 for every
    sub-block that counts, ``nearest_int`` is round-half-even, done in place on
    the floats; past it (a fitted min closing in on the data's largest value, an
    inf iscale) C's integer trick is followed step by step. out: a float32
    buffer like xt to hold the result (no allocation per candidate).
    """
    v = torch.sub(xt, mn, out=out).mul_(iscale)
    bound = iscale.abs() * torch.maximum((hi - mn).abs(), (lo - mn).abs())
    if bool(((bound < tg.const(2.0**22, xt)) | ignore).all()):
        return v.round_().clamp_(0, nmax)
    return tg.nearest_int(v).clamp(0, nmax).to(torch.float32)


def make_qkx_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (with weights) for every sub-block at once.

    x, weights: float32 [N, n] (N sub-blocks of n elements)
    -> levels int32 [N, n] in [0, nmax], scale float32 [N], the_min float32 [N]
    (the sub-block is ``scale · level − the_min``), on x's device.

    With non-null weights the two C functions perform the same operations;
    ``qkx3``'s ``max <= min`` test equals ``qkx2``'s ``max == min`` because
    ``min`` is the smallest element (or 0 below it).
    """
    xt = x.to(torch.float32).t().contiguous()  # [n, N]
    wt = weights.to(torch.float32).t().contiguous()
    fmax, zero = tg.const(float(nmax), xt), tg.const(0.0, xt)
    lo, hi = tg.scan_extremes(xt)
    lo = torch.where(lo > 0, zero, lo)
    flat = hi == lo
    sum_w = tg.col_sum(wt, first=True)
    sum_x = tg.col_sum(wt * xt, first=True)

    lv_buf, diff_buf = torch.empty_like(xt), torch.empty_like(xt)

    def levels_at(iscale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        return qkx_levels(xt, iscale, mn, hi, lo, flat, nmax, out=lv_buf)

    def error(scale: torch.Tensor, mn: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = torch.mul(lv, scale, out=diff_buf).add_(mn).sub_(xt)  # C's scale*L + min - x, in place
        return tg.col_sum((diff.abs_() if use_mad else diff.mul_(diff)).mul_(wt), clobber=True)

    iscale = fmax / (hi - lo)
    scale = tg.const(1.0, xt) / iscale
    best = error(scale, lo, levels_at(iscale, lo))
    mn = lo
    # Each sub-block's winning candidate (its iscale and the min it was placed from); its levels
    # are computed once, at the end, from the same operands.
    win_iscale, win_mn = iscale, lo
    prods = torch.empty((3, *xt.shape), dtype=torch.float32, device=xt.device)  # w·l, w·l·l, w·l·x
    steps = torch.arange(nstep + 1, dtype=torch.float32, device=xt.device)
    nums = ((tg.const(rmin, xt) + tg.const(rdelta, xt) * steps) + fmax).unbind(0)  # C's rmin + rdelta*is + nmax
    for num in nums:
        # C's candidates use the current ``min``: once a candidate wins,
        # later ones are placed relative to its fitted min, not the data's.
        iscale = num / (hi - mn)
        lv = levels_at(iscale, mn)
        wl = torch.mul(wt, lv, out=prods[0])
        torch.mul(wl, lv, out=prods[1])
        torch.mul(wl, xt, out=prods[2])
        sums = tg.col_sum(prods, clobber=True)
        sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, zero, this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, lv)
        take = (det > 0) & (cur < best) & ~flat
        win_iscale = torch.where(take, iscale, win_iscale)
        win_mn = torch.where(take, mn, win_mn)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    levels = torch.where(flat, zero, levels_at(win_iscale, win_mn))
    scale = torch.where(flat, zero, scale)
    return levels.t().to(torch.int32), scale, -mn
