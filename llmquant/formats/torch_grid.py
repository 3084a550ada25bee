"""The grid steps in torch: fp16 rounding, ggml's integer rounding, dequantization, fake quantization.

Everything here runs on whatever device its tensors are on and repeats the
float32 operations of llama.cpp one for one, so a result computed here is
bit-identical with the C reference's (the k-quant and imatrix searches in
``qkx_search``, ``qx_search`` and each format's ``search`` follow the same
rules). These rules keep it that way:

* one rounding per operation: products, sums and quotients are separate
  torch ops, never fused (no ``addcmul``, no ``torch.compile``);
* never ``python_number / tensor``: torch computes it as
  ``tensor.reciprocal() * number``, two roundings; constants are 0-dim
  tensors on the data's device (``const``), which also keeps CUDA from turning a
  division by a CPU scalar into a multiplication by its reciprocal;
* sums that decide comparisons add left to right (``row_sum``, ``col_sum``), as C's loops;
* integer codes are converted to float32 before they are multiplied, and C's
  products are grouped left to right (``w*x*l`` is ``(w·x)·l``);
* square roots through ``sqrt`` (torch's own is not correctly rounded on a CPU).

Formats own their grids (``BlockFormat.project``); this module holds the
shared pieces, and ``fake_quant`` that a tuning method calls every step.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, TypeVar

import torch

from ..threads import one_thread

if TYPE_CHECKING:
    from .base import BlockFormat

R = TypeVar("R")
F16_MAX = 65504.0
GROUP_MAX_EPS = 1e-15


def const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 0-dim constant on ``like``'s device (see the module docstring)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def serial(like: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where ``like`` is on a CPU, torch's intra-op threads set to 1 inside (``threads.one_thread``).

    The searches run thousands of small dependent ops (one per element of a
    sub-block and search step): worker threads only add a barrier to each, and
    on a busy machine a descheduled worker stalls every one of them (10x and
    more).
    """
    return one_thread() if like.device.type == "cpu" else contextlib.nullcontext()


def map_rows(fn: Callable[..., R], tensors: Sequence[torch.Tensor | None], rows: int) -> list[R]:
    """``fn`` over consecutive slices of ``rows`` rows (axis 0) of every tensor (None stays None), in order.

    On a CPU the slices run on as many Python threads as torch has intra-op
    threads (the calling thread and helpers kept for the process, each taking
    the next slice), each slice under ``serial``: a search is a long chain of ops too
    small to split well inside, while independent slices side by side keep
    every core busy. Each slice's result is what it would be alone, so the
    results, and the bytes, do not depend on the thread count. Elsewhere the
    slices run one after another.
    """
    first = next(t for t in tensors if t is not None)
    starts = range(0, first.shape[0], rows)
    grad = torch.is_grad_enabled()  # thread-local: the workers follow the caller

    def one(i: int) -> R:
        parts = [None if t is None else t[i : i + rows] for t in tensors]
        with serial(first), torch.set_grad_enabled(grad):
            return fn(*parts)

    workers = min(torch.get_num_threads(), len(starts)) if first.device.type == "cpu" else 1
    if workers <= 1:
        return [one(i) for i in starts]
    results: list = [None] * len(starts)
    todo = iter(range(len(starts)))
    lock = threading.Lock()

    def drain() -> None:  # the calling thread and the helpers take the next slice until none is left
        while True:
            with lock:
                k = next(todo, None)
            if k is None:
                return
            try:
                results[k] = one(starts[k])
            except BaseException:
                with lock:
                    for _ in todo:  # no one takes another slice
                        pass
                raise

    pool = _helpers(workers - 1)
    helpers = [pool.submit(drain) for _ in range(workers - 1)]
    try:
        drain()
    finally:
        for f in helpers:
            f.result()  # waits for the helpers' slices, and raises what a helper raised
    return results


_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _helpers(n: int) -> ThreadPoolExecutor:
    """The ``map_rows`` helper threads, kept for the process: a search runs once per tensor, and
    starting threads each time costs more than a small search. A new pool where the count changed
    or in a forked child (which inherits the pool but not its threads)."""
    global _pool
    if _pool is None or _pool[:2] != (n, os.getpid()):
        if _pool is not None and _pool[1] == os.getpid():
            _pool[2].shutdown(wait=False)
        _pool = (n, os.getpid(), ThreadPoolExecutor(max_workers=n, thread_name_prefix="llmquant-rows"))
    return _pool[2]


