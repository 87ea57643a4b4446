//! The asyncio side of the bridge (DESIGN.md §2): the Python classes `Connection`,
//! `Message` and the private `Core` that owns the tokio runtime and drains the hub.
//!
//! Everything here runs on the event-loop thread with the GIL held. Tokio threads only
//! push events into the hub (hub.rs) and never call into this module.
//!
//! Every coroutine method of `Connection` returns an [`Op`], an awaitable with the
//! coroutine protocol (accepted by `create_task`, `gather`, `wait_for`, ...).
//!
//! Hot paths:
//! - `recv()` takes a message when first resumed: with one queued it completes without
//!   suspending (no future, no loop round-trip). Otherwise it waits on an
//!   `asyncio.Future` that `drain` completes. A cancelled receive gives back a message
//!   it had already been handed, so cancelling a pending `recv()` loses nothing.
//! - `send()` encodes the frame straight into the connection's outbox (one copy), wakes
//!   the connection task only if the outbox was empty, and returns a shared completed
//!   awaitable unless more than `write_limit` bytes are queued.
//! - Operations that complete without suspending yield to the loop once every
//!   FAIR_BUDGET of them, so a handler draining a burst cannot starve other tasks.
//!
//! Lock discipline (lockcheck.rs, docs/architecture.md): a connection lock (`st`,
//! `inbox`, `outbox`) is held only to move values in or out: never two at once, never
//! across a call into Python or the drop of a Python object.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyStopIteration, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyString, PyTuple};
use tokio::sync::{oneshot, watch};

use crate::conn::{
    describe_frame, CloseInfo, ConnConfig, ConnShared, InMsg, Inbox, Part, ABNORMAL_CLOSURE,
    LOG_DEBUG,
};
use crate::frame::{self, OpCode};
use crate::handshake;
use crate::hub::{Event, HandshakeEvent, Hub, Reply};
use crate::lockcheck::{assert_unlocked, ConnMutex};
use crate::security::{IpLimiter, IpNet, OriginPolicy};
use crate::server::{self, ServerConfig, ServerShared};
use crate::stats::{Stats, OPCODES};
use crate::tls::{self, CertStore, TlsError};

/// Python objects looked up once: Opcode members and the ConnectionClosed classes.
struct PyApi {
    opcodes: Vec<Option<Py<PyAny>>>,
    closed_ok: Py<PyAny>,
    closed_error: Py<PyAny>,
    protocol_error: Py<PyAny>,
    payload_too_big: Py<PyAny>,
    reader: Py<PyAny>,
    writer: Py<PyAny>,
    closed_base: Py<PyAny>,
    handler_failed: Py<PyAny>,
}

static API: PyOnceLock<PyApi> = PyOnceLock::new();

fn api(py: Python<'_>) -> PyResult<&PyApi> {
    API.get_or_try_init(py, || {
        let types = py.import("lightws._types")?;
        let opcode_cls = types.getattr("Opcode")?;
        let mut opcodes = Vec::with_capacity(OPCODES);
        for i in 0..OPCODES as u8 {
            opcodes.push(match OpCode::from_u8(i) {
                Some(_) => Some(opcode_cls.call1((i,))?.unbind()),
                None => None,
            });
        }
        let exc = py.import("lightws.exceptions")?;
        let streaming = py.import("lightws.streaming")?;
        Ok(PyApi {
            opcodes,
            closed_ok: exc.getattr("ConnectionClosedOK")?.unbind(),
            closed_error: exc.getattr("ConnectionClosedError")?.unbind(),
            protocol_error: exc.getattr("ProtocolError")?.unbind(),
            payload_too_big: exc.getattr("PayloadTooBig")?.unbind(),
            reader: streaming.getattr("MessageReader")?.unbind(),
            writer: streaming.getattr("MessageWriter")?.unbind(),
            closed_base: exc.getattr("ConnectionClosed")?.unbind(),
            handler_failed: py
                .import("lightws.server")?
                .getattr("_handler_failed")?
                .unbind(),
        })
    })
}

