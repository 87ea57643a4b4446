"""The chat demo: rooms as topics, every message relayed with one ``server.publish``.

Connect to ``ws://host/?room=ROOM&name=NAME`` (``room`` defaults to ``lobby``). Without
``?name=`` the first message must name the client: ``{"type": "join", "name": NAME}``.
Once named, the connection is subscribed to the room and the whole room, the newcomer
included, gets ``{"type": "join", "room": ROOM, "name": NAME, "members": N}`` (N is
``server.subscribers(ROOM)``). When it leaves, the others get the same with ``"type":
"leave"``.

A client posts ``{"type": "message", "text": TEXT}``; the room gets ``{"type":
"message", "room": ROOM, "name": NAME, "text": TEXT}``. The sender gets its own message
too: everything the room sees comes through one publish per message, so every member,
the sender included, sees the room's messages in the same order, and a client shows
what the server relayed rather than what it hoped to send.

Anything else gets ``{"type": "error", "error": CODE, "detail": TEXT}`` back, to that
client only, and the connection stays open: ``bad_json`` (not JSON, or not an object),
``text_only`` (a BINARY message), ``too_long`` (a message over :data:`MAX_MESSAGE`
bytes or a text over :data:`MAX_TEXT` characters), ``bad_type``, ``bad_name``,
``bad_text``, ``join_first`` (a message before the name), ``already_joined``. A bad
``?room=`` or ``?name=`` is refused at the handshake with 400 ``bad_room`` /
``bad_name``. Names are not unique: two clients may both be "alice".
"""

from __future__ import annotations

import json
from typing import Any

from .._lightws import Connection, Message
from .._types import Opcode
from ..config import Handler
from ..exceptions import ConnectionClosed
from ..http import Request, Response
from ._page import answer_http

__all__ = ["DEFAULT_ROOM", "MAX_MESSAGE", "MAX_NAME", "MAX_ROOM", "MAX_TEXT", "chat_handshake"]

#: The room of a client that names none.
DEFAULT_ROOM = "lobby"
#: The longest room name, in characters.
MAX_ROOM = 64
#: The longest client name, in characters.
MAX_NAME = 32
#: The longest chat text, in characters.
MAX_TEXT = 2000
#: The largest message a client may send, in bytes (larger ones get ``too_long``; the
#: CLI also lowers ``--max-msg-len`` so that much larger ones close the connection).
MAX_MESSAGE = 16 * 1024


def _valid(value: object, longest: int) -> str | None:
    """``value`` stripped, if it is a printable string of 1 to ``longest`` characters."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not 0 < len(value) <= longest or not value.isprintable():
        return None
    return value


def chat_handshake(request: Request, response: Response) -> Handler | None:
    """Accept ``?room=ROOM&name=NAME`` with the chat handler (a bad room or name is
    400 ``bad_room`` / ``bad_name``); ``GET /`` is the chat page.

    The room is a topic. Once named (``?name=`` or a first message ``{"type": "join",
    "name": NAME}``) a client is subscribed to it, and the room gets ``{"type":
    "join", "room", "name", "members"}``; each ``{"type": "message", "text": TEXT}`` is
    published to the whole room, sender included, as ``{"type": "message", "room",
    "name", "text"}``; leaving publishes ``{"type": "leave", ...}`` with the new member
    count. Bad input gets ``{"type": "error", "error": CODE, "detail": TEXT}`` back,
    to the sender only, and the connection stays open.
    """
    if not request.upgrade:
        answer_http("chat", request, response)
        return None
    response.headers["Content-Type"] = "text/plain; charset=utf-8"
    room = _valid(request.query.get("room") or DEFAULT_ROOM, MAX_ROOM)
    if room is None:
        response.status, response.body = 400, b"bad_room"
        return None
    name = None
    if "name" in request.query:
        name = _valid(request.query["name"], MAX_NAME)
        if name is None:
            response.status, response.body = 400, b"bad_name"
            return None

    async def handler(conn: Connection) -> None:
        await chat(conn, room, name)

    return handler


async def chat(conn: Connection, room: str, name: str | None = None) -> None:
    """Run one chat client in ``room``: join now if ``name`` is given, otherwise when
    its first message names it; relay its messages; say goodbye to the room."""
    conn.room = room  # own attributes on the connection: where it is, who it is
    conn.name = None
    try:
        if name is not None:
            _join(conn, name)
        async for msg in conn:
            error = _on_message(conn, msg)
            if error is not None:
                await conn.send(
                    json.dumps({"type": "error", "error": error[0], "detail": error[1]})
                )
    except ConnectionClosed:
        pass
    finally:
        if conn.name is not None:
            conn.unsubscribe(room)  # a closed connection may be unsubscribed already
            _publish(conn, {"type": "leave", "name": conn.name})


def _join(conn: Connection, name: str) -> None:
    conn.name = name
    conn.subscribe(conn.room)
    _publish(conn, {"type": "join", "name": name})


def _publish(conn: Connection, event: dict[str, Any]) -> None:
    room: str = conn.room
    event = {"type": event.pop("type"), "room": room, **event}
    server = conn.server
    assert server is not None  # a server's connection (None only on client connections)
    if event["type"] != "message":
        event["members"] = server.subscribers(room)
    server.publish(room, json.dumps(event, ensure_ascii=False))


def _on_message(conn: Connection, msg: Message) -> tuple[str, str] | None:
    """Act on one message from the client; the error to answer with, if any."""
    if msg.opcode != Opcode.TEXT:
        return "text_only", "send JSON objects as text messages"
    if len(msg.body) > MAX_MESSAGE:
        return "too_long", f"messages are at most {MAX_MESSAGE} bytes"
    try:
        data = json.loads(msg.text)
    except ValueError as e:
        return "bad_json", f"not JSON: {e}"
    if not isinstance(data, dict):
        return "bad_json", 'expected an object such as {"type": "message", "text": "hi"}'
    kind = data.get("type")
    if kind == "join":
        if conn.name is not None:
            return "already_joined", f"already in {conn.room} as {conn.name}"
        name = _valid(data.get("name"), MAX_NAME)
        if name is None:
            return "bad_name", f"a name is 1 to {MAX_NAME} printable characters"
        _join(conn, name)
    elif kind == "message":
        if conn.name is None:
            return "join_first", 'send {"type": "join", "name": ...} first'
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            return "bad_text", "text must be a non-empty string"
        if len(text) > MAX_TEXT:
            return "too_long", f"a text is at most {MAX_TEXT} characters"
        _publish(conn, {"type": "message", "name": conn.name, "text": text})
    else:
        return "bad_type", 'type must be "join" or "message"'
    return None
