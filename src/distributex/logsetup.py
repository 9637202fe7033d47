"""The server's log lines: the standard ``logging`` module, written in batches.

At the default level a grant and a release each log a line. Written one
``write()`` at a time (stderr is line-buffered) and with the time formatted
anew for each, those lines cost about a third of a hand-off on a busy mutex
(bench/README.md, "The floor"). So:

* lines made while the event loop runs are written together once per loop
  turn, in the order they were made; lines made elsewhere (start-up, stop, a
  worker thread) first write what waits, then themselves, at once. A line
  is out before the loop waits for more work, so nothing sits in memory
  while the server is quiet. (A crash of the process itself, not an
  exception, can lose the lines of its last turn.)
* the date and time of a line are formatted once per second, the
  milliseconds added per line: the text is what ``logging.Formatter`` makes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TextIO

from distributex.events import JsonFormatter

LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LineFormatter(logging.Formatter):
    """``logging.Formatter`` with the local date and time made once per second."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._text},{int(record.msecs):03d}"


class BatchedHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines of one event-loop turn with one write."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread: what waits, then this, now
            waiting, self._lines = self._lines, []
            self._write("".join(waiting) + line)
            return
        if not self._lines:
            loop.call_soon(self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        self.acquire()
        try:
            lines, self._lines = self._lines, []
            self._write("".join(lines))
        finally:
            self.release()

    def _write(self, text: str) -> None:
        if not text:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # as StreamHandler does: a closed or full stream is reported
            self.handleError(logging.makeLogRecord({"msg": text.rstrip("\n")}))


def configure(level: str, json_lines: bool = False) -> None:
    """The root logger at ``level``, writing batched lines to stderr (text or JSON)."""
    # The lines show none of caller, thread or process: leave them out of every
    # record (the logging HOWTO's "Optimization"); a grant's line costs less.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BatchedHandler()
    handler.setFormatter(JsonFormatter() if json_lines else LineFormatter(LINE_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
