"""A lightws server whose every connection is accepted push-only, for bench/compare.py.

    python bench/accept_server.py --addr 127.0.0.1:9001 [--listener]

The handshake returns ``lightws.Accept(topics=["news"])``: each connection is
subscribed to ``news`` and, while idle, holds no Python object at all (incoming data
is discarded in Rust; pings, close and keepalive are answered there). bench/compare.py
measures its memory per idle connection as the ``lightws-accept`` row. The rest of the
configuration is ``python -m lightws echo``'s defaults. With ``--listener`` the
handshake returns a listener instead (one instance for every connection, echoing each
message with ``send_nowait``), for measuring that style where ``python -m lightws echo
--listener`` is not available.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import lightws

TOPICS = ["news"]


class Echo(lightws.Listener):
    def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        conn.send_nowait(msg)


ECHO = Echo()


def accept(request: lightws.Request, response: lightws.Response) -> lightws.Accept:
    return lightws.Accept(topics=TOPICS)


def listen(request: lightws.Request, response: lightws.Response) -> Echo:
    return ECHO


async def main(addr: str, listener: bool) -> None:
    handshake = listen if listener else accept
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
    p.add_argument("--listener", action="store_true", help="a shared echo listener instead")
    args = p.parse_args()
    asyncio.run(main(args.addr, args.listener))
