//! One WebSocket connection's protocol state, sans I/O (in the spirit of websockets'
//! `protocol.py`): bytes and timer ticks go in; events, and bytes to write, come out.
//!
//! The tokio driver (`conn.rs`) only pumps the socket through a [`Session`]; every
//! rule of RFC 6455 about a connection's life lives here and is unit tested without a
//! socket: the close handshake (§5.5.1, §7.1.2-7.1.5), failing the connection (§7.1.7),
//! ping/pong (§5.5.2-5.5.3) and keepalive, fragment assembly (§5.4), the message size
//! limit, and the output back-pressure rule. The server uses it in [`Role::Server`],
//! `lightws.connect` in [`Role::Client`] (incoming frames must then be unmasked; its
//! own control frames are masked with random keys).
//!
//! What the session needs from its surroundings (the inbox, the application's
//! outbound queue, statistics, logging) it asks through the [`Io`] trait, so that the
//! driver decides how those are shared with Python and a test can record them.
//!
//! (Over 800 lines because more than half of it is the unit tests of every transition,
//! kept beside the code they pin down.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::deflate::{Compressor, Decompressor, DeflateParams, InflateError, Utf8Check};
use crate::frame::{self, Decoder, Event, OpCode, Role};
use crate::outq::{OutItem, OutQueue};

/// Close code reported when the connection ended without a close frame (RFC 6455 7.1.5).
pub const ABNORMAL_CLOSURE: u16 = 1006;
/// Close code reported when the peer's close frame carried no code (RFC 6455 7.1.5).
pub const NO_STATUS_RCVD: u16 = 1005;

/// A whole message at least this large that ends the read buffer is handed over in the
/// buffer it was read into instead of copied out (`Io::deliver_at`): below it a copy
/// costs less than the fresh read buffer that replaces the one handed over.
const TAKE_BUFFER_MIN: usize = 8 * 1024;

/// Log levels, as `lightws.LogLevel` (the same numbers): a record is emitted when its
/// level is at most the configured one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum LogLevel {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl LogLevel {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Error,
            1 => Self::Warn,
            2 => Self::Info,
            3 => Self::Debug,
            _ => return None,
        })
    }
}

/// A close code and reason: the peer's close frame, ours when we failed the
/// connection, or 1006 when it ended without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub reason: String,
}

impl CloseInfo {
    fn abnormal() -> Self {
        Self {
            code: ABNORMAL_CLOSURE,
            reason: String::new(),
        }
    }
}

/// Whether a delivered message is whole or one chunk of a streamed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// A chunk of a message streamed to `conn.reader()`; `fin` marks its last chunk.
    Chunk {
        fin: bool,
    },
}

/// Settings of a session (one per server, shared by its connections).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub role: Role,
    /// Largest message assembled in memory (1009 beyond it); streamed messages are not
    /// bound by it.
    pub max_msg_len: u64,
    /// Answer pings in the session; with false, pings and pongs are delivered.
    pub auto_pong: bool,
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub close_timeout: Duration,
    /// Unwritten output above which the session stops asking for input: a peer that
    /// does not read what we write (pongs to its pings, echoes) is throttled by TCP.
    pub max_backlog: usize,
}

/// The connection's state (RFC 6455 §4-§7; the names follow websockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Open,
    /// Our close frame is queued or sent; waiting for the peer's close or EOF.
    Closing,
    /// The peer's close is answered (or the connection failed): flush, shut down, done.
    Finishing,
}

/// What [`Io::seal_outbound`] found in the application's outbound queue.
pub enum Sealed {
    /// The queue is sealed now (no more data frames); these frames were queued before
    /// and go out ahead of the session's close frame.
    Frames(OutQueue),
    /// The application had already queued its own close frame: it goes out with the
    /// rest of its queue (through [`Session::take_app_output`]).
    AppClosing,
}

/// What a session asks of the connection around it.
pub trait Io {
    /// `conn.reader()` asked for the next message to be streamed (peek).
    fn stream_requested(&self) -> bool {
        false
    }
    /// Take that request as the next data message starts.
    fn take_stream_request(&mut self) -> bool {
        false
    }
    /// A fragmented message started arriving (not complete yet).
    fn assembling(&mut self) {}
    /// A message (or a chunk of a streamed one) for the application.
    fn deliver(&mut self, opcode: OpCode, data: Vec<u8>, part: Part);
    /// A whole message whose payload is `data[start..]`: the read buffer it arrived in,
    /// handed over with its frame header in front instead of being copied.
    fn deliver_at(&mut self, opcode: OpCode, mut data: Vec<u8>, start: usize) {
        data.drain(..start);
        self.deliver(opcode, data, Part::Whole);
    }
    /// No more messages will be delivered; `info` says why.
    fn closed(&mut self, info: CloseInfo);
    /// Seal the application's outbound queue: the session's close frame follows.
    fn seal_outbound(&mut self) -> Sealed;
    fn frame_in(&mut self, _op: OpCode) {}
    fn frame_out(&mut self, _op: OpCode) {}
    /// The session queued `n` bytes of its own (a pong, a close, a keepalive ping).
    fn output_added(&mut self, _n: usize) {}
    /// Application output queued as `queued` bytes became `now` bytes of output (its
    /// messages to compress were compressed).
    fn output_resized(&mut self, _queued: usize, _now: usize) {}
    fn log_enabled(&self, _level: LogLevel) -> bool {
        false
    }
    fn log(&mut self, _level: LogLevel, _msg: String) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    None,
    /// Waiting for the peer's close frame after ours.
    Close,
    /// Keepalive / idle bookkeeping while open.
    Keepalive,
}

/// See the module documentation.
pub struct Session {
    cfg: Arc<SessionConfig>,
    decoder: Decoder,
    state: State,
    /// Fragment assembly; freed after each message.
    msg: Vec<u8>,
    msg_opcode: OpCode,
    /// The message being received is streamed chunk by chunk.
    streaming: bool,
    /// After a protocol error the rest of the input is discarded undecoded.
    discard_input: bool,
    eof: bool,
    /// How the connection ends: the peer's close frame, or ours when we failed it.
    /// (Never both: after failing, input is no longer decoded.) Boxed: 8 bytes while
    /// open instead of 32.
    end: Option<Box<CloseInfo>>,
    /// Whole frames to write, the application's and our own, in order.
    out: OutQueue,
    close_sent: bool,
    write_shut: bool,
    timer_kind: TimerKind,
    /// When the timer is due. Activity does not move it: when it fires early, the
    /// keepalive deadline is recomputed, so a busy connection re-arms once per
    /// interval, not once per frame.
    timer_at: Option<Instant>,
    /// With `ping_interval` or `idle_timeout` only (boxed: 8 bytes without them).
    keepalive: Option<Box<Keepalive>>,
    /// permessage-deflate, when negotiated (one pointer otherwise).
    deflate: Option<Box<DeflateSession>>,
}

/// What keepalive pings and `idle_timeout` track.
struct Keepalive {
    /// Last frame received or sent (idle_timeout).
    last_activity: Instant,
    /// Last frame received (keepalive pings go out after ping_interval of silence).
    last_rx: Instant,
    /// When our unanswered keepalive ping went out.
    ping_sent: Option<Instant>,
}

/// A connection's permessage-deflate state (RFC 7692): each direction's codec (which
/// holds only its context-takeover window between messages, see deflate.rs) and the
/// progress of the compressed message being received.
struct DeflateSession {
    params: DeflateParams,
    inflater: Decompressor,
    deflater: Compressor,
    /// The data message being received is compressed.
    inflating: bool,
    /// Inflated bytes of that message so far (bounded by max_msg_len).
    inflated: u64,
    utf8: Utf8Check,
}

