"""Soak test: connection churn against a lightws echo server, watching its memory.

Starts ``python -m lightws echo`` as a subprocess, then several client processes (each
under the per-process fd limit, each bound to its own 127.0.0.x source address so the
4-tuples do not run out) that open connections at a steady rate for ``--minutes``:

- echo (most): upgrade, echo 1-5 messages (text and binary, up to 64 KiB, checked byte
  for byte), close normally (close handshake, then the server's TCP close);
- abort mid-message: echo 0-2 messages, then send a frame header and part of its
  payload and drop the connection (FIN, or RST via SO_LINGER 0);
- abort mid-handshake: send part of the upgrade request and drop the connection;
- idle: upgrade and sit for 5-60 s (sometimes a ping), then close normally or abort.

Each minute it prints the server's RSS (``VmRSS`` from /proc/PID/status) and its
anonymous memory (``Anonymous`` from /proc/PID/smaps_rollup) with the client counters,
and at the end a verdict: RSS is flat if the last sample is within ``--tolerance`` of
the first one taken after the first minute (when the idle population has reached its
steady size, so both are under the same load). A final sample
after every client has gone shows what the server keeps once idle.

Not run in CI. Example (about 10 minutes, low priority)::

    nice -n 10 python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing as mp
import os
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - optional
    uvloop = None  # type: ignore[assignment]

# Counters each worker publishes (one row of the shared array per worker).
COUNTERS = (
    "opened",  # TCP connections made
    "upgraded",  # 101 received
    "closed_ok",  # close handshake completed and TCP closed by the server
    "aborted",  # dropped on purpose (mid-message, mid-handshake, idle)
    "messages",  # messages echoed and verified
    "bytes",  # payload bytes echoed
    "errors",  # anything unexpected (timeouts, wrong echo, refused connections)
    "open_now",  # connections open at the moment (a gauge)
)
IDX = {name: i for i, name in enumerate(COUNTERS)}
STEP_TIMEOUT = 30.0
CLOSE, PING, PONG, TEXT, BINARY, CONT = 8, 9, 10, 1, 2, 0


# --- the server's memory ---------------------------------------------------------------


def server_memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, Anonymous) of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        rss = int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))  # type: ignore[union-attr]
    with open(f"/proc/{pid}/smaps_rollup") as f:
        anon = int(re.search(r"^Anonymous:\s+(\d+) kB", f.read(), re.M).group(1))  # type: ignore[union-attr]
    return rss, anon


# --- a small client --------------------------------------------------------------------


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    key = os.urandom(4)
    if not payload:
        return head + key
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


async def read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    """One server frame: (fin, opcode, payload); server frames are unmasked."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return bool(b0 & 0x80), b0 & 0x0F, await reader.readexactly(n)


