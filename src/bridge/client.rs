//! The Python side of the client role (`lightws.connect`, python/lightws/client.py).
//!
//! A client `Core` serves every client connection of one event loop: the same hub,
//! drain and `Connection` as a server's, a tokio runtime of one worker thread, and no
//! listener. `client_connect` starts one opening (client.rs) and returns an asyncio
//! future; the `Event::Connected` that ends the opening completes it with a tuple that
//! client.py turns into the `Connection` or the exception (so that the exception
//! classes stay Python's). When the core has no connection and no opening left it
//! calls its `on_idle` callback: client.py then shuts it down, so an idle program
//! holds no client threads.
//!
//! Lock discipline as everywhere in the bridge: the pending map is locked only to move
//! an entry in or out, never across a call into Python.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use super::api::api;
use super::connection::{raw_headers, Connection, PyState};
use super::core::Core;
use super::op::{is_done, resolve};
use crate::client::{self, ClientSettings};
use crate::fanout::Fanout;
use crate::frame::{self, Role};
use crate::handshake::client::{Response, Target};
use crate::handshake::{self, client::OWNED_REQUEST_HEADERS};
use crate::lockcheck::ConnMutex;
use crate::server::{ServerConfig, ServerShared};
use crate::session::{LogLevel, SessionConfig};
use crate::shared::{Backpressure, ConnConfig, ConnShared, ConnectError, ConnectEvent, EventHub};
use crate::stats::Stats;

/// What a client core adds to a `Core`.
pub(crate) struct ClientState {
    /// Openings under way: the future `connect()` waits on and the task to abort if it
    /// is cancelled.
    pending: Mutex<HashMap<u64, Pending>>,
    next_token: AtomicU64,
    /// Called (no arguments) when the last connection and opening are gone.
    on_idle: Py<PyAny>,
}

struct Pending {
    fut: Py<PyAny>,
    task: tokio::task::AbortHandle,
}

/// A client core for the running loop: runtime started, nothing listening.
#[pyfunction]
pub fn client_core(
    py: Python<'_>,
    log: Py<PyAny>,
    event_loop: Py<PyAny>,
    on_idle: Py<PyAny>,
) -> PyResult<Core> {
    api(py)?;
    let hub = Arc::new(EventHub::new().map_err(|e| PyOSError::new_err(e.to_string()))?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("lightws-client")
        .enable_all()
        .build()
        .map_err(|e| PyOSError::new_err(format!("cannot start the I/O runtime: {e}")))?;
    let backpressure = Backpressure {
        max: 1 << 20,
        close: true,
    };
    let srv = Arc::new(ServerShared {
        cfg: placeholder_server_config(backpressure),
        hub: hub.clone(),
        stats: Arc::new(Stats::new()),
        tls: None,
        per_ip: None,
        on_loop: None,
    });
    Ok(Core {
        srv,
        hub,
        event_loop,
        fanout: Arc::new(Fanout::new(backpressure, None)),
        server: py.None(),
        dispatch: py.None(),
        log,
        runtime: Mutex::new(Some(rt)),
        conns: Mutex::new(HashMap::new()),
        stop: Mutex::new(None),
        local: Mutex::new(None),
        client: Some(ClientState {
            pending: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            on_idle,
        }),
        natives: Default::default(),
        inline_ok: AtomicBool::new(true),
    })
}

/// A client core has no listener: the server settings it carries are never read but
/// for `io_statistics` (off).
fn placeholder_server_config(backpressure: Backpressure) -> ServerConfig {
    ServerConfig {
        addr: String::new(),
        conn: Arc::new(conn_config(&ClientOptions::default())),
        sock_read_buffer: None,
        sock_write_buffer: None,
        http_read_buffer: 4096,
        http_write_buffer: 4096,
        handshake_read_timeout: Duration::ZERO,
        handshake_write_timeout: Duration::ZERO,
        tcp_keepalive: None,
        max_connections: 0,
        max_connections_per_ip: 0,
        trusted_proxies: Vec::new(),
        origins: None,
        backlog: 0,
        threads: 1,
        http_fallback: false,
        io_statistics: false,
        cert_file: None,
        key_file: None,
        backpressure,
        reuse_port: false,
        pubsub: None,
    }
}

/// The per-connection settings of `connect()` (checked by client.py).
struct ClientOptions {
    max_msg_len: usize,
    write_limit: usize,
    close_timeout: Duration,
    ping_interval: Option<Duration>,
    ping_timeout: Option<Duration>,
    auto_pong: bool,
    log_level: LogLevel,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            max_msg_len: 1 << 20,
            write_limit: 64 * 1024,
            close_timeout: Duration::from_secs(5),
            ping_interval: None,
            ping_timeout: None,
            auto_pong: true,
            log_level: LogLevel::Error,
        }
    }
}

