"""Keepalive, idle timeout, back-pressure and connection limits (issue: hardening)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import lightws
from support import eventually, reporting_handshake, serve, url
from support.rawws import RawWebSocket, build_frame, http_exchange, upgrade_request
from websockets.asyncio.client import connect

OP_PING, OP_PONG, OP_TEXT = 9, 10, 1


async def test_keepalive_pings_are_sent_and_a_silent_peer_is_closed_with_1011() -> None:
    async with serve(ping_interval=0.2, ping_timeout=0.3) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            ping = await ws.recv_frame(timeout=3)
            assert ping.opcode == OP_PING
            # Never answer: the server gives up after ping_timeout.
            code, _ = await ws.read_close(timeout=3)
            assert code == 1011


async def test_answered_keepalive_pings_keep_the_connection_open() -> None:
    async with serve(ping_interval=0.1, ping_timeout=0.3) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            deadline = time.monotonic() + 1.0
            pings = 0
            while time.monotonic() < deadline:
                frame = await ws.recv_frame(timeout=2)
                assert frame.opcode == OP_PING
                pings += 1
                await ws.send_frame(OP_PONG, frame.payload)
            assert pings >= 3
            await ws.send_frame(OP_TEXT, b"still here")
            while True:
                frame = await ws.recv_frame(timeout=2)
                if frame.opcode == OP_TEXT:
                    break
            assert frame.payload == b"still here"


async def test_keepalive_is_answered_in_rust_while_the_handler_is_blocked() -> None:
    async def body(conn: lightws.Connection) -> Any:
        time.sleep(1.0)  # the event loop is stuck in CPU work
        return (await conn.recv()).text

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server), ping_interval=None) as ws:
            started = time.monotonic()
            pong_waiter = await ws.ping(b"x")
            await asyncio.wait_for(pong_waiter, 0.8)
            assert time.monotonic() - started < 0.8
            await ws.send("after")
            assert await asyncio.wait_for(outcome, 5) == "after"


async def test_idle_timeout_closes_a_silent_connection_with_1001() -> None:
    async with serve(idle_timeout=0.3) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            code, _ = await ws.read_close(timeout=3)
            assert code == 1001


async def test_send_waits_above_write_limit_when_the_peer_does_not_read() -> None:
    state: dict[str, Any] = {}

    async def body(conn: lightws.Connection) -> Any:
        chunk = b"x" * 65536
        sent = 0
        try:
            while True:
                await asyncio.wait_for(conn.send(chunk), 1.0)
                sent += len(chunk)
                state["sent"] = sent
        except asyncio.TimeoutError:
            pass
        state["blocked_at"] = sent
        conn.abort()  # abort works while a send is blocked
        return sent

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, write_limit=256 * 1024, sock_write_buffer=65536) as server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_request("/"))
        await writer.drain()
        # Never read: the kernel buffers fill, then the outbox, then send() waits.
        sent = await asyncio.wait_for(outcome, 20)
        writer.close()
    # Bounded by write_limit plus kernel buffers (a few MiB at most), not unbounded.
    assert 256 * 1024 <= sent < 16 << 20


async def test_max_connections_answers_503_before_the_handshake_callable() -> None:
    called: list[str] = []

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        called.append(request.path)

        async def handler(conn: lightws.Connection) -> None:
            await conn.recv()

        return handler

    async with serve(handshake, max_connections=2) as server:
        async with connect(url(server, "/a")), connect(url(server, "/b")):
            response = await http_exchange(server.port, upgrade_request("/c"))
            assert response.status == 503
            assert called == ["/a", "/b"]
        await eventually(lambda: server.stats().connections == 0)
        async with connect(url(server, "/d")) as ws:
            await ws.send("room again")


async def test_a_slowloris_request_is_cut_off_at_handshake_read_timeout() -> None:
    async with serve(handshake_read_timeout=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = upgrade_request("/")
        started = time.monotonic()
        closed_after = None
        for byte in request:
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                break
            try:
                data = await asyncio.wait_for(reader.read(1), 0.1)
            except asyncio.TimeoutError:
                continue
            if data == b"":
                closed_after = time.monotonic() - started
                break
        writer.close()
        assert closed_after is not None
        assert closed_after < 2.0


async def test_a_peer_reset_mid_frame_does_not_disturb_other_connections() -> None:
    async with serve() as server:
        async with connect(url(server)) as healthy:
            for _ in range(20):
                _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(upgrade_request("/") + b"\x81\xfe\x10\x00abcd" + b"x" * 100)
                await writer.drain()
                writer.transport.abort()
            await healthy.send("still echoing")
            assert await asyncio.wait_for(healthy.recv(), 5) == "still echoing"
        await eventually(lambda: server.stats().connections == 0)


async def test_a_ping_flood_from_a_peer_that_never_reads_is_throttled() -> None:
    async with serve(write_limit=16 * 1024) as server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_request("/"))
        await writer.drain()
        ping = build_frame(OP_PING, b"p" * 125)
        batch = ping * 1000  # 131 KB of pings, each asking for a 127-byte pong
        sent = 0
        throttled = False
        while sent < 200 << 20:
            writer.write(batch)
            try:
                await asyncio.wait_for(writer.drain(), 2.0)
            except asyncio.TimeoutError:
                throttled = True
                break
            sent += len(batch)
        # The server stopped reading once its unread pongs piled up: the flood is held
        # back by TCP, far below 200 MB, instead of growing the server's memory.
        assert throttled, f"the server read {sent} bytes of pings without being read from"
        writer.transport.abort()
        async with connect(url(server)) as ws:
            await ws.send("server still fine")
            assert await asyncio.wait_for(ws.recv(), 5) == "server still fine"
