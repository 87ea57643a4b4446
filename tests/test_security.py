"""Security defaults (issue 16): ``Config.origins``, ``max_connections_per_ip`` and
``trusted_proxies``, with real clients (the websockets client and raw sockets).

Refusals (403, 429) happen in Rust before the handshake callable runs: every test that
expects one counts the callable's calls. Clients from other loopback addresses bind to
127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to the loopback interface).
"""

from __future__ import annotations

import ast
import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import lightws
import pytest
from support import echo_handler, eventually, run_lightws, serve, url
from support.demos import start_demo
from support.rawws import HttpResponse, read_response, upgrade_request
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

APP = "https://app.example"


class Recorder:
    """A handshake callable that accepts everyone and records every request it saw."""

    def __init__(self) -> None:
        self.requests: list[lightws.Request] = []

    def __call__(self, request: lightws.Request, response: lightws.Response) -> Any:
        self.requests.append(request)

        async def handler(conn: lightws.Connection) -> None:
            # Tell the client what the server believes about it, then echo.
            await conn.send(repr((request.origin, list(conn.remote_address))))
            await echo_handler(conn)

        return handler

    @property
    def calls(self) -> int:
        return len(self.requests)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


async def status_of(server: lightws.Server, **kwargs: Any) -> int:
    """Open a websockets connection; 101 if it upgraded, else the refusal's status."""
    try:
        async with connect(url(server), **kwargs) as ws:
            await ws.recv(decode=True)
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def raw_exchange(
    port: int, request: bytes, *, local: str = "127.0.0.1"
) -> tuple[HttpResponse, asyncio.StreamWriter]:
    """Send a raw request from ``local``; return the response and the open writer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    writer.write(request)
    await writer.drain()
    return await read_response(reader), writer


async def raw_status(port: int, *, local: str = "127.0.0.1", **kwargs: Any) -> int:
    response, writer = await raw_exchange(port, upgrade_request(**kwargs), local=local)
    writer.close()
    return response.status


def failed(server: lightws.Server) -> int:
    return server.stats().handshakes_failed


# -- Origin ------------------------------------------------------------------------------


async def test_a_listed_origin_is_accepted(recorder: Recorder) -> None:
    async with serve(recorder, origins=[APP]) as server:
        async with connect(url(server), origin=Origin(APP)) as ws:
            hello = await ws.recv()
            assert hello.startswith(f"({APP!r}, ")
            await ws.send("hi")
            assert await ws.recv() == "hi"
        assert recorder.calls == 1
        assert server.stats().handshakes_failed == 0


async def test_an_unlisted_origin_gets_403_before_the_callable(recorder: Recorder) -> None:
    async with serve(recorder, origins=[APP]) as server:
        for evil in ("https://evil.example", "http://app.example", "https://app.example.evil"):
            with pytest.raises(InvalidStatus) as info:
                async with connect(url(server), origin=Origin(evil)):
                    pass
            assert info.value.response.status_code == 403
        assert recorder.calls == 0
        assert failed(server) == 3


async def test_a_missing_origin_is_refused_unless_none_is_listed(recorder: Recorder) -> None:
    async with serve(recorder, origins=[APP]) as server:
        assert await status_of(server) == 403  # websockets sends no Origin by default
        assert await raw_status(server.port) == 403
        assert recorder.calls == 0
        assert failed(server) == 2
    async with serve(recorder, origins=[APP, None]) as server:
        assert await status_of(server) == 101
        assert await status_of(server, origin=Origin(APP)) == 101
        # None admits a missing Origin, not a wrong one.
        assert await status_of(server, origin=Origin("https://evil.example")) == 403
        assert recorder.calls == 2
        assert failed(server) == 1


async def test_only_none_admits_non_browser_clients_and_no_browser(recorder: Recorder) -> None:
    async with serve(recorder, origins=[None]) as server:
        assert await status_of(server) == 101
        assert await status_of(server, origin=Origin(APP)) == 403
        assert recorder.calls == 1


async def test_an_empty_list_refuses_every_upgrade(recorder: Recorder) -> None:
    async with serve(recorder, origins=[]) as server:
        assert await status_of(server) == 403
        assert await status_of(server, origin=Origin(APP)) == 403
        assert recorder.calls == 0


async def test_scheme_and_host_compare_case_insensitively(recorder: Recorder) -> None:
    async with serve(recorder, origins=["HTTPS://App.Example"]) as server:
        assert await status_of(server, origin=Origin("https://app.example")) == 101
        assert await status_of(server, origin=Origin("https://APP.EXAMPLE")) == 101
        assert recorder.calls == 2


async def test_a_default_port_may_be_written_or_left_out(recorder: Recorder) -> None:
    async with serve(recorder, origins=["https://a.example:443", "http://b.example"]) as server:
        assert await status_of(server, origin=Origin("https://a.example")) == 101
        assert await status_of(server, origin=Origin("https://a.example:443")) == 101
        assert await status_of(server, origin=Origin("http://b.example:80")) == 101
        assert recorder.calls == 3
        # Another port is another origin; so is the other scheme's default port.
        assert await status_of(server, origin=Origin("https://a.example:8443")) == 403
        assert await status_of(server, origin=Origin("http://a.example:443")) == 403
        assert recorder.calls == 3


async def test_a_non_default_port_must_match(recorder: Recorder) -> None:
    async with serve(recorder, origins=["http://localhost:8080"]) as server:
        assert await status_of(server, origin=Origin("http://localhost:8080")) == 101
        assert await status_of(server, origin=Origin("http://localhost")) == 403
        assert await status_of(server, origin=Origin("http://localhost:8081")) == 403
        assert recorder.calls == 1


async def test_a_path_or_null_or_two_origins_are_refused(recorder: Recorder) -> None:
    async with serve(recorder, origins=[APP, None]) as server:
        for extra in (
            [("Origin", APP + "/")],
            [("Origin", "null")],
            [("Origin", "")],
            [("Origin", APP), ("Origin", APP)],
        ):
            assert await raw_status(server.port, extra=extra) == 403, extra
        assert await raw_status(server.port, extra=[("Origin", APP)]) == 101
        assert recorder.calls == 1


async def test_request_origin_is_given_to_the_callable(recorder: Recorder) -> None:
    async with serve(recorder) as server:  # no origins: nothing is checked
        assert await status_of(server, origin=Origin("https://any.example")) == 101
        assert await status_of(server) == 101
    assert [r.origin for r in recorder.requests] == ["https://any.example", None]


async def test_plain_http_is_not_origin_checked(recorder: Recorder) -> None:
    # http_fallback pages are ordinary HTTP (browsers apply CORS to them); only the
    # WebSocket upgrade needs the Origin check.
    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        response.body = b"page"
        return None

    async with serve(handshake, origins=[APP], http_fallback=True) as server:
        request = b"GET / HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n\r\n"
        response, writer = await raw_exchange(server.port, request)
        writer.close()
        assert (response.status, response.body) == (200, b"page")


async def test_a_refused_origin_is_logged_at_info(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lightws")
    async with serve(recorder, origins=[APP], log_level=lightws.LogLevel.INFO) as server:
        assert await status_of(server, origin=Origin("https://evil.example")) == 403
        await eventually(lambda: "https://evil.example" in caplog.text)
    [record] = [r for r in caplog.records if "evil.example" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "403" in record.getMessage()


async def test_origins_work_over_tls_too(recorder: Recorder, tmp_path: Any) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with serve(
        recorder, origins=[APP], cert_file=str(cert_file), key_file=str(key_file)
    ) as server:
        wss = f"wss://127.0.0.1:{server.port}/"
        async with connect(wss, ssl=ctx, origin=Origin(APP)) as ws:
            await ws.recv()
        with pytest.raises(InvalidStatus) as info:
            async with connect(wss, ssl=ctx, origin=Origin("https://evil.example")):
                pass
        assert info.value.response.status_code == 403
        assert recorder.calls == 1


# -- Connections per address -------------------------------------------------------------


@pytest.fixture
async def capped(recorder: Recorder) -> AsyncIterator[lightws.Server]:
    async with serve(recorder, max_connections_per_ip=2) as server:
        yield server


async def open_ws(server: lightws.Server, local: str = "127.0.0.1", **kw: Any) -> ClientConnection:
    ws = await connect(url(server), local_addr=(local, 0), **kw)
    await ws.recv()  # the handler's hello: the upgrade is complete
    return ws


async def test_a_third_connection_from_one_address_gets_429_before_the_callable(
    capped: lightws.Server, recorder: Recorder
) -> None:
    a = await open_ws(capped)
    b = await open_ws(capped)
    try:
        with pytest.raises(InvalidStatus) as info:
            await connect(url(capped))
        assert info.value.response.status_code == 429
        assert recorder.calls == 2
        assert failed(capped) == 1
        # Another address has its own count.
        c = await open_ws(capped, "127.0.0.2")
        d = await open_ws(capped, "127.0.0.2")
        assert await raw_status(capped.port, local="127.0.0.2") == 429
        assert await raw_status(capped.port, local="127.0.0.3") == 101
        assert recorder.calls == 5
        assert failed(capped) == 2
        await c.close()
        await d.close()
    finally:
        await a.close()
        await b.close()


async def test_the_count_is_released_however_a_connection_ends(
    recorder: Recorder,
) -> None:
    async def leave(conn: lightws.Connection) -> None:
        await conn.send("bye")  # then return: the server closes with 1000

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        if request.path == "/refuse":
            return None  # 403 from the callable: a failed handshake
        if request.path == "/leave":
            return leave
        return recorder(request, response)

    async with serve(handshake, max_connections_per_ip=1) as server:

        async def admitted() -> bool:
            """Wait for the previous connection to be gone, then try a new one (and wait
            for that one to be gone too)."""
            await eventually(lambda: server.stats().connections == 0)
            ok = await raw_status(server.port) == 101
            await eventually(lambda: server.stats().connections == 0)
            return ok

        # A normal close.
        ws = await open_ws(server)
        assert await raw_status(server.port) == 429
        await ws.close()
        assert await admitted()
        # A reset (RST, SO_LINGER 0) from an upgraded client.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_request())
        assert (await read_response(reader)).status == 101
        assert await raw_status(server.port) == 429
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        assert await admitted()
        # A handshake the callable refuses.
        assert await raw_status(server.port, path="/refuse") == 403
        assert await admitted()
        # A client that vanishes in the middle of its request head.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_request()[:20])
        await writer.drain()
        assert await raw_status(server.port) == 429
        writer.close()
        assert await admitted()
        # The server closing the connection (the handler returns).
        async with connect(url(server, "/leave")) as ws:
            assert await ws.recv() == "bye"
            await ws.wait_closed()
        assert ws.close_code == 1000
        assert await admitted()


async def test_connections_still_in_their_handshake_count(recorder: Recorder) -> None:
    async with serve(recorder, max_connections_per_ip=1, handshake_read_timeout=30) as server:
        # Connected, nothing sent yet (a slowloris): it holds the address's only place.
        _, idle = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            await eventually(lambda: server.stats().connections == 1)
            assert await raw_status(server.port) == 429
            assert recorder.calls == 0
        finally:
            idle.close()
        await eventually(lambda: server.stats().connections == 0)
        assert await raw_status(server.port) == 101


async def test_the_429_is_an_http_answer_with_a_reason(capped: lightws.Server) -> None:
    a = await open_ws(capped)
    b = await open_ws(capped)
    try:
        response, writer = await raw_exchange(capped.port, upgrade_request())
        writer.close()
        assert response.status == 429
        assert response.reason == "Too Many Requests"
        assert b"max_connections_per_ip" in response.body
    finally:
        await a.close()
        await b.close()


# -- X-Forwarded-For -------------------------------------------------------------------


def xff(*addresses: str) -> dict[str, Any]:
    return {"additional_headers": [("X-Forwarded-For", ", ".join(addresses))]}


async def hello(ws: ClientConnection) -> tuple[str | None, list[Any]]:
    """The handler's first message: (request.origin, conn.remote_address)."""
    origin, remote = ast.literal_eval(str(await ws.recv()))  # written with repr()
    return origin, remote