/// As bridge/config.rs builds a server's, in the client role.
fn conn_config(o: &ClientOptions) -> ConnConfig {
    ConnConfig {
        session: Arc::new(SessionConfig {
            role: Role::Client,
            max_msg_len: o.max_msg_len as u64,
            auto_pong: o.auto_pong,
            ping_interval: o.ping_interval,
            ping_timeout: o.ping_timeout,
            idle_timeout: None,
            close_timeout: o.close_timeout,
            max_backlog: 2 * o.write_limit + 64 * 1024,
        }),
        ws_read_buffer: 4096,
        ws_write_buffer: 4096,
        write_limit: o.write_limit,
        inbox_limit: o.max_msg_len.clamp(64 * 1024, 4 * 1024 * 1024),
        log_level: o.log_level,
        io_statistics: false,
        // The client offers no extension yet (permessage-deflate is server-side).
        deflate: None,
    }
}

fn seconds(name: &str, v: Option<f64>) -> PyResult<Option<Duration>> {
    match v {
        None => Ok(None),
        Some(s) if !s.is_finite() || s < 0.0 => Err(PyValueError::new_err(format!(
            "{name} must be a non-negative number of seconds or None, got {s}"
        ))),
        Some(s) => Ok(Some(Duration::from_secs_f64(s))),
    }
}

/// Start opening a client connection on `core`; returns `(future, token)`. The future
/// gets a tuple (see client.py, `_raise_for`); `client_cancel(core, token)` gives up.
///
/// Raises ValueError for a bad URL, header or setting, OSError if `cafile` cannot be
/// read.
#[pyfunction]
#[pyo3(signature = (
    core, url, subprotocols, headers, cafile, max_msg_len, open_timeout, close_timeout,
    ping_interval, ping_timeout, auto_pong, write_limit, log_level
))]
#[allow(clippy::too_many_arguments)]
pub fn client_connect(
    py: Python<'_>,
    core: &Bound<'_, Core>,
    url: &str,
    subprotocols: Vec<String>,
    headers: Vec<(String, String)>,
    cafile: Option<String>,
    max_msg_len: i64,
    open_timeout: Option<f64>,
    close_timeout: Option<f64>,
    ping_interval: Option<f64>,
    ping_timeout: Option<f64>,
    auto_pong: bool,
    write_limit: i64,
    log_level: u8,
) -> PyResult<(Py<PyAny>, u64)> {
    let this = core.get();
    let state = this
        .client
        .as_ref()
        .ok_or_else(|| PyRuntimeError::new_err("not a client core"))?;
    let target = Target::parse(url).map_err(PyValueError::new_err)?;
    for p in &subprotocols {
        if p.is_empty() || p.chars().any(|c| c == ',' || c.is_ascii_whitespace()) {
            return Err(PyValueError::new_err(format!(
                "subprotocol {p:?} is not an HTTP token"
            )));
        }
        handshake::check_header("Sec-WebSocket-Protocol", p)
            .map_err(|e| PyValueError::new_err(format!("subprotocol {p:?}: {e}")))?;
    }
    for (name, value) in &headers {
        handshake::check_header(name, value)
            .map_err(|e| PyValueError::new_err(format!("header {name:?}: {e}")))?;
        if OWNED_REQUEST_HEADERS
            .iter()
            .any(|o| o.eq_ignore_ascii_case(name))
        {
            return Err(PyValueError::new_err(format!(
                "header {name:?} is set by the handshake itself{}",
                if name.eq_ignore_ascii_case("Sec-WebSocket-Protocol") {
                    " (pass subprotocols=[...])"
                } else {
                    ""
                }
            )));
        }
    }
    if max_msg_len < 1 {
        return Err(PyValueError::new_err(format!(
            "max_msg_len must be at least 1, got {max_msg_len}"
        )));
    }
    if write_limit < 1 {
        return Err(PyValueError::new_err(format!(
            "write_limit must be at least 1, got {write_limit}"
        )));
    }
    let options = ClientOptions {
        max_msg_len: max_msg_len as usize,
        write_limit: write_limit as usize,
        close_timeout: seconds("close_timeout", close_timeout)?.unwrap_or_default(),
        // 0 turns keepalive off, as Config.ping_interval.
        ping_interval: seconds("ping_interval", ping_interval)?.filter(|d| !d.is_zero()),
        ping_timeout: seconds("ping_timeout", ping_timeout)?.filter(|d| !d.is_zero()),
        auto_pong,
        log_level: LogLevel::from_u8(log_level).ok_or_else(|| {
            PyValueError::new_err(format!(
                "log_level must be a lightws.LogLevel (0-3), got {log_level}"
            ))
        })?,
    };
    let open_timeout = seconds("open_timeout", open_timeout)?;
    let tls = if target.tls {
        Some(tls_for(py, cafile.as_deref())?)
    } else {
        None
    };
    let settings = Arc::new(ClientSettings {
        target,
        subprotocols,
        headers,
        tls,
        open_timeout,
        conn: Arc::new(conn_config(&options)),
    });
    let fut = this
        .event_loop
        .call_method0(py, pyo3::intern!(py, "create_future"))?;
    let token = state.next_token.fetch_add(1, Ordering::Relaxed);
    let task = {
        let rt = this.runtime.lock();
        let rt = rt
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("this client core was shut down"))?;
        rt.spawn(client::run(
            token,
            settings,
            this.hub.clone(),
            this.srv.stats.clone(),
        ))
        .abort_handle()
    };
    state.pending.lock().insert(
        token,
        Pending {
            fut: fut.clone_ref(py),
            task,
        },
    );
    Ok((fut, token))
}

