"""TLS (wss://): real clients, SNI, versions, hostile and slow peers, startup errors, reload.

Certificates come from a throwaway trustme CA; every client trusts only that CA and
checks the host name, so a test passes only if the server presents the right chain.
Servers listen on 127.0.0.1 and clients pick the certificate with ``server_hostname``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import lightws
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from support import echo_handshake, eventually, free_port, run_lightws
from support.demos import start_demo
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidMessage

# A fresh CA per test would cost a key generation each; one per module is enough
# because every test issues its own leaves.
CA = trustme.CA()


# ---- helpers -------------------------------------------------------------------------


def write_pair(
    directory: Path,
    stem: str,
    leaf: trustme.LeafCert,
    key_format: str = "pkcs8",
) -> tuple[str, str]:
    """Write ``leaf``'s chain and key as PEM files; return their paths.

    ``key_format`` "pkcs8" writes "BEGIN PRIVATE KEY"; "traditional" writes PKCS#1
    "BEGIN RSA PRIVATE KEY" for RSA keys or SEC1 "BEGIN EC PRIVATE KEY" for EC keys.
    """
    cert = directory / f"{stem}.crt"
    key = directory / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    parsed = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    key.write_bytes(
        parsed.private_bytes(
            serialization.Encoding.PEM,
            {
                "pkcs8": serialization.PrivateFormat.PKCS8,
                "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
            }[key_format],
            serialization.NoEncryption(),
        )
    )
    return str(cert), str(key)


def client_context(
    version: ssl.TLSVersion | None = None, alpn: list[str] | None = None
) -> ssl.SSLContext:
    """A client context that trusts only the test CA; ``version`` pins min = max."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    CA.configure_trust(ctx)
    if version is not None:
        ctx.minimum_version = version
        ctx.maximum_version = version
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def sans(ssl_object: Any) -> list[str]:
    """DNS names in the peer certificate's SubjectAltName."""
    cert = ssl_object.getpeercert()
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


def wss(server: lightws.Server, path: str = "/") -> str:
    return f"wss://127.0.0.1:{server.port}{path}"


@contextlib.asynccontextmanager
async def tls_server(
    cert_file: str, key_file: str, handshake: Any = None, **config: Any
) -> AsyncIterator[lightws.Server]:
    config.setdefault("addr", "127.0.0.1:0")
    cfg = lightws.Config(
        handshake=handshake or echo_handshake, cert_file=cert_file, key_file=key_file, **config
    )
    async with lightws.Server(cfg) as server:
        yield server


@contextlib.asynccontextmanager
async def wss_client(
    server: lightws.Server, name: str = "a.test", ctx: ssl.SSLContext | None = None
) -> AsyncIterator[ClientConnection]:
    async with connect(
        wss(server),
        ssl=ctx or client_context(),
        server_hostname=name,
        open_timeout=10,
        max_size=None,
    ) as ws:
        yield ws


def ssl_object(ws: ClientConnection) -> Any:
    return ws.transport.get_extra_info("ssl_object")


async def echo_once(ws: ClientConnection, message: str | bytes = "ping over tls") -> None:
    await ws.send(message)
    assert await asyncio.wait_for(ws.recv(), 10) == message


async def read_until_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes; fails if it does not close in time.

    A reset counts as closed: the server may close with unread client bytes pending,
    and the kernel then answers with RST instead of FIN.
    """

    async def drain() -> bytes:
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                received += chunk
        return received

    return await asyncio.wait_for(drain(), timeout)


def client_hello(name: str = "a.test") -> tuple[ssl.SSLObject, ssl.MemoryBIO, bytes]:
    """A memory-BIO TLS client and the ClientHello bytes it wants to send."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, incoming, outgoing.read()


async def raw_tls_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = "a.test"
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Complete a TLS handshake by hand over a plain stream (so raw bytes can follow)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(incoming, outgoing, server_hostname=name)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            writer.write(outgoing.read())
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "server closed during the TLS handshake"
            incoming.write(data)
    writer.write(outgoing.read())
    return obj, incoming, outgoing


@pytest.fixture
def pair_a(tmp_path: Path) -> tuple[str, str]:
    return write_pair(tmp_path, "a", CA.issue_cert("a.test", "www.a.test"))


