"""Programs under test in their own processes: start, wait for a readiness line, stop.

``start()`` launches a command (``python -m lightws ...``, a script, a browser) and
returns once it has printed a readiness line, within a deadline; ``Process.stop()``
sends SIGTERM and kills after a grace period. A thread collects the output as it is
printed, so a child never blocks on a full pipe whether or not the test reads it, and a
failure can show everything the child said. Each blocking method has an ``a``-prefixed
coroutine twin for async tests: it waits in a thread, so the event loop keeps serving
the test's own clients meanwhile (a server closing with 1001 waits for their answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["LIGHTWS", "ROOT", "Process", "astart", "run_lightws", "start"]

#: The repository (the working directory of started programs).
ROOT = Path(__file__).resolve().parents[2]
#: The command line of ``python -m lightws`` with the interpreter running the tests.
LIGHTWS = (sys.executable, "-m", "lightws")
#: How long a program may take to print its readiness line (an interpreter's start-up
#: and imports on a loaded 2-core CI machine).
START_TIMEOUT = 20.0


class Process:
    """A child process whose stdout and stderr, interleaved, are collected as printed."""

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        cwd: str | os.PathLike[str] | None = ROOT,
        env: Mapping[str, str] | None = None,
        new_session: bool = False,
    ) -> None:
        self.args = [os.fspath(a) for a in args]
        #: What ``start()`` read up to the readiness line.
        self.banner = ""
        self._new_session = new_session
        self._proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            # Its own process group, so stop() reaches the helpers it spawns too.
            start_new_session=new_session,
        )
        self._output = bytearray()
        self._consumed = 0  # how far read_until() has read
        self._eof = False
        self._changed = threading.Condition()
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()

    def __repr__(self) -> str:
        return f"<Process {' '.join(self.args[:4])}{' ...' if len(self.args) > 4 else ''}>"

    def _collect(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        while chunk := stdout.read1(1 << 16):
            with self._changed:
                self._output += chunk
                self._changed.notify_all()
        stdout.close()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs."""
        return self._proc.poll()

    @property
    def output(self) -> str:
        """Everything it has printed so far (stdout and stderr)."""
        with self._changed:
            return self._output.decode(errors="replace")

    def send_signal(self, sig: int) -> None:
        self._proc.send_signal(sig)

    def read_until(self, text: str, timeout: float = 10.0) -> str:
        """Wait for a line containing ``text`` after the output read so far; return the
        output up to the end of that line, which is then read."""
        needle = text.encode()
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                at = self._output.find(needle, self._consumed)
                if at >= 0:
                    end = self._output.find(b"\n", at + len(needle))
                    if end >= 0 or self._eof:
                        end = len(self._output) if end < 0 else end + 1
                        seen = self._output[self._consumed : end].decode(errors="replace")
                        self._consumed = end
                        return seen
                if self._eof:
                    raise AssertionError(
                        f"{self} ended (status {self._proc.wait()}) before printing "
                        f"{text!r}; it printed:\n{self.output}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self} did not print {text!r} within {timeout} s; it printed:\n"
                        f"{self.output}"
                    )
                self._changed.wait(remaining)

    def finish(self, timeout: float = 15.0) -> int:
        """Wait for it to exit and for the rest of its output; its exit status."""
        status = self._proc.wait(timeout)
        self._collector.join(timeout)
        return status

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds; its status."""
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        if self._new_session:
            self._signal(signal.SIGKILL)  # helpers left in its group
        status = self._proc.wait()
        self._collector.join(grace)
        return status

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self._new_session:
                os.killpg(self._proc.pid, sig)
            else:
                self._proc.send_signal(sig)

    async def aread_until(self, text: str, timeout: float = 10.0) -> str:
        return await asyncio.to_thread(self.read_until, text, timeout)

    async def afinish(self, timeout: float = 15.0) -> int:
        return await asyncio.to_thread(self.finish, timeout)

    async def astop(self, grace: float = 10.0) -> int:
        return await asyncio.to_thread(self.stop, grace)


def start(
    args: Sequence[str | os.PathLike[str]],
    *,
    ready: str,
    timeout: float = START_TIMEOUT,
    cwd: str | os.PathLike[str] | None = ROOT,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> Process:
    """Start ``args`` and wait until it prints a line containing ``ready`` (kept in
    ``banner``); if it exits or ``timeout`` passes first, stop it and fail with what it
    printed."""
    proc = Process(args, cwd=cwd, env=env, new_session=new_session)
    try:
        proc.banner = proc.read_until(ready, timeout)
    except BaseException:
        proc.stop(grace=1)
        raise
    return proc


async def astart(
    args: Sequence[str | os.PathLike[str]],
    *,
    ready: str,
    timeout: float = START_TIMEOUT,
    cwd: str | os.PathLike[str] | None = ROOT,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> Process:
    """``start()`` without blocking the event loop."""
    return await asyncio.to_thread(
        lambda: start(args, ready=ready, timeout=timeout, cwd=cwd, env=env, new_session=new_session)
    )


def run_lightws(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python -m lightws *args`` to completion: exit status, stdout, stderr."""
    return subprocess.run(
        [*LIGHTWS, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
