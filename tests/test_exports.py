"""The public names promised by DESIGN.md section 1."""

from __future__ import annotations

import lightws

PUBLIC = {
    "CloseCode",
    "Config",
    "Connection",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "HandshakeFunc",
    "InvalidHandshake",
    "Handler",
    "LightwsError",
    "LogLevel",
    "Message",
    "Opcode",
    "Request",
    "Response",
    "Server",
    "connect",
    "run",
}


def test_every_documented_name_is_exported() -> None:
    missing = {name for name in PUBLIC if not hasattr(lightws, name)}
    assert missing == set()


def test_all_lists_the_documented_names() -> None:
    assert PUBLIC <= set(lightws.__all__)
    assert all(hasattr(lightws, name) for name in lightws.__all__)
