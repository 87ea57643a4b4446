"""permessage-deflate (RFC 7692) through the Python API: Config.compression,
``send(..., compress=...)``, streaming, and real clients (websockets, aiohttp) that
negotiate it. The wire-level rules (Autobahn 12.*, 13.*) are in test_conformance.py."""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

import aiohttp
import lightws
import pytest
from support import reporting_handshake, serve, url
from support.rawws import BINARY, TEXT, RawWebSocket
from websockets.asyncio.client import connect

TAIL = b"\x00\x00\xff\xff"
NO_SERVER_TAKEOVER = "permessage-deflate; server_no_context_takeover"


def json_message(i: int, size: int = 1024) -> str:
    body = {"id": i, "user": "alice", "items": [{"sku": f"A-{k}", "qty": k} for k in range(8)]}
    text = json.dumps(body)
    return (text * (size // len(text) + 1))[:size]


async def raw_deflate(server: lightws.Server, offer: str = "permessage-deflate") -> RawWebSocket:
    ws = await RawWebSocket.connect(server.port, extra=[("Sec-WebSocket-Extensions", offer)])
    ws.allow_rsv1 = True
    return ws


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(wbits=-15).decompress(payload + TAIL)


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


async def test_deflate_defaults_and_validation() -> None:
    d = lightws.Deflate()
    assert (d.server_max_window_bits, d.client_max_window_bits) == (12, 12)
    assert (d.server_no_context_takeover, d.client_no_context_takeover) == (False, False)
    assert (d.level, d.min_size) == (6, 64)
    assert lightws.Config(addr=":0", handshake=lambda q, r: None).compression is None
    for bad, field in [
        (lightws.Deflate(server_max_window_bits=7), "server_max_window_bits"),
        (lightws.Deflate(client_max_window_bits=16), "client_max_window_bits"),
        (lightws.Deflate(level=10), "level"),
        (lightws.Deflate(min_size=-1), "min_size"),
    ]:
        with pytest.raises(ValueError, match=field):
            async with serve(compression=bad):
                pass
    with pytest.raises(TypeError, match="compression"):
        async with serve(compression="deflate"):
            pass


async def test_websockets_client_exchanges_compressed_messages_both_ways() -> None:
    async with serve(compression=lightws.Deflate()) as server:
        async with connect(url(server)) as ws:
            assert ws.response is not None
            ext = ws.response.headers["Sec-WebSocket-Extensions"]
            assert ext == "permessage-deflate; client_max_window_bits=12"
            messages = [json_message(i, 1024) for i in range(200)]
            for m in messages:
                await ws.send(m)
            for m in messages:
                assert await asyncio.wait_for(ws.recv(), 5) == m
            await ws.send(b"\x00" * 300_000)
            assert await asyncio.wait_for(ws.recv(), 5) == b"\x00" * 300_000
        stats = server.stats()
        # 200 KiB of JSON and 300 KB of zeros each way: compressed both ways.
        assert stats.bytes_in < 100_000, stats
        assert stats.bytes_out < 100_000, stats


@pytest.mark.parametrize("no_takeover", [False, True])
async def test_aiohttp_client_exchanges_compressed_messages_both_ways(no_takeover: bool) -> None:
    compression = lightws.Deflate(
        server_no_context_takeover=no_takeover, client_no_context_takeover=no_takeover
    )
    async with serve(compression=compression) as server:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url(server), compress=15) as ws:
                assert ws.compress
                messages = [json_message(i, 2048) for i in range(100)]
                for m in messages:
                    await ws.send_str(m)
                for m in messages:
                    assert await ws.receive_str(timeout=5) == m
                await ws.send_bytes(b"\x01" * 100_000)
                assert await ws.receive_bytes(timeout=5) == b"\x01" * 100_000
                await ws.close()
        stats = server.stats()
        assert stats.bytes_in < 120_000, stats
        assert stats.bytes_out < 120_000, stats


async def test_send_compress_overrides_the_policy() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.send("x" * 200)  # policy: over min_size, compressed
        await conn.send("y" * 10)  # policy: under min_size, plain
        await conn.send("z" * 10, compress=True)  # forced
        await conn.send("w" * 200, compress=False)  # refused
        await conn.send_text("t" * 100, compress=False)
        await conn.send_binary(b"b" * 5, compress=True)
        await conn.send(lightws.Message(lightws.Opcode.BINARY, b"m" * 100))
        await conn.send_ping(b"never compressed")
        async with conn.writer() as w:  # writer frames go uncompressed
            await w.write(b"s" * 500)
        return None

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, compression=lightws.Deflate()) as server:
        async with await raw_deflate(server, NO_SERVER_TAKEOVER) as ws:
            got = []
            for _ in range(9):
                f = await ws.recv_frame()
                payload = inflate(f.payload) if f.rsv == 4 else f.payload
                got.append((f.opcode, f.rsv == 4, payload))
            await asyncio.wait_for(outcome, 5)
    assert got == [
        (TEXT, True, b"x" * 200),
        (TEXT, False, b"y" * 10),
        (TEXT, True, b"z" * 10),
        (TEXT, False, b"w" * 200),
        (TEXT, False, b"t" * 100),
        (BINARY, True, b"b" * 5),
        (BINARY, True, b"m" * 100),
        (9, False, b"never compressed"),
        (BINARY, False, b"s" * 500),
    ]


