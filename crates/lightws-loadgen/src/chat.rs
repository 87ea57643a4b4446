//! `chat` mode: a fan-out (chat room) load.
//!
//! N *subscribers* and one *publisher* join the same room (every server under test
//! puts each connection in the room and relays every message from any client to the
//! whole room, sender included: the publisher is a member and gets its own copies
//! back; they are counted apart, not as deliveries). Optionally K *stalled* clients
//! join too: they complete the upgrade (with a small receive buffer,
//! [`STALLED_RCVBUF`]) and never read a byte until the run is over, then read
//! whatever reached them (what a never-reading client got).
//!
//! The publisher sends messages carrying a sequence number (payload bytes 0..8, little
//! endian) and keeps `window` of them in flight. A message is *done* when **every
//! subscriber has it** (a per-message counter that the subscribers count down; the
//! last one wakes the publisher), not when the publisher's own copy comes back: the
//! own copy says only that the server *queued* the message to everyone (a server walks
//! its room in some order; one that queues faster than it writes would be credited
//! with deliveries that have not happened and would grow its queues without bound).
//! So messages/s is a closed loop over the slowest subscriber, and deliveries/s is
//! what the clients really read.
//!
//! Before the sequence starts, the publisher sends *probes* (sequence number with the
//! top bit set), one at a time (the next when its own copy of the last is back, and
//! at most every 20 ms, so a slow server does not pile them up), until every
//! subscriber has seen one: then every subscriber is known to be in the room, and each
//! must get every numbered message after that.
//! Each subscriber checks its sequence: a gap counts as missing until (if ever) the
//! message comes (then it was out of order); a number seen twice is a duplicate; at
//! the end, numbers sent but never received are missing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};

use super::client::{wait_running, Conn};
use super::{Options, Phase, Shared};
use lightws_proto::frame::{self, Event};
use lightws_proto::mask::random_mask;

/// Messages in flight are tracked in a ring of this many counters (the window must
/// be at most half of it).
pub const RING: usize = 4096;
/// Sequence numbers with this bit are probes (before the measured sequence).
const PROBE: u64 = 1 << 63;
/// Probe period while waiting for every subscriber to join.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// A probe whose own copy has not come back is sent again after this long.
const PROBE_RETRY: Duration = Duration::from_secs(1);
/// Give up waiting for every subscriber to see a probe after this long.
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// The publisher gives up on a message no subscriber has acknowledged for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Subscribers' read buffer: they receive small frames.
const SUB_CHUNK: usize = 8 * 1024;
/// Gaps a subscriber remembers (to tell out-of-order from missing).
const MAX_GAPS: usize = 100_000;
/// SO_RCVBUF of a never-reading client (the kernel doubles it).
pub const STALLED_RCVBUF: u32 = 4096;
/// A stalled client stops reading after this long without data at the end.
const STALLED_QUIET: Duration = Duration::from_millis(500);
/// ... and after this long in total.
const STALLED_READ_LIMIT: Duration = Duration::from_secs(5);

/// What a connection of a chat run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Reads and checks every message.
    Subscriber,
    /// Upgrades and never reads until the end.
    Stalled,
    /// Sends the numbered messages.
    Publisher,
}

/// The role of connection `index` (stalled ones first, so they join the room early;
/// then the subscribers; the publisher is the last index).
pub fn role(opts: &Options, index: usize) -> Role {
    if index < opts.stalled {
        Role::Stalled
    } else if index < opts.stalled + opts.connections {
        Role::Subscriber
    } else {
        Role::Publisher
    }
}

/// What the stalled clients found when they finally read.
#[derive(Clone, Debug, Default)]
pub struct StalledTally {
    /// Stalled clients that completed the upgrade.
    pub opened: u64,
    /// Data messages they had received in all.
    pub messages: u64,
    /// Fewest / most messages one of them had.
    pub min_messages: u64,
    pub max_messages: u64,
    /// Close frames received, by code (0: close frame without a code).
    pub close_codes: BTreeMap<u16, u64>,
    /// Connections the server ended (EOF or reset) without a close frame reaching us.
    pub ended_without_close: u64,
    /// Connections still open, nothing more to read, at the end.
    pub still_open: u64,
}