async def test_forwarded_for_names_the_client_only_behind_a_trusted_proxy(
    recorder: Recorder,
) -> None:
    async with serve(recorder, trusted_proxies=["127.0.0.1"], max_connections_per_ip=1) as server:
        # From the trusted proxy: the client is 203.0.113.5 (port unknown: 0).
        a = await connect(url(server), **xff("203.0.113.5"))
        assert (await hello(a))[1] == ["203.0.113.5", 0]
        assert recorder.requests[-1].remote_address == ("203.0.113.5", 0)
        # Its second connection through the proxy is over the limit ...
        status = await status_of(server, **xff("203.0.113.5"))
        assert status == 429
        assert recorder.calls == 1
        # ... another client behind the same proxy is not.
        b = await connect(url(server), **xff("203.0.113.6"))
        assert (await hello(b))[1] == ["203.0.113.6", 0]
        # From an untrusted peer the header is ignored: it is 127.0.0.2 itself.
        c = await connect(url(server), local_addr=("127.0.0.2", 0), **xff("203.0.113.7"))
        _, (host, port) = await hello(c)
        assert host == "127.0.0.2" and port != 0
        # ... so it cannot escape its own limit by naming someone else.
        assert await status_of(server, local_addr=("127.0.0.2", 0), **xff("203.0.113.8")) == 429
        assert recorder.calls == 3
        for ws in (a, b, c):
            await ws.close()


