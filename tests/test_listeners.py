"""Connections without a coroutine (DESIGN section 4): listeners, ``lightws.Accept`` and
``conn.send_nowait``.

The handshake callable may return, instead of a handler coroutine function, a
*listener* (an object with some of ``on_open(conn)``, ``on_message(conn, msg)``,
``on_close(conn, code, reason)``, plain methods called on the loop thread) or
``lightws.Accept(topics=..., listener=None)``. These tests drive such servers with real
clients (the ``websockets`` client, and the raw client where the frames themselves
matter): the order and arguments of the calls, echo through ``send_nowait``, the errors
it raises, exceptions in listener methods (1011, logged), closing and aborting from a
listener, topics, ``Accept`` connections receiving publishes, ``send_nowait``
back-pressure under both policies, ``server.close()``, the identity of the
``Connection`` objects handed to listener methods, and the coroutine API beside them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import os
import socket
import struct
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import lightws
import pytest
from support import eventually, serve, url
from support.rawws import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    RawWebSocket,
    build_frame,
    read_response,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

Opcode = lightws.Opcode
Message = lightws.Message

#: Generous bound for waits on the server (a loaded 2-core CI machine); never asserted.
WAIT = 10.0


# -- helpers ---------------------------------------------------------------------------


def returning(result: Any) -> Callable[[lightws.Request, lightws.Response], Any]:
    """A handshake that accepts every upgrade with ``result`` (a listener, an Accept)."""

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        return result

    return handshake


def routes(by_path: dict[str, Any]) -> Callable[[lightws.Request, lightws.Response], Any]:
    """A handshake (async, as handshakes may be) that accepts each path with what
    ``by_path`` gives for it (a handler, a listener, an Accept); others are rejected."""

    async def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        await asyncio.sleep(0)
        return by_path.get(request.path)

    return handshake


class Recorder:
    """A listener that records every call, per connection id, in call order.

    ``events[conn_id]`` is a list of ``("open",)``, ``("message", opcode, body)`` and
    ``("close", code, reason)``; ``order`` is every call over all connections. With
    ``echo=True`` each message is sent back with ``conn.send_nowait``.
    """

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.events: dict[int, list[tuple[Any, ...]]] = {}
        self.order: list[tuple[str, int]] = []
        #: The path of each connection's request, read in on_open.
        self.paths: dict[int, str] = {}
        #: The threads the methods were called on.
        self.threads: set[int] = set()

    def _add(self, conn: lightws.Connection, event: tuple[Any, ...]) -> None:
        self.events.setdefault(conn.id, []).append(event)
        self.order.append((event[0], conn.id))
        self.threads.add(threading.get_ident())

    def on_open(self, conn: lightws.Connection) -> None:
        self.paths[conn.id] = conn.request.path
        self._add(conn, ("open",))

    def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        self._add(conn, ("message", msg.opcode, msg.body))
        if self.echo:
            conn.send_nowait(msg)

    def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
        self._add(conn, ("close", code, reason))

    def closes(self) -> list[tuple[Any, ...]]:
        return [e for events in self.events.values() for e in events if e[0] == "close"]

    def only(self) -> list[tuple[Any, ...]]:
        """The events of the one connection seen (fails if there were several)."""
        assert len(self.events) == 1, self.events
        return next(iter(self.events.values()))


async def recv(ws: ClientConnection) -> Any:
    return await asyncio.wait_for(ws.recv(), WAIT)


async def closed_client(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Wait for the websockets client to finish closing; (code, reason)."""
    await asyncio.wait_for(ws.wait_closed(), WAIT)
    return ws.close_code, ws.close_reason


def send_outcome(conn: lightws.Connection, value: object) -> str:
    """``"sent"``, or the name of the exception ``conn.send_nowait(value)`` raised."""
    try:
        conn.send_nowait(value)  # type: ignore[arg-type]
    except lightws.ConnectionClosed:
        return "ConnectionClosed"  # ConnectionClosedOK or ConnectionClosedError
    except (TypeError, ValueError) as e:
        return type(e).__name__
    return "sent"


def lightws_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lightws" and r.levelno >= logging.ERROR]


def reset(ws: RawWebSocket) -> None:
    """End the TCP connection with RST (SO_LINGER 0): no close frame, no FIN."""
    sock = ws.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.writer.transport.abort()


async def frames_until_eof(ws: RawWebSocket) -> list[int]:
    """The opcodes of every frame the server sends until it ends the connection."""
    opcodes: list[int] = []
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            opcodes.append((await ws.recv_frame(WAIT)).opcode)
    return opcodes


