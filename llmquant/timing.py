"""Wall time by stage of a run, for ``--report``: where the time goes, against the forward-pass floor.

A calibrated method cannot be faster than the forward passes of its calibration
set, so the report shows each stage beside them: ``read`` (weights from the
checkpoint, the layer onto its device), ``forward`` (calibration forward passes),
``statistics`` (what ``observe`` gathers: Hessians, activation statistics),
``method`` (the method's own math: searches, GPTQ's walk, AWQ's grids, tuning)
and ``write`` (encoding, packing and writing tensors). Stages nest (a method
asks for forward passes; a forward pass feeds ``observe``): the inner stage's
time is counted to it alone, so the stages add up to the time measured.
On a GPU the kernels run asynchronously; a stage's time is then what the host
waited in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STAGES = ("read", "forward", "statistics", "method", "write")


class StageClock:
    """Seconds per stage; ``with clock("forward"): ...``, nesting-aware."""

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.timer = timer
        self.totals: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._stack: list[list] = []  # [stage, time it (re)started]

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if stage not in self.totals:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        now = self.timer()
        if self._stack:  # the outer stage pauses
            outer = self._stack[-1]
            self.totals[outer[0]] += now - outer[1]
        self._stack.append([stage, now])
        try:
            yield
        finally:
            end = self.timer()
            name, start = self._stack.pop()
            self.totals[name] += end - start
            if self._stack:  # and resumes
                self._stack[-1][1] = end

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)

    def since(self, before: dict[str, float]) -> dict[str, float]:
        return {k: v - before.get(k, 0.0) for k, v in self.totals.items()}
