"""Fault storm: hostile clients against a lightws server while a watchdog times its loop.

    python bench/fault_storm.py --minutes 10 --seed 7 [--loop asyncio|uvloop] [--threads 0]
                                [--concurrency 32] [--keep-dir DIR]

The server (bench/storm_server.py) runs in a subprocess. Many concurrent raw-socket
clients each pick, from a seeded ``random.Random``, one fault (see KINDS): resets (RST,
SO_LINGER 0) mid-handshake, mid-frame, mid-fragmented-send and mid-close; peers that stop
reading; handlers told (``?mode=``) to cancel their ``recv()``/``send()``, to abandon a
``conn.writer()``/``conn.reader()``, to send from several tasks at once, to race
``close()`` against ``abort()``, or to raise; ping floods; both sides closing at once;
plus clean echoes whose every byte is checked. The same faults reach connections
without a coroutine: listeners (echo and bulk sends through ``send_nowait``, listeners
that raise, close or abort, or publish) and ``lightws.Accept(topics=...)`` connections
receiving publishes, some of them stalled past ``max_backpressure`` (closed 1013).
Every frame the server sends is checked against RFC 6455 (unmasked, RSV clear, control
frames short and whole, continuations only inside a fragmented message, nothing after
the close frame).

A watchdog thread in this process GETs ``/probe`` every 200 ms: the answer comes from
the handshake callable, on the server's event-loop thread, so it times the loop. Any
probe over 1 s is a stall (failure); a probe unanswered for ``freeze_after`` seconds (or
the storm overrunning its deadline) stops everything, dumps the server's threads
(faulthandler on SIGUSR1 for the Python stacks, gdb for the native ones when installed)
and fails.

Afterwards: ``stats().connections`` and the running handlers must return to 0, a fresh
``websockets`` client must get its echo, RSS must be back within ``rss_slack_mib`` of
where it started, the server must exit 0 on SIGTERM, and its log (JSON lines on stderr)
must hold no ERROR and no traceback except the ones the ``raise`` and ``l_raise`` modes
cause on purpose (exactly one per raise). Every listener connection opened must have
been closed exactly once (on_open, then on_close), with no on_message outside them.

The RSS bound. Both readings (after a warm-up echo, and after the storm) are taken
after ``malloc_trim(0)`` in the server: lightws raises glibc's trim threshold to 32 MiB,
so freed memory would otherwise stay resident and the reading would show the storm's
peak rather than what is still alive (the raw end RSS is reported too). At most
``concurrency`` connections are open at once, each holding a few MiB at most (a 1 MiB
payload per sending task, two ``write_limit`` fragments queued, a reader's chunk), so
the storm's live data peaks around 10-40 MiB and none of it may outlive its connection.
Leaking one payload or one outbox per faulted connection (hundreds of them in the short
test, tens of thousands in ten minutes) overshoots 64 MiB, while allocator and
interpreter noise stays within a few MiB (measured: +1 to +2 MiB).

``run_storm()`` is what tests/test_fault_storm.py calls (a short, seeded run); the
command line is the long version and prints the same report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "storm_server.py"
if str(HERE.parent / "tests") not in sys.path:
    sys.path.append(str(HERE.parent / "tests"))

# Frame encoding and the upgrade request, shared with the tests (tests/support/rawws.py).
from support import rawws  # noqa: E402
from support.rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, build_frame  # noqa: E402

#: The watchdog's bound: the event loop must answer every probe within this (seconds).
STALL_BOUND = 1.0
#: What the ``raise`` mode makes lightws log, on purpose (exact message and exception);
#: the ``l_raise`` mode's records carry the same exception.
DELIBERATE_MSG = "handler raised; closing with 1011"
DELIBERATE_EXC = "StormDeliberateError"
#: Exceptions that may appear in a log record without failing the storm.
EXPECTED_EXC = {"ConnectionClosed", "ConnectionClosedOK", "ConnectionClosedError"}
#: Longest a single client scenario may take before it counts as stuck (seconds).
SCENARIO_CAP = 30.0
#: Generous bound for client-side waits on the server (a loaded 2-core machine).
WAIT = 10.0


# -- the server process --------------------------------------------------------------------


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


class ServerProcess:
    """bench/storm_server.py in a subprocess: its port, stderr log and thread dumps."""

    def __init__(
        self,
        workdir: Path,
        *,
        app: str = "storm",
        loop: str = "asyncio",
        write_limit: int = 64 * 1024,
        pubsub: str | None = None,
        compression: bool = False,
        threads: int = 1,
    ) -> None:
        self.workdir = workdir
        self.stderr_path = workdir / f"server-{app}-{loop}.stderr"
        self.dump_path = workdir / f"server-{app}-{loop}.dump"
        self.gdb_path = workdir / f"server-{app}-{loop}.gdb.txt"
        self._stderr = open(self.stderr_path, "w")
        cmd = [sys.executable, str(SERVER_SCRIPT), "--app", app, "--loop", loop]
        cmd += ["--write-limit", str(write_limit), "--dump-file", str(self.dump_path)]
        if pubsub:
            cmd += ["--pubsub", pubsub]
        if compression:
            cmd.append("--compression")
        cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, text=True
        )
        self.port = self._read_port(timeout=60.0)
        self.returncode: int | None = None

    def _read_port(self, timeout: float) -> int:
        line: list[str] = []
        assert self.proc.stdout is not None
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith("PORT "):
            self.kill()
            raise RuntimeError(f"storm server did not start: {self.stderr_text()[-2000:]}")
        return int(line[0].split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory(self) -> dict[str, int]:
        try:
            return proc_memory(self.pid)
        except OSError:
            return {}

    def get(self, path: str, timeout: float = WAIT) -> bytes:
        """GET ``path`` (answered on the server's loop thread); the body."""
        status, body = http_get(self.port, path, timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status}")
        return body

    def stats(self, trim: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/stats?trim=1" if trim else "/stats"))
        return result

    def dump_threads(self) -> str:
        """Python stacks of every thread (faulthandler on SIGUSR1) and, if gdb is
        installed, the native ones; the full gdb output stays in ``gdb_path``."""
        if not self.alive():
            return "(server process already exited)"
        before = self.dump_path.stat().st_size if self.dump_path.exists() else 0
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGUSR1)
        time.sleep(1.0)
        text = ""
        with contextlib.suppress(OSError):
            with open(self.dump_path) as f:
                f.seek(before)
                text = "== Python threads (faulthandler) ==\n" + f.read()
        gdb = shutil.which("gdb")
        if gdb and self.alive():
            try:
                out = subprocess.run(
                    [gdb, "-p", str(self.pid), "-batch", "-ex", "thread apply all bt"],
                    capture_output=True,
                    text=True,
                    timeout=120,
                ).stdout
                self.gdb_path.write_text(out)
                text += "\n== native threads (gdb, frames of interest) ==\n" + native_summary(out)
                text += f"\n(full gdb output: {self.gdb_path})\n"
            except (OSError, subprocess.SubprocessError) as e:
                text += f"\n(gdb failed: {e})\n"
        return text

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then wait; None if it did not exit (then it is killed)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self.returncode = self.proc.returncode
        self._stderr.close()
        return self.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._stderr.close()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


def native_summary(gdb_out: str, limit: int = 80) -> str:
    """The gdb backtrace lines worth reading: thread headers and frames in lightws,
    parking_lot, pyo3, tokio or the C library's waits."""
    keep = re.compile(r"^Thread |^#\d+ .*(lightws|parking_lot|futex|pthread_mutex|epoll_wait)")
    lines = [ln for ln in gdb_out.splitlines() if keep.search(ln)]
    return "\n".join(ln[:220] for ln in lines[:limit])


def http_get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """A blocking HTTP/1.1 GET over a fresh connection; (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if sep and m and len(body) >= int(m.group(1)):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    return status, body


class Prober(threading.Thread):
    """The loop watchdog: GET /probe every ``interval`` s, in its own thread with
    blocking sockets (so the storm's own asyncio loop cannot delay it)."""

    def __init__(self, port: int, interval: float = 0.2, freeze_after: float = 10.0) -> None:
        super().__init__(name="loop-watchdog", daemon=True)
        self.port = port
        self.interval = interval
        self.freeze_after = freeze_after
        self.done = threading.Event()
        self.frozen = threading.Event()
        self.count = 0
        self.max_latency = 0.0
        self.stalls: list[tuple[float, float]] = []  # (seconds since start, latency)
        self.errors: list[str] = []
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.monotonic()
            try:
                status, body = http_get(self.port, "/probe", self.freeze_after)
                if status != 200 or body != b"ok":
                    self.errors.append(f"probe answered {status} {body[:80]!r}")
            except TimeoutError:
                latency = time.monotonic() - t0
                self.max_latency = max(self.max_latency, latency)
                self.stalls.append((t0 - self.started_at, latency))
                self.frozen.set()
                return
            except OSError as e:
                self.errors.append(f"probe failed: {e!r}")
            latency = time.monotonic() - t0
            self.count += 1
            self.max_latency = max(self.max_latency, latency)
            if latency > STALL_BOUND:
                self.stalls.append((t0 - self.started_at, latency))
            self.done.wait(max(0.0, self.interval - latency))

    def stop(self) -> None:
        self.done.set()
        self.join(self.freeze_after + 5)


# -- a raw client that checks every server frame -------------------------------------------


class ProtocolViolation(Exception):
    pass


@dataclasses.dataclass
class Event:
    kind: str  # "message", "ping", "pong", "close"
    opcode: int = 0
    payload: bytes = b""
    code: int | None = None


class FrameChecker:
    """Incremental parser of server frames, checking RFC 6455 as it goes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.msg_op: int | None = None
        self.parts: list[bytes] = []
        self.closed = False
        self.frames = 0
        #: permessage-deflate was agreed: RSV1 messages are inflated (context takeover).
        self.inflater: Any = None
        self.compressed = False

    def feed(self, data: bytes) -> list[Event]:
        self.buf += data
        events: list[Event] = []
        pos = 0
        buf = self.buf
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                (n,) = struct.unpack_from("!H", buf, pos + 2)
                head = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                (n,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            if b1 & 0x80:
                raise ProtocolViolation(f"server sent a masked frame (byte0={b0:#x})")
            if len(buf) - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            events += self._frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, payload)
        del self.buf[:pos]
        return events

    def _frame(self, fin: bool, rsv: int, op: int, payload: bytes) -> list[Event]:
        self.frames += 1
        if self.closed:
            raise ProtocolViolation(f"frame (opcode {op}) after the server's close frame")
        if rsv and not (rsv == 4 and self.inflater is not None and op in (TEXT, BINARY)):
            # RFC 7692: RSV1 only with the extension, on a data message's first frame.
            raise ProtocolViolation(f"RSV bits {rsv:#x} set on opcode {op}")
        if op in (CLOSE, PING, PONG):
            if not fin or len(payload) > 125:
                raise ProtocolViolation(f"control frame {op} fin={fin} len={len(payload)}")
            if op == PING:
                return [Event("ping", op, payload)]
            if op == PONG:
                return [Event("pong", op, payload)]
            self.closed = True
            code = None
            if payload:
                if len(payload) < 2:
                    raise ProtocolViolation("one-byte close payload")
                (code,) = struct.unpack("!H", payload[:2])
                if not (1000 <= code <= 1014 or 3000 <= code <= 4999) or code in (1004, 1005, 1006):
                    raise ProtocolViolation(f"close code {code} may not be sent")
                payload[2:].decode("utf-8")
            return [Event("close", op, payload, code)]
        if op == CONT:
            if self.msg_op is None:
                raise ProtocolViolation("continuation frame outside a fragmented message")
        elif op in (TEXT, BINARY):
            if self.msg_op is not None:
                raise ProtocolViolation("new data frame inside a fragmented message")
            self.msg_op = op
            self.compressed = rsv == 4
        else:
            raise ProtocolViolation(f"reserved opcode {op}")
        self.parts.append(payload)
        if not fin:
            return []
        body = b"".join(self.parts)
        opcode, self.msg_op, self.parts = self.msg_op, None, []
        if self.compressed:
            try:
                body = self.inflater.decompress(body + b"\x00\x00\xff\xff")
            except zlib.error as e:
                raise ProtocolViolation(f"corrupt compressed message from the server: {e}") from e
        if opcode == TEXT:
            body.decode("utf-8")
        return [Event("message", opcode, body)]


def rst_socket(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Peer:
    """One raw client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.checker = FrameChecker()
        #: Offer permessage-deflate in the upgrade (a storm with compression).
        self.offer: str | None = None
        #: The client's compressor once the extension is agreed (context takeover).
        self.deflater: Any = None
        self.events: list[Event] = []
        self.eof = False
        self.gone = False

    @classmethod
    async def connect(cls, port: int, rcvbuf: int | None = None) -> Peer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Set before connect so the window is small from the start: a peer that
            # stops reading then pushes back within a few hundred KiB.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), WAIT
            )
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    async def upgrade(self, path: str) -> int:
        """Send the upgrade request; the response status (frames after it are parsed)."""
        key = rawws.new_key()
        extra = [("Sec-WebSocket-Extensions", self.offer)] if self.offer else None
        await self.write(rawws.upgrade_request(path, key=key, extra=extra))
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)
        status, _, headers = rawws.parse_head(head[:-4])
        if status == 101:
            found = dict((k.lower(), v) for k, v in headers)
            accept = found.get("sec-websocket-accept")
            if accept != rawws.accept_key(key):
                raise ProtocolViolation(f"bad Sec-WebSocket-Accept {accept!r}")
            ext = found.get("sec-websocket-extensions")
            if ext is not None:
                if not self.offer or not ext.startswith("permessage-deflate"):
                    raise ProtocolViolation(f"extension {ext!r} that was not offered")
                self.checker.inflater = zlib.decompressobj(-15)
                self.deflater = zlib.compressobj(6, zlib.DEFLATED, -12)
        return status

    def compress(self, data: bytes) -> bytes:
        """A message payload compressed with the agreed context (RFC 7692 7.2.1)."""
        out: bytes = self.deflater.compress(data) + self.deflater.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4]

    async def write(self, data: bytes, timeout: float = WAIT) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), timeout)

    async def send(self, op: int, payload: bytes = b"", fin: bool = True) -> None:
        await self.write(build_frame(op, payload, fin=fin))

    async def send_close(self, code: int = 1000, reason: bytes = b"") -> None:
        await self.send(CLOSE, rawws.close_payload(code, reason))

    async def read_some(self, max_bytes: int = 1 << 20, timeout: float = WAIT) -> int:
        """Read up to ``max_bytes`` (what is there, waiting at most ``timeout``); feed
        the checker; 0 at EOF (or reset)."""
        if self.eof:
            return 0
        try:
            data = await asyncio.wait_for(self.reader.read(max_bytes), timeout)
        except asyncio.TimeoutError:
            return -1
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return 0
        self.events += self.checker.feed(data)
        return len(data)

    async def read_until(
        self, pred: Callable[[Event], bool], timeout: float = WAIT
    ) -> Event | None:
        """Read until an event matches ``pred`` (returned), EOF (None) or timeout
        (raises TimeoutError)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if pred(ev):
                    del self.events[: i + 1]
                    return ev
            self.events.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError
            n = await self.read_some(timeout=left)
            if n == 0:
                return None

    async def read_for(self, seconds: float, max_total: int = 1 << 62) -> int:
        """Read (and check) whatever comes for ``seconds``; bytes read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        total = 0
        while total < max_total:
            left = deadline - loop.time()
            if left <= 0:
                break
            n = await self.read_some(min(1 << 20, max_total - total), timeout=left)
            if n == 0:
                break
            total += max(0, n)
            self.events.clear()
        return total

    async def close_handshake(self, code: int = 1000) -> str:
        """Send a close frame and read until the server's close frame, then EOF.

        Returns "close" (close frame seen), "eof" (the server ended TCP first — fine if
        it had closed already) or "reset" (our write failed: the server was gone)."""
        try:
            await self.send_close(code)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            self.finish()
            return "reset"
        ev = await self.read_until(lambda e: e.kind == "close", timeout=WAIT + 10)
        if ev is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await self.read_for(WAIT)  # the server ends TCP after the close handshake
        self.finish()
        return "close" if ev is not None else "eof"

    def pause(self) -> None:
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    def resume(self) -> None:
        self.writer.transport.resume_reading()  # type: ignore[attr-defined]

    def rst(self) -> None:
        if not self.gone:
            self.gone = True
            rst_socket(self.writer)

    def finish(self) -> None:
        """Close with FIN."""
        if not self.gone:
            self.gone = True
            self.writer.close()