@contextlib.asynccontextmanager
async def slow_reader(port: int, path: str = "/") -> AsyncIterator[RawWebSocket]:
    """A raw client with a small receive buffer that stops reading after its 101, so
    that what the server sends it piles up in the server's queue."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = await read_response(reader)
    assert response.status == 101, response
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    ws = RawWebSocket(reader, writer, response)
    try:
        yield ws
    finally:
        writer.close()


# -- open, message, close --------------------------------------------------------------


async def test_on_open_on_message_on_close_in_order_with_the_close_code_and_reason() -> None:
    rec = Recorder()
    async with serve(returning(rec)) as server:
        async with connect(url(server, "/first")) as ws:
            await ws.send("text")
            await ws.send(b"\x00binary")
            await ws.close(1000, "bye")
        await eventually(lambda: rec.closes() != [], what="on_close")
    assert rec.only() == [
        ("open",),
        ("message", Opcode.TEXT, b"text"),
        ("message", Opcode.BINARY, b"\x00binary"),
        ("close", 1000, "bye"),
    ]
    assert list(rec.paths.values()) == ["/first"]
    assert rec.threads == {threading.get_ident()}  # the event loop's thread


async def test_no_asyncio_task_runs_for_a_listener_or_accept_connection() -> None:
    rec = Recorder(echo=True)

    async def handler(conn: lightws.Connection) -> None:
        async for msg in conn:
            await conn.send(msg)

    handshake = routes({"/": rec, "/accept": lightws.Accept(topics=["t"]), "/coroutine": handler})
    async with serve(handshake) as server:
        before = len(asyncio.all_tasks())
        # Raw clients: asyncio streams start no task of their own.
        clients = [await RawWebSocket.connect(server.port) for _ in range(10)]
        clients += [await RawWebSocket.connect(server.port, "/accept") for _ in range(10)]
        try:
            for ws in clients[:10]:
                await ws.send_frame(TEXT, b"hi")
                assert await ws.recv_message() == (TEXT, b"hi")
            await eventually(lambda: server.subscribers("t") == 10, what="Accept subscribed")
            assert len(asyncio.all_tasks()) == before
            assert all(c._handler_task is None for c in server.connections)
            # The measure works: coroutine handlers do add a task each.
            clients += [await RawWebSocket.connect(server.port, "/coroutine") for _ in range(3)]
            await eventually(lambda: len(asyncio.all_tasks()) == before + 3, what="3 tasks")
        finally:
            for ws in clients:
                await ws.__aexit__()


async def test_on_open_comes_first_even_for_data_sent_with_the_upgrade() -> None:
    """Frames in the same TCP write as the upgrade request (so already buffered when
    the connection is accepted) still reach on_message only after on_open; a
    fragmented message arrives whole; a ping is answered in Rust and not delivered."""
    rec = Recorder()
    early = build_frame(TEXT, b"early") + build_frame(TEXT, b"frag", fin=False)
    early += build_frame(PING, b"p") + build_frame(CONT, b"mented")
    async with serve(returning(rec)) as server:
        async with await RawWebSocket.connect(server.port, first_bytes=early) as ws:
            pong = await ws.recv_frame()
            assert (pong.opcode, pong.payload) == (PONG, b"p")
            await ws.send_close(1001, b"going")
            assert (await ws.read_close())[0] == 1001
        await eventually(lambda: rec.closes() != [], what="on_close")
    assert rec.only() == [
        ("open",),
        ("message", Opcode.TEXT, b"early"),
        ("message", Opcode.TEXT, b"fragmented"),
        ("close", 1001, "going"),
    ]


async def test_a_reset_connection_gets_on_close_1006() -> None:
    rec = Recorder()
    async with serve(returning(rec)) as server:
        ws = await RawWebSocket.connect(server.port)
        await ws.send_frame(BINARY, b"last")
        await eventually(lambda: len(rec.order) == 2, what="on_open and on_message")
        reset(ws)
        await eventually(lambda: rec.closes() != [], what="on_close")
    [open_, message, (kind, code, reason)] = rec.only()
    assert (open_, message) == (("open",), ("message", Opcode.BINARY, b"last"))
    assert (kind, code) == ("close", 1006)
    assert isinstance(reason, str)


async def test_on_close_is_called_once_per_connection() -> None:
    rec = Recorder()
    async with serve(returning(rec)) as server:
        async with connect(url(server)) as ws:
            await ws.send("x")
        # The server closes the rest of the way; nothing more may be called after that,
        # even once the server itself closes.
        await eventually(lambda: rec.closes() != [], what="on_close")
    assert [e[0] for e in rec.only()] == ["open", "message", "close"]


# -- send_nowait -----------------------------------------------------------------------

#: How the echo listener turns a received body into what it passes to send_nowait, and
#: the opcode the client must then receive.
SENDABLES: dict[str, tuple[Callable[[bytes], Any], int]] = {
    "str": (lambda body: body.decode(), TEXT),
    "bytes": (bytes, BINARY),
    "bytearray": (bytearray, BINARY),
    "memoryview": (memoryview, BINARY),
    "Message-TEXT": (lambda body: Message(Opcode.TEXT, body), TEXT),
    "Message-BINARY": (lambda body: Message(Opcode.BINARY, body), BINARY),
    "Message-PING": (lambda body: Message(Opcode.PING, body), PING),
    "Message-PONG": (lambda body: Message(Opcode.PONG, body), PONG),
}


@pytest.mark.parametrize("kind", list(SENDABLES))
async def test_send_nowait_echoes_each_kind_of_message_with_its_opcode(kind: str) -> None:
    make, opcode = SENDABLES[kind]
    returned: list[object] = []

    class Echo:
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            returned.append(conn.send_nowait(make(msg.body)))

    body = "héllo wörld".encode()
    async with serve(returning(Echo())) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, body)
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.payload, frame.fin) == (opcode, body, True)
            await ws.send_close(1000)
            assert (await ws.read_close())[0] == 1000
    assert returned == [None]


async def test_send_nowait_takes_the_bytes_at_the_call() -> None:
    """It queues at once: changing a bytearray after the call changes nothing sent."""

    class Echo:
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            buf = bytearray(msg.body)
            conn.send_nowait(memoryview(buf))
            conn.send_nowait(buf)
            buf[:] = b"changed"

    async with serve(returning(Echo())) as server, connect(url(server)) as ws:
        await ws.send(b"original")
        assert await recv(ws) == b"original"
        assert await recv(ws) == b"original"


async def test_send_nowait_rejects_what_it_cannot_send_and_the_connection_stays_usable() -> None:
    outcomes: list[str] = []
    bad: list[object] = [
        123,
        None,
        ["a list"],
        Message(Opcode.PING, b"x" * 126),
        Message(Opcode.PONG, b"y" * 126),
    ]

    class Picky:
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            outcomes.extend(send_outcome(conn, value) for value in bad)
            conn.send_nowait(Message(Opcode.PING, b"z" * 125))  # the largest allowed
            conn.send_nowait("still open")

    async with serve(returning(Picky())) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"go")
            ping = await ws.recv_frame()
            assert (ping.opcode, ping.payload) == (PING, b"z" * 125)
            assert await ws.recv_message() == (TEXT, b"still open")
            await ws.send_close(1000)
            assert (await ws.read_close())[0] == 1000
    assert outcomes == ["TypeError", "TypeError", "TypeError", "ValueError", "ValueError"]


async def test_send_nowait_on_a_closed_connection_raises_connection_closed() -> None:
    kept: list[lightws.Connection] = []
    in_on_close: list[str] = []

    class Keeper:
        def on_open(self, conn: lightws.Connection) -> None:
            kept.append(conn)

        def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
            in_on_close.append(send_outcome(conn, "too late"))

    async with serve(returning(Keeper())) as server:
        async with connect(url(server)) as ws:
            await ws.send("hello")
        await eventually(lambda: in_on_close != [], what="on_close")
        assert in_on_close == ["ConnectionClosed"]
        [conn] = kept
        assert conn.closed
        with pytest.raises(lightws.ConnectionClosed):
            conn.send_nowait("later still")
        with pytest.raises(lightws.ConnectionClosed):
            conn.send_nowait(b"bytes too")


async def test_send_nowait_after_close_in_the_same_call_raises_connection_closed() -> None:
    """A closing connection (close() called, handshake not finished) refuses too."""
    outcomes: list[str] = []

    class CloseThenSend:
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            _ = conn.close(4000, "closing")
            outcomes.append(send_outcome(conn, "after close"))

    async with serve(returning(CloseThenSend())) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"close please")
            # The close frame is the first (and only) frame: nothing was sent after it.
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.close_code) == (CLOSE, 4000)
            await ws.send_close(4000)
    assert outcomes == ["ConnectionClosed"]


async def test_send_nowait_and_publish_arrive_in_call_order() -> None:
    rounds = 200

    class Mixer:
        def on_open(self, conn: lightws.Connection) -> None:
            conn.subscribe("mix")

        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            server = conn.server
            assert server is not None
            for i in range(rounds):
                conn.send_nowait(f"s{i}")
                server.publish("mix", f"p{i}")
            conn.send_nowait("end")

    async with serve(returning(Mixer())) as server:
        async with connect(url(server), max_queue=None) as ws:
            await ws.send("go")
            got = [await recv(ws) for _ in range(2 * rounds + 1)]
    assert got == [m for i in range(rounds) for m in (f"s{i}", f"p{i}")] + ["end"]


# -- exceptions in listener methods ----------------------------------------------------


class Failing:
    """Raises in the method named ``where`` (on the message b"boom" for on_message)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.messages: list[bytes] = []
        self.closes: list[int] = []

    def on_open(self, conn: lightws.Connection) -> None:
        if self.where == "on_open":
            raise RuntimeError("open boom")

    def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        self.messages.append(msg.body)
        if self.where == "on_message" and msg.body == b"boom":
            raise RuntimeError("message boom")

    def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
        self.closes.append(code)
        if self.where == "on_close":
            raise RuntimeError("close boom")


