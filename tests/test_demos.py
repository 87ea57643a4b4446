"""``python -m lightws echo|countdown|push`` as real subprocesses, driven by the
websockets client and plain HTTP (aiohttp)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest
from support import eventually, free_port, run_lightws
from support.demos import Demo, http_get, start_demo
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.asyncio_loop_only  # the servers run in their own processes

TICK = 0.05  # countdown --tick for the tests: 20 numbers a second


@pytest.fixture
async def echo() -> AsyncIterator[Demo]:
    demo = await start_demo("echo")
    yield demo
    await demo.stop()


@pytest.fixture
async def countdown() -> AsyncIterator[Demo]:
    demo = await start_demo("countdown", "--tick", str(TICK))
    yield demo
    await demo.stop()


async def start_push() -> Demo:
    put_port = free_port()
    demo = await start_demo(
        "push", "--put-addr", f"127.0.0.1:{put_port}", ready=f"127.0.0.1:{put_port}"
    )
    demo.put_port = put_port
    return demo


@pytest.fixture
async def push() -> AsyncIterator[Demo]:
    demo = await start_push()
    yield demo
    await demo.stop()


async def recv(ws: ClientConnection, timeout: float = 5) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), timeout)


# -- every demo ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["echo", "countdown", "push"])
async def test_get_root_serves_the_demo_page_as_html(command: str) -> None:
    demo = await start_push() if command == "push" else await start_demo(command)
    try:
        status, content_type, body = await http_get(demo.http + "/")
        assert status == 200
        assert content_type.startswith("text/html")
        assert f"<title>lightws {command}</title>" in body
        assert "new WebSocket(" in body
    finally:
        await demo.stop()


async def test_page_server_answers_404_for_other_paths_and_405_for_other_methods(
    echo: Demo,
) -> None:
    assert (await http_get(echo.http + "/nope"))[0] == 404
    status, _, _ = await http_get(echo.http + "/", method="POST")
    assert status == 405


def test_help_lists_every_demo() -> None:
    result = run_lightws("--help")
    assert result.returncode == 0
    for command in ("echo", "countdown", "push"):
        assert command in result.stdout


async def test_stats_interval_prints_stats_periodically() -> None:
    demo = await start_demo("echo", "--stats-interval", "0.2")
    try:
        async with connect(demo.ws + "/") as ws:
            await ws.send("x")
            await recv(ws)
            out = await demo.read_until("handshakes=1", timeout=10)
            out += await demo.read_until("frames_out:", timeout=10)
        assert "connections=1" in out
        assert "TEXT=1" in out
    finally:
        await demo.stop()


# -- echo -------------------------------------------------------------------------------


async def test_echo_closes_with_1000_on_exit_message(echo: Demo) -> None:
    async with connect(echo.ws + "/") as ws:
        await ws.send("exit")
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1000


# -- countdown --------------------------------------------------------------------------


async def test_countdown_counts_down_then_booms(countdown: Demo) -> None:
    loop = asyncio.get_running_loop()
    async with connect(countdown.ws + "/") as ws:
        started = loop.time()
        await ws.send("3")
        got = [await recv(ws) for _ in range(4)]
        elapsed = loop.time() - started
    assert got == ["3...", "2...", "1...", "boom!"]
    assert elapsed >= 3 * TICK * 0.9  # one tick between messages


async def test_countdown_zero_stops_it(countdown: Demo) -> None:
    async with connect(countdown.ws + "/") as ws:
        await ws.send("500")
        assert await recv(ws) == "500..."
        await ws.send("0")
        while (msg := await recv(ws)) != "stopped":
            assert isinstance(msg, str) and msg.endswith("...")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ws.recv(), 10 * TICK)


async def test_countdown_new_number_restarts_it(countdown: Demo) -> None:
    async with connect(countdown.ws + "/") as ws:
        await ws.send("500")
        assert await recv(ws) == "500..."
        await ws.send("2")
        while (msg := await recv(ws)) != "2...":
            # numbers of the first countdown sent before the server read "2"
            assert isinstance(msg, str) and msg.endswith("...") and int(msg[:-3]) > 400
        assert [await recv(ws), await recv(ws)] == ["1...", "boom!"]


@pytest.mark.parametrize("sent", ["abc", "-1", "3601", "1.5"])
async def test_countdown_rejects_what_is_not_a_count(countdown: Demo, sent: str) -> None:
    async with connect(countdown.ws + "/") as ws:
        await ws.send(sent)
        msg = await recv(ws)
        assert isinstance(msg, str) and msg.startswith("error:")


async def test_sigterm_mid_countdown_closes_with_1001_and_exits_0(countdown: Demo) -> None:
    async with connect(countdown.ws + "/") as ws:
        await ws.send("500")
        assert await recv(ws) == "500..."
        countdown.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1001
    assert await countdown.proc.afinish(10) == 0


# -- push -------------------------------------------------------------------------------


async def test_push_delivers_a_message_to_the_registered_client(push: Demo) -> None:
    async with connect(push.ws + "/?id=a") as ws:
        assert await push.put("?id=a&msg=hi") == (200, "ok")
        assert await recv(ws) == "hi"
        assert await push.put("?id=a&msg=h%C3%A9llo%20w") == (200, "ok")
        assert await recv(ws) == "héllo w"


async def test_push_without_id_is_400_no_id(push: Demo) -> None:
    assert await push.put("") == (400, "no_id")
    assert await push.put("?id=&msg=hi") == (400, "no_id")


async def test_push_to_unknown_id_is_404(push: Demo) -> None:
    async with connect(push.ws + "/?id=a"):
        status, _ = await push.put("?id=b&msg=hi")
        assert status == 404

    async def a_is_gone() -> bool:
        status, _ = await push.put("?id=a&msg=hi")
        return status == 404

    # ``a`` is gone once the server has seen its connection close.
    await eventually(a_is_gone, what="a 404 for the closed client's id")


async def test_push_endpoint_serves_only_put(push: Demo) -> None:
    status, _, body = await http_get(f"http://127.0.0.1:{push.put_port}/other")
    assert (status, body) == (404, "not found")


async def test_push_websocket_without_id_is_rejected_with_400(push: Demo) -> None:
    with pytest.raises(InvalidStatus) as excinfo:
        async with connect(push.ws + "/"):
            pass
    assert excinfo.value.response.status_code == 400
    assert excinfo.value.response.body == b"no_id"


async def test_push_newer_client_takes_over_an_id(push: Demo) -> None:
    async with connect(push.ws + "/?id=a") as first, connect(push.ws + "/?id=a") as second:
        await asyncio.wait_for(first.wait_closed(), 10)
        assert first.close_code == 4001
        assert await push.put("?id=a&msg=to-second") == (200, "ok")
        assert await recv(second) == "to-second"


async def test_push_sigterm_exits_0(push: Demo) -> None:
    async with connect(push.ws + "/?id=a") as ws:
        push.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1001
    assert await push.proc.afinish(10) == 0


def test_push_refuses_a_put_addr_that_is_not_loopback() -> None:
    result = run_lightws("push", "--put-addr", "0.0.0.0:0")
    assert result.returncode == 2
    assert "loopback" in result.stderr
