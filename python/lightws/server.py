"""The server: :class:`Server` and its :class:`Stats`."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import warnings
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from . import _lightws
from ._lightws import Connection, Message
from ._types import LogLevel, Opcode
from .config import Config
from .http import Request, Response
from .listener import Accept, is_listener

__all__ = ["Rates", "Server", "Stats"]

logger = logging.getLogger("lightws")

_LEVELS = {
    LogLevel.ERROR: logging.ERROR,
    LogLevel.WARN: logging.WARNING,
    LogLevel.INFO: logging.INFO,
    LogLevel.DEBUG: logging.DEBUG,
}


@dataclass(frozen=True)
class Rates:
    """Per-second rates of the cumulative counters over the last 30 seconds.

    Each rate is the counter's growth divided by the span it grew over: the last 30 s
    (up to 31: the server samples its counters once a second), or the time since the
    server started while that is shorter, but never less than one second. So a server
    younger than a second reports its counts as the rate of its first second (one
    handshake 8 ms after start is 1.0/s, not 125/s), and rates are never inflated by a
    short span.
    """

    #: Completed handshakes per second.
    handshakes: float = 0.0
    #: Failed or rejected handshakes per second.
    handshakes_failed: float = 0.0
    #: Bytes read from sockets per second (after TLS decryption: WebSocket bytes).
    bytes_in: float = 0.0
    #: Bytes written to sockets per second (WebSocket bytes).
    bytes_out: float = 0.0
    #: Frames received per second, per opcode.
    frames_in: dict[Opcode, float] = field(default_factory=dict)
    #: Frames sent per second, per opcode.
    frames_out: dict[Opcode, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Stats:
    """A snapshot of the server's counters (``server.stats()``).

    ``connections_reading``/``connections_writing`` are None unless
    ``Config.io_statistics`` is on.
    """

    #: Open TCP connections (including those still in their handshake).
    connections: int = 0
    #: The most connections open at once since the server started.
    max_connections: int = 0
    #: Connections waiting for input (``io_statistics`` only, else None).
    connections_reading: int | None = None
    #: Connections with output the socket has not taken yet (``io_statistics`` only).
    connections_writing: int | None = None
    #: Completed WebSocket handshakes (101 sent).
    handshakes: int = 0
    #: Handshakes that failed: malformed or rejected requests, timeouts, 503s.
    handshakes_failed: int = 0
    #: Bytes read from sockets (WebSocket bytes; after TLS decryption).
    bytes_in: int = 0
    #: Bytes written to sockets (WebSocket bytes; before TLS encryption).
    bytes_out: int = 0
    #: Frames received, per opcode (a fragmented message counts once).
    frames_in: dict[Opcode, int] = field(default_factory=dict)
    #: Frames sent, per opcode.
    frames_out: dict[Opcode, int] = field(default_factory=dict)
    #: Topics with at least one subscriber.
    topics: int = 0
    #: Subscriptions over all topics.
    subscriptions: int = 0
    #: Fanned-out messages skipped for a connection over ``max_backpressure``
    #: (``on_backpressure="drop"``).
    dropped: int = 0
    #: Connections closed with 1013 for going over ``max_backpressure``
    #: (``on_backpressure="close"``).
    backpressure_closes: int = 0
    #: The pub/sub backplane (``Config.pubsub``): ``"connected"``, ``"reconnecting"``
    #: (Redis lost; local delivery goes on), or None without one.
    pubsub: str | None = None
    #: Connections to Redis that failed or were lost (each failed attempt counts).
    relay_errors: int = 0
    #: Published messages that could not be handed to Redis (published while it was
    #: unreachable, or in a batch that failed): delivered locally only.
    unrelayed: int = 0
    #: Published messages handed to Redis for the other servers.
    relayed: int = 0
    #: Messages from other servers delivered to local subscribers (one per message,
    #: not per subscriber).
    relay_received: int = 0
    #: Per-second rates of the counters over the last 30 seconds (see :class:`Rates`
    #: for a server younger than that).
    rates: Rates = field(default_factory=Rates)

    def __str__(self) -> str:
        r = self.rates

        def frames(d: dict[Opcode, int], rd: dict[Opcode, float]) -> str:
            return " ".join(f"{op.name}={n}({rd.get(op, 0.0):.1f}/s)" for op, n in d.items() if n)

        lines = [
            f"connections={self.connections} max_connections={self.max_connections}",
            f"handshakes={self.handshakes}({r.handshakes:.1f}/s) "
            f"handshakes_failed={self.handshakes_failed}({r.handshakes_failed:.1f}/s)",
            f"bytes_in={self.bytes_in}({r.bytes_in:.0f}/s) "
            f"bytes_out={self.bytes_out}({r.bytes_out:.0f}/s)",
            f"frames_in: {frames(self.frames_in, r.frames_in) or '-'}",
            f"frames_out: {frames(self.frames_out, r.frames_out) or '-'}",
            f"topics={self.topics} subscriptions={self.subscriptions} "
            f"dropped={self.dropped} backpressure_closes={self.backpressure_closes}",
        ]
        if self.pubsub is not None:
            lines.append(
                f"pubsub={self.pubsub} relayed={self.relayed} "
                f"relay_received={self.relay_received} unrelayed={self.unrelayed} "
                f"relay_errors={self.relay_errors}"
            )
        if self.connections_reading is not None:
            lines.insert(
                1,
                f"connections_reading={self.connections_reading} "
                f"connections_writing={self.connections_writing}",
            )
        return "\n".join(lines)


def _opcode_dict(d: dict[int, Any]) -> dict[Opcode, Any]:
    return {Opcode(k): v for k, v in d.items()}


class Server:
    """A WebSocket server.

    ``async with Server(config) as server:`` starts listening (``server.port``) and
    closes every connection with 1001 on exit. Or ``await server.serve()`` to run until
    :meth:`close`.
    """

    def __init__(self, config: Config) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"Server() takes a lightws.Config, not {type(config).__name__}")
        self.config = config
        self._core: _lightws.Core | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed: asyncio.Future[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._sockets: list[socket.socket] = []
        #: The timer that releases the objects of idle listener connections.
        self._sweeper: asyncio.TimerHandle | None = None
        #: The Python level of Config.log_level: this server's records below it are
        #: dropped (see _log).
        self._level = logging.ERROR

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and listen. Raises ``ValueError``/``TypeError`` for an invalid Config,
        ``OSError`` if the address cannot be bound or a certificate cannot be read."""
        if self._core is not None:
            raise RuntimeError("server already started")
        cfg = self.config
        if not callable(cfg.handshake):
            raise TypeError("Config.handshake must be a callable (request, response) -> handler")
        if not isinstance(cfg.addr, str):
            raise TypeError(f"Config.addr must be a str like '127.0.0.1:9001', not {cfg.addr!r}")
        try:
            level = LogLevel(cfg.log_level)
        except ValueError:
            raise ValueError(
                f"Config.log_level must be a lightws.LogLevel, not {cfg.log_level!r}"
            ) from None
        # NOTE: the "lightws" logger's level is left alone: it is the application's, and
        # two servers with different log levels would fight over it. Each server drops
        # its own records below its Config.log_level instead (_log; the Rust side does
        # the same per connection, before a record ever crosses to Python).
        self._level = _LEVELS[level]
        loop = asyncio.get_running_loop()
        core = _lightws.Core(cfg, self._dispatch, self._log, loop, self)  # checks every field
        if cfg.ws_write_buffer != Config.ws_write_buffer:
            warnings.warn(
                "Config.ws_write_buffer has no effect (frames go straight into each "
                "connection's outbox, sized to need) and will be removed",
                DeprecationWarning,
                stacklevel=2,
            )
        core.start()
        self._loop = loop
        self._core = core
        self._closed = loop.create_future()
        loop.add_reader(core.fd(), core.drain)
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)
        self._log_server(
            logging.INFO, "lightws listening on %s%s", self._where(), " (TLS)" if core.tls else ""
        )

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        addr = self._require_core().address()
        if addr is None:
            raise RuntimeError("server is closed")
        return addr[1]

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        addr = self._require_core().address()
        if addr is None:
            raise RuntimeError("server is closed")
        return addr

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (duplicated descriptors: closing them does not stop the
        server)."""
        core = self._require_core()
        fd = core.listener_fd()
        if fd is None:
            return []
        if not self._sockets:
            self._sockets = [socket.socket(fileno=os.dup(fd))]
        return list(self._sockets)

    @property
    def is_serving(self) -> bool:
        """True between start() and close()."""
        return self._core is not None and self._closed is not None and not self._closed.done()

    async def serve_forever(self) -> None:
        """Wait until the server is closed (by :meth:`close` or from another task)."""
        if self._closed is None:
            await self.start()
        assert self._closed is not None
        try:
            await asyncio.shield(self._closed)
        except asyncio.CancelledError:
            await self.close()
            raise

    async def serve(self) -> None:
        """Start (TLS if ``cert_file`` is set) and serve until closed."""
        if self._core is None:
            await self.start()
        await self.serve_forever()

    async def serve_tls(self) -> None:
        """Like :meth:`serve`, but requires ``cert_file``/``key_file``."""
        if not (self.config.cert_file and self.config.key_file):
            raise ValueError("serve_tls() needs Config.cert_file and Config.key_file")
        await self.serve()

    async def close(self) -> None:
        """Stop accepting, close every connection with 1001 (going away), wait up to
        ``close_timeout`` for them, then stop. Safe to call more than once."""
        if self._core is None or self._closed is None:
            return
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    def abort(self) -> None:
        """Stop at once: stop accepting, drop every connection without a close handshake
        (their clients see 1006) and cancel the handler tasks and pending handshakes.

        Does not wait: a :meth:`close` in progress (one held up by clients that do not
        answer within ``close_timeout``, say) then returns promptly, and ``await
        server.close()`` after ``abort()`` finishes stopping. This is what a second
        SIGINT/SIGTERM does under :func:`lightws.run`."""
        core = self._core
        if core is None or self._closed is None or self._closed.done():
            return
        core.stop_accepting()
        conns = core.connections()
        # A handler's task ending cancelled aborts its connection too (Connection
        # _handler_done); conn.abort() covers connections whose handler has ended.
        for conn in conns:
            conn.abort()
        handlers = [t for c in conns if (t := c._handler_task) is not None]
        for t in [*self._tasks, *handlers]:
            t.cancel()

    async def _close(self) -> None:
        core = self._core
        loop = self._loop
        assert core is not None and loop is not None and self._closed is not None
        core.stop_accepting()
        for s in self._sockets:
            s.close()
        self._sockets = []
        waits: list[asyncio.Future[Any]] = []
        for conn in core.connections():
            try:
                waits.append(asyncio.ensure_future(_await(conn.close(1001, "server shutdown"))))
            except Exception:  # pragma: no cover - closing must go on
                logger.exception("closing connection %s", conn.id)
        handlers = [t for c in core.connections() if (t := c._handler_task) is not None]
        pending = [*waits, *self._tasks, *handlers]
        if pending:
            await asyncio.wait(pending, timeout=self.config.close_timeout + 0.5)
        tasks = [t for t in [*self._tasks, *handlers] if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        where = self._where()
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop.remove_reader(core.fd())
        core.shutdown()
        if not self._closed.done():
            self._closed.set_result(None)
        self._log_server(logging.INFO, "lightws server on %s closed", where)

    async def reload_certificates(self) -> None:
        """Re-read ``cert_file``/``key_file``; new TLS handshakes use the new
        certificates, open connections are untouched. On error the old ones stay."""
        core = self._require_core()
        await asyncio.get_running_loop().run_in_executor(None, core.reload_certificates)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- introspection -----------------------------------------------------------------

    def stats(self) -> Stats:
        """A snapshot of the counters, with rates over the last 30 seconds (since start
        if the server is younger, but at least over one second: see :class:`Rates`)."""
        d = self._require_core().stats()
        r = d["rates"]
        return Stats(
            connections=d["connections"],
            max_connections=d["max_connections"],
            connections_reading=d["connections_reading"],
            connections_writing=d["connections_writing"],
            handshakes=d["handshakes"],
            handshakes_failed=d["handshakes_failed"],
            topics=d["topics"],
            subscriptions=d["subscriptions"],
            dropped=d["dropped"],
            backpressure_closes=d["backpressure_closes"],
            pubsub=d["pubsub"],
            relay_errors=d["relay_errors"],
            unrelayed=d["unrelayed"],
            relayed=d["relayed"],
            relay_received=d["relay_received"],
            bytes_in=d["bytes_in"],
            bytes_out=d["bytes_out"],
            frames_in=_opcode_dict(d["frames_in"]),
            frames_out=_opcode_dict(d["frames_out"]),
            rates=Rates(
                handshakes=r["handshakes"],
                handshakes_failed=r["handshakes_failed"],
                bytes_in=r["bytes_in"],
                bytes_out=r["bytes_out"],
                frames_in=_opcode_dict(r["frames_in"]),
                frames_out=_opcode_dict(r["frames_out"]),
            ),
        )

    # -- fan-out -----------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        message: str | bytes | bytearray | memoryview | Message,
        *,
        exclude: Connection | None = None,
    ) -> int:
        """Queue ``message`` to every connection subscribed to ``topic``
        (``conn.subscribe(topic)``) except ``exclude``; return how many it goes to.

        ``str`` goes as TEXT, bytes-like as BINARY, a ``Message`` with its TEXT or BINARY
        opcode. The frame is encoded once and shared by every subscriber; the walk over
        the subscribers runs on an I/O thread, so this costs the same for 10 or 10,000
        of them. It never waits: a subscriber with more than ``max_backpressure`` bytes
        unwritten is handled by ``on_backpressure`` (closed with 1013, or skipped).
        Per connection, messages arrive in call order, interleaved with its ``send()``s.
        Callable from any thread. A server not started has no subscribers (returns 0).

        With ``Config.pubsub`` the message also goes, through Redis, to the subscribers
        of every other server sharing that URL (at-most-once; in order per publisher
        and topic; ``exclude`` applies to this server only). The count is still the
        local one, and publish never waits for Redis.
        """
        return self._require_core().publish(topic, message, exclude)

    def subscribers(self, topic: str) -> int:
        """How many connections are subscribed to ``topic``."""
        return self._require_core().subscribers(topic)

    @property
    def connections(self) -> list[Connection]:
        """The open connections."""
        return self._require_core().connections()

    def _require_core(self) -> _lightws.Core:
        if self._core is None:
            raise RuntimeError("server not started: use 'async with Server(config)' or start()")
        return self._core

    # -- called from the native core on the loop thread ----------------------------------

    def _where(self) -> str:
        addr = self._core.address() if self._core is not None else None
        return _host_port(*addr) if addr else "?"

    def _log_server(self, level: int, msg: str, *args: object) -> None:
        """Log a record about the server itself, if this server's log_level allows."""
        if level >= self._level and logger.isEnabledFor(level):
            logger.log(level, msg, *args)

    def _log(self, level: int, conn_id: int | None, addr: str | None, msg: str) -> None:
        pylevel = _LEVELS.get(LogLevel(level), logging.ERROR)
        # This server's level first (the Rust side already applied it to most records),
        # then the logger's effective level: the application's logging configuration
        # still decides what is shown.
        if pylevel < self._level or not logger.isEnabledFor(pylevel):
            return
        extra = {"conn_id": conn_id, "remote_address": addr}
        if conn_id is not None:
            logger.log(pylevel, "[%s #%d] %s", addr, conn_id, msg, extra=extra)
        elif addr is not None:
            logger.log(pylevel, "[%s] %s", addr, msg, extra=extra)
        else:
            logger.log(pylevel, "%s", msg, extra=extra)

    def _dispatch(
        self,
        conn: Connection,
        method: str,
        target: str,
        headers: str,
        remote: tuple[str, int],
        upgrade: bool,
        subprotocols: list[str],
    ) -> None:
        request = Request(method, target, headers, remote, subprotocols, upgrade)
        conn._init(request)
        response = Response()
        try:
            result = self.config.handshake(request, response)
        except Exception:
            self._handshake_failed(conn, request)
            return
        if inspect.isawaitable(result):
            self._spawn(self._finish_async(conn, request, response, result))
        else:
            self._finish(conn, request, response, result)

    async def _finish_async(
        self, conn: Connection, request: Request, response: Response, pending: Any
    ) -> None:
        try:
            result = await pending
        except Exception:
            self._handshake_failed(conn, request)
            return
        self._finish(conn, request, response, result)

    def _handshake_failed(self, conn: Connection, request: Request) -> None:
        _conn_log(
            logging.ERROR, conn, "handshake callable raised for %s", request.target, exc_info=True
        )
        _reject(conn, 500, [], b"Internal Server Error")

    def _finish(self, conn: Connection, request: Request, response: Response, result: Any) -> None:
        if result is None or not request.upgrade:
            status = response.status
            if status is None:
                # A rejected upgrade defaults to 403; a plain HTTP request (http_fallback)
                # answered with a body defaults to 200, without one to 404.
                status = 403 if request.upgrade else (200 if response.body else 404)
            _reject(conn, status, response.headers.raw_items(), response.body)
            return
        native: Accept | None = None
        if isinstance(result, Accept):
            native = result
        elif isinstance(result, type) and is_listener(result):
            _conn_log(
                logging.ERROR,
                conn,
                "the handshake returned the listener class %r: return an instance (%s())",
                result,
                result.__name__,
            )
            _reject(conn, 500, [], b"Internal Server Error")
            return
        elif is_listener(result):
            native = Accept(listener=result)
        elif not callable(result):
            _conn_log(logging.ERROR, conn, "%s; got %r", _HANDLER_HINT, result)
            _reject(conn, 500, [], b"Internal Server Error")
            return
        sub = response.subprotocol
        if sub is not None and sub not in request.subprotocols:
            _conn_log(
                logging.ERROR,
                conn,
                "response.subprotocol %r was not offered by the client (offered: %r)",
                sub,
                request.subprotocols,
            )
            _reject(conn, 500, [], b"Internal Server Error")
            return
        if native is not None:
            try:
                conn._accept(response.headers.raw_items(), sub)
            except ValueError:
                _conn_log(logging.ERROR, conn, "invalid handshake response", exc_info=True)
                _reject(conn, 500, [], b"Internal Server Error")
                return
            # on_open runs in there (and any message already in).
            conn._adopt(native.listener, list(native.topics))
            return
        # Call the handler before the 101 goes out, so that a handler that is not async
        # is refused with a 500 rather than accepted and closed with 1011 at once. For an
        # async function (also behind functools.partial or an async __call__) the call
        # only creates the coroutine: none of its code runs before the 101. Whether a
        # plain function returns an awaitable (a decorator's wrapper, a lambda) can only
        # be known by calling it, so any callable that returns an awaitable is accepted.
        try:
            running = result(conn)
        except Exception:
            _conn_log(
                logging.ERROR,
                conn,
                "the handler %r raised when called with the connection; answering 500",
                result,
                exc_info=True,
            )
            _reject(conn, 500, [], b"Internal Server Error")
            return
        if not inspect.isawaitable(running):
            _conn_log(
                logging.ERROR,
                conn,
                "%s; got %r, which returned %r instead of an awaitable",
                _HANDLER_HINT,
                result,
                running,
            )
            _reject(conn, 500, [], b"Internal Server Error")
            return
        try:
            conn._accept(response.headers.raw_items(), sub)
        except ValueError:
            _discard(running)
            _conn_log(logging.ERROR, conn, "invalid handshake response", exc_info=True)
            _reject(conn, 500, [], b"Internal Server Error")
            return
        request._compact()
        self._start_handler(running, conn)

    def _start_handler(self, running: Awaitable[Any], conn: Connection) -> None:
        # NOTE: the handler coroutine runs as the task itself, with a done callback for
        # the close, instead of under a wrapper coroutine: one coroutine frame less per
        # connection (about 0.5 KiB of an idle connection's memory). Only an awaitable
        # that is not a coroutine (rare) needs the wrapper.
        assert self._loop is not None
        coro = running if asyncio.iscoroutine(running) else _await(running)
        try:
            task: asyncio.Task[None] = self._loop.create_task(coro)
        except Exception:
            _discard(coro)
            _conn_log(
                logging.ERROR, conn, "handler could not start; closing with 1011", exc_info=True
            )
            _ = conn.close(1011)
            return
        conn._watch(task)

    def _sweep(self) -> None:
        # Once a second: the Connection objects of listener connections that had no event
        # since the last sweep and that nothing references are released (listener.rs).
        core, loop = self._core, self._loop
        if core is None or loop is None or self._closed is None or self._closed.done():
            return
        try:
            core.sweep()
        finally:
            self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        task: asyncio.Task[None] = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