fn closed_exception(py: Python<'_>, info: &CloseInfo) -> PyErr {
    assert_unlocked("building ConnectionClosed");
    match api(py) {
        Ok(api) => {
            // RFC 6455 7.4.1: 1002 protocol error and 1007 invalid data are what lightws
            // closes with when the peer breaks the protocol, 1009 when its message is over
            // max_msg_len (a peer may close with them too). Both classes subclass
            // ConnectionClosedError.
            let cls = match info.code {
                1000 | 1001 => &api.closed_ok,
                1002 | 1007 => &api.protocol_error,
                1009 => &api.payload_too_big,
                _ => &api.closed_error,
            };
            match cls.call1(py, (info.code, info.reason.as_str())) {
                Ok(obj) => PyErr::from_value(obj.into_bound(py)),
                Err(e) => e,
            }
        }
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------
// Op: what the Connection methods return.

/// How many operations on one connection may complete without suspending before one of
/// them yields to the event loop once (see [`Connection::tick`]).
///
/// NOTE: with messages already queued, `recv()` and a `send()` below `write_limit`
/// complete at once, so a handler draining a burst never let other tasks run. Yielding
/// once every 32 such operations bounds that to a few hundred microseconds while the
/// extra loop iteration costs about 1/32 of a `call_soon` per message (measured in
/// BENCHMARKS.md, "Fairness").
const FAIR_BUDGET: u32 = 32;

/// What an [`Op`] does when it is next resumed.
enum OpState {
    /// Complete with None (stateless: one shared instance serves every such send).
    Nothing,
    /// Yield to the event loop once, then complete with None.
    YieldOnce,
    /// Receive the next message (or chunk) when first resumed; `yielded` once the
    /// fairness yield (if any) is behind it.
    Receive {
        conn: Py<Connection>,
        want: Want,
        yielded: bool,
    },
    /// Waiting for an asyncio future that the bridge completes.
    Wait { fut: Py<PyAny>, kind: WaitKind },
    /// Finished (resumed after completion: returns None).
    Finished,
}

/// What an abandoned [`Op`] must undo if its future had already been completed.
enum WaitKind {
    /// Nothing to undo (send drained, close finished, deferred send queued).
    Plain,
    /// A received message or chunk: returned to the connection, so that cancelling a
    /// `recv()` loses nothing even when the message had already been handed over.
    Receive(Py<Connection>, Want),
    /// The writer slot: released again.
    Writer(Py<Connection>),
}

/// The awaitable every `Connection` coroutine method returns.
///
/// It has the coroutine protocol (`send`, `throw`, `close`, `__await__`), so it is
/// accepted wherever a coroutine is: `await`, `asyncio.create_task`, `gather`,
/// `wait_for`, `shield`, `asyncio.timeout`. Completed operations finish without
/// suspending; pending ones yield an asyncio future to the task, like `Future.__await__`.
/// Nothing is taken from the connection until the awaitable is first resumed, and a
/// cancelled or abandoned one gives back what it had been handed.
#[pyclass(module = "lightws._lightws")]
pub struct Op {
    state: OpState,
}

impl Op {
    fn new(state: OpState) -> Self {
        Self { state }
    }

    fn into_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(Py::new(py, self)?.into_any())
    }

    /// Yield `fut` to the running task (the protocol of `asyncio.Future.__await__`).
    fn yield_future(py: Python<'_>, fut: &Py<PyAny>) -> PyResult<Option<Py<PyAny>>> {
        assert_unlocked("yielding a future");
        fut.setattr(py, intern!(py, "_asyncio_future_blocking"), true)?;
        Ok(Some(fut.clone_ref(py)))
    }

    /// The coroutine's step: `Ok(Some(x))` yields x, `Err(StopIteration(v))` returns v.
    fn step(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        loop {
            match std::mem::replace(&mut self.state, OpState::Finished) {
                OpState::Nothing => {
                    self.state = OpState::Nothing;
                    return Err(PyStopIteration::new_err((py.None(),)));
                }
                OpState::Finished => return Err(PyStopIteration::new_err((py.None(),))),
                OpState::YieldOnce => return Ok(Some(py.None())),
                OpState::Receive {
                    conn,
                    want,
                    yielded,
                } => {
                    if !yielded && conn.get().tick() {
                        self.state = OpState::Receive {
                            conn,
                            want,
                            yielded: true,
                        };
                        return Ok(Some(py.None()));
                    }
                    match conn.get().receive_now(py, want)? {
                        Received::Value(v) => return Err(PyStopIteration::new_err((v,))),
                        Received::Error(e) => return Err(e),
                        Received::Wait(fut) => {
                            self.state = OpState::Wait {
                                fut,
                                kind: WaitKind::Receive(conn, want),
                            };
                        }
                    }
                }
                OpState::Wait { fut, kind } => {
                    if !is_done(py, &fut)? {
                        let y = Self::yield_future(py, &fut);
                        self.state = OpState::Wait { fut, kind };
                        return y;
                    }
                    // The task resumed us: the future is complete. result() raises its
                    // exception (ConnectionClosed, CancelledError) if it has one.
                    let v = fut.call_method0(py, intern!(py, "result"))?;
                    return Err(PyStopIteration::new_err((v,)));
                }
            }
        }
    }

    /// The operation is given up before its result was delivered: cancel what is
    /// pending, give back what was already handed over.
    fn abandon(&mut self, py: Python<'_>) {
        let state = std::mem::replace(&mut self.state, OpState::Finished);
        if let OpState::Nothing = state {
            self.state = OpState::Nothing;
            return;
        }
        let OpState::Wait { fut, kind } = state else {
            return;
        };
        let r: PyResult<()> = (|| {
            if !is_done(py, &fut)? {
                fut.call_method0(py, intern!(py, "cancel"))?;
                return Ok(());
            }
            if fut
                .call_method0(py, intern!(py, "cancelled"))?
                .is_truthy(py)?
                || !fut.call_method0(py, intern!(py, "exception"))?.is_none(py)
            {
                return Ok(());
            }
            match kind {
                WaitKind::Plain => {}
                WaitKind::Receive(conn, want) => {
                    let v = fut.call_method0(py, intern!(py, "result"))?;
                    conn.get().put_back(v, want);
                }
                WaitKind::Writer(conn) => conn.get().writer_end(py)?,
            }
            Ok(())
        })();
        if let Err(e) = r {
            e.write_unraisable(py, None);
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        // An awaitable dropped while waiting (its task was destroyed, or it was never
        // resumed after its future completed) must not keep the receive slot or the
        // writer slot, nor lose a message handed to it. A send dropped unawaited is
        // left alone: like one that completed at once, its message still goes out.
        if let OpState::Wait {
            kind: WaitKind::Receive(..) | WaitKind::Writer(..),
            ..
        } = self.state
        {
            Python::attach(|py| self.abandon(py));
        }
    }
}

#[pymethods]
impl Op {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }
    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.step(py)
    }
    fn send(&mut self, py: Python<'_>, _value: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        self.step(py)
    }
    #[pyo3(signature = (typ, val=None, _tb=None))]
    fn throw(
        &mut self,
        py: Python<'_>,
        typ: &Bound<'_, PyAny>,
        val: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<Py<PyAny>>> {
        self.abandon(py);
        let exc = match val {
            Some(v) if !v.is_none() => v.clone(),
            _ => typ.clone(),
        };
        Err(PyErr::from_value(exc))
    }
    fn close(&mut self, py: Python<'_>) {
        self.abandon(py);
    }
}

static DONE: PyOnceLock<Py<Op>> = PyOnceLock::new();

/// The shared completed awaitable that returns None (stateless, so one serves all).
fn done(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let r = DONE.get_or_try_init(py, || Py::new(py, Op::new(OpState::Nothing)))?;
    Ok(r.clone_ref(py).into_any())
}

fn op_wait(py: Python<'_>, fut: Py<PyAny>, kind: WaitKind) -> PyResult<Py<PyAny>> {
    Op::new(OpState::Wait { fut, kind }).into_py(py)
}

// -- asyncio futures: every call goes through these, with no connection lock held -----

fn is_done(py: Python<'_>, fut: &Py<PyAny>) -> PyResult<bool> {
    assert_unlocked("future.done()");
    fut.call_method0(py, intern!(py, "done"))?.is_truthy(py)
}

/// Complete `fut` with `value` unless it is already done (cancelled by its waiter).
fn resolve(py: Python<'_>, fut: &Py<PyAny>, value: Py<PyAny>) -> PyResult<()> {
    if !is_done(py, fut)? {
        fut.call_method1(py, intern!(py, "set_result"), (value,))?;
    }
    Ok(())
}

/// Fail `fut` with `err` unless it is already done.
fn reject(py: Python<'_>, fut: &Py<PyAny>, err: PyErr) -> PyResult<()> {
    if !is_done(py, fut)? {
        fut.call_method1(py, intern!(py, "set_exception"), (err.into_value(py),))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Message

/// One WebSocket message: an opcode and its payload.
///
/// `Message(Opcode.TEXT, b"hi")`; `body` is always `bytes` (a `str` body is encoded as
/// UTF-8). `text` decodes the body as UTF-8 (TEXT messages from peers are already
/// validated).
#[pyclass(module = "lightws", frozen, name = "Message")]
pub struct Message {
    opcode: u8,
    body: Py<PyBytes>,
}

fn known_opcode(v: i64) -> PyResult<OpCode> {
    u8::try_from(v)
        .ok()
        .and_then(OpCode::from_u8)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "{v} is not a WebSocket opcode (use lightws.Opcode: 0, 1, 2, 8, 9 or 10)"
            ))
        })
}

/// Bytes-like or str to bytes; None for unsupported types.
fn to_bytes<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let py = obj.py();
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Some(b.clone()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Some(PyBytes::new(py, s.to_str()?.as_bytes())));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Some(PyBytes::new(py, &b.to_vec())));
    }
    if obj.hasattr("__buffer__")? || obj.get_type().name()? == "memoryview" {
        let b = py.get_type::<PyBytes>().call1((obj,))?;
        return Ok(Some(b.cast_into::<PyBytes>()?));
    }
    Ok(None)
}

