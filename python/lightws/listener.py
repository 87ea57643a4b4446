"""Connections without a coroutine: :class:`Listener` and :class:`Accept`.

A handler coroutine per connection costs an asyncio Task, a suspended coroutine frame
and a pending future while the connection idles. Instead of a handler, the handshake
callable may return:

- a **listener**: an object with some of ``on_open(conn)``, ``on_message(conn, msg)``
  and ``on_close(conn, code, reason)``, plain (not ``async``) methods called on the
  event loop. One instance may serve every connection. Reply with
  ``conn.send_nowait(...)``.
- ``Accept(topics=..., listener=None)``: accept and subscribe to ``topics``; without a
  listener the connection is handled entirely in Rust (incoming data is discarded;
  pings, close and keepalive are answered as always) and holds no Python object at all
  while idle: the push-only connections of feeds, notifications and dashboards.

See docs/guide.md, "Two styles of connection".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._lightws import Connection, Message

__all__ = ["Accept", "Listener"]

#: The methods a listener may have.
_METHODS = ("on_open", "on_message", "on_close")


class Listener:
    """Base class for listeners (optional: any object with some of these methods is one).

    The methods are called on the event loop thread and must not block; they cannot
    ``await`` (start a task with ``asyncio.create_task`` for that). An exception in
    ``on_open`` or ``on_message`` is logged and closes the connection with 1011, except
    ``lightws.ConnectionClosed`` (a ``send_nowait`` on a connection that is closing),
    which, as from a handler, is no failure.

    The ``Connection`` given to each call may be a new object for the same connection
    if you kept no reference to the previous one (it compares equal and has the same
    ``id``); keep it in a set or dict, or set an attribute on it, and the same object
    comes back every time.
    """

    def on_open(self, conn: Connection) -> None:
        """The connection is open (after the 101, before any message)."""

    def on_message(self, conn: Connection, msg: Message) -> None:
        """A complete message arrived; answer with ``conn.send_nowait(...)``."""

    def on_close(self, conn: Connection, code: int, reason: str) -> None:
        """The connection has ended: the close code received (or sent) and its reason,
        1006 if it ended without a close handshake."""


def is_listener(obj: object) -> bool:
    """True if ``obj`` has any of the listener methods."""
    return isinstance(obj, Listener) or any(hasattr(obj, m) for m in _METHODS)


class Accept:
    """Accept the connection without a handler coroutine: subscribe it to ``topics``
    and hand its events to ``listener`` (if given).

    ``return lightws.Accept(topics=["prices:" + symbol])`` from the handshake makes a
    push-only connection: every ``server.publish(topic, ...)`` reaches it, incoming data
    is discarded, pings, close and keepalive are handled in Rust, and no Python object
    exists for it while it idles (the least memory per connection lightws has).
    """

    __slots__ = ("listener", "topics")

    #: The topics to subscribe the connection to, in order.
    topics: tuple[str, ...]
    #: The listener its events go to, or None.
    listener: object | None

    def __init__(self, topics: Iterable[str] = (), listener: object | None = None) -> None:
        if isinstance(topics, (str, bytes)):
            raise TypeError(
                "Accept(topics=...) takes an iterable of topic names, not one "
                f"{type(topics).__name__} (write topics=[{topics!r}])"
            )
        names = tuple(topics)
        for t in names:
            if not isinstance(t, str):
                raise TypeError(f"Accept(topics=...): topic names are str, not {type(t).__name__}")
        if listener is not None and (isinstance(listener, type) or not is_listener(listener)):
            raise TypeError(
                "Accept(listener=...) takes an object with on_open/on_message/on_close "
                f"methods (an instance, e.g. MyListener()), not {listener!r}"
            )
        self.topics = names
        self.listener = listener

    def __repr__(self) -> str:
        return f"Accept(topics={list(self.topics)!r}, listener={self.listener!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Accept):
            return NotImplemented
        return (self.topics, self.listener) == (other.topics, other.listener)

    def __hash__(self) -> int:
        return hash((self.topics, id(self.listener)))
