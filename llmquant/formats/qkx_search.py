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
    n = xt.shape[0]
    fmax, zero = tg.const(float(nmax), xt), tg.const(0.0, xt)
    lo, hi = xt[0].clone(), xt[0].clone()
    for i in range(1, n):
        lo = torch.where(xt[i] < lo, xt[i], lo)
        hi = torch.where(xt[i] > hi, xt[i], hi)
    lo = torch.where(lo > 0, zero, lo)
    flat = hi == lo
    sum_w = tg.col_sum(wt, first=True)
    sum_x = tg.col_sum(wt * xt, first=True)

    def levels_at(iscale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        """``MAX(0, MIN(nmax, nearest_int(iscale·(x − min))))`` as float32 (the value C multiplies with)."""
        return tg.nearest_int(iscale * (xt - mn)).clamp(0, nmax).to(torch.float32)

    def error(scale: torch.Tensor, mn: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = (scale * lv + mn) - xt
        return tg.col_sum(wt * (diff.abs() if use_mad else diff * diff))

    iscale = fmax / (hi - lo)
    scale = tg.const(1.0, xt) / iscale
    levels = levels_at(iscale, lo)
    best = error(scale, lo, levels)
    mn = lo
    steps = torch.arange(nstep + 1, dtype=torch.float32, device=xt.device)
    nums = ((tg.const(rmin, xt) + tg.const(rdelta, xt) * steps) + fmax).unbind(0)  # C's rmin + rdelta*is + nmax
    for num in nums:
        # C's candidates use the current ``min``: once a candidate wins,
        # later ones are placed relative to its fitted min, not the data's.
        iscale = num / (hi - mn)
        lv = levels_at(iscale, mn)
        wl = wt * lv
        sums = tg.col_sum(torch.stack([wl, wl * lv, wl * xt]))
        sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, zero, this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, lv)
        take = (det > 0) & (cur < best) & ~flat
        levels = torch.where(take, lv, levels)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    levels = torch.where(flat, zero, levels)
    scale = torch.where(flat, zero, scale)
    return levels.t().to(torch.int32), scale, -mn
