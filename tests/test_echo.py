"""Echo round trips with real clients (websockets, aiohttp) and raw frames."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import lightws
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import eventually, serve, url
from support.rawws import BINARY, CONT, PING, PONG, TEXT, RawWebSocket, build_frame
from websockets.asyncio.client import connect

SIZES = [0, 125, 126, 65535, 65536, 1 << 20]
SIZE_IDS = ["0", "125", "126", "65535", "65536", "1MiB"]


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
async def test_websockets_client_echoes_text(echo_server: lightws.Server, size: int) -> None:
    message = "é" * (size // 2) + "a" * (size % 2)
    assert len(message.encode()) == size
    async with connect(url(echo_server), max_size=None) as ws:
        await ws.send(message)
        assert await asyncio.wait_for(ws.recv(), 10) == message


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
async def test_websockets_client_echoes_binary(echo_server: lightws.Server, size: int) -> None:
    message = os.urandom(size)
    async with connect(url(echo_server), max_size=None) as ws:
        await ws.send(message)
        assert await asyncio.wait_for(ws.recv(), 10) == message


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
async def test_aiohttp_client_echoes_text_and_binary(
    echo_server: lightws.Server, size: int
) -> None:
    text = "€" * (size // 3) + "a" * (size % 3)
    data = os.urandom(size)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url(echo_server), max_msg_size=0, autoping=True) as ws:
            await ws.send_str(text)
            assert await ws.receive_str(timeout=10) == text
            await ws.send_bytes(data)
            assert await ws.receive_bytes(timeout=10) == data
            await ws.close()
            assert ws.close_code == 1000


async def test_message_of_exactly_max_msg_len_is_accepted() -> None:
    async with serve(max_msg_len=1000) as server:
        async with connect(url(server)) as ws:
            await ws.send(b"x" * 1000)
            assert await asyncio.wait_for(ws.recv(), 5) == b"x" * 1000


async def test_many_messages_on_one_connection_come_back_in_order(
    echo_server: lightws.Server,
) -> None:
    messages = [f"message {i}" for i in range(1000)]
    async with connect(url(echo_server)) as ws:
        for m in messages:
            await ws.send(m)
        received = [await asyncio.wait_for(ws.recv(), 5) for _ in messages]
    assert received == messages


async def test_websockets_client_fragments_are_reassembled(echo_server: lightws.Server) -> None:
    async with connect(url(echo_server)) as ws:
        await ws.send(["frag", "mented ", "", "té", "xt"])
        assert await asyncio.wait_for(ws.recv(), 5) == "fragmented téxt"
        await ws.send([b"\x00\x01", b"\x02" * 70000, b"\x03"])
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01" + b"\x02" * 70000 + b"\x03"


async def test_async_iterable_of_fragments_is_reassembled(echo_server: lightws.Server) -> None:
    async def fragments():
        for part in ("one ", "two ", "three"):
            yield part
            await asyncio.sleep(0.01)  # the case: fragments produced over time

    async with connect(url(echo_server)) as ws:
        await ws.send(fragments())
        assert await asyncio.wait_for(ws.recv(), 5) == "one two three"


async def test_raw_fragments_are_reassembled_including_a_split_character(
    echo_server: lightws.Server,
) -> None:
    euro = "€".encode()  # three bytes, split over three frames
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, b"price: " + euro[:1], fin=False)
        await ws.send_frame(CONT, euro[1:2], fin=False)
        await ws.send_frame(CONT, b"", fin=False)
        await ws.send_frame(CONT, euro[2:] + b"5", fin=True)
        assert await ws.recv_message() == (TEXT, "price: €5".encode())
        await ws.send_frame(BINARY, b"\x00" * 200, fin=False)
        await ws.send_frame(CONT, b"\x01" * 70000, fin=True)
        assert await ws.recv_message() == (BINARY, b"\x00" * 200 + b"\x01" * 70000)


async def test_reverse_query_reverses_each_message(echo_server: lightws.Server) -> None:
    async with connect(url(echo_server, "/?reverse=1")) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "olleh"
        await ws.send(b"\x01\x02\x03")
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x03\x02\x01"
    async with connect(url(echo_server, "/?reverse=0")) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"


async def test_500_concurrent_connections_all_echo(echo_server: lightws.Server) -> None:
    async def client(i: int) -> str:
        async with connect(url(echo_server), open_timeout=30) as ws:
            await ws.send(f"client {i}")
            reply = await ws.recv()
            await ws.send(f"client {i} again")
            return reply + " / " + await ws.recv()

    replies = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(500))), 90)
    assert replies == [f"client {i} / client {i} again" for i in range(500)]
    stats = echo_server.stats()
    assert stats.handshakes >= 500


async def test_stats_count_handshakes_and_bytes(echo_server: lightws.Server) -> None:
    before = echo_server.stats()
    async with connect(url(echo_server)) as ws:
        await ws.send(b"x" * 10000)
        await asyncio.wait_for(ws.recv(), 5)
        during = echo_server.stats()
        assert during.connections == before.connections + 1
    await eventually(lambda: echo_server.stats().bytes_out - before.bytes_out >= 10000)
    after = echo_server.stats()
    assert after.handshakes == before.handshakes + 1
    assert after.bytes_in - before.bytes_in >= 10000
    assert after.bytes_out - before.bytes_out >= 10000


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.binary(max_size=3000) | st.text(max_size=1000).map(str.encode),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
    pings=st.lists(st.booleans(), min_size=7, max_size=7),
    text=st.booleans(),
)
async def test_any_fragmentation_with_interleaved_pings_echoes_the_message(
    echo_server: lightws.Server, body: bytes, cuts: list[int], pings: list[bool], text: bool
) -> None:
    if text:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            text = False
    points = sorted({min(c, len(body)) for c in cuts})
    bounds = [0, *points, len(body)]
    pieces = [body[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
    frames = []
    expected_pongs = []
    for i, piece in enumerate(pieces):
        opcode = (TEXT if text else BINARY) if i == 0 else CONT
        frames.append(build_frame(opcode, piece, fin=i == len(pieces) - 1))
        if pings[i] and i < len(pieces) - 1:
            frames.append(build_frame(PING, str(i).encode()))
            expected_pongs.append(str(i).encode())
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.write(b"".join(frames))
        pongs = []
        while True:
            frame = await ws.recv_frame()
            if frame.opcode == PONG:
                pongs.append(frame.payload)
                continue
            assert frame.opcode == (TEXT if text else BINARY)
            assert frame.fin
            assert frame.payload == body
            break
        assert pongs == expected_pongs
