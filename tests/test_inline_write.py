"""The loop thread's inline write (bridge/send.rs): a frame sent with nothing queued
before it goes to the socket from the event-loop thread, and what the kernel does not
take is queued for the connection's driver. These check that the two writers never mix
bytes or reorder messages: many sends mixed with publishes and a large fragmented
send, the close frame last, a peer that stops reading (partial writes), the
statistics, and TLS (which never writes inline). Each runs with the driver on a tokio
thread (``threads=1``) and on the event-loop thread (``threads=0``, onloop.rs).
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import lightws
import pytest
import trustme
from support import eventually, handler_handshake, serve, url
from support.rawws import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    RawWebSocket,
    build_frame,
    close_payload,
    new_key,
    read_response,
    upgrade_request,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK

THREADS = pytest.mark.parametrize("threads", [1, 0])
LARGE = bytes(range(256)) * 4096  # 1 MiB: over write_limit, so it goes in fragments


def sequence_handler(
    n: int, close: bool = True
) -> tuple[Callable[[lightws.Connection], Awaitable[None]], list[Any]]:
    """A handler that, once the client says go, sends ``n`` numbered messages with
    publishes to its own topic, a large message and awaited batches among them, then
    closes (or, with ``close`` false, sends "end" and waits for the client to close);
    and the messages the client must see, in order."""
    expected: list[Any] = []
    for i in range(n):
        expected.append(f"s{i}")
        if i % 7 == 3:
            expected.append(f"p{i}")
        if i % 25 == 10:
            expected += [f"g{i}.{k}" for k in range(20)]
        if i == n // 2:
            expected.append(LARGE)
    if not close:
        expected.append("end")

    async def handler(conn: lightws.Connection) -> None:
        conn.subscribe("t")
        server = conn.server
        assert server is not None
        await conn.recv()
        for i in range(n):
            await conn.send(f"s{i}")
            if i % 7 == 3:
                server.publish("t", f"p{i}")
            if i % 25 == 10:
                # Started in order, each while the ones before may still be queued.
                await asyncio.gather(*(conn.send(f"g{i}.{k}") for k in range(20)))
            if i == n // 2:
                await conn.send(LARGE)
        if close:
            await conn.close(1000, "done")
            return
        await conn.send("end")
        async for _ in conn:
            pass

    return handler, expected


async def receive_all(ws: Any) -> list[Any]:
    got = []
    with pytest.raises(ConnectionClosedOK):
        while True:
            got.append(await asyncio.wait_for(ws.recv(), 10))
    return got


@THREADS
async def test_sends_publishes_and_a_large_send_arrive_in_call_order(threads: int) -> None:
    handler, expected = sequence_handler(300)
    async with serve(handler_handshake(handler), threads=threads) as server:
        async with connect(url(server), max_size=None) as ws:
            await ws.send("go")
            got = await receive_all(ws)
            assert ws.close_code == 1000 and ws.close_reason == "done"
    assert got == expected


@THREADS
async def test_sends_behind_a_publish_still_on_its_way_wait_for_write_limit(threads: int) -> None:
    """A publish to the connection's topic waits behind one that the fan-out task
    compresses (for another subscriber, without context takeover: tens of ms), so the
    connection's own frames take the fan-out route meanwhile. They must still wait for
    write_limit: the large send went out of the handler's hands whole, every send after
    it piled up unwritten, and the next publish found the connection over
    max_backpressure and was lost (1 run in 6 of the test above, with threads=0)."""
    slow = random.Random(1).randbytes(900 * 1024)  # incompressible, under max_backpressure
    expected: list[Any] = ["p0", LARGE, *(f"s{i}" for i in range(50)), "p1", "end"]
    subscribed = asyncio.Event()

    async def slow_subscriber(conn: lightws.Connection) -> None:
        conn.subscribe("slow")
        subscribed.set()
        async for _ in conn:
            pass

    async def handler(conn: lightws.Connection) -> None:
        conn.subscribe("t")
        server = conn.server
        assert server is not None
        await conn.recv()
        assert server.publish("slow", slow) == 1
        server.publish("t", "p0")  # behind the slow one
        await conn.send(LARGE)
        for i in range(50):
            await conn.send(f"s{i}")
        server.publish("t", "p1")
        await conn.send("end")
        await conn.close(1000, "done")

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        return slow_subscriber if request.path == "/slow" else handler

    deflate = lightws.Deflate(server_no_context_takeover=True)
    async with serve(handshake, threads=threads, compression=deflate) as server:
        async with connect(url(server, "/slow"), max_size=None) as other:
            await asyncio.wait_for(subscribed.wait(), 10)
            async with connect(url(server), max_size=None, compression=None) as ws:
                await ws.send("go")
                got = await receive_all(ws)
                assert ws.close_code == 1000 and ws.close_reason == "done"
            assert await asyncio.wait_for(other.recv(), 10) == slow
        closes = server.stats().backpressure_closes
    assert got == expected
    assert closes == 0


def tls_files(tmp_path: Path) -> tuple[str, str, ssl.SSLContext]:
    ca = trustme.CA()
    leaf = ca.issue_cert("a.test")
    cert, key = tmp_path / "a.crt", tmp_path / "a.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return str(cert), str(key), ctx


@THREADS
async def test_tls_connections_keep_the_same_order(tmp_path: Path, threads: int) -> None:
    # The client closes: a server-initiated close over TLS sometimes ends without the
    # client seeing the close frame on uvloop, with or without this change (a
    # websockets "no close frame received or sent"; not what is tested here).
    cert, key, ctx = tls_files(tmp_path)
    handler, expected = sequence_handler(120, close=False)
    tls = {"cert_file": cert, "key_file": key}
    async with serve(handler_handshake(handler), threads=threads, **tls) as server:
        wss = f"wss://127.0.0.1:{server.port}/"
        async with connect(wss, ssl=ctx, server_hostname="a.test", max_size=None) as ws:
            await ws.send("go")
            got = [await asyncio.wait_for(ws.recv(), 10) for _ in expected]
    assert got == expected


@THREADS
async def test_nothing_follows_the_close_frame(threads: int) -> None:
    async def handler(conn: lightws.Connection) -> None:
        await conn.recv()
        for i in range(200):
            await conn.send(f"m{i}")
        await conn.close(4000, "bye")
        with pytest.raises(lightws.ConnectionClosed):
            await conn.send("after close")

    async with serve(handler_handshake(handler), threads=threads) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"go")
            for i in range(200):
                assert await ws.recv_message() == (TEXT, f"m{i}".encode())
            assert await ws.read_close() == (4000, "bye")
            await ws.send_close(4000)
            # Only the end of the connection after the close frame: no byte more.
            rest = await asyncio.wait_for(ws.reader.read(), 10)
            assert rest == b""


def frame_len(payload: int) -> int:
    """Bytes of an unmasked server frame with ``payload`` bytes."""
    return payload + (2 if payload < 126 else 4 if payload < 65536 else 10)


@THREADS
async def test_a_peer_that_stops_reading_gets_every_byte_when_it_reads_again(threads: int) -> None:
    """The kernel stops taking the server's output: inline writes go through partly
    and the rest is queued for the task, with later sends behind it."""
    stalled = asyncio.Event()
    done = asyncio.Event()
    sent: list[int] = []

    async def handler(conn: lightws.Connection) -> None:
        await conn.recv()
        i = await fill(conn)
        stalled.set()
        for _ in range(300):  # behind the queued bytes (these wait for the drain)
            await conn.send(i.to_bytes(4, "big") * 250)
            i += 1
        sent.append(i)
        await conn.close(1000)
        done.set()

    async with serve(handler_handshake(handler), threads=threads) as server:
        ws = await stalled_client(server.port)
        writer = ws.writer
        await ws.send_frame(TEXT, b"go")
        await asyncio.wait_for(stalled.wait(), 30)
        writer.transport.resume_reading()  # type: ignore[attr-defined]
        received = 0
        n = 0
        while True:
            frame = await ws.recv_frame()
            received += frame_len(len(frame.payload))
            if frame.opcode == CLOSE:
                break
            assert frame.opcode == BINARY and frame.fin
            assert frame.payload == n.to_bytes(4, "big") * 250, f"message {n}"
            n += 1
        await ws.send_frame(CLOSE, close_payload(1000))
        await asyncio.wait_for(done.wait(), 10)
        assert n == sent[0]
        conn_stats = server.stats()
        assert conn_stats.frames_out.get(lightws.Opcode.BINARY) == n
        assert conn_stats.bytes_out == received
        writer.close()


@THREADS
async def test_statistics_count_what_went_out_inline(threads: int) -> None:
    async def handler(conn: lightws.Connection) -> None:
        async for msg in conn:
            await conn.send(msg)
            assert conn.buffered_amount == 0

    async with serve(handler_handshake(handler), threads=threads) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            # Each in one frame (up to write_limit, 64 KiB): every header length.
            sizes = (0, 1, 125, 126, 1000, 65535, 65536)
            for size in sizes:
                await ws.send_frame(BINARY, b"x" * size)
                assert await ws.recv_message() == (BINARY, b"x" * size)
            total = sum(frame_len(s) for s in sizes)
            await eventually(lambda: server.stats().bytes_out == total)
            assert server.stats().frames_out.get(lightws.Opcode.BINARY) == len(sizes)
            assert all(c.buffered_amount == 0 for c in server.connections)


async def messages_and_pongs(
    ws: RawWebSocket, expect: Callable[[int], tuple[int, bytes]]
) -> tuple[int, int]:
    """Read up to the close frame: message n must be ``expect(n)`` (opcode, payload), and
    pongs answer pings ``p0``, ``p1``, ... in order. Returns (messages, pongs)."""
    n, pongs = 0, 0
    while True:
        frame = await ws.recv_frame()
        if frame.opcode == PONG:
            assert frame.payload == f"p{pongs}".encode()
            pongs += 1
        elif frame.opcode == CLOSE:
            return n, pongs
        else:
            assert frame.fin and (frame.opcode, frame.payload) == expect(n), f"message {n}"
            n += 1


@THREADS
async def test_pings_from_the_peer_and_sends_share_the_socket(threads: int) -> None:
    """The task answers pings (its own output) while the handler sends."""

    async def handler(conn: lightws.Connection) -> None:
        await conn.recv()
        for i in range(500):
            await conn.send(f"m{i}")
            if i % 50 == 0:
                await asyncio.sleep(0)
        await conn.recv()  # "end": after every ping, so every pong is queued before it
        await conn.close()

    async with serve(handler_handshake(handler), threads=threads) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"go")
            for k in range(100):
                await ws.write(build_frame(PING, f"p{k}".encode()))
            await ws.send_frame(TEXT, b"end")
            got = await messages_and_pongs(ws, lambda n: (TEXT, f"m{n}".encode()))
            assert got == (500, 100)


async def stalled_client(port: int) -> RawWebSocket:
    """Upgraded, with a small receive buffer, not reading (resume with
    ``ws.writer.transport.resume_reading()``)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    writer.write(upgrade_request("/", key=new_key()))
    response = await read_response(reader)
    assert response.status == 101
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    return RawWebSocket(reader, writer, response)


