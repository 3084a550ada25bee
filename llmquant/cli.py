"""The ``llmquant`` command. The only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import LlmquantError
from .methods import METHODS
from .policy import ALL_TYPES


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a Hugging Face model into a GGUF file")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id (org/name) or local folder; default: SmolLM2-135M-Instruct shipped offline")
    p.add_argument("--out", "-o", required=True, type=Path, help="output .gguf file")
    p.add_argument("--type", "-t", default="q4_0", help="ggml type or llama.cpp file type: " + ", ".join(t if "_k" not in t else t.upper() for t in ALL_TYPES)
                   + " (any case; default q4_0)")
    p.add_argument("--method", "-m", default="rtn", help=f"quantization method: {', '.join(METHODS)} (default rtn)")
    p.add_argument("--pure", action="store_true", help="every 2-D weight in --type (no llama.cpp per-tensor policy)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its work folder OUT.llmquant-work (same settings)")
    p.add_argument("--report", type=Path, default=None,
                   help="also write the full report as JSON (per-linear error vs RTN, time, method choices)")
    g = p.add_argument_group("calibration (gptq)")
    g.add_argument("--calib-text", type=Path, default=None, help="text file for calibration")
    g.add_argument("--calib-dataset", default=None, help="Hugging Face dataset name (needs hub access)")
    g.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    g.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for picking windows (default 0)")
    g = p.add_argument_group("gptq")
    g.add_argument("--damp", type=float, default=0.01, help="damping, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--act-order", action="store_true", help="process columns by decreasing diag(H)")
    g.add_argument("--no-scale-search", action="store_true", help="keep llama.cpp's scale rule per block")
    g.add_argument("--awq-grid", type=int, default=20, help="awq, awq+gptq: alpha grid points in [0, 1) (default 20)")


def _run_quantize(args) -> int:
    from .api import quantize
    from .calibration import CalibrationConfig

    calib = CalibrationConfig(samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed,
                              text_file=args.calib_text, dataset=args.calib_dataset)
    options = {}
    if args.method in ("gptq", "awq+gptq"):
        options = {"damp": args.damp, "act_order": args.act_order, "scale_search": not args.no_scale_search}
    if args.method in ("awq", "awq+gptq"):
        options["n_grid"] = args.awq_grid
    report = quantize(args.model, args.out, type=args.type, method=args.method, pure=args.pure,
                      calibration=calib, method_options=options, threads=args.threads, resume=args.resume,
                      progress=not args.quiet and sys.stderr.isatty())  # no bar in logs and pipes
    print(report.summary())
    if args.report:
        import json

        args.report.write_text(json.dumps(report.to_dict(), indent=1, default=str))
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="run a GGUF file in llama.cpp and print a completion")
    p.add_argument("file", type=Path)
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="apply the file's chat template")
    p.add_argument("--threads", type=int, default=2)


def _run_generate(args) -> int:
    from .generate import generate

    print(generate(args.file, args.prompt, max_tokens=args.max_tokens, chat=args.chat, threads=args.threads))
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="metadata and tensor table of a GGUF file")
    p.add_argument("file", type=Path)


def _run_inspect(args) -> int:
    from .inspect_gguf import describe

    print(describe(args.file))
    return 0


def _add_perplexity(sub) -> None:
    from .eval.command import add_arguments

    p = sub.add_parser("perplexity", help="perplexity (and KL-divergence vs a reference) in llama.cpp")
    add_arguments(p)


def _run_perplexity(args) -> int:
    from .eval.command import run

    return run(args)


COMMANDS = {
    "quantize": (_add_quantize, _run_quantize),
    "generate": (_add_generate, _run_generate),
    "inspect": (_add_inspect, _run_inspect),
    "perplexity": (_add_perplexity, _run_perplexity),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmquant", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llmquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return COMMANDS[args.command][1](args)
    except LlmquantError as exc:
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        from .export.gguf_file import ResumableError

        if isinstance(exc, ResumableError):  # disk full, out of memory: fix that, then continue
            text += _resume_hint(args)
        print(f"error: {text or type(exc).__name__}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"interrupted; no output file was written{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    """How to continue, when the interrupted run had finished layers to keep."""
    from .workdir import STATE, work_dir_for

    out = getattr(args, "out", None)
    if out is None or not (work_dir_for(out) / STATE).is_file():
        return ""
    return f"; the finished layers are kept in {work_dir_for(out)}: run again with --resume to continue"


if __name__ == "__main__":
    sys.exit(main())
