"""llama.cpp's symmetric scale searches, vectorized over many groups at once.

q3_K and q6_K choose each 16-wide sub-block's scale with ``make_q3_quants``
or ``make_qx_quants`` (and q3_K's imatrix path runs ``make_qx_quants`` a
second time over the 16 sub-scales to find the super-scale). Their result is
decided by comparisons between float32 sums, so a one-ulp difference in a sum
can flip a whole sub-block; the ports here therefore repeat C's float32
operations one for one: products grouped as C's left-to-right ``w*x*l``,
sums accumulated element by element (``sequential_sum``), ints converted to
float before multiplying, ``nearest_int`` rounding, strict ``>`` tests. The
only loops are over the elements of one group and the fixed search steps; the
groups themselves are numpy's axis 0.

Both functions return *signed* codes ``l`` in ``[-nmax, nmax - 1]`` (C's
``L[i] - nmax``). A group whose largest magnitude is below ``GROUP_MAX_EPS``
gets C's ``L[i] = 0``, i.e. code ``-nmax``, and scale 0.
"""

from __future__ import annotations

import numpy as np

from .kquant import QK_K, nearest_int, sequential_sum

GROUP_MAX_EPS = np.float32(1e-15)


def signed_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of float32 [m, n]: (largest magnitude, the signed value having it), float32 [m] each.

    C scans with ``if (fabsf(x) > amax)`` from ``amax = 0``: the first of equal
    magnitudes wins, as with ``argmax``.
    """
    ax = np.abs(x)
    i = ax.argmax(axis=1)
    rows = np.arange(x.shape[0])
    return ax[rows, i], x[rows, i]


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``b ? a / b : 0`` in float32, without warnings for the dropped lanes."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, np.float32(1)), np.float32(0)).astype(np.float32)


def _clamped_codes(v: np.ndarray, nmax: int) -> np.ndarray:
    """``MAX(-nmax, MIN(nmax - 1, nearest_int(v)))`` as int16."""
    with np.errstate(invalid="ignore"):
        return np.clip(nearest_int(v), -nmax, nmax - 1).astype(np.int16)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` for every row of ``x``.

    x:  float32 [m, n] groups
    qw: float32 [m, n] weights, or None for C's ``qw == NULL`` (weight ``x²``)
    ->  codes int16 [m, n] in [-nmax, nmax-1], scale float32 [m]

    Starts from ``iscale = -nmax / max`` and tries the 18 neighbours
    ``-(nmax + 0.1·is) / max``, keeping the one with the best weighted
    least-squares score ``sumlx² / suml2``.
    """
    x = np.asarray(x, dtype=np.float32)
    w = x * x if qw is None else np.asarray(qw, dtype=np.float32)
    wx = w * x
    amax, vmax = signed_max(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, np.float32(1), vmax)

    def trial(num: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        iscale = (-num / vmax).astype(np.float32)
        codes = _clamped_codes(iscale[:, None] * x, nmax)
        lf = codes.astype(np.float32)
        return codes, sequential_sum(wx * lf), sequential_sum((w * lf) * lf)

    codes, sumlx, suml2 = trial(np.float32(nmax))
    scale = _divide(sumlx, suml2)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, sumlx, suml2 = trial(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = np.where(take[:, None], cand, codes)
        scale = np.where(take, _divide(sumlx, suml2), scale)
        best = np.where(take, scale * sumlx, best)
    codes[zero] = -nmax
    scale[zero] = 0
    return codes, scale


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` for every row of ``x``.

    x: float32 [m, n] groups -> codes int16 [m, n] in [-nmax, nmax-1], scale float32 [m]

    Rounds at ``-nmax / max``, then up to 5 passes of coordinate descent
    on the ``x²``-weighted score. C stops a group after a pass that changed
    nothing; running that pass again would change nothing either, so all
    groups take the same passes here and the loop stops when none changed.
    """
    x = np.asarray(x, dtype=np.float32)
    w = x * x
    wx = w * x
    amax, vmax = signed_max(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, np.float32(1), vmax)
    iscale = (np.float32(-nmax) / vmax).astype(np.float32)
    codes = _clamped_codes(iscale[:, None] * x, nmax)
    lf = codes.astype(np.float32)
    sumlx = sequential_sum(wx * lf)
    suml2 = sequential_sum((w * lf) * lf)
    for _ in range(5):
        changed = False
        for i in range(x.shape[1]):
            li = codes[:, i].astype(np.float32)
            slx0 = sumlx - wx[:, i] * li
            sl20 = suml2 - (w[:, i] * li) * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = _clamped_codes((x[:, i] * sl20) / slx0, nmax)
            nf = new.astype(np.float32)
            slx = slx0 + wx[:, i] * nf
            sl2 = sl20 + (w[:, i] * nf) * nf
            with np.errstate(over="ignore"):  # C's float32 overflows to inf the same way
                better = (slx * slx) * suml2 > (sumlx * sumlx) * sl2
            take = (slx0 > 0) & (new != codes[:, i]) & (sl2 > 0) & better
            if take.any():
                changed = True
                codes[:, i] = np.where(take, new, codes[:, i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        if not changed:
            break
    scale = np.where(suml2 > 0, _divide(sumlx, suml2), np.float32(0)).astype(np.float32)
    codes[zero] = -nmax
    scale[zero] = 0
    return codes, scale


def as_super_blocks(blocks: np.ndarray) -> np.ndarray:
    """Any float array of n·256 values -> float32 [n, 256]."""
    return np.asarray(blocks, dtype=np.float32).reshape(-1, QK_K)


def requantize(x: np.ndarray, search_codes: np.ndarray, d: np.ndarray, sc: np.ndarray,
               lo: int, hi: int) -> np.ndarray:
    """The k-quants' last step: ``clamp(nearest_int(x / (d·sc)), lo, hi)`` per sub-block.

    x: float32 [n, 256]; search_codes: int16 [n·16, 16]; d: float32 [n]; sc: [n, 16]
    -> int16 [n·16, 16]. Sub-blocks whose ``d·sc`` is 0 keep ``search_codes``.
    """
    n = x.shape[0]
    deff = (d[:, None] * sc.astype(np.float32)).reshape(-1, 1)
    live = deff != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(nearest_int(x.reshape(n * 16, 16) / deff), lo, hi).astype(np.int16)
    return np.where(live, fresh, search_codes)
