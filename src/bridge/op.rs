//! [`Op`], the awaitable every coroutine method of `Connection` returns, and the
//! helpers that create and complete asyncio futures (never under a connection lock).

use pyo3::exceptions::{PyBaseException, PyStopIteration};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

use super::api::api;
use super::connection::{Connection, Received, Want};
use super::waiter::{Outcome, Waiter};
use crate::lockcheck::assert_unlocked;

/// How many operations on one connection may complete without suspending before one of
/// them yields to the event loop once (see [`Connection::tick`]).
///
/// NOTE: with messages already queued, `recv()` and a `send()` below `write_limit`
/// complete at once, so a handler draining a burst never let other tasks run. Yielding
/// once every 32 such operations bounds that to a few hundred microseconds while the
/// extra loop iteration costs about 1/32 of a `call_soon` per message (measured in
/// BENCHMARKS.md, "Fairness").
pub(super) const FAIR_BUDGET: u32 = 32;

/// What an [`Op`] does when it is next resumed.
pub(super) enum OpState {
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
pub(super) enum WaitKind {
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
    pub(super) state: OpState,
}

impl Op {
    pub(super) fn new(state: OpState) -> Self {
        Self { state }
    }

    pub(super) fn into_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(Py::new(py, self)?.into_any())
    }

    /// Yield `fut` to the running task (the protocol of `asyncio.Future.__await__`).
    pub(super) fn yield_future(py: Python<'_>, fut: &Py<PyAny>) -> PyResult<Option<Py<PyAny>>> {
        assert_unlocked("yielding a future");
        if let Ok(w) = fut.bind(py).cast::<Waiter>() {
            w.borrow_mut().blocking = true;
            return Ok(Some(fut.clone_ref(py)));
        }
        fut.setattr(py, intern!(py, "_asyncio_future_blocking"), true)?;
        Ok(Some(fut.clone_ref(py)))
    }

    /// The coroutine's step: `Ok(Some(x))` yields x, `Ok(None)` returns None (for
    /// `__next__`: exhausted without an exception), `Err(StopIteration(v))` returns v.
    pub(super) fn step(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        loop {
            match std::mem::replace(&mut self.state, OpState::Finished) {
                OpState::Nothing => {
                    self.state = OpState::Nothing;
                    return Ok(None);
                }
                OpState::Finished => return Ok(None),
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
                        Received::Value(v) => return Err(stop(py, v)),
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
                    if let Ok(w) = fut.bind(py).cast::<Waiter>() {
                        // A receive's native future: read in Rust, no call.
                        let r = w.borrow().outcome(py);
                        match r {
                            Some(Ok(v)) => return Err(stop(py, v)),
                            Some(Err(e)) => return Err(e),
                            None => {
                                let y = Self::yield_future(py, &fut);
                                self.state = OpState::Wait { fut, kind };
                                return y;
                            }
                        }
                    }
                    // The task resumes us once the future is complete: result() gives
                    // its value or raises its exception (ConnectionClosed,
                    // CancelledError). One call, not done() then result(): this is on
                    // every message's path.
                    assert_unlocked("future.result()");
                    match fut.call_method0(py, intern!(py, "result")) {
                        Ok(v) => return Err(stop(py, v)),
                        Err(e) if e.is_instance(py, api(py)?.invalid_state.bind(py)) => {
                            // Resumed early (not by a task): wait on.
                            let y = Self::yield_future(py, &fut);
                            self.state = OpState::Wait { fut, kind };
                            return y;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// The operation is given up before its result was delivered: cancel what is
    /// pending, give back what was already handed over.
    pub(super) fn abandon(&mut self, py: Python<'_>) {
        let state = std::mem::replace(&mut self.state, OpState::Finished);
        if let OpState::Nothing = state {
            self.state = OpState::Nothing;
            return;
        }
        let OpState::Wait { fut, kind } = state else {
            return;
        };
        let r: PyResult<()> = (|| {
            if let Ok(w) = fut.bind(py).cast::<Waiter>() {
                if Waiter::cancel_now(w, None)? {
                    return Ok(());
                }
                let value = w.borrow().value(py);
                if let (Some(v), WaitKind::Receive(conn, want)) = (value, kind) {
                    conn.get().put_back(v, want);
                }
                return Ok(());
            }
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
    fn send(&mut self, py: Python<'_>, _value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        // A method, not the iterator slot: returning means raising StopIteration.
        match self.step(py)? {
            Some(y) => Ok(y),
            None => Err(PyStopIteration::new_err(py.None())),
        }
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

/// `StopIteration` returning `v` from a coroutine step.
///
/// NOTE: the value goes in as the exception's value itself rather than as `(v,)`:
/// CPython 3.11 then reads it back without creating the StopIteration instance
/// (`_PyGen_FetchStopIterationValue`), once per received message. A tuple (it would be
/// taken for the exception's arguments) or an exception instance must be wrapped.
fn stop(py: Python<'_>, v: Py<PyAny>) -> PyErr {
    let b = v.bind(py);
    if b.is_instance_of::<PyTuple>() || b.is_instance_of::<PyBaseException>() {
        PyStopIteration::new_err((v,))
    } else {
        PyStopIteration::new_err(v)
    }
}

pub(super) static DONE: PyOnceLock<Py<Op>> = PyOnceLock::new();

/// The shared completed awaitable that returns None (stateless, so one serves all).
pub(super) fn done(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let r = DONE.get_or_try_init(py, || Py::new(py, Op::new(OpState::Nothing)))?;
    Ok(r.clone_ref(py).into_any())
}

pub(super) fn op_wait(py: Python<'_>, fut: Py<PyAny>, kind: WaitKind) -> PyResult<Py<PyAny>> {
    Op::new(OpState::Wait { fut, kind }).into_py(py)
}

// -- asyncio futures: every call goes through these, with no connection lock held -----

pub(super) fn is_done(py: Python<'_>, fut: &Py<PyAny>) -> PyResult<bool> {
    if let Ok(w) = fut.bind(py).cast::<Waiter>() {
        return Ok(w.borrow().is_done());
    }
    assert_unlocked("future.done()");
    fut.call_method0(py, intern!(py, "done"))?.is_truthy(py)
}

/// Complete `fut` with `value` unless it is already done (cancelled by its waiter).
pub(super) fn resolve(py: Python<'_>, fut: &Py<PyAny>, value: Py<PyAny>) -> PyResult<()> {
    if let Ok(w) = fut.bind(py).cast::<Waiter>() {
        return Waiter::complete(w, Outcome::Value(value)).map(drop);
    }
    if !is_done(py, fut)? {
        fut.call_method1(py, intern!(py, "set_result"), (value,))?;
    }
    Ok(())
}

/// Fail `fut` with `err` unless it is already done.
pub(super) fn reject(py: Python<'_>, fut: &Py<PyAny>, err: PyErr) -> PyResult<()> {
    if let Ok(w) = fut.bind(py).cast::<Waiter>() {
        return Waiter::complete(w, Outcome::Error(err)).map(drop);
    }
    if !is_done(py, fut)? {
        fut.call_method1(py, intern!(py, "set_exception"), (err.into_value(py),))?;
    }
    Ok(())
}
