"""Helpers for the scale-out tests: a real ``redis-server`` (Debian's package) on a free
loopback port, a tiny RESP client to look at it, and ``python -m lightws serve``
processes whose output is collected as they run.

Without ``redis-server`` the tests that need it skip, saying so; .ci/run installs it
and sets LIGHTWS_REQUIRE_REDIS=1, which turns that skip into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support import free_port
from websockets.asyncio.client import ClientConnection, connect

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def require_redis() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("LIGHTWS_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed (.ci/run installs Debian's redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


async def deadline_loop(timeout: float, what: str) -> AsyncIterator[None]:
    """Yield until ``timeout`` runs out (then fail naming ``what``), pausing 10 ms."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        yield
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    async for _ in deadline_loop(timeout, what):
        if await predicate() if asyncio.iscoroutinefunction(predicate) else predicate():
            return


def _command(*args: str | bytes) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
    return b"".join(out)


async def resp(host: str, port: int, *args: str | bytes, password: str | None = None) -> Any:
    """Send one command to Redis and return its (RESP2) reply."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if password is not None:
            writer.write(_command("AUTH", password))
            await _read_reply(reader)
        writer.write(_command(*args))
        return await _read_reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    line = (await reader.readline()).rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else (await reader.readexactly(n + 2))[:-2]
    if kind == b"*":
        return [await _read_reply(reader) for _ in range(int(rest))]
    raise RuntimeError(f"unexpected reply {line!r}")


class Redis:
    """One ``redis-server`` on 127.0.0.1, no persistence; can be killed and restarted."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            require_redis(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        async def up() -> bool:
            try:
                return await self.command("PING") == "PONG"
            except OSError:
                return False

        await until(up, "redis-server to answer PING")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None

    async def command(self, *args: str | bytes) -> Any:
        return await resp("127.0.0.1", self.port, *args)

    async def numsub(self, channel: str) -> int:
        reply = await self.command("PUBSUB", "NUMSUB", channel)
        return int(reply[1])

    async def wait_numsub(self, channel: str, n: int, timeout: float = 10.0) -> None:
        async def ok() -> bool:
            return await self.numsub(channel) == n

        await until(ok, f"{n} subscribers of {channel} in Redis", timeout)


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[Redis]:
    redis = Redis()
    await redis.start()
    try:
        yield redis
    finally:
        await redis.kill()


class Proc:
    """A child process; its stdout and stderr, merged, are read as it runs."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, *args: str, cwd: Path = TESTS) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            cwd=cwd,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait_for_lines(self, text: str, n: int = 1, timeout: float = 20.0) -> list[str]:
        """Wait until ``n`` lines contain ``text``; return them."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.count(text) < n:
            if self._reader.done():
                raise AssertionError(f"exited before {n}x {text!r}:\n{self.output}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), end - loop.time())
            except asyncio.TimeoutError:
                raise AssertionError(f"no {n}x {text!r} in {timeout} s:\n{self.output}") from None
        return [line for line in self.lines if text in line][:n]

    async def wait(self, timeout: float = 20.0) -> int:
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return rc

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def stop(self) -> None:
        """Make sure it is gone (kill after a grace period)."""
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._reader, 5)


def serve_args(app: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "lightws", "serve", f"scaleout_app:{app}", *options]


@contextlib.asynccontextmanager
async def serving(app: str, *options: str, workers: int = 1) -> AsyncIterator[Proc]:
    """``python -m lightws serve`` until every worker is ready; stopped on exit."""
    proc = await Proc.start(*serve_args(app, "--workers", str(workers), *options))
    try:
        await proc.wait_for_lines("ready (pid", workers)
        yield proc
    finally:
        await proc.stop()


async def subscriber(port: int, query: str = "") -> tuple[ClientConnection, int]:
    """A client of scaleout_app, past its hello; returns it and its worker's pid."""
    ws = await connect(f"ws://127.0.0.1:{port}/{query}", open_timeout=10)
    hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return ws, int(hello["pid"])


async def receive(ws: ClientConnection, n: int, timeout: float = 10.0) -> list[str]:
    """The next ``n`` messages (fails if they do not come in time)."""
    out: list[str] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(out) < n:
        msg = await asyncio.wait_for(ws.recv(), max(0.01, end - loop.time()))
        out.append(msg if isinstance(msg, str) else msg.decode())
    return out


async def nothing_more(ws: ClientConnection, wait: float = 0.3) -> None:
    """Assert that no message arrives within ``wait`` seconds (after the expected ones:
    this bounds a negative, it is not used to wait for anything)."""
    with pytest.raises(asyncio.TimeoutError):
        extra = await asyncio.wait_for(ws.recv(), wait)
        raise AssertionError(f"unexpected message {extra!r}")
