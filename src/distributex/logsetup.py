"""The server's log lines: the standard ``logging`` module, written in batches.

At the default level a grant and a release each log a line. Written one
``write()`` at a time (stderr is line-buffered) and with the time formatted
anew for each, those lines cost about a third of a hand-off on a busy mutex
(bench/README.md, "The floor"). So:

* lines made while the event loop runs are written together at the end of
  the loop turn that made them (one ``write()`` for every line of a busy
  turn: the answers of that turn go out first), in the order they were
  made; lines made elsewhere (start-up, a worker thread) first write what
  waits, then themselves, at once. Logging shuts down (at exit, also after
  an exception) by writing what waits.
* the lock events' lines are written at most every :data:`EVENTS_EVERY`
  seconds: on a busy mutex a turn holds one hand-off, and a ``write()`` per
  turn cost a fifth of it (bench/README.md, "Answers in the step that read
  them"). A line waits at most that long; on a quiet server it is written
  at the end of its turn; any other line writes what waits with it. A
  server killed with SIGKILL loses at most that much of its event lines.
* the date and time of a line are formatted once per second, the
  milliseconds added per line: the text is what ``logging.Formatter`` makes.
* the lock events' lines (:mod:`distributex.events`) skip the ``LogRecord``
  when this handler alone writes them (:func:`event_lines`): the same text,
  made in a third of the time. With other handlers or filters configured
  (an embedding program, the twistd plugin) they go through ``logging``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from distributex.events import EVENT_FIELDS, JsonFormatter, fields_text

LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EVENTS_LOGGER = "distributex.events"
# Lines of one loop turn written at once at most (a turn that logs more writes more often).
BATCH = 256
# The lock events' lines are written at most this often (seconds; see above).
EVENTS_EVERY = 0.02


class LineFormatter(logging.Formatter):
    """``logging.Formatter`` with the local date and time made once per second."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self.stamp(record.created, int(record.msecs))

    def stamp(self, created: float, msecs: int) -> str:
        """The date and time of a line made at ``created`` (``msecs`` past the second)."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._text},{msecs:03d}"


class BatchedHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines of one event-loop turn with one write."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._soon = False  # a write at the end of this loop turn is due
        self._later: asyncio.TimerHandle | None = None  # a write of event lines is due
        self._written = 0.0  # when lines were last written (time.monotonic())
        # The loop of the thread that last logged from one (get_running_loop costs a syscall).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._add(line)

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        loop, thread = self._loop, threading.get_ident()
        if loop is not None and thread == self._thread and loop.is_running():
            return loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self._loop, self._thread = loop, thread
        return loop

    def _add(self, line: str, event: bool = False) -> None:
        loop = self._running_loop()
        if loop is None:  # no loop runs in this thread: what waits, then this, now
            waiting, self._lines = self._lines, []
            self._write("".join(waiting) + line)
            return
        self._lines.append(line)
        if len(self._lines) >= BATCH:
            self.flush()
        elif self._soon:
            pass
        elif event and (wait := self._written + EVENTS_EVERY - time.monotonic()) > 0:
            if self._later is None:
                self._later = loop.call_later(wait, self.flush)
        else:
            self._soon = True
            loop.call_soon(self.flush)

    def event_line(self, event: str, fields: dict[str, Any]) -> None:
        """An INFO line of ``distributex.events``, as its ``LogRecord`` would be written."""
        now = time.time()
        msecs = int((now - int(now)) * 1000)
        message = f"{event} {fields_text(fields)}"
        formatter = self.formatter
        if isinstance(formatter, LineFormatter):
            stamp = formatter.stamp(now, msecs)
            self._add(f"{stamp} INFO {EVENTS_LOGGER}: {message}{self.terminator}", event=True)
            return
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{msecs:03d}Z",
            "level": "info",
            "logger": EVENTS_LOGGER,
            "message": message,
            "event": event,
        }
        for key in EVENT_FIELDS:
            value = fields.get(key)
            if value is not None:
                entry[key] = value
        self._add(json.dumps(entry, ensure_ascii=False, default=str) + self.terminator, event=True)

    def flush(self) -> None:
        self.acquire()
        try:
            self._soon = False
            if self._later is not None:
                self._later.cancel()
                self._later = None
            lines, self._lines = self._lines, []
            if lines:
                self._write("".join(lines))
                self._written = time.monotonic()
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


def event_lines() -> Callable[[str, dict[str, Any]], None] | None:
    """The writer of event lines without ``LogRecord`` (None: ``logging`` must make them).

    Only when the root logger's one handler is a :class:`BatchedHandler` and
    nothing between ``distributex.events`` and it filters or adds a handler.
    """
    handlers = logging.getLogger().handlers
    if len(handlers) != 1 or not isinstance(handlers[0], BatchedHandler):
        return None
    handler = handlers[0]
    if handler.filters or handler.level > logging.INFO or logging.getLogger().filters:
        return None
    formatter = handler.formatter
    if not isinstance(formatter, JsonFormatter) and not (
        isinstance(formatter, LineFormatter) and formatter._fmt == LINE_FORMAT
    ):
        return None
    for name in (EVENTS_LOGGER, "distributex"):
        logger = logging.getLogger(name)
        if logger.handlers or logger.filters or not logger.propagate:
            return None
    return handler.event_line


def configure(level: str, json_lines: bool = False) -> None:
    """The root logger at ``level``, writing batched lines to stderr (text or JSON)."""
    # The lines show none of caller, thread or process: leave them out of every
    # record (the logging HOWTO's "Optimization"); a grant's line costs less.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BatchedHandler()
    handler.setFormatter(JsonFormatter() if json_lines else LineFormatter(LINE_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
