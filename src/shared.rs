//! What a connection's tokio task and its Python object share, and the events the
//! tokio side hands to the loop thread.
//!
//! The data here refers to itself (a connection holds the hub its events go to; an
//! event can carry the connection), so it lives in one module: `hub.rs` is only the
//! queue and its wake-up, `conn.rs` only the driver, and no module imports one that
//! imports it back.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::oneshot;

use crate::deflate::{DeflateConfig, DeflateParams};
use crate::frame::{OpCode, Role};
use crate::handshake;
use crate::hub::Hub;
use crate::lockcheck::ConnMutex;
use crate::outq::OutQueue;
use crate::session::{CloseInfo, LogLevel, Part, SessionConfig, ABNORMAL_CLOSURE};
use crate::stats::Stats;

/// The hub of one server: tokio tasks push [`Event`]s, the loop thread drains them.
pub type EventHub = Hub<Event>;

/// Settings a connection needs after the upgrade (a slice of the server Config).
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// The protocol settings (shared by every connection's session).
    pub session: Arc<SessionConfig>,
    pub ws_read_buffer: usize,
    pub ws_write_buffer: usize,
    pub write_limit: usize,
    /// Reading pauses while this many bytes of complete messages wait for `recv()`.
    pub inbox_limit: usize,
    pub log_level: LogLevel,
    /// Maintain the connections_reading / connections_writing gauges.
    pub io_statistics: bool,
    /// `Config.compression`: permessage-deflate offered to clients (None: off).
    pub deflate: Option<DeflateConfig>,
}

impl ConnConfig {
    /// The masking key for the next frame this end encodes: none for the server, a
    /// fresh unpredictable one in the client role (RFC 6455 5.3, 10.3).
    #[inline]
    pub fn mask(&self) -> Option<[u8; 4]> {
        match self.session.role {
            Role::Server => None,
            Role::Client => Some(crate::mask::random_mask()),
        }
    }
}

/// A complete message (or, for a streamed message, one chunk of it) waiting for Python.
pub struct InMsg {
    pub opcode: OpCode,
    /// The payload is `data[start..]`: a large message read whole is handed over in its
    /// read buffer, frame header in front (`Io::deliver_at`), not copied.
    pub data: Vec<u8>,
    pub start: usize,
    /// Whole message, or a chunk of a message streamed to `conn.reader()`.
    pub part: Part,
}

impl InMsg {
    pub fn payload(&self) -> &[u8] {
        &self.data[self.start..]
    }
}

#[derive(Default)]
pub struct Inbox {
    pub queue: VecDeque<InMsg>,
    pub bytes: usize,
    /// A Python `recv()` is pending: the next message must push `Event::Readable`.
    pub waiting: bool,
    /// No more messages will arrive (boxed: 8 bytes while open instead of 32).
    pub closed: Option<Box<CloseInfo>>,
    /// The task stopped reading because `bytes` reached `inbox_limit`.
    pub paused: bool,
    /// A data message has started arriving but is not complete yet.
    pub assembling: bool,
    /// Incoming data messages are dropped (a `lightws.Accept` connection without a
    /// listener: nobody would read them).
    pub discard: bool,
}

