"""Importance matrices in llama.cpp's format, computed one decoder layer at a time.

``compute_imatrix(model, out)`` writes the file ``llama-quantize --imatrix``
reads, with the statistics ``llama-imatrix`` would compute on the same token
windows, for a model of any size on disk (llama-imatrix loads it whole).
``read_imatrix(path, imatrix_columns(plan))`` reads such a file back (ours or
llama.cpp's) as the per-column importance llama-quantize derives from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..calibration import CalibrationConfig, calibration_files, calibration_tokens, config_sources
from ..errors import LlmquantError
from ..plan import TensorPlan
from .file import Imatrix, ImatrixEntry, ImatrixSource, read_imatrix, write_imatrix

__all__ = ["Imatrix", "ImatrixEntry", "ImatrixReport", "ImatrixSource", "compute_imatrix", "imatrix_columns",
           "read_imatrix", "write_imatrix"]


@dataclass(frozen=True)
class ImatrixReport:
    out: Path
    entries: int  # weights with statistics
    tokens: int  # tokens each entry saw
    chunk_count: int
    chunk_size: int
    seconds: float


def imatrix_columns(plan: TensorPlan) -> dict[str, int]:
    """GGUF name -> input width of every 2-D weight of the plan: what an imatrix for it may cover."""
    return {e.tensor.name: e.tensor.shape[1] for e in plan.entries if len(e.tensor.shape) == 2}


def vocab_bos(model_dir: Path) -> int | None:
    """The BOS id if the tokenizer adds one (then llama.cpp's vocabulary adds it too), else None."""
    from transformers import AutoTokenizer

    from ..quiet import quiet_transformers

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id
    return bos if bos is not None and ids and ids[0] == bos else None


def compute_imatrix(model: str | Path | None, out: str | Path, *, calibration: CalibrationConfig | None = None,
                    process_output: bool = False, legacy: bool = False, progress: bool = True) -> ImatrixReport:
    """Write the importance matrix of ``model`` over the calibration windows to ``out``.

    Each window is one llama-imatrix chunk (``imatrix.chunk_size`` = seqlen), so
    llama-imatrix on the same windows written back to back (``-c seqlen``) gives
    the same statistics. process_output: also the output head's input, as
    llama-imatrix's ``--process-output`` (llama-quantize uses it for an untied head).
    legacy: llama.cpp's older ``.dat`` format instead of GGUF.
    """
    from ..export.arch import get_arch
    from ..loading.source import read_config, resolve_model
    from ..loading.weights import WeightStore
    from ..paths import check_writable
    from ..plan import plan_tensors
    from ..policy import get_recipe
    from .collect import collect_sums, first_token_bos

    t0 = time.perf_counter()
    out = Path(out)
    calib = calibration or CalibrationConfig()
    model_dir = resolve_model(model)
    config = read_config(model_dir)
    spec = get_arch(config)
    spec.check_config(config)
    inputs = {f: "a calibration text" for f in calibration_files(calib)}
    check_writable(out, "imatrix output", model_dir=model_dir, inputs=inputs, hint=" such as model.imatrix.gguf")
    store = WeightStore(model_dir, spec.checkpoint_renames)
    plan = plan_tensors(spec, config, store, get_recipe("f32"), pure=True)  # the names and shapes, not the types
    tokens = first_token_bos(calibration_tokens(model_dir, calib, progress=progress), vocab_bos(model_dir))
    entries = collect_sums(model_dir, spec, config, store, plan, tokens, batch_size=calib.batch_size,
                           process_output=process_output, progress=progress)
    if not entries:
        raise LlmquantError(f"{model_dir}: no linear layer of the model ran; nothing to write")
    datasets = [Path(s.arg).name if s.kind == "file" else (s.arg if s.kind == "dataset" else
                f"llmquant-{s.kind}" if s.kind != "builtin" else "llmquant-default") for s in config_sources(calib)]
    n, seqlen = tokens.shape
    write_imatrix(out, entries, chunk_count=n, chunk_size=seqlen, datasets=datasets, arch=spec.gguf_name,
                  legacy=legacy)
    return ImatrixReport(out=out, entries=len(entries), tokens=n * seqlen, chunk_count=n, chunk_size=seqlen,
                         seconds=time.perf_counter() - t0)
