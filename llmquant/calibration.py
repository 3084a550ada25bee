"""Calibration text -> token windows, reproducibly, from one source or a weighted mix.

Windows are non-overlapping slices of the tokenized text, chosen with a fixed
seed, so the same settings always give the same tokens (and the same file).
``source`` names where they come from (``--calib-source``):

- ``builtin``: the calibration part of the built-in text (``text.py``);
- ``file:PATH``: a UTF-8 text file; ``dataset:NAME``: a Hugging Face dataset's train split;
- ``generated``, ``chat``: sequences sampled from the model itself (``calibration_generate.py``);
- a mix, ``generated:0.5,builtin:0.5``: each part's weight is its share of the windows.

The default is ``generated``: measured on text of domains no source reads, it
gave the lowest KLD of the sources (docs/benchmarks.md, calibration sources),
where the built-in text's gain shrank away from its own domain.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LlmquantError

TEXT_KINDS = ("builtin", "file", "dataset")
SOURCE_KINDS = (*TEXT_KINDS, "generated", "chat")
_NEEDS_ARG = ("file", "dataset")
DEFAULT_SOURCE = "generated"


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    text_file: Path | None = None
    dataset: str | None = None
    batch_size: int = 8
    source: str | None = None  # None: DEFAULT_SOURCE, unless text_file or dataset names the text


@dataclass(frozen=True)
class Source:
    """One part of ``--calib-source``: its kind, its argument (a path or dataset name) and its weight."""

    kind: str
    arg: str | None = None
    weight: float = 1.0

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


def _weight(text: str) -> float | None:
    try:
        w = float(text)
    except ValueError:
        return None
    return w


def parse_sources(spec: str) -> list[Source]:
    """``--calib-source``'s parts, each ``KIND[:ARG][:WEIGHT]``, or a one-line error on the first bad one."""
    if not isinstance(spec, str) or not spec.strip():
        raise LlmquantError(f"--calib-source is empty; use one of {', '.join(SOURCE_KINDS)} or a mix such as "
                            "generated:0.5,builtin:0.5")
    out: list[Source] = []
    for part in spec.split(","):
        kind, *rest = part.strip().split(":")
        if kind not in SOURCE_KINDS:
            raise LlmquantError(f"--calib-source: unknown source {kind!r} in {spec!r}; use "
                                f"{', '.join(k + (':ARG' if k in _NEEDS_ARG else '') for k in SOURCE_KINDS)}, "
                                "each with an optional :WEIGHT")
        weight = 1.0
        if rest and (len(rest) > 1 or kind not in _NEEDS_ARG) and _weight(rest[-1]) is not None:
            weight = _weight(rest.pop())
            if not (math.isfinite(weight) and weight > 0):
                raise LlmquantError(f"--calib-source: the weight of {kind} must be a positive number, got {weight}")
        arg = ":".join(rest) or None
        if kind in _NEEDS_ARG and arg is None:
            raise LlmquantError(f"--calib-source: {kind} needs its {'path' if kind == 'file' else 'name'}, "
                                f"as {kind}:{'PATH' if kind == 'file' else 'NAME'}")
        if kind not in _NEEDS_ARG and arg is not None:
            raise LlmquantError(f"--calib-source: {kind} takes only a weight, got {kind}:{arg}")
        src = Source(kind, arg, weight)
        if any(str(s) == str(src) for s in out):
            raise LlmquantError(f"--calib-source names {src} twice; give it one weight")
        out.append(src)
    return out


def config_sources(cfg: CalibrationConfig) -> list[Source]:
    """The sources a config reads: ``--calib-text`` and ``--calib-dataset`` are the one-part ``file:`` and ``dataset:``."""
    legacy = [Source("file", str(cfg.text_file))] if cfg.text_file is not None else []
    legacy += [Source("dataset", cfg.dataset)] if cfg.dataset is not None else []
    if len(legacy) > 1:
        raise LlmquantError("pass either --calib-text FILE or --calib-dataset NAME, not both")
    if legacy and cfg.source is not None:
        raise LlmquantError(f"pass either {'--calib-text' if cfg.text_file is not None else '--calib-dataset'} "
                            "or --calib-source, not both")
    return legacy or parse_sources(DEFAULT_SOURCE if cfg.source is None else cfg.source)


def source_spec(cfg: CalibrationConfig) -> str:
    """The sources a config reads, spelled out (``generated:1.0``), the same however they were given."""
    return ",".join(f"{s}:{s.weight:g}" for s in config_sources(cfg))


def calibration_files(cfg: CalibrationConfig) -> list[Path]:
    """The text files a config reads (inputs the run must not overwrite, and whose bytes decide the output)."""
    return [Path(s.arg) for s in config_sources(cfg) if s.kind == "file"]


def split_counts(n: int, weights: list[float]) -> list[int]:
    """n windows shared by weight, largest remainder first (ties to the earlier part), summing to n."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def calibration_tokens(model_dir: Path, cfg: CalibrationConfig, *, progress: bool = False) -> torch.Tensor:
    """Token ids [n, seqlen] from the calibration sources (never evaluation text), parts in the order given."""
    sources = config_sources(cfg)
    counts = split_counts(cfg.samples, [s.weight for s in sources])
    parts = [_source_windows(model_dir, s, k, cfg, progress) for s, k in zip(sources, counts, strict=True)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _source_windows(model_dir: Path, src: Source, n: int, cfg: CalibrationConfig, progress: bool) -> torch.Tensor:
    if src.kind in TEXT_KINDS:
        return _text_windows(model_dir, src, n, cfg)
    from .calibration_generate import generated_windows

    return generated_windows(model_dir, n, cfg.seqlen, cfg.seed, kind=src.kind, progress=progress)


def _text_windows(model_dir: Path, src: Source, n: int, cfg: CalibrationConfig) -> torch.Tensor:
    from transformers import AutoTokenizer

    from .quiet import quiet_transformers
    from .text import load_text

    if n == 0:
        return torch.empty(0, cfg.seqlen, dtype=torch.long)
    text = load_text(src.arg if src.kind == "file" else None, src.arg if src.kind == "dataset" else None, "calib")
    with quiet_transformers():  # no "sequence longer than the model's maximum" line: windows are cut below
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // cfg.seqlen
    if available == 0:
        raise LlmquantError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of {cfg.seqlen} ({src}); "
            "pass a longer text or a smaller --calib-seqlen"
        )
    if available < n:
        warnings.warn(
            f"calibration text ({src}) holds only {available} windows of {cfg.seqlen} tokens "
            f"({available * cfg.seqlen} tokens); using {available} instead of {n}",
            stacklevel=2,
        )
        n = available
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(available, generator=g)[:n].sort().values
    windows = ids[: available * cfg.seqlen].view(available, cfg.seqlen)
    return windows[pick].clone()
