"""What the pipeline asks of a quantization method.

A method picks codes on a format's grid; it never packs bytes. A calibrated
method gets each decoder layer whole (``quantize_layer``, a ``LayerWork``);
by default it walks the layer's groups of linears that share an input
(q/k/v, gate/up, ...) in true-sequential order through the per-group hooks
below (``observe``, ``prepare_group``, ``quantize``, ``end_group``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..formats import BlockFormat, QuantBlocks
from .edge import to_numpy
from .layer import LayerWork, sequential_walk


@dataclass
class LinearReport:
    """Per-tensor facts a method reports (errors are relative output errors)."""

    name: str
    seconds: float = 0.0
    err_rtn: float | None = None
    err_method: float | None = None
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, type[Method]] = {}


def method_registry() -> dict[str, type[Method]]:
    """Every registered method class by its name, in registration order (rtn first)."""
    return dict(_REGISTRY)


class Method:
    """Round-to-nearest with llama.cpp's reference rule; the base of all methods.

    A subclass registers under ``class X(Method, method="name")``.
    """

    name = "rtn"
    needs_calibration = False
    # also carry the full-precision model's stream of hidden states beside the quantized one, and hand
    # each layer its outputs there (LayerWork.targets)
    needs_fp_stream = False
    # observe each group's inputs in pairs (``observe_pair``), the full-precision model's beside the
    # quantized model's; implies needs_fp_stream
    observes_fp_inputs = False
    # with observes_fp_inputs: also take observe_pair's residual where a group adds into the stream
    fits_stream = False

    def __init_subclass__(cls, method: str | None = None, **kw) -> None:
        super().__init_subclass__(**kw)
        if method is not None:
            cls.name = method
            _REGISTRY[method] = cls

    def settings(self) -> dict:
        """The options that decide this method's output (part of a resumable run's fingerprint)."""
        return {k: v for k, v in sorted(vars(self).items()) if not k.startswith("_")}

    def quantize_layer(self, work: LayerWork) -> dict[str, QuantBlocks]:
        """Codes for every linear of one decoder layer (by checkpoint name), calibrated methods only.

        On return each quantized linear of ``work.layer`` computes with exactly the
        dequantization of its codes; the pipeline then runs the layer to make the
        next layer's inputs and writes the codes. Per-tensor reports go to
        ``work.reports``. The default is the true-sequential group walk.
        """
        return sequential_walk(self, work)

    def observe(self, group: str, x: torch.Tensor) -> None:
        """Inputs of one group's shared input (x [..., ci]) from one calibration batch."""

    def observe_pair(self, group: str, x_fp: torch.Tensor, x: torch.Tensor,
                     residual: torch.Tensor | None = None) -> None:
        """One calibration batch's inputs of a group in the full-precision model (x_fp) and in the
        quantized one (x), both [..., ci], the same tokens; for methods that set ``observes_fp_inputs``.
        residual [..., co]: for a lone linear that adds its output into the residual stream, given to
        methods that set ``fits_stream``, the full-precision stream minus the quantized one just
        before that add."""
        raise NotImplementedError

    def prepare_group(self, group: str, layer: torch.nn.Module, members: list[str], smooth: str | None, *,
                      fmts: dict[str, type[BlockFormat]] | None = None,
                      done: dict[str, QuantBlocks] | None = None,
                      norm_offset: float = 0.0) -> dict[str, QuantBlocks] | None:
        """Called once a group's inputs were observed, before its linears are quantized.

        A method may rewrite weights of ``layer`` in place here, as long as the
        layer still computes the same function in full precision (AWQ scales the
        members' input channels and folds the inverse into ``smooth``, the module
        that produces their input: a norm or a linear). members and smooth are
        module paths relative to the layer; fmts: each member's target format;
        done: the codes already chosen for this layer's earlier linears (by
        module path). A method that rewrites one of those must keep it on its
        grid: it returns the replacement codes ({path: QuantBlocks}, which the
        pipeline writes instead) and sets the module's weight to exactly their
        dequantization. norm_offset: what a norm ``smooth`` adds to its weight
        (the spec's ``norm_offset``: Gemma's norms compute x·(1 + w)).
        """
        return None

    def use_imatrix(self, importance: dict[str, np.ndarray]) -> None:
        """Weight the searches by an importance matrix: checkpoint name -> float32 [ci] (mean x² per column)."""
        self._imatrix = dict(importance)

    def quantize(self, name: str, group: str | None, W: torch.Tensor, fmt: type[BlockFormat]) -> tuple[QuantBlocks, LinearReport]:
        """Codes for W [co, ci] on fmt's grid, blocks in row-major order ([co * ci/32]).

        With an importance matrix (``use_imatrix``), llama-quantize's weighted search.
        """
        q = fmt.rtn_rows(to_numpy(W), self.__dict__.get("_imatrix", {}).get(name))
        return q, LinearReport(name)

    def quantize_group(self, group: str | None, members: list[tuple[str, torch.Tensor, type[BlockFormat]]]
                       ) -> list[tuple[QuantBlocks, LinearReport]]:
        """``quantize`` of each linear of one group (checkpoint name, W [co, ci], format), in order.

        The members share their input, and the statistics ``observe`` gathered of it;
        a method whose math treats rows apart under them (GPTQ) quantizes the members
        of one format in one pass over their rows stacked. The default: one by one.
        """
        return [self.quantize(name, group, W, fmt) for name, W, fmt in members]

    def rounded(self, name: str) -> torch.Tensor | None:
        """The continuous weights [co, ci] the last ``quantize`` of ``name`` rounded, where they are
        not the weights it was given (GPTQ: its error-updated weights, whose nearest codes its codes
        are); None otherwise. Handed out once: a tuning method starts from them."""
        return self.__dict__.get("_rounded", {}).pop(name, None)

    def _keep_rounded(self, name: str, W: torch.Tensor | None) -> None:
        if W is not None:
            self.__dict__.setdefault("_rounded", {})[name] = W

    def end_group(self, group: str) -> None:
        """Free whatever was gathered for a finished group."""


def by_format(members: list[tuple[str, torch.Tensor, type[BlockFormat]]]) -> dict[type[BlockFormat], list[int]]:
    """The indices of a group's members by target format, in order: the ones a joined pass can take together."""
    out: dict[type[BlockFormat], list[int]] = {}
    for i, (_, _, fmt) in enumerate(members):
        out.setdefault(fmt, []).append(i)
    return out


def row_shares(members: list[tuple[str, torch.Tensor, type[BlockFormat]]], idx: list[int], seconds: float) -> list[float]:
    """A joined pass's time split over its members (``idx``) by their row counts, for the reports."""
    rows = [members[i][1].shape[0] for i in idx]
    return [seconds * r / sum(rows) for r in rows]


_REGISTRY["rtn"] = Method
