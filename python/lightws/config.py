"""Server configuration: :class:`Config`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ._types import LogLevel

if TYPE_CHECKING:
    from ._lightws import Connection
    from .http import Request, Response
    from .listener import Accept, Listener

__all__ = ["Config", "Deflate", "Handler", "HandshakeFunc"]

#: A per-connection handler: ``async def handler(conn: Connection) -> None``. Any
#: callable whose call returns an awaitable works (``functools.partial`` of an async
#: function, an object with ``async def __call__``); it is called just before the 101
#: is sent, and one that raises or returns something else is answered with 500.
Handler = Callable[["Connection"], Awaitable[None]]

#: The handshake callable: ``(request, response) -> Handler | Listener | Accept | None``,
#: sync or async. A :class:`~lightws.Listener` (or any object with some of its methods)
#: or :class:`~lightws.Accept` makes a connection without a coroutine.
HandshakeFunc = Callable[
    ["Request", "Response"],
    "Handler | Listener | Accept | Awaitable[Handler | Listener | Accept | None] | None",
]


@dataclass(kw_only=True)
class Deflate:
    """permessage-deflate (RFC 7692) for :attr:`Config.compression`. Keyword-only.

    Offered by every browser; JSON traffic typically shrinks by 50-80%. lightws
    compresses and inflates on its tokio threads, never on the event loop, and keeps
    per connection only the ``2 ** window_bits`` bytes that context takeover needs
    (nothing at all with no context takeover): see docs/guide.md, "Compression".
    """

    #: Largest window the server compresses with, 8-15 (a client may ask for less).
    #: With context takeover a connection keeps at most 2 KiB of what it sent, whatever
    #: the window. Default 12 (4 KiB).
    server_max_window_bits: int = 12
    #: Largest window the server asks clients to compress with (8-15), when their offer
    #: lets it ask (browsers' does); the server keeps ``2 ** bits`` bytes per connection
    #: for it (with context takeover). Default 12.
    client_max_window_bits: int = 12
    #: Compress each message on its own (no window kept between messages): less
    #: compression, no memory per connection, and a published message is compressed
    #: once for all its subscribers. Default False.
    server_no_context_takeover: bool = False
    #: Ask clients to compress each message on its own: no window kept per connection
    #: for inflating. Default False.
    client_no_context_takeover: bool = False
    #: zlib level 0-9 (0 stores, 1 fastest, 9 smallest). Default 6.
    level: int = 6
    #: Messages shorter than this many bytes are sent uncompressed (unless sent with
    #: ``compress=True``). Default 64.
    min_size: int = 64


@dataclass(kw_only=True)
class Config:
    """Everything a :class:`lightws.Server` needs. Keyword-only.

    Values are checked when the server starts (``ValueError``/``TypeError``/``OSError``
    with the field named), before any connection is accepted.
    """

    #: ``"host:port"``; ``":port"`` listens on every interface; port 0 picks a free port.
    addr: str
    #: Called for each upgrade request; returns a handler to accept or None to reject.
    handshake: HandshakeFunc
    #: PEM certificate chain(s) for TLS; comma-separated lists pair with ``key_file`` by
    #: index and are chosen by SNI (the first is the default). Default None (plain TCP).
    cert_file: str | None = None
    #: PEM private key(s) matching ``cert_file``. Default None.
    key_file: str | None = None
    #: Largest message buffered, in bytes; larger ones close with 1009 before any of the
    #: payload is buffered. Default 1 MiB.
    max_msg_len: int = 1 << 20
    #: SO_RCVBUF / SO_SNDBUF in bytes. None (default) keeps the kernel's autotuning.
    sock_read_buffer: int | None = None
    sock_write_buffer: int | None = None
    #: Bytes for the HTTP request head; a larger head is answered with 431. Default 4096.
    http_read_buffer: int = 4096
    #: Initial buffer for HTTP responses. Default 4096.
    http_write_buffer: int = 4096
    #: Initial read size for frames (min 16); buffers grow to need and are released
    #: when the connection is idle. Default 4096.
    ws_read_buffer: int = 4096
    #: Deprecated, no effect: lightws has no fixed-size frame write buffer (frames are
    #: encoded straight into each connection's outbox, which grows to need and is
    #: released once written). Still checked (min 16); a value other than the default
    #: 4096 warns with DeprecationWarning at start. Will be removed.
    ws_write_buffer: int = 4096
    #: Count connections currently reading / writing in ``stats()``. Default False.
    io_statistics: bool = False
    #: What this server logs to the ``"lightws"`` logger; DEBUG logs every frame. A
    #: filter per server: the logger's own level (never set by lightws) and handlers
    #: still apply, so INFO/DEBUG records also need logging configured at that level.
    log_level: LogLevel = LogLevel.ERROR
    #: Seconds to complete the TLS handshake and receive the HTTP request. Default 3.
    handshake_read_timeout: float = 3.0
    #: Seconds to send the HTTP response. Default 3.
    handshake_write_timeout: float = 3.0
    #: Seconds to wait for the peer's close frame after ours. Default 5.
    close_timeout: float = 5.0
    #: TCP keepalive idle time in seconds; 0 (default) leaves it off.
    tcp_keepalive: float = 0
    #: Answer pings in Rust; pings and pongs then never reach ``recv()``. Default True.
    auto_pong: bool = True
    #: Send a ping after this many idle seconds. None (default) disables keepalive pings.
    ping_interval: float | None = None
    #: Close with 1011 when a keepalive ping gets no pong within this many seconds.
    #: Default None (= ping_interval).
    ping_timeout: float | None = None
    #: Close with 1001 after this many seconds without a frame. Default None (never).
    idle_timeout: float | None = None
    #: ``send()`` waits once more than this many bytes are queued. Default 64 KiB.
    write_limit: int = 64 * 1024
    #: Answer 503 to connections beyond this many. 0 (default) means no limit.
    max_connections: int = 0
    #: Bytes a connection may have queued and unwritten before a fanned-out message
    #: (``server.publish``, ``lightws.broadcast``) to it triggers ``on_backpressure``.
    #: Default 1 MiB. Publishers never wait for a slow consumer.
    max_backpressure: int = 1 << 20
    #: What a fanned-out message that would take a connection over
    #: ``max_backpressure`` does: ``"close"`` (default) closes that connection with 1013
    #: (Try Again Later: the client reconnects and resyncs), ``"drop"`` skips the
    #: message for that connection. See docs/pubsub.md.
    on_backpressure: Literal["close", "drop"] = "close"
    #: Origins allowed to open a WebSocket (defence against cross-site WebSocket
    #: hijacking, RFC 6455 section 10.2): ``"scheme://host[:port]"`` entries such as
    #: ``"https://app.example"``; scheme and host compare case-insensitively and a
    #: default port (80/443) may be written or left out. A ``None`` entry admits requests
    #: without an ``Origin`` header (non-browser clients). Any other upgrade gets 403
    #: before the handshake callable runs. None (default) checks nothing. See
    #: docs/security.md.
    origins: Sequence[str | None] | None = None
    #: Answer 429 to a client address's connections beyond this many (an IPv4 address,
    #: or an IPv6 /64), counting those still in their handshake; before the handshake
    #: callable runs. 0 (default) means no limit.
    max_connections_per_ip: int = 0
    #: Proxies (IP addresses or CIDR networks such as ``"10.0.0.0/8"``) whose
    #: ``X-Forwarded-For`` header names the client: its right-most address that is not a
    #: trusted proxy becomes ``request.remote_address`` (with port 0) and the address
    #: ``max_connections_per_ip`` counts. Other peers' ``X-Forwarded-For`` is ignored.
    #: Default ``()``.
    trusted_proxies: Sequence[str] = ()
    #: permessage-deflate (RFC 7692): ``lightws.Deflate(...)`` offers compression to
    #: clients that ask for it; messages of at least ``min_size`` bytes are compressed
    #: (``send(..., compress=...)`` decides per message). None (default): off, since
    #: compression costs CPU and, with context takeover, a window per connection.
    compression: Deflate | None = None
    #: listen() backlog. Default 1024.
    backlog: int = 1024
    #: Tokio worker threads doing the I/O. Default 1. 0: plain-TCP connections are
    #: driven on the event-loop thread after the upgrade (one tokio thread still
    #: accepts, does TLS and the handshakes): the lowest latency for few connections,
    #: less throughput for many (docs/guide.md, "Threads and latency").
    threads: int = 1
    #: Set SO_REUSEPORT on the listening socket, so several processes can listen on the
    #: same address and the kernel spreads new connections over them (what
    #: ``python -m lightws serve --workers N`` does). Default False.
    reuse_port: bool = False
    #: The pub/sub backplane: a ``redis://[user:password@]host:port[/db]`` URL (Redis 6+
    #: or Valkey; ``redis+unix:///path`` for a socket). ``server.publish`` then also
    #: reaches the subscribers of every server configured with the same URL, through
    #: Redis PUBLISH/SUBSCRIBE on channel ``lightws:<topic>`` (subscribed only while this
    #: server has a local subscriber). At-most-once; ``exclude`` applies to this server
    #: only. Redis unreachable at start raises ``OSError``; lost later, local delivery
    #: goes on and the server reconnects (``stats().pubsub``). See docs/deploy.md.
    #: Default None (this server only).
    pubsub: str | None = None
    #: Show non-upgrade HTTP requests to the handshake callable (``request.upgrade`` is
    #: False); it answers with ``response.status/headers/body`` and returns None
    #: (status defaults to 200 with a body, 404 without). Default False: they get 400.
    http_fallback: bool = False
