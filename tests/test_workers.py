"""``python -m lightws serve MODULE:ATTR`` (python/lightws/_workers.py) as real
processes: a handshake callable and a Config as the application, ``conn.server``,
startup failures, ``--workers 2`` surviving ``kill -9`` of a worker with the port served
throughout, SIGTERM (clients get 1001, exit 0), SIGHUP (certificates reloaded in every
worker), and workers that outlive their parent."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import sys
from pathlib import Path

import pytest
from backplane import (
    Proc,
    free_port,
    receive,
    serve_args,
    serving,
    subscriber,
    until,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

pytestmark = [pytest.mark.asyncio_loop_only, pytest.mark.timeout(120)]


def worker_pids(proc: Proc) -> dict[int, int]:
    """The live worker of each index, from the supervisor's "ready" lines."""
    pids: dict[int, int] = {}
    for line in proc.lines:
        if m := re.search(r"worker (\d+) ready \(pid (\d+)\)", line):
            pids[int(m[1])] = int(m[2])
    return pids


def alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_handshake_callable_is_served_and_conn_server_publishes() -> None:
    port = free_port()
    async with serving("handshake", "--addr", f"127.0.0.1:{port}") as proc:
        assert "serving scaleout_app:handshake on 127.0.0.1:" in proc.output
        ws, pid = await subscriber(port)
        assert pid in worker_pids(proc).values()
        await ws.send(json.dumps({"pub": "room", "msg": "hi", "n": 2}))
        assert await receive(ws, 2) == ["hi0", "hi1"]
        await ws.close()


async def test_a_config_is_served_with_the_options_overriding_its_fields() -> None:
    port = free_port()  # the Config says 127.0.0.1:1; --addr wins
    async with serving("config", "--addr", f"127.0.0.1:{port}"):
        ws, _ = await subscriber(port)
        # max_msg_len=1000 from the Config is kept: a larger message closes with 1009.
        await ws.send("x" * 2000)
        with pytest.raises(ConnectionClosed) as e:
            await asyncio.wait_for(ws.recv(), 10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1009


async def test_port_0_gives_every_worker_the_same_port() -> None:
    async with serving("handshake", "--addr", "127.0.0.1:0", workers=2) as proc:
        ports = {int(m[1]) for m in re.finditer(r"listening on ws://127.0.0.1:(\d+)", proc.output)}
        assert len(ports) == 1, proc.output
        ws, _ = await subscriber(ports.pop())
        await ws.close()


@pytest.mark.parametrize(
    "app, message",
    [
        ("no_such_module:handshake", "No module named 'no_such_module'"),
        ("scaleout_app:missing", "has no attribute 'missing'"),
        ("scaleout_app:not_an_app", "must be a handshake callable or a lightws.Config"),
        ("scaleout_app", "MODULE:ATTR"),
    ],
)
async def test_an_application_that_cannot_be_loaded_exits_2(app: str, message: str) -> None:
    args = serve_args("x", "--addr", f"127.0.0.1:{free_port()}", "--workers", "2")
    args[args.index("scaleout_app:x")] = app
    proc = await Proc.start(*args)
    assert await proc.wait() == 2
    assert message in proc.output
    assert "giving up" in proc.output
    assert "Traceback" not in proc.output


async def test_workers_that_die_at_startup_make_the_parent_give_up() -> None:
    # A plain listener (no SO_REUSEPORT) holds the port: no worker can bind it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await Proc.start(*serve_args("handshake", "--addr", f"127.0.0.1:{port}"))
        assert await proc.wait() == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.output
    assert "giving up" in proc.output


async def test_workers_0_means_one_per_cpu() -> None:
    n = len(os.sched_getaffinity(0))
    proc = await Proc.start(*serve_args("handshake", "--addr", "127.0.0.1:0", "--workers", "0"))
    try:
        await proc.wait_for_lines("ready (pid", n)
        assert f"with {n} worker" in proc.output
    finally:
        await proc.stop()


async def test_two_workers_survive_kill_9_with_the_port_served_throughout() -> None:
    port = free_port()
    async with serving("handshake", "--addr", f"127.0.0.1:{port}", workers=2) as proc:
        pids = worker_pids(proc)
        assert len(pids) == 2
        refused = 0
        other_errors: list[str] = []
        served = 0
        stop = asyncio.Event()

        async def clients() -> None:
            nonlocal refused, served
            while not stop.is_set():
                try:
                    async with connect(f"ws://127.0.0.1:{port}/?sub=0", open_timeout=5) as ws:
                        await asyncio.wait_for(ws.recv(), 5)  # the hello: a worker served it
                    served += 1
                except ConnectionRefusedError:
                    refused += 1
                except (OSError, WebSocketException, asyncio.TimeoutError) as e:
                    # A connection the killed worker had accepted dies with it.
                    other_errors.append(repr(e))

        loops = [asyncio.ensure_future(clients()) for _ in range(4)]
        try:
            await until(lambda: served >= 50, "clients to be served")
            victim = pids[0]
            os.kill(victim, signal.SIGKILL)
            await proc.wait_for_lines("exited with status -9")
            await proc.wait_for_lines("worker 0 ready (pid", 2)
            new = worker_pids(proc)[0]
            assert new != victim and alive(new) and not alive(victim)
            mark = served
            await until(lambda: served >= mark + 50, "clients to be served after the restart")
        finally:
            stop.set()
            await asyncio.gather(*loops)
        assert refused == 0, f"{refused} refused connections"
        # At most the connections in flight on the killed worker (one per client loop).
        assert len(other_errors) <= len(loops), other_errors
        print(f"served {served}, refused {refused}, lost with the worker {len(other_errors)}")


async def test_sigterm_closes_every_client_with_1001_and_the_parent_exits_0() -> None:
    port = free_port()
    proc = await Proc.start(
        *serve_args("handshake", "--addr", f"127.0.0.1:{port}", "--workers", "2")
    )
    try:
        await proc.wait_for_lines("ready (pid", 2)
        clients = [(await subscriber(port))[0] for _ in range(8)]
        proc.signal(signal.SIGTERM)
        for ws in clients:
            with pytest.raises(ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), 10)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1001
        assert await proc.wait() == 0
        assert "every worker stopped" in proc.output
        assert "Traceback" not in proc.output
    finally:
        await proc.stop()


