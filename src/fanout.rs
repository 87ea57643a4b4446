//! Topics, publish and broadcast: one frame encoded once, shared by reference among
//! every subscriber's outbound queue, fanned out on a tokio thread.
//!
//! - **Registry.** A topic name maps to a [`Topic`] holding its subscribers (an
//!   `IndexMap` by connection id: O(1) subscribe and unsubscribe). A topic with no
//!   subscriber is removed: it costs nothing. Subscriptions change on the loop thread
//!   only (`conn.subscribe`, `conn.unsubscribe`, a connection closing).
//! - **Publish.** `server.publish` (any thread) encodes the frame once into a
//!   [`Bytes`], counts the subscribers (an atomic, not a walk) and hands a job to the
//!   fan-out task: the caller's cost does not depend on how many subscribers there
//!   are. The task walks the subscribers and queues the shared frame on each
//!   ([`ConnShared::push_shared`]), applying the slow-consumer policy: a publisher
//!   never waits for a slow consumer.
//! - **Order.** Jobs are handled in the order they were queued, so one thread's
//!   publishes reach every subscriber in order. A connection's own frames queued while
//!   one of its topics has a publish still on its way are routed through the same
//!   task ([`Fanout::send_own`]), so sends and publishes reach it in call order.
//!
//! - **Backplane.** With `Config.pubsub` a [`Relay`] (relay.rs) is attached: a publish
//!   is also handed to it (for the other servers), a topic's first local subscriber
//!   makes it SUBSCRIBE the topic's Redis channel and the last one leaving makes it
//!   UNSUBSCRIBE. What it receives from other servers comes back through
//!   [`Fanout::publish_local`], the same path as a local publish.
//!
//! Locks: the registry lock, then a topic's subscriber lock, then (inside it) one
//! connection's outbox at a time. A connection lock is never held while taking a
//! topic or registry lock (lockcheck.rs, docs/architecture.md). The relay's hooks run
//! under the registry lock (so SUBSCRIBE/UNSUBSCRIBE follow the registry's order) and
//! only push to a channel: no I/O, no other lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use indexmap::IndexMap;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::deflate::{Compressor, Direction};
use crate::frame::OpCode;
use crate::relay::Relay;
pub use crate::shared::Topic;
use crate::shared::{Backpressure, ConnShared, Fanned, SharedItem};

/// Frames of a publish compressed for subscribers with server_no_context_takeover, one
/// per parameter set (window bits, level): compressed once, shared by reference.
type Compressed = Vec<((u8, u8), Bytes)>;

/// The item to queue for `conn`: the frame as encoded, or, when the connection
/// negotiated permessage-deflate and the message is at least `min_size`, compressed:
/// once per parameter set when the connection's server side has no context takeover
/// (with `cache`, the publish's), else by its own session (its own window).
fn fit(conn: &ConnShared, frame: &Bytes, cache: Option<&mut Compressed>) -> SharedItem {
    let Some(p) = conn.deflate else {
        return SharedItem::Frame(frame.clone());
    };
    // Our own frames: unmasked, FIN, a data opcode.
    let head = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return SharedItem::Frame(frame.clone()),
    };
    let op = match OpCode::from_u8(frame[0] & 0x0f) {
        Some(op @ (OpCode::Text | OpCode::Binary)) => op,
        _ => return SharedItem::Frame(frame.clone()),
    };
    let min = conn.cfg.deflate.map_or(usize::MAX, |d| d.min_size);
    if frame.len() - head < min {
        return SharedItem::Frame(frame.clone());
    }
    let payload = frame.slice(head..);
    match cache {
        Some(cache) if p.server_no_context_takeover => {
            let key = (p.server_max_window_bits, p.level);
            if let Some((_, f)) = cache.iter().find(|(k, _)| *k == key) {
                return SharedItem::Frame(f.clone());
            }
            let mut c = Compressor::new(
                Direction {
                    window_bits: p.server_max_window_bits,
                    no_context_takeover: true,
                },
                p.level,
            );
            let mut body = Vec::new();
            c.compress(&payload, &mut body);
            let mut f = Vec::with_capacity(crate::frame::MAX_HEADER_LEN + body.len());
            crate::frame::encode_frame(&mut f, true, op, &body, None);
            f[0] |= 0x40; // RSV1: compressed (RFC 7692 6)
            let f = Bytes::from(f);
            cache.push((key, f.clone()));
            SharedItem::Frame(f)
        }
        _ => SharedItem::Compress(op, payload),
    }
}

/// Jobs taken from the channel at a time (publishes queued in one wake-up).
const BATCH: usize = 256;

enum Job {
    Publish {
        topic: Arc<Topic>,
        frame: Bytes,
        exclude: Option<u64>,
    },
    /// A connection's own frame, routed through the task to keep its order; `drain`:
    /// a Drained event must follow once it is queued ([`ConnShared::push_own`]).
    Own {
        conn: Arc<ConnShared>,
        frame: Bytes,
        drain: bool,
    },
    /// A broadcast frame for one connection, routed likewise.
    Shared { conn: Arc<ConnShared>, frame: Bytes },
}

