"""The ``llmquant perplexity`` subcommand.

``add_arguments``/``run`` plug into the lead's cli.py; ``main`` makes the
module runnable on its own (``python -m llmquant.eval.command``) with the same
error convention: a user error is one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from ..errors import LlmquantError
from ..text import load_text
from .perplexity import PerplexityResult, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the subcommand's options on ``parser``."""
    parser.add_argument("model", nargs="?", type=Path,
                        help="GGUF file to evaluate; with --hf an HF model folder (default: the built-in model)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 text file (default: built-in held-out text)")
    src.add_argument("--dataset", metavar="NAME", help="Hugging Face dataset, e.g. wikitext-2-raw-v1 (needs `datasets`)")
    parser.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--windows", type=int, metavar="N", help="evaluate only the first N windows (default: all)")
    parser.add_argument("--ref", type=Path, metavar="REF",
                        help="reference GGUF file (or HF folder) for KL-divergence and top-1 agreement")
    parser.add_argument("--hf", action="store_true", help="MODEL is a Hugging Face folder, run in torch float32")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")


def _model_path(args: argparse.Namespace) -> Path:
    """MODEL as given, or the built-in HF model when --hf has no MODEL."""
    if args.model is not None:
        return args.model
    if not args.hf:
        raise LlmquantError("MODEL is required: a GGUF file (or pass --hf to evaluate the built-in HF model)")
    from ..loading.default_model import default_model_dir

    return default_model_dir()


def format_table(result: PerplexityResult, model: Path) -> str:
    """A short human-readable summary, one metric per line."""
    r = result
    lines = [
        f"model            {model}",
        f"perplexity       {r.ppl:.4f} +/- {r.ppl_stderr:.4f}",
        f"tokens scored    {r.tokens} ({r.windows} windows of {r.ctx})",
        f"size             {r.file_size / 2**20:.1f} MiB, {r.bits_per_weight:.3f} bits/weight",
    ]
    if r.kld is not None:
        lines += [
            f"reference ppl    {r.ref_ppl:.4f}",
            f"KLD mean         {r.kld:.6f}",
            f"KLD 99th pct     {r.kld_p99:.6f}",
            f"top-1 agreement  {100 * r.top1:.2f}%",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print; LlmquantError propagates to the caller for the exit code."""
    model = _model_path(args)
    text = load_text(args.text, args.dataset, "eval")
    result = evaluate(model, text=text, ctx=args.ctx, windows=args.windows, ref=args.ref,
                      threads=args.threads, hf=args.hf, progress=getattr(args, "progress", True))
    if args.json:
        payload = {**result.to_dict(), "model": str(model), "ref": str(args.ref) if args.ref else None, "hf": args.hf}
        print(json.dumps(_finite_or_null(payload), allow_nan=False))  # strict JSON: no NaN, no Infinity
    else:
        print(format_table(result, model))
    return 0


def _finite_or_null(payload: dict) -> dict:
    """A value that is not a finite number (bits per weight of an empty folder, ...) is unknown: null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in payload.items()}


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: parse, run, turn LlmquantError into exit code 2."""
    parser = argparse.ArgumentParser(prog="llmquant perplexity",
                                     description="Perplexity and KL-divergence, measured like llama-perplexity.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # as cli.py does
    try:
        return run(args)
    except LlmquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