impl Session {
    pub fn new(cfg: Arc<SessionConfig>, now: Instant) -> Self {
        let mut s = Self {
            decoder: Decoder::new(cfg.role, Some(cfg.max_msg_len)),
            state: State::Open,
            msg: Vec::new(),
            msg_opcode: OpCode::Binary,
            streaming: false,
            discard_input: false,
            eof: false,
            end: None,
            out: OutQueue::new(),
            close_sent: false,
            write_shut: false,
            timer_kind: TimerKind::None,
            timer_at: None,
            keepalive: (cfg.ping_interval.is_some() || cfg.idle_timeout.is_some()).then(|| {
                Box::new(Keepalive {
                    last_activity: now,
                    last_rx: now,
                    ping_sent: None,
                })
            }),
            deflate: None,
            cfg,
        };
        s.arm_keepalive();
        s
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// permessage-deflate was negotiated with `params` (before any frame): RSV1 marks
    /// compressed messages, and [`OutQueue::push_compress`] items are compressed.
    pub fn set_deflate(&mut self, params: DeflateParams) {
        let (inbound, outbound) = match self.cfg.role {
            Role::Server => (params.client_direction(), params.server_direction()),
            Role::Client => (params.server_direction(), params.client_direction()),
        };
        self.decoder.allow_rsv1(true);
        self.deflate = Some(Box::new(DeflateSession {
            params,
            inflater: Decompressor::new(inbound),
            deflater: Compressor::new(outbound, params.level),
            inflating: false,
            inflated: 0,
            utf8: Utf8Check::default(),
        }));
    }

    /// The negotiated permessage-deflate parameters, if any.
    pub fn deflate_params(&self) -> Option<DeflateParams> {
        self.deflate.as_ref().map(|d| d.params)
    }

    /// Bytes of compression state held between messages (the context-takeover
    /// windows), for memory accounting.
    pub fn deflate_retained(&self) -> usize {
        self.deflate
            .as_ref()
            .map_or(0, |d| d.inflater.retained() + d.deflater.retained())
    }

    /// Frames sent by this end must be masked (the client role, RFC 6455 5.3), each
    /// with a fresh unpredictable key (§10.3, mask.rs).
    fn mask(&self) -> Option<[u8; 4]> {
        match self.cfg.role {
            Role::Server => None,
            Role::Client => Some(crate::mask::random_mask()),
        }
    }

    fn log<I: Io>(io: &mut I, level: LogLevel, msg: impl FnOnce() -> String) {
        if io.log_enabled(level) {
            io.log(level, msg());
        }
    }

    // -- input -----------------------------------------------------------------------

    /// True while the session wants input: not after EOF.
    pub fn wants_read(&self) -> bool {
        !self.eof
    }

    /// Whether to stop reading for now: the peer is not reading our output (unwritten
    /// output over `max_backlog`), or `inbox_full()` (the application is not keeping
    /// up). Once closing, input is always read (and dropped) to see the peer's close.
    pub fn read_paused(&self, inbox_full: impl FnOnce() -> bool) -> bool {
        if self.state != State::Open {
            return false;
        }
        if self.out.len() > self.cfg.max_backlog {
            return true;
        }
        inbox_full()
    }

    /// Decode received bytes; what was consumed is removed from `buf` (a partial frame
    /// stays for the next call).
    pub fn receive<I: Io>(&mut self, buf: &mut Vec<u8>, now: Instant, io: &mut I) {
        if self.discard_input {
            buf.clear();
            return;
        }
        let mut pos = 0;
        let end = buf.len();
        loop {
            if !self.decoder.in_message() {
                // A streamed message is not bound by max_msg_len (DESIGN.md §1).
                let limit = if io.stream_requested() {
                    None
                } else {
                    Some(self.cfg.max_msg_len)
                };
                if self.decoder.max_message_size() != limit {
                    self.decoder.set_max_message_size(limit);
                }
            }
            match self.decoder.decode(&mut buf[pos..]) {
                Err(e) => {
                    self.fail(e.close_code(), e.to_string(), now, io);
                    buf.clear();
                    pos = 0;
                    break;
                }
                Ok((0, None)) => break,
                Ok((n, ev)) => {
                    pos += n;
                    if let Some(ev) = ev {
                        // The event borrows `buf`; what outlives this call is copied,
                        // except a large message that ends the buffer: the buffer is
                        // handed over (NOTE: that copy was 20 % of the I/O thread's
                        // time per 64 KiB echo, BENCHMARKS.md "Where the time goes").
                        let whole = match &ev {
                            Event::Data {
                                opcode, payload, ..
                            } if pos == end => Some((*opcode, payload.len())),
                            _ => None,
                        };
                        if self.on_event(ev, now, io, whole.is_some()) {
                            let (opcode, len) = whole.unwrap_or((OpCode::Binary, 0));
                            let mut data = std::mem::take(buf);
                            // In place (the allocator splits off the unused tail).
                            data.shrink_to_fit();
                            Self::debug_frame(io, "recv", opcode, &data[pos - len..]);
                            io.deliver_at(opcode, data, pos - len);
                            pos = 0;
                            break;
                        }
                    }
                    if self.discard_input || self.end.is_some() {
                        // Failed, or the peer's close is in: nothing after it counts.
                        buf.clear();
                        pos = 0;
                        break;
                    }
                    if pos == buf.len() {
                        break;
                    }
                }
            }
        }
        if pos > 0 {
            buf.drain(..pos);
        }
        if let (TimerKind::Keepalive, Some(k)) = (self.timer_kind, &mut self.keepalive) {
            k.last_activity = now;
            k.last_rx = now;
        }
    }

    /// Where the rest of the current data frame's payload can be read from the socket
    /// straight into the message being assembled (no copy through the read buffer):
    /// the message's spare room, at most the frame's remaining payload; empty when that
    /// does not apply (no frame in progress, a whole message in one piece, streaming,
    /// inflating, closing). Read there, then call [`Session::receive_payload`].
    ///
    /// NOTE: a 64 KiB message that arrives in several reads was copied from the read
    /// buffer into the message, 16 % of the I/O thread's time per 64 KiB echo
    /// (BENCHMARKS.md, "Where the time goes").
    pub fn payload_room(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        let remaining = self.decoder.payload_remaining();
        if remaining == 0
            || self.state != State::Open
            || self.discard_input
            || self.end.is_some()
            || self.streaming
            || self.msg.capacity() == 0
            || self.deflate.as_ref().is_some_and(|d| d.inflating)
        {
            return &mut [];
        }
        // The frame's length was checked against max_msg_len at its header.
        let remaining = remaining as usize;
        if self.msg.capacity() - self.msg.len() < remaining {
            self.msg.reserve_exact(remaining);
        }
        &mut self.msg.spare_capacity_mut()[..remaining]
    }

    /// `n` bytes were read into [`Session::payload_room`]: unmask and check them where
    /// they are, and deliver the message if they end it.
    ///
    /// # Panics
    ///
    /// If `n` is more than the room `payload_room` gave.
    pub fn receive_payload<I: Io>(&mut self, n: usize, now: Instant, io: &mut I) {
        let start = self.msg.len();
        assert!(
            n as u64 <= self.decoder.payload_remaining() && start + n <= self.msg.capacity(),
            "receive_payload: {n} bytes is more than payload_room"
        );
        // SAFETY: the caller initialised these n bytes of the spare capacity (checked
        // against it above).
        unsafe { self.msg.set_len(start + n) };
        match self.decoder.decode(&mut self.msg[start..]) {
            Err(e) => {
                self.msg = Vec::new();
                self.fail(e.close_code(), e.to_string(), now, io);
            }
            Ok((_, Some(Event::Data { fin: true, .. }))) => {
                let data = std::mem::take(&mut self.msg);
                self.deliver(io, self.msg_opcode, data, Part::Whole);
            }
            Ok(_) => {}
        }
        if let (TimerKind::Keepalive, Some(k)) = (self.timer_kind, &mut self.keepalive) {
            k.last_activity = now;
            k.last_rx = now;
        }
    }

    /// The peer closed its side of the TCP connection.
    pub fn receive_eof(&mut self) {
        self.eof = true;
    }

    /// Handle one decoded event. `ends_buffer`: a data event whose payload ends the read
    /// buffer; true is returned if that payload is a whole message that should be
    /// delivered by taking the buffer (the caller does it; nothing was delivered).
    fn on_event<I: Io>(
        &mut self,
        ev: Event<'_>,
        now: Instant,
        io: &mut I,
        ends_buffer: bool,
    ) -> bool {
        match ev {
            Event::Data {
                opcode,
                payload,
                first,
                fin,
            } => {
                if first {
                    // A fragmented message counts once, at its first frame.
                    io.frame_in(opcode);
                }
                if self.state != State::Open {
                    // After our close frame, data is read and dropped (RFC 6455 5.5.1).
                    return false;
                }
                if first {
                    self.streaming = io.take_stream_request();
                    if let Some(d) = self.deflate.as_mut() {
                        d.inflating = self.decoder.message_compressed();
                    }
                }
                if self.deflate.as_ref().is_some_and(|d| d.inflating) {
                    self.on_compressed(opcode, payload, first, fin, now, io);
                    return false;
                }
                if self.streaming {
                    if fin {
                        self.streaming = false;
                    }
                    if payload.is_empty() && !fin && !first {
                        return false;
                    }
                    self.deliver(io, opcode, payload.to_vec(), Part::Chunk { fin });
                    return false;
                }
                if first && fin {
                    if ends_buffer && payload.len() >= TAKE_BUFFER_MIN {
                        return true;
                    }
                    self.deliver(io, opcode, payload.to_vec(), Part::Whole);
                    return false;
                }
                if first {
                    self.msg_opcode = opcode;
                    // The declared length of this frame is known: one allocation.
                    self.msg = Vec::with_capacity(self.decoder.message_size() as usize);
                    io.assembling();
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
                    self.deliver(io, self.msg_opcode, data, Part::Whole);
                }
            }
            Event::Ping(payload) => {
                io.frame_in(OpCode::Ping);
                Self::debug_frame(io, "recv", OpCode::Ping, payload);
                if self.cfg.auto_pong {
                    if !self.close_sent {
                        // RFC 6455 5.5.3: answer with a pong carrying the same payload.
                        self.queue_control(OpCode::Pong, payload, io);
                    }
                } else if self.state == State::Open {
                    self.deliver(io, OpCode::Ping, payload.to_vec(), Part::Whole);
                }
            }
            Event::Pong(payload) => {
                io.frame_in(OpCode::Pong);
                Self::debug_frame(io, "recv", OpCode::Pong, payload);
                if let Some(k) = &mut self.keepalive {
                    k.ping_sent = None;
                }
                if !self.cfg.auto_pong && self.state == State::Open {
                    self.deliver(io, OpCode::Pong, payload.to_vec(), Part::Whole);
                }
            }
            Event::Close { code, reason } => {
                io.frame_in(OpCode::Close);
                let info = CloseInfo {
                    code: code.unwrap_or(NO_STATUS_RCVD),
                    reason: reason.to_owned(),
                };
                let c = info.code;
                Self::log(io, LogLevel::Debug, || {
                    format!("recv CLOSE code={c} reason={reason:?}")
                });
                self.end = Some(Box::new(info.clone()));
                io.closed(info);
                // RFC 6455 5.5.1: answer with a close echoing the status code.
                self.send_close(code, "", now, io);
                self.state = State::Finishing;
            }
        }
        false
    }

    /// A chunk of a compressed data message (RFC 7692 §7.2.2): inflate it, bounded by
    /// max_msg_len (streamed messages too: a deflate bomb would otherwise outrun the
    /// reader's back-pressure within one read), check inflated TEXT as UTF-8 (1007,
    /// fail-fast), and deliver whole or as chunks to a streaming reader.
    fn on_compressed<I: Io>(
        &mut self,
        opcode: OpCode,
        payload: &[u8],
        first: bool,
        fin: bool,
        now: Instant,
        io: &mut I,
    ) {
        let max = self.cfg.max_msg_len;
        let d = self.deflate.as_mut().expect("inflating implies deflate");
        if first {
            d.inflated = 0;
            d.utf8 = Utf8Check::default();
            self.msg_opcode = opcode;
        }
        let mut out = if self.streaming {
            Vec::new()
        } else {
            std::mem::take(&mut self.msg)
        };
        let start = out.len();
        let room = max.saturating_sub(d.inflated) as usize;
        let mut r = d.inflater.inflate(payload, &mut out, room);
        if r.is_ok() && fin {
            let room = room - (out.len() - start);
            r = d.inflater.finish(&mut out, room);
        }
        d.inflated += (out.len() - start) as u64;
        let failure = match r {
            Err(InflateError::TooBig) => Some((
                frame::close_code::MESSAGE_TOO_BIG,
                format!("inflated message exceeds the limit of {max} bytes"),
            )),
            Err(e @ InflateError::Corrupt(_)) => Some((e.close_code(), e.to_string())),
            Ok(())
                if opcode == OpCode::Text
                    && (!d.utf8.feed(&out[start..]) || fin && !d.utf8.finish()) =>
            {
                Some((
                    frame::close_code::INVALID_FRAME_PAYLOAD_DATA,
                    "invalid UTF-8 in an inflated text message".to_owned(),
                ))
            }
            Ok(()) => None,
        };
        if let Some((code, reason)) = failure {
            d.inflater.abandon();
            d.inflating = false;
            self.fail(code, reason, now, io);
            return;
        }
        if fin {
            d.inflating = false;
        }
        if self.streaming {
            if fin {
                self.streaming = false;
            }
            if out.is_empty() && !fin && !first {
                return;
            }
            self.deliver(io, opcode, out, Part::Chunk { fin });
        } else if fin {
            self.deliver(io, self.msg_opcode, out, Part::Whole);
        } else {
            if first {
                io.assembling();
            }
            self.msg = out;
        }
    }

    fn debug_frame<I: Io>(io: &mut I, dir: &str, op: OpCode, payload: &[u8]) {
        Self::log(io, LogLevel::Debug, || describe_frame(dir, op, payload));
    }

    fn deliver<I: Io>(&mut self, io: &mut I, opcode: OpCode, data: Vec<u8>, part: Part) {
        Self::debug_frame(io, "recv", opcode, &data);
        io.deliver(opcode, data, part);
    }

    // -- output ----------------------------------------------------------------------

    /// The output still to write.
    pub fn output(&self) -> &OutQueue {
        &self.out
    }

    /// `n` bytes of the output were written. Once everything is written its buffers go
    /// back to the allocator (an idle connection holds none).
    pub fn written(&mut self, n: usize) {
        self.out.advance(n);
    }

    /// Whether the application's queued frames can be taken now: only once the
    /// previous batch is written, so that the application's queue (bounded by its
    /// write_limit) is what fills up while the peer is slow.
    pub fn can_take_app_output(&self) -> bool {
        self.out.is_empty() && !self.write_shut
    }

    /// Take the application's encoded frames (`frames` is left empty). `closing`: they
    /// end with the application's close frame.
    ///
    /// Returns how many bytes of output that made: the queue's length, unless it held
    /// messages to compress (counted by their raw size there), which are compressed
    /// and framed here, on the connection's thread.
    pub fn take_app_output(&mut self, frames: &mut OutQueue, closing: bool, now: Instant) -> usize {
        if frames.is_empty() {
            return 0;
        }
        let before = self.out.len();
        self.absorb(frames);
        let added = self.out.len() - before;
        if let (TimerKind::Keepalive, Some(k)) = (self.timer_kind, &mut self.keepalive) {
            k.last_activity = now;
        }
        if closing && !self.close_sent {
            // The application's close frame is the last frame of this batch.
            self.close_sent = true;
        }
        added
    }

    /// Move the application's queue behind our output, compressing and framing the
    /// messages queued to be compressed (permessage-deflate). Without any, a plain
    /// append: the uncompressed path costs what it did.
    fn absorb(&mut self, frames: &mut OutQueue) {
        if !frames.has_compress() {
            self.out.append(frames);
            return;
        }
        let mask = self.mask();
        for item in std::mem::take(frames).into_items() {
            match item {
                OutItem::Frames(b) => self.out.push_chunk(b),
                OutItem::Compress(op, data) => {
                    let Some(d) = self.deflate.as_mut() else {
                        // Not negotiated (the bridge never queues these then): plain.
                        self.out
                            .push_with(|b| frame::encode_frame(b, true, op, &data, mask));
                        continue;
                    };
                    let mut payload = Vec::new();
                    d.deflater.compress(&data, &mut payload);
                    drop(data);
                    self.out.push_with(|b| {
                        let at = b.len();
                        frame::encode_frame(b, true, op, &payload, mask);
                        // RSV1: this message is compressed (RFC 7692 §6).
                        b[at] |= 0x40;
                    });
                }
            }
        }
    }

    /// The application queued a close frame: start waiting for the peer's (bounded by
    /// close_timeout even if our frame is stuck behind unwritten data).
    pub fn app_closing(&mut self, now: Instant) {
        if self.timer_kind != TimerKind::Close {
            self.enter_closing(now);
        }
    }

    fn queue_control<I: Io>(&mut self, op: OpCode, payload: &[u8], io: &mut I) {
        let mask = self.mask();
        let before = self.out.len();
        self.out
            .push_with(|b| frame::encode_frame(b, true, op, payload, mask));
        io.output_added(self.out.len() - before);
        io.frame_out(op);
    }

    fn enter_closing(&mut self, now: Instant) {
        if self.state == State::Open {
            self.state = State::Closing;
        }
        if self.timer_kind != TimerKind::Close {
            self.timer_at = Some(now + self.cfg.close_timeout);
            self.timer_kind = TimerKind::Close;
        }
    }

    /// Queue our close frame after everything the application queued (RFC 6455 5.5.1:
    /// the close frame is the last frame we send).
    fn send_close<I: Io>(&mut self, code: Option<u16>, reason: &str, now: Instant, io: &mut I) {
        if self.close_sent {
            return;
        }
        match io.seal_outbound() {
            // The application's close frame is queued: it goes out with its queue.
            Sealed::AppClosing => return,
            Sealed::Frames(mut pending) => {
                // Counted in the connection's unsent bytes by their queued size; what
                // compressing them changed is reported.
                let (queued, before) = (pending.len(), self.out.len());
                self.absorb(&mut pending);
                io.output_resized(queued, self.out.len() - before);
            }
        }
        let payload = frame::close_payload(code, reason);
        self.queue_control(OpCode::Close, &payload, io);
        Self::debug_frame(io, "send", OpCode::Close, &payload);
        self.close_sent = true;
        self.enter_closing(now);
    }

    /// Close from the application side with `code` (e.g. 1013 for a slow consumer over
    /// its back-pressure limit): our close frame goes after what is queued, the
    /// application sees the connection closed with `code`, and the peer's close (or
    /// close_timeout) ends it. Nothing happens once a close is under way.
    pub fn close_now<I: Io>(&mut self, code: u16, reason: &str, now: Instant, io: &mut I) {
        if self.close_sent || self.state != State::Open {
            return;
        }
        io.closed(CloseInfo {
            code,
            reason: reason.to_owned(),
        });
        self.send_close(Some(code), reason, now, io);
    }

    /// Fail the WebSocket connection (RFC 6455 7.1.7): send a close with `code`, stop
    /// decoding input, close after the peer's close or EOF (bounded by close_timeout).
    fn fail<I: Io>(&mut self, code: u16, reason: String, now: Instant, io: &mut I) {
        Self::log(io, LogLevel::Info, || {
            format!("closing with {code}: {reason}")
        });
        self.discard_input = true;
        // The reason is for our log; keep the wire reason short and UTF-8 safe.
        let wire = truncate_utf8(&reason, 123).to_owned();
        let info = CloseInfo { code, reason };
        self.end = Some(Box::new(info.clone()));
        self.send_close(Some(code), &wire, now, io);
        io.closed(info);
        // Stay in Closing: after our close frame and FIN, input is read and discarded
        // until the peer's EOF (bounded by close_timeout), so that closing the socket
        // with unread input does not send an RST that could destroy our close frame.
    }

    /// Whether to shut down our side of TCP now: our close frame and everything
    /// before it is written, and the connection is no longer open.
    ///
    /// In the client role, only once the server has closed its side: RFC 6455 7.1.1
    /// has the server close the TCP connection first, and over TLS a client's early
    /// half-close is a close_notify, after which many servers (asyncio's TLS among
    /// them) stop writing before their own close frame. The wait is bounded by
    /// close_timeout like the wait for that frame.
    pub fn wants_shutdown(&self) -> bool {
        let closed =
            !self.write_shut && self.out.is_empty() && self.state != State::Open && self.close_sent;
        closed
            && match self.cfg.role {
                Role::Server => true,
                Role::Client => self.eof,
            }
    }

    /// Our side of TCP is shut down (FIN sent).
    pub fn shutdown_done(&mut self) {
        self.write_shut = true;
    }

    /// The connection is over: the socket can be closed.
    ///
    /// - EOF while open: the peer vanished (1006), RFC 6455 7.1.5.
    /// - EOF before our close went out, or after our FIN: nothing more to wait for.
    /// - Our FIN is out and the peer's close was answered (or its EOF came).
    pub fn finished(&self) -> bool {
        (self.eof && (self.state == State::Open || !self.close_sent || self.write_shut))
            || (self.write_shut && (self.state == State::Finishing || self.eof))
    }

    /// How the connection ended: the peer's close, ours if we failed it, else 1006.
    pub fn outcome(&self) -> CloseInfo {
        self.end
            .as_deref()
            .cloned()
            .unwrap_or_else(CloseInfo::abnormal)
    }

    // -- time ------------------------------------------------------------------------

    /// When [`Session::on_timer`] must next be called, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        self.timer_at
    }

