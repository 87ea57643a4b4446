"""What an idle lightws connection costs, Python side, object by object.

    python bench/idle_breakdown.py                  # 1,000 -> 3,000 idle connections
    python bench/idle_breakdown.py --low 500 --high 2500 --handshake recv

Runs a lightws server in this process with the echo demo's handshake (the handler of
``python -m lightws echo``, waiting in ``async for msg in conn``) or, with
``--handshake recv``, a shared handler that only awaits ``conn.recv()``;
``listener``: one shared echo listener; ``accept``: ``lightws.Accept(topics=["news"])``. Idle
connections come from ``python -m lightws bench URL --mode idle`` in another process.
Between the low and the high count it reports, per added connection:

- the Python objects that appeared, by type: how many and their ``sys.getsizeof``
  (a coroutine's size includes its frame; a native ``Connection``'s includes the Rust
  struct it embeds);
- the bytes Python's allocator holds more (tracemalloc), by source line;
- the slope of ``Anonymous:`` in /proc/self/smaps_rollup (the whole process: Python,
  Rust, malloc), from a separate pass without tracemalloc, whose own bookkeeping would
  count.

BENCHMARKS.md ("Memory per idle connection, component by component") has the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import lightws
from lightws.demos.echo import echo_handshake

HOST = "127.0.0.1"


def anonymous_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise RuntimeError("no Anonymous: line")


def types() -> dict[str, tuple[int, int]]:
    """(count, total getsizeof) of every gc-tracked object, by type name."""
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for o in gc.get_objects():
        t = out[type(o).__qualname__]
        t[0] += 1
        t[1] += sys.getsizeof(o)
    return {k: (v[0], v[1]) for k, v in out.items()}


async def recv_handler(conn: lightws.Connection) -> None:
    try:
        await conn.recv()
    except lightws.ConnectionClosed:
        pass


def recv_handshake(request: lightws.Request, response: lightws.Response) -> Any:
    return recv_handler


class Echo(lightws.Listener):
    def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        conn.send_nowait(msg)


ECHO = Echo()
HANDSHAKES: dict[str, Any] = {
    "echo": echo_handshake,
    "recv": recv_handshake,
    "listener": lambda request, response: ECHO,
    "accept": lambda request, response: lightws.Accept(topics=["news"]),
}


async def hold(server: lightws.Server, url: str, n: int) -> subprocess.Popen[bytes]:
    want = server.stats().connections + n
    cmd = [sys.executable, "-m", "lightws", "bench", url, "--mode", "idle", "-q"]
    proc = subprocess.Popen([*cmd, "-c", str(n), "-d", "3600"], stdout=subprocess.DEVNULL)
    while server.stats().connections < want:
        await asyncio.sleep(0.1)
    # Every handler reaches its recv(); a listener connection's object is released
    # by the sweep (once a second) after a second without events.
    await asyncio.sleep(3.0)
    gc.collect()
    return proc


async def main(args: argparse.Namespace) -> None:
    handshake = HANDSHAKES[args.handshake]
    config = lightws.Config(addr=f"{HOST}:0", handshake=handshake, backlog=4096)
    if args.trace:
        tracemalloc.start(1)
    procs = []
    async with lightws.Server(config) as server:
        url = f"ws://{HOST}:{server.port}/"
        procs.append(await hold(server, url, args.low))
        t0, a0 = types(), anonymous_kib()
        s0 = tracemalloc.take_snapshot() if args.trace else None
        procs.append(await hold(server, url, args.high - args.low))
        t1, a1 = types(), anonymous_kib()
        s1 = tracemalloc.take_snapshot() if args.trace else None
        n = args.high - args.low
        if args.trace:
            assert s0 is not None and s1 is not None
            print(f"Python objects per connection ({args.handshake} handler):")
            for name in sorted(t1, key=lambda k: -(t1[k][1] - t0.get(k, (0, 0))[1])):
                c = (t1[name][0] - t0.get(name, (0, 0))[0]) / n
                b = (t1[name][1] - t0.get(name, (0, 0))[1]) / n
                if abs(c) >= 0.05:
                    print(f"  {name:<24} {c:5.2f} objects {b:7.1f} B (getsizeof)")
            print("tracemalloc bytes per connection, by line:")
            stats = s1.compare_to(s0, "lineno")
            total = sum(s.size_diff for s in stats) / n
            for s in stats[:12]:
                if abs(s.size_diff / n) >= 8:
                    per, blocks = s.size_diff / n, s.count_diff / n
                    print(f"  {per:7.1f} B {blocks:5.2f} blocks  {s.traceback}")
            print(f"  total {total:.1f} B per connection in Python's allocator")
        else:
            print(
                f"Anonymous: {(a1 - a0) / n * 1024:.0f} B per connection "
                f"({args.low:,} -> {args.high:,}, {args.handshake} handler)"
            )
        for p in procs:
            p.terminate()
            p.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--low", type=int, default=1000)
    p.add_argument("--high", type=int, default=3000)
    p.add_argument("--handshake", choices=sorted(HANDSHAKES), default="echo")
    p.add_argument("--no-trace", dest="trace", action="store_false", help="smaps slope only")
    asyncio.run(main(p.parse_args()))
