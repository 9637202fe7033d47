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
import time
from collections.abc import Callable
from typing import Any, TextIO

from distributex.events import EVENT_FIELDS, JsonFormatter, fields_text

LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EVENTS_LOGGER = "distributex.events"
# Lines of one loop turn written at once at most (a turn that logs more writes more often).
BATCH = 256


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

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._add(line)

    def _add(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread: what waits, then this, now
            waiting, self._lines = self._lines, []
            self._write("".join(waiting) + line)
            return
        if not self._lines:
            loop.call_soon(self.flush)
        self._lines.append(line)
        if len(self._lines) >= BATCH:
            self.flush()

    def event_line(self, event: str, fields: dict[str, Any]) -> None:
        """An INFO line of ``distributex.events``, as its ``LogRecord`` would be written."""
        now = time.time()
        msecs = int((now - int(now)) * 1000)
        message = f"{event} {fields_text(fields)}"
        formatter = self.formatter
        if isinstance(formatter, LineFormatter):
            stamp = formatter.stamp(now, msecs)
            self._add(f"{stamp} INFO {EVENTS_LOGGER}: {message}{self.terminator}")
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
        self._add(json.dumps(entry, ensure_ascii=False, default=str) + self.terminator)

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
