"""The seed's echo demo: every message comes back; ``?reverse=1`` reverses it and the
message ``exit`` closes the connection (1000)."""

from __future__ import annotations

from .._lightws import Connection, Message
from ..config import Handler
from ..http import Request, Response
from ._page import answer_http

__all__ = ["echo_handshake"]


def echo_handshake(request: Request, response: Response) -> Handler | None:
    """Accept every upgrade with an echo handler; ``GET /`` is the echo page."""
    if not request.upgrade:
        answer_http("echo", request, response)
        return None
    reverse = request.query.get("reverse") == "1"

    async def handler(conn: Connection) -> None:
        async for msg in conn:
            if msg.body == b"exit":
                await conn.close()
                return
            body = msg.body[::-1] if reverse else msg.body
            await conn.send(Message(msg.opcode, body))

    return handler
