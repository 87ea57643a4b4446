"""Simulated machines: two lightws servers in two network namespaces, each with its own
address, and Redis in a third that routes between them, so the cross-machine path runs
over real routing (veth pairs, a gateway, a route to Redis's address).

    ns A  10.200.1.2/24 --veth-- 10.200.1.1/24  ns R  10.200.3.1 (lo): redis-server
    ns B  10.200.2.2/24 --veth-- 10.200.2.1/24
          default via 10.200.x.1

The servers and their clients run inside A and B (clients on each namespace's
loopback); every packet stays inside the namespaces this test creates, which are
deleted at the end whatever happens. Needs root (CAP_NET_ADMIN) and ``ip``; skips,
saying why, without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from backplane import TESTS, Proc, require_redis, until

pytestmark = [pytest.mark.asyncio_loop_only, pytest.mark.timeout(120)]

REDIS_ADDR = "10.200.3.1"
REDIS_PORT = 6379
# Redis refuses other hosts without a password (protected mode): the machines
# authenticate, as they would in a deployment (and the URL carries the password).
PASSWORD = "netns-test"
URL = f"redis://:{PASSWORD}@{REDIS_ADDR}:{REDIS_PORT}"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def namespaces() -> Iterator[dict[str, str]]:
    """Create A, B and R, wired as in the module doc; delete them on exit."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): cannot create network namespaces")
    tag = f"lw{os.getpid() % 100000}"
    ns = {k: f"{tag}{k}" for k in "abr"}
    created: list[str] = []
    try:
        try:
            ip("netns", "add", ns["r"])
        except (subprocess.CalledProcessError, OSError) as e:
            err = getattr(e, "stderr", b"") or b""
            pytest.skip(f"cannot create a network namespace: {err.decode().strip() or e}")
        created.append(ns["r"])
        ip("-n", ns["r"], "link", "set", "lo", "up")
        ip("-n", ns["r"], "addr", "add", f"{REDIS_ADDR}/32", "dev", "lo")
        for side, net in (("a", 1), ("b", 2)):
            ip("netns", "add", ns[side])
            created.append(ns[side])
            here, there = f"{tag}{side}0", f"{tag}{side}1"
            ip(
                "link",
                "add",
                here,
                "netns",
                ns[side],
                "type",
                "veth",
                "peer",
                "name",
                there,
                "netns",
                ns["r"],
            )
            ip("-n", ns[side], "link", "set", "lo", "up")
            ip("-n", ns[side], "addr", "add", f"10.200.{net}.2/24", "dev", here)
            ip("-n", ns[side], "link", "set", here, "up")
            ip("-n", ns[side], "route", "add", "default", "via", f"10.200.{net}.1")
            ip("-n", ns["r"], "addr", "add", f"10.200.{net}.1/24", "dev", there)
            ip("-n", ns["r"], "link", "set", there, "up")
        yield ns
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def in_ns(name: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", name, *args]


class Node:
    """tests/netns_node.py in a namespace: a server with its subscribers."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, command: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.reply(timeout)

    async def reply(self, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise AssertionError("the node exited")
        result: dict[str, Any] = json.loads(line)
        return result


@contextlib.asynccontextmanager
async def node(ns: str, name: str) -> AsyncIterator[Node]:
    proc = await asyncio.create_subprocess_exec(
        *in_ns(ns, sys.executable, str(TESTS / "netns_node.py")),
        "--redis",
        URL,
        "--name",
        name,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=TESTS,
    )
    n = Node(proc)
    try:
        assert (await n.reply())["ready"]
        yield n
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def redis_in(ns: str, *command: str) -> Any:
    out = await asyncio.create_subprocess_exec(
        *in_ns(ns, sys.executable, str(TESTS / "netns_node.py")),
        "redis",
        REDIS_ADDR,
        str(REDIS_PORT),
        PASSWORD,
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=TESTS,
    )
    stdout, _ = await asyncio.wait_for(out.communicate(), 10)
    return json.loads(stdout) if out.returncode == 0 else None


async def test_servers_on_two_machines_share_topics_through_redis_on_a_third() -> None:
    redis_server = require_redis()
    with namespaces() as ns:
        for side in "ab":
            route = subprocess.run(
                in_ns(ns[side], "ip", "route", "get", REDIS_ADDR),
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            print(f"ns {side}: {route}")
            assert f"via 10.200.{1 if side == 'a' else 2}.1" in route  # routed, not local
        redis = await Proc.start(
            *in_ns(
                ns["r"],
                redis_server,
                "--bind",
                REDIS_ADDR,
                "--port",
                str(REDIS_PORT),
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                PASSWORD,
            )
        )
        try:

            async def redis_up() -> bool:
                return await redis_in(ns["r"], "PING") == "PONG"

            await until(redis_up, "redis-server in its namespace")
            async with node(ns["a"], "A") as a, node(ns["b"], "B") as b:

                async def both_subscribed() -> bool:
                    reply = await redis_in(ns["r"], "PUBSUB", "NUMSUB", "lightws:room")
                    return reply is not None and reply[1] == 2

                await until(both_subscribed, "both machines to SUBSCRIBE")
                n = 200
                assert (await a.ask({"publish": n}))["published"] == n
                assert (await b.ask({"publish": n}))["published"] == n
                for here in (a, b):
                    received = (await here.ask({"collect": 2 * n}))["received"]
                    assert len(received) == 3
                    for got in received:
                        assert len(got) == 2 * n, f"{len(got)} of {2 * n}"
                        for who in "AB":  # all of each machine's, once, in order
                            mine = [m for m in got if m.startswith(f"{who}-")]
                            assert mine == [f"{who}-{i}" for i in range(n)]
                sa, sb = await a.ask({"stats": True}), await b.ask({"stats": True})
                print(f"machine A: {sa}\nmachine B: {sb}")
                assert sa["relayed"] == sb["relayed"] == n
                assert sa["relay_received"] == sb["relay_received"] == n
                clients = await redis_in(ns["r"], "CLIENT", "LIST")
                peers = sorted(
                    {
                        p.split("addr=")[1].split(":")[0]
                        for p in clients.splitlines()
                        if "addr=" in p
                    }
                )
                print(f"Redis's clients come from {peers}")
                assert {"10.200.1.2", "10.200.2.2"} <= set(peers)
        finally:
            await redis.stop()