    /// When the keepalive timer must next look at the connection, if ever.
    fn keepalive_deadline(&self) -> Option<Instant> {
        let cfg = &self.cfg;
        let k = self.keepalive.as_deref()?;
        let idle = cfg.idle_timeout.map(|d| k.last_activity + d);
        let ping = cfg.ping_interval.map(|interval| match k.ping_sent {
            Some(sent) => sent + cfg.ping_timeout.unwrap_or(interval),
            None => k.last_rx + interval,
        });
        match (idle, ping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn arm_keepalive(&mut self) {
        if let Some(when) = self.keepalive_deadline() {
            self.timer_at = Some(when);
            self.timer_kind = TimerKind::Keepalive;
        }
    }

    /// The deadline passed (or not: then nothing happens). Returns true if the
    /// connection must end now (the peer never answered our close).
    pub fn on_timer<I: Io>(&mut self, now: Instant, io: &mut I) -> bool {
        match self.timer_at {
            Some(at) if now >= at => {}
            _ => return false,
        }
        match self.timer_kind {
            TimerKind::None => {
                self.timer_at = None;
                false
            }
            TimerKind::Close => {
                Self::log(io, LogLevel::Info, || {
                    "close_timeout: peer did not answer our close".into()
                });
                true
            }
            TimerKind::Keepalive => {
                let cfg = self.cfg.clone();
                let Some(k) = self.keepalive.as_deref() else {
                    self.timer_at = None;
                    return false;
                };
                let (last_activity, last_rx, ping_sent) = (k.last_activity, k.last_rx, k.ping_sent);
                if let Some(limit) = cfg.idle_timeout {
                    if now >= last_activity + limit {
                        self.fail(1001, "idle timeout".into(), now, io);
                        return false;
                    }
                }
                if let Some(interval) = cfg.ping_interval {
                    match ping_sent {
                        Some(sent) if now >= sent + cfg.ping_timeout.unwrap_or(interval) => {
                            // Like websockets: no pong in time means the peer is gone.
                            self.fail(1011, "keepalive ping timeout".into(), now, io);
                            return false;
                        }
                        None if now >= last_rx + interval => {
                            self.queue_control(OpCode::Ping, b"", io);
                            if let Some(k) = &mut self.keepalive {
                                k.ping_sent = Some(now);
                            }
                        }
                        _ => {}
                    }
                }
                self.arm_keepalive();
                false
            }
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
    //! Every state transition of a session, driven by bytes and instants: no socket,
    //! no runtime, no sleeping.
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    /// Records what the session asks of its surroundings.
    #[derive(Default)]
    struct Rec {
        delivered: Vec<(OpCode, Vec<u8>, Part)>,
        closed: Option<CloseInfo>,
        /// Frames the application queued, handed over when the session seals.
        app_queue: OutQueue,
        app_closing: bool,
        sealed: bool,
        assembling: bool,
        stream: bool,
        /// Messages handed over in their read buffer (`deliver_at`).
        taken: usize,
        frames_in: Vec<OpCode>,
        frames_out: Vec<OpCode>,
        logs: Vec<String>,
    }

    impl Io for Rec {
        fn stream_requested(&self) -> bool {
            self.stream
        }
        fn take_stream_request(&mut self) -> bool {
            std::mem::take(&mut self.stream)
        }
        fn assembling(&mut self) {
            self.assembling = true;
        }
        fn deliver(&mut self, opcode: OpCode, data: Vec<u8>, part: Part) {
            self.assembling = false;
            self.delivered.push((opcode, data, part));
        }
        fn deliver_at(&mut self, opcode: OpCode, mut data: Vec<u8>, start: usize) {
            self.taken += 1;
            data.drain(..start);
            self.deliver(opcode, data, Part::Whole);
        }
        fn closed(&mut self, info: CloseInfo) {
            self.closed.get_or_insert(info);
        }
        fn seal_outbound(&mut self) -> Sealed {
            self.sealed = true;
            if self.app_closing {
                Sealed::AppClosing
            } else {
                Sealed::Frames(std::mem::take(&mut self.app_queue))
            }
        }
        fn frame_in(&mut self, op: OpCode) {
            self.frames_in.push(op);
        }
        fn frame_out(&mut self, op: OpCode) {
            self.frames_out.push(op);
        }
        fn log_enabled(&self, _level: LogLevel) -> bool {
            true
        }
        fn log(&mut self, _level: LogLevel, msg: String) {
            self.logs.push(msg);
        }
    }

    fn config() -> SessionConfig {
        SessionConfig {
            role: Role::Server,
            max_msg_len: 1000,
            auto_pong: true,
            ping_interval: None,
            ping_timeout: None,
            idle_timeout: None,
            close_timeout: Duration::from_secs(5),
            max_backlog: 100,
        }
    }

    fn session_with(cfg: SessionConfig) -> (Session, Instant) {
        let t0 = Instant::now();
        (Session::new(Arc::new(cfg), t0), t0)
    }

    fn session() -> (Session, Instant) {
        session_with(config())
    }

    /// A frame as a client sends it (masked).
    fn client_frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        frame::encode_frame(&mut f, fin, op, payload, Some(MASK));
        f
    }

    fn close_frame(code: u16, reason: &str) -> Vec<u8> {
        client_frame(
            true,
            OpCode::Close,
            &frame::close_payload(Some(code), reason),
        )
    }

    /// The application's queue holding its close frame (code 1000).
    fn close_from_app() -> OutQueue {
        let mut app = OutQueue::new();
        let payload = frame::close_payload(Some(1000), "");
        app.push_with(|b| frame::encode_frame(b, true, OpCode::Close, &payload, None));
        app
    }

    fn feed(s: &mut Session, io: &mut Rec, bytes: &[u8], now: Instant) {
        let mut buf = bytes.to_vec();
        s.receive(&mut buf, now, io);
    }

    /// Write `bytes` into the session's payload room (as the driver's read does).
    fn read_direct(s: &mut Session, io: &mut Rec, bytes: &[u8], now: Instant) {
        let room = s.payload_room();
        assert!(
            room.len() >= bytes.len(),
            "{} < {}",
            room.len(),
            bytes.len()
        );
        for (d, b) in room.iter_mut().zip(bytes) {
            d.write(*b);
        }
        s.receive_payload(bytes.len(), now, io);
    }

    #[test]
    fn the_rest_of_a_large_frame_is_read_straight_into_its_message() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let text = "héllo wörld ".repeat(40); // 560 bytes, multi-byte characters
        let wire = client_frame(true, OpCode::Text, text.as_bytes());
        // Nothing to read into before the frame's first bytes were handed out.
        assert!(s.payload_room().is_empty());
        feed(&mut s, &mut io, &wire[..50], t);
        let rest = text.len() - (50 - 8); // header: 2 + 2 (length) + 4 (mask)
        assert_eq!(s.payload_room().len(), rest);
        // In odd pieces (the mask's phase and a character split across reads).
        let mut pos = 50;
        for n in [7, 1, 130, 3] {
            read_direct(&mut s, &mut io, &wire[pos..pos + n], t);
            pos += n;
            assert!(io.delivered.is_empty());
        }
        read_direct(&mut s, &mut io, &wire[pos..], t);
        assert_eq!(io.delivered.len(), 1);
        assert_eq!(io.delivered[0].1, text.as_bytes());
        assert_eq!(io.delivered[0].2, Part::Whole);
        assert!(s.payload_room().is_empty());
        // Fragments: the room is per frame; the next frame starts in the read buffer.
        let mut wire = client_frame(false, OpCode::Binary, &[7; 300]);
        wire.extend(client_frame(true, OpCode::Continuation, &[9; 200]));
        feed(&mut s, &mut io, &wire[..20], t);
        read_direct(&mut s, &mut io, &wire[20..308], t);
        assert!(s.payload_room().is_empty());
        feed(&mut s, &mut io, &wire[308..330], t);
        read_direct(&mut s, &mut io, &wire[330..], t);
        let mut want = vec![7; 300];
        want.extend([9; 200]);
        assert_eq!(io.delivered.len(), 2);
        assert_eq!(io.delivered[1].1, want);
        assert!(io.closed.is_none());
    }

    #[test]
    fn a_large_message_that_ends_the_read_buffer_is_handed_over_in_it() {
        let (mut s, t) = session_with(SessionConfig {
            max_msg_len: 1 << 20,
            ..config()
        });
        let mut io = Rec::default();
        let big = vec![5u8; 20_000];
        let mut buf = client_frame(true, OpCode::Binary, &big);
        s.receive(&mut buf, t, &mut io);
        assert_eq!((io.taken, io.delivered.len()), (1, 1));
        assert_eq!(io.delivered[0].1, big);
        assert!(buf.is_empty());
        // Followed by the start of another frame, or small: copied out.
        let mut wire = client_frame(true, OpCode::Binary, &big);
        wire.extend(&client_frame(true, OpCode::Text, b"x")[..3]);
        feed(&mut s, &mut io, &wire, t);
        feed(
            &mut s,
            &mut io,
            &client_frame(true, OpCode::Binary, &[1; 100]),
            t,
        );
        assert_eq!((io.taken, io.delivered.len()), (1, 3));
        assert_eq!(io.delivered[1].1, big);
        assert_eq!(io.delivered[2].1, [1; 100]);
    }

    #[test]
    fn invalid_utf8_read_straight_into_a_message_fails_with_1007() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let mut payload = vec![b'a'; 300];
        payload[200] = 0xFF;
        let wire = client_frame(true, OpCode::Text, &payload);
        feed(&mut s, &mut io, &wire[..100], t);
        read_direct(&mut s, &mut io, &wire[100..], t);
        assert!(io.delivered.is_empty());
        assert_eq!(io.closed.as_ref().unwrap().code, 1007);
        assert!(s.payload_room().is_empty());
    }

    /// Decode what the session wrote (server frames: unmasked), and mark it written.
    fn written_frames(s: &mut Session) -> Vec<(OpCode, Vec<u8>)> {
        let mut out = s.output().to_vec();
        let n = out.len();
        s.written(n);
        let mut d = Decoder::new(Role::Client, None);
        let mut frames = Vec::new();
        let mut pos = 0;
        while pos < out.len() {
            let (used, ev) = d.decode(&mut out[pos..]).expect("valid server output");
            assert!(used > 0, "incomplete frame in the output");
            pos += used;
            match ev {
                Some(Event::Data {
                    opcode, payload, ..
                }) => frames.push((opcode, payload.to_vec())),
                Some(Event::Ping(p)) => frames.push((OpCode::Ping, p.to_vec())),
                Some(Event::Pong(p)) => frames.push((OpCode::Pong, p.to_vec())),
                Some(Event::Close { code, reason }) => {
                    frames.push((OpCode::Close, frame::close_payload(code, reason)))
                }
                None => {}
            }
        }
        frames
    }

    // -- open: messages ------------------------------------------------------------

    #[test]
    fn a_whole_message_is_delivered() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        feed(
            &mut s,
            &mut io,
            &client_frame(true, OpCode::Text, b"hello"),
            t,
        );
        assert_eq!(
            io.delivered,
            vec![(OpCode::Text, b"hello".to_vec(), Part::Whole)]
        );
        assert_eq!(io.frames_in, vec![OpCode::Text]);
        assert_eq!(s.state(), State::Open);
        assert!(s.output().is_empty());
    }