#[derive(Default)]
pub struct Outbox {
    /// Whole encoded frames in send order: the connection's own (appended) and frames
    /// shared with other connections (by reference). Taken by the task in one move.
    pub queue: OutQueue,
    /// Shared frames that arrived while a fragmented message was going out: they go in
    /// right after its final frame (RFC 6455 5.4: no data frame between fragments).
    /// (Boxed on first use: an idle connection pays one pointer for it.)
    pub held: Option<Box<OutQueue>>,
    /// A fragmented message is going out: its first frame is queued, its final one not.
    pub fragmenting: bool,
    /// A `send()` is waiting for `queue` to be taken (it was over `write_limit`).
    pub drain_waiting: bool,
    /// A close frame is queued (by Python or the task): no more data frames.
    pub closing: bool,
    /// The task has ended: nothing will be written any more.
    pub closed: bool,
    /// `abort()`: drop the socket now.
    pub abort: bool,
    /// A fanned-out frame would have taken the connection over `max_backpressure` with
    /// `on_backpressure="close"`: the task drops what is queued and closes with 1013.
    pub overflow: bool,
    /// The topics this connection is subscribed to (fanout.rs). Here rather than with
    /// the Python object: a listener or `Accept` connection keeps its subscriptions
    /// while it has no Python object.
    pub topics: Vec<Arc<Topic>>,
    /// The driver has output it has not finished writing (set under this lock by the
    /// driver before it writes, cleared once it has written everything): the loop
    /// thread must queue its frames, not write them (bridge/send.rs, "inline").
    pub driver_output: bool,
    /// The socket, while the loop thread may write a frame straight to it under this
    /// lock: plain TCP, from the driver's start until its end (cleared before the
    /// socket is closed). None for TLS.
    pub inline_fd: Option<RawFd>,
    /// The unwritten end of a frame the loop thread began writing inline (the kernel
    /// took only part of it). Not in `queue`: the driver writes it before anything of
    /// its own (a pong, its close frame), and nothing may drop it (an overflow, the
    /// session sealing the queue), or another frame would land in the middle of it.
    pub inline_tail: Option<Box<Vec<u8>>>,
}

impl Outbox {
    /// Bytes held behind a fragmented message.
    pub fn held_len(&self) -> usize {
        self.held.as_ref().map_or(0, |h| h.len())
    }

    /// Follow the fragmentation state from the first byte of a data frame queued for
    /// this connection; when a fragmented message ends, the frames held meanwhile go
    /// right after it.
    pub fn note_frame(&mut self, b0: u8) {
        let opcode = b0 & 0x0f;
        let fin = b0 & 0x80 != 0;
        if (opcode == OpCode::Text.as_u8() || opcode == OpCode::Binary.as_u8()) && !fin {
            self.fragmenting = true;
        } else if opcode == OpCode::Continuation.as_u8() && fin && self.fragmenting {
            self.fragmenting = false;
            if let Some(mut held) = self.held.take() {
                self.queue.append(&mut held);
            }
        }
    }
}

/// One topic: its name and its subscribers (fanout.rs keeps the registry).
pub struct Topic {
    pub name: Arc<str>,
    pub(crate) subs: parking_lot::Mutex<indexmap::IndexMap<u64, Arc<ConnShared>>>,
    /// Subscribers, readable without the lock (publish counts with it).
    pub(crate) count: AtomicUsize,
    /// Publishes queued for the fan-out task and not yet fanned out.
    pub(crate) in_flight: AtomicUsize,
}

