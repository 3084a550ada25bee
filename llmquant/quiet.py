"""Keep other libraries' chatter off our commands' output.

Under an llmquant command, stderr carries our progress bars and lines that
start with ``warning:`` or ``error:``. transformers prints its own tqdm bars
("Loading weights", "Writing model shards", and through ``tqdm.auto``
directly, "Converting and de-quantizing GGUF tensors") and log lines, and
llama.cpp logs from C to file descriptor 2, which Python's ``sys.stderr``
does not reach. Each call into those libraries that would print goes
through one of these two contexts.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' loggers at error level, its bars off, and stray Python-level stderr dropped.

    Real failures still surface: they are exceptions, which the caller turns into one-line errors.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm.auto bars transformers does not route
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_fd2() -> Iterator[None]:
    """Silence C-level logging (llama.cpp), which ignores Python's sys.stderr."""
    fd = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)
