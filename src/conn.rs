//! One WebSocket connection after the upgrade: read -> frames -> messages, and the
//! outbound queue -> socket, driven by a single tokio task (no split reader/writer
//! tasks: one task and its buffers are the whole per-connection cost on the Rust side).
//!
//! The Python side (bridge.rs) and this task share a [`ConnShared`]: an inbox of
//! complete messages and an outbox of encoded frames, each behind a short lock, plus an
//! `AtomicWaker` the loop thread uses to wake this task. Buffers start empty, grow to
//! need and are released whenever the connection goes idle.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::frame::{self, Decoder, Event, OpCode, Role};
use crate::hub::{self, Hub, LogEvent};
use crate::lockcheck::ConnMutex;
use crate::stats::Stats;

/// Log levels, as `lightws.LogLevel`.
pub const LOG_ERROR: u8 = 0;
pub const LOG_WARN: u8 = 1;
pub const LOG_INFO: u8 = 2;
pub const LOG_DEBUG: u8 = 3;

/// Close code reported when the connection ended without a close frame (RFC 6455 7.1.5).
pub const ABNORMAL_CLOSURE: u16 = 1006;
/// Close code reported when the peer's close frame carried no code (RFC 6455 7.1.5).
pub const NO_STATUS_RCVD: u16 = 1005;

/// Settings a connection needs after the upgrade (a slice of the server Config).
#[derive(Debug, Clone)]
pub struct ConnConfig {
    pub max_msg_len: u64,
    pub ws_read_buffer: usize,
    pub ws_write_buffer: usize,
    pub close_timeout: Duration,
    pub auto_pong: bool,
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub write_limit: usize,
    /// Reading pauses while this many bytes of complete messages wait for `recv()`.
    pub inbox_limit: usize,
    pub log_level: u8,
    /// Maintain the connections_reading / connections_writing gauges.
    pub io_statistics: bool,
}

/// A complete message (or, for a streamed message, one chunk of it) waiting for Python.
pub struct InMsg {
    pub opcode: OpCode,
    pub data: Vec<u8>,
    /// Whole message, or a chunk of a message streamed to `conn.reader()`.
    pub part: Part,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// A chunk of a streamed message; `fin` marks its last chunk.
    Chunk {
        fin: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub reason: String,
}

#[derive(Default)]
pub struct Inbox {
    pub queue: VecDeque<InMsg>,
    pub bytes: usize,
    /// A Python `recv()` is pending: the next message must push `Event::Readable`.
    pub waiting: bool,
    /// No more messages will arrive.
    pub closed: Option<CloseInfo>,
    /// The task stopped reading because `bytes` reached `inbox_limit`.
    pub paused: bool,
    /// A data message has started arriving but is not complete yet.
    pub assembling: bool,
}

#[derive(Default)]
pub struct Outbox {
    /// Whole encoded frames, in send order. Taken by the task in one swap.
    pub buf: Vec<u8>,
    /// A `send()` is waiting for `buf` to be taken (its length was over `write_limit`).
    pub drain_waiting: bool,
    /// A close frame is queued (by Python or the task): no more data frames.
    pub closing: bool,
    /// The task has ended: nothing will be written any more.
    pub closed: bool,
    /// `abort()`: drop the socket now.
    pub abort: bool,
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
    pub hub: Arc<Hub>,
    pub stats: Arc<Stats>,
    pub cfg: Arc<ConnConfig>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl ConnShared {
    pub fn new(
        remote: SocketAddr,
        hub: Arc<Hub>,
        stats: Arc<Stats>,
        cfg: Arc<ConnConfig>,
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
        })
    }

    /// Send a log line to the loop thread if `level` is enabled. Formatting happens only
    /// then, so a disabled level costs one comparison.
    pub fn log(&self, level: u8, msg: impl FnOnce() -> String) {
        if level <= self.cfg.log_level {
            self.hub.push(hub::Event::Log(Box::new(LogEvent {
                level,
                conn: Some((self.id, self.remote)),
                msg: msg(),
            })));
        }
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
                inbox.closed = Some(info);
            }
            inbox.waiting = false;
        }
        {
            let mut outbox = self.shared.outbox.lock();
            outbox.closed = true;
            outbox.buf = Vec::new();
        }
        self.shared.hub.push(hub::Event::Closed(self.shared.id));
    }
}

