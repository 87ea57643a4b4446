"""Command line: ``python -m lightws echo --addr 127.0.0.1:9001``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from . import Config, Connection, Handler, LogLevel, Message, Request, Response, Server

__all__ = ["main"]


def echo_handshake(request: Request, response: Response) -> Handler | None:
    """The seed's echo example: echoes every message; ``?reverse=1`` reverses it."""
    reverse = request.query.get("reverse") == "1"

    async def handler(conn: Connection) -> None:
        async for msg in conn:
            if msg.body == b"exit":
                await conn.close()
                return
            body = msg.body[::-1] if reverse else msg.body
            await conn.send(Message(msg.opcode, body))

    return handler


async def _serve(config: Config, stats_interval: float | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    async with Server(config) as server:
        host, port = server.address
        scheme = "wss" if config.cert_file else "ws"
        shown = host if ":" not in host else f"[{host}]"
        print(f"lightws listening on {scheme}://{shown}:{port}/", flush=True)

        async def report() -> None:
            assert stats_interval
            while True:
                await asyncio.sleep(stats_interval)
                print(server.stats(), flush=True)

        reporter = asyncio.ensure_future(report()) if stats_interval else None
        await stop.wait()
        if reporter:
            reporter.cancel()
        print("lightws: shutting down", flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightws", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="run the echo server (?reverse=1 reverses messages)")
    echo.add_argument("--addr", default="127.0.0.1:9001", help="host:port (default %(default)s)")
    echo.add_argument("--cert", help="PEM certificate chain (enables TLS)")
    echo.add_argument("--key", help="PEM private key")
    echo.add_argument(
        "--log-level",
        default="ERROR",
        choices=[lv.name for lv in LogLevel],
        help="lightws log level (default %(default)s)",
    )
    echo.add_argument(
        "--max-msg-len", type=int, default=16 << 20, help="bytes (default %(default)s)"
    )
    echo.add_argument("--threads", type=int, default=1, help="I/O threads (default 1)")
    echo.add_argument(
        "--stats-interval", type=float, default=None, help="print stats every N seconds"
    )
    echo.add_argument("--uvloop", action="store_true", help="run on uvloop")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if bool(args.cert) != bool(args.key):
        print("--cert and --key go together", file=sys.stderr)
        return 2
    level = LogLevel[args.log_level]
    logging.basicConfig(
        level=logging.DEBUG if level == LogLevel.DEBUG else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = Config(
        addr=args.addr,
        handshake=echo_handshake,
        cert_file=args.cert,
        key_file=args.key,
        max_msg_len=args.max_msg_len,
        log_level=level,
        threads=args.threads,
    )
    run = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run
    try:
        return run(_serve(config, args.stats_interval))
    except OSError as e:
        print(f"lightws: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
