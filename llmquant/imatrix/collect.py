"""Streamed importance statistics: the sum of x² per input column of every linear, layer by layer.

What llama-imatrix collects (``tools/imatrix/imatrix.cpp``,
``IMatrixCollector::collect_imatrix`` and ``compute_imatrix``), carried over:

- every matrix product whose weight is a decoder-layer tensor (``blk.*``);
  the output head only with ``--process-output`` and only when it is a
  tensor of its own (``output.weight``: a tied head multiplies by
  ``token_embd.weight``, which is never collected). Weights that read the
  same input (q, k and v; gate and up) each get their own entry with the
  same values.
- every token of every chunk, in full precision, summed per column, counted
  once per token (``counts += rows``);
- each chunk's first token replaced by BOS when the vocabulary adds BOS.

Here one real decoder layer at a time runs on the calibration windows
(``LayerRunner``), forward pre-hooks on its linears add up x², and its
output is the next layer's input: memory is one layer plus the activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..export.arch import ArchSpec
from ..loading.layers import LayerRunner
from ..loading.weights import WeightStore
from ..plan import TensorPlan
from .file import ImatrixEntry

# Embedding rows are gathered 4M float32 values (16 MiB) at a time, never the whole table.
ROW_CHUNK_ELEMENTS = 1 << 22


@dataclass
class _Sum:
    """Running statistics of one weight: sum2 float64 [ci], count tokens."""

    sum2: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        """x [..., ci]: every row is one token."""
        x = x.detach().reshape(-1, x.shape[-1])
        self.sum2 += (x * x).sum(0, dtype=torch.float64)
        self.count += x.shape[0]


def first_token_bos(tokens: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """tokens [n, seqlen] with each window's first token replaced by ``bos_id`` (None: unchanged).

    llama-imatrix puts BOS at the start of each chunk when the vocabulary adds
    one, in place of the chunk's first text token.
    """
    if bos_id is None:
        return tokens
    out = tokens.clone()
    out[:, 0] = bos_id
    return out


def embedding_rows(store: WeightStore, name: str, tokens: torch.Tensor) -> torch.Tensor:
    """The embedding rows of ``tokens`` [n, seqlen] -> float32 [n, seqlen, hidden], read by row chunks."""
    rows, width = store.shape(name)
    step = max(1, ROW_CHUNK_ELEMENTS // width)
    hidden = torch.empty((*tokens.shape, width), dtype=torch.float32)
    for start in range(0, rows, step):
        W = store.get_rows(name, start, min(start + step, rows))  # [chunk, hidden]
        hit = (tokens >= start) & (tokens < start + W.shape[0])
        hidden[hit] = W[tokens[hit] - start]
    return hidden


def _hook_linears(layer: nn.Module, prefix: str, plan: TensorPlan, sums: dict[str, _Sum]) -> list:
    """Pre-hooks adding each planned linear's input into ``sums`` under its GGUF name; the handles."""
    handles = []
    for rel, module in layer.named_modules():
        weight = f"{prefix}{rel}.weight"
        if not isinstance(module, nn.Linear) or weight not in plan:
            continue
        acc = sums.setdefault(plan[weight].name, _Sum(torch.zeros(module.in_features, dtype=torch.float64)))
        handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    return handles


@torch.no_grad()
def collect_sums(model_dir, spec: ArchSpec, config: dict, store: WeightStore, plan: TensorPlan,
                 tokens: torch.Tensor, *, batch_size: int = 8, process_output: bool = False,
                 progress: bool = True) -> dict[str, ImatrixEntry]:
    """Statistics of every linear the model runs on ``tokens`` [n, seqlen]: GGUF name -> entry.

    tokens are the windows exactly as the model sees them (BOS already in place).
    """
    hidden = embedding_rows(store, spec.embed, tokens)
    if spec.embed_scale is not None:  # what the model feeds layer 0 (Gemma)
        hidden *= torch.tensor(spec.embed_scale(config), dtype=torch.float32)
    runner = LayerRunner(model_dir, store, spec.layer_prefix)
    runner.capture_kwargs(hidden[:batch_size])
    sums: dict[str, _Sum] = {}
    for i in tqdm(range(plan.n_layers), desc="imatrix", unit="layer", disable=not progress, dynamic_ncols=True):
        weights = {e.source: store.get(e.source) for e in plan.layer(i) if e.source is not None}
        layer = runner.build(i, weights)
        handles = _hook_linears(layer, spec.layer_prefix.format(i=i), plan, sums)
        try:
            for start in range(0, hidden.shape[0], batch_size):  # in place: batches are independent
                hidden[start:start + batch_size] = runner.forward(layer, hidden[start:start + batch_size])
        finally:
            for h in handles:
                h.remove()
            del weights
            runner.free(i)
    if process_output and spec.head in plan:  # only a head of its own is output.weight
        norm = runner.decoder.norm
        norm.to_empty(device="cpu")
        norm.load_state_dict({"weight": store.get(spec.final_norm)})
        head = _Sum(torch.zeros(hidden.shape[-1], dtype=torch.float64))
        for batch in hidden.split(batch_size):
            head.add(norm(batch))
        norm.to("meta")
        sums[plan[spec.head].name] = head
    return {name: ImatrixEntry(s.sum2.to(torch.float32).numpy(), s.count) for name, s in sums.items()}
