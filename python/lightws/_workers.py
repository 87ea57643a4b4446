"""``python -m lightws serve MODULE:ATTR``: an application in N worker processes.

The parent process supervises; it never serves. Each worker is a fresh interpreter
(``python -m lightws serve ... --worker-index I``) with its own event loop and tokio
runtime, listening on the same address with SO_REUSEPORT (``Config.reuse_port``), so
the kernel spreads new connections over the workers.

- A worker that dies is restarted, with a backoff that doubles (0.1 s up to 10 s) while
  workers keep dying young. If the workers die at startup (before listening) when the
  command starts, or five restarts in a row die at startup, the parent stops the others
  and exits non-zero (the worker's status: 2 for a configuration error).
- SIGTERM or SIGINT: every worker closes its clients with 1001 and exits (as under
  :func:`lightws.run`), then the parent exits 0. A second signal makes the workers drop
  their connections at once.
- SIGHUP: every worker re-reads its certificate files (``Server.reload_certificates``).
- Workers run in their own session, so a Ctrl-C in the terminal reaches the parent
  only, which relays it once. A worker whose parent dies is sent SIGTERM (Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from ._run import ShutdownOnSignals
from ._types import LogLevel
from .config import Config
from .server import Server

__all__ = ["add_arguments", "run"]

DEFAULT_ADDR = "127.0.0.1:9001"
#: Restarts that die before listening, in a row, before the parent gives up.
MAX_STARTUP_FAILURES = 5
#: A worker that lived this long is healthy: the next restart has no backoff.
HEALTHY_AFTER = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0
#: After SIGTERM, how long the parent waits for a worker before SIGKILL (the workers
#: themselves give up on their clients after Config.close_timeout).
STOP_GRACE = 60.0
#: The worker writes one byte to this descriptor once it listens.
READY_FD_ENV = "LIGHTWS_READY_FD"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "app",
        metavar="MODULE:ATTR",
        help="the application: a handshake callable, or a lightws.Config (whose fields "
        "the options below override), e.g. myapp:handshake or myapp.server:config",
    )
    p.add_argument(
        "--addr",
        help=f"host:port to listen on (default: the Config's addr, or {DEFAULT_ADDR})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the address (SO_REUSEPORT); 0 = one per CPU (default 1)",
    )
    p.add_argument("--cert", help="PEM certificate chain (enables TLS; with --key)")
    p.add_argument("--key", help="PEM private key")
    p.add_argument(
        "--pubsub",
        metavar="URL",
        help="redis://[user:password@]host:port[/db]: publish reaches the subscribers "
        "of every worker and every machine sharing this Redis",
    )
    p.add_argument(
        "--log-level",
        choices=[lv.name for lv in LogLevel],
        help="lightws log level (default: the Config's, or ERROR)",
    )
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """The ``serve`` subcommand: supervise, or (``--worker-index``) be a worker."""
    if bool(args.cert) != bool(args.key):
        return _error("--cert and --key go together")
    if args.worker_index is not None:
        return _worker_main(args)
    if args.workers < 0:
        return _error("--workers must be 0 (one per CPU) or more")
    return asyncio.run(Supervisor(args).run())


def _error(message: object) -> int:
    print(f"lightws: error: {message}", file=sys.stderr, flush=True)
    return 2


def _say(line: str) -> None:
    # One write per line: print() writes the text and its newline separately, and the
    # workers share the supervisor's stderr, so two workers' lines could interleave
    # ("...reloadedlightws: worker 1: ..."); a write under PIPE_BUF bytes is atomic.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, not {addr!r}")
    return host.strip("[]"), int(port)


def load_config(args: argparse.Namespace) -> Config:
    """Import ``MODULE:ATTR`` and make the worker's Config (options override it)."""
    module_name, sep, attr = args.app.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"the application must be MODULE:ATTR, not {args.app!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current directory
    module = importlib.import_module(module_name)
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr!r}") from None
    overrides: dict[str, object] = {"reuse_port": True}
    if isinstance(obj, Config):
        config = obj
    elif callable(obj):
        config = Config(addr=DEFAULT_ADDR, handshake=obj)
    else:
        raise ValueError(
            f"{args.app} must be a handshake callable or a lightws.Config, not {type(obj).__name__}"
        )
    if args.addr is not None:
        overrides["addr"] = args.addr
    if args.cert:
        overrides["cert_file"], overrides["key_file"] = args.cert, args.key
    if args.pubsub is not None:
        overrides["pubsub"] = args.pubsub
    if args.log_level is not None:
        overrides["log_level"] = LogLevel[args.log_level]
    return dataclasses.replace(config, **overrides)  # type: ignore[arg-type]


# -- the worker --------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _worker_main(args: argparse.Namespace) -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # pragma: no cover - the parent died before prctl
        return 1
    index = args.worker_index
    try:
        config = load_config(args)
    except Exception as e:  # importing the user's module can raise anything
        return _error(f"worker {index}: {args.app}: {type(e).__name__}: {e}")
    logging.basicConfig(
        level=logging.DEBUG if config.log_level == LogLevel.DEBUG else logging.INFO,
        format=f"%(asctime)s worker {index} %(levelname)s %(name)s: %(message)s",
    )
    ready_fd = int(os.environ.pop(READY_FD_ENV, "-1"))
    return asyncio.run(_worker(config, index, ready_fd))


