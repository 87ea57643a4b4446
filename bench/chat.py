"""Chat-room (fan-out) benchmark: lightws ``publish`` side by side with its peers.

    python bench/chat.py                         # everything (about 6 minutes)
    python bench/chat.py --quick                 # rooms of 10 and 1,000, short runs
    python bench/chat.py --servers lightws,socketify --rooms 10000 --repeat 3
    nice -n -5 python bench/chat.py --nice -10 --json chat.json

Every server runs as its own process (``bench/chat_servers.py``): each connection joins
one room; every message from any client is relayed to the whole room, sender included,
each with the library's own best way (lightws ``server.publish``, websockets
``broadcast()``, socketify ``app.publish``, picows a loop over transports, aiohttp a loop
of ``send_bytes``). The clients are the Rust load generator in another process,
``python -m lightws bench --mode chat``: N subscribers (spread over 127.0.0.x source
addresses) and one publisher that keeps ``--window`` 64 B numbered messages in flight, a
message being done when every subscriber has it; every subscriber checks it got every
message once and in order.

Measured per server and room size (10, 1,000, 10,000 subscribers):

- deliveries/s at the subscribers and messages/s (publishes done);
- server CPU over the measured window (every thread's ``schedstat``, ns), per delivery;
- the event-loop thread's CPU per publish (the main thread, TID = PID) and, for
  lightws, the tokio I/O threads' (``lightws-io``) per publish;
- the load generator's own CPU, to show it is not the bottleneck;
- peak server RSS and anonymous memory.

Also:

- **never reading**: a room of N (the largest size) of which 10 % upgrade and never
  read; the healthy 90 %'s deliveries/s against the same room with everyone reading
  (fresh processes both), the server's extra memory per never-reading client, lightws's
  ``stats()`` (dropped, backpressure_closes) and what the never-reading clients got
  when they finally read (messages, close frames, connections ended). lightws runs it
  with ``on_backpressure="close"`` and, as ``lightws:drop``, with ``"drop"``. A run
  of a few seconds with 64 B messages sends each client a few KiB, which the kernel's
  socket buffers (autotuned up to 4 MiB on loopback) hold without the server noticing;
  so that the limit is reached at all, this scenario sends ``--stalled-size`` (1 KiB)
  messages, lightws and socketify get ``max_backpressure`` = ``--stalled-backpressure``
  (16 KiB), lightws also ``sock_write_buffer`` = ``--stalled-sndbuf`` (16 KiB;
  socketify has no such setting), and the never-reading clients a 4 KiB receive buffer;
- **memory per subscription** (lightws): N idle connections each subscribed to 0 and
  to K topics; the slope of the server's ``Anonymous:`` memory per subscription.

The load generator needs the ``loadgen`` cargo feature
(``maturin develop --release --features loadgen``). socketify needs Debian's
``libuv1`` (``apt-get install -y libuv1``; ``pip install socketify``); a server that
cannot start is reported and left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightws._bench import LOADGEN_MISSING, loadgen_available

HERE = Path(__file__).resolve().parent
PY = sys.executable
HOST = "127.0.0.1"
SAMPLE_EVERY = 0.05

ALL_SERVERS = [
    "lightws",
    "lightws+uvloop",
    "lightws-broadcast",
    "websockets",
    "websockets+uvloop",
    "socketify",
    "picows",
    "picows+uvloop",
    "aiohttp",
    "aiohttp+uvloop",
]
DEFAULT_SERVERS = ["lightws", "lightws+uvloop", "websockets", "socketify", "picows", "aiohttp"]


@dataclass
class Settings:
    rooms: list[int]
    duration: float
    warmup: float
    window: int
    size: int
    repeat: int
    threads: int
    stalled_fraction: float
    stalled_backpressure: int
    stalled_sndbuf: int
    stalled_size: int
    topics: int
    memory_connections: int
    nice: int
    scenarios: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def niced(n: int) -> Any:
    if n == 0:
        return None
    return lambda: os.nice(n)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


@dataclass
class Sample:
    t: float  # time.monotonic()
    main_ns: int  # the main (event-loop) thread
    io_ns: int  # lightws-io threads
    total_ns: int  # every thread
    rss_kib: int
    anon_kib: int
    wakeups: int  # the main thread's voluntary context switches (sleeps)


class ServerProcess:
    """One chat server process on a fresh port, sampled in the background."""

    def __init__(self, server: str, s: Settings, *extra: str) -> None:
        name, _, loop = server.partition("+")
        name, _, policy = name.partition(":")
        self.server = server
        self.port = free_port()
        self.url = f"ws://{HOST}:{self.port}/"
        cmd = [PY, str(HERE / "chat_servers.py"), name, "--port", str(self.port), *extra]
        if loop == "uvloop":
            cmd.append("--uvloop")
        if policy:
            cmd += ["--on-backpressure", policy]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=niced(s.nice),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"{server} did not start: {(line + err).strip()[-600:]}")
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{server} did not start listening")
            time.sleep(0.05)
        self.pid = self.proc.pid
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    def sample(self) -> Sample:
        main = io = total = 0
        task_dir = f"/proc/{self.pid}/task"
        for tid in os.listdir(task_dir):
            with contextlib.suppress(OSError):
                ns = int(read(f"{task_dir}/{tid}/schedstat").split()[0])
                total += ns
                if tid == str(self.pid):
                    main = ns
                elif read(f"{task_dir}/{tid}/comm").startswith("lightws-io"):
                    io += ns
        rss = anon = wakeups = 0
        for line in read(f"{task_dir}/{self.pid}/status").splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                wakeups = int(line.split()[1])
        for line in read(f"/proc/{self.pid}/status").splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        for line in read(f"/proc/{self.pid}/smaps_rollup").splitlines():
            if line.startswith("Anonymous:"):
                anon = int(line.split()[1])
        return Sample(time.monotonic(), main, io, total, rss, anon, wakeups)

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            with contextlib.suppress(OSError, ValueError):
                self.samples.append(self.sample())

    def at(self, t: float) -> Sample:
        """The counters at time ``t`` (linear interpolation between samples)."""
        before = [x for x in self.samples if x.t <= t]
        after = [x for x in self.samples if x.t >= t]
        if not before or not after:
            return (before or after)[-1 if before else 0]
        a, b = before[-1], after[0]
        if b.t == a.t:
            return a
        f = (t - a.t) / (b.t - a.t)

        def mix(x: int, y: int) -> int:
            return int(x + (y - x) * f)

        return Sample(
            t,
            mix(a.main_ns, b.main_ns),
            mix(a.io_ns, b.io_ns),
            mix(a.total_ns, b.total_ns),
            mix(a.rss_kib, b.rss_kib),
            mix(a.anon_kib, b.anon_kib),
            mix(a.wakeups, b.wakeups),
        )

    def peak(self, since: float) -> tuple[int, int]:
        """Peak (RSS, anonymous) KiB since ``since``."""
        xs = [x for x in self.samples if x.t >= since] or self.samples[-1:]
        return max(x.rss_kib for x in xs), max(x.anon_kib for x in xs)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def lightws_stats(self) -> dict[str, Any] | None:
        """lightws's ``stats()`` (it prints them on SIGUSR1); None for the others."""
        if not self.server.startswith("lightws") or self.proc.poll() is not None:
            return None
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        line = self.proc.stdout.readline()
        with contextlib.suppress(ValueError):
            stats: dict[str, Any] = json.loads(line)
            return stats
        return None

    def stop(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
            self._thread.join()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@contextlib.contextmanager
def started(server: str, s: Settings, *extra: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(server, s, *extra)
    try:
        yield proc
    finally:
        proc.stop()


def chat(
    url: str, s: Settings, subscribers: int, stalled: int = 0, size: int = 0
) -> dict[str, Any]:
    """One load generator run in chat mode; its JSON report."""
    cmd = [
        *(PY, "-m", "lightws", "bench", url, "--json", "-q", "--mode", "chat"),
        *("-c", str(subscribers), "--stalled", str(stalled), "-s", str(size or s.size)),
        *("--window", str(s.window), "-d", str(s.duration), "--warmup", str(s.warmup)),
        *("--threads", str(s.threads)),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, check=False, preexec_fn=niced(s.nice)
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip()[-600:]}")
    report: dict[str, Any] = json.loads(out.stdout)
    if report["failed"]:
        raise RuntimeError(f"{report['failed']} connections failed: {report['errors']}")
    return report


@dataclass
class Run:
    """One measured chat run and the server's figures over its window."""

    report: dict[str, Any]
    values: dict[str, float]


def measure_run(
    proc: ServerProcess, s: Settings, subscribers: int, stalled: int = 0, size: int = 0
) -> Run:
    t_start = time.monotonic()
    r = chat(proc.url, s, subscribers, stalled, size)
    time.sleep(2 * SAMPLE_EVERY)  # a sample after the window
    w0, w1 = r["window_start_ns"] / 1e9, r["window_end_ns"] / 1e9
    a, b = proc.at(w0), proc.at(w1)
    seconds = max(w1 - w0, 1e-9)
    msgs = max(r["messages"], 1)
    deliveries = max(r["deliveries"], 1)
    peak_rss, peak_anon = proc.peak(t_start)
    v = {
        "deliveries/s": r["deliveries_per_s"],
        "msgs/s": r["msgs_per_s"],
        "server CPU %": (b.total_ns - a.total_ns) / 1e9 / seconds * 100,
        "server CPU ns/delivery": (b.total_ns - a.total_ns) / deliveries,
        "loop CPU %": (b.main_ns - a.main_ns) / 1e9 / seconds * 100,
        "loop µs/publish": (b.main_ns - a.main_ns) / 1e3 / msgs,
        "loop wakeups/publish": (b.wakeups - a.wakeups) / msgs,
        "client CPU %": r["client_cpu_s"] / seconds * 100,
        "peak RSS MiB": peak_rss / 1024,
        "peak anon MiB": peak_anon / 1024,
        "complete %": r["check"]["complete"] / max(r["check"]["subscribers"], 1) * 100,
    }
    if proc.server.startswith("lightws"):
        # (A busy single-threaded server hardly ever sleeps: its epoll_wait finds work.)
        v["loop µs/wakeup"] = (b.main_ns - a.main_ns) / 1e3 / max(b.wakeups - a.wakeups, 1)
        v["io CPU %"] = (b.io_ns - a.io_ns) / 1e9 / seconds * 100
        v["io µs/publish"] = (b.io_ns - a.io_ns) / 1e3 / msgs
        v["io ns/delivery"] = (b.io_ns - a.io_ns) / deliveries
    return Run(r, v)


@dataclass
class Result:
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


def check_note(label: str, r: dict[str, Any]) -> str | None:
    c = r["check"]
    if c["complete"] == c["subscribers"] and not r["stalls"]:
        return None
    return (
        f"{label}: {c['complete']}/{c['subscribers']} subscribers got every message "
        f"(missing {c['missing']}, duplicated {c['duplicated']}, out of order "
        f"{c['out_of_order']}, lost connections {c['lost']}, messages given up {r['stalls']})"
    )


def run_rooms(server: str, s: Settings, res: Result) -> None:
    with started(server, s) as proc:
        for n in s.rooms:
            print(f"  {server}: room of {n:,}", file=sys.stderr, flush=True)
            runs = [measure_run(proc, s, n) for _ in range(s.repeat)]
            best = max(runs, key=lambda x: x.values["deliveries/s"])
            for k, v in best.values.items():
                res.values[f"{n} {k}"] = v
            res.raw[f"room {n}"] = [x.report for x in runs]
            rates = [x.values["deliveries/s"] for x in runs]
            if len(rates) > 1:
                spread = (max(rates) - min(rates)) / max(max(rates), 1) * 100
                res.values[f"{n} spread %"] = spread
            note = check_note(f"room of {n:,}", best.report)
            if note:
                res.notes.append(note)


def run_stalled(server: str, s: Settings, res: Result) -> None:
    n = max(s.rooms)
    stalled = round(n * s.stalled_fraction)
    healthy = n - stalled
    print(f"  {server}: {healthy:,} reading + {stalled:,} never reading", file=sys.stderr)
    limit: tuple[str, ...] = ("--max-backpressure", str(s.stalled_backpressure))
    if server.startswith("lightws") and s.stalled_sndbuf:
        limit += ("--sock-write-buffer", str(s.stalled_sndbuf))
    # The baseline: the same room, everyone reading (same connections, same limits).
    with started(server, s, *limit) as proc:
        base = measure_run(proc, s, n, 0, s.stalled_size)
    with started(server, s, *limit) as proc:
        t0 = time.monotonic()
        idle_anon = proc.sample().anon_kib
        run = measure_run(proc, s, healthy, stalled, s.stalled_size)
        stats = proc.lightws_stats()
        peak_rss, peak_anon = proc.peak(t0)
    r = run.report
    st = r["stalled_clients"]
    v = res.values
    v["stalled healthy deliveries/s"] = run.values["deliveries/s"]
    v["stalled base deliveries/s"] = base.values["deliveries/s"]
    v["stalled healthy vs base %"] = (
        run.values["deliveries/s"] / max(base.values["deliveries/s"], 1) * 100
    )
    v["stalled msgs/s"] = run.values["msgs/s"]
    v["stalled base msgs/s"] = base.values["msgs/s"]
    v["stalled peak anon MiB"] = peak_anon / 1024
    v["stalled base peak anon MiB"] = base.values["peak anon MiB"]
    v["stalled extra KiB/slow client"] = (peak_anon - base.values["peak anon MiB"] * 1024) / max(
        stalled, 1
    )
    v["stalled idle anon MiB"] = idle_anon / 1024
    v["stalled slow got msgs (min)"] = st["min_messages"]
    v["stalled slow got msgs (max)"] = st["max_messages"]
    v["stalled sent"] = r["sent"]
    if stats:
        v["stalled dropped"] = stats.get("dropped", 0)
        v["stalled backpressure_closes"] = stats.get("backpressure_closes", 0)
    codes = ", ".join(f"{k}: {c}" for k, c in st["close_codes"].items()) or "none"
    res.notes.append(
        f"never reading ({stalled:,} of {n:,}): they got {st['min_messages']:,}.."
        f"{st['max_messages']:,} of {r['sent']:,} messages; close frames {{{codes}}}, "
        f"{st['ended_without_close']} ended without a close frame, "
        f"{st['still_open']} still open; peak RSS {peak_rss / 1024:.0f} MiB"
        + (
            f"; stats: dropped {stats.get('dropped')}, "
            f"backpressure_closes {stats.get('backpressure_closes')}"
            if stats
            else ""
        )
    )
    note = check_note("never reading, healthy subscribers", r)
    if note:
        res.notes.append(note)
    res.raw["stalled"] = r
    res.raw["stalled base"] = base.report
    res.raw["stalled stats"] = stats


def hold_idle(url: str, count: int, s: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-m", "lightws", "bench", url, "--mode", "idle", "-q", "-c", str(count), "-d", "3600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=niced(s.nice),
    )


def held_anon(server: str, s: Settings, topics: int) -> tuple[int, int]:
    """(anonymous KiB, subscriptions) with ``memory_connections`` idle connections each
    subscribed to ``topics`` topics."""
    with started(server, s, "--topics", str(topics)) as proc:
        base = proc.fds()
        want = base + s.memory_connections
        holder = hold_idle(proc.url, s.memory_connections, s)
        try:
            deadline = time.monotonic() + 120
            last, steady = -1, time.monotonic()
            while True:
                if holder.poll() is not None:
                    err = holder.stderr.read().decode() if holder.stderr else ""
                    raise RuntimeError(f"idle load generator exited: {err.strip()}")
                n, now = proc.fds(), time.monotonic()
                if n != last:
                    last, steady = n, now
                if n >= want - 2 and now - steady >= 1.0:
                    break
                if now > deadline:
                    raise RuntimeError(f"only {n} of {want} descriptors after 120 s")
                time.sleep(0.2)
            time.sleep(2.0)  # every handler has subscribed and reached its recv()
            stats = proc.lightws_stats() or {}
            return proc.sample().anon_kib, int(stats.get("subscriptions", 0))
        finally:
            holder.send_signal(signal.SIGTERM)
            try:
                holder.wait(10)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
            if holder.stderr:
                holder.stderr.close()


def run_memory(server: str, s: Settings, res: Result) -> None:
    print(f"  {server}: memory per subscription", file=sys.stderr, flush=True)
    a0, n0 = held_anon(server, s, 0)
    a1, n1 = held_anon(server, s, s.topics)
    res.values["KiB/conn (no topic)"] = a0 / max(s.memory_connections, 1)
    res.values["B/subscription"] = (a1 - a0) * 1024 / max(n1 - n0, 1)
    res.notes.append(
        f"memory: {s.memory_connections:,} idle connections: anonymous {a0 / 1024:.1f} MiB "
        f"with no topic, {a1 / 1024:.1f} MiB with {s.topics} topics each "
        f"({n1:,} subscriptions by stats())"
    )


def measure(server: str, s: Settings) -> Result:
    res = Result()
    steps = []
    if "rooms" in s.scenarios and ":" not in server:
        steps.append(("rooms", run_rooms))
    if "stalled" in s.scenarios and "+" not in server:
        steps.append(("never reading", run_stalled))
    if "memory" in s.scenarios and server == "lightws":
        steps.append(("memory", run_memory))
    for name, fn in steps:
        try:
            fn(server, s, res)
        except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as e:
            print(f"  {server}: {name} failed: {e}", file=sys.stderr, flush=True)
            res.notes.append(f"{name} failed: {e}")
    return res


def rows(s: Settings) -> list[tuple[str, str, str, bool]]:
    """(label, key, format, ratio against lightws) of the table."""
    out: list[tuple[str, str, str, bool]] = []
    for n in s.rooms:
        out += [
            (f"room {n:,}: deliveries/s", f"{n} deliveries/s", "{:,.0f}", True),
            (f"room {n:,}: msgs/s", f"{n} msgs/s", "{:,.1f}", False),
            (f"room {n:,}: server CPU %", f"{n} server CPU %", "{:.0f}", False),
            (f"room {n:,}: server CPU ns/delivery", f"{n} server CPU ns/delivery", "{:,.0f}", True),
            (f"room {n:,}: loop-thread µs/publish", f"{n} loop µs/publish", "{:,.1f}", False),
            (
                f"room {n:,}: loop-thread wakeups/publish",
                f"{n} loop wakeups/publish",
                "{:,.2f}",
                False,
            ),
            (f"room {n:,}: loop-thread µs/wakeup", f"{n} loop µs/wakeup", "{:,.1f}", False),
            (f"room {n:,}: io-thread µs/publish", f"{n} io µs/publish", "{:,.1f}", False),
            (f"room {n:,}: io-thread ns/delivery", f"{n} io ns/delivery", "{:,.0f}", False),
            (f"room {n:,}: load generator CPU %", f"{n} client CPU %", "{:.0f}", False),
            (f"room {n:,}: peak RSS MiB", f"{n} peak RSS MiB", "{:,.0f}", False),
            (f"room {n:,}: subscribers complete %", f"{n} complete %", "{:.0f}", False),
            (f"room {n:,}: spread of deliveries/s %", f"{n} spread %", "{:.0f}", False),
        ]
    n = max(s.rooms)
    k = round(n * s.stalled_fraction)
    tag = f"{s.stalled_size} B: {n - k:,}+{k:,} never reading"
    alone = f"{s.stalled_size} B: {n:,} all reading"
    out += [
        (f"{tag}: healthy deliveries/s", "stalled healthy deliveries/s", "{:,.0f}", True),
        (f"{alone}: deliveries/s", "stalled base deliveries/s", "{:,.0f}", True),
        (f"{tag}: healthy vs all reading %", "stalled healthy vs base %", "{:.0f}", False),
        (f"{tag}: msgs/s", "stalled msgs/s", "{:,.1f}", False),
        (f"{alone}: msgs/s", "stalled base msgs/s", "{:,.1f}", False),
        (f"{tag}: peak anon MiB", "stalled peak anon MiB", "{:,.0f}", False),
        (f"{alone}: peak anon MiB", "stalled base peak anon MiB", "{:,.0f}", False),
        (f"{tag}: extra KiB per slow client", "stalled extra KiB/slow client", "{:,.0f}", False),
        (f"{tag}: slow client got (min msgs)", "stalled slow got msgs (min)", "{:,.0f}", False),
        (f"{tag}: slow client got (max msgs)", "stalled slow got msgs (max)", "{:,.0f}", False),
        (f"{tag}: messages sent", "stalled sent", "{:,.0f}", False),
        (f"{tag}: stats().dropped", "stalled dropped", "{:,.0f}", False),
        (f"{tag}: stats().backpressure_closes", "stalled backpressure_closes", "{:,.0f}", False),
        ("idle KiB/conn (no topic)", "KiB/conn (no topic)", "{:,.2f}", False),
        ("bytes per subscription", "B/subscription", "{:,.0f}", False),
    ]
    return out


def table(results: dict[str, Result], s: Settings, baseline: str = "lightws") -> str:
    """Markdown table; ``(Nx)`` after a peer's cell is lightws's value over the peer's
    (how many times better lightws is) for the rows where that applies."""
    servers = list(results)
    lines = [
        "| metric | " + " | ".join(servers) + " |",
        "|---|" + "---:|" * len(servers),
    ]
    for label, key, fmt, ratio in rows(s):
        if not any(key in r.values for r in results.values()):
            continue
        base = results.get(baseline, Result()).values.get(key)
        cells = []
        for server in servers:
            v = results[server].values.get(key)
            if v is None:
                cells.append("-")
                continue
            cell = fmt.format(v)
            if ratio and base and v and server != baseline:
                # How many times better lightws is: more deliveries, fewer ns each.
                better = v / base if "ns/" in key else base / v
                cell += f" ({better:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict[str, Result], s: Settings) -> list[str]:
    """The issue's targets, checked against this run."""
    out = []
    lw = results.get("lightws")
    if lw is None:
        return out
    n = max(s.rooms)
    d = lw.values.get(f"{n} deliveries/s")
    for peer, want in (("socketify", 1.2), ("websockets", 25.0)):
        p = results.get(peer)
        pv = p.values.get(f"{n} deliveries/s") if p else None
        if d and pv:
            ok = "met" if d / pv >= want else "NOT met"
            out.append(
                f"deliveries/s in the {n:,} room: lightws {d:,.0f} = {d / pv:.2f}x {peer} "
                f"({pv:,.0f}); target >= {want}x: {ok}"
            )
    lo, hi = lw.values.get(f"{min(s.rooms)} loop µs/publish"), lw.values.get(f"{n} loop µs/publish")
    if lo and hi:
        ok = "met" if hi <= 2 * lo else "NOT met"
        out.append(
            f"loop-thread CPU per publish: {hi:.1f} µs at {n:,} vs {lo:.1f} µs at "
            f"{min(s.rooms):,} = {hi / lo:.2f}x; target <= 2x: {ok}"
        )
    h = lw.values.get("stalled healthy vs base %")
    if h is not None:
        ok = "met" if h > 80 else "NOT met"
        out.append(
            f"with 10 % never reading, healthy deliveries/s at {h:.0f} % of the same "
            f"subscribers alone; target drop < 20 %: {ok}"
        )
        extra = lw.values.get("stalled extra KiB/slow client", 0.0)
        bound = s.stalled_backpressure / 1024
        ok = "met" if extra <= bound else "NOT met"
        out.append(
            f"server memory per never-reading client: {extra:,.1f} KiB over the same "
            f"room without them; bound max_backpressure = {bound:,.0f} KiB: {ok}"
        )
    return out


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
    for pkg in ["lightws", "websockets", "socketify", "picows", "aiohttp", "uvloop"]:
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
        default=",".join(DEFAULT_SERVERS),
        help="comma-separated subset of: " + ", ".join(ALL_SERVERS) + " (default %(default)s)",
    )
    p.add_argument("--rooms", default="10,1000,10000", help="room sizes (default %(default)s)")
    p.add_argument(
        "--scenarios",
        default="rooms,stalled,memory",
        help="comma-separated subset of rooms, stalled, memory (default %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="rooms 10 and 1,000, 1.5 s runs")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--window", type=int, default=8, help="messages in flight (default 8)")
    p.add_argument("--size", type=int, default=64, help="message bytes (default 64)")
    p.add_argument("--repeat", type=int, default=1, help="runs per room size, best kept")
    p.add_argument("--threads", type=int, default=2, help="load generator threads (default 2)")
    p.add_argument(
        "--stalled-fraction", type=float, default=0.1, help="never-reading share (default 0.1)"
    )
    p.add_argument(
        "--stalled-backpressure",
        type=int,
        default=16384,
        help="never reading: max_backpressure of lightws and socketify (default %(default)s)",
    )
    p.add_argument(
        "--stalled-sndbuf",
        type=int,
        default=16384,
        help="never reading: lightws's sock_write_buffer (SO_SNDBUF; 0: the kernel's "
        "autotuning, up to 4 MiB) (default %(default)s)",
    )
    p.add_argument(
        "--stalled-size", type=int, default=1024, help="never reading: message bytes (1024)"
    )
    p.add_argument("--topics", type=int, default=10, help="memory: topics per connection")
    p.add_argument("--memory-connections", type=int, default=5000, help="memory: idle connections")
    p.add_argument(
        "--nice", type=int, default=0, help="nice increment for servers and load generator"
    )
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = p.parse_args(argv)
    if not loadgen_available():
        print(LOADGEN_MISSING, file=sys.stderr)
        return 2
    servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    for srv in servers:
        base = srv.split(":")[0]
        if base not in ALL_SERVERS:
            p.error(f"unknown server {srv!r} (known: {', '.join(ALL_SERVERS)})")
    if "lightws" in servers and "stalled" in args.scenarios and "lightws:drop" not in servers:
        servers.insert(servers.index("lightws") + 1, "lightws:drop")
    rooms = [int(x) for x in args.rooms.split(",") if x.strip()]
    if args.quick and args.rooms == "10,1000,10000":
        rooms = [10, 1000]
    s = Settings(
        rooms=rooms,
        duration=args.duration or (1.5 if args.quick else 3.0),
        warmup=0.5 if args.quick else args.warmup,
        window=args.window,
        size=args.size,
        repeat=args.repeat,
        threads=args.threads,
        stalled_fraction=args.stalled_fraction,
        stalled_backpressure=args.stalled_backpressure,
        stalled_sndbuf=args.stalled_sndbuf,
        stalled_size=args.stalled_size,
        topics=args.topics,
        memory_connections=min(args.memory_connections, 1000)
        if args.quick
        else (args.memory_connections),
        nice=args.nice,
        scenarios=[x.strip() for x in args.scenarios.split(",")],
    )
    load1 = os.getloadavg()
    print(f"machine: {machine()}", file=sys.stderr)
    print(f"versions: {versions()}", file=sys.stderr)
    print(f"load average before: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}", file=sys.stderr)
    started_at = time.monotonic()
    results: dict[str, Result] = {}
    for server in servers:
        print(f"{server}:", file=sys.stderr, flush=True)
        results[server] = measure(server, s)
    print(table(results, s))
    notes = [f"{srv}: {n}" for srv, r in results.items() for n in r.notes]
    if notes:
        print()
        print("\n".join(f"- {n}" for n in notes))
    checks = targets(results, s)
    if checks:
        print()
        print("\n".join(f"- target: {c}" for c in checks))
    load2 = os.getloadavg()
    print(
        f"\nload average before/after: {load1[0]:.2f}/{load2[0]:.2f}; "
        f"{time.monotonic() - started_at:.0f} s",
        file=sys.stderr,
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "versions": versions(),
                    "load_average": [load1, load2],
                    "settings": s.__dict__,
                    "results": {
                        k: {"values": v.values, "notes": v.notes, "raw": v.raw}
                        for k, v in results.items()
                    },
                    "targets": checks,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
