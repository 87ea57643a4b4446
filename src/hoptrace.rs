//! Per-hop timestamps of a message's round trip through the server, for
//! bench/latency.py (BENCHMARKS.md, "Latency"). Compiled in only with the cargo
//! feature `hop-trace`; without it every [`mark`] is an empty inline function.
//!
//! Meant for one connection with one message in flight: each hop overwrites one
//! global timestamp, and when the reply is written the round trip's timestamps are
//! appended as one line (CLOCK_MONOTONIC nanoseconds, the clock of Python's
//! `time.perf_counter_ns`, so a client on the same machine can join its own) to the
//! file named by `LIGHTWS_HOP_TRACE`.

/// The hand-offs of one echo, in order.
#[derive(Debug, Clone, Copy)]
pub enum Hop {
    /// The driver's read returned the message's bytes (tokio thread).
    Read = 0,
    /// The session delivered it; `Event::Readable` is about to be pushed to the hub
    /// (the push includes the eventfd write that wakes the loop).
    Pushed = 1,
    /// `Core.drain` started on the loop thread (the hub's eventfd woke the loop).
    Drain = 2,
    /// The handler called `send()`: `queue_frame` started (loop thread).
    Send = 3,
    /// The frame is queued and the driver woken (or written inline).
    Queued = 4,
    /// The driver took the outbox (tokio thread).
    Taken = 5,
    /// The reply's last byte went to the kernel (either thread).
    Written = 6,
}

#[cfg(feature = "hop-trace")]
mod imp {
    use super::Hop;
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};

    const HOPS: usize = 7;
    static AT: [AtomicU64; HOPS] = [const { AtomicU64::new(0) }; HOPS];
    static OUT: parking_lot::Mutex<Option<std::io::BufWriter<std::fs::File>>> =
        parking_lot::Mutex::new(None);

    fn now_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    pub fn mark(hop: Hop) {
        let t = now_ns();
        match hop {
            // A new round trip: forget the last one's later hops.
            Hop::Read => {
                for a in &AT[1..] {
                    a.store(0, Ordering::Relaxed);
                }
            }
            // Only the first of each (a later read of the same round trip, or the
            // next message's drain, must not move them).
            Hop::Pushed | Hop::Drain | Hop::Send | Hop::Queued | Hop::Taken => {
                let _ =
                    AT[hop as usize].compare_exchange(0, t, Ordering::Relaxed, Ordering::Relaxed);
                return;
            }
            Hop::Written => {}
        }
        AT[hop as usize].store(t, Ordering::Relaxed);
        if let Hop::Written = hop {
            let ts: Vec<u64> = AT.iter().map(|a| a.load(Ordering::Relaxed)).collect();
            if ts[0] == 0 || ts[3] == 0 {
                return;
            }
            AT[0].store(0, Ordering::Relaxed);
            let mut out = OUT.lock();
            if out.is_none() {
                let Some(path) = std::env::var_os("LIGHTWS_HOP_TRACE") else {
                    return;
                };
                let Ok(f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                else {
                    return;
                };
                *out = Some(std::io::BufWriter::new(f));
            }
            if let Some(w) = out.as_mut() {
                let line: Vec<String> = ts.iter().map(u64::to_string).collect();
                let _ = writeln!(w, "{}", line.join(" "));
                let _ = w.flush();
            }
        }
    }
}

#[cfg(feature = "hop-trace")]
pub use imp::mark;

/// `LIGHTWS_HOP_TRACE_NO_INLINE` set (only in a `hop-trace` build): the loop thread
/// never writes inline, so one build shows the round trip with and without it.
#[cfg(feature = "hop-trace")]
pub fn inline_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("LIGHTWS_HOP_TRACE_NO_INLINE").is_some())
}

/// Always false without `hop-trace`.
#[cfg(not(feature = "hop-trace"))]
#[inline(always)]
pub fn inline_disabled() -> bool {
    false
}

/// Record that the message in flight reached `hop` (nothing without `hop-trace`).
#[cfg(not(feature = "hop-trace"))]
#[inline(always)]
pub fn mark(_hop: Hop) {}
