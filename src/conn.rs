//! One WebSocket connection after the upgrade, driven by a single tokio task (no
//! split reader/writer tasks: one task and its buffers are the whole per-connection
//! cost on the Rust side).
//!
//! The protocol rules live in the sans-I/O [`Session`]; the [`Driver`] here only
//! pumps the socket through it: read -> `Session::receive` -> inbox, outbox ->
//! `Session::take_app_output` -> write, and one timer for `Session::deadline`.
//!
//! The Python side (bridge.rs) and this task share a [`ConnShared`]: an inbox of
//! complete messages and an outbox of encoded frames, each behind a short lock
//! (lockcheck.rs), plus an `AtomicWaker` the loop thread uses to wake this task.
//! Buffers start empty, grow to need and are released whenever the connection goes
//! idle.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::frame::OpCode;
use crate::hoptrace::{self, Hop};
use crate::session::{CloseInfo, Io, LogLevel, Part, Sealed, Session, ABNORMAL_CLOSURE};
use crate::shared::{ConnShared, Event, InMsg, OVERFLOW_REASON, TRY_AGAIN_LATER};

/// A byte stream lightws can serve WebSocket on: plain TCP or TLS.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves when input may be available, without needing a buffer, so that an idle
    /// connection holds no read buffer. The default says "maybe": the caller then
    /// allocates a buffer and polls a read.
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The socket, if the loop thread may write frames to it as they are (plain TCP:
    /// see [`send_now`]); None if bytes must go through this transport (TLS).
    fn inline_fd(&self) -> Option<RawFd> {
        None
    }
}

impl Transport for TcpStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn inline_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// Write `head` then `body` to the socket `fd` without blocking (one sendmsg(2), no
/// SIGPIPE): the loop thread's inline write of a frame (bridge/send.rs), made while
/// it holds the outbox lock with `inline_fd` set and `driver_output` clear, so the
/// driver is not writing. Returns the bytes the kernel took: 0 if none or if the
/// socket failed (the driver finds out when it writes the rest).
pub fn send_now(fd: RawFd, head: &[u8], body: &[u8]) -> usize {
    let mut iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut libc::c_void,
            iov_len: body.len(),
        },
    ];
    // SAFETY: zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = if body.is_empty() { 1 } else { 2 };
    loop {
        // SAFETY: msg points at two iovecs over live slices; sendmsg only reads them.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return n as usize;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return 0;
        }
    }
}

/// Largest read we ask the kernel for when a big message is streaming in.
const MAX_READ: usize = 256 * 1024;

/// Chunks handed to one writev (the rest go in the next call).
const MAX_SLICES: usize = 64;

/// The session's view of the connection: the shared inbox and outbox, stats, logs.
struct SharedIo<'a>(&'a ConnShared);

impl Io for SharedIo<'_> {
    fn stream_requested(&self) -> bool {
        self.0.stream_next.load(Ordering::Acquire)
    }

    fn take_stream_request(&mut self) -> bool {
        self.0.stream_next.swap(false, Ordering::AcqRel)
    }

    fn assembling(&mut self) {
        self.0.inbox.lock().assembling = true;
    }

    fn deliver(&mut self, opcode: OpCode, data: Vec<u8>, part: Part) {
        self.push(InMsg {
            opcode,
            data,
            start: 0,
            part,
        });
    }

    fn deliver_at(&mut self, opcode: OpCode, data: Vec<u8>, start: usize) {
        self.push(InMsg {
            opcode,
            data,
            start,
            part: Part::Whole,
        });
    }

    fn closed(&mut self, info: CloseInfo) {
        let shared = self.0;
        let mut inbox = shared.inbox.lock();
        if inbox.closed.is_none() {
            inbox.closed = Some(Box::new(info));
            if inbox.waiting {
                inbox.waiting = false;
                shared.hub.push(Event::Readable(shared.id));
            }
        }
    }

    fn seal_outbound(&mut self) -> Sealed {
        let shared = self.0;
        let mut ob = shared.outbox.lock();
        if ob.closing {
            return Sealed::AppClosing;
        }
        ob.closing = true;
        if ob.drain_waiting {
            ob.drain_waiting = false;
            shared.hub.push(Event::Drained(shared.id));
        }
        // Shared frames held behind an unfinished fragmented message cannot follow it
        // any more: the close frame comes next.
        let held = ob.held_len();
        ob.held = None;
        shared.unsent.fetch_sub(held, Ordering::Relaxed);
        Sealed::Frames(std::mem::take(&mut ob.queue))
    }

    fn output_added(&mut self, n: usize) {
        self.0.unsent.fetch_add(n, Ordering::Relaxed);
    }

    fn output_resized(&mut self, queued: usize, now: usize) {
        resize_unsent(self.0, queued, now);
    }

    fn frame_in(&mut self, op: OpCode) {
        self.0.stats.frame_in(op);
    }

    fn frame_out(&mut self, op: OpCode) {
        self.0.stats.frame_out(op);
    }

    fn log_enabled(&self, level: LogLevel) -> bool {
        level <= self.0.cfg.log_level
    }

    fn log(&mut self, level: LogLevel, msg: String) {
        self.0.log(level, || msg);
    }
}

