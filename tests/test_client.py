"""lightws.connect: the client on the same Rust core (issue 15, DESIGN.md section 7).

Against real servers (python-websockets, aiohttp and lightws's own, over ws:// and
wss:// with a trustme CA), and against a raw asyncio server that breaks the protocol on
purpose to check the client's RFC 6455 answers: masked server frames (1002), a wrong
``Sec-WebSocket-Accept`` (InvalidHandshake), invalid UTF-8 (1007), close codes; and
that the client's own frames are masked with varying keys. No mocks: every test talks
to a socket on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import os
import re
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import lightws
import pytest
import trustme
from aiohttp import web
from support import echo_handshake, eventually, free_port, serve
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

CA = trustme.CA()
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# ---- servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(cert_file, key_file, cafile) for localhost and 127.0.0.1."""
    d = tmp_path_factory.mktemp("client-tls")
    leaf = CA.issue_cert("localhost", "127.0.0.1")
    cert, key, cafile = d / "cert.pem", d / "key.pem", d / "ca.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    CA.cert_pem.write_to_path(str(cafile))
    return str(cert), str(key), str(cafile)


def server_ssl(tls_files: tuple[str, str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_files[0], tls_files[1])
    return ctx


async def _websockets_echo(ws: ServerConnection) -> None:
    with contextlib.suppress(Exception):
        async for message in ws:
            await ws.send(message)


@contextlib.asynccontextmanager
async def websockets_server(tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    async with ws_serve(
        _websockets_echo,
        "127.0.0.1",
        0,
        ssl=tls,
        subprotocols=["chat"],
        max_size=None,
    ) as server:
        yield server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def aiohttp_server(tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",), max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        assert site._server is not None
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    finally:
        await runner.cleanup()


def chat_handshake(request: lightws.Request, response: lightws.Response) -> Any:
    """Echo; choose the subprotocol "chat" when offered (as the other servers do)."""
    if "chat" in request.subprotocols:
        response.subprotocol = "chat"
    return echo_handshake(request, response)


@contextlib.asynccontextmanager
async def lightws_server(tls_files: tuple[str, str, str] | None = None) -> AsyncIterator[int]:
    config: dict[str, Any] = {"max_msg_len": 4 << 20}
    if tls_files is not None:
        config.update(cert_file=tls_files[0], key_file=tls_files[1])
    async with serve(chat_handshake, **config) as server:
        yield server.port


SERVERS = ["lightws", "websockets", "aiohttp"]


@contextlib.asynccontextmanager
async def echo_server(kind: str, tls_files: tuple[str, str, str] | None) -> AsyncIterator[int]:
    ctx = server_ssl(tls_files) if tls_files is not None else None
    if kind == "lightws":
        async with lightws_server(tls_files) as port:
            yield port
    elif kind == "websockets":
        async with websockets_server(ctx) as port:
            yield port
    else:
        async with aiohttp_server(ctx) as port:
            yield port


# ---- interop: echo over ws:// and wss:// ---------------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_echo_against_each_server(
    kind: str, scheme: str, tls_files: tuple[str, str, str]
) -> None:
    tls = tls_files if scheme == "wss" else None
    async with echo_server(kind, tls) as port:
        url = f"{scheme}://localhost:{port}/echo"
        async with lightws.connect(
            url, cafile=tls_files[2], subprotocols=["superchat", "chat"], max_msg_len=4 << 20
        ) as conn:
            assert conn.subprotocol == "chat"
            assert conn.server is None
            assert conn.remote_address[0] == "127.0.0.1"
            assert conn.remote_address[1] == port
            await conn.send("héllo")
            assert await conn.recv() == lightws.Message(lightws.Opcode.TEXT, "héllo")
            await conn.send(b"\x00\x01")
            assert await conn.recv() == lightws.Message(lightws.Opcode.BINARY, b"\x00\x01")
            big = os.urandom(300_000)  # over write_limit: sent in fragments
            await conn.send(big)
            assert (await conn.recv()).body == big
            await conn.send_ping(b"p")
            assert not conn.closed
        assert conn.closed
        assert conn.close_code == 1000


@pytest.mark.parametrize("kind", SERVERS)
async def test_await_form_and_streaming_against_each_server(kind: str) -> None:
    async with echo_server(kind, None) as port:
        conn = await lightws.connect(f"ws://127.0.0.1:{port}/", subprotocols=["chat"])
        try:
            async with conn.writer(binary=True) as w:
                for _ in range(4):
                    await w.write(b"x" * 1000)
            msg = await conn.recv()
            assert msg.body == b"x" * 4000
            for i in range(50):
                await conn.send(str(i))
            got = [(await conn.recv()).text for _ in range(50)]
            assert got == [str(i) for i in range(50)]
        finally:
            await conn.close()
        assert conn.close_code == 1000


async def test_wss_with_an_untrusted_certificate_fails_verification(
    tls_files: tuple[str, str, str],
) -> None:
    # No cafile: the system's roots do not include the test CA.
    async with lightws_server(tls_files) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await lightws.connect(f"wss://localhost:{port}/")


async def test_wss_name_must_match_the_certificate(
    tls_files: tuple[str, str, str], tmp_path: Path
) -> None:
    leaf = CA.issue_cert("other.test")
    cert, key = tmp_path / "other.pem", tmp_path / "other.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    async with lightws_server((str(cert), str(key), tls_files[2])) as port:
        # Trusted CA, but the certificate names other.test, not localhost.
        with pytest.raises(ssl.SSLCertVerificationError):
            await lightws.connect(f"wss://localhost:{port}/", cafile=tls_files[2])


async def test_a_missing_cafile_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await lightws.connect("wss://localhost:1/", cafile=str(tmp_path / "nope.pem"))


# ---- the handshake: subprotocols, headers, refusals ---------------------------------------


async def test_subprotocols_headers_origin_and_user_agent_reach_the_server() -> None:
    seen: list[lightws.Request] = []

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        seen.append(request)
        response.subprotocol = request.subprotocols[-1]
        response.headers["X-Reply"] = "yes"
        return echo_handshake(request, response)

    async with serve(handshake) as server:
        port = server.port
        async with lightws.connect(
            f"ws://127.0.0.1:{port}/path?q=1",
            subprotocols=["one", "two"],
            headers={"X-Token": "abc", "Cookie": "a=1"},
            origin="https://app.example",
        ) as conn:
            assert conn.subprotocol == "two"
            assert conn.response.status == 101
            assert conn.response.headers["x-reply"] == "yes"
            assert conn.request.path == "/path"
            assert conn.request.headers["X-Token"] == "abc"
    (request,) = seen
    assert request.target == "/path?q=1"
    assert request.subprotocols == ["one", "two"]
    assert request.headers["X-Token"] == "abc"
    assert request.cookies == {"a": "1"}
    assert request.origin == "https://app.example"
    assert request.headers["User-Agent"] == f"lightws/{lightws.__version__}"
    assert request.headers["Host"] == f"127.0.0.1:{port}"


async def test_headers_as_pairs_may_repeat_and_override_the_user_agent() -> None:
    seen: list[lightws.Request] = []

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        seen.append(request)
        return echo_handshake(request, response)

    async with serve(handshake) as server:
        url = f"ws://127.0.0.1:{server.port}/"
        hdrs = [("X-A", "1"), ("X-A", "2"), ("User-Agent", "mine/1")]
        async with lightws.connect(url, headers=hdrs):
            pass
        async with lightws.connect(url, user_agent_header=None):
            pass
    assert seen[0].headers.get_all("X-A") == ["1", "2"]
    assert seen[0].headers["User-Agent"] == "mine/1"
    assert "User-Agent" not in seen[1].headers


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-WebSocket-Key": "x"},
        {"Upgrade": "h2c"},
        {"Sec-WebSocket-Protocol": "chat"},
        {"X-Bad": "a\r\nInjected: 1"},
        {"bad name": "x"},
    ],
)
async def test_invalid_or_reserved_headers_are_value_errors(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        await lightws.connect("ws://127.0.0.1:9/", headers=headers)


@pytest.mark.parametrize(
    "url", ["http://x/", "ws://", "ws://x:0/", "ws://x:99999/", "ws://u:p@x/", "ws://x/a b"]
)
async def test_malformed_urls_are_value_errors(url: str) -> None:
    with pytest.raises(ValueError):
        await lightws.connect(url)


async def test_compression_is_refused_until_deflate_exists() -> None:
    with pytest.raises(ValueError, match="permessage-deflate"):
        lightws.connect("ws://127.0.0.1:9/", compression="deflate")
    # None is accepted.
    assert lightws.connect("ws://127.0.0.1:9/", compression=None).url == "ws://127.0.0.1:9/"


async def test_a_refused_upgrade_raises_invalid_handshake_with_status_and_headers() -> None:
    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        response.status = 401
        response.headers["WWW-Authenticate"] = 'Bearer realm="x"'
        response.body = b"who are you?"
        return None

    async with serve(handshake) as server:
        with pytest.raises(lightws.InvalidHandshake) as info:
            await lightws.connect(f"ws://127.0.0.1:{server.port}/")
    exc = info.value
    assert isinstance(exc, lightws.LightwsError)
    assert exc.status == 401
    assert exc.reason == "Unauthorized"
    assert exc.headers["www-authenticate"] == 'Bearer realm="x"'
    assert exc.body == b"who are you?"
    assert "401" in str(exc)


async def test_a_refusal_from_websockets_and_a_plain_http_server() -> None:
    async def process_request(conn: ServerConnection, request: Any) -> Any:
        return conn.respond(403, "forbidden here\n")

    async with ws_serve(_websockets_echo, "127.0.0.1", 0, process_request=process_request) as s:
        port = s.sockets[0].getsockname()[1]
        with pytest.raises(lightws.InvalidHandshake) as info:
            await lightws.connect(f"ws://127.0.0.1:{port}/")
        assert info.value.status == 403
        assert info.value.body == b"forbidden here\n"

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="just http")

    app = web.Application()
    app.router.add_get("/", plain)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        with pytest.raises(lightws.InvalidHandshake) as info:
            await lightws.connect(f"ws://127.0.0.1:{port}/")
        assert info.value.status == 200
        assert info.value.body == b"just http"
    finally:
        await runner.cleanup()


