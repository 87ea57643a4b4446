//! [`Waiter`], the future a pending `recv()` yields to its task: the asyncio future
//! protocol implemented natively, so that receiving a message costs no
//! `asyncio.Future`, no `call_soon` and no extra event-loop iteration.
//!
//! NOTE: per echoed 64 B message the asyncio route cost the loop thread one
//! `loop.create_future()`, `done()` + `set_result()` (which `call_soon`s the task's
//! wakeup), a pass of the event loop to run that handle, and `result()`; together
//! about half of the loop thread's 4.5-7 µs per message (BENCHMARKS.md, "Where the
//! time goes"). A `Waiter` is completed in Rust, and when `drain` runs as the event
//! loop's reader callback (no task running) the task's wakeup is called right there,
//! in the task's context, instead of being scheduled: the task resumes within the same
//! loop iteration that read the hub.
//!
//! asyncio semantics are kept: a Task accepts any object with
//! `_asyncio_future_blocking`, `get_loop()`, `add_done_callback(fn, context=...)` and
//! `cancel(msg)`, and wakes through `result()`; `asyncio.isfuture()` is true, so
//! `shield`, `gather`, `wait` and `wait_for` take it as a future. Cancellation and
//! callbacks other than a task's wakeup go through `loop.call_soon` as for any
//! future.

use std::cell::Cell;

use pyo3::exceptions::PyBaseException;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::api::api;
use super::op::{Op, OpState, WaitKind};
use crate::lockcheck::assert_unlocked;