@pytest.fixture
async def server_a(pair_a: tuple[str, str]) -> AsyncIterator[lightws.Server]:
    async with tls_server(*pair_a, max_msg_len=4 << 20, handshake_read_timeout=30) as server:
        yield server


# ---- echo with real clients ----------------------------------------------------------

SIZES = [0, 64, 1 << 20]
SIZE_IDS = ["0", "64", "1MiB"]


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
async def test_websockets_client_echoes_over_tls(server_a: lightws.Server, size: int) -> None:
    assert server_a._require_core().tls
    text = "é" * (size // 2)
    data = os.urandom(size)
    async with wss_client(server_a) as ws:
        await echo_once(ws, text)
        await echo_once(ws, data)
        assert ssl_object(ws).selected_alpn_protocol() in (None, "http/1.1")
    assert ws.close_code == 1000


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
async def test_aiohttp_client_echoes_over_tls(server_a: lightws.Server, size: int) -> None:
    text = "€" * (size // 3)
    data = os.urandom(size)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            wss(server_a), ssl=client_context(), server_hostname="a.test", max_msg_size=0
        ) as ws:
            assert sans(ws.get_extra_info("ssl_object")) == ["a.test", "www.a.test"]
            await ws.send_str(text)
            assert await ws.receive_str(timeout=10) == text
            await ws.send_bytes(data)
            assert await ws.receive_bytes(timeout=10) == data
            await ws.close()
            assert ws.close_code == 1000


async def test_message_over_max_msg_len_is_refused_over_tls(pair_a: tuple[str, str]) -> None:
    async with tls_server(*pair_a, max_msg_len=1000) as server:
        async with wss_client(server) as ws:
            await ws.send(b"x" * 1001)
            await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1009


async def test_many_concurrent_tls_clients_on_two_threads(pair_a: tuple[str, str]) -> None:
    async with tls_server(*pair_a, threads=2, handshake_read_timeout=30) as server:

        async def one(i: int) -> None:
            async with wss_client(server) as ws:
                for j in range(5):
                    await echo_once(ws, f"{i}:{j}")

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), 60)
        await eventually(lambda: server.stats().connections == 0)
        assert server.stats().handshakes >= 40


# ---- SNI -----------------------------------------------------------------------------


@pytest.fixture
async def two_cert_server(tmp_path: Path) -> AsyncIterator[lightws.Server]:
    a_crt, a_key = write_pair(tmp_path, "a", CA.issue_cert("a.test"))
    b_crt, b_key = write_pair(tmp_path, "b", CA.issue_cert("b.test", "*.b.test"))
    async with tls_server(f"{a_crt},{b_crt}", f"{a_key},{b_key}") as server:
        yield server


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.test", ["a.test"]),
        ("b.test", ["b.test", "*.b.test"]),
        ("api.b.test", ["b.test", "*.b.test"]),
    ],
)
async def test_sni_selects_the_certificate_per_server_hostname(
    two_cert_server: lightws.Server, name: str, expected: list[str]
) -> None:
    async with wss_client(two_cert_server, name) as ws:
        assert sans(ssl_object(ws)) == expected
        await echo_once(ws)


async def test_sni_selection_with_aiohttp(two_cert_server: lightws.Server) -> None:
    async with aiohttp.ClientSession() as session:
        for name, expected in [("b.test", "b.test"), ("a.test", "a.test")]:
            async with session.ws_connect(
                wss(two_cert_server), ssl=client_context(), server_hostname=name
            ) as ws:
                assert sans(ws.get_extra_info("ssl_object"))[0] == expected
                await ws.send_str(name)
                assert await ws.receive_str(timeout=10) == name


@pytest.mark.parametrize("name", ["", "unknown.test"], ids=["no-sni", "unknown-name"])
async def test_without_a_matching_name_the_first_certificate_is_served(
    two_cert_server: lightws.Server, name: str
) -> None:
    ctx = client_context()
    ctx.check_hostname = False  # the served name cannot match; the chain is still checked
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", two_cert_server.port, ssl=ctx, server_hostname=name),
        10,
    )
    try:
        assert sans(writer.get_extra_info("ssl_object")) == ["a.test"]
    finally:
        writer.close()