#[pymethods]
impl Message {
    #[new]
    #[pyo3(signature = (opcode, body = None))]
    fn new(py: Python<'_>, opcode: i64, body: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let op = known_opcode(opcode)?;
        let body = match body {
            None => PyBytes::new(py, b""),
            Some(b) => to_bytes(b)?.ok_or_else(|| {
                PyTypeError::new_err(format!(
                    "Message body must be bytes-like or str, not {}",
                    type_name(b)
                ))
            })?,
        };
        Ok(Self {
            opcode: op.as_u8(),
            body: body.unbind(),
        })
    }

    /// The opcode, a `lightws.Opcode`.
    #[getter]
    fn opcode(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let api = api(py)?;
        Ok(api.opcodes[self.opcode as usize]
            .as_ref()
            .map(|o| o.clone_ref(py))
            .unwrap_or_else(|| py.None()))
    }

    /// The payload as bytes.
    #[getter]
    fn body(&self, py: Python<'_>) -> Py<PyBytes> {
        self.body.clone_ref(py)
    }

    /// The payload decoded as UTF-8 (raises UnicodeDecodeError if it is not).
    #[getter]
    fn text<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.body.bind(py).call_method1("decode", ("utf-8",))
    }

    #[classattr]
    fn __match_args__() -> (&'static str, &'static str) {
        ("opcode", "body")
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let name = match OpCode::from_u8(self.opcode) {
            Some(OpCode::Continuation) => "CONTINUATION",
            Some(OpCode::Text) => "TEXT",
            Some(OpCode::Binary) => "BINARY",
            Some(OpCode::Close) => "CLOSE",
            Some(OpCode::Ping) => "PING",
            Some(OpCode::Pong) => "PONG",
            None => "?",
        };
        let body = self.body.bind(py);
        let shown = if body.as_bytes().len() > 60 {
            format!(
                "{}...({} bytes)",
                PyBytes::new(py, &body.as_bytes()[..60]).repr()?,
                body.as_bytes().len()
            )
        } else {
            body.repr()?.to_string()
        };
        Ok(format!("Message(Opcode.{name}, {shown})"))
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<Message>() {
            Ok(o) => {
                let o = o.get();
                o.opcode == self.opcode
                    && o.body.bind(py).as_bytes() == self.body.bind(py).as_bytes()
            }
            Err(_) => false,
        }
    }

    fn __hash__(&self, py: Python<'_>) -> PyResult<isize> {
        PyTuple::new(
            py,
            [
                self.opcode.into_pyobject(py)?.into_any(),
                self.body.bind(py).clone().into_any(),
            ],
        )?
        .hash()
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

fn make_message(py: Python<'_>, m: InMsg) -> PyResult<Py<PyAny>> {
    assert_unlocked("building a Message");
    let body = PyBytes::new(py, &m.data).unbind();
    drop(m.data);
    Ok(Py::new(
        py,
        Message {
            opcode: m.opcode.as_u8(),
            body,
        },
    )?
    .into_any())
}

/// The `lightws.Opcode` member for `op` (None for an unknown one).
fn opcode_object(py: Python<'_>, op: u8) -> PyResult<Py<PyAny>> {
    Ok(api(py)?.opcodes[op as usize]
        .as_ref()
        .map(|o| o.clone_ref(py))
        .unwrap_or_else(|| py.None()))
}

/// `(opcode, chunk, fin)` for `conn.reader()`.
fn make_chunk(py: Python<'_>, m: InMsg) -> PyResult<Py<PyAny>> {
    let fin = match m.part {
        Part::Whole => true,
        Part::Chunk { fin } => fin,
    };
    assert_unlocked("building a chunk");
    let op = opcode_object(py, m.opcode.as_u8())?;
    let body = PyBytes::new(py, &m.data);
    Ok((op, body, fin).into_pyobject(py)?.into_any().unbind())
}

// ---------------------------------------------------------------------------------------
// Connection

/// What a pending receive waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A whole message for `recv()` (`anext`: for `__anext__`, which ends iteration on a
    /// normal close instead of raising).
    Message { anext: bool },
    /// The next chunk of a streamed message, for `conn.reader()`.
    Chunk,
}

/// A message body kept by reference (no copy) until it is queued: `bytes` and `str` are
/// immutable; other bytes-like objects are copied into `bytes` first.
enum Payload {
    Bytes(Py<PyBytes>),
    Str(Py<PyString>),
}

impl Payload {
    fn as_bytes<'a>(&'a self, py: Python<'a>) -> PyResult<&'a [u8]> {
        match self {
            Payload::Bytes(b) => Ok(b.as_bytes(py)),
            Payload::Str(s) => Ok(s.to_str(py)?.as_bytes()),
        }
    }
}

/// A message `send()` put aside while another message is going out in fragments
/// (RFC 6455 5.4: no other data frame may come between the fragments of a message).
struct Deferred {
    fut: Py<PyAny>,
    op: OpCode,
    payload: Payload,
}

/// A message larger than `write_limit` going out one fragment per drain, so that a slow
/// or stalled peer holds at most about two fragments of it in user space.
///
/// Its fragments keep going when the `send()` that started it is cancelled: the frames
/// already written cannot be taken back, and another data frame may not start before
/// the final one (RFC 6455 5.4). A close ends it.
struct LargeSend {
    fut: Py<PyAny>,
    payload: Payload,
    offset: usize,
}

/// The loop thread's state of a connection (behind `Connection::st`).
///
/// Only the loop thread touches it, but Python can re-enter a method while another is
/// running (a future callback, `__del__`): so it is only ever locked to move values in
/// or out, never across a call into Python (lockcheck.rs).
#[derive(Default)]
struct PyState {
    /// The pending receive future and what it waits for.
    recv: Option<(Py<PyAny>, Want)>,
    /// A message (or chunk) a cancelled receive had already been handed: the next
    /// receive returns it first.
    putback: Option<(Py<PyAny>, Want)>,
    writer_active: bool,
    /// The asyncio task running the handler (lightws.server starts it).
    handler: Option<Py<PyAny>>,
    large: Option<LargeSend>,
    deferred: VecDeque<Deferred>,
    /// `conn.writer()`s waiting for the connection to be free of other fragmented sends.
    writer_waiters: VecDeque<Py<PyAny>>,
    drains: Vec<Py<PyAny>>,
    closers: Vec<Py<PyAny>>,
    reply: Option<oneshot::Sender<Reply>>,
    /// Set when the task ended (socket closed).
    finished: bool,
    sent_close: Option<CloseInfo>,
}

/// One WebSocket connection, handed to your handler.
///
/// Receive with `await conn.recv()` or `async for msg in conn`; send with
/// `await conn.send(x)`; close with `await conn.close(code, reason)`.
#[pyclass(module = "lightws", frozen, name = "Connection", weakref)]
pub struct Connection {
    shared: Arc<ConnShared>,
    st: ConnMutex<PyState>,
    /// Operations completed without suspending since the last suspension (fairness).
    immediate: AtomicU32,
    event_loop: Py<PyAny>,
    request: OnceLock<Py<PyAny>>,
    subprotocol: OnceLock<Option<String>>,
}

/// What the inbox holds for a receive, taken under its lock (no Python there).
enum Popped {
    Msg(InMsg),
    Closed(CloseInfo),
    /// The next message is being streamed: only `reader()` may take it.
    Streaming,
    /// Nothing yet; `waiting` is set so the next message pushes `Event::Readable`.
    Empty,
}

