"""Shared fixtures: the real default model, prepared once per machine."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as an HF checkpoint folder."""
    from llmquant.loading.default_model import default_model_dir

    return default_model_dir()
