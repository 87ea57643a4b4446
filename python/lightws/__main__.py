"""Command line: the seed's demos, each with a browser page on the same port.

    python -m lightws echo      --addr 127.0.0.1:9001   # ?reverse=1 reverses
    python -m lightws echo      --listener              # the same echo through a listener
    python -m lightws countdown --addr 127.0.0.1:9001   # send N: "N...", ..., "boom!"
    python -m lightws push      --addr 127.0.0.1:9001 --put-addr 127.0.0.1:9002
    python -m lightws chat      --addr 127.0.0.1:9001   # rooms: ?room=lobby&name=alice
    python -m lightws serve myapp:handshake --addr :9001 --workers 4 [--pubsub redis://...]

``serve`` runs your own application (a handshake callable or a lightws.Config) in N
worker processes sharing the port; see docs/deploy.md.

Open http://127.0.0.1:9001/ in a browser for a demo's page. SIGINT/SIGTERM stop
accepting, close every connection with 1001 (waiting up to --close-timeout) and exit 0;
a second SIGINT/SIGTERM during that wait aborts it (connections dropped, exit 0 too).
A configuration mistake (a bad address, an unreadable or mismatched certificate, a port
in use) prints one ``lightws: error: ...`` line on stderr and exits 2.

For a public deployment (docs/security.md): --origin restricts which pages may connect
(repeat it; list the demo page's own origin too, e.g. http://127.0.0.1:9001, and
"--origin none" to admit clients that send no Origin header), --max-connections-per-ip
caps each client address, --trusted-proxy names proxies whose X-Forwarded-For is believed.

--compression deflate turns on permessage-deflate for clients that offer it (browsers
do), with --server-max-window-bits, --client-max-window-bits, --server-no-context-takeover,
--client-no-context-takeover, --compression-level and --compression-min-size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import Config, Deflate, HandshakeFunc, LogLevel, Server, _bench, _workers
from ._run import ShutdownOnSignals
from .demos import (
    PushRegistry,
    chat_handshake,
    countdown_handshake,
    echo_handshake,
    echo_listener_handshake,
)
from .demos.chat import MAX_MESSAGE

__all__ = ["main"]

#: --max-msg-len unless given.
MAX_MSG_LEN = 16 << 20
#: --max-msg-len of the chat demo unless given: a chat message is small, and what is
#: over this is closed with 1009 before it is read (between MAX_MESSAGE and this, the
#: client gets a too_long error message instead). Not with set_defaults(): subcommands
#: share the common options' actions, so that would change every demo's default.
CHAT_MAX_MSG_LEN = 4 * MAX_MESSAGE

#: Makes the servers a demo runs beside its main one (started after it, closed before),
#: each with the path to show in the banner; it is given the main server.
SideServers = Callable[[Server], list[tuple[Server, str]]]


_split_addr = _workers._split_addr


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(scheme: str, address: tuple[str, int], path: str = "/") -> str:
    host, port = address
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}{path}"


class _StartupError(Exception):
    """The servers could not start: a configuration error, shown as one line (exit 2)."""


def _error(message: object) -> int:
    # One line, like argparse's own errors, and the same exit status (2): a mistake in
    # the command line or its files is not worth a traceback.
    print(f"lightws: error: {message}", file=sys.stderr)
    return 2


def _say(line: str) -> None:
    print(line, flush=True)


async def _serve(
    config: Config, stats_interval: float | None, side: SideServers | None = None
) -> int:
    shutdown = ShutdownOnSignals(_say)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(shutdown)  # first: a signal during startup is not lost
        try:
            server = await stack.enter_async_context(Server(config))
            extras = side(server) if side else []
            for extra, _ in extras:
                await stack.enter_async_context(extra)
        except (ValueError, TypeError, OSError) as e:
            # Server.start() reports every configuration mistake (bad address, unreadable
            # or swapped certificate files, a port in use) as one of these.
            raise _StartupError(e) from e
        tls = bool(config.cert_file)
        print(f"lightws listening on {_url('wss' if tls else 'ws', server.address)}", flush=True)
        print(f"open {_url('https' if tls else 'http', server.address)} in a browser", flush=True)
        if config.origins is not None:
            allowed = ", ".join("(no Origin)" if o is None else o for o in config.origins)
            print(f"WebSocket upgrades allowed from: {allowed or 'nowhere'}", flush=True)
        for extra, path in extras:
            # Side servers never upgrade; they answer plain HTTP (http_fallback).
            print(f"HTTP endpoint on {_url('http', extra.address, path)}", flush=True)

        async def report() -> None:
            assert stats_interval
            while True:
                await asyncio.sleep(stats_interval)
                print(server.stats(), flush=True)

        reporter = asyncio.ensure_future(report()) if stats_interval else None
        try:
            # The first signal closes the side servers and the main one together; a
            # second aborts what remains of that.
            await shutdown.serve([*(extra for extra, _ in extras), server])
        finally:
            if reporter:
                reporter.cancel()
    return 0


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--addr", default="127.0.0.1:9001", help="host:port to listen on (default %(default)s)"
    )
    common.add_argument("--cert", help="PEM certificate chain (enables TLS; with --key)")
    common.add_argument("--key", help="PEM private key")
    common.add_argument(
        "--log-level",
        default="ERROR",
        choices=[lv.name for lv in LogLevel],
        help="lightws log level (default %(default)s)",
    )
    common.add_argument(
        "--max-msg-len",
        type=int,
        default=None,
        help=f"bytes (default {MAX_MSG_LEN}; chat: {CHAT_MAX_MSG_LEN})",
    )
    common.add_argument(
        "--threads",
        type=int,
        default=1,
        help="I/O threads (default 1; 0: connections on the event loop)",
    )
    common.add_argument(
        "--close-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on shutdown, wait this long for clients to answer the close "
        "(default %(default)s; a second SIGINT/SIGTERM stops waiting)",
    )
    common.add_argument(
        "--stats-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="print server stats every SECONDS",
    )
    common.add_argument("--uvloop", action="store_true", help="run on uvloop")
    common.add_argument(
        "--origin",
        action="append",
        metavar="ORIGIN",
        help="allow WebSocket upgrades only from this origin (scheme://host[:port]); "
        "repeatable; 'none' admits requests without an Origin header (non-browser "
        "clients). The demo page's own origin must be listed too. Default: any origin",
    )
    common.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=0,
        metavar="N",
        help="answer 429 beyond N connections from one address (IPv6: per /64); "
        "0 (default) means no limit",
    )
    common.add_argument(
        "--compression",
        choices=["none", "deflate"],
        default="none",
        help="permessage-deflate for clients that offer it (default %(default)s)",
    )
    common.add_argument(
        "--server-max-window-bits",
        type=int,
        default=12,
        metavar="BITS",
        help="with --compression deflate: largest window the server compresses with, "
        "8-15 (default %(default)s)",
    )
    common.add_argument(
        "--client-max-window-bits",
        type=int,
        default=12,
        metavar="BITS",
        help="with --compression deflate: largest window clients are asked to use, "
        "8-15 (default %(default)s)",
    )
    common.add_argument(
        "--server-no-context-takeover",
        action="store_true",
        help="with --compression deflate: compress each message on its own",
    )
    common.add_argument(
        "--client-no-context-takeover",
        action="store_true",
        help="with --compression deflate: ask clients to compress each message on its own",
    )
    common.add_argument(
        "--compression-level",
        type=int,
        default=6,
        metavar="LEVEL",
        help="with --compression deflate: zlib level 0-9 (default %(default)s)",
    )
    common.add_argument(
        "--compression-min-size",
        type=int,
        default=64,
        metavar="BYTES",
        help="with --compression deflate: send shorter messages uncompressed (default %(default)s)",
    )
    common.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDR",
        help="a proxy (IP address or CIDR network) whose X-Forwarded-For names the "
        "client; repeatable",
    )
    return common


def _compression(args: argparse.Namespace) -> Deflate | None:
    """``--compression`` and its options for Config.compression."""
    if args.compression != "deflate":
        return None
    return Deflate(
        server_max_window_bits=args.server_max_window_bits,
        client_max_window_bits=args.client_max_window_bits,
        server_no_context_takeover=args.server_no_context_takeover,
        client_no_context_takeover=args.client_no_context_takeover,
        level=args.compression_level,
        min_size=args.compression_min_size,
    )


def _origins(values: list[str] | None) -> list[str | None] | None:
    """``--origin`` values for Config.origins: ``none`` (any case) stands for None."""
    if values is None:
        return None
    return [None if v.lower() == "none" else v for v in values]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightws",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = _common_options()
    echo = sub.add_parser(
        "echo",
        parents=[common],
        help="echo every message (?reverse=1 reverses it; 'exit' closes)",
        description="Echo every message; ?reverse=1 reverses it; 'exit' closes.",
    )
    echo.add_argument(
        "--listener",
        action="store_true",
        help="echo through a listener (plain on_message method, conn.send_nowait; no "
        "asyncio task per connection) instead of a coroutine handler",
    )
    countdown = sub.add_parser(
        "countdown",
        parents=[common],
        help="send N: the server counts down 'N...' to '1...', then 'boom!' (0 stops)",
        description="Send N: the server sends 'N...' once a second down to '1...', then "
        "'boom!'. A new number restarts the countdown; 0 stops it.",
    )
    countdown.add_argument("--tick", type=float, default=1.0, help=argparse.SUPPRESS)
    push = sub.add_parser(
        "push",
        parents=[common],
        help="clients register with ?id=; GET /put/?id=&msg= on --put-addr pushes to them",
        description="Clients connect with ?id=NAME; GET /put/?id=NAME&msg=TEXT on the "
        "localhost-only --put-addr sends TEXT to every client registered as NAME (400 "
        "no_id without an id, 404 unknown_id for an id nobody registered).",
    )
    push.add_argument(
        "--put-addr",
        default="127.0.0.1:9002",
        help="loopback host:port of the HTTP push endpoint (default %(default)s)",
    )
    sub.add_parser(
        "chat",
        parents=[common],
        help="chat rooms: ?room=ROOM&name=NAME, JSON messages relayed to the whole room",
        description="Chat rooms on topics: connect with ?room=ROOM (default lobby) and "
        '?name=NAME (or send {"type": "join", "name": NAME} first); each '
        '{"type": "message", "text": TEXT} goes to everyone in the room, join and leave '
        "notices carry the member count, bad input gets an error message back.",
    )

    serve = sub.add_parser(
        "serve",
        help="run MODULE:ATTR (a handshake callable or a lightws.Config) in N workers",
        description="Run an application in N worker processes sharing the address "
        "(SO_REUSEPORT), supervised: a worker that dies is restarted; SIGTERM/SIGINT "
        "close every client with 1001 and exit 0; SIGHUP reloads the certificates. "
        "See docs/deploy.md.",
    )
    _workers.add_arguments(serve)
    bench = sub.add_parser("bench", help="load generator: echo, rate, idle and chat loads")
    _bench.add_arguments(bench)
    return p


def _demo(args: argparse.Namespace, level: LogLevel) -> tuple[HandshakeFunc, SideServers | None]:
    """The handshake of the chosen demo and the servers it needs beside the main one."""
    if args.command == "countdown":
        if args.tick <= 0:
            raise ValueError("--tick must be positive")
        return countdown_handshake(args.tick), None
    if args.command == "push":
        host, _ = _split_addr(args.put_addr)
        if not _is_loopback(host):
            raise ValueError(
                f"--put-addr must be a loopback address (it has no authentication), "
                f"not {args.put_addr!r}"
            )
        registry = PushRegistry()

        def side(server: Server) -> list[tuple[Server, str]]:
            registry.server = server  # the put endpoint publishes to its clients' topics
            registry.put_url = f"http://{args.put_addr}/put/"
            put = Config(
                addr=args.put_addr,
                handshake=registry.put_handshake,
                http_fallback=True,
                log_level=level,
            )
            return [(Server(put), "/put/?id=ID&msg=TEXT")]

        return registry.handshake, side
    if args.command == "chat":
        return chat_handshake, None
    if args.listener:
        return echo_listener_handshake, None
    return echo_handshake, None


def _max_msg_len(args: argparse.Namespace) -> int:
    """``--max-msg-len``, or the chosen demo's default."""
    if args.max_msg_len is not None:
        return int(args.max_msg_len)
    return CHAT_MAX_MSG_LEN if args.command == "chat" else MAX_MSG_LEN


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench.run(args)
    if args.command == "serve":
        return _workers.run(args)
    if bool(args.cert) != bool(args.key):
        return _error("--cert and --key go together")
    level = LogLevel[args.log_level]
    logging.basicConfig(
        level=logging.DEBUG if level == LogLevel.DEBUG else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        handshake, side = _demo(args, level)
    except ValueError as e:
        return _error(e)
    config = Config(
        addr=args.addr,
        handshake=handshake,
        http_fallback=True,
        cert_file=args.cert,
        key_file=args.key,
        max_msg_len=_max_msg_len(args),
        log_level=level,
        threads=args.threads,
        origins=_origins(args.origin),
        max_connections_per_ip=args.max_connections_per_ip,
        trusted_proxies=args.trusted_proxy,
        close_timeout=args.close_timeout,
        compression=_compression(args),
    )
    run: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            return _error("--uvloop needs the uvloop package (pip install uvloop)")
        run = uvloop.run
    try:
        return run(_serve(config, args.stats_interval, side))
    except _StartupError as e:
        return _error(e)


if __name__ == "__main__":
    sys.exit(main())