/// What a receive got.
enum Received {
    Value(Py<PyAny>),
    Error(PyErr),
    Wait(Py<PyAny>),
}

/// Whether a data message can go out now (see `Connection::send_data`).
enum Slot {
    Free,
    Busy,
    Finished,
}

impl Connection {
    fn create_future(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        assert_unlocked("loop.create_future()");
        self.event_loop
            .call_method0(py, intern!(py, "create_future"))
    }

    /// Count an operation that completes without suspending; true when it should yield
    /// to the event loop once first (every FAIR_BUDGET of them).
    fn tick(&self) -> bool {
        let n = self.immediate.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= FAIR_BUDGET {
            self.immediate.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// An operation suspended: the loop ran other tasks anyway.
    fn untick(&self) {
        self.immediate.store(0, Ordering::Relaxed);
    }

    /// The awaitable for an operation that completed now (a fairness yield first, now
    /// and then).
    fn completed(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if self.tick() {
            Op::new(OpState::YieldOnce).into_py(py)
        } else {
            done(py)
        }
    }

    /// The awaitable for an operation that completes when `fut` does.
    fn pending(&self, py: Python<'_>, fut: Py<PyAny>, kind: WaitKind) -> PyResult<Py<PyAny>> {
        self.untick();
        op_wait(py, fut, kind)
    }

    fn close_info(&self) -> CloseInfo {
        let received = self.shared.inbox.lock().closed.clone();
        let sent = || self.st.lock().sent_close.clone();
        received.or_else(sent).unwrap_or(CloseInfo {
            code: ABNORMAL_CLOSURE,
            reason: String::new(),
        })
    }

    fn closed_error_now(&self, py: Python<'_>) -> PyErr {
        let info = self.close_info();
        closed_exception(py, &info)
    }

    /// Take what is ready for `want` from the inbox (under its lock: no Python).
    fn pop(&self, inbox: &mut Inbox, want: Want) -> Popped {
        let part = match inbox.queue.front() {
            Some(m) => m.part,
            None => {
                return match &inbox.closed {
                    Some(info) => Popped::Closed(info.clone()),
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
        inbox.bytes -= m.data.len();
        self.shared.resume_if_paused(inbox);
        Popped::Msg(m)
    }

    /// Turn what was popped into the receive's value or error (Python, no lock held).
    fn deliver(&self, py: Python<'_>, popped: Popped, want: Want) -> PyResult<Option<Received>> {
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
    fn take_putback(&self, py: Python<'_>, want: Want) -> PyResult<Option<Received>> {
        let taken = self.st.lock().putback.take();
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
                let old = self.st.lock().putback.replace((v, got));
                drop(old);
                Received::Error(streaming_error())
            }
        }))
    }

    /// Give back a message (or chunk) a cancelled receive had already been handed.
    fn put_back(&self, value: Py<PyAny>, want: Want) {
        let old = self.st.lock().putback.replace((value, want));
        // Two cancelled receives cannot both hold one: the second would have been
        // handed this one first.
        debug_assert!(old.is_none());
        drop(old);
    }

    /// Receive now: a value, an error, or a future that `on_readable` completes.
    fn receive_now(&self, py: Python<'_>, want: Want) -> PyResult<Received> {
        let prev = self.st.lock().recv.take();
        if let Some((f, w)) = prev {
            if !is_done(py, &f)? {
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
        let fut = self.create_future(py)?;
        let old = self.st.lock().recv.replace((fut.clone_ref(py), want));
        drop(old);
        self.untick();
        Ok(Received::Wait(fut))
    }

    fn receive(slf: &Bound<'_, Self>, want: Want) -> PyResult<Py<PyAny>> {
        Op::new(OpState::Receive {
            conn: slf.clone().unbind(),
            want,
            yielded: false,
        })
        .into_py(slf.py())
    }

    /// Event::Readable: complete the pending receive future if it is still wanted.
    fn on_readable(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self.st.lock().recv.take();
        let Some((fut, want)) = taken else {
            return Ok(());
        };
        if is_done(py, &fut)? {
            // Cancelled: the message stays queued for the next recv().
            return Ok(());
        }
        let popped = self.pop(&mut self.shared.inbox.lock(), want);
        match self.deliver(py, popped, want)? {
            Some(Received::Value(v)) => resolve(py, &fut, v),
            Some(Received::Error(e)) => reject(py, &fut, e),
            Some(Received::Wait(_)) | None => {
                let old = self.st.lock().recv.replace((fut, want));
                drop(old);
                Ok(())
            }
        }
    }

    fn on_drained(&self, py: Python<'_>) -> PyResult<()> {
        self.continue_large(py)?;
        let drains = std::mem::take(&mut self.st.lock().drains);
        for f in drains {
            resolve(py, &f, py.None())?;
        }
        Ok(())
    }

    fn on_closed(&self, py: Python<'_>) -> PyResult<()> {
        let (closers, mut waiting, reply, deferred, large) = {
            let mut st = self.st.lock();
            st.finished = true;
            (
                std::mem::take(&mut st.closers),
                std::mem::take(&mut st.drains),
                st.reply.take(),
                std::mem::take(&mut st.deferred),
                st.large.take(),
            )
        };
        drop(reply);
        waiting.extend(deferred.into_iter().map(|d| d.fut));
        waiting.extend(large.map(|l| l.fut));
        let writers = std::mem::take(&mut self.st.lock().writer_waiters);
        waiting.extend(writers);
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

    /// Fragment size for messages over `write_limit`.
    fn fragment_size(&self) -> usize {
        self.shared.cfg.write_limit.max(16 * 1024)
    }

    /// Send one message; returns the awaitable for `send()`.
    fn send_payload(&self, py: Python<'_>, op: OpCode, payload: Payload) -> PyResult<Py<PyAny>> {
        if op.is_control() {
            let data = payload.as_bytes(py)?;
            if data.len() > frame::MAX_CONTROL_PAYLOAD {
                return Err(PyValueError::new_err(format!(
                    "control frame payload is {} bytes; RFC 6455 allows at most 125",
                    data.len()
                )));
            }
            // Control frames may go between the fragments of a message (RFC 6455 5.4).
            return self.enqueue_frame(py, op, data, true);
        }
        let busy = {
            let st = self.st.lock();
            st.writer_active || st.large.is_some() || !st.deferred.is_empty()
        };
        if busy {
            let fut = self.create_future(py)?;
            self.st.lock().deferred.push_back(Deferred {
                fut: fut.clone_ref(py),
                op,
                payload,
            });
            return self.pending(py, fut, WaitKind::Plain);
        }
        match self.send_data(py, op, payload, None)? {
            None => self.completed(py),
            Some(fut) => self.pending(py, fut, WaitKind::Plain),
        }
    }

    /// Queue a data message now (the caller checked that no fragmented send is under
    /// way). Returns None if it is queued and under `write_limit`, else the future that
    /// completes when it is written down to the limit: `waiter` if given, else a new one.
    fn send_data(
        &self,
        py: Python<'_>,
        op: OpCode,
        payload: Payload,
        waiter: Option<Py<PyAny>>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let data = payload.as_bytes(py)?;
        let chunk = self.fragment_size();
        if data.len() <= chunk {
            if !self.queue_frame(py, op, data, true, false)? {
                return Ok(None);
            }
            let fut = match waiter {
                Some(f) => f,
                None => self.create_future(py)?,
            };
            self.st.lock().drains.push(fut.clone_ref(py));
            return Ok(Some(fut));
        }
        // First fragment now, the rest as the connection takes them (on_drained). The
        // future exists before the first fragment is queued: between that and
        // `st.large` being set no Python may run (it could queue another data frame).
        let fut = match waiter {
            Some(f) => f,
            None => self.create_future(py)?,
        };
        self.queue_frame(py, op, &data[..chunk], false, true)?;
        self.st.lock().large = Some(LargeSend {
            fut: fut.clone_ref(py),
            payload,
            offset: chunk,
        });
        Ok(Some(fut))
    }

    /// Queue one frame (no deferral); returns the awaitable for `send()`.
    fn enqueue_frame(
        &self,
        py: Python<'_>,
        op: OpCode,
        data: &[u8],
        fin: bool,
    ) -> PyResult<Py<PyAny>> {
        if self.queue_frame(py, op, data, fin, false)? {
            let fut = self.create_future(py)?;
            self.st.lock().drains.push(fut.clone_ref(py));
            self.pending(py, fut, WaitKind::Plain)
        } else {
            self.completed(py)
        }
    }

    /// Encode one frame into the outbox and wake the connection task. Returns true if
    /// the outbox is over `write_limit` (a Drained event will follow); `want_drain`
    /// asks for that event regardless.
    fn queue_frame(
        &self,
        py: Python<'_>,
        op: OpCode,
        data: &[u8],
        fin: bool,
        want_drain: bool,
    ) -> PyResult<bool> {
        let cfg = &self.shared.cfg;
        let (was_empty, over) = {
            let mut ob = self.shared.outbox.lock();
            if ob.closed || ob.closing {
                None
            } else {
                let was_empty = ob.buf.is_empty();
                // One allocation of the right size (growing from the header's few bytes
                // would reallocate and copy the payload again).
                ob.buf.reserve(frame::MAX_HEADER_LEN + data.len());
                frame::encode_header(&mut ob.buf, fin, op, data.len() as u64, None);
                ob.buf.extend_from_slice(data);
                let over = ob.buf.len() > cfg.write_limit;
                if over || want_drain {
                    ob.drain_waiting = true;
                }
                Some((was_empty, over))
            }
        }
        .ok_or_else(|| self.closed_error_now(py))?;
        if was_empty {
            self.shared.waker.wake();
        }
        self.shared.stats.frame_out(op);
        if cfg.log_level >= LOG_DEBUG {
            self.shared
                .log(LOG_DEBUG, || describe_frame("send", op, data));
        }
        Ok(over)
    }

    /// The task took the outbox: queue the next fragment of a large send, if any.
    fn continue_large(&self, py: Python<'_>) -> PyResult<()> {
        // Out of the state while its fragment is queued (no Python runs in between);
        // put back unless it is finished.
        let taken = self.st.lock().large.take();
        let Some(mut large) = taken else {
            return Ok(());
        };
        let data = large.payload.as_bytes(py)?;
        let end = (large.offset + self.fragment_size()).min(data.len());
        let fin = end == data.len();
        let r = self.queue_frame(
            py,
            OpCode::Continuation,
            &data[large.offset..end],
            fin,
            !fin,
        );
        large.offset = end;
        if r.is_ok() && !fin {
            self.st.lock().large = Some(large);
            return Ok(());
        }
        match r {
            Ok(_) => resolve(py, &large.fut, py.None())?,
            Err(e) => reject(py, &large.fut, e)?,
        }
        drop(large);
        self.release(py)
    }

    /// A fragmented send finished: send what was put aside, in order, then let the next
    /// waiting writer in.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        loop {
            let next = {
                let mut st = self.st.lock();
                if st.large.is_some() || st.writer_active {
                    return Ok(());
                }
                match st.deferred.pop_front() {
                    Some(d) => Ok(d),
                    None => Err(st.writer_waiters.pop_front()),
                }
            };
            match next {
                Ok(d) => {
                    if is_done(py, &d.fut)? {
                        continue; // the sender was cancelled: it did not send
                    }
                    // The sender's own future completes when its message is queued
                    // (and, over write_limit, written down to it).
                    match self.send_data(py, d.op, d.payload, Some(d.fut.clone_ref(py))) {
                        Ok(None) => resolve(py, &d.fut, py.None())?,
                        Ok(Some(_)) => {}
                        Err(e) => reject(py, &d.fut, e)?,
                    }
                }
                Err(Some(w)) => {
                    if is_done(py, &w)? {
                        continue;
                    }
                    self.st.lock().writer_active = true;
                    resolve(py, &w, py.None())?;
                    return Ok(());
                }
                Err(None) => return Ok(()),
            }
        }
    }

    /// Whether a writer (or a data send) may start now.
    fn slot(&self) -> Slot {
        let st = self.st.lock();
        if st.finished {
            Slot::Finished
        } else if st.writer_active || st.large.is_some() || !st.deferred.is_empty() {
            Slot::Busy
        } else {
            Slot::Free
        }
    }

    fn writer_end(&self, py: Python<'_>) -> PyResult<()> {
        self.st.lock().writer_active = false;
        self.release(py)
    }

    fn reply(&self, r: Reply) -> PyResult<()> {
        let tx = self.st.lock().reply.take().ok_or_else(|| {
            PyRuntimeError::new_err("this connection's handshake was already answered")
        })?;
        // The receiver is gone only if the client left or the server stopped.
        let _ = tx.send(r);
        Ok(())
    }
}

fn streaming_error() -> PyErr {
    PyRuntimeError::new_err("the next message is being streamed to conn.reader(); read it there")
}

fn end_error(py: Python<'_>, info: &CloseInfo, anext: bool) -> PyErr {
    if anext && matches!(info.code, 1000 | 1001) {
        pyo3::exceptions::PyStopAsyncIteration::new_err(())
    } else {
        closed_exception(py, info)
    }
}

/// Request headers as one `"Name: value\r\n..."` string: the Python `Request` parses
/// it only if the headers are used, and keeps one string per idle connection instead of
/// a tuple and two strings per header.
fn raw_headers(headers: &[(String, String)]) -> String {
    let mut out = String::with_capacity(headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum());
    for (n, v) in headers {
        out.push_str(n);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out
}

fn check_headers(headers: &[(String, String)]) -> PyResult<()> {
    for (n, v) in headers {
        handshake::check_header(n, v)
            .map_err(|e| PyValueError::new_err(format!("invalid response header {n:?}: {e}")))?;
    }
    Ok(())
}

/// Close codes an endpoint may send (RFC 6455 7.4.1; 1004-1006 and 1015 are reserved).
fn sendable_close_code(code: u16) -> bool {
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
        let putback = this.st.lock().putback.is_some();
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
                this.st.lock().writer_waiters.push_back(fut.clone_ref(py));
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
    fn send(&self, py: Python<'_>, message: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        if let Ok(b) = message.cast::<PyBytes>() {
            return self.send_payload(py, OpCode::Binary, Payload::Bytes(b.clone().unbind()));
        }
        if let Ok(s) = message.cast::<PyString>() {
            return self.send_payload(py, OpCode::Text, Payload::Str(s.clone().unbind()));
        }
        if let Ok(m) = message.cast::<Message>() {
            let m = m.get();
            let op = OpCode::from_u8(m.opcode).unwrap_or(OpCode::Binary);
            match op {
                OpCode::Close => {
                    return Err(PyValueError::new_err(
                        "send a close with `await conn.close(code, reason)`, not send()",
                    ))
                }
                OpCode::Continuation => {
                    return Err(PyValueError::new_err(
                        "CONTINUATION frames are sent by conn.writer(), not send()",
                    ))
                }
                _ => return self.send_payload(py, op, Payload::Bytes(m.body.clone_ref(py))),
            }
        }
        match to_bytes(message)? {
            Some(b) => self.send_payload(py, OpCode::Binary, Payload::Bytes(b.unbind())),
            None => Err(PyTypeError::new_err(format!(
                "send() takes str, a bytes-like object or lightws.Message, not {}",
                type_name(message)
            ))),
        }
    }

    /// Send a TEXT message.
    fn send_text(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> PyResult<Py<PyAny>> {
        self.send_payload(py, OpCode::Text, Payload::Str(text.clone().unbind()))
    }

    /// Send a BINARY message.
    fn send_binary(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let b = self.bytes_arg(data, "send_binary")?;
        self.send_payload(py, OpCode::Binary, Payload::Bytes(b.unbind()))
    }

    /// Send a PING (payload at most 125 bytes).
    #[pyo3(signature = (data = None))]
    fn send_ping(&self, py: Python<'_>, data: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        match data {
            None => self.enqueue_frame(py, OpCode::Ping, b"", true),
            Some(d) => {
                let b = self.bytes_arg(d, "send_ping")?;
                self.send_payload(py, OpCode::Ping, Payload::Bytes(b.unbind()))
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
                self.send_payload(py, OpCode::Pong, Payload::Bytes(b.unbind()))
            }
        }
    }

    /// Close gracefully: send a close frame, wait up to `close_timeout` for the peer's,
    /// then close TCP. Returns when the connection is closed. Idempotent.
    #[pyo3(signature = (code = 1000, reason = ""))]
    fn close(&self, py: Python<'_>, code: u16, reason: &str) -> PyResult<Py<PyAny>> {
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
        let queued = {
            let mut ob = self.shared.outbox.lock();
            if ob.closed {
                // The task has ended; its Closed event completes nothing we wait for.
                return done(py);
            }
            if ob.closing {
                false
            } else {
                ob.closing = true;
                let payload = frame::close_payload(Some(code), reason);
                frame::encode_frame(&mut ob.buf, true, OpCode::Close, &payload, None);
                true
            }
        };
        if queued {
            self.st.lock().sent_close = Some(CloseInfo {
                code,
                reason: reason.to_owned(),
            });
            self.shared.stats.frame_out(OpCode::Close);
            if self.shared.cfg.log_level >= LOG_DEBUG {
                self.shared.log(LOG_DEBUG, || {
                    format!("send CLOSE code={code} reason={reason:?}")
                });
            }
            // Always wake: even with frames still queued, the close starts its timer.
            self.shared.waker.wake();
        }
        let fut = self.create_future(py)?;
        self.st.lock().closers.push(fut.clone_ref(py));
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
                inbox.closed = Some(CloseInfo {
                    code: ABNORMAL_CLOSURE,
                    reason: String::new(),
                });
            }
        }
        self.shared.waker.wake();
    }

    /// A number unique to this connection within the process.
    #[getter]
    fn id(&self) -> u64 {
        self.shared.id
    }

    /// The `lightws.Request` this connection was upgraded from.
    #[getter]
    fn request(&self, py: Python<'_>) -> Py<PyAny> {
        self.request
            .get()
            .map(|r| r.clone_ref(py))
            .unwrap_or_else(|| py.None())
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
        task.call_method1("add_done_callback", (slf.getattr("_handler_done")?,))?;
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
    fn bytes_arg<'py>(
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

// ---------------------------------------------------------------------------------------
// Core

/// The native half of `lightws.Server` (private): owns the tokio runtime, the listener
/// and the hub, and dispatches hub events on the loop thread.
#[pyclass(module = "lightws._lightws", frozen)]
pub struct Core {
    srv: Arc<ServerShared>,
    hub: Arc<Hub>,
    event_loop: Py<PyAny>,
    dispatch: Py<PyAny>,
    log: Py<PyAny>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    conns: Mutex<HashMap<u64, Py<Connection>>>,
    stop: Mutex<Option<watch::Sender<bool>>>,
    local: Mutex<Option<(SocketAddr, i32)>>,
}

fn get<'py, T: FromPyObjectOwned<'py>>(cfg: &Bound<'py, PyAny>, name: &str) -> PyResult<T> {
    cfg.getattr(name)?.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        PyTypeError::new_err(format!("Config.{name}: {e}"))
    })
}

fn seconds(cfg: &Bound<'_, PyAny>, name: &str, allow_zero: bool) -> PyResult<Option<Duration>> {
    let v: Option<f64> = get(cfg, name)?;
    match v {
        None => Ok(None),
        Some(s) if !s.is_finite() || s < 0.0 => Err(PyValueError::new_err(format!(
            "Config.{name} must be a non-negative number of seconds, got {s}"
        ))),
        Some(s) if s == 0.0 && !allow_zero => Ok(None),
        Some(s) => Ok(Some(Duration::from_secs_f64(s))),
    }
}

fn size(cfg: &Bound<'_, PyAny>, name: &str, min: i64) -> PyResult<usize> {
    let v: i64 = get(cfg, name)?;
    if v < min {
        return Err(PyValueError::new_err(format!(
            "Config.{name} must be at least {min}, got {v}"
        )));
    }
    Ok(v as usize)
}

fn opt_size(cfg: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<usize>> {
    let v: Option<i64> = get(cfg, name)?;
    match v {
        None => Ok(None),
        Some(v) if v <= 0 => Err(PyValueError::new_err(format!(
            "Config.{name} must be a positive number of bytes or None, got {v}"
        ))),
        Some(v) => Ok(Some(v as usize)),
    }
}

/// A list field that must not be a bare `str` (which would be taken as a list of
/// one-character entries by Python, and is surely a missing pair of brackets).
fn list<'py, T: FromPyObjectOwned<'py>>(cfg: &Bound<'py, PyAny>, name: &str) -> PyResult<T> {
    if cfg.getattr(name)?.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "Config.{name} must be a list of strings, not a str (write [\"...\"])"
        )));
    }
    get(cfg, name)
}

