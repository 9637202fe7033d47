"""The batched log handler: when lines reach the stream, and in which order."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import pytest

from distributex import logsetup
from distributex.logsetup import BatchedHandler, LineFormatter


@pytest.fixture
def handler() -> BatchedHandler:
    made = BatchedHandler(io.StringIO())
    made.setFormatter(LineFormatter(logsetup.LINE_FORMAT))
    return made


def written(handler: BatchedHandler) -> list[str]:
    stream = handler.stream
    assert isinstance(stream, io.StringIO)
    return [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]


def record(message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("distributex", level, __file__, 1, message, None, None)


async def next_turn() -> None:
    await asyncio.sleep(0)


def test_outside_a_loop_lines_are_written_at_once(handler: BatchedHandler) -> None:
    handler.emit(record("one"))
    handler.event_line("grant", {"pool": "p", "host": "a"})
    assert written(handler) == ["one", "grant pool=p host=a"]


def test_a_turns_lines_are_written_at_its_end_in_order(handler: BatchedHandler) -> None:
    async def main() -> None:
        handler.event_line("grant", {"pool": "p", "host": "a"})
        handler.emit(record("two"))
        handler.event_line("release", {"pool": "p", "host": "a"})
        assert written(handler) == []  # not before the turn ends
        await next_turn()
        assert written(handler) == ["grant pool=p host=a", "two", "release pool=p host=a"]

    asyncio.run(main())


def test_event_lines_soon_after_a_write_wait_at_most_events_every(
    handler: BatchedHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = 0.5  # long enough that a busy machine does not pass it between two turns
    monkeypatch.setattr(logsetup, "EVENTS_EVERY", every)

    async def main() -> None:
        handler.event_line("grant", {"pool": "p", "host": "a"})
        await next_turn()
        assert written(handler) == ["grant pool=p host=a"]  # quiet before: at the turn's end
        handler.event_line("release", {"pool": "p", "host": "a"})
        since = time.monotonic()
        await next_turn()
        await next_turn()
        assert written(handler) == ["grant pool=p host=a"]  # written just now: it waits
        while len(written(handler)) < 2:
            assert time.monotonic() - since < 10 * every, "the waiting event line was never written"
            await asyncio.sleep(every / 10)
        assert written(handler)[1] == "release pool=p host=a"

    asyncio.run(main())


def test_another_line_writes_the_waiting_event_lines_with_it(handler: BatchedHandler) -> None:
    async def main() -> None:
        handler.event_line("grant", {"pool": "p", "host": "a"})
        await next_turn()
        handler.event_line("release", {"pool": "p", "host": "a"})
        await next_turn()
        handler.emit(record("store unreachable"))
        await next_turn()
        assert written(handler) == [
            "grant pool=p host=a",
            "release pool=p host=a",
            "store unreachable",
        ]

    asyncio.run(main())


def test_a_full_batch_is_written_at_once(handler: BatchedHandler) -> None:
    async def main() -> None:
        for n in range(logsetup.BATCH):
            handler.event_line("grant", {"pool": "p", "host": f"h{n}"})
        assert len(written(handler)) == logsetup.BATCH

    asyncio.run(main())