async def test_the_rightmost_untrusted_address_is_the_client(recorder: Recorder) -> None:
    proxies = ["127.0.0.1", "10.0.0.0/8"]
    async with serve(recorder, trusted_proxies=proxies) as server:
        # The left-most entry is whatever the client claimed; 10.1.1.1 is a second
        # proxy we trust; 198.51.100.7 is what our first proxy saw.
        async with connect(url(server), **xff("1.2.3.4", "198.51.100.7", "10.1.1.1")) as ws:
            assert (await hello(ws))[1] == ["198.51.100.7", 0]
        # Without the header the proxy itself is the client (with its real port).
        async with connect(url(server)) as ws:
            host, port = (await hello(ws))[1]
            assert host == "127.0.0.1" and port != 0


async def test_forwarded_for_without_trusted_proxies_changes_nothing(recorder: Recorder) -> None:
    async with serve(recorder, max_connections_per_ip=1) as server:
        async with connect(url(server), **xff("203.0.113.5")) as ws:
            assert (await hello(ws))[1][0] == "127.0.0.1"
            assert await status_of(server, **xff("203.0.113.6")) == 429


# -- Configuration -----------------------------------------------------------------------


async def start_error(**fields: Any) -> BaseException:
    fields.setdefault("addr", "127.0.0.1:0")
    fields.setdefault("handshake", Recorder())
    server = lightws.Server(lightws.Config(**fields))
    try:
        await server.start()
    except (ValueError, TypeError) as exc:
        return exc
    await server.close()
    pytest.fail(f"Config({fields}) was accepted")


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("app.example", 'expected scheme://host[:port], e.g. "https://app.example"'),
        ("https://app.example/", "without a trailing '/'"),
        ("https://app.example/chat", "path"),
        ("https://app.example:99999", "port"),
        ("https://*.example", "wildcards"),
        ("null", "opaque origin"),
        ("https://", "no host"),
    ],
)
async def test_malformed_origins_are_refused_at_start(entry: str, says: str) -> None:
    exc = await start_error(origins=[APP, entry])
    assert isinstance(exc, ValueError)
    assert str(exc).startswith(f'Config.origins[1]: "{entry}"'), str(exc)
    assert says in str(exc), str(exc)