/// The topics of one server and its fan-out task.
pub struct Fanout {
    topics: Mutex<HashMap<Arc<str>, Arc<Topic>>>,
    tx: OnceLock<mpsc::UnboundedSender<Job>>,
    policy: Backpressure,
    subscriptions: AtomicUsize,
    /// Fanned-out frames skipped for a connection over `max_backpressure` ("drop").
    pub dropped: AtomicU64,
    /// Connections closed with 1013 for going over `max_backpressure` ("close").
    pub backpressure_closes: AtomicU64,
    /// The Redis backplane (`Config.pubsub`), if any.
    relay: Option<Arc<Relay>>,
}

impl Fanout {
    pub fn new(policy: Backpressure, relay: Option<Arc<Relay>>) -> Self {
        Self {
            relay,
            topics: Mutex::new(HashMap::new()),
            tx: OnceLock::new(),
            policy,
            subscriptions: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            backpressure_closes: AtomicU64::new(0),
        }
    }

    /// Start the fan-out task on the server's runtime (once, at `Server.start`).
    pub fn start(self: &Arc<Self>, rt: &tokio::runtime::Runtime) {
        let (tx, rx) = mpsc::unbounded_channel();
        if self.tx.set(tx).is_ok() {
            rt.spawn(self.clone().run(rx));
        }
    }

    /// The Redis backplane, if `Config.pubsub` is set.
    pub fn relay(&self) -> Option<&Arc<Relay>> {
        self.relay.as_ref()
    }

    /// Topics with at least one subscriber.
    pub fn topics(&self) -> usize {
        self.topics.lock().len()
    }

