"""Shutting down on signals: the README quickstart and examples/echo.py run as real
processes (SIGINT and SIGTERM close clients with 1001 and exit 0, no traceback), a second
signal aborts a shutdown held up by a client that does not read (``lightws.run()`` and
the command line), and ``Server.abort()`` in process."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import lightws
import pytest
from support import ROOT, Process, astart, free_port, serve, url
from support.rawws import read_response, upgrade_request
from websockets.asyncio.client import connect

pytestmark = pytest.mark.asyncio_loop_only  # the servers run in their own processes


def readme_quickstart() -> str:
    """The first Python block under "## Quickstart" in README.md, as a user copies it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quickstart") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python block in the quickstart"
    return match.group(1)


class App:
    """A Python program serving on ``port``; stdout and stderr together in ``output``."""

    def __init__(self, proc: Process, port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def output(self) -> str:
        return self.proc.output

    async def read_until(self, text: str, timeout: float = 10) -> None:
        await self.proc.aread_until(text, timeout)

    async def finish(self, timeout: float = 15) -> int:
        """Wait for the exit and the rest of the output; return the exit status."""
        return await self.proc.afinish(timeout)


async def start(args: list[str], port: int) -> App:
    """Start ``args``; return once it says it listens on ``port``."""
    # lightws.run() and the command line both print "... listening on ws://host:port".
    return App(await astart(args, ready=f"ws://127.0.0.1:{port}"), port)


@pytest.fixture
async def apps() -> AsyncIterator[list[App]]:
    started: list[App] = []
    yield started
    for app in started:
        await app.proc.astop()


async def start_program(apps: list[App], tmp_path: Path, source: str) -> App:
    port = free_port()
    assert "127.0.0.1:9001" in source
    path = tmp_path / "app.py"
    path.write_text(source.replace("127.0.0.1:9001", f"127.0.0.1:{port}"))
    app = await start([sys.executable, str(path)], port)
    apps.append(app)
    return app


PROGRAMS = {
    "readme-quickstart": readme_quickstart,
    "examples-echo": lambda: (ROOT / "examples" / "echo.py").read_text(),
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_the_first_example_shuts_down_gracefully_on_a_signal(
    apps: list[App], tmp_path: Path, program: str, sig: signal.Signals
) -> None:
    app = await start_program(apps, tmp_path, PROGRAMS[program]())
    async with connect(f"ws://127.0.0.1:{app.port}/echo") as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"
        app.proc.send_signal(sig)
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1001
    assert await app.finish() == 0, app.output
    assert "Traceback" not in app.output, app.output


async def stalled_client(port: int) -> asyncio.StreamWriter:
    """A client that completes the upgrade, then never reads nor answers a close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request("/echo"))
    response = await read_response(reader)
    assert response.status == 101
    return writer


RUN_PROGRAM = """
import lightws

async def handler(conn):
    async for msg in conn:
        await conn.send(msg)

lightws.run(lightws.Config(addr="127.0.0.1:9001", handshake=lambda request, response: handler,
                           close_timeout=60))
"""


async def assert_second_signal_aborts(app: App, first: signal.Signals) -> None:
    writer = await stalled_client(app.port)
    try:
        app.proc.send_signal(first)
        await app.read_until("shutting down")
        # Without the second signal it would wait close_timeout (60 s) for the client.
        app.proc.send_signal(signal.SIGINT if first == signal.SIGTERM else signal.SIGTERM)
        assert await app.finish(timeout=10) == 0, app.output
    finally:
        writer.close()
    assert "aborting" in app.output, app.output
    assert "Traceback" not in app.output, app.output


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_second_signal_aborts_the_shutdown_of_run(
    apps: list[App], tmp_path: Path, first: signal.Signals
) -> None:
    app = await start_program(apps, tmp_path, RUN_PROGRAM)
    await assert_second_signal_aborts(app, first)


async def test_a_second_signal_aborts_the_shutdown_of_the_command_line(apps: list[App]) -> None:
    port = free_port()
    args = ["--addr", f"127.0.0.1:{port}", "--close-timeout", "60"]
    app = await start([sys.executable, "-m", "lightws", "echo", *args], port)
    apps.append(app)
    await assert_second_signal_aborts(app, signal.SIGTERM)


async def test_run_says_where_it_listens(apps: list[App], tmp_path: Path) -> None:
    app = await start_program(apps, tmp_path, RUN_PROGRAM)  # waits for ws://127.0.0.1:port
    assert f"listening on ws://127.0.0.1:{app.port}" in app.proc.banner
    app.proc.send_signal(signal.SIGTERM)
    assert await app.finish() == 0


async def test_server_abort_cuts_a_close_short() -> None:
    async with serve(close_timeout=60) as server:
        writer = await stalled_client(server.port)
        closing = asyncio.ensure_future(server.close())
        await asyncio.sleep(0)
        assert not closing.done()
        server.abort()
        await asyncio.wait_for(closing, 10)
        assert not server.is_serving
        writer.close()


async def test_server_abort_drops_connections_and_cancels_handlers() -> None:
    cancelled = asyncio.Event()

    async def handler(conn: lightws.Connection) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serve(lambda request, response: handler) as server:
        async with connect(url(server)) as ws:
            server.abort()
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == 1006  # dropped: no close frame
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.wait_for(server.close(), 10)
