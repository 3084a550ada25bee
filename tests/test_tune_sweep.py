"""scripts/tune_sweep.py on a tiny model: each layer's distance from the full-precision stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import build_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tune_sweep.py"


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny(smollm2_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("sweep") / "llama", "llama", smollm2_dir, hidden=128, layers=3)


@pytest.mark.parametrize("loss", ["hidden", "normed"])
def test_sweep_reports_the_distance_the_tuning_measured(loss, tiny, tmp_path):
    """The script's distance (the quantized stream against the full-precision one, measured after the
    method) equals what the tune method itself measured against the model's output for the codes it
    kept, in the error the tuning minimized; the start method alone, which tuning starts from, is
    never closer; and the sweep stops at --layers."""
    out = tmp_path / "sw"
    spec = f"awq+gptq+tune@n_grid=5@steps=30@loss={loss}"
    proc = sweep("--model", str(tiny), "--layers", "2", "--calib-samples", "8", "--calib-seqlen", "64",
                 "--methods", f"awq+gptq@n_grid=5,{spec}", "--distance", loss, "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "sweep.json").read_text())["results"]
    start, tuned = results["awq+gptq@n_grid=5"], results[spec]
    assert [r["layer"] for r in start] == [r["layer"] for r in tuned] == [0, 1]
    key = f"{loss}_vs_model"
    for r in tuned:
        kept = r["layer_err_tuned"] if r["kept"] == "tuned" else r["layer_err_start"]
        assert r[key] == pytest.approx(kept, rel=1e-5)
    # layer 0 starts from the same codes in both runs; tuning keeps only what lowers the error
    assert tuned[0]["layer_err_start"] == pytest.approx(start[0][key], rel=1e-5)
    assert tuned[0][key] <= start[0][key]
    assert any(r["kept"] == "tuned" for r in tuned)
    assert f"{loss} distance from the full-precision model" in proc.stdout
    assert f"| {spec} |" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "gptq@damp=x"], "--damp must be a number, got 'x'"),
    (["--methods", "rtn"], "only calibrated methods have layers to compare"),
    (["--methods", "gptq", "--layers", "0"], "--layers must be at least 1"),
])
def test_bad_settings_are_one_line_and_exit_2(args, message, tmp_path):
    proc = sweep(*args, "--out-dir", str(tmp_path / "never"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
