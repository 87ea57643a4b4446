"""The seed's countdown demo: the client sends a number N, the server sends ``"N..."``,
``"N-1..."`` ... ``"1..."`` one tick apart (1 s), then ``"boom!"``.

A new number restarts the countdown; ``0`` stops it (the server answers
``"stopped"``); anything that is not a whole number from 0 to :data:`MAX_COUNT` gets
an ``"error: ..."`` message and the countdown in progress, if any, carries on.
"""

from __future__ import annotations

import asyncio

from .._lightws import Connection
from ..config import Handler, HandshakeFunc
from ..exceptions import ConnectionClosed
from ..http import Request, Response
from ._page import answer_http

__all__ = ["MAX_COUNT", "countdown", "countdown_handshake"]

#: The largest N accepted (one hour at the default tick).
MAX_COUNT = 3600


def countdown_handshake(tick: float = 1.0) -> HandshakeFunc:
    """A handshake that runs :func:`countdown` with ``tick`` seconds between numbers;
    ``GET /`` is the countdown page."""

    def handshake(request: Request, response: Response) -> Handler | None:
        if not request.upgrade:
            answer_http("countdown", request, response)
            return None

        async def handler(conn: Connection) -> None:
            await countdown(conn, tick)

        return handler

    return handshake


async def countdown(conn: Connection, tick: float = 1.0) -> None:
    """Serve countdown requests on ``conn`` until it closes."""
    running: asyncio.Task[None] | None = None
    try:
        async for msg in conn:
            try:
                n = int(msg.body.strip())
            except ValueError:
                n = -1
            if not 0 <= n <= MAX_COUNT:
                await conn.send(f"error: send a whole number from 0 to {MAX_COUNT}")
                continue
            if running is not None:
                running.cancel()
                running = None
            if n == 0:
                await conn.send("stopped")
            else:
                running = asyncio.ensure_future(_count(conn, n, tick))
    finally:
        if running is not None:
            running.cancel()


async def _count(conn: Connection, n: int, tick: float) -> None:
    try:
        for i in range(n, 0, -1):
            await conn.send(f"{i}...")
            await asyncio.sleep(tick)
        await conn.send("boom!")
    except ConnectionClosed:
        pass  # the client left mid-countdown
