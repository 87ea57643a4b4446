//! `lightws.Connection`: the receive side, closing, properties, and the handshake
//! answer. The send scheduler is in send.rs.
//!
//! (Over 800 lines because it is the whole Python-facing surface of a connection:
//! some forty documented methods and properties of a few lines each, in one
//! `#[pymethods]` block; the machinery behind them is in send.rs, op.rs and message.rs.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyFrozenSet, PyString};
use tokio::sync::oneshot;

use super::api::api;
use super::core::Core;
use super::errors::{closed_exception, end_error, streaming_error};
use super::message::{
    known_opcode, make_chunk, make_message, opcode_object, to_bytes, type_name, Message,
};
use super::op::{done, is_done, op_wait, reject, resolve, Op, OpState, WaitKind, FAIR_BUDGET};
use super::send::{Deferred, LargeSend, Payload};
use super::waiter::{Outcome, Waiter};
use crate::fanout::Fanout;
use crate::frame::{self, OpCode};
use crate::handshake;
use crate::lockcheck::ConnMutex;
use crate::session::{CloseInfo, LogLevel, Part, ABNORMAL_CLOSURE};
use crate::shared::{ConnShared, InMsg, Inbox, Reply, OVERFLOW_REASON, TRY_AGAIN_LATER};

/// What a pending receive waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    /// A whole message for `recv()` (`anext`: for `__anext__`, which ends iteration on a
    /// normal close instead of raising).
    Message { anext: bool },
    /// The next chunk of a streamed message, for `conn.reader()`.
    Chunk,
}

/// The loop thread's state of a connection (behind `Connection::st`).
///
/// Only the loop thread touches it, but Python can re-enter a method while another is
/// running (a future callback, `__del__`): so it is only ever locked to move values in
/// or out, never across a call into Python (lockcheck.rs).
#[derive(Default)]
pub(super) struct PyState {
    /// The pending receive's future and what it waits for.
    pub(super) recv: Option<(Py<Waiter>, Want)>,
    pub(super) writer_active: bool,
    /// Set when the task ended (socket closed).
    pub(super) finished: bool,
    /// The asyncio task running the handler (lightws.server starts it).
    pub(super) handler: Option<Py<PyAny>>,
    pub(super) reply: Option<oneshot::Sender<Reply>>,
    /// What only some connections ever need, boxed on first use and freed when empty
    /// again: an idle connection pays one pointer for it (about 190 bytes less).
    pub(super) rare: Option<Box<Rare>>,
}

/// The parts of [`PyState`] a connection needs only now and then.
#[derive(Default)]
pub(super) struct Rare {
    /// A message (or chunk) a cancelled receive had already been handed: the next
    /// receive returns it first.
    pub(super) putback: Option<(Py<PyAny>, Want)>,
    pub(super) large: Option<LargeSend>,
    pub(super) deferred: VecDeque<Deferred>,
    /// `conn.writer()`s waiting for the connection to be free of other fragmented sends.
    pub(super) writer_waiters: VecDeque<Py<PyAny>>,
    pub(super) drains: Vec<Py<PyAny>>,
    pub(super) closers: Vec<Py<PyAny>>,
    pub(super) sent_close: Option<CloseInfo>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.putback.is_none()
            && self.large.is_none()
            && self.deferred.is_empty()
            && self.writer_waiters.is_empty()
            && self.drains.is_empty()
            && self.closers.is_empty()
            && self.sent_close.is_none()
    }
}

impl PyState {
    /// The rarely used parts, allocated now if needed.
    pub(super) fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// Free the rarely used parts if nothing is left in them (nothing to drop: no
    /// Python object goes with it).
    pub(super) fn compact(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.is_empty()) {
            self.rare = None;
        }
    }

    pub(super) fn sent_close(&self) -> Option<&CloseInfo> {
        self.rare.as_ref().and_then(|r| r.sent_close.as_ref())
    }

    /// A fragmented send, a writer, or sends waiting behind them.
    pub(super) fn busy(&self) -> bool {
        self.writer_active
            || self
                .rare
                .as_ref()
                .is_some_and(|r| r.large.is_some() || !r.deferred.is_empty())
    }

    /// A fragmented send or a writer is under way.
    pub(super) fn busy_sending(&self) -> bool {
        self.writer_active || self.rare.as_ref().is_some_and(|r| r.large.is_some())
    }

    /// Nothing is pending: no receive, send, writer, close or handshake answer that a
    /// later event would have to complete. A listener connection's object in this
    /// state can be released while the connection idles (core.rs, `sweep`).
    pub(super) fn quiescent(&self) -> bool {
        self.recv.is_none()
            && !self.writer_active
            && self.handler.is_none()
            && self.reply.is_none()
            && self.rare.as_ref().is_none_or(|r| r.is_empty())
    }
}

