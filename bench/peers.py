"""Echo servers of the libraries lightws is compared with, one per process.

    python bench/peers.py {websockets,picows,aiohttp,socketify} --port PORT [--uvloop]
        [--compression {none,deflate,deflate-nct}]

Each echoes every message back with its opcode, compression off (unless
``--compression``: permessage-deflate at each library's comparable settings, see
``compression_of``; ``deflate-nct`` with no context takeover both ways), messages up to
16 MiB (as ``python -m lightws echo``), and prints ``ready`` once listening. The
handlers are the libraries' idiomatic ones: websockets and aiohttp await the next
message in a per-connection coroutine; picows is callback based and echoes each
frame as it is parsed (the load generator sends every message as one frame).
socketify (socketify.py, uWebSockets in C++ under a Python API) runs its own libuv loop
(no asyncio, so ``--uvloop`` and ``--compression`` do not apply) and echoes from its
``message`` callback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

MAX_SIZE = 16 << 20

#: ``--compression``: none, deflate (context takeover) or deflate-nct (none either way).
COMPRESSION = "none"


async def websockets_server(host: str, port: int) -> Callable[[], Awaitable[None]]:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def handler(ws: ServerConnection) -> None:
        # The load generator closes while echoes are in flight; the send that
        # follows its close frame raises, which is not a server fault.
        with contextlib.suppress(ConnectionClosed):
            async for msg in ws:
                await ws.send(msg)

    extensions: Any = None
    if COMPRESSION != "none":
        from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

        # websockets' own defaults for compression="deflate" (window bits 12, memLevel 5).
        nct = COMPRESSION == "deflate-nct"
        extensions = [
            ServerPerMessageDeflateFactory(
                server_no_context_takeover=nct,
                client_no_context_takeover=nct,
                server_max_window_bits=12,
                client_max_window_bits=12,
                compress_settings={"memLevel": 5},
            )
        ]
    server = await serve(
        handler,
        host,
        port,
        compression=None,
        extensions=extensions,
        max_size=MAX_SIZE,
    )

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return close


async def picows_server(host: str, port: int, ssl: Any = None) -> Callable[[], Awaitable[None]]:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

    class Echo(WSListener):
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code(), frame.get_close_message())
                transport.disconnect()
            elif frame.msg_type == WSMsgType.PING:
                transport.send_pong(frame.get_payload_as_bytes())
            elif frame.msg_type != WSMsgType.PONG:
                transport.send(frame.msg_type, frame.get_payload_as_memoryview(), frame.fin)

    server = await ws_create_server(
        lambda _request: Echo(), host, port, ssl=ssl, max_frame_size=MAX_SIZE
    )

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return close


async def aiohttp_server(host: str, port: int) -> Callable[[], Awaitable[None]]:
    from aiohttp import WSMsgType, web

    async def handler(request: web.Request) -> web.WebSocketResponse:
        # aiohttp's server follows the client's offer: its window is the offered
        # server_max_window_bits (15 if none), server_no_context_takeover if asked;
        # it never agrees to client_no_context_takeover.
        compress = COMPRESSION != "none"
        ws = web.WebSocketResponse(compress=compress, max_msg_size=MAX_SIZE)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    return runner.cleanup


def socketify_main(host: str, port: int) -> None:
    """socketify runs its own (libuv) loop: no asyncio here."""
    import sys

    from socketify import App, CompressOptions, OpCode

    app = App()

    def on_message(ws: Any, message: Any, opcode: OpCode) -> None:
        ws.send(message, opcode)

    app.ws(
        "/*",
        {
            "compression": CompressOptions.DISABLED,
            "max_payload_length": MAX_SIZE,
            # The longest uWebSockets allows: idle connections stay open for the
            # memory measurement.
            "idle_timeout": 960,
            "message": on_message,
        },
    )
    app.listen({"port": port, "host": host}, lambda _config: print("ready", flush=True))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app.run()


SERVERS: dict[str, Callable[[str, int], Awaitable[Callable[[], Awaitable[None]]]]] = {
    "websockets": websockets_server,
    "picows": picows_server,
    "aiohttp": aiohttp_server,
}


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    close = await SERVERS[args.server](args.host, args.port)
    print("ready", flush=True)
    await stop.wait()
    await close()


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("server", choices=sorted([*SERVERS, "socketify"]))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--compression", choices=["none", "deflate", "deflate-nct"], default="none")
    args = p.parse_args(argv)
    global COMPRESSION
    COMPRESSION = args.compression
    logging.basicConfig(level=logging.ERROR)
    if args.server == "socketify":
        socketify_main(args.host, args.port)
        return
    runner: Any = asyncio.run
    if args.uvloop:
        import uvloop

        runner = uvloop.run
    runner(main(args))


if __name__ == "__main__":
    run()
