"""Chat-room servers for bench/chat.py, one per process.

    python bench/chat_servers.py SERVER --port PORT [--uvloop] [--max-backpressure B]
        [--on-backpressure close|drop] [--topics K]

Every server puts each connection in one room and relays every data message from any
client to the whole room, sender included, with its opcode (compression off), each with
the library's best way of doing it:

- ``lightws``: ``conn.subscribe("room")`` and ``server.publish("room", msg)`` (one frame
  encoded once, fanned out on a tokio thread);
- ``lightws-broadcast``: a set of connections and ``lightws.broadcast(room, msg)``;
- ``websockets``: a set of connections and ``websockets.broadcast(room, msg)``;
- ``socketify``: ``ws.subscribe("room")`` and ``app.publish("room", msg, opcode)``
  (uWebSockets' pub/sub, C++);
- ``picows``: a set of transports and a loop of ``transport.send`` (callback based, no
  coroutine per message);
- ``aiohttp``: a set of ``WebSocketResponse`` and a loop of ``await ws.send_bytes``.

Each prints ``ready`` once listening. lightws prints its ``stats()`` as one JSON line on
SIGUSR1. ``--topics K`` (lightws only): instead of the room, subscribe each connection to
K topics ``t0..t{K-1}`` (bench/chat.py's memory-per-subscription measurement).
``--sock-write-buffer`` (lightws only) is ``Config.sock_write_buffer`` (SO_SNDBUF).
``--max-backpressure``/``--on-backpressure`` are lightws's ``Config`` fields; socketify
gets the same limit as ``max_backpressure`` with ``close_on_backpressure_limit`` for
"close". The others have no such setting: websockets' ``broadcast`` skips a connection
whose write buffer is over its high-water mark, picows buffers without limit, and
aiohttp's ``send_bytes`` waits for a full write buffer to drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

MAX_SIZE = 16 << 20
ROOM = "room"

Close = Callable[[], Awaitable[None]]


async def lightws_server(args: argparse.Namespace) -> Close:
    import lightws

    broadcast = args.server == "lightws-broadcast"
    topics = [f"t{i}" for i in range(args.topics)] if args.topics is not None else [ROOM]
    room: set[lightws.Connection] = set()
    server: lightws.Server | None = None

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        async def handler(conn: lightws.Connection) -> None:
            assert server is not None
            if broadcast:
                room.add(conn)
            else:
                for t in topics:
                    conn.subscribe(t)
            try:
                async for msg in conn:
                    if broadcast:
                        lightws.broadcast(room, msg)
                    else:
                        server.publish(ROOM, msg)
            except lightws.ConnectionClosed:
                pass
            finally:
                room.discard(conn)

        return handler

    config = lightws.Config(
        addr=f"{args.host}:{args.port}",
        handshake=handshake,
        max_msg_len=MAX_SIZE,
        max_backpressure=args.max_backpressure,
        on_backpressure=args.on_backpressure,
        sock_write_buffer=args.sock_write_buffer,
        backlog=4096,
    )
    server = lightws.Server(config)
    await server.start()

    def print_stats() -> None:
        assert server is not None
        print(json.dumps(dataclasses.asdict(server.stats())), flush=True)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, print_stats)

    async def close() -> None:
        assert server is not None
        await server.close()

    return close


async def websockets_server(args: argparse.Namespace) -> Close:
    import websockets
    from websockets.asyncio.server import ServerConnection, serve

    room: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        room.add(ws)
        try:
            async for msg in ws:
                websockets.broadcast(room, msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            room.discard(ws)

    server = await serve(
        handler, args.host, args.port, compression=None, max_size=MAX_SIZE, backlog=4096
    )

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return close


async def picows_server(args: argparse.Namespace) -> Close:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

    room: set[WSTransport] = set()

    class Chat(WSListener):
        def on_ws_connected(self, transport: WSTransport) -> None:
            room.add(transport)

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            room.discard(transport)

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.CLOSE:
                room.discard(transport)
                transport.send_close(frame.get_close_code(), frame.get_close_message())
                transport.disconnect()
            elif frame.msg_type == WSMsgType.PING:
                transport.send_pong(frame.get_payload_as_bytes())
            elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
                # One payload object for the whole room; each send frames it anew.
                mt, payload = frame.msg_type, frame.get_payload_as_bytes()
                for t in room:
                    t.send(mt, payload)

    server = await ws_create_server(
        lambda _request: Chat(), args.host, args.port, max_frame_size=MAX_SIZE, backlog=4096
    )

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return close


async def aiohttp_server(args: argparse.Namespace) -> Close:
    from aiohttp import WSMsgType, web

    room: set[web.WebSocketResponse] = set()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_SIZE)
        await ws.prepare(request)
        room.add(ws)
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                for other in list(room):
                    with contextlib.suppress(ConnectionError):
                        if msg.type == WSMsgType.BINARY:
                            await other.send_bytes(msg.data)
                        else:
                            await other.send_str(msg.data)
        finally:
            room.discard(ws)
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, backlog=4096).start()
    return runner.cleanup


def socketify_main(args: argparse.Namespace) -> None:
    """socketify runs its own (libuv) loop: no asyncio here."""
    from socketify import App, CompressOptions, OpCode

    app = App()

    def on_open(ws: Any) -> None:
        ws.subscribe(ROOM)

    def on_message(ws: Any, message: Any, opcode: OpCode) -> None:
        app.publish(ROOM, message, opcode)

    app.ws(
        "/*",
        {
            "compression": CompressOptions.DISABLED,
            "max_payload_length": MAX_SIZE,
            "idle_timeout": 960,
            "max_backpressure": args.max_backpressure,
            "close_on_backpressure_limit": args.on_backpressure == "close",
            "open": on_open,
            "message": on_message,
        },
    )

    def listening(config: Any) -> None:
        print("ready", flush=True)

    app.listen({"port": args.port, "host": args.host}, listening)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app.run()


SERVERS: dict[str, Callable[[argparse.Namespace], Awaitable[Close]]] = {
    "lightws": lightws_server,
    "lightws-broadcast": lightws_server,
    "websockets": websockets_server,
    "picows": picows_server,
    "aiohttp": aiohttp_server,
}


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    close = await SERVERS[args.server](args)
    print("ready", flush=True)
    await stop.wait()
    await close()


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("server", choices=sorted([*SERVERS, "socketify"]))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--max-backpressure", type=int, default=1 << 20)
    p.add_argument("--on-backpressure", choices=["close", "drop"], default="close")
    p.add_argument("--topics", type=int, default=None)
    p.add_argument("--sock-write-buffer", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    if args.server == "socketify":
        socketify_main(args)
        return
    runner: Any = asyncio.run
    if args.uvloop:
        import uvloop

        runner = uvloop.run
    runner(main(args))


if __name__ == "__main__":
    run()
