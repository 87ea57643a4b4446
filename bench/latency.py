"""Round-trip latency of one message at a time, lightws and its peers in one run.

    python bench/latency.py                       # default servers, 3 interleaved repeats
    python bench/latency.py --samples 5000 --repeat 5
    python bench/latency.py --servers lightws,lightws+threads2,picows+uvloop
    python bench/latency.py --base /tmp/lightws-main   # add lightws as built there ("base")

One raw client on uvloop (an asyncio Protocol, TCP_NODELAY) opens one connection and
sends a pre-masked 64-byte binary frame, waits for the echo, sleeps 1 ms, and again:
one message in flight, timed with ``perf_counter_ns`` from the write to the last byte
of the echo. The first ``--warmup`` round trips are not counted. Each server is
measured twice per repeat:

- **idle**: nothing else on the server;
- **loaded**: a light background load on other connections of the same server
  (``python -m lightws bench URL --mode rate -c 4 -r 2000``: 4 connections, 2,000
  msgs/s of 64 B in all), started before and stopped after the samples.

Servers (each its own process, as in bench/compare.py): ``lightws`` is ``python -m
lightws echo`` with ``+uvloop`` (``--uvloop``), ``+threadsN`` (``--threads N``) and
``+listener`` (``--listener``: the echo through a listener, ``on_message`` and
``conn.send_nowait``, no task per connection) variants; ``picows+uvloop`` and
``websockets+uvloop`` are bench/peers.py; ``+noinline`` needs a ``hop-trace`` build
(the inline write off). ``--base DIR`` puts DIR first on the server's PYTHONPATH for
``base-`` servers (``base-lightws``, ``base-lightws+uvloop``): a copy of another
build's ``lightws`` package, to compare before and after in one run. Repeats are
interleaved (every server once, then again), so a noisy moment of this shared machine
hits all of them. Percentiles are over the samples of all repeats; the p50 range is
the lowest and highest p50 of single runs.

The background load needs the load generator (an extension built with the ``loadgen``
cargo feature, see BENCHMARKS.md); without it only the idle column is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

HERE = Path(__file__).resolve().parent
PY = sys.executable
HOST = "127.0.0.1"
PAYLOAD = 64
DEFAULT_SERVERS = "lightws,lightws+uvloop,lightws+threads2,picows+uvloop,websockets+uvloop"
BASELINE = "picows+uvloop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def server_command(
    server: str, port: int, trace: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line of ``server`` and extra environment variables."""
    env: dict[str, str] = {}
    if trace:
        env["LIGHTWS_HOP_TRACE"] = trace
    name, *opts = server.split("+")
    if name.startswith("base-"):
        name = name.removeprefix("base-")
        env["PYTHONPATH"] = BASE_DIR
    extra: list[str] = []
    for opt in opts:
        if opt == "uvloop":
            extra.append("--uvloop")
        elif opt == "listener":
            extra.append("--listener")  # the echo as a listener (send_nowait, no task)
        elif opt == "noinline":
            # A hop-trace build only: no inline writes (src/hoptrace.rs).
            env["LIGHTWS_HOP_TRACE_NO_INLINE"] = "1"
        elif opt.startswith("threads"):
            extra += ["--threads", opt.removeprefix("threads")]
        else:
            raise SystemExit(f"unknown server option {opt!r} in {server!r}")
    if name == "lightws":
        return [PY, "-m", "lightws", "echo", "--addr", f"{HOST}:{port}", *extra], env
    if name in ("picows", "websockets", "aiohttp"):
        return [PY, str(HERE / "peers.py"), name, "--port", str(port), *extra], env
    raise SystemExit(f"unknown server {server!r}")


#: ``--base``: the directory holding the ``lightws`` package of ``base-`` servers.
BASE_DIR = ""


class ServerProcess:
    def __init__(self, server: str, trace: str | None = None) -> None:
        self.port = free_port()
        self.url = f"ws://{HOST}:{self.port}/"
        cmd, env = server_command(server, self.port, trace)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
        )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"{server} exited at start: {err.strip()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{server} did not start listening")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


@contextlib.contextmanager
def started(server: str, trace: str | None = None) -> Iterator[ServerProcess]:
    proc = ServerProcess(server, trace)
    try:
        yield proc
    finally:
        proc.stop()


def masked_frame(payload: bytes) -> bytes:
    """A final binary frame from a client: masked (RFC 6455 5.3), payload under 126 B."""
    assert len(payload) < 126
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + key + body


