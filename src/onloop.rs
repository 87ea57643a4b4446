//! `Config(threads=0)`: plain-TCP connections driven on the event-loop thread.
//!
//! Accepting, TLS and the opening handshake stay on a tokio thread; after the upgrade a
//! plain TCP connection's socket is handed to the [`Reactor`], an epoll set that also
//! holds the hub's eventfd and is what the loop watches (`loop.add_reader(core.fd())`).
//! `Core.drain` first runs the reactor: it reads the ready sockets by polling their
//! [`Driver`] (the same driver and sans-I/O session as on tokio) right there, so a
//! message's `Event::Readable` is handled in the same callback, and the handler's reply
//! goes out with the inline write (bridge/send.rs): no thread is woken on the message
//! path. Timers (keepalive, close timeout) stay on the tokio runtime; they and the
//! fan-out task wake a driver through the reactor's eventfd.
//!
//! Everything here but [`Reactor::adopt`] and the wakers runs on the loop thread and
//! never touches Python. BENCHMARKS.md ("Latency") says what it costs and saves, and
//! docs/guide.md when to use it.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conn::{Driver, Transport};
use crate::session::LogLevel;
use crate::shared::{ClosedGuard, ConnShared};

/// epoll tokens that are not connections (connection ids start at 1).
const WAKE: u64 = 0;
const HUB: u64 = u64::MAX;

const BASE_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// A connection handed over after its upgrade (server.rs).
pub struct Adopted {
    pub sock: std::net::TcpStream,
    pub shared: Arc<ConnShared>,
    /// Bytes that came after the request head.
    pub leftover: Vec<u8>,
    pub guard: ClosedGuard,
    /// Held until the driver ends: the per-address slot and the connection count.
    pub hold: Box<dyn Send>,
}

struct Task {
    driver: Pin<Box<Driver<LoopTcp>>>,
    guard: Option<ClosedGuard>,
    _hold: Box<dyn Send>,
    readable: Arc<AtomicBool>,
    waker: Waker,
}

/// The loop thread's epoll set and the connections it drives.
pub struct Reactor {
    epoll: OwnedFd,
    wake_fd: OwnedFd,
    notified: AtomicBool,
    /// Connections woken from any thread (send, fan-out, timers), polled next run.
    ready: Mutex<Vec<u64>>,
    /// Connections handed over by tokio threads, started next run.
    adopted: Mutex<Vec<Adopted>>,
    /// Only the loop thread touches these (a mutex for `Sync`; never contended).
    tasks: Mutex<HashMap<u64, Task>>,
    /// The runtime whose timers the drivers use.
    handle: OnceLock<tokio::runtime::Handle>,
    this: Weak<Reactor>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn epoll_ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: a valid epoll_event; the kernel copies it.
    cvt(unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) }).map(|_| ())
}

