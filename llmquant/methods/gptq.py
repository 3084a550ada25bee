"""GPTQ (Frantar et al. 2022) straight onto a ggml block grid.

Objective, per linear layer with weight ``W [co, ci]`` and calibration inputs
``X [n, ci]``: choose codes ``Q`` on the file's grid minimizing

    ||W Xᵀ - Q Xᵀ||²  =  tr((W - Q) H (W - Q)ᵀ) · n/2,   H = 2/n · XᵀX.

Columns are quantized one at a time; each column's rounding error ``Err`` is
pushed onto the columns not yet quantized through the upper Cholesky factor
``Hinv`` of H⁻¹ (the OBS update), in lazy batches of ``block_cols`` columns.

The grid is the file's grid: a ggml block is ``fmt.block_size`` consecutive
input columns of one row (32 for the legacy types, a 256-wide super-block for
the k-quants), whose ``fmt.sub_size``-wide sub-blocks each have one effective
scale (and min). A block's whole grid is fixed when the column walk enters
it, from the block's *current* (error-updated) weights (a k-quant's
sub-scales hang on one fp16 super-scale, so they cannot be chosen one
sub-block at a time), and every code is the nearest one on that grid, so the
codes returned are exactly what ``fmt.pack`` writes and llama.cpp reads back.
With ``act_order`` the walk visits columns by decreasing ``diag(H)`` and the
grids are chosen upfront from the original W ("static groups"), so a block
whose columns are visited out of order still has one grid.

Scale search: llama.cpp's rule (q4_0: d = max/-8) wastes the grid; instead
candidate grids per block (the block's extreme at either end of the code range
times s in 0.70..1.10, range trimmed from either side for types with a min,
plus two rounds of weighted least-squares refits), each fp16-rounded, are
scored and the one with the least ``Σ_j H[j,j]·(w_j - q_j)²`` over the block
wins (or, with ``search_loss="gptq"``, the least GPTQ loss of walking the
block's 32 columns with it), all rows at once. llama.cpp's own grid is always
among the candidates. K-quants: the super-block's grid is llama.cpp's own
importance-weighted search (the path ``llama-quantize --imatrix`` takes) with
diag(H) of the block's columns as the importance, on the current weights.
Everything runs on the device of W and H (the CPU or a GPU), llama.cpp's own
rules included (``fmt.rtn_torch``, the k-quant searches); only the
QuantBlocks returned cross to numpy (``fmt.blocks``, ``edge``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..formats.base import BlockFormat, QuantBlocks
from ..formats.torch_grid import Projection, map_rows
from ..formats.torch_grid import dequantize as _dequant  # codes [..., n, g], d, m [..., n] -> weights
from ..threads import one_thread

_SCALE_STEPS = torch.linspace(0.70, 1.10, 21)  # d·s candidates, 1.0 included
_SHRINK_STEPS = torch.tensor([0.0, 0.02, 0.04, 0.07, 0.10, 0.14])  # range trimmed per side (has_min)
_REFITS = 2
_MAX_RETRIES = 4  # damping x10 per failed Cholesky
_SEARCH_CHUNK = 256  # blocks per search batch: [K, 256, 32] stays in cache (5x faster than 4096)
_STAT_ROWS = 512  # rows used for the error-ratio report
_TRI_BASE = 512  # triangular blocks up to this size are inverted by one solve against the identity
_SLICES = 16  # a ci×ci matrix is reordered in row slices: the temporaries are 2/16 of it, not a full copy


class HessianError(RuntimeError):
    """H cannot be used for GPTQ (empty, non-finite, or not positive definite
    even after damping). The pipeline catches it and falls back to RTN."""


# --------------------------------------------------------------------------- Hessian


def accumulate_hessian(XtX: torch.Tensor, x: torch.Tensor) -> int:
    """Add ``xᵀx`` into ``XtX [ci, ci]`` in place; return the token count added.

    x: [..., ci], any float dtype (cast to XtX's dtype).
    """
    x = x.reshape(-1, XtX.shape[0]).to(XtX.dtype)
    XtX.addmm_(x.T, x)
    return x.shape[0]


def accumulate_cross(D: torch.Tensor, x_fp: torch.Tensor, x: torch.Tensor) -> None:
    """Add ``(x_fp - x)ᵀ x`` into ``D [ci, ci]`` in place (x_fp, x: [..., ci], the same tokens):
    how the full-precision model's inputs differ from the quantized model's, seen through the latter."""
    x = x.reshape(-1, D.shape[0]).to(D.dtype)
    D.addmm_((x_fp.reshape(-1, D.shape[0]).to(D.dtype) - x).T, x)


def accumulate_residual(E: torch.Tensor | None, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Add ``rᵀ x`` into ``E [co, ci]`` in place (None: a new float32 one on x's device) and return
    it: r [..., co] how the full-precision model's residual stream differs from the quantized
    model's where a linear adds into it, x [..., ci] that linear's inputs in the quantized model
    (the same tokens)."""
    if E is None:
        E = torch.zeros(r.shape[-1], x.shape[-1], device=x.device)
    x = x.reshape(-1, E.shape[1]).to(E.dtype)
    E.addmm_(r.reshape(-1, E.shape[0]).to(E.dtype).T, x)
    return E


def model_target(Ws: list[torch.Tensor], H: torch.Tensor, D: torch.Tensor, damp: float = 0.01,
                 in_place: bool = False, E: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The weights W* [co, ci] that GPTQ rounds to fit the full-precision model instead of the layer.

    With X̃ [n, ci] a linear's inputs in the quantized model and X the full-precision
    model's on the same tokens, the error against the full-precision output,
    ||X̃ Qᵀ - X Wᵀ||², is ||X̃ (Q - W*)ᵀ||² plus a constant for

        W* = W + W·D·H⁻¹,   H = c·X̃ᵀX̃,  D = c·(X - X̃)ᵀX̃  (any one scale c),

    the least-squares solution (W*·X̃ᵀX̃ = W·XᵀX̃). So GPTQ of W* under H minimizes
    the output error against the full-precision model (asymmetric calibration, as
    in GPTAQ, Li et al. 2025): each linear also makes up for what the quantized
    layers before it changed in its input. W* = W where both streams agree.

    E = c·Rᵀ X̃ [Σ co, ci] (``accumulate_residual``, the same scale c), for a linear that adds its
    output into the residual stream, with R [n, co] the full-precision stream minus the quantized
    one just before that add: the target is then the full-precision stream after the add,
    ||X̃ Qᵀ - (X Wᵀ + R)||², and W* = W + (W·D + E)·H⁻¹. The linear also makes up, as far as its
    inputs can tell, for the error the stream carries from every quantized linear before it.
    H⁻¹ is damped as GPTQ damps it (damp · mean diag(H), dead columns' diagonal
    1), retried with 10x the damping like GPTQ; the float64 work is one ci×ci matrix
    and row slices.
    Ws: linears sharing this input, each [co_i, ci]; returns W* float32 for each,
    into Ws themselves where ``in_place`` (float32 ones: no second copy of a
    Llama-70B MLP).
    """
    WD = torch.cat([W.to(torch.float32) for W in Ws]) @ D.to(torch.float32)  # [Σ co, ci]
    if E is not None:
        if E.shape != WD.shape:
            raise ValueError(f"the residual term is {tuple(E.shape)}, the weights {tuple(WD.shape)}")
        WD += E.to(torch.float32)
    dead = H.diagonal() == 0
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(_MAX_RETRIES + 1):
        if attempt:
            damp = damp * 10 if damp > 0 else 0.01
        L = H.to(torch.float64)  # one float64 ci×ci matrix, factored in place
        L.diagonal()[dead] = 1.0
        L.diagonal().add_(damp * L.diagonal().mean())
        torch.linalg.cholesky_ex(L, out=(L, info))
        if info.item() == 0:
            break
    else:
        raise HessianError(f"Hessian not positive definite even with damping {damp:g}")
    for rows in _slices(WD.shape[0]):  # W·D·H⁻¹ (H symmetric), in place of W·D
        WD[rows] = torch.cholesky_solve(WD[rows].T.to(torch.float64), L).T.to(torch.float32)
    del L
    out, r0 = [], 0
    for W in Ws:
        shift = WD[r0 : r0 + W.shape[0]]
        r0 += W.shape[0]
        out.append(W.add_(shift) if in_place and W.dtype == torch.float32 else W.to(torch.float32) + shift)
    return out


class HessianAccumulator:
    """Sums ``XᵀX`` over calibration batches; ``hessian()`` (GPTQ) or ``mean()`` (AWQ) divides once, in place.

    float32 is the default (halves the cost of the sum; measured accurate
    enough, see tests): pass ``dtype=torch.float64`` for more digits.
    """

    def __init__(self, ci: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.XtX = torch.zeros(ci, ci, dtype=dtype, device=device)  # on the inputs' device: no transfer per batch
        self.n = 0
        self._scaled: str | None = None  # which division the sum went through: "hessian" or "mean"

    def add(self, x: torch.Tensor) -> None:
        """x: [..., ci] inputs of the linear layer (batch, tokens, features)."""
        if self._scaled:
            raise RuntimeError(f"HessianAccumulator.add after {self._scaled}(): the sum was already divided")
        self.n += accumulate_hessian(self.XtX, x.detach())

    def hessian(self) -> torch.Tensor:
        """H = 2/n · Σ xᵀx  [ci, ci], divided in place on the first call (the linears of a group
        share it, and a second ci×ci copy is 3.3 GB at ci = 28672); later calls return the same tensor."""
        return self._divided("hessian", lambda: self.XtX.mul_(2.0 / self.n))

    def mean(self) -> torch.Tensor:
        """Σ xᵀx / n  [ci, ci] (AWQ's Gram matrix), divided in place on the first call like ``hessian()``."""
        return self._divided("mean", lambda: self.XtX.div_(self.n))

    def _divided(self, kind: str, divide) -> torch.Tensor:
        if self.n == 0:
            raise HessianError("no calibration tokens reached this layer")
        if self._scaled is None:
            divide()
            self._scaled = kind
        elif self._scaled != kind:
            raise RuntimeError(f"HessianAccumulator.{kind}() after {self._scaled}(): the sum was divided otherwise")
        return self.XtX


# --------------------------------------------------------------------------- grid search


def _codes(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, fmt: type[BlockFormat]) -> torch.Tensor:
    """Nearest codes (as float) of w [..., n, g] on grids d, m [..., n]: ``fmt.nearest_codes``."""
    return fmt.nearest_codes(w, d[..., None], None if m is None else m[..., None])


def _candidates(
    w: torch.Tensor, rtn: Projection, fmt: type[BlockFormat]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidate grids around llama.cpp's: d, m [K, n] (m None for symmetric types).

    w: [n, g] block weights; rtn: the grid of ``fmt.rtn_torch`` of the same blocks.
    """
    d0 = rtn.scales
    s = _SCALE_STEPS.to(w.device)[:, None]
    if rtn.mins is None:  # the extreme at either end of the code range, times s
        ext = w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
        return torch.cat([d0[None], ext / fmt.qmin * s, ext / fmt.qmax * s]), None
    # asymmetric: trim the range [lo, hi] from either side, and scale it about its middle
    lo = w.amin(dim=1)
    r = w.amax(dim=1) - lo
    a = _SHRINK_STEPS.to(w.device)
    ta, tb = (t.reshape(-1) for t in torch.meshgrid(a, a, indexing="ij"))
    lo_c = lo + ta[:, None] * r
    d_c = (1 - ta - tb)[:, None] * r / fmt.qmax
    mid = lo + r / 2
    d_s = d0 * s
    m0 = rtn.mins
    return (
        torch.cat([d0[None], d_c, d_s]),
        torch.cat([m0[None], lo_c, mid - d_s * fmt.qmax / 2]),
    )


def _refit(
    w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted least-squares grid for fixed codes: min Σ h (w - d·c - m)²  (keeps d, m if singular).

    w, h: [n, g]; c: [K, n, g]; d, m: [K, n]
    """
    hc = h * c
    c1 = None if m is None else hc.sum(-1)
    cw = (hc * w).sum(-1)
    cc = hc.mul_(c).sum(-1)  # hc is spent: its buffer becomes h·c·c
    if m is None:
        return lstsq_grid(cc, cw, d)
    return lstsq_grid(cc, cw, d, m, c1, h.sum(-1), (h * w).sum(-1))


def lstsq_grid(cc, cw, d, m=None, c1=None, o1=None, w1=None):
    """Solve the 2x2 (or 1x1) normal equations of min ||w - d·c - m||_G for (d, m).

    Inputs are the weighted inner products cᵀGc, cᵀGw, cᵀG1, 1ᵀG1, wᵀG1 per
    block (any shape); where the system is singular the old d, m are kept.
    Shared by GPTQ's diagonal weighting and AWQ's full block Gram matrix.
    """
    if m is None:
        ok = cc > 0
        return torch.where(ok, cw / torch.where(ok, cc, 1.0), d), None
    det = cc * o1 - c1 * c1
    ok = det.abs() > 1e-6 * (cc * o1).clamp_min(1e-30)
    det = torch.where(ok, det, 1.0)
    d_new = (cw * o1 - c1 * w1) / det
    m_new = (cc * w1 - c1 * cw) / det
    return torch.where(ok, d_new, d), torch.where(ok, m_new, m)


def _weighted_err(w, h, c, d, m) -> torch.Tensor:
    """Σ_j h_j (w_j - q_j)² per candidate and block: [K, n] (c: codes [K, n, g]).

    Every step after the dequantization runs in place on its buffer; (q - w)² is (w - q)², bit for bit.
    """
    return _dequant(c, d, m).sub_(w).square_().mul_(h).sum(-1)


def _candidate_grids(
    w: torch.Tensor, h: torch.Tensor, fmt: type[BlockFormat], rtn: Projection, scored: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """All fp16-exact candidate grids d, m [K, n] for blocks w [n, 32] (h: [n, 32] weights),
    each projected onto what the file stores (``fmt.project``: fp16, saturating).

    scored: also their ``_weighted_err`` [K, n], from the codes each refit computes anyway
    (only the last round's grids need codes of their own).
    """
    p = fmt.project(*_candidates(w, rtn, fmt))
    d, m = p.scales, p.mins
    ds, ms, errs = [d], [m], []
    for r in range(_REFITS + 1 if scored else _REFITS):
        c = _codes(w, d, m, fmt)
        if scored:
            errs.append(_weighted_err(w, h, c, d, m))
        if r < _REFITS:
            p = fmt.project(*_refit(w, h, c, d, m))
            d, m = p.scales, p.mins
            ds.append(d)
            ms.append(m)
    grids = torch.cat(ds), None if m is None else torch.cat(ms)
    return (*grids, torch.cat(errs)) if scored else grids


def _cat_grids(parts: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate (d, m) grids of consecutive chunks of blocks."""
    d = torch.cat([p[0] for p in parts])
    return d, None if parts[0][1] is None else torch.cat([p[1] for p in parts])


def _pick(d: torch.Tensor, m: torch.Tensor | None, loss: torch.Tensor):
    """The candidate of least loss [K, n] per block: d, m [n]."""
    best = loss.argmin(dim=0, keepdim=True)
    return d.gather(0, best)[0], None if m is None else m.gather(0, best)[0]


def search_grid(
    w: torch.Tensor, h: torch.Tensor, fmt: type[BlockFormat], scale_search: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Choose one fp16-exact grid per block: (scales [n], mins [n] or None).

    w: float32 [n, 32] block weights; h: [n, 32] or [32] non-negative weights
    (e.g. diag(H) of the block's columns). Without ``scale_search`` this is
    llama.cpp's grid (``fmt.rtn_torch``); with it, the candidate with the least
    weighted error, never worse than llama.cpp's in that error.
    """
    if w.shape[0] > _SEARCH_CHUNK:  # bound the [K, n, 32] temporaries; chunks side by side on torch's threads
        return _cat_grids(map_rows(lambda wc, hc: search_grid(wc, hc, fmt, scale_search),
                                   (w, h.expand_as(w)), _SEARCH_CHUNK))
    _, rtn = fmt.rtn_torch(w)
    if not scale_search:
        return rtn.scales, rtn.mins
    h = h.to(torch.float32).expand_as(w)
    return _pick(*_candidate_grids(w, h, fmt, rtn, scored=True))


def _simulate_block(w, U, d, m, fmt) -> torch.Tensor:
    """GPTQ loss Σ_t err_t² of each candidate grid over one block: [K, n].

    w: [n, g] current weights; U: [g, g] block of the upper Cholesky factor of H⁻¹.
    """
    Wk = w.expand(d.shape[0], -1, -1).clone()  # [K, n, g]
    loss = torch.zeros(d.shape, device=d.device)
    for t in range(w.shape[1]):
        x = Wk[:, :, t]
        c = _codes(x[..., None], d, m, fmt)[..., 0]
        q = _dequant(c[..., None], d, m)[..., 0]
        err = (x - q) / U[t, t]
        Wk[:, :, t:] -= err[..., None] * U[t, t:]
        loss += err.square()
    return loss


def _blocks(W: torch.Tensor, n: int) -> torch.Tensor:
    """W [co, ci] -> [co * ci/n, n], the ggml block order (row-major)."""
    if W.shape[-1] % n:
        raise ValueError(f"input width {W.shape[-1]} is not a multiple of {n}")
    return W.reshape(-1, n)


def _quant_blocks(fmt: type[BlockFormat], codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> QuantBlocks:
    """codes [co, ci], d/m [co, ci/block] (torch, any device) of a one-level format -> QuantBlocks in
    ggml order: the numpy edge (``fmt.blocks``)."""
    return fmt.blocks(codes, Projection(scales=d.reshape(-1), mins=None if m is None else m.reshape(-1)))


def _searched_grid(W: torch.Tensor, fmt: type[BlockFormat],
                   hdiag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``search_grid`` over every block of W float32 [co, ci]: blocks [co·ci/32, 32] and their d, m [co·ci/32]."""
    co, ci = W.shape
    g = fmt.block_size
    wb = _blocks(W.to(torch.float32).contiguous(), g)
    hb = (torch.ones(ci, device=W.device) if hdiag is None else hdiag.to(torch.float32)).reshape(1, -1, g)
    with one_thread():
        d, m = search_grid(wb, hb.expand(co, -1, -1).reshape(-1, g), fmt)
    return wb, d, m


def rtn_search(W: torch.Tensor, fmt: type[BlockFormat], hdiag: torch.Tensor | None = None) -> QuantBlocks:
    """Round to nearest on a searched grid, without error feedback.

    W: float32 [co, ci]; hdiag: [ci] column weights (diag(H)), or None for plain
    squared error. Blocks in ggml order (row-major, 32 columns each).
    """
    wb, d, m = _searched_grid(W, fmt, hdiag)
    return _quant_blocks(fmt, _codes(wb, d, m, fmt), d, m)


# --------------------------------------------------------------------------- GPTQ


@dataclass(frozen=True)
class GPTQResult:
    """q: blocks in ggml order (row r, block b at r·ci/32 + b); W_hat [co, ci] ==
    fmt.dequantize(q) reshaped, bit for bit. rel_err / rel_err_rtn:
    tr(E H Eᵀ)/tr(W H Wᵀ) for GPTQ and for plain ``fmt.rtn`` (on at most 512
    evenly spaced rows); damp: the relative damping that made H usable."""

    q: QuantBlocks
    W_hat: torch.Tensor
    rel_err: float
    rel_err_rtn: float
    damp: float
    n_dead: int
    rounded: torch.Tensor | None = None  # [co, ci] the error-updated weights the walk rounded into q


def _slices(n: int) -> list[slice]:
    step = -(-n // _SLICES)
    return [slice(i, i + step) for i in range(0, n, step)]


def _reorder(src: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """src[idx][:, idx] as ``dtype`` [n, n], by row slices: the only full-size allocation is the result
    (at Llama-70B's down_proj width, ci = 28672, one float64 copy is 6.6 GB)."""
    n = src.shape[0]
    out = torch.empty(n, n, dtype=dtype, device=src.device)
    for rows in _slices(n):
        out[rows] = src[idx[rows]][:, idx]
    return out


def _reversed_hessian(H0: torch.Tensor, dead: torch.Tensor, rev: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """J·(scale·H)·J in float64 [ci, ci]: H0 in the reversed visiting order ``rev`` [ci], dead diagonals set to 1."""
    Hr = _reorder(H0, rev, torch.float64)
    if scale != 1.0:
        Hr.mul_(scale)
    Hr.diagonal()[dead[rev]] = 1.0
    return Hr


def _invert_lower_(L: torch.Tensor) -> None:
    """Overwrite the lower triangular L [n, n] (any strides) with L⁻¹, in place.

    [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹·C·A⁻¹, D⁻¹]]: C is solved against A by
    row slices and against D by column slices (rows of X·A = C, columns of
    D·Y = X are independent), then A and D are inverted the same way. The
    flops are LAPACK trtri's n³/3, a third of a triangular solve against the
    identity, and the only temporaries are slices.
    """
    n = L.shape[0]
    if n <= _TRI_BASE:
        L.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False))
        return
    k = n // 2
    A, C, D = L[:k, :k], L[k:, :k], L[k:, k:]
    for rows in _slices(n - k):
        C[rows] = torch.linalg.solve_triangular(A, C[rows], upper=False, left=False)  # C·A⁻¹
    for cols in _slices(k):
        C[:, cols] = torch.linalg.solve_triangular(D, C[:, cols], upper=False).neg_()  # -D⁻¹·C·A⁻¹
    _invert_lower_(A)
    _invert_lower_(D)


def _inverse_cholesky(H0: torch.Tensor, dead: torch.Tensor, order: torch.Tensor, damp: float, scale: float = 1.0
                      ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ in visiting ``order``, λ = damp·mean(diag H): float32 [ci, ci].

    H is scale·H0, scaled in the float64 work copy (see ``gptq_quantize``'s h_scale).

    With J the reversal, J(H + λI)J = L·Lᵀ gives (H + λI)⁻¹ = (J L⁻¹ J)ᵀ(J L⁻¹ J),
    and J L⁻¹ J is upper triangular: one Cholesky and one triangular inversion in
    float64 (n³/3 each), where the factor of the inverse computed directly takes a
    second Cholesky and two full solves. Both are done in place, the Cholesky on a
    column-major (transposed) view, which LAPACK takes without a copy: the peak
    is one float64 ci×ci matrix, the float32 result and a few row slices.
    Retries with damping x10 (from 0.01 if it was 0), up to 4 times; then
    raises HessianError.
    """
    rev = order.flip(0)
    diag = H0.diagonal().to(torch.float64) * scale
    diag[dead] = 1.0
    mean_diag = diag.mean().item()
    info = torch.empty((), dtype=torch.int32, device=H0.device)
    for attempt in range(_MAX_RETRIES + 1):
        if attempt:
            damp = damp * 10 if damp > 0 else 0.01
        Lt = _reversed_hessian(H0, dead, rev, scale).mT  # symmetric: the column-major view is the same matrix
        Lt.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(Lt, out=(Lt, info))
        if info.item() != 0:
            continue
        _invert_lower_(Lt)
        U = _reorder(Lt, torch.arange(len(rev) - 1, -1, -1, device=H0.device), torch.float32)  # J·L⁻¹·J
        del Lt
        if torch.isfinite(U).all():
            return U, damp
    raise HessianError(f"Hessian not positive definite even with damping {damp:g}")


def super_grid(w: torch.Tensor, h: torch.Tensor | None,
               fmt: type[BlockFormat]) -> tuple[torch.Tensor, Projection]:
    """A k-quant grid for the super-blocks w [n, 256]: llama.cpp's own search, weighted by
    h ([256] or [n, 256], e.g. diag(H) of their columns) as its imatrix path weighs columns
    (h None: its plain rule), on w's device. Returns the search's codes
    [n·256/sub, sub] (GPTQ replaces them) and the grid (``Projection``, with d, sc, dmin, m)."""
    imp = None if h is None else h.to(torch.float32).expand_as(w).contiguous()
    return fmt.rtn_torch(w.to(torch.float32).contiguous(), imp)


def _block_grid(w, h, U, fmt, scale_search: bool, search_loss: str):
    """Grid of one ggml block column range at the moment GPTQ enters it: d, m [co] (legacy types).

    w: [co, 32] current weights; h: [32] diag(H); U: [32, 32] block of Hinv.
    """
    if not scale_search or search_loss == "hdiag":
        return search_grid(w, h, fmt, scale_search)

    def chunk(wc):
        d, m = _candidate_grids(wc, h.expand_as(wc), fmt, fmt.rtn_torch(wc)[1])
        return _pick(d, m, _simulate_block(wc, U, d, m, fmt))

    return _cat_grids(map_rows(chunk, (w,), _SEARCH_CHUNK))


def _walk(W, Hinv, fmt, S, M, block_cols, col_block=None, choose=None):
    """The GPTQ column walk, in place on W [co, ci] (visiting order): codes [co, ci].

    On return W holds, column by column, the error-updated weights the walk rounded
    (what a tuning method starts from: GPTQ's codes are their nearest codes).

    Hinv [ci, ci]: upper Cholesky factor of H⁻¹ (visiting order). S, M
    [co, ci/sub]: the effective scale (and min) of every sub-block. Static
    groups: col_block [ci] names the sub-block of each visited column and S, M
    are given. Otherwise columns are in natural order and
    ``choose(w [co, gw], j, U [gw, gw]) -> d, m [co, gw/sub]`` fills S, M as the
    walk enters each ggml block (gw = fmt.block_size columns).
    """
    co, ci = W.shape
    gw, sub = fmt.block_size, fmt.sub_size
    Q = torch.zeros(co, ci, device=W.device)
    for i1 in range(0, ci, block_cols):
        i2 = min(i1 + block_cols, ci)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # static groups walk the whole range at once; otherwise each ggml block's grid is fixed
        # as the walk enters it, by a search that runs on all of torch's threads (``choose``)
        step = i2 - i1 if col_block is not None else gw
        for k in range(0, i2 - i1, step):
            if col_block is None:
                g = slice(k, k + gw)
                d_b, m_b = choose(W1[:, g], i1 + k, Hinv1[g, g])
                b = (i1 + k) // sub
                S[:, b : b + gw // sub] = d_b
                if M is not None:
                    M[:, b : b + gw // sub] = m_b
            with one_thread():
                _columns(W1, Err1, Hinv1, Q[:, i1:i2], S, M, fmt, range(k, k + step),
                         [(i1 + i) // sub for i in range(k, k + step)] if col_block is None
                         else col_block[i1 + k : i1 + k + step])
        W[:, i1:i2] = W1  # each column as the walk found it (``_columns`` leaves them so)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def _columns(W1, Err1, Hinv1, Q1, S, M, fmt, cols: range, blocks: list[int]) -> None:
    """The walk over ``cols`` of one lazy batch, one column at a time, in place.

    W1, Err1, Q1 [co, batch], Hinv1 [batch, batch]: the batch's weights, scaled
    errors and codes; blocks: the sub-block (column of S, M) of each column.
    Tiny ops on [co, 1] columns, so as few as can be: a column's grid is taken
    once per sub-block, and only the columns after it are updated, which leaves
    each column as the walk rounded it.
    """
    b0 = None
    for i, b in zip(cols, blocks, strict=True):
        if b != b0:
            b0, d, m = b, S[:, b : b + 1], None if M is None else M[:, b : b + 1]
        w = W1[:, i : i + 1]
        c = fmt.nearest_codes(w, d, m)
        torch.div(w - _dequant(c, d[:, 0], None if m is None else m[:, 0]), Hinv1[i, i], out=Err1[:, i : i + 1])
        W1[:, i + 1 :] -= Err1[:, i : i + 1] * Hinv1[i : i + 1, i + 1 :]
        Q1[:, i : i + 1] = c


def _joined(pieces: list[Projection], co: int) -> Projection:
    """The k-quant grids of each 256-column range, in walk order ([co] super-blocks each), as one
    grid in ggml order (row r, super-block s at r·nsb + s)."""
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(p, name) for p in pieces]
        if parts[0] is None:
            return None
        joined = torch.stack([t.reshape(co, -1) for t in parts], dim=1)  # [co, nsb, k]
        return joined.reshape(-1) if parts[0].dim() == 1 else joined.reshape(-1, parts[0].shape[1])

    return Projection(**{f.name: cat(f.name) for f in fields(Projection)})


def _rel_err(W: torch.Tensor, H: torch.Tensor, *W_hats: torch.Tensor) -> list[float]:
    """tr((W-Ŵ) H (W-Ŵ)ᵀ)/tr(W H Wᵀ) for each Ŵ, on at most _STAT_ROWS rows."""
    rows = torch.linspace(0, W.shape[0] - 1, min(W.shape[0], _STAT_ROWS), device=W.device).round().long()
    H = H.to(torch.float32)
    Ms = torch.cat([W[rows]] + [W[rows] - Wh[rows] for Wh in W_hats])  # [(1+k)·r, ci]
    t = ((Ms @ H) * Ms).sum(-1).double().reshape(1 + len(W_hats), -1).sum(-1)
    return [(t[i] / t[0]).item() if t[0] > 0 else 0.0 for i in range(1, len(W_hats) + 1)]


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: type[BlockFormat], **options) -> GPTQResult:
    """GPTQ of ``W [co, ci]`` under ``H [ci, ci]`` (2/n·XᵀX) onto fmt's blocks: ``gptq_quantize_rows``
    of one linear, whose keyword options it takes."""
    return gptq_quantize_rows([W], H, fmt, **options)[0]


def _row_range(grid: Projection, co: int, rows: slice) -> Projection:
    """The part of a grid in ggml order (row-major: every field's first dimension is co times a
    per-row count) that belongs to ``rows``."""
    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(co, -1, *t.shape[1:])[rows].reshape(-1, *t.shape[1:])

    return Projection(**{f.name: part(getattr(grid, f.name)) for f in fields(Projection)})


def gptq_quantize_rows(
    Ws: list[torch.Tensor],
    H: torch.Tensor,
    fmt: type[BlockFormat],
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_cols: int = 128,
    scale_search: bool = True,
    search_loss: str = "hdiag",
    h_scale: float = 1.0,
) -> list[GPTQResult]:
    """GPTQ of linears that share one input (q/k/v, gate/up: one H) under ``H [ci, ci]`` (2/n·XᵀX)
    onto fmt's blocks, in one walk over their rows stacked, ``[Σ co, ci]``; one result per
    ``Ws[i] [co_i, ci]``, in order.

    Every step of the walk treats rows apart (a block's grid search, a column's
    rounding and error, the update of later columns), so each result is the one
    ``Ws[i]`` gets alone. One walk pays the column loop's Python steps (a few
    tiny torch ops per column) once for the group instead of once per linear,
    and hands each search enough rows to keep every thread busy; H's factor is
    computed once.

    scale_search: choose each block's grid among candidates (else llama.cpp's
    rule); search_loss: "hdiag" ranks them by Σ H[j,j]·(w_j - q_j)², "gptq" by
    the GPTQ loss of walking the block's 32 columns with each candidate
    (legacy types only). block_cols is raised to the format's block width where it
    is narrower (a k-quant's 256 columns).
    Dead columns (H[i,i] == 0, never active in calibration) get H[i,i] = 1:
    nothing of theirs is propagated, and unlike the reference they keep their
    weights (quantized to nearest) rather than being zeroed, so the layer still
    works on inputs the calibration set did not exercise.
    h_scale: H is h_scale·H, applied in the float64 work copy instead of a scaled
    float32 copy of H (a power of two, such as AWQ's 2 of 2/n·XᵀX over its mean
    XᵀX/n, gives bit for bit the result of passing h_scale·H).
    Raises HessianError if H is all zero or non-finite, or stays indefinite.
    """
    ci = Ws[0].shape[1]
    gw, sub = fmt.block_size, fmt.sub_size
    block_cols = max(block_cols, gw)
    if any(W.shape[1] != ci for W in Ws):
        raise ValueError(f"joined linears must share their input width, not {[tuple(W.shape) for W in Ws]}")
    if ci % gw or block_cols % gw:
        raise ValueError(f"ci ({ci}) and block_cols ({block_cols}) must be multiples of {gw}")
    if search_loss not in ("hdiag", "gptq"):
        raise ValueError(f"search_loss must be 'hdiag' or 'gptq', not {search_loss!r}")
    if not torch.isfinite(H).all():
        raise HessianError("Hessian has non-finite entries")
    # one linear: no copy where W is float32 already (a 70B down_proj is 0.9 GB)
    W0 = (Ws[0].detach().to(torch.float32) if len(Ws) == 1
          else torch.cat([W.detach().to(torch.float32) for W in Ws])).contiguous()
    co = W0.shape[0]
    H0 = H.detach().to(W0.device)  # read only: the float64 work copy is built in visiting order, see _inverse_cholesky
    dead = H0.diagonal() == 0
    if dead.all():
        raise HessianError("Hessian is all zero (no calibration signal for this layer)")
    hdiag = H0.diagonal().to(torch.float32) * h_scale
    hdiag[dead] = 1.0
    nb = ci // sub
    two_level = gw != sub  # k-quants: a super-block's grid is chosen whole, and packed from its SuperGrid
    pieces: list[QuantBlocks] = []  # k-quants: the grid of each block column range, in walk order

    perm = col_block = None
    S = torch.zeros(co, nb, device=W0.device)
    M = torch.zeros(co, nb, device=W0.device) if fmt.has_min else None
    if act_order:  # static groups: every block's grid from the original W
        perm = torch.argsort(hdiag, descending=True, stable=True)
        if two_level:
            _, grid = super_grid(_blocks(W0, gw), hdiag.reshape(-1, gw).repeat(co, 1) if scale_search else None, fmt)
            pieces = [grid]
            S, M = grid.scales, grid.mins
        elif scale_search:
            _, S, M = _searched_grid(W0, fmt, hdiag)
        else:
            _, grid = fmt.rtn_torch(_blocks(W0, gw))
            S, M = grid.scales, grid.mins
        S = S.reshape(co, nb)
        M = None if M is None else M.reshape(co, nb)
        col_block = (perm // sub).tolist()
    order = torch.arange(ci, device=W0.device) if perm is None else perm
    Hinv, damp = _inverse_cholesky(H0, dead, order, damp, h_scale)
    W = W0.clone() if perm is None else W0[:, perm]

    def choose(w, j, U):  # w [co, gw]: block at natural column j, as the walk finds it
        if two_level:
            _, grid = super_grid(w, hdiag[j : j + gw] if scale_search else None, fmt)
            pieces.append(grid)
            return grid.scales.reshape(co, -1), None if grid.mins is None else grid.mins.reshape(co, -1)
        d, m = _block_grid(w, hdiag[j : j + gw], U, fmt, scale_search, search_loss)
        return d[:, None], None if m is None else m[:, None]

    Q = _walk(W, Hinv, fmt, S, M, block_cols, col_block, None if act_order else choose)
    if perm is not None:
        natural = torch.argsort(perm)
        Q, W = Q[:, natural], W[:, natural]
    if two_level:  # S, M hold the flat view of these grids
        grid = pieces[0] if act_order else _joined(pieces, co)
    else:
        grid = Projection(scales=S.reshape(-1), mins=None if M is None else M.reshape(-1))
    W_hat = _dequant(Q.reshape(co, nb, sub), S, M).reshape(co, ci)
    rtn_codes, rtn_grid = fmt.rtn_torch(_blocks(W0, gw))
    W_rtn = _dequant(rtn_codes, rtn_grid.scales, rtn_grid.mins).reshape(co, ci)
    results, r0 = [], 0
    for Wi in Ws:
        r = slice(r0, r0 + Wi.shape[0])
        r0 = r.stop
        rel, rel_rtn = _rel_err(W0[r], H0, W_hat[r], W_rtn[r])  # ratios: the same for h_scale·H
        results.append(GPTQResult(q=fmt.blocks(Q[r], _row_range(grid, co, r)),  # the numpy edge: what pack writes
                                  W_hat=W_hat[r], rel_err=rel, rel_err_rtn=rel_rtn, damp=damp,
                                  n_dead=int(dead.sum()), rounded=W[r]))
    return results


__all__ = [
    "GPTQResult",
    "HessianAccumulator",
    "HessianError",
    "accumulate_cross",
    "accumulate_residual",
    "accumulate_hessian",
    "gptq_quantize",
    "gptq_quantize_rows",
    "model_target",
    "rtn_search",
    "search_grid",
]
