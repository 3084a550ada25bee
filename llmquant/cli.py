"""The ``llmquant`` command. The only place that turns errors into exit codes.

0 success; 2 a user error (one ``error: ...`` line); 130 Ctrl-C, 143 SIGTERM
(both keep finished layers for ``--resume``); 141 stdout closed early (``| head``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
from .errors import LlmquantError
from .methods import METHODS
from .options import DEVICES
from .policy import ALL_TYPES


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a Hugging Face model into a GGUF file")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id (org/name), local folder, or a built-in model (gemma3-270m); "
                        "default: SmolLM2-135M-Instruct shipped offline")
    p.add_argument("--out", "-o", required=True, type=Path, help="output .gguf file")
    p.add_argument("--type", "-t", default="q4_0", help="ggml type or llama.cpp file type: " + ", ".join(t if "_k" not in t else t.upper() for t in ALL_TYPES)
                   + " (any case; default q4_0)")
    p.add_argument("--method", "-m", default="rtn", help=f"quantization method: {', '.join(METHODS)} (default rtn)")
    p.add_argument("--pure", action="store_true", help="every 2-D weight in --type (no llama.cpp per-tensor policy)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", type=str.lower, choices=DEVICES, default="auto",
                   help="where calibrated methods compute, one layer at a time: cuda, cpu, or auto "
                        "(cuda where torch sees a GPU; default); rtn always runs on the CPU")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its work folder OUT.llmquant-work (same settings)")
    p.add_argument("--report", type=Path, default=None,
                   help="also write the full report as JSON (per-linear error vs RTN, time, method choices)")
    p.add_argument("--card", action="store_true",
                   help="also write a model card beside OUT (OUT without .gguf, plus .md): recipe, method, options, "
                        "tensor types, bits per weight, checksum")
    p.add_argument("--imatrix", type=Path, default=None,
                   help="rtn: weight every search by this importance matrix (llmquant imatrix or llama-imatrix, "
                        "GGUF or .dat), as llama-quantize --imatrix does")
    _add_calibration_flags(p.add_argument_group("calibration (every method but rtn)"))
    g = p.add_argument_group("method options (each only where --method takes it)")
    g.add_argument("--damp", type=float, default=None, help="gptq, awq+gptq: damping, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--act-order", action="store_true", help="gptq, awq+gptq: process columns by decreasing diag(H)")
    g.add_argument("--no-scale-search", action="store_true",
                   help="gptq, awq+gptq: keep llama.cpp's scale rule per block")
    g.add_argument("--awq-grid", type=int, default=None, help="awq, awq+gptq: alpha grid points in [0, 1) (default 20)")
    g.add_argument("--awq-alpha-by", default=None, help="awq+gptq: how α is settled: gptq (the least output error "
                   "GPTQ reaches among α = 0, half the RTN search's α, and that α; default) or rtn (the RTN search's α)")
    g.add_argument("--gptq-target", default=None, help="gptq, awq+gptq: what each linear's output is fitted to: layer "
                   "(its own output on its quantized inputs), model (the full-precision model's output there), or stream "
                   "(model, and o_proj/down_proj also fit the full-precision residual stream after their add; default)")
    g.add_argument("--tune-steps", type=int, default=None, help="tune methods: steps per layer (default 200)")
    g.add_argument("--tune-lr", type=float, default=None, help="tune methods: Adam step of the rounding offsets, in codes (default 1e-2)")
    g.add_argument("--tune-batch", type=int, default=None, help="tune methods: calibration sequences per step (default 1)")
    g.add_argument("--tune-target", default=None, help="tune methods: what each layer's output is fitted to: layer (the "
                   "full-precision layer on the quantized inputs) or model (the full-precision model's output there; default)")
    g.add_argument("--tune-loss", default=None, help="tune methods: normed (each token's squared error over its mean "
                   "square, as the next norm sees it; default) or hidden (the plain squared error of each layer's output)")


def _add_calibration_flags(g) -> None:
    g.add_argument("--calib-text", type=Path, default=None, help="text file for calibration")
    g.add_argument("--calib-dataset", default=None, help="Hugging Face dataset name (needs hub access)")
    g.add_argument("--calib-source", default=None,
                   help="where calibration windows come from: generated (default: sampled from the model in llama.cpp), "
                        "builtin (the built-in text), "
                        "chat (the model's replies under its chat template), file:PATH, dataset:NAME, or a weighted "
                        "mix such as generated:0.5,builtin:0.5")
    g.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    g.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default 512)")
    g.add_argument("--seed", type=int, default=None, help="seed for picking windows (default 0)")


# method option (constructor keyword) -> (argparse dest, value from the typed flag); only typed flags are passed
_METHOD_FLAGS = {"damp": ("damp", None), "act_order": ("act_order", None),
                 "scale_search": ("no_scale_search", lambda v: not v), "n_grid": ("awq_grid", None),
                 "steps": ("tune_steps", None), "lr": ("tune_lr", None), "tune_batch": ("tune_batch", None),
                 "target": ("tune_target", None), "loss": ("tune_loss", None), "gptq_target": ("gptq_target", None),
                 "alpha_by": ("awq_alpha_by", None)}
_CALIB_FLAGS = {"samples": "calib_samples", "seqlen": "calib_seqlen", "seed": "seed",
                "text_file": "calib_text", "dataset": "calib_dataset",
                "source": "calib_source"}


def _typed(value) -> bool:
    return value is not None and value is not False


def _calibration(args):
    from .calibration import CalibrationConfig

    given = {k: getattr(args, dest) for k, dest in _CALIB_FLAGS.items() if _typed(getattr(args, dest))}
    return CalibrationConfig(**given) if given else None


def _run_quantize(args) -> int:
    from .api import quantize

    calib = _calibration(args)
    options = {k: (conv or (lambda v: v))(getattr(args, dest))
               for k, (dest, conv) in _METHOD_FLAGS.items() if _typed(getattr(args, dest))}
    report = quantize(args.model, args.out, type=args.type, method=args.method, pure=args.pure,
                      calibration=calib, method_options=options, threads=args.threads, resume=args.resume,
                      report=args.report, device=args.device, imatrix=args.imatrix, card=args.card, progress=not args.quiet and sys.stderr.isatty())  # no bar in logs and pipes
    print(report.summary())
    return 0


def _add_imatrix(sub) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix for llama-quantize --imatrix, one layer at a time")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder, or a built-in model; default: SmolLM2-135M-Instruct")
    p.add_argument("--out", "-o", required=True, type=Path, help="output file (e.g. model.imatrix.gguf)")
    p.add_argument("--legacy", action="store_true", help="llama.cpp's older .dat format instead of GGUF")
    p.add_argument("--process-output", action="store_true",
                   help="also the output head's input (as llama-imatrix --process-output)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_calibration_flags(p.add_argument_group("calibration text (each window is one llama-imatrix chunk)"))


def _run_imatrix(args) -> int:
    from .imatrix import compute_imatrix
    from .options import check_calibration, check_value

    calib = _calibration(args)
    check_calibration("imatrix", True, calib)
    if args.threads is not None:
        import torch

        check_value("threads", args.threads)
        torch.set_num_threads(args.threads)
    r = compute_imatrix(args.model, args.out, calibration=calib, process_output=args.process_output,
                        legacy=args.legacy, progress=not args.quiet and sys.stderr.isatty())
    print(f"wrote {r.out}\n  {r.entries} weights, {r.chunk_count} chunks of {r.chunk_size} tokens "
          f"({r.tokens} tokens), {r.seconds:.1f} s\n  use it: llmquant quantize ... --imatrix {r.out}  "
          f"(or llama-quantize --imatrix {r.out} ...)")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="a quantized file beside llama.cpp's own quantizer of the same type: KLD, "
                                       "perplexity, top-1, size, a sample completion")
    p.add_argument("file", type=Path, help="GGUF file written by llmquant quantize")
    p.add_argument("--model", default=None,
                   help="the HF model FILE was quantized from (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--against", default="llama.cpp",
                   help="comma-separated: llama.cpp (llama-quantize, default), llama.cpp+imatrix (llama-quantize "
                        "--imatrix with an importance matrix of the calibration windows)")
    p.add_argument("--ctx", type=int, default=512, help="evaluation window in tokens (default 512)")
    p.add_argument("--windows", type=int, default=8, help="held-out windows to score (default 8)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--prompt", default="The capital of France is", help="prompt every file completes")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per completion (default 24)")
    p.add_argument("--text", type=Path, default=None, help="held-out text file (default: the built-in evaluation part)")
    p.add_argument("--calib-samples", type=int, default=32, help="llama.cpp+imatrix: calibration windows of 512 (32)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the f32 reference and llama.cpp's files, reused (default FILE.compare)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--card", action="store_true",
                   help="add the table and a KLD-vs-size plot (FILE.kld.png) to FILE's model card (FILE.md)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def _run_compare(args) -> int:
    import json

    from .eval.compare import compare
    from .text import load_text

    text = None if args.text is None else load_text(args.text, None, "eval")
    r = compare(args.file, model=args.model, against=tuple(a.strip() for a in args.against.split(",") if a.strip()),
                ctx=args.ctx, windows=args.windows, threads=args.threads, prompt=args.prompt,
                max_tokens=args.max_tokens, text=text, work=args.work, calib_samples=args.calib_samples,
                card=args.card, progress=not args.quiet and sys.stderr.isatty())
    print(json.dumps(r.to_dict()) if args.json else r.table())
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="run a GGUF file in llama.cpp and print a completion")
    p.add_argument("file", type=Path, help="GGUF file")
    p.add_argument("prompt", help="text to complete (with --chat: the user's message)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--chat", action="store_true", help="apply the file's chat template")
    p.add_argument("--ctx", type=int, default=512, help="context length in tokens, prompt included (default 512)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")


def _run_generate(args) -> int:
    from .generate import generate

    print(generate(args.file, args.prompt, max_tokens=args.max_tokens, chat=args.chat, threads=args.threads,
                   ctx=args.ctx))
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="metadata and tensor table of a GGUF file")
    p.add_argument("file", type=Path, help="GGUF file")


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
    "imatrix": (_add_imatrix, _run_imatrix),
    "compare": (_add_compare, _run_compare),
    "generate": (_add_generate, _run_generate),
    "inspect": (_add_inspect, _run_inspect),
    "perplexity": (_add_perplexity, _run_perplexity),
}


DESCRIPTION = """\
Quantize a Hugging Face causal language model into a GGUF file that llama.cpp runs,
with llama.cpp's own rounding (rtn) or GPTQ/AWQ choosing the codes on llama.cpp's
block grids; then run, inspect and measure the file."""

EPILOG = """\
examples:
  llmquant quantize --type q4_0 --out smollm2-q4_0.gguf
  llmquant quantize ./my-llama --type Q4_K_M --method awq+gptq --out my-llama-Q4_K_M.gguf
  llmquant imatrix ./my-llama --out my-llama.imatrix.gguf
  llmquant quantize ./my-llama --type Q4_K_M --imatrix my-llama.imatrix.gguf --out my-llama-Q4_K_M.gguf
  llmquant generate smollm2-q4_0.gguf "The capital of France is"
  llmquant perplexity smollm2-q4_0.gguf --ref smollm2-f32.gguf