async def fill(conn: lightws.Connection) -> int:
    """Send numbered messages until bytes wait in user space (the kernel stopped
    taking them: the last inline write was partial, or the queue holds them)."""
    i = 0
    while conn.buffered_amount == 0:
        await conn.send(i.to_bytes(4, "big") * 250)
        i += 1
    return i


@THREADS
async def test_an_overflow_after_a_partial_inline_write_keeps_that_frame_whole(
    threads: int,
) -> None:
    """The end of a frame the loop thread began writing is not dropped with the queue
    when a publish takes the connection over max_backpressure ("close")."""
    filled: list[int] = []

    async def handler(conn: lightws.Connection) -> None:
        conn.subscribe("t")
        server = conn.server
        assert server is not None
        await conn.recv()
        filled.append(await fill(conn))
        for _ in range(64):  # 1 MiB: over max_backpressure
            server.publish("t", b"p" * 16384)
        async for _ in conn:
            pass

    async with serve(
        handler_handshake(handler),
        threads=threads,
        max_backpressure=256 * 1024,
        on_backpressure="close",
    ) as server:
        ws = await stalled_client(server.port)
        async with ws:
            await ws.send_frame(TEXT, b"go")
            await eventually(lambda: server.stats().backpressure_closes == 1)
            ws.writer.transport.resume_reading()  # type: ignore[attr-defined]
            n = 0
            while True:
                frame = await ws.recv_frame()
                if frame.opcode == CLOSE:
                    assert frame.close_code == 1013
                    break
                assert frame.opcode == BINARY and frame.fin
                if frame.payload[:1] == b"p":
                    assert frame.payload == b"p" * 16384
                else:
                    assert frame.payload == n.to_bytes(4, "big") * 250, f"message {n}"
                    n += 1
            assert n == filled[0]


@THREADS
async def test_pongs_wait_for_the_end_of_a_partly_written_frame(threads: int) -> None:
    """Pings arriving while a frame is half written: their pongs (the driver's own
    output) go after its last byte, never inside it."""
    filled: list[int] = []

    async def handler(conn: lightws.Connection) -> None:
        await conn.recv()
        filled.append(await fill(conn))
        await conn.recv()  # "end", after the pings
        await conn.close()

    async with serve(handler_handshake(handler), threads=threads) as server:
        ws = await stalled_client(server.port)
        async with ws:
            await ws.send_frame(TEXT, b"go")
            await eventually(lambda: filled != [])
            for k in range(20):
                await ws.write(build_frame(PING, f"p{k}".encode()))
            await ws.send_frame(TEXT, b"end")
            await asyncio.sleep(0.1)  # the pings are read (and answered) while stalled
            ws.writer.transport.resume_reading()  # type: ignore[attr-defined]
            got = await messages_and_pongs(ws, lambda n: (BINARY, n.to_bytes(4, "big") * 250))
            assert got == (filled[0], 20)
