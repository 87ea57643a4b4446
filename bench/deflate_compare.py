"""permessage-deflate: lightws beside websockets and aiohttp, compression on, one run.

    python bench/deflate_compare.py            # 1,000 -> 10,000 connections, 10 s echo
    python bench/deflate_compare.py --quick    # 200 -> 2,000 connections, 3 s echo
    python bench/deflate_compare.py --json results.json

Each server runs in its own process, echoing every message (``python -m lightws echo
--compression deflate``, ``bench/peers.py {websockets,aiohttp} --compression
deflate``), at comparable settings: window bits 12 both ways (websockets' defaults,
memLevel 5; lightws's defaults; aiohttp follows the client's offer of
``server_max_window_bits=12``). The clients are raw asyncio sockets in other processes
(this file, ``--client``), compressing with Python's zlib; every client offers what a
browser does plus ``server_max_window_bits=12``:
``permessage-deflate; server_max_window_bits=12; client_max_window_bits``.

Measured per server:

- **idle KiB/conn**: the slope of ``Anonymous:`` (/proc/PID/smaps_rollup) between
  LOW and HIGH connections that negotiated deflate and exchanged nothing;
- **1 msg KiB/conn (takeover)**: the same slope after every connection sent one
  compressed 1 KiB JSON message and read its compressed echo, with context takeover;
- **1 msg KiB/conn (no takeover)**: the same with ``server_no_context_takeover;
  client_no_context_takeover`` offered and configured (lightws
  ``--server-no-context-takeover --client-no-context-takeover``; websockets' factory
  with both; aiohttp agrees only to the server's);
- **echo msgs/s**: the load generator (``python -m lightws bench --deflate``, Rust)
  with 50 and with 200 connections in a closed loop of 1 KiB JSON-like TEXT messages
  that differ from one message to the next, compressed both ways with context
  takeover, best of ``--repeat`` runs (on a 2-core machine the generator competes with
  the server);
- **server µs/msg** and **loop µs/msg**: CPU of the whole server process and of its
  main (event-loop) thread per echoed message during the 200-connection run
  (utime+stime from /proc/PID/stat and /proc/PID/task/PID/stat).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE))

from compare import HOST, PY, ServerProcess  # noqa: E402

OFFER = "permessage-deflate; server_max_window_bits=12; client_max_window_bits"
OFFER_NCT = OFFER + "; server_no_context_takeover; client_no_context_takeover"
TAIL = b"\x00\x00\xff\xff"
SERVERS = ["lightws", "websockets", "aiohttp"]


def json_message(i: int) -> bytes:
    """A 1 KiB JSON-like message, different each time (ids, prices, names)."""
    rows = ",".join(
        f'{{"id":{i * 10 + k},"sym":"S{(i + k) % 50:03d}","px":{100 + (i * 7 + k) % 900}.'
        f'{k * 13 % 100:02d},"qty":{(i + k * 3) % 1000},"side":"{"buy" if k % 2 else "sell"}"}}'
        for k in range(20)
    )
    text = f'{{"type":"quotes","seq":{i},"rows":[{rows}]}}'
    return (text * 2)[:1024].encode()


# -- the client (runs in its own process) --------------------------------------------------


class Conn:
    """A raw client connection with permessage-deflate (masking key 0, valid per RFC)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, agreed: str):
        self.reader, self.writer = reader, writer
        params = {p.strip().partition("=")[0] for p in agreed.split(";")}
        self.client_nct = "client_no_context_takeover" in params
        self.server_nct = "server_no_context_takeover" in params
        self.c: Any = None
        self.d: Any = None

    @classmethod
    async def open(cls, port: int, offer: str) -> Conn:
        reader, writer = await asyncio.open_connection(HOST, port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET / HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {offer}\r\n\r\n"
            ).encode()
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        if " 101 " not in head.split("\r\n", 1)[0]:
            raise RuntimeError(f"no upgrade: {head!r}")
        agreed = ""
        for line in head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "sec-websocket-extensions":
                agreed = value.strip()
        if "permessage-deflate" not in agreed:
            raise RuntimeError(f"deflate not negotiated: {head!r}")
        return cls(reader, writer, agreed)

    def send(self, data: bytes, opcode: int = 1) -> None:
        if self.c is None:
            self.c = zlib.compressobj(6, zlib.DEFLATED, -12, 8)
        body = (self.c.compress(data) + self.c.flush(zlib.Z_SYNC_FLUSH))[:-4]
        if self.client_nct:
            self.c = None
        n = len(body)
        b0 = 0x80 | 0x40 | opcode
        if n < 126:
            head = struct.pack("!BB", b0, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", b0, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", b0, 0x80 | 127, n)
        self.writer.write(head + b"\0\0\0\0" + body)

    async def recv(self) -> bytes:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        body = await self.reader.readexactly(n)
        if not b0 & 0x40:
            return body
        if self.d is None:
            self.d = zlib.decompressobj(-15)
        out: bytes = self.d.decompress(body + TAIL)
        if self.server_nct:
            self.d = None
        return out


