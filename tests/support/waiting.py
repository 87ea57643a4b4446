"""Waiting for a condition with a deadline, instead of sleeping and hoping."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

__all__ = ["eventually"]

POLL = 0.01  # seconds between two looks at the condition


async def eventually(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 5.0,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` (a function or a coroutine function) until it holds; fail
    after ``timeout`` seconds.

    For state another thread or process changes without telling the loop (server
    counters updated by the tokio threads, a registry emptied by a handler's
    ``finally``, a server in another process). Where an event or a future can say it,
    wait on that instead.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} never became true within {timeout} s")
        await asyncio.sleep(POLL)