    #[test]
    fn a_partial_frame_stays_in_the_buffer_until_the_rest_arrives() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let f = client_frame(true, OpCode::Binary, b"abcdef");
        let mut buf = f[..4].to_vec();
        s.receive(&mut buf, t, &mut io);
        assert!(io.delivered.is_empty());
        buf.extend_from_slice(&f[4..]);
        s.receive(&mut buf, t, &mut io);
        assert!(buf.is_empty());
        assert_eq!(io.delivered.len(), 1);
    }

    #[test]
    fn fragments_are_assembled_and_control_frames_interleave() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        feed(
            &mut s,
            &mut io,
            &client_frame(false, OpCode::Text, b"he"),
            t,
        );
        assert!(io.assembling);
        feed(&mut s, &mut io, &client_frame(true, OpCode::Ping, b"p"), t);
        feed(
            &mut s,
            &mut io,
            &client_frame(false, OpCode::Continuation, b"ll"),
            t,
        );
        feed(
            &mut s,
            &mut io,
            &client_frame(true, OpCode::Continuation, b"o"),
            t,
        );
        assert_eq!(
            io.delivered,
            vec![(OpCode::Text, b"hello".to_vec(), Part::Whole)]
        );
        assert!(!io.assembling);
        // The ping was answered in the middle of the message (RFC 6455 5.4, 5.5.3).
        assert_eq!(written_frames(&mut s), vec![(OpCode::Pong, b"p".to_vec())]);
        // A fragmented message counts as one frame in.
        assert_eq!(io.frames_in, vec![OpCode::Text, OpCode::Ping]);
    }

    #[test]
    fn a_streamed_message_is_delivered_chunk_by_chunk_beyond_the_limit() {
        let (mut s, t) = session();
        let mut io = Rec {
            stream: true,
            ..Default::default()
        };
        let big = vec![b'x'; 1500]; // over max_msg_len (1000): streaming is not bound
        feed(
            &mut s,
            &mut io,
            &client_frame(false, OpCode::Binary, &big),
            t,
        );
        feed(
            &mut s,
            &mut io,
            &client_frame(false, OpCode::Continuation, b""),
            t,
        );
        feed(
            &mut s,
            &mut io,
            &client_frame(true, OpCode::Continuation, b"end"),
            t,
        );
        let parts: Vec<_> = io.delivered.iter().map(|(_, d, p)| (d.len(), *p)).collect();
        assert_eq!(
            parts,
            vec![
                (1500, Part::Chunk { fin: false }),
                (3, Part::Chunk { fin: true })
            ]
        );
        assert!(io.closed.is_none());
        // The next message is assembled again, within the limit.
        feed(
            &mut s,
            &mut io,
            &client_frame(true, OpCode::Text, b"next"),
            t,
        );
        assert_eq!(io.delivered.last().unwrap().2, Part::Whole);
    }

    #[test]
    fn a_message_over_the_limit_fails_with_1009_before_its_payload() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let big = vec![0u8; 1001];
        let f = client_frame(true, OpCode::Binary, &big);
        feed(&mut s, &mut io, &f[..14], t); // the header only
        assert_eq!(io.closed.as_ref().unwrap().code, 1009);
        assert_eq!(s.state(), State::Closing);
        let out = written_frames(&mut s);
        assert_eq!(out[0].0, OpCode::Close);
        assert_eq!(&out[0].1[..2], &1009u16.to_be_bytes());
    }

    #[test]
    fn invalid_utf8_fails_with_1007_and_later_input_is_discarded() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let mut bytes = client_frame(true, OpCode::Text, &[0xff, 0xfe]);
        bytes.extend(client_frame(true, OpCode::Text, b"after"));
        feed(&mut s, &mut io, &bytes, t);
        assert!(io.delivered.is_empty());
        assert_eq!(io.closed.as_ref().unwrap().code, 1007);
        feed(
            &mut s,
            &mut io,
            &client_frame(true, OpCode::Text, b"more"),
            t,
        );
        assert!(io.delivered.is_empty(), "nothing is decoded after failing");
        assert_eq!(s.outcome().code, 1007);
    }

    #[test]
    fn an_unmasked_client_frame_fails_with_1002() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let mut f = Vec::new();
        frame::encode_frame(&mut f, true, OpCode::Text, b"hi", None);
        feed(&mut s, &mut io, &f, t);
        assert_eq!(io.closed.unwrap().code, 1002);
        assert!(io.logs.iter().any(|l| l.starts_with("closing with 1002")));
    }

    #[test]
    fn the_client_role_rejects_masked_server_frames_and_masks_its_own() {
        let (mut s, t) = session_with(SessionConfig {
            role: Role::Client,
            ..config()
        });
        let mut io = Rec::default();
        // An unmasked ping from the server is fine; our pong goes out masked.
        let mut ping = Vec::new();
        frame::encode_frame(&mut ping, true, OpCode::Ping, b"p", None);
        feed(&mut s, &mut io, &ping, t);
        assert_eq!(
            s.output().to_vec()[1] & 0x80,
            0x80,
            "client frames are masked"
        );
        // A masked frame from the server is a protocol error (RFC 6455 5.1).
        feed(&mut s, &mut io, &client_frame(true, OpCode::Text, b"x"), t);
        assert_eq!(io.closed.unwrap().code, 1002);
    }

    #[test]
    fn the_client_role_shuts_down_only_after_the_servers_eof() {
        let (mut s, t) = session_with(SessionConfig {
            role: Role::Client,
            ..config()
        });
        let mut io = Rec {
            app_queue: close_from_app(),
            app_closing: true,
            ..Default::default()
        };
        let mut app = std::mem::take(&mut io.app_queue);
        s.app_closing(t);
        s.take_app_output(&mut app, true, t);
        let n = s.output().len();
        s.written(n);
        // Our close is out: a server would shut down now; the client waits.
        assert!(!s.wants_shutdown());
        let mut close = Vec::new();
        frame::encode_frame(
            &mut close,
            true,
            OpCode::Close,
            &frame::close_payload(Some(1000), ""),
            None,
        );
        feed(&mut s, &mut io, &close, t);
        assert_eq!(s.state(), State::Finishing);
        assert!(!s.wants_shutdown() && !s.finished());
        // The server closes TCP first (RFC 6455 7.1.1); then we shut down and finish.
        s.receive_eof();
        assert!(s.wants_shutdown());
        s.shutdown_done();
        assert!(s.finished());
        assert_eq!(s.outcome().code, 1000);
    }

    // -- ping / pong ---------------------------------------------------------------

    #[test]
    fn pings_are_answered_and_pongs_swallowed_with_auto_pong() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        feed(
            &mut s,
            &mut io,
            &client_frame(true, OpCode::Ping, b"abc"),
            t,
        );
        feed(&mut s, &mut io, &client_frame(true, OpCode::Pong, b"x"), t);
        assert!(io.delivered.is_empty());
        assert_eq!(
            written_frames(&mut s),
            vec![(OpCode::Pong, b"abc".to_vec())]
        );
        assert_eq!(io.frames_out, vec![OpCode::Pong]);
    }

    #[test]
    fn pings_and_pongs_are_delivered_without_auto_pong() {
        let (mut s, t) = session_with(SessionConfig {
            auto_pong: false,
            ..config()
        });
        let mut io = Rec::default();
        feed(&mut s, &mut io, &client_frame(true, OpCode::Ping, b"a"), t);
        feed(&mut s, &mut io, &client_frame(true, OpCode::Pong, b"b"), t);
        assert_eq!(
            io.delivered,
            vec![
                (OpCode::Ping, b"a".to_vec(), Part::Whole),
                (OpCode::Pong, b"b".to_vec(), Part::Whole)
            ]
        );
        assert!(s.output().is_empty());
    }

    // -- the close handshake -------------------------------------------------------

    #[test]
    fn the_peers_close_is_echoed_after_queued_frames_then_fin_then_done() {
        let (mut s, t) = session();
        let mut io = Rec {
            app_queue: {
                let mut q = OutQueue::new();
                q.push_with(|b| frame::encode_frame(b, true, OpCode::Text, b"queued", None));
                q
            },
            ..Default::default()
        };
        feed(&mut s, &mut io, &close_frame(1000, "bye"), t);
        assert_eq!(s.state(), State::Finishing);
        assert_eq!(
            io.closed,
            Some(CloseInfo {
                code: 1000,
                reason: "bye".into()
            })
        );
        assert!(io.sealed);
        // The application's frame goes first, then our close echoing the code only.
        assert_eq!(
            written_frames(&mut s),
            vec![
                (OpCode::Text, b"queued".to_vec()),
                (OpCode::Close, 1000u16.to_be_bytes().to_vec())
            ]
        );
        assert!(s.wants_shutdown());
        assert!(!s.finished());
        s.shutdown_done();
        assert!(s.finished());
        assert_eq!(s.outcome().code, 1000);
    }

    #[test]
    fn a_close_without_a_code_is_echoed_empty_and_reported_as_1005() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        feed(&mut s, &mut io, &client_frame(true, OpCode::Close, b""), t);
        assert_eq!(io.closed.unwrap().code, NO_STATUS_RCVD);
        assert_eq!(written_frames(&mut s), vec![(OpCode::Close, vec![])]);
    }

    #[test]
    fn input_after_the_peers_close_is_ignored() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let mut bytes = close_frame(1001, "");
        bytes.extend(client_frame(true, OpCode::Text, b"late"));
        feed(&mut s, &mut io, &bytes, t);
        assert!(io.delivered.is_empty());
    }

    #[test]
    fn our_close_waits_for_the_peers_then_finishes_without_a_second_close() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        // The application queued its close frame (conn.close()).
        s.app_closing(t);
        assert_eq!(s.state(), State::Closing);
        assert_eq!(s.deadline(), Some(t + Duration::from_secs(5)));
        let mut app = close_from_app();
        assert!(s.can_take_app_output());
        s.take_app_output(&mut app, true, t);
        assert!(app.is_empty());
        assert_eq!(written_frames(&mut s).len(), 1);
        assert!(s.wants_shutdown());
        s.shutdown_done();
        assert!(!s.finished(), "waits for the peer's close");
        // Data after our close is read and dropped (RFC 6455 5.5.1).
        feed(&mut s, &mut io, &client_frame(true, OpCode::Text, b"x"), t);
        assert!(io.delivered.is_empty());
        io.app_closing = true;
        feed(&mut s, &mut io, &close_frame(1000, ""), t);
        assert!(s.output().is_empty(), "no second close frame");
        assert!(s.finished());
        assert_eq!(s.outcome().code, 1000);
    }

    #[test]
    fn the_close_timeout_ends_a_connection_whose_peer_never_answers() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        s.app_closing(t);
        assert!(
            !s.on_timer(t + Duration::from_secs(4), &mut io),
            "not due yet"
        );
        assert!(s.on_timer(t + Duration::from_secs(5), &mut io));
        assert_eq!(s.outcome().code, ABNORMAL_CLOSURE);
        assert!(io.logs.iter().any(|l| l.contains("close_timeout")));
    }

    #[test]
    fn a_stuck_application_close_still_starts_the_close_timer_once() {
        let (mut s, t) = session();
        s.app_closing(t);
        s.app_closing(t + Duration::from_secs(3)); // later polls do not push it back
        assert_eq!(s.deadline(), Some(t + Duration::from_secs(5)));
    }

    #[test]
    fn a_peers_close_while_the_application_close_is_queued_is_not_answered_twice() {
        let (mut s, t) = session();
        let mut io = Rec {
            app_closing: true,
            ..Default::default()
        };
        s.app_closing(t);
        feed(&mut s, &mut io, &close_frame(1000, ""), t);
        assert_eq!(s.state(), State::Finishing);
        assert!(
            s.output().is_empty(),
            "the application's close goes out instead"
        );
        assert!(!s.wants_shutdown(), "not before that close is written");
        let mut app = close_from_app();
        s.take_app_output(&mut app, true, t);
        written_frames(&mut s);
        assert!(s.wants_shutdown());
    }

    #[test]
    fn after_failing_the_peers_close_or_eof_finishes_the_connection() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        feed(
            &mut s,
            &mut io,
            &client_frame(true, OpCode::Text, &[0xc3]),
            t,
        ); // truncated UTF-8
        assert_eq!(s.state(), State::Closing);
        written_frames(&mut s);
        s.shutdown_done();
        assert!(
            !s.finished(),
            "reads to the peer's EOF so no RST destroys our close"
        );
        s.receive_eof();
        assert!(s.finished());
        assert_eq!(s.outcome().code, 1007);
    }

    // -- EOF -----------------------------------------------------------------------

    #[test]
    fn eof_while_open_is_an_abnormal_closure() {
        let (mut s, _) = session();
        assert!(s.wants_read());
        s.receive_eof();
        assert!(!s.wants_read());
        assert!(s.finished());
        assert_eq!(s.outcome().code, ABNORMAL_CLOSURE);
    }

    #[test]
    fn eof_after_our_close_went_out_waits_for_our_fin() {
        let (mut s, t) = session();
        let mut app = close_from_app();
        s.app_closing(t);
        s.take_app_output(&mut app, true, t);
        s.receive_eof();
        assert!(!s.finished(), "our close frame is not written yet");
        written_frames(&mut s);
        s.shutdown_done();
        assert!(s.finished());
    }

    #[test]
    fn eof_before_our_queued_close_went_out_finishes_at_once() {
        let (mut s, t) = session();
        s.app_closing(t);
        s.receive_eof();
        assert!(s.finished());
    }

    // -- output --------------------------------------------------------------------

    #[test]
    fn application_output_is_taken_only_once_the_previous_batch_is_written() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let mut a = OutQueue::new();
        a.push_with(|b| b.extend_from_slice(b"AAAA"));
        s.take_app_output(&mut a, false, t);
        s.written(2);
        assert!(!s.can_take_app_output());
        // Pongs still go out behind it.
        feed(&mut s, &mut io, &client_frame(true, OpCode::Ping, b""), t);
        assert_eq!(&s.output().to_vec()[..2], b"AA");
        let n = s.output().len();
        s.written(n);
        assert!(s.can_take_app_output());
        assert_eq!(
            s.out.capacity(),
            0,
            "an idle connection holds no write buffer"
        );
    }

    #[test]
    fn reading_pauses_while_the_peer_does_not_read_our_output() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        assert!(!s.read_paused(|| false));
        assert!(s.read_paused(|| true), "the application is not keeping up");
        for _ in 0..40 {
            feed(
                &mut s,
                &mut io,
                &client_frame(true, OpCode::Ping, b"flood"),
                t,
            );
        }
        assert!(s.output().len() > 100);
        assert!(s.read_paused(|| false), "backlog over max_backlog");
        written_frames(&mut s);
        assert!(!s.read_paused(|| false));
        // Once closing, input is always read to see the peer's close.
        s.app_closing(t);
        assert!(!s.read_paused(|| true));
    }

    #[test]
    fn no_pong_is_sent_after_our_close() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let mut app = close_from_app();
        s.app_closing(t);
        s.take_app_output(&mut app, true, t);
        written_frames(&mut s);
        feed(&mut s, &mut io, &client_frame(true, OpCode::Ping, b""), t);
        assert!(s.output().is_empty());
    }

    // -- keepalive -----------------------------------------------------------------

    fn keepalive() -> SessionConfig {
        SessionConfig {
            ping_interval: Some(Duration::from_secs(10)),
            ping_timeout: Some(Duration::from_secs(5)),
            ..config()
        }
    }

    #[test]
    fn a_silent_peer_gets_a_ping_after_the_interval_and_1011_without_a_pong() {
        let (mut s, t) = session_with(keepalive());
        let mut io = Rec::default();
        assert_eq!(s.deadline(), Some(t + Duration::from_secs(10)));
        assert!(!s.on_timer(t + Duration::from_secs(10), &mut io));
        assert_eq!(written_frames(&mut s), vec![(OpCode::Ping, vec![])]);
        assert_eq!(s.deadline(), Some(t + Duration::from_secs(15)));
        assert!(!s.on_timer(t + Duration::from_secs(15), &mut io));
        assert_eq!(io.closed.as_ref().unwrap().code, 1011);
        assert_eq!(s.state(), State::Closing);
        assert_eq!(written_frames(&mut s)[0].0, OpCode::Close);
    }

    #[test]
    fn a_pong_in_time_keeps_the_connection_and_schedules_the_next_ping() {
        let (mut s, t) = session_with(keepalive());
        let mut io = Rec::default();
        s.on_timer(t + Duration::from_secs(10), &mut io);
        written_frames(&mut s);
        let t1 = t + Duration::from_secs(12);
        feed(&mut s, &mut io, &client_frame(true, OpCode::Pong, b""), t1);
        // The timer fires at the old deadline, finds the pong, and re-arms.
        assert!(!s.on_timer(t + Duration::from_secs(15), &mut io));
        assert!(io.closed.is_none());
        assert_eq!(s.deadline(), Some(t1 + Duration::from_secs(10)));
    }

    #[test]
    fn activity_does_not_move_the_armed_deadline_but_defers_the_ping() {
        let (mut s, t) = session_with(keepalive());
        let mut io = Rec::default();
        let t1 = t + Duration::from_secs(8);
        feed(&mut s, &mut io, &client_frame(true, OpCode::Text, b"x"), t1);
        assert_eq!(s.deadline(), Some(t + Duration::from_secs(10)));
        assert!(!s.on_timer(t + Duration::from_secs(10), &mut io));
        assert!(
            s.output().is_empty(),
            "heard from the peer 2 s ago: no ping yet"
        );
        assert_eq!(s.deadline(), Some(t1 + Duration::from_secs(10)));
    }

    #[test]
    fn an_idle_connection_is_closed_with_1001() {
        let (mut s, t) = session_with(SessionConfig {
            idle_timeout: Some(Duration::from_secs(30)),
            ..config()
        });
        let mut io = Rec::default();
        assert_eq!(s.deadline(), Some(t + Duration::from_secs(30)));
        assert!(!s.on_timer(t + Duration::from_secs(30), &mut io));
        assert_eq!(io.closed.unwrap().code, 1001);
        // The close timer takes over.
        assert_eq!(s.deadline(), Some(t + Duration::from_secs(35)));
    }

    #[test]
    fn sending_counts_as_activity_for_the_idle_timeout() {
        let (mut s, t) = session_with(SessionConfig {
            idle_timeout: Some(Duration::from_secs(30)),
            ..config()
        });
        let mut io = Rec::default();
        let mut a = OutQueue::new();
        a.push_with(|b| b.extend_from_slice(b"frame"));
        s.take_app_output(&mut a, false, t + Duration::from_secs(20));
        assert!(!s.on_timer(t + Duration::from_secs(30), &mut io));
        assert!(io.closed.is_none());
        assert_eq!(s.deadline(), Some(t + Duration::from_secs(50)));
    }

    #[test]
    fn without_keepalive_there_is_no_timer() {
        let (s, _) = session();
        assert_eq!(s.deadline(), None);
    }

    // -- helpers -------------------------------------------------------------------

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

    #[test]
    fn a_long_failure_reason_is_cut_to_fit_a_close_frame() {
        let (mut s, t) = session();
        let mut io = Rec::default();
        let mut f = Vec::new();
        frame::encode_frame(&mut f, true, OpCode::Text, b"x", None);
        feed(&mut s, &mut io, &f, t);
        let close = &written_frames(&mut s)[0].1;
        assert!(close.len() <= 125);
    }
}

