"""Peak server memory with peers that never read (issue: hostile peers).

Starts a lightws server in a subprocess whose handler sends one 1 MiB message to every
client and then waits; opens N clients (default 1,000) that complete the upgrade and
never read a byte; samples the server's VmRSS, VmHWM and smaps_rollup Anonymous for a
few seconds and prints the peak. Messages over ``write_limit`` go out in fragments, one
per drained outbox, so each stalled peer should cost about two fragments of user
space (plus what the kernel buffers), not the whole message.

    python bench/never_reading.py [--clients 1000] [--size 1048576] [--write-limit 65536]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import subprocess
import sys
import time

SERVER = r"""
import asyncio, sys, lightws
payload = b"x" * int(sys.argv[2])
def handshake(request, response):
    async def handler(conn):
        await conn.send(payload)
        await conn.recv()
    return handler
async def main():
    config = lightws.Config(addr=sys.argv[1], handshake=handshake,
                            write_limit=int(sys.argv[3]), max_connections=0)
    async with lightws.Server(config) as server:
        print(server.port, flush=True)
        await server.serve_forever()
asyncio.run(main())
"""


def memory(pid: int) -> tuple[int, int, int]:
    status = open(f"/proc/{pid}/status").read()
    rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"^VmHWM:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    rollup = open(f"/proc/{pid}/smaps_rollup").read()
    anon = int(re.search(r"^Anonymous:\s+(\d+)", rollup, re.M).group(1))  # type: ignore[union-attr]
    return rss, hwm, anon


async def stalled_client(port: int, held: list[asyncio.StreamWriter]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")  # the 101; after this, never read again
    held.append(writer)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--write-limit", type=int, default=64 * 1024)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, "127.0.0.1:0", str(args.size), str(args.write_limit)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        base = memory(server.pid)
        held: list[asyncio.StreamWriter] = []
        started = time.monotonic()
        for i in range(0, args.clients, 100):
            await asyncio.gather(
                *(stalled_client(port, held) for _ in range(min(100, args.clients - i)))
            )
        peak_rss = peak_anon = 0
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            rss, hwm, anon = memory(server.pid)
            peak_rss, peak_anon = max(peak_rss, hwm), max(peak_anon, anon)
            await asyncio.sleep(0.2)
        rss, hwm, anon = memory(server.pid)
        mib = 1024.0
        print(
            f"{len(held)} never-reading clients, each sent {args.size} B "
            f"(write_limit {args.write_limit} B), {time.monotonic() - started:.1f} s"
        )
        print(
            f"server RSS: before {base[0] / mib:.1f} MiB, peak {peak_rss / mib:.1f} MiB, "
            f"end {rss / mib:.1f} MiB"
        )
        print(f"server anonymous: before {base[2] / mib:.1f} MiB, peak {peak_anon / mib:.1f} MiB")
        print(
            f"user space per stalled peer: "
            f"{(peak_anon - base[2]) / max(1, len(held)):.0f} KiB "
            f"(the message itself is {args.size / 1024:.0f} KiB)"
        )
        for w in held:
            w.transport.abort()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    asyncio.run(main())
