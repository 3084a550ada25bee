"""RTN speed: llmquant's HF -> GGUF against llama.cpp's f32 GGUF -> GGUF, side by side.

    python scripts/speed_benchmark.py [--model M] [--types q4_0,q8_0,Q4_K_M] [--repeats 3]
                                      [--threads 2] [--out-dir bench-speed]

llama.cpp's quantizer starts from a GGUF it already converted; llmquant starts
from the Hugging Face checkpoint and does the conversion too (and re-reads its
file before the rename), so the ratio is the price a user pays for one step
instead of two. Each quantization runs in its own child process (benchmark.py's
worker: time from the first import to the finished file, and the child's peak
RSS). The two quantizers alternate within each repeat, so a change in the
machine's load hits both; the table reports medians and the ratio ours/llama.cpp
per type. Writes speed.json and speed.png. See docs/benchmarks.md#speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import FTYPES, LLAMA_CPP, run_quantization  # noqa: E402

from llmquant.errors import LlmquantError  # noqa: E402
from llmquant.export.gguf_table import read_tensor_table  # noqa: E402

LLMQUANT = "llmquant rtn"
DEFAULT_TYPES = ("q4_0", "q8_0", "Q4_K_M")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="RTN wall time: llmquant HF->GGUF vs llama.cpp f32 GGUF->GGUF")
    p.add_argument("--model", default=None, help="hub id or HF folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated, any case (q4_0,q8_0,Q4_K_M)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each quantizer per type; medians reported (3)")
    p.add_argument("--threads", type=int, default=2, help="threads for both quantizers (2)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-speed"), help="files, speed.json, speed.png")
    args = p.parse_args(argv)
    canonical = {name.lower(): name for name in FTYPES}
    args.types = [canonical.get(t.strip().lower(), t.strip()) for t in args.types.split(",") if t.strip()]
    bad = [t for t in args.types if t not in FTYPES]
    if bad or not args.types:
        raise LlmquantError(f"unsupported type(s) {bad or args.types}; choose from {', '.join(FTYPES)}")
    if args.repeats < 1 or args.threads < 1:
        raise LlmquantError("need --repeats >= 1 and --threads >= 1")
    return args


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per (type, quantizer): every run's seconds and peak RSS, the medians, the ratio."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = Path(args.model or "default").name or "model"
    f32 = args.out_dir / f"{slug}-f32.gguf"
    if not f32.is_file():  # llama.cpp's starting point, made once and not timed
        run_quantization({"method": "rtn", "type": "f32", "model": args.model, "calib": None,
                          "out": str(f32), "threads": args.threads})
    rows = []
    for t in args.types:
        out = {q: args.out_dir / f"{slug}-{t}-{q.split()[0]}.gguf" for q in (LLMQUANT, LLAMA_CPP)}
        jobs = {LLMQUANT: {"method": "rtn", "type": t, "model": args.model, "calib": None},
                LLAMA_CPP: {"method": LLAMA_CPP, "ftype": FTYPES[t], "src": str(f32)}}
        runs: dict[str, list[dict]] = {q: [] for q in jobs}
        for r in range(args.repeats):
            for q in (jobs if r % 2 == 0 else reversed(list(jobs))):  # alternate who goes first
                stats = run_quantization({**jobs[q], "out": str(out[q]), "threads": args.threads})
                runs[q].append(stats)
                print(f"  {t:7s} {q:13s} run {r + 1}: {stats['seconds']:.2f} s", file=sys.stderr, flush=True)
        for q, got in runs.items():
            rows.append({"type": t, "quantizer": q, "seconds": [g["seconds"] for g in got],
                         "median_s": statistics.median(g["seconds"] for g in got),
                         "peak_mib": max((g["peak_mib"] or 0) for g in got) or None,
                         "bytes": out[q].stat().st_size})
        ours, theirs = rows[-2], rows[-1]
        ours["ratio"] = ours["median_s"] / theirs["median_s"]
        ours["same_tensor_data"] = same_tensor_data(out[LLMQUANT], out[LLAMA_CPP])
    return rows


def same_tensor_data(a: Path, b: Path) -> bool:
    """Whether two GGUFs hold the same tensors (names, types, shapes, bytes), whatever their metadata
    and tensor order (llama.cpp's quantizer writes its own order).

    The speed ratio compares like with like only where both quantizers wrote the same file contents.
    """
    ta, tb = read_tensor_table(a), read_tensor_table(b)
    by_name = {t.name: t for t in tb.tensors}
    if len(by_name) != len(tb.tensors) or sorted(by_name) != sorted(t.name for t in ta.tensors):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for x in ta.tensors:
            y = by_name[x.name]
            if (x.type, x.shape) != (y.type, y.shape):
                return False
            fa.seek(ta.data_offset + x.offset)
            fb.seek(tb.data_offset + y.offset)
            if fa.read(x.n_bytes) != fb.read(y.n_bytes):
                return False
    return True


def table(rows: list[dict]) -> str:
    lines = ["| type | quantizer | median s | runs (s) | peak MiB | bytes | same tensor data | ours / llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = ", ".join(f"{s:.2f}" for s in r["seconds"])
        ratio = f"**{r['ratio']:.2f}x**" if "ratio" in r else ""
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] else "-"
        same = {True: "yes", False: "**no**", None: ""}[r.get("same_tensor_data")]
        lines.append(f"| {r['type']} | {r['quantizer']} | {r['median_s']:.2f} | {runs} | {peak} | {r['bytes']:,} "
                     f"| {same} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(r["type"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.38
    for k, q in enumerate((LLMQUANT, LLAMA_CPP)):
        got = {r["type"]: r for r in rows if r["quantizer"] == q}
        xs = [i + (k - 0.5) * width for i in range(len(types))]
        bars = ax.bar(xs, [got[t]["median_s"] for t in types], width, label=q if k else f"{q} (from HF)")
        if q == LLMQUANT:
            ax.bar_label(bars, [f"{got[t]['ratio']:.1f}x" for t in types], padding=2, fontsize=8)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("wall time, median (s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        rows = measure(args)
    except LlmquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    info = {"model": args.model or "default", "types": args.types, "repeats": args.repeats, "threads": args.threads,
            "load_avg_after": os.getloadavg(), "machine": platform.processor() or platform.machine(),
            "nproc": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "scripts/speed_benchmark.py", *argv])}
    (args.out_dir / "speed.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    plot(rows, args.out_dir / "speed.png", f"RTN wall time, {Path(args.model or 'SmolLM2-135M').name}, "
         f"{args.threads} threads")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