async def test_open_timeout_bounds_a_server_that_never_answers() -> None:
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await lightws.connect(f"ws://127.0.0.1:{port}/", open_timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 3
    finally:
        silent.close()


async def test_connection_refused_is_an_os_error() -> None:
    with pytest.raises(ConnectionRefusedError):
        await lightws.connect(f"ws://127.0.0.1:{free_port()}/")


# ---- a raw server: the client's protocol rules -----------------------------------------------


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = False) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes | None]:
    """One client frame: (opcode, unmasked payload, masking key or None)."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    key = await reader.readexactly(4) if b1 & 0x80 else None
    data = await reader.readexactly(n)
    if key is not None:
        data = bytes(b ^ key[i % 4] for i, b in enumerate(data))
    return b0 & 0x0F, data, key


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(
    script: Script, *, accept: Callable[[str], str] = accept_for, extra: str = ""
) -> AsyncIterator[tuple[int, list[Any]]]:
    """A server that answers the upgrade (with ``accept(key)`` as the accept value),
    then runs ``script``. Yields its port and a list of what scripts record."""
    record: list[Any] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            m = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)\r$", head)
            key = m.group(1).decode() if m else ""
            record.append(head)
            writer.write(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept(key)}\r\n"
                    f"{extra}\r\n"
                ).encode()
            )
            await script(reader, writer, key)
        except Exception as exc:  # recorded for the test to look at
            record.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], record
    finally:
        server.close()


async def expect_close(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read client frames until its close; return (code, reason)."""
    while True:
        op, data, key = await read_frame(reader)
        assert key is not None, "client frames must be masked"
        if op == 8:
            code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
            return code, data[2:].decode()


