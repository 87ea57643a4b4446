"""lightws: a WebSocket server for Python asyncio whose whole I/O path runs in Rust.

Sockets, TLS, buffering and RFC 6455 framing run on tokio and rustls; Python supplies a
handshake callable and a per-connection handler::

    import lightws

    def handshake(request, response):
        async def handler(conn):
            async for msg in conn:
                await conn.send(msg)
        return handler

    lightws.run(lightws.Config(addr="127.0.0.1:9001", handshake=handshake))

``lightws.run`` serves until SIGINT/SIGTERM, then closes every client with 1001. Inside
an event loop of your own, ``async with lightws.Server(config) as server:`` listens and
closes every client with 1001 when the block ends.

The client side runs on the same Rust core: ``async with lightws.connect(url) as conn:``
gives the same :class:`Connection` API.
"""

from __future__ import annotations

from ._lightws import Connection, Message, broadcast
from ._lightws import __version__ as __version__
from ._run import run
from ._types import CloseCode, LogLevel, Opcode
from .client import connect
from .config import Config, Deflate, Handler, HandshakeFunc
from .exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidHandshake,
    LightwsError,
    PayloadTooBig,
    ProtocolError,
)
from .http import Headers, Request, Response
from .listener import Accept, Listener
from .server import Rates, Server, Stats

__all__ = [
    "Accept",
    "CloseCode",
    "Config",
    "Connection",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "Deflate",
    "Handler",
    "HandshakeFunc",
    "Headers",
    "InvalidHandshake",
    "LightwsError",
    "Listener",
    "LogLevel",
    "Message",
    "Opcode",
    "PayloadTooBig",
    "ProtocolError",
    "Rates",
    "Request",
    "Response",
    "Server",
    "Stats",
    "broadcast",
    "connect",
    "run",
]
