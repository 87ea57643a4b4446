"""Echo throughput over TLS: lightws vs ``websockets`` (and lightws over plain TCP).

Each server runs in its own process (the same servers as ``bench/tls_memory.py``, in
echo mode, on the default asyncio loop; ``websockets-tls-uvloop`` on uvloop); the load
comes from another process. 100 connections each keep one 64-byte BINARY message in
flight and wait for its echo; the result is echoed messages per second over the
measured window::

    python bench/tls_echo.py                          # every server, 100 conns x 64 B
    python bench/tls_echo.py --servers lightws-tls --duration 10 --load asyncio

``--load lightws`` uses the Rust load generator ``python -m lightws bench`` (needs an
extension built with the ``loadgen`` cargo feature:
``maturin develop --release --features loadgen``); ``--load asyncio`` a small Python
client on uvloop (raw TLS streams, one masked frame per round trip) that saturates
before a fast server does, so its numbers are a floor; ``auto`` (default) picks the
Rust generator when available. Both verify the server certificate against the throwaway CA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import struct
import subprocess
import sys
import tempfile
import time

from tls_memory import (
    HOST,
    free_port,
    make_certificates,
    open_ws,
    start_server,
)

SERVERS = (
    "lightws-tls",
    "websockets-tls",
    "websockets-tls-uvloop",
    "picows-tls",
    "picows-tls-uvloop",
    "lightws-plain",
)


def masked_binary_frame(payload: bytes) -> bytes:
    """A client frame (FIN + BINARY, masked) for payloads under 126 bytes."""
    assert len(payload) < 126
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x82, 0x80 | len(payload)) + mask + body


async def asyncio_load(
    port: int, ca_file: str, connections: int, size: int, warmup: float, duration: float
) -> float:
    ctx: ssl.SSLContext | None = None
    if ca_file:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        ctx.set_alpn_protocols(["http/1.1"])
    conns = await asyncio.gather(*(open_ws(port, ctx) for _ in range(connections)))
    frame = masked_binary_frame(b"x" * size)
    reply_len = 2 + size
    counting = False
    stop = False
    count = 0

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while not stop:
            writer.write(frame)
            await reader.readexactly(reply_len)
            if counting:
                count += 1

    tasks = [asyncio.ensure_future(pump(r, w)) for r, w in conns]
    await asyncio.sleep(warmup)
    counting = True
    start = time.perf_counter()
    await asyncio.sleep(duration)
    counting = False
    elapsed = time.perf_counter() - start
    stop = True
    await asyncio.wait(tasks, timeout=5)
    for _, writer in conns:
        writer.transport.abort()
    return count / elapsed


def rust_loadgen_available() -> bool:
    try:
        from lightws._bench import loadgen_available
    except ImportError:
        return False
    return loadgen_available()


def run_load(
    load: str, url: str, port: int, ca_file: str, args: argparse.Namespace
) -> tuple[float, str]:
    if load == "lightws":
        cmd = [
            sys.executable,
            "-m",
            "lightws",
            "bench",
            url,
            "-c",
            str(args.connections),
            "-s",
            str(args.size),
            "-d",
            str(args.duration),
            "--warmup",
            str(args.warmup),
            "--json",
            "-q",
        ]
        if ca_file:
            cmd += ["--cafile", ca_file]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
        report = json.loads(out.stdout)
        return float(report["msgs_per_s"]), "python -m lightws bench"
    cmd = [
        sys.executable,
        __file__,
        "_load",
        str(port),
        ca_file,
        str(args.connections),
        str(args.size),
        str(args.warmup),
        str(args.duration),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
    return float(out.stdout.strip()), "asyncio client (bench/tls_echo.py _load)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated")
    parser.add_argument("--load", choices=["auto", "lightws", "asyncio"], default="auto")
    parser.add_argument("-c", "--connections", type=int, default=100)
    parser.add_argument("-s", "--size", type=int, default=64)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    load = args.load
    if load == "auto":
        load = "lightws" if rust_loadgen_available() else "asyncio"
        if load == "asyncio":
            print(
                "the Rust load generator is not built in (cargo feature 'loadgen': "
                "maturin develop --release --features loadgen); using the asyncio client",
                file=sys.stderr,
            )
    elif load == "lightws" and not rust_loadgen_available():
        from lightws._bench import LOADGEN_MISSING

        sys.exit(LOADGEN_MISSING)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, ca_file = make_certificates(tmp)
        print(f"load: {load}, {args.connections} connections x {args.size} B, {args.duration} s")
        for kind in args.servers.split(","):
            port = free_port()
            tls = kind != "lightws-plain"
            url = f"{'wss' if tls else 'ws'}://{HOST}:{port}/"
            server = start_server(kind, port, cert, key, "echo")
            try:
                rate, how = run_load(load, url, port, ca_file if tls else "", args)
            finally:
                server.terminate()
                server.wait(15)
            print(f"  {kind:22} {rate:10,.0f} msgs/s   ({how})", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        import uvloop

        port, ca, conns, size, warm, dur = sys.argv[2:8]
        print(
            uvloop.run(asyncio_load(int(port), ca, int(conns), int(size), float(warm), float(dur)))
        )
    else:
        main()
