"""A lightws server whose every connection is accepted push-only, for bench/compare.py.

    python bench/accept_server.py --addr 127.0.0.1:9001

The handshake returns ``lightws.Accept(topics=["news"])``: each connection is
subscribed to ``news`` and, while idle, holds no Python object at all (incoming data
is discarded in Rust; pings, close and keepalive are answered there). bench/compare.py
measures its memory per idle connection as the ``lightws-accept`` row. The rest of the
configuration is ``python -m lightws echo``'s defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import lightws

TOPICS = ["news"]


def handshake(request: lightws.Request, response: lightws.Response) -> lightws.Accept:
    return lightws.Accept(topics=TOPICS)


async def main(addr: str) -> None:
    config = lightws.Config(addr=addr, handshake=handshake, backlog=4096)
    async with lightws.Server(config) as server:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--addr", default="127.0.0.1:9001")
    asyncio.run(main(p.parse_args().addr))
