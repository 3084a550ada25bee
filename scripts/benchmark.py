"""Benchmark llmquant's methods against llama.cpp's own quantizer, in one command.

    python scripts/benchmark.py [--model M] [--types q4_0,q8_0,Q4_K_M] [--methods rtn,gptq]
                                [--ctx 512] [--windows N] [--out-dir bench-out] [--subset] [--no-imatrix]

Writes an f32 reference GGUF with llmquant, quantizes it per type with
llama.cpp (default policy), with llama.cpp after an importance matrix
(``llama-imatrix`` on llmquant's own calibration windows, then
``llama-quantize --imatrix``), and the model with every llmquant method
(``rtn+imatrix``: llmquant's streamed imatrix on the same windows, then
``quantize --imatrix``, the drop-in replacement of that pipeline), runs
each quantization in a child process (time and peak RSS are per file),
evaluates every file against the f32 file on the same held-out tokens, and
writes a markdown table, results.json and kld_vs_bpw.png. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shlex
import subprocess
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

from llmquant.errors import LlmquantError
from llmquant.eval.perplexity import evaluate
from llmquant.methods import make_method
from llmquant.options import check_method_options
from llmquant.text import default_text

# llama.cpp's LLAMA_FTYPE_MOSTLY_* (vendor/llama.cpp/include/llama.h of llama-cpp-python 0.3.36);
# k-quant recipes keep llama-quantize's spelling, and --types takes any case.
FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7,
          "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
          "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}
LEGACY_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # the default --types
LLAMA_CPP = "llama.cpp"
LLAMA_CPP_IMATRIX = "llama.cpp+imatrix"  # llama-imatrix, then llama-quantize --imatrix
OURS_IMATRIX = "rtn+imatrix"  # llmquant imatrix, then llmquant quantize --imatrix (the drop-in replacement)
REFERENCE = "reference"  # the f32 file's "method"
# Calibration is the built-in text, not the library's default (sampled sequences): llama-imatrix
# reads text, and only text re-tokenizes to the very windows llmquant's methods saw (sampled token
# ids need not). scripts/calib_transfer.py compares the sources, llmquant's imatrix standing in.
SOURCE = "builtin"
KEY_FIELDS = ("type", "method", "model", "ctx", "windows", "calib")

# Runs in a fresh interpreter: argv[1] is a JSON job; prints one JSON line {seconds, peak_mib}.
WORKER = r"""
import json, sys, time
job = json.loads(sys.argv[1])
t0 = time.perf_counter()
if job["method"] == "llama.cpp":
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = job["ftype"], job["threads"]
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["out"].encode(), params)
    if rc != 0:
        sys.exit(f"error: llama_model_quantize returned {rc}")
else:
    import llmquant
    from llmquant.errors import LlmquantError
    calib = llmquant.CalibrationConfig(**job["calib"]) if job["calib"] else None
    try:
        llmquant.quantize(job["model"], job["out"], type=job["type"], method=job["method"],
                          method_options=job.get("options"), calibration=calib, threads=job["threads"],
                          progress=False, imatrix=job.get("imatrix"))
    except LlmquantError as exc:
        sys.exit(f"error: {exc}")
seconds = time.perf_counter() - t0
from llmquant.report import peak_rss_mib  # VmHWM: ru_maxrss would start at the parent's size
print(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib()}))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="llmquant vs llama.cpp: size, perplexity, KLD, time, memory")
    p.add_argument("--model", default=None, help="hub id or HF folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--types", default=None, help="comma-separated, any case: " + ",".join(FTYPES)
                   + " (default: " + ",".join(LEGACY_TYPES) + ")")
    p.add_argument("--methods", default="rtn,gptq",
                   help=f"comma-separated llmquant methods, and {OURS_IMATRIX} (llmquant imatrix on the "
                        "calibration windows, then rtn --imatrix); METHOD@KEY=VALUE[@...] runs a method with "
                        "options as its own series, e.g. awq+gptq+tune@steps=200 (default: rtn,gptq)")
    p.add_argument("--ctx", type=int, default=None, help="evaluation window in tokens (default 512)")
    p.add_argument("--windows", type=int, default=None, help="evaluation windows (default: all of the held-out text)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows for calibrated methods (128)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per calibration window (512)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"), help="files, results.json, plot (bench-out)")
    p.add_argument("--threads", type=int, default=2, help="threads for quantization and evaluation (2)")
    p.add_argument("--subset", action="store_true", help="fast CI mode: q8_0,q4_0, rtn (+gptq 4x128), ctx 128, 2 windows")
    p.add_argument("--force", action="store_true", help="redo rows already in results.json")
    p.add_argument("--no-imatrix", dest="imatrix", action="store_false",
                   help="skip the llama.cpp+imatrix series (llama-imatrix, then llama-quantize --imatrix)")
    args = p.parse_args(argv)
    methods = args.requested = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.subset:
        methods = [m for m in ("rtn", OURS_IMATRIX, "gptq") if m == "rtn" or m in methods]
    sub = args.subset
    args.methods = methods
    canonical = {name.lower(): name for name in FTYPES}
    args.types = [canonical.get(t.strip().lower(), t.strip()) for t in args.types.split(",")] if args.types else (
        ["q8_0", "q4_0"] if sub else list(LEGACY_TYPES))
    for name, fast, full in (("ctx", 128, 512), ("windows", 2, None), ("calib_samples", 4, 128),
                             ("calib_seqlen", 128, 512)):
        if getattr(args, name) is None:
            setattr(args, name, fast if sub else full)
    return args