async def read_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next data message, reassembled; pongs are skipped."""
    opcode, parts = None, []
    while True:
        fin, op, payload = await read_frame(reader)
        if op in (PING, PONG):
            continue
        if op == CLOSE:
            raise ConnectionError(f"server closed: {payload!r}")
        opcode = op if opcode is None else opcode
        parts.append(payload)
        if fin:
            return opcode, b"".join(parts)


class Worker:
    """One client process: sessions started at a steady rate, up to a cap."""

    def __init__(
        self,
        index: int,
        port: int,
        source: str,
        rate: float,
        cap: int,
        stats: SynchronizedArray[Any],
    ) -> None:
        self.index = index
        self.port = port
        self.source = source
        self.rate = rate
        self.cap = cap
        self.stats = stats
        self.row = index * len(COUNTERS)
        self.rng = random.Random(index * 7919 + os.getpid())
        self.writers: set[asyncio.StreamWriter] = set()

    def bump(self, name: str, by: int = 1) -> None:
        self.stats[self.row + IDX[name]] += by

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(self.source, 0), limit=1 << 20
        )
        self.bump("opened")
        self.bump("open_now")
        self.writers.add(writer)
        return reader, writer

    def forget(self, writer: asyncio.StreamWriter) -> None:
        if writer in self.writers:
            self.writers.discard(writer)
            self.bump("open_now", -1)

    async def upgrade(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /soak HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"upgrade refused: {head[:40]!r}")
        self.bump("upgraded")

    def payload(self) -> tuple[int, bytes]:
        size = self.rng.randint(0, 1024) if self.rng.random() < 0.9 else self.rng.randint(0, 65536)
        if self.rng.random() < 0.5:
            return TEXT, ("é" * (size // 2)).encode()
        return BINARY, self.rng.randbytes(size)

    async def echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opcode, body = self.payload()
        writer.write(frame(opcode, body))
        if await read_message(reader) != (opcode, body):
            raise ValueError("echo differs from what was sent")
        self.bump("messages")
        self.bump("bytes", len(body))

    async def close_normally(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(frame(CLOSE, struct.pack("!H", 1000)))
        while True:
            _, op, _ = await read_frame(reader)
            if op == CLOSE:
                break
        # RFC 6455 7.1.1: the server closes TCP first.
        if await reader.read(1) != b"":
            raise ConnectionError("data after the close frame")
        self.bump("closed_ok")

    def abort(self, writer: asyncio.StreamWriter, rst: bool) -> None:
        if rst:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        self.bump("aborted")

    async def session(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        kind = self.rng.choices(
            ["echo", "abort_message", "abort_handshake", "idle"], weights=[65, 12, 3, 20]
        )[0]
        reader, writer = await self.connect()
        try:
            if kind == "abort_handshake":
                writer.write(b"GET /soak HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")
                await writer.drain()
                self.abort(writer, rst=self.rng.random() < 0.5)
                return
            await self.upgrade(reader, writer)
            if kind == "echo":
                for _ in range(self.rng.randint(1, 5)):
                    await self.echo(reader, writer)
                await self.close_normally(reader, writer)
            elif kind == "abort_message":
                for _ in range(self.rng.randint(0, 2)):
                    await self.echo(reader, writer)
                opcode, body = self.payload()
                wire = frame(opcode, body + b"x" * 200)
                writer.write(wire[: self.rng.randint(1, len(wire) - 1)])
                await writer.drain()
                self.abort(writer, rst=self.rng.random() < 0.5)
            else:
                idle = min(self.rng.uniform(5, 60), max(until - loop.time(), 0))
                await asyncio.sleep(idle)
                if self.rng.random() < 0.3:
                    writer.write(frame(PING, b"still there?"))
                    _, op, payload = await read_frame(reader)
                    if (op, payload) != (PONG, b"still there?"):
                        raise ValueError("ping not answered")
                if self.rng.random() < 0.5:
                    await self.close_normally(reader, writer)
                else:
                    self.abort(writer, rst=False)
        finally:
            self.forget(writer)
            writer.close()

    async def guarded(self, until: float) -> None:
        try:
            await asyncio.wait_for(self.session(until), 60 + STEP_TIMEOUT)
        except (OSError, ValueError, asyncio.TimeoutError, EOFError):
            # OSError covers ConnectionError; EOFError covers IncompleteReadError.
            self.bump("errors")

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / self.rate
        next_start = loop.time()
        while loop.time() < until:
            if len(tasks) < self.cap:
                task = asyncio.ensure_future(self.guarded(until))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_start += interval
            await asyncio.sleep(max(next_start - loop.time(), 0))
        # Let sessions under way finish (idle ones end by `until`), then drop the rest.
        if tasks:
            await asyncio.wait(tasks, timeout=STEP_TIMEOUT)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def worker_main(
    index: int,
    port: int,
    source: str,
    rate: float,
    cap: int,
    seconds: float,
    stats: SynchronizedArray[Any],
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    worker = Worker(index, port, source, rate, cap, stats)
    if uvloop is not None:
        uvloop.run(worker.run(seconds))
    else:
        asyncio.run(worker.run(seconds))


# --- the driver ------------------------------------------------------------------------


def start_server(args: argparse.Namespace, log: Any) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "lightws", "echo", "--addr", "127.0.0.1:0"]
    cmd += ["--threads", str(args.server_threads)]
    if args.server_uvloop:
        cmd.append("--uvloop")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(match.group(1))


def totals(stats: SynchronizedArray[Any], workers: int) -> dict[str, int]:
    n = len(COUNTERS)
    return {name: sum(stats[w * n + i] for w in range(workers)) for i, name in enumerate(COUNTERS)}


def mib(kib: int) -> str:
    return f"{kib / 1024:8.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10, help="load duration (default 10)")
    p.add_argument("--workers", type=int, default=4, help="client processes (default 4)")
    p.add_argument(
        "--rate", type=float, default=400, help="new connections/s, all workers (default 400)"
    )
    p.add_argument(
        "--cap", type=int, default=2500, help="open connections per worker at most (2500)"
    )
    p.add_argument("--server-threads", type=int, default=1, help="server I/O threads (1)")
    p.add_argument("--server-uvloop", action="store_true", help="server on uvloop")
    p.add_argument(
        "--tolerance", type=float, default=0.10, help="allowed last/first RSS growth (0.10)"
    )
    p.add_argument("--interval", type=float, default=60, help="seconds between samples (60)")
    args = p.parse_args(argv)

    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if args.cap + 100 > fd_limit or args.cap * args.workers + 100 > fd_limit:
        raise SystemExit(
            f"--cap {args.cap} x --workers {args.workers} needs more fds than the server's "
            f"limit of {fd_limit}"
        )
    seconds = args.minutes * 60
    ctx = mp.get_context("spawn")
    stats: SynchronizedArray[Any] = ctx.Array("q", args.workers * len(COUNTERS), lock=False)

    with tempfile.TemporaryFile("w+") as log:
        server, port = start_server(args, log)
        print(
            f"server pid {server.pid} on port {port}; {args.workers} workers, "
            f"{args.rate:g} conn/s, cap {args.cap}/worker, {args.minutes:g} min",
            flush=True,
        )
        procs = [
            ctx.Process(
                target=worker_main,
                args=(
                    w,
                    port,
                    f"127.0.0.{2 + w}",
                    args.rate / args.workers,
                    args.cap,
                    seconds,
                    stats,
                ),
            )
            for w in range(args.workers)
        ]
        samples: list[tuple[float, int, int]] = []
        try:
            rss, anon = server_memory_kib(server.pid)
            print(
                f"{'min':>5} {'RSS MiB':>8} {'anon MiB':>8} {'open':>6} {'conn/s':>7} "
                f"{'opened':>9} {'closed_ok':>9} {'aborted':>8} {'msgs':>9} {'errors':>6}"
            )
            print(f"{0:5.1f} {mib(rss)} {mib(anon)}   (before load)", flush=True)
            baseline = (rss, anon)
            for proc in procs:
                proc.start()
            start = time.monotonic()
            last_opened, last_t = 0, start
            while any(proc.is_alive() for proc in procs):
                time.sleep(min(args.interval, max(start + seconds - time.monotonic(), 1)))
                now = time.monotonic()
                if now - start > seconds + 2 * STEP_TIMEOUT + 60:
                    break
                if server.poll() is not None:
                    raise SystemExit(f"server exited with {server.returncode}")
                rss, anon = server_memory_kib(server.pid)
                t = totals(stats, args.workers)
                rate = (t["opened"] - last_opened) / (now - last_t)
                last_opened, last_t = t["opened"], now
                minute = (now - start) / 60
                if now - start <= seconds + 1:
                    samples.append((minute, rss, anon))
                print(
                    f"{minute:5.1f} {mib(rss)} {mib(anon)} {t['open_now']:6d} {rate:7.0f} "
                    f"{t['opened']:9d} {t['closed_ok']:9d} {t['aborted']:8d} "
                    f"{t['messages']:9d} {t['errors']:6d}",
                    flush=True,
                )
            for proc in procs:
                proc.join(timeout=STEP_TIMEOUT)
                if proc.is_alive():
                    proc.terminate()
            time.sleep(5)
            rss, anon = server_memory_kib(server.pid)
            print(
                f"after clients left: RSS {mib(rss).strip()} MiB, anon {mib(anon).strip()} MiB "
                f"(before load: {mib(baseline[0]).strip()} / {mib(baseline[1]).strip()})"
            )
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                server.kill()
            log.seek(0)
            errors = log.read()
        t = totals(stats, args.workers)
        print(f"totals: {t}")
        lines = errors.splitlines()
        print(
            f"server stderr: {len(lines)} lines" + (f", last: {lines[-1][:200]}" if lines else "")
        )

    if len(samples) < 2:
        print("verdict: not enough samples (run for at least two intervals)")
        return 2
    # Idle sessions last up to 60 s, so the open-connection count (and with it RSS)
    # climbs during the first minute; compare from the first sample after it.
    first = next((s for s in samples if s[0] >= 1.0), samples[0])
    last = samples[-1]
    ratio_rss, ratio_anon = last[1] / first[1], last[2] / first[2]
    flat = ratio_rss <= 1 + args.tolerance and ratio_anon <= 1 + args.tolerance
    print(
        f"verdict: RSS {'FLAT' if flat else 'GROWING'}: last/first = {ratio_rss:.3f} "
        f"(anon {ratio_anon:.3f}), minute {first[0]:.1f} -> {last[0]:.1f}, "
        f"tolerance {args.tolerance:.0%}"
    )
    return 0 if flat else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
