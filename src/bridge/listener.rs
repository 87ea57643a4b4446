//! Connections without a coroutine (DESIGN.md §4): a **listener** (an object with some
//! of `on_open`, `on_message`, `on_close`, called on the loop thread) or
//! `lightws.Accept(topics, listener)`, handled in Rust unless a listener is given.
//!
//! Such a connection has no asyncio Task, and no Python object while it idles: the
//! loop thread keeps a [`Native`] entry (the shared state, the listener, the chosen
//! subprotocol) and makes a `Connection` object when an event needs one. After the
//! event the object is kept in `held` for a while (a busy connection does not make one
//! per message); `sweep`, once a second, releases the objects of connections that had
//! no event since the previous sweep and that nothing else references (no strong
//! reference, no weak reference, no attribute set on them, nothing pending).
//!
//! Locks: `native` and `held` are the loop thread's own maps; neither is held while
//! Python runs, a Python object is created, or one is dropped (a finalizer could
//! re-enter), and no connection lock is taken under them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;

use super::api::api;
use super::connection::{subscribe, unsubscribe_all, Connection, Popped, PyState, Want};
use super::core::Core;
use super::message::make_message;
use crate::lockcheck::{assert_unlocked, ConnMutex};
use crate::shared::{ConnShared, Event};

/// Which of the three methods a listener has (looked up once per connection).
const ON_OPEN: u8 = 1;
const ON_MESSAGE: u8 = 2;
const ON_CLOSE: u8 = 4;

/// What the loop thread keeps of a connection without a coroutine.
pub(super) struct Native {
    shared: Arc<ConnShared>,
    /// The listener and which of its methods exist; None for `Accept` without one.
    listener: Option<ListenerRef>,
    /// The subprotocol chosen in the handshake (for objects made later).
    subprotocol: Option<Box<str>>,
}

/// A listener and which of its methods exist.
type ListenerRef = (Py<PyAny>, u8);

/// A connection's object kept between events.
struct Held {
    obj: Py<Connection>,
    /// An event used it since the last sweep.
    touched: bool,
}

/// The connections without a coroutine of one server (a field of [`Core`]).
#[derive(Default)]
pub(super) struct Natives {
    native: Mutex<HashMap<u64, Native>>,
    held: Mutex<HashMap<u64, Held>>,
    /// Adopted since the end of the last drain (see `release_adopted`).
    fresh: Mutex<Vec<u64>>,
}

impl Natives {
    pub(super) fn len(&self) -> usize {
        self.native.lock().len()
    }
}

/// Messages handed to one listener per event: a connection with a long queue lets
/// the other connections' events and the loop's tasks in between (like the coroutine
/// API's fairness budget).
const LISTENER_BUDGET: usize = 64;

/// The close code a listener failure closes with (internal error).
const INTERNAL_ERROR: u16 = 1011;

impl Core {
    /// The object for native connection `id` (kept or made now), with its listener;
    /// None if the connection is not a native one (or is gone).
    fn native_obj(
        &self,
        core: &Bound<'_, Core>,
        id: u64,
    ) -> PyResult<Option<(Py<Connection>, Option<ListenerRef>)>> {
        let py = core.py();
        let (shared, listener, subprotocol) = {
            let native = self.natives.native.lock();
            let Some(n) = native.get(&id) else {
                return Ok(None);
            };
            (
                n.shared.clone(),
                n.listener.as_ref().map(|(l, m)| (l.clone_ref(py), *m)),
                n.subprotocol.clone(),
            )
        };
        let kept = {
            let mut held = self.natives.held.lock();
            held.get_mut(&id).map(|h| {
                h.touched = true;
                h.obj.clone_ref(py)
            })
        };
        if let Some(obj) = kept {
            return Ok(Some((obj, listener)));
        }
        assert_unlocked("making a Connection");
        let obj = Py::new(
            py,
            Connection {
                shared,
                immediate: AtomicU32::new(0),
                native: AtomicBool::new(true),
                st: ConnMutex::new(PyState::default()),
                core: core.clone().unbind(),
                request: OnceLock::new(),
                subprotocol: OnceLock::from(subprotocol.map(String::from)),
            },
        )?;
        let old = self.natives.held.lock().insert(
            id,
            Held {
                obj: obj.clone_ref(py),
                touched: true,
            },
        );
        drop(old);
        Ok(Some((obj, listener)))
    }

