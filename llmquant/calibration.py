"""Calibration text -> token windows, reproducibly.

Windows are non-overlapping slices of the tokenized text, chosen with a fixed
seed, so the same settings always give the same tokens (and the same file).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LlmquantError


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    text_file: Path | None = None
    dataset: str | None = None
    batch_size: int = 8


def calibration_tokens(model_dir: Path, cfg: CalibrationConfig) -> torch.Tensor:
    """Token ids [n, seqlen] from the calibration text (never the evaluation part)."""
    from transformers import AutoTokenizer

    from .quiet import quiet_transformers
    from .text import load_text

    text = load_text(cfg.text_file, cfg.dataset, "calib")
    with quiet_transformers():  # no "sequence longer than the model's maximum" line: windows are cut below
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // cfg.seqlen
    if available == 0:
        raise LlmquantError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of {cfg.seqlen}; "
            "pass a longer --calib-text or a smaller --calib-seqlen"
        )
    n = cfg.samples
    if available < n:
        warnings.warn(
            f"calibration text holds only {available} windows of {cfg.seqlen} tokens "
            f"({available * cfg.seqlen} tokens); using {available} instead of {n}",
            stacklevel=2,
        )
        n = available
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(available, generator=g)[:n].sort().values
    windows = ids[: available * cfg.seqlen].view(available, cfg.seqlen)
    return windows[pick].clone()
