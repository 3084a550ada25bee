"""AWQ (Lin et al. 2023, arXiv 2306.00978) straight onto a ggml block grid.

Objective, per true-sequential group of linears that share an input (q/k/v,
o, gate/up, down) with weights ``W_m [co_m, ci]`` and the group's real
calibration inputs ``X [n, ci]``: choose per-input-channel scales ``s > 0``
minimizing

    L(s) = Σ_m ‖Q(W_m·diag(s)) (diag(s)⁻¹·Xᵀ) − W_m·Xᵀ‖²

where Q is the target ggml type's quantizer, with ``s = mean|x|^α``: α on a
grid of ``n_grid`` points in [0, 1), ``s`` clamped to ≥ 1e-4 and divided by
``sqrt(max·min)`` (as AutoAWQ). α = 0 is s = 1, the layer as it is: a scale
is applied only if it strictly lowers L, otherwise nothing is touched.

The loss is computed in closed form from the Gram matrix of *all* the group's
calibration inputs, ``G = XᵀX/n``: ``L/n = Σ_m tr(E_m G E_mᵀ)`` with
``E_m = Q(W_m s)/s − W_m``. That is exactly the output error over every
calibration token, not a subsample, and at ``co·ci²`` per candidate it costs
what ``ci`` sampled tokens would. In the α search Q is llama.cpp's own rule
for the type (``fmt.rtn``), as AutoAWQ searches with plain RTN.

Fold (the layer computes the same function in full precision): the members'
input columns are multiplied by s, the output channels of the smooth module
that produces their input divided by s:

- a norm (RMSNorm: ``weight ⊙ x/rms(x)``): weight (and bias) ÷ s; a norm that
  computes ``(c + weight) ⊙ x/rms(x)`` (Gemma's, c = 1: the spec's
  ``norm_offset``) scales its gain, ``weight ← (c + weight)/s − c``;
- a linear not quantized: rows and bias ÷ s;
- a linear already quantized (true-sequential order quantizes v_proj before
  o_proj's inputs exist, and up_proj before down_proj's): the file must hold
  the codes the module computes with, so it keeps its codes and each row's
  block grids (fp16 scale, and min) are divided by s and rounded to fp16.
  That is exact for powers of two; otherwise each dequantized weight moves by
  one fp16 rounding of its grid (relative ≤ 2^-11, ~100x below 4-bit
  quantization noise), which the α search ignores. (Rounding s itself to
  powers of two instead was measured on SmolLM2: it kept ~1% of the 22%
  down_proj error reduction that continuous s gives in layer 20.) s is kept
  where the divided grids stay normal fp16 numbers. The new codes go back to
  the pipeline, and the module is set to exactly their dequantization.

Grouped-query attention (o_proj has n_heads·head_dim inputs, v_proj only
n_kv_heads·head_dim outputs): **repeat**. mean|x| is averaged over the heads
that share a kv head, one s per v_proj output channel, repeated to every head
that reads it; v_proj's row is divided once. This is exact (every head of a
kv group reads the same v row), only adds candidates to "skip" (α = 0 stays
one of them), and costs nothing; AutoAWQ skips o_proj under GQA only because
its fold assumed equal shapes. head_dim comes from the attention module's
``head_dim``; where it is missing the group is left unscaled.

Clipping (``awq``): per output row and block of 32 the block's grid (scale,
and min) is chosen by the block's output error ``(w−q) G'_bb (w−q)ᵀ``,
``G'_bb`` the block's 32×32 diagonal block of the scaled inputs' Gram matrix
(AutoAWQ's per-group clip criterion, on all tokens). Candidates: llama.cpp's
grid and the block's range shrunk by ``clip_ratios`` (1.0, 0.975 … 0.7;
symmetric types map the extreme to either end of the code range, types with
a min trim the range from either side, every other ratio); the best one is
then refitted twice (the G'_bb-weighted least-squares grid of its codes, new
nearest codes), each kept only if it lowers the error. All fp16-rounded,
codes nearest on the chosen grid, so the QuantBlocks returned are what the
file holds and ``fmt.dequantize`` of them is what the pipeline writes back.
On SmolLM2 (layer 6, q4_0) this cuts the output error to 0.57x of RTN's,
against 0.62x for GPTQ's diag(H)-weighted scale search without GPTQ.

K-quants (``awq``): a super-block's sub-scales hang on one fp16 ``d``, so
the per-block clip candidates do not apply; the codes come from llama.cpp's own
importance-weighted super-block search with diag(G'), the scaled inputs' mean
x² per column, as the importance (what ``llama-quantize --imatrix`` does with
an imatrix). A quantized smooth linear in a k-quant keeps its integer
sub-scales; its super-blocks' ``d`` and ``dmin`` are divided by s.

``awq+gptq``: GPTQ (with its block-scale search) on the scaled weights under
``H' = diag(1/s) H diag(1/s)``, exactly the Hessian of the scaled inputs, so
no second calibration pass is needed. The α search above ranks scales by RTN's
error, which GPTQ does not make: by default (``alpha_by="gptq"``) the group
then settles between α = 0, half the searched α and the searched α by the
output error GPTQ's own codes reach on a sample of each member's rows (for
the model's target, ``W*·diag(s)``, where GPTQ fits the model).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..formats import BlockFormat, QuantBlocks
from ..formats.kquant import KQuantFormat, SuperGrid
from ..formats.torch_grid import dequantize as _dequant
from ..formats.torch_grid import f16_round as _f16
from ..options import BOUNDS
from .base import LinearReport, Method, by_format, row_shares
from .edge import to_numpy, to_torch
from .gptq import (
    HessianAccumulator,
    HessianError,
    _blocks,
    _codes,
    _quant_blocks,
    _slices,
    accumulate_cross,
    accumulate_residual,
    gptq_quantize_rows,
    lstsq_grid,
    model_target,
    super_grid,
)
from .gptq_method import FitsTarget, fitted_weights

CLIP_RATIOS = tuple(1 - 0.025 * i for i in range(13))  # 1.0 … 0.7 (every other one for types with a min)
REFITS = 2
S_MIN = 1e-4  # clamp of mean|x|^α before normalization (AutoAWQ)
F16_MIN_NORMAL = 2.0**-14
F16_SAFE_MAX = 32768.0  # rescaled grids stay well inside fp16's range
ALPHA_BY = BOUNDS["alpha_by"].choices
_CHUNK = 1 << 22  # elements of one [K, rows, blocks, 32] temporary in the clip search


# --------------------------------------------------------------------------- folding


def channel_map(layer: nn.Module, members: list[str], smooth: str | None) -> torch.Tensor | None:
    """For each input channel of the members, the output channel of ``smooth`` producing it: [ci].

    None where the group cannot be scaled (no smooth module, or a shape it cannot map).
    """
    if smooth is None:
        return None
    ci = layer.get_submodule(members[0]).weight.shape[1]
    mod = layer.get_submodule(smooth)
    if isinstance(mod, nn.Linear):
        cs = mod.out_features
    else:
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 1:
            return None
        cs = w.shape[0]
    device = layer.get_submodule(members[0]).weight.device
    if cs == ci:
        return torch.arange(ci, device=device)
    parent = layer.get_submodule(smooth.rpartition(".")[0]) if "." in smooth else layer
    hd = getattr(parent, "head_dim", None)
    if not isinstance(mod, nn.Linear) or not isinstance(hd, int) or ci % cs or cs % hd:
        return None
    g = ci // cs  # heads per kv head (transformers' repeat_kv: head h reads kv head h // g)
    j = torch.arange(ci, device=device)
    return (j // hd // g) * hd + j % hd


def _fp16_fields(q: QuantBlocks) -> list[np.ndarray]:
    """The fp16 numbers a row's grid is stored in: block scales (and mins), or a k-quant's d (and dmin)."""
    if q.grid is not None:
        return [q.grid.d] + ([] if q.grid.dmin is None else [q.grid.dmin])
    return [q.scales] + ([] if q.mins is None else [q.mins])


def rescale_bounds(q: QuantBlocks, rows: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a quantized linear, the range [lo, hi] of s for which every block's
    scale (and min) divided by s stays a normal fp16 number (full precision); on ``device``."""
    vals = [v.reshape(rows, -1) for v in _fp16_fields(q)]
    v = to_torch(np.abs(np.concatenate(vals, axis=1)).astype(np.float32), torch.device(device))
    hi = torch.where(v >= F16_MIN_NORMAL, v, torch.inf).amin(1) / F16_MIN_NORMAL  # (values already
    lo = v.amax(1) / F16_SAFE_MAX  # subnormal, e.g. a min near 0, do not bind)
    return lo.clamp(max=1.0), hi.clamp(min=1.0)


