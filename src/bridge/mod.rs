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
//!   suspending (no future, no loop round-trip). Otherwise it waits on a
//!   `Waiter` (waiter.rs, the asyncio future protocol in Rust) that `drain` completes,
//!   resuming the task directly when `drain` runs as the loop's reader callback. A cancelled receive gives back a message
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
//!
//! Module map: `core` (the server's native half; with `client`, also the client
//! role's: one client core per event loop for `lightws.connect`), `connection` (receive, close,
//! properties) and `send` (the send scheduler), `op` (the awaitable), `waiter` (the
//! receive's native future), `message`,
//! `config` (Config -> ServerConfig), `api` (Python objects looked up once) and
//! `errors` (the one place errors become Python exceptions).

mod api;
mod client;
mod config;
mod connection;
mod core;
mod errors;
mod listener;
mod message;
mod op;
mod send;
mod waiter;

pub use self::client::{client_abandon, client_cancel, client_connect, client_core};
pub use self::connection::Connection;
pub use self::core::{broadcast, Core};
pub use self::message::Message;
pub use self::op::Op;
