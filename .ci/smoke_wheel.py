"""Smoke test of an installed lightws wheel (issue 15): does the binary work as shipped?

    python .ci/smoke_wheel.py [--tls-cli]

Run it with the Python of a venv into which the wheel was installed, from outside the
source tree (``.ci/run`` runs it from a temporary directory, with no Rust toolchain on
PATH). It needs only the standard library, the installed ``lightws`` and the
``openssl`` command (for a throwaway certificate): the WebSocket client below is a
minimal one written on asyncio streams, so the venv holds nothing but the wheel.

Checks: the import (from the venv, not the source tree, as an abi3 extension); echo
over ws:// and over wss:// against a ``lightws.Server`` in this process; the CLI demo
``python -m lightws echo`` (plain and TLS) as a subprocess, echoed through, then
stopped with SIGTERM and exiting 0. The last line is ``N passed, N failed``; the exit
status is 1 if any check failed.

Not collected by pytest (it lives in .ci/, outside ``testpaths``): the main suite
tests the editable build; this tests the wheel.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

TIMEOUT = 15.0
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE = 1, 2, 8


# ---- a minimal RFC 6455 client ------------------------------------------------------


class Client:
    """One WebSocket connection: upgrade, masked frames out, unmasked frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str = "/", tls: ssl.SSLContext | None = None) -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
            ),
            TIMEOUT,
        )
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET " + path.encode() + b" HTTP/1.1\r\n"
            b"Host: localhost\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status, *lines = head.decode("latin-1").split("\r\n")
        if not status.startswith("HTTP/1.1 101"):
            raise AssertionError(f"upgrade refused: {status!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise AssertionError(f"bad Sec-WebSocket-Accept: {headers!r}")
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def recv(self) -> tuple[int, bytes]:
        """One message: its opcode and payload, fragments joined (the server splits
        large messages into frames)."""

        async def read(n: int) -> bytes:
            return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

        opcode: int | None = None
        parts: list[bytes] = []
        while True:
            b0, b1 = await read(2)
            if b1 & 0x80:
                raise AssertionError("server frame is masked")
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await read(8))
            payload = await read(n)
            frame_op = b0 & 0x0F
            if opcode is None:
                if frame_op == 0:
                    raise AssertionError("continuation frame with no message started")
                opcode = frame_op
            elif frame_op != 0:
                raise AssertionError(f"opcode {frame_op} inside a fragmented message")
            parts.append(payload)
            if b0 & 0x80:
                return opcode, b"".join(parts)

    async def echo(self, opcode: int, payload: bytes) -> None:
        self.send(opcode, payload)
        got = await self.recv()
        if got != (opcode, payload):
            raise AssertionError(f"echo mismatch: sent {len(payload)} bytes, got {got!r:.80}")

    async def close(self) -> None:
        """Close with 1000 and expect the server's 1000 back, then EOF."""
        self.send(CLOSE, struct.pack("!H", 1000))
        opcode, payload = await self.recv()
        if opcode != CLOSE or payload[:2] != struct.pack("!H", 1000):
            raise AssertionError(f"expected close 1000, got {opcode} {payload!r}")
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass  # the server may drop TCP right after its close frame


async def echo_round(port: int, tls: ssl.SSLContext | None = None) -> None:
    """Text, a 300 KiB binary message and a clean close over one connection."""
    client = await Client.connect(port, tls=tls)
    await client.echo(TEXT, "héllo wheel".encode())
    await client.echo(BINARY, os.urandom(300 << 10))
    await client.close()


# ---- certificates, processes --------------------------------------------------------


def make_cert(directory: Path) -> tuple[str, str]:
    """A self-signed EC certificate for localhost/127.0.0.1 (the client's only anchor)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def client_tls(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)  # verifies chain and host name
    return ctx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def run_cli(extra: list[str], talk: Callable[[int], Awaitable[None]], workdir: Path) -> None:
    """``python -m lightws echo`` on a free port: wait for its banner, ``talk`` to it,
    SIGTERM it and require exit status 0."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lightws", "echo", "--addr", f"127.0.0.1:{port}", *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        cwd=workdir,
    )  # fmt: skip
    assert proc.stdout is not None
    output = b""
    try:
        while str(port).encode() not in output:
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
            if not line:
                raise AssertionError(f"CLI exited before listening: {output.decode()!r}")
            output += line
        await talk(port)
        proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        output += rest
        if proc.returncode != 0:
            raise AssertionError(f"exit status {proc.returncode}: {output.decode()!r}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- the checks ---------------------------------------------------------------------


def check_import() -> None:
    import lightws
    from lightws import _lightws

    ext = Path(_lightws.__file__ or "")
    print(f"  lightws {lightws.__version__} from {Path(lightws.__file__ or '').parent}")
    print(f"  extension {ext.name}")
    if Path(sys.prefix).resolve() not in Path(lightws.__file__ or "").resolve().parents:
        raise AssertionError(f"lightws was imported from outside {sys.prefix}")
    if not ext.name.endswith(".abi3.so"):
        raise AssertionError(f"not an abi3 extension: {ext.name}")
    for name in ("Server", "Config", "Connection", "Message", "run"):
        if not hasattr(lightws, name):
            raise AssertionError(f"lightws.{name} is missing")


async def serve_echo(tls: tuple[str, str] | None) -> None:
    import lightws

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        async def handler(conn: lightws.Connection) -> None:
            async for msg in conn:
                await conn.send(lightws.Message(msg.opcode, msg.body))

        return handler

    cert, key = tls if tls else (None, None)
    config = lightws.Config(addr="127.0.0.1:0", handshake=handshake, cert_file=cert, key_file=key)
    async with lightws.Server(config) as server:
        await echo_round(server.port, client_tls(cert) if cert else None)
        stats = server.stats()
    if stats.handshakes != 1:
        raise AssertionError(f"expected 1 handshake in stats(), got {stats.handshakes}")


def main() -> int:
    if Path.cwd().resolve() == Path(__file__).resolve().parent.parent:
        print("run this from outside the source tree, or it may import python/lightws")
        return 2
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"cargo on PATH: {shutil.which('cargo') or 'no'}; rustc: {shutil.which('rustc') or 'no'}")
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="lightws-smoke-") as tmp:
        workdir = Path(tmp)
        cert_key = make_cert(workdir)
        cafile = cert_key[0]
        checks: list[tuple[str, Callable[[], Any]]] = [
            ("import", check_import),
            ("echo ws:// (lightws.Server)", lambda: asyncio.run(serve_echo(None))),
            ("echo wss:// (lightws.Server, TLS)", lambda: asyncio.run(serve_echo(cert_key))),
            (
                "CLI: python -m lightws echo, SIGTERM -> exit 0",
                lambda: asyncio.run(run_cli([], echo_round, workdir)),
            ),
            (
                "CLI over TLS: --cert/--key, SIGTERM -> exit 0",
                lambda: asyncio.run(
                    run_cli(
                        ["--cert", cert_key[0], "--key", cert_key[1]],
                        lambda port: echo_round(port, client_tls(cafile)),
                        workdir,
                    )
                ),
            ),
        ]
        for name, check in checks:
            start = time.monotonic()
            try:
                check()
            except Exception:
                failed += 1
                print(f"FAIL {name}")
                traceback.print_exc(file=sys.stdout)
            else:
                passed += 1
                print(f"ok   {name} ({time.monotonic() - start:.2f} s)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