async def test_origins_must_be_a_list_not_a_string() -> None:
    exc = await start_error(origins=APP)
    assert isinstance(exc, TypeError)
    assert "Config.origins" in str(exc)
    exc = await start_error(origins=[APP, 443])
    assert isinstance(exc, TypeError)


@pytest.mark.parametrize("proxy", ["proxy.example", "10.0.0.1/8", "10.0.0.0/33", ""])
async def test_malformed_trusted_proxies_are_refused_at_start(proxy: str) -> None:
    exc = await start_error(trusted_proxies=["127.0.0.1", proxy])
    assert isinstance(exc, ValueError)
    assert "Config.trusted_proxies[1]" in str(exc)


async def test_trusted_proxies_must_be_a_list_not_a_string() -> None:
    exc = await start_error(trusted_proxies="127.0.0.1")
    assert isinstance(exc, TypeError)


async def test_negative_max_connections_per_ip_is_refused_at_start() -> None:
    exc = await start_error(max_connections_per_ip=-1)
    assert isinstance(exc, ValueError)
    assert "max_connections_per_ip" in str(exc)


def test_security_defaults_check_nothing() -> None:
    config = lightws.Config(addr="127.0.0.1:0", handshake=Recorder())
    assert config.origins is None
    assert config.max_connections_per_ip == 0
    assert tuple(config.trusted_proxies) == ()


# -- Command line ------------------------------------------------------------------------


@pytest.mark.asyncio_loop_only  # the demo runs in its own process
async def test_demo_origin_options() -> None:
    demo = await start_demo(
        "echo",
        "--origin",
        APP,
        "--origin",
        "NONE",
        "--max-connections-per-ip",
        "1",
        ready="allowed from",
    )
    try:
        assert f"allowed from: {APP}, (no Origin)" in demo.banner

        async def status(**kwargs: Any) -> int:
            try:
                async with connect(demo.ws + "/", **kwargs) as ws:
                    await ws.send("ping")
                    assert await ws.recv() == "ping"
                    return 101
            except InvalidStatus as exc:
                return exc.response.status_code

        assert await status(origin=Origin(APP)) == 101
        assert await status() == 101
        assert await status(origin=Origin("https://evil.example")) == 403
        async with connect(demo.ws + "/"):
            assert await status() == 429
    finally:
        await demo.stop()


def test_demo_refuses_a_malformed_origin_with_exit_status_2() -> None:
    result = run_lightws("echo", "--addr", "127.0.0.1:0", "--origin", "app.example")
    assert result.returncode == 2
    assert 'Config.origins[0]: "app.example" is not an origin' in result.stdout + result.stderr
