//! The outbound side of a connection on the loop thread: the RFC 6455 §5.4 send
//! scheduler. Frames are encoded straight into the connection's outbox; a message over
//! `write_limit` goes out one fragment per drain; sends that arrive meanwhile (or
//! while a `conn.writer()` is open) wait their turn in order, and control frames pass
//! them. Every method locks only to move values (lockcheck.rs).

use std::sync::atomic::Ordering::{Acquire, Relaxed};

use bytes::Bytes;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::connection::{Connection, Slot};
use super::op::{is_done, reject, resolve, WaitKind};
use crate::frame::{self, OpCode};
use crate::hoptrace::{self, Hop};
use crate::shared::Outbox;
use std::os::fd::RawFd;

/// The first byte of a frame's header (FIN and opcode; RSV bits clear).
fn first_byte(op: OpCode, fin: bool) -> u8 {
    if fin {
        0x80 | op.as_u8()
    } else {
        op.as_u8()
    }
}
use crate::session::{describe_frame, LogLevel};

/// A message body kept by reference (no copy) until it is queued: `bytes` and `str` are
/// immutable; other bytes-like objects are copied into `bytes` first.
pub(super) enum Payload {
    Bytes(Py<PyBytes>),
    Str(Py<PyString>),
}

impl Payload {
    fn as_bytes<'a>(&'a self, py: Python<'a>) -> PyResult<&'a [u8]> {
        match self {
            Payload::Bytes(b) => Ok(b.as_bytes(py)),
            Payload::Str(s) => Ok(s.to_str(py)?.as_bytes()),
        }
    }
}

/// A message `send()` put aside while another message is going out in fragments
/// (RFC 6455 5.4: no other data frame may come between the fragments of a message).
pub(super) struct Deferred {
    /// The sender's future; None for `send_nowait()`, which nobody waits for.
    pub(super) fut: Option<Py<PyAny>>,
    pub(super) op: OpCode,
    pub(super) payload: Payload,
    /// Compress it (permessage-deflate), decided when send() was called.
    pub(super) compress: bool,
}

/// A message larger than `write_limit` going out one fragment per drain, so that a slow
/// or stalled peer holds at most about two fragments of it in user space.
///
/// Its fragments keep going when the `send()` that started it is cancelled: the frames
/// already written cannot be taken back, and another data frame may not start before
/// the final one (RFC 6455 5.4). A close ends it.
pub(super) struct LargeSend {
    pub(super) fut: Py<PyAny>,
    pub(super) payload: Payload,
    pub(super) offset: usize,
}

impl Connection {
    /// Fragment size for messages over `write_limit`.
    pub(super) fn fragment_size(&self) -> usize {
        self.shared.cfg.write_limit.max(16 * 1024)
    }

    /// Send one message; returns the awaitable for `send()`.
    pub(super) fn send_payload(
        &self,
        py: Python<'_>,
        op: OpCode,
        payload: Payload,
        compress: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        if op.is_control() {
            let data = payload.as_bytes(py)?;
            if data.len() > frame::MAX_CONTROL_PAYLOAD {
                return Err(PyValueError::new_err(format!(
                    "control frame payload is {} bytes; RFC 6455 allows at most 125",
                    data.len()
                )));
            }
            // Control frames may go between the fragments of a message (RFC 6455 5.4).
            return self.enqueue_frame(py, op, data, true);
        }
        let compress = self.compress_decision(py, &payload, compress)?;
        let busy = self.st.lock().busy();
        if busy {
            let fut = self.create_future(py)?;
            self.st.lock().rare().deferred.push_back(Deferred {
                fut: Some(fut.clone_ref(py)),
                op,
                payload,
                compress,
            });
            return self.pending(py, fut, WaitKind::Plain);
        }
        match self.send_data(py, op, payload, None, compress)? {
            None => self.completed(py),
            Some(fut) => self.pending(py, fut, WaitKind::Plain),
        }
    }

