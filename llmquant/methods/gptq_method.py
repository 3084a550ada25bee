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
from .base import LinearReport, Method, by_format, row_shares
from .gptq import HessianAccumulator, HessianError, gptq_quantize_rows


class GPTQMethod(Method, method="gptq"):
    needs_calibration = True

    def __init__(self, damp: float = 0.01, act_order: bool = False, scale_search: bool = True, block_cols: int = 128):
        self.damp, self.act_order, self.scale_search, self.block_cols = damp, act_order, scale_search, block_cols
        self._acc: dict[str, HessianAccumulator] = {}

    def observe(self, group: str, x: torch.Tensor) -> None:
        acc = self._acc.get(group)
        if acc is None:
            acc = self._acc[group] = HessianAccumulator(x.shape[-1], device=x.device)
        acc.add(x)

    def quantize(self, name: str, group: str | None, W: torch.Tensor, fmt: type[BlockFormat]) -> tuple[QuantBlocks, LinearReport]:
        return self.quantize_group(group, [(name, W, fmt)])[0]

    def quantize_group(self, group, members):
        acc = self._acc.get(group) if group else None
        if acc is None:
            return [Method.quantize(self, name, group, W, fmt) for name, W, fmt in members]
        out: list = [None] * len(members)
        for fmt, idx in by_format(members).items():
            t0 = time.perf_counter()
            try:
                results = gptq_quantize_rows([members[i][1] for i in idx], acc.hessian(), fmt, damp=self.damp,
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
