"""What a request served outside a task needs: where its answer goes, and a task to go on in.

On a backend that answers in the step that read the request
(``answers_in_step``), the lean protocol runs :func:`distributex.verbs.serve`
by hand, outside any task: it finishes in that step with an answer, or with
a :class:`~distributex.parkedwait.ParkedWait` that the backend wakes later
and that answers on the connection. Nothing on that path
may need ``asyncio.current_task()`` (``asyncio.timeout`` does: the in-memory
backend times out with a timer instead). A coroutine that awaits something
after all is handed to a task from where it waits (:func:`carried_on`):
correct, only not as cheap.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from typing import Any

from distributex.call import Answer
from distributex.parkedwait import ParkedWait

Serving = Coroutine[Any, Any, Answer | ParkedWait]  # distributex.verbs.serve(...), started


@types.coroutine
def carried_on(serving: Serving, waits_for: Any) -> Generator[Any, Any, Answer | ParkedWait]:
    """``serving``, started outside a task, carried on in one from its wait for
    ``waits_for``, as if it had run in the task all along."""
    try:
        while True:
            try:
                sent = yield waits_for
            except GeneratorExit:
                serving.close()
                raise
            except BaseException as exc:  # a cancel: hang-up, stop, revocation
                waits_for = serving.throw(exc)
            else:
                waits_for = serving.send(sent)
    except StopIteration as answered:
        result: Answer | ParkedWait = answered.value
        return result
