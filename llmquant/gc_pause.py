"""Cyclic garbage collection paused while a phase builds many objects that hold no cycles.

Python collects its youngest generation every 700 container allocations and
the oldest, which walks every live object, every so often after; importing
torch and parsing a tokenizer (a dict per token, a string per merge) allocate
hundreds of thousands of containers, so most of their time went to collections
that find nothing to free. Inside ``paused_gc`` reference counting frees what
it always freed; only cycles wait, for the next full collection.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside; the collector's state as it was after (a caller that disabled it keeps it so)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # what the phase built goes to the oldest generation untraversed (freeze, then unfreeze
        # into it): left young, the first collection after would walk all of it once more
        gc.freeze()
        gc.unfreeze()
        if enabled:
            gc.enable()
