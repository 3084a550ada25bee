"""llama.cpp's ``make_q3_quants`` in torch, vectorized over many groups at once.

q3_K chooses each 16-wide sub-block's scale with it when there is no
importance matrix (the other symmetric search, ``make_qx_quants``, lives in
``torch_grid``: q3_K's and q6_K's sub-blocks and q3_K's imatrix projection run
it). Its result is decided by comparisons between float32 sums, so a one-ulp
difference in a sum can flip a whole sub-block; the port therefore repeats C's
float32 operations one for one: products grouped as C's left-to-right
``w*x*l``, sums accumulated element by element (``torch_grid.col_sum``), ints
converted to float before multiplying, ``nearest_int`` rounding, strict ``>``
tests. The only loops are over the elements of one group and the fixed search
steps; the groups themselves are axis 0, on the input's device.
"""

from __future__ import annotations

import torch

from . import torch_grid as tg


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` for every row of ``x``.

    x: float32 [m, n] groups -> codes int32 [m, n] in [-nmax, nmax-1] (C's ``L[i] - nmax``),
    scale float32 [m]. A group whose largest magnitude is below 1e-15 gets code -nmax and scale 0.

    Rounds at ``-nmax / max``, then up to 5 passes of coordinate descent
    on the ``x²``-weighted score. C stops a group after a pass that changed
    nothing; running that pass again would change nothing either, so all
    groups take the same passes here and the loop stops when none changed.
    """
    x = x.to(torch.float32)
    xt = x.t().contiguous()  # [n, m]: element i of every group is one contiguous row
    w = xt * xt
    wx = w * xt
    amax, vmax = tg.signed_max(x)
    zero = amax < tg.GROUP_MAX_EPS
    vmax = torch.where(zero, tg.const(1.0, x), vmax)
    iscale = tg.const(float(-nmax), x) / vmax
    lf = tg.nearest_int(iscale * xt).clamp(-nmax, nmax - 1).to(torch.float32)  # [n, m], C's L[i] - nmax
    sumlx = tg.col_sum(wx * lf)
    suml2 = tg.col_sum((w * lf) * lf)
    levels = list(lf.unbind(0))  # one row of integral floats per element, each replaced whole
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i, (xi, wi, wxi) in enumerate(zip(xt.unbind(0), w.unbind(0), wx.unbind(0), strict=True)):
            li = levels[i]
            slx0 = sumlx - wxi * li
            sl20 = suml2 - (wi * li) * li
            nf = tg.nearest_int((xi * sl20) / slx0).clamp(-nmax, nmax - 1).to(torch.float32)
            slx = slx0 + wxi * nf
            sl2 = sl20 + (wi * nf) * nf
            better = (slx * slx) * suml2 > (sumlx * sumlx) * sl2  # C's float32 overflows to inf the same way
            take = (slx0 > 0) & (nf != li) & (sl2 > 0) & better
            levels[i] = torch.where(take, nf, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    codes = torch.stack(levels).to(torch.int32)
    f0 = tg.const(0.0, x)
    scale = torch.where(suml2 > 0, tg.divide_or_zero(sumlx, suml2), f0)
    codes = torch.where(zero, -nmax, codes)
    return codes.t().contiguous(), torch.where(zero, f0, scale)
