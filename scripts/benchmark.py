"""Benchmark llmquant's methods against llama.cpp's own quantizer, in one command.

    python scripts/benchmark.py [--model M] [--types q4_0,q8_0] [--methods rtn,gptq]
                                [--ctx 512] [--windows N] [--out-dir bench-out] [--subset]

Writes an f32 reference GGUF with llmquant, quantizes it per type with
llama.cpp (default policy) and the model with every llmquant method, runs
each quantization in a child process (time and peak RSS are per file),
evaluates every file against the f32 file on the same held-out tokens, and
writes a markdown table, results.json and kld_vs_bpw.png. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from llmquant.errors import LlmquantError
from llmquant.eval.perplexity import evaluate
from llmquant.methods import make_method
from llmquant.text import default_text

FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
LLAMA_CPP = "llama.cpp"
REFERENCE = "reference"  # the f32 file's "method"
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
                          calibration=calib, threads=job["threads"], progress=False)
    except LlmquantError as exc:
        sys.exit(f"error: {exc}")
seconds = time.perf_counter() - t0
from llmquant.report import peak_rss_mib  # VmHWM: ru_maxrss would start at the parent's size
print(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib()}))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="llmquant vs llama.cpp: size, perplexity, KLD, time, memory")
    p.add_argument("--model", default=None, help="hub id or HF folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--types", default=None, help="comma-separated: " + ",".join(FTYPES) + " (default: all)")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated llmquant methods (default: rtn,gptq)")
    p.add_argument("--ctx", type=int, default=None, help="evaluation window in tokens (default 512)")
    p.add_argument("--windows", type=int, default=None, help="evaluation windows (default: all of the held-out text)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows for calibrated methods (128)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per calibration window (512)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"), help="files, results.json, plot (bench-out)")
    p.add_argument("--threads", type=int, default=2, help="threads for quantization and evaluation (2)")
    p.add_argument("--subset", action="store_true", help="fast CI mode: q8_0,q4_0, rtn (+gptq 4x128), ctx 128, 2 windows")
    p.add_argument("--force", action="store_true", help="redo rows already in results.json")
    args = p.parse_args(argv)
    methods = args.requested = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.subset:
        methods = [m for m in ("rtn", "gptq") if m == "rtn" or m in methods]
    sub = args.subset
    args.methods = methods
    args.types = [t.strip().lower() for t in args.types.split(",")] if args.types else (
        ["q8_0", "q4_0"] if sub else list(FTYPES))
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
    needs = {m: make_method(m).needs_calibration for m in args.requested}  # unknown method -> LlmquantError
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
    calib = {"samples": args.calib_samples, "seqlen": args.calib_seqlen}
    f32 = args.out_dir / f"{slug}-f32.gguf"
    rows = [{**base, "type": "f32", "method": REFERENCE, "calib": None, "file": str(f32),
             "job": {"method": "rtn", "type": "f32", "model": args.model, "calib": None}}]
    for t in args.types:
        rows.append({**base, "type": t, "method": LLAMA_CPP, "calib": None,
                     "file": str(args.out_dir / f"{slug}-{t}-llama.cpp.gguf"),
                     "job": {"method": LLAMA_CPP, "ftype": FTYPES[t], "src": str(f32)}})
        for m in args.methods:
            c = calib if needs[m] else None
            tag = f"-c{c['samples']}x{c['seqlen']}" if c else ""
            rows.append({**base, "type": t, "method": m, "calib": c,
                         "file": str(args.out_dir / f"{slug}-{t}-{m}{tag}.gguf"),
                         "job": {"method": m, "type": t, "model": args.model, "calib": c}})
    return rows


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
    """Δppl vs the f32 row, and KLD / size ratios vs llama.cpp's file of the same type."""
    ref_ppl = next(r["ppl"] for r in rows if r["method"] == REFERENCE)
    theirs = {r["type"]: r for r in rows if r["method"] == LLAMA_CPP}
    for r in rows:
        r["dppl"] = r["ppl"] - ref_ppl
        other = theirs.get(r["type"])
        r["kld_ratio"] = r["kld"] / other["kld"] if other and r["kld"] is not None and other["kld"] else None
        r["size_ratio"] = r["file_size"] / other["file_size"] if other else None


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ["type", "method", "size MiB", "bpw", "ppl", "Δppl", "KLD", "KLD p99", "top-1",
            "quant s", "peak MiB", "KLD ratio", "size ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["type"], r["method"], fmt(r["file_size"] / 2**20, ".1f"), fmt(r["bits_per_weight"], ".3f"),
                 fmt(r["ppl"], ".4f"), fmt(r["dppl"], "+.4f"), fmt(r["kld"], ".6f"), fmt(r["kld_p99"], ".5f"),
                 fmt(r["top1"] and 100 * r["top1"], ".2f") + ("%" if r["top1"] is not None else ""),
                 fmt(r["quant_seconds"], ".1f"), fmt(r["peak_mib"], ".0f"),
                 fmt(r["kld_ratio"], ".3f"), fmt(r["size_ratio"], ".4f")]
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
        theirs = method == LLAMA_CPP  # hollow squares, so an identical series (rtn) stays visible
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, linestyle="--" if theirs else "-",
                marker="s" if theirs else "o", markersize=10 if theirs else 5, fillstyle="none" if theirs else "full")
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


def run_info(args: argparse.Namespace, argv: list[str], tokens: int | None) -> dict:
    return {"model": args.model or "default", "ctx": args.ctx, "windows": args.windows, "tokens": tokens,
            "types": args.types, "methods": args.methods, "threads": args.threads,
            "calib": {"samples": args.calib_samples, "seqlen": args.calib_seqlen},
            "machine": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "scripts/benchmark.py", *argv])}


def run(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    needs = check_args(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = args.out_dir / "results.json"
    saved = {row_key(r): r for r in load_results(results)}
    text, done, ref = default_text("eval"), [], None
    for row in plan_rows(args, needs):
        old = saved.get(row_key(row))
        if old is not None and not args.force and Path(old["file"]).is_file():
            print(f"[bench] skip {row['type']} {row['method']}: already in {results}", file=sys.stderr)
            new = old
        else:
            new = measure(row, ref, text, args)
            saved[row_key(new)] = new
            save_results(results, list(saved.values()), run_info(args, argv, new["tokens"]))
        ref = ref or new["file"]  # the first row is the f32 reference
        done.append(new)
    add_ratios(done)
    for r in done:
        saved[row_key(r)] = r
    save_results(results, list(saved.values()), run_info(args, argv, done[0]["tokens"]))
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
