"""The layer walk: the only place that knows the order of work.

embeddings -> for each decoder layer: read its weights -> (calibrated methods:
observe each true-sequential group's real inputs, quantize it, put the
quantized weights back) -> encode and write its tensors -> (calibrated: run
the quantized layer to make the next layer's inputs) -> free it -> final norm
and head. Peak memory is one layer plus the calibration activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .export.arch import ArchSpec
from .export.gguf_file import GGUFOutput, PlannedTensor
from .formats import get_format
from .methods import LinearReport, Method
from .policy import FLOAT_TYPES


@dataclass
class PipelineResult:
    reports: list[LinearReport] = field(default_factory=list)
    seconds_by_stage: dict[str, float] = field(default_factory=dict)


def encode(spec: ArchSpec, config: dict, hf_name: str, planned: PlannedTensor, W: torch.Tensor, q=None) -> np.ndarray:
    """Bytes of one tensor in llama.cpp's layout (rows permuted where the arch says so).

    W: float32 [co, ci] or [n]; q: the QuantBlocks a method chose, for quantized types.
    """
    if planned.type in FLOAT_TYPES:
        rows = spec.to_gguf_rows(hf_name, W.numpy(), config)
        if planned.type == "f32":
            return rows.astype(np.float32)
        if planned.type == "f16":
            return rows.astype(np.float16)
        return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), gguf.GGMLQuantizationType.BF16)
    fmt = get_format(planned.type)
    if q is None:
        q = fmt.rtn(W.reshape(-1, fmt.block_size).numpy())
    packed = fmt.pack(q).reshape(W.shape[0], -1)
    return spec.to_gguf_rows(hf_name, packed, config)


class Pipeline:
    """Streams one model through a method into a GGUFOutput."""

    def __init__(self, *, spec: ArchSpec, config: dict, store, plan: dict[str, PlannedTensor],
                 method: Method, output: GGUFOutput, runner=None, progress: bool = True):
        self.spec, self.config, self.store, self.plan = spec, config, store, plan
        self.method, self.output, self.runner = method, output, runner
        self.progress = progress
        self.result = PipelineResult()

    def _write(self, hf_name: str, W: torch.Tensor, q=None) -> None:
        planned = self.plan[hf_name]
        self.output.write(planned.name, encode(self.spec, self.config, hf_name, planned, W, q))

    def run(self, tokens: torch.Tensor | None = None, batch_size: int = 8) -> PipelineResult:
        """Write every tensor; ``tokens`` [n, seqlen] drives calibrated methods."""
        t0 = time.perf_counter()
        embed = self.store.get(self.spec.embed)
        hidden = None
        if self.method.needs_calibration:
            hidden = embed[tokens]  # [n, seqlen, hidden]
            self.runner.capture_kwargs(hidden[:batch_size])
        self._write(self.spec.embed, embed)
        del embed
        n_layers = int(self.config["num_hidden_layers"])
        bar = tqdm(range(n_layers), desc="layers", unit="layer", disable=not self.progress, dynamic_ncols=True)
        for i in bar:
            names = self.spec.layer_names(i, self.store.__contains__)
            weights = {n: self.store.get(n) for n in names}
            if hidden is not None:
                codes, hidden = self._calibrated_layer(i, weights, hidden, batch_size)
            else:
                codes = self._rtn_layer(weights)
            for n in names:
                self._write(n, weights[n], codes.get(n))
            del weights, codes
        self.result.seconds_by_stage["layers"] = time.perf_counter() - t0
        self._write(self.spec.final_norm, self.store.get(self.spec.final_norm))
        if self.spec.head in self.plan:
            self._write(self.spec.head, self.store.get(self.spec.head))
        return self.result

    def _quantizable(self, hf_name: str) -> bool:
        planned = self.plan[hf_name]
        return planned.type not in FLOAT_TYPES and len(planned.shape) == 2

    def _rtn_layer(self, weights: dict[str, torch.Tensor]) -> dict:
        codes = {}
        for n, W in weights.items():
            if self._quantizable(n):
                fmt = get_format(self.plan[n].type)
                codes[n], report = self.method.quantize(n, None, W, fmt)
                self.result.reports.append(report)
        return codes

    def _calibrated_layer(self, i: int, weights: dict, hidden: torch.Tensor, batch_size: int):
        layer = self.runner.build(i, weights)
        prefix = self.spec.layer_prefix.format(i=i)
        codes = {}
        for group in self.spec.sequential_groups:
            members = [g for g in group if prefix + g + ".weight" in self.plan and self._quantizable(prefix + g + ".weight")]
            if not members:
                continue
            key = f"{i}:{group[0]}"
            self.runner.feed(layer, hidden, layer.get_submodule(members[0]),
                             lambda x, key=key: self.method.observe(key, x), batch_size)
            fmts = {rel: get_format(self.plan[prefix + rel + ".weight"].type) for rel in members}
            done = {n[len(prefix):-len(".weight")]: q for n, q in codes.items()}  # this layer's, so far
            revised = self.method.prepare_group(key, layer, members, self.spec.smooth_from.get(group[0]),
                                                fmts=fmts, done=done)
            codes.update({prefix + rel + ".weight": q for rel, q in (revised or {}).items()})
            for rel in members:
                name = prefix + rel + ".weight"
                module = layer.get_submodule(rel)
                fmt = get_format(self.plan[name].type)
                q, report = self.method.quantize(name, key, module.weight.data, fmt)
                module.weight.data = torch.from_numpy(fmt.dequantize(q)).reshape(module.weight.shape)
                codes[name] = q
                self.result.reports.append(report)
            self.method.end_group(key)
        out = torch.cat([self.runner.forward(layer, b) for b in hidden.split(batch_size)])
        state = layer.state_dict()  # a method may have rewritten non-quantized tensors (norms)
        for n in weights:
            weights[n] = state[n[len(prefix):]].detach().clone()
        self.runner.free(i)
        return codes, out
