"""Shared fixtures: a running server, an echo handshake, both event loops.

Every async test runs once on the default asyncio loop and once on uvloop (through
pytest-asyncio's ``pytest_asyncio_loop_factories`` hook), unless it is marked
``asyncio_loop_only``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import lightws
import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is Unix only
    uvloop = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "asyncio_loop_only: run on the default asyncio loop only, not uvloop"
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if uvloop is not None and item.get_closest_marker("asyncio_loop_only") is None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


async def echo_handler(conn: lightws.Connection, reverse: bool = False) -> None:
    try:
        async for msg in conn:
            body = msg.body[::-1] if reverse else msg.body
            await conn.send(lightws.Message(msg.opcode, body))
    except lightws.ConnectionClosed:
        pass


def echo_handshake(request: lightws.Request, response: lightws.Response) -> Any:
    """Accept everything; ``?reverse=1`` reverses each message body."""
    reverse = request.query.get("reverse") == "1"

    async def handler(conn: lightws.Connection) -> None:
        await echo_handler(conn, reverse)

    return handler


@contextlib.asynccontextmanager
async def serve(handshake: Any = None, **config: Any) -> AsyncIterator[lightws.Server]:
    """Run a server on an ephemeral loopback port for the duration of the block."""
    config.setdefault("addr", "127.0.0.1:0")
    server = lightws.Server(lightws.Config(handshake=handshake or echo_handshake, **config))
    async with server:
        yield server


def url(server: lightws.Server, path: str = "/") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


@pytest.fixture
async def echo_server() -> AsyncIterator[lightws.Server]:
    async with serve(echo_handshake, max_msg_len=4 << 20) as server:
        yield server


def handler_handshake(handler: Callable[[lightws.Connection], Any]) -> Any:
    """A handshake that accepts every client with ``handler``."""

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        return handler

    return handshake


def reporting_handshake(
    body: Callable[[lightws.Connection], Any],
) -> tuple[Any, asyncio.Future[Any]]:
    """Accept with ``body`` as handler; the future gets its return value or exception.

    Must be called with the test's loop running.
    """
    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def handler(conn: lightws.Connection) -> None:
        try:
            result = await body(conn)
        except BaseException as exc:
            if not outcome.done():
                outcome.set_exception(exc)
            raise
        if not outcome.done():
            outcome.set_result(result)

    return handler_handshake(handler), outcome


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; for counters updated just after an event."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.01)