def slice_rows(n: int, most: int, least: int, like: torch.Tensor) -> int:
    """Rows per ``map_rows`` slice for n rows: at most ``most`` (bounded temporaries), and on a CPU
    few enough that every torch thread gets a slice, but not below ``least`` (per-op overhead)."""
    threads = torch.get_num_threads() if like.device.type == "cpu" else 1
    return max(least, min(most, -(-n // threads)))


def f16_round(x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
    """x as float32, rounded to the nearest fp16 (nearest-even, GGML_FP32_TO_FP16), kept float32.

    saturate: clamp to ±65504 first, the nearest *finite* fp16, which is what a
    method wants; llama.cpp's quantizers store inf past that (``saturate=False``,
    what ``rtn`` passes to stay byte-identical). NaN stays NaN.
    """
    x = x.to(torch.float32)
    if saturate:
        x = x.clamp(-F16_MAX, F16_MAX)
    return x.to(torch.float16).to(torch.float32)


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """C's ``sqrtf``: the correctly rounded float32 square root, any device.

    torch's CPU ``sqrt`` (MKL's vector one) is off by one ulp for about one value
    in 140, in float32 and float64 alike, which flips a search's comparisons. The
    float64 root rounded to float32 is exact all the same (a float32 square root
    lies at least 2^-50, relative, from every midpoint between float32 values,
    further than the float64 root's error of an ulp, 2^-52); and in case a vector
    library is less accurate than that, one exact check moves the result to its
    neighbour where x lies outside the squares of the midpoints to r's neighbours
    (25-bit numbers: their squares are exact in float64).
    """
    x = x.to(torch.float32)
    r = torch.sqrt(x.to(torch.float64)).to(torch.float32)
    x64, r64 = x.to(torch.float64), r.to(torch.float64)
    live = (x > 0) & torch.isfinite(x)
    half = torch.tensor(0.5, dtype=torch.float64, device=x.device)
    down = torch.nextafter(r, torch.zeros_like(r))
    lo = (r64 + down.to(torch.float64)) * half
    r = torch.where(live & (x64 < lo * lo), down, r)
    r64 = r.to(torch.float64)
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    hi = (r64 + up.to(torch.float64)) * half
    return torch.where(live & (x64 > hi * hi), up, r)


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` of float32 x (the 1.5·2^23 trick) as int32, any shape.

    Round half to even for x in [-2^22, 2^22); past that (inf, NaN) the low mantissa
    bits, which ggml's clamps then turn into codes, exactly as in C.
    """
    v = x.to(torch.float32) + 12582912.0  # a float32 add: torch casts a scalar addend to the tensor's dtype
    return (v.view(torch.int32) & 0x007FFFFF) - 0x00400000


def int8_wrap(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int32 to ``int8_t`` (two's complement wrap), kept int32."""
    return ((v + 128) & 255) - 128


def row_sum(a: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis left to right in float32, as a C ``for`` loop adds: [..., n] -> [...]."""
    rows = a.to(torch.float32).reshape(-1, a.shape[-1]).t().contiguous()  # [n, M]: each step one contiguous row
    return col_sum(rows).reshape(a.shape[:-1])


def col_sum(a: torch.Tensor, first: bool = False, clobber: bool = False) -> torch.Tensor:
    """``row_sum``'s twin over axis -2 of ``[..., n, N]`` -> ``[..., N]``: each column added top to bottom.

    C accumulates ``acc = 0; acc += a[i]``; with ``first`` it starts from
    ``a[0]`` instead (``make_qkx2_quants``' ``sum_w = weights[0]``), which
    differs only in the sign of an all-zero sum. clobber: a's rows may be
    overwritten (a scratch buffer of the caller's), which saves a copy.

    On a CPU thread working alone torch's own ``sum`` over axis -2 adds in this
    order too, for up to ``SUM_RUN + 1`` rows and in whole steps of
    ``SUM_LANES`` columns (see ``kernel_sums_in_order``), in one pass instead
    of one op per row. Longer columns are summed in runs: each run's sum
    replaces the run's last row and starts the next run, so every run is
    carry + ``SUM_RUN`` rows. Everywhere else, rows are added one op each.
    """
    n, cols = a.shape[-2], a.shape[-1]
    body = cols - cols % SUM_LANES
    if n < 2 or body == 0 or not kernel_sums_in_order(a):
        return _add_rows(a, first)
    if first:  # the sum from a[0] is the sum from 0 but for columns of -0.0s alone (-0.0, not +0.0)
        out = col_sum(a)
        if bool((out == 0).any()):
            negative_zeros = (a.view(torch.int32) == torch.iinfo(torch.int32).min).all(dim=-2)
            out = torch.where(negative_zeros, const(-0.0, a), out)
        return out
    main = a[..., :body]
    if n > SUM_RUN + 1:
        if not clobber:
            main = main.clone()
        start = 0
        while n - start > SUM_RUN + 1:
            carry = main[..., start : start + SUM_RUN, :].sum(dim=-2)
            start += SUM_RUN - 1
            main[..., start, :] = carry  # that row is inside the carry already
        main = main[..., start:, :]
    out = main.sum(dim=-2)
    return out if body == cols else torch.cat([out, _add_rows(a[..., body:], False)], dim=-1)


def _add_rows(a: torch.Tensor, first: bool) -> torch.Tensor:
    """``col_sum`` one op per row: any device, any thread count."""
    rows = a.unbind(-2)
    acc = rows[0].clone() if first else torch.zeros_like(rows[0]).add_(rows[0])
    for row in rows[1:]:
        acc.add_(row)  # in place: one rounding all the same, no allocation per step
    return acc


# torch's CPU float sum (ATen's cascade_sum) over a non-inner axis keeps one accumulator per
# column and adds the axis' elements in order, but only in runs of 16 (its cascade's level) and
# only for columns it takes in 4 vectors at a time (at most 16 floats each: the rest go through
# a row sum with 4 interleaved accumulators); a 17th element is added to a run's sum last.
SUM_RUN = 16
SUM_LANES = 64
_in_order: bool | None = None


def kernel_sums_in_order(like: torch.Tensor) -> bool:
    """Whether ``torch.sum`` over axis -2 adds in C's order here (``col_sum``): float32 on a CPU, one
    intra-op thread (several split the columns elsewhere than at ``SUM_LANES``), and this torch
    build's kernel checked once, bit for bit, against ``_add_rows`` on data whose sums round
    differently in any other order (a torch whose kernel differs falls back to one op per row).
    """
    global _in_order
    if like.device.type != "cpu" or like.dtype != torch.float32 or torch.get_num_threads() != 1:
        return False
    if _in_order is None:
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(SUM_RUN + 1, 3 * SUM_LANES, generator=g) * torch.exp2(
            torch.randint(-30, 30, (SUM_RUN + 1, 3 * SUM_LANES), generator=g).float())
        ok = [torch.equal(probe[:k].sum(dim=0).view(torch.int32), _add_rows(probe[:k], False).view(torch.int32))
              for k in (2, SUM_RUN, SUM_RUN + 1)]
        _in_order = all(ok)
    return _in_order


def running_max(v: torch.Tensor) -> torch.Tensor:
    """``m = 0; for j: if (v[j] > m) m = v[j]`` over the last axis: [..., k] -> [...].

    Never ``-0.0`` (which would flip an fp16 super-scale's sign bit) and never below 0.
    """
    acc = torch.zeros(v.shape[:-1], dtype=torch.float32, device=v.device)
    for j in range(v.shape[-1]):
        acc = torch.where(v[..., j] > acc, v[..., j], acc)
    return acc


def row_extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each row of [m, n], [m] each.

    Two reductions, not ``aminmax``: over rows as short as a block (32) the
    CPU kernels of ``amin`` and ``amax`` each take half the time of the one pass.
    """
    return x.amin(dim=1), x.amax(dim=1)


def scan_extremes(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C's ``min = max = x[0]; if (x[i] < min) min = x[i]; if (x[i] > max) max = x[i];`` down each
    column of [n, N] -> (min, max) [N].

    That scan keeps the first of equal values, which only matters for a zero
    (+0.0 or -0.0) and skips NaNs after the first element; columns whose
    ``amin``/``amax`` is zero or NaN are scanned as C does, the rest take
    the reductions (one pass each instead of one op per element).
    """
    lo, hi = xt.amin(dim=0), xt.amax(dim=0)
    redo = torch.nonzero((lo == 0) | (hi == 0) | lo.isnan() | hi.isnan())[:, 0]
    if redo.numel():
        rows = xt.index_select(1, redo).unbind(0)
        lo_r, hi_r = rows[0].clone(), rows[0].clone()
        for row in rows[1:]:
            lo_r = torch.where(row < lo_r, row, lo_r)
            hi_r = torch.where(row > hi_r, row, hi_r)
        lo[redo], hi[redo] = lo_r, hi_r
    return lo, hi


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """``max_j |x[i, j]|`` per row of [m, n] -> [m], +0.0 for a row of zeros, from the row's
    extremes: no |x| copy of the whole tensor."""
    lo, hi = row_extremes(x)
    return torch.maximum(hi, -lo).abs_()  # abs_: -0.0 (a row of -0.0s) would flip an fp16 scale's sign


def signed_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [m, n]: (largest magnitude, the signed value having it), [m] each.

    As C scans (``if (fabsf(x) > amax) { amax = fabsf(x); max = x; }`` from 0): the
    first on ties, +0.0 for a row of zeros. On the CPU one min/max pass over x, and
    only rows whose extremes tie in magnitude (+a and -a) scanned again for the first;
    elsewhere (an accelerator, the meta device) the first argmax of |x|, which asks
    nothing of the host.
    """
    def first(rows: torch.Tensor) -> torch.Tensor:  # the first value of largest magnitude
        return rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))[:, 0]

    lo, hi = row_extremes(x)
    neg = -lo
    amax = torch.maximum(hi, neg).abs_()  # abs_: +0.0, never -0.0
    zero = torch.zeros_like(lo)
    if x.device.type != "cpu":
        return amax, torch.where(amax > 0, first(x), zero)
    vmax = torch.where(amax > 0, torch.where(hi > neg, hi, lo), zero)
    tied = torch.nonzero((hi == neg) & (amax > 0))[:, 0]
    if tied.numel():
        vmax[tied] = first(x.index_select(0, tied))
    return amax, vmax


def divide_or_zero(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b ? a / b : 0`` elementwise in float32."""
    ok = b != 0
    return torch.where(ok, a / torch.where(ok, b, const(1.0, b)), const(0.0, b))


@dataclass(frozen=True)
class Projection:
    """What the file can store for n sub-blocks, as torch tensors on the input's device.

    scales: float32 [n]  effective scale of each sub-block, as ggml's dequantize_row_* computes it
                         (legacy types: the fp16 scale; k-quants: d·sc)
    mins:   float32 [n]  effective min (legacy: the fp16 min; k-quants: −(dmin·m)), or None
    k-quants only, per super-block (n_super = n / n_sub):
    d, dmin: float32 [n_super] fp16-exact super-scales (dmin None for symmetric types)
    sc, m:   int32 [n_super, n_sub] integer sub-scales and sub-mins (m None for symmetric types)
    """

    scales: torch.Tensor
    mins: torch.Tensor | None = None
    d: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None


def cat_projections(parts: list[Projection]) -> Projection:
    """The projections of consecutive runs of blocks (super-blocks) as one, in the same order."""
    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Projection(**{f.name: cat(f.name) for f in fields(Projection)})


def flat_view(d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor | None = None,
              m: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A k-quant's effective scale d·sc and min −(dmin·m) per sub-block: d [n], sc [n, k] -> [n·k] each."""
    scales = (d.to(torch.float32)[:, None] * sc.to(torch.float32)).reshape(-1)
    if m is None:
        return scales, None
    return scales, -(dmin.to(torch.float32)[:, None] * m.to(torch.float32)).reshape(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> torch.Tensor:
    """codes [..., n, sub] (integer or integral float) on grids scales, mins [..., n] -> weights [..., n, sub].

    ggml's dequantize_row_* order: one rounding for the product, one for the
    sum (two separate ops, never a fused multiply-add), in the scales' dtype.
    """
    w = codes.to(scales.dtype) * scales[..., None]
    return w if mins is None else w + mins[..., None]


def make_qp_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_qp_quants``: a weighted scale for non-negative values on levels [0, nmax].

    x, weights: float32 [N, n] (a super-block's n sub-scales or sub-mins and their weights)
    -> levels int32 [N, n] (C's ``uint8_t``, so 0..255), scale float32 [N].

    A k-quant's imatrix path projects its sub-block scales with it. The greedy
    refinement visits the n values in order and updates the running sums after
    each accepted change, so it loops over n (at most 5 passes), masking out
    super-blocks whose pass changed nothing, as C ``break``s.
    """
    x, w = x.to(torch.float32), weights.to(torch.float32)
    n = x.shape[1]
    fmax = const(float(nmax), x)
    hi = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for i in range(n):
        hi = torch.where(hi > x[:, i], hi, x[:, i])
    zero = hi < GROUP_MAX_EPS

    def mse(scale: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = x - scale[:, None] * lv
        return row_sum(w * diff * diff)

    one = const(1.0, x)
    iscale = fmax / hi
    best = mse(one / iscale, (nearest_int(iscale[:, None] * x) & 0xFF).to(torch.float32))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (const(0.1, x) * const(float(step), x) + fmax) / hi
        lv = torch.clamp_max(nearest_int(iscale_is[:, None] * x), nmax).to(torch.float32)
        cur = mse(one / iscale_is, lv)
        better = cur < best
        best = torch.where(better, cur, best)
        iscale = torch.where(better, iscale_is, iscale)
    lv_int = torch.clamp_max(nearest_int(iscale[:, None] * x), nmax)
    lv = lv_int.to(torch.float32)
    wx = w * x
    sumlx = row_sum(wx * lv)
    suml2 = row_sum(w * lv * lv)
    levels = lv_int & 0xFF
    active = ~zero
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(n):
            cur_l = levels[:, i].to(torch.float32)
            slx = sumlx - wx[:, i] * cur_l
            sl2 = suml2 - w[:, i] * cur_l * cur_l
            new_int = torch.clamp_max(nearest_int(x[:, i] * sl2 / slx), nmax)
            new_l = new_int.to(torch.float32)
            move = active & (slx > 0) & (sl2 > 0) & (new_int != levels[:, i])
            slx = slx + wx[:, i] * new_l
            sl2 = sl2 + w[:, i] * new_l * new_l
            accept = move & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[:, i] = torch.where(accept, new_int & 0xFF, levels[:, i])
            sumlx = torch.where(accept, slx, sumlx)
            suml2 = torch.where(accept, sl2, suml2)
            changed |= accept
        active &= changed
        if not bool(active.any()):
            break
    zero_f = const(0.0, x)
    scale = torch.where(suml2 > 0, sumlx / suml2, zero_f)
    levels = torch.where(zero[:, None], torch.zeros_like(levels), levels)
    return levels, torch.where(zero, zero_f, scale)


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` for every row of x.

    x:  float32 [m, n] groups; qw: float32 [m, n] weights, or None for C's
    ``qw == NULL`` (weight x²) -> codes int32 [m, n] in [-nmax, nmax-1], scale float32 [m].

    Starts from ``iscale = -nmax / max`` and tries the 18 neighbours
    ``-(nmax + 0.1·is) / max``, keeping the best weighted least-squares score
    ``sumlx² / suml2``. q6_K's sub-block search and q3_K's imatrix one run it,
    q3_K's imatrix path projects its 16 sub-scales onto 6 bits with it, and
    q4_0/q5_0 search their block scales with it under an imatrix.
    A group whose largest magnitude is below 1e-15 gets code -nmax and scale 0.
    """
    x = x.to(torch.float32)
    amax, vmax = signed_max(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, const(1.0, x), vmax)
    xt = x.t().contiguous()  # [n, m]: element i of every group is one contiguous row (col_sum)
    w = xt * xt if qw is None else qw.to(torch.float32).t().contiguous()
    wx = w * xt

    def codes_at(num: torch.Tensor) -> torch.Tensor:
        # The codes as float32, rounded half to even in place: |x / vmax| <= 1 keeps every product
        # within nmax + 1, where that is nearest_int's value, without its integer passes.
        return torch.mul(xt, -num / vmax).round_().clamp_(-nmax, nmax - 1)

    prods = torch.empty((2, *xt.shape), dtype=torch.float32, device=xt.device)  # w·x·l, w·l·l

    def trial(num: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lf = codes_at(num)
        torch.mul(wx, lf, out=prods[0])
        torch.mul(w, lf, out=prods[1]).mul_(lf)
        return col_sum(prods, clobber=True).unbind(0)  # both sums in one

    fmax = const(float(nmax), x)
    sumlx, suml2 = trial(fmax)
    scale = divide_or_zero(sumlx, suml2)
    best = scale * sumlx
    num = fmax.expand_as(vmax)  # each group's winning numerator; its codes are computed once, at the end
    for step in range(-9, 10):
        if step == 0:
            continue
        cand = fmax + const(0.1, x) * const(float(step), x)
        sumlx, suml2 = trial(cand)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        num = torch.where(take, cand, num)
        scale = torch.where(take, divide_or_zero(sumlx, suml2), scale)
        best = torch.where(take, scale * sumlx, best)
    codes = torch.where(zero, -nmax, codes_at(num).to(torch.int32))
    return codes.t().contiguous(), torch.where(zero, const(0.0, x), scale)


class _FakeQuant(torch.autograd.Function):
    """Forward: weights on the stored grid, exactly ``dequantize(nearest codes)``.
    Backward: see ``fake_quant``. Tensors: w [..., n, sub]; scales, mins [..., n]
    (the ideal, learnable ones) and eff_scales, eff_mins (their projection)."""

    @staticmethod
    def forward(ctx, w, scales, mins, eff_scales, eff_mins, fmt, lsq):  # scales, mins: inputs for their grads only
        e_s, e_m = eff_scales[..., None], None if eff_mins is None else eff_mins[..., None]
        codes = fmt.nearest_codes(w, e_s, e_m)
        v = (w if e_m is None else w - e_m) / e_s
        inside = (v >= fmt.qmin) & (v <= fmt.qmax) & (e_s != 0)
        ctx.save_for_backward(codes, v, inside)
        ctx.lsq, ctx.has_min = lsq, mins is not None
        return dequantize(codes, eff_scales, eff_mins)

    @staticmethod
    def backward(ctx, g):
        codes, v, inside = ctx.saved_tensors
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        g_w = torch.where(inside, g, zero) if ctx.needs_input_grad[0] else None
        g_s = g_m = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, codes - v, codes) if ctx.lsq else codes
            g_s = (g * ds).sum(-1)
        if ctx.has_min and ctx.needs_input_grad[2]:
            g_m = torch.where(inside, zero, g).sum(-1) if ctx.lsq else g.sum(-1)
        return g_w, g_s, g_m, None, None, None, None


def fake_quant(fmt: type[BlockFormat], W: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
               importance: torch.Tensor | None = None, *, project: bool = True,
               lsq: bool = False) -> torch.Tensor:
    """W [rows, cols] -> the dequantized weights on fmt's grid [rows, cols], differentiable.

    scales, mins: [rows, cols/sub_size] ideal per-sub-block scale and min (mins
    only for types with a min; k-quants: cols a multiple of 256). With
    ``project`` they are first projected onto what the file stores
    (``fmt.project``; importance [rows, cols/sub_size] as there), else used as
    they are (they must already be representable for the result to be a file's).

    Forward: ``dequantize(nearest_codes(W, s, m), s, m)`` on the projected s, m,
    bit for bit the weights llama.cpp reads back once the codes are packed.

    Backward, with g = dL/d out:
    - W: straight-through on the rounding: g where the unrounded code
      v = (W − m)/s lies in [qmin, qmax] (and s ≠ 0), 0 where it is clipped;
    - the projection is straight-through too: dL/d ideal scale = dL/d stored scale;
    - scales: through the dequant product for the chosen codes, Σ g·code over
      the sub-block (the exact derivative of the forward between rounding
      steps, the least-squares direction of a grid refit); with ``lsq`` LSQ's
      estimator instead, Σ g·(code − v) inside the range, Σ g·code where clipped;
    - mins: Σ g (lsq: Σ g over the clipped weights only).
    """
    rows, cols = W.shape
    sub = fmt.sub_size
    if cols % fmt.block_size or scales.shape != (rows, cols // sub):
        raise ValueError(f"{fmt.name}: W [rows, k·{fmt.block_size}] needs scales [rows, cols/{sub}]")
    if (mins is not None) != fmt.has_min:
        raise ValueError(f"{fmt.name}: mins must be {'given' if fmt.has_min else 'None'}")
    if project:
        p = fmt.project(scales.detach().reshape(-1), None if mins is None else mins.detach().reshape(-1),
                        None if importance is None else importance.detach().reshape(-1))
        eff_s = p.scales.reshape(scales.shape).to(W.dtype)
        eff_m = None if p.mins is None else p.mins.reshape(scales.shape).to(W.dtype)
    else:
        eff_s, eff_m = scales.detach(), None if mins is None else mins.detach()
    out = _FakeQuant.apply(W.reshape(rows, -1, sub), scales, mins, eff_s, eff_m, fmt, lsq)
    return out.reshape(rows, cols)
