"""RFC 6455 rules the server enforces on client frames (DESIGN.md section 3).

Each test speaks raw frames and checks the exact close code the server sends.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import lightws
import pytest
from support import handler_handshake, serve, url
from support.rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, RawWebSocket, build_frame
from websockets.asyncio.client import connect

# Raw-socket protocol rules: decided in Rust (src/session.rs unit-tests every connection
# state transition), so the event loop running the handler changes nothing on the wire;
# this end-to-end sample runs on the default loop only (see test_conformance.py).
pytestmark = pytest.mark.asyncio_loop_only


async def expect_close(ws: RawWebSocket, code: int) -> None:
    """The server sends close ``code`` and, once we answer, ends the TCP connection."""
    got, _ = await ws.read_close()
    assert got == code
    try:
        await ws.send_close(code)
    except OSError:
        pass  # the server may already have dropped TCP after failing the connection
    assert await ws.at_eof(3), "server kept the TCP connection open after closing"


def recording_handshake(queue: asyncio.Queue[Any]) -> Any:
    """Accept with a handler that records every message (and the final exception)."""

    async def handler(conn: lightws.Connection) -> None:
        try:
            async for msg in conn:
                queue.put_nowait(msg)
                if msg.opcode in (lightws.Opcode.TEXT, lightws.Opcode.BINARY):
                    await conn.send(msg)
        except lightws.ConnectionClosed as exc:
            queue.put_nowait(exc)

    return handler_handshake(handler)


async def test_unmasked_client_frame_is_closed_with_1002(echo_server: lightws.Server) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, b"not masked", mask=False)
        await expect_close(ws, 1002)


@pytest.mark.parametrize("rsv", ["rsv1", "rsv2", "rsv3"])
async def test_rsv_bit_without_extension_is_closed_with_1002(
    echo_server: lightws.Server, rsv: str
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, b"reserved", **{rsv: True})
        await expect_close(ws, 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
async def test_reserved_opcode_is_closed_with_1002(
    echo_server: lightws.Server, opcode: int
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(opcode, b"payload")
        await expect_close(ws, 1002)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE], ids=["ping", "pong", "close"])
async def test_control_frame_over_125_bytes_is_closed_with_1002(
    echo_server: lightws.Server, opcode: int
) -> None:
    payload = struct.pack("!H", 1000) + b"r" * 124 if opcode == CLOSE else b"p" * 126
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(opcode, payload)
        await expect_close(ws, 1002)


async def test_control_frame_of_exactly_125_bytes_is_answered(
    echo_server: lightws.Server,
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(PING, b"p" * 125)
        frame = await ws.recv_frame()
        assert (frame.opcode, frame.payload) == (PONG, b"p" * 125)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE], ids=["ping", "pong", "close"])
async def test_fragmented_control_frame_is_closed_with_1002(
    echo_server: lightws.Server, opcode: int
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(opcode, struct.pack("!H", 1000), fin=False)
        await expect_close(ws, 1002)


@pytest.mark.parametrize("fin", [True, False], ids=["final", "not_final"])
async def test_continuation_without_a_start_is_closed_with_1002(
    echo_server: lightws.Server, fin: bool
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(CONT, b"orphan", fin=fin)
        await expect_close(ws, 1002)


async def test_continuation_after_a_finished_message_is_closed_with_1002(
    echo_server: lightws.Server,
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, b"done")
        assert await ws.recv_message() == (TEXT, b"done")
        await ws.send_frame(CONT, b"late")
        await expect_close(ws, 1002)


@pytest.mark.parametrize(
    ("first", "second"),
    [(TEXT, TEXT), (TEXT, BINARY), (BINARY, TEXT), (BINARY, BINARY)],
    ids=["text_text", "text_binary", "binary_text", "binary_binary"],
)
async def test_new_data_frame_inside_a_fragmented_message_is_closed_with_1002(
    echo_server: lightws.Server, first: int, second: int
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(first, b"start", fin=False)
        await ws.send_frame(second, b"intruder")
        await expect_close(ws, 1002)


INVALID_UTF8 = {
    "lone_ff": b"\xff",
    "bad_continuation": b"ok \xc3\x28",
    "overlong_slash": b"\xc0\xaf",
    "surrogate": b"\xed\xa0\x80",
    "above_max_code_point": b"\xf4\x90\x80\x80",
    "truncated_at_end": b"abc\xe2\x82",
}


@pytest.mark.parametrize("payload", INVALID_UTF8.values(), ids=list(INVALID_UTF8))
async def test_invalid_utf8_text_frame_is_closed_with_1007(
    echo_server: lightws.Server, payload: bytes
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, payload)
        await expect_close(ws, 1007)


async def test_invalid_utf8_is_detected_before_the_final_fragment(
    echo_server: lightws.Server,
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, b"valid start ", fin=False)
        await ws.send_frame(CONT, b"then \xff garbage", fin=False)
        # The final fragment is never sent: the server must fail fast.
        await expect_close(ws, 1007)


async def test_invalid_utf8_in_the_first_fragment_is_detected_at_once(
    echo_server: lightws.Server,
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, b"\xc3\x28 never finished", fin=False)
        await expect_close(ws, 1007)


async def test_character_left_incomplete_by_the_final_fragment_is_closed_with_1007(
    echo_server: lightws.Server,
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, b"half a char \xc3", fin=False)
        await ws.send_frame(CONT, b"", fin=True)
        await expect_close(ws, 1007)


async def test_invalid_utf8_in_binary_message_is_fine(echo_server: lightws.Server) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(BINARY, b"\xff\xfe\xc3\x28")
        assert await ws.recv_message() == (BINARY, b"\xff\xfe\xc3\x28")


async def test_invalid_utf8_close_reason_is_closed_with_1007(
    echo_server: lightws.Server,
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_close(1000, b"bad \xff reason")
        await expect_close(ws, 1007)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
async def test_close_code_invalid_on_the_wire_is_answered_with_1002(
    echo_server: lightws.Server, code: int
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_close(code)
        got, _ = await ws.read_close()
        assert got == 1002
        assert await ws.at_eof(3)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4000, 4999])
async def test_valid_close_code_is_echoed(echo_server: lightws.Server, code: int) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_close(code, b"see you")
        got, _ = await ws.read_close()
        assert got == code
        assert await ws.at_eof(3)


async def test_empty_close_frame_is_answered_with_an_empty_or_1000_close(
    echo_server: lightws.Server,
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_close(None)
        got, _ = await ws.read_close()
        assert got in (None, 1000)
        assert await ws.at_eof(3)


async def test_close_frame_with_a_one_byte_payload_is_closed_with_1002(
    echo_server: lightws.Server,
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(CLOSE, b"\x03")
        got, _ = await ws.read_close()
        assert got == 1002
        assert await ws.at_eof(3)


@pytest.mark.parametrize("declared", [1001, 1 << 16, 1 << 40], ids=["1001", "64KiB", "2**40"])
async def test_frame_declaring_more_than_max_msg_len_is_closed_with_1009_at_once(
    declared: int,
) -> None:
    async with serve(max_msg_len=1000) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            # Only the header goes out: the server must not wait for the payload.
            await ws.write(build_frame(BINARY, b"", length=declared))
            await expect_close(ws, 1009)


async def test_fully_sent_message_over_max_msg_len_is_closed_with_1009() -> None:
    async with serve(max_msg_len=1000) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"a" * 1001)
            await expect_close(ws, 1009)


async def test_fragments_whose_total_crosses_max_msg_len_are_closed_with_1009() -> None:
    async with serve(max_msg_len=1000) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(BINARY, b"a" * 400, fin=False)
            await ws.send_frame(CONT, b"b" * 400, fin=False)
            # 800 so far; this header takes the total to 1200 and its payload is never sent.
            await ws.write(build_frame(CONT, b"", fin=True, length=400))
            await expect_close(ws, 1009)


async def test_fragments_totalling_max_msg_len_are_accepted() -> None:
    async with serve(max_msg_len=1000) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(BINARY, b"a" * 500, fin=False)
            await ws.send_frame(CONT, b"b" * 500, fin=True)
            assert await ws.recv_message() == (BINARY, b"a" * 500 + b"b" * 500)


async def test_ping_is_answered_with_the_same_payload_and_not_delivered() -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    async with serve(recording_handshake(queue)) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(PING, b"are you there?")
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.payload, frame.fin) == (PONG, b"are you there?", True)
            await ws.send_frame(PING, b"")
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.payload) == (PONG, b"")
            await ws.send_frame(PONG, b"unsolicited")
            await ws.send_frame(TEXT, b"after pings")
            assert await ws.recv_message() == (TEXT, b"after pings")
            first = await asyncio.wait_for(queue.get(), 5)
            assert first == lightws.Message(lightws.Opcode.TEXT, b"after pings")
            assert queue.empty()


async def test_without_auto_pong_pings_and_pongs_are_delivered_to_recv() -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    async with serve(recording_handshake(queue), auto_pong=False) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(PING, b"ping payload")
            msg = await asyncio.wait_for(queue.get(), 5)
            assert msg == lightws.Message(lightws.Opcode.PING, b"ping payload")
            assert msg.opcode is lightws.Opcode.PING
            await ws.send_frame(PONG, b"pong payload")
            msg = await asyncio.wait_for(queue.get(), 5)
            assert msg == lightws.Message(lightws.Opcode.PONG, b"pong payload")


@pytest.mark.parametrize("control", [PING, PONG], ids=["ping", "pong"])
async def test_control_frames_may_interleave_a_fragmented_message(
    echo_server: lightws.Server, control: int
) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, b"inter", fin=False)
        await ws.send_frame(control, b"in the middle")
        await ws.send_frame(CONT, b"leaved", fin=False)
        await ws.send_frame(control, b"again")
        await ws.send_frame(CONT, b" message", fin=True)
        pongs = []
        while True:
            frame = await ws.recv_frame()
            if frame.opcode == PONG:
                pongs.append(frame.payload)
                continue
            assert (frame.opcode, frame.fin, frame.payload) == (TEXT, True, b"interleaved message")
            break
        assert pongs == ([b"in the middle", b"again"] if control == PING else [])


async def test_close_inside_a_fragmented_message_is_echoed(echo_server: lightws.Server) -> None:
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(TEXT, b"never finished", fin=False)
        await ws.send_close(1000)
        got, _ = await ws.read_close()
        assert got == 1000
        assert await ws.at_eof(3)


async def test_frame_written_one_byte_at_a_time_is_parsed(echo_server: lightws.Server) -> None:
    frame = build_frame(BINARY, bytes(range(256)) * 2)  # 16-bit extended length
    async with await RawWebSocket.connect(echo_server.port) as ws:
        for i in range(len(frame)):
            await ws.write(frame[i : i + 1])
            if i < 20:  # the case: the header arrives a byte per read
                await asyncio.sleep(0.005)
        assert await ws.recv_message() == (BINARY, bytes(range(256)) * 2)


async def test_many_frames_in_one_write_are_all_echoed(echo_server: lightws.Server) -> None:
    payloads = [f"frame {i}".encode() * (i % 7 + 1) for i in range(300)]
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.write(b"".join(build_frame(TEXT, p) for p in payloads))
        received = [await ws.recv_message() for _ in payloads]
    assert received == [(TEXT, p) for p in payloads]


async def test_64bit_length_header_for_a_small_payload_is_accepted(
    echo_server: lightws.Server,
) -> None:
    # 70000 bytes forces the 64-bit length form.
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.send_frame(BINARY, b"z" * 70000)
        assert await ws.recv_message() == (BINARY, b"z" * 70000)


async def test_server_keeps_serving_after_protocol_errors(echo_server: lightws.Server) -> None:
    for bad in (
        build_frame(TEXT, b"x", mask=False),
        build_frame(TEXT, b"\xff"),
        build_frame(5, b""),
    ):
        async with await RawWebSocket.connect(echo_server.port) as ws:
            await ws.write(bad)
            code, _ = await ws.read_close()
            assert code in (1002, 1007)
    async with connect(url(echo_server)) as client:
        await client.send("still serving")
        assert await asyncio.wait_for(client.recv(), 5) == "still serving"


async def test_handler_sees_connection_closed_error_after_protocol_error() -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    async with serve(recording_handshake(queue)) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"\xff")
            await expect_close(ws, 1007)
        exc = await asyncio.wait_for(queue.get(), 5)
    assert isinstance(exc, lightws.ConnectionClosedError)
    assert exc.code == 1007


async def test_64bit_length_with_the_most_significant_bit_set_is_refused(
    echo_server: lightws.Server,
) -> None:
    # RFC 6455 5.2: the most significant bit of a 64-bit length must be 0.
    head = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 63) + b"\x00\x00\x00\x00"
    async with await RawWebSocket.connect(echo_server.port) as ws:
        await ws.write(head)
        code, _ = await ws.read_close()
        assert code in (1002, 1009)