#[cfg(test)]
mod deflate_tests {
    //! permessage-deflate in the session: RSV1, inflating (limit, UTF-8, corrupt
    //! streams), streaming, and compressing the application's queued messages.
    use super::*;
    use crate::deflate::{Compressor, Direction};
    use bytes::Bytes;

    const MASK: [u8; 4] = [9, 8, 7, 6];

    #[derive(Default)]
    struct Rec {
        delivered: Vec<(OpCode, Vec<u8>, Part)>,
        closed: Option<CloseInfo>,
        stream: bool,
    }

    impl Io for Rec {
        fn stream_requested(&self) -> bool {
            self.stream
        }
        fn take_stream_request(&mut self) -> bool {
            std::mem::take(&mut self.stream)
        }
        fn deliver(&mut self, opcode: OpCode, data: Vec<u8>, part: Part) {
            self.delivered.push((opcode, data, part));
        }
        fn closed(&mut self, info: CloseInfo) {
            self.closed.get_or_insert(info);
        }
        fn seal_outbound(&mut self) -> Sealed {
            Sealed::Frames(OutQueue::new())
        }
    }

    fn params(no_takeover: bool) -> DeflateParams {
        DeflateParams {
            server_max_window_bits: 12,
            client_max_window_bits: 12,
            server_no_context_takeover: no_takeover,
            client_no_context_takeover: no_takeover,
            level: 6,
        }
    }