/// `Config.origins` and `Config.trusted_proxies`, validated (security.rs parses them).
fn admission(cfg: &Bound<'_, PyAny>) -> PyResult<(Option<OriginPolicy>, Vec<IpNet>)> {
    let origins: Option<Vec<Option<String>>> = list(cfg, "origins")?;
    let origins = origins
        .map(|o| OriginPolicy::new(&o))
        .transpose()
        .map_err(PyValueError::new_err)?;
    let proxies: Vec<String> = list(cfg, "trusted_proxies")?;
    let proxies = proxies
        .iter()
        .enumerate()
        .map(|(i, p)| IpNet::parse(p).map_err(|e| format!("Config.trusted_proxies[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(PyValueError::new_err)?;
    Ok((origins, proxies))
}

fn build_config(cfg: &Bound<'_, PyAny>) -> PyResult<ServerConfig> {
    let addr: String = get(cfg, "addr")?;
    server::parse_addr(&addr).map_err(PyValueError::new_err)?;
    let log_level: i64 = get(cfg, "log_level")?;
    if !(0..=3).contains(&log_level) {
        return Err(PyValueError::new_err(format!(
            "Config.log_level must be a lightws.LogLevel (0-3), got {log_level}"
        )));
    }
    let max_msg_len = size(cfg, "max_msg_len", 1)?;
    let write_limit = size(cfg, "write_limit", 1)?;
    let close_timeout = seconds(cfg, "close_timeout", true)?.unwrap_or_default();
    let threads = size(cfg, "threads", 1)?;
    if threads > 256 {
        return Err(PyValueError::new_err("Config.threads must be 1-256"));
    }
    let cert: Option<String> = get(cfg, "cert_file")?;
    let key: Option<String> = get(cfg, "key_file")?;
    if cert.is_some() != key.is_some() {
        return Err(PyValueError::new_err(
            "Config.cert_file and Config.key_file must be set together (both PEM paths) for TLS",
        ));
    }
    let conn = ConnConfig {
        max_msg_len: max_msg_len as u64,
        ws_read_buffer: size(cfg, "ws_read_buffer", 16)?,
        ws_write_buffer: size(cfg, "ws_write_buffer", 16)?,
        close_timeout,
        auto_pong: get(cfg, "auto_pong")?,
        ping_interval: seconds(cfg, "ping_interval", false)?,
        ping_timeout: seconds(cfg, "ping_timeout", false)?,
        idle_timeout: seconds(cfg, "idle_timeout", false)?,
        write_limit,
        inbox_limit: max_msg_len.clamp(64 * 1024, 4 * 1024 * 1024).max(64 * 1024),
        log_level: log_level as u8,
        io_statistics: get(cfg, "io_statistics")?,
    };
    let backlog = size(cfg, "backlog", 1)?.min(65535) as i32;
    let (origins, trusted_proxies) = admission(cfg)?;
    Ok(ServerConfig {
        addr,
        conn: Arc::new(conn),
        sock_read_buffer: opt_size(cfg, "sock_read_buffer")?,
        sock_write_buffer: opt_size(cfg, "sock_write_buffer")?,
        http_read_buffer: size(cfg, "http_read_buffer", 64)?,
        http_write_buffer: size(cfg, "http_write_buffer", 64)?,
        handshake_read_timeout: seconds(cfg, "handshake_read_timeout", true)?.unwrap_or_default(),
        handshake_write_timeout: seconds(cfg, "handshake_write_timeout", true)?.unwrap_or_default(),
        tcp_keepalive: seconds(cfg, "tcp_keepalive", false)?,
        max_connections: size(cfg, "max_connections", 0)?,
        max_connections_per_ip: size(cfg, "max_connections_per_ip", 0)?,
        trusted_proxies,
        origins,
        backlog,
        threads,
        http_fallback: get(cfg, "http_fallback")?,
        io_statistics: get(cfg, "io_statistics")?,
        cert_file: cert,
        key_file: key,
    })
}

/// NOTE: glibc returns the top of the heap to the kernel whenever 128 KiB are free
/// there, and serves allocations over 128 KiB with fresh mmaps. Every large message
/// allocates and frees buffers of its size (read buffer, message, `bytes`, outbox), so
/// with the defaults each 64 KiB echo took ~12 page faults (measured: 291,771 minor
/// faults for 24k echoes, a third of the server's CPU). Raising both thresholds to
/// 32 MiB keeps that memory in the process for reuse. Process-wide and once; set
/// LIGHTWS_MALLOC_TUNING=0 to leave malloc alone.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if std::env::var("LIGHTWS_MALLOC_TUNING").as_deref() == Ok("0") {
                return;
            }
            const THRESHOLD: libc::c_int = 32 << 20;
            // SAFETY: mallopt only adjusts allocator parameters.
            unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
                libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
            }
        });
    }
}

