"""Exceptions raised by lightws.

All derive from :class:`LightwsError`::

    LightwsError
    ├── ConnectionClosed              the connection is closed (.code, .reason)
    │   ├── ConnectionClosedOK        closed with 1000 (normal) or 1001 (going away)
    │   └── ConnectionClosedError     closed with any other code, or dropped (1006)
    │       └── ProtocolError         closed with 1002 or 1007: the peer broke RFC 6455
    │           └── PayloadTooBig     closed with 1009: a message over max_msg_len
    └── InvalidHandshake              lightws.connect(): the server refused the upgrade
                                      or answered it wrongly (.status, .headers, .body)

``recv()`` (and ``async for``, ``send()`` and the streaming reader and writer once the
connection is closed) raise the class that matches the close code. ``ProtocolError``
and ``PayloadTooBig`` are ``ConnectionClosedError`` subclasses, so ``except
ConnectionClosed`` or ``except ConnectionClosedError`` catches them as well.

Misuse of the API raises the usual built-ins: ``TypeError`` for a wrong type,
``ValueError`` for a wrong value (a control frame over 125 bytes, a close code that may
not be sent, ...). On the server, a broken handshake is answered by the server itself
(400, 405, 426, 431, or 500 when the handshake callable failed) and never reaches
Python as an exception. On the client, :func:`lightws.connect` raises
:class:`InvalidHandshake` when the server refuses the upgrade or answers it in breach of
RFC 6455; network failures raise the usual ``OSError`` subclasses
(``ConnectionRefusedError``, ``socket.gaierror``, ``ssl.SSLCertVerificationError``) and
``TimeoutError`` after ``open_timeout``.
"""

from __future__ import annotations

from .http import Headers

__all__ = [
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "InvalidHandshake",
    "LightwsError",
    "PayloadTooBig",
    "ProtocolError",
]


class LightwsError(Exception):
    """Base class of every lightws exception."""


class ConnectionClosed(LightwsError):
    """The WebSocket connection is closed.

    ``code`` is the close code received from the peer (or the one lightws sent when it
    failed the connection); 1006 means the connection dropped without a close frame.
    ``reason`` is the close reason, possibly empty.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        if self.reason:
            return f"connection closed with code {self.code}: {self.reason}"
        return f"connection closed with code {self.code}"


class ConnectionClosedOK(ConnectionClosed):
    """The connection closed normally (code 1000 or 1001)."""


class ConnectionClosedError(ConnectionClosed):
    """The connection closed with an error code, or without a close frame (1006)."""


class ProtocolError(ConnectionClosedError):
    """The connection was closed with 1002 (protocol error) or 1007 (invalid data).

    lightws closes with these when the peer breaks RFC 6455: an unmasked frame, a
    reserved opcode or RSV bit, a bad fragment sequence, invalid UTF-8 in a TEXT
    message or a close reason, ... (``reason`` says which). A peer that closes with one
    of these codes itself raises it too.
    """


class PayloadTooBig(ProtocolError):
    """The connection was closed with 1009 (message too big).

    lightws closes with 1009 when a message from the peer is larger than
    ``Config.max_msg_len`` (decided from the frame header, before the payload is
    buffered). A peer that closes with 1009 itself (one of our messages was over its own
    limit) raises it too.
    """


class InvalidHandshake(LightwsError):
    """:func:`lightws.connect` could not complete the opening handshake.

    Either the server refused the upgrade (any status but 101: ``status`` is it, with
    the response's ``headers`` and the start of its ``body``), or its answer breaks
    RFC 6455 section 4.1: a wrong ``Sec-WebSocket-Accept``, no ``Upgrade: websocket``,
    a subprotocol that was not offered, ... (``status`` is then 101, and ``str(exc)``
    says what is wrong), or the server closed the connection or sent something other
    than HTTP (``status`` is None).

    Attributes:
        status: the HTTP status code, or None if no HTTP response was read.
        reason: the reason phrase of the status line ("" if none).
        headers: the response headers (a case-insensitive :class:`lightws.Headers`;
            empty if no response was read).
        body: the response body (at most 64 KiB of it; ``b""`` if none).
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        headers: Headers | None = None,
        body: bytes = b"",
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers if headers is not None else Headers()
        self.body = body
