"""GPTQ as a pipeline method: gather each group's Hessian, then quantize its linears.

The math lives in ``gptq.py``; this object only keeps one Hessian per group
of linears that share an input (q/k/v, gate/up), as the pipeline feeds it,
walks the members of one format together (``gptq_quantize_rows``), and falls
back to RTN with a warning when a Hessian is unusable.
"""

from __future__ import annotations

import time
import warnings

import torch

from ..formats import BlockFormat, QuantBlocks
from ..options import BOUNDS
from .base import LinearReport, Method, by_format, row_shares
from .gptq import (
    HessianAccumulator,
    HessianError,
    accumulate_cross,
    accumulate_residual,
    gptq_quantize_rows,
    model_target,
)

GPTQ_TARGETS = BOUNDS["gptq_target"].choices


class FitsTarget:
    """What GPTQ's walk fits, shared by gptq and awq+gptq: "model" observes each group's inputs
    in both streams (the pipeline then runs the full-precision stream beside the quantized one);
    "stream" also observes, for each linear that adds into the residual stream, how the two
    streams differ just before its add (``observe_pair``'s residual), and fits the full-precision
    stream after it."""

    gptq_target: str

    def _set_target(self, gptq_target: str) -> None:
        if gptq_target not in GPTQ_TARGETS:
            raise ValueError(f"gptq_target must be one of {GPTQ_TARGETS}, not {gptq_target!r}")
        self.gptq_target = gptq_target

    @property
    def observes_fp_inputs(self) -> bool:
        return self.gptq_target in ("model", "stream")

    needs_fp_stream = observes_fp_inputs

    @property
    def fits_stream(self) -> bool:
        return self.gptq_target == "stream"


def fitted_weights(members: list, groups: dict, H: torch.Tensor, D: torch.Tensor | None, damp: float,
                   E: torch.Tensor | None = None) -> dict:
    """Per format (``groups``: by_format of ``members``), the weights GPTQ rounds: the members' own,
    or where D (the (x_fp - x)ᵀ x of the same tokens, scaled as H) was gathered, their
    ``model_target``, in place of the members' weights (the layer's, which the walk replaces by
    their codes' dequantization next). Where H cannot be factored, the members' own: their walk
    then falls back as it would. E: the residual term of a lone member that adds into the residual
    stream (``model_target``), scaled as H."""
    order = [i for idx in groups.values() for i in idx]
    Ws = [members[i][1] for i in order]
    if D is not None:
        try:  # one factorization of H for every format of the group
            Ws = model_target(Ws, H, D, damp, in_place=True, E=E)
        except HessianError:
            pass
    fitted = dict(zip(order, Ws, strict=True))
    return {fmt: [fitted[i] for i in idx] for fmt, idx in groups.items()}


class GPTQMethod(FitsTarget, Method, method="gptq"):
    """gptq_target: "layer" fits each linear's output on its own inputs (GPTQ); "model" fits the
    full-precision model's output there (``model_target``), which observes each group's inputs in
    both streams and holds a copy of the layer and a second ci×ci matrix per group; "stream"
    (the default) also fits, where a linear adds into the residual stream, the full-precision
    stream after the add (one more co×ci matrix for such a linear)."""

    needs_calibration = True

    def __init__(self, damp: float = 0.01, act_order: bool = False, scale_search: bool = True, block_cols: int = 128,
                 gptq_target: str = "stream"):
        self._set_target(gptq_target)
        self.damp, self.act_order, self.scale_search, self.block_cols = damp, act_order, scale_search, block_cols
        self._acc: dict[str, HessianAccumulator] = {}
        self._cross: dict[str, torch.Tensor] = {}  # group -> Σ (x_fp - x)ᵀ x, where the model is fitted
        self._resid: dict[str, torch.Tensor] = {}  # group -> Σ rᵀ x, where the stream is fitted

    def observe(self, group: str, x: torch.Tensor) -> None:
        acc = self._acc.get(group)
        if acc is None:
            acc = self._acc[group] = HessianAccumulator(x.shape[-1], device=x.device)
        acc.add(x)

    def observe_pair(self, group: str, x_fp: torch.Tensor, x: torch.Tensor,
                     residual: torch.Tensor | None = None) -> None:
        self.observe(group, x)
        D = self._cross.get(group)
        if D is None:
            D = self._cross[group] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        accumulate_cross(D, x_fp.detach(), x.detach())
        if residual is not None:
            self._resid[group] = accumulate_residual(self._resid.get(group), residual.detach(), x.detach())


    def quantize(self, name: str, group: str | None, W: torch.Tensor, fmt: type[BlockFormat]) -> tuple[QuantBlocks, LinearReport]:
        return self.quantize_group(group, [(name, W, fmt)])[0]

    def quantize_group(self, group, members):
        acc = self._acc.get(group) if group else None
        if acc is None:
            return [Method.quantize(self, name, group, W, fmt) for name, W, fmt in members]
        out: list = [None] * len(members)
        groups = by_format(members)
        D, E = self._cross.pop(group, None), self._resid.pop(group, None)
        try:
            H = acc.hessian()
        except HessianError:
            H = D = E = None  # every walk below raises it again, and falls back
        targets = fitted_weights(members, groups, H, None if D is None else D.mul_(2.0 / acc.n), self.damp,
                                 None if E is None else E.mul_(2.0 / acc.n))
        del D, E  # gone before the walks
        for fmt, idx in groups.items():
            t0 = time.perf_counter()
            try:
                results = gptq_quantize_rows(targets.pop(fmt), acc.hessian(), fmt, damp=self.damp,
                                             act_order=self.act_order, block_cols=self.block_cols,
                                             scale_search=self.scale_search)
            except HessianError as exc:
                for i in idx:
                    name, W, _ = members[i]
                    warnings.warn(f"{name}: {exc}; falling back to RTN", stacklevel=2)
                    q, report = Method.quantize(self, name, group, W, fmt)
                    report.extra["fallback"] = str(exc)
                    out[i] = q, report
                continue
            for i, res, seconds in zip(idx, results, row_shares(members, idx, time.perf_counter() - t0), strict=True):
                name = members[i][0]
                self._keep_rounded(name, res.rounded)
                out[i] = res.q, LinearReport(name, seconds=seconds, err_rtn=res.rel_err_rtn, err_method=res.rel_err,
                                             extra={"damp": res.damp, "dead_columns": res.n_dead})
        return out

    def end_group(self, group: str) -> None:
        self._acc.pop(group, None)
        self._cross.pop(group, None)
        self._resid.pop(group, None)
