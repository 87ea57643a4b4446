//! Load generator behind `python -m lightws bench` (and the floor server that
//! `bench/compare.py` measures the Python servers against).
//!
//! Pure Rust on its own tokio runtime, no Python: the extension's `run_bench`
//! (`src/bench.rs`, only in builds with the `loadgen` cargo feature) calls
//! [`run`] and [`serve_floor`] with the GIL released. Test tooling only: it
//! holds an accept-any-certificate TLS verifier (`--insecure`) and a raw epoll
//! server, so it is kept out of the production extension.
//!
//! Modes:
//! - `echo`: closed loop. Each of N connections keeps `pipeline` messages in
//!   flight and sends a new one for every echo received. Reports messages/s
//!   and MB/s (echoed payload bytes, one direction, 10^6 bytes).
//! - `rate`: open loop. The N connections together send `rate` messages/s
//!   on a fixed schedule; each echo's latency is taken from the message's
//!   *scheduled* send time, so a server that stalls is charged for all the
//!   messages it delayed (no coordinated omission). HDR histogram,
//!   3 significant digits.
//! - `idle`: opens N connections (spread over several 127.0.0.x source
//!   addresses when the server is on loopback: one source address reaches only
//!   ~28k ephemeral ports), holds them for `duration`, reports how many are
//!   open.
//!
//! - `chat`: fan-out. N subscribers, K never-reading clients (`stalled`) and one
//!   publisher join one room (the server relays every message to the whole room);
//!   the publisher keeps `pipeline` numbered messages in flight, each done when every
//!   subscriber has it; reports deliveries/s, messages/s and whether every subscriber
//!   got every message once and in order (see [`chat`]).
//!
//! Frames are masked with a fresh key per frame and decoded with
//! [`lightws_proto::frame`]; the server's 101 is checked with
//! [`lightws_proto::handshake::accept_key`].

pub mod chat;
mod client;
mod floor;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::watch;

pub use client::Target;
pub use floor::serve as serve_floor;
use lightws_proto::frame::OpCode;

/// At most this many connections are in their connect/handshake at once.
const CONNECT_CONCURRENCY: usize = 256;
/// After the schedule ends (rate mode), wait this long for the last echoes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Error messages kept for the report.
const MAX_ERRORS: usize = 5;

/// The load shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Closed loop.
    Echo,
    /// Open loop at a fixed rate.
    Rate,
    /// Hold connections open.
    Idle,
    /// Fan-out: one publisher, a room of subscribers.
    Chat,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Rate => "rate",
            Mode::Idle => "idle",
            Mode::Chat => "chat",
        }
    }
}

/// One run's settings (see the Python `bench` subcommand for the defaults).
#[derive(Clone, Debug)]
pub struct Options {
    /// The load shape.
    pub mode: Mode,
    /// `ws://` or `wss://` URL.
    pub url: String,
    /// Connections to open.
    pub connections: usize,
    /// Message payload size in bytes.
    pub size: usize,
    /// Messages in flight per connection (echo mode).
    pub pipeline: usize,
    /// Measured seconds (idle: seconds to hold the connections).
    pub duration: f64,
    /// Seconds of load before measuring starts (echo, rate).
    pub warmup: f64,
    /// Messages per second over all connections (rate mode).
    pub rate: f64,
    /// Source addresses 127.0.0.1.. to spread connections over; 0 = one per
    /// 16,000 connections when the server is on 127.0.0.0/8, else none.
    pub sources: usize,
    /// Skip server certificate verification (wss://).
    pub insecure: bool,
    /// PEM file of trusted CA certificates (wss://).
    pub cafile: Option<String>,
    /// Send TEXT (ASCII payload) instead of BINARY.
    pub text: bool,
    /// Print a progress line on stderr once a second.
    pub progress: bool,
    /// Tokio worker threads of the load generator (1 = current-thread runtime).
    pub threads: usize,
    /// Chat mode: clients that join the room and never read (besides `connections`
    /// subscribers).
    pub stalled: usize,
}