Run 'llmquant COMMAND --help' for a command's options."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ...; see 'llmquant quantize --help'``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmquant", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"llmquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand, whose --help lists what it takes
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main else None
    try:
        rc = COMMANDS[args.command][1](args)
        sys.stdout.flush()  # a pipe buffers: a closed one must fail here, not in the interpreter's exit
        return rc
    except LlmquantError as exc:
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        from .export.gguf_file import ResumableError

        if isinstance(exc, ResumableError):  # disk full, out of memory: fix that, then continue
            text += _resume_hint(args)
        print(f"error: {text or type(exc).__name__}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        stopped = "terminated" if isinstance(exc, Terminated) else "interrupted"
        written = "; no output file was written" if args.command == "quantize" else ""
        print(f"{stopped}{written}{_resume_hint(args)}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, like a C tool killed by SIGPIPE
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())  # the interpreter's last flush must not fail again
        os.close(null)
        return 141
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, systemd, Slurm's time limit): stopped like Ctrl-C, finished layers kept."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


def _resume_hint(args) -> str:
    """How to continue, when the interrupted run had finished layers to keep."""
    from .workdir import STATE, work_dir_for

    out = getattr(args, "out", None)
    if out is None or not (work_dir_for(out) / STATE).is_file():
        return ""
    return f"; the finished layers are kept in {work_dir_for(out)}: run again with --resume to continue"


if __name__ == "__main__":
    sys.exit(main())
