"""Block-wise quantization-aware tuning on the file's grid (AutoRound's recipe, arXiv 2309.05516).

Per decoder layer, after a start method (rtn, gptq, awq or awq+gptq) has
chosen codes for every linear, tune them all together against the
full-precision model:

    min over V, α, β of  Σ_t ‖layer(X; Q(W))_t − Y_t‖² / mean(Y_t²),
    Q(W) = fake_quant(B + V·s₀, α·s₀, β·m₀)

* ``X`` [n, seq, hidden] are the layer's inputs in the quantized stream (the
  previous layers as the file holds them); ``Y`` is the full-precision
  model's own output of this layer (``target="model"``: its layers on the
  unquantized stream, which the pipeline carries beside the quantized one),
  so each layer also makes up for what the layers before it lost; or
  ``target="layer"``: the full-precision layer on the same ``X``, the
  per-layer objective GPTQ and AWQ minimize per linear;
* ``B`` is where each weight starts: its continuous value (after any AWQ
  scaling) where that rounds to the start code on the start grid, else the
  start code's grid point (GPTQ's codes are not nearest codes of the
  original weights), so the first iterate is the start method's result;
* ``V`` [co, ci] is a rounding offset in code units, kept in [-0.5, 0.5]:
  each weight can move to either neighbour of where it starts;
* ``α``, ``β`` [co, ci/sub] multiply each block's (k-quants: sub-block's)
  start scale and min, then the format projects them onto what the file
  stores (``project_under``: fp16; a k-quant's integer sub-scales under the
  start's fp16 super-scales, which stay);
* each token t's error is over its mean square in the target
  (``loss="normed"``: as the next norm sees it, ``token_weights``), or plain
  (``loss="hidden"``);
* the forward uses exactly the weights the file will hold (``fake_quant``),
  the gradient passes the rounding straight through (STE);
* Adam on random batches of the calibration sequences, lr (the multipliers
  a tenth of it) decayed linearly to 0. The target, the loss, the optimizer
  (Adam over AutoRound's signed gradient descent), the steps and the lr
  were chosen by measurement (docs/benchmarks.md, Tuning).

Keep best: the tuned codes replace the start ones only where they lower the
layer's output error on *all* calibration inputs, so tuning never leaves a
layer worse than its start. The random batches are seeded by the layer's
index, so a run (and its resume) is deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..formats import BlockFormat, QuantBlocks
from ..formats.torch_grid import Projection
from ..options import BOUNDS
from .awq import AWQGPTQMethod, AWQMethod
from .base import Method
from .edge import to_torch
from .gptq_method import GPTQMethod
from .layer import LayerWork, sequential_walk

OFFSET_BOUND = 0.5
MULT_BOUNDS = (0.5, 1.5)
# the scale and min multipliers take a tenth of the offsets' step (docs/benchmarks.md: at the full
# step they undid part of what GPTQ's scale search had found)
SCALE_LR_RATIO = 0.1


@dataclass
class _Linear:
    """The trainable state of one linear: weights [co, ci], blocks of ``fmt.sub_size``."""

    fmt: type[BlockFormat]
    start: QuantBlocks
    base: torch.Tensor  # [co, n, sub]
    step: torch.Tensor  # [co, n, 1] |start scale|: one code
    s0: torch.Tensor  # [co, n]
    m0: torch.Tensor | None
    V: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor | None

    def latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        co = self.base.shape[0]
        W = (self.base + self.V * self.step).reshape(co, -1)
        return W, self.s0 * self.alpha, None if self.m0 is None else self.m0 * self.beta

    def grid(self, s: torch.Tensor, m: torch.Tensor | None) -> Projection:
        """The stored grid nearest to block scales s, mins m [co, n] (a k-quant's super-scales stay the start's)."""
        return self.fmt.project_under(self.start, s.detach().reshape(-1), None if m is None else m.detach().reshape(-1))

    def weights(self) -> torch.Tensor:
        """The fake-quantized weights [co, ci], differentiable in V, α, β (the projection straight through)."""
        W, s, m = self.latent()
        p = self.grid(s, m)
        s_st = s + (p.scales.reshape(s.shape) - s).detach()  # the stored value, the ideal one's gradient
        m_st = None if m is None else m + (p.mins.reshape(m.shape) - m).detach()
        return self.fmt.fake_quant(W, s_st, m_st, project=False)

    @torch.no_grad()
    def blocks(self) -> QuantBlocks:
        """The current iterate as the codes and stored grid ``pack`` writes."""
        W, s, m = self.latent()
        p = self.grid(s, m)
        sub = self.fmt.sub_size
        scales = p.scales.reshape(W.shape[0], -1, 1)
        mins = None if p.mins is None else p.mins.reshape(W.shape[0], -1, 1)
        codes = self.fmt.nearest_codes(W.reshape(W.shape[0], -1, sub), scales, mins)
        return self.fmt.blocks(codes.reshape(-1), p)


def _start_state(fmt: type[BlockFormat], q: QuantBlocks, W: torch.Tensor) -> _Linear:
    co = W.shape[0]
    sub = fmt.sub_size
    c0 = to_torch(q.codes.astype("float32"), W).reshape(co, -1, sub)
    s0 = to_torch(q.scales, W).reshape(co, -1)
    m0 = None if q.mins is None else to_torch(q.mins, W).reshape(co, -1)
    grid = fmt.dequantize_torch(c0, s0, m0)
    Wb = W.to(torch.float32).reshape(co, -1, sub)
    near = fmt.nearest_codes(Wb, s0[..., None], None if m0 is None else m0[..., None])
    base = torch.where(near == c0, Wb, grid)
    return _Linear(fmt=fmt, start=q, base=base, step=s0.abs()[..., None], s0=s0, m0=m0,
                   V=torch.zeros_like(base, requires_grad=True),
                   alpha=torch.ones_like(s0, requires_grad=True),
                   beta=None if m0 is None else torch.ones_like(m0, requires_grad=True))


LOSSES = BOUNDS["loss"].choices  # ("normed", "hidden"): one list, the one the CLI checks


def token_weights(targets: torch.Tensor, loss: str) -> torch.Tensor | None:
    """Per-token weights [n, seq, 1] of the squared output error, or None for the plain mean.

    ``normed`` divides each token's error by that token's mean square in the
    target: every reader of the residual stream (the next layer's input norms,
    the final norm before the head) divides a token by its RMS, so this is
    the error as they see it. The plain ``hidden`` MSE is instead dominated by
    the few tokens with massive activations (the attention sink at position 0
    in many models), whose exact value the normed readers barely notice.
    """
    if loss == "hidden":
        return None
    return 1.0 / targets.pow(2).mean(-1, keepdim=True).clamp_min(torch.finfo(targets.dtype).tiny)


def output_error(out: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error of layer outputs [n, seq, hidden], each token weighted by ``token_weights``."""
    sq = (out - targets).pow(2)
    return sq.mean() if weights is None else (sq * weights).mean()


