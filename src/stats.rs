//! Server counters (the seed's Stats, plus bytes), cheap on the hot path.
//!
//! Counters are sharded: each thread adds to its own cache-line-aligned shard with a
//! relaxed atomic add (no contention between the tokio workers and the loop thread), and
//! a read sums the shards. Rates over the last 30 s come from a ring of one-second
//! snapshots taken by a timer task, as the seed's RpsCounter.
//!
//! A rate is the counter's growth divided by the span it grew over: the last 30 s (up
//! to 31: samples are a second apart), or the time since the server started while that
//! is shorter, but never less than [`MIN_RATE_SPAN`]. Dividing by the few milliseconds
//! a new server has been up read one handshake after 8 ms as 125/s; with the floor, a
//! server younger than a second reports its counts as the rate of its first second.

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
/// The shortest span a rate is taken over (see the module docs).
pub const MIN_RATE_SPAN: Duration = Duration::from_secs(1);

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

/// Counters now and at the start of the rate window, for per-second rates.
#[derive(Debug, Clone)]
pub struct Window {
    pub now: Snapshot,
    pub base: Snapshot,
    /// Seconds the rates are taken over: at least `MIN_RATE_SPAN`.
    pub span: f64,
}

impl Window {
    /// Per-second growth of a counter that read `base` at the window's start and `now`.
    pub fn rate(&self, now: u64, base: u64) -> f64 {
        now.saturating_sub(base) as f64 / self.span
    }
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
        Self::starting_at(Instant::now())
    }

    /// Counters that start at zero at `t0`: the first rate window begins there, so
    /// rates are defined (and not inflated) before the timer's first sample.
    fn starting_at(t0: Instant) -> Self {
        Self {
            shards: Default::default(),
            connections: AtomicI64::new(0),
            max_connections: AtomicI64::new(0),
            reading: AtomicI64::new(0),
            writing: AtomicI64::new(0),
            history: Mutex::new(VecDeque::from([(t0, Snapshot::default())])),
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
        self.sample_at(Instant::now(), self.snapshot());
    }

    fn sample_at(&self, now: Instant, snap: Snapshot) {
        let mut h = self.history.lock();
        h.push_back((now, snap));
        // Keep the newest sample that is at least RATE_WINDOW old as the window's start.
        while h.len() > 2 && now.saturating_duration_since(h[1].0) >= RATE_WINDOW {
            h.pop_front();
        }
    }

    /// Current totals and the window to take per-second rates over (module docs).
    pub fn window(&self) -> Window {
        self.window_at(Instant::now(), self.snapshot())
    }

    fn window_at(&self, now: Instant, snap: Snapshot) -> Window {
        let (then, base) = match self.history.lock().front() {
            Some((t, s)) => (*t, s.clone()),
            None => (now, snap.clone()),
        };
        let span = now.saturating_duration_since(then).max(MIN_RATE_SPAN);
        Window {
            now: snap,
            base,
            span: span.as_secs_f64(),
        }
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

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn handshakes_per_second(stats: &Stats, at: Instant) -> f64 {
        let w = stats.window_at(at, stats.snapshot());
        w.rate(w.now.handshakes, w.base.handshakes)
    }

    #[test]
    fn rates_of_a_server_younger_than_a_second_are_taken_over_one_second() {
        let t0 = Instant::now();
        let stats = Stats::starting_at(t0);
        assert_eq!(handshakes_per_second(&stats, t0), 0.0);
        stats.handshake_ok();
        // One handshake 8 ms after the start is 1/s, not 1 / 0.008 s = 125/s.
        assert_eq!(handshakes_per_second(&stats, t0 + 8 * MS), 1.0);
        stats.sample_at(t0 + 10 * MS, stats.snapshot());
        stats.handshake_ok();
        assert_eq!(handshakes_per_second(&stats, t0 + 999 * MS), 2.0);
    }

    #[test]
    fn rates_are_taken_over_the_time_since_start_until_the_window_is_full() {
        let t0 = Instant::now();
        let stats = Stats::starting_at(t0);
        for second in 1..=10 {
            stats.handshake_ok();
            stats.handshake_ok();
            stats.sample_at(t0 + second * S, stats.snapshot());
        }
        // 20 handshakes in the first 10 s, then a quiet half second.
        let at = t0 + 10 * S + 500 * MS;
        assert_eq!(handshakes_per_second(&stats, at), 20.0 / 10.5);
        assert_eq!(stats.window_at(at, stats.snapshot()).span, 10.5);
    }

    #[test]
    fn rates_cover_the_last_30_seconds_once_the_server_is_older() {
        let t0 = Instant::now();
        let stats = Stats::starting_at(t0);
        // 10 handshakes a second for 60 s, then 1 a second for 40 s.
        for second in 1..=100u32 {
            let n = if second <= 60 { 10 } else { 1 };
            for _ in 0..n {
                stats.handshake_ok();
            }
            stats.sample_at(t0 + second * S, stats.snapshot());
        }
        let at = t0 + 100 * S + 200 * MS;
        let w = stats.window_at(at, stats.snapshot());
        assert!((30.0..=31.0).contains(&w.span), "span {}", w.span);
        // The busy first minute is out of the window: 1/s, however long it lasted.
        assert_eq!(w.rate(w.now.handshakes, w.base.handshakes), 30.0 / w.span);
        assert!(
            stats.history.lock().len() <= 32,
            "the history must not grow"
        );
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
