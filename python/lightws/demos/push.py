"""The seed's push demo: clients register with ``ws://host/?id=NAME``; a plain HTTP
request ``GET /put/?id=NAME&msg=TEXT`` on a second, localhost-only server sends
``TEXT`` to that client.

The HTTP side answers ``200 ok`` when the message was handed to the client, ``400
no_id`` without an id, ``404 unknown_id`` when no client has that id. A second client
with an id already in use takes it over; the first is closed with 4001.

The HTTP side is a second :class:`lightws.Server` with ``http_fallback=True`` whose
handshake never accepts an upgrade. It has no authentication: bind it to loopback only.
Its answers carry ``Access-Control-Allow-Origin: *`` so that the demo page can push
from the browser.
"""

from __future__ import annotations

import asyncio

from .._lightws import Connection
from ..config import Handler
from ..exceptions import ConnectionClosed
from ..http import Request, Response
from ._page import answer_http

__all__ = ["REPLACED", "PushRegistry"]

#: Close code sent to a client whose id was taken over by a newer connection.
REPLACED = 4001


class PushRegistry:
    """The registered clients, by id, and the two handshakes of the push demo.

    ``put_url`` is shown on the demo page (set it once the HTTP server is bound).
    """

    def __init__(self, put_url: str = "") -> None:
        self.put_url = put_url
        self._clients: dict[str, Connection] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def ids(self) -> list[str]:
        """The ids of the registered clients."""
        return list(self._clients)

    def handshake(self, request: Request, response: Response) -> Handler | None:
        """The WebSocket side: accept ``?id=NAME``, reject without an id (400
        ``no_id``); ``GET /`` is the push page."""
        if not request.upgrade:
            answer_http("push", request, response, {"__PUT_URL__": self.put_url})
            return None
        client_id = request.query.get("id", "")
        if not client_id:
            response.status = 400
            response.body = b"no_id"
            return None

        async def handler(conn: Connection) -> None:
            self._register(client_id, conn)
            try:
                async for _ in conn:
                    pass  # clients only listen; whatever they send is dropped
            finally:
                if self._clients.get(client_id) is conn:
                    del self._clients[client_id]

        return handler

    async def push(self, client_id: str, message: str) -> bool:
        """Send ``message`` to client ``client_id``; False if there is no such client
        (or it closed meanwhile)."""
        conn = self._clients.get(client_id)
        if conn is None or conn.closed:
            return False
        try:
            await conn.send(message)
        except ConnectionClosed:
            return False
        return True

    async def put_handshake(self, request: Request, response: Response) -> Handler | None:
        """The HTTP side (run it with ``http_fallback=True``): ``GET /put/?id=&msg=``."""
        response.headers["Content-Type"] = "text/plain; charset=utf-8"
        response.headers["Access-Control-Allow-Origin"] = "*"
        if request.upgrade:
            response.status = 400
            response.body = b"plain HTTP only: GET /put/?id=&msg="
        elif request.path not in ("/put/", "/put"):
            response.status = 404
            response.body = b"not found"
        elif request.method != "GET":
            response.status = 405
            response.headers["Allow"] = "GET"
            response.body = b"method not allowed"
        elif not request.query.get("id"):
            response.status = 400
            response.body = b"no_id"
        elif await self.push(request.query["id"], request.query.get("msg", "")):
            response.status = 200
            response.body = b"ok"
        else:
            response.status = 404
            response.body = b"unknown_id"
        return None

    def _register(self, client_id: str, conn: Connection) -> None:
        old = self._clients.get(client_id)
        self._clients[client_id] = conn
        if old is not None and not old.closed:
            task = asyncio.ensure_future(_close(old, REPLACED, "replaced by a newer connection"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


async def _close(conn: Connection, code: int, reason: str) -> None:
    try:
        await conn.close(code, reason)
    except ConnectionClosed:
        pass