@pytest.mark.parametrize("where", ["on_open", "on_message"])
async def test_an_exception_in_on_open_or_on_message_closes_1011_and_is_logged(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="lightws")
    listener = Failing(where)
    # Sent with the upgrade: both messages are there before on_open runs, so nothing
    # but the listener's failure keeps "after" from being delivered.
    early = build_frame(TEXT, b"boom") + build_frame(TEXT, b"after")
    async with serve(returning(listener)) as server:
        async with await RawWebSocket.connect(server.port, first_bytes=early) as ws:
            assert (await ws.read_close())[0] == 1011
            await ws.send_close(1011)
            assert await ws.at_eof()
        await eventually(lambda: listener.closes != [], what="on_close")
    assert listener.messages == ([] if where == "on_open" else [b"boom"])
    assert listener.closes == [1011]
    [record] = [r for r in lightws_errors(caplog) if r.exc_info and r.exc_info[1]]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert str(record.exc_info[1]) == ("open boom" if where == "on_open" else "message boom")
    assert "1011" in record.getMessage()


async def test_an_exception_in_on_close_is_logged_and_the_server_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="lightws")
    listener = Failing("on_close")
    async with serve(returning(listener)) as server:
        for i in range(2):
            async with connect(url(server)) as ws:
                await ws.send(f"m{i}")
            await eventually(lambda n=i: len(listener.closes) == n + 1, what="on_close")
    assert listener.messages == [b"m0", b"m1"]
    assert listener.closes == [1000, 1000]
    errors = lightws_errors(caplog)
    assert len(errors) == 2, [r.getMessage() for r in errors]
    for record in errors:
        assert record.exc_info is not None
        assert str(record.exc_info[1]) == "close boom"


