//! `lightws.Config` -> [`ServerConfig`]: every field checked, with errors that name
//! the field and say what is expected.

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::deflate::DeflateConfig;
use crate::frame::Role;
use crate::security::{IpNet, OriginPolicy};
use crate::server::{self, ServerConfig};
use crate::session::{LogLevel, SessionConfig};
use crate::shared::{Backpressure, ConnConfig};

pub(super) fn get<'py, T: FromPyObjectOwned<'py>>(
    cfg: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<T> {
    cfg.getattr(name)?.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        PyTypeError::new_err(format!("Config.{name}: {e}"))
    })
}

pub(super) fn seconds(
    cfg: &Bound<'_, PyAny>,
    name: &str,
    allow_zero: bool,
) -> PyResult<Option<Duration>> {
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

pub(super) fn size(cfg: &Bound<'_, PyAny>, name: &str, min: i64) -> PyResult<usize> {
    let v: i64 = get(cfg, name)?;
    if v < min {
        return Err(PyValueError::new_err(format!(
            "Config.{name} must be at least {min}, got {v}"
        )));
    }
    Ok(v as usize)
}

pub(super) fn opt_size(cfg: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<usize>> {
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
pub(super) fn list<'py, T: FromPyObjectOwned<'py>>(
    cfg: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<T> {
    if cfg.getattr(name)?.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "Config.{name} must be a list of strings, not a str (write [\"...\"])"
        )));
    }
    get(cfg, name)
}

/// `Config.origins` and `Config.trusted_proxies`, validated (security.rs parses them).
/// `max_backpressure` and `on_backpressure`.
fn backpressure(cfg: &Bound<'_, PyAny>) -> PyResult<Backpressure> {
    let max = size(cfg, "max_backpressure", 1)?;
    let policy: String = get(cfg, "on_backpressure")?;
    let close = match policy.as_str() {
        "close" => true,
        "drop" => false,
        other => {
            return Err(PyValueError::new_err(format!(
                "Config.on_backpressure must be \"close\" or \"drop\", got {other:?}"
            )))
        }
    };
    Ok(Backpressure { max, close })
}

/// `Config.compression`: None, or a `lightws.Deflate` (read by attribute).
fn compression(cfg: &Bound<'_, PyAny>) -> PyResult<Option<DeflateConfig>> {
    let c = cfg.getattr("compression")?;
    if c.is_none() {
        return Ok(None);
    }
    let field = |name: &str| -> PyResult<i64> {
        c.getattr(name)
            .and_then(|v| v.extract::<i64>())
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "Config.compression must be lightws.Deflate(...) or None; its {name} must be an int"
                ))
            })
    };
    let flag = |name: &str| -> PyResult<bool> {
        c.getattr(name)
            .and_then(|v| v.extract::<bool>())
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "Config.compression must be lightws.Deflate(...) or None; its {name} must be a bool"
                ))
            })
    };
    let bits = |name: &str| -> PyResult<u8> {
        let v = field(name)?;
        if !(8..=15).contains(&v) {
            return Err(PyValueError::new_err(format!(
                "Config.compression.{name} must be between 8 and 15, got {v}"
            )));
        }
        Ok(v as u8)
    };
    let level = field("level")?;
    if !(0..=9).contains(&level) {
        return Err(PyValueError::new_err(format!(
            "Config.compression.level must be between 0 and 9, got {level}"
        )));
    }
    let min_size = field("min_size")?;
    if min_size < 0 {
        return Err(PyValueError::new_err(format!(
            "Config.compression.min_size must be at least 0, got {min_size}"
        )));
    }
    Ok(Some(DeflateConfig {
        server_max_window_bits: bits("server_max_window_bits")?,
        client_max_window_bits: bits("client_max_window_bits")?,
        server_no_context_takeover: flag("server_no_context_takeover")?,
        client_no_context_takeover: flag("client_no_context_takeover")?,
        level: level as u8,
        min_size: min_size as usize,
    }))
}

pub(super) fn admission(cfg: &Bound<'_, PyAny>) -> PyResult<(Option<OriginPolicy>, Vec<IpNet>)> {
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

pub(super) fn build_config(cfg: &Bound<'_, PyAny>) -> PyResult<ServerConfig> {
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
    // 0: connections on the event-loop thread (onloop.rs).
    let threads = size(cfg, "threads", 0)?;
    if threads > 256 {
        return Err(PyValueError::new_err("Config.threads must be 0-256"));
    }
    let cert: Option<String> = get(cfg, "cert_file")?;
    let key: Option<String> = get(cfg, "key_file")?;
    if cert.is_some() != key.is_some() {
        return Err(PyValueError::new_err(
            "Config.cert_file and Config.key_file must be set together (both PEM paths) for TLS",
        ));
    }
    let conn = ConnConfig {
        session: Arc::new(SessionConfig {
            role: Role::Server,
            max_msg_len: max_msg_len as u64,
            close_timeout,
            auto_pong: get(cfg, "auto_pong")?,
            ping_interval: seconds(cfg, "ping_interval", false)?,
            ping_timeout: seconds(cfg, "ping_timeout", false)?,
            idle_timeout: seconds(cfg, "idle_timeout", false)?,
            // A peer that does not read what we write (pongs to a ping flood, echoes)
            // gets no more of its input read: our unwritten output stays bounded.
            max_backlog: 2 * write_limit + 64 * 1024,
        }),
        ws_read_buffer: size(cfg, "ws_read_buffer", 16)?,
        ws_write_buffer: size(cfg, "ws_write_buffer", 16)?,
        write_limit,
        inbox_limit: max_msg_len.clamp(64 * 1024, 4 * 1024 * 1024).max(64 * 1024),
        log_level: LogLevel::from_u8(log_level as u8).expect("checked above"),
        io_statistics: get(cfg, "io_statistics")?,
        deflate: compression(cfg)?,
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
        backpressure: backpressure(cfg)?,
        trusted_proxies,
        origins,
        backlog,
        threads,
        http_fallback: get(cfg, "http_fallback")?,
        io_statistics: get(cfg, "io_statistics")?,
        cert_file: cert,
        key_file: key,
        reuse_port: get(cfg, "reuse_port")?,
        pubsub: get(cfg, "pubsub")?,
    })
}

/// NOTE: glibc returns the top of the heap to the kernel whenever 128 KiB are free
/// there, and serves allocations over 128 KiB with fresh mmaps. Every large message
/// allocates and frees buffers of its size (read buffer, message, `bytes`, outbox), so
/// with the defaults each 64 KiB echo took ~12 page faults (measured: 291,771 minor
/// faults for 24k echoes, a third of the server's CPU). Raising both thresholds to
/// 32 MiB keeps that memory in the process for reuse. Process-wide and once; set
/// LIGHTWS_MALLOC_TUNING=0 to leave malloc alone.
pub(super) fn tune_malloc() {
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
