//! The hand-off point from tokio to the asyncio loop (DESIGN.md §2, "The bridge").
//!
//! Producers (tokio tasks) push events into one queue per server and write the
//! wake-up fd only when `notified` flips from false to true, so a burst of events costs
//! one wake-up of the event loop, not one per message. The consumer is
//! `bridge::Core::drain`, which the asyncio loop calls from `loop.add_reader(fd, ...)`.
//!
//! Nothing in this module touches Python: tokio threads never take the GIL. The queue
//! is generic over its events (`shared::Event` for a server), so this module depends
//! on nothing else in the crate.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

pub struct Hub<E> {
    queue: Mutex<VecDeque<E>>,
    notified: AtomicBool,
    read_fd: OwnedFd,
    /// Same descriptor as `read_fd` for an eventfd; the write end of a pipe elsewhere.
    write_fd: Option<OwnedFd>,
}

impl<E> Hub<E> {
    pub fn new() -> io::Result<Self> {
        let (read_fd, write_fd) = wake_fd()?;
        Ok(Self {
            queue: Mutex::new(VecDeque::new()),
            notified: AtomicBool::new(false),
            read_fd,
            write_fd,
        })
    }

    /// The descriptor to register with `loop.add_reader`.
    pub fn fd(&self) -> RawFd {
        self.read_fd.as_raw_fd()
    }

    /// Queue an event; wakes the loop only if it is not already due to drain.
    pub fn push(&self, ev: E) {
        self.queue.lock().push_back(ev);
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.signal();
        }
    }

    /// Called by the consumer on its own thread right before a `begin_drain`: pushes
    /// until then need not signal, since the drain takes them anyway (the on-loop
    /// drivers push from the consumer's thread, onloop.rs; a wake-up would only make
    /// the loop call drain again for nothing).
    pub fn hold(&self) {
        self.notified.store(true, Ordering::Release);
    }

    /// Called by the consumer before taking events: clears the fd, then the flag, so a
    /// producer that pushes after this point writes the fd again (no lost wake-up).
    pub fn begin_drain(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading into a local buffer from a descriptor we own; non-blocking.
        unsafe {
            while libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) > 0
                && self.write_fd.is_some()
            {}
        }
        self.notified.store(false, Ordering::Release);
    }

    /// Move up to `max` events into `out`; returns true if more remain.
    pub fn take(&self, max: usize, out: &mut Vec<E>) -> bool {
        let mut q = self.queue.lock();
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        !q.is_empty()
    }

    /// Make the loop call drain again (used when a batch was cut short).
    pub fn rearm(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.signal();
        }
    }

    fn signal(&self) {
        let one: u64 = 1;
        let fd = self.write_fd.as_ref().unwrap_or(&self.read_fd).as_raw_fd();
        // SAFETY: writing 8 bytes from a local; EAGAIN (counter/pipe full) still leaves the
        // fd readable, which is all a wake-up needs.
        unsafe {
            libc::write(fd, (&one as *const u64).cast(), 8);
        }
    }
}

#[cfg(target_os = "linux")]
fn wake_fd() -> io::Result<(OwnedFd, Option<OwnedFd>)> {
    // SAFETY: plain syscall; the result is checked before wrapping it.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, None))
}

#[cfg(not(target_os = "linux"))]
fn wake_fd() -> io::Result<(OwnedFd, Option<OwnedFd>)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    for fd in fds {
        // SAFETY: fd was just returned by pipe().
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    // SAFETY: both are fresh descriptors we own.
    Ok(unsafe {
        (
            OwnedFd::from_raw_fd(fds[0]),
            Some(OwnedFd::from_raw_fd(fds[1])),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn a_burst_of_events_signals_once_and_drains_in_order() {
        let hub = Hub::<u64>::new().unwrap();
        assert!(!readable(hub.fd()));
        for i in 0..5 {
            hub.push(i);
        }
        assert!(readable(hub.fd()));
        hub.begin_drain();
        assert!(!readable(hub.fd()));
        let mut out = Vec::new();
        assert!(hub.take(3, &mut out));
        assert!(!hub.take(10, &mut out));
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn pushes_between_hold_and_begin_drain_do_not_signal_but_are_taken() {
        let hub = Hub::<u64>::new().unwrap();
        hub.hold();
        hub.push(1);
        assert!(!readable(hub.fd()));
        hub.begin_drain();
        let mut out = Vec::new();
        assert!(!hub.take(10, &mut out));
        assert_eq!(out, vec![1]);
        hub.push(2);
        assert!(readable(hub.fd()));
    }

    #[test]
    fn a_push_after_begin_drain_signals_again() {
        let hub = Hub::<u64>::new().unwrap();
        hub.push(1);
        hub.begin_drain();
        hub.push(2);
        assert!(readable(hub.fd()));
    }
}
