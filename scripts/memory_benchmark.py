"""Peak memory of quantization against model size, on synthetic llama models.

    python scripts/memory_benchmark.py [--depths 4,8,16,32] [--hidden 512] [--widths 512,1024,2048]
                                       [--layers 4] [--methods rtn,gptq] [--type q4_0] [--threads 1]
                                       [--work-dir bench-out/memory] [--quick]
    python scripts/memory_benchmark.py --preset llama-3-70b --methods gptq@gptq_target=layer --calib-samples 16 --calib-seqlen 512

llmquant streams one decoder layer at a time, so peak memory must not grow
with depth. This checks it: random untied llama checkpoints of growing depth
(fixed width) and growing width (fixed depth) are built on disk once (reused
on later runs), each is quantized per method in a fresh child process, and
the child's peak RSS (VmHWM) is compared with the model size and with a
baseline child that only imports torch and llmquant. The parent also samples the
child's RssAnon, since mmapped safetensors pages count in RSS but are not
anonymous memory. The slope of peak RSS over the depth sweep (MiB per layer,
and as a fraction of one layer's fp16 size on disk) should be ~0.
--preset adds checkpoints with a real model's layer shapes and vocabulary
(``PRESETS``; --preset-layers deep, bf16 as those models ship) instead of the
sweeps: what bounds a run is the widest layer, not the depth. Every calibrated
row carries an account, from the shapes, of what the peak holds (one layer's
weights, the calibration hidden states, the widest Hessian and GPTQ's float64
work on it, one batch of MLP activations), to set against the measured peak.
Writes a markdown table (stdout), memory.json and memory.png in --work-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from benchmark import method_spec
from synthetic_model import DTYPES, INFO_FILE, build_synthetic_llama, default_intermediate

# Runs in a fresh interpreter: argv[1] is a JSON job; prints one JSON line {seconds, peak_mib, ru_maxrss_mib}.
# Peak is VmHWM, the high-water RSS of this process's own address space: ru_maxrss is not per child,
# since Linux carries the parent's peak into it across fork/exec (a child of an 800 MiB parent reports 800).
WORKER = r"""
import json, resource, sys, time
job = json.loads(sys.argv[1])
t0 = time.perf_counter()
import torch, llmquant
if job["method"] != "baseline":
    calib = llmquant.CalibrationConfig(**job["calib"]) if job["calib"] else None
    llmquant.quantize(job["model"], job["out"], type=job["type"], method=job["method"],
                      method_options=job.get("options") or None, calibration=calib, threads=job["threads"],
                      progress=False)
seconds = time.perf_counter() - t0
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mib": hwm / 1024,
                  "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