/// Where the run is; connection tasks watch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connections are being opened; nobody sends yet.
    Connect,
    /// Load runs; the value is the start time (CLOCK_MONOTONIC ns).
    Run(u64),
    /// Close and finish.
    Stop,
}

/// Counters shared by the connection tasks and the controller.
pub struct Shared {
    /// Data messages received (echo: all; rate: inside the measured window).
    pub messages: AtomicU64,
    /// Their payload bytes.
    pub bytes: AtomicU64,
    /// Messages sent (rate mode).
    pub sent: AtomicU64,
    /// Echoes received (rate mode, including warmup).
    pub received: AtomicU64,
    /// Messages never answered before the end (rate mode).
    pub timeouts: AtomicU64,
    /// Connections that completed the handshake.
    pub opened: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections that failed (connect, handshake or later).
    pub failed: AtomicU64,
    errors: Mutex<Vec<String>>,
    latency: Mutex<Histogram<u64>>,
    /// Chat mode's state.
    pub chat: chat::ChatState,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            open: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            // 1 ns .. 1000 s, 3 significant digits (~0.1 % error).
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 1_000_000_000_000, 3).expect("valid bounds"),
            ),
            chat: chat::ChatState::new(),
        }
    }

    /// Count a failed connection and keep its message (first few distinct).
    pub fn fail(&self, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock();
        if errors.len() < MAX_ERRORS && !errors.contains(&error) {
            errors.push(error);
        }
    }

    /// Record one latency in nanoseconds.
    pub fn record_latency(&self, ns: u64) {
        self.latency.lock().saturating_record(ns.max(1));
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock timerfd deadlines use).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest sample.
    pub max_us: f64,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// `echo`, `rate` or `idle`.
    pub mode: &'static str,
    /// The URL.
    pub url: String,
    /// Connections asked for.
    pub connections: usize,
    /// Connections that completed the handshake.
    pub opened: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Connections still open at the end of the run (before closing).
    pub open_at_end: u64,
    /// Payload size.
    pub size: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Messages received in the measured window.
    pub messages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// messages / seconds.
    pub msgs_per_s: f64,
    /// bytes / seconds / 10^6.
    pub mb_per_s: f64,
    /// Rate mode: messages sent in total.
    pub sent: u64,
    /// Rate mode: the rate asked for.
    pub target_rate: f64,
    /// Rate mode: messages never answered.
    pub timeouts: u64,
    /// Rate mode: latency from scheduled send to echo.
    pub latency: Option<Latency>,
    /// The first few distinct connection errors.
    pub errors: Vec<String>,
    /// Chat mode: the fan-out figures.
    pub chat: Option<ChatReport>,
}

/// What a chat run measured (`messages`/`msgs_per_s` of the [`Report`] are the
/// publisher's messages done, i.e. received by every subscriber, in the window).
#[derive(Clone, Debug, Default)]
pub struct ChatReport {
    /// Subscribers that completed the upgrade.
    pub subscribers: u64,
    /// Never-reading clients that completed the upgrade.
    pub stalled: u64,
    /// Messages in flight.
    pub window: usize,
    /// Subscribers that saw a probe before the sequence started.
    pub joined: u64,
    /// Messages received by subscribers in the measured window (first copies).
    pub deliveries: u64,
    /// deliveries / seconds.
    pub deliveries_per_s: f64,
    /// Numbered messages sent / done over the whole run (warmup, window, drain).
    pub sent: u64,
    pub completed: u64,
    /// Messages the publisher gave up on (no progress for 2 s).
    pub stalls: u64,
    /// The publisher's own copies received.
    pub publisher_copies: u64,
    /// The load generator's own CPU seconds (user + system) over the measured window.
    pub client_cpu_s: f64,
    /// The measured window on CLOCK_MONOTONIC (ns; the same clock in every process),
    /// so a script can cut its samples of the server to it.
    pub window_start_ns: u64,
    pub window_end_ns: u64,
    /// The subscribers' check and what the stalled clients got.
    pub tally: chat::Tally,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad option or URL.
    #[error("{0}")]
    Invalid(String),
    /// Resolving, binding, runtime creation.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The run was interrupted (the callback said so).
    #[error("interrupted")]
    Interrupted,
}

