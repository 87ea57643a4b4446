"""The opening handshake: the user's callback, and RFC 6455 4.2.1 validation."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import Any

import lightws
import pytest
from support import echo_handler, echo_handshake, eventually, serve, url
from support.rawws import TEXT, RawWebSocket, build_frame, http_exchange, upgrade_request
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


async def test_accept_sends_101_with_the_response_headers() -> None:
    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        response.headers["Set-Cookie"] = "seen=1"
        response.headers["X-Server"] = "lightws-test"
        return echo_handler

    async with serve(handshake) as server, connect(url(server)) as ws:
        assert ws.response.status_code == 101
        assert ws.response.headers["Set-Cookie"] == "seen=1"
        assert ws.response.headers["X-Server"] == "lightws-test"
        await ws.send("still works")
        assert await asyncio.wait_for(ws.recv(), 5) == "still works"


async def test_101_response_carries_upgrade_connection_and_accept_headers(
    echo_server: lightws.Server,
) -> None:
    # RawWebSocket.connect checks Sec-WebSocket-Accept against the key it sent.
    async with await RawWebSocket.connect(echo_server.port) as ws:
        assert ws.response.status == 101
        assert ws.response.header("Upgrade").lower() == "websocket"
        assert "upgrade" in ws.response.header("Connection").lower()
        assert ws.response.header("Sec-WebSocket-Extensions") is None
        assert ws.response.header("Sec-WebSocket-Protocol") is None


async def test_reject_sends_custom_status_headers_and_body() -> None:
    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        response.status = 404
        response.headers["X-Why"] = "no such endpoint"
        response.body = b"no such endpoint"
        return None

    async with serve(handshake) as server:
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server, "/nowhere")), 5)
    assert excinfo.value.response.status_code == 404
    assert excinfo.value.response.body == b"no such endpoint"
    assert excinfo.value.response.headers["X-Why"] == "no such endpoint"


async def test_reject_without_status_sends_403() -> None:
    async with serve(lambda request, response: None) as server:
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server)), 5)
    assert excinfo.value.response.status_code == 403


async def test_reject_closes_the_tcp_connection() -> None:
    async with serve(lambda request, response: None) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_request("/"))
        data = await asyncio.wait_for(reader.read(), 5)  # returns at EOF
        writer.close()
    assert data.startswith(b"HTTP/1.1 403")


async def test_async_handshake_can_accept_and_reject() -> None:
    async def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        await asyncio.sleep(0.05)  # the case: a handshake that takes a while
        if request.path == "/ok":
            return echo_handler
        response.status = 401
        response.body = b"who are you"
        return None

    async with serve(handshake) as server:
        async with connect(url(server, "/ok")) as ws:
            await ws.send("async ok")
            assert await asyncio.wait_for(ws.recv(), 5) == "async ok"
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server, "/no")), 5)
        assert excinfo.value.response.status_code == 401
        assert excinfo.value.response.body == b"who are you"


async def test_handshake_exception_sends_500_logs_it_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        if request.path == "/boom":
            raise RuntimeError("handshake exploded")
        return echo_handshake(request, response)

    caplog.set_level(logging.ERROR, logger="lightws")
    async with serve(handshake) as server:
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server, "/boom")), 5)
        assert excinfo.value.response.status_code == 500
        async with connect(url(server, "/fine")) as ws:
            await ws.send("after the crash")
            assert await asyncio.wait_for(ws.recv(), 5) == "after the crash"
        await eventually(lambda: server.stats().handshakes_failed >= 1)
    lightws_errors = [
        r for r in caplog.records if r.name.startswith("lightws") and r.levelno >= logging.ERROR
    ]
    assert lightws_errors, "the handshake exception was not logged to 'lightws'"
    assert "handshake exploded" in caplog.text


async def test_async_handshake_exception_sends_500() -> None:
    async def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        await asyncio.sleep(0)
        raise ValueError("async boom")

    async with serve(handshake) as server:
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server)), 5)
    assert excinfo.value.response.status_code == 500


async def test_subprotocol_chosen_by_handshake_is_negotiated() -> None:
    offered: list[list[str]] = []

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        offered.append(list(request.subprotocols))
        if "superchat" in request.subprotocols:
            response.subprotocol = "superchat"

        async def handler(conn: lightws.Connection) -> None:
            await conn.send(f"subprotocol={conn.subprotocol}")

        return handler

    async with serve(handshake) as server:
        async with connect(url(server), subprotocols=["chat", "superchat"]) as ws:
            assert ws.subprotocol == "superchat"
            assert await asyncio.wait_for(ws.recv(), 5) == "subprotocol=superchat"
        async with connect(url(server), subprotocols=["chat"]) as ws:
            assert ws.subprotocol is None
            assert await asyncio.wait_for(ws.recv(), 5) == "subprotocol=None"
        async with connect(url(server)) as ws:
            assert ws.subprotocol is None
    assert offered == [["chat", "superchat"], ["chat"], []]


async def test_request_exposes_method_path_query_headers_cookies_and_address() -> None:
    seen: dict[str, Any] = {}

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        seen["method"] = request.method
        seen["path"] = request.path
        seen["query"] = dict(request.query)
        seen["query_all"] = {k: list(v) for k, v in request.query_all.items()}
        seen["x-custom"] = request.headers["X-CUSTOM"]
        seen["get"] = request.headers.get("x-custom")
        seen["missing"] = request.headers.get("x-missing")
        seen["get_all"] = list(request.headers.get_all("X-Multi"))
        seen["in"] = "x-custom" in request.headers
        seen["not in"] = "x-missing" in request.headers
        seen["cookies"] = dict(request.cookies)
        seen["remote_address"] = tuple(request.remote_address)

        async def handler(conn: lightws.Connection) -> None:
            seen["conn.request.path"] = conn.request.path
            seen["conn.remote_address"] = tuple(conn.remote_address)
            await conn.send("ok")

        return handler

    headers = [
        ("X-Custom", "custom value"),
        ("X-Multi", "first"),
        ("X-Multi", "second"),
        ("Cookie", "session=abc123; theme=dark"),
    ]
    async with serve(handshake) as server:
        async with connect(url(server, "/a/b?x=1&x=2&y=3"), additional_headers=headers) as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "ok"
            local = ws.local_address[:2]
    assert seen == {
        "method": "GET",
        "path": "/a/b",
        "query": {"x": "1", "y": "3"},
        "query_all": {"x": ["1", "2"], "y": ["3"]},
        "x-custom": "custom value",
        "get": "custom value",
        "missing": None,
        "get_all": ["first", "second"],
        "in": True,
        "not in": False,
        "cookies": {"session": "abc123", "theme": "dark"},
        "remote_address": local,
        "conn.request.path": "/a/b",
        "conn.remote_address": local,
    }


async def test_query_values_are_percent_decoded() -> None:
    seen: dict[str, str] = {}

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        seen.update(request.query)
        return echo_handler

    async with serve(handshake) as server, connect(url(server, "/?name=a%20b&e=%C3%A9")):
        pass
    assert seen == {"name": "a b", "e": "é"}


# RFC 6455 4.2.1: each requirement broken on its own, with the status expected.
BAD_REQUESTS = {
    "post_method": (upgrade_request(method="POST"), 405),
    "put_method": (upgrade_request(method="PUT"), 405),
    "http_1_0": (upgrade_request().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400),
    "missing_host": (upgrade_request(omit=("Host",)), 400),
    "missing_upgrade": (upgrade_request(omit=("Upgrade",)), 400),
    "upgrade_not_websocket": (
        upgrade_request(omit=("Upgrade",), extra=[("Upgrade", "h2c")]),
        400,
    ),
    "missing_connection": (upgrade_request(omit=("Connection",)), 400),
    "connection_without_upgrade_token": (
        upgrade_request(omit=("Connection",), extra=[("Connection", "keep-alive")]),
        400,
    ),
    "missing_key": (upgrade_request(omit=("Sec-WebSocket-Key",)), 400),
    "key_not_base64": (upgrade_request(key="this is not base64!!!!!!"), 400),
    "key_of_15_bytes": (upgrade_request(key="AAAAAAAAAAAAAAAAAAAA"), 400),
    "key_of_17_bytes": (upgrade_request(key="AAAAAAAAAAAAAAAAAAAAAAA="), 400),
    "missing_version": (upgrade_request(omit=("Sec-WebSocket-Version",)), 426),
    "version_8": (upgrade_request(version="8"), 426),
    "version_14": (upgrade_request(version="14"), 426),
    "plain_get": (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    "garbage": (b"NOT HTTP AT ALL\r\n\r\n", 400),
}


@pytest.mark.parametrize(("request_bytes", "status"), BAD_REQUESTS.values(), ids=list(BAD_REQUESTS))
async def test_invalid_upgrade_request_gets_the_exact_status(
    echo_server: lightws.Server, request_bytes: bytes, status: int
) -> None:
    response = await http_exchange(echo_server.port, request_bytes)
    assert response.status == status
    if status == 426:
        assert response.header("Sec-WebSocket-Version") == "13"
    if status == 405:
        assert response.header("Allow") == "GET"


async def test_invalid_request_does_not_reach_the_handshake_callback() -> None:
    calls: list[str] = []

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        calls.append(request.path)
        return echo_handler

    async with serve(handshake) as server:
        response = await http_exchange(server.port, upgrade_request(version="8"))
        assert response.status == 426
        await eventually(lambda: server.stats().handshakes_failed >= 1)
    assert calls == []


@pytest.mark.parametrize(
    "extra",
    [
        [("Connection", "keep-alive, Upgrade")],
        [("Connection", "UPGRADE")],
        [("Upgrade", "WebSocket")],
    ],
    ids=["connection_token_list", "connection_uppercase", "upgrade_mixed_case"],
)
async def test_valid_variants_of_upgrade_headers_are_accepted(
    echo_server: lightws.Server, extra: list[tuple[str, str]]
) -> None:
    omit = tuple(name for name, _ in extra)
    async with await RawWebSocket.connect(echo_server.port, omit=omit, extra=extra) as ws:
        await ws.send_frame(TEXT, b"variant")
        assert await ws.recv_message() == (TEXT, b"variant")


async def test_lowercase_header_names_are_accepted(echo_server: lightws.Server) -> None:
    lines = upgrade_request().split(b"\r\n")
    lowered = [lines[0]] + [
        line.split(b":", 1)[0].lower() + b":" + line.split(b":", 1)[1] if b":" in line else line
        for line in lines[1:]
    ]
    response = await http_exchange(echo_server.port, b"\r\n".join(lowered))
    assert response.status == 101


async def test_request_head_larger_than_http_read_buffer_gets_431() -> None:
    big = [("X-Big", "b" * 5000)]
    async with serve(http_read_buffer=4096) as server:
        response = await http_exchange(server.port, upgrade_request(extra=big))
        assert response.status == 431
    async with serve(http_read_buffer=16384) as server:
        async with await RawWebSocket.connect(server.port, extra=big) as ws:
            await ws.send_frame(TEXT, b"big head accepted")
            assert await ws.recv_message() == (TEXT, b"big head accepted")


async def test_first_frame_in_the_same_write_as_the_request_is_not_lost(
    echo_server: lightws.Server,
) -> None:
    first = build_frame(TEXT, b"early bird") + build_frame(TEXT, b"second")
    async with await RawWebSocket.connect(echo_server.port, first_bytes=first) as ws:
        assert await ws.recv_message() == (TEXT, b"early bird")
        assert await ws.recv_message() == (TEXT, b"second")


async def test_first_frame_is_not_lost_while_an_async_handshake_runs() -> None:
    async def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        await asyncio.sleep(0.2)  # the case: the frame arrives while the handshake runs
        return echo_handler

    async with serve(handshake) as server:
        first = build_frame(TEXT, b"sent before the 101")
        async with await RawWebSocket.connect(server.port, first_bytes=first) as ws:
            assert await ws.recv_message() == (TEXT, b"sent before the 101")


async def test_client_that_never_finishes_its_request_is_dropped() -> None:
    async with serve(handshake_read_timeout=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line, ever
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def drain_to_eof() -> None:
            while await reader.read(4096):
                pass

        try:
            await asyncio.wait_for(drain_to_eof(), 5)
        except ConnectionError:
            pass
        elapsed = loop.time() - started
        writer.close()
    assert 0.3 < elapsed < 3


async def test_handshake_returning_something_not_callable_gets_500() -> None:
    async with serve(lambda request, response: 42) as server:
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server)), 5)
    assert excinfo.value.response.status_code == 500


#: The prefix of every log line about a connection: "[host:port #id] ".
PREFIX = re.compile(r"^\[127\.0\.0\.1:\d+ #\d+\] ")


def lightws_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lightws" and r.levelno >= logging.ERROR]


async def test_handshake_returning_a_plain_function_gets_500_and_says_what_to_return(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[object] = []

    def handler(conn: lightws.Connection) -> None:  # forgot "async"
        ran.append(conn)

    caplog.set_level(logging.ERROR, logger="lightws")
    async with serve(lambda request, response: handler) as server:
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server)), 5)
        assert excinfo.value.response.status_code == 500
        await eventually(lambda: bool(lightws_errors(caplog)))
    [record] = lightws_errors(caplog)
    message = record.getMessage()
    assert PREFIX.match(message), message
    assert (
        "the handshake must return an async function (async def handler(conn)), a listener "
        "(an object with on_open/on_message/on_close methods), lightws.Accept(...) or None; "
        "got <function " in message
    )
    assert "handler" in message


async def test_handshake_returning_something_not_callable_logs_with_the_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="lightws")
    async with serve(lambda request, response: 42) as server:
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server)), 5)
        assert excinfo.value.response.status_code == 500
        await eventually(lambda: bool(lightws_errors(caplog)))
    [record] = lightws_errors(caplog)
    assert PREFIX.match(record.getMessage()), record.getMessage()
    assert "got 42" in record.getMessage()


async def test_subprotocol_not_offered_gets_500_and_logs_with_the_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        response.subprotocol = "never-offered"
        return echo_handler

    caplog.set_level(logging.ERROR, logger="lightws")
    async with serve(handshake) as server:
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server), subprotocols=["chat"]), 5)
        assert excinfo.value.response.status_code == 500
        await eventually(lambda: bool(lightws_errors(caplog)))
    [record] = lightws_errors(caplog)
    assert PREFIX.match(record.getMessage()), record.getMessage()
    assert "never-offered" in record.getMessage()


async def test_handler_that_cannot_be_called_gets_500_not_101(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler() -> None:  # takes no connection
        pass

    caplog.set_level(logging.ERROR, logger="lightws")
    async with serve(lambda request, response: handler) as server:
        with pytest.raises(InvalidStatus) as excinfo:
            await asyncio.wait_for(connect(url(server)), 5)
        assert excinfo.value.response.status_code == 500
        await eventually(lambda: bool(lightws_errors(caplog)))
    [record] = lightws_errors(caplog)
    assert PREFIX.match(record.getMessage()), record.getMessage()
    assert record.exc_info is not None  # the TypeError, with its traceback


class AsyncCallable:
    async def __call__(self, conn: lightws.Connection) -> None:
        await echo_handler(conn)


def wrapped(conn: lightws.Connection) -> Any:
    """A plain function that returns the handler's coroutine (a decorator's wrapper)."""
    return echo_handler(conn)


async def reverse_echo(conn: lightws.Connection, reverse: bool) -> None:
    await echo_handler(conn, reverse)


@pytest.mark.parametrize(
    "handler",
    [
        functools.partial(reverse_echo, reverse=False),
        functools.partial(functools.partial(echo_handler), reverse=False),
        AsyncCallable(),
        wrapped,
        lambda conn: echo_handler(conn),
    ],
    ids=["partial", "nested-partial", "async-call", "wrapper", "lambda"],
)
async def test_any_callable_returning_an_awaitable_is_a_handler(handler: Any) -> None:
    async with serve(lambda request, response: handler) as server, connect(url(server)) as ws:
        await ws.send("still a handler")
        assert await asyncio.wait_for(ws.recv(), 5) == "still a handler"


async def test_header_values_cannot_inject_lines_into_the_response() -> None:
    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        if request.path == "/reject":
            response.status = 400
            response.headers["X-Evil"] = "a\r\nX-Injected: 1"
            return None
        response.headers["X-Evil"] = "a\r\nX-Injected: 1"
        return echo_handler

    async with serve(handshake) as server:
        for path in ("/accept", "/reject"):
            response = await http_exchange(server.port, upgrade_request(path))
            assert response.header("X-Injected") is None, path
            assert response.status in (400, 500), (path, response.status)


async def test_server_close_finishes_while_an_async_handshake_is_pending() -> None:
    started = asyncio.Event()

    async def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        started.set()
        await asyncio.sleep(3600)

    async with serve(handshake, close_timeout=0.5) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_request())
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.wait_for(server.close(), 5)
        writer.close()