impl SharedIo<'_> {
    fn push(&mut self, m: InMsg) {
        let shared = self.0;
        let len = m.payload().len();
        let mut inbox = shared.inbox.lock();
        inbox.assembling = false;
        if inbox.discard {
            drop(inbox);
            drop(m);
            return;
        }
        inbox.queue.push_back(m);
        inbox.bytes += len;
        if inbox.bytes >= shared.cfg.inbox_limit {
            inbox.paused = true;
        }
        if inbox.waiting {
            inbox.waiting = false;
            hoptrace::mark(Hop::Pushed);
            shared.hub.push(Event::Readable(shared.id));
        }
    }
}

/// Queued application output counted as `queued` bytes in `unsent` became `now` bytes
/// of output (messages to compress, counted by their raw size, were compressed).
fn resize_unsent(shared: &ConnShared, queued: usize, now: usize) {
    if now > queued {
        shared.unsent.fetch_add(now - queued, Ordering::Relaxed);
    } else if queued > now {
        shared.unsent.fetch_sub(queued - now, Ordering::Relaxed);
    }
}

/// The per-connection task: pumps the socket through the [`Session`]. Its `poll_run`
/// is the only code that touches the socket after the upgrade.
pub struct Driver<S> {
    io: S,
    shared: Arc<ConnShared>,
    session: Session,
    rbuf: Vec<u8>,
    /// The end of a frame the loop thread began writing inline (`Outbox.inline_tail`):
    /// written before the session's output. Boxed: one pointer in every idle driver.
    #[allow(clippy::box_collection)]
    tail: Option<Box<Vec<u8>>>,
    read_size: usize,
    need_flush: bool,
    /// The timer, armed at the session's deadline (boxed, and only while there is one).
    timer: Option<Pin<Box<Sleep>>>,
    /// io_statistics gauges this connection currently contributes to.
    io_reading: bool,
    io_writing: bool,
    started: bool,
}

/// How the connection ended, for the caller.
pub type Outcome = CloseInfo;

impl<S: Transport> Driver<S> {
    /// `leftover`: bytes that arrived after the HTTP request head (a first frame).
    pub fn new(io: S, shared: Arc<ConnShared>, leftover: Vec<u8>) -> Self {
        let cfg = shared.cfg.clone();
        let mut session = Session::new(cfg.session.clone(), std::time::Instant::now());
        if let Some(params) = shared.deflate {
            session.set_deflate(params);
        }
        shared.outbox.lock().inline_fd = io.inline_fd();
        Self {
            io,
            session,
            rbuf: leftover,
            tail: None,
            read_size: cfg.ws_read_buffer,
            need_flush: false,
            timer: None,
            io_reading: false,
            io_writing: false,
            started: false,
            shared,
        }
    }

    /// What the connection shares with its Python object.
    pub fn shared(&self) -> &Arc<ConnShared> {
        &self.shared
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        loop {
            // Register before looking at the outbox: a send() that lands after the look
            // wakes us again, so no wake-up is lost.
            self.shared.waker.register(cx.waker());
            let mut progress = false;

            match self.check_outbox() {
                Err(()) => {
                    return Poll::Ready(CloseInfo {
                        code: ABNORMAL_CLOSURE,
                        reason: String::new(),
                    })
                }
                Ok(took) => progress |= took,
            }

            // First the end of a frame the loop thread began writing: nothing else may
            // come between its bytes.
            while let Some(t) = self.tail.as_mut() {
                match Pin::new(&mut self.io).poll_write(cx, t) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(self.session.outcome())
                    }
                    Poll::Ready(Ok(n)) => {
                        t.drain(..n);
                        if t.is_empty() {
                            self.tail = None;
                        }
                        self.shared.unsent.fetch_sub(n, Ordering::Relaxed);
                        self.need_flush = true;
                        self.shared.stats.add_bytes_out(n as u64);
                        progress = true;
                    }
                    Poll::Pending => break,
                }
            }