/// The subscribers' end-of-run check.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Subscribers that reported.
    pub subscribers: u64,
    /// Subscribers that got every message exactly once, in order.
    pub complete: u64,
    /// Messages (over all subscribers) sent and never received.
    pub missing: u64,
    /// Messages received twice.
    pub duplicated: u64,
    /// Messages received after a later one.
    pub out_of_order: u64,
    /// Fewest / most numbered messages one subscriber received.
    pub min_received: u64,
    pub max_received: u64,
    /// Subscribers whose connection ended before the run did.
    pub lost: u64,
    pub stalled: StalledTally,
}

/// State of a chat run shared by its connections and the controller.
pub struct ChatState {
    /// Per in-flight message: subscribers that have not received it yet.
    remaining: Box<[AtomicU32]>,
    /// The last subscriber of a message wakes the publisher.
    progress: Notify,
    /// Subscribers / stalled clients that completed the upgrade.
    pub subscribers: AtomicU64,
    pub stalled: AtomicU64,
    /// Subscribers that have seen a probe.
    pub joined: AtomicU64,
    /// The numbered sequence has started (every subscriber joined, or the join timed out).
    pub started: AtomicBool,
    /// The controller asks the publisher to stop sending (the drain).
    pub stop_sending: AtomicBool,
    /// Numbered messages sent / done (every subscriber has it, or given up).
    pub sent: AtomicU64,
    pub completed: AtomicU64,
    /// Messages the publisher gave up waiting for ([`STALL_TIMEOUT`]).
    pub stalls: AtomicU64,
    /// Subscribers whose connection ended early: a message is done when at most this
    /// many subscribers still lack it.
    pub dead: AtomicU64,
    /// Numbered messages received by subscribers (first copy of each).
    pub deliveries: AtomicU64,
    /// Numbered messages the publisher got back (its own copies).
    pub copies: AtomicU64,
    pub tally: Mutex<Tally>,
}

impl ChatState {
    pub fn new() -> ChatState {
        ChatState {
            remaining: (0..RING).map(|_| AtomicU32::new(0)).collect(),
            progress: Notify::new(),
            subscribers: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            joined: AtomicU64::new(0),
            started: AtomicBool::new(false),
            stop_sending: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            tally: Mutex::new(Tally {
                min_received: u64::MAX,
                stalled: StalledTally {
                    min_messages: u64::MAX,
                    ..StalledTally::default()
                },
                ..Tally::default()
            }),
        }
    }

    /// A connection of `role` completed the upgrade.
    pub fn opened(&self, role: Role) {
        match role {
            Role::Subscriber => self.subscribers.fetch_add(1, Ordering::Relaxed),
            Role::Stalled => self.stalled.fetch_add(1, Ordering::Relaxed),
            Role::Publisher => 0,
        };
    }

    /// The tally with the "no sample" sentinels cleared.
    pub fn final_tally(&self) -> Tally {
        let mut t = self.tally.lock().clone();
        if t.subscribers == 0 {
            t.min_received = 0;
        }
        if t.stalled.opened == 0 {
            t.stalled.min_messages = 0;
        }
        t
    }

    fn slot(&self, seq: u64) -> &AtomicU32 {
        &self.remaining[(seq % RING as u64) as usize]
    }
}

impl Default for ChatState {
    fn default() -> Self {
        ChatState::new()
    }
}

/// Run connection `conn` in its `role` until the run stops.
pub(crate) async fn run<S: AsyncRead + AsyncWrite>(
    conn: &mut Conn<S>,
    role: Role,
    plan: &super::client::Plan,
    shared: &Shared,
    phase: watch::Receiver<Phase>,
) -> Result<(), String> {
    match role {
        Role::Subscriber => {
            conn.chunk = SUB_CHUNK;
            conn.inbuf.shrink_to(SUB_CHUNK);
            let mut check = SeqCheck::default();
            let result = subscriber(conn, shared, phase, &mut check).await;
            let chat = &shared.chat;
            if result.is_err() {
                chat.dead.fetch_add(1, Ordering::Relaxed);
                chat.progress.notify_one();
            }
            check.report(chat, result.is_err());
            result
        }
        Role::Stalled => stalled(conn, shared, phase).await,
        Role::Publisher => publisher(conn, plan, shared, phase).await,
    }
}