    /// `send_nowait()`: queue one message now and never wait. Over `max_backpressure`
    /// the message follows `on_backpressure` like a publish (dropped, or the
    /// connection closed with 1013).
    pub(super) fn send_nowait_payload(
        &self,
        py: Python<'_>,
        op: OpCode,
        payload: Payload,
    ) -> PyResult<()> {
        let data = payload.as_bytes(py)?;
        if op.is_control() && data.len() > frame::MAX_CONTROL_PAYLOAD {
            return Err(PyValueError::new_err(format!(
                "control frame payload is {} bytes; RFC 6455 allows at most 125",
                data.len()
            )));
        }
        let closing = {
            let ob = self.shared.outbox.lock();
            // Overflowed: the connection is closing with 1013.
            ob.closed || ob.closing || ob.overflow
        };
        if closing || self.st.lock().sent_close().is_some() {
            return Err(self.closed_error_now(py));
        }
        if !self.core.get().fanout.admit(&self.shared, data.len()) {
            return Ok(());
        }
        if op.is_control() {
            // Control frames may go between the fragments of a message (RFC 6455 5.4).
            self.queue_frame(py, op, data, true, false)?;
            return Ok(());
        }
        let compress = self.compress_decision(py, &payload, None)?;
        let busy = self.st.lock().busy();
        if busy {
            // Behind the fragmented message going out, in call order.
            self.st.lock().rare().deferred.push_back(Deferred {
                fut: None,
                op,
                payload,
                compress,
            });
            return Ok(());
        }
        if compress {
            self.queue_compressed(py, op, data)?;
        } else {
            self.queue_frame(py, op, data, true, false)?;
        }
        Ok(())
    }

    /// Queue a data message now (the caller checked that no fragmented send is under
    /// way). Returns None if it is queued and under `write_limit`, else the future that
    /// completes when it is written down to the limit: `waiter` if given, else a new one.
    pub(super) fn send_data(
        &self,
        py: Python<'_>,
        op: OpCode,
        payload: Payload,
        waiter: Option<Py<PyAny>>,
        compress: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        let data = payload.as_bytes(py)?;
        let chunk = self.fragment_size();
        // A message to compress goes whole, however large: the session compresses and
        // frames it on the connection's thread (docs/guide.md, "Compression").
        if compress || data.len() <= chunk {
            let over = if compress {
                self.queue_compressed(py, op, data)?
            } else {
                self.queue_frame(py, op, data, true, false)?
            };
            if !over {
                return Ok(None);
            }
            let fut = match waiter {
                Some(f) => f,
                None => self.create_future(py)?,
            };
            self.st.lock().rare().drains.push(fut.clone_ref(py));
            return Ok(Some(fut));
        }
        // First fragment now, the rest as the connection takes them (on_drained). The
        // future exists before the first fragment is queued: between that and
        // `st.large` being set no Python may run (it could queue another data frame).
        let fut = match waiter {
            Some(f) => f,
            None => self.create_future(py)?,
        };
        self.queue_frame(py, op, &data[..chunk], false, true)?;
        self.st.lock().rare().large = Some(LargeSend {
            fut: fut.clone_ref(py),
            payload,
            offset: chunk,
        });
        Ok(Some(fut))
    }

    /// Queue one frame (no deferral); returns the awaitable for `send()`.
    pub(super) fn enqueue_frame(
        &self,
        py: Python<'_>,
        op: OpCode,
        data: &[u8],
        fin: bool,
    ) -> PyResult<Py<PyAny>> {
        if self.queue_frame(py, op, data, fin, false)? {
            let fut = self.create_future(py)?;
            self.st.lock().rare().drains.push(fut.clone_ref(py));
            self.pending(py, fut, WaitKind::Plain)
        } else {
            self.completed(py)
        }
    }

