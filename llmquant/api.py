"""The public entry point: ``llmquant.quantize(model, out, ...)``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .calibration import CalibrationConfig, calibration_files, calibration_tokens, source_spec
from .errors import LlmquantError
from .export.arch import get_arch
from .export.gguf_file import GGUFOutput, ResumableError
from .export.metadata import add_metadata
from .export.tokenizer import check_tokenizer_files
from .gc_pause import paused_gc
from .loading.source import read_config, resolve_model
from .loading.weights import WeightStore
from .methods import METHODS, Method, make_method, method_registry
from .options import check_calibration, check_method_options, check_value, resolve_device
from .paths import check_run_paths, write_atomic
from .pipeline import Pipeline
from .plan import plan_tensors
from .policy import FLOAT_TYPES, get_recipe
from .report import QuantReport, peak_rss_mib
from .workdir import WorkDir, fingerprint

if TYPE_CHECKING:
    from .imatrix import Imatrix


def _check_settings(method: str | Method, method_options: dict | None, calibration: CalibrationConfig | None,
                    threads: int | None) -> str | Method:
    """Every option, before any work: the same checks (and messages) for the CLI and the API.

    Returns the method, its name lower-cased (``RTN`` is ``rtn``, as ``Q8_0`` is ``q8_0``).
    """
    if isinstance(method, str):
        method = method.lower()
        if method not in METHODS:
            raise LlmquantError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        cls = method_registry()[method]
        check_method_options(method, cls, method_options or {})
        check_calibration(method, cls.needs_calibration, calibration)
    else:
        if method_options:
            raise LlmquantError("method_options apply to a method given by name, not to a Method object")
        check_calibration(method.name, method.needs_calibration, calibration)
    if threads is not None:
        check_value("threads", threads)
    return method


def quantize(
    model: str | Path | None,
    out: str | Path,
    *,
    type: str = "q4_0",  # noqa: A002 - mirrors the CLI's --type
    method: str | Method = "rtn",
    pure: bool = False,
    calibration: CalibrationConfig | None = None,
    method_options: dict | None = None,
    threads: int | None = None,
    progress: bool = True,
    resume: bool = False,
    report: str | Path | None = None,
    device: str = "auto",
    imatrix: str | Path | None = None,
    card: bool = False,
) -> QuantReport:
    """Quantize a Hugging Face causal LM into a GGUF file that llama.cpp runs.

    model: hub id, local folder, or None for the default SmolLM2-135M-Instruct.
    type: a ggml type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_K … q6_K) or one
        of llama.cpp's file types (Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M), any case.
    method: rtn (byte-identical to llama.cpp's quantizer), gptq, or a Method object.
    pure: every 2-D weight in ``type`` (else llama.cpp's per-tensor policy).
    resume: continue the interrupted run whose work folder (``<out>.llmquant-work``)
        is beside ``out``; the result is byte-identical to an uninterrupted run.
    report: also write the report as JSON there (checked before any work like ``out``,
        written whole after the output).
    device: where a calibrated method computes (``cpu``, ``cuda``, or ``auto``: the GPU where
        torch sees one); one decoder layer at a time is on it. rtn ignores it (always the CPU).
        Not part of the resume fingerprint: a run that ran out of GPU memory may continue on the CPU.
    imatrix: an importance matrix file (``llmquant imatrix`` or ``llama-imatrix``, GGUF or legacy
        .dat) for ``method="rtn"``: every search weighted by it and llama.cpp's plan with an
        imatrix, byte-identical with ``llama-quantize --imatrix``.
    card: also write a model card beside ``out`` (``model-q4_0.gguf`` -> ``model-q4_0.md``): recipe,
        method and options, tensors per type, bits per weight, checksum (``llmquant compare --card``
        adds the measurements).
    """
    t0 = time.perf_counter()
    recipe = get_recipe(type)
    type_ = recipe.name
    method = _check_settings(method, method_options, calibration, threads)
    if imatrix is not None and (method.needs_calibration if isinstance(method, Method)
                                else method_registry()[method].needs_calibration):
        raise LlmquantError(f"--imatrix weights rtn's searches; {getattr(method, 'name', method)} weights its own by "
                            "its calibration (diag(H) of the same activations): use --method rtn with --imatrix")
    device = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    model_dir = resolve_model(model)
    config = read_config(model_dir)
    spec = get_arch(config)
    spec.check_config(config)
    with paused_gc():  # a dict per token, a string per merge
        tokenizer_json = check_tokenizer_files(model_dir)
    calib = calibration or CalibrationConfig()
    from .card import card_path

    text_label = "the calibration text (--calib-text)" if calib.text_file else "a calibration text (--calib-source)"
    check_run_paths(out, model_dir, report=None if report is None else Path(report),
                    card=card_path(out) if card else None,
                    inputs={**{f: text_label for f in calibration_files(calib)},
                            None if imatrix is None else Path(imatrix): "the importance matrix (--imatrix)"})
    store = WeightStore(model_dir, spec.checkpoint_renames)
    plan = plan_tensors(spec, config, store, recipe, pure, has_imatrix=imatrix is not None)
    meth = method if isinstance(method, Method) else make_method(method, **(method_options or {}))
    importance, imatrix_read = {}, None
    if imatrix is not None:
        from .imatrix import imatrix_columns, read_imatrix

        imatrix_read = read_imatrix(imatrix, imatrix_columns(plan))
        importance = {name: values for name, (values, _) in imatrix_read.items()}
        meth.use_imatrix({e.source: importance[e.tensor.name] for e in plan.entries
                          if e.source is not None and e.tensor.name in importance})
    tokens = runner = None
    if meth.needs_calibration:
        from .loading.layers import LayerRunner

        tokenizer_json = None  # not held across calibration (hundreds of MB at a 262k vocabulary): parsed again

        tokens = calibration_tokens(model_dir, calib, progress=progress)
        runner = LayerRunner(model_dir, store, spec.layer_prefix, device=device)
    work = WorkDir(out)
    settings = {"type": type_, "pure": pure, "method": meth.name, "method_options": meth.settings(),
                "calibration": {**dataclasses.asdict(calib), "source": source_spec(calib)}
                if meth.needs_calibration else None,
                "calibration_text": ([_text_digest(f) for f in calibration_files(calib)] or None)
                if meth.needs_calibration else None,
                # LAPACK's Cholesky and torch's parallel sums add in an order set by the thread
                # count, which can flip a near-tied code: calibrated bytes are reproducible per count
                "torch_threads": torch.get_num_threads() if meth.needs_calibration else None,
                "imatrix": _text_digest(None if imatrix is None else Path(imatrix))}
    point = work.open(fingerprint(model_dir, store.files, settings), resume)
    try:
        with GGUFOutput(out, spec.gguf_name, tmp=work.partial) as output:
            with paused_gc():  # the tokenizer once more (gguf's SpecialVocab), and every token written
                add_metadata(output.writer, spec, config, model_dir, recipe, meth.name, tokenizer_json)
                tokenizer_json = None  # a 262k vocabulary's is hundreds of MB: not held across the layers
                if imatrix_read is not None:
                    _add_imatrix_metadata(output.writer, Path(imatrix), imatrix_read)
                output.declare(plan.tensors, None if point is None else (point.offset, point.n_written))
            pipe = Pipeline(spec=spec, config=config, store=store, plan=plan, method=meth,
                            output=output, runner=runner, progress=progress, importance=importance)
            result = pipe.run(tokens, calib.batch_size, resume=point, work=work)
            with paused_gc():  # the written metadata read back
                output.commit()
    except (KeyboardInterrupt, ResumableError, MemoryError, RuntimeError) as exc:
        if work.resumable:
            work.release()  # the finished layers stay for --resume
        else:
            work.remove()
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise ResumableError(f"out of GPU memory while quantizing into {out}; free GPU memory, lower "
                                 "--calib-samples, or continue on the CPU with --device cpu") from None
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
            raise ResumableError(f"out of memory while quantizing into {out}; free memory "
                                 "(or lower --calib-samples for calibrated methods)") from None
        raise
    except BaseException:
        work.remove()
        raise
    work.remove()
    summary = QuantReport(
        model=str(model or "SmolLM2-135M-Instruct (default)"),
        out=out,
        type=type_,
        method=meth.name,
        device=device if meth.needs_calibration else "cpu",
        pure=pure,
        tensors=plan.tensors,
        file_size=out.stat().st_size,
        seconds=time.perf_counter() - t0,
        peak_rss_mib=peak_rss_mib(),
        calibration_tokens=0 if tokens is None else tokens.numel(),
        linears=result.reports,
        checksum=output.checksum,
        resumed_at_layer=point.layers_done if point else None,
        imatrix=None if imatrix is None else str(imatrix),
        card=str(card_path(out)) if card else None,
        stages=result.stages,
        layer_stages=result.layer_stages,
        imatrix_tensors=sum(e.tensor.name in importance and e.tensor.type not in (*FLOAT_TYPES, "q8_0")
                            for e in plan.entries),  # q8_0 ignores an imatrix, as in llama.cpp
    )
    if report is not None:
        _write_report(Path(report), summary)
    if card:
        _write_card(summary, settings)
    return summary


def _write_card(result: QuantReport, settings: dict) -> None:
    from .card import card_path, quantize_section, update_card

    path = card_path(result.out)
    title = f"{Path(result.model.removesuffix(' (default)')).name} {result.type.upper()}"
    try:
        update_card(path, "quantize", quantize_section(result, settings), title)
    except OSError as exc:
        raise LlmquantError(f"wrote {result.out}, but cannot write the model card {path}: {exc.strerror or exc}") from None


def _write_report(path: Path, result: QuantReport) -> None:
    import json

    try:
        write_atomic(path, json.dumps(result.to_dict(), indent=1, default=str).encode())
    except OSError as exc:
        raise LlmquantError(f"wrote {result.out}, but cannot write the report {path}: {exc.strerror or exc}") from None


def _add_imatrix_metadata(writer, path: Path, imatrix: Imatrix) -> None:
    """The keys llama-quantize records for ``--imatrix`` (its values cut at 127 bytes, as it does)."""
    source = imatrix.source
    writer.add_string("quantize.imatrix.file", str(path)[:127])
    if source.datasets:
        writer.add_string("quantize.imatrix.dataset", source.datasets[0][:127])
    writer.add_int32("quantize.imatrix.entries_count", len(imatrix))
    if source.chunk_count > 0:
        writer.add_int32("quantize.imatrix.chunks_count", source.chunk_count)


def _text_digest(path: Path | None) -> str | None:
    import hashlib

    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()
