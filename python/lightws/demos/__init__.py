"""The demos behind ``python -m lightws echo|countdown|push|chat``.

Each demo is a handshake callable (see :mod:`lightws.demos.echo`,
:mod:`lightws.demos.countdown`, :mod:`lightws.demos.push`, :mod:`lightws.demos.chat`)
run with ``Config(http_fallback=True)``: WebSocket upgrades get the demo's handler (the
echo also as a listener, ``echo_listener_handshake``; the push demo's connections are
``lightws.Accept(topics=...)``, with no Python object while idle), and
a plain ``GET /`` gets a small HTML page (package data next to this file) that talks to
the demo from a browser. The push and chat demos are built on topics
(``conn.subscribe``, ``server.publish``; docs/pubsub.md).
"""

from __future__ import annotations

from ._page import answer_http, page
from .chat import chat_handshake
from .countdown import countdown_handshake
from .echo import EchoListener, echo_handshake, echo_listener_handshake
from .push import PushRegistry

__all__ = [
    "EchoListener",
    "PushRegistry",
    "answer_http",
    "chat_handshake",
    "countdown_handshake",
    "echo_handshake",
    "echo_listener_handshake",
    "page",
]
