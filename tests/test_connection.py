"""Connection API: recv/send, closing from either side, properties, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import Any

import lightws
import pytest
from support import (
    echo_handshake,
    eventually,
    handler_handshake,
    reporting_handshake,
    serve,
    url,
)
from support.awaitables import noting_waits, result_without_waiting
from support.rawws import BINARY, CLOSE, PING, PONG, TEXT, RawWebSocket
from websockets.asyncio.client import connect

Opcode = lightws.Opcode
Message = lightws.Message


async def closed_client(ws: Any) -> tuple[int | None, str | None]:
    """Wait for the websockets client to finish closing; return (code, reason)."""
    await asyncio.wait_for(ws.wait_closed(), 10)
    return ws.close_code, ws.close_reason


# --- closing -------------------------------------------------------------------------


async def test_close_started_by_client_raises_connection_closed_ok_in_recv() -> None:
    async def body(conn: lightws.Connection) -> Any:
        with pytest.raises(lightws.ConnectionClosedOK) as excinfo:
            await conn.recv()
        return excinfo.value.code, excinfo.value.reason, conn.closed, conn.close_code

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server)) as ws:
            await ws.close(1000, "client done")
            # The server echoes the code (RFC 6455 5.5.1); the reason is its own choice.
            assert (await closed_client(ws))[0] == 1000
        code, reason, closed, close_code = await asyncio.wait_for(outcome, 5)
    assert (code, reason) == (1000, "client done")
    assert closed is True
    assert close_code == 1000


@pytest.mark.parametrize("code", [1000, 1001])
async def test_async_for_ends_quietly_on_normal_close(code: int) -> None:
    async def body(conn: lightws.Connection) -> Any:
        return [msg.text async for msg in conn]

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server)) as ws:
            await ws.send("a")
            await ws.send("b")
            await ws.close(code)
        assert await asyncio.wait_for(outcome, 5) == ["a", "b"]


async def test_async_for_raises_connection_closed_error_on_abnormal_close_code() -> None:
    async def body(conn: lightws.Connection) -> Any:
        with pytest.raises(lightws.ConnectionClosedError) as excinfo:
            async for _ in conn:
                pass
        return excinfo.value.code, excinfo.value.reason

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server)) as ws:
            await ws.close(4001, "custom")
        assert await asyncio.wait_for(outcome, 5) == (4001, "custom")


async def test_close_started_by_server_sends_code_and_reason() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.close(4000, "bye")
        return conn.closed, conn.close_code, conn.close_reason

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server)) as ws:
            assert await closed_client(ws) == (4000, "bye")
        closed, code, reason = await asyncio.wait_for(outcome, 5)
    assert closed is True
    assert code == 4000
    assert reason == "bye"


async def test_server_close_returns_once_the_client_answers() -> None:
    async def body(conn: lightws.Connection) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await conn.close()
        return loop.time() - started

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, close_timeout=5.0) as server, connect(url(server)) as ws:
        await closed_client(ws)
        assert await asyncio.wait_for(outcome, 5) < 2.0


async def test_server_drops_tcp_after_close_timeout_if_peer_never_answers() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.close(1000, "answer me")

    handshake, _ = reporting_handshake(body)
    async with serve(handshake, close_timeout=0.5) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.close_code, frame.close_reason) == (
                CLOSE,
                1000,
                "answer me",
            )
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await ws.at_eof(5)  # we never send our close frame
            assert loop.time() - started < 3


async def test_handler_returning_closes_with_1000_after_flushing_sends() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.send("last words")
        await conn.send(b"x" * 200_000)

    handshake, _ = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "last words"
        assert await asyncio.wait_for(ws.recv(), 5) == b"x" * 200_000
        assert (await closed_client(ws))[0] == 1000


async def test_handler_raising_closes_with_1011_and_logs_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="lightws")

    async def body(conn: lightws.Connection) -> Any:
        await conn.recv()
        raise RuntimeError("handler boom")

    handshake, _ = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server)) as ws:
            await ws.send("trigger")
            code, _ = await closed_client(ws)
        assert code == 1011

        def logged() -> bool:
            return any(r.name.startswith("lightws") and r.levelno >= 40 for r in caplog.records)

        await eventually(logged)
    assert "handler boom" in caplog.text


async def test_server_close_closes_every_connection_with_1001() -> None:
    async def body(conn: lightws.Connection) -> Any:
        async for msg in conn:  # 1001 is a normal close: the loop just ends
            await conn.send(msg)
        return conn.close_code

    handshake, outcome = reporting_handshake(body)
    server = lightws.Server(lightws.Config(addr="127.0.0.1:0", handshake=handshake))
    await server.start()
    clients = []
    try:
        clients = [await connect(url(server)) for _ in range(3)]
        await clients[0].send("hi")
        assert await asyncio.wait_for(clients[0].recv(), 5) == "hi"
    finally:
        await asyncio.wait_for(server.close(), 10)
    codes = [(await closed_client(ws))[0] for ws in clients]
    assert codes == [1001, 1001, 1001]
    assert await asyncio.wait_for(outcome, 5) == 1001


async def test_server_close_stops_accepting_new_connections() -> None:
    server = lightws.Server(lightws.Config(addr="127.0.0.1:0", handshake=echo_handshake))
    await server.start()
    port = server.port
    await asyncio.wait_for(server.close(), 10)
    with pytest.raises(OSError):
        await asyncio.wait_for(connect(f"ws://127.0.0.1:{port}/"), 5)


async def test_closing_the_server_twice_is_harmless() -> None:
    async with serve() as server:
        await asyncio.wait_for(server.close(), 10)
    await asyncio.wait_for(server.close(), 10)


async def test_abort_drops_the_connection_without_a_close_frame() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.recv()
        conn.abort()
        return conn.closed

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        await ws.send("abort me")
        code, _ = await closed_client(ws)
        assert code == 1006
        assert await asyncio.wait_for(outcome, 5) is True


async def test_recv_after_close_raises_connection_closed_every_time() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.close(1000, "done")
        errors = []
        for _ in range(2):
            with pytest.raises(lightws.ConnectionClosed) as excinfo:
                await conn.recv()
            errors.append((type(excinfo.value), excinfo.value.code))
        return errors

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        await closed_client(ws)
        errors = await asyncio.wait_for(outcome, 5)
    assert errors == [(lightws.ConnectionClosedOK, 1000)] * 2


async def test_send_after_close_raises_connection_closed() -> None:
    async def body(conn: lightws.Connection) -> Any:
        with pytest.raises(lightws.ConnectionClosed):
            await conn.recv()
        with pytest.raises(lightws.ConnectionClosed):
            await conn.send("too late")
        return True

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server)):
            pass
        assert await asyncio.wait_for(outcome, 5) is True


# --- properties --------------------------------------------------------------------


async def test_connection_properties_while_open_and_after_close() -> None:
    snapshots: list[dict[str, Any]] = []

    async def body(conn: lightws.Connection) -> Any:
        snapshots.append(
            {
                "id": conn.id,
                "path": conn.request.path,
                "remote_address": tuple(conn.remote_address),
                "subprotocol": conn.subprotocol,
                "closed": conn.closed,
                "close_code": conn.close_code,
                "close_reason": conn.close_reason,
            }
        )
        await conn.send("snapshot taken")
        with pytest.raises(lightws.ConnectionClosed):
            await conn.recv()
        after_close.append((conn.id, conn.closed, conn.close_code, conn.close_reason))
        return None

    after_close: list[tuple[int, bool, int | None, str | None]] = []
    handshake, _ = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server, "/props")) as ws1:
            assert await asyncio.wait_for(ws1.recv(), 5) == "snapshot taken"
            addr1 = ws1.local_address[:2]
            async with connect(url(server, "/props")) as ws2:
                assert await asyncio.wait_for(ws2.recv(), 5) == "snapshot taken"
            await ws1.close(1000, "done")
        await eventually(lambda: len(after_close) == 2, what="both handlers seeing their close")
    first, second = snapshots
    # Each connection reports its own close: ws2 closed by its context manager
    # (1000, no reason), then ws1 with (1000, "done").
    assert after_close == [
        (second["id"], True, 1000, ""),
        (first["id"], True, 1000, "done"),
    ]
    assert isinstance(first["id"], int)
    assert isinstance(second["id"], int)
    assert first["id"] != second["id"]
    assert first == {
        "id": first["id"],
        "path": "/props",
        "remote_address": addr1,
        "subprotocol": None,
        "closed": False,
        "close_code": None,
        "close_reason": None,
    }


# --- sending -----------------------------------------------------------------------


async def test_send_chooses_the_frame_type_from_the_argument_type() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.send("text")
        await conn.send(b"bytes")
        await conn.send(bytearray(b"bytearray"))
        await conn.send(memoryview(b"xmemoryviewx")[1:-1])
        await conn.send(Message(Opcode.TEXT, b"message text"))
        await conn.send(Message(Opcode.BINARY, b"message binary"))
        await conn.send_text("send_text")
        await conn.send_binary(b"send_binary")
        await conn.send("")
        await conn.send(b"")

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        received = [await asyncio.wait_for(ws.recv(), 5) for _ in range(10)]
        await asyncio.wait_for(outcome, 5)
    assert received == [
        "text",
        b"bytes",
        b"bytearray",
        b"memoryview",
        "message text",
        b"message binary",
        "send_text",
        b"send_binary",
        "",
        b"",
    ]


async def test_send_ping_reaches_the_client_and_its_pong_reaches_recv() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.send_ping(b"heartbeat")
        return await conn.recv()

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, auto_pong=False) as server:
        # The raw client answers the ping by hand so we can see the frame.
        async with await RawWebSocket.connect(server.port) as ws:
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.payload) == (PING, b"heartbeat")
            await ws.send_frame(PONG, frame.payload)
            assert await asyncio.wait_for(outcome, 5) == Message(Opcode.PONG, b"heartbeat")


async def test_send_pong_sends_an_unsolicited_pong() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.send_pong(b"unsolicited")
        await conn.send("after pong")

    handshake, _ = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.payload) == (PONG, b"unsolicited")
            assert await ws.recv_message() == (TEXT, b"after pong")


async def test_invalid_sends_raise_and_leave_the_connection_usable() -> None:
    async def body(conn: lightws.Connection) -> Any:
        errors = []
        for bad in (
            lambda: conn.send_ping(b"p" * 126),
            lambda: conn.send_pong(b"p" * 126),
            lambda: conn.send(Message(Opcode.PING, b"p" * 126)),
        ):
            with pytest.raises(ValueError):
                await bad()
            errors.append(ValueError)
        for bad_value in (42, None, 3.5, {"a": 1}):
            with pytest.raises(TypeError):
                await conn.send(bad_value)
            errors.append(TypeError)
        await conn.send_ping(b"p" * 125)  # the limit itself is fine
        await conn.send("still usable")
        return errors

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "still usable"
        assert await asyncio.wait_for(outcome, 5) == [ValueError] * 3 + [TypeError] * 4


async def test_close_reason_too_long_for_a_control_frame_raises_value_error() -> None:
    async def body(conn: lightws.Connection) -> Any:
        with pytest.raises(ValueError):
            await conn.close(1000, "r" * 124)  # 2 + 124 bytes > 125
        await conn.send("still open")

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "still open"
        await asyncio.wait_for(outcome, 5)


async def test_concurrent_senders_on_one_connection_deliver_every_message_intact() -> None:
    tasks, per_task = 10, 40

    def payload(t: int, i: int) -> str:
        size = (t * 7919 + i * 104729) % 100_000
        return f"{t}:{i}:" + chr(ord("a") + t) * size

    async def body(conn: lightws.Connection) -> Any:
        async def sender(t: int) -> None:
            for i in range(per_task):
                await conn.send(payload(t, i))
                if i % 5 == 0:
                    await asyncio.sleep(0)

        await asyncio.gather(*(sender(t) for t in range(tasks)))

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server), max_size=None) as ws:
        received = [await asyncio.wait_for(ws.recv(), 10) for _ in range(tasks * per_task)]
        await asyncio.wait_for(outcome, 10)
    expected = {payload(t, i) for t in range(tasks) for i in range(per_task)}
    assert len(received) == len(expected)
    assert set(received) == expected
    for t in range(tasks):  # each sender awaited its sends, so its order holds
        mine = [m for m in received if m.startswith(f"{t}:")]
        assert mine == [payload(t, i) for i in range(per_task)]


# --- cancellation ------------------------------------------------------------------


async def test_cancelled_recv_loses_no_message() -> None:
    async def body(conn: lightws.Connection) -> Any:
        for _ in range(3):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.recv(), 0.05)
        waiting = asyncio.Event()
        task = asyncio.ensure_future(noting_waits(conn.recv(), waiting.set))
        await waiting.wait()  # cancelled while it waits for a message
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await conn.send("ready")
        msg = await asyncio.wait_for(conn.recv(), 5)
        return msg.text

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "ready"
        await ws.send("hello")
        assert await asyncio.wait_for(outcome, 5) == "hello"


async def test_recv_cancelled_while_messages_stream_in_loses_none() -> None:
    count = 300

    async def body(conn: lightws.Connection) -> Any:
        got: list[str] = []
        while len(got) < count:
            try:
                msg = await asyncio.wait_for(conn.recv(), random.choice([0.0001, 0.001, 0.01]))
            except asyncio.TimeoutError:
                continue
            got.append(msg.text)
        return got

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        for i in range(count):
            await ws.send(str(i))
            if i % 3 == 0:  # pacing: messages arrive alone and in bursts, at random
                await asyncio.sleep(random.random() / 500)
        assert await asyncio.wait_for(outcome, 30) == [str(i) for i in range(count)]


async def test_queued_message_is_returned_without_waiting() -> None:
    queued = asyncio.Event()

    async def body(conn: lightws.Connection) -> Any:
        await queued.wait()
        # Each recv() is stepped by hand: with its message already queued it must
        # complete at its first step (StopIteration), never yield a future to wait on.
        # Over five operations at most one fairness yield (one in 32) may come first.
        got = [result_without_waiting(conn.recv()) for _ in range(5)]
        assert sum(bare_yields for _, bare_yields in got) <= 1
        return [msg.text for msg, _ in got]

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        for i in range(5):
            await ws.send(f"queued {i}")
        await ws.send("marker")
        # The server counts a message when it decodes it and queues it right after;
        # once the sixth is counted, the five before it are in the queue.
        await eventually(lambda: server.stats().frames_in.get(lightws.Opcode.TEXT, 0) >= 6)
        queued.set()
        assert await asyncio.wait_for(outcome, 5) == [f"queued {i}" for i in range(5)]


async def test_handler_cancelled_by_server_close_does_not_hang() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await asyncio.sleep(3600)  # never reads; server.close() must still finish

    handshake, _ = reporting_handshake(body)
    async with serve(handshake, close_timeout=0.5) as server:
        async with connect(url(server)) as ws:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(server.close(), 10)
            assert loop.time() - started < 5
            code, _ = await closed_client(ws)
            assert code == 1001


# --- Message, exceptions -----------------------------------------------------------


def test_message_is_a_frozen_value() -> None:
    msg = Message(Opcode.TEXT, b"caf\xc3\xa9")
    assert msg.opcode is Opcode.TEXT
    assert msg.body == b"caf\xc3\xa9"
    assert msg.text == "café"
    assert msg == Message(Opcode.TEXT, b"caf\xc3\xa9")
    assert msg != Message(Opcode.BINARY, b"caf\xc3\xa9")
    assert msg != Message(Opcode.TEXT, b"cafe")
    with pytest.raises((AttributeError, dataclasses.FrozenInstanceError)):
        msg.body = b"changed"  # type: ignore[misc]


def test_enums_have_the_rfc_values() -> None:
    assert [int(op) for op in Opcode] == [0, 1, 2, 8, 9, 10]
    assert Opcode.TEXT == 1
    assert {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011} <= {
        int(c) for c in lightws.CloseCode
    }
    assert [int(lvl) for lvl in lightws.LogLevel] == [0, 1, 2, 3]


def test_exception_hierarchy() -> None:
    assert issubclass(lightws.ConnectionClosed, lightws.LightwsError)
    assert issubclass(lightws.ConnectionClosedOK, lightws.ConnectionClosed)
    assert issubclass(lightws.ConnectionClosedError, lightws.ConnectionClosed)
    exc = lightws.ConnectionClosed(1001, "going away")
    assert (exc.code, exc.reason) == (1001, "going away")


# --- resources and back-pressure ---------------------------------------------------


async def test_client_dropping_tcp_raises_connection_closed_error_1006_in_recv() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.send("go")
        with pytest.raises(lightws.ConnectionClosedError) as excinfo:
            await conn.recv()
        return excinfo.value.code, conn.closed, conn.close_code

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        ws = await RawWebSocket.connect(server.port)
        assert await ws.recv_message() == (TEXT, b"go")
        ws.writer.transport.abort()
        assert await asyncio.wait_for(outcome, 5) == (1006, True, 1006)


async def test_connections_counter_returns_to_zero_after_clients_leave() -> None:
    async with serve() as server:
        clients = [await connect(url(server)) for _ in range(20)]
        await eventually(lambda: server.stats().connections == 20)
        for ws in clients[:10]:
            await ws.close()
        for ws in clients[10:]:
            ws.transport.abort()  # half of them leave without a close handshake
        await eventually(lambda: server.stats().connections == 0)


async def test_connection_can_be_sent_to_from_outside_its_handler() -> None:
    registry: set[lightws.Connection] = set()

    async def handler(conn: lightws.Connection) -> None:
        registry.add(conn)
        try:
            async for _ in conn:
                pass
        finally:
            registry.discard(conn)

    async with serve(handler_handshake(handler)) as server:
        clients = [await connect(url(server)) for _ in range(5)]
        await eventually(lambda: len(registry) == 5)
        for conn in list(registry):  # a broadcast from some other task
            await conn.send(f"to {conn.id}")
        replies = [await asyncio.wait_for(ws.recv(), 5) for ws in clients]
        assert sorted(replies) == sorted(f"to {conn.id}" for conn in registry)
        for ws in clients:
            await ws.close()
        await eventually(lambda: not registry)


async def test_send_applies_back_pressure_when_the_client_does_not_read() -> None:
    chunk = b"q" * (256 * 1024)
    sent = 0
    total_target = 200  # 50 MiB if nothing ever blocked

    async def body(conn: lightws.Connection) -> Any:
        nonlocal sent
        for _ in range(total_target):
            await conn.send(chunk)
            sent += 1
        return sent

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, write_limit=64 * 1024) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            # Really not reading: otherwise asyncio's stream transport keeps pulling
            # bytes into its own (16 MiB-limit) buffer, which can hold the whole 50 MiB.
            ws.writer.transport.pause_reading()  # type: ignore[attr-defined]
            # The condition under test, not a synchronisation: the client reads nothing
            # for a second, during which the handler's sends must stop completing.
            await asyncio.sleep(1.0)
            stalled_at = sent
            assert stalled_at < total_target, "send() never waited on a stalled client"
            ws.writer.transport.resume_reading()  # type: ignore[attr-defined]
            for _ in range(total_target):  # now read everything, intact and in order
                assert await ws.recv_message(timeout=10) == (BINARY, chunk)
            assert await asyncio.wait_for(outcome, 10) == total_target


async def test_reading_stops_when_the_handler_does_not_keep_up() -> None:
    chunk = b"r" * (1 << 20)
    release = asyncio.Event()

    async def body(conn: lightws.Connection) -> Any:
        await release.wait()  # not reading: the server must stop reading the socket
        count = 0
        while True:
            msg = await conn.recv()
            if msg.body == b"end":
                return count
            assert msg.body == chunk
            count += 1

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, max_msg_len=2 << 20) as server:
        async with connect(url(server), write_limit=1 << 16) as ws:
            sent = 0

            async def flood() -> None:
                nonlocal sent
                while sent < 1000:  # 1000 MiB if nothing pushes back
                    await ws.send(chunk)
                    sent += 1

            flooding = asyncio.ensure_future(flood())
            # The condition under test, not a synchronisation: the handler reads nothing
            # for 1.5 s, during which the server must stop reading the socket.
            await asyncio.sleep(1.5)
            stalled_at = sent
            assert stalled_at < 100, f"server buffered {stalled_at} MiB for a handler not reading"
            release.set()
            # Once the handler reads, so does the server: the flood moves again.
            await eventually(lambda: sent > stalled_at + 2, 10, "the flood moving again")
            flooding.cancel()
            with pytest.raises(asyncio.CancelledError):
                await flooding
            await ws.send(b"end")
            received = await asyncio.wait_for(outcome, 30)
            assert received in (sent, sent + 1)  # the cancelled send may or may not be out
