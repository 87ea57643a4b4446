"""The seed's echo example: ``python examples/echo.py`` then connect to
ws://127.0.0.1:9001/echo (``?reverse=1`` reverses each message)."""

from __future__ import annotations

import asyncio

import lightws


def handshake(request: lightws.Request, response: lightws.Response) -> lightws.Handler | None:
    if request.path != "/echo":
        response.status = 404
        response.body = b"no such endpoint"
        return None
    reverse = request.query.get("reverse") == "1"
    response.headers["Set-Cookie"] = "seen=1"

    async def handler(conn: lightws.Connection) -> None:
        async for msg in conn:
            body = msg.body[::-1] if reverse else msg.body
            await conn.send(lightws.Message(msg.opcode, body))

    return handler


async def main() -> None:
    config = lightws.Config(addr="127.0.0.1:9001", handshake=handshake, max_msg_len=16 << 20)
    async with lightws.Server(config) as server:
        print(f"listening on ws://127.0.0.1:{server.port}/echo")
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