class AsyncOpen:
    """A mistake: ``async def on_open``."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.closes: list[int] = []

    async def on_open(self, conn: lightws.Connection) -> None:
        self.ran.append("on_open")

    def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        self.ran.append("on_message")

    def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
        self.closes.append(code)


class AsyncMessage(AsyncOpen):
    """A mistake: ``async def on_message``."""

    def on_open(self, conn: lightws.Connection) -> None:  # type: ignore[override]
        pass

    async def on_message(  # type: ignore[override]
        self, conn: lightws.Connection, msg: lightws.Message
    ) -> None:
        self.ran.append("on_message")


@pytest.mark.parametrize("listener_class", [AsyncOpen, AsyncMessage])
async def test_an_async_listener_method_is_a_mistake_logged_with_a_hint_and_closed_1011(
    listener_class: type[AsyncOpen], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="lightws")
    listener = listener_class()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with serve(returning(listener)) as server:
            async with connect(url(server)) as ws:
                with contextlib.suppress(Exception):
                    await ws.send("anything")
                code, _ = await closed_client(ws)
                assert code == 1011
            await eventually(lambda: listener.closes != [], what="on_close")
        gc.collect()
    # The coroutine was created, never run; nothing was called after the mistake.
    assert listener.ran == []
    [record] = lightws_errors(caplog)
    text = record.getMessage()
    assert any(word in text for word in ("async", "await", "coroutine")), text
    never_awaited = [w for w in caught if "never awaited" in str(w.message)]
    assert never_awaited == [], "the coroutine was not closed"


async def test_connection_closed_out_of_a_listener_method_is_no_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A send_nowait on a connection that is closing raises ConnectionClosed; letting it
    escape is no failure (as from a handler): nothing logged, and the close goes on
    with its own code, not 1011."""
    caplog.set_level(logging.ERROR, logger="lightws")
    rec = Recorder()

    class Careless:
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            rec.on_message(conn, msg)
            _ = conn.close(4001, "done")
            conn.send_nowait("after close")  # raises ConnectionClosed, not caught

        def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
            rec.on_close(conn, code, reason)

    async with serve(returning(Careless())) as server:
        async with connect(url(server)) as ws:
            await ws.send("close")
            assert (await closed_client(ws))[0] == 4001
        await eventually(lambda: rec.closes() != [], what="on_close")
    assert [c[1] for c in rec.closes()] == [4001]
    assert lightws_errors(caplog) == []


async def test_many_messages_at_once_all_reach_on_message_in_order() -> None:
    """More messages than a listener is handed in one go (the rest come after the other
    events), sent in one write: every one arrives, once, in order."""
    rec = Recorder()
    n = 500
    burst = b"".join(build_frame(TEXT, str(i).encode()) for i in range(n))
    async with serve(returning(rec)) as server:
        async with await RawWebSocket.connect(server.port, first_bytes=burst) as ws:
            await ws.send_frame(PING, b"done?")
            # Answered in order after the burst was read: every message is queued by now.
            assert (await ws.recv_frame()).opcode == PONG
            await eventually(lambda: len(rec.order) == n + 1, what="every message")
            await ws.send_close(1000)
            assert (await ws.read_close())[0] == 1000
        await eventually(lambda: rec.closes() != [], what="on_close")
    bodies = [e[2] for e in rec.only() if e[0] == "message"]
    assert bodies == [str(i).encode() for i in range(n)]


async def test_recv_and_reader_on_a_listener_connection_raise_runtime_error() -> None:
    """Its messages go to on_message (or nowhere, for Accept): reading them with the
    coroutine API is a mistake, said at once."""
    errors: list[str] = []
    kept: list[lightws.Connection] = []

    class Reader:
        def on_open(self, conn: lightws.Connection) -> None:
            kept.append(conn)

    handshake = routes({"/": Reader(), "/accept": lightws.Accept(topics=["t"])})
    async with serve(handshake) as server:
        async with connect(url(server)), connect(url(server, "/accept")):
            await eventually(lambda: len(server.connections) == 2, what="both open")
            for conn in server.connections:
                for attempt in (conn.recv, conn.reader):
                    try:
                        awaitable: Any = attempt()
                        await asyncio.wait_for(awaitable, WAIT)
                    except RuntimeError as e:
                        errors.append(str(e))
    assert len(errors) == 4, errors


async def test_a_listener_class_instead_of_an_instance_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="lightws")

    class Echo(lightws.Listener):
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            conn.send_nowait(msg)

    with pytest.raises(TypeError):
        lightws.Accept(listener=Echo)
    with pytest.raises(TypeError):
        lightws.Accept(listener=object())
    async with serve(returning(Echo)) as server:
        with pytest.raises(InvalidStatus) as refused:
            await asyncio.wait_for(connect(url(server)), WAIT)
        assert refused.value.response.status_code == 500
        await eventually(lambda: lightws_errors(caplog) != [], what="logged")
    [record] = lightws_errors(caplog)
    assert "Echo()" in record.getMessage()


# -- which methods a listener has ------------------------------------------------------


async def test_a_listener_with_only_on_message_echoes_and_closes_normally() -> None:
    class OnlyMessage:
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            conn.send_nowait(msg)

    async with serve(returning(OnlyMessage())) as server:
        async with connect(url(server)) as ws:
            await ws.send("one")
            assert await recv(ws) == "one"
            await ws.close(1000, "done")
        assert ws.close_code == 1000


async def test_a_listener_with_only_on_open_greets_and_ignores_messages() -> None:
    class OnlyOpen:
        def on_open(self, conn: lightws.Connection) -> None:
            conn.send_nowait("welcome")

    async with serve(returning(OnlyOpen())) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            assert await ws.recv_message() == (TEXT, b"welcome")
            await ws.send_frame(TEXT, b"ignored")
            await ws.send_frame(PING, b"still there?")
            # The message went nowhere: the next frame is the pong.
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.payload) == (PONG, b"still there?")
            await ws.send_close(1000)
            assert (await ws.read_close())[0] == 1000


async def test_a_listener_with_only_on_close_gets_the_code() -> None:
    codes: list[tuple[int, str]] = []

    class OnlyClose:
        def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
            codes.append((code, reason))

    async with serve(returning(OnlyClose())) as server:
        async with connect(url(server)) as ws:
            await ws.send("dropped")
            await ws.close(4321, "custom")
        await eventually(lambda: codes != [], what="on_close")
    assert codes == [(4321, "custom")]


async def test_the_listener_base_class_has_no_op_methods_to_override() -> None:
    base = lightws.Listener()
    assert all(callable(getattr(base, m)) for m in ("on_open", "on_message", "on_close"))

    class Echo(lightws.Listener):
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            conn.send_nowait(msg.text.upper())

    async with serve(returning(Echo())) as server:
        async with connect(url(server)) as ws:
            await ws.send("shout")
            assert await recv(ws) == "SHOUT"
        assert ws.close_code == 1000
    # The base class alone: accepted, messages dropped, closes normally.
    async with serve(returning(lightws.Listener())) as server:
        async with connect(url(server)) as ws:
            await ws.send("nobody listens")
            await asyncio.wait_for(await ws.ping(b"x"), WAIT)  # answered: still open
        assert ws.close_code == 1000