/// Source addresses for `opts` against `target`.
fn source_addresses(opts: &Options, server: std::net::SocketAddr) -> Vec<Ipv4Addr> {
    let loopback = matches!(server.ip(), std::net::IpAddr::V4(ip) if ip.is_loopback());
    let count = match opts.sources {
        0 if loopback && opts.mode == Mode::Idle => opts.connections / 16_000 + 1,
        0 if loopback && opts.mode == Mode::Chat => (opts.connections + opts.stalled) / 8_000 + 1,
        0 => 0,
        n => n,
    };
    if count == 0 || !loopback {
        return Vec::new();
    }
    (0..count.min(254))
        .map(|i| Ipv4Addr::new(127, 0, 0, 1 + i as u8))
        .collect()
}

/// Raise the soft open-file limit to the hard limit (idle mode opens many).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid resource id and out pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Run one load. `interrupted` is polled about ten times a second; when it
/// returns true the run stops with [`BenchError::Interrupted`].
///
/// # Errors
///
/// [`BenchError::Invalid`] for bad options, [`BenchError::Io`] if the host
/// cannot be resolved or the runtime not created.
pub fn run(opts: Options, interrupted: &dyn Fn() -> bool) -> Result<Report, BenchError> {
    let target = Target::parse(&opts.url).map_err(BenchError::Invalid)?;
    if opts.connections == 0 {
        return Err(BenchError::Invalid("connections must be at least 1".into()));
    }
    if opts.mode == Mode::Echo && opts.pipeline == 0 {
        return Err(BenchError::Invalid("pipeline must be at least 1".into()));
    }
    if opts.mode == Mode::Chat && !(1..=chat::RING / 2).contains(&opts.pipeline) {
        return Err(BenchError::Invalid(format!(
            "chat mode: the window (--window) must be 1..={}",
            chat::RING / 2
        )));
    }
    if opts.mode == Mode::Chat && opts.size < 8 {
        return Err(BenchError::Invalid(
            "chat mode: messages carry a sequence number, so --size must be at least 8".into(),
        ));
    }
    if opts.mode == Mode::Rate && !(opts.rate > 0.0 && opts.rate.is_finite()) {
        return Err(BenchError::Invalid("rate must be a positive number".into()));
    }
    if !(opts.duration >= 0.0 && opts.warmup >= 0.0) {
        return Err(BenchError::Invalid(
            "duration and warmup must be >= 0".into(),
        ));
    }
    raise_nofile_limit();
    let rt = if opts.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()?
    };
    let result = rt.block_on(drive(opts, target, interrupted));
    // Tasks that did not finish their close in time are dropped here.
    rt.shutdown_background();
    result
}

