"""User-space memory per idle WebSocket connection, over TLS and plain TCP.

For each server (lightws over TLS, lightws plain, ``websockets`` over TLS with
``compression=None``) this script starts the server in its own process, opens idle
connections to it from a separate client process, and reads the server's
``/proc/PID/smaps_rollup`` ``Anonymous:`` line at each connection count. The number
reported is the slope between the lowest and the highest count, so start-up memory
(interpreter, runtime, certificates) cancels out. ``websockets`` runs on the default
asyncio loop and, as ``websockets-tls-uvloop``, on uvloop (lightws on the default loop)::

    python bench/tls_memory.py                       # 1,000 -> 5,000 connections
    python bench/tls_memory.py --counts 1000,3000,5000 --servers lightws-tls

Each server's handler awaits ``recv()`` and nothing more. The clients are raw asyncio
(TLS) streams that send the upgrade request, check for ``101`` and then stay silent:
cheaper than a WebSocket client library, and the server cannot tell the difference.
Connections are spread over several client processes so no process nears its file
limit. Certificates come from a throwaway trustme CA (ECDSA P-256 leaf).

Internal modes (``_server``, ``_clients``) are how the script runs its subprocesses.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SERVERS = ("lightws-tls", "lightws-plain", "websockets-tls", "websockets-tls-uvloop")
HOST = "127.0.0.1"
SNI = "localhost"


# ---- servers (each in its own process) ------------------------------------------------


async def run_lightws(port: int, cert: str | None, key: str | None, mode: str) -> None:
    import lightws

    async def handler(conn: lightws.Connection) -> None:
        try:
            if mode == "echo":
                async for msg in conn:
                    await conn.send(msg)
            else:
                await conn.recv()
        except lightws.ConnectionClosed:
            pass

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        return handler

    config = lightws.Config(
        addr=f"{HOST}:{port}",
        handshake=handshake,
        cert_file=cert,
        key_file=key,
        backlog=4096,
        handshake_read_timeout=30.0,
    )
    async with lightws.Server(config) as server:
        print("ready", flush=True)
        await server.serve_forever()


async def run_websockets(port: int, cert: str, key: str, mode: str) -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])

    async def handler(ws: ServerConnection) -> None:
        try:
            if mode == "echo":
                async for msg in ws:
                    await ws.send(msg)
            else:
                await ws.recv()
        except ConnectionClosed:
            pass

    async with serve(
        handler,
        HOST,
        port,
        ssl=ctx,
        compression=None,
        backlog=4096,
        open_timeout=30,
        ping_interval=None,
        max_size=None,
    ):
        print("ready", flush=True)
        await asyncio.Future()


async def run_picows(port: int, cert: str, key: str, mode: str) -> None:
    """picows over TLS (Python's ssl on the event loop): the echo peer of peers.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers import picows_server

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    await picows_server(HOST, port, ssl=ctx)
    print("ready", flush=True)
    await asyncio.Future()


def server_main(kind: str, port: int, cert: str, key: str, mode: str) -> None:
    if kind in ("picows-tls", "picows-tls-uvloop"):
        runner: Any = asyncio.run
        if kind.endswith("uvloop"):
            import uvloop

            runner = uvloop.run
        runner(run_picows(port, cert, key, mode))
    elif kind == "websockets-tls":
        asyncio.run(run_websockets(port, cert, key, mode))
    elif kind == "websockets-tls-uvloop":
        # asyncio's own TLS transport keeps a 256 KiB buffer per connection; uvloop's
        # does not, so websockets is shown on both loops.
        import uvloop

        uvloop.run(run_websockets(port, cert, key, mode))
    elif kind == "lightws-tls":
        asyncio.run(run_lightws(port, cert, key, mode))
    elif kind == "lightws-plain":
        asyncio.run(run_lightws(port, None, None, mode))
    else:
        raise SystemExit(f"unknown server {kind}")


# ---- idle clients ---------------------------------------------------------------------


def upgrade_request() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: {SNI}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def client_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def open_ws(
    port: int, ctx: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has completed TLS (if ``ctx``) and the WebSocket upgrade."""
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=ctx, server_hostname=SNI if ctx else None
    )
    writer.write(upgrade_request())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade refused: {head[:80]!r}")
    return reader, writer


async def clients_main(port: int, ca_file: str) -> None:
    """Reads "N" lines on stdin: grow to N open connections, then print "ok N"."""
    ctx = client_context(ca_file) if ca_file else None
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        async with sem:
            conns.append(await asyncio.wait_for(open_ws(port, ctx), 60))

    while line := await stdin.readline():
        target = int(line)
        await asyncio.gather(*(one() for _ in range(target - len(conns))))
        print(f"ok {len(conns)}", flush=True)
    for _, writer in conns:
        writer.transport.abort()


# ---- orchestration --------------------------------------------------------------------


def anonymous_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise RuntimeError("no Anonymous: line in smaps_rollup")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS: line")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def make_certificates(directory: str) -> tuple[str, str, str]:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert(SNI, HOST)
    cert, key, ca_file = (os.path.join(directory, n) for n in ("cert.pem", "key.pem", "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(ca_file)
    return cert, key, ca_file


def start_server(kind: str, port: int, cert: str, key: str, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "_server", kind, str(port), cert, key, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{kind} server did not start")
    return proc


def settle(pid: int, seconds: float = 2.0) -> int:
    """Anonymous memory once it stops moving (at most ~10 s)."""
    last = anonymous_kib(pid)
    for _ in range(int(10 / seconds)):
        time.sleep(seconds)
        now = anonymous_kib(pid)
        if abs(now - last) <= max(64, last // 200):
            return now
        last = now
    return last


def measure(
    kind: str, counts: list[int], cert: str, key: str, ca_file: str, per_process: int
) -> dict[int, tuple[int, int]]:
    port = free_port()
    server = start_server(kind, port, cert, key, "idle")
    n_clients = -(-max(counts) // per_process)
    tls_ca = "" if kind == "lightws-plain" else ca_file
    clients = [
        subprocess.Popen(
            [sys.executable, __file__, "_clients", str(port), tls_ca],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n_clients)
    ]
    results: dict[int, tuple[int, int]] = {}
    try:
        for count in counts:
            share = [count // n_clients + (i < count % n_clients) for i in range(n_clients)]
            for client, n in zip(clients, share, strict=True):
                assert client.stdin is not None
                client.stdin.write(f"{n}\n")
                client.stdin.flush()
            for client, n in zip(clients, share, strict=True):
                assert client.stdout is not None
                reply = client.stdout.readline().strip()
                if reply != f"ok {n}":
                    raise RuntimeError(f"client process answered {reply!r}")
            anon = settle(server.pid)
            results[count] = (anon, rss_kib(server.pid))
            print(
                f"  {kind:15} {count:6} conns: Anonymous {anon:8} KiB, "
                f"RSS {results[count][1]:8} KiB",
                flush=True,
            )
    finally:
        for client in clients:
            if client.stdin:
                client.stdin.close()
        for client in clients:
            try:
                client.wait(30)
            except subprocess.TimeoutExpired:
                client.kill()
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,5000", help="connection counts (ascending)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated")
    parser.add_argument(
        "--per-process", type=int, default=5000, help="connections per client process"
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(counts) + 100 > soft:
        print(f"file limit {soft} is below {max(counts) + 100}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, ca_file = make_certificates(tmp)
        summary = []
        for kind in args.servers.split(","):
            results = measure(kind, counts, cert, key, ca_file, args.per_process)
            lo, hi = counts[0], counts[-1]
            slope = (results[hi][0] - results[lo][0]) / (hi - lo)
            rss_slope = (results[hi][1] - results[lo][1]) / (hi - lo)
            summary.append((kind, slope, rss_slope))
        print(f"\nper idle connection, slope {counts[0]} -> {counts[-1]} connections:")
        for kind, slope, rss_slope in summary:
            print(f"  {kind:15} Anonymous {slope:6.2f} KiB   (RSS {rss_slope:6.2f} KiB)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        server_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "_clients":
        asyncio.run(clients_main(int(sys.argv[2]), sys.argv[3]))
    else:
        main()
