"""Under our commands, stderr holds only our own lines: progress bars, `warning:` and `error:`.

transformers prints tqdm bars and log lines of its own (loading, converting the
default model's GGUF, writing shards, tokenizing long text). Each command is run
as a user runs it, in a subprocess, and every line of its stderr is checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tiny import build_tiny_model

LLMQUANT = [sys.executable, "-m", "llmquant.cli"]
OURS = re.compile(r"^(warning: |error: |layers:|perplexity:|preparing the default model )")


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(LLMQUANT + args, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env})


def foreign_lines(stderr: str) -> list[str]:
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr)]
    return [line for line in lines if line and not OURS.match(line)]


def test_default_model_preparation_prints_only_our_line(tmp_path):
    out = tmp_path / "m.gguf"
    proc = run(["quantize", "--type", "q8_0", "--method", "rtn", "--quiet", "--out", str(out)],
               LLMQUANT_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"preparing the default model SmolLM2-135M-Instruct into {tmp_path / 'cache' / 'SmolLM2-135M-Instruct'} (once)"]
    assert proc.stdout.startswith(f"wrote {out}\n")


def test_calibrated_quantize_and_hf_perplexity_print_only_our_lines(smollm2_dir, tmp_path):
    model = build_tiny_model(tmp_path / "tiny", "llama", smollm2_dir, layers=2)
    tok_config = model / "tokenizer_config.json"  # as most checkpoints have it: then transformers warns of long text
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()), "model_max_length": 512}))
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 997} and more text" for i in range(20000)))
    proc = run(["quantize", str(model), "--type", "q4_0", "--method", "awq", "--calib-text", str(text),
                "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(tmp_path / "t.gguf")])
    assert proc.returncode == 0, proc.stderr
    assert foreign_lines(proc.stderr) == []  # stderr is a pipe here, so even our bar is off
    proc = run(["perplexity", str(model), "--hf", "--text", str(text), "--ctx", "64", "--windows", "2"])
    assert proc.returncode == 0, proc.stderr
    assert "perplexity:" in proc.stderr
    assert foreign_lines(proc.stderr) == []


def test_generate_prints_no_llama_cpp_log(smollm2_dir, tmp_path):
    model = build_tiny_model(tmp_path / "tiny", "llama", smollm2_dir, layers=1)
    out = tmp_path / "t.gguf"
    assert run(["quantize", str(model), "--type", "q8_0", "--quiet", "--out", str(out)]).returncode == 0
    proc = run(["generate", str(out), "Hello", "--max-tokens", "4"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("Hello")