class TuneMethod(Method, method="tune"):
    """Start from RTN, then tune the rounding and the grids of each layer's linears together."""

    needs_calibration = True

    def __init__(self, steps: int = 200, lr: float = 1e-2, tune_batch: int = 1, target: str = "model",
                 loss: str = "normed"):
        self.steps, self.lr, self.tune_batch, self.target, self.loss = steps, lr, tune_batch, target, loss
        self._start = Method()

    @property
    def needs_fp_stream(self) -> bool:
        return self.target == "model" or self._start.observes_fp_inputs

    def quantize_layer(self, work: LayerWork) -> dict[str, QuantBlocks]:
        t0 = time.perf_counter()
        # the full-precision model's outputs here, or the full-precision layer's on the quantized inputs
        # (computed now, before anything is rounded)
        targets = work.targets if self.target == "model" else work.outputs()
        work.keep_continuous = True
        start = sequential_walk(self._start, work)
        t_start = time.perf_counter() - t0
        state = {rel: _start_state(fmt, start[work.name(rel)], work.continuous[rel])
                 for rel, fmt in work.formats.items() if work.name(rel) in start}
        w = token_weights(targets, self.loss)
        err_start = float(output_error(work.outputs(), targets, w))  # the walk left the layer on the start codes
        opt = torch.optim.Adam([
            {"params": [st.V for st in state.values()], "lr": self.lr},
            {"params": [p for st in state.values() for p in (st.alpha, st.beta) if p is not None],
             "lr": self.lr * SCALE_LR_RATIO}])
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / max(self.steps, 1))  # steps 0: no step taken
        gen = torch.Generator().manual_seed(work.index)  # on the CPU: the same batches on every device
        n = work.inputs.shape[0]
        batch = min(self.tune_batch, n)
        losses = []
        for _ in range(self.steps):
            idx = torch.randperm(n, generator=gen, device="cpu")[:batch].to(work.inputs.device)
            loss = output_error(work.forward(work.inputs[idx], {rel: st.weights() for rel, st in state.items()}),
                                targets[idx], None if w is None else w[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            decay.step()
            with torch.no_grad():
                for st in state.values():
                    st.V.clamp_(-OFFSET_BOUND, OFFSET_BOUND)
                    for p in (st.alpha, st.beta):
                        if p is not None:
                            p.clamp_(*MULT_BOUNDS)
            losses.append(float(loss.detach()))
        with torch.no_grad():
            tuned = {rel: st.blocks() for rel, st in state.items()}
            tuned_w = {rel: to_torch(st.fmt.dequantize(tuned[rel]), st.base).reshape(st.base.shape[0], -1)
                       for rel, st in state.items()}
            err_tuned = float(output_error(work.outputs(weights=tuned_w), targets, w))
        keep = err_tuned < err_start
        codes = dict(start)
        if keep:  # else the layer computes with the start codes already
            for rel in state:
                codes[work.name(rel)] = tuned[rel]
                module = work.layer.get_submodule(rel)
                module.weight.data = tuned_w[rel].reshape(module.weight.shape)
        summary = {"layer": work.index, "layer_err_start": err_start, "layer_err_tuned": err_tuned, "kept": "tuned" if keep else "start",
                   "steps": self.steps, "first_batch_loss": losses[0] if losses else None,
                   "last_batch_loss": losses[-1] if losses else None,
                   "start_seconds": t_start, "tune_seconds": time.perf_counter() - t0 - t_start}
        for r in work.reports:
            r.extra["tune"] = summary
        return codes


class GPTQTuneMethod(TuneMethod, method="gptq+tune"):
    """Start from GPTQ's codes (its Hessian walk per linear), then tune the layer."""

    def __init__(self, steps: int = 200, lr: float = 1e-2, tune_batch: int = 1, target: str = "model",
                 loss: str = "normed", damp: float = 0.01, act_order: bool = False, gptq_target: str = "stream"):
        super().__init__(steps, lr, tune_batch, target, loss)
        self.damp, self.act_order, self.gptq_target = damp, act_order, gptq_target
        self._start = GPTQMethod(damp=damp, act_order=act_order, gptq_target=gptq_target)


class AWQTuneMethod(TuneMethod, method="awq+tune"):
    """Start from AWQ (scales folded, clip-searched codes), then tune the layer."""

    def __init__(self, steps: int = 200, lr: float = 1e-2, tune_batch: int = 1, target: str = "model",
                 loss: str = "normed", n_grid: int = 20):
        super().__init__(steps, lr, tune_batch, target, loss)
        self.n_grid = n_grid
        self._start = AWQMethod(n_grid=n_grid)


class AWQGPTQTuneMethod(TuneMethod, method="awq+gptq+tune"):
    """Start from awq+gptq, then tune the layer."""

    def __init__(self, steps: int = 200, lr: float = 1e-2, tune_batch: int = 1, target: str = "model",
                 loss: str = "normed", n_grid: int = 20, damp: float = 0.01, act_order: bool = False,
                 gptq_target: str = "stream", alpha_by: str = "gptq"):
        super().__init__(steps, lr, tune_batch, target, loss)
        self.n_grid, self.damp, self.act_order, self.gptq_target = n_grid, damp, act_order, gptq_target
        self.alpha_by = alpha_by
        self._start = AWQGPTQMethod(n_grid=n_grid, damp=damp, act_order=act_order, gptq_target=gptq_target,
                                    alpha_by=alpha_by)