async def client_hold(port: int, count: int, offer: str, one_message: bool) -> None:
    conns: list[Conn] = []
    sem = asyncio.Semaphore(200)

    async def one(i: int) -> None:
        async with sem:
            c = await Conn.open(port, offer)
            if one_message:
                m = json_message(i)
                c.send(m)
                assert await c.recv() == m
                c.c = c.d = None  # the client's zlib state is not what is measured
            conns.append(c)

    await asyncio.gather(*(one(i) for i in range(count)))
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def client_echo(port: int, count: int, duration: float) -> None:
    conns = [await Conn.open(port, OFFER) for _ in range(count)]
    done = 0
    start = time.monotonic()
    deadline = start + duration

    async def loop(c: Conn, k: int) -> None:
        nonlocal done
        i = k * 1_000_000
        while time.monotonic() < deadline:
            m = json_message(i)
            c.send(m)
            got = await c.recv()
            assert got == m, (len(got), len(m))
            done += 1
            i += 1

    await asyncio.gather(*(loop(c, k) for k, c in enumerate(conns)))
    print(json.dumps({"messages": done, "seconds": time.monotonic() - start}), flush=True)


# -- the driver ----------------------------------------------------------------------------


def server_command(server: str, port: int, nct: bool) -> list[str]:
    if server == "lightws":
        cmd = [PY, "-m", "lightws", "echo", "--addr", f"{HOST}:{port}"]
        cmd += ["--compression", "deflate"]
        if nct:
            cmd += ["--server-no-context-takeover", "--client-no-context-takeover"]
        return cmd
    mode = "deflate-nct" if nct else "deflate"
    return [PY, str(HERE / "peers.py"), server, "--port", str(port), "--compression", mode]


class Server(ServerProcess):
    def __init__(self, server: str, nct: bool = False) -> None:
        import compare

        saved = compare.server_command
        compare.server_command = lambda s, port: server_command(s, port, nct)
        try:
            super().__init__(server)
        finally:
            compare.server_command = saved