            // Write as much as the socket takes: every queued chunk in one writev (own
            // frames and frames shared with other connections, without copying them).
            while self.tail.is_none() {
                let out = self.session.output();
                if out.is_empty() {
                    break;
                }
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let n = out.slices(&mut slices);
                let io = Pin::new(&mut self.io);
                let r = if n == 1 {
                    io.poll_write(cx, &slices[0])
                } else {
                    io.poll_write_vectored(cx, &slices[..n])
                };
                match r {
                    Poll::Ready(Ok(0)) => return Poll::Ready(self.session.outcome()),
                    Poll::Ready(Ok(n)) => {
                        self.session.written(n);
                        self.shared.unsent.fetch_sub(n, Ordering::Relaxed);
                        self.need_flush = true;
                        self.shared.stats.add_bytes_out(n as u64);
                        progress = true;
                        if self.session.output().is_empty() {
                            hoptrace::mark(Hop::Written);
                        }
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(self.session.outcome()),
                    Poll::Pending => break,
                }
            }
            if self.tail.is_none() && self.session.output().is_empty() {
                if self.need_flush {
                    match Pin::new(&mut self.io).poll_flush(cx) {
                        Poll::Ready(Ok(())) => self.need_flush = false,
                        Poll::Ready(Err(_)) => return Poll::Ready(self.session.outcome()),
                        Poll::Pending => {}
                    }
                }
                if !self.need_flush
                    && self.session.wants_shutdown()
                    && Pin::new(&mut self.io).poll_shutdown(cx).is_ready()
                {
                    self.session.shutdown_done();
                    progress = true;
                }
            }
            if self.session.finished() {
                return Poll::Ready(self.session.outcome());
            }

            // Read, unless the inbox is full (back-pressure on the peer), the peer does
            // not read our output, or input ended.
            let shared = &self.shared;
            if self.session.wants_read() && !self.session.read_paused(|| shared.inbox.lock().paused)
            {
                // Once the read buffer is used up, the rest of a large frame is read
                // straight into its message (Session::payload_room): one copy fewer.
                let direct = self.rbuf.is_empty() && !self.session.payload_room().is_empty();
                let r = if direct {
                    self.poll_read_payload(cx)
                } else {
                    self.poll_read(cx)
                };
                match r {
                    Poll::Ready(Ok(0)) => {
                        self.session.receive_eof();
                        progress = true;
                    }
                    Poll::Ready(Ok(n)) if direct => {
                        let now = std::time::Instant::now();
                        self.session
                            .receive_payload(n, now, &mut SharedIo(&self.shared));
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => {
                        hoptrace::mark(Hop::Read);
                        let now = std::time::Instant::now();
                        self.session
                            .receive(&mut self.rbuf, now, &mut SharedIo(&self.shared));
                        if self.rbuf.is_empty() && self.rbuf.capacity() > self.read_size {
                            self.rbuf = Vec::new();
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(self.session.outcome()),
                    Poll::Pending => {}
                }
                if self.session.finished() {
                    return Poll::Ready(self.session.outcome());
                }
            }

            if self.poll_timer(cx) {
                let now = std::time::Instant::now();
                if self.session.on_timer(now, &mut SharedIo(&self.shared)) {
                    return Poll::Ready(self.session.outcome());
                }
                progress = true;
            }

            if !progress {
                if self.shared.cfg.io_statistics {
                    self.update_io_gauges();
                }
                return Poll::Pending;
            }
        }
    }

    /// Arm the one timer at the session's deadline (only when that changed: activity
    /// does not move it, see `Session::timer_at`) and poll it; true if it fired.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let want = self.session.deadline();
        // What the timer is armed for is its own deadline: no copy kept beside it.
        let armed = self.timer.as_ref().map(|t| t.deadline().into_std());
        if want != armed {
            match want {
                None => self.timer = None,
                Some(at) => {
                    let at = Instant::from_std(at);
                    match self.timer.as_mut() {
                        Some(t) => t.as_mut().reset(at),
                        None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
            }
        }
        match self.timer.as_mut() {
            Some(t) => t.as_mut().poll(cx).is_ready(),
            None => false,
        }
    }

    /// The seed's IOStatistics: a connection is "writing" while it has output the
    /// socket has not taken, "reading" while it waits for input with nothing to write.
    fn update_io_gauges(&mut self) {
        let writing = !self.session.output().is_empty();
        let reading = !writing && self.session.wants_read();
        if writing != self.io_writing {
            self.shared.stats.writing(if writing { 1 } else { -1 });
            self.io_writing = writing;
        }
        if reading != self.io_reading {
            self.shared.stats.reading(if reading { 1 } else { -1 });
            self.io_reading = reading;
        }
    }

    /// Read into the message being assembled (`Session::payload_room`, not empty).
    fn poll_read_payload(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut rb = ReadBuf::uninit(self.session.payload_room());
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.shared.stats.add_bytes_in(n as u64);
                Poll::Ready(Ok(n))
            }
            other => other.map(|r| r.map(|()| 0)),
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.is_empty() {
            match self.io.poll_readable(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: the read buffer the last message left (empty, kept while
                    // input was flowing) goes back to the allocator, so a connection
                    // that has exchanged messages costs what a fresh one does.
                    if self.rbuf.capacity() > 0 {
                        self.rbuf = Vec::new();
                    }
                    return Poll::Pending;
                }
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
                    // The buffer goes back to the allocator; the read size it had grown
                    // to is kept (it shrinks on short reads), so a connection streaming
                    // large messages does not restart at ws_read_buffer for each.
                    self.rbuf = Vec::new();
                }
                Poll::Pending
            }
        }
    }

    /// Take everything Python queued once the previous batch is written. Err(()) means
    /// abort().
    fn check_outbox(&mut self) -> Result<bool, ()> {
        let mut ob = self.shared.outbox.lock();
        if ob.abort {
            return Err(());
        }
        let now = std::time::Instant::now();
        // A slow consumer went over max_backpressure with on_backpressure="close": what
        // it has not been sent yet is dropped, and it gets a close 1013 (Try Again
        // Later) right after the frame being written.
        let overflow = ob.overflow && !ob.closing;
        if overflow {
            let dropped = ob.queue.len() + ob.held_len();
            ob.queue.clear();
            ob.held = None;
            self.shared.unsent.fetch_sub(dropped, Ordering::Relaxed);
        }
        if ob.closing {
            self.session.app_closing(now);
        }
        let mut took = None;
        if self.session.can_take_app_output() && !ob.queue.is_empty() {
            // Moved out, and taken by the session after the lock is released: messages
            // to compress are compressed there, and send() must not wait for that.
            took = Some((std::mem::take(&mut ob.queue), ob.closing));
        }
        if ob.drain_waiting {
            ob.drain_waiting = false;
            self.shared.hub.push(Event::Drained(self.shared.id));
        }
        // What this pass writes (the queue taken now, and output of the session's own)
        // excludes the loop thread's inline writes until all of it is written: no two
        // writers' bytes can interleave on the socket.
        if let Some(t) = ob.inline_tail.take() {
            match self.tail.as_mut() {
                Some(mine) => mine.extend_from_slice(&t),
                None => self.tail = Some(t),
            }
        }
        ob.driver_output =
            took.is_some() || overflow || self.tail.is_some() || !self.session.output().is_empty();
        drop(ob);
        let mut took = match took {
            Some((mut queue, closing)) => {
                hoptrace::mark(Hop::Taken);
                let queued = queue.len();
                let made = self.session.take_app_output(&mut queue, closing, now);
                if made != queued {
                    resize_unsent(&self.shared, queued, made);
                }
                true
            }
            None => false,
        };
        if overflow {
            self.session.close_now(
                TRY_AGAIN_LATER,
                OVERFLOW_REASON,
                now,
                &mut SharedIo(&self.shared),
            );
            took = true;
        }
        Ok(took)
    }
}

/// Awaiting the driver runs the connection until it is closed and yields how it
/// closed. (A hand-written future rather than an `async fn`, so the task stores the
/// driver once instead of once per wrapping state machine.)
impl<S: Transport> Future for Driver<S> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        if !this.started {
            this.started = true;
            if !this.rbuf.is_empty() {
                // Bytes that came with the upgrade request.
                let now = std::time::Instant::now();
                this.session
                    .receive(&mut this.rbuf, now, &mut SharedIo(&this.shared));
            }
        }
        this.poll_run(cx)
    }
}

impl<S> Driver<S> {
    /// The state shared with the connection's Python side.
    pub fn conn_shared(&self) -> &Arc<ConnShared> {
        &self.shared
    }
}

impl<S> Drop for Driver<S> {
    fn drop(&mut self) {
        // Before the socket closes (its descriptor could be reused at once): no inline
        // write after this, and none is under way (they hold the outbox lock).
        self.shared.outbox.lock().inline_fd = None;
        if self.io_reading {
            self.shared.stats.reading(-1);
        }
        if self.io_writing {
            self.shared.stats.writing(-1);
        }
    }
}
