"""conn.reader() / conn.writer(): messages streamed chunk by chunk (DESIGN.md §1)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import lightws
import pytest
from support import eventually, reporting_handshake, serve, url
from support.awaitables import noting_waits
from support.rawws import RawWebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

OP_TEXT, OP_BINARY, OP_CONT, OP_CLOSE, OP_PING = 1, 2, 0, 8, 9


async def test_reader_yields_a_fragmented_message_chunk_by_chunk_beyond_max_msg_len() -> None:
    chunks: list[bytes] = []

    async def body(conn: lightws.Connection) -> Any:
        reader = conn.reader()
        async for chunk in reader:
            chunks.append(chunk)
        return reader.opcode, b"".join(chunks)

    handshake, outcome = reporting_handshake(body)
    part = bytes(range(256)) * 256  # 64 KiB
    async with serve(handshake, max_msg_len=1024) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(OP_BINARY, part, fin=False)
            for _ in range(14):
                await ws.send_frame(OP_CONT, part, fin=False)
            await ws.send_frame(OP_CONT, part, fin=True)
            opcode, data = await asyncio.wait_for(outcome, 10)
    assert opcode == lightws.Opcode.BINARY
    assert data == part * 16  # 1 MiB through a server whose max_msg_len is 1 KiB
    assert len(chunks) >= 16


async def test_reader_streams_one_huge_single_frame_without_assembling_it() -> None:
    async def body(conn: lightws.Connection) -> Any:
        digest = hashlib.sha256()
        count = 0
        async for chunk in conn.reader():
            digest.update(chunk)
            count += 1
        return digest.hexdigest(), count

    handshake, outcome = reporting_handshake(body)
    payload = b"z" * (8 << 20)
    async with serve(handshake) as server:  # max_msg_len 1 MiB by default
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(OP_BINARY, payload)
            digest, count = await asyncio.wait_for(outcome, 20)
    assert digest == hashlib.sha256(payload).hexdigest()
    assert count > 1  # it arrived in pieces, not as one 8 MiB buffer


async def test_control_frames_keep_flowing_while_a_message_streams() -> None:
    async def body(conn: lightws.Connection) -> Any:
        return await conn.reader().read_all()

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(OP_TEXT, b"hello ", fin=False)
            await ws.send_frame(OP_PING, b"are you there")
            pong = await ws.recv_frame()
            assert (pong.opcode, pong.payload) == (10, b"are you there")
            await ws.send_frame(OP_CONT, "wörld".encode(), fin=True)
            assert await asyncio.wait_for(outcome, 5) == "hello wörld".encode()


async def test_invalid_utf8_in_a_streamed_text_message_closes_with_1007() -> None:
    async def body(conn: lightws.Connection) -> Any:
        with pytest.raises(lightws.ConnectionClosedError) as info:
            async for _ in conn.reader():
                pass
        return info.value.code

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(OP_TEXT, b"fine so far ", fin=False)
            await ws.send_frame(OP_CONT, b"\xed\xa0\x80", fin=False)  # a surrogate
            code, _ = await ws.read_close()
            assert code == 1007
            assert await asyncio.wait_for(outcome, 5) == 1007


async def test_reader_returns_an_already_received_message_whole() -> None:
    arrived = asyncio.Event()

    async def body(conn: lightws.Connection) -> Any:
        await conn.send("ready")
        await arrived.wait()  # the whole message is in before reader() is called
        chunks = [c async for c in conn.reader()]
        following = await conn.recv()
        return chunks, following.text

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            assert (await ws.recv_message())[1] == b"ready"
            # Three frames: streamed, they would be three chunks; assembled, one.
            await ws.send_frame(OP_BINARY, b"ear", fin=False)
            await ws.send_frame(OP_CONT, b"l", fin=False)
            await ws.send_frame(OP_CONT, b"y", fin=True)
            await ws.send_frame(OP_TEXT, b"next")
            # A message is counted at its first frame; once "next" is counted, every
            # frame of the one before it has been decoded and that message is queued.
            await eventually(lambda: sum(server.stats().frames_in.values()) >= 2)
            arrived.set()
            chunks, following = await asyncio.wait_for(outcome, 5)
    assert chunks == [b"early"]
    assert following == "next"


async def test_reader_called_before_the_message_arrives_yields_its_frames_as_they_come() -> None:
    async def body(conn: lightws.Connection) -> Any:
        reader = conn.reader()  # before any frame of the message is in
        await conn.send("ready")
        return [chunk async for chunk in reader]

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            assert (await ws.recv_message())[1] == b"ready"
            # Well under max_msg_len: only streaming, not the size, makes it chunks.
            await ws.send_frame(OP_TEXT, b"one ", fin=False)
            await ws.send_frame(OP_CONT, b"two ", fin=False)
            await ws.send_frame(OP_CONT, b"three", fin=True)
            chunks = await asyncio.wait_for(outcome, 5)
    # A whole-message path could only give [b"one two three"].
    assert chunks == [b"one ", b"two ", b"three"]


async def test_writer_sends_one_fragmented_message() -> None:
    async def body(conn: lightws.Connection) -> Any:
        async with conn.writer(binary=False) as w:
            for word in ("streamed ", "in ", "pieces"):
                await w.write(word)
        async with conn.writer() as w:
            await w.write(b"\x00" * 100_000)
            await w.write(bytearray(b"\x01" * 10))
        return None

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            frames = [await ws.recv_frame() for _ in range(4)]
            assert [(f.opcode, f.fin) for f in frames] == [
                (OP_TEXT, False),
                (OP_CONT, False),
                (OP_CONT, False),
                (OP_CONT, True),
            ]
            assert b"".join(f.payload for f in frames) == b"streamed in pieces"
            op, data = await ws.recv_message()
            assert op == OP_BINARY
            assert data == b"\x00" * 100_000 + b"\x01" * 10
        await asyncio.wait_for(outcome, 5)


async def test_an_empty_writer_sends_one_empty_final_frame() -> None:
    async def body(conn: lightws.Connection) -> Any:
        async with conn.writer():
            pass
        return None

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.fin, frame.payload) == (OP_BINARY, True, b"")
        await asyncio.wait_for(outcome, 5)


async def test_send_during_a_writer_waits_for_the_final_frame() -> None:
    async def body(conn: lightws.Connection) -> Any:
        async with conn.writer(binary=False) as w:
            await w.write("part one, ")
            waiting = asyncio.Event()
            other = asyncio.ensure_future(noting_waits(conn.send("interloper"), waiting.set))
            await asyncio.wait_for(waiting.wait(), 5)  # it waits for the writer
            assert not other.done()
            await w.write("part two")
        await asyncio.wait_for(other, 5)
        return None

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server)) as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "part one, part two"
            assert await asyncio.wait_for(ws.recv(), 5) == "interloper"
        await asyncio.wait_for(outcome, 5)


async def test_writer_rejects_wrong_chunk_types_and_nested_writers() -> None:
    async def body(conn: lightws.Connection) -> Any:
        async with conn.writer(binary=False) as w:
            with pytest.raises(TypeError):
                await w.write(b"bytes into a text writer")
            with pytest.raises(RuntimeError):
                async with conn.writer():
                    pass
            await w.write("ok")
        async with conn.writer() as w:
            with pytest.raises(TypeError):
                await w.write("str into a binary writer")
        return None

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with connect(url(server)) as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "ok"
            assert await asyncio.wait_for(ws.recv(), 5) == b""
        await asyncio.wait_for(outcome, 5)


async def test_large_messages_go_out_in_fragments_bounded_by_write_limit() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def body(conn: lightws.Connection) -> Any:
        await conn.send(payload)
        await conn.send("after")
        return None

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, write_limit=64 * 1024) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            frames = []
            while True:
                frame = await ws.recv_frame(timeout=10)
                frames.append(frame)
                if frame.fin:
                    break
            assert frames[0].opcode == OP_BINARY
            assert all(f.opcode == OP_CONT for f in frames[1:])
            assert max(len(f.payload) for f in frames) <= 64 * 1024
            assert b"".join(f.payload for f in frames) == payload
            assert await ws.recv_message() == (OP_TEXT, b"after")
        await asyncio.wait_for(outcome, 10)


async def test_sends_from_other_tasks_wait_for_a_fragmented_message() -> None:
    big = "é" * (300 * 1024)

    async def body(conn: lightws.Connection) -> Any:
        first = asyncio.ensure_future(conn.send(big))
        others = [asyncio.ensure_future(conn.send(f"small {i}")) for i in range(5)]
        ping = asyncio.ensure_future(conn.send_ping(b"p"))
        await asyncio.wait_for(asyncio.gather(first, ping, *others), 10)
        return None

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, write_limit=16 * 1024) as server:
        async with connect(url(server), max_size=None) as ws:
            assert await asyncio.wait_for(ws.recv(), 10) == big
            for i in range(5):
                assert await asyncio.wait_for(ws.recv(), 5) == f"small {i}"
        await asyncio.wait_for(outcome, 10)


async def frames_until_close(ws: RawWebSocket) -> list[tuple[int, bool, bytes]]:
    """Every frame up to and including the server's close frame."""
    frames: list[tuple[int, bool, bytes]] = []
    while True:
        frame = await ws.recv_frame()
        frames.append((frame.opcode, frame.fin, frame.payload))
        if frame.opcode == OP_CLOSE:
            return frames