    /// Event::Readable for a connection that is not a coroutine's: hand every queued
    /// message to the listener's `on_message`. False if `id` is not a native one.
    pub(super) fn native_readable(&self, core: &Bound<'_, Core>, id: u64) -> PyResult<bool> {
        let Some((obj, listener)) = self.native_obj(core, id)? else {
            return Ok(false);
        };
        let Some((l, _)) = listener.filter(|(_, m)| m & ON_MESSAGE != 0) else {
            // Nothing reads this connection's data (it is discarded from adoption on):
            // this is the close arriving.
            return Ok(true);
        };
        let py = core.py();
        let c = obj.get();
        for _ in 0..LISTENER_BUDGET {
            let popped = c.pop(&mut c.shared.inbox.lock(), Want::Message { anext: false });
            let Popped::Msg(m) = popped else {
                // Empty (`waiting` is set again: the next message comes as an event),
                // closed (on_close follows with Event::Closed) or, never here, a
                // streamed message.
                return Ok(true);
            };
            let msg = make_message(py, m)?;
            let r = l.call_method1(py, intern!(py, "on_message"), (obj.clone_ref(py), msg));
            if self.listener_result(py, &obj, "on_message", r)? {
                return Ok(true); // failed: the rest is discarded, the connection closing
            }
        }
        // More are queued: the rest after the other events and tasks waiting now.
        self.hub.push(Event::Readable(id));
        Ok(true)
    }

    /// The object kept for connection `id`, if any (not marking it used).
    fn kept(&self, py: Python<'_>, id: u64) -> Option<Py<Connection>> {
        self.natives
            .held
            .lock()
            .get(&id)
            .map(|h| h.obj.clone_ref(py))
    }

    /// Event::Drained for a native connection: its object (if one is kept) may have
    /// sends waiting. False if `id` is not a native one.
    pub(super) fn native_drained(&self, py: Python<'_>, id: u64) -> PyResult<bool> {
        if !self.natives.native.lock().contains_key(&id) {
            return Ok(false);
        }
        let obj = self.kept(py, id);
        if let Some(obj) = obj {
            obj.get().on_drained(py)?;
        }
        Ok(true)
    }

    /// Event::Closed for a native connection: unsubscribe it, complete what its object
    /// waits for, and call the listener's `on_close(conn, code, reason)`. False if `id`
    /// is not a native one.
    pub(super) fn native_closed(&self, core: &Bound<'_, Core>, id: u64) -> PyResult<bool> {
        let py = core.py();
        let needs_obj = {
            let native = self.natives.native.lock();
            let Some(n) = native.get(&id) else {
                return Ok(false);
            };
            matches!(n.listener, Some((_, m)) if m & ON_CLOSE != 0)
        };
        let kept = self.natives.held.lock().contains_key(&id);
        let obj = if needs_obj || kept {
            self.native_obj(core, id)?
        } else {
            None
        };
        let entry = self.natives.native.lock().remove(&id);
        let held = self.natives.held.lock().remove(&id);
        drop(held);
        let Some(entry) = entry else {
            return Ok(true);
        };
        unsubscribe_all(&self.fanout, &entry.shared);
        if let Some((obj, listener)) = obj {
            let c = obj.get();
            c.on_closed(py)?;
            if let Some((l, methods)) = listener {
                if methods & ON_CLOSE != 0 {
                    let info = c.close_info();
                    let r = l.call_method1(
                        py,
                        intern!(py, "on_close"),
                        (
                            obj.clone_ref(py),
                            info.code,
                            PyString::new(py, &info.reason),
                        ),
                    );
                    self.listener_result(py, &obj, "on_close", r)?;
                }
            }
        }
        drop(entry);
        Ok(true)
    }