# ---- protocol versions and ALPN ------------------------------------------------------


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
async def test_tls12_only_and_tls13_only_clients_work(
    server_a: lightws.Server, version: ssl.TLSVersion
) -> None:
    ctx = client_context(version, alpn=["http/1.1"])
    async with wss_client(server_a, ctx=ctx) as ws:
        obj = ssl_object(ws)
        assert obj.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
        assert obj.selected_alpn_protocol() == "http/1.1"
        await echo_once(ws, os.urandom(100_000))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls11_client_is_refused(server_a: lightws.Server) -> None:
    ctx = client_context()
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):  # pragma: no cover - OpenSSL built without 1.1
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", server_a.port, ssl=ctx, server_hostname="a.test"),
            10,
        )
    async with wss_client(server_a) as ws:
        await echo_once(ws)


async def test_client_offering_only_h2_is_refused_then_http11_works(
    server_a: lightws.Server,
) -> None:
    with pytest.raises(ssl.SSLError, match=r"(?i)no.application.protocol"):
        await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                server_a.port,
                ssl=client_context(alpn=["h2"]),
                server_hostname="a.test",
            ),
            10,
        )
    async with wss_client(server_a, ctx=client_context(alpn=["h2", "http/1.1"])) as ws:
        assert ssl_object(ws).selected_alpn_protocol() == "http/1.1"
        await echo_once(ws)


# ---- hostile and broken peers --------------------------------------------------------


async def test_plain_websocket_client_on_the_tls_port_fails_cleanly(
    server_a: lightws.Server,
) -> None:
    start = time.monotonic()
    with pytest.raises((InvalidMessage, ConnectionError, EOFError)):
        async with connect(f"ws://127.0.0.1:{server_a.port}/", open_timeout=10):
            pass
    # Refused at once, not left to the (30 s) handshake timeout.
    assert time.monotonic() - start < 5
    async with wss_client(server_a) as ws:
        await echo_once(ws)
    await eventually(lambda: server_a.stats().connections == 0)


async def test_plain_http_request_on_the_tls_port_is_dropped(server_a: lightws.Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server_a.port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    received = await read_until_eof(reader, 5)
    writer.close()
    # Whatever comes back (at most a TLS alert) is no HTTP response.
    assert b"HTTP/1.1" not in received
    async with wss_client(server_a) as ws:
        await echo_once(ws)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,
        b"\xff\xfe\xfd" * 1000,
        b"\x16\x03\x01\x00\x05hello",  # a handshake record holding no valid message
        b"\x17\x03\x03\x00\x10" + b"\x00" * 16,  # application data before any handshake
        bytes(range(256)) * 8,
    ],
    ids=["zeros", "ff-fe-fd", "bad-handshake-record", "early-appdata", "all-bytes"],
)
async def test_raw_garbage_stream_is_dropped_and_server_keeps_serving(
    server_a: lightws.Server, garbage: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server_a.port)
    writer.write(garbage)
    await read_until_eof(reader, 5)
    writer.close()
    async with wss_client(server_a) as ws:
        await echo_once(ws)
    await eventually(lambda: server_a.stats().connections == 0)


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * 64, os.urandom(4096), b"\x15\x03\x03\x00\x02\x02\xff"],
    ids=["zeros", "random", "unknown-alert"],
)
async def test_garbage_after_client_hello_is_dropped(
    server_a: lightws.Server, garbage: bytes
) -> None:
    _, _, hello = client_hello()
    reader, writer = await asyncio.open_connection("127.0.0.1", server_a.port)
    writer.write(hello + garbage)
    await read_until_eof(reader, 5)
    writer.close()
    async with wss_client(server_a) as ws:
        await echo_once(ws)


async def test_garbage_records_after_the_handshake_are_dropped(server_a: lightws.Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server_a.port)
    await raw_tls_handshake(reader, writer)
    # A well-formed application-data record whose ciphertext cannot authenticate.
    writer.write(b"\x17\x03\x03\x01\x00" + os.urandom(256))
    await read_until_eof(reader, 5)
    writer.close()
    async with wss_client(server_a) as ws:
        await echo_once(ws)
    await eventually(lambda: server_a.stats().connections == 0)