/// One subscriber's view of the sequence.
#[derive(Default)]
struct SeqCheck {
    /// The next number expected (one past the highest seen).
    next: u64,
    /// Numbers skipped and not seen since (at most [`MAX_GAPS`] remembered).
    gaps: std::collections::HashSet<u64>,
    /// Gaps not remembered.
    gaps_forgotten: u64,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    joined: bool,
}

impl SeqCheck {
    /// Account for message `seq`; true if it is its first copy.
    fn see(&mut self, seq: u64) -> bool {
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            for s in self.next..seq {
                if self.gaps.len() < MAX_GAPS {
                    self.gaps.insert(s);
                } else {
                    self.gaps_forgotten += 1;
                }
            }
            self.next = seq + 1;
        } else if self.gaps.remove(&seq) {
            self.out_of_order += 1;
        } else {
            self.duplicated += 1;
            return false;
        }
        self.received += 1;
        true
    }

    fn report(&self, chat: &ChatState, lost: bool) {
        let sent = chat.sent.load(Ordering::Relaxed);
        let missing = self.gaps.len() as u64 + self.gaps_forgotten + sent.saturating_sub(self.next);
        let mut t = chat.tally.lock();
        t.subscribers += 1;
        t.missing += missing;
        t.duplicated += self.duplicated;
        t.out_of_order += self.out_of_order;
        t.min_received = t.min_received.min(self.received);
        t.max_received = t.max_received.max(self.received);
        if lost {
            t.lost += 1;
        }
        if missing == 0 && self.duplicated == 0 && self.out_of_order == 0 {
            t.complete += 1;
        }
    }
}

/// What the payload of a numbered message starts with.
fn encode_seq(payload: &mut [u8], seq: u64) {
    payload[..8].copy_from_slice(&seq.to_le_bytes());
}

/// The first 8 bytes of a message, gathered over its chunks.
#[derive(Default)]
struct Head {
    bytes: [u8; 8],
    len: usize,
}

impl Head {
    /// Feed a data chunk; returns the sequence number when the message ends.
    fn feed(&mut self, payload: &[u8], first: bool, fin: bool) -> Option<Option<u64>> {
        if first {
            self.len = 0;
        }
        let take = (8 - self.len).min(payload.len());
        self.bytes[self.len..self.len + take].copy_from_slice(&payload[..take]);
        self.len += take;
        if !fin {
            return None;
        }
        Some((self.len == 8).then(|| u64::from_le_bytes(self.bytes)))
    }
}

/// Decode what is buffered; `on_msg` gets each whole message's number (None: a message
/// shorter than 8 bytes). Pings are answered. Returns true if the server's close came.
fn decode_all<S>(
    conn: &mut Conn<S>,
    head: &mut Head,
    mut on_msg: impl FnMut(Option<u64>),
) -> Result<Option<Option<u16>>, String> {
    let mut pos = 0;
    let mut closed = None;
    while pos < conn.inbuf.len() {
        let (n, event) = conn
            .dec
            .decode(&mut conn.inbuf[pos..])
            .map_err(|e| format!("protocol error from the server: {e}"))?;
        if n == 0 {
            break;
        }
        pos += n;
        match event {
            None | Some(Event::Pong(_)) => {}
            Some(Event::Data {
                payload,
                first,
                fin,
                ..
            }) => {
                if let Some(seq) = head.feed(payload, first, fin) {
                    on_msg(seq);
                }
            }
            Some(Event::Ping(p)) => {
                frame::encode_frame(
                    &mut conn.out,
                    true,
                    frame::OpCode::Pong,
                    p,
                    Some(random_mask()),
                );
            }
            Some(Event::Close { code, .. }) => {
                closed = Some(code);
                break;
            }
        }
    }
    conn.inbuf.drain(..pos);
    Ok(closed)
}

