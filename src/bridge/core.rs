//! `Core`, the native half of `lightws.Server`: the tokio runtime, the listener, the
//! hub, and the dispatch of hub events on the loop thread.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use tokio::sync::watch;

use super::api::api;
use super::client::{self as client, ClientState};
use super::config::{build_config, tune_malloc};
use super::connection::{raw_headers, Connection, PyState};
use super::errors::tls_err;
use super::listener::Natives;
use super::message::data_frame;
use super::waiter::{is_fatal, DrainGuard};
use crate::fanout::Fanout;
use crate::frame::{OpCode, Role};
use crate::lockcheck::ConnMutex;
use crate::onloop::Reactor;
use crate::relay::Relay;
use crate::security::IpLimiter;
use crate::server::{self, ServerShared};
use crate::session::LogLevel;
use crate::shared::{Event, EventHub, HandshakeEvent, Reply};
use crate::stats::{Stats, OPCODES};
use crate::tls::{self, CertStore};

/// The native half of `lightws.Server` (private): owns the tokio runtime, the listener
/// and the hub, and dispatches hub events on the loop thread.
#[pyclass(module = "lightws._lightws", frozen)]
pub struct Core {
    pub(super) srv: Arc<ServerShared>,
    pub(super) hub: Arc<EventHub>,
    pub(super) event_loop: Py<PyAny>,
    /// Topics, publish and the fan-out task (fanout.rs).
    pub(super) fanout: Arc<Fanout>,
    /// The `lightws.Server` this is the native half of (`conn.server`); None for a
    /// client core.
    pub(super) server: Py<PyAny>,
    pub(super) dispatch: Py<PyAny>,
    pub(super) log: Py<PyAny>,
    pub(super) runtime: Mutex<Option<tokio::runtime::Runtime>>,
    pub(super) conns: Mutex<HashMap<u64, Py<Connection>>>,
    pub(super) stop: Mutex<Option<watch::Sender<bool>>>,
    pub(super) local: Mutex<Option<(SocketAddr, i32)>>,
    /// Some for the client core of an event loop (bridge/client.rs, `lightws.connect`).
    pub(super) client: Option<ClientState>,
    /// Connections without a coroutine: listeners and `lightws.Accept` (listener.rs).
    pub(super) natives: Natives,
    /// Whether `send()` may write a frame inline on the loop thread (send.rs): set by
    /// each drain from how many events it took. A reply written inline saves the I/O
    /// thread's wake-up (latency); under load the I/O thread's coalesced writes cost
    /// the loop thread nothing, so the write goes back to it.
    pub(super) inline_ok: AtomicBool,
}

impl Core {
    fn conn(&self, py: Python<'_>, id: u64) -> Option<Py<Connection>> {
        self.conns.lock().get(&id).map(|c| c.clone_ref(py))
    }

    fn on_handshake(&self, core: &Bound<'_, Core>, h: HandshakeEvent) -> PyResult<()> {
        let py = core.py();
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
                native: AtomicBool::new(false),
                st: ConnMutex::new(PyState {
                    reply: Some(reply),
                    ..Default::default()
                }),
                core: core.clone().unbind(),
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
            self.emit_log(
                py,
                LogLevel::Error,
                None,
                &format!("handshake dispatch failed: {e}"),
            );
            let _ = obj.get().reply(Reply::Respond {
                status: 500,
                headers: Vec::new(),
                body: b"Internal Server Error".to_vec(),
            });
        }
        Ok(())
    }

    fn emit_log(
        &self,
        py: Python<'_>,
        level: LogLevel,
        conn: Option<(u64, SocketAddr)>,
        msg: &str,
    ) {
        let (id, addr) = match conn {
            Some((id, a)) => (Some(id).filter(|i| *i != 0), Some(a.to_string())),
            None => (None, None),
        };
        if let Err(e) = self.log.call1(py, (level as u8, id, addr, msg)) {
            e.write_unraisable(py, None);
        }
    }

    fn handle(&self, core: &Bound<'_, Core>, ev: Event) -> PyResult<()> {
        let py = core.py();
        match ev {
            Event::Readable(id) => {
                if let Some(c) = self.conn(py, id) {
                    c.get().on_readable(py)?;
                } else {
                    self.native_readable(core, id)?;
                }
            }
            Event::Drained(id) => {
                if let Some(c) = self.conn(py, id) {
                    c.get().on_drained(py)?;
                } else {
                    self.native_drained(py, id)?;
                }
            }
            Event::Closed(id) => {
                let c = self.conns.lock().remove(&id);
                if let Some(c) = c {
                    c.get().on_closed(py)?;
                } else {
                    self.native_closed(core, id)?;
                }
                if self.client.is_some() {
                    client::notify_if_idle(py, self);
                }
            }
            Event::Connected(c) => client::on_connected(core, *c)?,
            Event::Handshake(h) => self.on_handshake(core, *h)?,
            Event::Log(l) => self.emit_log(py, l.level, l.conn, &l.msg),
        }
        Ok(())
    }
}

