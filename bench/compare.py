"""Compare lightws with other Python WebSocket servers under the same loads.

    python bench/compare.py                      # everything (about 10 minutes)
    python bench/compare.py --quick              # short runs, smaller idle test
    python bench/compare.py --servers lightws,picows+uvloop,floor --loads 64B,idle

Every server runs as its own process with the same echo semantics (each message
echoed with its opcode, compression off): ``python -m lightws echo`` (lightws, a
coroutine handler per connection), ``python -m lightws echo --listener``
(lightws-listener, one shared listener object), ``bench/peers.py`` (websockets, picows,
aiohttp, socketify: socketify.py, uWebSockets under a Python API), and the floor, a
native single-threaded epoll echo server in the lightws extension
(``python -m lightws bench --floor-server``). ``lightws-accept``
(``bench/accept_server.py``: every handshake returns ``lightws.Accept(topics=[...])``,
no Python object per connection) does not echo: it is measured idle only. Python
servers run on the default asyncio loop and, as ``NAME+uvloop``, on uvloop (socketify
has its own loop). The load generator is
``python -m lightws bench`` in another process (the per-process file limit is
20,000, and it keeps client and server CPU apart).

The load generator and the floor are only in an extension built with the ``loadgen``
cargo feature: ``maturin develop --release --features loadgen`` (or
``MATURIN_PEP517_ARGS="--features loadgen" pip install -e '.[bench]'``); without it this
script says so and exits 2.

Measured per server:

- msgs/s and MB/s of a closed-loop echo (100 conns x 64 B, 100 x 1 KiB,
  10 x 64 KiB, 10 x 1 MiB);
- server CPU seconds per million messages (utime+stime of /proc/PID/stat over
  the measured run) and the CPU of the main (event-loop) thread alone per
  message (/proc/PID/task/PID/stat; the main thread's TID is the PID);
- latency p50/p99 at a fixed rate (open loop, from each message's scheduled
  send time);
- user-space KiB per idle connection: the slope of ``Anonymous:`` in
  /proc/PID/smaps_rollup between 1,000 and 10,000 idle connections whose handler
  awaits the next message.

Each row also gives the ratio to the baseline server (``--baseline``, lightws).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightws._bench import LOADGEN_MISSING, loadgen_available

HERE = Path(__file__).resolve().parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"

#: ``--base``: the directory holding the ``lightws`` package of ``base-`` servers.
BASE_DIR = ""

PYTHON_SERVERS = ["lightws", "lightws-listener", "websockets", "picows", "aiohttp"]
ALL_SERVERS = [
    *(name + suffix for name in PYTHON_SERVERS for suffix in ("", "+uvloop")),
    "lightws-accept",
    "socketify",
    "floor",
]
#: Servers that do not echo: only the idle load applies.
IDLE_ONLY = {"lightws-accept"}
# Not run by default: lightws+threads0 and lightws+uvloop+threads0 (Config(threads=0),
# connections on the event loop), and any lightws+threadsN.


@dataclass(frozen=True)
class EchoLoad:
    name: str
    connections: int
    size: int


ECHO_LOADS = [
    EchoLoad("64B", 100, 64),
    EchoLoad("1KiB", 100, 1024),
    EchoLoad("64KiB", 10, 64 * 1024),
    EchoLoad("1MiB", 10, 1024 * 1024),
]
ALL_LOADS = [*(load.name for load in ECHO_LOADS), "latency", "idle"]


@dataclass
class Settings:
    duration: float
    warmup: float
    rate: float
    rate_connections: int
    idle_low: int
    idle_high: int
    repeat: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def server_command(server: str, port: int) -> list[str]:
    name, *opts = server.split("+")
    uv = ["--uvloop"] if "uvloop" in opts else []
    if name == "lightws":
        # lightws+threadsN: Config.threads (lightws+threads0: on the event loop).
        threads = [o.removeprefix("threads") for o in opts if o.startswith("threads")]
        extra = ["--threads", threads[0]] if threads else []
        return [PY, "-m", "lightws", "echo", "--addr", f"{HOST}:{port}", *uv, *extra]
    if name == "lightws-listener":
        threads = [o.removeprefix("threads") for o in opts if o.startswith("threads")]
        extra = ["--threads", threads[0]] if threads else []
        return [PY, "-m", "lightws", "echo", "--listener", "--addr", f"{HOST}:{port}", *uv, *extra]
    if name == "lightws-accept":
        return [PY, str(HERE / "accept_server.py"), "--addr", f"{HOST}:{port}"]
    if name == "floor":
        return [PY, "-m", "lightws", "bench", "--floor-server", f"{HOST}:{port}"]
    return [PY, str(HERE / "peers.py"), name, "--port", str(port), *uv]


class ServerProcess:
    """One server process, listening on a fresh port."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.port = free_port()
        self.url = f"ws://{HOST}:{self.port}/"
        env = dict(os.environ)
        if server.startswith("base-"):
            # --base: another build's lightws package first on the server's path.
            env["PYTHONPATH"] = BASE_DIR
        self.proc = subprocess.Popen(
            server_command(server.removeprefix("base-"), self.port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
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
        self.pid = self.proc.pid

    def cpu(self) -> tuple[float, float]:
        """(process CPU seconds, main thread CPU seconds)."""
        return (
            proc_stat_cpu(f"/proc/{self.pid}/stat"),
            proc_stat_cpu(f"/proc/{self.pid}/task/{self.pid}/stat"),
        )

    def anonymous_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
        raise RuntimeError("no Anonymous: line in smaps_rollup")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

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


def proc_stat_cpu(path: str) -> float:
    text = Path(path).read_text()
    # Fields after the parenthesised command name; utime and stime are fields 14, 15.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextlib.contextmanager
def started(server: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(server)
    try:
        yield proc
    finally:
        proc.stop()


def bench(url: str, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run the load generator and return its JSON report."""
    cmd = [PY, "-m", "lightws", "bench", url, "--json", "-q", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench {' '.join(args)} failed: {out.stderr.strip()}")
    report: dict[str, Any] = json.loads(out.stdout)
    if report["failed"]:
        raise RuntimeError(f"bench {' '.join(args)}: {report['errors']}")
    return report


@dataclass
class Result:
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run_echo(proc: ServerProcess, load: EchoLoad, s: Settings, res: Result) -> None:
    common = ["-c", str(load.connections), "-s", str(load.size)]
    # Warm up in a run of its own, so the measured run's CPU is all load.
    bench(proc.url, *common, "-d", str(s.warmup), "--warmup", "0")
    best: dict[str, Any] | None = None
    best_cpu = (0.0, 0.0)
    rates = []
    for _ in range(s.repeat):
        c0 = proc.cpu()
        r = bench(proc.url, *common, "-d", str(s.duration), "--warmup", "0")
        c1 = proc.cpu()
        rates.append(r["msgs_per_s"])
        if best is None or r["msgs_per_s"] > best["msgs_per_s"]:
            best, best_cpu = r, (c1[0] - c0[0], c1[1] - c0[1])
    assert best is not None
    msgs = max(best["messages"], 1)
    res.values[f"{load.name} msgs/s"] = best["msgs_per_s"]
    res.values[f"{load.name} MB/s"] = best["mb_per_s"]
    res.values[f"{load.name} CPU s/M msgs"] = best_cpu[0] / msgs * 1e6
    res.values[f"{load.name} loop µs/msg"] = best_cpu[1] / msgs * 1e6
    if len(rates) > 1:
        spread = (max(rates) - min(rates)) / max(rates) * 100
        res.notes.append(f"{load.name}: best of {len(rates)}, spread {spread:.0f}%")


def run_latency(proc: ServerProcess, s: Settings, res: Result) -> None:
    r = bench(
        proc.url,
        "--mode",
        "rate",
        "-c",
        str(s.rate_connections),
        "-s",
        "64",
        "-r",
        str(s.rate),
        "-d",
        str(s.duration),
        "--warmup",
        str(s.warmup),
    )
    lat = r["latency"]
    res.values["latency p50 µs"] = lat["p50_us"]
    res.values["latency p99 µs"] = lat["p99_us"]
    if r["timeouts"]:
        res.notes.append(f"latency: {r['timeouts']} messages unanswered")


def hold_idle(url: str, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-m", "lightws", "bench", url, "--mode", "idle", "-q", "-c", str(count), "-d", "3600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_fds(proc: ServerProcess, want: int, holder: subprocess.Popen[bytes]) -> None:
    """Wait until the server holds about ``want`` descriptors and the count is steady.

    ``want`` is a baseline plus the connections asked for; the baseline can be off by
    a connection or two (the start-up probe's socket may still be open), hence the slack.
    """
    deadline = time.monotonic() + 120
    last, steady_since = -1, time.monotonic()
    while True:
        if holder.poll() is not None:
            err = holder.stderr.read().decode() if holder.stderr else ""
            raise RuntimeError(f"idle load generator exited: {err.strip()}")
        now = time.monotonic()
        n = proc.fds()
        if n != last:
            last, steady_since = n, now
        if n >= want - 2 and now - steady_since >= 1.0:
            break
        if now > deadline:
            raise RuntimeError(f"only {n} of {want} descriptors after 120 s")
        time.sleep(0.2)
    # Handlers start after the handshake; let every one reach its recv().
    time.sleep(2.0)


def run_idle(server: str, s: Settings, res: Result) -> None:
    with started(server) as proc:
        base = proc.fds()
        holders = []
        try:
            holders.append(hold_idle(proc.url, s.idle_low))
            wait_for_fds(proc, base + s.idle_low, holders[-1])
            low, low_fds = proc.anonymous_kib(), proc.fds()
            holders.append(hold_idle(proc.url, s.idle_high - s.idle_low))
            wait_for_fds(proc, base + s.idle_high, holders[-1])
            high, high_fds = proc.anonymous_kib(), proc.fds()
        finally:
            for h in holders:
                h.send_signal(signal.SIGTERM)
            for h in holders:
                try:
                    h.wait(10)
                except subprocess.TimeoutExpired:
                    h.kill()
                    h.wait()
                if h.stderr:
                    h.stderr.close()
    # One descriptor per connection: the descriptor counts say how many were added.
    res.values["idle KiB/conn"] = (high - low) / max(high_fds - low_fds, 1)


def measure(server: str, loads: list[str], s: Settings) -> Result:
    """Every load against ``server``; a load that fails is noted and the rest go on."""
    res = Result()

    def attempt(name: str, fn: Callable[[], None]) -> None:
        print(f"  {server}: {name}", file=sys.stderr, flush=True)
        try:
            fn()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            print(f"  {server}: {name} failed: {e}", file=sys.stderr, flush=True)
            res.notes.append(f"{name} failed: {e}")

    echo = [load for load in ECHO_LOADS if load.name in loads and server not in IDLE_ONLY]
    if echo or ("latency" in loads and server not in IDLE_ONLY):
        with started(server) as proc:
            for load in echo:
                attempt(f"echo {load.name}", functools.partial(run_echo, proc, load, s, res))
            if "latency" in loads:
                attempt("latency", lambda: run_latency(proc, s, res))
    if "idle" in loads:
        attempt("idle", lambda: run_idle(server, s, res))
    return res


# Row label, key, format, whether higher is better.
ROWS: list[tuple[str, str, str]] = [
    *(
        row
        for load in ECHO_LOADS
        for row in (
            (f"echo {load.connections}x{load.name} msgs/s", f"{load.name} msgs/s", "{:,.0f}"),
            (f"echo {load.connections}x{load.name} MB/s", f"{load.name} MB/s", "{:,.1f}"),
            (
                f"echo {load.connections}x{load.name} server CPU s / 1M msgs",
                f"{load.name} CPU s/M msgs",
                "{:,.2f}",
            ),
            (
                f"echo {load.connections}x{load.name} loop-thread CPU µs/msg",
                f"{load.name} loop µs/msg",
                "{:,.2f}",
            ),
        )
    ),
    ("latency p50 µs", "latency p50 µs", "{:,.0f}"),
    ("latency p99 µs", "latency p99 µs", "{:,.0f}"),
    ("idle KiB/conn", "idle KiB/conn", "{:,.2f}"),
]


def table(results: dict[str, Result], baseline: str, s: Settings) -> str:
    servers = list(results)
    head = "| metric | " + " | ".join(servers) + " |"
    lines = [head, "|---|" + "---:|" * len(servers)]
    for label, key, fmt in ROWS:
        if not any(key in r.values for r in results.values()):
            continue
        if key.startswith("latency"):
            label = f"{label} @ {s.rate:,.0f} msgs/s, {s.rate_connections} conns x 64 B"
        if key.startswith("idle"):
            label = f"{label} ({s.idle_low:,}→{s.idle_high:,})"
        base = results.get(baseline, Result()).values.get(key)
        cells = []
        for server in servers:
            v = results[server].values.get(key)
            if v is None:
                cells.append("-")
                continue
            cell = fmt.format(v)
            if base and server != baseline:
                cell += f" ({v / base:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ["lightws", "websockets", "picows", "aiohttp", "socketify", "uvloop"]:
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated subset of: " + ", ".join(ALL_SERVERS),
    )
    p.add_argument(
        "--loads",
        default=",".join(ALL_LOADS),
        help="comma-separated subset of: " + ", ".join(ALL_LOADS),
    )
    p.add_argument("--quick", action="store_true", help="1 s runs, idle 200→2,000")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 5)")
    p.add_argument(
        "--repeat", type=int, default=1, help="echo runs per load, best kept (default 1)"
    )
    p.add_argument("--rate", type=float, default=10000.0, help="latency load msgs/s")
    p.add_argument("--baseline", default="lightws", help="server the ratios refer to")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument(
        "--base",
        metavar="DIR",
        help="PYTHONPATH of base- servers (base-lightws: the lightws package copied in DIR)",
    )
    args = p.parse_args(argv)
    global BASE_DIR
    BASE_DIR = str(Path(args.base).resolve()) if args.base else ""
    if not loadgen_available():
        print(LOADGEN_MISSING, file=sys.stderr)
        return 2

    servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    for name, known in ((servers, ALL_SERVERS), (loads, ALL_LOADS)):
        # lightws also takes +threadsN (e.g. lightws+threads0, lightws+uvloop+threads0).
        unknown = [x for x in name if x.removeprefix("base-").split("+threads")[0] not in known]
        if unknown:
            p.error(f"unknown: {', '.join(unknown)} (known: {', '.join(known)})")
    settings = Settings(
        duration=args.duration or (1.0 if args.quick else 5.0),
        warmup=0.5 if args.quick else 1.0,
        rate=args.rate,
        rate_connections=100,
        idle_low=200 if args.quick else 1000,
        idle_high=2000 if args.quick else 10000,
        repeat=args.repeat,
    )
    load1 = os.getloadavg()[0]
    print(f"machine: {machine()}", file=sys.stderr)
    print(f"versions: {versions()}", file=sys.stderr)
    if load1 > 0.5:
        print(f"warning: load average {load1:.2f}; results may be disturbed", file=sys.stderr)

    results: dict[str, Result] = {}
    for server in servers:
        print(f"{server}:", file=sys.stderr, flush=True)
        try:
            results[server] = measure(server, loads, settings)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"  {server}: {e}", file=sys.stderr)
            results[server] = Result(notes=[f"failed: {e}"])
    print(table(results, args.baseline, settings))
    notes = [f"{srv}: {n}" for srv, r in results.items() for n in r.notes]
    if notes:
        print()
        print("\n".join(f"- {n}" for n in notes))
    load2 = os.getloadavg()[0]
    print(f"\nload average before/after: {load1:.2f}/{load2:.2f}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "versions": versions(),
                    "settings": settings.__dict__,
                    "results": {
                        k: {"values": v.values, "notes": v.notes} for k, v in results.items()
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
