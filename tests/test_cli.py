"""``python -m lightws echo`` as a real subprocess."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import run_lightws
from support.demos import Demo, start_demo
from websockets.asyncio.client import connect

pytestmark = pytest.mark.asyncio_loop_only  # the server runs in its own process


async def start_echo(*extra: str) -> Demo:
    """``python -m lightws echo`` on a free port, once it has said where it listens."""
    return await start_demo("echo", *extra, ready="listening on")


@pytest.fixture(params=["handler", "listener"])
async def echo_process(request: pytest.FixtureRequest) -> AsyncIterator[Demo]:
    """The echo with its coroutine handler, and with ``--listener``."""
    echo = await start_echo(*(["--listener"] if request.param == "listener" else []))
    yield echo
    await echo.stop()


async def test_echo_prints_where_it_listens(echo_process: Demo) -> None:
    assert f"127.0.0.1:{echo_process.port}" in echo_process.banner


async def test_echo_echoes_text_and_binary(echo_process: Demo) -> None:
    async with connect(f"ws://127.0.0.1:{echo_process.port}/") as ws:
        await ws.send("hello cli")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello cli"
        await ws.send(b"\x00\x01\x02" * 1000)
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01\x02" * 1000


async def test_echo_reverses_with_reverse_query(echo_process: Demo) -> None:
    async with connect(f"ws://127.0.0.1:{echo_process.port}/?reverse=1") as ws:
        await ws.send("stressed")
        assert await asyncio.wait_for(ws.recv(), 5) == "desserts"


async def test_echo_closes_with_1000_on_the_exit_message(echo_process: Demo) -> None:
    async with connect(f"ws://127.0.0.1:{echo_process.port}/?reverse=1") as ws:
        await ws.send("before")
        assert await asyncio.wait_for(ws.recv(), 5) == "erofeb"
        await ws.send(b"exit")
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1000


async def test_sigterm_closes_clients_with_1001_and_exits_0(echo_process: Demo) -> None:
    async with connect(f"ws://127.0.0.1:{echo_process.port}/") as ws:
        await ws.send("before")
        assert await asyncio.wait_for(ws.recv(), 5) == "before"
        echo_process.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1001
    assert await echo_process.proc.afinish(10) == 0


async def test_sigterm_without_clients_exits_0(echo_process: Demo) -> None:
    echo_process.proc.send_signal(signal.SIGTERM)
    assert await echo_process.proc.afinish(10) == 0


def test_help_lists_the_echo_command() -> None:
    result = run_lightws("--help")
    assert result.returncode == 0
    assert "echo" in result.stdout
    assert "echo      --listener" in result.stdout


def test_echo_help_documents_listener() -> None:
    result = run_lightws("echo", "--help")
    assert result.returncode == 0
    assert "--listener" in result.stdout
    assert "listener" in result.stdout.split("--listener", 1)[1]


def test_echo_listener_picks_the_listener_handshake() -> None:
    from lightws import LogLevel
    from lightws.__main__ import _demo, _parser
    from lightws.demos import echo_handshake, echo_listener_handshake

    parser = _parser()
    assert _demo(parser.parse_args(["echo"]), LogLevel.ERROR)[0] is echo_handshake
    listener = _demo(parser.parse_args(["echo", "--listener"]), LogLevel.ERROR)[0]
    assert listener is echo_listener_handshake


def assert_one_clean_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lightws: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def test_an_address_without_a_host_is_one_clean_error_line() -> None:
    assert_one_clean_error_line(run_lightws("echo", "--addr", "9001"), "9001")


def test_swapped_cert_and_key_is_one_clean_error_line(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    result = run_lightws(
        "echo", "--addr", "127.0.0.1:0", "--cert", str(key_file), "--key", str(cert_file)
    )
    assert_one_clean_error_line(result)


def test_a_missing_certificate_file_is_one_clean_error_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    result = run_lightws("echo", "--addr", "127.0.0.1:0", "--cert", missing, "--key", missing)
    assert_one_clean_error_line(result, "nope.pem")


def test_an_address_in_use_is_one_clean_error_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert_one_clean_error_line(run_lightws("echo", "--addr", f"127.0.0.1:{port}"), str(port))


def test_cert_without_key_is_one_clean_error_line() -> None:
    assert_one_clean_error_line(run_lightws("echo", "--cert", "cert.pem"), "--cert", "--key")


def test_a_negative_max_msg_len_is_one_clean_error_line() -> None:
    result = run_lightws("echo", "--addr", "127.0.0.1:0", "--max-msg-len", "-1")
    assert_one_clean_error_line(result, "max_msg_len")
