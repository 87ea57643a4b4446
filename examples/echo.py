"""The seed's echo example: ``python examples/echo.py``, then open
http://127.0.0.1:9001/echo in a browser, or connect a WebSocket client to
ws://127.0.0.1:9001/echo (``?reverse=1`` reverses each message).

``http_fallback=True`` shows plain HTTP requests to the same handshake callable
(``request.upgrade`` is False): it answers ``GET /echo`` with the demo page from
:mod:`lightws.demos`. Ctrl-C or SIGTERM closes every client with 1001 and exits 0
(a second one drops the clients that have not answered yet).
"""

from __future__ import annotations

import lightws
from lightws.demos import answer_http


def handshake(request: lightws.Request, response: lightws.Response) -> lightws.Handler | None:
    if request.path != "/echo":
        response.status = 404
        response.body = b"no such endpoint"
        return None
    if not request.upgrade:
        answer_http("echo", request, response, path="/echo")
        return None
    reverse = request.query.get("reverse") == "1"
    response.headers["Set-Cookie"] = "seen=1"

    async def handler(conn: lightws.Connection) -> None:
        async for msg in conn:
            body = msg.body[::-1] if reverse else msg.body
            await conn.send(lightws.Message(msg.opcode, body))

    return handler


if __name__ == "__main__":
    print("open http://127.0.0.1:9001/echo in a browser")
    config = lightws.Config(
        addr="127.0.0.1:9001", handshake=handshake, http_fallback=True, max_msg_len=16 << 20
    )
    lightws.run(config)  # until Ctrl-C or SIGTERM