/// One WebSocket connection, handed to your handler.
///
/// Receive with `await conn.recv()` or `async for msg in conn`; send with
/// `await conn.send(x)`; close with `await conn.close(code, reason)`.
///
/// Your own attributes can be set on it (`conn.room = "lobby"`), as on websockets'
/// connections.
#[pyclass(module = "lightws", frozen, name = "Connection", weakref, dict)]
pub struct Connection {
    pub(super) shared: Arc<ConnShared>,
    pub(super) st: ConnMutex<PyState>,
    /// Operations completed without suspending since the last suspension (fairness).
    pub(super) immediate: AtomicU32,
    /// A connection without a coroutine (listener.rs): its messages go to the
    /// listener, not to `recv()`.
    pub(super) native: AtomicBool,
    /// The server's native half: its event loop, its topics, the `Server` object.
    pub(super) core: Py<Core>,
    pub(super) request: OnceLock<Py<PyAny>>,
    pub(super) subprotocol: OnceLock<Option<String>>,
}

/// What the inbox holds for a receive, taken under its lock (no Python there).
pub(super) enum Popped {
    Msg(InMsg),
    Closed(CloseInfo),
    /// The next message is being streamed: only `reader()` may take it.
    Streaming,
    /// Nothing yet; `waiting` is set so the next message pushes `Event::Readable`.
    Empty,
}

/// What a receive got.
pub(super) enum Received {
    Value(Py<PyAny>),
    Error(PyErr),
    Wait(Py<PyAny>),
}

/// Whether a data message can go out now (see `Connection::send_data`).
pub(super) enum Slot {
    Free,
    Busy,
    Finished,
}

impl Connection {
    /// The future a pending operation waits on: a native `Waiter` (waiter.rs), which
    /// `drain` completes without an asyncio Future or a `call_soon`.
    pub(super) fn create_future(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(Waiter::create(py, &self.core.get().event_loop)?.into_any())
    }