def rescale_rows(q: QuantBlocks, s: torch.Tensor) -> QuantBlocks:
    """The same codes with each row's grid divided by s [rows], rounded to fp16.

    Exact when s is a power of two; otherwise every dequantized weight moves
    by at most one fp16 rounding of its block's scale and min (relative 2^-11),
    far below the quantization error itself. A k-quant row keeps its integer
    sub-scales: its super-blocks' d and dmin are divided.
    """
    rows = s.shape[0]
    f = to_numpy(1.0 / s.to(torch.float64))[:, None]

    def div(v: np.ndarray) -> np.ndarray:  # numpy: the codes' grids are numpy QuantBlocks
        out = (v.reshape(rows, -1).astype(np.float64) * f).astype(np.float32).reshape(-1)
        return _f16(to_torch(out, torch.device("cpu"))).numpy()

    if q.grid is not None:
        g = q.grid
        grid = SuperGrid(d=div(g.d), sc=g.sc, dmin=None if g.dmin is None else div(g.dmin), m=g.m)
        scales, mins = KQuantFormat.flat(grid)
        return QuantBlocks(codes=q.codes, scales=scales, mins=mins, grid=grid)
    return QuantBlocks(codes=q.codes, scales=div(q.scales), mins=None if q.mins is None else div(q.mins))


