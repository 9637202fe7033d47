"""The one thread that owns the SQLite connection; the event loop hands it batches."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any


class SqliteWorker:
    """One thread that owns the SQLite connection and runs what the event loop hands it.

    Lighter than a ThreadPoolExecutor for the one round trip per batch: a
    queue in, ``call_soon_threadsafe`` out.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="distributex-sqlite", daemon=True)
        self._thread.start()

    async def call(self, fn: Any, *args: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.submit(fn, args, lambda result, error: _settle(future, result, error))
        return await future

    def submit(
        self, fn: Any, args: tuple[Any, ...], callback: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run ``fn(*args)`` in the thread, then ``callback(result, error)`` in the loop."""
        self._jobs.put((fn, args, callback, asyncio.get_running_loop()))

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, callback, loop = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(callback, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