async fn drive(
    opts: Options,
    target: Target,
    interrupted: &dyn Fn() -> bool,
) -> Result<Report, BenchError> {
    let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await?
        .next()
        .ok_or_else(|| BenchError::Invalid(format!("{}: no address", target.host)))?;
    let tls = if target.tls {
        let config = client::tls_config(opts.insecure, opts.cafile.as_deref())
            .map_err(BenchError::Invalid)?;
        Some(tokio_rustls::TlsConnector::from(config))
    } else {
        None
    };
    let server_name = rustls_pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| BenchError::Invalid(format!("{}: {e}", target.host)))?;
    let mut payload = vec![0u8; opts.size];
    if opts.text {
        for (i, b) in payload.iter_mut().enumerate() {
            *b = b'a' + (i % 26) as u8;
        }
    } else {
        lightws_proto::mask::fill_random(&mut payload);
    }
    let plan = Arc::new(client::Plan {
        sources: source_addresses(&opts, addr),
        target,
        addr,
        tls,
        server_name,
        payload,
        opcode: if opts.text {
            OpCode::Text
        } else {
            OpCode::Binary
        },
        opts: opts.clone(),
    });
    let shared = Arc::new(Shared::new());
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    // Chat mode: the stalled clients and the subscribers now, the publisher once they
    // are all in.
    let total = if opts.mode == Mode::Chat {
        opts.connections + opts.stalled
    } else {
        opts.connections
    };
    for index in 0..total {
        tasks.spawn(client::run(
            plan.clone(),
            shared.clone(),
            index,
            phase_rx.clone(),
            gate.clone(),
        ));
    }
    let mut clock = Ticker::new(opts.progress);

    // Phase 1: every connection either open or failed.
    let n = total as u64;
    loop {
        let opened = shared.opened.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        if opened + failed >= n {
            break;
        }
        clock
            .tick(interrupted, || {
                format!("connecting: {opened}/{n} open, {failed} failed")
            })
            .await?;
    }
    if opts.mode == Mode::Chat {
        tasks.spawn(client::run(
            plan.clone(),
            shared.clone(),
            total,
            phase_rx.clone(),
            gate.clone(),
        ));
        while shared.opened.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) <= n {
            clock
                .tick(interrupted, || "connecting the publisher".to_string())
                .await?;
        }
    }
    drop(phase_rx);
    let opened = shared.opened.load(Ordering::Relaxed);
    if opened == 0 {
        let errors = shared.errors.lock().join("; ");
        return Err(BenchError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("no connection could be opened to {}: {errors}", opts.url),
        )));
    }

    // Phase 2: load.
    let t0 = mono_ns();
    let _ = phase_tx.send(Phase::Run(t0));
    let warmup = Duration::from_secs_f64(opts.warmup);
    let duration = Duration::from_secs_f64(opts.duration);
    let mut report = Report {
        mode: opts.mode.name(),
        url: opts.url.clone(),
        // Chat: every connection (subscribers, stalled, the publisher).
        connections: if opts.mode == Mode::Chat {
            total + 1
        } else {
            opts.connections
        },
        size: opts.size,
        target_rate: if opts.mode == Mode::Rate {
            opts.rate
        } else {
            0.0
        },
        ..Report::default()
    };
    match opts.mode {
        Mode::Echo => {
            let start = Instant::now();
            while start.elapsed() < warmup {
                clock
                    .tick(interrupted, || progress_rate("warmup", &shared, &mut None))
                    .await?;
            }
            let (m0, b0) = (
                shared.messages.load(Ordering::Relaxed),
                shared.bytes.load(Ordering::Relaxed),
            );
            let start = Instant::now();
            let mut last = None;
            while start.elapsed() < duration {
                clock
                    .tick(interrupted, || progress_rate("echo", &shared, &mut last))
                    .await?;
            }
            report.seconds = start.elapsed().as_secs_f64();
            report.messages = shared.messages.load(Ordering::Relaxed) - m0;
            report.bytes = shared.bytes.load(Ordering::Relaxed) - b0;
        }
        Mode::Rate => {
            let end = t0 + ((opts.warmup + opts.duration) * 1e9) as u64;
            let mut last = None;
            while mono_ns() < end {
                clock
                    .tick(interrupted, || progress_rate("rate", &shared, &mut last))
                    .await?;
            }
            // Wait for the last echoes, within reason.
            let drain_end = Instant::now() + DRAIN_TIMEOUT;
            while Instant::now() < drain_end
                && shared.received.load(Ordering::Relaxed) < shared.sent.load(Ordering::Relaxed)
            {
                clock
                    .tick(interrupted, || progress_rate("drain", &shared, &mut None))
                    .await?;
            }
            report.seconds = opts.duration;
        }
        Mode::Chat => {
            let c = &shared.chat;
            let join_end = Instant::now() + Duration::from_secs(20);
            while !c.started.load(Ordering::Acquire) && Instant::now() < join_end {
                clock
                    .tick(interrupted, || {
                        format!(
                            "joining: {}/{} subscribers in the room",
                            c.joined.load(Ordering::Relaxed),
                            c.subscribers.load(Ordering::Relaxed)
                        )
                    })
                    .await?;
            }
            let start = Instant::now();
            while start.elapsed() < warmup {
                clock
                    .tick(interrupted, || progress_chat("warmup", &shared, &mut None))
                    .await?;
            }
            let (d0, m0, cpu0, w0) = (
                c.deliveries.load(Ordering::Relaxed),
                c.completed.load(Ordering::Relaxed),
                own_cpu(),
                mono_ns(),
            );
            let start = Instant::now();
            let mut last = None;
            while start.elapsed() < duration {
                clock
                    .tick(interrupted, || progress_chat("chat", &shared, &mut last))
                    .await?;
            }
            report.seconds = start.elapsed().as_secs_f64();
            let (d1, m1, cpu1, w1) = (
                c.deliveries.load(Ordering::Relaxed),
                c.completed.load(Ordering::Relaxed),
                own_cpu(),
                mono_ns(),
            );
            report.messages = m1 - m0;
            report.bytes = (d1 - d0) * opts.size as u64;
            // Drain: no new messages; wait for the ones in flight.
            c.stop_sending.store(true, Ordering::Relaxed);
            let drain_end = Instant::now() + DRAIN_TIMEOUT + Duration::from_secs(1);
            while Instant::now() < drain_end
                && c.completed.load(Ordering::Acquire) < c.sent.load(Ordering::Acquire)
            {
                clock
                    .tick(interrupted, || progress_chat("drain", &shared, &mut None))
                    .await?;
            }
            report.chat = Some(ChatReport {
                subscribers: c.subscribers.load(Ordering::Relaxed),
                stalled: c.stalled.load(Ordering::Relaxed),
                window: opts.pipeline,
                joined: c.joined.load(Ordering::Relaxed),
                deliveries: d1 - d0,
                deliveries_per_s: (d1 - d0) as f64 / report.seconds.max(1e-9),
                client_cpu_s: cpu1 - cpu0,
                window_start_ns: w0,
                window_end_ns: w1,
                ..ChatReport::default()
            });
        }
        Mode::Idle => {
            let start = Instant::now();
            while start.elapsed() < duration {
                clock
                    .tick(interrupted, || {
                        format!(
                            "idle: {} open, {} failed",
                            shared.open.load(Ordering::Relaxed),
                            shared.failed.load(Ordering::Relaxed)
                        )
                    })
                    .await?;
            }
            report.seconds = start.elapsed().as_secs_f64();
        }
    }
    report.open_at_end = shared.open.load(Ordering::Relaxed);

    // Phase 3: close (the rate loop also charges unanswered messages here).
    let _ = phase_tx.send(Phase::Stop);
    // Chat: the stalled clients read what reached them (up to 5 s).
    let close_wait = if opts.mode == Mode::Chat { 8 } else { 3 };
    let _ = tokio::time::timeout(Duration::from_secs(close_wait), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    report.opened = shared.opened.load(Ordering::Relaxed);
    report.failed = shared.failed.load(Ordering::Relaxed);
    if opts.mode == Mode::Rate {
        // The measured window's messages, answered or not.
        report.messages = shared.messages.load(Ordering::Relaxed);
        report.bytes = shared.bytes.load(Ordering::Relaxed);
        report.sent = shared.sent.load(Ordering::Relaxed);
        report.timeouts = shared.timeouts.load(Ordering::Relaxed);
        let h = shared.latency.lock();
        let us = |ns: u64| ns as f64 / 1000.0;
        report.latency = Some(Latency {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        });
    }
    if report.seconds > 0.0 {
        report.msgs_per_s = report.messages as f64 / report.seconds;
        report.mb_per_s = report.bytes as f64 / report.seconds / 1e6;
    }
    if let Some(cr) = report.chat.as_mut() {
        let c = &shared.chat;
        cr.sent = c.sent.load(Ordering::Relaxed);
        cr.completed = c.completed.load(Ordering::Relaxed);
        cr.stalls = c.stalls.load(Ordering::Relaxed);
        cr.publisher_copies = c.copies.load(Ordering::Relaxed);
        cr.tally = c.final_tally();
    }
    report.errors = shared.errors.lock().clone();
    Ok(report)
}

