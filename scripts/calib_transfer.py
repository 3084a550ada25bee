"""Does calibration transfer? Each --calib-source, measured on text domains calibration never saw.

    python scripts/calib_transfer.py [--model M] [--type q4_0] [--methods gptq,awq+gptq]
                                     [--sources "builtin;generated;chat;generated:0.5,builtin:0.5"]
                                     [--domains builtin,news,wiki] [--calib-samples 32] [--ctx 512]
                                     [--windows 48] [--no-imatrix] [--out-dir transfer-out]

Writes an f32 reference GGUF with llmquant and llama-quantize's file of it
(default policy, no importance matrix), then for every calibration source an
importance matrix on that source's windows with llama-quantize --imatrix, and
every llmquant method on that source. Every file is evaluated against the f32
file on each evaluation domain (``llmquant/domains.py``; ``builtin`` is the
held-out part of the built-in text, the others are texts of other domains that
no source reads). Prints a markdown table of KLD per domain with each file's
ratio to llama.cpp's and to llama.cpp+imatrix on the same source, the mean
ratio on the unseen domains and the transfer ratio (that mean over the ratio
on ``builtin``), and writes results.json, table.md and transfer.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import method_spec  # noqa: E402

import llmquant  # noqa: E402
from llmquant.errors import LlmquantError  # noqa: E402
from llmquant.eval.perplexity import evaluate_many  # noqa: E402

LLAMA_CPP = "llama.cpp"
LLAMA_CPP_IMATRIX = "llama.cpp+imatrix"
TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "Q4_K_M", "Q5_K_M", "Q6_K")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--type", default="q4_0", choices=TYPES)
    p.add_argument("--methods", default="gptq,awq+gptq")
    p.add_argument("--sources", default="builtin;generated;chat;generated:0.5,builtin:0.5",
                   help="calibration sources, separated by ';' (a source may itself be a mix with ',')")
    p.add_argument("--domains", default="builtin,news,wiki")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=48,
                   help="windows of --ctx tokens per domain (fewer make the per-domain ratios noisy)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-imatrix", dest="imatrix", action="store_false",
                   help="skip llama.cpp+imatrix (an importance matrix on each source, then llama-quantize --imatrix)")
    p.add_argument("--out-dir", type=Path, default=Path("transfer-out"))
    return p


def _calibration(args, source: str):
    return llmquant.CalibrationConfig(samples=args.calib_samples, seqlen=args.calib_seqlen, source=source)


def _files(args, out: Path) -> list[dict]:
    """One row per file: llama.cpp's (no calibration), then per source llama.cpp+imatrix and every method.

    The importance matrix of a source is llmquant's streamed imatrix on that
    source's windows (the same statistics llama-imatrix computes on them, see
    tests/test_imatrix.py), so generated and chat sources, which are token ids
    rather than text, reach llama-quantize exactly as the methods see them.
    """
    from llmquant.eval.llamacpp_tools import quantize_with_imatrix
    from llmquant.imatrix import compute_imatrix
    from llmquant.methods import method_registry

    f32 = out / "f32.gguf"
    if not f32.exists():
        llmquant.quantize(args.model, f32, type="f32", progress=False)
    rows = [{"file": LLAMA_CPP, "method": LLAMA_CPP, "source": None, "path": out / f"llama.cpp-{args.type}.gguf"}]
    if not rows[0]["path"].exists():
        quantize_with_imatrix(f32, rows[0]["path"], args.type, None, args.threads)
    for i, source in enumerate(args.sources.split(";")):
        if args.imatrix:
            imatrix = out / f"source{i}-{args.calib_samples}x{args.calib_seqlen}.imatrix.gguf"
            if not imatrix.exists():
                print(f"imatrix on {source} ...", file=sys.stderr)
                compute_imatrix(args.model, imatrix, calibration=_calibration(args, source), progress=False)
            path = out / f"llama.cpp+imatrix-{args.type}-source{i}.gguf"
            if not path.exists():
                quantize_with_imatrix(f32, path, args.type, imatrix, args.threads)
            rows.append({"file": f"{LLAMA_CPP_IMATRIX} [{source}]", "method": LLAMA_CPP_IMATRIX, "source": source,
                         "path": path})
        for method in args.methods.split(","):
            path = out / f"{method}-{args.type}-source{i}.gguf"
            name, options = method_spec(method)  # awq+gptq@gptq_target=model: a method with options
            if not path.exists():
                print(f"quantizing {method} on {source} ...", file=sys.stderr)
                calib = _calibration(args, source) if method_registry()[name].needs_calibration else None
                llmquant.quantize(args.model, path, type=args.type, method=name, method_options=options or None,
                                  calibration=calib, threads=args.threads, progress=False,
                                  report=path.with_suffix(".report.json"))  # where the time went (stages)
            rows.append({"file": f"{method} [{source}]", "method": method, "source": source, "path": path})
    return rows


def add_ratios(rows: list[dict], domains: list[str]) -> None:
    """Each row's KLD ratio per domain to llama.cpp's file and to llama.cpp+imatrix on the same source,
    and its transfer ratio: the mean ratio on the domains calibration never saw over the ratio on ``builtin``
    (1.0: the gain over llama.cpp holds on unseen text; above 1: it shrinks there)."""
    base = next(r for r in rows if r["method"] == LLAMA_CPP)["kld"]
    imatrix = {r["source"]: r["kld"] for r in rows if r["method"] == LLAMA_CPP_IMATRIX}
    unseen = [d for d in domains if d != "builtin"]
    for r in rows:
        r["ratio"] = {d: r["kld"][d] / base[d] for d in domains}
        im = imatrix.get(r["source"]) if r["method"] != LLAMA_CPP_IMATRIX else None
        r["ratio_imatrix"] = {d: r["kld"][d] / im[d] for d in domains} if im else None
        r["mean_kld"] = sum(r["kld"].values()) / len(domains)
        r["mean_unseen_ratio"] = sum(r["ratio"][d] for d in unseen) / len(unseen) if unseen else None
        r["transfer"] = (r["mean_unseen_ratio"] / r["ratio"]["builtin"]
                         if unseen and "builtin" in domains else None)


def table(rows: list[dict], domains: list[str]) -> str:
    head = ("| file | " + " | ".join(f"KLD {d} (vs llama.cpp, vs +imatrix)" for d in domains)
            + " | mean KLD | mean unseen ratio | transfer |")
    lines = [head, "|" + "---|" * (len(domains) + 4)]
    for r in rows:
        cells = []
        for d in domains:
            im = "" if r["ratio_imatrix"] is None else f", {r['ratio_imatrix'][d]:.3f}x"
            cells.append(f"{r['kld'][d]:.4f} ({r['ratio'][d]:.3f}x{im})")
        unseen = "" if r["mean_unseen_ratio"] is None else f"{r['mean_unseen_ratio']:.3f}x"
        transfer = "" if r["transfer"] is None else f"{r['transfer']:.2f}"
        lines.append(f"| {r['file']} | {' | '.join(cells)} | {r['mean_kld']:.4f} | {unseen} | {transfer} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from llmquant.domains import domain_text

    args = _parser().parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    domains = args.domains.split(",")
    texts = {d: domain_text(d) for d in domains}
    t0 = time.perf_counter()
    rows = _files(args, out)
    quant_s = time.perf_counter() - t0
    for d in domains:  # every file in one pass per domain: the f32 reference's logits once per window
        scores = evaluate_many([r["path"] for r in rows], text=texts[d], ctx=args.ctx, windows=args.windows,
                               ref=out / "f32.gguf", threads=args.threads, progress=False)
        for r, score in zip(rows, scores, strict=True):
            r.setdefault("kld", {})[d] = score.kld
        print(f"{d}: " + ", ".join(f"{r['file']} {r['kld'][d]:.4f}" for r in rows), file=sys.stderr)
    for r in rows:
        r["path"] = str(r["path"])
    add_ratios(rows, domains)
    text = table(rows, domains)
    print(text)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "model": args.model or "SmolLM2-135M-Instruct", "type": args.type, "ctx": args.ctx,
            "windows": args.windows, "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen,
            "domains": domains, "threads": args.threads, "quantize_seconds": quant_s,
            "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    (out / "table.md").write_text(text + "\n")
    _plot(rows, domains, out / "transfer.png", args.type)
    return 0


def _plot(rows: list[dict], domains: list[str], path: Path, qtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(domains), 4))
    width = 0.8 / len(rows)
    x = np.arange(len(domains))
    for i, r in enumerate(rows):
        ax.bar(x + i * width, [r["kld"][d] for d in domains], width, label=r["file"])
    ax.set_xticks(x + 0.4 - width / 2, domains)
    ax.set_ylabel(f"KLD vs f32 ({qtype}, lower is better)")
    ax.set_title("calibration source vs evaluation domain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LlmquantError as exc:
        sys.exit(f"error: {exc}")