async def test_tls_client_closing_mid_handshake_does_not_disturb_others(
    server_a: lightws.Server,
) -> None:
    async with wss_client(server_a) as ws:
        for _ in range(5):
            _, _, hello = client_hello()
            reader, writer = await asyncio.open_connection("127.0.0.1", server_a.port)
            writer.write(hello)
            await reader.read(1)  # the server answered with its first flight
            writer.transport.abort()
            await echo_once(ws)
    await eventually(lambda: server_a.stats().connections == 0)


# ---- slow clients --------------------------------------------------------------------

SLOW_TIMEOUT = 0.5


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    pass


async def _hello_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(client_hello()[2])


async def _tls_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await raw_tls_handshake(reader, writer)


async def _tls_then_partial_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    obj, _, outgoing = await raw_tls_handshake(reader, writer)
    obj.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n")
    writer.write(outgoing.read())


@pytest.mark.parametrize(
    "behaviour",
    [_silent, _hello_only, _tls_then_silent, _tls_then_partial_request],
    ids=["sends-nothing", "client-hello-only", "tls-then-nothing", "tls-then-half-request"],
)
async def test_slow_tls_client_is_cut_off_at_handshake_read_timeout(
    pair_a: tuple[str, str],
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> None:
    async with tls_server(*pair_a, handshake_read_timeout=SLOW_TIMEOUT) as server:
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await behaviour(reader, writer)
        await read_until_eof(reader, SLOW_TIMEOUT + 5)
        elapsed = time.monotonic() - start
        writer.close()
        # The deadline runs from accept and covers TLS and the HTTP request together.
        assert SLOW_TIMEOUT - 0.1 <= elapsed < SLOW_TIMEOUT + 2, elapsed
        await eventually(lambda: server.stats().connections == 0)
        async with wss_client(server) as ws:
            await echo_once(ws)


async def test_many_idle_tls_sockets_do_not_block_new_clients(pair_a: tuple[str, str]) -> None:
    async with tls_server(*pair_a, handshake_read_timeout=SLOW_TIMEOUT) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(50)]
        async with wss_client(server) as ws:
            await echo_once(ws)
        for reader, writer in idle:
            await read_until_eof(reader, SLOW_TIMEOUT + 5)
            writer.close()


# ---- startup errors ------------------------------------------------------------------


