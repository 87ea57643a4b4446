"""Cross-process fan-out through the Redis backplane, against the same room on one
process.

    python bench/scaleout.py [--subscribers 1000] [--burst 300] [--rate 20] [--seconds 5]

Starts a ``redis-server`` (Debian's package) on a free loopback port, then for each
setup runs ``python -m lightws serve scaleout:handshake`` (this file is the
application) and a room of ``--subscribers`` clients:

- **1 process**: ``--workers 1``, no backplane: every subscriber is local.
- **2 workers + Redis**: ``--workers 2 --pubsub redis://...``: the kernel spreads the
  subscribers over both workers (SO_REUSEPORT); a publish on one worker reaches the
  other's subscribers through Redis. Each subscriber knows its worker from the hello,
  so its deliveries count as *local* (same worker as the publisher) or *remote*.

Measured:

- **throughput**: the publisher's worker publishes ``--burst`` messages as fast as it
  can; deliveries per second = burst x subscribers / time until the last one arrived.
- **latency**: ``--rate`` messages per second for ``--seconds``; each carries the
  CLOCK_MONOTONIC time at which ``server.publish`` was called (one clock for every
  process on the machine), and each delivery's latency is its receipt time minus that:
  p50/p99 for local and for remote subscribers. ``--probes`` of the room's subscribers
  (20) measure it from a process of their own: in the big client a delivery's latency
  would mostly be its place in the walk over 1,000 sockets (about 10 us each).
- **kill -9**: four clients connect in a loop (connect, hello, close) while one of the
  two workers is killed and restarted; refused connections are counted.

The clients are Python (uvloop if installed, a minimal frame parser): on a 2-CPU
machine they share the CPUs with the workers and Redis, and at high delivery rates the
big client is the bottleneck, for both setups alike; latency tails (p99) move by
tens of milliseconds from run to run with the CPU contention.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PAD = "x" * 64


# -- the application (run by `python -m lightws serve scaleout:handshake`) -----------------


def handshake(request: Any, response: Any) -> Any:
    import lightws

    sub = request.query.get("sub") == "1"

    async def handler(conn: lightws.Connection) -> None:
        if sub:
            conn.subscribe("room")
        await conn.send(f"hello {os.getpid()}")
        publish = conn.server.publish
        try:
            async for msg in conn:
                cmd, _, arg = msg.text.partition(" ")
                if cmd == "pub":
                    publish("room", f"{time.monotonic_ns()} {arg} {PAD}")
                elif cmd == "burst":
                    for i in range(int(arg)):
                        publish("room", f"{time.monotonic_ns()} {i} {PAD}")
                        if i % 256 == 255:
                            await asyncio.sleep(0)
        except lightws.ConnectionClosed:
            pass

    return handler


# -- a minimal client --------------------------------------------------------------------


class Client(asyncio.Protocol):
    """One WebSocket client: the hello gives its worker's pid; then it counts
    deliveries and, while ``bench.record`` is set, records their latency."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.buf = bytearray()
        self.upgraded = False
        self.pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.local = True
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET /?sub={self.bench.sub} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.pid.done():
            self.pid.set_exception(exc or ConnectionError("closed"))

    def send(self, text: str) -> None:
        data = text.encode()
        assert len(data) < 126 and self.transport is not None
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.transport.write(bytes([0x81, 0x80 | len(data)]) + mask + masked)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(bytes(buf[:end]).decode(errors="replace"))
            del buf[: end + 4]
            self.upgraded = True
        now = time.monotonic_ns()
        i, n = 0, len(buf)
        bench = self.bench
        while n - i >= 2:
            ln = buf[i + 1] & 0x7F
            h = 2
            if ln == 126:
                if n - i < 4:
                    break
                ln = int.from_bytes(buf[i + 2 : i + 4], "big")
                h = 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln = int.from_bytes(buf[i + 2 : i + 10], "big")
                h = 10
            if n - i < h + ln:
                break
            if not self.pid.done():
                self.pid.set_result(int(bytes(buf[i + h + 6 : i + h + ln])))
            else:
                self.received += 1
                bench.received += 1
                if bench.record:
                    space = buf.index(b" ", i + h)
                    if buf[space + 1] == 76:  # b"L": a latency message
                        latency = now - int(buf[i + h : space])
                        bench.samples.setdefault(self.pid.result(), []).append(latency)
            i += h + ln
        del buf[:i]