/// The TLS configuration for `cafile` (or the system's roots), read off the loop's
/// critical path only the first time (the system store is cached).
fn tls_for(py: Python<'_>, cafile: Option<&str>) -> PyResult<Arc<rustls::ClientConfig>> {
    if let Some(path) = cafile {
        if let Err(e) = std::fs::metadata(path) {
            return Err(PyOSError::new_err((
                e.raw_os_error().unwrap_or(0),
                format!("cafile {path:?}: {e}"),
            )));
        }
    }
    py.detach(|| client::tls_config(cafile))
        .map_err(PyValueError::new_err)
}

/// Give up an opening (its `connect()` was cancelled): the task is aborted; if it had
/// already connected, the connection is dropped when its event arrives.
#[pyfunction]
pub fn client_cancel(py: Python<'_>, core: &Bound<'_, Core>, token: u64) {
    let this = core.get();
    let Some(state) = this.client.as_ref() else {
        return;
    };
    let taken = state.pending.lock().remove(&token);
    if let Some(p) = taken {
        p.task.abort();
        drop(p);
        notify_if_idle(py, this);
    }
}

/// Stop a client core whose event loop is gone (closed with client connections still
/// open): the runtime is shut down (every socket closed) and the connections are
/// forgotten, without calling back into the closed loop (`Core.shutdown` would
/// complete their futures there).
#[pyfunction]
pub fn client_abandon(py: Python<'_>, core: &Bound<'_, Core>) {
    let this = core.get();
    let rt = this.runtime.lock().take();
    if let Some(rt) = rt {
        py.detach(|| rt.shutdown_timeout(Duration::from_secs(1)));
    }
    // Moved out of the locks before they are dropped (dropping a Python object can
    // run Python code).
    let conns = std::mem::take(&mut *this.conns.lock());
    let pending = this
        .client
        .as_ref()
        .map(|s| std::mem::take(&mut *s.pending.lock()));
    drop(conns);
    drop(pending);
}

/// Drop a connection nobody will use (its opening was given up).
fn abort_shared(shared: &ConnShared) {
    {
        let mut ob = shared.outbox.lock();
        ob.abort = true;
        ob.closing = true;
    }
    shared.waker.wake();
}

/// `Event::Connected`: complete the opening's future (on the loop thread).
pub(super) fn on_connected(core: &Bound<'_, Core>, ev: ConnectEvent) -> PyResult<()> {
    let py = core.py();
    let this = core.get();
    let Some(state) = this.client.as_ref() else {
        return Ok(());
    };
    let ConnectEvent { token, result } = ev;
    let pending = state.pending.lock().remove(&token);
    let fut = match pending {
        Some(p) if !is_done(py, &p.fut)? => p.fut,
        _ => {
            // Given up meanwhile.
            if let Ok(c) = result {
                abort_shared(&c.shared);
            }
            notify_if_idle(py, this);
            return Ok(());
        }
    };
    let value = match result {
        Ok(c) => {
            let id = c.shared.id;
            let remote = c.shared.remote;
            let shared = c.shared.clone();
            let conn = Py::new(
                py,
                Connection {
                    shared: c.shared,
                    st: ConnMutex::new(PyState::default()),
                    immediate: AtomicU32::new(0),
                    native: AtomicBool::new(false),
                    core: core.clone().unbind(),
                    request: OnceLock::new(),
                    subprotocol: OnceLock::new(),
                },
            );
            let conn = match conn {
                Ok(conn) => conn,
                Err(e) => {
                    abort_shared(&shared);
                    return Err(e);
                }
            };
            let _ = conn.get().subprotocol.set(c.subprotocol);
            this.conns.lock().insert(id, conn.clone_ref(py));
            PyTuple::new(
                py,
                [
                    "ok".into_pyobject(py)?.into_any(),
                    conn.into_bound(py).into_any(),
                    response_tuple(py, Some(&c.response))?,
                    c.request.target.into_pyobject(py)?.into_any(),
                    raw_headers(&c.request.headers)
                        .into_pyobject(py)?
                        .into_any(),
                    address(py, remote)?,
                ],
            )?
        }
        Err(e) => error_tuple(py, e)?,
    };
    resolve(py, &fut, value.into_any().unbind())
}

