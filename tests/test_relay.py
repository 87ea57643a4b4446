"""The Redis backplane (``Config.pubsub``, src/relay.rs) against a real ``redis-server``:
servers in separate processes and in one process sharing one Redis, per-topic
SUBSCRIBE, ``exclude``, order per publisher, Redis killed and restarted mid-stream,
unreachable Redis at start, and what else may appear on a ``lightws:`` channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import lightws
import pytest
from backplane import (
    Redis,
    free_port,
    nothing_more,
    receive,
    redis_server,
    serving,
    subscriber,
    until,
)
from scaleout_app import handshake
from support import serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    async with redis_server() as r:
        yield r


def by_publisher(messages: list[str], prefix: str) -> list[str]:
    return [m for m in messages if m.startswith(prefix)]


# -- processes ---------------------------------------------------------------------------


@pytest.mark.asyncio_loop_only
@pytest.mark.parametrize("servers", [2, 3])
async def test_servers_in_separate_processes_deliver_to_every_subscriber_once(
    redis: Redis, servers: int
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        ports = []
        for _ in range(servers):
            port = free_port()
            await stack.enter_async_context(
                serving("handshake", "--addr", f"127.0.0.1:{port}", "--pubsub", redis.url)
            )
            ports.append(port)
        subs = []
        for port in ports:
            for _ in range(2):
                ws, _pid = await subscriber(port)
                stack.push_async_callback(ws.close)
                subs.append(ws)
        await redis.wait_numsub("lightws:room", servers)
        n = 25
        for i, port in enumerate(ports):
            ctl, _ = await subscriber(port, "?sub=0")
            stack.push_async_callback(ctl.close)
            await ctl.send(json.dumps({"pub": "room", "msg": f"s{i}-", "n": n}))
        for ws in subs:
            got = await receive(ws, n * servers)
            for i in range(servers):
                # Everything, once, in the order each server published it.
                assert by_publisher(got, f"s{i}-") == [f"s{i}-{k}" for k in range(n)]
            await nothing_more(ws)


@pytest.mark.asyncio_loop_only
async def test_a_topic_is_subscribed_in_redis_only_while_it_has_local_subscribers(
    redis: Redis,
) -> None:
    port = free_port()
    async with serving("handshake", "--addr", f"127.0.0.1:{port}", "--pubsub", redis.url):
        assert await redis.numsub("lightws:quiet") == 0
        a, _ = await subscriber(port, "?topic=quiet")
        b, _ = await subscriber(port, "?topic=quiet")
        await redis.wait_numsub("lightws:quiet", 1)  # one SUBSCRIBE per server, not per client
        await a.close()
        await asyncio.sleep(0)
        assert await redis.numsub("lightws:quiet") == 1
        await b.close()
        await redis.wait_numsub("lightws:quiet", 0)
        channels = await redis.command("PUBSUB", "CHANNELS", "lightws:*")
        assert channels == []


# -- in one process: two servers, each with its own runtime and relay -----------------------


@pytest.mark.asyncio_loop_only
async def test_exclude_applies_to_the_local_server_only(redis: Redis) -> None:
    async with serve(handshake, pubsub=redis.url) as a, serve(handshake, pubsub=redis.url) as b:
        me, _ = await subscriber(a.port)
        neighbour, _ = await subscriber(a.port)
        remote, _ = await subscriber(b.port)
        await redis.wait_numsub("lightws:room", 2)
        await me.send(json.dumps({"pub": "room", "msg": "x", "n": 3, "exclude": True}))
        assert await receive(neighbour, 3) == ["x0", "x1", "x2"]
        assert await receive(remote, 3) == ["x0", "x1", "x2"]
        await nothing_more(me)
        for ws in (me, neighbour, remote):
            await ws.close()


async def test_order_per_publisher_is_kept_across_servers(redis: Redis) -> None:
    async with serve(handshake, pubsub=redis.url) as a, serve(handshake, pubsub=redis.url) as b:
        local, _ = await subscriber(a.port)
        remote, _ = await subscriber(b.port)
        await redis.wait_numsub("lightws:room", 2)
        n = 2000
        for i in range(n):
            assert a.publish("room", f"m{i}") == 1  # the local count
        expected = [f"m{i}" for i in range(n)]
        assert await receive(local, n) == expected
        assert await receive(remote, n) == expected
        assert a.stats().relayed == n
        await until(lambda: b.stats().relay_received == n, "relay_received")
        assert a.stats().relay_received == 0  # its own messages are skipped on receipt
        await local.close()
        await remote.close()


async def test_a_publish_with_no_local_subscriber_still_reaches_other_servers(
    redis: Redis,
) -> None:
    async with serve(handshake, pubsub=redis.url) as a, serve(handshake, pubsub=redis.url) as b:
        remote, _ = await subscriber(b.port)
        await redis.wait_numsub("lightws:room", 1)
        assert a.publish("room", b"\x00bin") == 0
        assert await remote.recv() == b"\x00bin"  # BINARY stays BINARY
        assert a.subscribers("room") == 0 and b.subscribers("room") == 1
        await remote.close()


async def test_whatever_else_appears_on_a_channel_never_reaches_clients(redis: Redis) -> None:
    async with serve(handshake, pubsub=redis.url) as a:
        ws, _ = await subscriber(a.port)
        await redis.wait_numsub("lightws:room", 1)
        header = b"LW\x01" + bytes(16)
        for junk in [
            b"plain text",
            header + b"\x81\x05abc",  # length says 5, 3 follow
            header + b"\x89\x00",  # a ping
            header + b"\x81\x83abcd...",  # masked
            b"XX\x01" + bytes(16) + b"\x81\x01a",  # wrong magic
        ]:
            await redis.command("PUBLISH", "lightws:room", junk)
        await redis.command("PUBLISH", "lightws:room", header + b"\x81\x02ok")
        assert await ws.recv() == "ok"
        assert a.stats().relay_received == 1
        await ws.close()


# -- faults --------------------------------------------------------------------------------


async def test_unreachable_redis_at_start_raises_oserror_naming_the_url() -> None:
    port = free_port()  # nothing listens there
    url = f"redis://user:secret@127.0.0.1:{port}/0"
    server = lightws.Server(lightws.Config(addr="127.0.0.1:0", handshake=handshake, pubsub=url))
    with pytest.raises(OSError) as e:
        await server.start()
    assert f"redis://user:***@127.0.0.1:{port}/0" in str(e.value)
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis://"])
async def test_a_malformed_url_is_a_value_error(url: str) -> None:
    server = lightws.Server(lightws.Config(addr="127.0.0.1:0", handshake=handshake, pubsub=url))
    with pytest.raises(ValueError, match=r"Config\.pubsub"):
        await server.start()


async def test_without_pubsub_stats_show_no_backplane() -> None:
    async with serve(handshake) as a:
        s = a.stats()
        assert (s.pubsub, s.relayed, s.unrelayed, s.relay_errors) == (None, 0, 0, 0)


async def test_redis_killed_and_restarted_mid_stream_loses_only_what_was_published_while_down(
    redis: Redis,
) -> None:
    async with serve(handshake, pubsub=redis.url) as a, serve(handshake, pubsub=redis.url) as b:
        local, _ = await subscriber(a.port)
        remote, _ = await subscriber(b.port)
        await redis.wait_numsub("lightws:room", 2)
        assert a.stats().pubsub == b.stats().pubsub == "connected"

        before = [f"before{i}" for i in range(100)]
        for m in before:
            a.publish("room", m)
        assert await receive(local, 100) == before
        assert await receive(remote, 100) == before

        await redis.kill()
        await until(lambda: a.stats().pubsub == "reconnecting", "a to see Redis gone")
        await until(lambda: b.stats().pubsub == "reconnecting", "b to see Redis gone")
        down = [f"down{i}" for i in range(50)]
        for m in down:
            assert a.publish("room", m) == 1  # local delivery goes on
        assert await receive(local, 50) == down

        await redis.start()  # same port
        await until(lambda: a.stats().pubsub == "connected", "a to reconnect", 15)
        await until(lambda: b.stats().pubsub == "connected", "b to reconnect", 15)
        await redis.wait_numsub("lightws:room", 2)  # both re-subscribed

        after = [f"after{i}" for i in range(100)]
        for m in after:
            a.publish("room", m)
        assert await receive(local, 100) == after
        # Remote: nothing of what was published while Redis was down, all of the rest.
        assert await receive(remote, 100) == after
        await nothing_more(remote)
        stats = a.stats()
        assert stats.unrelayed == len(down)
        assert stats.relayed == len(before) + len(after)
        assert stats.relay_errors >= 1 and b.stats().relay_errors >= 1
        await local.close()
        await remote.close()
