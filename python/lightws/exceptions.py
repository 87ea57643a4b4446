"""Exceptions raised by lightws.

All derive from :class:`LightwsError`::

    LightwsError
    ├── ConnectionClosed          the connection is closed (.code, .reason)
    │   ├── ConnectionClosedOK    closed with 1000 (normal) or 1001 (going away)
    │   └── ConnectionClosedError closed with any other code, or dropped (1006)
    ├── InvalidHandshake          a handshake could not be completed
    ├── ProtocolError             the peer broke RFC 6455
    └── PayloadTooBig             a message exceeded max_msg_len

Misuse of the API raises the usual built-ins: ``TypeError`` for a wrong type,
``ValueError`` for a wrong value (a control frame over 125 bytes, a close code that may
not be sent, ...).
"""

from __future__ import annotations

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


class InvalidHandshake(LightwsError):
    """The opening handshake failed."""


class ProtocolError(LightwsError):
    """The peer violated RFC 6455."""


class PayloadTooBig(ProtocolError):
    """A message was larger than ``Config.max_msg_len``."""
