"""The layer walk: the only place that knows the order of work.

the plan's tensors before the layers (generated ones, embeddings) -> for each
decoder layer: read its weights -> (calibrated methods: the method gets the
whole layer, ``Method.quantize_layer``, and leaves it computing with its
codes) -> encode and write its tensors -> (calibrated: run the quantized layer
to make the next layer's inputs) -> free it -> the plan's tensors after the
layers (final norm, head). The order is the plan's (``plan.py``); the pipeline
only walks it. Peak memory is one layer plus the calibration activations plus
one row chunk of the embedding or head, whatever the depth or vocabulary.

Device: a calibrated layer, its inputs and its captured arguments live on the
runner's device (the CPU or a GPU) while the method works on them; what goes
to the file (codes, the layer's rewritten tensors) comes back to the CPU, and
the next layer's inputs stay on the device. Tensors outside the layers and
rtn never leave the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .export.arch import ArchSpec
from .export.gguf_file import GGUFOutput, PlannedTensor
from .formats import get_format
from .methods import LinearReport, Method
from .methods.layer import Group, LayerWork
from .plan import PlanEntry, TensorPlan
from .policy import FLOAT_TYPES
from .timing import StageClock
from .workdir import ResumePoint, WorkDir

# Row chunks of embeddings and heads: 4M float32 values (16 MiB) at a time.
ROW_CHUNK_ELEMENTS = 1 << 22


@dataclass
class PipelineResult:
    reports: list[LinearReport] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # StageClock totals of this run
    layer_stages: list[dict] = field(default_factory=list)  # per decoder layer: {"layer": i, stage: seconds}


def encode(spec: ArchSpec, config: dict, hf_name: str | None, planned: PlannedTensor, W: torch.Tensor,
           q=None, importance: np.ndarray | None = None) -> np.ndarray:
    """Bytes of one tensor in llama.cpp's layout (rows permuted where the arch says so).

    W: float32 [co, ci] or [n]; q: the QuantBlocks a method chose, for quantized types;
    hf_name: None for a generated tensor, already in llama.cpp's layout;
    importance: float32 [ci], the imatrix rtn weighs by where q is None.
    """
    if planned.type in FLOAT_TYPES:
        rows = W.numpy() if hf_name is None else spec.to_gguf_rows(hf_name, W.numpy(), config)
        if planned.type == "f32":
            return rows.astype(np.float32)
        if planned.type == "f16":
            return rows.astype(np.float16)
        return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), gguf.GGMLQuantizationType.BF16)
    fmt = get_format(planned.type)
    if q is None:
        q = fmt.rtn_rows(W.numpy(), importance)
    packed = fmt.pack(q).reshape(W.shape[0], -1)
    return packed if hf_name is None else spec.to_gguf_rows(hf_name, packed, config)


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS.

    glibc keeps freed heap pages for reuse, and the many mid-sized temporaries
    of a calibrated layer fragment its arenas, so without a trim resident
    memory creeps up layer after layer. Not after an rtn layer: one tensor's
    temporaries at a time, the same sizes layer after layer, reused as they are.
    """
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()


