"""llama.cpp's own command-line tools ``llama-imatrix`` and ``llama-quantize``.

They are the strongest llama.cpp baseline (importance matrix, then
``llama-quantize --imatrix``) but are not part of the ``llama-cpp-python``
wheel. The first call of :func:`tool_path` builds the two binaries once, under
a file lock so that concurrent processes build them only once, into the cache
folder (``$LLMQUANT_CACHE/llama.cpp-<version>``). Later calls find them there.

Two ways to build them:

* ``install.sh`` keeps llama-cpp-python's unpacked source package and its
  CMake build tree inside the venv. Then the two tools are built in that tree
  (``-DLLAMA_BUILD_TOOLS=ON``, only their targets), so only their own sources
  compile and they link the tree's libllama and ggml, the objects the Python
  bindings ship. They live in ``venv-<key>/`` of the cache folder (the key
  names the build tree) and find the tree's shared libraries by their build
  RPATH, so they belong to that venv and are ignored once its tree is gone.
* Otherwise (llama-cpp-python installed some other way) they are built from
  the vendored llama.cpp of the pinned source package, statically (no shared
  library of ours to find at run time), into ``bin/``. Binaries found in
  ``bin/`` are used first, whichever way they came there.

The build needs ``cmake`` and a C/C++ compiler; the static one downloads the
pinned source package with the running interpreter's ``pip`` (a package
registry is the only network it needs). ``$LLMQUANT_LLAMA_CPP_SRC`` may name an
unpacked ``vendor/llama.cpp`` folder (or the ``.tar.gz`` source package) for
the static build to use instead of downloading.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..errors import LlmquantError
from ..loading.default_model import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the same pin as install.sh: the tools match the Python bindings
TOOLS = ("llama-imatrix", "llama-quantize")
SOURCE_ENV = "LLMQUANT_LLAMA_CPP_SRC"
_VENDOR = "vendor/llama.cpp"
# Same numerics as the wheel (GGML_NATIVE=OFF), nothing that needs a network
# library, static libraries so the two binaries stand alone.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)
_TAIL_LINES = 12
# install.sh's scikit-build-core build tree of llama-cpp-python, inside the venv
KEPT_TREE = "llama-cpp-python-build"
# llama-cpp-python adds tools/mtmd itself (LLAVA_BUILD); llama.cpp's tools/ adds it too,
# and CMake refuses a folder added twice, so the bindings' copy is switched off
TREE_OPTIONS = ("-DLLAMA_BUILD_TOOLS=ON", "-DLLAVA_BUILD=OFF")


def tools_dir() -> Path:
    """Where the static binaries live (whether or not they are built yet); found here first."""
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "bin"


def kept_tree() -> Path | None:
    """install.sh's llama-cpp-python build tree in this venv, if the tools can be built in it.

    It must still know its source folder (the pinned version's) and the build
    program that generated it: a tree whose ninja lived in pip's temporary
    build environment cannot be built in again.
    """
    tree = Path(sys.prefix) / KEPT_TREE
    entries = _cmake_cache(tree / "CMakeCache.txt")
    src = Path(entries.get("CMAKE_HOME_DIRECTORY", "/nonexistent"))
    version = src / "llama_cpp" / "__init__.py"
    if not (src / _VENDOR / "tools" / "imatrix").is_dir() or not version.is_file():
        return None
    if f'__version__ = "{LLAMA_CPP_PYTHON_VERSION}"' not in version.read_text(errors="replace"):
        return None
    if _build_program(entries) is None:
        return None
    return tree


def tree_tools_dir(tree: Path) -> Path:
    """Where tools built in ``tree`` live: a folder of the cache named after that tree.

    They are linked to the tree's shared libraries, so another venv (or a
    tree that is gone) never finds them.
    """
    key = hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:12]
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / f"venv-{key}"


def tool_path(name: str) -> Path:
    """Path of ``llama-imatrix`` or ``llama-quantize``, building both once if needed."""
    if name not in TOOLS:
        raise LlmquantError(f"unknown llama.cpp tool {name!r}; choose from {', '.join(TOOLS)}")
    tree = kept_tree()
    candidates = [tools_dir()] + ([tree_tools_dir(tree)] if tree else [])
    for folder in candidates:
        if _complete(folder):
            return folder / name
    root = tools_dir().parent  # both kinds of folder share it, and its lock
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):  # a second process waits here, then finds the binaries
        if not any(_complete(f) for f in candidates):
            _build_once(tree)
    return next(f for f in candidates if _complete(f)) / name


def _build_once(tree: Path | None) -> None:
    """In the kept build tree if there is one; the static build if not, or if that fails.

    A missing toolchain is one error before either starts: the static build
    would need it too.
    """
    env = {**os.environ, **_require_toolchain()}
    if tree is None:
        _build(tools_dir(), env)
        return
    try:
        _build_in_tree(tree, tree_tools_dir(tree), env)
    except LlmquantError as exc:
        print(f"building in llama-cpp-python's build tree failed, building statically instead: "
              f"{str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        _build(tools_dir(), env)


@contextlib.contextmanager
def _locked(lock: Path):
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _complete(folder: Path) -> bool:
    """Both tools are there and start.

    Tools built in a kept tree load that tree's shared libraries by absolute
    path; a venv reinstalled at the same path rebuilds its tree, and the
    folder of the old tools then holds binaries the loader refuses (exit 127).
    Such a folder is rebuilt rather than used.
    """
    return all(_usable(folder / t) and _starts(folder / t) for t in TOOLS)


_STARTED: set[Path] = set()


def _starts(path: Path) -> bool:
    """``path --help`` gets past the dynamic loader (127: a library it links is missing)."""
    if path in _STARTED:
        return True
    try:
        code = subprocess.run([str(path), "--help"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60).returncode
    except (OSError, subprocess.TimeoutExpired):
        return False
    if code == 127:
        return False
    _STARTED.add(path)
    return True


def _usable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _require_toolchain() -> dict[str, str]:
    """cmake and a C/C++ compiler, or one line saying what to install."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cc is None or shutil.which(cc) is None or cxx is None or shutil.which(cxx) is None:
        missing.append("a C/C++ compiler")
    if missing:
        raise LlmquantError(
            f"building llama.cpp's llama-imatrix and llama-quantize needs {' and '.join(missing)}, "
            "not found on PATH: install them (Debian/Ubuntu: apt-get install cmake g++), "
            f"or put prebuilt binaries in {tools_dir()}"
        )
    return {"CC": shutil.which(cc), "CXX": shutil.which(cxx)}


