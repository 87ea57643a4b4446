"""The client: :func:`connect` opens a WebSocket connection to a server.

The connection is the same :class:`lightws.Connection` a server handler gets, driven by
the same Rust code in the client role (its frames masked with random keys, the server's
``Sec-WebSocket-Accept`` checked, masked server frames refused with 1002)::

    async with lightws.connect("wss://example.org/feed") as conn:
        await conn.send("subscribe")
        async for msg in conn:
            print(msg.text)

``conn = await lightws.connect(url)`` works too (close it yourself), and
``async for conn in lightws.connect(url):`` reconnects with exponential backoff.

Every client connection of one event loop shares one native core: a tokio runtime of
one I/O thread and a hub registered with ``loop.add_reader``, as a server has. It is
started by the first ``connect()`` and shut down when the loop's last client
connection has closed.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import random
import socket
import ssl
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from . import _lightws
from ._lightws import Connection
from ._types import LogLevel
from .exceptions import InvalidHandshake
from .http import Headers, Request, Response

__all__ = ["connect"]

logger = logging.getLogger("lightws.client")

_LEVELS = {
    LogLevel.ERROR: logging.ERROR,
    LogLevel.WARN: logging.WARNING,
    LogLevel.INFO: logging.INFO,
    LogLevel.DEBUG: logging.DEBUG,
}

#: Statuses of a refused upgrade worth retrying in ``async for conn in connect(...)``
#: (the server is overloaded or restarting), as websockets retries.
_RETRY_STATUSES = frozenset({500, 502, 503, 504})


class connect:
    """Open a WebSocket connection to ``url`` (``ws://`` or ``wss://``).

    Three ways to use it::

        async with lightws.connect(url) as conn:     # closed (1000) when the block ends
            ...
        conn = await lightws.connect(url)            # yours to close
        async for conn in lightws.connect(url):      # reconnects, with backoff
            try:
                async for msg in conn:
                    ...
            except lightws.ConnectionClosed:
                continue

    Args:
        url: ``ws://host[:port]/path?query`` or ``wss://...``.
        subprotocols: offered in ``Sec-WebSocket-Protocol``, in order of preference;
            the server's choice is ``conn.subprotocol`` (a choice not offered fails
            the handshake).
        headers: extra request headers (a mapping, :class:`lightws.Headers` or
            ``(name, value)`` pairs). ``Host`` may be overridden; the handshake's own
            headers may not.
        origin: sent as the ``Origin`` header.
        user_agent_header: the ``User-Agent`` header; None sends none.
        cafile: PEM file of the CA certificates that ``wss://`` trusts, instead of the
            system's store.
        compression: only ``None`` is accepted: lightws does not implement
            permessage-deflate yet (any other value raises ``ValueError``).
        max_msg_len: largest message received; a larger one closes with 1009 and
            ``recv()`` raises :class:`lightws.PayloadTooBig`. Streaming with
            ``conn.reader()`` is not bound by it.
        open_timeout: seconds for name resolution, TCP, TLS and the handshake
            together; ``TimeoutError`` after it. None waits forever.
        close_timeout: seconds ``close()`` waits for the server's close frame.
        ping_interval: send a keepalive ping after this many idle seconds; None
            (default) sends none.
        ping_timeout: close with 1011 if no pong comes within this many seconds
            (default: ``ping_interval``).
        auto_pong: answer pings in Rust (default); with False pings and pongs reach
            ``recv()``.
        write_limit: bytes queued before ``send()`` waits for the socket.
        log_level: records of this connection's I/O, to the ``lightws.client`` logger.
        backoff_initial_delay: the reconnecting iterator's first delay after a failed
            attempt is a random fraction of this.
        backoff_min_delay: the second delay; each later one is ``backoff_factor``
            times the previous, up to ``backoff_max_delay`` (websockets' defaults).
            A connection that opens resets them.
        backoff_factor: see ``backoff_min_delay``.
        backoff_max_delay: see ``backoff_min_delay``.

    Raises:
        InvalidHandshake: the server refused the upgrade (``.status``, ``.headers``,
            ``.body``) or answered it in breach of RFC 6455.
        OSError: the host could not be resolved (``socket.gaierror``) or reached
            (``ConnectionRefusedError``, ...); TLS failed (``ssl.SSLError``, and
            ``ssl.SSLCertVerificationError`` for an untrusted certificate).
        TimeoutError: ``open_timeout`` passed.
        ValueError: a malformed URL, header or setting (raised by ``connect()``
            itself, the others when it is awaited or entered).
    """

    def __init__(
        self,
        url: str,
        *,
        subprotocols: Sequence[str] | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | Headers | None = None,
        origin: str | None = None,
        user_agent_header: str | None = f"lightws/{_lightws.__version__}",
        cafile: str | None = None,
        compression: str | None = None,
        max_msg_len: int = 1 << 20,
        open_timeout: float | None = 10.0,
        close_timeout: float = 5.0,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
        auto_pong: bool = True,
        write_limit: int = 64 * 1024,
        log_level: LogLevel = LogLevel.ERROR,
        backoff_initial_delay: float = 5.0,
        backoff_min_delay: float = 3.1,
        backoff_factor: float = 1.618,
        backoff_max_delay: float = 90.0,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"connect() takes the URL as a str, not {type(url).__name__}")
        if compression is not None:
            raise ValueError(
                f"compression={compression!r} is not supported yet: lightws does not "
                "implement permessage-deflate (RFC 7692) yet; pass compression=None"
            )
        if isinstance(subprotocols, str):
            raise TypeError("subprotocols must be a list of strings, not a str")
        try:
            level = LogLevel(log_level)
        except ValueError:
            raise ValueError(f"log_level must be a lightws.LogLevel, not {log_level!r}") from None
        for name, value in (
            ("open_timeout", open_timeout),
            ("close_timeout", close_timeout),
            ("ping_interval", ping_interval),
            ("ping_timeout", ping_timeout),
        ):
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number of seconds, not {value!r}")
        if backoff_factor < 1 or min(backoff_initial_delay, backoff_min_delay) < 0:
            raise ValueError("backoff delays must be non-negative and backoff_factor >= 1")
        pairs = list(Headers(headers).raw_items()) if headers is not None else []
        names = {n.lower() for n, _ in pairs}
        if origin is not None and "origin" not in names:
            pairs.append(("Origin", origin))
        if user_agent_header is not None and "user-agent" not in names:
            pairs.append(("User-Agent", user_agent_header))
        self.url = url
        self.subprotocols = list(subprotocols or [])
        self.headers = pairs
        self.cafile = cafile
        self.max_msg_len = max_msg_len
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.auto_pong = auto_pong
        self.write_limit = write_limit
        self.log_level = level
        self.backoff_initial_delay = backoff_initial_delay
        self.backoff_min_delay = backoff_min_delay
        self.backoff_factor = backoff_factor
        self.backoff_max_delay = backoff_max_delay
        self._conn: Connection | None = None

    # -- await connect(...) --------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._open().__await__()

    # -- async with connect(...) as conn ---------------------------------------------------

    async def __aenter__(self) -> Connection:
        self._conn = await self._open()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    # -- async for conn in connect(...) ------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[Connection]:
        """Connect, yield the connection, and when the loop body comes back for the
        next one (the connection closed, say), close it and connect again.

        A failed attempt is retried after a backoff delay if it may succeed later: an
        ``OSError`` (refused, unreachable, reset, TLS other than an untrusted
        certificate), ``TimeoutError``, or an :class:`InvalidHandshake` without a
        status or with 500, 502, 503 or 504. Anything else (a 4xx refusal, a bad
        ``Sec-WebSocket-Accept``, an untrusted certificate) is raised.
        """
        delays: Generator[float, None, None] | None = None
        while True:
            try:
                conn = await self._open()
            except Exception as exc:
                if not _retryable(exc):
                    raise
                if delays is None:
                    delays = self._backoff()
                delay = next(delays)
                logger.info(
                    "connecting to %s failed (%s); retrying in %.2f s", self.url, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            delays = None
            try:
                yield conn
            finally:
                await conn.close()

    def _backoff(self) -> Generator[float, None, None]:
        """websockets' schedule: a random share of the initial delay (so that many
        clients dropped at once do not all come back at once), then exponential."""
        yield random.random() * self.backoff_initial_delay
        delay = self.backoff_min_delay
        while delay < self.backoff_max_delay:
            yield delay
            delay *= self.backoff_factor
        while True:
            yield self.backoff_max_delay

    # -- the opening -----------------------------------------------------------------------

    async def _open(self) -> Connection:
        loop = asyncio.get_running_loop()
        client = _client_for(loop)
        client.opening += 1
        try:
            fut, token = _lightws.client_connect(
                client.core,
                self.url,
                self.subprotocols,
                self.headers,
                self.cafile,
                self.max_msg_len,
                self.open_timeout,
                self.close_timeout,
                self.ping_interval,
                self.ping_timeout,
                self.auto_pong,
                self.write_limit,
                int(self.log_level),
            )
            try:
                result = await fut
            except asyncio.CancelledError:
                _lightws.client_cancel(client.core, token)
                if fut.done() and not fut.cancelled() and fut.result()[0] == "ok":
                    # Connected just as the wait was cancelled: nobody will use it.
                    fut.result()[1].abort()
                raise
        finally:
            client.opening -= 1
            client.check_idle()
        return self._connected(result)

    def _connected(self, result: tuple[Any, ...]) -> Connection:
        if result[0] != "ok":
            raise _exception(result)
        _, conn, (status, _reason, headers), target, request_headers, remote = result
        conn._init(Request("GET", target, request_headers, remote, self.subprotocols, True))
        response = Response()
        response.status = status
        response.headers = Headers(headers)
        response.subprotocol = conn.subprotocol
        conn.response = response
        return conn  # type: ignore[no-any-return]


def _exception(result: tuple[Any, ...]) -> Exception:
    """The exception for a failed opening (bridge/client.rs, ``error_tuple``)."""
    kind, message, response, body, errno = result
    if kind in ("refused", "invalid"):
        if response is None:
            return InvalidHandshake(message, body=body)
        status, reason, headers = response
        return InvalidHandshake(message, status, Headers(headers), body, reason)
    if kind == "timeout":
        return TimeoutError(message)
    if kind == "certificate":
        return ssl.SSLCertVerificationError(message)
    if kind == "tls":
        return ssl.SSLError(message)
    if kind == "gaierror":
        return socket.gaierror(message)
    if errno is not None:
        return OSError(errno, message)
    return OSError(message)


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, InvalidHandshake):
        return exc.status is None or exc.status in _RETRY_STATUSES
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    return isinstance(exc, OSError)


class _Client:
    """The client core of one event loop, with its registration on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.core = _lightws.client_core(self._log, loop, self._on_idle)
        #: Openings in progress (not yet connections of the core).
        self.opening = 0
        self.closed = False
        self.fd = self.core.fd()
        loop.add_reader(self.fd, self.core.drain)

    def _on_idle(self) -> None:
        # Called from the core's drain: shut down after it, if still idle then.
        self.check_idle()

    def check_idle(self) -> None:
        if not self.closed and self.opening == 0:
            self.loop.call_soon(self._shutdown_if_idle)

    def _shutdown_if_idle(self) -> None:
        if self.closed or self.opening or self.core.connections():
            return
        self.closed = True
        if _clients.get(self.loop) is self:
            del _clients[self.loop]
        self.loop.remove_reader(self.fd)
        self.core.shutdown()

    def _log(self, level: int, conn_id: int | None, addr: str | None, msg: str) -> None:
        pylevel = _LEVELS.get(LogLevel(level), logging.ERROR)
        if not logger.isEnabledFor(pylevel):
            return
        extra = {"conn_id": conn_id, "remote_address": addr}
        if conn_id is not None:
            logger.log(pylevel, "[%s #%d] %s", addr, conn_id, msg, extra=extra)
        else:
            logger.log(pylevel, "%s", msg, extra=extra)


#: The client core of each event loop that has client connections.
_clients: dict[asyncio.AbstractEventLoop, _Client] = {}


def _client_for(loop: asyncio.AbstractEventLoop) -> _Client:
    client = _clients.get(loop)
    if client is None or client.closed:
        _abandon_closed_loops()
        client = _clients[loop] = _Client(loop)
    return client


def _abandon_closed_loops() -> None:
    """Stop the cores of loops that were closed with client connections still open
    (``asyncio.run`` does not close them): their sockets are closed and their I/O
    thread ends. Done when another loop connects, and at exit."""
    for loop in [lp for lp in _clients if lp.is_closed()]:
        client = _clients.pop(loop)
        client.closed = True
        _lightws.client_abandon(client.core)


atexit.register(_abandon_closed_loops)