fn address<'py>(py: Python<'py>, a: SocketAddr) -> PyResult<Bound<'py, PyAny>> {
    Ok((a.ip().to_string(), a.port()).into_pyobject(py)?.into_any())
}

/// `(status, reason, [(name, value), ...])`, or None.
fn response_tuple<'py>(py: Python<'py>, r: Option<&Response>) -> PyResult<Bound<'py, PyAny>> {
    match r {
        None => Ok(py.None().into_bound(py)),
        Some(r) => Ok((r.status, r.reason.clone(), r.headers.clone())
            .into_pyobject(py)?
            .into_any()),
    }
}

/// `(kind, message, response_tuple_or_None, body, errno)` for client.py to raise.
fn error_tuple<'py>(py: Python<'py>, e: ConnectError) -> PyResult<Bound<'py, PyTuple>> {
    let (kind, message, response, body, errno) = match e {
        ConnectError::Refused { response, body } => {
            let message = format!(
                "server rejected WebSocket connection: HTTP {} {}",
                response.status, response.reason
            );
            ("refused", message, Some(response), body, None)
        }
        ConnectError::Invalid { message, response } => {
            ("invalid", message, response, Vec::new(), None)
        }
        ConnectError::Resolve(m) => ("gaierror", m, None, Vec::new(), None),
        ConnectError::Io { errno, message } => ("oserror", message, None, Vec::new(), errno),
        ConnectError::Certificate(m) => ("certificate", m, None, Vec::new(), None),
        ConnectError::Tls(m) => ("tls", m, None, Vec::new(), None),
        ConnectError::Timeout(m) => ("timeout", m, None, Vec::new(), None),
    };
    PyTuple::new(
        py,
        [
            kind.into_pyobject(py)?.into_any(),
            message.into_pyobject(py)?.into_any(),
            response_tuple(py, response.as_ref())?,
            PyBytes::new(py, &body).into_any(),
            errno.into_pyobject(py)?.into_any(),
        ],
    )
}

/// After a connection closed or an opening ended: tell client.py if nothing is left.
pub(super) fn notify_if_idle(py: Python<'_>, core: &Core) {
    let Some(state) = core.client.as_ref() else {
        return;
    };
    let idle = core.conns.lock().is_empty() && state.pending.lock().is_empty();
    if idle {
        if let Err(e) = state.on_idle.call0(py) {
            e.write_unraisable(py, None);
        }
    }
}

/// A frame fanned out by `broadcast()` to a client connection: the same frame, masked
/// with a key of its own (frames from a client must be masked, RFC 6455 5.3).
pub(super) fn masked_copy(encoded: &[u8]) -> bytes::Bytes {
    let len7 = usize::from(encoded.get(1).copied().unwrap_or(0) & 0x7f);
    let header = match len7 {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let key = crate::mask::random_mask();
    let mut out = Vec::with_capacity(encoded.len() + 4);
    out.extend_from_slice(&encoded[..header]);
    out[1] |= 0x80;
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(&encoded[header..]);
    frame::apply_mask(&mut out[start..], key, 0);
    bytes::Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Decoder, Event, OpCode};

    #[test]
    fn a_shared_frame_masked_for_a_client_decodes_to_the_same_message() {
        for size in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let mut encoded = Vec::new();
            frame::encode_frame(&mut encoded, true, OpCode::Binary, &payload, None);
            let mut masked = masked_copy(&encoded).to_vec();
            assert_eq!(masked.len(), encoded.len() + 4);
            // A server decoder requires the mask.
            let mut d = Decoder::new(Role::Server, None);
            let (used, ev) = d.decode(&mut masked).unwrap();
            assert_eq!(used, encoded.len() + 4);
            match ev {
                Some(Event::Data { payload: p, .. }) => assert_eq!(p, &payload[..]),
                other => panic!("{size}: {other:?}"),
            }
        }
    }
}