class Client(asyncio.Protocol):
    """A raw WebSocket client: the upgrade, then echoes of one frame at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.want = 0  # bytes that complete what the waiter waits for (0: the 101)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is None or w.done():
            return
        if self.want == 0:
            if b"\r\n\r\n" in self.buf:
                w.set_result(None)
        elif len(self.buf) >= self.want:
            w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("server closed the connection"))
        if not self.lost.done():
            self.lost.set_result(None)

    async def upgrade(self, host: str, port: int) -> None:
        assert self.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        self.waiter = asyncio.get_running_loop().create_future()
        self.want = 0
        self.transport.write(
            (
                f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await self.waiter
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head[:80]!r}")
        self.buf = bytearray(rest)

    async def round_trip(self, frame: bytes, reply_len: int) -> tuple[int, int]:
        """Send ``frame``, wait for ``reply_len`` bytes: (sent, received) in ns."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.want = reply_len
        t0 = time.perf_counter_ns()
        self.transport.write(frame)
        await self.waiter
        t1 = time.perf_counter_ns()
        if self.buf[0] != 0x82 or self.buf[1] != PAYLOAD:
            raise RuntimeError(f"unexpected reply header {bytes(self.buf[:2])!r}")
        del self.buf[:reply_len]
        return t0, t1


async def sample(
    url_port: int, samples: int, warmup: int, interval: float
) -> list[tuple[int, int]]:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(Client, HOST, url_port)
    await client.upgrade(HOST, url_port)
    frame = masked_frame(os.urandom(PAYLOAD))
    out: list[tuple[int, int]] = []
    try:
        for i in range(warmup + samples):
            times = await asyncio.wait_for(client.round_trip(frame, 2 + PAYLOAD), 10)
            if i >= warmup:
                out.append(times)
            await asyncio.sleep(interval)
    finally:
        assert client.transport is not None
        client.transport.close()
    return out


def measure(port: int, args: argparse.Namespace) -> list[tuple[int, int]]:
    import uvloop

    return uvloop.run(sample(port, args.samples, args.warmup, args.interval / 1000))


