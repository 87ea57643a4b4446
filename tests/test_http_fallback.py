"""Config(http_fallback=True): plain HTTP requests reach the handshake callable."""

from __future__ import annotations

from typing import Any

import lightws
from support import echo_handshake, serve
from support.rawws import http_exchange


def fallback_handshake(request: lightws.Request, response: lightws.Response) -> Any:
    if request.upgrade:
        return echo_handshake(request, response)
    if request.path == "/page":
        response.headers["Content-Type"] = "text/html"
        response.body = b"<p>hello</p>"
    elif request.path == "/teapot":
        response.status = 418
        response.body = b"short and stout"
    return None


async def test_a_plain_get_is_answered_by_the_callable_with_default_200() -> None:
    async with serve(fallback_handshake, http_fallback=True) as server:
        response = await http_exchange(
            server.port, b"GET /page HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        assert response.status == 200
        assert response.header("Content-Type") == "text/html"
        assert response.body == b"<p>hello</p>"


async def test_an_explicit_status_wins_and_no_body_means_404() -> None:
    async with serve(fallback_handshake, http_fallback=True) as server:
        teapot = await http_exchange(
            server.port, b"GET /teapot HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        assert (teapot.status, teapot.body) == (418, b"short and stout")
        missing = await http_exchange(
            server.port, b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        assert missing.status == 404


async def test_without_http_fallback_a_plain_get_gets_400() -> None:
    async with serve(fallback_handshake) as server:
        response = await http_exchange(
            server.port, b"GET /page HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        assert response.status == 400
