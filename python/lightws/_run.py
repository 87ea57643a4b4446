"""``lightws.run(config)``: serve until SIGINT/SIGTERM, then shut down gracefully.

The signal handling is shared with the command line (``python -m lightws``): the first
SIGINT or SIGTERM closes every connection with 1001 and waits up to ``close_timeout``;
a second one aborts that wait.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Sequence
from types import TracebackType

from .config import Config
from .server import Server

__all__ = ["run"]


def run(
    config: Config,
    *,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> None:
    """Serve ``config`` until SIGINT (Ctrl-C) or SIGTERM, then shut down gracefully.

    The first signal stops accepting and closes every connection with 1001 (going
    away), waiting up to ``close_timeout`` for the clients to answer; run() then
    returns, so a script that ends with it exits 0, without a traceback. A second
    signal during that wait aborts it (:meth:`Server.abort`): the remaining connections
    are dropped (their clients see 1006), handlers are cancelled, and run() returns all
    the same: the process was asked to stop and it stopped, so the exit status stays 0.
    One line on stderr says where the server listens, and one when it shuts down or
    aborts.

    Blocks, like :func:`asyncio.run`: call it from the main thread with no event loop
    running. ``loop_factory`` makes the event loop (``uvloop.new_event_loop``, say);
    asyncio's by default. Configuration errors raise at start, as from
    :meth:`Server.start` (``ValueError``/``TypeError``/``OSError``).
    """
    main = _serve(config)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main)
    elif loop_factory is None:  # pragma: no cover - Python 3.10
        asyncio.run(main)
    else:  # pragma: no cover - Python 3.10: asyncio.run has no loop_factory
        loop = loop_factory()
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(main)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _serve(config: Config) -> None:
    with ShutdownOnSignals(_stderr) as shutdown:
        async with Server(config) as server:
            scheme = "wss" if config.cert_file else "ws"
            host, port = server.address
            host = f"[{host}]" if ":" in host else host
            _stderr(f"lightws: listening on {scheme}://{host}:{port} (Ctrl-C to stop)")
            await shutdown.serve([server])


class ShutdownOnSignals:
    """SIGINT/SIGTERM handlers for a process that serves (private: run() and the CLI).

    Enter it before starting the servers (so a signal during startup is not lost),
    then ``await serve(servers)``: it waits for the first signal and closes the servers
    gracefully; a second signal aborts that close. The handlers are removed on exit.
    Where signals cannot be handled by the loop (not the main thread, not Unix) it only
    waits, as ``serve_forever()`` would.
    """

    def __init__(self, say: Callable[[str], object]) -> None:
        self._say = say
        self._count = 0
        self._servers: list[Server] = []
        self._installed: list[signal.Signals] = []
        self._requested = asyncio.Event()

    def __enter__(self) -> ShutdownOnSignals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
                continue  # not Unix, or not the main thread
            self._installed.append(sig)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._count += 1
        if self._count == 1:
            self._say(
                f"lightws: {sig.name}: shutting down, closing connections with 1001 "
                "(signal again to abort)"
            )
            self._requested.set()
        elif self._count == 2:
            self._say(f"lightws: {sig.name} again: aborting, dropping every connection")
            self._abort()
        # Later signals: already aborting.

    def _abort(self) -> None:
        for server in self._servers:
            server.abort()

    async def serve(self, servers: Sequence[Server]) -> None:
        """Wait for a signal, then close ``servers`` (all at once); see the class."""
        self._servers = list(servers)
        await self._requested.wait()
        if self._count >= 2:  # both signals came before the servers were handed over
            self._abort()
        await asyncio.gather(*(server.close() for server in self._servers))