async fn subscriber<S: AsyncRead + AsyncWrite>(
    conn: &mut Conn<S>,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
    check: &mut SeqCheck,
) -> Result<(), String> {
    let chat = &shared.chat;
    let mut head = Head::default();
    loop {
        conn.reserve();
        tokio::select! {
            biased;
            r = phase.changed() => {
                if r.is_err() || *phase.borrow() == Phase::Stop {
                    return conn.close().await;
                }
            }
            r = conn.wr.write(&conn.out[conn.out_pos..]), if conn.pending() => {
                let n = r.map_err(|e| format!("write: {e}"))?;
                conn.wrote(n);
            }
            r = conn.rd.read_buf(&mut conn.inbuf) => {
                if r.map_err(|e| format!("read: {e}"))? == 0 {
                    return Err("the server closed the TCP connection".into());
                }
                let mut fresh = 0u64;
                let mut finished = false;
                let closed = decode_all(conn, &mut head, |seq| {
                    let Some(seq) = seq else { return };
                    if seq & PROBE != 0 {
                        if !check.joined {
                            check.joined = true;
                            chat.joined.fetch_add(1, Ordering::Relaxed);
                        }
                        return;
                    }
                    if check.see(seq) {
                        fresh += 1;
                        if chat.slot(seq).fetch_sub(1, Ordering::AcqRel) == 1 {
                            finished = true;
                        }
                    }
                })?;
                if fresh > 0 {
                    chat.deliveries.fetch_add(fresh, Ordering::Relaxed);
                }
                if finished {
                    chat.progress.notify_one();
                }
                if let Some(code) = closed {
                    return Err(format!("the server closed the WebSocket ({code:?})"));
                }
            }
        }
    }
}

async fn publisher<S: AsyncRead + AsyncWrite>(
    conn: &mut Conn<S>,
    plan: &super::client::Plan,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
) -> Result<(), String> {
    let chat = &shared.chat;
    if !wait_running(&mut phase).await {
        return conn.close().await;
    }
    let window = plan.opts.pipeline as u64;
    let subscribers = chat.subscribers.load(Ordering::Relaxed);
    let mut payload = plan.payload.clone();
    let mut head = Head::default();
    let mut probe: u64 = 0;
    // The last probe sent, while its own copy is not back.
    let mut probe_out: Option<(u64, Instant)> = None;
    let join_deadline = Instant::now() + JOIN_TIMEOUT;
    let mut started = false;
    let mut next: u64 = 0;
    let mut done: u64 = 0;
    let mut last_progress = Instant::now();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let all_in = chat.joined.load(Ordering::Relaxed) >= subscribers;
        if !started && (all_in || Instant::now() >= join_deadline) {
            started = true;
            chat.started.store(true, Ordering::Release);
            last_progress = Instant::now();
        }
        if started {
            // Messages every (live) subscriber has.
            let dead = chat.dead.load(Ordering::Relaxed);
            let before = done;
            while done < next && u64::from(chat.slot(done).load(Ordering::Acquire)) <= dead {
                done += 1;
            }
            let now = Instant::now();
            if done > before {
                last_progress = now;
            } else if done < next && now.duration_since(last_progress) >= STALL_TIMEOUT {
                chat.stalls.fetch_add(1, Ordering::Relaxed);
                done += 1;
                last_progress = now;
            }
            chat.completed.store(done, Ordering::Release);
            if !chat.stop_sending.load(Ordering::Relaxed) {
                while next - done < window {
                    chat.slot(next).store(subscribers as u32, Ordering::Release);
                    encode_seq(&mut payload, next);
                    frame::encode_frame(
                        &mut conn.out,
                        true,
                        plan.opcode,
                        &payload,
                        Some(random_mask()),
                    );
                    next += 1;
                }
                chat.sent.store(next, Ordering::Release);
            }
        }
        tokio::select! {
            biased;
            r = phase.changed() => {
                if r.is_err() || *phase.borrow() == Phase::Stop {
                    return conn.close().await;
                }
            }
            () = chat.progress.notified() => {}
            r = conn.wr.write(&conn.out[conn.out_pos..]), if conn.pending() => {
                let n = r.map_err(|e| format!("write: {e}"))?;
                conn.wrote(n);
            }
            r = conn.rd.read_buf(&mut conn.inbuf) => {
                if r.map_err(|e| format!("read: {e}"))? == 0 {
                    return Err("the server closed the TCP connection".into());
                }
                let mut copies = 0;
                let closed = decode_all(conn, &mut head, |seq| {
                    if let Some(seq) = seq {
                        if seq & PROBE != 0 {
                            if probe_out.is_some_and(|(p, _)| p == seq & !PROBE) {
                                probe_out = None;
                            }
                        } else {
                            copies += 1;
                        }
                    }
                })?;
                chat.copies.fetch_add(copies, Ordering::Relaxed);
                if let Some(code) = closed {
                    return Err(format!("the server closed the WebSocket ({code:?})"));
                }
            }
            _ = tick.tick() => {
                let due = probe_out.is_none_or(|(_, at)| at.elapsed() >= PROBE_RETRY);
                if !started && due {
                    encode_seq(&mut payload, PROBE | probe);
                    probe_out = Some((probe, Instant::now()));
                    probe += 1;
                    frame::encode_frame(
                        &mut conn.out, true, plan.opcode, &payload, Some(random_mask()),
                    );
                }
            }
        }
        conn.reserve();
    }
}

