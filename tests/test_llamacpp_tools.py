"""llama.cpp's llama-imatrix and llama-quantize, built once into the cache (llmquant.eval.llamacpp_tools).

The first test on a fresh machine builds both tools (in install.sh's kept
llama-cpp-python build tree, or statically from source); later runs find them
in $LLMQUANT_CACHE. No part of llama.cpp is mocked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from llmquant.errors import LlmquantError

CTX, CHUNKS = 64, 4


@pytest.fixture(scope="module")
def tools():
    from llmquant.eval.llamacpp_tools import TOOLS, tool_path

    return {t: tool_path(t) for t in TOOLS}


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory, smollm2_dir):
    from tiny import build_tiny_model

    import llmquant

    d = tmp_path_factory.mktemp("tools")
    model = build_tiny_model(d / "tiny", "llama", smollm2_dir, hidden=64, layers=2)
    f32 = d / "tiny-f32.gguf"
    llmquant.quantize(model, f32, type="f32", progress=False)
    return f32


@pytest.fixture(scope="module")
def imatrix(tools, tiny_f32):
    from llmquant.eval.llamacpp_tools import compute_imatrix
    from llmquant.text import default_text

    text = tiny_f32.parent / "calib.txt"
    text.write_text(default_text("calib")[:40_000], encoding="utf-8")
    stats: dict = {}
    out = compute_imatrix(tiny_f32, text, tiny_f32.parent / "tiny.imatrix.gguf", ctx=CTX, chunks=CHUNKS,
                          threads=1, stats=stats)
    assert stats["seconds"] > 0 and stats["peak_mib"] > 0
    return out


def tensor_data(path: Path) -> dict[str, tuple[int, bytes]]:
    return {t.name: (int(t.tensor_type), bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors}


def test_imatrix_is_a_readable_gguf_with_one_entry_per_linear(imatrix, tiny_f32):
    assert imatrix.read_bytes()[:4] == b"GGUF"
    assert not list(imatrix.parent.glob("*.partial*"))
    reader = gguf.GGUFReader(imatrix)

    def value(key):
        return reader.get_field(key).contents()

    assert value("general.type") == "imatrix"
    assert value("imatrix.chunk_count") == CHUNKS and value("imatrix.chunk_size") == CTX
    assert value("imatrix.datasets") == ["calib.txt"]  # bare name: no temporary folder leaks into files
    sums = {t.name[: -len(".in_sum2")]: np.asarray(t.data) for t in reader.tensors if t.name.endswith(".in_sum2")}
    counts = {t.name[: -len(".counts")]: np.asarray(t.data) for t in reader.tensors if t.name.endswith(".counts")}
    model = {t.name: t for t in gguf.GGUFReader(tiny_f32).tensors}
    linears = {n for n, t in model.items() if n.startswith("blk.") and len(t.shape) == 2}
    assert set(sums) == set(counts) == linears  # every linear of every layer; no embedding, no tied head
    for name, s in sums.items():
        assert s.size == int(model[name].shape[0])  # one sum of squared inputs per input column
        assert np.all(np.isfinite(s)) and np.all(s >= 0) and s.max() > 0
        assert counts[name].ravel().tolist() == [CHUNKS * CTX]  # every token of every chunk


def test_quantize_with_and_without_imatrix(tools, tiny_f32, imatrix, tmp_path):
    from llmquant.eval.llamacpp_tools import quantize_with_imatrix

    plain, imx, oracle = tmp_path / "plain.gguf", tmp_path / "imx.gguf", tmp_path / "oracle.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = 2, 1  # LLAMA_FTYPE_MOSTLY_Q4_0
    assert llama_cpp.llama_model_quantize(str(tiny_f32).encode(), str(oracle).encode(), params) == 0
    stats: dict = {}
    quantize_with_imatrix(tiny_f32, plain, "Q4_0", None, threads=1, stats=stats)
    quantize_with_imatrix(tiny_f32, imx, "q4_0", imatrix, threads=1)
    assert stats["seconds"] > 0 and stats["peak_mib"] > 0
    theirs, ours, with_imx = tensor_data(oracle), tensor_data(plain), tensor_data(imx)
    # the built binary is the wheel's quantizer: same tensors, bit for bit
    assert ours == theirs
    # the imatrix changes the codes of the q4_0 linears, and only the data: same types, same sizes
    assert {n: (t, len(b)) for n, (t, b) in with_imx.items()} == {n: (t, len(b)) for n, (t, b) in ours.items()}
    changed = {n for n in ours if with_imx[n][1] != ours[n][1]}
    assert changed and all(n.startswith("blk.") for n in changed)
    meta = gguf.GGUFReader(imx)
    assert meta.get_field("quantize.imatrix.file").contents() == imatrix.name
    assert meta.get_field("quantize.imatrix.chunks_count").contents() == CHUNKS


def test_tool_failure_is_an_error_with_its_output(tools, tmp_path):
    from llmquant.eval.llamacpp_tools import quantize_with_imatrix

    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(LlmquantError, match="llama-quantize failed"):
        quantize_with_imatrix(bad, tmp_path / "out.gguf", "q4_0", None, threads=1)
    assert not (tmp_path / "out.gguf").exists()


def _in_child(code: str, path_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "LLMQUANT_LLAMA_CPP_SRC")}
    env.update(PATH=str(path_dir), LLMQUANT_CACHE=str(cache))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


CALL = ("import sys\nfrom llmquant.errors import LlmquantError\nfrom llmquant.eval.llamacpp_tools import tool_path\n"
        "try:\n    print(tool_path('llama-imatrix'))\nexcept LlmquantError as e:\n    sys.exit(f'error: {e}')\n")


def test_no_cmake_no_compiler_is_one_line(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = _in_child(CALL, empty, tmp_path / "cache")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "needs cmake and a C/C++ compiler" in lines[0] and "apt-get install cmake g++" in lines[0]
    assert not list((tmp_path / "cache").glob("llama.cpp-*/bin/*"))  # nothing half-built left behind


def test_binaries_in_the_cache_need_no_toolchain(tools, tmp_path):
    from llmquant.eval.llamacpp_tools import LLAMA_CPP_PYTHON_VERSION

    empty = tmp_path / "empty-bin"
    empty.mkdir()
    bin_dir = tmp_path / "cache" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "bin"
    bin_dir.mkdir(parents=True)
    for name, path in tools.items():
        shutil.copy2(path, bin_dir / name)
    proc = _in_child(CALL, empty, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(bin_dir / "llama-imatrix")
    assert "building" not in proc.stderr
    # the copied binary runs with nothing beside it and no LD_LIBRARY_PATH: static, or (built in the
    # venv's kept llama-cpp-python build tree) linked to that tree's libraries by its absolute RPATH
    run = subprocess.run([str(bin_dir / "llama-quantize"), "--help"], capture_output=True, text=True,
                         env={"PATH": str(empty)})
    assert "usage:" in run.stdout and "error while loading shared libraries" not in run.stderr


def _fake_tree(prefix: Path, version: str, make_program: str) -> Path:
    """A venv prefix holding what kept_tree() reads: a CMakeCache.txt and its source folder."""
    from llmquant.eval.llamacpp_tools import KEPT_TREE

    src = prefix / "llama-cpp-python-src" / f"llama_cpp_python-{version}"
    (src / "vendor" / "llama.cpp" / "tools" / "imatrix").mkdir(parents=True)
    (src / "llama_cpp").mkdir()
    (src / "llama_cpp" / "__init__.py").write_text(f'__version__ = "{version}"\n')
    tree = prefix / KEPT_TREE
    tree.mkdir()
    (tree / "CMakeCache.txt").write_text(
        f"// comment\nCMAKE_MAKE_PROGRAM:UNINITIALIZED={make_program}\nCMAKE_HOME_DIRECTORY:INTERNAL={src}\n")
    return tree


def test_kept_tree_only_when_it_can_be_built_in(tmp_path, monkeypatch):
    from llmquant.eval import llamacpp_tools as lt

    make = shutil.which("sh")  # any executable stands for the recorded ninja
    good = _fake_tree(tmp_path / "good", lt.LLAMA_CPP_PYTHON_VERSION, make)
    other = _fake_tree(tmp_path / "other", "0.3.1", make)
    gone = _fake_tree(tmp_path / "gone", lt.LLAMA_CPP_PYTHON_VERSION, "/tmp/pip-build-env-x/bin/no-such-ninja")
    found = {}
    for prefix in ("good", "other", "gone", "none"):
        monkeypatch.setattr(sys, "prefix", str(tmp_path / prefix))
        found[prefix] = lt.kept_tree()
    assert found == {"good": good, "other": None, "gone": None, "none": None}
    assert other.is_dir() and gone.is_dir()
    # tools built in a tree live in a cache folder of their own, apart from the static bin/
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    assert lt.tree_tools_dir(good).parent == lt.tools_dir().parent and lt.tree_tools_dir(good) != lt.tools_dir()
    assert lt.tree_tools_dir(good) != lt.tree_tools_dir(other)


def test_tools_the_loader_refuses_are_rebuilt_not_used(tools, tmp_path):
    """A venv reinstalled at the same path rebuilds its tree; tools linked to the old one exit 127."""
    from llmquant.eval import llamacpp_tools as lt

    good, stale = tmp_path / "good", tmp_path / "stale"
    for folder in (good, stale):
        folder.mkdir()
        for name, path in tools.items():
            shutil.copy2(path, folder / name)
    (stale / "llama-quantize").unlink()
    (stale / "llama-quantize").write_text(  # what the loader does for a binary whose library is gone
        "#!/bin/sh\necho 'llama-quantize: error while loading shared libraries: libllama.so' >&2\nexit 127\n")
    (stale / "llama-quantize").chmod(0o755)
    assert lt._complete(good)
    assert not lt._complete(stale)