    /// What a listener method returned: an exception (logged; the connection closes
    /// with 1011, except after on_close; `ConnectionClosed` is not a failure, as for a
    /// handler) or an awaitable (a mistake: listener methods are plain functions;
    /// logged, closed and 1011). True if the connection is closing for it.
    fn listener_result(
        &self,
        py: Python<'_>,
        obj: &Py<Connection>,
        method: &str,
        r: PyResult<Py<PyAny>>,
    ) -> PyResult<bool> {
        let closing = method != "on_close";
        let (exc, returned) = match r {
            Ok(v) if v.is_none(py) => return Ok(false),
            Ok(v) => {
                let b = v.bind(py);
                if !b.hasattr(intern!(py, "__await__"))? {
                    return Ok(false); // any other value is ignored
                }
                if b.hasattr(intern!(py, "close"))? {
                    // A coroutine that will never run: no "never awaited" warning.
                    let _ = b.call_method0(intern!(py, "close"));
                }
                (py.None(), v)
            }
            // The connection closed under the listener (a send_nowait after the peer's
            // close): as for a handler, not a failure; it is closing already.
            Err(e) if e.is_instance(py, api(py)?.closed_base.bind(py)) => return Ok(false),
            Err(e) => (e.into_value(py).into_any(), py.None()),
        };
        let failed = api(py)?
            .listener_failed
            .call1(py, (obj.clone_ref(py), method, exc, returned, closing));
        if let Err(e) = failed {
            e.write_unraisable(py, None);
        }
        if closing {
            // No more messages for the listener: dropped from here on.
            let c = obj.get();
            c.shared.discard_incoming();
            let _ = c.close(py, INTERNAL_ERROR, "");
        }
        Ok(closing)
    }

    /// Make connection `conn` (answered 101 already) a native one: subscribe it to
    /// `topics`, hand it to `listener` (`on_open`, then any message already queued) or,
    /// without one, discard incoming data and let its object go.
    pub(super) fn adopt(
        &self,
        core: &Bound<'_, Core>,
        conn: &Bound<'_, Connection>,
        listener: Option<Bound<'_, PyAny>>,
        topics: Vec<String>,
    ) -> PyResult<()> {
        let py = core.py();
        let c = conn.get();
        if c.st.lock().finished {
            return Ok(()); // the client left during an async handshake
        }
        let id = c.shared.id;
        let listener = match listener {
            Some(l) => {
                let mut m = 0;
                let base = api(py)?.listener_base.bind(py);
                let cls = l.get_type();
                for (bit, name) in [
                    (ON_OPEN, intern!(py, "on_open")),
                    (ON_MESSAGE, intern!(py, "on_message")),
                    (ON_CLOSE, intern!(py, "on_close")),
                ] {
                    // The base class's no-ops (lightws.Listener) count as absent: no
                    // call, and no object made for them.
                    let own = l
                        .getattr(intern!(py, "__dict__"))
                        .and_then(|d| d.contains(name))
                        .unwrap_or(false);
                    let inherited = !own
                        && match (cls.getattr(name), base.getattr(name)) {
                            (Ok(a), Ok(b)) => a.is(&b),
                            _ => false,
                        };
                    if !inherited && l.hasattr(name)? {
                        m |= bit;
                    }
                }
                Some((l.unbind(), m))
            }
            None => None,
        };
        let methods = listener.as_ref().map_or(0, |(_, m)| *m);
        let has_listener = listener.is_some();
        let on_open = listener
            .as_ref()
            .filter(|(_, m)| m & ON_OPEN != 0)
            .map(|(l, _)| l.clone_ref(py));
        c.native.store(true, Ordering::Relaxed);
        let coroutine = self.conns.lock().remove(&id);
        drop(coroutine);
        let old = self.natives.native.lock().insert(
            id,
            Native {
                shared: c.shared.clone(),
                listener,
                subprotocol: c.subprotocol.get().cloned().flatten().map(Into::into),
            },
        );
        drop(old);
        for t in &topics {
            subscribe(&self.fanout, &c.shared, t);
        }
        if methods & ON_MESSAGE == 0 {
            // `Accept` without a listener, or a listener without on_message: data is
            // dropped as it arrives.
            c.shared.discard_incoming();
        }
        if !has_listener {
            return Ok(());
        }
        let old = self.natives.held.lock().insert(
            id,
            Held {
                obj: conn.clone().unbind(),
                touched: true,
            },
        );
        drop(old);
        if let Some(l) = on_open {
            let r = l.call_method1(py, intern!(py, "on_open"), (conn.clone(),));
            self.listener_result(py, &conn.clone().unbind(), "on_open", r)?;
        }
        // Messages that came with or right after the upgrade; this also arms the
        // inbox (`waiting`), so the next message comes as an event.
        self.native_readable(core, id)?;
        self.natives.fresh.lock().push(id);
        Ok(())
    }