fn tls_err(e: TlsError) -> PyErr {
    if e.is_os_error() {
        PyOSError::new_err(e.to_string())
    } else {
        PyValueError::new_err(e.to_string())
    }
}

impl Core {
    fn conn(&self, py: Python<'_>, id: u64) -> Option<Py<Connection>> {
        self.conns.lock().get(&id).map(|c| c.clone_ref(py))
    }

    fn on_handshake(&self, py: Python<'_>, h: HandshakeEvent) -> PyResult<()> {
        let HandshakeEvent {
            conn,
            request,
            upgrade,
            subprotocols,
            reply,
        } = h;
        let remote = (conn.remote.ip().to_string(), conn.remote.port());
        let id = conn.id;
        let obj = Py::new(
            py,
            Connection {
                shared: conn,
                immediate: AtomicU32::new(0),
                st: ConnMutex::new(PyState {
                    reply: Some(reply),
                    ..Default::default()
                }),
                event_loop: self.event_loop.clone_ref(py),
                request: OnceLock::new(),
                subprotocol: OnceLock::new(),
            },
        )?;
        self.conns.lock().insert(id, obj.clone_ref(py));
        let r = self.dispatch.call1(
            py,
            (
                obj.clone_ref(py),
                if request.method == "GET" {
                    intern!(py, "GET").clone()
                } else {
                    PyString::new(py, &request.method)
                },
                request.target,
                raw_headers(&request.headers),
                remote,
                upgrade,
                subprotocols,
            ),
        );
        if let Err(e) = r {
            // The dispatcher itself failed (a bug, not the user's callback): answer 500.
            self.emit_log(py, 0, None, &format!("handshake dispatch failed: {e}"));
            let _ = obj.get().reply(Reply::Respond {
                status: 500,
                headers: Vec::new(),
                body: b"Internal Server Error".to_vec(),
            });
        }
        Ok(())
    }