    /// Subscriptions over all topics.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    pub fn subscribers(&self, name: &str) -> usize {
        self.topics.lock().get(name).map_or(0, |t| t.subscribers())
    }

    /// Subscribe `conn`; returns the topic if it was not subscribed yet.
    pub fn subscribe(&self, conn: &Arc<ConnShared>, name: &str) -> Option<Arc<Topic>> {
        let topic = {
            let mut topics = self.topics.lock();
            match topics.get(name) {
                Some(t) => t.clone(),
                None => {
                    let name: Arc<str> = Arc::from(name);
                    let t = Arc::new(Topic {
                        name: name.clone(),
                        subs: Mutex::new(IndexMap::new()),
                        count: AtomicUsize::new(0),
                        in_flight: AtomicUsize::new(0),
                    });
                    topics.insert(name.clone(), t.clone());
                    if let Some(relay) = &self.relay {
                        relay.watch(name);
                    }
                    t
                }
            }
        };
        let added = topic.subs.lock().insert(conn.id, conn.clone()).is_none();
        if !added {
            return None;
        }
        topic.count.fetch_add(1, Ordering::Relaxed);
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
        Some(topic)
    }

    /// Unsubscribe connection `id` from `topic`; a topic left without subscribers is
    /// removed from the registry.
    pub fn unsubscribe(&self, id: u64, topic: &Arc<Topic>) {
        let (removed, empty) = {
            let mut subs = topic.subs.lock();
            let removed = subs.swap_remove(&id);
            (removed, subs.is_empty())
        };
        if removed.is_none() {
            return;
        }
        drop(removed);
        topic.count.fetch_sub(1, Ordering::Relaxed);
        self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        if empty {
            let mut topics = self.topics.lock();
            if let Some(t) = topics.get(&topic.name) {
                if Arc::ptr_eq(t, topic) && topic.subscribers() == 0 {
                    topics.remove(&topic.name);
                    if let Some(relay) = &self.relay {
                        relay.unwatch(topic.name.clone());
                    }
                }
            }
        }
    }

    /// Queue `frame` to every subscriber of `name` except connection `exclude` (and,
    /// with a backplane, hand it to the relay for the other servers, where `exclude`
    /// does not apply); returns how many local subscribers it goes to.
    pub fn publish(&self, name: &str, frame: Bytes, exclude: Option<(u64, bool)>) -> usize {
        if let Some(relay) = &self.relay {
            relay.publish(name, frame.clone());
        }
        self.publish_local(name, frame, exclude)
    }

    /// Queue `frame` to every local subscriber of `name` except connection `exclude`;
    /// returns how many subscribers it goes to. The walk happens on the fan-out task.
    pub fn publish_local(&self, name: &str, frame: Bytes, exclude: Option<(u64, bool)>) -> usize {
        let topic = match self.topics.lock().get(name) {
            Some(t) => t.clone(),
            None => return 0,
        };
        let excluded = matches!(exclude, Some((_, true)));
        let count = topic.subscribers().saturating_sub(usize::from(excluded));
        if count == 0 {
            return 0;
        }
        let Some(tx) = self.tx.get() else {
            return 0;
        };
        topic.in_flight.fetch_add(1, Ordering::AcqRel);
        let job = Job::Publish {
            topic: topic.clone(),
            frame,
            exclude: exclude.map(|(id, _)| id),
        };
        if tx.send(job).is_err() {
            // The runtime is shutting down: nothing will be written any more.
            topic.in_flight.fetch_sub(1, Ordering::AcqRel);
            return 0;
        }
        count
    }

    /// Queue one connection's own frame behind the publishes already on their way. Its
    /// bytes count in `unsent` from now on, not from when the task queues it, so that
    /// sends made faster than the task runs still see them (`write_limit`,
    /// `max_backpressure`). `drain`: see [`ConnShared::push_own`].
    pub fn send_own(&self, conn: Arc<ConnShared>, frame: Bytes, drain: bool) {
        conn.unsent.fetch_add(frame.len(), Ordering::Relaxed);
        conn.fenced.fetch_add(1, Ordering::AcqRel);
        let Some(tx) = self.tx.get() else {
            conn.fenced.fetch_sub(1, Ordering::AcqRel);
            return conn.push_own(frame, drain);
        };
        if let Err(mpsc::error::SendError(Job::Own { conn, frame, drain })) =
            tx.send(Job::Own { conn, frame, drain })
        {
            conn.fenced.fetch_sub(1, Ordering::AcqRel);
            conn.push_own(frame, drain);
        }
    }

    /// Queue a broadcast frame on one connection, behind what is on its way to it.
    /// True if it was queued (or is on its way).
    pub fn send_shared(&self, conn: &Arc<ConnShared>, frame: Bytes) -> bool {
        let Some(tx) = self.tx.get() else {
            return self.deliver(conn, frame);
        };
        conn.fenced.fetch_add(1, Ordering::AcqRel);
        let job = Job::Shared {
            conn: conn.clone(),
            frame,
        };
        if let Err(mpsc::error::SendError(Job::Shared { conn, frame })) = tx.send(job) {
            conn.fenced.fetch_sub(1, Ordering::AcqRel);
            return self.deliver(&conn, frame);
        }
        true
    }

    /// Queue a shared frame on one connection with the slow-consumer policy, counting
    /// what the policy did. True if it was queued.
    pub fn deliver(&self, conn: &ConnShared, frame: Bytes) -> bool {
        let item = fit(conn, &frame, None);
        self.count(conn.push_shared_item(item, Some(self.policy)))
    }

    /// Whether `len` more bytes may be queued on `conn` (`send_nowait`): over
    /// `max_backpressure` the policy applies and is counted, as for a fanned-out frame.
    pub fn admit(&self, conn: &ConnShared, len: usize) -> bool {
        if conn.unsent.load(Ordering::Relaxed) + len <= self.policy.max {
            return true;
        }
        if !self.policy.close {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let overflowed = {
            let mut ob = conn.outbox.lock();
            let first = !(ob.closed || ob.closing || ob.overflow);
            ob.overflow = true;
            first
        };
        if overflowed {
            conn.waker.wake();
            self.backpressure_closes.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    /// Count what the policy did; true if the frame was queued.
    fn count(&self, fanned: Fanned) -> bool {
        match fanned {
            Fanned::Queued | Fanned::QueuedWake => true,
            Fanned::Dropped => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
            Fanned::Overflowed => {
                self.backpressure_closes.fetch_add(1, Ordering::Relaxed);
                false
            }
            Fanned::Skipped => false,
        }
    }

    async fn run(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut batch = Vec::with_capacity(BATCH);
        // Connections that got their first frame in this batch: woken once it is all
        // queued. NOTE: waking each subscriber at its first publish made about half of
        // the writes carry a single frame (bench/chat.py, 10k subscribers: 4.7
        // deliveries per send against socketify's 8.1); a whole batch per wake-up
        // lets one writev carry every publish that was waiting.
        let mut wake: Vec<Arc<ConnShared>> = Vec::new();
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            for job in batch.drain(..) {
                match job {
                    Job::Publish {
                        topic,
                        frame,
                        exclude,
                    } => {
                        {
                            // Compressed once per parameter set for the subscribers
                            // without server context takeover (on this tokio thread).
                            let mut compressed = Compressed::new();
                            let subs = topic.subs.lock();
                            for (id, conn) in subs.iter() {
                                if Some(*id) == exclude {
                                    continue;
                                }
                                let item = fit(conn, &frame, Some(&mut compressed));
                                let fanned = conn.push_shared_deferred(item, Some(self.policy));
                                if fanned == Fanned::QueuedWake {
                                    wake.push(conn.clone());
                                }
                                self.count(fanned);
                            }
                        }
                        topic.in_flight.fetch_sub(1, Ordering::AcqRel);
                    }
                    Job::Own { conn, frame, drain } => {
                        conn.push_own(frame, drain);
                        conn.fenced.fetch_sub(1, Ordering::AcqRel);
                    }
                    Job::Shared { conn, frame } => {
                        self.deliver(&conn, frame);
                        conn.fenced.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            }
            for conn in wake.drain(..) {
                conn.waker.wake();
            }
        }
    }
}