    fn session(max: u64, no_takeover: bool) -> (Session, Instant) {
        let t0 = Instant::now();
        let cfg = SessionConfig {
            role: Role::Server,
            max_msg_len: max,
            auto_pong: true,
            ping_interval: None,
            ping_timeout: None,
            idle_timeout: None,
            close_timeout: Duration::from_secs(5),
            max_backlog: 1 << 20,
        };
        let mut s = Session::new(Arc::new(cfg), t0);
        s.set_deflate(params(no_takeover));
        (s, t0)
    }

    /// The client's compressor (its direction: client_max_window_bits).
    fn client(no_takeover: bool) -> Compressor {
        Compressor::new(
            Direction {
                window_bits: 12,
                no_context_takeover: no_takeover,
            },
            6,
        )
    }

    /// A client frame; `rsv1` sets the compressed bit.
    fn frame(fin: bool, rsv1: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        frame::encode_frame(&mut f, fin, op, payload, Some(MASK));
        if rsv1 {
            f[0] |= 0x40;
        }
        f
    }

    /// One compressed message cut into `parts` frames.
    fn compressed(c: &mut Compressor, op: OpCode, msg: &[u8], parts: usize) -> Vec<u8> {
        let mut wire = Vec::new();
        c.compress(msg, &mut wire);
        let step = wire.len().div_ceil(parts).max(1);
        let mut out = Vec::new();
        let pieces: Vec<&[u8]> = wire.chunks(step).collect();
        for (i, p) in pieces.iter().enumerate() {
            let op = if i == 0 { op } else { OpCode::Continuation };
            out.extend(frame(i + 1 == pieces.len(), i == 0, op, p));
        }
        out
    }

