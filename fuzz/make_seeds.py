"""Write the seed corpora in fuzz/seeds/<target>/ (run from anywhere).

Each target's input starts with a few control bytes (see the target's doc
comment); the rest is a byte stream a client could send.
"""

from __future__ import annotations

import pathlib
import struct

SEEDS = pathlib.Path(__file__).resolve().parent / "seeds"

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
MASK = b"\x37\xfa\x21\x3d"


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", b0, m | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if not mask:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def close(code: int | None, reason: bytes = b"") -> bytes:
    return frame(CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


# frame_decoder: flags (bit 0 = limit), limit u16, 8-byte chunking seed, stream.
def decoder_input(stream: bytes, limit: int | None = None, seed: int = 0x9E3779B97F4A7C15) -> bytes:
    flags = 0 if limit is None else 1
    return bytes([flags]) + struct.pack("!H", limit or 0) + struct.pack("<Q", seed) + stream


UTF8_VALID = [
    "Hello-µ@ßöäüàá-UTF-8!!".encode(),
    "κόσμε".encode(),
    b"\xf0\x9f\x98\x80\xf0\x90\x80\x80\xf4\x8f\xbf\xbf",  # 4-byte chars, U+10FFFF
    b"\xed\x9f\xbf\xee\x80\x80\xef\xbf\xbd",  # U+D7FF, U+E000, U+FFFD
    b"\xc2\x80\xdf\xbf\xe0\xa0\x80",  # smallest 2- and 3-byte forms
]
UTF8_INVALID = [
    b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80\x65\x64\x69\x74\x65\x64",
    b"\xc0\xaf",  # overlong '/'
    b"\xe0\x80\xaf",  # overlong 3-byte
    b"\xf0\x80\x80\xaf",  # overlong 4-byte
    b"\xed\xa0\x80",  # U+D800
    b"\xed\xbf\xbf",  # U+DFFF
    b"\xf4\x90\x80\x80",  # U+110000
    b"\xf8\x88\x80\x80\x80",  # 5-byte form
    b"\xff",
    b"\xf0\x9f\x98",  # truncated at the end
    b"\x80",  # lone continuation
]


def frame_decoder_seeds() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    s["text"] = decoder_input(frame(TEXT, b"Hello"))
    s["binary_126"] = decoder_input(frame(BINARY, bytes(range(126))))
    # 64-bit length (65536), payload cut short: the stream ends mid-frame.
    s["binary_65536_truncated"] = decoder_input(
        b"\x82\xff" + struct.pack("!Q", 65536) + MASK + b"\x00" * 40
    )
    s["empty_text_and_binary"] = decoder_input(frame(TEXT) + frame(BINARY))
    s["ping_pong"] = decoder_input(frame(PING, b"ping") + frame(PONG, b"pong") + frame(PING))
    s["close_empty"] = decoder_input(close(None))
    s["close_1000_reason"] = decoder_input(close(1000, "bye ✓".encode()))
    s["close_3000"] = decoder_input(close(4999, b""))
    s["close_1005_bad"] = decoder_input(close(1005))
    s["close_1byte_bad"] = decoder_input(frame(CLOSE, b"\x03"))
    s["close_bad_utf8"] = decoder_input(close(1000, b"\xff"))
    s["fragmented_text"] = decoder_input(
        frame(TEXT, b"fra", fin=False)
        + frame(PING, b"in between")
        + frame(CONT, b"gmen", fin=False)
        + frame(CONT, "t€d".encode())
    )
    s["fragmented_binary"] = decoder_input(
        frame(BINARY, b"\x00\x01", fin=False) + frame(CONT, b"") + frame(BINARY, b"next")
    )
    s["split_code_point"] = decoder_input(
        frame(TEXT, b"\xf0\x9f", fin=False) + frame(CONT, b"\x98", fin=False) + frame(CONT, b"\x80")
    )
    s["continuation_without_start"] = decoder_input(frame(CONT, b"x"))
    s["text_inside_fragmented"] = decoder_input(frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"))
    s["fragmented_ping"] = decoder_input(frame(PING, b"x", fin=False))
    s["ping_126"] = decoder_input(frame(PING, b"x" * 126))
    s["rsv_bits"] = decoder_input(frame(TEXT, b"x", rsv=4) + frame(BINARY, b"x", rsv=1))
    s["reserved_opcode"] = decoder_input(frame(TEXT, b"ok") + frame(3, b"x") + frame(0xB))
    s["unmasked"] = decoder_input(frame(TEXT, b"x", mask=False))
    s["msb_length"] = decoder_input(b"\x82\xff" + b"\x80" + b"\x00" * 7 + MASK)
    s["limit_exceeded"] = decoder_input(
        frame(TEXT, b"12345", fin=False) + frame(CONT, b"6789"), limit=8
    )
    s["limit_exact"] = decoder_input(frame(BINARY, b"x" * 300), limit=300)
    s["invalid_utf8"] = decoder_input(frame(TEXT, b"ok\xed\xa0\x80rest"))
    s["data_after_close"] = decoder_input(close(1000) + frame(TEXT, b"late"))
    s["nonminimal_length"] = decoder_input(b"\x81\xfe\x00\x03" + MASK + b"abc")
    return s


# handshake: max_head u16, status u16, request bytes.
def handshake_input(request: bytes, max_head: int = 8192, status: int = 200) -> bytes:
    return struct.pack("!HH", max_head, status) + request


def upgrade(
    *, method: str = "GET", version: str = "13", extra: str = "", omit: tuple[str, ...] = ()
) -> bytes:
    headers = {
        "Host": "127.0.0.1:8765",
        "Upgrade": "websocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": version,
    }
    lines = [f"{method} /chat?room=1 HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in omit]
    head = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
    return head.encode("latin-1")


def handshake_seeds() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    s["valid"] = handshake_input(upgrade())
    s["valid_subprotocols"] = handshake_input(
        upgrade(extra="Sec-WebSocket-Protocol: chat, superchat\r\nOrigin: http://x\r\n")
    )
    s["valid_with_frame"] = handshake_input(upgrade() + frame(TEXT, b"hi"))
    s["bare_lf"] = handshake_input(upgrade().replace(b"\r\n", b"\n"))
    s["latin1_value"] = handshake_input(upgrade(extra="X-Name: caf\xe9\r\n"))
    s["post"] = handshake_input(upgrade(method="POST"))
    s["version_8"] = handshake_input(upgrade(version="8"))
    s["no_key"] = handshake_input(upgrade(omit=("Sec-WebSocket-Key",)))
    s["bad_key"] = handshake_input(upgrade().replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short"))
    s["no_host"] = handshake_input(upgrade(omit=("Host",)))
    s["two_hosts"] = handshake_input(upgrade(extra="Host: other\r\n"))
    s["no_connection_upgrade"] = handshake_input(upgrade(omit=("Connection",)))
    s["upgrade_h2c"] = handshake_input(upgrade().replace(b"Upgrade: websocket", b"Upgrade: h2c"))
    s["plain_get"] = handshake_input(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n", status=404)
    s["http10"] = handshake_input(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    s["garbage"] = handshake_input(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    s["partial"] = handshake_input(upgrade()[:40])
    s["too_large"] = handshake_input(upgrade(extra="X-Pad: " + "a" * 300 + "\r\n"), max_head=200)
    s["response_splitting_attempt"] = handshake_input(
        upgrade(extra="Content-Length: 0\r\nX-Evil: a\rb\r\n"), status=200
    )
    return s


# utf8: fragment count, 8-byte seed, text payload.
def utf8_input(payload: bytes, fragments: int = 1, seed: int = 1) -> bytes:
    return bytes([(fragments - 1) & 0x0F]) + struct.pack("<Q", seed) + payload


def utf8_seeds() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    for i, p in enumerate(UTF8_VALID):
        s[f"valid_{i}"] = utf8_input(p, fragments=1 + i * 3, seed=i + 7)
    for i, p in enumerate(UTF8_INVALID):
        s[f"invalid_{i}"] = utf8_input(b"ab" + p + b"cd", fragments=1 + i, seed=i + 11)
    s["empty"] = utf8_input(b"")
    s["ascii_long"] = utf8_input(b"x" * 300, fragments=5)
    return s


def main() -> None:
    for target, seeds in (
        ("frame_decoder", frame_decoder_seeds()),
        ("handshake", handshake_seeds()),
        ("utf8", utf8_seeds()),
    ):
        d = SEEDS / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (d / name).write_bytes(data)


if __name__ == "__main__":
    main()