def _build(target: Path, env: dict[str, str]) -> None:
    """Download, configure, compile, install into ``target``; the caller holds the lock.

    The work folder has a fixed name beside ``target``: a build that failed or
    was interrupted is continued (cmake rebuilds only what is missing) by the
    next call; it is removed after success.
    """
    jobs = _jobs()
    print(f"building llama.cpp's llama-imatrix and llama-quantize once into {target} "
          f"(several minutes, {jobs} cores)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    work = target.parent / "build-work"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    src = _source(work, log)
    build = work / "build"
    stamp = work / "source.txt"  # a build tree is tied to its source folder
    if build.exists() and (not stamp.is_file() or stamp.read_text() != str(src)):
        shutil.rmtree(build)
    stamp.write_text(str(src))
    _run_logged(["cmake", "-S", str(src), "-B", str(build), *CMAKE_OPTIONS], log, env, "configuring llama.cpp")
    _run_logged(["cmake", "--build", str(build), "--config", "Release", "--target", *TOOLS,
                 "-j", str(jobs)], log, env, "compiling llama.cpp")
    staged = work / "bin"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    _copy_tools(build / "bin", staged, log)
    seconds = time.perf_counter() - t0
    (staged / "build.json").write_text(json.dumps({
        "llama-cpp-python": LLAMA_CPP_PYTHON_VERSION, "path": "static, from the source package",
        "source": str(src), "cmake": list(CMAKE_OPTIONS), "seconds": round(seconds, 1), "jobs": jobs}, indent=1))
    _publish(staged, target)
    shutil.rmtree(work, ignore_errors=True)
    print(f"built llama-imatrix and llama-quantize in {seconds:.0f} s", file=sys.stderr, flush=True)


def _build_in_tree(tree: Path, target: Path, env: dict[str, str]) -> None:
    """Build the two tools in llama-cpp-python's kept build tree, copy them to ``target``.

    Re-configuring with the tools on adds their targets and leaves every
    compile command of libllama, ggml and llama-common as it was, so the build
    tool finds those up to date and compiles only the tools' own sources. The
    copies keep their absolute build RPATH into ``tree``. The caller holds the lock.
    """
    jobs = _jobs()
    entries = _cmake_cache(tree / "CMakeCache.txt")
    print(f"building llama.cpp's llama-imatrix and llama-quantize once into {target}, in llama-cpp-python's "
          f"build tree {tree} (its compiled libraries are reused; {jobs} cores)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    staged = target.with_name(target.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    log = target.parent / f"{target.name}.build.log"
    log.unlink(missing_ok=True)
    cmake = _cmake_command(entries)
    program = _build_program(entries)
    with _locked(tree / ".llmquant-tools.lock"):  # another cache folder's process may share this venv
        _run_logged([cmake, "-S", entries["CMAKE_HOME_DIRECTORY"], "-B", str(tree), *TREE_OPTIONS,
                     f"-DCMAKE_MAKE_PROGRAM={program}"], log, env, "configuring llama-cpp-python's build tree")
        _run_logged([cmake, "--build", str(tree), "--target", *TOOLS, "-j", str(jobs)], log, env,
                    "compiling llama.cpp's tools")
    _copy_tools(tree / "bin", staged, log)
    seconds = time.perf_counter() - t0
    (staged / "build.json").write_text(json.dumps({
        "llama-cpp-python": LLAMA_CPP_PYTHON_VERSION, "path": "llama-cpp-python's build tree",
        "tree": str(tree), "GGML_NATIVE": entries.get("GGML_NATIVE"), "cmake": list(TREE_OPTIONS),
        "seconds": round(seconds, 1), "jobs": jobs}, indent=1))
    _publish(staged, target)
    print(f"built llama-imatrix and llama-quantize in {seconds:.0f} s", file=sys.stderr, flush=True)


def _copy_tools(built_dir: Path, staged: Path, log: Path) -> None:
    """Both binaries from a finished build into ``staged``, or one line naming the missing one."""
    for t in TOOLS:
        built = built_dir / t
        if not _usable(built):
            raise LlmquantError(f"the llama.cpp build finished without {built}; see {log}")
        shutil.copy2(built, staged / t)


def _publish(staged: Path, target: Path) -> None:
    """Replace ``target`` by ``staged`` in one rename, so both binaries appear together."""
    if target.exists():
        shutil.rmtree(target)
    staged.rename(target)


def _jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cmake_cache(path: Path) -> dict[str, str]:
    """``NAME:TYPE=VALUE`` entries of a CMakeCache.txt (empty if there is none)."""
    entries: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return entries
    for line in text.splitlines():
        if line and not line.startswith(("#", "//")) and "=" in line:
            key, value = line.split("=", 1)
            entries[key.split(":", 1)[0]] = value
    return entries


def _build_program(entries: dict[str, str]) -> str | None:
    """The tree's ninja or make: the recorded one, else the same program on PATH."""
    recorded = entries.get("CMAKE_MAKE_PROGRAM", "")
    if recorded and os.access(recorded, os.X_OK):
        return recorded
    return shutil.which(Path(recorded).name) if recorded else None


def _cmake_command(entries: dict[str, str]) -> str:
    """The cmake that generated the tree if it is still there (pip may have removed it), else PATH's."""
    recorded = entries.get("CMAKE_COMMAND", "")
    return recorded if recorded and os.access(recorded, os.X_OK) else "cmake"


def _source(work: Path, log: Path) -> Path:
    """The vendored llama.cpp folder: $LLMQUANT_LLAMA_CPP_SRC, or the pinned sdist from pip."""
    given = os.environ.get(SOURCE_ENV)
    if given:
        p = Path(given)
        if p.is_dir():
            if not (p / "CMakeLists.txt").is_file() or not (p / "tools" / "imatrix").is_dir():
                raise LlmquantError(f"${SOURCE_ENV}={p} is not a llama.cpp source folder (no tools/imatrix)")
            return p
        if p.is_file():
            return _unpack(p, work)
        raise LlmquantError(f"${SOURCE_ENV}={p} does not exist")
    unpacked = work / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / _VENDOR
    if (unpacked / "CMakeLists.txt").is_file() and (work / "src" / ".complete").is_file():
        return unpacked
    dl = work / "sdist"
    _run_logged([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                 "--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                 "-d", str(dl)], log, dict(os.environ),
                f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}'s source package with pip")
    sdists = sorted(dl.glob("*.tar.gz"))
    if not sdists:
        raise LlmquantError(f"pip downloaded no source package of llama-cpp-python; see {log}")
    return _unpack(sdists[0], work)


def _unpack(sdist: Path, work: Path) -> Path:
    """Extract only ``<top>/vendor/llama.cpp`` of the source package."""
    dest = work / "src"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.split("/", 1)[-1].startswith(_VENDOR + "/")]
            if not members:
                raise LlmquantError(f"{sdist} holds no {_VENDOR}; is it llama-cpp-python's source package?")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise LlmquantError(f"cannot unpack {sdist}: {exc}") from exc
    (dest / ".complete").touch()
    top = members[0].name.split("/", 1)[0]
    return dest / top / _VENDOR


def _run_logged(cmd: list[str], log: Path, env: dict[str, str], what: str) -> None:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL).returncode
        except OSError as exc:
            raise LlmquantError(f"{what} failed: cannot run {cmd[0]}: {exc.strerror or exc}") from exc
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-_TAIL_LINES:]
        raise LlmquantError(f"{what} failed (exit {rc}); full log in {log}:\n" + "\n".join(tail))