async def start_fails(expected: type[Exception], **tls: Any) -> Exception:
    """Start a server with ``tls`` settings; it must raise ``expected`` and never listen."""
    port = free_port()
    server = lightws.Server(
        lightws.Config(addr=f"127.0.0.1:{port}", handshake=echo_handshake, **tls)
    )
    with pytest.raises(expected) as info:
        await server.start()
    assert not server.is_serving
    with pytest.raises(ConnectionRefusedError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
    return info.value


async def test_missing_certificate_file_is_an_os_error_naming_it(
    tmp_path: Path, pair_a: tuple[str, str]
) -> None:
    missing = str(tmp_path / "missing.crt")
    err = await start_fails(OSError, cert_file=missing, key_file=pair_a[1])
    assert missing in str(err)


async def test_missing_key_file_is_an_os_error_naming_it(
    tmp_path: Path, pair_a: tuple[str, str]
) -> None:
    missing = str(tmp_path / "missing.key")
    err = await start_fails(OSError, cert_file=pair_a[0], key_file=missing)
    assert missing in str(err)


async def test_unreadable_certificate_file_is_an_os_error_naming_it(
    tmp_path: Path, pair_a: tuple[str, str]
) -> None:
    # A directory cannot be read as a file even by root (chmod 000 would not stop root).
    directory = tmp_path / "a-directory.crt"
    directory.mkdir()
    err = await start_fails(OSError, cert_file=str(directory), key_file=pair_a[1])
    assert str(directory) in str(err)


async def test_missing_second_file_of_a_list_is_an_os_error_naming_it(
    tmp_path: Path, pair_a: tuple[str, str]
) -> None:
    missing = str(tmp_path / "b.crt")
    err = await start_fails(
        OSError, cert_file=f"{pair_a[0]},{missing}", key_file=f"{pair_a[1]},{pair_a[1]}"
    )
    assert missing in str(err)


async def test_file_without_a_certificate_is_a_value_error(
    tmp_path: Path, pair_a: tuple[str, str]
) -> None:
    err = await start_fails(ValueError, cert_file=pair_a[1], key_file=pair_a[1])
    assert "no certificate" in str(err) and pair_a[1] in str(err)
    text = tmp_path / "text.crt"
    text.write_text("not a certificate at all\n")
    await start_fails(ValueError, cert_file=str(text), key_file=pair_a[1])


async def test_file_without_a_key_is_a_value_error(pair_a: tuple[str, str]) -> None:
    err = await start_fails(ValueError, cert_file=pair_a[0], key_file=pair_a[0])
    assert "no private key" in str(err) and pair_a[0] in str(err)


async def test_key_not_matching_the_certificate_is_a_value_error(tmp_path: Path) -> None:
    a_crt, _ = write_pair(tmp_path, "a", CA.issue_cert("a.test"))
    _, b_key = write_pair(tmp_path, "b", CA.issue_cert("b.test"))
    err = await start_fails(ValueError, cert_file=a_crt, key_file=b_key)
    assert "does not match" in str(err)
    assert a_crt in str(err) and b_key in str(err)


@pytest.mark.parametrize(("n_certs", "n_keys"), [(2, 1), (1, 2), (3, 2)])
async def test_mismatched_list_lengths_are_a_value_error(
    pair_a: tuple[str, str], n_certs: int, n_keys: int
) -> None:
    crt, key = pair_a
    err = await start_fails(
        ValueError, cert_file=",".join([crt] * n_certs), key_file=",".join([key] * n_keys)
    )
    assert f"{n_certs} certificates vs {n_keys} keys" in str(err)


async def test_empty_path_in_a_list_is_a_value_error(pair_a: tuple[str, str]) -> None:
    crt, key = pair_a
    await start_fails(ValueError, cert_file=f"{crt},", key_file=f"{key},{key}")


async def test_certificate_without_key_is_a_value_error(pair_a: tuple[str, str]) -> None:
    err = await start_fails(ValueError, cert_file=pair_a[0])
    assert "key_file" in str(err)


async def test_key_without_certificate_is_a_value_error(pair_a: tuple[str, str]) -> None:
    err = await start_fails(ValueError, key_file=pair_a[1])
    assert "cert_file" in str(err)


async def test_serve_tls_requires_a_certificate() -> None:
    server = lightws.Server(lightws.Config(addr="127.0.0.1:0", handshake=echo_handshake))
    with pytest.raises(ValueError, match="cert_file"):
        await server.serve_tls()
    assert not server.is_serving


async def test_serve_tls_serves_wss(pair_a: tuple[str, str]) -> None:
    server = lightws.Server(
        lightws.Config(
            addr="127.0.0.1:0", handshake=echo_handshake, cert_file=pair_a[0], key_file=pair_a[1]
        )
    )
    task = asyncio.ensure_future(server.serve_tls())
    try:
        await eventually(lambda: server.is_serving)
        async with wss_client(server) as ws:
            await echo_once(ws)
    finally:
        await server.close()
        await asyncio.wait_for(task, 10)


async def test_reload_on_a_plain_server_raises() -> None:
    async with lightws.Server(
        lightws.Config(addr="127.0.0.1:0", handshake=echo_handshake)
    ) as server:
        with pytest.raises(RuntimeError, match="TLS"):
            await server.reload_certificates()


# ---- key types and encodings ---------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "key_format", "pem_label"),
    [
        (trustme.KeyType.ECDSA, "pkcs8", b"BEGIN PRIVATE KEY"),
        (trustme.KeyType.ECDSA, "traditional", b"BEGIN EC PRIVATE KEY"),
        (trustme.KeyType.RSA, "pkcs8", b"BEGIN PRIVATE KEY"),
        (trustme.KeyType.RSA, "traditional", b"BEGIN RSA PRIVATE KEY"),
    ],
    ids=["ec-pkcs8", "ec-sec1", "rsa-pkcs8", "rsa-pkcs1"],
)
async def test_key_encodings(
    tmp_path: Path, key_type: trustme.KeyType, key_format: str, pem_label: bytes
) -> None:
    leaf = CA.issue_cert("a.test", key_type=key_type)
    crt, key = write_pair(tmp_path, "a", leaf, key_format)
    assert pem_label in Path(key).read_bytes()
    async with tls_server(crt, key) as server:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            async with wss_client(server, ctx=client_context(version)) as ws:
                await echo_once(ws)