# -- the client scenarios ------------------------------------------------------------------

BIG = 1 << 20


def path(mode: str, rng: random.Random, **params: Any) -> str:
    params.setdefault("seed", rng.randrange(1 << 30))
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"/?mode={mode}&{query}"


def sending_mode(rng: random.Random) -> str:
    """A handler that pushes a lot at the client (for resets and stalled readers)."""
    return rng.choice(
        [
            path("send", rng, n=rng.randrange(1, 6), size=rng.choice([BIG, 20_000])),
            path("send_timeout", rng, n=64, size=BIG, t=round(rng.uniform(0.05, 1.0), 3)),
            path("writer", rng, n=rng.randrange(4, 32), size=64 << 10),
            path("writer_abort", rng, n=32, size=64 << 10),
            path("concurrent", rng),
            path("cancel_send", rng, n=8, t=0.2),
            path("ping", rng, n=300),
            path("raise", rng),
            path("close_abort", rng),
            path("pubsub", rng, n=rng.randrange(10, 60)),
            path("l_send", rng, n=rng.randrange(1, 12), size=rng.choice([BIG, 100_000, 20_000])),
            path("l_pubsub", rng, flood=rng.randrange(0, 40), size=rng.choice([1000, 64 << 10])),
        ]
    )


def any_mode(rng: random.Random) -> str:
    return rng.choice(
        [
            sending_mode(rng),
            path("echo", rng),
            path("reader", rng),
            path("reader_abort", rng),
            path("cancel_recv", rng),
            path("close_race", rng),
            path("l_echo", rng),
            path("l_pubsub", rng),
            path("accept", rng, room=f"room{rng.randrange(4)}"),
        ]
    )


