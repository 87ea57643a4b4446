"""The awaitables Connection methods return: accepted wherever a coroutine is, safe to
cancel or abandon, and fair to other tasks when they complete without waiting."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
from typing import Any

import lightws
import pytest
from support import eventually, reporting_handshake, serve, url
from websockets.asyncio.client import connect

Opcode = lightws.Opcode


async def test_create_task_of_recv_works_when_no_message_is_queued() -> None:
    async def body(conn: lightws.Connection) -> Any:
        task = asyncio.create_task(conn.recv())
        await conn.send("ready")
        return (await asyncio.wait_for(task, 5)).text

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "ready"
        await ws.send("hello")
        assert await asyncio.wait_for(outcome, 5) == "hello"


async def test_every_method_works_with_create_task_gather_wait_for_and_timeout() -> None:
    async def body(conn: lightws.Connection) -> Any:
        got = []
        got.append((await asyncio.create_task(conn.recv())).text)
        got.append((await asyncio.wait_for(conn.recv(), 5)).text)
        a, b = await asyncio.gather(conn.send("s1"), conn.send_text("s2"))
        assert a is None and b is None
        async with asyncio.timeout(5):
            got.append((await conn.recv()).text)
        await asyncio.create_task(conn.send_binary(b"s3"))
        await asyncio.wait_for(conn.send_ping(b"p"), 5)
        await asyncio.shield(conn.send(lightws.Message(Opcode.TEXT, b"s4")))
        await asyncio.create_task(conn.close(1000, "bye"))
        return got

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        for m in ("a", "b", "c"):
            await ws.send(m)
        received = [await asyncio.wait_for(ws.recv(), 5) for _ in range(4)]
        assert received == ["s1", "s2", b"s3", "s4"]
        assert await asyncio.wait_for(outcome, 5) == ["a", "b", "c"]
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1000


async def test_a_recv_that_is_never_awaited_takes_no_message_and_holds_no_slot() -> None:
    async def body(conn: lightws.Connection) -> Any:
        unawaited = conn.recv()
        del unawaited
        gc.collect()
        await conn.send("ready")
        first = await asyncio.wait_for(conn.recv(), 5)
        # A second receive after it still works: nothing kept the slot.
        second = await asyncio.wait_for(conn.recv(), 5)
        return [first.text, second.text]

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "ready"
        await ws.send("one")
        await ws.send("two")
        assert await asyncio.wait_for(outcome, 5) == ["one", "two"]


async def test_a_cancelled_create_task_recv_frees_the_slot_and_loses_nothing() -> None:
    async def body(conn: lightws.Connection) -> Any:
        task = asyncio.create_task(conn.recv())
        await asyncio.sleep(0)  # it is now waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A task cancelled before it ever ran takes nothing either.
        never_ran = asyncio.create_task(conn.recv())
        never_ran.cancel()
        with pytest.raises(asyncio.CancelledError):
            await never_ran
        await conn.send("ready")
        return (await asyncio.wait_for(conn.recv(), 5)).text

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "ready"
        await ws.send("kept")
        assert await asyncio.wait_for(outcome, 5) == "kept"


async def test_cancelling_a_recv_that_was_already_handed_its_message_gives_it_back() -> None:
    """The race asyncio leaves open: the future completes, then the waiter is
    cancelled before it runs. Driven by hand so the race happens every time."""

    async def body(conn: lightws.Connection) -> Any:
        results = []
        for how in ("throw", "close", "drop"):
            op: Any = conn.recv()
            fut = op.send(None)  # not queued yet: it yields its future
            assert asyncio.isfuture(fut)
            await conn.send(f"go {how}")
            await asyncio.wait_for(asyncio.shield(fut), 5)
            assert fut.result().text == f"msg {how}"  # handed over ...
            if how == "throw":
                with pytest.raises(asyncio.CancelledError):
                    op.throw(asyncio.CancelledError())
            elif how == "close":
                op.close()
            else:
                del op, fut
                gc.collect()
            # ... and given back: the next recv() returns it.
            results.append((await asyncio.wait_for(conn.recv(), 5)).text)
        return results

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        for how in ("throw", "close", "drop"):
            assert await asyncio.wait_for(ws.recv(), 5) == f"go {how}"
            await ws.send(f"msg {how}")
        assert await asyncio.wait_for(outcome, 5) == ["msg throw", "msg close", "msg drop"]


async def test_a_message_given_back_goes_to_a_reader_as_one_final_chunk() -> None:
    async def body(conn: lightws.Connection) -> Any:
        op: Any = conn.recv()
        fut = op.send(None)
        await conn.send("go")
        await asyncio.wait_for(asyncio.shield(fut), 5)
        op.close()
        reader = conn.reader()
        chunks = [c async for c in reader]
        return reader.opcode, chunks

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "go"
        await ws.send(b"whole")
        assert await asyncio.wait_for(outcome, 5) == (Opcode.BINARY, [b"whole"])


async def test_a_second_concurrent_recv_raises_a_clear_runtime_error() -> None:
    async def body(conn: lightws.Connection) -> Any:
        first = asyncio.create_task(conn.recv())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already waiting"):
            await conn.recv()
        first.cancel()
        return "ok"

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)):
        assert await asyncio.wait_for(outcome, 5) == "ok"


async def test_a_cancelled_writer_begin_does_not_keep_the_writer_slot() -> None:
    async def body(conn: lightws.Connection) -> Any:
        async with conn.writer() as w:
            await w.write(b"a")
            # Another writer waits for this one; cancelling it must not leave the slot
            # taken when this one ends.
            waiting = asyncio.create_task(conn.writer().__aenter__())
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        await asyncio.wait_for(conn.send("after"), 5)
        return "ok"

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == b"a"
        assert await asyncio.wait_for(ws.recv(), 5) == "after"
        assert await asyncio.wait_for(outcome, 5) == "ok"


async def _count_loop_turns(stop: asyncio.Event) -> int:
    turns = 0
    while not stop.is_set():
        await asyncio.sleep(0)
        turns += 1
    return turns


async def test_draining_a_queued_burst_lets_other_tasks_run() -> None:
    count = 2000
    release = asyncio.Event()

    async def body(conn: lightws.Connection) -> Any:
        await release.wait()
        stop = asyncio.Event()
        other = asyncio.create_task(_count_loop_turns(stop))
        await asyncio.sleep(0)  # let it start
        for _ in range(count):
            await conn.recv()
        turns_recv = 0
        stop.set()
        turns_recv = await other
        stop.clear()
        other = asyncio.create_task(_count_loop_turns(stop))
        await asyncio.sleep(0)
        for i in range(count):
            await conn.send(str(i))
        stop.set()
        return turns_recv, await other

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        for i in range(count):
            await ws.send(str(i))
        # Every message is in the server's queue before the handler starts reading, so
        # each recv() completes without waiting for input.
        await eventually(lambda: server.stats().frames_in.get(Opcode.TEXT, 0) >= count, 10)
        release.set()
        turns_recv, turns_send = await asyncio.wait_for(outcome, 30)
        for _ in range(count):
            await asyncio.wait_for(ws.recv(), 5)
    # Without the fairness yield the other task would not run at all during either
    # loop; with it, once every 32 operations.
    assert turns_recv >= count // 64
    assert turns_send >= count // 64


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is 3.11+")
async def test_asyncio_timeout_cancels_a_pending_recv_and_the_next_one_works() -> None:
    async def body(conn: lightws.Connection) -> Any:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await conn.recv()
        await conn.send("ready")
        return (await asyncio.wait_for(conn.recv(), 5)).text

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "ready"
        await ws.send("after timeout")
        assert await asyncio.wait_for(outcome, 5) == "after timeout"


async def test_a_send_waiting_behind_a_writer_is_sent_unless_cancelled() -> None:
    async def body(conn: lightws.Connection) -> Any:
        async with conn.writer() as w:
            await w.write(b"frag")
            conn.send("dropped unawaited")  # queued all the same
            gc.collect()
            cancelled = asyncio.create_task(conn.send("cancelled"))
            awaited = asyncio.create_task(conn.send("awaited"))
            await asyncio.sleep(0)
            cancelled.cancel()
        await asyncio.wait_for(awaited, 5)
        await conn.send("end")
        return "ok"

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(4)]
        assert got == [b"frag", "dropped unawaited", "awaited", "end"]
        assert await asyncio.wait_for(outcome, 5) == "ok"


async def test_a_task_resumed_by_a_message_keeps_its_context_and_is_the_current_task() -> None:
    """A waiting recv() is resumed without an asyncio.Future (the task's wakeup runs in
    the hub's drain): the task still runs in its own context, as the current task, and
    a recv() waited on by several consumers at once (shield, gather) completes them
    all."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def body(conn: lightws.Connection) -> Any:
        var.set("handler")
        me = asyncio.current_task()
        await conn.send("ready")
        first = await conn.recv()
        seen = [(first.text, var.get(), asyncio.current_task() is me)]
        op: Any = conn.recv()
        fut = op.send(None)
        assert not fut.done() and fut.get_loop() is asyncio.get_running_loop()
        shielded = asyncio.shield(fut)
        both = asyncio.gather(fut, shielded)
        await conn.send("more")
        a, b = await asyncio.wait_for(both, 5)
        seen.append((a.text, b.text, fut.result().text))
        with pytest.raises(StopIteration):
            op.send(None)
        return seen

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "ready"
        await ws.send("one")
        assert await asyncio.wait_for(ws.recv(), 5) == "more"
        await ws.send("two")
        assert await asyncio.wait_for(outcome, 5) == [
            ("one", "handler", True),
            ("two", "two", "two"),
        ]


async def test_cancelling_a_task_waiting_in_recv_cancels_it_with_its_message() -> None:
    async def body(conn: lightws.Connection) -> Any:
        task = asyncio.create_task(conn.recv())
        await asyncio.sleep(0)
        task.cancel("stop")
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        await conn.send("ready")
        return (info.value.args, (await asyncio.wait_for(conn.recv(), 5)).text)

    handshake, outcome = reporting_handshake(body)
    async with serve(handshake) as server, connect(url(server)) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "ready"
        await ws.send("after")
        assert await asyncio.wait_for(outcome, 5) == (("stop",), "after")
