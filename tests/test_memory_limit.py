"""A model twice the size of the memory the process may use still quantizes, and runs in llama.cpp.

The limit is RLIMIT_DATA, set for the child process only: it bounds the heap
and every private anonymous mapping, i.e. the memory llmquant itself
allocates. RLIMIT_AS would instead count address space that torch and its
thread pools reserve without ever touching (over a GiB), and a cgroup is not
available to an unprivileged test. Weights are read by byte range, not
mmapped, so the checkpoint's pages never count against the limit.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

LIMIT_MIB = 640
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "synthetic_model.py"
# One thread: every thread's stack is private memory too, so the limit would otherwise depend on the core count.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def synthetic():
    spec = importlib.util.spec_from_file_location("synthetic_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def limited(limit_mib: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_mib * 2**20, limit_mib * 2**20))
    return apply


@pytest.fixture(scope="module")
def big_model(smollm2_dir, tmp_path_factory) -> Path:
    """float32, 20 layers of width 1024, 49152-token vocabulary: 1.4 GB of safetensors."""
    out = tmp_path_factory.mktemp("memory-limit") / "big"
    return synthetic().build_synthetic_llama(out, hidden=1024, layers=20, dtype="float32", shard_mib=512,
                                             tokenizer_dir=smollm2_dir)


def quantize_limited(model: Path, out: Path, limit_mib: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmquant.cli", "quantize", str(model), "--out", str(out),
                           "--type", "q4_0", "--quiet", "--threads", "1", *extra], env=ENV, capture_output=True,
                          text=True, timeout=900, preexec_fn=limited(limit_mib))


def test_model_twice_the_memory_limit(big_model, tmp_path):
    size = sum(f.stat().st_size for f in big_model.glob("*.safetensors"))
    assert size >= 2 * LIMIT_MIB * 2**20, size
    out = tmp_path / "big-q4_0.gguf"
    proc = quantize_limited(big_model, out, LIMIT_MIB)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from llmquant.generate import generate

    text = generate(out, "The capital of France is", max_tokens=4, threads=1)
    assert isinstance(text, str) and text  # random weights: any tokens, but it must load and run


def test_too_little_memory_is_a_clear_error(big_model, tmp_path):
    """GPTQ's calibration activations alone (120 x 512 tokens x 1024 x fp32: 240 MiB, twice) exceed the
    limit: the run stops with one line and leaves no output."""
    proc = quantize_limited(big_model, tmp_path / "x.gguf", LIMIT_MIB, "--method", "gptq", "--calib-samples", "120",
                            "--calib-source", "builtin")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert lines[0].startswith("error: out of memory"), lines[0]
    assert list(tmp_path.iterdir()) == []  # died in layer 0: no finished layer, so no work folder kept
