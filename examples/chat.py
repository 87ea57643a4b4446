"""Chat rooms on topics: ``python examples/chat.py``, then open
http://127.0.0.1:9001/?room=lobby&name=alice in two browser tabs (or connect any
WebSocket client to ws://127.0.0.1:9001/?room=lobby&name=bob).

Each room is a topic: a client joins with ``conn.subscribe(room)``, and every message
goes to the whole room, the sender included, with one ``server.publish(room, ...)``:
the frame is encoded once and the walk over the members runs in Rust, whatever the
size of the room. A member that stops reading does not hold up the others (past
``max_backpressure`` it is closed with 1013). The same protocol as
``python -m lightws chat`` (lightws/demos/chat.py), whose page this serves.
"""

from __future__ import annotations

import json
from typing import Any

import lightws
from lightws.demos import answer_http

MAX_NAME, MAX_TEXT, MAX_MESSAGE = 32, 2000, 16 * 1024


def handshake(request: lightws.Request, response: lightws.Response) -> lightws.Handler | None:
    if not request.upgrade:
        answer_http("chat", request, response)  # GET / is the chat page
        return None
    room = request.query.get("room") or "lobby"
    name = request.query.get("name")  # or the first message: {"type": "join", "name": ...}

    async def handler(conn: lightws.Connection) -> None:
        conn.room, conn.name = room, None  # your own attributes on the connection
        if name:
            join(conn, name[:MAX_NAME])
        try:
            async for msg in conn:
                error = on_message(conn, msg)
                if error:
                    await conn.send(json.dumps({"type": "error", "error": error}))
        finally:
            if conn.name is not None:
                conn.unsubscribe(room)
                publish(conn, "leave", name=conn.name)

    return handler


def on_message(conn: lightws.Connection, msg: lightws.Message) -> str | None:
    """Act on one client message; an error code to answer with, or None."""
    if msg.opcode != lightws.Opcode.TEXT:
        return "text_only"
    if len(msg.body) > MAX_MESSAGE:
        return "too_long"
    try:
        data = json.loads(msg.text)
    except ValueError:
        return "bad_json"
    if not isinstance(data, dict):
        return "bad_json"
    if data.get("type") == "join" and conn.name is None:
        name = data.get("name")
        if not isinstance(name, str) or not 0 < len(name.strip()) <= MAX_NAME:
            return "bad_name"
        join(conn, name.strip())
    elif data.get("type") == "message" and conn.name is not None:
        text = data.get("text")
        if not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT:
            return "bad_text"
        publish(conn, "message", name=conn.name, text=text)
    else:
        return "bad_type"
    return None


def join(conn: lightws.Connection, name: str) -> None:
    conn.name = name
    conn.subscribe(conn.room)
    publish(conn, "join", name=name)


def publish(conn: lightws.Connection, kind: str, **fields: Any) -> None:
    """One event to the whole room of ``conn``; join and leave carry the member count."""
    event = {"type": kind, "room": conn.room, **fields}
    server = conn.server
    assert server is not None  # a server's connection (None only on client connections)
    if kind != "message":
        event["members"] = server.subscribers(conn.room)
    server.publish(conn.room, json.dumps(event))


if __name__ == "__main__":
    print("open http://127.0.0.1:9001/?room=lobby&name=alice in a browser")
    config = lightws.Config(
        addr="127.0.0.1:9001", handshake=handshake, http_fallback=True, max_msg_len=64 << 10
    )
    lightws.run(config)  # until Ctrl-C or SIGTERM
