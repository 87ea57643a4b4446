"""The exception tree: every class lightws exports is one it raises.

``ProtocolError`` (1002, 1007) and ``PayloadTooBig`` (1009) are what ``recv()`` raises
when the connection was failed for the peer's fault; both are ``ConnectionClosedError``
so code written against the wider class keeps working.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import lightws
import pytest
from support import reporting_handshake, serve, url
from support.rawws import BINARY, CONT, TEXT, RawWebSocket
from websockets.asyncio.client import connect


async def closed_by(send: Any, **config: Any) -> tuple[lightws.ConnectionClosed, int | None]:
    """Run ``send(ws)`` from a raw client against a handler blocked in ``recv()``;
    return what ``recv()`` raised and the close code the client got."""

    async def body(conn: lightws.Connection) -> Any:
        return await conn.recv()

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake, **config) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await send(ws)
            code, _ = await ws.read_close()
            await ws.send_close(code)
        with pytest.raises(lightws.ConnectionClosed) as excinfo:
            await asyncio.wait_for(outcome, 5)
    return excinfo.value, code


async def test_a_protocol_violation_raises_protocol_error_1002() -> None:
    async def unmasked(ws: RawWebSocket) -> None:
        await ws.send_frame(TEXT, b"hi", mask=False)

    exc, code = await closed_by(unmasked)
    assert code == 1002
    assert type(exc) is lightws.ProtocolError
    assert exc.code == 1002
    assert isinstance(exc, lightws.ConnectionClosedError)
    assert isinstance(exc, lightws.LightwsError)


async def test_invalid_utf8_raises_protocol_error_1007() -> None:
    async def bad_text(ws: RawWebSocket) -> None:
        await ws.send_frame(TEXT, b"\xff\xfe")

    exc, code = await closed_by(bad_text)
    assert code == 1007
    assert type(exc) is lightws.ProtocolError
    assert exc.code == 1007


async def test_a_message_over_max_msg_len_raises_payload_too_big_1009() -> None:
    async def too_big(ws: RawWebSocket) -> None:
        await ws.send_frame(BINARY, b"x" * 100, fin=False)
        await ws.send_frame(CONT, b"x" * 100)

    exc, code = await closed_by(too_big, max_msg_len=150)
    assert code == 1009
    assert type(exc) is lightws.PayloadTooBig
    assert exc.code == 1009
    assert isinstance(exc, lightws.ProtocolError)
    assert isinstance(exc, lightws.ConnectionClosedError)


@pytest.mark.parametrize(
    ("code", "cls"),
    [(1000, lightws.ConnectionClosedOK), (1011, lightws.ConnectionClosedError)],
)
async def test_other_closes_raise_the_plain_classes(code: int, cls: type) -> None:
    async def close(ws: RawWebSocket) -> None:
        await ws.send_close(code)

    exc, _ = await closed_by(close)
    assert type(exc) is cls
    assert exc.code == code


async def test_async_for_raises_protocol_error_too() -> None:
    async def body(conn: lightws.Connection) -> Any:
        async for _ in conn:
            pass

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(TEXT, b"hi", mask=False)
            assert (await ws.read_close())[0] == 1002
        with pytest.raises(lightws.ProtocolError):
            await asyncio.wait_for(outcome, 5)


def test_invalid_handshake_is_exported_now_that_the_client_raises_it() -> None:
    # Removed while nothing raised it; lightws.connect() raises it for a refused or
    # broken upgrade (tests/test_client.py).
    assert lightws.InvalidHandshake is lightws.exceptions.InvalidHandshake
    assert "InvalidHandshake" in lightws.__all__
    assert "InvalidHandshake" in lightws.exceptions.__all__
    assert issubclass(lightws.InvalidHandshake, lightws.LightwsError)
    assert not issubclass(lightws.InvalidHandshake, lightws.ConnectionClosed)
    exc = lightws.InvalidHandshake("refused", 403, lightws.Headers({"X": "1"}), b"no")
    assert (exc.status, exc.headers["x"], exc.body, str(exc)) == (403, "1", b"no", "refused")


async def test_setting_ws_write_buffer_warns_that_it_has_no_effect() -> None:
    with pytest.warns(DeprecationWarning, match="ws_write_buffer"):
        async with serve(ws_write_buffer=8192) as server, connect(url(server)) as ws:
            await ws.send("still echoes")
            assert await asyncio.wait_for(ws.recv(), 5) == "still echoes"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with serve() as server:  # the default: no warning
            assert server.port
