"""Quantization methods, by name: each Method subclass registers itself with ``method=``."""

from __future__ import annotations

from ..errors import LlmquantError
from . import gptq_method  # noqa: F401  (imported for registration, in the order the CLI lists them)

# isort: split
from . import (
    awq,  # noqa: F401
    tune,  # noqa: F401
)
from .base import LinearReport, Method, method_registry

METHODS = tuple(method_registry())


def make_method(name: str, **options) -> Method:
    """A fresh method object for one run; ``options`` are its constructor's keywords."""
    try:
        cls = method_registry()[name.lower()]
    except KeyError:
        raise LlmquantError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
    return cls(**options)


__all__ = ["LinearReport", "Method", "make_method", "method_registry", "METHODS"]