async def test_the_clients_frames_are_masked_with_varying_keys() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, key: str) -> None:
        keys = []
        payloads = []
        for _ in range(20):
            op, data, mkey = await read_frame(r)
            keys.append(mkey)
            payloads.append((op, data))
        w.write(frame(9, b"ping!"))  # the client's pong must be masked too
        op, data, mkey = await read_frame(r)
        keys.append(mkey)
        payloads.append((op, data))
        code, _ = await expect_close(r)
        done.set_result((keys, payloads, code))

    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    async with raw_server(script) as (port, _):
        async with lightws.connect(f"ws://127.0.0.1:{port}/") as conn:
            for i in range(9):
                await conn.send(f"t{i}")
                await conn.send(bytes([i]) * 200)
            await conn.send("t9")
            # A frame fanned out by broadcast() is masked for a client connection too.
            assert lightws.broadcast([conn], b"fanned out") == 1
            await asyncio.sleep(0.1)  # the script answers our 20 frames with a ping
        keys, payloads, code = await asyncio.wait_for(done, 5)
    assert all(k is not None for k in keys)
    assert len(set(keys)) >= 20, "masking keys must not repeat frame to frame"
    assert payloads[0] == (1, b"t0")
    assert payloads[1] == (2, b"\x00" * 200)
    assert payloads[19] == (2, b"fanned out")
    assert payloads[-1] == (10, b"ping!")
    assert code == 1000