async def test_sighup_reloads_the_certificates_in_every_worker(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(ca: object) -> None:
        issued = ca.issue_cert("127.0.0.1")  # type: ignore[attr-defined]
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))

    def client_context(ca: object) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)  # type: ignore[attr-defined]
        return ctx

    install(old_ca)
    port = free_port()
    options = ["--addr", f"127.0.0.1:{port}", "--cert", str(cert), "--key", str(key)]
    async with serving("handshake", *options, workers=2) as proc:

        async def served_with(ca: object) -> bool:
            try:
                async with connect(
                    f"wss://127.0.0.1:{port}/?sub=0", ssl=client_context(ca), open_timeout=5
                ) as ws:
                    await ws.recv()
                return True
            except ssl.SSLError:
                return False

        assert await served_with(old_ca)
        install(new_ca)
        proc.signal(signal.SIGHUP)
        await proc.wait_for_lines("SIGHUP: certificates reloaded", 2)
        # Whichever worker the kernel picks now presents the new certificate.
        for _ in range(20):
            assert await served_with(new_ca)
            assert not await served_with(old_ca)


async def test_workers_stop_when_the_supervisor_is_killed() -> None:
    proc = await Proc.start(*serve_args("handshake", "--addr", "127.0.0.1:0", "--workers", "2"))
    try:
        await proc.wait_for_lines("ready (pid", 2)
        pids = list(worker_pids(proc).values())
        proc.proc.kill()
        await proc.proc.wait()
        await until(lambda: not any(alive(p) for p in pids), "the workers to stop", 15)
    finally:
        await proc.stop()


if sys.platform != "linux":  # pragma: no cover
    pytestmark.append(pytest.mark.skip(reason="SO_REUSEPORT load balancing is Linux's"))