async def _worker(config: Config, index: int, ready_fd: int) -> int:
    loop = asyncio.get_running_loop()
    with ShutdownOnSignals(_say) as shutdown:
        server = Server(config)
        try:
            await server.start()
        except (ValueError, TypeError, OSError) as e:
            return _error(f"worker {index}: {e}")
        reloads: set[asyncio.Task[None]] = set()

        async def reload() -> None:
            try:
                await server.reload_certificates()
            except Exception as e:
                _say(f"lightws: worker {index}: SIGHUP: certificates not reloaded: {e}")
            else:
                _say(f"lightws: worker {index}: SIGHUP: certificates reloaded")

        def on_hup() -> None:
            task = asyncio.ensure_future(reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            scheme = "wss" if config.cert_file else "ws"
            host, port = server.address
            host = f"[{host}]" if ":" in host else host
            _say(
                f"lightws: worker {index} (pid {os.getpid()}) listening on {scheme}://{host}:{port}"
            )
            if ready_fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(ready_fd, b"1")
                    os.close(ready_fd)
            await shutdown.serve([server])
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
    return 0


# -- the parent ----------------------------------------------------------------------------


class Supervisor:
    """Starts the workers, restarts those that die, relays signals (see the module)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.count = args.workers or len(os.sched_getaffinity(0))
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()
        self.signals = 0
        #: Set when the supervisor gives up: the exit status.
        self.failed: int | None = None
        self.reserved: socket.socket | None = None

    def _command(self, index: int, addr: str | None) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "lightws", "serve", a.app, "--worker-index", str(index)]
        for flag, value in (
            ("--addr", addr),
            ("--cert", a.cert),
            ("--key", a.key),
            ("--pubsub", a.pubsub),
            ("--log-level", a.log_level),
        ):
            if value is not None:
                cmd += [flag, value]
        return cmd

    def _addr(self) -> str | None:
        """``--addr``; with port 0, a port picked now and held (bound with SO_REUSEPORT,
        not listening) so that every worker, and every restart, gets the same one."""
        addr: str | None = self.args.addr
        if addr is None:
            return None
        host, port = _split_addr(addr)
        if port != 0:
            return addr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
        self.reserved = sock
        port = sock.getsockname()[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            addr = self._addr()
        except (ValueError, OSError) as e:
            return _error(e)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        where = f" on {addr}" if addr else ""
        _say(
            f"lightws: serving {self.args.app}{where} with {self.count} worker"
            f"{'s' if self.count != 1 else ''} (supervisor pid {os.getpid()}; "
            "SIGTERM/SIGINT stop, SIGHUP reloads certificates)"
        )
        try:
            slots = [asyncio.ensure_future(self._slot(i, addr)) for i in range(self.count)]
            await asyncio.gather(*slots)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self.reserved is not None:
                self.reserved.close()
        if self.failed is not None:
            _say(f"lightws: workers cannot start; giving up (exit {self.failed})")
            return self.failed
        _say("lightws: every worker stopped")
        return 0

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            _say("lightws: SIGHUP: reloading certificates in every worker")
            self._relay(signal.SIGHUP)
            return
        self.signals += 1
        if self.signals == 1:
            _say(f"lightws: {sig.name}: stopping the workers (clients get 1001)")
        elif self.signals == 2:
            _say(f"lightws: {sig.name} again: workers drop their connections")
        else:
            return
        self.stopping.set()
        self._relay(signal.SIGTERM)

    def _relay(self, sig: signal.Signals) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def _give_up(self, status: int) -> None:
        if self.failed is None:
            self.failed = status or 1
        self.stopping.set()
        self._relay(signal.SIGTERM)

    async def _spawn(
        self, index: int, addr: str | None
    ) -> tuple[asyncio.subprocess.Process, asyncio.Future[bool]]:
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        ready: asyncio.Future[bool] = loop.create_future()

        def on_ready() -> None:
            try:
                data = os.read(r, 1)
            except OSError:
                data = b""
            loop.remove_reader(r)
            os.close(r)
            if not ready.done():
                ready.set_result(bool(data))

        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(index, addr),
                pass_fds=(w,),
                env=dict(os.environ, **{READY_FD_ENV: str(w)}),
                start_new_session=True,
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        loop.add_reader(r, on_ready)
        return proc, ready

    async def _slot(self, index: int, addr: str | None) -> None:
        """Keep worker ``index`` running until the supervisor stops."""
        startup_failures = 0
        backoff = BACKOFF_MIN
        first = True
        while not self.stopping.is_set():
            proc, ready = await self._spawn(index, addr)
            self.procs[index] = proc
            if self.stopping.is_set():  # a signal came while it was being spawned
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            started = time.monotonic()
            exited = asyncio.ensure_future(proc.wait())
            waits: list[asyncio.Future[Any]] = [ready, exited]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            listening = ready.done() and ready.result()
            if listening:
                _say(f"lightws: worker {index} ready (pid {proc.pid})")
                startup_failures = 0
            status = await self._wait(proc, exited)
            if self.stopping.is_set():
                return
            if not listening:
                startup_failures += 1
                if first or startup_failures >= MAX_STARTUP_FAILURES:
                    self._give_up(status)
                    return
            lived = time.monotonic() - started
            backoff = BACKOFF_MIN if lived >= HEALTHY_AFTER else backoff
            _say(
                f"lightws: worker {index} (pid {proc.pid}) exited with status {status}; "
                f"restarting in {backoff:.1f} s"
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            first = False

    async def _wait(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> int:
        """Wait for the worker to exit; once stopping, kill it after STOP_GRACE."""
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            waits: list[asyncio.Future[Any]] = [exited, stop]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                try:
                    await asyncio.wait_for(asyncio.shield(exited), STOP_GRACE)
                except asyncio.TimeoutError:
                    _say(f"lightws: worker pid {proc.pid} did not stop; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            return await exited
        finally:
            stop.cancel()
