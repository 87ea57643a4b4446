"""The server half of the fault storm (bench/fault_storm.py, tests/test_fault_storm.py).

Runs a lightws server in its own process so that a frozen event loop can be watched
from outside:

    python bench/storm_server.py [--loop asyncio|uvloop] [--app storm|issue]
                                 [--write-limit 65536] [--dump-file PATH]
                                 [--threads N]

It prints ``PORT <n>`` on stdout once listening. With ``http_fallback`` on, plain HTTP
requests are answered by the handshake callable, which runs on the event-loop thread:

- ``GET /probe`` answers ``ok`` (the parent's loop watchdog times this);
- ``GET /stats`` answers JSON: ``server.stats()`` counters, handler bookkeeping and the
  largest event-loop lag seen from inside (``?trim=1`` first calls ``malloc_trim(0)``
  so the parent's RSS reading shows live memory, not what the allocator keeps).

Upgrades pick a handler with ``?mode=`` (see MODES), or a listener or
``lightws.Accept`` (see LISTENER_MODES: ``l_echo``, ``l_send``, ``l_raise``, ``l_close``,
``l_pubsub``, ``accept``); ``--app issue`` instead accepts every upgrade with the
handler of issue 9's reproducer, unchanged.

Every log record goes to stderr as one JSON line (root logger, so asyncio's "Task
exception was never retrieved" and lightws's own records alike); unraisable exceptions
and thread exceptions are logged too. SIGUSR1 dumps every thread's Python stack to
``--dump-file`` (faulthandler: works while the loop thread is stuck holding the GIL).
SIGTERM closes the server gracefully and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import faulthandler
import json
import logging
import random
import signal
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import lightws

#: Deliberately raised by handlers; the storm whitelists exactly the log record it causes.
DELIBERATE = "StormDeliberateError"


class StormDeliberateError(Exception):
    """Raised on purpose by the ``raise`` mode (whitelisted in the parent's log check)."""


class JsonLines(logging.Handler):
    """One JSON object per record on stderr: level, logger, message, exception type."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info
        line = {
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "exc_type": exc[0].__name__ if exc and exc[0] else None,
            "traceback": "".join(traceback.format_exception(*exc)) if exc and exc[0] else None,
        }
        try:
            sys.stderr.write(json.dumps(line) + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - stderr gone
            pass


def setup_logging() -> None:
    root = logging.getLogger()
    root.handlers[:] = [JsonLines()]
    root.setLevel(logging.INFO)
    log = logging.getLogger("storm")

    def unraisable(u: Any) -> None:
        log.error(
            "unraisable exception in %r: %s",
            u.object,
            u.err_msg or "",
            exc_info=(u.exc_type, u.exc_value, u.exc_traceback),
        )

    def thread_exc(a: threading.ExceptHookArgs) -> None:
        log.error(
            "exception in thread %s",
            a.thread.name if a.thread else "?",
            exc_info=(a.exc_type, a.exc_value or a.exc_type(), a.exc_traceback),
        )

    sys.unraisablehook = unraisable
    threading.excepthook = thread_exc


# -- bookkeeping ---------------------------------------------------------------------------

started: Counter[str] = Counter()
outcomes: Counter[str] = Counter()
running: Counter[str] = Counter()
lag = {"max": 0.0}
server_ref: list[lightws.Server] = []


def payload(size: int) -> bytes:
    # A new object per send, like real handlers: a leaked reference leaks real memory.
    return b"x" * size


async def lag_monitor() -> None:
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(0.05)
        lag["max"] = max(lag["max"], loop.time() - t - 0.05)


def snapshot(trim: bool) -> dict[str, Any]:
    if trim:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    st = server_ref[0].stats()
    return {
        "connections": st.connections,
        "max_connections": st.max_connections,
        "handshakes": st.handshakes,
        "handshakes_failed": st.handshakes_failed,
        "bytes_in": st.bytes_in,
        "bytes_out": st.bytes_out,
        "open_connection_objects": len(server_ref[0].connections),
        "handlers_started": dict(started),
        "handlers_running": sum(running.values()),
        "handlers_running_by_mode": {k: v for k, v in running.items() if v},
        "outcomes": dict(outcomes),
        "loop_lag_max": lag["max"],
        "tasks": len(asyncio.all_tasks()),
    }


# -- handler modes -------------------------------------------------------------------------

Params = dict[str, str]
Mode = Callable[[lightws.Connection, Params, random.Random], Awaitable[None]]
CLOSED = lightws.ConnectionClosed


def num(p: Params, key: str, default: float) -> float:
    return float(p.get(key, default))


async def echo_until_closed(conn: lightws.Connection) -> None:
    async for msg in conn:
        await conn.send(msg)


async def mode_echo(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    await echo_until_closed(conn)


async def mode_send(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """``n`` messages of ``size`` bytes (over write_limit: fragmented), then echo."""
    for _ in range(int(num(p, "n", 4))):
        await conn.send(payload(int(num(p, "size", 1 << 20))))
    await echo_until_closed(conn)


async def mode_send_timeout(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """Issue 9's handler: give up on a peer that stops reading, then return."""
    try:
        for _ in range(int(num(p, "n", 64))):
            await asyncio.wait_for(conn.send(payload(int(num(p, "size", 1 << 20)))), num(p, "t", 2))
    except (asyncio.TimeoutError, CLOSED):
        pass


async def mode_cancel_send(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """Sends cancelled by a timeout, and the connection used afterwards."""
    for _ in range(int(num(p, "n", 8))):
        size = rng.choice([100, 20_000, 1 << 20])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(conn.send(payload(size)), rng.uniform(0.0, num(p, "t", 0.2)))
    await echo_until_closed(conn)


async def mode_cancel_recv(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """recv() cancelled by short timeouts, racing the client's messages; echo what comes."""
    t = num(p, "t", 0.05)
    while True:
        try:
            msg = await asyncio.wait_for(conn.recv(), rng.uniform(0.0, t))
        except asyncio.TimeoutError:
            continue
        await conn.send(msg)


async def write_chunks(conn: lightws.Connection, n: int, size: int, binary: bool = True) -> None:
    async with conn.writer(binary=binary) as w:
        for _ in range(n):
            await w.write(payload(size) if binary else "y" * size)


async def mode_writer(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """One message through conn.writer() (``n`` chunks of ``size``), then echo."""
    await write_chunks(
        conn, int(num(p, "n", 16)), int(num(p, "size", 64 << 10)), rng.random() < 0.8
    )
    await echo_until_closed(conn)


async def mode_writer_abort(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """A writer abandoned halfway: an exception inside the block, or its task cancelled."""
    n, size = int(num(p, "n", 32)), int(num(p, "size", 64 << 10))
    stop_after = rng.randrange(n)
    if rng.random() < 0.5:

        async def raising() -> None:
            async with conn.writer() as w:
                for i in range(n):
                    if i == stop_after:
                        raise StormDeliberateError("abandon the writer")
                    await w.write(payload(size))

        with contextlib.suppress(StormDeliberateError):
            await raising()
    else:
        task = asyncio.ensure_future(write_chunks(conn, n, size))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(task, rng.uniform(0.0, num(p, "t", 0.3)))
    after = rng.choice(["echo", "close", "abort", "return"])
    if after == "echo":
        await echo_until_closed(conn)
    elif after == "close":
        await conn.close(rng.choice([1000, 1001, 4000]))
    elif after == "abort":
        conn.abort()


async def mode_reader(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """Each message through conn.reader(); answers with its length."""
    while True:
        r = conn.reader()
        total = 0
        async for chunk in r:
            total += len(chunk)
        await conn.send(str(total))


async def mode_reader_abort(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """Reads part of a message with conn.reader(), then gives up on the connection."""
    r = conn.reader()
    for _ in range(rng.randrange(4)):
        try:
            await asyncio.wait_for(r.__anext__(), rng.uniform(0.0, num(p, "t", 0.5)))
        except (asyncio.TimeoutError, StopAsyncIteration):
            break
    if rng.random() < 0.5:
        conn.abort()
    else:
        await conn.close(rng.choice([1000, 1008, 4001]))


async def mode_concurrent(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """Several tasks sending on one connection at once (small, large, writers,
    pings), some of them cancelled by timeouts; plus a receiving task."""

    async def sender(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(r.randrange(1, 6)):
            kind = r.choice(["small", "big", "writer", "ping", "timeout"])
            if kind == "small":
                await conn.send(payload(r.randrange(1, 4096)))
            elif kind == "big":
                await conn.send(payload(r.choice([100_000, 1 << 20])))
            elif kind == "writer":
                await write_chunks(conn, r.randrange(1, 8), r.choice([10, 30_000]))
            elif kind == "ping":
                await conn.send_ping(b"p" * r.randrange(126))
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(conn.send(payload(1 << 20)), r.uniform(0.0, 0.2))

    async def receiver() -> None:
        async for _ in conn:
            pass

    tasks = [
        asyncio.ensure_future(sender(rng.randrange(1 << 30))) for _ in range(rng.randrange(2, 6))
    ]
    rx = asyncio.ensure_future(receiver())
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, CLOSED):
                raise res
        await rx
    finally:
        for t in [*tasks, rx]:
            t.cancel()
        await asyncio.gather(*tasks, rx, return_exceptions=True)


async def mode_close_abort(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """close() racing abort(), optionally with a large send in flight."""
    sending = None
    if rng.random() < 0.6:
        sending = asyncio.ensure_future(conn.send(payload(rng.choice([1000, 1 << 20]))))
        await asyncio.sleep(rng.uniform(0.0, 0.05))
    order = rng.choice(["close-abort", "abort-close", "close-sleep-abort"])
    if order == "abort-close":
        conn.abort()
        await conn.close(1000)
    else:
        closing = asyncio.ensure_future(conn.close(rng.choice([1000, 1001, 4002])))
        if order == "close-sleep-abort":
            await asyncio.sleep(rng.uniform(0.0, 0.05))
        conn.abort()
        await closing
    if sending is not None:
        with contextlib.suppress(CLOSED):
            await sending


async def mode_close_race(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """Echo until "close", then close at once: the client sends its own close frame
    right after "close", so both close frames cross."""
    async for msg in conn:
        if msg.body == b"close":
            await conn.close(rng.choice([1000, 1001, 4003]), "both")
            return
        await conn.send(msg)


async def mode_ping(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """Server pings while echoing (the client may flood pings and stop reading)."""

    async def pinger() -> None:
        for i in range(int(num(p, "n", 200))):
            await conn.send_ping(str(i).encode())
            await asyncio.sleep(rng.uniform(0.0, 0.01))

    task = asyncio.ensure_future(pinger())
    try:
        await echo_until_closed(conn)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, CLOSED):
            await task


async def mode_raise(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """The handler raises (logged as ERROR, closed with 1011), maybe with a large send
    still going out."""
    if rng.random() < 0.7:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(conn.send(payload(1 << 20)), rng.uniform(0.0, 0.1))
    raise StormDeliberateError("the handler fails on purpose")


async def mode_pubsub(conn: lightws.Connection, p: Params, rng: random.Random) -> None:
    """Fan-out under faults: join one of a few rooms shared with other storm
    connections, publish to it (sizes up to over write_limit) and broadcast while a
    large send is going out in fragments (a published frame must never land between
    them), leave and rejoin, then relay what the client sends to the room."""
    server = conn.server
    room = f"room{rng.randrange(4)}"
    conn.subscribe(room)
    conn.storm_room = room  # own attributes on a connection

    async def publisher() -> None:
        for i in range(int(num(p, "n", 40))):
            server.publish(room, payload(rng.choice([10, 1000, 100_000])))
            if i % 10 == 0:
                # Only to other pubsub connections (the rest check their echoes);
                # some of them are closed or closing by now.
                lightws.broadcast(list(pubsub_conns)[:20], payload(200))
            if i % 17 == 0:
                conn.unsubscribe(room)
                conn.subscribe(room)
            await asyncio.sleep(rng.uniform(0.0, 0.01))

    pubsub_conns.add(conn)
    task = asyncio.ensure_future(publisher())
    try:
        await conn.send(payload(1 << 20))
        async for msg in conn:
            server.publish(conn.storm_room, msg, exclude=conn)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Kept a little after the end, so that broadcasts also meet closed connections.
        asyncio.get_running_loop().call_later(0.5, pubsub_conns.discard, conn)


#: Connections in pubsub mode (the only ones broadcast to).
pubsub_conns: set[lightws.Connection] = set()


MODES: dict[str, Mode] = {
    "pubsub": mode_pubsub,
    "echo": mode_echo,
    "send": mode_send,
    "send_timeout": mode_send_timeout,
    "cancel_send": mode_cancel_send,
    "cancel_recv": mode_cancel_recv,
    "writer": mode_writer,
    "writer_abort": mode_writer_abort,
    "reader": mode_reader,
    "reader_abort": mode_reader_abort,
    "concurrent": mode_concurrent,
    "close_abort": mode_close_abort,
    "close_race": mode_close_race,
    "ping": mode_ping,
    "raise": mode_raise,
}


# -- listener modes (no coroutine per connection) ----------------------------------------

log = logging.getLogger("storm")
#: The mode of every listener connection between its on_open and its on_close.
listener_open: dict[int, str] = {}


class StormListener:
    """Bookkeeping around a listener mode's ``opened``/``message``/``closed``: every
    on_open is followed by exactly one on_close, no on_message comes before on_open or
    after on_close (logged as ERROR otherwise: the storm fails on it), and a send on a
    connection closed meanwhile (``ConnectionClosed``, e.g. after a 1013) is counted.
    ``running`` counts the connections between on_open and on_close, like the coroutine
    modes' running handlers."""

    mode = ""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.rng = random.Random(params.get("seed", "0"))

    def on_open(self, conn: lightws.Connection) -> None:
        if conn.id in listener_open:
            log.error("%s: on_open twice for #%d", self.mode, conn.id)
        started[self.mode] += 1
        running[self.mode] += 1
        listener_open[conn.id] = self.mode
        self.call(self.opened, conn)

    def on_message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        if listener_open.get(conn.id) != self.mode:
            log.error("%s: on_message outside on_open..on_close for #%d", self.mode, conn.id)
        self.call(self.message, conn, msg)

    def on_close(self, conn: lightws.Connection, code: int, reason: str) -> None:
        if listener_open.pop(conn.id, None) != self.mode:
            log.error("%s: on_close without on_open for #%d (code %d)", self.mode, conn.id, code)
            return
        running[self.mode] -= 1
        outcomes[f"{self.mode}:closed-{code}"] += 1
        self.closed(conn, code)

    def call(self, method: Callable[..., None], *args: Any) -> None:
        try:
            method(*args)
        except CLOSED:
            outcomes[f"{self.mode}:send-closed"] += 1
        except StormDeliberateError:
            outcomes[f"{self.mode}:raised"] += 1
            raise

    def opened(self, conn: lightws.Connection) -> None:
        pass

    def message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        pass

    def closed(self, conn: lightws.Connection, code: int) -> None:
        pass


class EchoListener(StormListener):
    """``l_echo``: every message back through ``send_nowait``. One instance serves
    every ``l_echo`` connection."""

    mode = "l_echo"

    def message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        conn.send_nowait(msg)


class SendListener(EchoListener):
    """``l_send``: ``n`` messages of ``size`` bytes from on_open through send_nowait (a
    reader that stalls goes over max_backpressure: closed 1013, and the sends after
    that raise ConnectionClosed), then echo."""

    mode = "l_send"

    def opened(self, conn: lightws.Connection) -> None:
        size = int(num(self.params, "size", 100_000))
        for _ in range(int(num(self.params, "n", 8))):
            conn.send_nowait(payload(size))


class RaiseListener(StormListener):
    """``l_raise``: raises on purpose ``where=open``, on the ``k``-th message
    (``where=message``; the ones before are echoed) or ``where=close`` (logged as ERROR:
    whitelisted and counted like the ``raise`` mode's)."""

    mode = "l_raise"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.where = params.get("where", "message")
        self.left = int(num(params, "k", 0))

    def opened(self, conn: lightws.Connection) -> None:
        if self.where == "open":
            raise StormDeliberateError("the listener fails in on_open on purpose")

    def message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        if self.where == "message":
            if self.left == 0:
                raise StormDeliberateError("the listener fails in on_message on purpose")
            self.left -= 1
        conn.send_nowait(msg)

    def closed(self, conn: lightws.Connection, code: int) -> None:
        if self.where == "close":
            outcomes[f"{self.mode}:raised"] += 1
            raise StormDeliberateError("the listener fails in on_close on purpose")


class CloseListener(StormListener):
    """``l_close``: on the first message (or in on_open with ``when=open``) queues
    ``burst`` messages of 64 KiB (under max_backpressure), then ``conn.close(code,
    "bye")`` with its awaitable ignored, or ``conn.abort()`` (``how``)."""

    mode = "l_close"

    def opened(self, conn: lightws.Connection) -> None:
        if self.params.get("when") == "open":
            self.finish(conn)

    def message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        self.finish(conn)

    def finish(self, conn: lightws.Connection) -> None:
        if conn.closed:
            return
        for _ in range(int(num(self.params, "burst", 0))):
            conn.send_nowait(payload(64 << 10))
        if self.params.get("how") == "abort":
            conn.abort()
        else:
            _ = conn.close(int(num(self.params, "code", 4000)), "bye")


class PubsubListener(StormListener):
    """``l_pubsub``: joins ``room`` (default one of room0..room3, shared with the
    ``pubsub`` and ``accept`` modes), publishes ``flood`` messages of ``size`` bytes to
    it from on_open (itself included), then relays what the client sends to the room
    (exclude itself) and answers with a short ack; every 7th message it leaves and
    rejoins; broadcasts to the ``pubsub`` connections now and then."""

    mode = "l_pubsub"

    def opened(self, conn: lightws.Connection) -> None:
        server = conn.server
        assert server is not None
        room = self.params.get("room") or f"room{self.rng.randrange(4)}"
        conn.subscribe(room)
        conn.storm_room = room  # own attributes: the same object for every event
        size = int(num(self.params, "size", 64 << 10))
        for _ in range(int(num(self.params, "flood", 0))):
            server.publish(room, payload(size))
        self.count = 0

    def message(self, conn: lightws.Connection, msg: lightws.Message) -> None:
        server = conn.server
        assert server is not None
        room = conn.storm_room
        server.publish(room, msg, exclude=conn)
        self.count += 1
        if self.count % 7 == 0:
            conn.unsubscribe(room)
            conn.subscribe(room)
        if self.count % 5 == 0:
            lightws.broadcast(list(pubsub_conns)[:20], payload(200))
        conn.send_nowait(b"ack")


_ECHO_LISTENER = EchoListener({})

#: Listener modes: a listener (or an Accept) for the connection, from its query.
LISTENER_MODES: dict[str, Callable[[Params], Any]] = {
    "l_echo": lambda p: _ECHO_LISTENER,  # one instance for every connection
    "l_send": SendListener,
    "l_raise": RaiseListener,
    "l_close": CloseListener,
    "l_pubsub": PubsubListener,
    # Subscribed, no listener: handled in Rust (publishes out, anything in discarded).
    "accept": lambda p: lightws.Accept(topics=[p.get("room", "room0")]),
}


def make_handler(mode: str, run: Mode, params: Params) -> lightws.Handler:
    async def handler(conn: lightws.Connection) -> None:
        started[mode] += 1
        running[mode] += 1
        rng = random.Random(params.get("seed", "0"))
        try:
            await run(conn, params, rng)
            outcomes[f"{mode}:returned"] += 1
        except CLOSED:
            outcomes[f"{mode}:closed"] += 1
        except StormDeliberateError:
            outcomes[f"{mode}:raised"] += 1
            raise
        except asyncio.CancelledError:
            outcomes[f"{mode}:cancelled"] += 1
            raise
        except BaseException:
            outcomes[f"{mode}:unexpected"] += 1
            raise  # lightws logs it as ERROR: the storm fails on that line
        finally:
            running[mode] -= 1

    return handler


def storm_handshake(request: lightws.Request, response: lightws.Response) -> Any:
    if not request.upgrade:
        if request.path == "/probe":
            response.body = b"ok"
        elif request.path == "/stats":
            response.headers["Content-Type"] = "application/json"
            response.body = json.dumps(snapshot(request.query.get("trim") == "1")).encode()
        return None
    mode = request.query.get("mode", "echo")
    if mode in LISTENER_MODES:
        if mode == "accept":
            started[mode] += 1  # nothing of it runs in Python after this
        return LISTENER_MODES[mode](dict(request.query))
    run = MODES.get(mode)
    if run is None:
        response.status = 400
        response.body = f"unknown mode {mode!r}"
        return None
    return make_handler(mode, run, dict(request.query))


def issue_handshake(request: lightws.Request, response: lightws.Response) -> Any:
    """Issue 9's reproducer, unchanged, behind the probe/stats endpoints."""
    if not request.upgrade:
        return storm_handshake(request, response)

    async def handler(conn: lightws.Connection) -> None:
        try:
            for _ in range(64):  # 1 MiB messages, over write_limit: sent in fragments
                await asyncio.wait_for(conn.send(b"x" * (1 << 20)), 2.0)
        except (asyncio.TimeoutError, lightws.ConnectionClosed):
            pass  # the peer stopped reading; the handler returns

    return handler


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    config = lightws.Config(
        addr="127.0.0.1:0",
        handshake=issue_handshake if args.app == "issue" else storm_handshake,
        write_limit=args.write_limit,
        max_msg_len=4 << 20,
        http_fallback=True,
        log_level=lightws.LogLevel.WARN,
        close_timeout=args.close_timeout,
        # Small enough that stalled storm clients in pubsub rooms hit it (closed 1013).
        max_backpressure=512 * 1024,
        pubsub=args.pubsub,
        # --compression: permessage-deflate for the clients that offer it (all of them
        # in a storm with compression).
        compression=lightws.Deflate() if args.compression else None,
        # --threads 0: connections driven on the event-loop thread (onloop.rs).
        threads=args.threads,
    )
    monitor = asyncio.ensure_future(lag_monitor())
    async with lightws.Server(config) as server:
        server_ref.append(server)
        print(f"PORT {server.port}", flush=True)
        await stop.wait()
        logging.getLogger("storm").info("SIGTERM: closing")
    monitor.cancel()
    logging.getLogger("storm").info("closed cleanly")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--app", choices=["storm", "issue"], default="storm")
    p.add_argument("--write-limit", type=int, default=64 * 1024)
    p.add_argument("--close-timeout", type=float, default=5.0)
    p.add_argument("--pubsub", default=None, help="Redis URL for Config.pubsub (the relay)")
    p.add_argument("--dump-file", default=None)
    p.add_argument("--compression", action="store_true", help="permessage-deflate on")
    p.add_argument("--threads", type=int, default=1, help="Config.threads (0: on the loop)")
    a = p.parse_args()
    setup_logging()
    if a.dump_file:
        dump = open(a.dump_file, "w")
        faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
        faulthandler.enable(file=dump, all_threads=True)
    if a.loop == "uvloop":
        import uvloop

        uvloop.run(main(a))
    else:
        asyncio.run(main(a))
