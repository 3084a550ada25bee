"""Quantization methods, by name."""

from __future__ import annotations

from ..errors import LlmquantError
from .base import LinearReport, Method

METHODS = ("rtn", "gptq", "awq", "awq+gptq")


def make_method(name: str, **options) -> Method:
    """A fresh method object for one run."""
    if name == "rtn":
        return Method()
    if name == "gptq":
        from .gptq_method import GPTQMethod

        return GPTQMethod(**options)
    if name == "awq":
        from .awq import AWQMethod

        return AWQMethod(**options)
    if name == "awq+gptq":
        from .awq import AWQGPTQMethod

        return AWQGPTQMethod(**options)
    raise LlmquantError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


__all__ = ["LinearReport", "Method", "make_method", "METHODS"]
