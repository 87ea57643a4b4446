"""The seed's countdown example: ``python examples/countdown.py``, then open
http://127.0.0.1:9001/ in a browser.

The client sends a number N; the server sends ``"N..."`` once a second down to
``"1..."``, then ``"boom!"``. A new number restarts the countdown and ``0`` stops it.

The interesting part is doing two things per connection at once: the handler keeps
reading (``async for``) while a separate task sends the countdown, and cancels that
task when the next number arrives or the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib

import lightws
from lightws.demos import answer_http


async def tick(conn: lightws.Connection, n: int) -> None:
    with contextlib.suppress(lightws.ConnectionClosed):
        for i in range(n, 0, -1):
            await conn.send(f"{i}...")
            await asyncio.sleep(1)
        await conn.send("boom!")


async def handler(conn: lightws.Connection) -> None:
    counting: asyncio.Task[None] | None = None
    try:
        async for msg in conn:
            if not msg.body.strip().isdigit():
                await conn.send("error: send a whole number")
                continue
            if counting is not None:
                counting.cancel()
            n = int(msg.body)
            counting = asyncio.ensure_future(tick(conn, n)) if n else None
            if n == 0:
                await conn.send("stopped")
    finally:
        if counting is not None:
            counting.cancel()


def handshake(request: lightws.Request, response: lightws.Response) -> lightws.Handler | None:
    if not request.upgrade:
        answer_http("countdown", request, response)
        return None
    return handler


async def main() -> None:
    config = lightws.Config(addr="127.0.0.1:9001", handshake=handshake, http_fallback=True)
    async with lightws.Server(config) as server:
        print(f"open http://127.0.0.1:{server.port}/ in a browser")
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
