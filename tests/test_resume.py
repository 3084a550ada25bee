"""--resume after kill -9: byte-identical output, refused when a setting changed, work folder cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from same_file import assert_same_file
from tiny import build_tiny_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# gptq on a deep tiny model: each layer takes long enough to be killed in the middle of the run
ARGS = ["--type", "q4_0", "--method", "gptq", "--calib-samples", "16", "--calib-seqlen", "128", "--quiet"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmquant.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def deep(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("resume") / "deep", "llama", smollm2_dir,
                            hidden=128, layers=12, tied=False)


@pytest.fixture(scope="module")
def uninterrupted(deep, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("whole")
    proc = cli("quantize", str(deep), "--out", str(d / "m.gguf"), *ARGS, cwd=d)
    assert proc.returncode == 0, proc.stderr
    assert not (d / "m.gguf.llmquant-work").exists()  # removed after success
    return d / "m.gguf"


def kill_after(deep: Path, out: Path, layers: int, extra: tuple[str, ...] = (), args: list[str] = ARGS) -> dict:
    """Start a run, SIGKILL it once ``layers`` layer boundaries are recorded; the state it left."""
    state = out.with_name(out.name + ".llmquant-work") / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "llmquant.cli", "quantize", str(deep), "--out", str(out),
                             *args, *extra], cwd=out.parent, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"run ended before it could be killed: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "no layer boundary recorded in time"
            try:
                if json.loads(state.read_text())["layers_done"] >= layers:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    return json.loads(state.read_text())


def test_resume_after_kill_is_byte_identical(deep, uninterrupted, tmp_path):
    out = tmp_path / "m.gguf"
    left = kill_after(deep, out, layers=3)
    assert 3 <= left["layers_done"] < 12
    proc = cli("quantize", str(deep), "--out", str(out), *ARGS, "--resume", "--report", str(tmp_path / "r.json"),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["resumed_at_layer"] >= left["layers_done"]
    assert len(report["linears"]) == 12 * 7  # the reports of the layers done before the kill are kept
    assert_same_file(out, uninterrupted)
    assert report["checksum"].startswith("sha256:")
    assert not out.with_name("m.gguf.llmquant-work").exists()


def test_changed_setting_refuses_to_resume(deep, tmp_path):
    out = tmp_path / "m.gguf"
    kill_after(deep, out, layers=1)
    proc = cli("quantize", str(deep), "--out", str(out), *ARGS, "--damp", "0.05", "--resume", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot resume: method_options.damp was 0.01, now 0.05"), lines[0]
    assert not out.exists()
    # without --resume an existing work folder is never thrown away silently
    proc = cli("quantize", str(deep), "--out", str(out), *ARGS, cwd=tmp_path)
    assert proc.returncode == 2 and "add --resume to continue it" in proc.stderr, proc.stderr
    assert (tmp_path / "m.gguf.llmquant-work" / "state.json").is_file()


def test_other_thread_count_refuses_to_resume(deep, tmp_path):
    """Calibrated bytes are reproducible per thread count (LAPACK sums in a thread-dependent order)."""
    out = tmp_path / "m.gguf"
    kill_after(deep, out, layers=1, extra=("--threads", "1"))
    proc = cli("quantize", str(deep), "--out", str(out), *ARGS, "--threads", "2", "--resume", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot resume: torch_threads was 1, now 2" in proc.stderr, proc.stderr


def test_second_run_on_the_same_output_is_refused(deep, tmp_path):
    out = tmp_path / "m.gguf"
    first = subprocess.Popen([sys.executable, "-m", "llmquant.cli", "quantize", str(deep), "--out", str(out), *ARGS],
                             cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "m.gguf.llmquant-work" / "partial.gguf").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc = cli("quantize", str(deep), "--out", str(out), *ARGS, "--resume", cwd=tmp_path)
        assert proc.returncode == 2 and "another llmquant run is using" in proc.stderr, proc.stderr
        assert first.wait(timeout=300) == 0  # the first run is not disturbed
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert out.is_file() and not (tmp_path / "m.gguf.llmquant-work").exists()


def test_resume_without_work_folder_starts_fresh(deep, uninterrupted, tmp_path):
    proc = cli("quantize", str(deep), "--out", str(tmp_path / "m.gguf"), *ARGS, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_same_file(tmp_path / "m.gguf", uninterrupted)


def test_written_file_is_checked_and_checksummed(deep, tmp_path):
    """The report's checksum is the sha256 of the file's tensor data; a damaged file fails the check."""
    import hashlib

    import gguf

    from llmquant import quantize
    from llmquant.errors import LlmquantError
    from llmquant.export.gguf_file import verify_gguf

    out = tmp_path / "m.gguf"
    report = quantize(deep, out, type="q8_0", progress=False)
    data = out.read_bytes()
    start = int(gguf.GGUFReader(out).data_offset)
    assert report.checksum == "sha256:" + hashlib.sha256(data[start:]).hexdigest()
    planned = [(t.name, t.nbytes) for t in report.tensors]
    assert verify_gguf(out, planned) == report.checksum
    with pytest.raises(LlmquantError, match="does not hold the planned tensors"):
        verify_gguf(out, planned[:-1])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:-64])
    with pytest.raises(LlmquantError, match="does not read back"):
        verify_gguf(bad, planned)
    bad.write_bytes(data + bytes(32))
    with pytest.raises(LlmquantError, match=f"is {len(data) + 32} bytes, expected {len(data)}"):
        verify_gguf(bad, planned)


# ---------------------------------------------------------------- every registered method resumes

def _method_args(method: str) -> list[str]:
    """``method`` is a name, optionally followed by its own flags."""
    from llmquant.methods import make_method

    name, *flags = method.split()
    m = make_method(name)
    calib = ["--calib-samples", "8", "--calib-seqlen", "64"] if m.needs_calibration else []
    tune = ["--tune-steps", "8"] if "steps" in m.settings() else []  # the state is per layer: a few steps show it
    return ["--type", "q4_0", "--method", name, *calib, *tune, *flags, "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def wide(smollm2_dir, tmp_path_factory) -> Path:
    # an untied 12.6M-weight head is written after the last layer: even rtn is still running
    # when the first layer boundary is recorded
    return build_tiny_model(tmp_path_factory.mktemp("resume-all") / "wide", "llama", smollm2_dir,
                            hidden=256, layers=8, tied=False)


def _registered_methods() -> list[str]:
    """Every method, but of the tune methods only ``tune`` and ``awq+gptq+tune``: ``gptq+tune`` and
    ``awq+tune`` differ from those only by their start method, which resumes here on its own (CI time);
    and tuning to the full-precision layer's outputs on the quantized inputs, the other ``--tune-target``
    (the default carries a second, full-precision stream of hidden states across the layer boundary);
    and gptq fitted to its layers alone (the default, fitted to the full-precision model, carries that stream too)."""
    from llmquant.methods import METHODS

    return [m for m in METHODS if m not in ("gptq+tune", "awq+tune")] + ["awq+gptq+tune --tune-target layer",
                                                                         "gptq --gptq-target layer"]


@pytest.mark.parametrize("method", _registered_methods())
def test_every_method_resumes_byte_identical(method, wide, tmp_path):
    """Settings that JSON changes (tuples become lists) must not block a resume (issue 17)."""
    args = _method_args(method)
    whole = tmp_path / "whole.gguf"
    proc = cli("quantize", str(wide), "--out", str(whole), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "cut.gguf"
    done = kill_after(wide, out, layers=1, args=args)["layers_done"]
    assert 1 <= done < 8
    proc = cli("quantize", str(wide), "--out", str(out), *args, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resumed after layer" in proc.stdout
    assert_same_file(out, whole)


def test_changed_option_is_named_with_old_and_new_value():
    from llmquant.workdir import canonical, fingerprint_changes

    old = canonical({"type": "q4_0", "method_options": {"clip_ratios": (1.0, 0.975), "damp": 0.01}})
    assert fingerprint_changes(old, {"type": "q4_0", "method_options": {"clip_ratios": (1.0, 0.975), "damp": 0.01}}) == []
    assert fingerprint_changes(old, {"type": "q4_0", "method_options": {"clip_ratios": (1.0, 0.975), "damp": 0.05}}) \
        == ["method_options.damp was 0.01, now 0.05"]
    assert fingerprint_changes(old, {"type": "q5_0", "method_options": {"clip_ratios": [1.0], "damp": 0.01}}) == [
        "method_options.clip_ratios was [1.0, 0.975], now [1.0]", "type was 'q4_0', now 'q5_0'"]


def _boundary(layers_done: int, reports: list, hidden=None):
    from llmquant.workdir import ResumePoint

    return ResumePoint(layers_done, offset=100 * layers_done, n_written=layers_done, hidden=hidden, reports=reports)


def test_boundary_is_recorded_as_it_was_handed_over(tmp_path):
    """The record goes on in the background while the caller writes the next layer, changing what the
    point held: the state and the stream are those of the moment save was called."""
    import torch

    from llmquant.methods import LinearReport
    from llmquant.workdir import WorkDir

    work = WorkDir(tmp_path / "m.gguf")
    assert work.open({"model": "x"}, resume=False) is None
    work.partial.write_bytes(bytes(400))
    reports, hidden = [LinearReport("a"), LinearReport("b")], torch.arange(6.0).reshape(2, 3)
    synced = []
    work.save(_boundary(2, reports, hidden), sync=lambda: synced.append(2))
    reports.append(LinearReport("c"))  # the next layer's, before the record is done
    hidden.zero_()
    assert work.resumable  # waits for the boundary in flight
    point = work._load()
    assert synced == [2] and (point.layers_done, point.offset) == (2, 200)
    assert [r.name for r in point.reports] == ["a", "b"]
    assert torch.equal(point.hidden, torch.arange(6.0).reshape(2, 3))
    work.remove()


def test_boundary_whose_sync_failed_is_never_recorded(tmp_path):
    """A failed fsync (a full disk) leaves the boundary before it in place, and the error surfaces at
    the next boundary or at the end, never silently."""
    from llmquant.workdir import WorkDir

    work = WorkDir(tmp_path / "m.gguf")
    work.open({"model": "x"}, resume=False)
    work.partial.write_bytes(bytes(400))
    work.save(_boundary(1, []), sync=lambda: None)

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    work.save(_boundary(2, []), sync=full_disk)
    with pytest.raises(OSError, match="No space left"):
        work.save(_boundary(3, []), sync=lambda: None)
    assert work._load().layers_done == 1
    work.save(_boundary(3, []), sync=full_disk)
    work.settle(quiet=True)  # a run failing for another reason keeps the boundary before
    assert work._load().layers_done == 1
    work.remove()