class Bench:
    def __init__(self) -> None:
        self.sub = 1
        self.received = 0
        self.record = False
        #: Latency samples (ns) by the worker pid of the subscriber that got them.
        self.samples: dict[int, list[int]] = {}


async def connect(port: int, bench: Bench) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: Client(bench), "127.0.0.1", port)
    await asyncio.wait_for(client.pid, 10)
    return client


async def wait_until(predicate: Any, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.005)
    return True


# -- processes ----------------------------------------------------------------------------


class Serve:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace"))

    def ready(self) -> dict[int, int]:
        pids = {}
        for line in self.lines:
            if m := re.search(r"worker (\d+) ready \(pid (\d+)\)", line):
                pids[int(m[1])] = int(m[2])
        return pids

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def serve(port: int, workers: int, pubsub: str | None) -> Serve:
    args = [sys.executable, "-m", "lightws", "serve", "scaleout:handshake"]
    args += ["--addr", f"127.0.0.1:{port}", "--workers", str(workers)]
    if pubsub:
        args += ["--pubsub", pubsub]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=HERE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    s = Serve(proc)
    if not await wait_until(lambda: len(s.ready()) == workers, 30):
        raise RuntimeError("".join(s.lines))
    return s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] / 1e6


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


# -- the runs -----------------------------------------------------------------------------


async def probe(port: int, count: int, messages: int) -> None:
    """``--probe``: ``count`` subscribers in a process of their own, so that their
    latency is not the time the big client takes to walk 1,000 sockets; prints the
    latency samples by worker pid as JSON once each has ``messages`` of them."""
    bench = Bench()
    bench.record = True
    subs = [await connect(port, bench) for _ in range(count)]
    print("ready", flush=True)
    await wait_until(lambda: sum(map(len, bench.samples.values())) >= messages * count, 60)
    per_client = {pid: sum(c.pid.result() == pid for c in subs) for pid in bench.samples}
    print(json.dumps({"samples": bench.samples, "clients": per_client}), flush=True)
    for c in subs:
        assert c.transport is not None
        c.transport.close()


async def room(port: int, args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench()
    subs = []
    for _ in range(args.subscribers - args.probes):
        subs.append(await connect(port, bench))
    n = int(args.rate * args.seconds)
    prober = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--probe",
        str(port),
        "--probes",
        str(args.probes),
        "--rate",
        str(args.rate),
        "--seconds",
        str(args.seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    assert prober.stdout is not None
    assert (await asyncio.wait_for(prober.stdout.readline(), 60)).strip() == b"ready"
    bench.sub = 0
    publisher = await connect(port, bench)
    pub_pid = await publisher.pid
    local = sum(c.pid.result() == pub_pid for c in subs)
    # Warm up (and make sure both workers are subscribed in Redis).
    expected = len(subs)
    publisher.send("pub 0")
    ok = await wait_until(lambda: bench.received >= expected, 10)
    assert ok, "warm-up message not delivered to every subscriber"

    # Throughput.
    bench.received = 0
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    publisher.send(f"burst {args.burst}")
    total = args.burst * len(subs)
    done = await wait_until(lambda: bench.received >= total, 120)
    elapsed = time.perf_counter() - wall0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
    throughput = bench.received / elapsed
    missing = total - bench.received

    # Latency at a fixed rate (measured by the probe process).
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        await asyncio.sleep(max(0.0, start + i / args.rate - loop.time()))
        publisher.send(f"pub L{i}")
    line = await asyncio.wait_for(prober.stdout.readline(), 90)
    await prober.wait()
    report = json.loads(line)
    samples = {int(pid): v for pid, v in report["samples"].items()}
    clients = {int(pid): c for pid, c in report["clients"].items()}
    local_samples = samples.get(pub_pid, [])
    remote_samples = [x for pid, v in samples.items() if pid != pub_pid for x in v]
    for c in [*subs, publisher]:
        assert c.transport is not None
        c.transport.close()
    return {
        "local": local + clients.get(pub_pid, 0),
        "remote": len(subs) - local + sum(c for p, c in clients.items() if p != pub_pid),
        "throughput": throughput,
        "complete": done,
        "missing": missing,
        "elapsed": elapsed,
        "client_cpu": client_cpu,
        "local_p50": pct(local_samples, 0.50),
        "local_p99": pct(local_samples, 0.99),
        "remote_p50": pct(remote_samples, 0.50),
        "remote_p99": pct(remote_samples, 0.99),
        "samples": (len(local_samples), len(remote_samples)),
        "probes": clients,
    }


async def kill_one_worker(port: int, server: Serve) -> dict[str, int]:
    refused = lost = served = 0
    stop = asyncio.Event()
    bench = Bench()
    bench.sub = 0

    async def loop_clients() -> None:
        nonlocal refused, lost, served
        while not stop.is_set():
            try:
                c = await connect(port, bench)
                served += 1
                assert c.transport is not None
                c.transport.close()
            except ConnectionRefusedError:
                refused += 1
            except (OSError, asyncio.TimeoutError):
                lost += 1

    clients = [asyncio.ensure_future(loop_clients()) for _ in range(4)]
    await asyncio.sleep(0.5)
    victim = server.ready()[0]
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: server.ready().get(0, victim) != victim, 30)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)
    return {"served": served, "refused": refused, "lost": lost}


