"""The application the scale-out tests serve (``python -m lightws serve
scaleout_app:handshake`` or ``scaleout_app:config``, run with ``tests/`` as the
current directory), and that tests/netns_node.py serves in a network namespace.

A client connects to ``/?topic=T`` (default ``room``) and is subscribed to T, unless
``sub=0``. The first message it gets is a hello, ``{"pid": ...}``: the worker it is on.
It may then send JSON commands:

- ``{"pub": T, "msg": M, "n": N, "exclude": bool}`` publishes ``M0`` .. ``M{N-1}``
  through ``conn.server`` (no global), excluding this connection if asked;
- ``{"stats": true}`` answers with ``server.stats()``'s backplane fields.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightws


def handshake(request: lightws.Request, response: lightws.Response) -> Any:
    topic = request.query.get("topic", "room")
    subscribe = request.query.get("sub", "1") != "0"

    async def handler(conn: lightws.Connection) -> None:
        if subscribe:
            conn.subscribe(topic)
        await conn.send(json.dumps({"pid": os.getpid()}))
        try:
            async for msg in conn:
                command = json.loads(msg.body)
                server = conn.server
                if "pub" in command:
                    exclude = conn if command.get("exclude") else None
                    for i in range(command.get("n", 1)):
                        server.publish(command["pub"], f"{command['msg']}{i}", exclude=exclude)
                elif "stats" in command:
                    s = server.stats()
                    await conn.send(
                        json.dumps(
                            {
                                "pubsub": s.pubsub,
                                "relayed": s.relayed,
                                "relay_received": s.relay_received,
                                "unrelayed": s.unrelayed,
                                "relay_errors": s.relay_errors,
                                "subscribers": server.subscribers(topic),
                            }
                        )
                    )
        except lightws.ConnectionClosed:
            pass

    return handler


#: The same application as a Config: ``serve scaleout_app:config --addr ...`` keeps
#: these fields (a small max_msg_len shows that it did) and overrides the address.
config = lightws.Config(
    addr="127.0.0.1:1",
    handshake=handshake,
    max_msg_len=1000,
    close_timeout=2.0,
)

not_an_app = 42
