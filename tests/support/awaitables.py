"""Driving ``Connection`` awaitables by hand, to see whether they wait.

Every coroutine method of ``Connection`` returns a native ``Op`` with the coroutine
protocol (docs/architecture.md, "Awaitables"): a step that raises ``StopIteration``
completed, a step that yields an asyncio future waits for it, and a step that yields
``None`` gives the loop one turn (the fairness yield, once every 32 operations that
complete without waiting).
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any

__all__ = ["noting_waits", "result_without_waiting"]


def result_without_waiting(awaitable: Awaitable[Any]) -> tuple[Any, int]:
    """Step ``awaitable`` by hand, without the event loop, until it completes.

    Returns its result and how many bare yields (fairness yields) it made on the way,
    at most one. Fails if a step yields a future: the operation would have waited.
    """
    op: Any = awaitable.__await__()
    bare_yields = 0
    try:
        while True:
            try:
                step = op.send(None)
            except StopIteration as done:
                return done.value, bare_yields
            if step is not None:
                raise AssertionError(f"it waited on {step!r} instead of completing at once")
            bare_yields += 1
            if bare_yields > 1:
                raise AssertionError("it yielded to the loop more than once without waiting")
    finally:
        op.close()  # a no-op once complete; gives back what a waiting receive was handed


@types.coroutine
def noting_waits(
    awaitable: Awaitable[Any], on_wait: Callable[[], object]
) -> Generator[Any, Any, Any]:
    """Await ``awaitable`` as a task would, calling ``on_wait()`` each time it waits on a
    future (not on a bare fairness yield). Cancellation reaches it as usual."""
    op: Any = awaitable.__await__()
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = op.throw(error) if error is not None else op.send(value)
        except StopIteration as done:
            return done.value
        if step is not None:
            on_wait()
        try:
            value, error = (yield step), None
        except BaseException as exc:  # CancelledError, thrown in by the task
            value, error = None, exc