    fn emit_log(&self, py: Python<'_>, level: u8, conn: Option<(u64, SocketAddr)>, msg: &str) {
        let (id, addr) = match conn {
            Some((id, a)) => (Some(id).filter(|i| *i != 0), Some(a.to_string())),
            None => (None, None),
        };
        if let Err(e) = self.log.call1(py, (level, id, addr, msg)) {
            e.write_unraisable(py, None);
        }
    }

    fn handle(&self, py: Python<'_>, ev: Event) -> PyResult<()> {
        match ev {
            Event::Readable(id) => {
                if let Some(c) = self.conn(py, id) {
                    c.get().on_readable(py)?;
                }
            }
            Event::Drained(id) => {
                if let Some(c) = self.conn(py, id) {
                    c.get().on_drained(py)?;
                }
            }
            Event::Closed(id) => {
                let c = self.conns.lock().remove(&id);
                if let Some(c) = c {
                    c.get().on_closed(py)?;
                }
            }
            Event::Handshake(h) => self.on_handshake(py, *h)?,
            Event::Log(l) => self.emit_log(py, l.level, l.conn, &l.msg),
        }
        Ok(())
    }
}

/// Events handled per drain call before yielding back to the event loop.
const DRAIN_BATCH: usize = 1024;

#[pymethods]
impl Core {
    #[new]
    fn new(
        config: &Bound<'_, PyAny>,
        dispatch: Py<PyAny>,
        log: Py<PyAny>,
        event_loop: Py<PyAny>,
    ) -> PyResult<Self> {
        let cfg = build_config(config)?;
        let hub = Arc::new(Hub::new().map_err(|e| PyOSError::new_err(e.to_string()))?);
        let tls = match (&cfg.cert_file, &cfg.key_file) {
            (Some(c), Some(k)) => {
                let store = CertStore::load(c, k).map_err(tls_err)?;
                let sc = tls::server_config(store.clone()).map_err(tls_err)?;
                Some((store, tokio_rustls::TlsAcceptor::from(sc)))
            }
            _ => None,
        };
        let srv = Arc::new(ServerShared {
            per_ip: IpLimiter::new(cfg.max_connections_per_ip),
            cfg,
            hub: hub.clone(),
            stats: Arc::new(Stats::new()),
            tls,
        });
        Ok(Self {
            srv,
            hub,
            event_loop,
            dispatch,
            log,
            runtime: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            stop: Mutex::new(None),
            local: Mutex::new(None),
        })
    }

