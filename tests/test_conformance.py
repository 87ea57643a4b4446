"""RFC 6455 conformance of the echo server, by section, after the Autobahn TestSuite.

The groups follow Autobahn's case groups 1-10 (framing, pings/pongs, reserved bits,
opcodes, fragmentation, UTF-8, close handling, large messages, auto-fragmentation);
each test names the RFC 6455 section it checks. The client is the permissive raw one in
support/rawws.py, so it can send what a real client would refuse to; the server is the
in-process echo server of support/server.py with ``max_msg_len`` raised to fit 16 MiB.

Where Autobahn accepts either of two behaviours (an echo of a valid message sent just
before a fatal frame may or may not arrive; an empty close may be answered empty or with
1000) the tests accept both and check everything else exactly.
"""

from __future__ import annotations

import asyncio
import functools
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import lightws
import pytest
from support import echo_handshake, serve
from support.rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, Frame, RawWebSocket, build_frame

# Protocol rules are decided in Rust (src/session.rs, unit-tested for every connection
# state transition); which event loop runs the echo handler changes nothing on the wire.
# This module is their end-to-end sample, on the default loop only; the loop-specific
# paths (the hand-off to the loop, futures, cancellation) are tested on both loops in
# test_connection.py, test_awaitables.py, test_echo.py and test_streaming.py.
pytestmark = pytest.mark.asyncio_loop_only

KiB = 1 << 10
MiB = 1 << 20
# The largest message here is 16 MiB; the limit sits just above it.
MAX_MSG_LEN = 16 * MiB + KiB
TEST_TIMEOUT = 30.0

F = TypeVar("F", bound=Callable[..., Awaitable[None]])


def bounded(seconds: float = TEST_TIMEOUT) -> Callable[[F], F]:
    """Run the test body under ``asyncio.wait_for`` so a stuck exchange fails, not hangs."""

    def decorate(test: F) -> F:
        @functools.wraps(test)
        async def wrapper(*args: Any, **kwargs: Any) -> None:
            await asyncio.wait_for(test(*args, **kwargs), seconds)

        return wrapper  # type: ignore[return-value]

    return decorate


@pytest.fixture
async def server() -> AsyncIterator[lightws.Server]:
    async with serve(echo_handshake, max_msg_len=MAX_MSG_LEN) as s:
        yield s


async def connect(server: lightws.Server) -> RawWebSocket:
    return await RawWebSocket.connect(server.port)