def check_args(args: argparse.Namespace) -> dict[str, bool]:
    """Every problem that would stop the run, before any work; returns method -> needs calibration."""
    bad_types = [t for t in args.types if t not in FTYPES]
    if bad_types or not args.types:
        raise LlmquantError(f"unsupported type(s) {bad_types or args.types}; choose from {', '.join(FTYPES)}")
    if not args.methods:
        raise LlmquantError("no methods given (--methods rtn,gptq)")
    if args.ctx < 4 or (args.windows is not None and args.windows < 1) or args.threads < 1 \
            or args.calib_samples < 1 or args.calib_seqlen < 2:
        raise LlmquantError("need --ctx >= 4, --windows >= 1, --threads >= 1, --calib-samples >= 1, --calib-seqlen >= 2")
    # unknown method -> LlmquantError; rtn+imatrix is calibrated through its imatrix
    needs = {}
    for m in args.requested:
        name, options = method_spec(m)
        if m != OURS_IMATRIX:
            check_method_options(name, type(make_method(name)), options)
        needs[m] = m == OURS_IMATRIX or make_method(name, **options).needs_calibration
    if args.imatrix:  # builds llama-imatrix and llama-quantize once per machine (minutes); no cmake -> one line
        from llmquant.eval.llamacpp_tools import TOOLS, tool_path

        for tool in TOOLS:
            tool_path(tool)
    for mod in ("llama_cpp", "matplotlib"):
        try:
            __import__(mod)
        except ImportError as exc:
            raise LlmquantError(f"{mod} is not installed ({exc}); install llmquant[llama,bench]") from exc
    from llmquant.loading.source import resolve_model

    resolve_model(args.model)
    return needs


def run_quantization(job: dict) -> dict:
    """One quantization in a child process: {seconds, peak_mib} of that child alone."""
    if job["method"] == LLAMA_CPP_IMATRIX:  # llama-quantize is the child: its own time and VmHWM
        from llmquant.eval.llamacpp_tools import quantize_with_imatrix

        stats: dict = {}
        quantize_with_imatrix(job["src"], job["out"], job["type"], job["imatrix"], job["threads"], stats=stats)
        return stats
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise LlmquantError(f"quantizing {job['out']} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row_key(row: dict) -> tuple:
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in KEY_FIELDS)


