"""The seed's push demo: clients register with ``ws://host/?id=NAME``; a plain HTTP
request ``GET /put/?id=NAME&msg=TEXT`` on a second, localhost-only server sends
``TEXT`` to every client registered with that id.

Registering is subscribing: the handshake accepts a client with
``lightws.Accept(topics=["id:NAME"])`` and the push is one ``server.publish("id:NAME",
TEXT)`` (docs/pubsub.md). The clients only listen, so they need no handler: an
``Accept`` connection has no task, no coroutine and no Python object at all while it
waits for a push; what it sends is discarded, and pings and the close handshake are
answered in Rust. There is no registry of connections in Python; a closed connection
is unsubscribed by lightws. Several clients may share an id (two tabs, a phone and a
laptop): each of them gets every message pushed to it.

The HTTP side answers ``200 ok`` when the message went to at least one client (the
``X-Delivered`` header says to how many), ``400 no_id`` without an id, ``404
unknown_id`` when no client has that id.

The HTTP side is a second :class:`lightws.Server` with ``http_fallback=True`` whose
handshake never accepts an upgrade. It has no authentication: bind it to loopback only.
Its answers carry ``Access-Control-Allow-Origin: *`` so that the demo page can push
from the browser.
"""

from __future__ import annotations

from .. import Accept
from ..http import Request, Response
from ..server import Server
from ._page import answer_http

__all__ = ["PushRegistry", "push_topic"]


def push_topic(client_id: str) -> str:
    """The topic a client registered as ``client_id`` is subscribed to."""
    return f"id:{client_id}"


class PushRegistry:
    """The two handshakes of the push demo; the registry itself is the topics of
    ``server``, the WebSocket server the clients connect to.

    ``server`` is needed by :meth:`push` and :meth:`put_handshake` (set it once that
    server is created); ``put_url`` is shown on the demo page (set it once the HTTP
    server is bound).
    """

    def __init__(self, put_url: str = "", server: Server | None = None) -> None:
        self.put_url = put_url
        self.server = server

    def handshake(self, request: Request, response: Response) -> Accept | None:
        """The WebSocket side: accept ``?id=NAME`` subscribed to its topic, reject
        without an id (400 ``no_id``); ``GET /`` is the push page."""
        if not request.upgrade:
            answer_http("push", request, response, {"__PUT_URL__": self.put_url})
            return None
        client_id = request.query.get("id", "")
        if not client_id:
            response.status = 400
            response.body = b"no_id"
            return None
        # Clients only listen: whatever they send is dropped.
        return Accept(topics=[push_topic(client_id)])

    def push(self, client_id: str, message: str) -> int:
        """Send ``message`` to every client registered as ``client_id``; return how
        many (0: no such client, or no server yet). Never waits."""
        if self.server is None:
            return 0
        return self.server.publish(push_topic(client_id), message)

    def put_handshake(self, request: Request, response: Response) -> None:
        """The HTTP side (run it with ``http_fallback=True``): ``GET /put/?id=&msg=``."""
        response.headers["Content-Type"] = "text/plain; charset=utf-8"
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Expose-Headers"] = "X-Delivered"
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
        elif delivered := self.push(request.query["id"], request.query.get("msg", "")):
            response.status = 200
            response.headers["X-Delivered"] = str(delivered)
            response.body = b"ok"
        else:
            response.status = 404
            response.body = b"unknown_id"
        return None
