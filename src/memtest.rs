//! What an idle connection costs the Rust side, measured (tests only).
//!
//! A counting global allocator records, per allocation size, how many blocks are live,
//! counting only the allocations and frees made on a thread that asked to be tracked.
//! The test runs a real server (accept loop, handshake, driver) on a current-thread
//! runtime on such a thread, answers the handshakes itself in place of the loop thread,
//! opens idle connections from an untracked thread with blocking sockets, and prints
//! the live blocks each added connection leaves behind, by size. BENCHMARKS.md ("Memory
//! per idle connection, component by component") reads them with `size_of` of each
//! part: `cargo test --lib memtest -- --nocapture`.

use std::alloc::{GlobalAlloc, Layout};

use crate::alloc::Allocator;
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Live blocks per size in 16-byte steps up to `SMALL` bytes; bigger ones in the last.
const SMALL: usize = 16 * 1024;
const SLOTS: usize = SMALL / 16 + 1;

struct Counting;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicIsize = AtomicIsize::new(0);
static LIVE: [AtomicIsize; SLOTS] = [ZERO; SLOTS];
/// Bytes requested of the live blocks bigger than `SMALL`.
static BIG_BYTES: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
}

fn tracked() -> bool {
    TRACK.try_with(|t| t.get()).unwrap_or(false)
}

fn slot(size: usize) -> usize {
    size.div_ceil(16).min(SLOTS - 1)
}

