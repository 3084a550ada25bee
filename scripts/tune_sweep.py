"""Compare tuning settings on the first layers of a model, without writing or evaluating a whole file.

    python scripts/tune_sweep.py --layers 6 --type q4_0 --calib-samples 32 \\
        --methods awq+gptq,awq+gptq+tune@steps=100,awq+gptq+tune@target=layer

For each method (``METHOD@KEY=VALUE[@...]``, as scripts/benchmark.py takes
them) quantizes the first ``--layers`` decoder layers and prints, per layer,
the mean squared distance of the quantized stream's hidden states from the
full-precision model's own (both streams carried by the pipeline, whatever
the method): plain (``hidden``) and with each token over its mean square
(``normed``, as the next layer's norm sees it; the tune methods' ``loss``
option names the same two). ``--distance`` picks the one the table shows.
That distance after the last layer swept is the figure to compare: it is
what the rest of the model inherits. A stand-in for the
end-to-end KLD (scripts/benchmark.py) at a fraction of the cost, used to
choose the tune methods' defaults (docs/benchmarks.md, Tuning). Writes
sweep.json in --out-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmark import method_spec

import llmquant
from llmquant.errors import LlmquantError
from llmquant.methods import make_method
from llmquant.methods.tune import LOSSES, output_error, token_weights
from llmquant.options import check_method_options


class _Enough(Exception):
    """Raised after the last layer swept: the rest of the run is not needed."""


def sweep_method(model: str | None, spec: str, qtype: str, layers: int, calib: llmquant.CalibrationConfig,
                 threads: int) -> list[dict]:
    """Per layer: the method's tuning summary (if any), the distance from the full-precision stream, seconds."""
    name, options = method_spec(spec)
    method = make_method(name, **options)
    if not method.needs_calibration:
        raise LlmquantError(f"--methods {spec}: only calibrated methods have layers to compare")
    quantize_layer = method.quantize_layer
    rows: list[dict] = []

    def watched(work):
        t0 = time.perf_counter()
        codes = quantize_layer(work)
        out = work.outputs()
        err = {f"{loss}_vs_model": float(output_error(out, work.targets, token_weights(work.targets, loss)))
               for loss in LOSSES}
        tune = (work.reports[0].extra.get("tune", {}) if work.reports else {})
        rows.append({"layer": work.index, **err, "seconds": time.perf_counter() - t0, **tune})
        print(f"[sweep] {spec} layer {work.index}: " + ", ".join(f"{k} {v:.6g}" for k, v in err.items()), flush=True)
        if work.index + 1 >= layers:
            raise _Enough
        return codes

    method.quantize_layer = watched
    # carry the full-precision stream for any method (a subclass: a tune method's needs_fp_stream is a property)
    method.__class__ = type(type(method).__name__, (type(method),), {"needs_fp_stream": True})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            llmquant.quantize(model, Path(tmp) / "sweep.gguf", type=qtype, method=method, calibration=calib,
                              threads=threads, progress=False)
        except _Enough:
            pass
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub id or HF folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--type", default="q4_0", help="ggml type or recipe (q4_0)")
    p.add_argument("--methods", required=True, help="comma-separated METHOD@KEY=VALUE[@...]")
    p.add_argument("--layers", type=int, default=6, help="decoder layers to sweep (6)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (32)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (512)")
    p.add_argument("--distance", choices=LOSSES, default="normed",
                   help="the distance the table shows: normed (each token over its mean square) or hidden (default: normed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-sweep"), help="where sweep.json goes (bench-sweep)")
    args = p.parse_args(argv)
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    try:
        if args.layers < 1:
            raise LlmquantError(f"--layers must be at least 1, got {args.layers}")
        for spec in specs:
            name, options = method_spec(spec)
            check_method_options(name, type(make_method(name)), options)
        # the built-in text, not sampled sequences: what scripts/benchmark.py calibrates on
        calib = llmquant.CalibrationConfig(samples=args.calib_samples, seqlen=args.calib_seqlen, source="builtin")
        results = {spec: sweep_method(args.model, spec, args.type, args.layers, calib, args.threads) for spec in specs}
    except LlmquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sweep.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results}, indent=1))
    width = max(len(s) for s in specs)
    print(f"\n{args.distance} distance from the full-precision model after each layer")
    print(f"| {'method':<{width}} | " + " | ".join(f"layer {i}" for i in range(args.layers)) + " | seconds |")
    print(f"|{'-' * (width + 2)}|" + "---|" * (args.layers + 1))
    for spec, rows in results.items():
        print(f"| {spec:<{width}} | " + " | ".join(f"{r[args.distance + '_vs_model']:.4g}" for r in rows)
              + f" | {sum(r['seconds'] for r in rows):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