SAMPLE_S = 0.05  # how often the parent reads the child's RssAnon
BATCH = 8  # calibration windows per forward batch (the pipeline's default)
# Layer shapes and vocabularies of real checkpoints (their config.json), for --preset.
PRESETS = {
    "llama-3-70b": {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "vocab": 128256,
                    "dtype": "bfloat16"},
    "llama-3-8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256,
                   "dtype": "bfloat16"},
    "llama-3.1-405b": {"hidden": 16384, "intermediate": 53248, "heads": 128, "kv_heads": 8, "vocab": 128256,
                       "dtype": "bfloat16"},
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="peak RSS of llmquant against synthetic model depth and width")
    p.add_argument("--depths", type=ints, default=None, help="layers of the depth sweep (4,8,16,32)")
    p.add_argument("--hidden", type=int, default=512, help="width of the depth sweep (512)")
    p.add_argument("--widths", type=ints, default=None, help="hidden sizes of the width sweep (512,1024,2048)")
    p.add_argument("--layers", type=int, default=4, help="depth of the width sweep (4)")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated llmquant methods (rtn,gptq)")
    p.add_argument("--type", default="q4_0", help="ggml type (q4_0)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="weights on disk (float16)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows for gptq/awq (8)")
    p.add_argument("--calib-seqlen", type=int, default=128, help="tokens per calibration window (128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (1)")
    p.add_argument("--work-dir", type=Path, default=Path("bench-out/memory"), help="models, json, png")
    p.add_argument("--quick", action="store_true", help="smoke test: hidden 256, layers 2,4,8, rtn only")
    p.add_argument("--preset", default="", help=f"real models' shapes, comma-separated ({', '.join(PRESETS)}); "
                   "replaces the sweeps unless --depths/--widths are given")
    p.add_argument("--preset-layers", type=int, default=2, help="depth of the --preset checkpoints (2)")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.preset = [x.strip() for x in a.preset.split(",") if x.strip()]
    unknown = [x for x in a.preset if x not in PRESETS]
    if unknown:
        p.error(f"unknown --preset {', '.join(unknown)} (choose from {', '.join(PRESETS)})")
    sweeps = not a.preset
    a.depths = a.depths if a.depths is not None else ([4, 8, 16, 32] if sweeps else [])
    a.widths = a.widths if a.widths is not None else ([512, 1024, 2048] if sweeps else [])
    if a.quick:
        a.depths, a.hidden, a.widths, a.layers, a.methods = [2, 4, 8], 256, [256], 2, ["rtn"]
    if (not a.methods or not (a.depths or a.widths or a.preset)
            or min(a.depths + a.widths + [a.layers, a.hidden, a.preset_layers]) < 1):
        p.error("need at least one method and positive --depths/--widths/--hidden/--layers/--preset-layers")
    return a


def model_dir(args: argparse.Namespace, hidden: int, layers: int, preset: str | None = None) -> Path:
    """The checkpoint for (hidden, layers) or a preset's shapes, built unless a matching one is on disk."""
    if preset:
        shape = PRESETS[preset]
        path = args.work_dir / "models" / f"{preset}-l{layers}-{shape['dtype']}"
        want = {**shape, "layers": layers, "seed": 0}
    else:
        path = args.work_dir / "models" / f"llama-h{hidden}-l{layers}-{args.dtype}"
        want = {"hidden": hidden, "layers": layers, "dtype": args.dtype, "seed": 0,
                "intermediate": default_intermediate(hidden)}
    info = path / INFO_FILE
    if info.is_file() and all(json.loads(info.read_text()).get(k) == v for k, v in want.items()):
        return path
    log(f"building {path}")
    return build_synthetic_llama(path, **want)


def log(msg: str) -> None:
    print(f"[memory] {msg}", file=sys.stderr, flush=True)


def run_child(job: dict) -> dict:
    """One job in a fresh interpreter: its {seconds, peak_mib} plus the sampled peak RssAnon."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(job)], stdout=out, stderr=err, text=True)
        anon = 0
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                anon = max(anon, next(int(x.split()[1]) for x in status.splitlines() if x.startswith("RssAnon:")))
            except (OSError, StopIteration):
                pass
            time.sleep(SAMPLE_S)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            tail = "\n".join(err.read().strip().splitlines()[-5:])
            raise SystemExit(f"error: {job['method']} on {job.get('model')} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read().strip().splitlines()[-1])
    return {**result, "anon_mib": anon / 1024 if anon else None}


def measure(args: argparse.Namespace, model: Path, method: str, baseline: float) -> dict:
    """Quantize ``model`` with ``method`` in a child; the output file is deleted afterwards."""
    from llmquant.methods import make_method

    name, options = method_spec(method)  # gptq@gptq_target=layer: a method with options
    calib = ({"samples": args.calib_samples, "seqlen": args.calib_seqlen, "source": "builtin"}  # the layer walk, not sampling
             if make_method(name, **options).needs_calibration else None)
    out = args.work_dir / "gguf" / f"{model.name}-{args.type}-{method}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"quantizing {model.name} with {method}")
    r = run_child({"model": str(model), "out": str(out), "type": args.type, "method": name, "options": options,
                   "calib": calib, "threads": args.threads})
    out.unlink(missing_ok=True)
    info = json.loads((model / INFO_FILE).read_text())
    return {"model": model.name, "hidden": info["hidden"], "intermediate": info["intermediate"],
            "layers": info["layers"], "vocab": info["vocab"], "params": info["params"],
            "weight_bytes": info["weight_bytes"], "layer_bytes": layer_bytes(info), "method": method,
            "calib": calib, "peak_mib": r["peak_mib"], "over_baseline_mib": r["peak_mib"] - baseline,
            "anon_mib": r["anon_mib"], "ru_maxrss_mib": r["ru_maxrss_mib"], "seconds": r["seconds"],
            "holds_mib": holds(info, calib, method)}


def holds(info: dict, calib: dict | None, method: str) -> dict | None:
    """What a calibrated run holds at its peak, in MiB, accounted from the shapes (not measured).

    layer_weights: one decoder layer in float32, as the pipeline quantizes it;
    hidden_states: the calibration windows' inputs and outputs of that layer
    (float32 [samples, seqlen, hidden], two of them; four where the method carries
    the full-precision stream beside the quantized one, as gptq fitted to the
    model does by default); hessian: the widest
    input's H (float32 ci×ci, ci = intermediate for down_proj); gptq_factor:
    the two float64 ci×ci matrices the factor of H⁻¹ is computed in (gptq
    only); mlp_batch: one batch's gate, up and their product (float32 [BATCH,
    seqlen, intermediate] each).
    """
    if calib is None:
        return None
    from llmquant.methods import make_method

    name, options = method_spec(method)
    streams = 2 if make_method(name, **options).needs_fp_stream else 1
    h, i = info["hidden"], max(info["hidden"], info["intermediate"])
    mib = 2**-20
    acc = {"layer_weights": layer_bytes(info) / DTYPES[info["dtype"]][1] * 4 * mib,
           "hidden_states": 2 * streams * calib["samples"] * calib["seqlen"] * h * 4 * mib,
           "hessian": i * i * 4 * mib,
           "gptq_factor": 2 * i * i * 8 * mib if "gptq" in name else 0.0,
           "mlp_batch": 3 * min(BATCH, calib["samples"]) * calib["seqlen"] * i * 4 * mib}
    acc["total"] = sum(acc.values())
    return acc


def layer_bytes(info: dict) -> int:
    """Bytes on disk of one decoder layer (4 attention + 3 MLP matrices + 2 norms)."""
    h, i, kv = info["hidden"], info["intermediate"], info["hidden"] // info["heads"] * info["kv_heads"]
    return (2 * h * h + 2 * kv * h + 3 * h * i + 2 * h) * DTYPES[info["dtype"]][1]


def slopes(rows: list[dict], args: argparse.Namespace) -> dict:
    """Least-squares MiB per layer over the depth sweep, per method, and as a fraction of one layer."""
    res = {}
    for m in args.methods:
        pts = [r for r in rows if r["method"] == m and "depth" in r["sweeps"]]
        if len({r["layers"] for r in pts}) < 2:
            continue
        x = np.array([r["layers"] for r in pts], float)
        slope = float(np.polyfit(x, [r["peak_mib"] for r in pts], 1)[0])
        anon = [r["anon_mib"] for r in pts]
        res[m] = {"mib_per_layer": slope, "layer_mib": pts[0]["layer_bytes"] / 2**20,
                  "fraction_of_layer": slope / (pts[0]["layer_bytes"] / 2**20),
                  "anon_mib_per_layer": float(np.polyfit(x, anon, 1)[0]) if None not in anon else None}
    return res


def table(rows: list[dict]) -> str:
    head = ["model", "hidden", "intermediate", "layers", "params (M)", "weights on disk (MiB)", "method",
            "peak RSS (MiB)", "peak - baseline (MiB)", "peak RssAnon (MiB, sampled)", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        anon = "-" if r["anon_mib"] is None else f"{r['anon_mib']:.0f}"
        lines.append(f"| {r['model']} | {r['hidden']} | {r['intermediate']} | {r['layers']} | {r['params'] / 1e6:.1f} | "
                     f"{r['weight_bytes'] / 2**20:.1f} | {r['method']} | {r['peak_mib']:.0f} | "
                     f"{r['over_baseline_mib']:.0f} | {anon} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def holds_table(rows: list[dict]) -> str:
    """The account of each calibrated row's peak (``holds``) beside the measured peak over the baseline."""
    keys = ["layer_weights", "hidden_states", "hessian", "gptq_factor", "mlp_batch", "total"]
    lines = ["| model | method | " + " | ".join(f"{k} (MiB)" for k in keys) + " | measured peak - baseline (MiB) |",
             "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        if r["holds_mib"]:
            cells = " | ".join(f"{r['holds_mib'][k]:.0f}" for k in keys)
            lines.append(f"| {r['model']} | {r['method']} | {cells} | {r['over_baseline_mib']:.0f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot(rows: list[dict], baseline: float, path: Path, title: str) -> None:
    """Peak RSS vs weights on disk, one line per (sweep, method); y = x and the baseline for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sweep in ("depth", "width"):
        for k, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
            pts = sorted((r["weight_bytes"] / 2**20, r["peak_mib"]) for r in rows if r["method"] == m and sweep in r["sweeps"])
            if pts:  # colour = method, marker and line style = sweep
                ax.plot(*zip(*pts, strict=True), color=f"C{k}", marker="o" if sweep == "depth" else "s",
                        linestyle="-" if sweep == "depth" else "-.", label=f"{m}, {sweep} sweep")
    for k, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        for r in (r for r in rows if r["method"] == m and "preset" in r["sweeps"]):
            ax.scatter(r["weight_bytes"] / 2**20, r["peak_mib"], color=f"C{k}", marker="*", s=120, zorder=3)
            ax.annotate(f"{r['model']}, {m}", (r["weight_bytes"] / 2**20, r["peak_mib"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    top = max(r["weight_bytes"] / 2**20 for r in rows)
    ax.plot([0, top], [0, top], "k--", linewidth=1, label="y = x (model size)")
    ax.axhline(baseline, color="grey", linestyle=":", label="baseline (import torch, llmquant)")
    ax.set_xlabel("weights on disk (MiB)")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    configs: dict[tuple[int, int], list[str]] = {}
    for n in args.depths:
        configs.setdefault((args.hidden, n), []).append("depth")
    for h in args.widths:
        configs.setdefault((h, args.layers), []).append("width")
    for name in args.preset:
        configs.setdefault((name, args.preset_layers), []).append("preset")
    t0 = time.perf_counter()
    models = {c: model_dir(args, c[0], c[1], preset=c[0]) if "preset" in configs[c] else model_dir(args, *c)
              for c in configs}
    build_s = time.perf_counter() - t0
    baseline = run_child({"method": "baseline"})
    log(f"baseline (import torch, llmquant): {baseline['peak_mib']:.0f} MiB")
    info = {"command": shlex.join(["python", "scripts/memory_benchmark.py", *argv]), "type": args.type,
            "dtype": args.dtype, "threads": args.threads, "build_seconds": build_s,
            "machine": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    rows: list[dict] = []
    for c, sweeps in configs.items():
        for m in args.methods:
            rows.append({**measure(args, models[c], m, baseline["peak_mib"]), "sweeps": sweeps})
            result = {"run": info, "baseline": baseline, "rows": rows, "slopes": slopes(rows, args)}
            (args.work_dir / "memory.json").write_text(json.dumps(result, indent=1))
    plot(rows, baseline["peak_mib"], args.work_dir / "memory.png",
         f"llmquant {args.type}, {args.dtype} synthetic llama, {args.threads} thread(s)")
    print(table(rows))
    if holds_table(rows):
        print("\nwhat the peak holds, accounted from the shapes:\n" + holds_table(rows))
    print(f"\nbaseline (import torch, llmquant): {baseline['peak_mib']:.0f} MiB")
    for m, s in result["slopes"].items():
        anon = "-" if s["anon_mib_per_layer"] is None else f"{s['anon_mib_per_layer']:+.2f}"
        print(f"{m}: peak RSS slope {s['mib_per_layer']:+.2f} MiB/layer = {s['fraction_of_layer']:+.3f} x one layer "
              f"({s['layer_mib']:.2f} MiB on disk); RssAnon slope {anon} MiB/layer")
    log(f"wrote {args.work_dir / 'memory.json'} and {args.work_dir / 'memory.png'} "
        f"(build {build_s:.0f} s, total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