impl Reactor {
    /// An epoll set watching `hub_fd` (the hub's eventfd) and its own wake-up fd.
    pub fn new(hub_fd: RawFd) -> io::Result<Arc<Self>> {
        // SAFETY: plain syscalls; results checked before wrapping.
        let epoll = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let wake_fd = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::eventfd(
                0,
                libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
            ))?)
        };
        let level = libc::EPOLLIN as u32;
        epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, hub_fd, level, HUB)?;
        epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            wake_fd.as_raw_fd(),
            level,
            WAKE,
        )?;
        Ok(Arc::new_cyclic(|this| Self {
            epoll,
            wake_fd,
            notified: AtomicBool::new(false),
            ready: Mutex::new(Vec::new()),
            adopted: Mutex::new(Vec::new()),
            tasks: Mutex::new(HashMap::new()),
            handle: OnceLock::new(),
            this: this.clone(),
        }))
    }

    /// The descriptor the loop watches instead of the hub's.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The runtime whose timers the drivers use (set once, at start).
    pub fn set_runtime(&self, handle: tokio::runtime::Handle) {
        let _ = self.handle.set(handle);
    }

    /// Hand a connection to the loop thread (from a tokio thread).
    pub fn adopt(&self, a: Adopted) {
        self.adopted.lock().push(a);
        self.notify();
    }

    fn wake(&self, id: u64) {
        self.ready.lock().push(id);
        self.notify();
    }

    fn notify(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a local to our eventfd.
            unsafe { libc::write(self.wake_fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Called by `Core.drain` on the loop thread: start the adopted connections and
    /// poll every driver whose socket is ready or that was woken.
    pub fn run(&self) {
        let Some(handle) = self.handle.get() else {
            return;
        };
        let _rt = handle.enter();
        let mut due: Vec<u64> = Vec::new();
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: `events` is a valid buffer of 64 entries; timeout 0.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 64, 0) };
            if n <= 0 {
                break;
            }
            let tasks = self.tasks.lock();
            for ev in &events[..n as usize] {
                let (token, bits) = (ev.u64, ev.events);
                match token {
                    WAKE => {
                        let mut buf = [0u8; 8];
                        // SAFETY: reading into a local from our non-blocking eventfd.
                        unsafe { libc::read(self.wake_fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
                        self.notified.store(false, Ordering::Release);
                    }
                    HUB => {} // Core.drain takes the hub's events after this.
                    id => {
                        if bits & !(libc::EPOLLOUT as u32) != 0 {
                            if let Some(t) = tasks.get(&id) {
                                t.readable.store(true, Ordering::Relaxed);
                            }
                        }
                        due.push(id);
                    }
                }
            }
            if (n as usize) < events.len() {
                break;
            }
        }
        let adopted = std::mem::take(&mut *self.adopted.lock());
        for a in adopted {
            if let Some(id) = self.start(a) {
                due.push(id);
            }
        }
        due.append(&mut self.ready.lock());
        due.sort_unstable();
        due.dedup();
        for id in due {
            self.poll(id);
        }
    }

    fn start(&self, a: Adopted) -> Option<u64> {
        let Adopted {
            sock,
            shared,
            leftover,
            guard,
            hold,
        } = a;
        let id = shared.id;
        let fd = sock.as_raw_fd();
        if let Err(e) = epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            BASE_EVENTS,
            id,
        ) {
            shared.log(LogLevel::Error, || format!("cannot watch the socket: {e}"));
            return None; // the guard reports it closed; the socket closes
        }
        let readable = Arc::new(AtomicBool::new(true));
        let io = LoopTcp {
            sock,
            epoll: self.epoll.as_raw_fd(),
            id,
            readable: readable.clone(),
            out_armed: false,
        };
        shared.log(LogLevel::Debug, || {
            "connection open (on the event loop)".into()
        });
        let waker = Waker::from(Arc::new(TaskWake {
            id,
            reactor: self.this.clone(),
        }));
        let task = Task {
            driver: Box::pin(Driver::new(io, shared, leftover)),
            guard: Some(guard),
            _hold: hold,
            readable,
            waker,
        };
        self.tasks.lock().insert(id, task);
        Some(id)
    }

    fn poll(&self, id: u64) {
        let mut tasks = self.tasks.lock();
        let Some(task) = tasks.get_mut(&id) else {
            return; // ended already
        };
        let waker = task.waker.clone();
        let mut cx = Context::from_waker(&waker);
        // A panic in a driver ends that connection (as it would end its tokio task),
        // never unwinds into Core.drain and the loop.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            task.driver.as_mut().poll(&mut cx)
        }));
        let outcome = match polled {
            Ok(Poll::Pending) => return,
            Ok(Poll::Ready(outcome)) => outcome,
            Err(_) => {
                let task = tasks.remove(&id);
                drop(tasks);
                if let Some(t) = &task {
                    t.driver
                        .shared()
                        .log(LogLevel::Error, || "connection driver panicked".into());
                }
                drop(task); // the guard reports it closed (1006)
                return;
            }
        };
        let Some(mut task) = tasks.remove(&id) else {
            return;
        };
        drop(tasks);
        if let Some(guard) = task.guard.take() {
            guard.shared.log(LogLevel::Debug, || {
                format!("connection closed: {} {:?}", outcome.code, outcome.reason)
            });
            // The driver (and the socket) first, then the close is reported.
            drop(task.driver);
            guard.finish(outcome);
        }
    }

    /// The server stops: every connection here is dropped (sockets closed, each
    /// reported closed through the hub).
    pub fn shutdown(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock());
        drop(tasks);
        self.adopted.lock().clear();
    }
}

struct TaskWake {
    id: u64,
    reactor: Weak<Reactor>,
}

impl Wake for TaskWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(r) = self.reactor.upgrade() {
            r.wake(self.id);
        }
    }
}

/// A non-blocking TCP socket whose readiness comes from the reactor's epoll set
/// (edge-triggered): a read or write that would block returns Pending, and the next
/// readiness event polls the driver again. Only the loop thread uses it.
pub struct LoopTcp {
    sock: std::net::TcpStream,
    epoll: RawFd,
    id: u64,
    /// Input may be waiting (set by a readiness event, cleared by a read that would
    /// block), so that an idle connection's driver does not allocate a buffer to find
    /// out.
    readable: Arc<AtomicBool>,
    /// EPOLLOUT is in the interest set (added the first time a write would block).
    out_armed: bool,
}

impl LoopTcp {
    fn would_block_write(&mut self) -> Poll<io::Result<usize>> {
        if !self.out_armed {
            self.out_armed = true;
            let events = BASE_EVENTS | libc::EPOLLOUT as u32;
            if let Err(e) = epoll_ctl(
                self.epoll,
                libc::EPOLL_CTL_MOD,
                self.sock.as_raw_fd(),
                events,
                self.id,
            ) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Pending
    }
}

impl AsyncRead for LoopTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // SAFETY: read(2) only writes initialised bytes into the buffer, and only the n
        // bytes it reports are marked filled.
        let spare = unsafe { buf.unfilled_mut() };
        let r = unsafe {
            libc::recv(
                this.sock.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                0,
            )
        };
        if r >= 0 {
            let n = r as usize;
            // SAFETY: recv initialised the first n bytes.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => {
                this.readable.store(false, Ordering::Relaxed);
                Poll::Pending
            }
            io::ErrorKind::Interrupted => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            _ => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for LoopTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match (&this.sock).write(buf) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.would_block_write(),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match (&this.sock).write_vectored(bufs) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.would_block_write(),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        Poll::Ready(Ok(()))
    }
}

impl Transport for LoopTcp {
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.readable.load(Ordering::Relaxed) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn inline_fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
}
