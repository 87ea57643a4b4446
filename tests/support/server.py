"""Servers in the test's own process: ``serve()`` on an ephemeral port, and handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import lightws

__all__ = [
    "echo_handler",
    "echo_handshake",
    "handler_handshake",
    "reporting_handshake",
    "serve",
    "url",
]


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
    # LIGHTWS_TEST_THREADS=0: the tests' servers drive connections on the event loop.
    if "LIGHTWS_TEST_THREADS" in os.environ:
        config.setdefault("threads", int(os.environ["LIGHTWS_TEST_THREADS"]))
    server = lightws.Server(lightws.Config(handshake=handshake or echo_handshake, **config))
    async with server:
        yield server


def url(server: lightws.Server, path: str = "/") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


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