def raise_fd_limit() -> None:
    """Every subscriber is a descriptor here and in a worker (inherited limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("bench/scaleout.py needs redis-server (apt-get install redis-server)")
    rport = free_port()
    redis = await asyncio.create_subprocess_exec(
        redis_server,
        *("--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{rport}"
    results = {}
    kill: dict[str, int] = {}
    try:
        await asyncio.sleep(0.3)
        for name, workers, pubsub in (
            ("1 process", 1, None),
            ("2 workers + Redis", 2, url),
        ):
            port = free_port()
            server = await serve(port, workers, pubsub)
            try:
                cpu0 = children_cpu()
                results[name] = await room(port, args)
                if workers == 2:
                    kill = await kill_one_worker(port, server)
            finally:
                await server.stop()
            results[name]["server_cpu"] = children_cpu() - cpu0
    finally:
        redis.kill()
        await redis.wait()
    print(
        f"\n{args.subscribers} subscribers, burst {args.burst} messages "
        f"({len(PAD) + 20}-byte text), latency at {args.rate}/s for {args.seconds} s\n"
    )
    print(
        "| setup | subscribers local/remote | deliveries/s | local p50 / p99 ms "
        "| remote p50 / p99 ms |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        remote = f"{r['remote_p50']:.2f} / {r['remote_p99']:.2f}" if r["remote"] else "-"
        print(
            f"| {name} | {r['local']}/{r['remote']} | {r['throughput']:,.0f}"
            f"{'' if r['complete'] else ' (incomplete: ' + str(r['missing']) + ' missing)'} "
            f"| {r['local_p50']:.2f} / {r['local_p99']:.2f} | {remote} |"
        )
    one, two = results["1 process"], results["2 workers + Redis"]
    print(f"\ncross-process / single throughput: {two['throughput'] / one['throughput']:.2f}")
    if two["remote"]:
        print(f"remote p99 - local p99: {two['remote_p99'] - two['local_p99']:+.2f} ms")
    for name, r in results.items():
        print(
            f"{name}: latency samples local/remote {r['samples']}, probes per worker {r['probes']}"
        )
        print(
            f"{name}: burst took {r['elapsed']:.2f} s; server processes' CPU over the "
            f"whole run {r['server_cpu']:.2f} s"
        )
    print(
        f"kill -9 of one of 2 workers: {kill.get('served', 0)} connections served, "
        f"{kill.get('refused', 0)} refused, {kill.get('lost', 0)} lost with the worker"
    )


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--burst", type=int, default=300, help="messages in the throughput burst")
    p.add_argument("--rate", type=float, default=20, help="messages/s in the latency run")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument(
        "--probes", type=int, default=20, help="subscribers (of the room) that measure latency"
    )
    p.add_argument("--probe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    n = int(args.rate * args.seconds)
    job = probe(args.probe, args.probes, n) if args.probe else main(args)
    try:
        import uvloop
    except ImportError:
        asyncio.run(job)
    else:
        uvloop.run(job)


if __name__ == "__main__":
    cli()
