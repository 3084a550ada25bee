"""Every numeric option, checked once, for the CLI and the Python API alike.

An option is known by its API name (the keyword of ``llmquant.quantize``, a
field of ``CalibrationConfig`` or a method constructor's parameter) and named
in messages by the flag a CLI user types. Which options a method takes is read
from its constructor's signature, so a new method brings its options with it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields

from .errors import LlmquantError

MAX_THREADS = 1024  # more than any CPU offers; torch crashes on absurd counts (100000)


@dataclass(frozen=True)
class Bound:
    flag: str  # how the CLI spells it
    kind: type  # int, float, bool or str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()  # a str option's values


# by API name; method parameters without a CLI flag are named by their keyword
BOUNDS = {
    "threads": Bound("--threads", int, 1, MAX_THREADS),
    "samples": Bound("--calib-samples", int, 1),
    "seqlen": Bound("--calib-seqlen", int, 1),
    "seed": Bound("--seed", int, 0, 2**64 - 1),
    "batch_size": Bound("batch_size", int, 1),
    "damp": Bound("--damp", float, 0),
    "act_order": Bound("--act-order", bool),
    "scale_search": Bound("--no-scale-search", bool),
    "n_grid": Bound("--awq-grid", int, 1, 1000),  # each point is a full RTN pass over a group
    "block_cols": Bound("block_cols", int, 1),
    "steps": Bound("--tune-steps", int, 0, 100000),
    "lr": Bound("--tune-lr", float, 0, 1),
    "tune_batch": Bound("--tune-batch", int, 1),
    "target": Bound("--tune-target", str, choices=("layer", "model")),
    "loss": Bound("--tune-loss", str, choices=("normed", "hidden")),
    "gptq_target": Bound("--gptq-target", str, choices=("layer", "model", "stream")),
    "alpha_by": Bound("--awq-alpha-by", str, choices=("gptq", "rtn")),
    # generate
    "max_tokens": Bound("--max-tokens", int, 1),
    "ctx": Bound("--ctx", int, 1, 1 << 20),
}


def flag(name: str) -> str:
    return BOUNDS[name].flag if name in BOUNDS else name


def check_value(name: str, value) -> None:
    """One option's value against its type and range, or a one-line error naming its flag."""
    b = BOUNDS.get(name)
    if b is None:
        return
    if b.kind is bool:
        if not isinstance(value, bool):
            raise LlmquantError(f"{b.flag} is a switch (True or False), got {value!r}")
        return
    if b.kind is str:
        if value not in b.choices:
            raise LlmquantError(f"{b.flag} must be one of {', '.join(b.choices)}, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (b.kind is int and not isinstance(value, int)):
        raise LlmquantError(f"{b.flag} must be {'an integer' if b.kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise LlmquantError(f"{b.flag} must be a finite number, got {value}")
    if (b.low is not None and value < b.low) or (b.high is not None and value > b.high):
        span = f"at least {b.low}" if b.high is None else f"between {b.low} and {b.high}"
        raise LlmquantError(f"{b.flag} must be {span}, got {value}")


def method_parameters(cls) -> dict[str, object]:
    """The options a method class takes: its constructor's keyword parameters and their defaults."""
    if cls.__init__ is object.__init__:
        return {}
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.name != "self"
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_method_options(method: str, cls, options: dict) -> None:
    """Every option must be one the method takes, with a valid value."""
    takes = method_parameters(cls)
    extra = [k for k in options if k not in takes]
    if extra:
        names = ", ".join(flag(k) for k in extra)
        verb = "does" if len(extra) == 1 else "do"
        offered = ", ".join(flag(k) for k in takes if k in BOUNDS and BOUNDS[k].flag.startswith("--"))
        raise LlmquantError(f"{names} {verb} not apply to --method {method} "
                            f"({'it takes ' + offered if offered else 'it takes no options'})")
    for k, v in options.items():
        check_value(k, v)


def check_calibration(method: str, needs_calibration: bool, calibration) -> None:
    """Calibration settings are valid, and given only to a method that calibrates."""
    if calibration is None:
        return
    if not needs_calibration:
        from .calibration import CalibrationConfig

        default = CalibrationConfig()
        given = [f.name for f in fields(calibration) if getattr(calibration, f.name) != getattr(default, f.name)]
        names = ", ".join(_calib_flag(n) for n in given) or "calibration settings"
        verb = "does" if len(given) == 1 else "do"
        raise LlmquantError(f"{names} {verb} not apply to --method {method} (it uses no calibration)")
    for f in fields(calibration):
        check_value(f.name, getattr(calibration, f.name))
    from .calibration import config_sources

    config_sources(calibration)  # the source spec parses, and is not given twice


def _calib_flag(name: str) -> str:
    return {"text_file": "--calib-text", "dataset": "--calib-dataset", "source": "--calib-source"}.get(name) or flag(name)


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """The torch device a calibrated method computes on, from ``--device``: ``cpu`` or ``cuda``.

    ``auto`` takes the GPU where torch sees one, so a GPU machine uses it
    without being told; ``cuda`` where torch sees none is refused before any
    work (and before any output file is touched), not at the first layer.
    """
    import torch

    key = name.lower() if isinstance(name, str) else name
    if key not in DEVICES:
        raise LlmquantError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if key == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if key == "cuda" and not torch.cuda.is_available():
        raise LlmquantError("--device cuda: torch sees no CUDA GPU on this machine (use --device cpu or auto)")
    return key