async def test_compress_is_ignored_without_the_extension() -> None:
    async def body(conn: lightws.Connection) -> Any:
        await conn.send("x" * 200, compress=True)

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, compression=lightws.Deflate()) as server:
        async with await RawWebSocket.connect(server.port) as ws:  # offers nothing
            f = await ws.recv_frame()
            assert (f.rsv, f.payload) == (0, b"x" * 200)
            await asyncio.wait_for(outcome, 5)


async def test_large_compressed_sends_go_whole_and_keep_order_with_write_limit() -> None:
    big = json_message(0, 3_000_000).encode()

    async def body(conn: lightws.Connection) -> Any:
        await asyncio.gather(conn.send(big), conn.send("after" * 20), conn.send(b"tiny"))

    handshake, outcome = reporting_handshake(body)
    async with serve(
        handshake, compression=lightws.Deflate(), write_limit=16 * 1024, max_msg_len=8 << 20
    ) as server:
        async with await raw_deflate(server, NO_SERVER_TAKEOVER) as ws:
            f = await ws.recv_frame(timeout=20)
            assert (f.opcode, f.fin, f.rsv) == (BINARY, True, 4)
            assert inflate(f.payload) == big
            f = await ws.recv_frame()
            assert inflate(f.payload) == b"after" * 20
            f = await ws.recv_frame()
            assert (f.rsv, f.payload) == (0, b"tiny")
            await asyncio.wait_for(outcome, 5)


async def test_a_streamed_compressed_message_yields_inflated_chunks() -> None:
    async def body(conn: lightws.Connection) -> Any:
        reader = conn.reader()
        chunks = [bytes(c) async for c in reader]
        return reader.opcode, chunks

    handshake, outcome = reporting_handshake(body)
    text = json_message(1, 200_000).encode()
    async with serve(handshake, compression=lightws.Deflate()) as server:
        async with await raw_deflate(server) as ws:
            wire = deflate(text)
            third = len(wire) // 3
            await ws.send_frame(TEXT, wire[:third], fin=False, rsv1=True)
            await ws.send_frame(0, wire[third : 2 * third], fin=False)
            await ws.send_frame(0, wire[2 * third :], fin=True)
            opcode, chunks = await asyncio.wait_for(outcome, 5)
    assert opcode == lightws.Opcode.TEXT
    assert b"".join(chunks) == text


async def test_a_deflate_bomb_through_recv_is_payload_too_big_for_the_handler() -> None:
    async def body(conn: lightws.Connection) -> Any:
        with pytest.raises(lightws.ConnectionClosedError) as info:
            await conn.recv()
        return info.value.code

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, compression=lightws.Deflate(), max_msg_len=100_000) as server:
        async with await raw_deflate(server) as ws:
            await ws.send_frame(BINARY, deflate(bytes(50_000_000)), rsv1=True)
            code, _ = await ws.read_close()
            assert code == 1009
            assert await asyncio.wait_for(outcome, 5) == 1009


async def test_cli_echo_with_compression_options_builds_the_config(monkeypatch: Any) -> None:
    from lightws import __main__ as cli

    seen: dict[str, Any] = {}

    async def fake_serve(config: lightws.Config, *_: Any) -> int:
        seen["compression"] = config.compression
        return 0

    monkeypatch.setattr(cli, "_serve", fake_serve)
    argv = ["echo", "--compression", "deflate", "--server-max-window-bits", "9"]
    argv += ["--client-max-window-bits", "8", "--server-no-context-takeover"]
    argv += ["--client-no-context-takeover", "--compression-level", "1"]
    argv += ["--compression-min-size", "0"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert seen["compression"] == lightws.Deflate(
        server_max_window_bits=9,
        client_max_window_bits=8,
        server_no_context_takeover=True,
        client_no_context_takeover=True,
        level=1,
        min_size=0,
    )
    assert await asyncio.to_thread(cli.main, ["echo"]) == 0
    assert seen["compression"] is None


async def test_publish_and_broadcast_are_compressed_per_subscriber_parameters() -> None:
    """Subscribers with server_no_context_takeover share one compressed frame per
    publish; with context takeover each one's session compresses with its own window;
    one without the extension gets the plain frame."""
    joined: list[lightws.Connection] = []

    async def handler(conn: lightws.Connection) -> None:
        conn.subscribe("room")
        joined.append(conn)
        async for _ in conn:
            pass

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        return handler

    messages = [json_message(i, 3000) for i in range(5)]
    async with serve(handshake, compression=lightws.Deflate()) as server:
        nct = await raw_deflate(server, "permessage-deflate; server_no_context_takeover")
        nct2 = await raw_deflate(server, "permessage-deflate; server_no_context_takeover")
        ct = await raw_deflate(server, "permessage-deflate")
        plain = await RawWebSocket.connect(server.port)
        async with nct, nct2, ct, plain:
            while len(joined) < 4:
                await asyncio.sleep(0.01)
            for m in messages:
                assert server.publish("room", m) == 4
            assert lightws.broadcast(joined, b"\x07" * 1000) == 4
            takeover = zlib.decompressobj(wbits=-12)
            for m in messages:
                a, b = await nct.recv_frame(), await nct2.recv_frame()
                assert (a.rsv, a.payload) == (4, b.payload)
                assert inflate(a.payload) == m.encode()
                c = await ct.recv_frame()
                assert c.rsv == 4
                assert takeover.decompress(c.payload + TAIL) == m.encode()
                p = await plain.recv_frame()
                assert (p.rsv, p.payload) == (0, m.encode())
            assert inflate((await nct.recv_frame()).payload) == b"\x07" * 1000
            assert takeover.decompress((await ct.recv_frame()).payload + TAIL) == b"\x07" * 1000
            assert (await plain.recv_frame()).payload == b"\x07" * 1000
