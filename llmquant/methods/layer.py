"""What a calibrated method sees of one decoder layer, and the true-sequential walk over it.

The pipeline owns the order of layers, the I/O and resume; a method owns
everything inside one layer. It gets a ``LayerWork`` (the real decoder layer
in full precision, its calibration inputs, that layer's own attention
arguments, the target format of every linear) and returns the codes of each
linear. GPTQ and AWQ quantize one group of linears that share an input at a
time, each group seeing the real inputs that the already-quantized groups
before it produce (``sequential_walk``); a tuning method looks at the layer
as a whole (``LayerWork.forward`` runs with gradients).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..formats import BlockFormat, QuantBlocks
from .edge import to_torch


@dataclass(frozen=True)
class Group:
    """Linears quantized together (module paths relative to the layer), and the module producing their input."""

    members: tuple[str, ...]
    smooth: str | None = None


@dataclass
class LayerWork:
    """One decoder layer handed to a method.

    layer:   the HF decoder layer on the compute device (CPU or GPU), full-precision weights; a
             method leaves each quantized linear's weight equal to the dequantization of its codes
             and creates its own tensors on the layer's device (numpy only through ``edge``)
    inputs:  float32 [n, seq, hidden] the layer's calibration inputs, on the same device
    kwargs:  what the model passes this layer besides the hidden states (rotary
             cos/sin, mask: [1, ...], broadcast over batches), on the same device
    formats: module path of each linear to quantize -> its target format
    groups:  the true-sequential groups (only members in ``formats``), in order
    targets: float32 [n, seq, hidden] the full-precision model's outputs of this layer (the layer
             on the full-precision stream of inputs), given to a method that asks
             (``Method.needs_fp_stream``), else None
    fp_inputs: float32 [n, seq, hidden] the full-precision model's inputs of this layer, given
             where ``targets`` is
    residual_before: linear (module path) that adds its output into the residual stream -> the
             module whose input is that stream just before the add (None: the layer's input); a
             method that ``fits_stream`` observes how the two streams differ there
    continuous: filled by ``sequential_walk`` where ``keep_continuous`` (a copy of the layer's
             weights, so only a method that asks): the continuous weights [co, ci] each linear's codes
             were rounded from (its weight after any AWQ scaling; GPTQ's error-updated weights),
             the point a tuning method starts from
    """

    index: int
    prefix: str
    layer: nn.Module
    inputs: torch.Tensor
    kwargs: dict
    formats: dict[str, type[BlockFormat]]
    groups: list[Group]
    batch_size: int
    norm_shift: Callable[[str], float]
    # feed(module, observe, inputs=None, copy=None): each batch of ``inputs`` (default: the layer's
    # calibration inputs) through the layer, or a copy of it, up to module's input (a module of that copy)
    feed: Callable
    reports: list = field(default_factory=list)
    targets: torch.Tensor | None = None
    fp_inputs: torch.Tensor | None = None
    residual_before: dict[str, str | None] = field(default_factory=dict)
    keep_continuous: bool = False
    continuous: dict[str, torch.Tensor] = field(default_factory=dict)

    def name(self, path: str) -> str:
        """The checkpoint name of a linear's weight from its module path."""
        return f"{self.prefix}{path}.weight"

    def forward(self, hidden: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The layer's output for ``hidden`` [b, seq, hidden], optionally with ``weights``
        (module path -> [co, ci]) in place of the linears' own; differentiable in them."""
        params = {f"{p}.weight": w for p, w in (weights or {}).items()}
        out = torch.func.functional_call(self.layer, params, (hidden,), self.kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def outputs(self, hidden: torch.Tensor | None = None, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``forward`` over all of ``hidden`` (default: the inputs) by batches, without gradients."""
        hidden = self.inputs if hidden is None else hidden
        return torch.cat([self.forward(b, weights) for b in hidden.split(self.batch_size)])


def _observe_pairs(method, key: str, work: LayerWork, pristine: nn.Module, rel: str) -> None:
    """``method.observe_pair`` of each calibration batch: its input of ``rel`` in the layer as it
    now computes, on the quantized stream, and in the full-precision layer on the full-precision
    stream (token for token the same positions). Where the method fits the stream and ``rel`` adds
    into it, also the full-precision stream minus the quantized one just before that add, taken on
    the same passes (the input of ``work.residual_before[rel]``, which runs before ``rel``)."""
    if work.fp_inputs is None:
        raise RuntimeError(f"{method.name} observes full-precision inputs, but the pipeline carried no such stream")
    stream = method.fits_stream and rel in work.residual_before
    tap = work.residual_before.get(rel) if stream else None
    for x, x_fp in zip(work.inputs.split(work.batch_size), work.fp_inputs.split(work.batch_size), strict=True):
        seen: list[torch.Tensor] = []
        before: dict[str, torch.Tensor] = {"q": x, "fp": x_fp} if stream and tap is None else {}
        with _taps(work.layer, pristine, tap, before):
            work.feed(work.layer.get_submodule(rel), seen.append, x)

            def pair(x_fp_in, seen=seen, before=before):
                x_q = seen.pop()
                if not stream:
                    return method.observe_pair(key, x_fp_in, x_q)
                if before.keys() != {"q", "fp"}:
                    raise RuntimeError(f"{tap} did not run before {rel}: no residual stream to fit")
                method.observe_pair(key, x_fp_in, x_q, residual=before["fp"] - before["q"])

            work.feed(pristine.get_submodule(rel), pair, x_fp, pristine)


@contextmanager
def _taps(layer: nn.Module, pristine: nn.Module, tap: str | None, into: dict[str, torch.Tensor]):
    """While open, the input of module ``tap`` goes to ``into["q"]`` when ``layer`` runs it and to
    ``into["fp"]`` when ``pristine`` does (tap None: nothing to take)."""
    if tap is None:
        yield
        return
    hooks = [m.get_submodule(tap).register_forward_pre_hook(
        lambda _m, args, side=side: into.__setitem__(side, args[0].detach()))
        for m, side in ((layer, "q"), (pristine, "fp"))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def sequential_walk(method, work: LayerWork) -> dict[str, QuantBlocks]:
    """GPTQ's and AWQ's order: per group, observe its real inputs, prepare, quantize each member.

    Each member's weight becomes the dequantization of its codes before the next
    group observes, so later groups see the quantized earlier ones (true-sequential).
    Returns the codes by checkpoint name.
    """
    codes: dict[str, QuantBlocks] = {}
    # a method fitting the full-precision model sees each group's inputs there too, in an untouched copy
    # of the layer (the walk rewrites this one) on the full-precision stream
    pristine = copy.deepcopy(work.layer) if method.observes_fp_inputs else None
    for g in work.groups:
        key = f"{work.index}:{g.members[0]}"
        if pristine is None:
            work.feed(work.layer.get_submodule(g.members[0]), lambda x, key=key: method.observe(key, x))
        else:
            _observe_pairs(method, key, work, pristine, g.members[0])
            if g is work.groups[-1]:
                pristine = None  # a layer's worth of memory, not held through the last group's walk
        fmts = {rel: work.formats[rel] for rel in g.members}
        done = {n[len(work.prefix):-len(".weight")]: q for n, q in codes.items()}  # this layer's, so far
        revised = method.prepare_group(key, work.layer, list(g.members), g.smooth, fmts=fmts, done=done,
                                       norm_offset=work.norm_shift(f"{work.prefix}{g.smooth}.weight"))
        for rel, q in (revised or {}).items():  # earlier linears whose grid the fold rescaled
            codes[work.name(rel)] = q
            if work.keep_continuous:
                work.continuous[rel] = work.layer.get_submodule(rel).weight.data.detach().clone()
        modules = {rel: work.layer.get_submodule(rel) for rel in g.members}
        # the members share the inputs observed above, so they are quantized together, from the weights
        # as they are now, and only then set to their dequantization
        quantized = method.quantize_group(key, [(work.name(rel), modules[rel].weight.data, fmts[rel])
                                                for rel in g.members])
        for rel, (q, report) in zip(g.members, quantized, strict=True):
            module, fmt = modules[rel], fmts[rel]
            rounded = method.rounded(work.name(rel))  # taken either way: the method lets go of it
            if work.keep_continuous:
                work.continuous[rel] = (module.weight.data.detach().clone() if rounded is None
                                        else rounded.reshape(module.weight.shape))
            module.weight.data = to_torch(fmt.dequantize(q), module.weight).reshape(module.weight.shape)
            codes[work.name(rel)] = q
            work.reports.append(report)
        method.end_group(key)
    return codes
