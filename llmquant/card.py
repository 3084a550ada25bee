"""The model card beside a quantized file (``FILE.md``), as GGUF publishers write one.

``quantize --card`` writes what the run knows: the model, the recipe, the method
and every option that decided the bytes, the tensors per type, bits per weight,
the checksum of the tensor data. ``compare --card`` adds what was measured: the
side-by-side table against llama.cpp's quantizer and a KLD-vs-size plot
(``FILE.kld.png``). Each writer owns its section between markers, so either may
run first and running one again replaces only its own part.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

from . import __version__
from .paths import write_atomic

SECTIONS = ("quantize", "compare")


def card_path(out: Path) -> Path:
    """``model-q4_0.gguf`` -> ``model-q4_0.md``."""
    out = Path(out)
    return out.with_suffix(".md") if out.suffix else out.with_name(out.name + ".md")


def _marked(section: str, body: str) -> str:
    return f"<!-- llmquant:{section} -->\n{body.rstrip()}\n<!-- /llmquant:{section} -->\n"


def update_card(path: Path, section: str, body: str, title: str) -> Path:
    """Write ``body`` as ``section`` of the card at ``path``, keeping the other section (atomic)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    parts = {}
    for name in SECTIONS:
        m = re.search(rf"<!-- llmquant:{name} -->\n.*?<!-- /llmquant:{name} -->\n", old, flags=re.S)
        if m:
            parts[name] = m.group(0)
    parts[section] = _marked(section, body)
    first = old.split("\n", 1)[0]
    title = first[2:] if first.startswith("# ") else title  # the first writer names the card
    text = f"# {title}\n\n" + "\n".join(parts[n] for n in SECTIONS if n in parts)
    write_atomic(path, text.encode("utf-8"))
    return path


def quantize_section(report, settings: dict) -> str:
    """The card's part from a QuantReport and the run's settings (what the resume fingerprint holds)."""
    by_type, params = Counter(), Counter()
    for t in report.tensors:
        by_type[t.type] += 1
        params[t.type] += t.n_elements
    lines = [
        f"Quantized by llmquant {__version__} from `{report.model}`.",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{Path(report.out).name}` ({report.file_size:,} bytes) |",
        f"| recipe | {report.type.upper()}{' (pure: every weight in the base type)' if report.pure else ''} |",
        f"| method | {report.method} |",
    ]
    options = settings.get("method_options") or {}
    if options:
        lines.append("| method options | " + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + " |")
    calib = settings.get("calibration")
    if calib:
        src = calib.get("source") or calib.get("text_file") or calib.get("dataset") or "builtin"
        lines.append(f"| calibration | {calib['samples']} x {calib['seqlen']} tokens from `{src}` (--calib-source), "
                     f"seed {calib['seed']} |")
    if report.imatrix:
        lines.append(f"| importance matrix | `{Path(report.imatrix).name}` (llama-quantize's weighted searches) |")
    lines += [
        f"| parameters | {report.n_params / 1e6:.1f}M |",
        f"| bits per weight | {report.bits_per_weight:.3f} |",
        f"| tensor data sha256 | `{report.checksum}` |",
        f"| time | {report.seconds:.1f} s on {report.device}, peak memory {report.peak_rss_mib:.0f} MiB |",
        "",
        "| tensor type | tensors | weights |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v} | {params[k] / 1e6:.2f}M |" for k, v in sorted(by_type.items())]
    notes = Counter(t.note for t in report.tensors if t.note)
    if notes:
        lines += ["", "Fallbacks (llama.cpp's, where a row is not a multiple of the type's block):", ""]
        lines += [f"- {n} ({c} tensor{'s' if c > 1 else ''})" for n, c in notes.items()]
    lines += ["", f"Run: `llama-cli -m {Path(report.out).name}` (llama.cpp), or "
                  f"`llmquant generate {Path(report.out).name} \"...\"`."]
    return "\n".join(lines)


def compare_section(result, plot: Path | None) -> str:
    """The card's part from a CompareResult: the measured table, the completions, the plot."""
    lines = ["## Measured against llama.cpp's own quantizer", "", result.table()]
    if plot is not None:
        lines += ["", f"![KLD against bits per weight]({plot.name})"]
    return "\n".join(lines)


def plot_compare(result, path: Path) -> Path:
    """KLD against bits per weight, one point per file of the comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, r in enumerate(result.rows):
        ax.scatter(r.bits_per_weight, r.kld, s=60, marker="o" if i == 0 else "s", zorder=3,
                   label=f"{r.name} (KLD {r.kld:.4f})")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(f"KL-divergence vs f32 ({result.tokens} tokens)")
    ax.set_title(f"{result.type.upper()}: lower is better", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path