async def test_combined_certificate_and_key_file(tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    CA.issue_cert("a.test").private_key_and_cert_chain_pem.write_to_path(str(both))
    async with tls_server(str(both), str(both)) as server:
        async with wss_client(server) as ws:
            await echo_once(ws)


async def test_certificate_chain_through_an_intermediate(tmp_path: Path) -> None:
    intermediate = CA.create_child_ca()
    leaf = intermediate.issue_cert("a.test")
    assert len(leaf.cert_chain_pems) == 2  # leaf + intermediate; the client trusts only CA
    crt, key = write_pair(tmp_path, "a", leaf)
    async with tls_server(crt, key) as server:
        async with wss_client(server) as ws:
            await echo_once(ws)


# ---- certificate reload --------------------------------------------------------------


def peer_der(ws: ClientConnection) -> bytes:
    der: bytes = ssl_object(ws).getpeercert(binary_form=True)
    return der


async def test_reload_serves_the_new_certificate_and_keeps_open_connections(
    tmp_path: Path,
) -> None:
    old_leaf = CA.issue_cert("a.test")
    new_leaf = CA.issue_cert("a.test", key_type=trustme.KeyType.RSA)
    crt, key = write_pair(tmp_path, "a", old_leaf)
    async with tls_server(crt, key) as server:
        async with wss_client(server) as old:
            old_der = peer_der(old)
            await echo_once(old, "before reload")

            write_pair(tmp_path, "a", new_leaf, "traditional")
            await server.reload_certificates()

            await echo_once(old, "after reload, same connection")
            async with wss_client(server) as new:
                new_der = peer_der(new)
                assert new_der != old_der
                await echo_once(new)

            # A failing reload raises and the last good certificate stays in use.
            write_pair(tmp_path, "a", old_leaf)
            Path(key).write_bytes(new_leaf.private_key_pem.bytes())  # key of the other cert
            with pytest.raises(ValueError, match="does not match"):
                await server.reload_certificates()
            Path(key).unlink()
            with pytest.raises(OSError, match=r"a\.key"):
                await server.reload_certificates()
            async with wss_client(server) as kept:
                assert peer_der(kept) == new_der
                await echo_once(kept)

            await echo_once(old, "old connection survived every reload")
            assert peer_der(old) == old_der


async def test_reload_with_sni_pairs(tmp_path: Path) -> None:
    a_crt, a_key = write_pair(tmp_path, "a", CA.issue_cert("a.test"))
    b_crt, b_key = write_pair(tmp_path, "b", CA.issue_cert("b.test"))
    async with tls_server(f"{a_crt},{b_crt}", f"{a_key},{b_key}") as server:
        # Swap what b's files hold: after reload b.test is served the new names.
        write_pair(tmp_path, "b", CA.issue_cert("b.test", "new.b.test"))
        await server.reload_certificates()
        async with wss_client(server, "new.b.test") as ws:
            assert sans(ssl_object(ws)) == ["b.test", "new.b.test"]
        async with wss_client(server, "a.test") as ws:
            assert sans(ssl_object(ws)) == ["a.test"]


# ---- command line --------------------------------------------------------------------


@pytest.mark.asyncio_loop_only
async def test_cli_echo_with_cert_and_key_serves_wss(pair_a: tuple[str, str]) -> None:
    echo = await start_demo("echo", "--cert", pair_a[0], "--key", pair_a[1], ready="listening on")
    try:
        assert f"wss://127.0.0.1:{echo.port}/" in echo.banner
        async with connect(
            f"wss://127.0.0.1:{echo.port}/?reverse=1",
            ssl=client_context(),
            server_hostname="a.test",
            open_timeout=10,
        ) as ws:
            await ws.send("stressed")
            assert await asyncio.wait_for(ws.recv(), 5) == "desserts"
        echo.proc.send_signal(signal.SIGTERM)
        assert await echo.proc.afinish(10) == 0
    finally:
        await echo.stop()


def test_cli_with_a_missing_certificate_exits_nonzero_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.crt")
    result = run_lightws("echo", "--addr", "127.0.0.1:0", "--cert", missing, "--key", missing)
    assert result.returncode != 0
    assert missing in result.stdout + result.stderr