/// A byte stream lightws can serve WebSocket on: plain TCP or TLS.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves when input may be available, without needing a buffer, so that an idle
    /// connection holds no read buffer. The default says "maybe": the caller then
    /// allocates a buffer and polls a read.
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for TcpStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Our close frame is queued or sent; waiting for the peer's close or EOF.
    Closing,
    /// The peer's close is answered (or the connection failed): flush, shut down, done.
    Finishing,
}

/// Largest read we ask the kernel for when a big message is streaming in.
const MAX_READ: usize = 256 * 1024;

/// The per-connection state machine. Its `poll_run` is the only code that touches the
/// socket after the upgrade.
pub struct Driver<S> {
    io: S,
    shared: Arc<ConnShared>,
    decoder: Decoder,
    rbuf: Vec<u8>,
    read_size: usize,
    /// Fragment assembly; freed after each message.
    msg: Vec<u8>,
    msg_opcode: OpCode,
    wbuf: Vec<u8>,
    wpos: usize,
    need_flush: bool,
    state: State,
    close_sent: bool,
    close_rcvd: Option<CloseInfo>,
    /// Close code we sent when failing the connection (protocol error, timeout).
    fail_code: Option<CloseInfo>,
    /// After a protocol error the rest of the input is discarded undecoded.
    discard_input: bool,
    eof: bool,
    write_shut: bool,
    timer: Option<Pin<Box<Sleep>>>,
    timer_kind: TimerKind,
    /// Last frame received or sent (idle_timeout).
    last_activity: Instant,
    /// Last frame received (keepalive pings go out after ping_interval of silence).
    last_rx: Instant,
    /// When our unanswered keepalive ping went out.
    ping_sent: Option<Instant>,
    /// The message being received is streamed to `conn.reader()` chunk by chunk.
    streaming: bool,
    /// io_statistics gauges this connection currently contributes to.
    io_reading: bool,
    io_writing: bool,
    started: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    None,
    /// Waiting for the peer's close frame after ours.
    Close,
    /// Keepalive / idle bookkeeping while open.
    Keepalive,
}

/// How the connection ended, for the caller.
pub type Outcome = CloseInfo;