def _run_tool(name: str, args: list[str], cwd: Path, stats: dict | None = None) -> None:
    """Run a tool quietly; a failure raises with the tail of its output.

    ``stats`` (if given) gets ``seconds`` (wall time) and ``peak_mib``: the
    tool's own VmHWM, sampled every 20 ms (its rusage would start at this
    process's size, which it inherits through fork and exec).
    """
    cmd = [str(tool_path(name)), *args]
    t0 = time.perf_counter()
    peak_kib = 0
    with tempfile.TemporaryFile("w+", errors="replace") as out:
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise LlmquantError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from exc
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            peak_kib = max(peak_kib, _vm_hwm_kib(status))
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            out.seek(0)
            tail = "\n".join(out.read().strip().splitlines()[-_TAIL_LINES:])
            raise LlmquantError(f"{name} failed (exit {proc.returncode}):\n{tail}")
    if stats is not None:
        stats.update(seconds=seconds, peak_mib=peak_kib / 1024 if peak_kib else None)


def _vm_hwm_kib(status: Path) -> int:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def compute_imatrix(f32_gguf: Path | str, text_file: Path | str, out: Path | str, ctx: int, chunks: int,
                    threads: int, stats: dict | None = None) -> Path:
    """``llama-imatrix`` on ``text_file``: ``chunks`` consecutive windows of ``ctx`` tokens.

    The output is llama.cpp's GGUF imatrix format (``general.type = imatrix``,
    per weight ``<name>.in_sum2`` and ``<name>.counts``). llama-imatrix needs a
    text of at least ``2 * ctx`` tokens. The file is written under a temporary
    name and renamed into place. The tool runs in the text's folder and gets
    its bare name, so the dataset name recorded in the imatrix (and copied
    into every quantized file's metadata) does not depend on where it lies.
    """
    f32_gguf, text_file, out = Path(f32_gguf).resolve(), Path(text_file).resolve(), Path(out).resolve()
    for p in (f32_gguf, text_file):
        if not p.is_file():
            raise LlmquantError(f"{p} does not exist")
    if ctx < 2 or chunks < 1 or threads < 1:
        raise LlmquantError("llama-imatrix needs ctx >= 2, chunks >= 1, threads >= 1")
    partial = out.with_name(out.name + ".partial.gguf")
    _run_tool("llama-imatrix", ["-m", str(f32_gguf), "-f", text_file.name, "-o", str(partial),
                                "--output-format", "gguf", "-c", str(ctx), "--chunks", str(chunks),
                                "-t", str(threads), "-tb", str(threads), "--no-ppl"],
              cwd=text_file.parent, stats=stats)
    if not partial.is_file() or partial.read_bytes()[:4] != b"GGUF":
        raise LlmquantError(f"llama-imatrix wrote no GGUF imatrix at {partial}")
    os.replace(partial, out)
    return out


