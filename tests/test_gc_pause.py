"""paused_gc: no collection inside, the collector as it was after, nothing kept from a full collection."""

from __future__ import annotations

import gc
import weakref

from llmquant.gc_pause import paused_gc


class Node:
    def __init__(self) -> None:
        self.other = self  # a cycle: only the collector frees it


def test_no_collection_inside_and_the_state_restored():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        junk = [{} for _ in range(10_000)]  # far past the youngest generation's threshold (700)
        assert gc.get_count()[0] > 5_000  # nothing collected them (a collection resets the count)
    assert gc.isenabled()
    assert gc.get_count()[0] < 1_000  # promoted untraversed: the next young collection does not walk them
    del junk
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a caller that disabled it keeps it so
    finally:
        gc.enable()


def test_a_cycle_built_inside_is_still_collected_after():
    """Promoted, not frozen: a full collection after the pause frees the cycles made inside."""
    with paused_gc():
        ref = weakref.ref(Node())
    assert ref() is not None  # a cycle waits for the collector
    gc.collect()
    assert ref() is None


def test_importing_llmquant_leaves_the_collector_on():
    import llmquant  # noqa: F401 - the package's import pauses the collector around torch's

    assert gc.isenabled()
