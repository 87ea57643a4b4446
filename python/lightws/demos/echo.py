"""The seed's echo demo: every message comes back; ``?reverse=1`` reverses it and the
message ``exit`` closes the connection (1000).

Two versions of one behaviour: :func:`echo_handshake` accepts with a coroutine handler
(an asyncio task per connection), :func:`echo_listener_handshake` with an
:class:`EchoListener` (``python -m lightws echo --listener``): no task, no coroutine,
plain methods called per message, and one listener instance shared by every connection
(two, in fact: one that reverses and one that does not).
"""

from __future__ import annotations

from urllib.parse import parse_qs

from .. import Listener
from .._lightws import Connection, Message
from ..config import Handler
from ..http import Request, Response
from ._page import answer_http

__all__ = ["EchoListener", "echo_handshake", "echo_listener_handshake"]


def echo_handshake(request: Request, response: Response) -> Handler | None:
    """Accept every upgrade with an echo handler; ``GET /`` is the echo page."""
    if not request.upgrade:
        answer_http("echo", request, response)
        return None
    # NOTE: one module-level handler for every connection rather than a closure made
    # per connection: a function object and its cell cost an idle connection 240
    # bytes (bench/idle_breakdown.py).
    return _echo


async def _echo(conn: Connection) -> None:
    # Parsed here, not through `request.query` (which would keep the parsed query for
    # the connection's life), and dropped before the loop (the frame would keep it).
    query = parse_qs(conn.request.target.partition("?")[2], keep_blank_values=True)
    reverse = query.get("reverse", [""])[0] == "1"
    del query
    async for msg in conn:
        if msg.body == b"exit":
            await conn.close()
            return
        body = msg.body[::-1] if reverse else msg.body
        await conn.send(Message(msg.opcode, body))


class EchoListener(Listener):
    """The echo as a listener: ``conn.send_nowait`` each message back (reversed if
    ``reverse``); ``exit`` closes with 1000. It keeps nothing per connection, so one
    instance serves them all."""

    def __init__(self, reverse: bool = False) -> None:
        self.reverse = reverse

    def on_message(self, conn: Connection, msg: Message) -> None:
        if msg.body == b"exit":
            _ = conn.close()  # the close handshake goes on without us awaiting it
        elif self.reverse:
            conn.send_nowait(Message(msg.opcode, msg.body[::-1]))
        else:
            conn.send_nowait(msg)


_ECHO = EchoListener()
_REVERSE = EchoListener(reverse=True)


def echo_listener_handshake(request: Request, response: Response) -> EchoListener | None:
    """:func:`echo_handshake` with a listener instead of a coroutine handler."""
    if not request.upgrade:
        answer_http("echo", request, response)
        return None
    return _REVERSE if request.query.get("reverse") == "1" else _ECHO
