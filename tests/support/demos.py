"""``python -m lightws <demo>`` (echo, countdown, push, chat) running in its own process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection

from .ports import free_port
from .process import LIGHTWS, Process, astart

__all__ = ["Demo", "http_get", "recv_json", "start_demo"]


class Demo:
    """A running ``python -m lightws <command>`` and what it printed before serving."""

    def __init__(self, proc: Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.banner = proc.banner
        self.put_port = 0  # push only: the HTTP endpoint's port

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def read_until(self, text: str, timeout: float = 10) -> str:
        """Read the process's output until a line contains ``text``."""
        return await self.proc.aread_until(text, timeout)

    async def put(self, query: str) -> tuple[int, str]:
        """``GET /put/<query>`` on the push endpoint: (status, body)."""
        status, _, body = await http_get(f"http://127.0.0.1:{self.put_port}/put/{query}")
        return status, body

    async def stop(self) -> None:
        """SIGTERM, then kill if it has not exited within a few seconds."""
        await self.proc.astop()


async def start_demo(command: str, *extra: str, ready: str = "in a browser") -> Demo:
    """Start a demo on a free port and wait until it has printed ``ready``."""
    port = free_port()
    args = [*LIGHTWS, command, "--addr", f"127.0.0.1:{port}", *extra]
    return Demo(await astart(args, ready=ready), port)


async def http_get(url: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, Content-Type, body) of one plain HTTP request."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def recv_json(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    """The next message ``ws`` receives, a JSON object in a TEXT message (the chat
    demo's events)."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str), raw
    decoded = json.loads(raw)
    assert isinstance(decoded, dict), decoded
    return decoded