impl Topic {
    /// A publish to this topic is still on its way to the subscribers.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    pub fn subscribers(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// What a fan-out queues on one connection.
pub enum SharedItem {
    /// An encoded frame, shared by reference.
    Frame(Bytes),
    /// A data message to compress on the connection's thread (its payload shared).
    Compress(OpCode, Bytes),
}

impl SharedItem {
    /// Bytes it counts for back-pressure (a message to compress: its raw size).
    pub fn len(&self) -> usize {
        match self {
            SharedItem::Frame(b) | SharedItem::Compress(_, b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The close code and reason of a connection closed for going over `max_backpressure`
/// (`on_backpressure="close"`): 1013 Try Again Later.
pub const TRY_AGAIN_LATER: u16 = 1013;
pub const OVERFLOW_REASON: &str = "too slow: over max_backpressure";

/// The slow-consumer policy for frames fanned out to many connections (`publish`,
/// `broadcast`): `Config.max_backpressure` and `Config.on_backpressure`.
#[derive(Debug, Clone, Copy)]
pub struct Backpressure {
    /// Bytes a connection may have queued, unwritten, before a fanned-out frame
    /// triggers the policy.
    pub max: usize,
    /// Close with 1013 (true) or drop the frame for that connection (false).
    pub close: bool,
}

/// What became of a frame fanned out to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fanned {
    Queued,
    /// Queued into an empty queue: the connection's task must be woken.
    QueuedWake,
    /// Over `max_backpressure` with `on_backpressure="drop"`.
    Dropped,
    /// Over `max_backpressure` with `on_backpressure="close"`: closing with 1013.
    Overflowed,
    /// The connection is closing or closed.
    Skipped,
}

/// State shared between a connection's tokio task and its Python object.
pub struct ConnShared {
    pub id: u64,
    /// `conn.reader()` asked for the next message to be streamed (set under the inbox
    /// lock, read by the task before each new message's first frame header).
    pub stream_next: AtomicBool,
    pub remote: SocketAddr,
    pub inbox: ConnMutex<Inbox>,
    pub outbox: ConnMutex<Outbox>,
    pub waker: AtomicWaker,
    pub hub: Arc<EventHub>,
    pub stats: Arc<Stats>,
    pub cfg: Arc<ConnConfig>,
    /// Bytes queued for this connection and not yet written to the socket (the outbox,
    /// held frames, and the task's unwritten output): `conn.buffered_amount`, and what
    /// `max_backpressure` is checked against.
    pub unsent: AtomicUsize,
    /// Frames of this connection routed through the fan-out task to keep their order
    /// behind a publish still being fanned out (see bridge/send.rs); while any is in
    /// flight, later frames take the same route.
    pub fenced: AtomicU32,
    /// The permessage-deflate parameters this connection agreed in its handshake.
    pub deflate: Option<DeflateParams>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl ConnShared {
    pub fn new(
        remote: SocketAddr,
        hub: Arc<EventHub>,
        stats: Arc<Stats>,
        cfg: Arc<ConnConfig>,
    ) -> Arc<Self> {
        Self::with_deflate(remote, hub, stats, cfg, None)
    }

    /// A connection that negotiated permessage-deflate with `deflate` (server.rs).
    pub fn with_deflate(
        remote: SocketAddr,
        hub: Arc<EventHub>,
        stats: Arc<Stats>,
        cfg: Arc<ConnConfig>,
        deflate: Option<DeflateParams>,
    ) -> Arc<Self> {
        Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream_next: AtomicBool::new(false),
            remote,
            inbox: ConnMutex::new(Inbox::default()),
            outbox: ConnMutex::new(Outbox::default()),
            waker: AtomicWaker::new(),
            hub,
            stats,
            cfg,
            unsent: AtomicUsize::new(0),
            fenced: AtomicU32::new(0),
            deflate,
        })
    }

    /// Queue a frame shared with other connections (a publish or a broadcast), applying
    /// the slow-consumer policy if given. Never waits.
    pub fn push_shared(&self, frame: Bytes, policy: Option<Backpressure>) -> Fanned {
        self.push_shared_item(SharedItem::Frame(frame), policy)
    }

    /// [`ConnShared::push_shared`] for either kind of shared item: an encoded frame, or
    /// a message whose payload is shared and that this connection's session compresses
    /// (permessage-deflate with context takeover: its own window).
    pub fn push_shared_item(&self, item: SharedItem, policy: Option<Backpressure>) -> Fanned {
        let r = self.push_shared_deferred(item, policy);
        if r == Fanned::QueuedWake {
            self.waker.wake();
            return Fanned::Queued;
        }
        r
    }

    /// Like [`ConnShared::push_shared_item`], but a connection whose task must be woken
    /// is returned as [`Fanned::QueuedWake`] for the caller to wake later: the fan-out
    /// task queues a whole batch of publishes before waking anyone, so each
    /// connection writes them in one writev instead of one frame per wake-up.
    pub fn push_shared_deferred(&self, item: SharedItem, policy: Option<Backpressure>) -> Fanned {
        let len = item.len();
        let mut ob = self.outbox.lock();
        if ob.closed || ob.closing || ob.overflow {
            return Fanned::Skipped;
        }
        if let Some(p) = policy {
            if self.unsent.load(Ordering::Relaxed) + len > p.max {
                if !p.close {
                    return Fanned::Dropped;
                }
                ob.overflow = true;
                drop(ob);
                self.waker.wake();
                return Fanned::Overflowed;
            }
        }
        let wake = ob.queue.is_empty() && !ob.fragmenting;
        let q: &mut OutQueue = if ob.fragmenting {
            ob.held.get_or_insert_with(Default::default)
        } else {
            &mut ob.queue
        };
        match item {
            SharedItem::Frame(frame) => q.push_chunk(frame),
            SharedItem::Compress(op, data) => q.push_compress(op, data),
        }
        self.unsent.fetch_add(len, Ordering::Relaxed);
        if wake {
            Fanned::QueuedWake
        } else {
            Fanned::Queued
        }
    }

    /// Queue a frame of this connection's own that took the fan-out route (fenced; its
    /// bytes are already counted in `unsent`, see `Fanout::send_own`). `drain`: the
    /// sender waits for a Drained event (a fragment of a large send, a send over
    /// `write_limit`), which must not come before the frame is in the queue: it is
    /// asked for here, not when the frame set off.
    pub fn push_own(&self, frame: Bytes, drain: bool) {
        let len = frame.len();
        let b0 = frame.first().copied().unwrap_or(0);
        let mut ob = self.outbox.lock();
        if ob.closed || ob.closing {
            // Nothing goes after our close frame (RFC 6455 5.5.1). A sender waiting
            // for a Drained event is answered by the Closed one.
            self.unsent.fetch_sub(len, Ordering::Relaxed);
            return;
        }
        let wake = ob.queue.is_empty();
        ob.queue.push_chunk(frame);
        if b0 & 0x0f == OpCode::Close.as_u8() {
            ob.closing = true;
        }
        ob.note_frame(b0);
        if drain {
            ob.drain_waiting = true;
        }
        drop(ob);
        if wake {
            self.waker.wake();
        }
    }

    /// Send a log line to the loop thread if `level` is enabled. Formatting happens only
    /// then, so a disabled level costs one comparison.
    pub fn log(&self, level: LogLevel, msg: impl FnOnce() -> String) {
        if level <= self.cfg.log_level {
            self.hub.push(Event::Log(Box::new(LogEvent {
                level,
                conn: Some((self.id, self.remote)),
                msg: msg(),
            })));
        }
    }

    /// From now on drop incoming data messages as they complete, and those already
    /// queued (a connection nobody reads: `Accept` without a listener, a listener
    /// without `on_message` or one that failed).
    pub fn discard_incoming(&self) {
        let dropped = {
            let mut inbox = self.inbox.lock();
            inbox.discard = true;
            inbox.bytes = 0;
            let q = std::mem::take(&mut inbox.queue);
            self.resume_if_paused(&mut inbox);
            q
        };
        drop(dropped);
    }

    /// Called by the loop thread after it took messages out of the inbox.
    pub fn resume_if_paused(&self, inbox: &mut Inbox) {
        if inbox.paused && inbox.bytes < self.cfg.inbox_limit / 2 {
            inbox.paused = false;
            self.waker.wake();
        }
    }
}

/// Reports the end of the connection to Python however the task ends: normally, by a
/// panic, or by being dropped when the runtime shuts down.
pub struct ClosedGuard {
    pub shared: Arc<ConnShared>,
    pub info: Option<CloseInfo>,
}

impl ClosedGuard {
    /// Report the connection closed with `info` (on drop, right here).
    pub fn finish(mut self, info: CloseInfo) {
        self.info = Some(info);
    }

    /// Give up the duty to report, for an owner that reports itself (server.rs
    /// `ConnTask`).
    pub fn disarm(self) {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: each field is moved out exactly once, and `this` is never dropped nor
        // used again, so neither is dropped twice.
        drop(unsafe { (std::ptr::read(&this.shared), std::ptr::read(&this.info)) });
    }
}

impl Drop for ClosedGuard {
    fn drop(&mut self) {
        let info = self.info.take().unwrap_or(CloseInfo {
            code: ABNORMAL_CLOSURE,
            reason: String::new(),
        });
        {
            let mut inbox = self.shared.inbox.lock();
            if inbox.closed.is_none() {
                inbox.closed = Some(Box::new(info));
            }
            inbox.waiting = false;
        }
        {
            let mut outbox = self.shared.outbox.lock();
            outbox.closed = true;
            outbox.queue.clear();
            outbox.held = None;
            outbox.inline_tail = None;
        }
        self.shared.hub.push(Event::Closed(self.shared.id));
    }
}

/// What the loop thread answers to a handshake (or to a plain HTTP request).
#[derive(Debug)]
pub enum Reply {
    /// 101: upgrade and start framing.
    Accept {
        headers: Vec<(String, String)>,
        subprotocol: Option<String>,
    },
    /// Any other status: write the response and close.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

/// A request that waits for the Python handshake callable.
pub struct HandshakeEvent {
    pub conn: Arc<ConnShared>,
    pub request: handshake::Request,
    /// false for a plain HTTP request shown to the callback (`http_fallback`).
    pub upgrade: bool,
    pub subprotocols: Vec<String>,
    pub reply: oneshot::Sender<Reply>,
}

/// A log line produced on a tokio thread, formatted there, emitted by the loop thread.
pub struct LogEvent {
    pub level: LogLevel,
    pub conn: Option<(u64, SocketAddr)>,
    pub msg: String,
}

pub enum Event {
    Handshake(Box<HandshakeEvent>),
    /// Messages (or the close) arrived for a connection whose `recv()` is pending.
    Readable(u64),
    /// The outbound queue of a connection fell below `write_limit`.
    Drained(u64),
    /// The connection's task ended; the socket is closed.
    Closed(u64),
    Log(Box<LogEvent>),
    /// A client connection opened, or could not be (client.rs, `lightws.connect`).
    Connected(Box<ConnectEvent>),
}

// -- the client role (client.rs, bridge/client.rs) -------------------------------------
// Here rather than in client.rs because `Event` carries them and client.rs uses
// `ConnShared`: no module cycle.

/// The outcome of one `lightws.connect` attempt, for the loop thread.
pub struct ConnectEvent {
    /// Which pending connect this answers.
    pub token: u64,
    pub result: Result<Connected, ConnectError>,
}

/// A client connection past its opening handshake; its driver is running.
pub struct Connected {
    pub shared: Arc<ConnShared>,
    /// The subprotocol the server chose (one we offered).
    pub subprotocol: Option<String>,
    /// The server's 101: status, reason phrase, headers.
    pub response: handshake::client::Response,
    /// The request we sent (for `conn.request`).
    pub request: handshake::Request,
}

/// Why a `lightws.connect` attempt failed; bridge/client.rs turns it into the Python
/// exception.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered something other than 101 (`InvalidHandshake` with status).
    Refused {
        response: handshake::client::Response,
        body: Vec<u8>,
    },
    /// The answer breaks RFC 6455 4.1, or is not HTTP at all (`InvalidHandshake`).
    Invalid {
        message: String,
        response: Option<handshake::client::Response>,
    },
    /// The host name could not be resolved (`socket.gaierror`).
    Resolve(String),
    /// TCP or the socket failed (`OSError`, by errno: `ConnectionRefusedError`, ...).
    Io { errno: Option<i32>, message: String },
    /// The server's certificate was not accepted (`ssl.SSLCertVerificationError`).
    Certificate(String),
    /// Any other TLS failure (`ssl.SSLError`).
    Tls(String),
    /// `open_timeout` passed (`TimeoutError`).
    Timeout(String),
}