    /// Encode one frame into the outbox and wake the connection task. Returns true if
    /// the outbox is over `write_limit` (a Drained event will follow); `want_drain`
    /// asks for that event regardless.
    pub(super) fn queue_frame(
        &self,
        py: Python<'_>,
        op: OpCode,
        data: &[u8],
        fin: bool,
        want_drain: bool,
    ) -> PyResult<bool> {
        hoptrace::mark(Hop::Send);
        let cfg = &self.shared.cfg;
        /// Where the frame went on the direct route.
        enum Direct {
            Queued { wake: bool, over: bool },
            Closed,
            Fenced,
        }
        let over = 'send: {
            if self.shared.fenced.load(Acquire) == 0 {
                // None for a server connection; a fresh key in the client role.
                let mask = cfg.mask();
                // Inline only while the loop is not busy (see `Core::inline_ok`).
                let inline_ok = self.core.get().inline_ok.load(Relaxed);
                let queued = {
                    let mut ob = self.shared.outbox.lock();
                    if ob.closed || ob.closing {
                        Direct::Closed
                    } else if ob.topics.iter().any(|t| t.busy()) {
                        // Behind a publish still on its way (checked under the lock taken
                        // anyway, not by `fenced()` before it).
                        Direct::Fenced
                    } else {
                        let was_empty = ob.queue.is_empty();
                        let before = ob.queue.len();
                        let inline =
                            (inline_ok && was_empty && mask.is_none() && fin && !want_drain)
                                .then_some(ob.inline_fd)
                                .flatten()
                                .filter(|_| {
                                    op != OpCode::Close
                                        && !ob.driver_output
                                        && ob.inline_tail.is_none()
                                        && !ob.fragmenting
                                        && !ob.abort
                                        && !ob.overflow
                                        && !hoptrace::inline_disabled()
                                });
                        match inline {
                            Some(fd) => self.write_inline(&mut ob, fd, op, data),
                            // One allocation of the right size (growing from the header's
                            // few bytes would reallocate and copy the payload again).
                            None => ob
                                .queue
                                .push_with(|b| frame::encode_frame(b, fin, op, data, mask)),
                        }
                        // Counted under the outbox lock: the task, which subtracts what it
                        // writes, cannot see the bytes before they are counted. Before
                        // note_frame: the shared frames it moves in behind a message's final
                        // fragment were counted when they were held.
                        self.shared
                            .unsent
                            .fetch_add(ob.queue.len() - before, Relaxed);
                        ob.note_frame(first_byte(op, fin));
                        let over = ob.queue.len() > cfg.write_limit;
                        if over || want_drain {
                            ob.drain_waiting = true;
                        }
                        let wake = was_empty && !(ob.queue.is_empty() && ob.inline_tail.is_none());
                        Direct::Queued { wake, over }
                    }
                };
                match queued {
                    Direct::Queued { wake, over } => {
                        if wake {
                            self.shared.waker.wake();
                        }
                        break 'send over;
                    }
                    Direct::Closed => return Err(self.closed_error_now(py)),
                    Direct::Fenced => {}
                }
            }
            self.queue_fenced(py, op, data, fin, want_drain)?
        };
        hoptrace::mark(Hop::Queued);
        self.shared.stats.frame_out(op);
        if cfg.log_level >= LogLevel::Debug {
            self.shared
                .log(LogLevel::Debug, || describe_frame("send", op, data));
        }
        Ok(over)
    }

    /// The inline write: a frame written to the socket by the loop thread itself, under
    /// the outbox lock, when nothing is queued before it and the driver has nothing
    /// left to write (`queue_frame` checks that, and that it is plain TCP, the server
    /// role, a whole message or a control frame other than the close). The round trip
    /// then skips waking the connection's tokio task (BENCHMARKS.md, "Latency"). What
    /// the kernel does not take goes to the driver as `Outbox.inline_tail`, which it
    /// writes before anything else; later sends queue behind it.
    fn write_inline(&self, ob: &mut Outbox, fd: RawFd, op: OpCode, data: &[u8]) {
        let mut head = Vec::with_capacity(frame::MAX_HEADER_LEN);
        frame::encode_header(&mut head, true, op, data.len() as u64, None);
        let n = crate::conn::send_now(fd, &head, data);
        self.shared.stats.add_bytes_out(n as u64);
        if n == head.len() + data.len() {
            hoptrace::mark(Hop::Written);
            return;
        }
        let mut tail = Vec::with_capacity(head.len() + data.len() - n);
        if n < head.len() {
            tail.extend_from_slice(&head[n..]);
            tail.extend_from_slice(data);
        } else {
            tail.extend_from_slice(&data[n - head.len()..]);
        }
        // Counted like queued bytes (the driver subtracts what it writes).
        self.shared.unsent.fetch_add(tail.len(), Relaxed);
        ob.inline_tail = Some(Box::new(tail));
    }

    /// Whether to compress a data message: the connection negotiated permessage-deflate
    /// and `compress` is True, or None with the message at least `min_size` long.
    fn compress_decision(
        &self,
        py: Python<'_>,
        payload: &Payload,
        compress: Option<bool>,
    ) -> PyResult<bool> {
        if self.shared.deflate.is_none() || compress == Some(false) {
            return Ok(false);
        }
        if compress == Some(true) {
            return Ok(true);
        }
        let min = self.shared.cfg.deflate.map_or(usize::MAX, |d| d.min_size);
        Ok(payload.as_bytes(py)?.len() >= min)
    }

    /// Queue a whole data message to be compressed and framed on the connection's
    /// thread (permessage-deflate; outq.rs `push_compress`), and wake the task. Returns
    /// true if the outbox is over `write_limit` (a Drained event will follow).
    ///
    /// Behind a publish still being fanned out (fenced), the message goes uncompressed
    /// through the fan-out task instead, to keep its place in order.
    pub(super) fn queue_compressed(
        &self,
        py: Python<'_>,
        op: OpCode,
        data: &[u8],
    ) -> PyResult<bool> {
        if self.fenced() {
            return self.queue_frame(py, op, data, true, false);
        }
        let cfg = &self.shared.cfg;
        let (was_empty, over) = {
            let mut ob = self.shared.outbox.lock();
            if ob.closed || ob.closing {
                None
            } else {
                let was_empty = ob.queue.is_empty();
                // The one copy of the message, as the uncompressed path's encoding.
                ob.queue.push_compress(op, Bytes::copy_from_slice(data));
                // Counted by its raw size; the task corrects it once compressed.
                self.shared.unsent.fetch_add(data.len(), Relaxed);
                let over = ob.queue.len() > cfg.write_limit;
                if over {
                    ob.drain_waiting = true;
                }
                Some((was_empty, over))
            }
        }
        .ok_or_else(|| self.closed_error_now(py))?;
        if was_empty {
            self.shared.waker.wake();
        }
        self.shared.stats.frame_out(op);
        if cfg.log_level >= LogLevel::Debug {
            self.shared.log(LogLevel::Debug, || {
                format!("{} (compressed)", describe_frame("send", op, data))
            });
        }
        Ok(over)
    }

    /// Whether this connection's frames must take the fan-out task's route to stay in
    /// call order: a publish to one of its topics is still being fanned out, or frames
    /// of its own are already on that route.
    pub(super) fn fenced(&self) -> bool {
        if self.shared.fenced.load(Acquire) > 0 {
            return true;
        }
        let ob = self.shared.outbox.lock();
        ob.topics.iter().any(|t| t.busy())
    }

    /// Queue a frame behind the publishes on their way (see fanout.rs, "Order").
    /// Returns true, like the direct path, if the sender must wait for a Drained event:
    /// `want_drain`, or over `write_limit`. The frame is not in the outbox yet, so what
    /// is measured is everything unwritten (`unsent`, which counts it already).
    ///
    /// NOTE: this route used to answer "not over" and ask for the Drained event when
    /// the frame set off. With the driver on the loop thread (`threads=0`) nothing was
    /// written while the handler kept sending: each fragment of a large send got its
    /// Drained before it was even queued, so the whole message and every send after it
    /// piled up unwritten, and the next publish found the connection over
    /// `max_backpressure` and was lost (tests/test_inline_write.py).
    fn queue_fenced(
        &self,
        py: Python<'_>,
        op: OpCode,
        data: &[u8],
        fin: bool,
        want_drain: bool,
    ) -> PyResult<bool> {
        let closing = {
            let ob = self.shared.outbox.lock();
            ob.closed || ob.closing
        };
        let close_queued = self.st.lock().sent_close().is_some();
        if closing || close_queued {
            return Err(self.closed_error_now(py));
        }
        let mut b = Vec::with_capacity(frame::MAX_HEADER_LEN + data.len());
        frame::encode_frame(&mut b, fin, op, data, self.shared.cfg.mask());
        let over =
            want_drain || self.shared.unsent.load(Relaxed) + b.len() > self.shared.cfg.write_limit;
        self.core
            .get()
            .fanout
            .send_own(self.shared.clone(), Bytes::from(b), over);
        Ok(over)
    }

    /// The task took the outbox: queue the next fragment of a large send, if any.
    pub(super) fn continue_large(&self, py: Python<'_>) -> PyResult<()> {
        // Out of the state while its fragment is queued (no Python runs in between);
        // put back unless it is finished.
        let taken = self.st.lock().rare.as_mut().and_then(|r| r.large.take());
        let Some(mut large) = taken else {
            return Ok(());
        };
        let data = large.payload.as_bytes(py)?;
        let end = (large.offset + self.fragment_size()).min(data.len());
        let fin = end == data.len();
        let r = self.queue_frame(
            py,
            OpCode::Continuation,
            &data[large.offset..end],
            fin,
            !fin,
        );
        large.offset = end;
        if r.is_ok() && !fin {
            self.st.lock().rare().large = Some(large);
            return Ok(());
        }
        match r {
            Ok(_) => resolve(py, &large.fut, py.None())?,
            Err(e) => reject(py, &large.fut, e)?,
        }
        drop(large);
        self.release(py)
    }

    /// A fragmented send finished: send what was put aside, in order, then let the next
    /// waiting writer in.
    pub(super) fn release(&self, py: Python<'_>) -> PyResult<()> {
        loop {
            let next = {
                let mut st = self.st.lock();
                if st.busy_sending() {
                    return Ok(());
                }
                let next = st
                    .rare
                    .as_mut()
                    .map_or(Err(None), |r| match r.deferred.pop_front() {
                        Some(d) => Ok(d),
                        None => Err(r.writer_waiters.pop_front()),
                    });
                st.compact();
                next
            };
            match next {
                Ok(d) => {
                    let Some(fut) = d.fut else {
                        // send_nowait(): nobody waits; an error has nobody to go to
                        // (the connection is closing).
                        let _ = self.send_data(py, d.op, d.payload, None, d.compress);
                        continue;
                    };
                    if is_done(py, &fut)? {
                        continue; // the sender was cancelled: it did not send
                    }
                    // The sender's own future completes when its message is queued
                    // (and, over write_limit, written down to it).
                    let waiter = Some(fut.clone_ref(py));
                    match self.send_data(py, d.op, d.payload, waiter, d.compress) {
                        Ok(None) => resolve(py, &fut, py.None())?,
                        Ok(Some(_)) => {}
                        Err(e) => reject(py, &fut, e)?,
                    }
                }
                Err(Some(w)) => {
                    if is_done(py, &w)? {
                        continue;
                    }
                    self.st.lock().writer_active = true;
                    resolve(py, &w, py.None())?;
                    return Ok(());
                }
                Err(None) => return Ok(()),
            }
        }
    }

    /// Whether a writer (or a data send) may start now.
    pub(super) fn slot(&self) -> Slot {
        let st = self.st.lock();
        if st.finished {
            Slot::Finished
        } else if st.busy() {
            Slot::Busy
        } else {
            Slot::Free
        }
    }

    pub(super) fn writer_end(&self, py: Python<'_>) -> PyResult<()> {
        self.st.lock().writer_active = false;
        self.release(py)
    }
}
