"""One simulated machine of tests/test_netns.py, run inside a network namespace with
``ip netns exec``: a lightws server on the namespace's loopback with the Redis
backplane, and its own subscribers (clients inside the same namespace). Driven by JSON
lines on stdin, answering with JSON lines on stdout:

- ``{"publish": N}`` -> ``server.publish("room", "<name>-<i>")`` for i < N;
- ``{"collect": N}`` -> once every subscriber has N messages (or after 20 s), each
  subscriber's messages;
- ``{"stats": true}`` -> the backplane fields of ``server.stats()``.

``python netns_node.py redis HOST PORT PASSWORD ARGS...`` sends one command to Redis
and prints the reply as JSON (the test uses it inside the Redis namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import lightws
from backplane import resp, subscriber
from scaleout_app import handshake


def say(obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def node(args: argparse.Namespace) -> None:
    config = lightws.Config(addr="127.0.0.1:0", handshake=handshake, pubsub=args.redis)
    async with lightws.Server(config) as server:
        clients = [(await subscriber(server.port))[0] for _ in range(args.clients)]
        received: list[list[str]] = [[] for _ in clients]

        async def pump(i: int) -> None:
            async for msg in clients[i]:
                received[i].append(msg if isinstance(msg, str) else msg.decode())

        pumps = [asyncio.ensure_future(pump(i)) for i in range(len(clients))]
        say({"ready": True, "port": server.port})
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            if "publish" in command:
                for i in range(command["publish"]):
                    server.publish("room", f"{args.name}-{i}")
                say({"published": command["publish"]})
            elif "collect" in command:
                end = loop.time() + 20
                while any(len(r) < command["collect"] for r in received) and loop.time() < end:
                    await asyncio.sleep(0.01)
                say({"received": received})
            elif "stats" in command:
                s = server.stats()
                say({"pubsub": s.pubsub, "relayed": s.relayed, "relay_received": s.relay_received})
        for p in pumps:
            p.cancel()
        for c in clients:
            await c.close()


def main() -> None:
    if sys.argv[1:2] == ["redis"]:
        host, port, password, *command = sys.argv[2:]

        async def one() -> None:
            reply = await resp(host, int(port), *command, password=password)
            print(json.dumps(reply, default=lambda b: b.decode(errors="replace")))

        asyncio.run(one())
        return
    p = argparse.ArgumentParser()
    p.add_argument("--redis", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--clients", type=int, default=3)
    asyncio.run(node(p.parse_args()))


if __name__ == "__main__":
    main()
