"""Topics, publish and broadcast (DESIGN section 4): counts, exclude, order, closed
connections, publishing from another thread, and both back-pressure policies with
clients that never read."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import lightws
import pytest
from support import eventually, serve, url
from websockets.asyncio.client import ClientConnection, connect

Opcode = lightws.Opcode


def room_handshake(
    on_join: Callable[[lightws.Connection], Any] | None = None,
) -> Callable[[lightws.Request, lightws.Response], Any]:
    """Subscribe every client to ``?room=`` (default "lobby"); messages from a client
    are published to its room; ``!cmd`` messages drive the server side for tests."""

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        room = request.query.get("room", "lobby")

        async def handler(conn: lightws.Connection) -> None:
            conn.subscribe(room)
            conn.room = room  # your own attributes on a connection
            if on_join is not None:
                await on_join(conn)
            await conn.send("joined")
            try:
                async for msg in conn:
                    text = msg.text if msg.opcode == Opcode.TEXT else None
                    if text == "!topics":
                        await conn.send(",".join(sorted(conn.topics)))
                    elif text == "!leave":
                        await conn.send(str(conn.unsubscribe(room)))
                        await conn.send(str(conn.unsubscribe(room)))
                    elif text == "!others":
                        n = conn.server.publish(room, "not to me", exclude=conn)
                        await conn.send(f"published to {n}")
                    else:
                        conn.server.publish(conn.room, msg)
            except lightws.ConnectionClosed:
                pass

        return handler

    return handshake


async def recv(ws: ClientConnection) -> Any:
    return await asyncio.wait_for(ws.recv(), 10)


@pytest.fixture
async def room_server() -> AsyncIterator[lightws.Server]:
    async with serve(room_handshake()) as server:
        yield server


async def joined(server: lightws.Server, path: str = "/") -> ClientConnection:
    ws = await connect(url(server, path), max_queue=None)
    assert await recv(ws) == "joined"
    return ws


async def test_publish_reaches_every_subscriber_and_returns_the_count(
    room_server: lightws.Server,
) -> None:
    clients = [await joined(room_server) for _ in range(3)]
    other = await joined(room_server, "/?room=other")
    try:
        assert room_server.subscribers("lobby") == 3
        assert room_server.subscribers("other") == 1
        assert room_server.subscribers("nobody") == 0
        assert room_server.publish("lobby", "hello all") == 3
        for ws in clients:
            assert await recv(ws) == "hello all"
        assert room_server.publish("lobby", b"\x00bin") == 3
        assert room_server.publish("lobby", lightws.Message(Opcode.TEXT, b"msg")) == 3
        for ws in clients:
            assert await recv(ws) == b"\x00bin"
            assert await recv(ws) == "msg"
        assert room_server.publish("nobody", "x") == 0
        # The other room got none of it.
        await other.send("!topics")
        assert await recv(other) == "other"
        stats = room_server.stats()
        assert (stats.topics, stats.subscriptions) == (2, 4)
    finally:
        for ws in [*clients, other]:
            await ws.close()


async def test_exclude_skips_one_connection_and_is_not_counted(
    room_server: lightws.Server,
) -> None:
    a, b, c = [await joined(room_server) for _ in range(3)]
    try:
        await a.send("!others")
        assert await recv(a) == "published to 2"
        assert await recv(b) == "not to me"
        assert await recv(c) == "not to me"
        # a got nothing but its own answer: the next thing it sees is a publish.
        room_server.publish("lobby", "everyone")
        assert await recv(a) == "everyone"
    finally:
        for ws in (a, b, c):
            await ws.close()


async def test_unsubscribe_and_close_remove_subscriptions(room_server: lightws.Server) -> None:
    a = await joined(room_server)
    b = await joined(room_server)
    await a.send("!leave")
    assert await recv(a) == "True"
    assert await recv(a) == "False"
    assert room_server.subscribers("lobby") == 1
    await b.close()
    # A closed connection is unsubscribed from everything; an empty topic is gone.
    await eventually(lambda: room_server.subscribers("lobby") == 0)
    assert room_server.stats().topics == 0
    assert room_server.stats().subscriptions == 0
    assert room_server.publish("lobby", "anyone?") == 0
    await a.close()


async def test_publish_from_another_thread(room_server: lightws.Server) -> None:
    ws = await joined(room_server)
    counts: list[int] = []

    def publisher() -> None:
        for i in range(50):
            counts.append(room_server.publish("lobby", f"t{i}"))

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        got = [await recv(ws) for _ in range(50)]
        assert got == [f"t{i}" for i in range(50)]
        assert counts == [1] * 50
    finally:
        thread.join()
        await ws.close()


async def test_sends_and_publishes_arrive_in_call_order() -> None:
    rounds = 300

    async def on_join(conn: lightws.Connection) -> None:
        for i in range(rounds):
            await conn.send(f"s{i}")
            conn.server.publish("lobby", f"p{i}")
        await conn.send("end")

    async with serve(room_handshake(on_join)) as server:
        ws = await connect(url(server), max_queue=None)
        got = [await recv(ws) for _ in range(2 * rounds + 2)]
        expect = [m for i in range(rounds) for m in (f"s{i}", f"p{i}")] + ["end", "joined"]
        assert got == expect
        await ws.close()


async def test_a_publish_never_splits_a_large_fragmented_send() -> None:
    big = os.urandom(600_000)  # over write_limit: sent in fragments, one per drain
    done = asyncio.Event()
    conns: list[lightws.Connection] = []

    async def on_join(conn: lightws.Connection) -> None:
        conns.append(conn)
        task = asyncio.ensure_future(conn.send(big))
        for i in range(20):
            conn.server.publish("lobby", f"p{i}")
            await asyncio.sleep(0)
        await task
        done.set()

    async with serve(room_handshake(on_join), write_limit=16 * 1024) as server:
        # The websockets client fails the connection on any data frame between
        # fragments (RFC 6455 5.4), so getting every message back intact proves it.
        ws = await connect(url(server), max_queue=None, max_size=None)
        got = [await recv(ws) for _ in range(22)]
        assert big in got
        assert [m for m in got if isinstance(m, str) and m.startswith("p")] == [
            f"p{i}" for i in range(20)
        ]
        await asyncio.wait_for(done.wait(), 10)
        # The publishes held back behind the fragments were counted once: once all is
        # written nothing is left unsent.
        await eventually(lambda: conns[0].buffered_amount == 0, what="buffered_amount 0")
        await ws.close()


async def test_broadcast_counts_open_connections_and_skips_closed_ones() -> None:
    conns: list[lightws.Connection] = []

    async def on_join(conn: lightws.Connection) -> None:
        conns.append(conn)

    async with serve(room_handshake(on_join)) as server:
        a = await joined(server)
        b = await joined(server)
        c = await joined(server)
        await c.close()
        await eventually(lambda: conns[2].closed)
        assert lightws.broadcast(conns, "to all") == 2
        assert lightws.broadcast(iter(conns[:1]), b"only a") == 1
        assert await recv(a) == "to all"
        assert await recv(b) == "to all"
        assert await recv(a) == b"only a"
        with pytest.raises(TypeError, match=r"lightws\.Connection"):
            lightws.broadcast([conns[0], "not a connection"], "x")
        with pytest.raises(TypeError):
            lightws.broadcast(conns, 123)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="TEXT or BINARY"):
            lightws.broadcast(conns, lightws.Message(Opcode.PING, b""))
        with pytest.raises(ValueError, match="TEXT or BINARY"):
            server.publish("lobby", lightws.Message(Opcode.PONG, b""))
        assert conns[0].server is server
        assert conns[0].room == "lobby"
        assert isinstance(conns[0].buffered_amount, int)
        conns[2].subscribe("late")  # closed: not subscribed
        assert server.subscribers("late") == 0
        await a.close()
        await b.close()


# -- slow consumers -------------------------------------------------------------------


def never_reading_client(port: int, path: str = "/") -> socket.socket:
    """Upgrade, then never read (a small receive buffer so the server's queue fills)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return s


@pytest.mark.parametrize("policy", ["close", "drop"])
async def test_a_never_reading_subscriber_does_not_hold_up_the_others(policy: str) -> None:
    async with serve(
        room_handshake(), max_backpressure=256 * 1024, on_backpressure=policy
    ) as server:
        healthy = await joined(server)
        slow = never_reading_client(server.port)
        try:
            await eventually(lambda: server.subscribers("lobby") == 2)
            payload = b"x" * 16 * 1024
            n = 200  # 3.2 MiB: far over max_backpressure for the slow one
            got = []
            for i in range(n):
                server.publish("lobby", payload + str(i).encode())
                if i % 8 == 7:
                    # The healthy client keeps up (128 KiB behind at most); publish
                    # itself never waits for the slow one.
                    got += [await recv(healthy) for _ in range(8)]
            assert [g[len(payload) :] for g in got] == [str(i).encode() for i in range(n)]
            stats = server.stats()
            if policy == "close":
                assert stats.backpressure_closes == 1
                assert stats.dropped == 0
                # Closed with 1013 (the close frame waits behind what was being
                # written; the slow client never reads, so close_timeout ends it).
            else:
                assert stats.dropped > 0
                assert stats.backpressure_closes == 0
                assert server.subscribers("lobby") == 2
            # Memory stays bounded: the slow connection holds about max_backpressure.
            slow_conn = [c for c in server.connections if c.buffered_amount > 0]
            for c in slow_conn:
                assert c.buffered_amount <= 256 * 1024 + len(payload) + 64
        finally:
            slow.close()
            await healthy.close()


async def test_a_dropped_subscriber_reads_whole_messages_when_it_catches_up() -> None:
    async with serve(
        room_handshake(), max_backpressure=64 * 1024, on_backpressure="drop"
    ) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.pause_reading()  # stop reading: the server's queue fills
        await eventually(lambda: server.subscribers("lobby") == 1)
        total = 1000  # 8 MiB: more than the kernel's socket buffers absorb
        for i in range(total):
            server.publish("lobby", b"y" * 8192 + i.to_bytes(2, "big"))
        await eventually(lambda: server.stats().dropped > 0)
        writer.transport.resume_reading()
        # What arrives is a prefix of whole frames in order ("joined" first), then
        # the connection is still usable.
        seen: list[int] = []

        async def read_frame() -> tuple[int, bytes]:
            b0, b1 = await reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                length = int.from_bytes(await reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await reader.readexactly(8), "big")
            return b0 & 0x0F, await reader.readexactly(length)

        op, body = await asyncio.wait_for(read_frame(), 10)
        assert (op, body) == (1, b"joined")
        # The client reads on while the server writes out what it kept; once that is
        # all written, one more publish goes through and marks the end.

        async def read_until_after() -> None:
            while True:
                op, body = await read_frame()
                if body == b"after":
                    return
                assert op == 2 and len(body) == 8194
                seen.append(int.from_bytes(body[-2:], "big"))

        reading = asyncio.ensure_future(read_until_after())
        conn = server.connections[0]
        await eventually(lambda: conn.buffered_amount == 0, 20)
        assert server.publish("lobby", b"after") == 1
        await asyncio.wait_for(reading, 20)
        # A prefix of whole messages in order, the rest dropped; still connected.
        assert seen == sorted(seen) and len(set(seen)) == len(seen)
        assert 0 < len(seen) < total
        assert server.stats().dropped == total - len(seen)
        writer.close()
