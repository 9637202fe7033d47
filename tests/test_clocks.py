"""The clock-skew rule (backends/clocks.py): who refuses, from readings alone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from distributex.backends.clocks import (
    MAX_CLOCK_SKEW,
    ClockReading,
    beat_reading,
    clock_problem,
    store_reading,
)


def peer(offset: float, name: str = "p") -> ClockReading:
    return ClockReading(name, offset, offset)


def test_memcacheds_clock_is_the_authority() -> None:
    # Read at our 100.0 to 100.1; it says 120 (whole seconds): we are 20 s behind.
    reading = store_reading("memcached", 120.0, 1.0, 100.0, 100.1)
    problem = clock_problem([reading])
    assert problem is not None and "memcached" in problem
    # Within a second of ours (its clock truncates): fine.
    assert clock_problem([store_reading("memcached", 100.0, 1.0, 100.2, 100.3)]) is None


def test_a_stale_beat_is_not_taken_for_a_clock_behind() -> None:
    # Written 7 s ago by a peer whose clock agrees with ours.
    assert clock_problem([beat_reading("s1", 93.0, 8.0, 100.0, 100.01)]) is None
    # A beat from 20 s in our future is off whatever its age.
    assert clock_problem([beat_reading("s1", 120.0, 8.0, 100.0, 100.01)]) is not None


def test_two_servers_that_disagree_both_refuse() -> None:
    assert clock_problem([peer(20.0)]) is not None
    assert clock_problem([peer(-20.0)]) is not None


def test_the_majority_decides_who_is_off() -> None:
    # We and b agree; c is 20 s off: we go on, and c (off both of us) refuses.
    assert clock_problem([peer(0.0, "b"), peer(20.0, "c")]) is None
    assert clock_problem([peer(-20.0, "a"), peer(-20.0, "b")]) is not None


@given(st.lists(st.floats(-MAX_CLOCK_SKEW, MAX_CLOCK_SKEW), max_size=8))
def test_clocks_within_the_tolerance_never_refuse(offsets: list[float]) -> None:
    assert clock_problem([peer(o) for o in offsets]) is None


@given(
    st.lists(st.floats(-MAX_CLOCK_SKEW, MAX_CLOCK_SKEW), max_size=4),
    st.lists(
        st.floats(MAX_CLOCK_SKEW + 0.01, 1e6) | st.floats(-1e6, -MAX_CLOCK_SKEW - 0.01),
        min_size=1,
        max_size=8,
    ),
)
def test_refused_exactly_when_at_least_half_the_clocks_say_so(
    agree: list[float], off: list[float]
) -> None:
    problem = clock_problem([peer(o) for o in agree + off])
    assert (problem is not None) == (len(off) >= 1 + len(agree))