def plan_rows(args: argparse.Namespace, needs: dict[str, bool]) -> list[dict]:
    """The rows of this run, in table order; each names its file and the job that makes it."""
    model = args.model or "default"
    slug = Path(model).name or "model"
    base = {"model": model, "ctx": args.ctx, "windows": args.windows}
    calib = {"samples": args.calib_samples, "seqlen": args.calib_seqlen, "source": SOURCE}
    f32 = args.out_dir / f"{slug}-f32.gguf"
    ctag = f"-c{calib['samples']}x{calib['seqlen']}"
    rows = [{**base, "type": "f32", "method": REFERENCE, "calib": None, "file": str(f32),
             "job": {"method": "rtn", "type": "f32", "model": args.model, "calib": None}}]
    for t in args.types:
        rows.append({**base, "type": t, "method": LLAMA_CPP, "calib": None,
                     "file": str(args.out_dir / f"{slug}-{t}-llama.cpp.gguf"),
                     "job": {"method": LLAMA_CPP, "ftype": FTYPES[t], "src": str(f32)}})
        if args.imatrix:
            rows.append({**base, "type": t, "method": LLAMA_CPP_IMATRIX, "calib": calib,
                         "file": str(args.out_dir / f"{slug}-{t}-{LLAMA_CPP_IMATRIX}{ctag}.gguf"),
                         "job": {"method": LLAMA_CPP_IMATRIX, "type": t, "src": str(f32),
                                 "imatrix": str(imatrix_path(args))}})
        for m in args.methods:
            c = calib if needs[m] else None
            tag = ctag if c else ""
            name, options = method_spec(m)
            job = {"method": name, "type": t, "model": args.model, "calib": c, "options": options or None}
            if m == OURS_IMATRIX:
                job = {**job, "method": "rtn", "calib": None, "imatrix": str(our_imatrix_path(args))}
            rows.append({**base, "type": t, "method": m, "calib": c,
                         "file": str(args.out_dir / f"{slug}-{t}-{m}{tag}.gguf"), "job": job})
    return rows


def method_spec(spec: str) -> tuple[str, dict]:
    """``awq+gptq+tune@steps=200@lr=0.01`` -> ("awq+gptq+tune", {"steps": 200, "lr": 0.01}).

    A method with options is its own series (its own rows and files); the values
    are Python literals (numbers, True/False) or else words (``target=model``),
    checked by the method like the CLI's.
    """
    name, *pairs = spec.split("@")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise LlmquantError(f"method option {pair!r} in {spec!r} is not KEY=VALUE")
        if not value:
            raise LlmquantError(f"method option {key}= in {spec!r} has no value")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if not value.isidentifier():
                raise LlmquantError(f"method option {key}={value!r} in {spec!r} is not a number, True/False "
                                    "or a word") from None
            options[key] = value
    return name, options


def calib_slug(args: argparse.Namespace) -> str:
    return f"{Path(args.model or 'default').name or 'model'}-c{args.calib_samples}x{args.calib_seqlen}"


def imatrix_path(args: argparse.Namespace) -> Path:
    return args.out_dir / f"{calib_slug(args)}.imatrix.gguf"


def our_imatrix_path(args: argparse.Namespace) -> Path:
    return args.out_dir / f"{calib_slug(args)}.llmquant.imatrix.gguf"


def ensure_our_imatrix(args: argparse.Namespace, info: dict) -> Path:
    """llmquant's streamed imatrix on the same calibration windows, once per out-dir (or --force)."""
    import time

    from llmquant.calibration import CalibrationConfig
    from llmquant.imatrix import compute_imatrix
    out = our_imatrix_path(args)
    meta_file = out.with_suffix(".json")
    if out.is_file() and meta_file.is_file() and not args.force:
        info.update(json.loads(meta_file.read_text()))
        return out
    print(f"[bench] llmquant imatrix on {args.calib_samples} x {args.calib_seqlen} calibration tokens -> {out}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    r = compute_imatrix(args.model, out, calibration=CalibrationConfig(samples=args.calib_samples,
                                                                       seqlen=args.calib_seqlen, source=SOURCE),
                        progress=False)
    meta = {"our_imatrix_file": str(out), "our_imatrix_chunks": r.chunk_count,
            "our_imatrix_seconds": time.perf_counter() - t0}
    meta_file.write_text(json.dumps(meta, indent=1))
    info.update(meta)
    return out