class Pipeline:
    """Streams one model through a method into a GGUFOutput."""

    def __init__(self, *, spec: ArchSpec, config: dict, store, plan: TensorPlan,
                 method: Method, output: GGUFOutput, runner=None, progress: bool = True,
                 importance: dict[str, np.ndarray] | None = None):
        self.spec, self.config, self.store, self.plan = spec, config, store, plan
        self.method, self.output, self.runner = method, output, runner
        self.progress = progress
        self.importance = importance or {}  # GGUF name -> imatrix [ci], for what rtn writes here
        self.result = PipelineResult()
        self.clock = StageClock()

    def _write(self, hf_name: str, W: torch.Tensor, q=None) -> None:
        planned = self.plan[hf_name]
        with self.clock("write"):
            self.output.write(planned.name, encode(self.spec, self.config, hf_name, planned, W, q,
                                                   self.importance.get(planned.name)))

    def _write_entry(self, entry: PlanEntry, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Write one tensor outside the layers; returns the embedding rows of ``tokens`` where it gathers them."""
        if entry.values is not None:
            with self.clock("write"):
                self.output.write(entry.tensor.name,
                                  encode(self.spec, self.config, None, entry.tensor, torch.from_numpy(entry.values)))
        elif entry.by_rows:
            with self.clock("write"):  # reading, encoding and writing by row chunks, interleaved
                return self._stream_rows(entry.source, tokens)
        else:
            with self.clock("read"):
                W = self.store.get(entry.source)
            self._write(entry.source, W)
        return None

    def _stream_rows(self, hf_name: str, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Write a (possibly huge) embedding or head by row chunks, never whole.

        With ``tokens``, also gather their embedding rows on the way: the
        calibration inputs of layer 0.
        """
        planned = self.plan[hf_name]
        rows, width = planned.shape
        step = max(1, ROW_CHUNK_ELEMENTS // width)
        hidden = None if tokens is None else torch.empty((*tokens.shape, width), dtype=torch.float32)

        def chunks():
            for start in range(0, rows, step):
                W = self.store.get_rows(hf_name, start, min(start + step, rows))
                if hidden is not None:
                    hit = (tokens >= start) & (tokens < start + W.shape[0])
                    hidden[hit] = W[tokens[hit] - start]
                yield encode(self.spec, self.config, hf_name, planned, W, importance=self.importance.get(planned.name))

        self.output.write_chunks(planned.name, chunks())
        if hidden is not None and self.spec.embed_scale is not None:  # what the model feeds layer 0 (Gemma)
            hidden *= torch.tensor(self.spec.embed_scale(self.config), dtype=torch.float32)
        return hidden

    def run(self, tokens: torch.Tensor | None = None, batch_size: int = 8, *,
            resume: ResumePoint | None = None, work: WorkDir | None = None) -> PipelineResult:
        """Write every tensor; ``tokens`` [n, seqlen] drives calibrated methods.

        resume: continue after the layers an interrupted run finished (their
        tensors are already in the partial file); work: where each layer
        boundary is recorded so that this run can be resumed in turn.
        """
        calibrated = self.method.needs_calibration
        fp_stream = calibrated and self.method.needs_fp_stream
        if resume is None:
            hidden = None
            for entry in self.plan.outside_layers(before=True):
                gather = calibrated and entry.source == self.spec.embed  # layer 0's calibration inputs
                rows = self._write_entry(entry, tokens if gather else None)
                hidden = rows if gather else hidden
            fp_hidden = hidden if fp_stream else None  # both streams start at the embeddings
            first = 0
        else:
            hidden, fp_hidden, first = resume.hidden, resume.fp_hidden, resume.layers_done
            self.result.reports = list(resume.reports)
        if calibrated:
            hidden = hidden.to(self.runner.device)
            fp_hidden = None if fp_hidden is None else fp_hidden.to(self.runner.device)
            self.runner.capture_kwargs(hidden[:batch_size])
        try:
            self._layers(first, hidden, fp_hidden, batch_size, work)
        except BaseException:
            if work is not None:
                work.settle(quiet=True)  # the boundary in flight completes while the partial file is open
            raise
        if work is not None:
            work.settle()
        for entry in self.plan.outside_layers(before=False):
            self._write_entry(entry)
        self.result.stages = self.clock.snapshot()
        return self.result

    def _layers(self, first: int, hidden: torch.Tensor | None, fp_hidden: torch.Tensor | None, batch_size: int,
                work: WorkDir | None) -> None:
        calibrated = self.method.needs_calibration
        n_layers = self.plan.n_layers
        bar = tqdm(range(n_layers), desc="layers", unit="layer", disable=not self.progress, dynamic_ncols=True,
                   initial=first)
        for i in range(first, n_layers):
            entries = self.plan.layer(i)
            before = self.clock.snapshot()
            if calibrated:
                with self.clock("read"):
                    weights = {e.source: self.store.get(e.source) for e in entries if e.source is not None}
                codes, hidden, fp_hidden = self._calibrated_layer(i, weights, hidden, batch_size, fp_hidden)
                for e in entries:
                    if e.source is None:
                        self._write_entry(e)
                    else:
                        self._write(e.source, weights[e.source], codes.get(e.source))
                del weights, codes
            else:
                for e in entries:  # one tensor at a time: rtn needs nothing else of the layer
                    if e.source is None:
                        self._write_entry(e)
                    else:
                        self._rtn_tensor(e.source)
            if calibrated:  # not after rtn layers: see release_freed_memory
                release_freed_memory()
            if work is not None:
                with self.clock("write"):
                    self.output.flush()
                    work.save(ResumePoint(i + 1, self.output.position, self.output.n_written, hidden,
                                          self.result.reports, fp_hidden), sync=self.output.fsync)
            self.result.layer_stages.append({"layer": i, **self.clock.since(before)})
            bar.update()
        bar.close()

    def _quantizable(self, hf_name: str) -> bool:
        planned = self.plan[hf_name]
        return planned.type not in FLOAT_TYPES and len(planned.shape) == 2

    def _rtn_tensor(self, name: str) -> None:
        with self.clock("read"):
            W = self.store.get(name)
        q = None
        if self._quantizable(name):
            with self.clock("method"):
                q, report = self.method.quantize(name, None, W, get_format(self.plan[name].type))
            self.result.reports.append(report)
        self._write(name, W, q)

    def _calibrated_layer(self, i: int, weights: dict, hidden: torch.Tensor, batch_size: int,
                          fp_hidden: torch.Tensor | None = None):
        """Quantize layer i; returns its codes and the next layer's inputs: the quantized stream
        and, where the method follows it (fp_hidden given), the full-precision one."""
        clock = self.clock
        with clock("read"):
            layer = self.runner.build(i, weights)
        prefix = self.spec.layer_prefix.format(i=i)
        formats = {}
        groups = []
        for group in self.spec.sequential_groups:
            members = tuple(g for g in group if prefix + g + ".weight" in self.plan
                            and self._quantizable(prefix + g + ".weight"))
            if members:
                formats.update({rel: get_format(self.plan[prefix + rel + ".weight"].type) for rel in members})
                groups.append(Group(members, self.spec.smooth_from.get(group[0])))

        def feed(module, observe, inputs=None, copy=None):
            def timed(x):
                with clock("statistics"):
                    observe(x)

            with clock("forward"):
                self.runner.feed(layer if copy is None else copy, hidden if inputs is None else inputs, module, timed,
                                 batch_size, self.runner.kwargs_for(layer))

        work = LayerWork(index=i, prefix=prefix, layer=layer, inputs=hidden, kwargs=self.runner.kwargs_for(layer),
                         formats=formats, groups=groups, batch_size=batch_size, norm_shift=self.spec.norm_shift,
                         feed=feed, fp_inputs=fp_hidden, residual_before=self.spec.residual_before)
        if fp_hidden is not None:  # before the method rounds anything: the full-precision layer
            with clock("forward"):
                work.targets = fp_hidden = work.outputs(fp_hidden)
        with clock("method"):
            codes = self.method.quantize_layer(work)
        self.result.reports.extend(work.reports)
        with clock("forward"):
            out = work.outputs()
        state = layer.state_dict()  # a method may have rewritten non-quantized tensors (norms)
        for n in weights:  # to the CPU, where encode packs them, before the layer leaves the device
            weights[n] = state[n[len(prefix):]].detach().cpu()
        self.runner.free(i)
        return codes, out, fp_hidden