async def test_one_listener_instance_serves_many_connections() -> None:
    rec = Recorder(echo=True)
    n = 20
    async with serve(returning(rec)) as server:
        clients = [await connect(url(server, f"/c{i}")) for i in range(n)]
        try:
            for i, ws in enumerate(clients):
                await ws.send(f"from {i}")
            for i, ws in enumerate(clients):
                assert await recv(ws) == f"from {i}"
        finally:
            for ws in clients:
                await ws.close()
        await eventually(lambda: len(rec.closes()) == n, what="every on_close")
    assert len(rec.events) == n
    assert sorted(rec.paths.values()) == sorted(f"/c{i}" for i in range(n))
    for conn_id, events in rec.events.items():
        i = int(rec.paths[conn_id][2:])
        assert events == [
            ("open",),
            ("message", Opcode.TEXT, f"from {i}".encode()),
            ("close", 1000, ""),
        ]


# -- closing and aborting from a listener ----------------------------------------------


async def test_close_from_on_message_sends_the_code_and_reason() -> None:
    rec = Recorder()

    class Closer:
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            rec.on_message(conn, msg)
            _ = conn.close(4000, "x")  # its awaitable is ignored

        def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
            rec.on_close(conn, code, reason)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with serve(returning(Closer())) as server:
            async with connect(url(server)) as ws:
                await ws.send("close me")
                assert await closed_client(ws) == (4000, "x")
            await eventually(lambda: rec.closes() != [], what="on_close")
        gc.collect()
    [message, (kind, code, _)] = rec.only()
    assert message == ("message", Opcode.TEXT, b"close me")
    assert (kind, code) == ("close", 4000)
    assert [w for w in caught if "never awaited" in str(w.message)] == []


async def test_abort_from_on_message_drops_the_connection_without_a_close_frame() -> None:
    rec = Recorder()

    class Aborter:
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            rec.on_message(conn, msg)
            conn.abort()

        def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
            rec.on_close(conn, code, reason)

    async with serve(returning(Aborter())) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"abort")
            assert CLOSE not in await frames_until_eof(ws)
        await eventually(lambda: rec.closes() != [], what="on_close")
    [message, (kind, code, _)] = rec.only()
    assert message == ("message", Opcode.TEXT, b"abort")
    assert (kind, code) == ("close", 1006)


# -- topics ----------------------------------------------------------------------------


class Member:
    """Subscribes to "news" in on_open; commands drive topics and publishing."""

    def on_open(self, conn: lightws.Connection) -> None:
        conn.subscribe("news")
        conn.subscribe(f"conn:{conn.id}")

    def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        server = conn.server
        assert server is not None
        text = msg.text
        if text == "topics":
            conn.send_nowait(",".join(sorted(conn.topics)))
        elif text == "leave":
            conn.send_nowait(str(conn.unsubscribe("news")))
            conn.send_nowait(str(conn.unsubscribe("news")))
        elif text.startswith("pub "):
            n = server.publish("news", text[4:])
            conn.send_nowait(f"published to {n}")
        elif text == "others":
            n = server.publish("news", "not to me", exclude=conn)
            conn.send_nowait(f"excluded: {n}")


async def test_a_listener_subscribes_publishes_and_unsubscribes() -> None:
    async with serve(returning(Member())) as server:
        a = await connect(url(server), max_queue=None)
        b = await connect(url(server), max_queue=None)
        try:
            await eventually(lambda: server.subscribers("news") == 2, what="2 subscribers")
            assert server.publish("news", "from the server") == 2
            assert await recv(a) == "from the server"
            assert await recv(b) == "from the server"
            await a.send("pub from a")
            assert await recv(a) == "from a"
            assert await recv(a) == "published to 2"
            assert await recv(b) == "from a"
            await b.send("others")
            assert await recv(b) == "excluded: 1"
            assert await recv(a) == "not to me"
            await a.send("topics")
            [topic] = [t for t in (await recv(a)).split(",") if t != "news"]
            assert topic.startswith("conn:")
            assert server.publish(topic, "only a") == 1
            assert await recv(a) == "only a"
            await a.send("leave")
            assert (await recv(a), await recv(a)) == ("True", "False")
            assert server.subscribers("news") == 1
            assert server.publish("news", "b only") == 1
            assert await recv(b) == "b only"
        finally:
            await a.close()
            await b.close()
        await eventually(lambda: server.subscribers("news") == 0, what="unsubscribed on close")
        assert server.stats().subscriptions == 0


# -- Accept ----------------------------------------------------------------------------


async def test_accept_subscribes_every_connection_to_its_topics() -> None:
    async with serve(returning(lightws.Accept(topics=["news", "sport"]))) as server:
        clients = [await connect(url(server), max_queue=None) for _ in range(3)]
        try:
            await eventually(lambda: server.subscribers("news") == 3, what="3 subscribers")
            assert server.subscribers("sport") == 3
            assert server.stats().connections == 3
            assert server.publish("news", "headline") == 3
            assert server.publish("sport", b"\x01score") == 3
            assert server.publish("weather", "rain") == 0
            for ws in clients:
                assert await recv(ws) == "headline"
                assert await recv(ws) == b"\x01score"
            await clients[0].close()
            await eventually(lambda: server.subscribers("news") == 2, what="one left")
            assert server.subscribers("sport") == 2
            assert server.publish("news", "fewer") == 2
            for ws in clients[1:]:
                assert await recv(ws) == "fewer"
        finally:
            for ws in clients:
                await ws.close()
        await eventually(lambda: server.subscribers("news") == 0, what="all left")
        assert server.stats().topics == 0