    /// Bind, listen and start accepting. Raises OSError if the address cannot be bound.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        tune_malloc();
        let mut rt_slot = self.runtime.lock();
        if rt_slot.is_some() {
            return Err(PyRuntimeError::new_err("server already started"));
        }
        let srv = self.srv.clone();
        let listener = py.detach(|| server::bind(&srv.cfg)).map_err(|e| {
            PyOSError::new_err((
                e.raw_os_error().unwrap_or(0),
                format!("cannot listen on {}: {e}", srv.cfg.addr),
            ))
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(srv.cfg.threads)
            .thread_name("lightws-io")
            .enable_all()
            .build()
            .map_err(|e| PyOSError::new_err(format!("cannot start the I/O runtime: {e}")))?;
        let (tx, rx) = watch::channel(false);
        let fd = {
            use std::os::fd::AsRawFd;
            listener.as_raw_fd()
        };
        {
            let _enter = rt.enter();
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| PyOSError::new_err(e.to_string()))?;
            rt.spawn(server::accept_loop(listener, srv.clone(), rx));
            let stats = srv.stats.clone();
            rt.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    stats.sample();
                }
            });
        }
        *self.stop.lock() = Some(tx);
        *self.local.lock() = Some((local, fd));
        *rt_slot = Some(rt);
        Ok(())
    }

    /// The hub's wake-up descriptor, for `loop.add_reader`.
    fn fd(&self) -> i32 {
        self.hub.fd()
    }

    /// Handle queued events (called by the event loop when the fd is readable).
    fn drain(&self, py: Python<'_>) {
        self.hub.begin_drain();
        let mut batch = Vec::new();
        let more = self.hub.take(DRAIN_BATCH, &mut batch);
        for ev in batch {
            if let Err(e) = self.handle(py, ev) {
                // One connection's failure must not lose the rest of the batch.
                e.write_unraisable(py, None);
            }
        }
        if more {
            self.hub.rearm();
        }
    }

    /// `(host, port)` the listener is bound to.
    fn address(&self) -> Option<(String, u16)> {
        self.local
            .lock()
            .map(|(a, _)| (a.ip().to_string(), a.port()))
    }

    /// The listening socket's descriptor (owned by the server; dup it to wrap it).
    fn listener_fd(&self) -> Option<i32> {
        self.local.lock().map(|(_, fd)| fd)
    }

    /// Stop accepting new connections (existing ones continue).
    fn stop_accepting(&self) {
        if let Some(tx) = self.stop.lock().take() {
            let _ = tx.send(true);
        }
    }

    /// The open connections (accepted or waiting for their handshake).
    fn connections(&self, py: Python<'_>) -> Vec<Py<Connection>> {
        self.conns
            .lock()
            .values()
            .map(|c| c.clone_ref(py))
            .collect()
    }

    /// Stop the runtime: every task is dropped (sockets closed). Handles the resulting
    /// events before returning.
    fn shutdown(&self, py: Python<'_>) {
        self.stop_accepting();
        let rt = self.runtime.lock().take();
        if let Some(rt) = rt {
            py.detach(|| rt.shutdown_timeout(Duration::from_secs(2)));
        }
        // Tasks dropped by the shutdown reported Closed; deliver those now.
        for _ in 0..1000 {
            self.drain(py);
            if !self.hub.take(0, &mut Vec::new()) {
                break;
            }
        }
        self.local.lock().take();
    }

    /// Re-read the certificate files; new TLS handshakes use the new certificates.
    fn reload_certificates(&self, py: Python<'_>) -> PyResult<()> {
        match &self.srv.tls {
            None => Err(PyRuntimeError::new_err(
                "reload_certificates() needs a TLS server (Config.cert_file/key_file)",
            )),
            Some((store, _)) => {
                let store = store.clone();
                py.detach(move || store.reload()).map_err(tls_err)
            }
        }
    }

    /// True if the server serves TLS.
    #[getter]
    fn tls(&self) -> bool {
        self.srv.tls.is_some()
    }

    /// Counters as a dict: totals plus `rates` (per second over the last 30 s, or
    /// since start if younger, at least over 1 s: see stats.rs).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let window = self.srv.stats.window();
        let (now, base) = (&window.now, &window.base);
        let d = PyDict::new(py);
        let rates = PyDict::new(py);
        let rate = |a: u64, b: u64| window.rate(a, b);
        d.set_item("connections", now.connections)?;
        d.set_item("max_connections", now.max_connections)?;
        let io = self.srv.cfg.io_statistics;
        d.set_item("connections_reading", io.then_some(now.connections_reading))?;
        d.set_item("connections_writing", io.then_some(now.connections_writing))?;
        for (name, a, b) in [
            ("handshakes", now.handshakes, base.handshakes),
            (
                "handshakes_failed",
                now.handshakes_failed,
                base.handshakes_failed,
            ),
            ("bytes_in", now.bytes_in, base.bytes_in),
            ("bytes_out", now.bytes_out, base.bytes_out),
        ] {
            d.set_item(name, a)?;
            rates.set_item(name, rate(a, b))?;
        }
        let fin = PyDict::new(py);
        let fout = PyDict::new(py);
        let rin = PyDict::new(py);
        let rout = PyDict::new(py);
        for i in 0..OPCODES {
            if OpCode::from_u8(i as u8).is_some() {
                fin.set_item(i, now.frames_in[i])?;
                fout.set_item(i, now.frames_out[i])?;
                rin.set_item(i, rate(now.frames_in[i], base.frames_in[i]))?;
                rout.set_item(i, rate(now.frames_out[i], base.frames_out[i]))?;
            }
        }
        d.set_item("frames_in", fin)?;
        d.set_item("frames_out", fout)?;
        rates.set_item("frames_in", rin)?;
        rates.set_item("frames_out", rout)?;
        d.set_item("rates", rates)?;
        d.set_item("rate_window", window.span)?;
        Ok(d)
    }
}