def fold_scales(layer: nn.Module, members: list[str], smooth: str, s: torch.Tensor, index: torch.Tensor,
                done: dict[str, QuantBlocks] | None = None, norm_offset: float = 0.0) -> dict[str, QuantBlocks]:
    """Scale the members' input channels by ``s[index]`` and divide ``smooth``'s outputs by s.

    s: [cs] > 0, one per output channel of ``smooth``; index: ``channel_map``.
    A smooth linear already quantized (in ``done``) keeps its codes on a grid
    divided by s (``rescale_rows``); those codes are returned. A smooth norm
    [cs] whose gain is ``norm_offset + weight`` has that gain divided by s.
    """
    s = s.to(torch.float32)
    s_in = s[index]
    for rel in members:
        lin = layer.get_submodule(rel)
        lin.weight.data = lin.weight.data * s_in
    mod = layer.get_submodule(smooth)
    revised = {}
    q = (done or {}).get(smooth)
    if q is not None:
        q = revised[smooth] = rescale_rows(q, s)
        mod.weight.data = to_torch(BlockFormat.dequantize(q), mod.weight).reshape(mod.weight.shape)
    elif mod.weight.dim() == 2:
        mod.weight.data = mod.weight.data / s[:, None]
    else:
        gain = mod.weight.data + norm_offset if norm_offset else mod.weight.data  # keeps a -0.0 weight's sign
        mod.weight.data = gain / s - norm_offset if norm_offset else gain / s
    bias = getattr(mod, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data = bias.data / s
    return revised


# --------------------------------------------------------------------------- errors and search


def output_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> float:
    """tr((W−Ŵ) G (W−Ŵ)ᵀ): squared output error per token for inputs with Gram matrix G."""
    E = W_hat - W
    return float((E @ G).mul_(E).sum(dtype=torch.float64))


def rtn_error(W: torch.Tensor, s: torch.Tensor | None, fmt: type[BlockFormat], G: torch.Tensor) -> float:
    """Output error of llama.cpp's rule on W·diag(s), fed diag(1/s)·x: tr(E G Eᵀ), E = Q(Ws)/s − W."""
    Ws = W if s is None else W * s
    codes, grid = fmt.rtn_torch(Ws.reshape(-1, fmt.block_size))
    Q = fmt.dequantize_torch(codes, grid.scales, grid.mins).reshape(W.shape)
    return output_error(W, Q if s is None else Q / s, G)


def scales_for(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = clamp(mean|x|^α, 1e-4) / sqrt(max·min)."""
    s = x_mean.pow(alpha).clamp_min(S_MIN)
    return s / (s.max() * s.min()).sqrt()


def bounded_scales(x_mean: torch.Tensor, alpha: float, lo: torch.Tensor | None, hi: torch.Tensor | None
                   ) -> torch.Tensor:
    """``scales_for``, kept within [lo, hi] per channel where bounds are given (``rescale_bounds``)."""
    s = scales_for(x_mean, alpha)
    return s if lo is None else torch.minimum(torch.maximum(s, lo), hi)


def _diag_blocks(G: torch.Tensor, g: int) -> torch.Tensor:
    """G [ci, ci] -> its g×g diagonal blocks [ci/g, g, g] (g: the format's block width)."""
    nb = G.shape[0] // g
    return torch.diagonal(G.reshape(nb, g, nb, g), dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _apply(x: torch.Tensor, Gb: torch.Tensor) -> torch.Tensor:
    """x [..., nb, 32] @ Gb [nb, 32, 32] per block."""
    lead = x.shape[:-2]
    nb = Gb.shape[0]
    g = Gb.shape[-1]
    y = torch.bmm(x.reshape(-1, nb, g).transpose(0, 1), Gb)  # [nb, *, g]
    return y.transpose(0, 1).reshape(*lead, nb, g)


def _clip_candidates(w: torch.Tensor, fmt: type[BlockFormat], ratios: torch.Tensor):
    """Candidate grids d, m [K, r, nb] for blocks w [r, nb, 32]; first llama.cpp's."""
    r, nb, _ = w.shape
    _, rtn = fmt.rtn_torch(w.reshape(-1, fmt.block_size))
    d0 = rtn.scales.reshape(1, r, nb)
    c = ratios[:, None, None]
    if rtn.mins is None:
        ext = w.gather(-1, w.abs().argmax(-1, keepdim=True))[..., 0]
        return torch.cat([d0, _f16(ext / fmt.qmin * c), _f16(ext / fmt.qmax * c)]), None
    m0 = rtn.mins.reshape(1, r, nb)
    lo, hi = w.amin(-1), w.amax(-1)
    rng = hi - lo
    t = 1 - ratios
    ta, tb = (x.reshape(-1, 1, 1) for x in torch.meshgrid(t, t, indexing="ij"))
    lo_c = lo + ta * rng
    d_c = (1 - ta - tb) * rng / fmt.qmax
    return torch.cat([d0, _f16(d_c)]), torch.cat([m0, _f16(lo_c)])


def _refit(w, Gw, Gb, c, d, m):
    """Grid of least block output error for fixed codes c [K, r, nb, 32] (keeps d, m where singular)."""
    Gc = _apply(c, Gb)
    cGc = (Gc * c).sum(-1)
    cGw = (c * Gw).sum(-1)
    if m is None:
        return lstsq_grid(cGc, cGw, d)
    G1 = Gb.sum(-1)  # [nb, 32]: G·1 per block
    return lstsq_grid(cGc, cGw, d, m, (c * G1).sum(-1), G1.sum(-1), (w * G1).sum(-1))


def _block_err(w: torch.Tensor, c: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, Gb: torch.Tensor):
    """Block output error (w−q) G_bb (w−q)ᵀ of codes c on grids d, m: [..., r, nb]."""
    e = w - _dequant(c, d, m)
    return (_apply(e, Gb) * e).sum(-1)


def clip_search(W: torch.Tensor, G: torch.Tensor, fmt: type[BlockFormat], ratios=CLIP_RATIOS,
                refits: int = REFITS) -> tuple[QuantBlocks, dict]:
    """Per row and block of 32, the grid of least block output error under G.

    W: float32 [co, ci]; G: [ci, ci] Gram matrix of the inputs. The best of
    llama.cpp's grid and the range-shrunk candidates is then refitted
    (least squares for its codes, fp16-rounded, new nearest codes) ``refits``
    times, each kept only if it lowers the error. Returns the blocks (ggml
    order) and stats: mean chosen/llama.cpp scale ratio, share of blocks whose
    grid differs from llama.cpp's.
    """
    co, ci = W.shape
    g = fmt.block_size
    if ci % g or g != fmt.sub_size:
        raise ValueError(f"clip search needs one-level blocks and ci ({ci}) a multiple of their width {g}")
    nb = ci // g
    Gb = _diag_blocks(G.to(torch.float32), g)
    wb = W.to(torch.float32).reshape(co, nb, g)
    ratios_t = torch.tensor(ratios if not fmt.has_min else ratios[::2], dtype=torch.float32, device=W.device)
    n_cand = 1 + (2 * len(ratios_t) if not fmt.has_min else len(ratios_t) ** 2)
    rows = max(1, _CHUNK // (n_cand * nb * g))
    ds, ms, d0s, m0s = [], [], [], []
    for i in range(0, co, rows):
        w = wb[i : i + rows]
        d, m = _clip_candidates(w, fmt, ratios_t)
        d0s.append(d[0])
        if m is not None:
            m0s.append(m[0])
        err = _block_err(w, _codes(w, d, m, fmt), d, m, Gb)
        best = err.argmin(0, keepdim=True)
        d, err = d.gather(0, best), err.gather(0, best)
        m = None if m is None else m.gather(0, best)
        Gw = _apply(w, Gb)
        for _ in range(refits):
            d2, m2 = _refit(w, Gw, Gb, _codes(w, d, m, fmt), d, m)
            d2, m2 = _f16(d2), None if m2 is None else _f16(m2)
            err2 = _block_err(w, _codes(w, d2, m2, fmt), d2, m2, Gb)
            better = err2 < err
            d, err = torch.where(better, d2, d), torch.minimum(err, err2)
            m = None if m is None else torch.where(better, m2, m)
        ds.append(d[0])
        if m is not None:
            ms.append(m[0])
    d, d0 = torch.cat(ds), torch.cat(d0s)
    m = None if not ms else torch.cat(ms)
    m0 = None if not m0s else torch.cat(m0s)
    codes = _codes(wb, d, m, fmt)
    nz = d0 != 0
    changed = (d != d0) if m is None else (d != d0) | (m != m0)
    stats = {
        "clip_scale": float((d[nz] / d0[nz]).abs().mean()) if nz.any() else 1.0,
        "clip_changed": float(changed.float().mean()),
    }
    return _quant_blocks(fmt, codes.reshape(co, ci), d, m), stats


def grid_codes(W: torch.Tensor, G: torch.Tensor, fmt: type[BlockFormat], ratios=CLIP_RATIOS) -> tuple[QuantBlocks, dict]:
    """AWQ's codes for W [co, ci] under the (scaled) inputs' Gram matrix G [ci, ci].

    Legacy types: the clip search. K-quants: llama.cpp's importance-weighted
    super-block search with diag(G) as the importance (its imatrix is the same
    mean of x² per input column).
    """
    if fmt.block_size == fmt.sub_size:
        return clip_search(W, G, fmt, ratios)
    co, ci = W.shape
    h = G.diagonal().to(torch.float32).reshape(-1, fmt.block_size).repeat(co, 1)
    return fmt.blocks(*super_grid(_blocks(W.to(torch.float32), fmt.block_size), h, fmt)), {}


# --------------------------------------------------------------------------- the method


def scale_gram_(G: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """G[i, j] / (s_i · s_j) in place, G [ci, ci], s [ci]: the Gram matrix of the inputs once divided by s.

    By row slices, so that neither the outer product s sᵀ nor a second Gram
    matrix is ever whole (each is 3.3 GB in float32 at ci = 28672); every
    element is computed as the one-shot ``G / (s[:, None] * s[None, :])`` does.
    """
    for rows in _slices(G.shape[0]):
        G[rows].div_(s[rows, None] * s[None, :])
    return G


@dataclass
class _Group:
    acc: HessianAccumulator
    abs_sum: torch.Tensor
    s: torch.Tensor | None = None  # per input channel, as applied (None: unscaled)
    G: torch.Tensor | None = None  # Gram matrix of the (scaled) inputs, /n
    cross: torch.Tensor | None = None  # Σ (x_fp - x)ᵀ x [ci, ci] where observed in pairs; /n and scaled as G
    resid: torch.Tensor | None = None  # Σ rᵀ x [co, ci] where the stream is fitted; /n, columns scaled as x
    base: dict = field(default_factory=dict)  # member -> (rtn error, ‖W x‖²) on the original layer
    extra: dict = field(default_factory=dict)


class AWQMethod(Method, method="awq"):
    """Activation-aware scaling (α search, fold), then clip-searched codes on the file's grid."""

    needs_calibration = True

    def __init__(self, n_grid: int = 20, clip_ratios=CLIP_RATIOS):
        if n_grid < 1:
            raise ValueError("n_grid must be at least 1")
        self.n_grid, self.clip_ratios = n_grid, tuple(clip_ratios)
        self._groups: dict[str, _Group] = {}

    def observe(self, group: str, x: torch.Tensor) -> None:
        st = self._groups.get(group)
        if st is None:
            ci = x.shape[-1]
            st = self._groups[group] = _Group(HessianAccumulator(ci, device=x.device),
                                              torch.zeros(ci, dtype=torch.float64, device=x.device))
        st.acc.add(x)
        st.abs_sum += x.detach().reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64)

    def prepare_group(self, group, layer, members, smooth, *, fmts=None, done=None, norm_offset=0.0):
        st = self._groups.get(group)
        if st is None or st.acc.n == 0:
            return None
        G = st.acc.mean().to(torch.float32)
        st.G = G
        if st.cross is not None:
            st.cross.div_(st.acc.n)
        if st.resid is not None:
            st.resid.div_(st.acc.n)
        Ws = {rel: layer.get_submodule(rel).weight.data.to(torch.float32) for rel in members}
        fmts = fmts or {}
        for rel, W in Ws.items():
            fmt = fmts.get(rel)
            err = rtn_error(W, None, fmt, G) if fmt is not None else float("nan")
            st.base[rel] = (err, output_error(W, torch.zeros_like(W), G))
        index = channel_map(layer, members, smooth)
        if index is not None and isinstance(layer.get_submodule(smooth), nn.Linear) and done is None:
            index = None  # cannot tell whether the producer was quantized already: leave it
        if index is None or any(rel not in fmts for rel in members):
            st.extra = {"alpha": 0.0, "awq": "not scaled"}
            return None
        lo = hi = None
        x_dev = st.abs_sum.device  # where the inputs were gathered, the layer's device
        if smooth in done:  # its grid is divided by s: keep that grid in fp16's normal range
            lo, hi = rescale_bounds(done[smooth], layer.get_submodule(smooth).out_features, x_dev)
        cs = int(index.max()) + 1
        x_mean = (st.abs_sum / st.acc.n).to(torch.float32)
        x_mean = torch.zeros(cs, device=x_dev).index_add_(0, index, x_mean) / torch.bincount(index, minlength=cs)
        base = sum(st.base[rel][0] for rel in members)
        best, best_alpha, best_s = base, 0.0, None
        for i in range(1, self.n_grid):
            alpha = i / self.n_grid
            s = bounded_scales(x_mean, alpha, lo, hi)
            if float(s.max() / s.min()) <= 1 + 1e-6:
                continue  # flat: the same as alpha 0
            err = sum(rtn_error(W, s[index], fmts[rel], G) for rel, W in Ws.items())
            if err < best:
                best, best_alpha, best_s = err, alpha, s
        st.extra = {"alpha": best_alpha, "group_err_vs_rtn": best / base if base > 0 else 1.0}
        best_alpha, best_s = self._settle(st, Ws, fmts, index, x_mean, lo, hi, best_alpha, best_s)
        if best_s is None:
            return None
        st.extra["s_ratio"] = float(best_s.max() / best_s.min())
        revised = fold_scales(layer, members, smooth, best_s, index, done, norm_offset)
        st.s = best_s[index]
        st.G = scale_gram_(G, st.s)
        if st.cross is not None:
            scale_gram_(st.cross, st.s)  # x_fp and x both divided by s
        if st.resid is not None:
            st.resid.div_(st.s)  # x divided by s; the residual is not
        return revised

    def _settle(self, st: _Group, Ws: dict, fmts: dict, index: torch.Tensor, x_mean: torch.Tensor,
                lo: torch.Tensor | None, hi: torch.Tensor | None, alpha: float, s: torch.Tensor | None
                ) -> tuple[float, torch.Tensor | None]:
        """The α (and its s [cs], None for none) the group is scaled by: the RTN search's choice here."""
        return alpha, s

    def _codes_for(self, st: _Group, members: list[tuple[str, torch.Tensor, type[BlockFormat]]]
                   ) -> list[tuple[QuantBlocks, dict, torch.Tensor | None, float]]:
        """For each member (W float32): codes on its format's grid, the method's choices, the weights
        rounded if not W (``Method.rounded``), and the seconds spent on it."""
        out = []
        for _, W, fmt in members:
            t0 = time.perf_counter()
            out.append((*grid_codes(W, st.G, fmt, self.clip_ratios), None, time.perf_counter() - t0))
        return out

    def quantize(self, name, group, W, fmt):
        return self.quantize_group(group, [(name, W, fmt)])[0]

    def quantize_group(self, group, members):
        st = self._groups.get(group) if group else None
        if st is None or st.G is None:
            return [Method.quantize(self, name, group, W, fmt) for name, W, fmt in members]
        members = [(name, W.to(torch.float32), fmt) for name, W, fmt in members]
        out = []
        for (name, W, fmt), (q, stats, rounded, seconds) in zip(members, self._codes_for(st, members), strict=True):
            t0 = time.perf_counter()
            self._keep_rounded(name, rounded)
            W_hat = to_torch(fmt.dequantize(q), W).reshape(W.shape)
            rel = next((r for r in st.base if name == r + ".weight" or name.endswith("." + r + ".weight")), None)
            err_rtn, norm = st.base.get(rel, (float("nan"), 0.0))
            err = output_error(W, W_hat, st.G)
            report = LinearReport(name, seconds=seconds + time.perf_counter() - t0,
                                  err_rtn=err_rtn / norm if norm > 0 else None,
                                  err_method=err / norm if norm > 0 else None,
                                  extra={**st.extra, **stats})
            out.append((q, report))
        return out

    def end_group(self, group: str) -> None:
        self._groups.pop(group, None)


def _row_sample(W: torch.Tensor, rows: int) -> torch.Tensor:
    """At most ``rows`` evenly spaced rows of W [co, ci] (all of them where co ≤ rows)."""
    if W.shape[0] <= rows:
        return W
    return W[torch.linspace(0, W.shape[0] - 1, rows, device=W.device).round().long()]


class AWQGPTQMethod(FitsTarget, AWQMethod, method="awq+gptq"):
    """AWQ's scales, then GPTQ on the scaled weights under H' = diag(1/s) H diag(1/s).

    alpha_by: "rtn" keeps the α that AWQ's search picks by RTN's error; "gptq"
    then settles between α = 0, half that α and that α (``ALPHA_FRACTIONS``)
    by the output error GPTQ itself reaches on each, fitted as the codes will be (to the model where
    gptq_target is "model" or "stream"), on at most ``ALPHA_ROWS`` evenly spaced rows of
    each member. Scales that lower RTN's error can raise GPTQ's, which spreads
    each column's rounding error over the columns after it (measured, with the
    choices each candidate won, and finer candidates losing end to end:
    docs/benchmarks.md). Each candidate's walk holds a scaled copy of the
    group's ci×ci Gram matrix while it runs.
    """

    ALPHA_ROWS = 256
    ALPHA_FRACTIONS = (0.0, 0.5, 1.0)  # of the RTN search's α: the candidates GPTQ settles between

    def __init__(self, n_grid: int = 20, damp: float = 0.01, act_order: bool = False, scale_search: bool = True,
                 block_cols: int = 128, clip_ratios=CLIP_RATIOS, gptq_target: str = "stream", alpha_by: str = "gptq"):
        super().__init__(n_grid, clip_ratios)
        self._set_target(gptq_target)
        if alpha_by not in ALPHA_BY:
            raise ValueError(f"alpha_by must be one of {ALPHA_BY}, not {alpha_by!r}")
        self.damp, self.act_order, self.scale_search, self.block_cols = damp, act_order, scale_search, block_cols
        self.alpha_by = alpha_by

    def _settle(self, st, Ws, fmts, index, x_mean, lo, hi, alpha, s):
        if self.alpha_by == "rtn" or s is None:
            return alpha, s
        rels = list(Ws)
        targets = [_row_sample(Ws[rel], self.ALPHA_ROWS) for rel in rels]
        targets = [T.clone() if T is Ws[rel] else T for T, rel in zip(targets, rels, strict=True)]  # own copies
        if st.cross is not None:  # the model's target once, unscaled: W*·diag(s) is the scaled one
            E = None if st.resid is None else _row_sample(st.resid, self.ALPHA_ROWS)  # the rows of targets
            try:
                targets = model_target(targets, st.G, st.cross, self.damp, in_place=True, E=E)  # all /n
            except HessianError:
                return alpha, s
        cands = {f * alpha: None if f == 0 else bounded_scales(x_mean, f * alpha, lo, hi)  # f = 1: s itself
                 for f in self.ALPHA_FRACTIONS}
        errors = {}
        for a, sc in cands.items():
            try:
                errors[a] = self._gptq_error(st.G, targets, [fmts[rel] for rel in rels],
                                             None if sc is None else sc[index])
            except HessianError:
                errors[a] = float("inf")
        best = min(errors, key=errors.get)
        st.extra["alpha_rtn"] = alpha
        st.extra["alpha"] = best
        if 0 < errors[0.0] < float("inf"):
            st.extra["gptq_err_vs_unscaled"] = {f"{a:g}": e / errors[0.0] for a, e in errors.items()}
        return best, cands[best]

    def _gptq_error(self, G: torch.Tensor, targets: list[torch.Tensor], fmts: list[type[BlockFormat]],
                    s_in: torch.Tensor | None) -> float:
        """Σ tr(E G Eᵀ) of GPTQ's codes for ``targets`` ([r_i, ci] each) scaled by s_in [ci] (None: not)."""
        Gs = G if s_in is None else scale_gram_(G.clone(), s_in)
        scaled = [T if s_in is None else T * s_in for T in targets]
        members = [(str(i), T, fmt) for i, (T, fmt) in enumerate(zip(scaled, fmts, strict=True))]
        total = 0.0
        for fmt, idx in by_format(members).items():
            Ts = [scaled[i] for i in idx]
            total += sum(output_error(T, res.W_hat, Gs) for T, res in zip(Ts, self._walk(Ts, Gs, fmt), strict=True))
        return total

    def _walk(self, Ws: list[torch.Tensor], G: torch.Tensor, fmt: type[BlockFormat]) -> list:
        """GPTQ (this method's options) of Ws under H = 2·G, doubled inside GPTQ's float64 work copy:
        no scaled float32 copy of G beside it."""
        return gptq_quantize_rows(Ws, G, fmt, damp=self.damp, act_order=self.act_order, block_cols=self.block_cols,
                                  scale_search=self.scale_search, h_scale=2.0)

    def observe_pair(self, group: str, x_fp: torch.Tensor, x: torch.Tensor,
                     residual: torch.Tensor | None = None) -> None:
        self.observe(group, x)
        st = self._groups[group]
        if st.cross is None:
            st.cross = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        accumulate_cross(st.cross, x_fp.detach(), x.detach())
        if residual is not None:
            st.resid = accumulate_residual(st.resid, residual.detach(), x.detach())

    def _codes_for(self, st, members):
        out: list = [None] * len(members)
        groups = by_format(members)
        targets = fitted_weights(members, groups, st.G, st.cross, self.damp, st.resid)  # all /n, all scaled
        st.cross = st.resid = None  # gone before the walks
        for fmt, idx in groups.items():
            t0 = time.perf_counter()
            try:
                results = self._walk(targets.pop(fmt), st.G, fmt)
            except HessianError as exc:
                warnings.warn(f"{exc}; AWQ clip search instead of GPTQ", stacklevel=4)
                for i in idx:
                    t1 = time.perf_counter()
                    q, stats = grid_codes(members[i][1], st.G, fmt, self.clip_ratios)
                    out[i] = q, {**stats, "fallback": str(exc)}, None, time.perf_counter() - t1
                continue
            for i, res, seconds in zip(idx, results, row_shares(members, idx, time.perf_counter() - t0), strict=True):
                out[i] = res.q, {"damp": res.damp, "dead_columns": res.n_dead}, res.rounded, seconds
        return out


__all__ = ["AWQMethod", "AWQGPTQMethod", "channel_map", "clip_search", "fold_scales", "rtn_error", "scales_for"]