fn note(layout: Layout, delta: isize) {
    if tracked() {
        LIVE[slot(layout.size())].fetch_add(delta, Ordering::Relaxed);
        if layout.size() > SMALL {
            BIG_BYTES.fetch_add(delta * layout.size() as isize, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call goes to the extension's allocator unchanged; only counters are
// added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout, 1);
        // SAFETY: same contract as ours.
        unsafe { Allocator.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout, 1);
        // SAFETY: same contract as ours.
        unsafe { Allocator.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(layout, -1);
        // SAFETY: same contract as ours.
        unsafe { Allocator.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(layout, -1);
        // SAFETY: the new layout is valid: same align, and the caller vouches for the size.
        note(
            unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) },
            1,
        );
        // SAFETY: same contract as ours.
        unsafe { Allocator.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Live block counts per slot, and the bytes of the big ones.
fn snapshot() -> (Vec<isize>, isize) {
    (
        LIVE.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
        BIG_BYTES.load(Ordering::Relaxed),
    )
}

/// A glibc malloc chunk for a request of `size` bytes: 8 bytes of header, 16-byte
/// steps, 32 at least.
fn chunk(size: usize) -> usize {
    (size + 8).div_ceil(16).max(2) * 16
}

/// The live blocks `n` connections added between two snapshots, per connection:
/// (size bound, blocks per connection), and the bytes requested and malloc'd per
/// connection.
fn per_conn(a: &(Vec<isize>, isize), b: &(Vec<isize>, isize), n: usize) -> String {
    let mut out = String::new();
    let (mut req, mut malloced) = (0f64, 0f64);
    for i in 0..SLOTS {
        let d = (b.0[i] - a.0[i]) as f64 / n as f64;
        if d.abs() < 0.05 {
            continue;
        }
        let size = i * 16;
        if i == SLOTS - 1 {
            let bytes = (b.1 - a.1) as f64 / n as f64;
            out += &format!("  > {SMALL} B: {d:.2} blocks, {bytes:.0} B\n");
            req += bytes;
            malloced += bytes;
        } else {
            out += &format!("  {:>5}-{size} B: {d:.2} blocks\n", size.saturating_sub(15));
            req += d * size as f64;
            malloced += d * chunk(size) as f64;
        }
    }
    out += &format!("  total: <= {req:.0} B requested, ~{malloced:.0} B in malloc chunks\n");
    out
}

const UPGRADE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// This process's `Anonymous:` memory (/proc/self/smaps_rollup), in KiB.
fn anonymous_kib() -> usize {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Open `n` WebSocket connections to `addr` and leave them idle.
fn open(addr: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(UPGRADE).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let k = s.read(&mut buf).unwrap();
                assert!(k > 0, "closed during the handshake");
                got.extend_from_slice(&buf[..k]);
            }
            assert!(
                got.starts_with(b"HTTP/1.1 101"),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            s
        })
        .collect()
}

/// Prints the live blocks of an idle plain-TCP connection, by size, as the server
/// holds them with nothing Python-side: the accept loop's task, the driver, the
/// registration, `ConnShared`. The handshake events are answered and dropped here
/// (the loop thread would keep the `ConnShared` in its `Connection`).
#[test]
fn idle_connection_blocks() {
    const ADDED: usize = 3000;
    use crate::server::{accept_loop, ServerShared};
    use crate::shared::{Event, EventHub, Reply};
    use crate::stats::Stats;

    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = std::thread::spawn(move || {
        TRACK.with(|t| t.set(true));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let srv = Arc::new(ServerShared {
                cfg: crate::server::probe_config(),
                hub: Arc::new(EventHub::new().unwrap()),
                stats: Arc::new(Stats::new()),
                tls: None,
                per_ip: None,
                on_loop: None,
            });
            let hub = srv.hub.clone();
            tokio::spawn(async move {
                let mut evs = Vec::new();
                loop {
                    hub.begin_drain();
                    hub.take(usize::MAX, &mut evs);
                    for ev in evs.drain(..) {
                        if let Event::Handshake(h) = ev {
                            let _ = h.reply.send(Reply::Accept {
                                headers: Vec::new(),
                                subprotocol: None,
                            });
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            accept_loop(listener, srv, stop_rx).await;
        });
    });
    let addr = addr_rx.recv().unwrap();
    let settle = || std::thread::sleep(Duration::from_millis(300));
    let warm = open(addr, 50);
    settle();
    let (a, anon_a) = (snapshot(), anonymous_kib());
    let more = open(addr, ADDED);
    settle();
    let (b, anon_b) = (snapshot(), anonymous_kib());
    eprintln!(
        "idle plain connection, live blocks per connection ({ADDED} added):\n{}  \
         Anonymous (smaps_rollup, whole process): {:.0} B per connection",
        per_conn(&a, &b, ADDED),
        (anon_b as f64 - anon_a as f64) * 1024.0 / ADDED as f64
    );
    drop((warm, more));
    stop_tx.send(true).unwrap();
    server.join().unwrap();
}

/// Prints the size of each part of a connection's state (BENCHMARKS.md).
#[test]
fn component_sizes() {
    use std::mem::size_of;
    let rows: &[(&str, usize)] = &[
        (
            "Driver<TcpStream>",
            size_of::<crate::conn::Driver<tokio::net::TcpStream>>(),
        ),
        ("  Session", size_of::<crate::session::Session>()),
        ("    Decoder", size_of::<crate::frame::Decoder>()),
        ("    OutQueue", size_of::<crate::outq::OutQueue>()),
        ("  TcpStream", size_of::<tokio::net::TcpStream>()),
        (
            "  Option<Pin<Box<Sleep>>>",
            size_of::<Option<std::pin::Pin<Box<tokio::time::Sleep>>>>(),
        ),
        (
            "tokio Sleep (boxed when a deadline is armed)",
            size_of::<tokio::time::Sleep>(),
        ),
        ("ConnShared", size_of::<crate::shared::ConnShared>()),
        (
            "  ConnMutex<Inbox>",
            size_of::<crate::lockcheck::ConnMutex<crate::shared::Inbox>>(),
        ),
        (
            "  ConnMutex<Outbox>",
            size_of::<crate::lockcheck::ConnMutex<crate::shared::Outbox>>(),
        ),
        (
            "  AtomicWaker",
            size_of::<futures_util::task::AtomicWaker>(),
        ),
        ("  SocketAddr", size_of::<SocketAddr>()),
        (
            "  Option<DeflateParams>",
            size_of::<Option<crate::deflate::DeflateParams>>(),
        ),
        ("InMsg", size_of::<crate::shared::InMsg>()),
        (
            "bridge Connection (Rust part)",
            size_of::<crate::bridge::Connection>(),
        ),
    ];
    for (name, size) in rows {
        eprintln!("{name:<48} {size:>5} B");
    }
}