async def test_a_masked_server_frame_fails_the_connection_with_1002() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, key: str) -> None:
        w.write(frame(1, b"masked!", mask=True))
        record.append(await expect_close(r))

    async with raw_server(script) as (port, record):
        conn = await lightws.connect(f"ws://127.0.0.1:{port}/")
        with pytest.raises(lightws.ProtocolError) as info:
            await asyncio.wait_for(conn.recv(), 5)
        assert info.value.code == 1002
        await eventually(lambda: len(record) == 2)
    assert record[1][0] == 1002


async def test_invalid_utf8_from_the_server_fails_with_1007() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, key: str) -> None:
        w.write(frame(1, b"ok") + frame(1, b"\xff\xfe"))
        record.append(await expect_close(r))

    async with raw_server(script) as (port, record):
        conn = await lightws.connect(f"ws://127.0.0.1:{port}/")
        assert (await conn.recv()).text == "ok"
        with pytest.raises(lightws.ProtocolError) as info:
            await asyncio.wait_for(conn.recv(), 5)
        assert info.value.code == 1007
        await eventually(lambda: len(record) == 2)
    assert record[1][0] == 1007


@pytest.mark.parametrize(
    ("code", "reason", "exc", "echoed"),
    [
        (1000, "bye", lightws.ConnectionClosedOK, 1000),
        (1001, "", lightws.ConnectionClosedOK, 1001),
        (4001, "custom", lightws.ConnectionClosedError, 4001),
        (1011, "oops", lightws.ConnectionClosedError, 1011),
    ],
)
async def test_the_servers_close_code_is_reported_and_echoed(
    code: int, reason: str, exc: type[lightws.ConnectionClosed], echoed: int
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, key: str) -> None:
        w.write(frame(8, struct.pack("!H", code) + reason.encode()))
        record.append(await expect_close(r))

    async with raw_server(script) as (port, record):
        conn = await lightws.connect(f"ws://127.0.0.1:{port}/")
        with pytest.raises(exc) as info:
            await asyncio.wait_for(conn.recv(), 5)
        assert (info.value.code, info.value.reason) == (code, reason)
        await eventually(lambda: len(record) == 2)
        await eventually(lambda: conn.closed)
    assert record[1][0] == echoed
    assert conn.close_code == code


async def test_a_forbidden_close_code_from_the_server_is_a_protocol_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, key: str) -> None:
        w.write(frame(8, struct.pack("!H", 1005)))  # never sent on the wire (RFC 7.4.1)
        record.append(await expect_close(r))

    async with raw_server(script) as (port, record):
        conn = await lightws.connect(f"ws://127.0.0.1:{port}/")
        with pytest.raises(lightws.ProtocolError):
            await asyncio.wait_for(conn.recv(), 5)
        await eventually(lambda: len(record) == 2)
    assert record[1][0] == 1002


