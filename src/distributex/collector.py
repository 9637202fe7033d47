"""Python's garbage collector, set for a server that holds many connections.

A parked ``/wait/`` keeps a few hundred Python objects alive (its connection,
request, handler, future and task). CPython's collector scans every tracked
object in a full collection, and runs one each time the objects that
survived younger collections grow by a quarter. Measured on 2026-12-04
(``bench/fleet_queue.py``, redis, two servers, 20,000 waiters): each server
ran 9 full collections of about 0.4 s (3.2-3.6 s in all), the event loop
standing still for each, and an arrival cost 2.2 times what it did at 1,000
waiters (442 against 200 µs).

Two settings, both the usual remedy:

* the first generation is collected every 10,000 allocations, not 700: the
  objects of a request answered in between are freed by their reference
  counts and never promoted, so the older generations, and the full
  collections, grow only with what really lives on. Same run: no full
  collection, about 1 s of collection per server, 235 µs per arrival. A
  young collection scans at most that many objects (a millisecond or two).
* the objects that exist once the server is up (modules, configuration, the
  application) are frozen (``gc.freeze``): no collection scans them again.

Reference cycles are still collected, only later; memory held by them is
bounded by the thresholds.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # allocations between collections of the first generation


def tune_for_a_server() -> None:
    """Call once the server is up (its long-lived objects exist)."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    gc.collect()
    gc.freeze()