impl<S: Transport> Driver<S> {
    /// `leftover`: bytes that arrived after the HTTP request head (a first frame).
    pub fn new(io: S, shared: Arc<ConnShared>, leftover: Vec<u8>) -> Self {
        let cfg = shared.cfg.clone();
        let mut d = Self {
            io,
            decoder: Decoder::new(Role::Server, Some(cfg.max_msg_len)),
            rbuf: leftover,
            read_size: cfg.ws_read_buffer,
            msg: Vec::new(),
            msg_opcode: OpCode::Binary,
            wbuf: Vec::new(),
            wpos: 0,
            need_flush: false,
            state: State::Open,
            close_sent: false,
            close_rcvd: None,
            fail_code: None,
            discard_input: false,
            eof: false,
            write_shut: false,
            timer: None,
            timer_kind: TimerKind::None,
            last_activity: Instant::now(),
            last_rx: Instant::now(),
            ping_sent: None,
            streaming: false,
            io_reading: false,
            io_writing: false,
            started: false,
            shared,
        };
        if cfg.ping_interval.is_some() || cfg.idle_timeout.is_some() {
            d.arm_keepalive();
        }
        d
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        loop {
            // Register before looking at the outbox: a send() that lands after the look
            // wakes us again, so no wake-up is lost.
            self.shared.waker.register(cx.waker());
            let mut progress = false;

            match self.check_outbox() {
                Err(()) => return Poll::Ready(self.outcome_aborted()),
                Ok(took) => progress |= took,
            }

            // Write as much as the socket takes.
            while self.wpos < self.wbuf.len() {
                match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(self.outcome_io_error()),
                    Poll::Ready(Ok(n)) => {
                        self.wpos += n;
                        self.need_flush = true;
                        self.shared.stats.add_bytes_out(n as u64);
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(self.outcome_io_error()),
                    Poll::Pending => break,
                }
            }
            if self.wpos == self.wbuf.len() {
                if self.need_flush {
                    match Pin::new(&mut self.io).poll_flush(cx) {
                        Poll::Ready(Ok(())) => self.need_flush = false,
                        Poll::Ready(Err(_)) => return Poll::Ready(self.outcome_io_error()),
                        Poll::Pending => {}
                    }
                }
                if !self.wbuf.is_empty() {
                    // Idle on the write side: give the buffer back to the allocator.
                    self.wbuf = Vec::new();
                    self.wpos = 0;
                }
                if !self.need_flush && self.state != State::Open && self.close_sent {
                    if !self.write_shut {
                        match Pin::new(&mut self.io).poll_shutdown(cx) {
                            Poll::Ready(_) => self.write_shut = true,
                            Poll::Pending => {}
                        }
                    }
                    if self.write_shut && (self.state == State::Finishing || self.eof) {
                        return Poll::Ready(self.outcome());
                    }
                }
            }

            // Read, unless the inbox is full (back-pressure on the peer) or input ended.
            if !self.eof && !self.read_paused() {
                match self.poll_read(cx) {
                    Poll::Ready(Ok(0)) => {
                        self.eof = true;
                        progress = true;
                        if self.state == State::Open {
                            // EOF without a close frame: abnormal closure (RFC 6455 7.1.5).
                            return Poll::Ready(self.outcome());
                        }
                        if self.write_shut || !self.close_sent {
                            return Poll::Ready(self.outcome());
                        }
                    }
                    Poll::Ready(Ok(_)) => {
                        self.process_input();
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(self.outcome_io_error()),
                    Poll::Pending => {}
                }
            }

            if let Some(t) = self.timer.as_mut() {
                if t.as_mut().poll(cx).is_ready() {
                    match self.on_timer() {
                        Some(done) => return Poll::Ready(done),
                        None => progress = true,
                    }
                }
            }

            if !progress {
                if self.shared.cfg.io_statistics {
                    self.update_io_gauges();
                }
                return Poll::Pending;
            }
        }
    }

    /// The seed's IOStatistics: a connection is "writing" while it has output the
    /// socket has not taken, "reading" while it waits for input with nothing to write.
    fn update_io_gauges(&mut self) {
        let writing = self.wpos < self.wbuf.len();
        let reading = !writing && !self.eof;
        if writing != self.io_writing {
            self.shared.stats.writing(if writing { 1 } else { -1 });
            self.io_writing = writing;
        }
        if reading != self.io_reading {
            self.shared.stats.reading(if reading { 1 } else { -1 });
            self.io_reading = reading;
        }
    }

    fn read_paused(&self) -> bool {
        if self.state != State::Open {
            // Once closing we keep reading (and discarding) to see the peer's close.
            return false;
        }
        // A peer that does not read what we write (pongs to a ping flood, echoes) gets
        // no more of its input read until it does: our unwritten output stays bounded
        // (the outbox itself is bounded by write_limit on the Python side).
        let backlog = self.wbuf.len() - self.wpos;
        if backlog > 2 * self.shared.cfg.write_limit + 64 * 1024 {
            return true;
        }
        self.shared.inbox.lock().paused
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.is_empty() {
            match self.io.poll_readable(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 2 {
            self.rbuf.reserve(self.read_size);
        }
        let spare = self.rbuf.spare_capacity_mut();
        let want = spare.len();
        let mut rb = ReadBuf::uninit(spare);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: ReadBuf guarantees the first n bytes of the spare capacity are
                // initialised.
                unsafe { self.rbuf.set_len(self.rbuf.len() + n) };
                if n == want && self.read_size < MAX_READ {
                    self.read_size = (self.read_size * 2).min(MAX_READ);
                } else if n < want / 4 {
                    self.read_size = (self.read_size / 2).max(self.shared.cfg.ws_read_buffer);
                }
                self.shared.stats.add_bytes_in(n as u64);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.rbuf.is_empty() {
                    self.release_read_buffer();
                }
                Poll::Pending
            }
        }
    }

    fn release_read_buffer(&mut self) {
        // The buffer goes back to the allocator; the read size it had grown to is kept
        // (it shrinks on short reads), so a connection that streams large messages does
        // not restart at ws_read_buffer for each of them.
        self.rbuf = Vec::new();
    }

    /// Take everything Python queued once the previous batch is written. Err(()) means
    /// abort().
    fn check_outbox(&mut self) -> Result<bool, ()> {
        let mut ob = self.shared.outbox.lock();
        if ob.abort {
            return Err(());
        }
        if ob.closing && self.timer_kind != TimerKind::Close {
            // Bound the close even if our close frame is stuck behind unwritten data
            // (a peer that never reads).
            drop(ob);
            self.enter_closing();
            ob = self.shared.outbox.lock();
        }
        let mut took = false;
        if self.wpos == self.wbuf.len() && !self.write_shut && !ob.buf.is_empty() {
            if self.wbuf.is_empty() {
                std::mem::swap(&mut self.wbuf, &mut ob.buf);
            } else {
                self.wbuf.extend_from_slice(&ob.buf);
                ob.buf = Vec::new();
            }
            self.wpos = 0;
            took = true;
            if self.timer_kind == TimerKind::Keepalive {
                self.last_activity = Instant::now();
            }
            if ob.closing && !self.close_sent {
                // Python queued a close frame; it is the last frame of this batch.
                self.close_sent = true;
            }
        }
        if ob.drain_waiting {
            ob.drain_waiting = false;
            self.shared.hub.push(hub::Event::Drained(self.shared.id));
        }
        Ok(took)
    }

    fn enter_closing(&mut self) {
        if self.state == State::Open {
            self.state = State::Closing;
        }
        if self.timer_kind != TimerKind::Close {
            self.timer = Some(Box::pin(tokio::time::sleep(self.shared.cfg.close_timeout)));
            self.timer_kind = TimerKind::Close;
        }
    }

    /// Queue our close frame after anything Python already queued (RFC 6455 5.5.1: the
    /// close frame is the last frame we send).
    fn send_close(&mut self, code: Option<u16>, reason: &str) {
        if self.close_sent {
            return;
        }
        let mut ob = self.shared.outbox.lock();
        if ob.closing {
            // Python's close frame is already queued; it will be taken with the rest.
            drop(ob);
            let _ = self.check_outbox();
            return;
        }
        ob.closing = true;
        if !ob.buf.is_empty() {
            let pending = std::mem::take(&mut ob.buf);
            if self.wpos == self.wbuf.len() {
                self.wbuf = pending;
                self.wpos = 0;
            } else {
                self.wbuf.extend_from_slice(&pending);
            }
        }
        if ob.drain_waiting {
            ob.drain_waiting = false;
            self.shared.hub.push(hub::Event::Drained(self.shared.id));
        }
        drop(ob);
        let payload = frame::close_payload(code, reason);
        frame::encode_frame(&mut self.wbuf, true, OpCode::Close, &payload, None);
        self.shared.stats.frame_out(OpCode::Close);
        if self.shared.cfg.log_level >= LOG_DEBUG {
            self.shared.log(LOG_DEBUG, || {
                describe_frame("send", OpCode::Close, &payload)
            });
        }
        self.close_sent = true;
        self.enter_closing();
    }

    /// Fail the WebSocket connection (RFC 6455 7.1.7): send a close with `code`, stop
    /// decoding input, close after the peer's close or EOF (bounded by close_timeout).
    fn fail(&mut self, code: u16, reason: String) {
        self.shared
            .log(LOG_INFO, || format!("closing with {code}: {reason}"));
        self.discard_input = true;
        self.fail_code = Some(CloseInfo {
            code,
            reason: reason.clone(),
        });
        // The reason is for our log; keep the wire reason short and UTF-8 safe.
        let wire = truncate_utf8(&reason, 123);
        self.send_close(Some(code), wire);
        self.mark_inbox_closed(CloseInfo { code, reason });
        // Stay in Closing: after our close frame and FIN, input is read and discarded
        // until the peer's EOF (bounded by close_timeout), so that closing the socket
        // with unread input does not send an RST that could destroy our close frame.
    }

    fn mark_inbox_closed(&mut self, info: CloseInfo) {
        let mut inbox = self.shared.inbox.lock();
        if inbox.closed.is_none() {
            inbox.closed = Some(info);
            if inbox.waiting {
                inbox.waiting = false;
                self.shared.hub.push(hub::Event::Readable(self.shared.id));
            }
        }
    }

    fn process_input(&mut self) {
        if self.discard_input {
            self.rbuf.clear();
            return;
        }
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let mut pos = 0;
        let mut delivered = 0usize;
        loop {
            if !self.decoder.in_message() {
                // A streamed message is not bound by max_msg_len (DESIGN.md §1).
                let limit = if self.shared.stream_next.load(Ordering::Acquire) {
                    None
                } else {
                    Some(self.shared.cfg.max_msg_len)
                };
                if self.decoder.max_message_size() != limit {
                    self.decoder.set_max_message_size(limit);
                }
            }
            match self.decoder.decode(&mut rbuf[pos..]) {
                Err(e) => {
                    self.fail(e.close_code(), e.to_string());
                    rbuf.clear();
                    pos = 0;
                    break;
                }
                Ok((0, None)) => break,
                Ok((n, ev)) => {
                    pos += n;
                    if let Some(ev) = ev {
                        // The event borrows rbuf; copy what outlives this call.
                        delivered += self.on_event(ev);
                    }
                    if self.discard_input || self.close_rcvd.is_some() {
                        rbuf.clear();
                        pos = 0;
                        break;
                    }
                    if pos == rbuf.len() {
                        break;
                    }
                }
            }
        }
        if pos > 0 {
            rbuf.drain(..pos);
        }
        if rbuf.is_empty() && rbuf.capacity() > self.shared.cfg.ws_read_buffer {
            rbuf = Vec::new();
        }
        self.rbuf = rbuf;
        if self.timer_kind == TimerKind::Keepalive {
            let now = Instant::now();
            self.last_activity = now;
            self.last_rx = now;
        }
        let _ = delivered;
    }

    /// Handle one decoded event; returns 1 if it delivered a message to Python.
    fn on_event(&mut self, ev: Event<'_>) -> usize {
        match ev {
            Event::Data {
                opcode,
                payload,
                first,
                fin,
            } => {
                if first {
                    self.shared.stats.frame_in(opcode);
                } else if !payload.is_empty() || fin {
                    // continuation frames are counted at their first chunk only
                }
                if self.state != State::Open {
                    // After our close frame, data is read and dropped (RFC 6455 5.5.1).
                    return 0;
                }
                if first {
                    self.streaming = self.shared.stream_next.swap(false, Ordering::AcqRel);
                }
                if self.streaming {
                    if fin {
                        self.streaming = false;
                    }
                    if payload.is_empty() && !fin && !first {
                        return 0;
                    }
                    return self.push(opcode, payload.to_vec(), Part::Chunk { fin });
                }
                if first && fin {
                    return self.deliver(opcode, payload.to_vec());
                }
                if first {
                    self.msg_opcode = opcode;
                    self.msg = Vec::with_capacity(self.decoder.message_size() as usize);
                    self.shared.inbox.lock().assembling = true;
                } else if self.msg.capacity() - self.msg.len() < payload.len() {
                    // A later fragment: its declared length is known now (the decoder's
                    // count is already reset when this is the message's last chunk).
                    let declared = self.decoder.message_size() as usize;
                    let want = declared.saturating_sub(self.msg.len()).max(payload.len());
                    self.msg.reserve_exact(want);
                }
                self.msg.extend_from_slice(payload);
                if fin {
                    let data = std::mem::take(&mut self.msg);
                    return self.deliver(self.msg_opcode, data);
                }
                0
            }
            Event::Ping(payload) => {
                self.shared.stats.frame_in(OpCode::Ping);
                self.debug_frame("recv", OpCode::Ping, payload);
                if self.shared.cfg.auto_pong {
                    if !self.close_sent {
                        // RFC 6455 5.5.3: answer with a pong carrying the same payload.
                        frame::encode_frame(&mut self.wbuf, true, OpCode::Pong, payload, None);
                        self.shared.stats.frame_out(OpCode::Pong);
                    }
                    0
                } else if self.state == State::Open {
                    self.deliver(OpCode::Ping, payload.to_vec())
                } else {
                    0
                }
            }
            Event::Pong(payload) => {
                self.shared.stats.frame_in(OpCode::Pong);
                self.debug_frame("recv", OpCode::Pong, payload);
                self.ping_sent = None;
                if !self.shared.cfg.auto_pong && self.state == State::Open {
                    self.deliver(OpCode::Pong, payload.to_vec())
                } else {
                    0
                }
            }
            Event::Close { code, reason } => {
                self.shared.stats.frame_in(OpCode::Close);
                let info = CloseInfo {
                    code: code.unwrap_or(NO_STATUS_RCVD),
                    reason: reason.to_owned(),
                };
                if self.shared.cfg.log_level >= LOG_DEBUG {
                    let c = info.code;
                    self.shared.log(LOG_DEBUG, || {
                        format!("recv CLOSE code={c} reason={reason:?}")
                    });
                }
                self.close_rcvd = Some(info.clone());
                self.mark_inbox_closed(info);
                // RFC 6455 5.5.1: answer with a close echoing the status code.
                self.send_close(code, "");
                self.state = State::Finishing;
                0
            }
        }
    }

    fn debug_frame(&self, dir: &str, op: OpCode, payload: &[u8]) {
        if self.shared.cfg.log_level >= LOG_DEBUG {
            self.shared
                .log(LOG_DEBUG, || describe_frame(dir, op, payload));
        }
    }

    fn deliver(&mut self, opcode: OpCode, data: Vec<u8>) -> usize {
        self.push(opcode, data, Part::Whole)
    }

    fn push(&mut self, opcode: OpCode, data: Vec<u8>, part: Part) -> usize {
        self.debug_frame("recv", opcode, &data);
        let len = data.len();
        let mut inbox = self.shared.inbox.lock();
        inbox.assembling = false;
        inbox.queue.push_back(InMsg { opcode, data, part });
        inbox.bytes += len;
        if inbox.bytes >= self.shared.cfg.inbox_limit {
            inbox.paused = true;
        }
        if inbox.waiting {
            inbox.waiting = false;
            self.shared.hub.push(hub::Event::Readable(self.shared.id));
        }
        1
    }

    /// When the keepalive timer must next look at the connection, if ever.
    fn keepalive_deadline(&self) -> Option<Instant> {
        let cfg = &self.shared.cfg;
        let idle = cfg.idle_timeout.map(|d| self.last_activity + d);
        let ping = cfg.ping_interval.map(|interval| match self.ping_sent {
            Some(sent) => sent + cfg.ping_timeout.unwrap_or(interval),
            None => self.last_rx + interval,
        });
        match (idle, ping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// (Re)arm the keepalive timer at its exact next deadline. Activity does not touch
    /// the timer; when it fires early the deadline is recomputed, so a busy connection
    /// costs one timer reset per interval, not one per frame.
    fn arm_keepalive(&mut self) {
        let Some(when) = self.keepalive_deadline() else {
            return;
        };
        match self.timer.as_mut() {
            Some(t) => t.as_mut().reset(when),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(when))),
        }
        self.timer_kind = TimerKind::Keepalive;
    }

    /// A timer fired; Some(outcome) ends the connection.
    fn on_timer(&mut self) -> Option<Outcome> {
        match self.timer_kind {
            TimerKind::None => {
                self.timer = None;
                None
            }
            TimerKind::Close => {
                // The peer never answered our close frame within close_timeout.
                self.shared.log(LOG_INFO, || {
                    "close_timeout: peer did not answer our close".into()
                });
                Some(self.outcome())
            }
            TimerKind::Keepalive => {
                let now = Instant::now();
                let cfg = self.shared.cfg.clone();
                if let Some(limit) = cfg.idle_timeout {
                    if now >= self.last_activity + limit {
                        self.fail(1001, "idle timeout".into());
                        return None;
                    }
                }
                if let Some(interval) = cfg.ping_interval {
                    match self.ping_sent {
                        Some(sent) if now >= sent + cfg.ping_timeout.unwrap_or(interval) => {
                            // Like websockets: no pong in time means the peer is gone.
                            self.fail(1011, "keepalive ping timeout".into());
                            return None;
                        }
                        None if now >= self.last_rx + interval => {
                            frame::encode_frame(&mut self.wbuf, true, OpCode::Ping, b"", None);
                            self.shared.stats.frame_out(OpCode::Ping);
                            self.ping_sent = Some(now);
                        }
                        _ => {}
                    }
                }
                self.arm_keepalive();
                None
            }
        }
    }

    fn outcome(&mut self) -> Outcome {
        if let Some(c) = self.close_rcvd.clone() {
            return c;
        }
        if let Some(c) = self.fail_code.clone() {
            return c;
        }
        CloseInfo {
            code: ABNORMAL_CLOSURE,
            reason: String::new(),
        }
    }

    fn outcome_io_error(&mut self) -> Outcome {
        self.outcome()
    }

    fn outcome_aborted(&mut self) -> Outcome {
        CloseInfo {
            code: ABNORMAL_CLOSURE,
            reason: String::new(),
        }
    }
}

/// Awaiting the driver runs the connection until it is closed and yields how it
/// closed. (A hand-written future rather than an `async fn`, so the task stores the
/// driver once instead of once per wrapping state machine.)
impl<S: Transport> Future for Driver<S> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        if this.started {
            return this.poll_run(cx);
        }
        this.started = true;
        if !this.rbuf.is_empty() {
            // Bytes that came with the upgrade request.
            this.process_input();
        }
        this.poll_run(cx)
    }
}