def write_calibration_text(args: argparse.Namespace, path: Path) -> int:
    """The exact token windows llmquant's calibrated methods use, as text; returns their count.

    ``calibration_tokens`` with the benchmark's samples x seqlen (the built-in text,
    seed 0) gives the windows; each is decoded and they are written back to
    back, so llama-imatrix's consecutive chunks of seqlen tokens are those
    windows (llama.cpp re-tokenizes the text to exactly these tokens on SmolLM2:
    tests/test_benchmark.py checks it). The first window is repeated after the
    last as padding, never processed with --chunks = the window count:
    llama-imatrix wants 2 x ctx tokens at least and drops a short last chunk.
    """
    from transformers import AutoTokenizer

    from llmquant.calibration import CalibrationConfig, calibration_tokens
    from llmquant.loading.source import resolve_model

    model_dir = resolve_model(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only N windows": llmquant's methods use the same N
        windows = calibration_tokens(model_dir, CalibrationConfig(samples=args.calib_samples,
                                                                  seqlen=args.calib_seqlen, source=SOURCE))
    tok = AutoTokenizer.from_pretrained(model_dir)
    parts = [tok.decode(w, clean_up_tokenization_spaces=False) for w in windows.tolist()]
    parts.append(parts[0])  # padding only
    path.write_text("".join(parts), encoding="utf-8")
    return len(windows)


def ensure_imatrix(args: argparse.Namespace, f32: str, info: dict) -> Path:
    """llama-imatrix on the f32 file and the calibration windows, once per out-dir (or --force)."""
    from llmquant.eval.llamacpp_tools import compute_imatrix

    out = imatrix_path(args)
    text_file = args.out_dir / f"{calib_slug(args)}.calib.txt"
    meta_file = out.with_suffix(".json")
    if out.is_file() and meta_file.is_file() and not args.force:
        info.update(json.loads(meta_file.read_text()))
        return out
    chunks = write_calibration_text(args, text_file)
    if chunks < 2:
        raise LlmquantError(f"llama-imatrix needs at least 2 calibration windows of {args.calib_seqlen} tokens; "
                            f"the calibration text holds {chunks}")
    print(f"[bench] llama-imatrix on {chunks} x {args.calib_seqlen} calibration tokens -> {out}",
          file=sys.stderr, flush=True)
    stats: dict = {}
    compute_imatrix(f32, text_file, out, ctx=args.calib_seqlen, chunks=chunks, threads=args.threads, stats=stats)
    meta = {"imatrix_file": str(out), "imatrix_text": str(text_file), "imatrix_chunks": chunks,
            "imatrix_ctx": args.calib_seqlen, "imatrix_seconds": stats.get("seconds"),
            "imatrix_peak_mib": stats.get("peak_mib")}
    meta_file.write_text(json.dumps(meta, indent=1))
    info.update(meta)
    return out


def measure(row: dict, ref: str | None, text: str, args: argparse.Namespace) -> dict:
    """Quantize (child process) and evaluate one row; returns the finished row."""
    job = {**row.pop("job"), "out": row["file"], "threads": args.threads}
    print(f"[bench] quantizing {row['type']} {row['method']} -> {row['file']}", file=sys.stderr, flush=True)
    q = run_quantization(job)
    print(f"[bench] evaluating {row['file']}", file=sys.stderr, flush=True)
    r = evaluate(row["file"], text=text, ctx=args.ctx, windows=args.windows, ref=ref,
                 threads=args.threads, progress=False)
    return {**row, "file_size": r.file_size, "bits_per_weight": r.bits_per_weight, "ppl": r.ppl,
            "ppl_stderr": r.ppl_stderr, "kld": r.kld, "kld_p99": r.kld_p99, "top1": r.top1,
            "tokens": r.tokens, "quant_seconds": q["seconds"], "peak_mib": q["peak_mib"]}


def add_ratios(rows: list[dict]) -> None:
    """Δppl vs the f32 row; KLD / size ratios vs llama.cpp's file of the same type, and KLD ratio
    vs llama.cpp+imatrix's file of the same type (None without that row)."""
    ref_ppl = next(r["ppl"] for r in rows if r["method"] == REFERENCE)
    theirs = {r["type"]: r for r in rows if r["method"] == LLAMA_CPP}
    imatrix = {r["type"]: r for r in rows if r["method"] == LLAMA_CPP_IMATRIX}

    def kld_ratio(r: dict, other: dict | None) -> float | None:
        return r["kld"] / other["kld"] if other and r["kld"] is not None and other["kld"] else None

    for r in rows:
        r["dppl"] = r["ppl"] - ref_ppl
        other = theirs.get(r["type"])
        r["kld_ratio"] = kld_ratio(r, other)
        r["kld_ratio_imatrix"] = kld_ratio(r, imatrix.get(r["type"]))
        r["size_ratio"] = r["file_size"] / other["file_size"] if other else None


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ["type", "method", "size MiB", "bpw", "ppl", "Δppl", "KLD", "KLD p99", "top-1",
            "quant s", "peak MiB", "KLD ratio", "KLD ratio imatrix", "size ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["type"], r["method"], fmt(r["file_size"] / 2**20, ".1f"), fmt(r["bits_per_weight"], ".3f"),
                 fmt(r["ppl"], ".4f"), fmt(r["dppl"], "+.4f"), fmt(r["kld"], ".6f"), fmt(r["kld_p99"], ".5f"),
                 fmt(r["top1"] and 100 * r["top1"], ".2f") + ("%" if r["top1"] is not None else ""),
                 fmt(r["quant_seconds"], ".1f"), fmt(r["peak_mib"], ".0f"),
                 fmt(r["kld_ratio"], ".3f"), fmt(r.get("kld_ratio_imatrix"), ".3f"), fmt(r["size_ratio"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """KLD (log scale) vs bits per weight, one series per method; points labelled by type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != REFERENCE):
        pts = sorted((r["bits_per_weight"], r["kld"], r["type"]) for r in rows
                     if r["method"] == method and r["kld"] and r["kld"] > 0)
        if not pts:
            continue
        theirs = method in (LLAMA_CPP, LLAMA_CPP_IMATRIX)  # hollow, so an identical series (rtn) stays visible
        marker = {LLAMA_CPP: "s", LLAMA_CPP_IMATRIX: "D"}.get(method, "o")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method,
                linestyle={LLAMA_CPP: "--", LLAMA_CPP_IMATRIX: ":"}.get(method, "-"),
                marker=marker, markersize=10 if theirs else 5, fillstyle="none" if theirs else "full")
        for x, y, t in pts:
            if (x, y, t) not in labelled:
                labelled.add((x, y, t))
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (2-D tensors)")
    ax.set_ylabel("mean KL-divergence vs f32 (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text())["rows"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LlmquantError(f"{path} is not a results file from this script ({exc}); remove it or pick another --out-dir") from exc


def save_results(path: Path, rows: list[dict], info: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"run": info, "rows": rows}, indent=1))
    os.replace(tmp, path)


def run_info(args: argparse.Namespace, argv: list[str], tokens: int | None, extra: dict | None = None) -> dict:
    return {"model": args.model or "default", "ctx": args.ctx, "windows": args.windows, "tokens": tokens,
            "types": args.types, "methods": args.methods, "threads": args.threads, "imatrix": args.imatrix,
            **(extra or {}),
            "calib": {"samples": args.calib_samples, "seqlen": args.calib_seqlen},
            "machine": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "scripts/benchmark.py", *argv])}


def run(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    needs = check_args(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = args.out_dir / "results.json"
    saved = {row_key(r): r for r in load_results(results)}
    text, done, ref, extra = default_text("eval"), [], None, {}
    for row in plan_rows(args, needs):
        old = saved.get(row_key(row))
        if old is not None and not args.force and Path(old["file"]).is_file():
            print(f"[bench] skip {row['type']} {row['method']}: already in {results}", file=sys.stderr)
            new = old
        else:
            if row["method"] == LLAMA_CPP_IMATRIX and "imatrix_file" not in extra:
                ensure_imatrix(args, ref, extra)  # once per run, from the f32 file (the first row)
            if row["method"] == OURS_IMATRIX and "our_imatrix_file" not in extra:
                ensure_our_imatrix(args, extra)
            new = measure(row, ref, text, args)
            saved[row_key(new)] = new
            save_results(results, list(saved.values()), run_info(args, argv, new["tokens"], extra))
        ref = ref or new["file"]  # the first row is the f32 reference
        done.append(new)
    add_ratios(done)
    for r in done:
        saved[row_key(r)] = r
    if args.imatrix and "imatrix_file" not in extra and imatrix_path(args).with_suffix(".json").is_file():
        extra.update(json.loads(imatrix_path(args).with_suffix(".json").read_text()))
    ours = our_imatrix_path(args).with_suffix(".json")
    if OURS_IMATRIX in args.methods and "our_imatrix_file" not in extra and ours.is_file():
        extra.update(json.loads(ours.read_text()))
    save_results(results, list(saved.values()), run_info(args, argv, done[0]["tokens"], extra))
    title = f"{args.model or 'SmolLM2-135M-Instruct'}: ctx {args.ctx}, {done[0]['tokens']} scored tokens"
    plot(done, args.out_dir / "kld_vs_bpw.png", title)
    return done


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        rows = run(args, argv)
    except LlmquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    print(f"\nwrote {args.out_dir / 'results.json'} and {args.out_dir / 'kld_vs_bpw.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
