"""What happens to locks, told once: to the log, to the metrics, to live status watchers.

The HTTP layer and the backends call one :class:`Events` object (the server
makes it; a backend gets it as ``backend.events``). Each lock event is:

* one log line on the ``distributex.events`` logger at INFO, with its fields
  both in the text (``grant pool=backup host=web1 fence=17 waited=0.012``)
  and as record attributes, which ``--log-format json`` writes as JSON keys;
* a count in the Prometheus metrics (when metrics are on, see
  :mod:`distributex.metrics`);
* a nudge to whoever watches status (the dashboard's event stream), so a
  change shows without a reload.

Events that a server sees only through a shared store (a grant made by
another server, an expiry stepped elsewhere) are counted by the server that
made them: sum the metrics over servers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributex.metrics import Metrics

log = logging.getLogger("distributex.events")

# The record attributes an event line carries (JSON keys with --log-format json).
EVENT_FIELDS = ("event", "pool", "host", "fence", "waited", "reason", "status")


class Events:
    """The sink of lock events: log lines, metrics, change notices."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        lines: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.metrics = metrics
        # Writes an event's line: through ``logging`` unless the server's own
        # handler takes them directly (distributex.logsetup.event_lines).
        self.lines = lines or _logged_later
        self._version = 0
        self._changed: asyncio.Event | None = None
        self.closed = False

    # -- change notices (for status streams) ---------------------------------------

    @property
    def version(self) -> int:
        """A number that grows with every change this server made or saw."""
        return self._version

    def changed(self) -> None:
        """Lock state may have changed: wake status watchers (cheap when none watch)."""
        self._version += 1
        event = self._changed
        if event is not None:
            event.set()

    async def wait_changed(self, since: int, timeout: float) -> bool:
        """Wait until :attr:`version` passes ``since`` (True) or ``timeout`` (False)."""
        if self._version != since or self.closed:
            return True
        if self._changed is None:
            self._changed = asyncio.Event()
        event = self._changed
        try:
            async with asyncio.timeout(timeout):
                while self._version == since and not self.closed:
                    event.clear()
                    await event.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """The server stops: status streams end."""
        self.closed = True
        if self._changed is not None:
            self._changed.set()

    # -- lock events -----------------------------------------------------------------

    def granted(self, pool: str, host: str, fence: int, waited: float) -> None:
        self.changed()
        if self.metrics is not None:
            self.metrics.granted(pool, waited)
        if log.isEnabledFor(logging.INFO):
            self.lines(
                "grant", {"pool": pool, "host": host, "fence": fence, "waited": round(waited, 6)}
            )

    def released(self, pool: str, host: str, fence: int) -> None:
        self.changed()
        if self.metrics is not None:
            self.metrics.released(pool)
        if log.isEnabledFor(logging.INFO):
            self.lines("release", {"pool": pool, "host": host, "fence": fence})

    def expired(self, pool: str, host: str, fence: int) -> None:
        self.changed()
        if self.metrics is not None:
            self.metrics.expired(pool)
        if log.isEnabledFor(logging.INFO):
            self.lines("expire", {"pool": pool, "host": host, "fence": fence})

    def lost(self, pool: str, host: str) -> None:
        """A holder renewed or released a lease that was no longer current (GONE)."""
        if self.metrics is not None:
            self.metrics.lost(pool)
        if log.isEnabledFor(logging.INFO):
            self.lines("lost", {"pool": pool, "host": host})

    def timed_out(self, pool: str, host: str, waited: float) -> None:
        self.changed()
        if self.metrics is not None:
            self.metrics.timed_out(pool)
        if log.isEnabledFor(logging.INFO):
            self.lines("timeout", {"pool": pool, "host": host, "waited": round(waited, 6)})

    def refused(self, pool: str | None, host: str | None, status: int, reason: str) -> None:
        """An INVALID (4xx) or UNAVAILABLE (503) answer to a lock verb."""
        if self.metrics is not None:
            self.metrics.refused(pool, status)
        if log.isEnabledFor(logging.INFO):
            self.lines("refuse", {"pool": pool, "host": host, "status": status, "reason": reason})

    def queued(self) -> None:
        """A waiter joined or left a queue (no log line: the grant or timeout tells)."""
        self.changed()

    def request(self, verb: str, status: int) -> None:
        if self.metrics is not None:
            self.metrics.request(verb, status)


def _logged_later(event: str, fields: dict[str, Any]) -> None:
    """Log an event's line just after the current callback: the answer the
    event is about goes out first (a line costs ~20 µs; on a busy mutex that is
    on the way of every hand-off otherwise). Lines keep their order."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _log_event(event, fields)
    else:
        loop.call_soon(_log_event, event, fields)


def _log_event(event: str, fields: dict[str, Any]) -> None:
    log.info("%s %s", event, fields_text(fields), extra={"event": event, **fields})


def fields_text(fields: dict[str, Any]) -> str:
    """``pool=p host=h ...``: an event line's fields, those given."""
    return " ".join([f"{key}={_show(value)}" for key, value in fields.items() if value is not None])


# Names may hold spaces or '=': quote them so a line still splits into fields.
_NEEDS_QUOTES = re.compile(r'[ ="\\]')


def _show(value: Any) -> str:
    if isinstance(value, str):
        if not value or _NEEDS_QUOTES.search(value):
            return json.dumps(value, ensure_ascii=False)
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and an event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EVENT_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


NULL_EVENTS = Events()