@pytest.mark.parametrize(
    "topics",
    [
        lambda: ("a", "b"),
        lambda: {"a", "b"},
        lambda: (t for t in ["a", "b"]),
        lambda: iter(["a", "b"]),
    ],
    ids=["tuple", "set", "generator", "iterator"],
)
async def test_accept_takes_any_iterable_of_topics(topics: Callable[[], Iterable[str]]) -> None:
    accept = lightws.Accept(topics=topics())
    async with serve(returning(accept)) as server:
        # Two connections: a one-shot iterable must have been read once, not per use.
        async with connect(url(server)) as one, connect(url(server)) as two:
            await eventually(lambda: server.subscribers("b") == 2, what="subscribed")
            assert server.subscribers("a") == 2
            assert server.publish("a", "to a") == 2
            assert await recv(one) == "to a"
            assert await recv(two) == "to a"


def test_accept_refuses_a_bare_str_for_topics() -> None:
    with pytest.raises(TypeError):
        lightws.Accept(topics="news")


async def test_accept_with_a_topic_that_is_not_a_str_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Either ``Accept`` itself raises TypeError, or the upgrade is not accepted."""
    caplog.set_level(logging.ERROR, logger="lightws")
    try:
        accept = lightws.Accept(topics=["news", 42])  # type: ignore[list-item]
    except TypeError:
        return
    async with serve(returning(accept)) as server:
        with pytest.raises(Exception) as refused:
            async with connect(url(server)):
                pass
        assert "500" in str(refused.value)
        assert server.subscribers("news") == 0
    assert lightws_errors(caplog)


async def test_accept_discards_data_but_answers_pings_and_the_close_handshake() -> None:
    async with serve(returning(lightws.Accept(topics=["t"]))) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"ignored")
            await ws.send_frame(BINARY, b"\x00" * 100_000)
            await ws.send_frame(TEXT, b"frag", fin=False)
            await ws.send_frame(CONT, b"mented")
            await ws.send_frame(PING, b"anyone?")
            # Nothing echoed: the first frame back is the pong.
            pong = await ws.recv_frame()
            assert (pong.opcode, pong.payload) == (PONG, b"anyone?")
            await eventually(lambda: server.subscribers("t") == 1, what="subscribed")
            assert server.publish("t", "pushed") == 1
            assert await ws.recv_message() == (TEXT, b"pushed")
            await ws.send_close(1000, b"bye")
            assert (await ws.read_close())[0] == 1000
            assert await ws.at_eof()
        await eventually(lambda: server.stats().connections == 0, what="closed")


async def test_accept_still_closes_a_peer_that_breaks_the_protocol() -> None:
    async with serve(returning(lightws.Accept(topics=["t"]))) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"unmasked", mask=False)
            assert (await ws.read_close())[0] == 1002


async def test_accept_without_topics_or_listener_holds_the_connection_open() -> None:
    async with serve(returning(lightws.Accept())) as server:
        async with connect(url(server)) as ws:
            await ws.send("nothing happens")
            await asyncio.wait_for(await ws.ping(), WAIT)  # answered: still open
            assert server.stats().connections == 1
            assert server.stats().subscriptions == 0
        assert ws.close_code == 1000


async def test_accept_with_a_listener_hands_it_the_events() -> None:
    topics_at_open: list[frozenset[str]] = []

    class Watcher(Recorder):
        def on_open(self, conn: lightws.Connection) -> None:
            super().on_open(conn)
            topics_at_open.append(conn.topics)

    rec = Watcher(echo=True)
    async with serve(returning(lightws.Accept(topics=["news"], listener=rec))) as server:
        async with connect(url(server, "/acc")) as ws:
            await ws.send("echo me")
            assert await recv(ws) == "echo me"
            assert server.publish("news", "and the news") == 1
            assert await recv(ws) == "and the news"
            await ws.close(1000, "over")
        await eventually(lambda: rec.closes() != [], what="on_close")
    assert topics_at_open == [frozenset({"news"})]
    assert rec.only() == [
        ("open",),
        ("message", Opcode.TEXT, b"echo me"),
        ("close", 1000, "over"),
    ]
    assert list(rec.paths.values()) == ["/acc"]


# -- send_nowait back-pressure ---------------------------------------------------------


class Keeping(Recorder):
    """Records, and keeps every connection it is given (``conns``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conns: list[lightws.Connection] = []

    def on_open(self, conn: lightws.Connection) -> None:
        super().on_open(conn)
        self.conns.append(conn)


async def test_send_nowait_over_max_backpressure_closes_1013() -> None:
    listener = Keeping()
    limit = 256 * 1024
    async with serve(
        returning(listener), max_backpressure=limit, on_backpressure="close"
    ) as server:
        async with slow_reader(server.port) as ws:
            await eventually(lambda: listener.conns != [], what="on_open")
            [conn] = listener.conns
            chunk = b"x" * 16 * 1024
            sent = 0
            refused = None
            for _ in range(2000):  # 32 MiB: far over the limit and the socket buffers
                try:
                    conn.send_nowait(chunk)
                except lightws.ConnectionClosed as e:
                    refused = e
                    break
                sent += 1
            assert refused is not None, "send_nowait never hit max_backpressure"
            # Not refused early: the one refused would have gone over the limit (each
            # frame is the chunk plus a 4-byte header; how much the socket took before
            # depends on the kernel and the driver's thread, so only this bound holds).
            assert (sent + 1) * (len(chunk) + 4) > limit
            # Read again: whatever was queued, then the close frame, 1013.
            ws.writer.transport.resume_reading()  # type: ignore[attr-defined]
            code, _ = await ws.read_close(WAIT * 3)
            assert code == 1013
            await ws.send_close(1013)
        await eventually(lambda: listener.closes() != [], what="on_close")
    [(_, code, _)] = listener.closes()
    assert code == 1013


async def test_send_nowait_over_max_backpressure_drops_and_stays_open() -> None:
    listener = Keeping()
    async with serve(
        returning(listener), max_backpressure=64 * 1024, on_backpressure="drop"
    ) as server:
        async with slow_reader(server.port) as ws:
            await eventually(lambda: listener.conns != [], what="on_open")
            [conn] = listener.conns
            total = 1000  # 8 MiB: more than the kernel's socket buffers absorb
            for i in range(total):
                assert conn.send_nowait(b"y" * 8192 + i.to_bytes(2, "big")) is None
            await eventually(lambda: server.stats().dropped > 0, what="drops")
            assert not conn.closed
            assert server.stats().backpressure_closes == 0
            ws.writer.transport.resume_reading()  # type: ignore[attr-defined]
            seen: list[int] = []

            async def read_until_after() -> None:
                while True:
                    opcode, body = await ws.recv_message(WAIT * 3)
                    if body == b"after":
                        return
                    assert opcode == BINARY and len(body) == 8194
                    seen.append(int.from_bytes(body[-2:], "big"))

            reading = asyncio.ensure_future(read_until_after())
            await eventually(lambda: conn.buffered_amount == 0, WAIT * 3, "written out")
            conn.send_nowait("after")
            await asyncio.wait_for(reading, WAIT * 3)
            # A prefix of whole messages in order, the rest dropped and counted.
            assert seen == sorted(seen) and len(set(seen)) == len(seen)
            assert 0 < len(seen) < total
            assert server.stats().dropped == total - len(seen)
            assert not conn.closed
            await ws.send_close(1000)
            assert (await ws.read_close())[0] == 1000
    assert [c[1] for c in listener.closes()] == [1000]


# -- server.close() --------------------------------------------------------------------


async def test_server_close_closes_listener_and_accept_connections_with_1001() -> None:
    rec = Recorder()
    accept_rec = Recorder()

    handshake = routes(
        {
            "/listener": rec,
            "/accept-listener": lightws.Accept(topics=["t"], listener=accept_rec),
            "/accept": lightws.Accept(topics=["t"]),
        }
    )
    server = lightws.Server(lightws.Config(addr="127.0.0.1:0", handshake=handshake))
    await server.start()
    clients = [
        await connect(url(server, path)) for path in ("/listener", "/accept-listener", "/accept")
    ]
    try:
        await eventually(lambda: server.stats().connections == 3, what="3 connections")
        await asyncio.wait_for(server.close(), WAIT * 2)
        for ws in clients:
            assert (await closed_client(ws))[0] == 1001
    finally:
        for ws in clients:
            await ws.close()
    assert [c[1] for c in rec.closes()] == [1001]
    assert [c[1] for c in accept_rec.closes()] == [1001]


# -- the Connection objects a listener is given ----------------------------------------


async def release_idle_objects(server: lightws.Server) -> None:
    """Run the server's sweep of idle listener connections' objects (once a second on
    its own) until it releases one: the next event then needs a new object, unless
    something kept the old one."""
    core = server._core
    assert core is not None
    await eventually(lambda: core.sweep() > 0, what="an object released by the sweep")


async def sweep_releases_nothing(server: lightws.Server) -> None:
    """Two sweeps (the first only marks objects idle): nothing may be released."""
    core = server._core
    assert core is not None
    await asyncio.sleep(0)
    assert core.sweep() + core.sweep() == 0


async def test_a_connection_kept_in_on_open_is_the_object_given_to_later_calls() -> None:
    kept: set[lightws.Connection] = set()
    same: list[bool] = []

    class Keep:
        def on_open(self, conn: lightws.Connection) -> None:
            kept.add(conn)

        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            same.append(any(c is conn for c in kept))
            conn.send_nowait("ok")

        def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
            same.append(any(c is conn for c in kept))
            kept.discard(conn)

    async with serve(returning(Keep())) as server:
        async with connect(url(server)) as ws:
            for _ in range(3):
                await ws.send("m")
                assert await recv(ws) == "ok"
                await sweep_releases_nothing(server)  # the set holds it
        await eventually(lambda: len(same) == 4, what="on_close")
    assert same == [True] * 4
    assert kept == set()  # discard found it: equal and same hash


async def test_a_connection_not_kept_is_made_again_with_the_same_id_and_hash() -> None:
    """Nothing keeps the object from on_open: once released, the next call gets a new
    object for the same connection, with the same id and hash, and no request."""
    seen: list[tuple[int, int]] = []  # (conn.id, hash(conn)) per call, no reference kept
    requests: list[str] = []

    class Forgetful:
        def on_open(self, conn: lightws.Connection) -> None:
            seen.append((conn.id, hash(conn)))
            requests.append(conn.request.path)

        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            seen.append((conn.id, hash(conn)))
            try:
                requests.append(conn.request.path)
            except RuntimeError:
                requests.append("RuntimeError")  # a re-made object has no request
            conn.send_nowait("ok")

    async with serve(returning(Forgetful())) as server:
        async with connect(url(server, "/forgotten")) as ws:
            await ws.send("m")
            assert await recv(ws) == "ok"
            await release_idle_objects(server)
            await ws.send("m")
            assert await recv(ws) == "ok"
    # Released as soon as the handshake is done (nothing kept it in on_open): already
    # the first message gets a re-made object.
    assert requests == ["/forgotten", "RuntimeError", "RuntimeError"]
    assert len(set(seen)) == 1, seen


async def test_connections_compare_and_hash_by_connection() -> None:
    matches: list[tuple[bool, bool, bool]] = []
    listed: list[lightws.Connection] = []

    class Compare:
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            [mine] = [c for c in listed if c.id == conn.id]
            matches.append((conn == mine, hash(conn) == hash(mine), conn in set(listed)))
            conn.send_nowait("ok")

    async with serve(returning(Compare())) as server:
        async with connect(url(server)) as a, connect(url(server)) as b:
            await eventually(lambda: len(server.connections) == 2, what="both listed")
            listed.extend(server.connections)
            assert listed[0] != listed[1]
            assert listed[0] == listed[0]
            assert listed[0] != "not a connection"
            assert len(set(listed)) == 2
            for ws in (a, b):
                await ws.send("m")
                assert await recv(ws) == "ok"
    assert matches == [(True, True, True), (True, True, True)]


async def test_a_weakref_or_an_attribute_keeps_the_same_object() -> None:
    kinds: dict[int, str] = {}
    refs: dict[int, weakref.ref[lightws.Connection]] = {}
    results: list[tuple[str, bool, str]] = []

    class Remember:
        def on_open(self, conn: lightws.Connection) -> None:
            if conn.request.path == "/weak":
                kinds[conn.id] = "weak"
                refs[conn.id] = weakref.ref(conn)
            else:
                kinds[conn.id] = "attr"
                conn.user = conn.request.query["user"]

        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            try:
                path = conn.request.path  # the object lived on: its request too
            except RuntimeError:
                path = "RuntimeError"
            if kinds[conn.id] == "weak":
                results.append(("weak", refs[conn.id]() is conn, path))
            else:
                results.append(("attr", getattr(conn, "user", None) == "ann", path))
            conn.send_nowait("ok")

    async with serve(returning(Remember())) as server:
        for target in ("/weak", "/attr?user=ann"):
            async with connect(url(server, target)) as ws:
                for _ in range(2):
                    await ws.send("m")
                    assert await recv(ws) == "ok"
                    await sweep_releases_nothing(server)
    assert results == [
        ("weak", True, "/weak"),
        ("weak", True, "/weak"),
        ("attr", True, "/attr"),
        ("attr", True, "/attr"),
    ]


async def test_conn_request_in_on_open() -> None:
    class Greeter:
        def on_open(self, conn: lightws.Connection) -> None:
            request = conn.request
            conn.send_nowait(
                f"{request.path} {request.query.get('name')} {request.headers.get('X-Team')}"
            )

    async with serve(returning(Greeter())) as server:
        async with connect(
            url(server, "/hello?name=bob"), additional_headers={"X-Team": "blue"}
        ) as ws:
            assert await recv(ws) == "/hello bob blue"


async def test_listener_and_accept_connections_leave_nothing_behind() -> None:
    """After their clients leave, no native entry (or kept object) remains."""
    rec = Recorder(echo=True)

    async with serve(routes({"/": rec, "/accept": lightws.Accept(topics=["t"])})) as server:
        core = server._core
        assert core is not None
        clients = [await connect(url(server, p)) for p in ("/", "/", "/accept", "/accept")]
        await eventually(lambda: core.native_count() == 4, what="4 native connections")
        for ws in clients[:2]:
            await ws.send("x")
            assert await recv(ws) == "x"
        clients[0].transport.abort()  # type: ignore[attr-defined]
        for ws in clients[1:]:
            await ws.close()
        await eventually(lambda: core.native_count() == 0, what="none left")
        await eventually(lambda: server.stats().connections == 0, what="all closed")
        assert server.connections == []
        assert server.subscribers("t") == 0
    assert sorted(c[1] for c in rec.closes()) == [1000, 1006]


# -- beside coroutine handlers ---------------------------------------------------------


async def test_coroutine_handlers_listeners_and_accept_on_one_server() -> None:
    rec = Recorder(echo=True)

    class Subscribing(Recorder):
        def on_open(self, conn: lightws.Connection) -> None:
            super().on_open(conn)
            conn.subscribe("all")

    sub = Subscribing(echo=True)

    async def coroutine_handler(conn: lightws.Connection) -> None:
        conn.subscribe("all")
        async for msg in conn:
            await conn.send(f"coro: {msg.text}")

    handshake = routes(
        {
            "/coro": coroutine_handler,
            "/listener": sub,
            "/plain": rec,
            "/accept": lightws.Accept(topics=["all"]),
        }
    )
    async with serve(handshake) as server:
        async with (
            connect(url(server, "/coro")) as coro,
            connect(url(server, "/listener")) as listener,
            connect(url(server, "/plain")) as plain,
            connect(url(server, "/accept")) as accept,
        ):
            await coro.send("hi")
            assert await recv(coro) == "coro: hi"
            await listener.send("hi")
            assert await recv(listener) == "hi"
            await plain.send(b"bin")
            assert await recv(plain) == b"bin"
            await eventually(lambda: server.subscribers("all") == 3, what="3 subscribers")
            assert server.stats().connections == 4
            assert server.publish("all", "everyone") == 3
            for ws in (coro, listener, accept):
                assert await recv(ws) == "everyone"
            # Every connection with a Connection object (Accept connections may have
            # none) takes a broadcast, whatever its style.
            conns = server.connections
            assert len(conns) >= 3
            assert lightws.broadcast(conns, "broadcast") == len(conns)
            for ws in (coro, listener, plain):
                assert await recv(ws) == "broadcast"
        await eventually(lambda: server.stats().connections == 0, what="all closed")
        assert server.subscribers("all") == 0
    assert [c[1] for c in sub.closes()] == [1000]
    assert [c[1] for c in rec.closes()] == [1000]


async def test_methods_set_on_the_instance_are_called_over_the_base_no_ops() -> None:
    """The base class's no-op methods are skipped (no call, no object made for them),
    but a method set on the instance replaces them."""
    events: list[str] = []

    class OnlyMessages(lightws.Listener):
        def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
            events.append("message")
            conn.send_nowait(msg)

    listener = OnlyMessages()
    listener.on_open = lambda conn: events.append("open")  # type: ignore[method-assign]
    async with serve(returning(listener)) as server:
        async with connect(url(server)) as ws:
            await ws.send("x")
            assert await recv(ws) == "x"
    assert events == ["open", "message"]
