"""Running a stretch of torch code on the calling thread alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op thread count set to 1 inside, restored after.

    Two uses: tiny per-column ops, where worker threads only add barrier waits
    (GPTQ's walk), and the first transcendental math of a run (the rotary
    cos/sin a model computes when its layer arguments are captured), which
    torch's CPU build hands to MKL's vector math: on a process's first call
    from several threads at once, the workers' share of the result now and
    then comes out less accurate, so two runs, or a run and its resume,
    wrote different bytes (docs/benchmarks.md#determinism).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def warm_vector_math() -> None:
    """Make the process's first multi-threaded calls of MKL's vector math on a throwaway tensor.

    Where a first call can come out less accurate on the worker threads (see
    ``one_thread``) and the work is too long for one thread (sampling
    calibration sequences from a model), these first calls are spent here,
    before any result depends on them.
    """
    x = torch.linspace(-8, 8, 1 << 16)
    for f in (torch.cos, torch.sin, torch.exp, torch.sigmoid, torch.tanh, torch.rsqrt):
        f(x)
