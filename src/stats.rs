//! Server counters (the seed's Stats, plus bytes), cheap on the hot path.
//!
//! Counters are sharded: each thread adds to its own cache-line-aligned shard with a
//! relaxed atomic add (no contention between the tokio workers and the loop thread), and
//! a read sums the shards. Rates over the last 30 s come from a ring of one-second
//! snapshots taken by a timer task, as the seed's RpsCounter.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::frame::OpCode;

const SHARDS: usize = 8;
/// Opcodes index 0..=10 directly.
pub const OPCODES: usize = 11;
/// Rate window (the seed's 30 s).
pub const RATE_WINDOW: Duration = Duration::from_secs(30);

#[repr(align(128))]
#[derive(Default)]
struct Shard {
    handshakes: AtomicU64,
    handshakes_failed: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    frames_in: [AtomicU64; OPCODES],
    frames_out: [AtomicU64; OPCODES],
}

/// A point-in-time copy of every counter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub connections: u64,
    pub max_connections: u64,
    pub connections_reading: u64,
    pub connections_writing: u64,
    pub handshakes: u64,
    pub handshakes_failed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub frames_in: [u64; OPCODES],
    pub frames_out: [u64; OPCODES],
}

pub struct Stats {
    shards: [Shard; SHARDS],
    connections: AtomicI64,
    max_connections: AtomicI64,
    reading: AtomicI64,
    writing: AtomicI64,
    history: Mutex<VecDeque<(Instant, Snapshot)>>,
}

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

fn shard_index() -> usize {
    SHARD.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT_SHARD.fetch_add(1, Relaxed) % SHARDS;
            s.set(i);
        }
        i
    })
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        Self {
            shards: Default::default(),
            connections: AtomicI64::new(0),
            max_connections: AtomicI64::new(0),
            reading: AtomicI64::new(0),
            writing: AtomicI64::new(0),
            history: Mutex::new(VecDeque::new()),
        }
    }

    #[inline]
    fn shard(&self) -> &Shard {
        &self.shards[shard_index()]
    }

    #[inline]
    pub fn add_bytes_in(&self, n: u64) {
        self.shard().bytes_in.fetch_add(n, Relaxed);
    }
    #[inline]
    pub fn add_bytes_out(&self, n: u64) {
        self.shard().bytes_out.fetch_add(n, Relaxed);
    }
    #[inline]
    pub fn frame_in(&self, op: OpCode) {
        self.shard().frames_in[op.as_u8() as usize].fetch_add(1, Relaxed);
    }
    #[inline]
    pub fn frame_out(&self, op: OpCode) {
        self.shard().frames_out[op.as_u8() as usize].fetch_add(1, Relaxed);
    }
    pub fn handshake_ok(&self) {
        self.shard().handshakes.fetch_add(1, Relaxed);
    }
    pub fn handshake_failed(&self) {
        self.shard().handshakes_failed.fetch_add(1, Relaxed);
    }

    /// A connection was accepted (TCP); returns the new count.
    pub fn conn_opened(&self) -> i64 {
        let n = self.connections.fetch_add(1, Relaxed) + 1;
        self.max_connections.fetch_max(n, Relaxed);
        n
    }
    pub fn conn_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }
    pub fn connections(&self) -> i64 {
        self.connections.load(Relaxed)
    }
    pub fn reading(&self, delta: i64) {
        self.reading.fetch_add(delta, Relaxed);
    }
    pub fn writing(&self, delta: i64) {
        self.writing.fetch_add(delta, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot {
            connections: self.connections.load(Relaxed).max(0) as u64,
            max_connections: self.max_connections.load(Relaxed).max(0) as u64,
            connections_reading: self.reading.load(Relaxed).max(0) as u64,
            connections_writing: self.writing.load(Relaxed).max(0) as u64,
            ..Default::default()
        };
        for sh in &self.shards {
            s.handshakes += sh.handshakes.load(Relaxed);
            s.handshakes_failed += sh.handshakes_failed.load(Relaxed);
            s.bytes_in += sh.bytes_in.load(Relaxed);
            s.bytes_out += sh.bytes_out.load(Relaxed);
            for i in 0..OPCODES {
                s.frames_in[i] += sh.frames_in[i].load(Relaxed);
                s.frames_out[i] += sh.frames_out[i].load(Relaxed);
            }
        }
        s
    }

    /// Record a sample for rate computation (called once a second by a timer task).
    pub fn sample(&self) {
        let snap = self.snapshot();
        let now = Instant::now();
        let mut h = self.history.lock();
        h.push_back((now, snap));
        while h.len() > 2 && now.duration_since(h[1].0) >= RATE_WINDOW {
            h.pop_front();
        }
    }

    /// Current totals and per-second rates of the cumulative counters over the last
    /// 30 s (or since start, if younger). Rates are `(now - then) / elapsed`.
    pub fn snapshot_with_rates(&self) -> (Snapshot, Snapshot, f64) {
        let now_snap = self.snapshot();
        let h = self.history.lock();
        let (then, base) = match h.front() {
            Some((t, s)) => (*t, s.clone()),
            None => (Instant::now(), now_snap.clone()),
        };
        drop(h);
        let elapsed = then.elapsed().as_secs_f64();
        (now_snap, base, elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_several_threads_add_up() {
        let stats = std::sync::Arc::new(Stats::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = stats.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        s.frame_in(OpCode::Text);
                        s.add_bytes_in(2);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let snap = stats.snapshot();
        assert_eq!(snap.frames_in[1], 4000);
        assert_eq!(snap.bytes_in, 8000);
    }

    #[test]
    fn max_connections_keeps_the_peak() {
        let s = Stats::new();
        s.conn_opened();
        s.conn_opened();
        s.conn_closed();
        let snap = s.snapshot();
        assert_eq!(snap.connections, 1);
        assert_eq!(snap.max_connections, 2);
    }
}
