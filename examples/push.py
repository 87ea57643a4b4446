"""The seed's push example: ``python examples/push.py``, open
http://127.0.0.1:9001/?id=alice in a browser, then push to that tab:

    curl 'http://127.0.0.1:9002/put/?id=alice&msg=hello'

Registering is subscribing: a client connecting with ``?id=alice`` is accepted with
``lightws.Accept(topics=["id:alice"])``, and a push is one ``server.publish("id:alice",
msg)``. The clients only listen, so there is no handler: an ``Accept`` connection is
handled in Rust (what the client sends is discarded; pings and close are answered) and
holds no Python object while it waits. No registry of connections in Python (lightws
unsubscribes a connection when it closes), and every client registered with an id gets
what is pushed to it: open two tabs as alice.

The push endpoint is a second :class:`lightws.Server` on a loopback-only port with
``http_fallback=True``: its handshake answers plain HTTP requests and never accepts an
upgrade. ``200 ok`` when the message went to at least one client, ``400 no_id`` without
an id, ``404 unknown_id`` when nobody registered that id.
"""

from __future__ import annotations

import asyncio
import contextlib

import lightws
from lightws.demos import answer_http

PUT_URL = "http://127.0.0.1:9002/put/"


def handshake(request: lightws.Request, response: lightws.Response) -> lightws.Accept | None:
    if not request.upgrade:
        answer_http("push", request, response, {"__PUT_URL__": PUT_URL})
        return None
    client_id = request.query.get("id")
    if not client_id:
        response.status = 400
        response.body = b"no_id"
        return None
    return lightws.Accept(topics=[f"id:{client_id}"])  # clients only listen


def put_endpoint(server: lightws.Server) -> lightws.HandshakeFunc:
    """The handshake of the HTTP side: ``GET /put/?id=&msg=`` publishes to ``server``."""

    def put(request: lightws.Request, response: lightws.Response) -> None:
        response.headers["Access-Control-Allow-Origin"] = "*"  # the demo page pushes too
        client_id = request.query.get("id")
        if request.upgrade or request.path != "/put/":
            response.status, response.body = 404, b"not found"
        elif not client_id:
            response.status, response.body = 400, b"no_id"
        elif server.publish(f"id:{client_id}", request.query.get("msg", "")) == 0:
            response.status, response.body = 404, b"unknown_id"
        else:
            response.status, response.body = 200, b"ok"

    return put


async def main() -> None:
    ws = lightws.Config(addr="127.0.0.1:9001", handshake=handshake, http_fallback=True)
    async with lightws.Server(ws) as server:
        http = lightws.Config(
            addr="127.0.0.1:9002", handshake=put_endpoint(server), http_fallback=True
        )
        async with lightws.Server(http):
            print(f"open http://127.0.0.1:{server.port}/?id=alice in a browser, then")
            print(f"curl '{PUT_URL}?id=alice&msg=hello'")
            await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