    fn feed(s: &mut Session, io: &mut Rec, bytes: &[u8], t: Instant) {
        let mut buf = bytes.to_vec();
        s.receive(&mut buf, t, io);
    }

    #[test]
    fn compressed_messages_are_inflated_whole_or_fragmented_with_context_takeover() {
        for no_takeover in [false, true] {
            let (mut s, t) = session(1 << 20, no_takeover);
            let mut io = Rec::default();
            let mut c = client(no_takeover);
            let msg = "{\"hello\":\"wörld\",\"n\":[1,2,3]}".repeat(20);
            for parts in [1, 2, 5, 1, 3] {
                feed(
                    &mut s,
                    &mut io,
                    &compressed(&mut c, OpCode::Text, msg.as_bytes(), parts),
                    t,
                );
            }
            // An uncompressed message in between is left alone.
            feed(
                &mut s,
                &mut io,
                &frame(true, false, OpCode::Binary, b"raw"),
                t,
            );
            feed(
                &mut s,
                &mut io,
                &compressed(&mut c, OpCode::Binary, b"\x00\x01", 1),
                t,
            );
            assert!(io.closed.is_none(), "{:?}", io.closed);
            assert_eq!(io.delivered.len(), 7);
            for d in &io.delivered[..5] {
                assert_eq!(
                    (d.0, d.1.as_slice(), d.2),
                    (OpCode::Text, msg.as_bytes(), Part::Whole)
                );
            }
            assert_eq!(io.delivered[5].1, b"raw");
            assert_eq!(io.delivered[6].1, b"\x00\x01");
            let retained = s.deflate_retained();
            if no_takeover {
                assert_eq!(retained, 0);
            } else {
                assert!(retained > 0 && retained <= 4096, "{retained}");
            }
        }
    }

