"""The public entry point: ``llmquant.quantize(model, out, ...)``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .calibration import CalibrationConfig, calibration_tokens
from .errors import LlmquantError
from .export.arch import ArchSpec, config_int, get_arch
from .export.gguf_file import GGUFOutput, PlannedTensor, ResumableError, check_output_path
from .export.metadata import add_metadata
from .export.tokenizer import check_tokenizer_files
from .loading.source import read_config, resolve_model
from .loading.weights import WeightStore
from .methods import METHODS, Method, make_method
from .pipeline import Pipeline
from .policy import ModelFacts, Recipe, choose_type, get_recipe
from .report import QuantReport, peak_rss_mib
from .workdir import WorkDir, fingerprint


def model_facts(spec: ArchSpec, config: dict) -> ModelFacts:
    """The model-level facts llama.cpp's recipes read (layer count, GQA ratio, its 70B type)."""
    n_layers = config_int(config, "num_hidden_layers")
    heads = config_int(config, "num_attention_heads")
    kv = config_int(config, "num_key_value_heads", heads)
    # llama.cpp: an 80-layer llama with grouped kv heads, or any 80-layer qwen2, is LLM_TYPE_70B
    is_70b = n_layers == 80 and (spec.gguf_name != "llama" or heads != kv)
    return ModelFacts(n_layers=n_layers, n_gqa=heads // kv if heads % kv == 0 else 1, is_70b=is_70b)


def plan_tensors(spec: ArchSpec, config: dict, store: WeightStore, recipe: Recipe, pure: bool) -> dict[str, PlannedTensor]:
    """Every output tensor in file order, keyed by its HF name, checked against the config."""
    n_layers = config_int(config, "num_hidden_layers")
    facts = model_facts(spec, config)
    vocab, hidden = config_int(config, "vocab_size"), config_int(config, "hidden_size")
    has_head = spec.head in store and not config.get("tie_word_embeddings", False)
    layer_shapes = spec.layer_shapes(config) if spec.layer_shapes else {}
    expected = {spec.final_norm: (hidden,), spec.head: (vocab, hidden)}
    names = [spec.embed]
    for i in range(n_layers):
        prefix = spec.layer_prefix.format(i=i)
        layer = spec.layer_names(i, store.__contains__)
        expected.update({n: layer_shapes[n[len(prefix):]] for n in layer if n[len(prefix):] in layer_shapes})
        names += layer
    names.append(spec.final_norm)
    if has_head:
        names.append(spec.head)
    for n in (spec.embed, spec.final_norm):
        if n not in store:
            raise LlmquantError(f"tensor {n} is missing from the checkpoint")
    if store.shape(spec.embed) != (vocab, hidden):
        raise LlmquantError(
            f"{spec.embed} has shape {list(store.shape(spec.embed))} but config.json says vocab_size={vocab}, hidden_size={hidden}"
        )
    if f"{spec.layer_prefix.format(i=n_layers)}{spec.layer_tensors[0]}" in store:
        raise LlmquantError(f"the checkpoint has more layers than num_hidden_layers={n_layers} in config.json")
    plan = {}
    for n in names:
        shape = store.shape(n)
        if n in expected and shape != expected[n]:
            raise LlmquantError(f"{n} has shape {list(shape)} but config.json implies {list(expected[n])}")
        is_head = n == spec.head or (n == spec.embed and not has_head)
        gguf_name = spec.gguf_tensor_name(n, n_layers)
        choice = choose_type(gguf_name, shape, recipe, facts, pure=pure, is_head=is_head)
        plan[n] = PlannedTensor(gguf_name, shape, choice.ggml_type, choice.note)
    return plan


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
) -> QuantReport:
    """Quantize a Hugging Face causal LM into a GGUF file that llama.cpp runs.

    model: hub id, local folder, or None for the default SmolLM2-135M-Instruct.
    type: a ggml type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_K … q6_K) or one
        of llama.cpp's file types (Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M), any case.
    method: rtn (byte-identical to llama.cpp's quantizer), gptq, or a Method object.
    pure: every 2-D weight in ``type`` (else llama.cpp's per-tensor policy).
    resume: continue the interrupted run whose work folder (``<out>.llmquant-work``)
        is beside ``out``; the result is byte-identical to an uninterrupted run.
    """
    t0 = time.perf_counter()
    recipe = get_recipe(type)
    type_ = recipe.name
    if isinstance(method, str) and method not in METHODS:
        raise LlmquantError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    model_dir = resolve_model(model)
    config = read_config(model_dir)
    spec = get_arch(config)
    check_tokenizer_files(model_dir)
    check_output_path(out, model_dir)
    store = WeightStore(model_dir)
    plan = plan_tensors(spec, config, store, recipe, pure)
    meth = method if isinstance(method, Method) else make_method(method, **(method_options or {}))
    calib = calibration or CalibrationConfig()
    tokens = runner = None
    if meth.needs_calibration:
        from .loading.layers import LayerRunner

        tokens = calibration_tokens(model_dir, calib)
        runner = LayerRunner(model_dir, store, spec.layer_prefix)
    work = WorkDir(out)
    settings = {"type": type_, "pure": pure, "method": meth.name, "method_options": meth.settings(),
                "calibration": dataclasses.asdict(calib) if meth.needs_calibration else None,
                "calibration_text": _text_digest(calib.text_file) if meth.needs_calibration else None,
                # LAPACK's Cholesky and torch's parallel sums add in an order set by the thread
                # count, which can flip a near-tied code: calibrated bytes are reproducible per count
                "torch_threads": torch.get_num_threads() if meth.needs_calibration else None}
    point = work.open(fingerprint(model_dir, store.files, settings), resume)
    try:
        with GGUFOutput(out, spec.gguf_name, tmp=work.partial) as output:
            add_metadata(output.writer, spec, config, model_dir, recipe, meth.name)
            output.declare(list(plan.values()), None if point is None else (point.offset, point.n_written))
            pipe = Pipeline(spec=spec, config=config, store=store, plan=plan, method=meth,
                            output=output, runner=runner, progress=progress)
            result = pipe.run(tokens, calib.batch_size, resume=point, work=work)
            output.commit()
    except (KeyboardInterrupt, ResumableError, MemoryError, RuntimeError) as exc:
        if work.resumable:
            work.release()  # the finished layers stay for --resume
        else:
            work.remove()
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
            raise ResumableError(f"out of memory while quantizing into {out}; free memory "
                                 "(or lower --calib-samples for calibrated methods)") from None
        raise
    except BaseException:
        work.remove()
        raise
    work.remove()
    return QuantReport(
        model=str(model or "SmolLM2-135M-Instruct (default)"),
        out=out,
        type=type_,
        method=meth.name,
        pure=pure,
        tensors=list(plan.values()),
        file_size=out.stat().st_size,
        seconds=time.perf_counter() - t0,
        peak_rss_mib=peak_rss_mib(),
        calibration_tokens=0 if tokens is None else tokens.numel(),
        linears=result.reports,
        checksum=output.checksum,
        resumed_at_layer=point.layers_done if point else None,
    )


def _text_digest(path: Path | None) -> str | None:
    import hashlib

    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()
