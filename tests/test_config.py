"""Config validation, defaults, addresses, buffers and TLS."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import lightws
import pytest
import trustme
from support import echo_handshake, eventually, serve, url
from support.rawws import BINARY, RawWebSocket, build_frame
from websockets.asyncio.client import connect


async def rejected(**fields: Any) -> BaseException:
    """Build and start a server; return the exception raised at Config() or start()."""
    fields.setdefault("addr", "127.0.0.1:0")
    fields.setdefault("handshake", echo_handshake)
    try:
        server = lightws.Server(lightws.Config(**fields))
        await asyncio.wait_for(server.start(), 5)
    except (ValueError, TypeError, OSError) as exc:
        return exc
    await server.close()
    pytest.fail(f"Config({fields}) was accepted")


SIZE_FIELDS = [
    "max_msg_len",
    "http_read_buffer",
    "http_write_buffer",
    "ws_read_buffer",
    "ws_write_buffer",
    "sock_read_buffer",
    "sock_write_buffer",
]


@pytest.mark.parametrize("field", SIZE_FIELDS)
async def test_negative_size_raises_value_error(field: str) -> None:
    exc = await rejected(**{field: -1})
    assert isinstance(exc, ValueError)
    assert field in str(exc)


@pytest.mark.parametrize("field", ["ws_read_buffer", "ws_write_buffer"])
@pytest.mark.parametrize("value", [0, 15])
async def test_framing_buffer_below_16_raises_value_error(field: str, value: int) -> None:
    exc = await rejected(**{field: value})
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize(
    "field",
    ["handshake_read_timeout", "handshake_write_timeout", "close_timeout", "tcp_keepalive"],
)
async def test_negative_duration_raises_value_error(field: str) -> None:
    exc = await rejected(**{field: -1})
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize(
    "addr",
    ["", "nonsense", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:-1", "127.0.0.1:http"],
)
async def test_bad_addr_raises(addr: str) -> None:
    exc = await rejected(addr=addr)
    assert isinstance(exc, (ValueError, OSError))


async def test_unbindable_addr_raises_os_error() -> None:
    exc = await rejected(addr="192.0.2.1:0")  # TEST-NET-1, not a local address
    assert isinstance(exc, OSError)


async def test_port_already_in_use_raises_os_error() -> None:
    async with serve() as server:
        exc = await rejected(addr=f"127.0.0.1:{server.port}")
    assert isinstance(exc, OSError)


def test_missing_handshake_raises_type_error() -> None:
    with pytest.raises(TypeError):
        lightws.Config(addr="127.0.0.1:0")  # type: ignore[call-arg]


def test_missing_addr_raises_type_error() -> None:
    with pytest.raises(TypeError):
        lightws.Config(handshake=echo_handshake)  # type: ignore[call-arg]


@pytest.mark.parametrize("handshake", [None, "not callable", 42])
async def test_handshake_that_is_not_callable_raises(handshake: Any) -> None:
    exc = await rejected(handshake=handshake)
    assert isinstance(exc, (TypeError, ValueError))


def test_config_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        lightws.Config("127.0.0.1:0", echo_handshake)  # type: ignore[misc]


async def test_missing_certificate_file_raises(tmp_path: Path) -> None:
    exc = await rejected(
        cert_file=str(tmp_path / "missing.pem"), key_file=str(tmp_path / "missing-key.pem")
    )
    assert isinstance(exc, (OSError, ValueError))


async def test_certificate_without_key_raises(tmp_path: Path) -> None:
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert_path = tmp_path / "cert.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    exc = await rejected(cert_file=str(cert_path))
    assert isinstance(exc, (OSError, ValueError))


async def test_garbage_certificate_raises(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    exc = await rejected(cert_file=str(tmp_path / "cert.pem"), key_file=str(tmp_path / "key.pem"))
    assert isinstance(exc, (OSError, ValueError))


def test_defaults_match_the_design() -> None:
    config = lightws.Config(addr="127.0.0.1:0", handshake=echo_handshake)
    assert config.max_msg_len == 1 << 20
    assert config.http_read_buffer == 4096
    assert config.http_write_buffer == 4096
    assert config.ws_read_buffer == 4096
    assert config.ws_write_buffer == 4096
    assert config.sock_read_buffer is None
    assert config.sock_write_buffer is None
    assert config.cert_file is None
    assert config.key_file is None
    assert config.io_statistics is False
    assert config.log_level == lightws.LogLevel.ERROR
    assert config.handshake_read_timeout == 3.0
    assert config.handshake_write_timeout == 3.0
    assert config.close_timeout == 5.0
    assert config.tcp_keepalive == 0
    assert config.auto_pong is True


async def test_default_max_msg_len_is_one_mebibyte() -> None:
    async with serve() as server:
        async with connect(url(server), max_size=None) as ws:
            await ws.send(b"x" * (1 << 20))
            assert len(await asyncio.wait_for(ws.recv(), 10)) == 1 << 20
        async with await RawWebSocket.connect(server.port) as ws:
            await ws.write(build_frame(BINARY, b"", length=(1 << 20) + 1))
            code, _ = await ws.read_close()
            assert code == 1009


async def test_colon_port_binds_all_interfaces() -> None:
    async with serve(addr=":0") as server:
        assert server.port > 0
        hosts = {sock.getsockname()[0] for sock in server.sockets}
        assert hosts & {"0.0.0.0", "::"}, hosts
        assert all(sock.getsockname()[1] == server.port for sock in server.sockets)
        async with connect(f"ws://127.0.0.1:{server.port}/") as ws:
            await ws.send("all interfaces")
            assert await asyncio.wait_for(ws.recv(), 5) == "all interfaces"


async def test_port_zero_picks_an_ephemeral_port_reported_by_sockets() -> None:
    async with serve(addr="127.0.0.1:0") as server:
        assert server.port > 0
        assert [sock.getsockname()[:2] for sock in server.sockets] == [("127.0.0.1", server.port)]
        assert all(isinstance(sock, socket.socket) for sock in server.sockets)


async def test_smallest_read_buffer_still_carries_large_messages() -> None:
    config = dict(ws_read_buffer=16, max_msg_len=1 << 20)
    async with serve(**config) as server, connect(url(server)) as ws:
        for size in (0, 15, 16, 17, 125, 126, 65536, 300_000):
            data = bytes(i % 251 for i in range(size))
            await ws.send(data)
            assert await asyncio.wait_for(ws.recv(), 10) == data


async def test_explicit_socket_buffers_and_keepalive_work() -> None:
    config = dict(sock_read_buffer=65536, sock_write_buffer=65536, tcp_keepalive=30)
    async with serve(**config) as server, connect(url(server)) as ws:
        await ws.send(b"y" * 500_000)
        assert await asyncio.wait_for(ws.recv(), 10) == b"y" * 500_000


async def test_debug_log_level_logs_frames_to_the_lightws_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lightws")
    async with serve(log_level=lightws.LogLevel.DEBUG) as server, connect(url(server)) as ws:
        await ws.send("log me")
        assert await asyncio.wait_for(ws.recv(), 5) == "log me"

        def debug() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name.startswith("lightws") and r.levelno == 10]

        # Records from the tokio threads reach the logger through the loop.
        await eventually(debug, what="a DEBUG record from 'lightws'")
    assert debug(), "no DEBUG records from 'lightws'"


async def test_tls_echo_with_a_trusted_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    async with serve(cert_file=str(cert_path), key_file=str(key_path)) as server:
        uri = f"wss://127.0.0.1:{server.port}/?reverse=1"
        async with connect(uri, ssl=client_ctx) as ws:
            await ws.send("secure")
            assert await asyncio.wait_for(ws.recv(), 5) == "eruces"
            await ws.send(b"z" * 200_000)
            assert await asyncio.wait_for(ws.recv(), 10) == b"z" * 200_000
        # A plain-text client on the TLS port does not get a WebSocket.
        with pytest.raises(Exception):  # noqa: B017 - any failure will do
            async with connect(f"ws://127.0.0.1:{server.port}/", open_timeout=3) as ws:
                await ws.send("plain")
                await asyncio.wait_for(ws.recv(), 3)


async def test_certificate_lists_are_chosen_by_sni(tmp_path: Path) -> None:
    ca = trustme.CA()
    certs, keys = [], []
    for name in ("alpha.test", "beta.test"):
        issued = ca.issue_cert(name)
        cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key_path))
        certs.append(str(cert_path))
        keys.append(str(key_path))
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    async with serve(cert_file=",".join(certs), key_file=",".join(keys)) as server:
        for name in ("alpha.test", "beta.test"):
            uri = f"wss://127.0.0.1:{server.port}/"
            # Verification fails unless the server presents the certificate for `name`.
            async with connect(uri, ssl=client_ctx, server_hostname=name) as ws:
                await ws.send(name)
                assert await asyncio.wait_for(ws.recv(), 5) == name


async def test_serve_forever_runs_until_cancelled() -> None:
    server = lightws.Server(lightws.Config(addr="127.0.0.1:0", handshake=echo_handshake))
    await server.start()
    task = asyncio.ensure_future(server.serve_forever())
    try:
        async with connect(url(server)) as ws:
            await ws.send("forever")
            assert await asyncio.wait_for(ws.recv(), 5) == "forever"
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    finally:
        await asyncio.wait_for(server.close(), 10)


async def test_clients_vanishing_mid_handshake_do_not_disturb_the_server() -> None:
    async with serve() as server:
        for partial in (b"", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nUpgr"):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(partial)
            await writer.drain()
            writer.transport.abort()
        async with connect(url(server)) as ws:
            await ws.send("unbothered")
            assert await asyncio.wait_for(ws.recv(), 5) == "unbothered"


async def test_rates_right_after_start_are_not_divided_by_milliseconds() -> None:
    async with serve() as server:
        async with connect(url(server)):
            pass
        await eventually(lambda: server.stats().handshakes == 1)
        rate = server.stats().rates.handshakes
    # One handshake within the first second is a rate of 1/s (less if this machine took
    # longer than a second to get here), never 1 / (a few ms).
    assert 0.0 < rate <= 1.0, rate