/// This process's CPU seconds (user + system).
fn own_cpu() -> f64 {
    // SAFETY: zeroed rusage is a valid out value; RUSAGE_SELF is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid `who` and out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Progress text for chat mode: deliveries and messages over the last second.
fn progress_chat(label: &str, shared: &Shared, last: &mut Option<(Instant, u64, u64)>) -> String {
    let c = &shared.chat;
    let now = Instant::now();
    let d = c.deliveries.load(Ordering::Relaxed);
    let m = c.completed.load(Ordering::Relaxed);
    let text = match *last {
        Some((t, d0, m0)) => {
            let dt = now.duration_since(t).as_secs_f64().max(1e-9);
            format!(
                "{label}: {:.0} deliveries/s, {:.0} msgs/s, {} open, {} failed",
                (d - d0) as f64 / dt,
                (m - m0) as f64 / dt,
                shared.open.load(Ordering::Relaxed),
                shared.failed.load(Ordering::Relaxed)
            )
        }
        None => format!(
            "{label}: {d} deliveries, {m} messages done, {} open",
            shared.open.load(Ordering::Relaxed)
        ),
    };
    *last = Some((now, d, m));
    text
}

/// Progress text for the loaded modes: the rate over the last second.
fn progress_rate(label: &str, shared: &Shared, last: &mut Option<(Instant, u64, u64)>) -> String {
    let now = Instant::now();
    let m = shared
        .messages
        .load(Ordering::Relaxed)
        .max(shared.received.load(Ordering::Relaxed));
    let b = shared.bytes.load(Ordering::Relaxed);
    let text = match *last {
        Some((t, m0, b0)) => {
            let dt = now.duration_since(t).as_secs_f64().max(1e-9);
            format!(
                "{label}: {:.0} msgs/s, {:.1} MB/s, {} open, {} failed",
                (m - m0) as f64 / dt,
                (b - b0) as f64 / dt / 1e6,
                shared.open.load(Ordering::Relaxed),
                shared.failed.load(Ordering::Relaxed)
            )
        }
        None => format!(
            "{label}: {} open, {} failed",
            shared.open.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed)
        ),
    };
    *last = Some((now, m, b));
    text
}

/// The controller's 100 ms heartbeat: checks for an interrupt and prints a
/// progress line on stderr once a second.
struct Ticker {
    enabled: bool,
    start: Instant,
    next_print: Instant,
}

impl Ticker {
    fn new(enabled: bool) -> Ticker {
        let now = Instant::now();
        Ticker {
            enabled,
            start: now,
            next_print: now + Duration::from_secs(1),
        }
    }

    async fn tick(
        &mut self,
        interrupted: &dyn Fn() -> bool,
        line: impl FnOnce() -> String,
    ) -> Result<(), BenchError> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if interrupted() {
            return Err(BenchError::Interrupted);
        }
        let now = Instant::now();
        if self.enabled && now >= self.next_print {
            self.next_print += Duration::from_secs(1);
            eprintln!("[{:5.1}s] {}", (now - self.start).as_secs_f64(), line());
        }
        Ok(())
    }
}