class Client:
    """One connection of the storm: its fault kind, seeded choices and results."""

    def __init__(self, storm: Storm, seed: int) -> None:
        self.storm = storm
        self.rng = random.Random(seed)
        self.peer: Peer | None = None

    def fault(self, name: str) -> None:
        self.storm.faults[name] += 1

    async def open(self, target: str, rcvbuf: int | None = None) -> Peer | None:
        """Connect and upgrade; None if the server refused (counted)."""
        self.peer = await Peer.connect(self.storm.port, rcvbuf)
        if self.storm.opts.compression:
            self.peer.offer = "permessage-deflate; client_max_window_bits"
        mode = target.split("mode=")[1].split("&")[0]
        self.storm.modes[mode] += 1
        status = await self.peer.upgrade(target)
        if status != 101:
            self.storm.fail(f"upgrade to {target} answered {status}")
            self.peer.rst()
            return None
        return self.peer

    def end(self, peer: Peer) -> Awaitable[Any]:
        """A random way to leave: close handshake, FIN, or RST."""
        how = self.rng.choice(["close", "fin", "rst"])
        self.fault(f"leave:{how}")
        if how == "close":
            return peer.close_handshake(self.rng.choice([1000, 1001, 3000, 4999]))
        if how == "fin":
            peer.finish()
        else:
            peer.rst()
        return asyncio.sleep(0)

    # Each scenario is one fault kind; sub-kinds are counted as "kind/variant".

    async def reset_handshake(self) -> None:
        rng = self.rng
        variant = rng.choice(["partial-request", "full-request", "after-101"])
        self.fault(f"reset_handshake/{variant}")
        target = any_mode(rng)
        if variant == "after-101":
            peer = await self.open(target)
            if peer:
                await asyncio.sleep(rng.uniform(0, 0.05))
                peer.rst()
            return
        self.peer = peer = await Peer.connect(self.storm.port)
        req = rawws.upgrade_request(target)
        cut = rng.randrange(1, len(req)) if variant == "partial-request" else len(req)
        await peer.write(req[:cut])
        await asyncio.sleep(rng.uniform(0, 0.1))
        peer.rst()

    async def reset_frame(self) -> None:
        """RST with half a frame sent."""
        rng = self.rng
        peer = await self.open(
            rng.choice(
                [
                    path("echo", rng),
                    path("reader", rng),
                    path("cancel_recv", rng),
                    path("l_echo", rng),
                    path("accept", rng),
                ]
            )
        )
        if not peer:
            return
        self.fault("reset_frame")
        for _ in range(rng.randrange(3)):
            await peer.send(rng.choice([TEXT, BINARY]), b"a" * rng.randrange(200))
        frame = build_frame(rng.choice([TEXT, BINARY, PING, CLOSE]), b"b" * rng.randrange(2, 120))
        if rng.random() < 0.5:
            frame = build_frame(BINARY, b"c" * rng.randrange(200, 300_000))
        await peer.write(frame[: rng.randrange(1, len(frame))])
        await asyncio.sleep(rng.uniform(0, 0.1))
        peer.rst()

    async def reset_mid_send(self) -> None:
        """RST while the server is in the middle of a fragmented (or large) send."""
        rng = self.rng
        peer = await self.open(sending_mode(rng), rcvbuf=rng.choice([None, 16384]))
        if not peer:
            return
        self.fault("reset_mid_send")
        if rng.random() < 0.5:
            peer.pause()
            await asyncio.sleep(rng.uniform(0, 0.5))
            peer.resume()
        await peer.read_for(rng.uniform(0, 1.0), max_total=rng.randrange(1, 3 << 20))
        peer.rst()

    async def reset_mid_stream(self) -> None:
        """RST in the middle of our own fragmented message (the server's reader())."""
        rng = self.rng
        peer = await self.open(
            rng.choice([path("reader", rng), path("reader_abort", rng), path("echo", rng)])
        )
        if not peer:
            return
        self.fault("reset_mid_stream")
        await peer.send(BINARY, b"s" * rng.randrange(1, 50_000), fin=False)
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(rng.uniform(0, 0.05))
            await peer.send(CONT, b"t" * rng.randrange(1, 100_000), fin=False)
        if rng.random() < 0.5:
            frame = build_frame(CONT, b"u" * 100_000, fin=False)
            await peer.write(frame[: rng.randrange(1, len(frame))])
        peer.rst()

    async def reset_mid_close(self) -> None:
        rng = self.rng
        variant = rng.choice(["after-our-close", "instead-of-answering"])
        self.fault(f"reset_mid_close/{variant}")
        if variant == "after-our-close":
            peer = await self.open(rng.choice([path("echo", rng), sending_mode(rng)]))
            if not peer:
                return
            await peer.send_close(rng.choice([1000, 1001, 4000]))
            await asyncio.sleep(rng.uniform(0, 0.05))
        else:
            # The handler returns (or closes) at once: the server's close frame arrives
            # and the client resets instead of answering it.
            peer = await self.open(
                rng.choice(
                    [
                        path("send_timeout", rng, n=0),
                        path("close_abort", rng),
                        path("raise", rng),
                        path("l_raise", rng, where="open"),
                        path("l_close", rng, when="open"),
                    ]
                )
            )
            if not peer:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await peer.read_until(lambda e: e.kind == "close", timeout=WAIT)
        peer.rst()

    async def stop_reading(self) -> None:
        """Stop reading while the handler pushes (issue 9 when the mode is
        send_timeout), then leave or resume."""
        rng = self.rng
        target = sending_mode(rng)
        peer = await self.open(target, rcvbuf=rng.choice([None, 8192, 65536]))
        if not peer:
            return
        variant = rng.choice(["then-fin", "then-rst", "then-resume"])
        self.fault(f"stop_reading/{variant}")
        if "send_timeout" in target:
            self.fault("issue9_reproducer")
        peer.pause()
        await asyncio.sleep(rng.uniform(0.3, 3.0))
        if variant == "then-fin":
            peer.finish()
        elif variant == "then-rst":
            peer.rst()
        else:
            peer.resume()
            await peer.read_for(rng.uniform(0, 1.0))
            await self.end(peer)

    async def cancel(self) -> None:
        """The handler cancels its recv()/send() on short timeouts while we talk."""
        rng = self.rng
        target = rng.choice(
            [path("cancel_recv", rng, t=0.05), path("cancel_send", rng, n=8, t=0.2)]
        )
        peer = await self.open(target)
        if not peer:
            return
        self.fault("cancel/" + ("recv" if "cancel_recv" in target else "send"))
        reading = asyncio.ensure_future(peer.read_for(5.0))
        try:
            for _ in range(rng.randrange(1, 20)):
                await asyncio.sleep(rng.uniform(0, 0.05))
                await peer.send(rng.choice([TEXT, BINARY]), b"m" * rng.randrange(0, 2000))
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await reading
        await self.end(peer)

    async def abort_stream(self) -> None:
        """The handler abandons a conn.writer()/conn.reader() halfway."""
        rng = self.rng
        if rng.random() < 0.5:
            self.fault("abort_stream/writer")
            peer = await self.open(path("writer_abort", rng, n=32, size=64 << 10, t=0.3))
            if not peer:
                return
            if rng.random() < 0.3:
                peer.pause()
                await asyncio.sleep(rng.uniform(0, 1.0))
                peer.resume()
            await peer.read_for(rng.uniform(0.1, 1.5))
        else:
            self.fault("abort_stream/reader")
            peer = await self.open(path("reader_abort", rng, t=0.3))
            if not peer:
                return
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await peer.send(BINARY, b"r" * rng.randrange(1, 70_000), fin=False)
                for _ in range(rng.randrange(8)):
                    await asyncio.sleep(rng.uniform(0, 0.1))
                    await peer.send(CONT, b"r" * rng.randrange(1, 70_000), fin=False)
            await peer.read_for(rng.uniform(0, 1.0))
        if rng.random() < 0.5:
            peer.rst()
        else:
            await self.end(peer)

    async def ping_flood(self) -> None:
        rng = self.rng
        peer = await self.open(rng.choice([path("echo", rng), path("ping", rng, n=300)]))
        if not peer:
            return
        reading = rng.random() < 0.5
        self.fault("ping_flood/" + ("reading" if reading else "not-reading"))
        if not reading:
            peer.pause()
        task = asyncio.ensure_future(peer.read_for(5.0)) if reading else None
        frames = b"".join(build_frame(PING, os.urandom(rng.randrange(126))) for _ in range(200))
        try:
            for _ in range(rng.randrange(1, 15)):
                await peer.write(frames, timeout=3.0)
        except asyncio.TimeoutError:
            self.fault("ping_flood/server-pushed-back")
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        else:
            peer.resume()
        await self.end(peer)

    async def close_both(self) -> None:
        """Both sides close at once: "close" makes the handler close while our close
        frame is on its way."""
        rng = self.rng
        peer = await self.open(path("close_race", rng))
        if not peer:
            return
        self.fault("close_both")
        await peer.write(
            build_frame(TEXT, b"close")
            + build_frame(CLOSE, rawws.close_payload(rng.choice([1000, 4004])))
        )
        ev = await peer.read_until(lambda e: e.kind == "close", timeout=WAIT + 10)
        if ev is None:
            self.storm.fail("close_both: TCP ended without a close frame from the server")
        with contextlib.suppress(asyncio.TimeoutError):
            await peer.read_for(WAIT)
        peer.finish()

    async def close_abort(self) -> None:
        """The handler races close() against abort(); we just watch."""
        rng = self.rng
        peer = await self.open(path("close_abort", rng))
        if not peer:
            return
        self.fault("close_vs_abort")
        with contextlib.suppress(asyncio.TimeoutError):
            await peer.read_for(WAIT)
        peer.finish()

    async def handler_raises(self) -> None:
        rng = self.rng
        peer = await self.open(path("raise", rng))
        if not peer:
            return
        self.fault("handler_raises")
        ev = await peer.read_until(lambda e: e.kind == "close", timeout=WAIT + 10)
        if ev is not None and ev.code != 1011:
            self.storm.fail(f"a raising handler closed with {ev.code}, not 1011")
        peer.finish()

    async def clean_echo(self) -> None:
        """A well-behaved client; every echo must come back exactly (from a coroutine
        handler or from a listener)."""
        rng = self.rng
        peer = await self.open(path(rng.choice(["echo", "l_echo"]), rng))
        if not peer:
            return
        self.fault("clean_echo")
        for _ in range(rng.randrange(1, 10)):
            size = rng.choice([0, 1, 125, 126, 65535, 65536, rng.randrange(200_000)])
            op = rng.choice([TEXT, BINARY])
            body = bytes(rng.randrange(32, 127) for _ in range(min(size, 64))) * (size // 64 + 1)
            body = body[:size]
            if size > 10 and rng.random() < 0.3:
                cut = rng.randrange(1, size)
                await peer.send(op, body[:cut], fin=False)
                await peer.send(CONT, body[cut:])
            else:
                await peer.send(op, body)
            ev = await peer.read_until(lambda e: e.kind in ("message", "close"), timeout=WAIT + 10)
            if ev is None or ev.kind != "message" or ev.opcode != op or ev.payload != body:
                got = None if ev is None else (ev.kind, ev.opcode, len(ev.payload))
                self.storm.fail(f"clean echo of {size} B (opcode {op}) came back as {got}")
                peer.rst()
                return
            self.storm.echoed += 1
        outcome = await peer.close_handshake(1000)
        if outcome != "close":
            self.storm.fail(f"clean echo: close handshake ended with {outcome}")

    async def clean_stream(self) -> None:
        """Well-behaved streaming: our fragmented messages through the server's
        conn.reader() (it answers each with the length it counted), or one message
        from its conn.writer() (whose length we check)."""
        rng = self.rng
        if rng.random() < 0.5:
            peer = await self.open(path("reader", rng))
            if not peer:
                return
            self.fault("clean_stream/reader")
            for _ in range(rng.randrange(1, 5)):
                sizes = [rng.randrange(0, 100_000) for _ in range(rng.randrange(1, 6))]
                for i, size in enumerate(sizes):
                    op = BINARY if i == 0 else CONT
                    await peer.send(op, b"f" * size, fin=i == len(sizes) - 1)
                ev = await peer.read_until(lambda e: e.kind in ("message", "close"), WAIT + 10)
                if ev is None or ev.kind != "message" or ev.payload != str(sum(sizes)).encode():
                    got = None if ev is None else (ev.kind, ev.payload[:20])
                    self.storm.fail(f"reader counted {got} for a {sum(sizes)} B message")
                    peer.rst()
                    return
                self.storm.echoed += 1
        else:
            n, size = rng.randrange(1, 20), rng.choice([1, 1000, 64 << 10, 100_000])
            peer = await self.open(path("writer", rng, n=n, size=size))
            if not peer:
                return
            self.fault("clean_stream/writer")
            ev = await peer.read_until(lambda e: e.kind in ("message", "close"), WAIT + 10)
            if ev is None or ev.kind != "message" or len(ev.payload) != n * size:
                arrived = None if ev is None else (ev.kind, len(ev.payload))
                self.storm.fail(f"writer of {n} x {size} B arrived as {arrived}")
                peer.rst()
                return
            self.storm.echoed += 1
        outcome = await peer.close_handshake(1000)
        if outcome != "close":
            self.storm.fail(f"clean stream: close handshake ended with {outcome}")

    async def listener_raises(self) -> None:
        """A listener raising on purpose: in on_open or on the k-th message (closed
        with 1011, no echo of anything after it), or in on_close (only logged)."""
        rng = self.rng
        where = rng.choice(["open", "message", "close"])
        k = rng.randrange(4)
        peer = await self.open(path("l_raise", rng, where=where, k=k))
        if not peer:
            return
        self.fault(f"listener_raises/{where}")
        if where == "close":
            await peer.send(TEXT, b"echo me")
            ev = await peer.read_until(lambda e: e.kind in ("message", "close"), WAIT + 10)
            if ev is None or ev.kind != "message" or ev.payload != b"echo me":
                self.storm.fail(f"l_raise where=close: echo came back as {ev}")
            await self.end(peer)
            return
        if where == "message":
            # k echoed, the (k+1)-th raises, the rest never reaches the listener.
            await peer.write(b"".join(build_frame(TEXT, b"m%d" % i) for i in range(k + 3)))
        echoed = []
        ev = await peer.read_until(lambda e: e.kind == "close" or e.kind == "message", WAIT + 10)
        while ev is not None and ev.kind == "message":
            echoed.append(ev.payload)
            ev = await peer.read_until(lambda e: e.kind in ("close", "message"), WAIT + 10)
        want = [b"m%d" % i for i in range(k)] if where == "message" else []
        if ev is None or ev.code != 1011 or echoed != want:
            self.storm.fail(
                f"l_raise where={where} k={k}: echoed {echoed}, then "
                f"{'EOF' if ev is None else f'close {ev.code}'} (want {want}, then 1011)"
            )
        if rng.random() < 0.5:
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await peer.send_close(1011)
        peer.finish()

    async def listener_close(self) -> None:
        """A listener closes (``conn.close(code)``, its awaitable ignored) or aborts,
        after a burst of send_nowait: every burst message, then the close frame with
        that code (close) or the end of TCP without one (abort)."""
        rng = self.rng
        how = rng.choice(["close", "abort"])
        when = rng.choice(["open", "message"])
        burst = rng.randrange(0, 6)
        code = rng.choice([1000, 1001, 4000, 4999])
        peer = await self.open(path("l_close", rng, how=how, when=when, burst=burst, code=code))
        if not peer:
            return
        self.fault(f"listener_close/{how}")
        if when == "message":
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await peer.send(BINARY, b"go")
        got = 0
        ev = await peer.read_until(lambda e: e.kind in ("close", "message"), WAIT + 10)
        while ev is not None and ev.kind == "message":
            got += 1
            ev = await peer.read_until(lambda e: e.kind in ("close", "message"), WAIT + 10)
        if how == "close":
            if ev is None or ev.code != code or got != burst:
                self.storm.fail(
                    f"l_close close {code} after {burst} messages: got {got} messages, "
                    f"then {'EOF' if ev is None else f'close {ev.code}'}"
                )
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await peer.send_close(code)
        elif ev is not None:
            self.storm.fail(f"l_close abort: a close frame ({ev.code}) instead of none")
        peer.finish()

    async def accept_listen(self) -> None:
        """An ``Accept(topics=[roomN])`` connection in a room the pubsub modes publish
        to: what it sends is discarded (nothing echoed), its ping is answered, the
        publishes it receives are well formed; then it leaves."""
        rng = self.rng
        peer = await self.open(path("accept", rng, room=f"room{rng.randrange(4)}"))
        if not peer:
            return
        self.fault("accept_listen")
        junk = [build_frame(rng.choice([TEXT, BINARY]), b"j" * rng.randrange(0, 70_000))]
        junk += [build_frame(TEXT, b"frag", fin=False), build_frame(CONT, b"ment")]
        await peer.write(b"".join(junk) + build_frame(PING, b"accept?"))
        ev = await peer.read_until(lambda e: e.kind in ("pong", "close"), WAIT + 10)
        if ev is not None and ev.kind == "close" and ev.code == 1013:
            # A flood to its room (l_pubsub) went over max_backpressure while it was
            # writing instead of reading: closed like any slow subscriber.
            self.fault("accept_listen/closed-1013")
            peer.finish()
            return
        if ev is None or ev.kind != "pong" or ev.payload != b"accept?":
            self.storm.fail(f"Accept connection: {ev} instead of the pong")
        await peer.read_for(rng.uniform(0, 1.0))
        await self.end(peer)

    async def accept_stall(self) -> None:
        """An ``Accept`` connection that stops reading while a listener floods its
        topic (``l_pubsub`` publishing from on_open): past max_backpressure it is
        closed with 1013; or it vanishes while stalled."""
        rng = self.rng
        room = f"stall{rng.randrange(1 << 30)}"
        peer = await self.open(path("accept", rng, room=room), rcvbuf=8192)
        if not peer:
            return
        peer.pause()
        flood = await Peer.connect(self.storm.port)
        try:
            # 4 MiB in 64 KiB messages to the room: far over max_backpressure (512 KiB).
            status = await flood.upgrade(path("l_pubsub", rng, room=room, flood=64, size=65536))
            self.storm.modes["l_pubsub"] += 1
            if status != 101:
                self.storm.fail(f"the flooding l_pubsub upgrade answered {status}")
                return
            variant = rng.choice(["resume", "resume", "rst", "fin"])
            self.fault(f"accept_stall/{variant}")
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            if variant == "rst":
                peer.rst()
            elif variant == "fin":
                peer.finish()
            else:
                peer.resume()
                ev = await peer.read_until(lambda e: e.kind == "close", WAIT + 20)
                if ev is not None and ev.code != 1013:
                    self.storm.fail(f"a stalled Accept connection closed with {ev.code}")
                self.fault("accept_stall/closed-1013" if ev is not None else "accept_stall/eof")
                with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                    await peer.send_close(1013)
                peer.finish()
        finally:
            flood.rst()

    async def issue9(self) -> None:
        """Issue 9 exactly: 1 MiB messages with a 2 s wait_for; never read, then close."""
        rng = self.rng
        peer = await self.open(path("send_timeout", rng, n=64, size=BIG, t=2.0))
        if not peer:
            return
        self.fault("issue9_reproducer")
        peer.pause()
        await asyncio.sleep(rng.uniform(2.0, 4.0))
        peer.finish()

    async def deflate(self) -> None:
        """permessage-deflate (a storm with compression): compressed echoes, whole and
        fragmented, with context takeover both ways; then a deflate bomb (1009), a
        corrupt stream (1002), bad UTF-8 after inflating (1007), a reset in the middle
        of a compressed message, or a stalled reader of compressed messages."""
        rng = self.rng
        peer = await self.open(path("echo", rng))
        if not peer:
            return
        if peer.deflater is None:
            self.storm.fail("the server did not agree to permessage-deflate")
            peer.rst()
            return
        for _ in range(rng.randrange(1, 8)):
            size = rng.choice([0, 10, 100, 1000, 20_000, rng.randrange(300_000)])
            op = rng.choice([TEXT, BINARY])
            body = b'{"k":%d,"v":"%s"},' % (rng.randrange(1000), b"ab" * rng.randrange(9))
            body = (body * (size // len(body) + 1))[:size]
            wire = peer.compress(body)
            if len(wire) > 10 and rng.random() < 0.4:
                cut = rng.randrange(1, len(wire))
                first = build_frame(op, wire[:cut], fin=False, rsv1=True)
                await peer.write(first + build_frame(CONT, wire[cut:]))
            else:
                await peer.write(build_frame(op, wire, rsv1=True))
            ev = await peer.read_until(lambda e: e.kind in ("message", "close"), timeout=WAIT + 10)
            if ev is None or ev.kind != "message" or ev.opcode != op or ev.payload != body:
                got = None if ev is None else (ev.kind, ev.opcode, len(ev.payload))
                self.storm.fail(f"compressed echo of {size} B came back as {got}")
                peer.rst()
                return
            self.storm.echoed += 1
        how = rng.choice(["bomb", "corrupt", "utf8", "reset_mid", "stall", "clean"])
        self.fault(f"deflate/{how}")
        if how in ("bomb", "corrupt", "utf8"):
            if how == "bomb":
                frame = build_frame(BINARY, deflate_bomb(), rsv1=True)
            elif how == "corrupt":
                frame = build_frame(BINARY, b"\xff\xfe\xfd" * 10, rsv1=True)
            else:
                frame = build_frame(TEXT, peer.compress(b"ok \xc3\x28 bad"), rsv1=True)
            await peer.write(frame)
            want = {"bomb": 1009, "corrupt": 1002, "utf8": 1007}[how]
            ev = await peer.read_until(lambda e: e.kind == "close", timeout=WAIT + 10)
            if ev is None or ev.code != want:
                self.storm.fail(f"deflate {how}: closed with {ev and ev.code}, not {want}")
            peer.finish()
        elif how == "reset_mid":
            wire = peer.compress(b"x" * 100_000 + bytes(range(256)) * 400)
            await peer.write(build_frame(BINARY, wire[: len(wire) // 2], fin=False, rsv1=True))
            peer.rst()
        elif how == "stall":
            # Many compressed echoes not read: the server's output backs up.
            peer.pause()
            big = peer.compress(bytes(range(256)) * 4000)
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
                for _ in range(20):
                    await peer.write(build_frame(BINARY, big, rsv1=True), timeout=1.0)
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            peer.resume()
            await self.end(peer)
        else:
            outcome = await peer.close_handshake(1000)
            if outcome != "close":
                self.storm.fail(f"deflate: close handshake ended with {outcome}")


_BOMB: list[bytes] = []


def deflate_bomb() -> bytes:
    """64 MiB of zeros in about 64 KiB: over the storm server's max_msg_len (4 MiB)."""
    if not _BOMB:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        zeros = bytes(1 << 20)
        _BOMB.append(b"".join(c.compress(zeros) for _ in range(64)) + c.flush(zlib.Z_SYNC_FLUSH))
    return _BOMB[0][:-4]


#: Fault kinds and their weights.
KINDS: dict[str, float] = {
    "reset_handshake": 1.0,
    "reset_frame": 1.0,
    "reset_mid_send": 1.5,
    "reset_mid_stream": 1.0,
    "reset_mid_close": 1.0,
    "stop_reading": 2.0,
    "cancel": 1.5,
    "abort_stream": 1.5,
    "ping_flood": 0.7,
    "close_both": 1.0,
    "close_abort": 1.0,
    "handler_raises": 0.5,
    "clean_echo": 1.5,
    "clean_stream": 1.0,
    "issue9": 0.5,
    "listener_raises": 1.0,
    "listener_close": 1.0,
    "accept_listen": 1.0,
    "accept_stall": 0.7,
}

#: The kinds built for listeners and Accept (other kinds reach them too, through the
#: ``l_*`` and ``accept`` modes among the ones they pick).
LISTENER_KINDS = ["listener_raises", "listener_close", "accept_listen", "accept_stall"]

#: Kinds added when the storm runs with compression (StormOptions.compression).
DEFLATE_KINDS: dict[str, float] = {"deflate": 3.0}


# -- the storm -----------------------------------------------------------------------------


@dataclasses.dataclass
class StormOptions:
    seed: int = 1
    #: Seconds of storm (new clients are started until then).
    duration: float = 15.0
    #: Server event loop: "asyncio" or "uvloop".
    loop: str = "asyncio"
    #: Clients at once.
    concurrency: int = 24
    #: Bound on the number of clients.
    max_clients: int = 100_000
    write_limit: int = 64 * 1024
    #: A Redis URL: the server relays its publishes through it (Config.pubsub), so the
    #: pubsub mode also drives the relay's publish and subscribe paths.
    pubsub: str | None = None
    #: Watchdog period.
    probe_interval: float = 0.2
    #: A probe unanswered this long means the loop is frozen: stop, dump, fail.
    freeze_after: float = 8.0
    #: Seconds for connections and handlers to return to 0 after the storm.
    settle_timeout: float = 30.0
    #: RSS after the storm may exceed RSS before it by at most this (MiB).
    rss_slack_mib: int = 64
    #: Restrict to these fault kinds (default: all of KINDS, plus DEFLATE_KINDS with
    #: compression).
    kinds: list[str] | None = None
    #: The server offers permessage-deflate and every client asks for it: all the
    #: fault kinds run over compressed traffic, plus the "deflate" kind.
    compression: bool = False
    #: Config.threads of the server: 0 drives the connections on the event-loop thread.
    threads: int = 1
    #: Keep the server's logs and dumps here (default: a temporary directory).
    workdir: Path | None = None
    progress: bool = False


@dataclasses.dataclass
class StormReport:
    seed: int
    loop: str
    seconds: float = 0.0
    clients: int = 0
    faults: Counter[str] = dataclasses.field(default_factory=Counter)
    modes: Counter[str] = dataclasses.field(default_factory=Counter)
    client_errors: Counter[str] = dataclasses.field(default_factory=Counter)
    echoed: int = 0
    probes: int = 0
    longest_stall: float = 0.0
    stalls: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    frozen: bool = False
    server_loop_lag: float | None = None
    rss_start_kib: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    rss_end_trimmed_kib: int = 0
    leaked_connections: int | None = None
    handlers_running: int | None = None
    server_stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    deliberate_errors: int = 0
    warnings: Counter[str] = dataclasses.field(default_factory=Counter)
    exit_code: int | None = None
    dump: str = ""
    failures: list[str] = dataclasses.field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        mib = 1024.0
        lines = [
            f"fault storm: seed={self.seed} loop={self.loop} {self.seconds:.1f} s, "
            f"{self.clients} client connections",
            f"  watchdog: {self.probes} probes, "
            f"longest loop stall {self.longest_stall * 1000:.0f} ms"
            f" (bound {STALL_BOUND * 1000:.0f} ms), stalls over the bound: {len(self.stalls)}"
            + (" — LOOP FROZEN" if self.frozen else ""),
        ]
        if self.server_loop_lag is not None:
            lines.append(
                f"  server's own loop-lag monitor: max {self.server_loop_lag * 1000:.0f} ms"
            )
        end = (
            f"end {self.rss_end_kib / mib:.1f} MiB"
            f" (after malloc_trim {self.rss_end_trimmed_kib / mib:.1f} MiB)"
            if self.rss_end_kib
            else "end not measured"
        )
        lines.append(
            f"  RSS: start {self.rss_start_kib / mib:.1f} MiB, "
            f"peak {self.rss_peak_kib / mib:.1f} MiB, {end}"
        )
        lines.append(
            f"  leaked connections: {self.leaked_connections}, handlers still running: "
            f"{self.handlers_running}, clean echoes/streams verified: {self.echoed}"
        )
        if self.server_stats:
            s = self.server_stats
            lines.append(
                f"  server: handshakes={s.get('handshakes')} failed={s.get('handshakes_failed')} "
                f"max_connections={s.get('max_connections')} bytes_out={s.get('bytes_out')} "
                f"bytes_in={s.get('bytes_in')}"
            )
            lines.append("  handler outcomes: " + fmt_counter(Counter(s.get("outcomes", {}))))
        lines.append("  faults: " + fmt_counter(self.faults))
        lines.append("  server modes: " + fmt_counter(self.modes))
        if self.client_errors:
            lines.append(
                "  client-side exceptions (expected under faults): "
                + fmt_counter(self.client_errors)
            )
        lines.append(f"  deliberate handler errors logged (whitelisted): {self.deliberate_errors}")
        if self.warnings:
            lines.append("  server warnings: " + fmt_counter(self.warnings))
        lines.append(f"  server exit code after SIGTERM: {self.exit_code}")
        lines.append(f"  logs: {self.workdir}")
        if self.failures:
            lines.append(f"FAILED ({len(self.failures)}):")
            lines += [f"  - {f}" for f in self.failures[:40]]
        else:
            lines.append("OK")
        if self.dump:
            lines.append("thread dump of the server:")
            lines.append(self.dump)
        return "\n".join(lines)


def fmt_counter(c: Counter[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "-"


class Storm:
    def __init__(
        self, opts: StormOptions, server: ServerProcess, prober: Prober, report: StormReport
    ) -> None:
        self.opts = opts
        self.server = server
        self.port = server.port
        self.prober = prober
        self.report = report
        self.faults = report.faults
        self.modes = report.modes
        self.echoed = 0
        self.counter = [0]
        self.master = random.Random(opts.seed)
        weights = {**KINDS, **(DEFLATE_KINDS if opts.compression else {})}
        kinds = opts.kinds or list(weights)
        self.kinds = kinds
        self.weights = [weights[k] for k in kinds]

    def fail(self, msg: str) -> None:
        self.report.failures.append(msg)

    async def one(self, index: int) -> None:
        kind = self.master.choices(self.kinds, self.weights)[0]
        seed = self.master.randrange(1 << 32)
        client = Client(self, seed)
        who = f"client #{index} ({kind}, seed {seed})"
        task = asyncio.ensure_future(getattr(client, kind)())
        try:
            done, _ = await asyncio.wait([task], timeout=SCENARIO_CAP)
            if not done:
                self.client_fail(f"{who} stuck for {SCENARIO_CAP:.0f} s")
                return
            exc = task.exception()
            if exc is None:
                return
            if isinstance(exc, asyncio.TimeoutError):
                where = exc.__traceback__
                while where is not None and where.tb_next is not None:
                    if where.tb_next.tb_frame.f_code.co_filename != __file__:
                        break
                    where = where.tb_next
                line = where.tb_lineno if where is not None else "?"
                self.client_fail(
                    f"{who}: the server did not answer within {WAIT:.0f} s (line {line})"
                )
            elif isinstance(exc, ProtocolViolation):
                self.fail(f"{who}: protocol violation: {exc}")
            elif isinstance(exc, UnicodeDecodeError):
                self.fail(f"{who}: invalid UTF-8 from the server: {exc}")
            elif isinstance(exc, (ConnectionError, OSError, asyncio.IncompleteReadError)):
                # Expected: the server may drop a connection we are abusing.
                self.report.client_errors[f"{kind}:{type(exc).__name__}"] += 1
            else:
                self.fail(f"{who}: {type(exc).__name__}: {exc}")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if client.peer is not None:
                client.peer.rst()

    def client_fail(self, msg: str) -> None:
        """A client that waited too long: a failure, unless the watchdog already found
        the loop frozen (then every client waits, and the freeze is the finding)."""
        if self.prober.frozen.is_set():
            self.report.client_errors["waiting on a frozen server"] += 1
        else:
            self.fail(msg)

    async def worker(self, deadline: float, counter: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline and not self.prober.frozen.is_set():
            if counter[0] >= self.opts.max_clients:
                return
            counter[0] += 1
            await self.one(counter[0])

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.duration
        counter = self.counter
        workers = [
            asyncio.ensure_future(self.worker(deadline, counter))
            for _ in range(self.opts.concurrency)
        ]
        progress = asyncio.ensure_future(self.progress(deadline)) if self.opts.progress else None

        async def frozen() -> None:
            while not self.prober.frozen.is_set():
                await asyncio.sleep(0.1)

        watch = asyncio.ensure_future(frozen())
        everyone = asyncio.gather(*workers)
        # Workers end by themselves after the deadline (every scenario is capped); the
        # watchdog's freeze ends the storm at once.
        waits: list[asyncio.Future[Any]] = [everyone, watch]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        others = [watch, *([progress] if progress else [])]
        for t in [*workers, *others]:
            t.cancel()
        await asyncio.gather(everyone, *others, return_exceptions=True)
        self.report.clients = counter[0]
        self.report.echoed = self.echoed

    async def progress(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            await asyncio.sleep(30)
            mem = self.server.memory()
            print(
                f"[{loop.time() - start:6.0f} s] clients={self.counter[0]} "
                f"longest stall={self.prober.max_latency * 1000:.0f} ms "
                f"RSS={mem.get('VmRSS', 0) / 1024:.1f} MiB",
                flush=True,
            )


async def echo_check(port: int) -> str | None:
    """A fresh ``websockets`` client gets its echo; None or what went wrong."""
    from websockets.asyncio.client import connect

    try:
        async with connect(
            f"ws://127.0.0.1:{port}/?mode=echo", open_timeout=WAIT, close_timeout=WAIT
        ) as ws:
            messages: list[str | bytes] = ["after the storm", os.urandom(100_000)]
            for msg in messages:
                await ws.send(msg)
                got = await asyncio.wait_for(ws.recv(), WAIT)
                if got != msg:
                    return f"echo mismatch: sent {len(msg)}, got {len(got)}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_log(text: str, report: StormReport) -> None:
    """Fail on any ERROR record or traceback except the deliberate ones."""
    unexpected: list[str] = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            unexpected.append(f"non-log output on stderr: {line[:300]}")
            continue
        level, exc = rec.get("level"), rec.get("exc_type")
        msg = rec.get("msg", "")
        if level in ("ERROR", "CRITICAL"):
            # The coroutine mode's record says exactly DELIBERATE_MSG; a listener's
            # (in on_open, on_message or on_close) says which method raised.
            listener = "listener" in msg or "on_close" in msg
            if (
                rec.get("logger") == "lightws"
                and (msg.endswith(DELIBERATE_MSG) or listener)
                and exc == DELIBERATE_EXC
            ):
                report.deliberate_errors += 1
                continue
            tb = (rec.get("traceback") or "").strip().splitlines()
            unexpected.append(
                f"{level} {rec.get('logger')}: {msg[:300]}" + (f" [{tb[-1][:200]}]" if tb else "")
            )
        elif exc is not None and exc not in EXPECTED_EXC:
            unexpected.append(f"{level} {rec.get('logger')}: {msg[:300]} with {exc}")
        elif level == "WARNING":
            report.warnings[re.sub(r"^\[[^\]]*\] ", "", msg)[:80]] += 1
    if unexpected:
        report.failures.append(f"{len(unexpected)} unexpected lines in the server's log:")
        report.failures += ["    " + u for u in unexpected[:20]]


def run_storm(opts: StormOptions) -> StormReport:
    """Start the server, run the storm under the watchdog, check everything; the report
    (``report.ok``, ``report.render()``)."""
    report = StormReport(seed=opts.seed, loop=opts.loop)
    tmp = None
    if opts.workdir is None:
        tmp = tempfile.mkdtemp(prefix="lightws-storm-")
        workdir = Path(tmp)
    else:
        workdir = opts.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    report.workdir = str(workdir)
    server = ServerProcess(
        workdir,
        loop=opts.loop,
        write_limit=opts.write_limit,
        pubsub=opts.pubsub,
        compression=opts.compression,
        threads=opts.threads,
    )
    prober = Prober(server.port, opts.probe_interval, opts.freeze_after)
    started = time.monotonic()
    try:
        # Warm up (first connections, first handler, first stats) before the RSS baseline.
        warm = asyncio.run(echo_check(server.port))
        if warm is not None:
            report.failures.append(f"the server does not echo before the storm: {warm}")
            return report
        server.stats(trim=True)
        report.rss_start_kib = server.memory().get("VmRSS", 0)
        prober.start()
        storm = Storm(opts, server, prober, report)
        budget = opts.duration + SCENARIO_CAP + 30

        async def main() -> None:
            try:
                await asyncio.wait_for(storm.run(), budget)
            except asyncio.TimeoutError:
                report.failures.append(f"the storm overran its deadline ({budget:.0f} s)")

        asyncio.run(main())
        report.seconds = time.monotonic() - started
        stuck = prober.frozen.is_set() or any("overran" in f for f in report.failures)
        if not stuck:
            settle(server, opts, report)
        prober.stop()
        report.probes = prober.count
        report.longest_stall = prober.max_latency
        report.stalls = prober.stalls
        report.frozen = prober.frozen.is_set()
        stalls = [
            f"event loop stalled: a probe at t={when:.1f} s took {latency:.2f} s"
            + (" and got no answer (frozen)" if latency >= opts.freeze_after - 0.01 else "")
            for when, latency in prober.stalls
        ]
        report.failures[:0] = stalls
        report.failures += [f"watchdog: {e}" for e in prober.errors[:10]]
        if report.frozen or stuck:
            report.dump = server.dump_threads()
        mem = server.memory()
        report.rss_peak_kib = mem.get("VmHWM", 0)
        if not (report.frozen or stuck):
            report.exit_code = server.stop()
            if report.exit_code != 0:
                report.failures.append(
                    f"server did not exit cleanly on SIGTERM: {report.exit_code}"
                )
        else:
            server.kill()
        check_log(server.stderr_text(), report)
        outcomes = report.server_stats.get("outcomes", {})
        raised = sum(n for k, n in outcomes.items() if k.endswith(":raised"))
        if report.server_stats and report.deliberate_errors != raised:
            report.failures.append(
                f"{raised} handlers and listeners raised on purpose but "
                f"{report.deliberate_errors} were logged"
            )
        unexpected = {k: v for k, v in outcomes.items() if k.endswith(":unexpected")}
        if unexpected:
            report.failures.append(f"handlers ended with unexpected exceptions: {unexpected}")
        return report
    finally:
        prober.done.set()
        server.kill()


def settle(server: ServerProcess, opts: StormOptions, report: StormReport) -> None:
    """After the storm: connections and handlers back to 0, echo, RSS bound."""
    deadline = time.monotonic() + opts.settle_timeout
    stats: dict[str, Any] = {}
    while True:
        try:
            stats = server.stats()
        except (OSError, RuntimeError, ValueError) as e:
            report.failures.append(f"stats unavailable after the storm: {e!r}")
            return
        # The stats request itself is one open connection.
        leaked, running = stats["connections"] - 1, stats["handlers_running"]
        if (leaked == 0 and running == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    report.leaked_connections, report.handlers_running = leaked, running
    report.server_loop_lag = stats["loop_lag_max"]
    if leaked:
        report.failures.append(
            f"{leaked} connections still open {opts.settle_timeout:.0f} s after the storm"
        )
    if running:
        report.failures.append(
            f"{running} handlers still running after the storm: {stats['handlers_running_by_mode']}"
        )
    problem = asyncio.run(echo_check(server.port))
    if problem is not None:
        report.failures.append(f"the server does not echo after the storm: {problem}")
    report.rss_end_kib = server.memory().get("VmRSS", 0)
    report.server_stats = server.stats(trim=True)
    report.rss_end_trimmed_kib = server.memory().get("VmRSS", 0)
    if report.rss_end_trimmed_kib > report.rss_start_kib + opts.rss_slack_mib * 1024:
        report.failures.append(
            f"RSS after the storm {report.rss_end_trimmed_kib / 1024:.1f} MiB exceeds start "
            f"{report.rss_start_kib / 1024:.1f} MiB + {opts.rss_slack_mib} MiB"
        )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-clients", type=int, default=1_000_000)
    p.add_argument("--kinds", default=None, help="comma-separated fault kinds (default: all)")
    p.add_argument("--keep-dir", type=Path, default=None, help="where to keep the server's logs")
    p.add_argument(
        "--compression",
        action="store_true",
        help="permessage-deflate on the server and offered by every client, plus the "
        "'deflate' fault kind (bombs, corrupt streams, resets mid-message)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="the server's Config.threads (0: on the loop)"
    )
    a = p.parse_args()
    opts = StormOptions(
        seed=a.seed,
        duration=a.minutes * 60,
        loop=a.loop,
        concurrency=a.concurrency,
        max_clients=a.max_clients,
        kinds=a.kinds.split(",") if a.kinds else None,
        workdir=a.keep_dir,
        compression=a.compression,
        threads=a.threads,
        freeze_after=10.0,
        progress=True,
    )
    report = run_storm(opts)
    print(report.render(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
