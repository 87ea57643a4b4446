"""``python -m lightws bench URL``: the load generator's command line.

The load itself runs in Rust (``_lightws.run_bench``) on its own tokio runtime with the
GIL released; this module parses the arguments and prints the report.

The generator is test tooling, so it is only in extensions built with the ``loadgen``
cargo feature (off by default: the production extension ships no accept-any-certificate
verifier). Without it the subcommand prints :data:`LOADGEN_MISSING` and exits 2.

Modes::

    echo  closed loop: N connections, each keeps --pipeline messages in flight
    rate  open loop: --rate messages/s in total; latency from each message's
          scheduled send time (no coordinated omission), HDR histogram
    idle  open N connections, hold them --duration seconds, report how many stay open
    chat  fan-out: N subscribers (-c), --stalled never-reading clients and one publisher
          join one room (the server relays every message to the whole room); the
          publisher keeps --window numbered messages in flight, each done when every
          subscriber has it; reports deliveries/s, messages/s, and whether every
          subscriber got every message once and in order
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from . import _lightws

__all__ = [
    "LOADGEN_MISSING",
    "add_arguments",
    "format_report",
    "loadgen_available",
    "parse_size",
    "run",
]

#: What ``python -m lightws bench`` prints (one line, stderr) when the extension was
#: built without the load generator; bench/*.py print it too.
LOADGEN_MISSING = (
    "lightws bench: this lightws was built without the load generator (cargo feature "
    "'loadgen', off by default); rebuild it from a source checkout with "
    "`maturin develop --release --features loadgen` or "
    '`MATURIN_PEP517_ARGS="--features loadgen" pip install .`'
)

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20}
_UNITS["mb"] = 1000 * 1000


def parse_size(text: str) -> int:
    """``"64"``, ``"1k"``/``"1KiB"`` (1024), ``"1kb"`` (1000), ``"1m"``/``"1MiB"``."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64, 1KiB, 1MiB)")
    return int(m.group(1)) * _UNITS[unit]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` subcommand's arguments to ``p``."""
    p.add_argument("url", help="ws:// or wss:// URL of an echo server")
    p.add_argument(
        "--mode",
        choices=["echo", "rate", "idle", "chat"],
        default="echo",
        help="load shape (default %(default)s)",
    )
    p.add_argument(
        "-c", "--connections", type=int, default=100, help="connections (default %(default)s)"
    )
    p.add_argument(
        "-s",
        "--size",
        type=parse_size,
        default=64,
        help="message payload size, e.g. 64, 1KiB, 1MiB (default %(default)s)",
    )
    p.add_argument(
        "-p",
        "--pipeline",
        type=int,
        default=1,
        help="echo mode: messages in flight per connection (default %(default)s)",
    )
    p.add_argument(
        "-d",
        "--duration",
        type=float,
        default=5.0,
        help="seconds measured; idle mode: seconds held (default %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of load before measuring (default %(default)s)",
    )
    p.add_argument(
        "-r",
        "--rate",
        type=float,
        default=10000.0,
        help="rate mode: messages/s over all connections (default %(default)s)",
    )
    p.add_argument(
        "--sources",
        type=int,
        default=0,
        help="spread connections over 127.0.0.1..N as source addresses "
        "(default on loopback: idle mode one per 16,000 connections, chat mode one per 8,000)",
    )
    p.add_argument(
        "-w",
        "--window",
        type=int,
        default=8,
        help="chat mode: the publisher's messages in flight (default %(default)s)",
    )
    p.add_argument(
        "--stalled",
        type=int,
        default=0,
        help="chat mode: extra clients that join the room and never read (default %(default)s)",
    )
    p.add_argument("--text", action="store_true", help="send TEXT (ASCII) instead of BINARY")
    p.add_argument("--insecure", action="store_true", help="wss://: skip certificate verification")
    p.add_argument("--cafile", help="wss://: PEM file of trusted CA certificates")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="load generator threads (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")
    # Hidden: bench/compare.py's floor server (a native epoll echo server); URL is host:port.
    p.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)


def loadgen_available() -> bool:
    """True if the extension was built with the load generator (``--features loadgen``)."""
    return hasattr(_lightws, "run_bench")


def _us(v: float) -> str:
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [
        f"{r['mode']} {r['url']}: {r['opened']}/{r['connections']} connections opened"
        + (f", {r['failed']} failed" if r["failed"] else "")
    ]
    if r["mode"] == "echo":
        lines.append(
            f"  {r['size']} B messages: {r['msgs_per_s']:,.0f} msgs/s, "
            f"{r['mb_per_s']:,.1f} MB/s ({r['messages']:,} echoes in {r['seconds']:.1f} s)"
        )
    elif r["mode"] == "rate":
        lat = r["latency"]
        lines.append(
            f"  target {r['target_rate']:,.0f} msgs/s, got {r['msgs_per_s']:,.0f} msgs/s, "
            f"{r['timeouts']} unanswered"
        )
        lines.append(
            "  latency p50 {} p90 {} p99 {} p99.9 {} max {} ({:,} samples)".format(
                _us(lat["p50_us"]),
                _us(lat["p90_us"]),
                _us(lat["p99_us"]),
                _us(lat["p99_9_us"]),
                _us(lat["max_us"]),
                lat["count"],
            )
        )
    elif r["mode"] == "chat":
        lines.extend(_chat_lines(r))
    else:
        lines.append(f"  {r['open_at_end']} open after {r['seconds']:.1f} s")
    lines.extend(f"  error: {e}" for e in r["errors"])
    return "\n".join(lines)


def _chat_lines(r: dict[str, Any]) -> list[str]:
    c, st = r["check"], r["stalled_clients"]
    lines = [
        f"  {r['subscribers']:,} subscribers"
        + (f" + {r['stalled']:,} never reading" if r["stalled"] else "")
        + f", window {r['window']}, {r['size']} B messages",
        f"  {r['deliveries_per_s']:,.0f} deliveries/s, {r['msgs_per_s']:,.1f} msgs/s "
        f"({r['deliveries']:,} deliveries in {r['seconds']:.1f} s); "
        f"load generator CPU {r['client_cpu_s'] / max(r['seconds'], 1e-9) * 100:.0f}%",
        f"  check: {c['complete']:,}/{c['subscribers']:,} subscribers got all "
        f"{r['sent']:,} messages once and in order; missing {c['missing']:,}, "
        f"duplicated {c['duplicated']:,}, out of order {c['out_of_order']:,}"
        + (f", {c['lost']} connections lost" if c["lost"] else "")
        + (f", {r['stalls']} messages given up" if r["stalls"] else ""),
    ]
    if st["opened"]:
        closes = ", ".join(f"{n} closed with {code}" for code, n in st["close_codes"].items())
        lines.append(
            f"  never-reading clients: {st['messages']:,} messages in all "
            f"({st['min_messages']:,}..{st['max_messages']:,} each); "
            + ", ".join(
                x
                for x in (
                    closes,
                    f"{st['ended_without_close']} ended without a close frame"
                    if st["ended_without_close"]
                    else "",
                    f"{st['still_open']} still open" if st["still_open"] else "",
                )
                if x
            )
        )
    return lines


def run(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand; returns the exit status (2: no load generator)."""
    if not loadgen_available():
        print(LOADGEN_MISSING, file=sys.stderr)
        return 2
    try:
        if args.floor_server:
            _lightws.run_bench("floor-server", args.url, progress=True)
            return 0
        report = _lightws.run_bench(
            args.mode,
            args.url,
            connections=args.connections,
            size=args.size,
            pipeline=args.window if args.mode == "chat" else args.pipeline,
            duration=args.duration,
            warmup=args.warmup,
            rate=args.rate,
            sources=args.sources,
            insecure=args.insecure,
            cafile=args.cafile,
            text=args.text,
            progress=not args.quiet,
            threads=args.threads,
            stalled=args.stalled,
        )
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as e:
        print(f"lightws bench: {e}", file=sys.stderr)
        return 1
    assert report is not None
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print(format_report(report), flush=True)
    return 0 if report["opened"] else 1