#: Seconds between two sweeps of idle listener connections' objects.
_SWEEP_EVERY = 1.0

#: What the handshake callable may return, for the error logged when it returned
#: something else.
_HANDLER_HINT = (
    "the handshake must return an async function (async def handler(conn)), a listener "
    "(an object with on_open/on_message/on_close methods), lightws.Accept(...) or None"
)


def _host_port(host: str, port: int) -> str:
    """``host:port`` as the Rust side prints a socket address (IPv6 in brackets), so that
    the records from both halves carry the same ``[host:port #id]`` prefix."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _conn_log(
    level: int,
    conn: Connection,
    msg: str,
    *args: object,
    exc_info: BaseException | bool | None = None,
) -> None:
    """Log ``msg % args`` about ``conn`` with the ``[host:port #id]`` prefix and the
    ``conn_id``/``remote_address`` record attributes, as the Rust side's records."""
    if not logger.isEnabledFor(level):
        return
    addr = _host_port(*conn.remote_address)
    logger.log(
        level,
        "[%s #%d] " + msg,
        addr,
        conn.id,
        *args,
        exc_info=exc_info,
        extra={"conn_id": conn.id, "remote_address": addr},
    )


def _handler_failed(conn: Connection, exc: BaseException) -> None:
    """Called by the connection when its handler raised (it then closes with 1011)."""
    _conn_log(logging.ERROR, conn, "handler raised; closing with 1011", exc_info=exc)


def _listener_failed(
    conn: Connection, method: str, exc: BaseException | None, returned: object, closing: bool
) -> None:
    """Called by the connection when a listener method raised or returned an awaitable
    (then it closes with 1011, unless it was on_close)."""
    then = "; closing with 1011" if closing else ""
    if exc is not None:
        _conn_log(logging.ERROR, conn, "listener %s() raised%s", method, then, exc_info=exc)
    else:
        _conn_log(
            logging.ERROR,
            conn,
            "listener %s() returned %r: listener methods are plain functions (def, not "
            "async def) and cannot await; start a task (asyncio.create_task) for that%s",
            method,
            returned,
            then,
        )


def _reject(conn: Connection, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    try:
        conn._reject(status, headers, body)
    except ValueError:
        _conn_log(logging.ERROR, conn, "invalid handshake response", exc_info=True)
        conn._reject(500, [], b"Internal Server Error")
    except RuntimeError:
        pass  # already answered


def _discard(running: object) -> None:
    """Close a handler coroutine that will never run (no "never awaited" warning)."""
    if asyncio.iscoroutine(running):
        running.close()


async def _await(aw: Awaitable[Any]) -> None:
    await aw