impl<S> Drop for Driver<S> {
    fn drop(&mut self) {
        if self.io_reading {
            self.shared.stats.reading(-1);
        }
        if self.io_writing {
            self.shared.stats.writing(-1);
        }
    }
}

/// "recv TEXT len=5 b'hello'": opcode, length and the first 30 bytes, as the seed logs.
pub fn describe_frame(dir: &str, op: OpCode, payload: &[u8]) -> String {
    let head = &payload[..payload.len().min(30)];
    let mut shown = String::with_capacity(head.len() + 3);
    for &b in head {
        match b {
            b'\\' => shown.push_str("\\\\"),
            b'\'' => shown.push_str("\\'"),
            0x20..=0x7e => shown.push(b as char),
            _ => shown.push_str(&format!("\\x{b:02x}")),
        }
    }
    let more = if payload.len() > 30 { "..." } else { "" };
    // The opcode's name goes in by itself: rewriting the whole line (as this once did,
    // "Ping" -> "PING") also rewrote those words inside the payload.
    format!("{dir} {} len={} b'{shown}'{more}", op.name(), payload.len())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }

    #[test]
    fn frame_descriptions_show_opcode_length_and_30_bytes() {
        assert_eq!(
            describe_frame("recv", OpCode::Text, b"hello"),
            "recv TEXT len=5 b'hello'"
        );
        let long = [b'a'; 40];
        let d = describe_frame("send", OpCode::Binary, &long);
        assert!(d.starts_with("send BINARY len=40 b'aaaaaaaaaa"));
        assert!(d.ends_with("'..."));
        assert_eq!(
            describe_frame("recv", OpCode::Ping, &[0, 255]),
            "recv PING len=2 b'\\x00\\xff'"
        );
    }

    #[test]
    fn frame_descriptions_leave_opcode_names_in_the_payload_alone() {
        assert_eq!(
            describe_frame("recv", OpCode::Binary, b"Ping"),
            "recv BINARY len=4 b'Ping'"
        );
        assert_eq!(
            describe_frame(
                "send",
                OpCode::Continuation,
                b"Text Binary Close Pong Continuation"
            ),
            "send CONTINUATION len=35 b'Text Binary Close Pong Continu'..."
        );
    }
}