/// Up to this many events in a drain, the loop counts as not busy: replies are written
/// inline (`Core::inline_ok`).
///
/// NOTE: measured on the merged main, quiet machine, `bench/compare.py` 100x64 B: with
/// every reply inline the loop thread spent 8.7 µs per message (the write syscall
/// moved onto it) and the echo reached 0.69x picows; one connection's round trip is
/// one event per drain, where the inline write saves a wake-up (BENCHMARKS.md,
/// "Latency").
pub(super) const INLINE_MAX_BATCH: usize = 2;

/// Events handled per drain call before yielding back to the event loop.
pub(super) const DRAIN_BATCH: usize = 1024;

impl Core {
    /// Handle queued events. `from_reader`: called as the event loop's reader callback,
    /// where no task runs, so tasks waiting for a message are resumed right here
    /// (waiter.rs) instead of one loop iteration later.
    fn drain_events(slf: &Bound<'_, Self>, from_reader: bool) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let _direct = DrainGuard::enter(from_reader);
        this.hub.begin_drain();
        let mut batch = Vec::new();
        let more = this.hub.take(DRAIN_BATCH, &mut batch);
        this.inline_ok.store(
            this.srv.on_loop.is_some() || batch.len() <= INLINE_MAX_BATCH,
            Ordering::Relaxed,
        );
        let mut fatal = None;
        for ev in batch {
            if let Err(e) = this.handle(slf, ev) {
                // One connection's failure must not lose the rest of the batch; a
                // KeyboardInterrupt or SystemExit out of a resumed task goes on to the
                // event loop once the batch is done, as it would from the task's step.
                if is_fatal(py, &e) {
                    fatal.get_or_insert(e);
                } else {
                    e.write_unraisable(py, None);
                }
            }
        }
        if more {
            this.hub.rearm();
        }
        if let Err(e) = this.release_adopted(py) {
            e.write_unraisable(py, None);
        }
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[pymethods]
impl Core {
    #[new]
    fn new(
        config: &Bound<'_, PyAny>,
        dispatch: Py<PyAny>,
        log: Py<PyAny>,
        event_loop: Py<PyAny>,
        server: Py<PyAny>,
    ) -> PyResult<Self> {
        // The Python objects the bridge calls are looked up now, at startup: a missing
        // one fails Server.start(), not the first message of some connection.
        api(config.py())?;
        let cfg = build_config(config)?;
        let hub = Arc::new(EventHub::new().map_err(|e| PyOSError::new_err(e.to_string()))?);
        let tls = match (&cfg.cert_file, &cfg.key_file) {
            (Some(c), Some(k)) => {
                let store = CertStore::load(c, k).map_err(tls_err)?;
                let sc = tls::server_config(store.clone()).map_err(tls_err)?;
                Some((store, tokio_rustls::TlsAcceptor::from(sc)))
            }
            _ => None,
        };
        let relay = cfg
            .pubsub
            .as_deref()
            .map(Relay::new)
            .transpose()
            .map_err(PyValueError::new_err)?
            .map(Arc::new);
        let fanout = Arc::new(Fanout::new(cfg.backpressure, relay));
        // Config(threads=0): connections on the loop thread (onloop.rs).
        let on_loop = if cfg.threads == 0 {
            Some(Reactor::new(hub.fd()).map_err(|e| PyOSError::new_err(e.to_string()))?)
        } else {
            None
        };
        let srv = Arc::new(ServerShared {
            on_loop,
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
            fanout,
            server,
            dispatch,
            log,
            runtime: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            stop: Mutex::new(None),
            local: Mutex::new(None),
            client: None,
            natives: Natives::default(),
            inline_ok: AtomicBool::new(true),
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
            // threads=0: one for accepting, TLS and handshakes (onloop.rs).
            .worker_threads(srv.cfg.threads.max(1))
            .thread_name("lightws-io")
            .enable_all()
            .build()
            .map_err(|e| PyOSError::new_err(format!("cannot start the I/O runtime: {e}")))?;
        // The backplane before anything is accepted: unreachable Redis fails start().
        if let Some(relay) = self.fanout.relay() {
            let (fanout, srv) = (self.fanout.clone(), srv.clone());
            py.detach(|| relay.start(&rt, fanout, srv))
                .map_err(PyOSError::new_err)?;
        }
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
            self.fanout.start(&rt);
            let stats = srv.stats.clone();
            rt.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    stats.sample();
                }
            });
        }
        if let Some(reactor) = &srv.on_loop {
            reactor.set_runtime(rt.handle().clone());
        }
        *self.stop.lock() = Some(tx);
        *self.local.lock() = Some((local, fd));
        *rt_slot = Some(rt);
        Ok(())
    }

    /// The hub's wake-up descriptor, for `loop.add_reader`.
    fn fd(&self) -> i32 {
        match &self.srv.on_loop {
            Some(reactor) => reactor.fd(),
            None => self.hub.fd(),
        }
    }