    #[test]
    fn an_inflated_message_over_max_msg_len_is_1009_while_inflating() {
        let (mut s, t) = session(10_000, true);
        let mut io = Rec::default();
        // 10 MB of zeros: about 10 KB compressed, under the limit on the wire.
        let bomb = compressed(&mut client(true), OpCode::Binary, &vec![0; 10_000_000], 1);
        assert!(bomb.len() < 10_000 + 14);
        feed(&mut s, &mut io, &bomb, t);
        assert_eq!(io.closed.unwrap().code, 1009);
        assert!(io.delivered.is_empty());
        assert!(s.msg.capacity() <= 20_000);
    }

    #[test]
    fn streamed_compressed_messages_are_delivered_inflated_and_bounded_too() {
        let (mut s, t) = session(1 << 20, false);
        let mut io = Rec {
            stream: true,
            ..Default::default()
        };
        let msg = b"chunk of text ".repeat(1000);
        feed(
            &mut s,
            &mut io,
            &compressed(&mut client(false), OpCode::Text, &msg, 4),
            t,
        );
        let joined: Vec<u8> = io.delivered.iter().flat_map(|d| d.1.clone()).collect();
        assert_eq!(joined, msg);
        assert!(matches!(
            io.delivered.last().unwrap().2,
            Part::Chunk { fin: true }
        ));

        let (mut s, t) = session(1000, false);
        let mut io = Rec {
            stream: true,
            ..Default::default()
        };
        feed(
            &mut s,
            &mut io,
            &compressed(&mut client(false), OpCode::Binary, &[7; 5000], 1),
            t,
        );
        assert_eq!(io.closed.unwrap().code, 1009);
    }

    #[test]
    fn invalid_utf8_after_inflating_is_1007_and_a_corrupt_stream_is_1002() {
        let (mut s, t) = session(1 << 20, false);
        let mut io = Rec::default();
        feed(
            &mut s,
            &mut io,
            &compressed(&mut client(false), OpCode::Text, b"ok \xff bad", 1),
            t,
        );
        assert_eq!(io.closed.unwrap().code, 1007);

        let (mut s, t) = session(1 << 20, false);
        let mut io = Rec::default();
        // Binary: not UTF-8 checked, fine.
        feed(
            &mut s,
            &mut io,
            &compressed(&mut client(false), OpCode::Binary, b"\xff", 1),
            t,
        );
        assert!(io.closed.is_none());
        // Block type 3 is reserved: not deflate.
        feed(
            &mut s,
            &mut io,
            &frame(true, true, OpCode::Text, &[0xff, 0xff, 0xff]),
            t,
        );
        assert_eq!(io.closed.unwrap().code, 1002);
    }

    #[test]
    fn rsv1_on_control_frames_and_continuations_is_1002() {
        for bad in [frame(true, true, OpCode::Ping, b""), {
            let mut b = frame(false, false, OpCode::Text, b"a");
            b.extend(frame(true, true, OpCode::Continuation, b"b"));
            b
        }] {
            let (mut s, t) = session(1 << 20, false);
            let mut io = Rec::default();
            feed(&mut s, &mut io, &bad, t);
            assert_eq!(io.closed.unwrap().code, 1002);
        }
        // Without the extension, RSV1 is 1002 as ever.
        let t = Instant::now();
        let mut s = Session::new(
            Arc::new(SessionConfig {
                role: Role::Server,
                max_msg_len: 100,
                auto_pong: true,
                ping_interval: None,
                ping_timeout: None,
                idle_timeout: None,
                close_timeout: Duration::from_secs(5),
                max_backlog: 100,
            }),
            t,
        );
        let mut io = Rec::default();
        feed(
            &mut s,
            &mut io,
            &compressed(&mut client(true), OpCode::Text, b"x", 1),
            t,
        );
        assert_eq!(io.closed.unwrap().code, 1002);
    }

    /// Decode the session's output as a client would, inflating RSV1 messages.
    fn client_reads(s: &mut Session, no_takeover: bool) -> Vec<(OpCode, Vec<u8>, bool)> {
        let mut out = s.output().to_vec();
        let n = out.len();
        s.written(n);
        let mut d = Decoder::new(Role::Client, None);
        d.allow_rsv1(true);
        let mut inflater = Decompressor::new(Direction {
            window_bits: 12,
            no_context_takeover: no_takeover,
        });
        let mut msgs = Vec::new();
        let mut pos = 0;
        while pos < out.len() {
            let (used, ev) = d.decode(&mut out[pos..]).unwrap();
            pos += used;
            if let Some(Event::Data {
                opcode, payload, ..
            }) = ev
            {
                if d.message_compressed() {
                    let mut m = Vec::new();
                    inflater.inflate(payload, &mut m, 1 << 30).unwrap();
                    inflater.finish(&mut m, 1 << 30).unwrap();
                    msgs.push((opcode, m, true));
                } else {
                    msgs.push((opcode, payload.to_vec(), false));
                }
            }
        }
        msgs
    }

    #[test]
    fn queued_messages_to_compress_are_compressed_in_order_with_rsv1() {
        for no_takeover in [false, true] {
            let (mut s, t) = session(1 << 20, no_takeover);
            let msg = Bytes::from("{\"price\": 101.25, \"sym\": \"ABC\"}".repeat(10));
            let mut app = OutQueue::new();
            app.push_compress(OpCode::Text, msg.clone());
            app.push_with(|b| frame::encode_frame(b, true, OpCode::Binary, b"plain", None));
            app.push_compress(OpCode::Text, msg.clone());
            app.push_compress(OpCode::Binary, Bytes::new());
            let queued = app.len();
            let added = s.take_app_output(&mut app, false, t);
            assert!(app.is_empty());
            assert_eq!(added, s.output().len());
            assert!(added < queued, "compressed: {added} < {queued}");
            let got = client_reads(&mut s, no_takeover);
            assert_eq!(
                got,
                vec![
                    (OpCode::Text, msg.to_vec(), true),
                    (OpCode::Binary, b"plain".to_vec(), false),
                    (OpCode::Text, msg.to_vec(), true),
                    (OpCode::Binary, vec![], true),
                ]
            );
        }
    }
}
