"""Streaming messages larger than memory: ``conn.reader()`` and ``conn.writer()``."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._types import Opcode

if TYPE_CHECKING:
    from ._lightws import Connection

__all__ = ["MessageReader", "MessageWriter"]


#: Connection id -> the task holding its open writer (to refuse a nested writer).
_writers: dict[int, asyncio.Task[Any]] = {}


class MessageReader:
    """Async iterator over the payload chunks (``bytes``) of one message.

    Returned by ``conn.reader()``. ``opcode`` is the message's TEXT or BINARY opcode,
    known once the first chunk has arrived. Raises ``ConnectionClosed`` if the
    connection closes before the message is complete.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._done = False
        self.opcode: Opcode | None = None

    def __aiter__(self) -> MessageReader:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            opcode, data, fin = await self._conn._read_chunk()
            if self.opcode is None:
                self.opcode = opcode
            if fin:
                self._done = True
            if data:
                return data
        raise StopAsyncIteration

    async def read_all(self) -> bytes:
        """The rest of the message joined (bounded only by memory)."""
        return b"".join([chunk async for chunk in self])


class MessageWriter:
    """Sends one message as a sequence of frames. Use as ``async with conn.writer()``.

    ``await w.write(chunk)`` sends a frame per call (``str`` chunks for a TEXT writer,
    bytes-like for BINARY); leaving the block normally sends the final frame.

    Leaving the block with an exception (``CancelledError`` included) never completes the
    message: if part of it went out, the connection is closed with 1011 (internal error)
    right after that part, so the peer cannot mistake it for the whole message; if
    nothing went out, nothing is sent and the connection stays usable. The exception
    propagates either way.
    """

    def __init__(self, conn: Connection, binary: bool = True) -> None:
        self._conn = conn
        self._binary = binary
        self._started = False
        self._open = False

    async def __aenter__(self) -> MessageWriter:
        task = asyncio.current_task()
        if _writers.get(self._conn.id) is task:
            raise RuntimeError(
                "this task already has a writer open on this connection; finish it first "
                "(a nested writer would wait for itself)"
            )
        # Waits while another fragmented message is going out on this connection.
        await self._conn._writer_begin()
        if task is not None:
            _writers[self._conn.id] = task
        self._open = True
        return self

    async def write(self, chunk: bytes | bytearray | memoryview | str) -> None:
        """Send ``chunk`` as the next fragment (an empty chunk sends nothing)."""
        if not self._open:
            raise RuntimeError("use the writer inside 'async with conn.writer() as w:'")
        if self._binary:
            if isinstance(chunk, str):
                raise TypeError("a binary writer takes bytes-like chunks, not str")
            data: bytes | bytearray | memoryview = chunk
        else:
            if not isinstance(chunk, str):
                raise TypeError(f"a text writer takes str chunks, not {type(chunk).__name__}")
            data = chunk.encode()
        if not data:
            return
        # The frame is queued by the call itself; the await only waits for room under
        # write_limit. Mark the message started before awaiting, so that a cancellation
        # during the wait still counts this fragment as sent (see __aexit__).
        sent = self._conn._send_frame(self._opcode(), data, False)
        self._started = True
        await sent

    def _opcode(self) -> int:
        if self._started:
            return Opcode.CONTINUATION
        return Opcode.BINARY if self._binary else Opcode.TEXT

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        try:
            if exc is not None:
                if self._started and not self._conn.closed:
                    # A final frame now would hand the peer a truncated message as if it
                    # were complete. The close frame is queued by the call, right after
                    # the fragments; the close handshake finishes without us (awaiting
                    # it here could itself be cancelled, or hold up the exception).
                    _ = self._conn.close(1011, "message aborted")
            elif not self._conn.closed:
                # RFC 6455 5.4: the message ends with a frame that has FIN set; an empty
                # writer sends one empty final TEXT/BINARY frame, never a lone
                # continuation.
                await self._conn._send_frame(self._opcode(), b"", True)
        finally:
            _writers.pop(self._conn.id, None)
            self._conn._writer_end()
