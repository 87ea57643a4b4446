//! lightws: a WebSocket server for Python asyncio whose I/O path runs in Rust.
//!
//! Module map (DESIGN.md §2): `frame` and `handshake` are pure codecs, `security` the
//! pure admission rules (origins, proxies, per-address counts); `conn` drives one
//! connection on tokio; `server` owns the listener and TLS; `hub` carries events from
//! tokio to the asyncio loop; `bridge` is the Python-facing side. This file only
//! registers the Python classes.

pub mod bridge;
pub mod conn;
pub mod frame;
pub mod handshake;
pub mod hub;
pub mod loadgen;
pub mod lockcheck;
pub mod security;
pub mod server;
pub mod stats;
pub mod tls;

use pyo3::prelude::*;

#[pymodule(gil_used = true)]
fn _lightws(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<bridge::Core>()?;
    m.add_class::<bridge::Connection>()?;
    m.add_class::<bridge::Message>()?;
    m.add_class::<bridge::Op>()?;
    m.add_function(wrap_pyfunction!(loadgen::run_bench, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
