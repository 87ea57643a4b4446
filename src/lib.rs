//! lightws: a WebSocket server for Python asyncio whose I/O path runs in Rust.
//!
//! Module map (docs/architecture.md): `frame` and `handshake` are pure codecs, `security`
//! the pure admission rules (origins, proxies, per-address counts), all three in the
//! `lightws-proto` crate (crates/lightws-proto); `session` holds one connection's
//! protocol rules (sans I/O) and `conn` drives it on tokio; `shared` is what a
//! connection's task and its Python object share; `server` owns the listener and TLS;
//! `hub` carries events from tokio to the asyncio loop; `relay` is the Redis
//! backplane of `fanout` (Config.pubsub); `bridge` is the Python-facing
//! side; `bench` (only with the `loadgen` feature) exposes the load generator of
//! crates/lightws-loadgen. This file only registers the Python classes.

// The pure modules moved to crates/lightws-proto (so fuzz/ and the codec benchmarks
// build without tokio and pyo3). Re-exported under their old names so that
// `crate::frame::...`, `crate::handshake::...` and `crate::security::...` keep
// working in this crate, including code written before the move.
pub use lightws_proto::{deflate, frame, handshake, mask, outq, security, session};

mod alloc;
#[cfg(feature = "loadgen")]
pub mod bench;
pub mod bridge;
pub mod client;
pub mod conn;
pub mod fanout;
pub mod hoptrace;
pub mod hub;
pub mod lockcheck;
#[cfg(test)]
mod memtest;
pub mod onloop;
pub mod relay;
pub mod server;
pub mod shared;
pub mod stats;
pub mod tls;

use pyo3::prelude::*;

// NOTE: the system allocator, except for small cache-line aligned blocks (a tokio task,
// an I/O registration), which come from slabs: about 340 bytes less per idle
// connection (alloc.rs). Tests count allocations through it (memtest.rs).
#[cfg(not(test))]
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;

#[pymodule(gil_used = true)]
fn _lightws(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<bridge::Core>()?;
    m.add_class::<bridge::Connection>()?;
    m.add_class::<bridge::Message>()?;
    m.add_class::<bridge::Op>()?;
    m.add_function(wrap_pyfunction!(bridge::broadcast, m)?)?;
    // The client role (python/lightws/client.py, bridge/client.rs).
    m.add_function(wrap_pyfunction!(bridge::client_core, m)?)?;
    m.add_function(wrap_pyfunction!(bridge::client_connect, m)?)?;
    m.add_function(wrap_pyfunction!(bridge::client_cancel, m)?)?;
    m.add_function(wrap_pyfunction!(bridge::client_abandon, m)?)?;
    // The load generator is test tooling: registered only in builds with the
    // `loadgen` feature (`python -m lightws bench` explains how to get it).
    #[cfg(feature = "loadgen")]
    m.add_function(wrap_pyfunction!(bench::run_bench, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
