"""The work folder beside the output: what a run needs to continue after a crash.

A quantization of a large model runs for hours; a kill, an out-of-memory
kill or a reboot must not throw that away. The partial GGUF file is written
inside ``<out>.llmquant-work/`` and, at every layer boundary, made durable
together with a small state file (how many tensors and bytes are final, the
per-linear reports) and, for calibrated methods, the hidden states that feed
the next layer. ``--resume`` cuts the partial file back to the last boundary
and goes on from there, so the result is byte-identical to an uninterrupted
run. A fingerprint of everything that decides the bytes (model, method and its
options, type, calibration) guards against continuing with other settings.
The compute device is left out on purpose: a run that ran out of GPU memory
may continue on the CPU (the file is then valid, but byte-identical to an
uninterrupted run only when resumed on the device it started on).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import LlmquantError
from .methods import LinearReport
from .paths import write_atomic

STATE = "state.json"
FINGERPRINT = "fingerprint.json"
PARTIAL = "partial.gguf"


@dataclass
class ResumePoint:
    """Where a run stopped: after ``layers_done`` decoder layers."""

    layers_done: int
    offset: int
    n_written: int
    hidden: torch.Tensor | None = None
    reports: list[LinearReport] = field(default_factory=list)
    fp_hidden: torch.Tensor | None = None  # the full-precision stream, where the method follows one


def work_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".llmquant-work")


def fingerprint(model_dir: Path, weight_files: list[Path], settings: dict) -> dict:
    """What decides the output bytes; the model enters by content, not by path."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in weight_files:  # header (names, shapes, offsets) and size: cheap, and any re-export changes them
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(n))
        digest.update(str(f.stat().st_size).encode())
    return {"llmquant": __version__, "model": digest.hexdigest(), **settings}