    /// The objects of every native connection (made now where none is kept), for
    /// `server.connections` and closing the server.
    pub(super) fn native_connections(
        &self,
        core: &Bound<'_, Core>,
    ) -> PyResult<Vec<Py<Connection>>> {
        let ids: Vec<u64> = self.natives.native.lock().keys().copied().collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((obj, _)) = self.native_obj(core, id)? {
                out.push(obj);
            }
        }
        Ok(out)
    }

    /// Release the kept objects of native connections that had no event since the
    /// last sweep and that nothing references. Returns how many were released.
    pub(super) fn sweep_native(&self, py: Python<'_>) -> PyResult<usize> {
        let idle: Vec<(u64, Py<Connection>)> = {
            let mut held = self.natives.held.lock();
            let mut idle = Vec::new();
            for (id, h) in held.iter_mut() {
                if std::mem::take(&mut h.touched) {
                    continue;
                }
                idle.push((*id, h.obj.clone_ref(py)));
            }
            idle
        };
        let mut released = 0;
        for (id, obj) in idle {
            released += usize::from(self.release(py, id, obj, false)?);
        }
        Ok(released)
    }

    /// Release the objects of the connections adopted since the last call (at the end
    /// of each drain, once the handshake's own references are gone): a listener
    /// connection whose `on_open` kept nothing holds no Python object from its first
    /// idle moment, not only after the next sweeps.
    pub(super) fn release_adopted(&self, py: Python<'_>) -> PyResult<()> {
        let fresh = std::mem::take(&mut *self.natives.fresh.lock());
        for id in fresh {
            let obj = self.kept(py, id);
            if let Some(obj) = obj {
                self.release(py, id, obj, true)?;
            }
        }
        Ok(())
    }

    /// Drop the kept object of connection `id` (`obj`, a clone) if nothing else
    /// references it, it has no attributes and nothing is pending on it; unless
    /// `force`, only if no event used it since it was cleared. True if released.
    fn release(&self, py: Python<'_>, id: u64, obj: Py<Connection>, force: bool) -> PyResult<bool> {
        // Ours: the map's and this clone.
        // SAFETY: reading the reference count of an object we hold a reference to.
        let refs = unsafe { pyo3::ffi::Py_REFCNT(obj.as_ptr()) };
        if refs > 2 || !obj.get().st.lock().quiescent() {
            return Ok(false);
        }
        let b = obj.bind(py);
        if api(py)?
            .getweakrefcount
            .call1(py, (b,))?
            .extract::<usize>(py)?
            > 0
        {
            return Ok(false);
        }
        if b.getattr(intern!(py, "__dict__"))?.len()? > 0 {
            return Ok(false);
        }
        let gone = {
            let mut held = self.natives.held.lock();
            match held.get(&id) {
                Some(h) if force || !h.touched => held.remove(&id),
                _ => None,
            }
        };
        let released = gone.is_some();
        drop(gone);
        drop(obj);
        Ok(released)
    }
}