/// Never read until the run stops; then read what arrived and report it.
async fn stalled<S: AsyncRead + AsyncWrite>(
    conn: &mut Conn<S>,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
) -> Result<(), String> {
    loop {
        if *phase.borrow_and_update() == Phase::Stop {
            break;
        }
        if phase.changed().await.is_err() {
            break;
        }
    }
    let mut messages = 0u64;
    let mut head = Head::default();
    let mut close = None;
    let mut ended = false;
    let deadline = tokio::time::Instant::now() + STALLED_READ_LIMIT;
    loop {
        conn.reserve();
        let read = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + STALLED_QUIET),
            conn.rd.read_buf(&mut conn.inbuf),
        )
        .await;
        match read {
            Err(_) => break,
            Ok(Err(_)) | Ok(Ok(0)) => {
                ended = true;
                break;
            }
            Ok(Ok(_)) => {}
        }
        match decode_all(conn, &mut head, |_| messages += 1) {
            Ok(Some(code)) => {
                close = Some(code.unwrap_or(0));
                break;
            }
            Ok(None) => {}
            Err(_) => {
                ended = true;
                break;
            }
        }
    }
    {
        let mut t = shared.chat.tally.lock();
        let s = &mut t.stalled;
        s.opened += 1;
        s.messages += messages;
        s.min_messages = s.min_messages.min(messages);
        s.max_messages = s.max_messages.max(messages);
        match close {
            Some(code) => *s.close_codes.entry(code).or_default() += 1,
            None if ended => s.ended_without_close += 1,
            None => s.still_open += 1,
        }
    }
    let _ = conn.wr.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_check_tells_missing_duplicated_and_out_of_order() {
        let mut c = SeqCheck::default();
        for s in [0, 1, 3, 2, 2, 5] {
            c.see(s);
        }
        assert_eq!(c.next, 6);
        assert_eq!((c.received, c.duplicated, c.out_of_order), (5, 1, 1));
        assert_eq!(c.gaps.len(), 1); // 4
        let chat = ChatState::new();
        chat.sent.store(8, Ordering::Relaxed);
        c.report(&chat, false);
        let t = chat.final_tally();
        assert_eq!((t.missing, t.complete, t.subscribers), (3, 0, 1));
    }

    #[test]
    fn head_gathers_the_sequence_number_over_chunks() {
        let mut h = Head::default();
        let bytes = 0x0102_0304_0506_0708u64.to_le_bytes();
        assert_eq!(h.feed(&bytes[..3], true, false), None);
        assert_eq!(
            h.feed(&bytes[3..], false, true),
            Some(Some(0x0102_0304_0506_0708))
        );
        assert_eq!(h.feed(&bytes[..3], true, true), Some(None));
    }
}
