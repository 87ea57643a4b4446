//! lightws's pure protocol code: bytes and values in, bytes and decisions out.
//!
//! - [`frame`]: the RFC 6455 frame codec (incremental decoder, encoder, masking,
//!   UTF-8 validation).
//! - [`handshake`]: the HTTP/1.1 opening handshake, both sides: the server's request
//!   parsing and responses, the client's URL, request and response check (shared by
//!   `lightws.connect` and the load generator).
//! - [`mask`]: unpredictable masking keys and nonces for the client role.
//! - [`security`]: admission rules (allowed origins, trusted proxies, per-address
//!   connection counts).
//! - [`outq`]: the outbound queue of frames as chunks (own and shared), for writev.
//! - [`session`]: one connection's protocol state, sans I/O (close handshake,
//!   failing, ping/pong and keepalive, assembly, limits), for either role.
//!
//! Nothing here touches a socket, a runtime or Python: this crate depends on
//! neither tokio nor pyo3 (`.ci/run` checks with `cargo tree`), so the fuzz
//! targets (`fuzz/`) and the codec benchmarks build it alone. The extension
//! (`lightws`, the repository root) and the load generator (`lightws-loadgen`)
//! both use it.

pub mod frame;
pub mod handshake;
pub mod mask;
pub mod outq;
pub mod security;
pub mod session;