async def test_a_dropped_connection_is_1006() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, key: str) -> None:
        w.write(frame(1, b"last words"))
        await w.drain()

    async with raw_server(script) as (port, _):
        conn = await lightws.connect(f"ws://127.0.0.1:{port}/")
        assert (await conn.recv()).text == "last words"
        with pytest.raises(lightws.ConnectionClosedError) as info:
            await asyncio.wait_for(conn.recv(), 5)
        assert info.value.code == 1006


async def test_frames_sent_right_behind_the_101_are_not_lost() -> None:
    # The frames go out in the same write as the 101: they follow the response head in
    # the client's first read and belong to the session.
    first = frame(1, b"early") + frame(2, b"\x01\x02")

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)\r$", head)
        assert m is not None
        key = m.group(1).decode()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept_for(key)}\r\n\r\n".encode()
            + first
        )
        with contextlib.suppress(Exception):
            await expect_close(reader)
        writer.close()

    server = await asyncio.start_server(early, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with lightws.connect(f"ws://127.0.0.1:{port}/") as conn:
            assert (await conn.recv()).text == "early"
            assert (await conn.recv()).body == b"\x01\x02"
    finally:
        server.close()


@pytest.mark.parametrize(
    ("accept", "extra", "what"),
    [
        (lambda key: accept_for("dGhlIHNhbXBsZSBub25jZQ=="), "", "Sec-WebSocket-Accept"),
        (lambda key: "", "", "Sec-WebSocket-Accept"),
        (accept_for, "Sec-WebSocket-Protocol: unoffered\r\n", "subprotocol"),
        (accept_for, "Sec-WebSocket-Extensions: permessage-deflate\r\n", "extension"),
    ],
)
async def test_an_invalid_101_raises_invalid_handshake(
    accept: Callable[[str], str], extra: str, what: str
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, key: str) -> None:
        await asyncio.sleep(1)

    async with raw_server(script, accept=accept, extra=extra) as (port, _):
        with pytest.raises(lightws.InvalidHandshake, match=what) as info:
            await lightws.connect(f"ws://127.0.0.1:{port}/")
    assert info.value.status == 101
    assert info.value.headers["Upgrade"] == "websocket"


async def test_a_server_that_hangs_up_or_speaks_no_http_is_invalid_handshake() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.0\r\n\r\n")
        await asyncio.sleep(1)
        writer.close()

    for handler in (hang_up, garbage):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(lightws.InvalidHandshake) as info:
                await lightws.connect(f"ws://127.0.0.1:{port}/")
            assert info.value.status is None
        finally:
            server.close()


# ---- limits ----------------------------------------------------------------------------------


async def test_a_message_over_max_msg_len_closes_with_1009() -> None:
    closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def handler(conn: lightws.Connection) -> None:
        await conn.send(b"s" * 1000)
        await conn.send(b"b" * 1001)
        with contextlib.suppress(lightws.ConnectionClosed):
            await conn.recv()
        closed.set_result(conn.close_code)

    async with serve(lambda req, resp: handler) as server:
        conn = await lightws.connect(f"ws://127.0.0.1:{server.port}/", max_msg_len=1000)
        assert len((await conn.recv()).body) == 1000
        with pytest.raises(lightws.PayloadTooBig) as info:
            await conn.recv()
        assert info.value.code == 1009
        assert await asyncio.wait_for(closed, 5) == 1009


async def test_reader_streams_past_max_msg_len() -> None:
    async def handler(conn: lightws.Connection) -> None:
        await conn.recv()
        await conn.send(b"z" * 50_000)
        await conn.recv()

    async with serve(lambda req, resp: handler) as server:
        async with lightws.connect(f"ws://127.0.0.1:{server.port}/", max_msg_len=1000) as conn:
            total = 0
            reader = conn.reader()  # asks for the next message to be streamed
            await conn.send("go")
            async for chunk in reader:
                total += len(chunk)
            assert total == 50_000


# ---- cancellation loses nothing -------------------------------------------------------------


async def test_cancelled_receives_lose_no_message() -> None:
    n = 2000

    async def handler(conn: lightws.Connection) -> None:
        await conn.recv()
        for i in range(n):
            await conn.send(str(i))
            if i % 97 == 0:
                await asyncio.sleep(0.001)
        await conn.recv()

    async with serve(lambda req, resp: handler) as server:
        async with lightws.connect(f"ws://127.0.0.1:{server.port}/") as conn:
            await conn.send("go")
            got: list[int] = []
            timeouts = 0
            while len(got) < n:
                try:
                    msg = await asyncio.wait_for(conn.recv(), 0.0005)
                except asyncio.TimeoutError:
                    timeouts += 1
                    continue
                got.append(int(msg.text))
            assert got == list(range(n))
            assert timeouts > 0, "no receive was cancelled: the test proved nothing"


async def test_cancelled_sends_lose_nothing_and_keep_their_order() -> None:
    """A cancelled send() either went out whole or not at all (one still waiting
    behind a fragmented message when cancelled), never in part, and everything else
    arrives in order. A send that completed was sent."""
    received: list[bytes] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler(conn: lightws.Connection) -> None:
        async for msg in conn:
            received.append(msg.body)
            if msg.body == b"end":
                done.set_result(None)

    async with serve(lambda req, resp: handler, max_msg_len=8 << 20) as server:
        async with lightws.connect(f"ws://127.0.0.1:{server.port}/", write_limit=1024) as conn:
            sent: list[tuple[bytes, bool]] = []
            for i in range(30):
                body = bytes([i]) * (5000 if i % 3 else 100_000)
                task = asyncio.ensure_future(conn.send(body))
                await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                sent.append((body, not task.cancelled()))
            await conn.send(b"end")
            await asyncio.wait_for(done, 10)
    assert received[-1] == b"end"
    bodies = [b for b, _ in sent]
    # In order, each whole: the received messages are a subsequence of those sent.
    it = iter(bodies)
    assert all(any(r == b for b in it) for r in received[:-1])
    # Nothing that completed is missing; something was really cancelled.
    assert all(b in received for b, completed in sent if completed)
    assert any(not completed for _, completed in sent)


async def test_a_cancelled_connect_leaves_nothing_open() -> None:
    accepted = 0
    eof: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")  # the request; never answered
        eof.set_result(await reader.read())  # EOF once the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        task = asyncio.ensure_future(lightws.connect(f"ws://127.0.0.1:{port}/"))
        await eventually(lambda: accepted == 1)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(eof, 5) == b""
        await eventually(lambda: client_threads() == 0)
    finally:
        server.close()


# ---- automatic reconnection ------------------------------------------------------------------


async def test_the_iterator_reconnects_after_the_server_drops_the_connection() -> None:
    connections = 0

    async def handler(conn: lightws.Connection) -> None:
        nonlocal connections
        connections += 1
        await conn.send(f"hello {connections}")
        await conn.recv()
        conn.abort()  # drop it: no close frame

    async with serve(lambda req, resp: handler) as server:
        greetings = []
        async for conn in lightws.connect(f"ws://127.0.0.1:{server.port}/"):
            greetings.append((await conn.recv()).text)
            await conn.send("bye")
            with pytest.raises(lightws.ConnectionClosedError):
                await asyncio.wait_for(conn.recv(), 5)
            if len(greetings) == 3:
                break
    assert greetings == ["hello 1", "hello 2", "hello 3"]


async def test_the_iterator_backs_off_exponentially_while_the_server_refuses() -> None:
    attempts: list[float] = []

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        attempts.append(time.monotonic())
        if len(attempts) <= 4:
            response.status = 503
            return None
        return echo_handshake(request, response)

    async with serve(handshake) as server:
        client = lightws.connect(
            f"ws://127.0.0.1:{server.port}/",
            backoff_initial_delay=0.0,
            backoff_min_delay=0.1,
            backoff_factor=2.0,
            backoff_max_delay=10.0,
        )
        async for conn in client:
            await conn.send("made it")
            assert (await conn.recv()).text == "made it"
            break
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(gaps) == 4
    # 0 (random share of 0), then 0.1, 0.2, 0.4.
    assert gaps[0] < 0.09
    for gap, want in zip(gaps[1:], [0.1, 0.2, 0.4], strict=True):
        assert want * 0.9 <= gap < want + 0.5, gaps


async def test_the_iterator_raises_what_retrying_cannot_fix() -> None:
    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        response.status = 404
        return None

    async with serve(handshake) as server:
        with pytest.raises(lightws.InvalidHandshake) as info:
            async for _conn in lightws.connect(f"ws://127.0.0.1:{server.port}/"):
                pytest.fail("a 404 must not connect")
    assert info.value.status == 404


async def test_the_iterator_retries_a_refused_tcp_connection() -> None:
    port = free_port()
    # Nothing listens yet: the first attempts are refused; then a server appears.
    config = lightws.Config(addr=f"127.0.0.1:{port}", handshake=echo_handshake)

    async def start_later() -> lightws.Server:
        await asyncio.sleep(0.3)
        server = lightws.Server(config)
        await server.start()
        return server

    starter = asyncio.ensure_future(start_later())
    try:
        async for conn in lightws.connect(
            f"ws://127.0.0.1:{port}/", backoff_initial_delay=0.05, backoff_min_delay=0.05
        ):
            await conn.send("up")
            assert (await conn.recv()).text == "up"
            break
    finally:
        await (await starter).close()


# ---- lifetime --------------------------------------------------------------------------------


def client_threads() -> int:
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            names.append((task / "comm").read_text().strip())
    return sum(1 for n in names if n.startswith("lightws-client"))


async def test_the_client_runtime_stops_when_the_last_connection_closes() -> None:
    async with serve() as server:
        url = f"ws://127.0.0.1:{server.port}/"
        a = await lightws.connect(url)
        b = await lightws.connect(url)
        assert client_threads() == 1  # one I/O thread per loop, shared
        await a.close()
        await asyncio.sleep(0.05)
        assert client_threads() == 1
        await b.close()
        await eventually(lambda: client_threads() == 0)
        # And a new connection starts it again.
        async with lightws.connect(url) as c:
            await c.send("again")
            assert (await c.recv()).text == "again"
        await eventually(lambda: client_threads() == 0)


async def test_client_and_server_connections_talk_inside_one_process() -> None:
    """A lightws server whose handler is a lightws client of a second server (a proxy)."""
    async with serve() as upstream:

        async def proxy(conn: lightws.Connection) -> None:
            async with lightws.connect(f"ws://127.0.0.1:{upstream.port}/?reverse=1") as up:
                async for msg in conn:
                    await up.send(msg)
                    await conn.send(await up.recv())

        async with serve(lambda req, resp: proxy) as front:
            async with lightws.connect(f"ws://127.0.0.1:{front.port}/") as conn:
                await conn.send("abc")
                assert (await conn.recv()).text == "cba"


def test_a_loop_closed_with_client_connections_open_leaves_no_thread_behind() -> None:
    from websockets.sync.server import ServerConnection as SyncConnection
    from websockets.sync.server import serve as sync_serve

    def echo(ws: SyncConnection) -> None:
        with contextlib.suppress(Exception):
            for message in ws:
                ws.send(message)

    # A server on a thread of its own, so that it outlives the client's loops.
    with sync_serve(echo, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}/"

        async def leave_open() -> None:
            conn = await lightws.connect(url)
            await conn.send("x")
            assert (await conn.recv()).text == "x"
            # Not closed: the loop ends with the connection open.

        asyncio.run(leave_open())
        assert client_threads() == 1

        async def again() -> None:
            # Connecting from a new loop stops the closed loop's core first.
            async with lightws.connect(url) as conn:
                assert client_threads() == 1
                await conn.send("y")
                assert (await conn.recv()).text == "y"
            await eventually(lambda: client_threads() == 0)

        asyncio.run(again())
        server.shutdown()
        thread.join(5)