    /// Handle queued events (called by the event loop when the fd is readable).
    fn drain(slf: &Bound<'_, Self>) -> PyResult<()> {
        let this = slf.get();
        if let Some(reactor) = &this.srv.on_loop {
            this.hub.hold();
            reactor.run();
        }
        crate::hoptrace::mark(crate::hoptrace::Hop::Drain);
        Self::drain_events(slf, true)
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

    /// The open connections (accepted or waiting for their handshake), including
    /// those without a coroutine (their objects are made now if none is kept).
    fn connections(slf: &Bound<'_, Self>) -> PyResult<Vec<Py<Connection>>> {
        let py = slf.py();
        let this = slf.get();
        let mut out: Vec<Py<Connection>> = this
            .conns
            .lock()
            .values()
            .map(|c| c.clone_ref(py))
            .collect();
        out.extend(this.native_connections(slf)?);
        Ok(out)
    }

    /// Release the objects kept for idle listener connections (called once a second
    /// by lightws.Server); returns how many were released.
    fn sweep(&self, py: Python<'_>) -> PyResult<usize> {
        self.sweep_native(py)
    }

    /// How many connections have no coroutine (listeners and `Accept`).
    fn native_count(&self) -> usize {
        self.natives.len()
    }

    /// Stop the runtime: every task is dropped (sockets closed). Handles the resulting
    /// events before returning.
    fn shutdown(slf: &Bound<'_, Self>) {
        let py = slf.py();
        let this = slf.get();
        this.stop_accepting();
        if let Some(reactor) = &this.srv.on_loop {
            reactor.shutdown();
        }
        let rt = this.runtime.lock().take();
        if let Some(rt) = rt {
            py.detach(|| rt.shutdown_timeout(Duration::from_secs(2)));
        }
        // Tasks dropped by the shutdown reported Closed; deliver those now.
        for _ in 0..1000 {
            if let Err(e) = Self::drain_events(slf, false) {
                e.write_unraisable(slf.py(), None);
            }
            if !this.hub.take(0, &mut Vec::new()) {
                break;
            }
        }
        this.local.lock().take();
    }

    /// Queue `message` to every subscriber of `topic` except `exclude`; returns how many
    /// subscribers it goes to. Never waits; callable from any thread.
    #[pyo3(signature = (topic, message, exclude = None))]
    fn publish(
        &self,
        topic: &str,
        message: &Bound<'_, PyAny>,
        exclude: Option<&Bound<'_, Connection>>,
    ) -> PyResult<usize> {
        let frame = data_frame(message, "publish")?;
        let exclude = exclude.map(|c| {
            let c = c.get();
            let subscribed = c
                .shared
                .outbox
                .lock()
                .topics
                .iter()
                .any(|t| &*t.name == topic);
            (c.shared.id, subscribed)
        });
        Ok(self.fanout.publish(topic, frame, exclude))
    }

    /// How many connections are subscribed to `topic`.
    fn subscribers(&self, topic: &str) -> usize {
        self.fanout.subscribers(topic)
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
        d.set_item("dropped", self.fanout.dropped.load(Ordering::Relaxed))?;
        d.set_item(
            "backpressure_closes",
            self.fanout.backpressure_closes.load(Ordering::Relaxed),
        )?;
        let relay = self.fanout.relay();
        d.set_item("pubsub", relay.map(|r| r.state()))?;
        for (name, n) in [
            ("relay_errors", relay.map(|r| &r.relay_errors)),
            ("unrelayed", relay.map(|r| &r.unrelayed)),
            ("relayed", relay.map(|r| &r.relayed)),
            ("relay_received", relay.map(|r| &r.received)),
        ] {
            d.set_item(name, n.map_or(0, |n| n.load(Ordering::Relaxed)))?;
        }
        d.set_item("topics", self.fanout.topics())?;
        d.set_item("subscriptions", self.fanout.subscriptions())?;
        d.set_item("rates", rates)?;
        d.set_item("rate_window", window.span)?;
        Ok(d)
    }
}

/// Queue `message` to every connection in `connections` (any iterable of
/// `lightws.Connection`); returns how many it was queued to. The frame is encoded
/// once and shared; closed connections are skipped and not counted; a connection over
/// `max_backpressure` is handled by `on_backpressure` like a publish. Never waits.
#[pyfunction]
pub fn broadcast(connections: &Bound<'_, PyAny>, message: &Bound<'_, PyAny>) -> PyResult<usize> {
    let frame = data_frame(message, "broadcast")?;
    let mut count = 0;
    for item in connections.try_iter()? {
        let item = item?;
        let conn = item.cast::<Connection>().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "broadcast() takes lightws.Connection objects, not {}",
                item.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let c = conn.get();
        if c.st.lock().finished {
            continue;
        }
        // Behind this connection's own frames on the fan-out route, if any (send.rs).
        let fanout = &c.core.get().fanout;
        let frame = match c.shared.cfg.session.role {
            Role::Server => frame.clone(),
            // A client connection's frames are masked, each with its own key.
            Role::Client => client::masked_copy(&frame),
        };
        let queued = if c.fenced() {
            fanout.send_shared(&c.shared, frame)
        } else {
            fanout.deliver(&c.shared, frame)
        };
        count += usize::from(queued);
    }
    Ok(count)
}