def text_of(n: int) -> bytes:
    """``n`` bytes of valid UTF-8 mixing 1- to 4-byte characters (so cuts split them)."""
    unit = "aé☃😀".encode()  # 1 + 2 + 3 + 4 bytes
    return unit * (n // len(unit)) + b"*" * (n % len(unit))


def binary_of(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def payload_of(opcode: int, n: int) -> bytes:
    return text_of(n) if opcode == TEXT else binary_of(n)


def fragments(opcode: int, payload: bytes, sizes: list[int] | int) -> list[bytes]:
    """The frames of one message cut into pieces of ``sizes`` bytes (an int: all equal)."""
    if isinstance(sizes, int):
        step = max(sizes, 1)
        cuts = list(range(0, len(payload), step)) or [0]
        pieces = [payload[c : c + step] for c in cuts]
    else:
        pieces, pos = [], 0
        for size in sizes:
            pieces.append(payload[pos : pos + size])
            pos += size
        assert pos == len(payload)
    last = len(pieces) - 1
    return [
        build_frame(opcode if i == 0 else CONT, piece, fin=i == last)
        for i, piece in enumerate(pieces)
    ]


async def write_chunked(ws: RawWebSocket, data: bytes, chunk: int) -> None:
    """Write ``data`` in writes of ``chunk`` bytes, letting the loop run in between."""
    for i in range(0, len(data), chunk):
        await ws.write(data[i : i + chunk])
        await asyncio.sleep(0)


async def expect_echo(ws: RawWebSocket, opcode: int, payload: bytes, timeout: float = 10) -> None:
    got_opcode, got = await ws.recv_message(timeout)
    assert got_opcode == opcode
    assert len(got) == len(payload)
    if got != payload:  # no pytest diff of megabytes
        at = next(i for i, (a, b) in enumerate(zip(got, payload, strict=True)) if a != b)
        raise AssertionError(f"echo differs from byte {at}: {got[at : at + 16]!r}")


async def recv_until_close(ws: RawWebSocket) -> tuple[list[Frame], int | None]:
    """Every frame before the server's close frame, and the close code."""
    frames: list[Frame] = []
    while True:
        try:
            frame = await ws.recv_frame()
        except asyncio.IncompleteReadError:
            raise AssertionError(f"TCP closed without a close frame after {frames}") from None
        if frame.opcode == CLOSE:
            return frames, frame.close_code
        frames.append(frame)


async def expect_fail(ws: RawWebSocket, code: int, echo: bytes | None = None) -> None:
    """The server fails the connection with ``code`` (RFC 6455 7.1.7), answering nothing
    else on the way: no pong and no echo, except, optionally, the echo of ``echo`` (a
    valid message sent just before the fatal frame, which the handler may or may not get
    to send back before the close). Then the close handshake ends with TCP closed.
    """
    frames, got = await recv_until_close(ws)
    assert got == code, f"expected close {code}, got {got} after {frames}"
    if frames:
        assert echo is not None, f"unexpected frames before the close: {frames}"
        assert b"".join(f.payload for f in frames) == echo
        assert all(f.opcode in (TEXT, BINARY, CONT) for f in frames), frames
    try:
        await ws.send_close(code)
    except OSError:
        pass  # the server may already have closed TCP after failing the connection
    assert await ws.at_eof(3), "server kept TCP open after the close handshake"


async def close_normally(ws: RawWebSocket) -> None:
    """Client-initiated close: the server echoes 1000 and closes TCP (RFC 6455 7.1.2)."""
    await ws.send_close(1000)
    frames, code = await recv_until_close(ws)
    assert frames == []
    assert code == 1000
    assert await ws.at_eof(3)


# --- 1: framing (RFC 6455 5.2, 5.6) -------------------------------------------------

LENGTHS = [0, 125, 126, 127, 128, 65535, 65536]


@pytest.mark.parametrize("write", ["one_write", "chunked"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@bounded()
async def test_1_data_frame_of_each_length_encoding_is_echoed(
    server: lightws.Server, opcode: int, length: int, write: str
) -> None:
    # 7-bit, 16-bit and 64-bit length encodings and their boundaries (5.2).
    payload = payload_of(opcode, length)
    frame = build_frame(opcode, payload)
    async with await connect(server) as ws:
        if write == "one_write":
            await ws.write(frame)
        else:
            # Autobahn 1.x.8: chops of 997 bytes; short frames byte by byte.
            await write_chunked(ws, frame, 997 if len(frame) > 997 else 1)
        await expect_echo(ws, opcode, payload)
        await close_normally(ws)


@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@bounded()
async def test_1_sixteen_mib_frame_is_echoed_with_max_msg_len_raised(
    server: lightws.Server, opcode: int
) -> None:
    payload = payload_of(opcode, 16 * MiB)
    async with await connect(server) as ws:
        await ws.write(build_frame(opcode, payload))
        await expect_echo(ws, opcode, payload, timeout=20)
        await close_normally(ws)


@bounded()
async def test_1_several_frames_in_one_write_are_echoed_in_order(server: lightws.Server) -> None:
    messages = [(TEXT, b"one"), (BINARY, b"\x00two"), (TEXT, b""), (BINARY, b"x" * 200)]
    async with await connect(server) as ws:
        await ws.write(b"".join(build_frame(op, p) for op, p in messages))
        for op, p in messages:
            await expect_echo(ws, op, p)
        await close_normally(ws)


# --- 2: pings and pongs (RFC 6455 5.5.2, 5.5.3) -------------------------------------

PING_PAYLOADS = {
    "empty": b"",
    "text_125": b"*" * 125,
    "binary_125": bytes([0xFE]) * 125,
    "utf8_hello": "Hello, wörld!".encode(),
}


@pytest.mark.parametrize("write", ["one_write", "bytewise"])
@pytest.mark.parametrize("payload", PING_PAYLOADS.values(), ids=PING_PAYLOADS.keys())
@bounded()
async def test_2_ping_is_answered_with_a_pong_carrying_the_same_payload(
    server: lightws.Server, payload: bytes, write: str
) -> None:
    frame = build_frame(PING, payload)
    async with await connect(server) as ws:
        if write == "one_write":
            await ws.write(frame)
        else:
            await write_chunked(ws, frame, 1)
        pong = await ws.recv_frame()
        assert (pong.opcode, pong.fin, pong.payload) == (PONG, True, payload)
        await close_normally(ws)


@bounded()
async def test_2_ping_of_126_bytes_is_closed_with_1002_without_a_pong(
    server: lightws.Server,
) -> None:
    async with await connect(server) as ws:
        await ws.send_frame(PING, b"*" * 126)
        await expect_fail(ws, 1002)


@pytest.mark.parametrize("payload", [b"", b"unsolicited pong payload"], ids=["empty", "payload"])
@bounded()
async def test_2_unsolicited_pong_is_ignored(server: lightws.Server, payload: bytes) -> None:
    async with await connect(server) as ws:
        await ws.write(build_frame(PONG, payload) + build_frame(TEXT, b"after the pong"))
        # Nothing answers the pong: the next frame is the echo.
        frame = await ws.recv_frame()
        assert (frame.opcode, frame.payload) == (TEXT, b"after the pong")
        # An unsolicited pong followed by a ping: the pong answers the ping.
        await ws.write(build_frame(PONG, b"stray") + build_frame(PING, b"ping payload"))
        frame = await ws.recv_frame()
        assert (frame.opcode, frame.payload) == (PONG, b"ping payload")
        await close_normally(ws)


@pytest.mark.parametrize("write", ["one_write", "bytewise"])
@bounded()
async def test_2_ten_pings_in_a_row_are_all_answered_in_order(
    server: lightws.Server, write: str
) -> None:
    payloads = [f"payload-{i}".encode() for i in range(10)]
    data = b"".join(build_frame(PING, p) for p in payloads)
    async with await connect(server) as ws:
        if write == "one_write":
            await ws.write(data)
        else:
            await write_chunked(ws, data, 1)
        for p in payloads:
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.payload) == (PONG, p)
        await close_normally(ws)


# --- 3: reserved bits (RFC 6455 5.2) ------------------------------------------------

RSV_CASES = [(TEXT, rsv) for rsv in range(1, 8)] + [(BINARY, 5), (PING, 6), (CLOSE, 7), (PONG, 3)]


def rsv_frame(opcode: int, rsv: int) -> bytes:
    payload = b"\x03\xe8" if opcode == CLOSE else b"reserved bits"
    return build_frame(opcode, payload, rsv1=bool(rsv & 4), rsv2=bool(rsv & 2), rsv3=bool(rsv & 1))


@pytest.mark.parametrize(
    ("opcode", "rsv"), RSV_CASES, ids=[f"op{op}-rsv{rsv}" for op, rsv in RSV_CASES]
)
@bounded()
async def test_3_reserved_bits_are_closed_with_1002(
    server: lightws.Server, opcode: int, rsv: int
) -> None:
    async with await connect(server) as ws:
        await ws.write(rsv_frame(opcode, rsv) + build_frame(PING, b"never answered"))
        await expect_fail(ws, 1002)


@pytest.mark.parametrize(
    ("opcode", "rsv"), RSV_CASES, ids=[f"op{op}-rsv{rsv}" for op, rsv in RSV_CASES]
)
@bounded()
async def test_3_reserved_bits_after_an_echoed_message_are_closed_with_1002(
    server: lightws.Server, opcode: int, rsv: int
) -> None:
    async with await connect(server) as ws:
        await ws.send_frame(TEXT, b"Hello, world!")
        await expect_echo(ws, TEXT, b"Hello, world!")
        await ws.write(rsv_frame(opcode, rsv) + build_frame(PING, b"never answered"))
        await expect_fail(ws, 1002)


@pytest.mark.parametrize("rsv", [1, 2, 4])
@bounded()
async def test_3_reserved_bits_in_the_same_write_as_a_valid_message(
    server: lightws.Server, rsv: int
) -> None:
    # Autobahn 3.2: the valid message may be echoed before the close; no pong.
    async with await connect(server) as ws:
        await ws.write(
            build_frame(TEXT, b"Hello, world!")
            + rsv_frame(TEXT, rsv)
            + build_frame(PING, b"never answered")
        )
        await expect_fail(ws, 1002, echo=b"Hello, world!")


# --- 4: opcodes (RFC 6455 5.2, 11.8) ------------------------------------------------

RESERVED_OPCODES = [3, 4, 5, 6, 7, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("payload", [b"", b"reserved opcode payload"], ids=["empty", "payload"])
@pytest.mark.parametrize("opcode", RESERVED_OPCODES)
@bounded()
async def test_4_reserved_opcode_is_closed_with_1002(
    server: lightws.Server, opcode: int, payload: bytes
) -> None:
    async with await connect(server) as ws:
        await ws.write(build_frame(opcode, payload) + build_frame(PING, b"never answered"))
        await expect_fail(ws, 1002)


@pytest.mark.parametrize("opcode", RESERVED_OPCODES)
@bounded()
async def test_4_reserved_opcode_after_an_echoed_message_is_closed_with_1002(
    server: lightws.Server, opcode: int
) -> None:
    async with await connect(server) as ws:
        await ws.send_frame(TEXT, b"Hello, world!")
        await expect_echo(ws, TEXT, b"Hello, world!")
        await ws.write(build_frame(opcode, b"x") + build_frame(PING, b"never answered"))
        await expect_fail(ws, 1002)


@pytest.mark.parametrize("opcode", [5, 13])
@bounded()
async def test_4_reserved_opcode_in_the_same_write_as_a_valid_message(
    server: lightws.Server, opcode: int
) -> None:
    async with await connect(server) as ws:
        await ws.write(
            build_frame(TEXT, b"Hello, world!")
            + build_frame(opcode, b"")
            + build_frame(PING, b"never answered")
        )
        await expect_fail(ws, 1002, echo=b"Hello, world!")


# --- 5: fragmentation (RFC 6455 5.4) ------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 10, 64])
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@bounded()
async def test_5_fragmented_message_is_echoed_whole(
    server: lightws.Server, opcode: int, count: int
) -> None:
    payload = payload_of(opcode, 640)
    frames = fragments(opcode, payload, -(-len(payload) // count))
    assert len(frames) == count
    async with await connect(server) as ws:
        await ws.write(b"".join(frames))
        await expect_echo(ws, opcode, payload)
        await close_normally(ws)


@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@bounded()
async def test_5_fragments_with_empty_ones_are_echoed_whole(
    server: lightws.Server, opcode: int
) -> None:
    payload = payload_of(opcode, 30)
    frames = fragments(opcode, payload, [0, 10, 0, 0, 20, 0])
    async with await connect(server) as ws:
        await ws.write(b"".join(frames))
        await expect_echo(ws, opcode, payload)
        # A message of only empty fragments is an empty message.
        await ws.write(b"".join(fragments(opcode, b"", [0, 0, 0])))
        await expect_echo(ws, opcode, b"")
        await close_normally(ws)


@pytest.mark.parametrize("write", ["one_write", "bytewise", "frames_with_delays"])
@bounded()
async def test_5_pings_between_fragments_are_answered_first(
    server: lightws.Server, write: str
) -> None:
    # Control frames may be injected in the middle of a fragmented message (5.4).
    pieces = [b"fragment1", b"fragment2", b"fragment3", b"fragment4", b"fragment5"]
    frames = fragments(TEXT, b"".join(pieces), [len(p) for p in pieces])
    frames.insert(3, build_frame(PING, b"pongme 2!"))
    frames.insert(1, build_frame(PING, b"pongme 1!"))
    async with await connect(server) as ws:
        if write == "one_write":
            await ws.write(b"".join(frames))
        elif write == "bytewise":
            await write_chunked(ws, b"".join(frames), 1)
        else:
            for wire in frames:
                await ws.write(wire)
                await asyncio.sleep(0.05)  # the case: every frame arrives in its own read
        # The pongs come first: the message is not complete when the pings arrive.
        for expected in (b"pongme 1!", b"pongme 2!"):
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.payload) == (PONG, expected)
        await expect_echo(ws, TEXT, b"".join(pieces))
        await close_normally(ws)


@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@bounded()
async def test_5_fragments_sent_with_delays_are_echoed_whole(
    server: lightws.Server, opcode: int
) -> None:
    payload = payload_of(opcode, 100)
    async with await connect(server) as ws:
        for frame in fragments(opcode, payload, 25):
            await ws.write(frame)
            await asyncio.sleep(0.1)  # the case (Autobahn 5.x "with delays"): fragments trickle
        await expect_echo(ws, opcode, payload)
        await close_normally(ws)


@pytest.mark.parametrize("opcode", [PING, PONG], ids=["ping", "pong"])
@bounded()
async def test_5_fragmented_control_frame_is_closed_with_1002(
    server: lightws.Server, opcode: int
) -> None:
    async with await connect(server) as ws:
        await ws.write(
            build_frame(opcode, b"fragment1", fin=False) + build_frame(CONT, b"fragment2")
        )
        await expect_fail(ws, 1002)


@pytest.mark.parametrize("fin", [True, False], ids=["fin", "no_fin"])
@pytest.mark.parametrize("write", ["one_write", "bytewise"])
@bounded()
async def test_5_continuation_without_a_start_is_closed_with_1002(
    server: lightws.Server, fin: bool, write: str
) -> None:
    data = build_frame(CONT, b"non-continuation payload", fin=fin) + build_frame(
        TEXT, b"Hello, world!"
    )
    async with await connect(server) as ws:
        if write == "one_write":
            await ws.write(data)
        else:
            await write_chunked(ws, data, 1)
        await expect_fail(ws, 1002)


@bounded()
async def test_5_continuation_after_a_finished_message_is_closed_with_1002(
    server: lightws.Server,
) -> None:
    # Autobahn 5.15: a whole fragmented message, then a continuation of nothing.
    async with await connect(server) as ws:
        await ws.write(
            b"".join(fragments(TEXT, b"fragment1fragment2", [9, 9]))
            + build_frame(CONT, b"fragment3", fin=False)
            + build_frame(CONT, b"fragment4")
        )
        await expect_fail(ws, 1002, echo=b"fragment1fragment2")


@pytest.mark.parametrize("second", [TEXT, BINARY], ids=["text", "binary"])
@bounded()
async def test_5_data_frame_inside_a_fragmented_message_is_closed_with_1002(
    server: lightws.Server, second: int
) -> None:
    async with await connect(server) as ws:
        await ws.write(
            build_frame(TEXT, b"fragment1", fin=False) + build_frame(second, b"fragment2")
        )
        await expect_fail(ws, 1002)


# --- 6: UTF-8 handling (RFC 6455 5.6, 8.1) ------------------------------------------

# Valid texts from Autobahn group 6 (boundary code points, 4-byte characters,
# noncharacters, which are valid UTF-8).
VALID_UTF8 = {
    "hello": "Hello-µ@ßöäüàá-UTF-8!!".encode(),
    "kosme": b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5",
    "first_1": b"\x00",
    "first_2": b"\xc2\x80",
    "first_3": b"\xe0\xa0\x80",
    "first_4": b"\xf0\x90\x80\x80",
    "last_1": b"\x7f",
    "last_2": b"\xdf\xbf",
    "last_3": b"\xef\xbf\xbf",
    "last_4": b"\xf4\x8f\xbf\xbf",
    "before_surrogates": b"\xed\x9f\xbf",
    "after_surrogates": b"\xee\x80\x80",
    "replacement": b"\xef\xbf\xbd",
    "noncharacters": b"\xef\xbf\xbe\xef\xb7\x90\xf0\x9f\xbf\xbe\xf4\x8f\xbf\xbe",
    "emoji": "😀 🎉 𝄞 𐍈".encode(),
    "mixed": "a é ☃ 😀 κόσμε 日本語".encode(),
}

# Invalid sequences from Autobahn group 6 (and the Markus Kuhn test file it uses).
INVALID_UTF8 = {
    "kosme_surrogate": b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
    "above_max_f4_90": b"\xf4\x90\x80\x80",
    "above_max_f7": b"\xf7\xbf\xbf\xbf",
    "five_bytes": b"\xf8\x88\x80\x80\x80",
    "six_bytes": b"\xfc\x84\x80\x80\x80\x80",
    "lone_continuation_80": b"\x80",
    "lone_continuation_bf": b"\xbf",
    "continuations": b"\x80\xbf\x80\xbf",
    "lonely_start_2": b"\xc0 ",
    "lonely_start_3": b"\xe0 ",
    "lonely_start_4": b"\xf0 ",
    "missing_last_2": b"\xc0",
    "missing_last_3": b"\xe0\x80",
    "missing_last_4": b"\xf0\x80\x80",
    "missing_last_df": b"\xdf",
    "missing_last_ef_bf": b"\xef\xbf",
    "missing_last_f4_8f_bf": b"\xf4\x8f\xbf",
    "impossible_fe": b"\xfe",
    "impossible_ff": b"\xff",
    "impossible_fefeffff": b"\xfe\xfe\xff\xff",
    "overlong_slash_2": b"\xc0\xaf",
    "overlong_slash_3": b"\xe0\x80\xaf",
    "overlong_slash_4": b"\xf0\x80\x80\xaf",
    "overlong_max_2": b"\xc1\xbf",
    "overlong_max_3": b"\xe0\x9f\xbf",
    "overlong_max_4": b"\xf0\x8f\xbf\xbf",
    "overlong_nul_2": b"\xc0\x80",
    "overlong_nul_3": b"\xe0\x80\x80",
    "overlong_nul_4": b"\xf0\x80\x80\x80",
    "surrogate_d800": b"\xed\xa0\x80",
    "surrogate_db7f": b"\xed\xad\xbf",
    "surrogate_db80": b"\xed\xae\x80",
    "surrogate_dbff": b"\xed\xaf\xbf",
    "surrogate_dc00": b"\xed\xb0\x80",
    "surrogate_df80": b"\xed\xbe\x80",
    "surrogate_dfff": b"\xed\xbf\xbf",
    "surrogate_pair": b"\xed\xa0\x80\xed\xb0\x80",
    "surrogate_pair_max": b"\xed\xaf\xbf\xed\xbf\xbf",
}


@pytest.mark.parametrize("payload", VALID_UTF8.values(), ids=VALID_UTF8.keys())
@bounded()
async def test_6_valid_utf8_is_echoed_however_it_is_fragmented(
    server: lightws.Server, payload: bytes
) -> None:
    assert payload.decode("utf-8")
    n = len(payload)
    async with await connect(server) as ws:
        await ws.send_frame(TEXT, payload)
        await expect_echo(ws, TEXT, payload)
        # Split in two fragments at every byte (cuts inside code points included).
        for k in range(n + 1):
            await ws.write(b"".join(fragments(TEXT, payload, [k, n - k])))
            await expect_echo(ws, TEXT, payload)
        # One fragment per byte.
        await ws.write(b"".join(fragments(TEXT, payload, 1)))
        await expect_echo(ws, TEXT, payload)
        # One frame written one byte at a time.
        await write_chunked(ws, build_frame(TEXT, payload), 1)
        await expect_echo(ws, TEXT, payload)
        await close_normally(ws)


@bounded()
async def test_6_empty_text_fragments_are_echoed_as_an_empty_message(
    server: lightws.Server,
) -> None:
    async with await connect(server) as ws:
        await ws.write(b"".join(fragments(TEXT, b"", [0, 0, 0])))
        await expect_echo(ws, TEXT, b"")
        await close_normally(ws)


@pytest.mark.parametrize("split", ["one_frame", "byte_fragments"])
@pytest.mark.parametrize("sequence", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
@bounded()
async def test_6_invalid_utf8_is_closed_with_1007(
    server: lightws.Server, sequence: bytes, split: str
) -> None:
    payload = b"ok " + sequence + b" ok"
    with pytest.raises(UnicodeDecodeError):
        payload.decode("utf-8")
    async with await connect(server) as ws:
        if split == "one_frame":
            await ws.send_frame(TEXT, payload)
        else:
            await ws.write(b"".join(fragments(TEXT, payload, 1)))
        await expect_fail(ws, 1007)


@pytest.mark.parametrize("sequence", [b"\xf0\x9f\x98", b"\xe2\x98", b"\xc3"])
@bounded()
async def test_6_code_point_cut_off_by_the_end_of_the_message_is_closed_with_1007(
    server: lightws.Server, sequence: bytes
) -> None:
    async with await connect(server) as ws:
        await ws.write(b"".join(fragments(TEXT, b"text" + sequence, [2, 2 + len(sequence)])))
        await expect_fail(ws, 1007)


FAIL_FAST = {
    # Autobahn 6.4.1 / 6.4.2: the invalid bytes end a fragment with FIN clear.
    "fragment_above_max": (b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", b"\xf4\x90\x80\x80"),
    "fragment_above_max_2_bytes": (b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4", b"\x90"),
    "fragment_surrogate": (b"abc", b"\xed\xa0\x80"),
    "fragment_overlong": (b"abc", b"\xc0\xaf"),
}


@pytest.mark.parametrize(("valid", "invalid"), FAIL_FAST.values(), ids=FAIL_FAST.keys())
@bounded()
async def test_6_invalid_fragment_fails_fast_before_the_message_ends(
    server: lightws.Server, valid: bytes, invalid: bytes
) -> None:
    async with await connect(server) as ws:
        await ws.send_frame(TEXT, valid, fin=False)
        await asyncio.sleep(0.05)  # the case (Autobahn 6.4.x): the bad part comes later
        await ws.send_frame(CONT, invalid, fin=False)
        # The rest of the message ("edited") is never sent.
        await expect_fail(ws, 1007)


@pytest.mark.parametrize(("valid", "invalid"), FAIL_FAST.values(), ids=FAIL_FAST.keys())
@bounded()
async def test_6_invalid_bytes_fail_fast_before_the_frame_ends(
    server: lightws.Server, valid: bytes, invalid: bytes
) -> None:
    # Autobahn 6.4.3 / 6.4.4: one frame whose payload stops after the invalid bytes.
    payload = valid + invalid + b"edited" + b"." * 200
    frame = build_frame(TEXT, payload)
    head = len(frame) - len(payload)
    async with await connect(server) as ws:
        await ws.write(frame[: head + len(valid)])
        await asyncio.sleep(0.05)  # the case (Autobahn 6.4.x): the bad part comes later
        await ws.write(frame[head + len(valid) : head + len(valid) + len(invalid)])
        await expect_fail(ws, 1007)


@bounded()
async def test_6_invalid_first_byte_of_a_frame_fails_fast(server: lightws.Server) -> None:
    payload = b"\xff" + b"rest never sent" * 10
    frame = build_frame(TEXT, payload)
    head = len(frame) - len(payload)
    async with await connect(server) as ws:
        await ws.write(frame[: head + 1])
        await expect_fail(ws, 1007)


# --- 7: close handling (RFC 6455 5.5.1, 7.1, 7.4) -----------------------------------


@bounded()
async def test_7_close_after_a_message_is_echoed_and_tcp_closed(server: lightws.Server) -> None:
    async with await connect(server) as ws:
        await ws.send_frame(TEXT, b"Hello World!")
        await expect_echo(ws, TEXT, b"Hello World!")
        await close_normally(ws)


@bounded()
async def test_7_close_with_no_payload_is_answered_empty_or_1000(
    server: lightws.Server,
) -> None:
    async with await connect(server) as ws:
        await ws.send_close(None)
        frames, code = await recv_until_close(ws)
        assert frames == []
        assert code in (None, 1000)
        assert await ws.at_eof(3)


@bounded()
async def test_7_close_with_a_one_byte_payload_is_closed_with_1002(
    server: lightws.Server,
) -> None:
    async with await connect(server) as ws:
        await ws.send_frame(CLOSE, b"\x03")
        await expect_fail(ws, 1002)


# 1012-1014 are registered with IANA (Service Restart, Try Again Later, Bad Gateway).
VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
VALID_CLOSE_CODES += [3000, 3999, 4000, 4999]
# < 1000 unused; 1004 reserved; 1005, 1006, 1015 must never be sent (7.4.1); 1016-2999
# unassigned (7.4.2); >= 5000 undefined.
INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
@bounded()
async def test_7_valid_close_code_is_echoed(server: lightws.Server, code: int) -> None:
    async with await connect(server) as ws:
        await ws.send_close(code, b"reason")
        frames, got = await recv_until_close(ws)
        assert frames == []
        assert got == code
        assert await ws.at_eof(3)


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
@bounded()
async def test_7_invalid_close_code_is_closed_with_1002(server: lightws.Server, code: int) -> None:
    async with await connect(server) as ws:
        await ws.send_close(code)
        await expect_fail(ws, 1002)


@pytest.mark.parametrize("reason", [b"", b"Hello World!", "ö".encode() * 61 + b"x"])
@bounded()
async def test_7_close_reason_up_to_123_bytes_is_accepted(
    server: lightws.Server, reason: bytes
) -> None:
    assert len(reason) <= 123
    async with await connect(server) as ws:
        await ws.send_close(1000, reason)
        frames, code = await recv_until_close(ws)
        assert (frames, code) == ([], 1000)
        assert await ws.at_eof(3)


@bounded()
async def test_7_close_reason_of_124_bytes_is_closed_with_1002(server: lightws.Server) -> None:
    # 2 + 124 = 126 bytes: a control frame over 125 (5.5).
    async with await connect(server) as ws:
        await ws.send_close(1000, b"r" * 124)
        await expect_fail(ws, 1002)


@pytest.mark.parametrize(
    "reason", [b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited", b"\xff", b"\xc3"]
)
@bounded()
async def test_7_close_reason_with_invalid_utf8_is_closed_with_1007(
    server: lightws.Server, reason: bytes
) -> None:
    async with await connect(server) as ws:
        await ws.send_close(1000, reason)
        await expect_fail(ws, 1007)


@pytest.mark.parametrize(
    "after",
    ["text", "ping", "close", "fragment"],
)
@bounded()
async def test_7_frames_after_the_close_frame_are_ignored(
    server: lightws.Server, after: str
) -> None:
    late = {
        "text": build_frame(TEXT, b"late message"),
        "ping": build_frame(PING, b"late ping"),
        "close": build_frame(CLOSE, struct.pack("!H", 1001)),
        "fragment": build_frame(CONT, b"after close"),
    }[after]
    async with await connect(server) as ws:
        await ws.write(build_frame(CLOSE, struct.pack("!H", 1000)) + late)
        frames, code = await recv_until_close(ws)
        assert frames == [], "the server answered a frame sent after the close"
        assert code == 1000
        assert await ws.at_eof(3)


@bounded()
async def test_7_close_in_the_middle_of_a_fragmented_message_drops_it(
    server: lightws.Server,
) -> None:
    async with await connect(server) as ws:
        await ws.write(
            build_frame(TEXT, b"fragment1", fin=False)
            + build_frame(CLOSE, struct.pack("!H", 1000))
            + build_frame(CONT, b"fragment2")
        )
        frames, code = await recv_until_close(ws)
        assert (frames, code) == ([], 1000)
        assert await ws.at_eof(3)


@bounded()
async def test_7_server_closes_tcp_after_the_close_handshake_without_waiting(
    server: lightws.Server,
) -> None:
    # RFC 6455 7.1.1: the server should close TCP first, right after the handshake
    # (long before close_timeout).
    async with await connect(server) as ws:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await ws.send_close(1000, b"bye")
        frames, code = await recv_until_close(ws)
        assert (frames, code) == ([], 1000)
        assert await ws.at_eof(3)
        assert loop.time() - start < 2.0


# --- 9: large messages (RFC 6455 5.2, 5.4) ------------------------------------------

# (size, fragment size or None for one frame); 16 MiB only whole and in 1 MiB
# fragments, to keep the module's run time down.
LARGE_CASES = [
    (size, frag)
    for size in (MiB, 4 * MiB, 16 * MiB)
    for frag in (None, 64 * KiB, 256 * KiB, MiB)
    if size < 16 * MiB or frag in (None, MiB)
]


def large_case_id(case: tuple[int, int | None]) -> str:
    size, frag = case
    return f"{size // MiB}MiB-" + ("single" if frag is None else f"frag{frag // KiB}KiB")


@pytest.mark.parametrize("case", LARGE_CASES, ids=[large_case_id(c) for c in LARGE_CASES])
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@bounded(60)
async def test_9_large_message_is_echoed_byte_exact(
    server: lightws.Server, opcode: int, case: tuple[int, int | None]
) -> None:
    size, fragment = case
    payload = payload_of(opcode, size)
    frames = (
        [build_frame(opcode, payload)] if fragment is None else fragments(opcode, payload, fragment)
    )
    async with await connect(server) as ws:
        await ws.write(b"".join(frames))
        await expect_echo(ws, opcode, payload, timeout=30)
        await close_normally(ws)


@pytest.mark.parametrize("chunk", [4093, 65521], ids=["writes4093", "writes65521"])
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@bounded(60)
async def test_9_large_message_in_chunked_socket_writes_is_echoed(
    server: lightws.Server, opcode: int, chunk: int
) -> None:
    size = MiB if chunk < 65536 else 4 * MiB
    payload = payload_of(opcode, size)
    data = b"".join(fragments(opcode, payload, 256 * KiB))
    async with await connect(server) as ws:
        await write_chunked(ws, data, chunk)
        await expect_echo(ws, opcode, payload, timeout=30)
        await close_normally(ws)


@bounded(60)
async def test_9_many_large_messages_back_to_back_are_echoed_in_order(
    server: lightws.Server,
) -> None:
    payloads = [payload_of(TEXT if i % 2 else BINARY, MiB + i) for i in range(8)]
    async with await connect(server) as ws:
        await ws.write(
            b"".join(build_frame(TEXT if i % 2 else BINARY, p) for i, p in enumerate(payloads))
        )
        for i, p in enumerate(payloads):
            await expect_echo(ws, TEXT if i % 2 else BINARY, p, timeout=30)
        await close_normally(ws)


@pytest.mark.parametrize("size", [0, 16, 64, 256, 1024, 4096])
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@bounded()
async def test_9_thousand_small_messages_in_one_write_are_echoed_in_order(
    server: lightws.Server, opcode: int, size: int
) -> None:
    # Autobahn 9.7 / 9.8: many messages back to back, each numbered.
    payloads = [payload_of(opcode, max(size - 4, 0)) + (b"%04d" % i)[:size] for i in range(1000)]
    async with await connect(server) as ws:
        await ws.write(b"".join(build_frame(opcode, p) for p in payloads))
        for p in payloads:
            await expect_echo(ws, opcode, p)
        await close_normally(ws)


# --- 10: auto-fragmentation (RFC 6455 5.4) ------------------------------------------


@pytest.mark.parametrize(
    ("size", "fragment"),
    [(KiB, 1), (64 * KiB, KiB), (64 * KiB, 4093)],
    ids=["1KiB_in_1B", "64KiB_in_1KiB", "64KiB_in_4093B"],
)
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@bounded()
async def test_10_message_in_many_small_fragments_is_echoed_byte_exact(
    server: lightws.Server, opcode: int, size: int, fragment: int
) -> None:
    payload = payload_of(opcode, size)
    frames = fragments(opcode, payload, fragment)
    assert len(frames) == -(-size // fragment)
    async with await connect(server) as ws:
        await ws.write(b"".join(frames))
        await expect_echo(ws, opcode, payload)
        # And the same frames, each in its own write.
        for frame in frames[:64]:
            await ws.write(frame)
        await ws.write(b"".join(frames[64:]))
        await expect_echo(ws, opcode, payload)
        await close_normally(ws)
