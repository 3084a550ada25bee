"""Bad input through the real CLI: a one-line error, exit code 2, and nothing left in the output folder.

Each case runs ``python -m llmquant.cli`` as a subprocess against a broken copy of one tiny
random model (built once for the module). A copy links every file of the good model and
replaces only the files its case breaks, so the cases stay cheap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny import build_tiny_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
SAFETENSORS = "model.safetensors"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmquant.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single non-empty stderr line, checked to be a one-line 'error:' with exit code 2."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def tiny(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("bad-input") / "tiny", "llama", smollm2_dir)


def linked_copy(src: Path, dst: Path) -> Path:
    """dst with a symlink to every file of src; mutators replace a link, never write through it."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


def replace(path: Path, data: bytes | str) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def edit_config(**changes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        replace(d / "config.json", json.dumps(cfg))
    return mutate


def remove(*names: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        for name in names:
            (d / name).unlink()
    return mutate


def truncate_weights(d: Path) -> None:
    data = (d / SAFETENSORS).read_bytes()
    replace(d / SAFETENSORS, data[: len(data) // 2])


def garbage_header(d: Path) -> None:
    replace(d / SAFETENSORS, struct.pack("<Q", 32) + b"\x93\x00not json at all, just bytes\xff" + bytes(64))


def non_object_header(d: Path) -> None:
    header = b"[1, 2, 3]"
    replace(d / SAFETENSORS, struct.pack("<Q", len(header)) + header)


def missing_shard(d: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(d / SAFETENSORS), framework="pt") as f:
        names = list(f.keys())
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (d / SAFETENSORS).rename(d / first)
    weight_map = {n: (second if n.startswith("model.layers.1.") else first) for n in names}
    replace(d / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))


def only_pytorch_bin(d: Path) -> None:
    (d / SAFETENSORS).unlink()
    replace(d / "pytorch_model.bin", b"placeholder: not a real pickle")


def rewrite_tensor(name: str, change) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / SAFETENSORS)
        tensors[name] = change(tensors[name])
        (d / SAFETENSORS).unlink()
        save_file(tensors, d / SAFETENSORS, metadata={"format": "pt"})
    return mutate


def with_nan(t):
    t = t.clone()
    t[1, 2] = float("nan")
    return t


def with_inf(t):
    t = t.clone()
    t[0, 3] = float("-inf")
    return t


def to_int8(t):
    import torch

    return t.to(torch.int8)


@dataclass(frozen=True)
class Case:
    expect: str  # regex the error line must match: it names the problem
    model: str | None = None  # a literal model argument instead of a broken copy
    mutate: Callable[[Path], None] | None = None
    args: tuple[str, ...] = ()


NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"

CASES = {
    "unknown-hub-id": Case(r"cannot fetch model 'nobody/does-not-exist-xyz' from the Hugging Face hub: .*local cache",
                           model="nobody/does-not-exist-xyz"),
    "missing-local-path": Case(r"model '\./no/such/dir' not found", model="./no/such/dir"),
    "no-config": Case(r"has no config\.json", mutate=remove("config.json")),
    "config-not-json": Case(r"cannot read .*config\.json: ", mutate=lambda d: replace(d / "config.json", "{not json")),
    "config-missing-key": Case(r"config\.json has no hidden_size", mutate=edit_config(hidden_size=None)),
    "unsupported-arch": Case(r"unsupported architecture GPT2LMHeadModel",
                             mutate=edit_config(architectures=["GPT2LMHeadModel"])),
    "truncated-safetensors": Case(r"truncated safetensors file model\.safetensors", mutate=truncate_weights),
    "garbage-safetensors-header": Case(r"corrupt safetensors file model\.safetensors", mutate=garbage_header),
    "garbage-safetensors-file": Case(r"corrupt safetensors file model\.safetensors: header length \d+ exceeds the file",
                                     mutate=lambda d: replace(d / SAFETENSORS, b"\xde\xad\xbe\xef" * 64)),
    "non-object-safetensors-header": Case(r"corrupt safetensors file model\.safetensors: header is not a JSON object",
                                          mutate=non_object_header),
    "missing-shard": Case(r"model\.safetensors\.index\.json names missing shard\(s\): model-00002-of-00002",
                          mutate=missing_shard),
    "only-pytorch-bin": Case(r"no safetensors weights in .*pytorch_model\.bin", mutate=only_pytorch_bin),
    "no-tokenizer": Case(r"no tokenizer in .*tokenizer\.json or tokenizer\.model",
                         mutate=remove("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")),
    "tokenizer-not-json": Case(r"cannot read .*tokenizer\.json: ",
                               mutate=lambda d: replace(d / "tokenizer.json", '{"model": ')),
    "tokenizer-config-not-json": Case(r"cannot read .*tokenizer_config\.json: ",
                                      mutate=lambda d: replace(d / "tokenizer_config.json", '{"bos_token": ')),
    "vocab-size-mismatch": Case(r"model\.embed_tokens\.weight has shape \[49152, 64\] but config\.json says vocab_size=50000",
                                mutate=edit_config(vocab_size=50000)),
    "hidden-size-mismatch": Case(r"model\.embed_tokens\.weight has shape \[49152, 64\] .*hidden_size=128",
                                 mutate=edit_config(hidden_size=128)),
    "intermediate-size-mismatch": Case(r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[192, 64\] "
                                       r"but config\.json implies \[256, 64\]", mutate=edit_config(intermediate_size=256)),
    "head-count-mismatch": Case(r"model\.layers\.0\.self_attn\.q_proj\.weight has shape \[64, 64\] "
                                r"but config\.json implies \[80, 64\]", mutate=edit_config(num_attention_heads=5)),
    "too-few-layers-in-config": Case(r"more layers than num_hidden_layers=1", mutate=edit_config(num_hidden_layers=1)),
    "too-many-layers-in-config": Case(r"tensor model\.layers\.2\.input_layernorm\.weight is missing",
                                      mutate=edit_config(num_hidden_layers=3)),
    "nan-weight": Case(rf"tensor {re.escape(NAN_TENSOR)} holds NaN", mutate=rewrite_tensor(NAN_TENSOR, with_nan)),
    "inf-weight": Case(rf"tensor {re.escape(NAN_TENSOR)} holds NaN or Inf", mutate=rewrite_tensor(NAN_TENSOR, with_inf)),
    "int8-weight": Case(r"tensor model\.layers\.0\.self_attn\.q_proj\.weight in model\.safetensors has dtype I8",
                        mutate=rewrite_tensor("model.layers.0.self_attn.q_proj.weight", to_int8)),
    "unknown-type": Case(r"unknown type 'q3_X'", args=("--type", "q3_X")),
    "unknown-method": Case(r"unknown method 'nosuch'", args=("--method", "nosuch")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_model_input(name, tiny, tmp_path):
    case = CASES[name]
    model = case.model
    if model is None:
        model_dir = linked_copy(tiny, tmp_path / "model")
        if case.mutate:
            case.mutate(model_dir)
        model = str(model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = cli("quantize", model, "--out", str(out_dir / "model.gguf"), *case.args, cwd=tmp_path)
    line = error_line(proc)
    assert re.search(case.expect, line), line
    assert list(out_dir.iterdir()) == []


# --- the output path -------------------------------------------------------------------------------


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder the kernel refuses to create files in, for the user running the tests.

    chmod 0o500 is enough for a normal user. root ignores mode bits, so there we also set
    the immutable attribute (chattr +i, which stops root too); where the filesystem cannot
    do that, /sys (which refuses new files even from root) stands in.
    """
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o500)
    immutable = False
    if _writable(d) and shutil.which("chattr"):  # root: mode bits do not apply
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
    try:
        if not _writable(d):
            yield d
        elif Path("/sys").is_dir() and not _writable(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.fail("cannot make a folder unwritable here (root, no chattr, /sys writable): install e2fsprogs")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        d.chmod(0o700)


def _snapshot(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_output_in_missing_folder(tiny, tmp_path):
    proc = cli("quantize", str(tiny), "--out", str(tmp_path / "missing" / "m.gguf"), cwd=tmp_path)
    assert re.search(r"output folder .*missing does not exist", error_line(proc))
    assert not (tmp_path / "missing").exists()


def test_output_is_a_folder(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    out.mkdir()
    proc = cli("quantize", str(tiny), "--out", str(out), cwd=tmp_path)
    assert re.search(r"output .*m\.gguf is a folder", error_line(proc))
    assert out.is_dir() and list(out.iterdir()) == []
    assert _snapshot(tmp_path) == {"m.gguf"}


@pytest.mark.parametrize("target", ["model.safetensors", "config.json"])
def test_output_equal_to_an_input_file(target, tiny, tmp_path):
    """Also when the model folder only links its files (as the hub cache does)."""
    model_dir = linked_copy(tiny, tmp_path / "model")
    before = (model_dir / target).read_bytes()
    proc = cli("quantize", str(model_dir), "--out", str(model_dir / target), cwd=tmp_path)
    assert re.search(rf"output .*{re.escape(target)} would overwrite a file of the input model", error_line(proc))
    assert (model_dir / target).read_bytes() == before
    assert _snapshot(model_dir) == _snapshot(tiny)


def test_row_length_the_type_cannot_hold_falls_back_to_f16(smollm2_dir, tmp_path):
    """hidden_size 48 is no multiple of q4_0's 32-weight block: those tensors are written f16, with a
    note (llama.cpp's own last fallback), the rest q4_0, and the file runs."""
    from llmquant.generate import generate
    from llmquant.inspect_gguf import open_gguf

    model = build_tiny_model(tmp_path / "w48", "llama", smollm2_dir, hidden=48, layers=2, tied=False)
    out = tmp_path / "w48.gguf"
    proc = cli("quantize", str(model), "--out", str(out), "--type", "q4_0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "note: row of 48 is not a multiple of 32: f16 instead of q4_0 (" in proc.stdout, proc.stdout
    types = {t.name: t.tensor_type.name for t in open_gguf(out).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q4_0", types
    assert generate(out, "The capital of France is", max_tokens=4, threads=1)


def test_output_folder_not_writable(tiny, tmp_path, unwritable_dir):
    before = _snapshot(unwritable_dir)
    proc = cli("quantize", str(tiny), "--out", str(unwritable_dir / "m.gguf"), cwd=tmp_path)
    assert re.search(rf"output folder {re.escape(str(unwritable_dir))} is not writable", error_line(proc))
    assert _snapshot(unwritable_dir) == before


# --- Ctrl-C -----------------------------------------------------------------------------------------


def test_ctrl_c_leaves_nothing_behind(smollm2_dir, tmp_path):
    """Nothing at the target path; the finished layers stay in the work folder, with how to resume."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    work = out_dir / "m.gguf.llmquant-work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmquant.cli", "quantize", str(smollm2_dir), "--out", str(out_dir / "m.gguf"),
         "--type", "q8_0"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job (`cmd &`) runs with SIGINT ignored, which its children inherit
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not (work / "partial.gguf").exists():
            assert proc.poll() is None, f"finished before its partial file was seen: {proc.communicate()}"
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted; no output file was written"), stderr
    assert [p.name for p in out_dir.iterdir()] in ([], [work.name])
    if work.exists():  # interrupted after a layer boundary: resumable, and the message says how
        assert "--resume" in lines[0] and (work / "state.json").is_file(), stderr


# --- llmquant inspect -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    from llmquant import quantize

    out = tmp_path_factory.mktemp("bad-inspect") / "tiny-f32.gguf"
    quantize(tiny, out, type="f32", progress=False)
    return out


def test_inspect_missing_file(tmp_path):
    proc = cli("inspect", str(tmp_path / "nothing.gguf"), cwd=tmp_path)
    assert re.search(r"no such file: .*nothing\.gguf", error_line(proc))


def test_inspect_not_gguf(tiny, tmp_path):
    proc = cli("inspect", str(tiny / "config.json"), cwd=tmp_path)
    assert re.search(r"config\.json is not a GGUF file", error_line(proc))


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_inspect_truncated_gguf(keep, tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    proc = cli("inspect", str(cut), cwd=tmp_path)
    assert re.search(r"cut\.gguf is (truncated|a damaged or truncated GGUF file)", error_line(proc))


def test_inspect_good_file_still_works(tiny_gguf, tmp_path):
    proc = cli("inspect", str(tiny_gguf), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "token_embd.weight" in proc.stdout


# --- disk full ----------------------------------------------------------------------------------------


def run_on_small_disk(size: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The CLI writing into a fresh tmpfs of ``size``; its stderr and what the tmpfs holds afterwards.

    The tmpfs is mounted in a private mount namespace (unshare, as any user where user namespaces are
    enabled), so nothing outlives the command.
    """
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is needed to make a small disk for the disk-full test")
    disk = cwd / "disk"
    disk.mkdir()
    script = (f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99; shift; "$@" 2>"$OLDPWD/stderr"; rc=$?; '
              'ls -A "$DISK" > "$OLDPWD/listing"; exit $rc')
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", str(disk), sys.executable, "-m",
                           "llmquant.cli", "quantize", *args, "--out", str(disk / "m.gguf")],
                          cwd=cwd, env={**ENV, "DISK": str(disk), "OLDPWD": str(cwd)}, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 99:
        pytest.fail(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()}")
    proc.stderr = (cwd / "stderr").read_text()
    return proc, (cwd / "listing").read_text().split()


def test_disk_full_before_any_layer(tiny, tmp_path):
    proc, left = run_on_small_disk("1m", str(tiny), "--type", "q8_0", cwd=tmp_path)
    assert re.search(r"no space left on the device while writing .*m\.gguf$", error_line(proc))
    assert left == []


def test_disk_full_after_some_layers_keeps_them(smollm2_dir, tmp_path):
    """Embedding and layers fit, the q8_0 head does not: the finished layers stay, and the error says
    how to continue once there is space."""
    model = build_tiny_model(tmp_path / "untied", "llama", smollm2_dir, tied=False)
    proc, left = run_on_small_disk("5m", str(model), "--type", "q4_0", cwd=tmp_path)
    line = error_line(proc)
    assert re.search(r"no space left on the device while writing .*m\.gguf; the finished layers are kept in "
                     r".*m\.gguf\.llmquant-work: run again with --resume", line), line
    assert left == ["m.gguf.llmquant-work"]