async def test_a_writer_left_by_an_exception_closes_1011_instead_of_ending_the_message() -> None:
    async def body(conn: lightws.Connection) -> Any:
        async with conn.writer(binary=False) as w:
            await w.write("the first half, ")
            raise RuntimeError("the source of the message failed")

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            frames = await frames_until_close(ws)
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(outcome, 5)
    # The fragment that went out, then the close: never a final frame, so the peer
    # cannot take the first half for the whole message.
    assert frames[0] == (OP_TEXT, False, b"the first half, ")
    assert all(not fin for op, fin, _ in frames if op in (OP_TEXT, OP_BINARY, OP_CONT))
    assert frames[-1][2][:2] == (1011).to_bytes(2, "big")


async def test_a_writer_left_by_an_exception_is_never_a_complete_message_for_websockets() -> None:
    async def body(conn: lightws.Connection) -> Any:
        try:
            async with conn.writer() as w:
                await w.write(b"partial")
                raise RuntimeError("boom")
        except RuntimeError:
            pass  # the handler carries on; the writer has closed the connection anyway
        await asyncio.sleep(3600)

    handshake, _ = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        with pytest.raises(ConnectionClosedError) as excinfo:
            await asyncio.wait_for(ws.recv(), 5)
    assert excinfo.value.rcvd is not None and excinfo.value.rcvd.code == 1011


async def test_a_cancelled_writer_closes_1011_instead_of_ending_the_message() -> None:
    wrote = asyncio.Event()

    async def stream(conn: lightws.Connection) -> None:
        async with conn.writer() as w:
            await w.write(b"x" * 1000)
            wrote.set()
            await asyncio.sleep(3600)  # waiting for more data that never comes

    async def body(conn: lightws.Connection) -> Any:
        task = asyncio.ensure_future(stream(conn))
        await wrote.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return conn.closed

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            frames = await frames_until_close(ws)
        await asyncio.wait_for(outcome, 5)
    assert frames[0] == (OP_BINARY, False, b"x" * 1000)
    assert len(frames) == 2
    assert frames[-1][2][:2] == (1011).to_bytes(2, "big")


async def test_a_writer_left_by_an_exception_before_writing_sends_nothing() -> None:
    async def body(conn: lightws.Connection) -> Any:
        with pytest.raises(RuntimeError):
            async with conn.writer():
                raise RuntimeError("nothing written yet")
        await conn.send("the connection is still fine")
        return None

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "the connection is still fine"
        await asyncio.wait_for(outcome, 5)
