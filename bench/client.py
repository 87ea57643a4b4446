"""Client echo throughput: lightws.connect against the websockets and picows clients.

    python bench/client.py                       # 100 connections x 64 B, 5 s each
    python bench/client.py --connections 100 --size 64 --duration 5 --repeat 3
    python bench/client.py --clients lightws,picows --loop asyncio

One lightws echo server (``python -m lightws echo``, its own process, one I/O thread)
serves every client in turn, in the same run. Each client runs in a fresh process of
its own on one event loop (uvloop by default): it opens ``--connections`` connections,
and each keeps one ``--size``-byte BINARY message in flight (send, wait for the echo,
send again: a closed loop). After ``--warmup`` seconds, echoes are counted for
``--duration`` seconds. Reported per client: echoes per second (the median of
``--repeat`` runs) and the client process's CPU seconds per million echoes (utime +
stime of the whole process over the measured window: Python and, for lightws, its I/O
thread).

Clients, each in its idiomatic form:

- ``lightws``: ``conn = await lightws.connect(url)``; ``await conn.send(b)``,
  ``await conn.recv()`` per message, one task per connection.
- ``websockets``: ``websockets.asyncio.client.connect(url, compression=None)``; the
  same send/recv loop.
- ``picows``: ``ws_connect`` with a listener whose ``on_ws_frame`` callback sends the
  next message (picows has no awaitable receive; callbacks are its fast path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

PY = sys.executable
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENTS = ["lightws", "websockets", "picows"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port}")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ---- the clients (run in a child process: `client.py --run NAME ...`) -------------------


class Counter:
    def __init__(self) -> None:
        self.n = 0


async def lightws_client(url: str, conns: int, payload: bytes, count: Counter) -> Callable[[], Any]:
    import lightws

    opened = [await lightws.connect(url, max_msg_len=1 << 20) for _ in range(conns)]

    async def loop(conn: lightws.Connection) -> None:
        while True:
            await conn.send(payload)
            await conn.recv()
            count.n += 1

    tasks = [asyncio.ensure_future(loop(c)) for c in opened]

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)

    return stop


async def websockets_client(
    url: str, conns: int, payload: bytes, count: Counter
) -> Callable[[], Any]:
    from websockets.asyncio.client import ClientConnection, connect

    opened = [await connect(url, compression=None, max_size=None) for _ in range(conns)]

    async def loop(ws: ClientConnection) -> None:
        while True:
            await ws.send(payload)
            await ws.recv()
            count.n += 1

    tasks = [asyncio.ensure_future(loop(c)) for c in opened]

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)

    return stop


async def picows_client(url: str, conns: int, payload: bytes, count: Counter) -> Callable[[], Any]:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    class Echo(WSListener):
        def on_ws_connected(self, transport: WSTransport) -> None:
            transport.send(WSMsgType.BINARY, payload)

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.BINARY:
                count.n += 1
                transport.send(WSMsgType.BINARY, payload)

    opened = [await ws_connect(Echo, url) for _ in range(conns)]

    async def stop() -> None:
        for transport, _ in opened:
            transport.send_close()
            transport.disconnect()
        await asyncio.gather(*(t.wait_disconnected() for t, _ in opened))

    return stop


STARTERS: dict[str, Callable[..., Awaitable[Callable[[], Any]]]] = {
    "lightws": lightws_client,
    "websockets": websockets_client,
    "picows": picows_client,
}


async def run_client(
    name: str, url: str, conns: int, size: int, warmup: float, duration: float
) -> dict[str, Any]:
    count = Counter()
    stop = await STARTERS[name](url, conns, os.urandom(size), count)
    await asyncio.sleep(warmup)
    n0, c0, t0 = count.n, cpu_seconds(), time.monotonic()
    await asyncio.sleep(duration)
    n1, c1, t1 = count.n, cpu_seconds(), time.monotonic()
    await stop()
    msgs = n1 - n0
    return {
        "client": name,
        "msgs_per_s": msgs / (t1 - t0),
        "cpu_s_per_million": (c1 - c0) / msgs * 1e6 if msgs else float("nan"),
    }


def child(args: argparse.Namespace) -> None:
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    result = asyncio.run(
        run_client(args.run, args.url, args.connections, args.size, args.warmup, args.duration)
    )
    print(json.dumps(result))


# ---- the driver ------------------------------------------------------------------------


def measure(name: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        PY, __file__, "--run", name, "--url", url, "--connections", str(args.connections),
        "--size", str(args.size), "--warmup", str(args.warmup), "--duration", str(args.duration),
        "--loop", args.loop,
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        return child(args)

    port = free_port()
    server = subprocess.Popen(
        [PY, "-m", "lightws", "echo", "--addr", f"{HOST}:{port}", "--uvloop"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        url = f"ws://{HOST}:{port}/"
        names = [n.strip() for n in args.clients.split(",") if n.strip()]
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for _ in range(args.repeat):
            for name in names:  # interleaved, so drift affects every client alike
                runs[name].append(measure(name, url, args))
    finally:
        server.terminate()
        server.wait(10)

    print(
        f"\nclient echo, {args.connections} connections x {args.size} B, closed loop, "
        f"{args.duration:g} s after {args.warmup:g} s warm-up, median of {args.repeat}; "
        f"clients on {args.loop}; server: python -m lightws echo --uvloop (1 I/O thread)"
    )
    print(
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs\n"
    )
    base = statistics.median(r["msgs_per_s"] for r in runs[names[0]])
    print("| client | msgs/s | vs " + names[0] + " | client CPU s / 1M msgs |")
    print("|---|---:|---:|---:|")
    results = []
    for name in names:
        rate = statistics.median(r["msgs_per_s"] for r in runs[name])
        cpu = statistics.median(r["cpu_s_per_million"] for r in runs[name])
        results.append({"client": name, "msgs_per_s": rate, "cpu_s_per_million": cpu})
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {cpu:.1f} |")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": None}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
