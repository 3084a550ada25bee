"""Every path llmquant writes, checked in one place before any work starts.

A run writes its output file, the work folder beside it, optionally a JSON
report, and (once, for the default model) a cache folder. Each is checked by
:func:`check_writable` before a weight is read: a file target must be nothing
yet or a regular file (never a device, FIFO, socket or folder, which a rename
would replace), must not be an input of the run (a file of the model folder,
also through the links a hub cache uses, or the calibration text), and its
folder must exist and accept a new file. Files are then written whole or not
at all (:func:`write_atomic`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import LlmquantError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _kind(path: Path) -> str | None:
    """What is at path (links followed), when it is something other than a regular file; None otherwise."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None  # nothing there (or a dangling link, which a rename replaces)
    except OSError as exc:
        raise LlmquantError(f"cannot examine {path}: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _same_file(a: Path, b: Path) -> bool:
    """a and b name one file: the same path after links, or (both existing) the same inode (hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _probe(folder: Path, what: str) -> None:
    """Create a file for real: mode bits say nothing for root, ACLs or read-only mounts."""
    probe = folder / f".llmquant-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise LlmquantError(f"{what} {folder} is not writable: {exc.strerror or exc}") from None
    probe.unlink()


def check_writable(path: Path, what: str, *, folder: bool = False, model_dir: Path | None = None,
                   inputs: dict[Path, str] | None = None, hint: str = "") -> None:
    """Fail with one line naming ``what`` (``output``, ``report``, ...) unless ``path`` can be written safely.

    folder=False: path is a file that will be replaced by a rename; it must be nothing or a regular
    file, in an existing writable folder, and not one of ``inputs`` ({path: what it is}) nor a file
    of ``model_dir``; inside model_dir only a new file ending in ``.gguf`` is allowed.
    folder=True: path is a folder (created with its parents if missing); what exists of it must be
    folders, and the nearest existing one must accept new files.
    """
    path = Path(path)
    kind = _kind(path)
    if folder:
        if kind is None and path.exists():
            raise LlmquantError(f"{what} {path} is a file, not a folder")
        if kind not in (None, "a folder"):
            raise LlmquantError(f"{what} {path} is {kind}, not a folder")
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise LlmquantError(f"{what} {path} cannot be created: {existing} is not a folder")
        _probe(existing, what)
        return
    if kind == "a folder":
        raise LlmquantError(f"{what} {path} is a folder; give a file name{hint}")
    if kind is not None:
        raise LlmquantError(f"{what} {path} is {kind}, not a regular file; llmquant replaces only regular files")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise LlmquantError(f"{what} folder {parent} does not exist")
    for other, name in (inputs or {}).items():
        if _same_file(path, Path(other)):
            raise LlmquantError(f"{what} {path} would overwrite {name}")
    if model_dir is not None:
        if _is_model_file(path, Path(model_dir)):
            raise LlmquantError(f"{what} {path} would overwrite a file of the input model")
        if path.resolve().is_relative_to(Path(model_dir).resolve()) and (path.suffix != ".gguf" or path.exists()):
            raise LlmquantError(f"{what} {path} is inside the input model's folder, where llmquant writes "
                                "only new .gguf files")
    _probe(parent, f"{what} folder")


def _is_model_file(path: Path, model_dir: Path) -> bool:
    """path is one of the model's files, also through links (hub caches link every file)."""
    if not path.exists():
        return False
    return any(f.is_file() and os.path.samefile(path, f) for f in model_dir.iterdir())


def check_run_paths(out: Path, model_dir: Path, *, report: Path | None = None, card: Path | None = None,
                    inputs: dict[Path | None, str] | None = None) -> None:
    """Check every path one quantize run writes: the output, its work folder, the report and the card.

    inputs: further files the run reads ({path: what it is}, e.g. the calibration text), which
    nothing may overwrite; None paths are skipped.
    """
    from .workdir import work_dir_for

    out = Path(out)
    read = {Path(p): name for p, name in (inputs or {}).items() if p is not None}
    check_writable(out, "output", model_dir=model_dir, inputs=read, hint=" such as model-q4_0.gguf")
    work = work_dir_for(out)
    if _kind(work) != "a folder" and (work.exists() or work.is_symlink()):
        raise LlmquantError(f"{work} exists and is not a work folder; remove it")
    if card is not None:
        card = Path(card)
        if _same_file(card, out) or (report is not None and _same_file(card, Path(report))):
            raise LlmquantError(f"the model card {card} would overwrite --out or --report; give --out a .gguf name")
        check_writable(card, "model card (--card)", model_dir=model_dir, inputs=read, hint=" such as model.md")
    if report is None:
        return
    report = Path(report)
    if _same_file(report, out):
        raise LlmquantError(f"--report {report} is the same file as --out; give the report its own name")
    if report.resolve().is_relative_to(work.resolve()):
        raise LlmquantError(f"--report {report} is inside the work folder {work}, which the run removes")
    check_writable(report, "report", model_dir=model_dir, inputs=read, hint=" such as report.json")


def write_atomic(path: Path, data: bytes) -> None:
    """Write path whole or not at all: a synced temporary file beside it, renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