    /// Count an operation that completes without suspending; true when it should yield
    /// to the event loop once first (every FAIR_BUDGET of them).
    pub(super) fn tick(&self) -> bool {
        let n = self.immediate.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= FAIR_BUDGET {
            self.immediate.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// An operation suspended: the loop ran other tasks anyway.
    pub(super) fn untick(&self) {
        self.immediate.store(0, Ordering::Relaxed);
    }

    /// The awaitable for an operation that completed now (a fairness yield first, now
    /// and then).
    pub(super) fn completed(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if self.tick() {
            Op::new(OpState::YieldOnce).into_py(py)
        } else {
            done(py)
        }
    }

    /// The awaitable for an operation that completes when `fut` does.
    pub(super) fn pending(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        kind: WaitKind,
    ) -> PyResult<Py<PyAny>> {
        self.untick();
        op_wait(py, fut, kind)
    }

    pub(super) fn close_info(&self) -> CloseInfo {
        let received = self.shared.inbox.lock().closed.as_deref().cloned();
        let sent = || self.st.lock().sent_close().cloned();
        // Over max_backpressure with on_backpressure="close": closing with 1013.
        let overflow = || {
            self.shared.outbox.lock().overflow.then(|| CloseInfo {
                code: TRY_AGAIN_LATER,
                reason: OVERFLOW_REASON.into(),
            })
        };
        received
            .or_else(sent)
            .or_else(overflow)
            .unwrap_or(CloseInfo {
                code: ABNORMAL_CLOSURE,
                reason: String::new(),
            })
    }

    pub(super) fn closed_error_now(&self, py: Python<'_>) -> PyErr {
        let info = self.close_info();
        closed_exception(py, &info)
    }

    /// Take what is ready for `want` from the inbox (under its lock: no Python).
    pub(super) fn pop(&self, inbox: &mut Inbox, want: Want) -> Popped {
        let part = match inbox.queue.front() {
            Some(m) => m.part,
            None => {
                return match &inbox.closed {
                    Some(info) => Popped::Closed(CloseInfo::clone(info)),
                    None => {
                        // Under the inbox lock: a message that lands after this sees
                        // `waiting` and pushes Event::Readable, so no wake-up is lost.
                        inbox.waiting = true;
                        Popped::Empty
                    }
                };
            }
        };
        if want != Want::Chunk && part != Part::Whole {
            return Popped::Streaming;
        }
        let Some(m) = inbox.queue.pop_front() else {
            return Popped::Empty;
        };
        inbox.bytes -= m.payload().len();
        self.shared.resume_if_paused(inbox);
        Popped::Msg(m)
    }

    /// Turn what was popped into the receive's value or error (Python, no lock held).
    pub(super) fn deliver(
        &self,
        py: Python<'_>,
        popped: Popped,
        want: Want,
    ) -> PyResult<Option<Received>> {
        Ok(Some(match popped {
            Popped::Msg(m) => Received::Value(match want {
                Want::Chunk => make_chunk(py, m)?,
                Want::Message { .. } => make_message(py, m)?,
            }),
            Popped::Closed(info) => Received::Error(end_error(
                py,
                &info,
                matches!(want, Want::Message { anext: true }),
            )),
            Popped::Streaming => Received::Error(streaming_error()),
            Popped::Empty => return Ok(None),
        }))
    }

    /// A message a cancelled receive had been handed, if it suits `want`.
    pub(super) fn take_putback(&self, py: Python<'_>, want: Want) -> PyResult<Option<Received>> {
        let taken = self.st.lock().rare.as_mut().and_then(|r| r.putback.take());
        let Some((v, got)) = taken else {
            return Ok(None);
        };
        Ok(Some(match (got, want) {
            (Want::Message { .. }, Want::Message { .. }) | (Want::Chunk, Want::Chunk) => {
                Received::Value(v)
            }
            // A whole message asked for by reader(): one chunk, the last.
            (Want::Message { .. }, Want::Chunk) => {
                let m = v.bind(py).cast::<Message>()?.get();
                let op = opcode_object(py, m.opcode)?;
                Received::Value(
                    (op, m.body.clone_ref(py), true)
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                )
            }
            (Want::Chunk, Want::Message { .. }) => {
                // Still streaming: leave the chunk for reader().
                let old = self.st.lock().rare().putback.replace((v, got));
                drop(old);
                Received::Error(streaming_error())
            }
        }))
    }

    /// Give back a message (or chunk) a cancelled receive had already been handed.
    pub(super) fn put_back(&self, value: Py<PyAny>, want: Want) {
        let old = self.st.lock().rare().putback.replace((value, want));
        // Two cancelled receives cannot both hold one: the second would have been
        // handed this one first.
        debug_assert!(old.is_none());
        drop(old);
    }

    /// Receive now: a value, an error, or a future that `on_readable` completes.
    pub(super) fn receive_now(&self, py: Python<'_>, want: Want) -> PyResult<Received> {
        let prev = self.st.lock().recv.take();
        if let Some((f, w)) = prev {
            if !f.borrow(py).is_done() {
                let old = self.st.lock().recv.replace((f, w));
                drop(old);
                return Err(PyRuntimeError::new_err(
                    "cannot call recv() while another coroutine is already waiting for the \
                     next message on this connection",
                ));
            }
            drop(f); // cancelled: its message (if any) is still queued
        }
        if let Some(r) = self.take_putback(py, want)? {
            return Ok(r);
        }
        let popped = self.pop(&mut self.shared.inbox.lock(), want);
        if let Some(r) = self.deliver(py, popped, want)? {
            return Ok(r);
        }
        let fut = Waiter::create(py, &self.core.get().event_loop)?;
        let old = self.st.lock().recv.replace((fut.clone_ref(py), want));
        drop(old);
        self.untick();
        Ok(Received::Wait(fut.into_any()))
    }

    pub(super) fn receive(slf: &Bound<'_, Self>, want: Want) -> PyResult<Py<PyAny>> {
        if slf.get().native.load(Ordering::Relaxed) {
            return Err(native_receive_error());
        }
        Op::new(OpState::Receive {
            conn: slf.clone().unbind(),
            want,
            yielded: false,
        })
        .into_py(slf.py())
    }

    /// Event::Readable: complete the pending receive future if it is still wanted.
    pub(super) fn on_readable(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self.st.lock().recv.take();
        let Some((fut, want)) = taken else {
            return Ok(());
        };
        if fut.borrow(py).is_done() {
            // Cancelled: the message stays queued for the next recv().
            return Ok(());
        }
        let popped = self.pop(&mut self.shared.inbox.lock(), want);
        let outcome = match self.deliver(py, popped, want)? {
            Some(Received::Value(v)) => Outcome::Value(v),
            Some(Received::Error(e)) => Outcome::Error(e),
            Some(Received::Wait(_)) | None => {
                let old = self.st.lock().recv.replace((fut, want));
                drop(old);
                return Ok(());
            }
        };
        Waiter::complete(fut.bind(py), outcome)?;
        Ok(())
    }

    pub(super) fn on_drained(&self, py: Python<'_>) -> PyResult<()> {
        self.continue_large(py)?;
        let drains = {
            let mut st = self.st.lock();
            let drains = st.rare.as_mut().map(|r| std::mem::take(&mut r.drains));
            st.compact();
            drains.unwrap_or_default()
        };
        for f in drains {
            resolve(py, &f, py.None())?;
        }
        Ok(())
    }

    pub(super) fn on_closed(&self, py: Python<'_>) -> PyResult<()> {
        let (rare, reply) = {
            let mut st = self.st.lock();
            st.finished = true;
            (st.rare.take(), st.reply.take())
        };
        drop(reply);
        let Rare {
            putback,
            large,
            deferred,
            writer_waiters,
            drains: mut waiting,
            closers,
            sent_close,
        } = rare.map(|r| *r).unwrap_or_default();
        // Kept: close_info() reads it, and the receive still to come gets the putback.
        if sent_close.is_some() || putback.is_some() {
            let mut st = self.st.lock();
            let r = st.rare();
            r.sent_close = sent_close;
            r.putback = putback;
        }
        waiting.extend(deferred.into_iter().filter_map(|d| d.fut));
        waiting.extend(large.map(|l| l.fut));
        waiting.extend(writer_waiters);
        // A closed connection is unsubscribed from everything.
        unsubscribe_all(&self.core.get().fanout, &self.shared);
        self.on_readable(py)?;
        for f in closers {
            resolve(py, &f, py.None())?;
        }
        for f in waiting {
            if !is_done(py, &f)? {
                reject(py, &f, self.closed_error_now(py))?;
            }
        }
        Ok(())
    }

    pub(super) fn reply(&self, r: Reply) -> PyResult<()> {
        let tx = self.st.lock().reply.take().ok_or_else(|| {
            PyRuntimeError::new_err("this connection's handshake was already answered")
        })?;
        // The receiver is gone only if the client left or the server stopped.
        let _ = tx.send(r);
        Ok(())
    }
}

fn native_receive_error() -> PyErr {
    PyRuntimeError::new_err(
        "this connection has a listener (or was accepted with lightws.Accept): its \
         messages go to the listener's on_message, not to recv() or reader()",
    )
}

/// `(opcode, payload)` for what `send()` and `send_nowait()` take: `str` as TEXT,
/// bytes-like as BINARY, a `Message` as given (not CLOSE or CONTINUATION).
fn message_payload(message: &Bound<'_, PyAny>, what: &str) -> PyResult<(OpCode, Payload)> {
    if let Ok(b) = message.cast::<PyBytes>() {
        return Ok((OpCode::Binary, Payload::Bytes(b.clone().unbind())));
    }
    if let Ok(s) = message.cast::<PyString>() {
        return Ok((OpCode::Text, Payload::Str(s.clone().unbind())));
    }
    if let Ok(m) = message.cast::<Message>() {
        let m = m.get();
        let op = OpCode::from_u8(m.opcode).unwrap_or(OpCode::Binary);
        return match op {
            OpCode::Close => Err(PyValueError::new_err(format!(
                "send a close with `conn.close(code, reason)`, not {what}()"
            ))),
            OpCode::Continuation => Err(PyValueError::new_err(format!(
                "CONTINUATION frames are sent by conn.writer(), not {what}()"
            ))),
            _ => Ok((op, Payload::Bytes(m.body.clone_ref(message.py())))),
        };
    }
    match to_bytes(message)? {
        Some(b) => Ok((OpCode::Binary, Payload::Bytes(b.unbind()))),
        None => Err(PyTypeError::new_err(format!(
            "{what}() takes str, a bytes-like object or lightws.Message, not {}",
            type_name(message)
        ))),
    }
}

/// Subscribe `shared` to `topic` (no-op if it is already, or if the connection has
/// ended). No Python: also used for `lightws.Accept` connections, which have no object.
pub(super) fn subscribe(fanout: &Fanout, shared: &Arc<ConnShared>, topic: &str) {
    if shared.outbox.lock().closed {
        return;
    }
    // The registry and topic locks are taken with no connection lock held.
    if let Some(t) = fanout.subscribe(shared, topic) {
        let mut ob = shared.outbox.lock();
        if !ob.closed {
            ob.topics.push(t);
            return;
        }
        drop(ob);
        // The connection ended meanwhile; its topics may already have been taken.
        fanout.unsubscribe(shared.id, &t);
    }
}

/// Unsubscribe a connection that ended from every topic.
pub(super) fn unsubscribe_all(fanout: &Fanout, shared: &ConnShared) {
    let topics = std::mem::take(&mut shared.outbox.lock().topics);
    for t in &topics {
        fanout.unsubscribe(shared.id, t);
    }
}

/// Request headers as one `"Name: value\r\n..."` string: the Python `Request` parses
/// it only if the headers are used, and keeps one string per idle connection instead of
/// a tuple and two strings per header.
pub(super) fn raw_headers(headers: &[(String, String)]) -> String {
    let mut out = String::with_capacity(headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum());
    for (n, v) in headers {
        out.push_str(n);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out
}

pub(super) fn check_headers(headers: &[(String, String)]) -> PyResult<()> {
    for (n, v) in headers {
        handshake::check_header(n, v)
            .map_err(|e| PyValueError::new_err(format!("invalid response header {n:?}: {e}")))?;
    }
    Ok(())
}

/// Close codes an endpoint may send (RFC 6455 7.4.1; 1004-1006 and 1015 are reserved).
pub(super) fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[pymethods]
impl Connection {
    /// Wait for the next message and return it.
    ///
    /// Raises `ConnectionClosedOK` (peer closed with 1000/1001) or
    /// `ConnectionClosedError` once the connection is closed and every message received
    /// before the close has been returned. Cancelling a pending `recv()` loses no message.
    fn recv(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Self::receive(slf, Want::Message { anext: false })
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Self::receive(slf, Want::Message { anext: true })
    }

    /// Stream the next message: `async for chunk in conn.reader(): ...`.
    ///
    /// Yields the payload of one message as `bytes` chunks as its frames arrive, without
    /// assembling it and without the `max_msg_len` bound (TEXT chunks are UTF-8
    /// validated, but a chunk may end inside a character). The reader's `opcode` is set
    /// once the first chunk is in. A message that had already (partly) arrived when
    /// `reader()` was called is yielded whole, as one chunk.
    fn reader(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let this = slf.get();
        if this.native.load(Ordering::Relaxed) {
            return Err(native_receive_error());
        }
        let putback = this
            .st
            .lock()
            .rare
            .as_ref()
            .is_some_and(|r| r.putback.is_some());
        if !putback {
            let inbox = this.shared.inbox.lock();
            if inbox.queue.is_empty() && !inbox.assembling && inbox.closed.is_none() {
                this.shared
                    .stream_next
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
        api(py)?.reader.call1(py, (slf,))
    }

    /// Send one message in fragments: `async with conn.writer() as w: await w.write(x)`.
    ///
    /// The first `write` sends a TEXT (`binary=False`, chunks are `str`) or BINARY frame,
    /// later ones CONTINUATION frames; leaving the block sends the final frame. Other
    /// `send()` calls on this connection wait until the writer is done; pings, pongs and
    /// close keep flowing. Not bound by `max_msg_len`.
    #[pyo3(signature = (binary = true))]
    fn writer(slf: &Bound<'_, Self>, binary: bool) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        api(py)?.writer.call1(py, (slf, binary))
    }

    fn _read_chunk(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Self::receive(slf, Want::Chunk)
    }

    /// Completes when the writer may start: at once, or after the fragmented send or
    /// writer in progress on this connection.
    fn _writer_begin(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let slot = this.slot();
        match slot {
            Slot::Finished => Err(this.closed_error_now(py)),
            Slot::Busy => {
                let fut = this.create_future(py)?;
                this.st
                    .lock()
                    .rare()
                    .writer_waiters
                    .push_back(fut.clone_ref(py));
                this.pending(py, fut, WaitKind::Writer(slf.clone().unbind()))
            }
            Slot::Free => {
                // No Python ran since slot(): the slot is still free.
                this.st.lock().writer_active = true;
                done(py)
            }
        }
    }

    fn _send_frame(
        &self,
        py: Python<'_>,
        opcode: i64,
        data: &Bound<'_, PyAny>,
        fin: bool,
    ) -> PyResult<Py<PyAny>> {
        let op = known_opcode(opcode)?;
        let b = self.bytes_arg(data, "write")?;
        self.enqueue_frame(py, op, b.as_bytes(), fin)
    }

    /// The writer finished: send what `send()` put aside meanwhile, in order.
    fn _writer_end(&self, py: Python<'_>) -> PyResult<()> {
        self.writer_end(py)
    }

    /// Send a message: `str` as TEXT, bytes-like as BINARY, a `Message` as given.
    ///
    /// Completes at once unless more than `write_limit` bytes are queued; then it waits
    /// until the connection has written them. Raises `ConnectionClosed` after a close.
    ///
    /// The message is queued when `send()` is called, so cancelling the wait does not
    /// take it back; only a send still waiting behind a fragmented message (a
    /// `writer()` or a send over `write_limit`) is not sent if cancelled before its turn.
    /// The fragments of a large message keep going after its send is cancelled.
    ///
    /// `compress` (permessage-deflate, when the connection negotiated it): None follows
    /// `Config.compression` (messages of at least `min_size` bytes are compressed),
    /// False sends this message uncompressed, True compresses it whatever its size.
    /// Compression runs on the connection's tokio thread, never on the event loop.
    #[pyo3(signature = (message, compress = None))]
    fn send(
        &self,
        py: Python<'_>,
        message: &Bound<'_, PyAny>,
        compress: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let (op, payload) = message_payload(message, "send")?;
        self.send_payload(py, op, payload, compress)
    }

    /// Queue a message without waiting (for listeners, whose methods cannot await):
    /// `str` as TEXT, bytes-like as BINARY, a `Message` as given.
    ///
    /// Returns at once. Raises `ConnectionClosed` once the connection is closing. When
    /// the bytes queued and not yet written (`buffered_amount`) would go over
    /// `Config.max_backpressure`, `Config.on_backpressure` applies as for a publish:
    /// `"close"` closes the connection with 1013, `"drop"` drops this message (counted
    /// in `stats().dropped`). Messages go out in call order with `send()`s.
    fn send_nowait(&self, py: Python<'_>, message: &Bound<'_, PyAny>) -> PyResult<()> {
        let (op, payload) = message_payload(message, "send_nowait")?;
        self.send_nowait_payload(py, op, payload)
    }

    /// Connections compare equal when they are the same connection: a listener may be
    /// handed a new object for a connection whose object it did not keep.
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Connection>()
            .is_ok_and(|o| o.get().shared.id == self.shared.id)
    }

    fn __hash__(&self) -> u64 {
        // Python turns -1 into -2 itself; ids are small positive numbers anyway.
        self.shared.id
    }

    /// Send a TEXT message. `compress` as for `send()`.
    #[pyo3(signature = (text, compress = None))]
    fn send_text(
        &self,
        py: Python<'_>,
        text: &Bound<'_, PyString>,
        compress: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        self.send_payload(
            py,
            OpCode::Text,
            Payload::Str(text.clone().unbind()),
            compress,
        )
    }

    /// Send a BINARY message. `compress` as for `send()`.
    #[pyo3(signature = (data, compress = None))]
    fn send_binary(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        compress: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let b = self.bytes_arg(data, "send_binary")?;
        self.send_payload(py, OpCode::Binary, Payload::Bytes(b.unbind()), compress)
    }

    /// Send a PING (payload at most 125 bytes).
    #[pyo3(signature = (data = None))]
    fn send_ping(&self, py: Python<'_>, data: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        match data {
            None => self.enqueue_frame(py, OpCode::Ping, b"", true),
            Some(d) => {
                let b = self.bytes_arg(d, "send_ping")?;
                self.send_payload(py, OpCode::Ping, Payload::Bytes(b.unbind()), None)
            }
        }
    }

    /// Send a PONG (payload at most 125 bytes).
    #[pyo3(signature = (data = None))]
    fn send_pong(&self, py: Python<'_>, data: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        match data {
            None => self.enqueue_frame(py, OpCode::Pong, b"", true),
            Some(d) => {
                let b = self.bytes_arg(d, "send_pong")?;
                self.send_payload(py, OpCode::Pong, Payload::Bytes(b.unbind()), None)
            }
        }
    }

    /// Close gracefully: send a close frame, wait up to `close_timeout` for the peer's,
    /// then close TCP. Returns when the connection is closed. Idempotent.
    #[pyo3(signature = (code = 1000, reason = ""))]
    pub(super) fn close(&self, py: Python<'_>, code: u16, reason: &str) -> PyResult<Py<PyAny>> {
        if !sendable_close_code(code) {
            return Err(PyValueError::new_err(format!(
                "close code {code} cannot be sent: use 1000-1003, 1007-1014 or 3000-4999"
            )));
        }
        if reason.len() > 123 {
            return Err(PyValueError::new_err(format!(
                "close reason is {} bytes in UTF-8; at most 123 fit in a close frame",
                reason.len()
            )));
        }
        let (finished, reply) = {
            let mut st = self.st.lock();
            (st.finished, st.reply.take())
        };
        if finished {
            return done(py);
        }
        if let Some(tx) = reply {
            // Still in the handshake (e.g. the server is closing): refuse the upgrade.
            let _ = tx.send(Reply::Respond {
                status: 503,
                headers: vec![("Retry-After".into(), "1".into())],
                body: b"server is shutting down".to_vec(),
            });
            return done(py);
        }
        let payload = frame::close_payload(Some(code), reason);
        let mask = self.shared.cfg.mask(); // the client role masks (RFC 6455 5.3)
        let queued = if self.fenced() {
            // Behind the frames already on the fan-out route (see send.rs), like them.
            if self.shared.outbox.lock().closed {
                return done(py);
            }
            let already = self.st.lock().sent_close().is_some();
            if !already {
                let mut b = Vec::with_capacity(2 + payload.len());
                frame::encode_frame(&mut b, true, OpCode::Close, &payload, mask);
                self.core
                    .get()
                    .fanout
                    .send_own(self.shared.clone(), bytes::Bytes::from(b), false);
            }
            !already
        } else {
            let mut ob = self.shared.outbox.lock();
            if ob.closed {
                // The task has ended; its Closed event completes nothing we wait for.
                return done(py);
            }
            if ob.closing {
                false
            } else {
                ob.closing = true;
                let before = ob.queue.len();
                ob.queue
                    .push_with(|b| frame::encode_frame(b, true, OpCode::Close, &payload, mask));
                let added = ob.queue.len() - before;
                self.shared.unsent.fetch_add(added, Ordering::Relaxed);
                true
            }
        };
        if queued {
            self.st.lock().rare().sent_close = Some(CloseInfo {
                code,
                reason: reason.to_owned(),
            });
            self.shared.stats.frame_out(OpCode::Close);
            if self.shared.cfg.log_level >= LogLevel::Debug {
                self.shared.log(LogLevel::Debug, || {
                    format!("send CLOSE code={code} reason={reason:?}")
                });
            }
            // Always wake: even with frames still queued, the close starts its timer.
            self.shared.waker.wake();
        }
        let fut = self.create_future(py)?;
        self.st.lock().rare().closers.push(fut.clone_ref(py));
        self.pending(py, fut, WaitKind::Plain)
    }

    /// Close the TCP connection now, without a close handshake.
    fn abort(&self) {
        {
            let mut ob = self.shared.outbox.lock();
            ob.abort = true;
            // No more sends from here on.
            ob.closing = true;
        }
        {
            // Closed as far as this side is concerned: recv() raises once the queue is
            // read (1006, no close frame).
            let mut inbox = self.shared.inbox.lock();
            if inbox.closed.is_none() {
                inbox.closed = Some(Box::new(CloseInfo {
                    code: ABNORMAL_CLOSURE,
                    reason: String::new(),
                }));
            }
        }
        self.shared.waker.wake();
    }

    /// Subscribe to `topic`: every `server.publish(topic, ...)` is queued to this
    /// connection until it unsubscribes or closes. O(1); subscribing twice is harmless;
    /// a closed connection is not subscribed.
    fn subscribe(&self, topic: &str) {
        if self.st.lock().finished {
            return;
        }
        subscribe(&self.core.get().fanout, &self.shared, topic);
    }

    /// Unsubscribe from `topic`; True if it was subscribed.
    fn unsubscribe(&self, topic: &str) -> bool {
        let found = {
            let mut ob = self.shared.outbox.lock();
            let pos = ob.topics.iter().position(|t| &*t.name == topic);
            pos.map(|i| ob.topics.swap_remove(i))
        };
        match found {
            Some(t) => {
                self.core.get().fanout.unsubscribe(self.shared.id, &t);
                true
            }
            None => false,
        }
    }

    /// The topics this connection is subscribed to.
    #[getter]
    fn topics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyFrozenSet>> {
        let names: Vec<String> = self
            .shared
            .outbox
            .lock()
            .topics
            .iter()
            .map(|t| t.name.to_string())
            .collect();
        PyFrozenSet::new(py, &names)
    }

    /// The `lightws.Server` that accepted this connection (publish without a global);
    /// None for a client connection (`lightws.connect`).
    #[getter]
    fn server(&self, py: Python<'_>) -> Py<PyAny> {
        self.core.get().server.clone_ref(py)
    }

    /// Bytes queued for this connection and not yet written to its socket (like a
    /// browser's `WebSocket.bufferedAmount`): what `write_limit` and
    /// `max_backpressure` are about.
    #[getter]
    fn buffered_amount(&self) -> usize {
        self.shared.unsent.load(Ordering::Relaxed)
    }

    /// A number unique to this connection within the process.
    #[getter]
    fn id(&self) -> u64 {
        self.shared.id
    }

    /// The `lightws.Request` this connection was upgraded from.
    ///
    /// For a listener connection it is there in `on_open` and as long as you keep the
    /// object; a new object made for a later event has none (RuntimeError): read what
    /// you need in `on_open`, or keep it as an attribute (`conn.user = ...`).
    #[getter]
    fn request(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.request.get().map(|r| r.clone_ref(py)).ok_or_else(|| {
            PyRuntimeError::new_err(
                "this listener connection's request was released with its previous \
                 Connection object: read what you need from conn.request in on_open, or \
                 keep it (conn.user = ...)",
            )
        })
    }

    /// The client's `(host, port)`: the TCP peer, or behind a proxy listed in
    /// `Config.trusted_proxies` the address from `X-Forwarded-For` (port 0).
    #[getter]
    fn remote_address(&self) -> (String, u16) {
        (
            self.shared.remote.ip().to_string(),
            self.shared.remote.port(),
        )
    }

    /// The subprotocol chosen in the handshake, or None.
    #[getter]
    fn subprotocol(&self) -> Option<String> {
        self.subprotocol.get().cloned().flatten()
    }

    /// True once the connection is closed (a close frame was received or sent and
    /// answered, or the socket dropped).
    #[getter]
    fn closed(&self) -> bool {
        let finished = self.st.lock().finished;
        finished || self.shared.inbox.lock().closed.is_some()
    }

    /// The close code, once closed (1006 if the socket dropped without a close frame).
    #[getter]
    fn close_code(&self) -> Option<u16> {
        self.shared.inbox.lock().closed.as_ref().map(|c| c.code)
    }

    /// The close reason, once closed.
    #[getter]
    fn close_reason(&self) -> Option<String> {
        self.shared
            .inbox
            .lock()
            .closed
            .as_ref()
            .map(|c| c.reason.clone())
    }

    fn __repr__(&self) -> String {
        format!(
            "<lightws.Connection id={} remote={}>",
            self.shared.id, self.shared.remote
        )
    }

    // -- used by lightws.server during the handshake ------------------------------------

    /// Watch the handler's task: when it ends, close with 1000 (returned or
    /// ConnectionClosed), 1011 (raised; logged) or abort (cancelled).
    ///
    /// NOTE: a done callback on the task, bound to this object, instead of a wrapper
    /// coroutine or a partial plus a task set: each of those costs an idle connection
    /// a few hundred bytes.
    fn _watch(slf: &Bound<'_, Self>, task: &Bound<'_, PyAny>) -> PyResult<()> {
        let old = slf.get().st.lock().handler.replace(task.clone().unbind());
        drop(old);
        // In one shared empty context: without `context=`, asyncio copies the current
        // context for the callback, a Context object per connection (about 70 bytes)
        // that _handler_done does not need.
        let kwargs = pyo3::types::PyDict::new(slf.py());
        kwargs.set_item(intern!(slf.py(), "context"), &api(slf.py())?.empty_context)?;
        task.call_method(
            intern!(slf.py(), "add_done_callback"),
            (slf.getattr(intern!(slf.py(), "_handler_done"))?,),
            Some(&kwargs),
        )?;
        Ok(())
    }

    fn _handler_done(slf: &Bound<'_, Self>, task: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let old = this.st.lock().handler.take();
        drop(old);
        if task.call_method0("cancelled")?.is_truthy()? {
            this.abort();
            return Ok(());
        }
        let exc = task.call_method0("exception")?;
        let mut code = 1000;
        if !exc.is_none() && !exc.is_instance(api(py)?.closed_base.bind(py))? {
            api(py)?.handler_failed.call1(py, (slf, exc))?;
            code = 1011;
        }
        if !this.closed() {
            this.close(py, code, "")?;
        }
        Ok(())
    }

    /// The handler's task while it runs.
    #[getter]
    fn _handler_task(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.st.lock().handler.as_ref().map(|t| t.clone_ref(py))
    }

    fn _init(&self, request: Py<PyAny>) {
        let _ = self.request.set(request);
    }

    #[pyo3(signature = (headers, subprotocol = None))]
    fn _accept(&self, headers: Vec<(String, String)>, subprotocol: Option<String>) -> PyResult<()> {
        check_headers(&headers)?;
        if let Some(p) = &subprotocol {
            handshake::check_header("Sec-WebSocket-Protocol", p)
                .map_err(|e| PyValueError::new_err(format!("invalid subprotocol {p:?}: {e}")))?;
        }
        let _ = self.subprotocol.set(subprotocol.clone());
        self.reply(Reply::Accept {
            headers,
            subprotocol,
        })
    }

    /// After `_accept`: make this a connection without a coroutine (listener.rs),
    /// subscribed to `topics`, its events handed to `listener` if not None.
    fn _adopt(
        slf: &Bound<'_, Self>,
        listener: Option<Bound<'_, PyAny>>,
        topics: Vec<String>,
    ) -> PyResult<()> {
        let core = slf.get().core.bind(slf.py()).clone();
        core.get().adopt(&core, slf, listener, topics)
    }

    fn _reject(&self, status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> PyResult<()> {
        if !(200..=599).contains(&status) {
            return Err(PyValueError::new_err(format!(
                "response.status must be 200-599 when not accepting, got {status}"
            )));
        }
        check_headers(&headers)?;
        self.reply(Reply::Respond {
            status,
            headers,
            body,
        })
    }
}

impl Connection {
    pub(super) fn bytes_arg<'py>(
        &self,
        data: &Bound<'py, PyAny>,
        what: &str,
    ) -> PyResult<Bound<'py, PyBytes>> {
        if data.cast::<PyString>().is_ok() {
            return Err(PyTypeError::new_err(format!(
                "{what}() takes a bytes-like object, not str (use .encode())"
            )));
        }
        to_bytes(data)?.ok_or_else(|| {
            PyTypeError::new_err(format!(
                "{what}() takes a bytes-like object, not {}",
                type_name(data)
            ))
        })
    }
}
#[cfg(test)]
mod tests {
    /// Every idle coroutine connection holds one `Connection`: what only some
    /// connections need is boxed in `Rare` (measured 320 bytes before, 136 after).
    #[test]
    fn connection_stays_small() {
        let size = std::mem::size_of::<super::Connection>();
        assert!(size <= 144, "Connection is {size} bytes");
        assert!(std::mem::size_of::<super::PyState>() <= 64);
    }
}