thread_local! {
    /// Set while `Core.drain` runs as the event loop's reader callback: no task is
    /// running, so a task's wakeup may be called directly.
    static DIRECT: Cell<bool> = const { Cell::new(false) };
    /// Nesting of drains on this thread (a handler woken directly may stop a server,
    /// whose shutdown drains again: that one must schedule, a task is running).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Marks a drain for its duration; direct wakeups only in an outermost reader drain.
pub(super) struct DrainGuard {
    was: bool,
}

impl DrainGuard {
    pub(super) fn enter(from_reader: bool) -> Self {
        let depth = DEPTH.with(|d| {
            let v = d.get();
            d.set(v + 1);
            v
        });
        let was = DIRECT.with(|c| c.replace(from_reader && depth == 0));
        Self { was }
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        DIRECT.with(|c| c.set(self.was));
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

enum State {
    Pending,
    Value(Py<PyAny>),
    Error(Py<PyAny>),
    Cancelled(Option<Py<PyAny>>),
}

struct Callback {
    func: Py<PyAny>,
    context: Option<Py<PyAny>>,
    /// Registered by a Task for its wakeup (right after it set
    /// `_asyncio_future_blocking` to False, as `Task.__step` does).
    task: bool,
}

/// A waiter's callbacks: nearly always exactly one (its task's wakeup), kept inline so
/// that a message costs no allocation for it.
#[derive(Default)]
struct Callbacks {
    first: Option<Callback>,
    more: Vec<Callback>,
}

impl Callbacks {
    fn push(&mut self, cb: Callback) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some(cb);
        } else {
            self.more.push(cb);
        }
    }

    fn into_vec_iter(self) -> impl Iterator<Item = Callback> {
        self.first.into_iter().chain(self.more)
    }
}

/// The future of a pending `recv()` (private: `asyncio.isfuture()` is true for it).
#[pyclass(module = "lightws._lightws")]
pub struct Waiter {
    state: State,
    callbacks: Callbacks,
    pub(super) blocking: bool,
    /// The task just took this future: its next `add_done_callback` is its wakeup.
    task_armed: bool,
    event_loop: Py<PyAny>,
}

/// What a receive is completed with.
pub(super) enum Outcome {
    Value(Py<PyAny>),
    Error(PyErr),
}

impl Waiter {
    pub(super) fn create(py: Python<'_>, event_loop: &Py<PyAny>) -> PyResult<Py<Waiter>> {
        Py::new(
            py,
            Waiter {
                state: State::Pending,
                callbacks: Callbacks::default(),
                blocking: false,
                task_armed: false,
                event_loop: event_loop.clone_ref(py),
            },
        )
    }

    pub(super) fn is_done(&self) -> bool {
        !matches!(self.state, State::Pending)
    }

    /// The value it was completed with (None if pending, failed or cancelled).
    pub(super) fn value(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        match &self.state {
            State::Value(v) => Some(v.clone_ref(py)),
            _ => None,
        }
    }

    /// `result()`: the value, or the error it raises; None while pending.
    pub(super) fn outcome(&self, py: Python<'_>) -> Option<PyResult<Py<PyAny>>> {
        match &self.state {
            State::Pending => None,
            State::Value(v) => Some(Ok(v.clone_ref(py))),
            State::Error(e) => Some(Err(PyErr::from_value(e.bind(py).clone()))),
            State::Cancelled(msg) => Some(Err(cancelled_error(py, msg.as_ref()))),
        }
    }

    /// Complete a pending waiter and run or schedule its callbacks (false if it was
    /// already done: cancelled by its waiter). Called with no connection lock held.
    pub(super) fn complete(slf: &Bound<'_, Waiter>, outcome: Outcome) -> PyResult<bool> {
        let py = slf.py();
        let callbacks = {
            let mut w = slf.borrow_mut();
            if w.is_done() {
                return Ok(false);
            }
            w.state = match outcome {
                Outcome::Value(v) => State::Value(v),
                Outcome::Error(e) => State::Error(e.into_value(py).into_any()),
            };
            std::mem::take(&mut w.callbacks)
        };
        Self::run_callbacks(slf, callbacks, DIRECT.with(Cell::get))?;
        Ok(true)
    }

    /// Cancel a pending waiter (its callbacks are scheduled); false if already done.
    pub(super) fn cancel_now(slf: &Bound<'_, Waiter>, msg: Option<Py<PyAny>>) -> PyResult<bool> {
        let callbacks = {
            let mut w = slf.borrow_mut();
            if w.is_done() {
                return Ok(false);
            }
            w.state = State::Cancelled(msg);
            std::mem::take(&mut w.callbacks)
        };
        Self::run_callbacks(slf, callbacks, false)?;
        Ok(true)
    }

    fn run_callbacks(slf: &Bound<'_, Waiter>, callbacks: Callbacks, direct: bool) -> PyResult<()> {
        assert_unlocked("a future's callbacks");
        let py = slf.py();
        let mut failed = None;
        for cb in callbacks.into_vec_iter() {
            let r = if direct && cb.task {
                // The task's wakeup, in the task's context, now: what the loop would do
                // one iteration later. While that task runs, whatever it completes is
                // scheduled (a task must not be entered from inside another).
                let was = DIRECT.with(|c| c.replace(false));
                let r = match &cb.context {
                    Some(ctx) => ctx.call_method1(py, intern!(py, "run"), (cb.func, slf)),
                    None => cb.func.call1(py, (slf,)),
                };
                DIRECT.with(|c| c.set(was));
                r
            } else {
                let event_loop = slf.borrow().event_loop.clone_ref(py);
                schedule(py, &event_loop, cb.func, cb.context, slf)
            };
            // A wakeup raises only what asyncio lets out of a task (KeyboardInterrupt,
            // SystemExit): the first one goes on to the event loop, after the other
            // callbacks ran.
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn schedule(
    py: Python<'_>,
    event_loop: &Py<PyAny>,
    func: Py<PyAny>,
    context: Option<Py<PyAny>>,
    fut: &Bound<'_, Waiter>,
) -> PyResult<Py<PyAny>> {
    let kwargs = PyDict::new(py);
    if let Some(ctx) = context {
        kwargs.set_item(intern!(py, "context"), ctx)?;
    }
    event_loop.call_method(py, intern!(py, "call_soon"), (func, fut), Some(&kwargs))
}

fn cancelled_error(py: Python<'_>, msg: Option<&Py<PyAny>>) -> PyErr {
    let cls = match api(py) {
        Ok(a) => a.cancelled.bind(py).clone(),
        Err(e) => return e,
    };
    let args = match msg {
        Some(m) => PyTuple::new(py, [m.clone_ref(py)]),
        None => Ok(PyTuple::empty(py)),
    };
    match args.and_then(|a| cls.call1(a)) {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

fn invalid_state(py: Python<'_>, what: &str) -> PyErr {
    match api(py).and_then(|a| a.invalid_state.bind(py).call1((what,))) {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

#[pymethods]
impl Waiter {
    #[getter(_asyncio_future_blocking)]
    fn get_blocking(&self) -> bool {
        self.blocking
    }

    #[setter(_asyncio_future_blocking)]
    fn set_blocking(&mut self, value: bool) {
        // Task.__step sets it to False on the future it was handed, then registers
        // its wakeup.
        if self.blocking && !value {
            self.task_armed = true;
        }
        self.blocking = value;
    }

    fn get_loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.event_loop.clone_ref(py)
    }

    fn done(&self) -> bool {
        self.is_done()
    }

    fn cancelled(&self) -> bool {
        matches!(self.state, State::Cancelled(_))
    }

    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self.outcome(py) {
            Some(r) => r,
            None => Err(invalid_state(py, "Result is not set.")),
        }
    }

    fn exception(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match &self.state {
            State::Pending => Err(invalid_state(py, "Exception is not set.")),
            State::Value(_) => Ok(None),
            State::Error(e) => Ok(Some(e.clone_ref(py))),
            State::Cancelled(msg) => Err(cancelled_error(py, msg.as_ref())),
        }
    }

    #[pyo3(signature = (func, *, context = None))]
    fn add_done_callback(
        slf: &Bound<'_, Self>,
        func: Py<PyAny>,
        context: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let mut w = slf.borrow_mut();
        let task = std::mem::take(&mut w.task_armed);
        if w.is_done() {
            let event_loop = w.event_loop.clone_ref(py);
            drop(w);
            schedule(py, &event_loop, func, context, slf)?;
            return Ok(());
        }
        w.callbacks.push(Callback {
            func,
            context,
            task,
        });
        Ok(())
    }

    fn remove_done_callback(slf: &Bound<'_, Self>, func: &Bound<'_, PyAny>) -> PyResult<usize> {
        // Compared with ==, as asyncio does (bound methods are equal, not identical);
        // out of the waiter while Python runs.
        let all = std::mem::take(&mut slf.borrow_mut().callbacks);
        let mut kept = Callbacks::default();
        let mut removed = Vec::new();
        for c in all.into_vec_iter() {
            if c.func.is(func) || matches!(c.func.bind(slf.py()).eq(func), Ok(true)) {
                removed.push(c);
            } else {
                kept.push(c);
            }
        }
        let n = removed.len();
        drop(removed);
        let mut w = slf.borrow_mut();
        let added = std::mem::replace(&mut w.callbacks, kept);
        for c in added.into_vec_iter() {
            w.callbacks.push(c);
        }
        Ok(n)
    }

    #[pyo3(signature = (msg = None))]
    fn cancel(slf: &Bound<'_, Self>, msg: Option<Py<PyAny>>) -> PyResult<bool> {
        Self::cancel_now(slf, msg)
    }

    fn __await__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Op::new(OpState::Wait {
            fut: slf.clone().into_any().unbind(),
            kind: WaitKind::Plain,
        })
        .into_py(slf.py())
    }

    fn __iter__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Self::__await__(slf)
    }

    fn __repr__(&self) -> &'static str {
        match self.state {
            State::Pending => "<lightws Waiter pending>",
            State::Value(_) => "<lightws Waiter finished>",
            State::Error(_) => "<lightws Waiter failed>",
            State::Cancelled(_) => "<lightws Waiter cancelled>",
        }
    }
}

/// Whether `e` is a BaseException that is not an Exception (KeyboardInterrupt,
/// SystemExit): what a drain must not swallow.
pub(super) fn is_fatal(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PyBaseException>(py)
        && !e.is_instance_of::<pyo3::exceptions::PyException>(py)
}