@contextlib.contextmanager
def background(url: str, args: argparse.Namespace) -> Iterator[None]:
    """The light background load on other connections, for as long as the block runs."""
    seconds = (args.samples + args.warmup) * (args.interval / 1000 + 0.002) + 30
    proc = subprocess.Popen(
        [
            PY, "-m", "lightws", "bench", url, "--mode", "rate", "-q",
            "-c", str(args.load_connections), "-r", str(args.load_rate),
            "-d", f"{seconds:.0f}", "--warmup", "0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # connected and sending
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"background load exited: {err.strip()}")
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@dataclass
class Series:
    samples: list[int] = field(default_factory=list)
    p50s: list[float] = field(default_factory=list)
    #: ``--hop-trace``: per round trip, the time spent in each of ``HOPS`` (ns).
    hops: list[list[int | None]] = field(default_factory=list)


#: The stretches of one round trip, from the client's write to its read of the echo,
#: between the server's timestamps (src/hoptrace.rs, in its order; None: not reached).
HOPS = (
    "client write → tokio read",
    "read → delivered (decode, inbox)",
    "delivered → drain on loop (hub push, eventfd wake)",
    "drain → send() (Python: recv, handler)",
    "send() → queued/written",
    "queued → driver took it (tokio wake)",
    "taken → written",
    "written → client read",
)


def join_hops(path: Path, times: list[tuple[int, int]]) -> list[list[int | None]]:
    """Match the server's hop timestamps (one line per echo) to the client's round
    trips (same clock: CLOCK_MONOTONIC) and split each into ``HOPS``."""
    if not path.exists():
        return []
    out: list[list[int | None]] = []
    rows = [[int(x) for x in line.split()] for line in path.read_text().splitlines()]
    rows.sort()
    i = 0
    for t0, t1 in times:
        while i < len(rows) and rows[i][0] < t0:
            i += 1
        if i == len(rows) or rows[i][0] > t1:
            continue
        marks: list[int | None] = [t0, *[x or None for x in rows[i]], t1]
        if marks[6] is None:
            # Written inline by the loop thread: no driver hops, and the frame was
            # "queued" by writing it.
            marks[5] = marks[7]
            marks[7] = None
        hops: list[int | None] = []
        for k in range(len(HOPS)):
            a, b = marks[k], marks[k + 1]
            if a is None:
                # The stretch before was skipped: measure from the last mark reached.
                a = next((m for m in reversed(marks[: k + 1]) if m is not None), None)
            hops.append(None if a is None or b is None else b - a)
        out.append(hops)
    return out


def hop_table(results: dict[tuple[str, str], Series], servers: list[str]) -> str:
    lines = ["\n**hops** (idle runs, --hop-trace; median µs per stretch, share of the p50)\n"]
    traced = [s for s in servers if results.get((s, "idle")) and results[(s, "idle")].hops]
    if not traced:
        return ""
    lines.append("| stretch | " + " | ".join(traced) + " |")
    lines.append("|---|" + "---:|" * len(traced))
    for k, name in enumerate(HOPS):
        cells = []
        for server in traced:
            vals = sorted(h[k] for h in results[(server, "idle")].hops if h[k] is not None)
            cells.append(f"{vals[len(vals) // 2] / 1000:,.1f}" if vals else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for server in traced:
        s = results[(server, "idle")]
        cells.append(f"{len(s.hops):,} joined")
    lines.append("| round trips | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    if not sorted_ns:
        return float("nan")
    i = min(len(sorted_ns) - 1, max(0, int(q / 100 * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[i] / 1000


QUANTILES = (50.0, 90.0, 99.0, 99.9)


def table(results: dict[tuple[str, str], Series], servers: list[str], loads: list[str]) -> str:
    lines = []
    for load in loads:
        base = results.get((BASELINE, load))
        base_q = [percentile(sorted(base.samples), q) for q in QUANTILES] if base else None
        lines.append(f"\n**{load}** (µs; x: ratio to {BASELINE})\n")
        lines.append("| server | p50 | p90 | p99 | p99.9 | p50 range | samples |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for server in servers:
            s = results.get((server, load))
            if s is None or not s.samples:
                lines.append(f"| {server} | failed | | | | | |")
                continue
            ordered = sorted(s.samples)
            cells = []
            for i, q in enumerate(QUANTILES):
                v = percentile(ordered, q)
                cell = f"{v:,.0f}"
                if base_q and server != BASELINE:
                    cell += f" ({v / base_q[i]:.2f}x)"
                cells.append(cell)
            rng = f"{min(s.p50s):,.0f}-{max(s.p50s):,.0f}"
            lines.append(f"| {server} | {' | '.join(cells)} | {rng} | {len(ordered):,} |")
    return "\n".join(lines)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--servers", default=DEFAULT_SERVERS, help="comma-separated (see above)")
    p.add_argument("--samples", type=int, default=2000, help="round trips counted per run")
    p.add_argument("--warmup", type=int, default=200, help="round trips not counted per run")
    p.add_argument("--interval", type=float, default=1.0, help="ms between round trips")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs per server")
    p.add_argument("--loads", default="idle,loaded", help="idle, loaded or both")
    p.add_argument("--load-connections", type=int, default=4, help="background connections")
    p.add_argument("--load-rate", type=float, default=2000, help="background msgs/s in all")
    p.add_argument("--base", metavar="DIR", help="PYTHONPATH of the base- servers")
    p.add_argument(
        "--hop-trace",
        action="store_true",
        help="per-hop breakdown of lightws idle runs (a build with the hop-trace feature)",
    )
    args = p.parse_args(argv)
    global BASE_DIR
    if args.base:
        BASE_DIR = str(Path(args.base).resolve())
    servers = [s for s in args.servers.split(",") if s]
    loads = [x for x in args.loads.split(",") if x]
    if "loaded" in loads:
        from lightws._bench import loadgen_available

        if not loadgen_available():
            print("no load generator in this build: measuring idle only", file=sys.stderr)
            loads = [x for x in loads if x != "loaded"]
    results: dict[tuple[str, str], Series] = {}
    start_load = loadavg()
    for rep in range(args.repeat):
        for server in servers:
            for load in loads:
                series = results.setdefault((server, load), Series())
                trace = None
                times: list[tuple[int, int]] = []
                if args.hop_trace and load == "idle" and "lightws" in server:
                    fd, trace = tempfile.mkstemp(prefix="lightws-hops-")
                    os.close(fd)
                try:
                    with started(server, trace) as proc:
                        if load == "loaded":
                            with background(proc.url, args):
                                times = measure(proc.port, args)
                        else:
                            times = measure(proc.port, args)
                except Exception as e:  # reported; the other runs go on
                    print(f"{server} {load} run {rep + 1}: {e}", file=sys.stderr)
                    continue
                finally:
                    if trace:
                        series.hops += join_hops(Path(trace), times)
                        os.unlink(trace)
                ns = [t1 - t0 for t0, t1 in times]
                series.samples += ns
                series.p50s.append(percentile(sorted(ns), 50))
                print(
                    f"run {rep + 1}/{args.repeat} {server:>22} {load:>6}: "
                    f"p50 {series.p50s[-1]:7,.0f} µs",
                    file=sys.stderr,
                )
    print(
        f"Round trip of one 64 B binary message, one connection, {args.interval:g} ms "
        f"apart; {args.samples} samples x {args.repeat} interleaved runs per server; "
        f"load average {start_load} (start), {loadavg()} (end); {os.cpu_count()} CPUs."
    )
    print(table(results, servers, loads))
    if args.hop_trace:
        print(hop_table(results, servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