def spawn_client(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, __file__, "--client", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(p: subprocess.Popen[str], timeout: float = 300) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        err = p.stderr.read() if p.stderr else ""
        raise RuntimeError(f"client failed: {line!r} {err[-2000:]}")


def memory_slope(server: str, low: int, high: int, nct: bool, one_message: bool) -> float:
    offer = OFFER_NCT if nct else OFFER
    flag = "1" if one_message else "0"
    with contextlib.ExitStack() as stack:
        proc = Server(server, nct)
        stack.callback(proc.stop)
        clients: list[subprocess.Popen[str]] = []

        def stop_clients() -> None:
            for c in clients:
                c.send_signal(signal.SIGTERM)
            for c in clients:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.wait(10)
                if c.poll() is None:
                    c.kill()

        stack.callback(stop_clients)
        clients.append(spawn_client("hold", str(proc.port), str(low), offer, flag))
        wait_ready(clients[-1])
        time.sleep(2)
        mem_low, fds_low = proc.anonymous_kib(), proc.fds()
        clients.append(spawn_client("hold", str(proc.port), str(high - low), offer, flag))
        wait_ready(clients[-1])
        time.sleep(2)
        mem_high, fds_high = proc.anonymous_kib(), proc.fds()
        return (mem_high - mem_low) / max(fds_high - fds_low, 1)


def echo_rate(server: str, duration: float, repeat: int, conns: int) -> dict[str, float]:
    """The load generator (Rust: its own compression is cheap beside a Python client's)
    in echo mode with --deflate: ``conns`` connections, 1 KiB JSON-like TEXT messages
    that differ from one to the next, compressed with context takeover both ways. Best
    of ``repeat`` runs (the machine may be shared)."""
    best: dict[str, float] = {}
    for _ in range(repeat):
        with contextlib.ExitStack() as stack:
            proc = Server(server)
            stack.callback(proc.stop)
            cpu0, loop0 = proc.cpu()
            cmd = [PY, "-m", "lightws", "bench", proc.url, "--json", "-q", "--deflate"]
            cmd += ["-c", str(conns), "-s", "1024", "-d", str(duration), "--warmup", "1"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
            if out.returncode != 0:
                raise RuntimeError(f"load generator failed: {out.stderr.strip()[-2000:]}")
            r = json.loads(out.stdout)
            if r["failed"]:
                raise RuntimeError(f"load generator: {r['errors']}")
            cpu1, loop1 = proc.cpu()
            total = r["messages"]
            # CPU over warm-up and measured run, per message of the whole run.
            run_msgs = total * (duration + 1) / duration
            res = {
                "echo msgs/s": r["msgs_per_s"],
                "server µs/msg": (cpu1 - cpu0) / run_msgs * 1e6,
                "loop µs/msg": (loop1 - loop0) / run_msgs * 1e6,
            }
            if res["echo msgs/s"] > best.get("echo msgs/s", 0):
                best = res
    return best


COLUMNS = [
    "idle KiB/conn",
    "1 msg KiB/conn (takeover)",
    "1 msg KiB/conn (no takeover)",
    "echo msgs/s (50 conns)",
    "echo msgs/s (200 conns)",
    "server µs/msg",
    "loop µs/msg",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="200 -> 2,000 connections, 3 s echo")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--repeat", type=int, default=3, help="echo runs per server (best kept)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    low, high, duration = (200, 2000, 3.0) if args.quick else (1000, 10000, 5.0)
    results: dict[str, dict[str, float | str]] = {}
    for server in args.servers.split(","):
        res: dict[str, float | str] = {}
        for col, nct, one in [
            ("idle KiB/conn", False, False),
            ("1 msg KiB/conn (takeover)", False, True),
            ("1 msg KiB/conn (no takeover)", True, True),
        ]:
            try:
                res[col] = memory_slope(server, low, high, nct, one)
            except Exception as e:
                res[col] = f"failed: {e}"[:80]
            print(f"{server}: {col} = {res[col]}", file=sys.stderr, flush=True)
        for conns in (50, 200):
            col = f"echo msgs/s ({conns} conns)"
            try:
                r = echo_rate(server, duration, args.repeat, conns)
                res[col] = r["echo msgs/s"]
                if conns == 200:  # CPU per message where the server is busiest
                    res["server µs/msg"] = r["server µs/msg"]
                    res["loop µs/msg"] = r["loop µs/msg"]
            except Exception as e:
                res[col] = f"failed: {e}"[:80]
        print(f"{server}: {res}", file=sys.stderr, flush=True)
        results[server] = res
    base = results.get("lightws", {})
    print(f"connections {low} -> {high}, echo {duration:g} s x 50 and 200 connections, 1 KiB JSON")
    print(f"load average before the echo runs: {os.getloadavg()[0]:.2f}")
    print("| server | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for server, res in results.items():
        cells = []
        for col in COLUMNS:
            v = res.get(col, "")
            if isinstance(v, float):
                cell = f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
                b = base.get(col)
                if server != "lightws" and isinstance(b, float) and b > 0:
                    cell += f" ({v / b:.1f}x)"
                cells.append(cell)
            else:
                cells.append(str(v))
        print(f"| {server} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def client_main(argv: list[str]) -> None:
    mode, port = argv[0], int(argv[1])
    if mode == "hold":
        asyncio.run(client_hold(port, int(argv[2]), argv[3], argv[4] == "1"))
    else:
        asyncio.run(client_echo(port, int(argv[2]), float(argv[3])))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
    else:
        sys.exit(main())
