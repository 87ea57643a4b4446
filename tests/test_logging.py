"""Logging: each server's ``Config.log_level`` holds for its own records, on the shared
``"lightws"`` logger, without lightws changing that logger's level."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import lightws
import pytest
from support import eventually, serve
from support.rawws import BINARY, TEXT, RawWebSocket

LOGGER = logging.getLogger("lightws")


@pytest.fixture
def fresh_logger() -> Iterator[None]:
    """The "lightws" logger as in a new process (level NOTSET), restored afterwards."""
    saved = LOGGER.level
    LOGGER.setLevel(logging.NOTSET)
    try:
        yield
    finally:
        LOGGER.setLevel(saved)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lightws" and r.levelno == level]


async def fail_one_connection(server: lightws.Server) -> int:
    """Connect, break the protocol (an unmasked frame: 1002), return the client's port."""
    async with await RawWebSocket.connect(server.port) as ws:
        port: int = ws.writer.get_extra_info("sockname")[1]
        await ws.send_frame(TEXT, b"unmasked", mask=False)
        assert (await ws.read_close())[0] == 1002
    return port


@pytest.mark.parametrize("first", ["quiet", "chatty"])
async def test_two_servers_in_one_process_each_log_at_their_own_level(
    caplog: pytest.LogCaptureFixture, fresh_logger: None, first: str
) -> None:
    caplog.set_level(logging.DEBUG)  # the application shows everything
    levels = {"quiet": lightws.LogLevel.ERROR, "chatty": lightws.LogLevel.INFO}
    second = "chatty" if first == "quiet" else "quiet"
    async with (
        serve(log_level=levels[first]) as a,
        serve(log_level=levels[second]) as b,
    ):
        servers = {first: a, second: b}
        ports = {name: server.port for name, server in servers.items()}
        quiet_client = await fail_one_connection(servers["quiet"])
        chatty_client = await fail_one_connection(servers["chatty"])

        def chatty_logged() -> bool:
            return any(f":{chatty_client} #" in m for m in messages(caplog, logging.INFO))

        await eventually(chatty_logged)
    info = messages(caplog, logging.INFO)
    assert any(f"listening on 127.0.0.1:{ports['chatty']}" in m for m in info), info
    assert not any(f"127.0.0.1:{ports['quiet']}" in m for m in info), info
    assert any(f":{chatty_client} #" in m and "1002" in m for m in info), info
    assert not any(f":{quiet_client} #" in m for m in info), info
    assert LOGGER.level == logging.NOTSET, "lightws changed the logger's level"


async def test_the_applications_logger_level_still_applies(
    caplog: pytest.LogCaptureFixture, fresh_logger: None
) -> None:
    caplog.set_level(logging.DEBUG)
    LOGGER.setLevel(logging.WARNING)  # the application wants lightws quieter
    async with serve(log_level=lightws.LogLevel.DEBUG) as server:
        await fail_one_connection(server)
    assert LOGGER.level == logging.WARNING
    assert messages(caplog, logging.INFO) == []
    assert messages(caplog, logging.DEBUG) == []


async def test_debug_frame_log_shows_the_payload_as_sent(
    caplog: pytest.LogCaptureFixture, fresh_logger: None
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(log_level=lightws.LogLevel.DEBUG) as server:
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.send_frame(BINARY, b"Ping")
            await ws.send_frame(TEXT, b"Text Binary Close Pong")
            assert await ws.recv_message() == (BINARY, b"Ping")
            assert await ws.recv_message() == (TEXT, b"Text Binary Close Pong")
            await asyncio.wait_for(ws.send_close(1000), 5)
            await ws.read_close()
    debug = messages(caplog, logging.DEBUG)
    # The opcode is named in capitals; the payload is shown as it is, never rewritten.
    assert any(m.endswith("recv BINARY len=4 b'Ping'") for m in debug), debug
    assert any(m.endswith("recv TEXT len=22 b'Text Binary Close Pong'") for m in debug), debug
    assert any(m.endswith("send BINARY len=4 b'Ping'") for m in debug), debug
