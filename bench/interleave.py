"""Interleaved A/B echo runs: two or more builds of lightws (and peers) in one run.

Each round starts every server afresh, warms it up for 1 s, then measures one echo
load with ``python -m lightws bench`` (server CPU from /proc/PID/stat, loop-thread CPU
from /proc/PID/task/PID/stat); the table gives per-server medians over the rounds. On a
shared machine, rounds interleave the servers so that load from other processes hits
them alike, which one compare.py run per build cannot do.

    python bench/interleave.py --rounds 5 --loads 64B,64KiB \\
        before=/path/to/other/checkout/.venv/bin/python after=.venv/bin/python \\
        picows+uvloop=picows floor=floor

A server is NAME=PYTHON (``PYTHON -m lightws echo``: the lightws that interpreter
imports), NAME=picows (bench/peers.py on uvloop) or NAME=floor (the native epoll echo
server). The load generator is this interpreter's ``python -m lightws bench`` (an
extension built with the ``loadgen`` feature).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
LOADS = {"64B": (100, 64), "1KiB": (100, 1024), "64KiB": (10, 64 * 1024), "1MiB": (10, 1 << 20)}


def cpu_seconds(path: str) -> float:
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def start(spec: str, port: int) -> subprocess.Popen[bytes]:
    if spec == "picows":
        argv = [sys.executable, str(HERE / "peers.py"), "picows", "--port", str(port), "--uvloop"]
    elif spec == "floor":
        argv = [sys.executable, "-m", "lightws", "bench", "--floor-server", f"{HOST}:{port}"]
    else:
        argv = [spec, "-m", "lightws", "echo", "--addr", f"{HOST}:{port}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{spec} did not start listening")


def bench(port: int, conns: int, size: int, duration: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lightws", "bench", f"ws://{HOST}:{port}/", "-c", str(conns)]
    cmd += ["-s", str(size), "-d", str(duration), "--warmup", "0", "--json", "-q"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loads", default="64B,64KiB", help=f"comma-separated: {','.join(LOADS)}")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("servers", nargs="+", help="NAME=PYTHON, NAME=picows or NAME=floor")
    args = parser.parse_args()
    servers = [s.split("=", 1) for s in args.servers]
    loads = args.loads.split(",")
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for _ in range(args.rounds):
        for load in loads:
            conns, size = LOADS[load]
            for name, spec in servers:
                port = free_port()
                proc = start(spec, port)
                try:
                    bench(port, conns, size, 1.0)
                    stat, task = f"/proc/{proc.pid}/stat", f"/proc/{proc.pid}/task/{proc.pid}/stat"
                    c0, t0 = cpu_seconds(stat), cpu_seconds(task)
                    r = bench(port, conns, size, args.duration)
                    c1, t1 = cpu_seconds(stat), cpu_seconds(task)
                finally:
                    proc.terminate()
                    proc.wait()
                msgs = max(int(r["messages"]), 1)
                runs.setdefault((load, name), []).append(
                    (float(r["msgs_per_s"]), (c1 - c0) / msgs * 1e6, (t1 - t0) / msgs * 1e6)
                )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| load | server | msgs/s | MB/s | server CPU µs/msg | loop-thread µs/msg | each round |")
    print("|---|---|---:|---:|---:|---:|---|")
    for load in loads:
        for name, _ in servers:
            v = runs[(load, name)]
            rate = statistics.median(x[0] for x in v)
            each = ", ".join(f"{x[0] / 1000:.1f}k" for x in v)
            print(
                f"| {load} | {name} | {rate:,.0f} | {rate * LOADS[load][1] / 1e6:,.1f} | "
                f"{statistics.median(x[1] for x in v):.2f} | "
                f"{statistics.median(x[2] for x in v):.2f} | {each} |"
            )


if __name__ == "__main__":
    main()