def quantize_with_imatrix(src_gguf: Path | str, dst: Path | str, ftype_name: str, imatrix: Path | str | None,
                          threads: int, stats: dict | None = None) -> Path:
    """``llama-quantize [--imatrix IMATRIX] SRC DST TYPE THREADS`` with its default policy.

    ``ftype_name`` is one of llama-quantize's names (``q4_0``, ``Q4_K_M``, any
    case). ``imatrix=None`` quantizes without one (the same as
    ``llama_cpp.llama_model_quantize``). The imatrix is passed by its bare
    name from its folder, so the ``quantize.imatrix.file`` key in ``dst``
    does not depend on the folder. ``dst`` appears only when complete.
    """
    src_gguf, dst = Path(src_gguf).resolve(), Path(dst).resolve()
    if not src_gguf.is_file():
        raise LlmquantError(f"{src_gguf} does not exist")
    if threads < 1:
        raise LlmquantError("llama-quantize needs threads >= 1")
    args, cwd = [], dst.parent
    if imatrix is not None:
        imatrix = Path(imatrix).resolve()
        if not imatrix.is_file():
            raise LlmquantError(f"imatrix {imatrix} does not exist")
        args, cwd = ["--imatrix", imatrix.name], imatrix.parent
    partial = dst.with_name(dst.name + ".partial")
    _run_tool("llama-quantize", [*args, str(src_gguf), str(partial), ftype_name, str(threads)], cwd=cwd, stats=stats)
    if not partial.is_file():
        raise LlmquantError(f"llama-quantize wrote no file at {partial}")
    os.replace(partial, dst)
    return dst
