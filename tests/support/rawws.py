"""A deliberately permissive WebSocket client built on asyncio streams.

Real clients refuse to send malformed frames, so the protocol tests use this one:
it writes whatever frame it is told to (any FIN/RSV/opcode, masked or not, a
declared length that differs from the payload) and parses what the server sends
back, checking that server frames are well formed (unmasked, RSV clear, RFC 6455
section 5.2).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import struct

__all__ = [
    "BINARY",
    "CLOSE",
    "CONT",
    "PING",
    "PONG",
    "TEXT",
    "Frame",
    "HttpResponse",
    "RawWebSocket",
    "accept_key",
    "build_frame",
    "close_payload",
    "http_exchange",
    "upgrade_request",
]

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TIMEOUT = 5.0


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a given Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def upgrade_request(
    path: str = "/",
    *,
    host: str = "127.0.0.1",
    key: str | None = None,
    extra: list[tuple[str, str]] | None = None,
    omit: tuple[str, ...] = (),
    method: str = "GET",
    version: str = "13",
) -> bytes:
    """A valid upgrade request, optionally with headers removed or added."""
    headers = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key or new_key()),
        ("Sec-WebSocket-Version", version),
    ]
    omitted = {name.lower() for name in omit}
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in omitted]
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv1: bool = False,
    rsv2: bool = False,
    rsv3: bool = False,
    mask: bool = True,
    mask_key: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """Encode one frame. ``length`` overrides the declared payload length."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | (0x20 if rsv2 else 0)
    first |= (0x10 if rsv3 else 0) | (opcode & 0x0F)
    n = len(payload) if length is None else length
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not mask:
        return head + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    return head + key + apply_mask(payload, key)


def apply_mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    n = len(data)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else struct.pack("!H", code) + reason


@dataclasses.dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8")


@dataclasses.dataclass
class HttpResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def parse_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    assert version.startswith("HTTP/1."), lines[0]
    headers = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
    return int(status), (reason[0] if reason else ""), headers


async def read_response(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> HttpResponse:
    """Read an HTTP response; the body is read by Content-Length, else to EOF."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status, reason, headers = parse_head(head[:-4])
    response = HttpResponse(status, reason, headers, b"")
    if status == 101:
        return response
    length = response.header("Content-Length")
    if length is not None:
        response.body = await asyncio.wait_for(reader.readexactly(int(length)), timeout)
    else:
        response.body = await asyncio.wait_for(reader.read(), timeout)
    return response


async def http_exchange(port: int, request: bytes, timeout: float = TIMEOUT) -> HttpResponse:
    """Send raw bytes to the server and parse the HTTP response it answers with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await read_response(reader, timeout)
    finally:
        writer.close()


class RawWebSocket:
    """An open, upgraded connection speaking raw frames."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: HttpResponse,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.response = response

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/",
        *,
        first_bytes: bytes = b"",
        timeout: float = TIMEOUT,
        **request_kwargs: object,
    ) -> RawWebSocket:
        """Upgrade a fresh TCP connection; ``first_bytes`` go in the same write."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        key = new_key()
        request = upgrade_request(path, key=key, **request_kwargs)  # type: ignore[arg-type]
        writer.write(request + first_bytes)
        await writer.drain()
        response = await read_response(reader, timeout)
        if response.status != 101:
            writer.close()
            raise AssertionError(f"expected 101, got {response.status}: {response.body!r}")
        assert response.header("Sec-WebSocket-Accept") == accept_key(key)
        return cls(reader, writer, response)

    async def __aenter__(self) -> RawWebSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1)
        except (OSError, asyncio.TimeoutError):
            pass

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, opcode: int, payload: bytes = b"", **kwargs: object) -> None:
        await self.write(build_frame(opcode, payload, **kwargs))  # type: ignore[arg-type]

    async def send_close(self, code: int | None = 1000, reason: bytes = b"") -> None:
        await self.send_frame(CLOSE, close_payload(code, reason))

    async def recv_frame(self, timeout: float = TIMEOUT) -> Frame:
        """Read one server frame, checking it is well formed."""
        return await asyncio.wait_for(self._recv_frame(), timeout)

    async def _recv_frame(self) -> Frame:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        masked = bool(b1 & 0x80)
        key = await self.reader.readexactly(4) if masked else b""
        payload = await self.reader.readexactly(n)
        if masked:
            payload = apply_mask(payload, key)
        frame = Frame(bool(b0 & 0x80), (b0 >> 4) & 0x7, b0 & 0x0F, masked, payload)
        # RFC 6455 5.1: a server must not mask; 5.2: RSV must be 0 without extensions.
        assert not frame.masked, f"server sent a masked frame: {frame}"
        assert frame.rsv == 0, f"server set RSV bits: {frame}"
        return frame

    async def recv_message(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """Next data message (reassembled), skipping control frames other than close."""

        async def inner() -> tuple[int, bytes]:
            opcode, parts = None, []
            while True:
                frame = await self._recv_frame()
                if frame.opcode in (PING, PONG):
                    continue
                if frame.opcode == CLOSE:
                    raise AssertionError(
                        f"expected a message, got close {frame.close_code} {frame.payload!r}"
                    )
                if opcode is None:
                    assert frame.opcode in (TEXT, BINARY), frame
                    opcode = frame.opcode
                else:
                    assert frame.opcode == CONT, frame
                parts.append(frame.payload)
                if frame.fin:
                    return opcode, b"".join(parts)

        return await asyncio.wait_for(inner(), timeout)

    async def read_close(self, timeout: float = TIMEOUT) -> tuple[int | None, str]:
        """Skip frames until the server's close frame; return (code, reason).

        Raises AssertionError if the TCP connection ends without a close frame.
        """

        async def inner() -> tuple[int | None, str]:
            while True:
                try:
                    frame = await self._recv_frame()
                except asyncio.IncompleteReadError:
                    raise AssertionError("connection closed without a close frame") from None
                if frame.opcode == CLOSE:
                    return frame.close_code, frame.close_reason

        return await asyncio.wait_for(inner(), timeout)

    async def at_eof(self, timeout: float = TIMEOUT) -> bool:
        """True if the server ends the TCP connection (FIN or RST) within ``timeout``."""

        async def inner() -> None:
            while await self.reader.read(65536):
                pass

        try:
            await asyncio.wait_for(inner(), timeout)
        except (ConnectionError, OSError):
            return True
        except asyncio.TimeoutError:
            return False
        return True