def canonical(value):
    """``value`` as it reads back from JSON: tuples become lists, paths and other objects strings.

    The stored fingerprint went through JSON; comparing it with live settings
    (tuples, Paths) would make equal settings differ, so both sides are compared
    in this one form.
    """
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Each setting that differs between two fingerprints, as ``key.sub: was X, now Y``."""
    out: list[str] = []

    def walk(a, b, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(a.keys() | b.keys()):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            out.append(f"{path} was {a!r}, now {b!r}")

    walk(canonical(old), canonical(new), "")
    return out


class WorkDir:
    """The work folder of one output file, locked against a second run."""

    def __init__(self, out: Path):
        self.path = work_dir_for(Path(out))
        self.partial = self.path / PARTIAL
        self._lock = None
        self._report_dicts: list[dict] = []  # the reports already converted: a layer's never change after it
        self._saver: ThreadPoolExecutor | None = None  # records layer boundaries in the background
        self._pending: Future | None = None

    def open(self, fp: dict, resume: bool) -> ResumePoint | None:
        """Claim the folder; the point to continue from when ``resume`` finds one."""
        self.path.mkdir(exist_ok=True)
        self._claim()
        found = self.resumable
        if found and not resume:
            self.release()
            raise LlmquantError(
                f"an interrupted run left its work in {self.path}; add --resume to continue it, "
                "or delete that folder to start over"
            )
        if found:
            changed = fingerprint_changes(self._read_json(FINGERPRINT), fp)
            if changed:
                self.release()
                raise LlmquantError(
                    f"cannot resume: {'; '.join(changed)} (the interrupted run in {self.path}); "
                    "run with the same settings, or delete that folder to start over"
                )
            return self._load()
        for child in self.path.iterdir():  # a run that died before its first layer: nothing to keep
            if child.name != ".lock":
                child.unlink()
        _write_json(self.path / FINGERPRINT, canonical(fp))
        return None

    def _claim(self) -> None:
        self._lock = open(self.path / ".lock", "w")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LlmquantError(f"another llmquant run is using {self.path}") from None

    def _damaged(self, what: str) -> LlmquantError:
        self.release()
        return LlmquantError(f"the work folder {self.path} is damaged ({what}); delete it to start over")

    def _read_json(self, name: str) -> dict:
        try:
            data = json.loads((self.path / name).read_text())
        except FileNotFoundError:
            raise self._damaged(f"{name} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._damaged(f"{name}: {exc}") from None
        if not isinstance(data, dict):
            raise self._damaged(f"{name} is not a JSON object")
        return data

    def _load(self) -> ResumePoint:
        """The recorded boundary, checked against what the folder holds."""
        state = self._read_json(STATE)
        counts = {k: state.get(k) for k in ("layers_done", "offset", "n_written")}
        bad = [k for k, v in counts.items() if type(v) is not int or v < 0]
        streams = (state.get("hidden"), state.get("fp_hidden"))
        if bad or not isinstance(state.get("reports"), list) or not all(isinstance(h, (str, type(None))) for h in streams):
            raise self._damaged(f"{STATE} lacks valid {', '.join(bad) or 'reports or hidden'}")
        if not self.partial.is_file() or self.partial.stat().st_size < counts["offset"]:
            raise self._damaged(f"{PARTIAL} is missing or shorter than the {counts['offset']} bytes {STATE} records")
        hidden, fp_hidden = (self._load_stream(h) for h in streams)
        try:
            reports = [LinearReport(**r) for r in state["reports"]]
        except TypeError:
            raise self._damaged(f"{STATE} holds malformed reports") from None
        return ResumePoint(counts["layers_done"], counts["offset"], counts["n_written"], hidden, reports, fp_hidden)

    def _load_stream(self, name: str | None) -> torch.Tensor | None:
        if not name:
            return None
        try:
            return torch.load(self.path / Path(name).name, weights_only=True, map_location="cpu")
        except Exception as exc:  # missing, truncated or not a tensor file: all mean "cannot continue"
            raise self._damaged(f"{name}: {exc}") from None

    def _write_stream(self, stem: str, layers_done: int, hidden: torch.Tensor | None) -> tuple[Path, str] | None:
        """The stream's file, written (not yet synced) under a temporary name: (that path, its final name)."""
        if hidden is None:
            return None
        name = f"{stem}-{layers_done:05d}.pt"
        tmp = self.path / (name + ".tmp")
        torch.save(hidden.cpu(), tmp)  # a CPU tensor: a run stopped on a GPU resumes anywhere
        return tmp, name

    def save(self, point: ResumePoint, sync: Callable[[], None]) -> None:
        """Record a layer boundary, in the background: ``sync`` makes the partial file durable up to
        point.offset, then the streams are synced and the state names them.

        The caller goes on writing the next layer meanwhile. What the point holds is
        copied or written out here first (the streams to temporary files, the reports
        converted), so the caller may change it. One boundary in flight at a time: this waits for the one before, and
        raises what failed in it.
        """
        self.settle()
        streams = (self._write_stream("hidden", point.layers_done, point.hidden),
                   self._write_stream("fp-hidden", point.layers_done, point.fp_hidden))
        names = tuple(None if s is None else s[1] for s in streams)
        # converted once each: asdict of every report at every boundary grows with the square of the depth
        self._report_dicts += [dataclasses.asdict(r) for r in point.reports[len(self._report_dicts):]]
        state = {"layers_done": point.layers_done, "offset": point.offset, "n_written": point.n_written,
                 "hidden": names[0], "fp_hidden": names[1], "reports": self._report_dicts[:len(point.reports)]}

        def commit() -> None:
            sync()
            for tmp, name in filter(None, streams):
                _fsync(tmp)
                os.replace(tmp, self.path / name)
            _write_json(self.path / STATE, state)
            for old in [*self.path.glob("hidden-*.pt"), *self.path.glob("fp-hidden-*.pt")]:
                if old.name not in names:
                    old.unlink()

        if self._saver is None:
            self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmquant-checkpoint")
        self._pending = self._saver.submit(commit)

    def settle(self, quiet: bool = False) -> None:
        """Wait for the boundary being recorded; raise what failed in it unless ``quiet``
        (a run already failing for another reason keeps the boundary before)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception:
            if not quiet:
                raise

    @property
    def resumable(self) -> bool:
        """True once a layer boundary was recorded (the one in flight waited for, quietly)."""
        self.settle(quiet=True)
        return (self.path / STATE).is_file()

    def remove(self) -> None:
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)

    def release(self) -> None:
        self.settle(quiet=True)
        if self._saver is not None:
            self._saver.shutdown()
            self._saver = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, default=str).encode())
