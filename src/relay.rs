//! The pub/sub backplane (`Config.pubsub = "redis://..."`): `server.publish` reaches
//! the subscribers of every server configured with the same Redis, through Redis
//! PUBLISH / SUBSCRIBE. Everything here runs on the server's tokio runtime; a remote
//! delivery never enters Python.
//!
//! - **Out.** [`Relay::publish`] (called by `Fanout::publish`, any thread) hands the
//!   already-encoded WebSocket frame to the publisher task through a bounded channel
//!   and returns: a publisher never waits for Redis. The task sends what has queued
//!   as one pipeline of `PUBLISH lightws:<topic> <header + frame>` on one connection,
//!   so per publisher and topic the order is kept.
//! - **In.** The subscriber task holds a second connection (RESP2 pub/sub mode) that
//!   is SUBSCRIBEd to `lightws:<topic>` exactly while this server has a local
//!   subscriber of the topic ([`Relay::watch`] / [`Relay::unwatch`], called by the
//!   fan-out registry when a topic appears or goes). A message is checked (header,
//!   one unmasked data frame of exactly the payload's length) and handed, as the same
//!   shared bytes, to the local fan-out path (`Fanout::publish_local`): remote servers
//!   never re-encode.
//! - **No duplicates.** Every payload starts with this server's random 16-byte id; a
//!   server skips its own messages on receipt (its local subscribers got them at
//!   once from the local publish).
//! - **Faults.** At-most-once. A connection that fails (an error, EOF, no PONG within
//!   [`PING_TIMEOUT`]) is dropped and reopened with exponential backoff
//!   ([`BACKOFF_MIN`] to [`BACKOFF_MAX`]); the subscriber re-SUBSCRIBEs every topic
//!   that has local subscribers. Messages published meanwhile are delivered locally
//!   and counted in `unrelayed`; each lost connection counts one `relay_errors`.
//!
//! Locks: `watch`/`unwatch` are called under the fan-out registry lock and only push
//! to an unbounded channel (no lock, no I/O); nothing here takes a fan-out or
//! connection lock except through `Fanout::publish_local`, from a task holding none.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;

use crate::fanout::Fanout;
use crate::server::ServerShared;
use crate::session::LogLevel;

/// Redis channel of topic `t`: `lightws:<t>`.
pub const CHANNEL_PREFIX: &str = "lightws:";
/// Payload header: magic, version, then the publishing server's id.
const MAGIC: [u8; 3] = *b"LW\x01";
const ID_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + ID_LEN;

/// Messages waiting for the publisher task; beyond this, publishes are counted in
/// `unrelayed` instead of queued (Redis slower than the publishers for that long).
const QUEUE: usize = 64 * 1024;
/// PUBLISHes sent as one pipeline at most.
const BATCH: usize = 512;
/// Opening a connection, and waiting for any reply.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// An idle connection is checked this often (a Redis that vanished without closing
/// the socket is found within PING_INTERVAL + PING_TIMEOUT).
const PING_INTERVAL: Duration = Duration::from_secs(1);
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A message for the publisher task.
struct Outgoing {
    topic: Box<str>,
    frame: Bytes,
}

/// A change of the local topics, in registry order.
enum Watch {
    Add(Arc<str>),
    Remove(Arc<str>),
}

impl Watch {
    fn topic(&self) -> &Arc<str> {
        match self {
            Watch::Add(t) | Watch::Remove(t) => t,
        }
    }
}

/// The Redis side of one server.
pub struct Relay {
    client: redis::Client,
    /// The URL with any password replaced by `***` (for messages).
    url: String,
    id: [u8; ID_LEN],
    out: mpsc::Sender<Outgoing>,
    out_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    watch: mpsc::UnboundedSender<Watch>,
    watch_rx: Mutex<Option<mpsc::UnboundedReceiver<Watch>>>,
    pub_up: AtomicBool,
    sub_up: AtomicBool,
    /// Connections to Redis lost or failed (each attempt that failed counts once).
    pub relay_errors: AtomicU64,
    /// Published messages that could not be handed to Redis.
    pub unrelayed: AtomicU64,
    /// Published messages Redis accepted.
    pub relayed: AtomicU64,
    /// Messages from other servers handed to the local fan-out.
    pub received: AtomicU64,
}

impl Relay {
    /// Check `url` (no I/O). The error is a sentence for `ValueError`.
    pub fn new(url: &str) -> Result<Self, String> {
        let shown = redact(url);
        const SCHEMES: [&str; 5] = ["redis", "valkey", "unix", "redis+unix", "valkey+unix"];
        if !url
            .split_once("://")
            .is_some_and(|(scheme, _)| SCHEMES.contains(&scheme))
        {
            return Err(format!(
                "Config.pubsub must be a redis://[user:password@]host:port[/db] URL \
                 (or redis+unix:///path), got {shown:?}"
            ));
        }
        let client = redis::Client::open(url)
            .map_err(|e| format!("Config.pubsub: invalid URL {shown:?}: {e}"))?;
        let (out, out_rx) = mpsc::channel(QUEUE);
        let (watch, watch_rx) = mpsc::unbounded_channel();
        Ok(Self {
            client,
            url: shown,
            id: random_id(),
            out,
            out_rx: Mutex::new(Some(out_rx)),
            watch,
            watch_rx: Mutex::new(Some(watch_rx)),
            pub_up: AtomicBool::new(false),
            sub_up: AtomicBool::new(false),
            relay_errors: AtomicU64::new(0),
            unrelayed: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
            received: AtomicU64::new(0),
        })
    }

    /// The URL as shown in messages (password hidden).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// "connected" when both connections are up (and every local topic subscribed),
    /// else "reconnecting".
    pub fn state(&self) -> &'static str {
        if self.pub_up.load(Ordering::Acquire) && self.sub_up.load(Ordering::Acquire) {
            "connected"
        } else {
            "reconnecting"
        }
    }

    /// Open both connections (blocking the caller, not the loop: `Core.start` runs it
    /// with the GIL released), then start the publisher and subscriber tasks. An error
    /// names the URL.
    pub fn start(
        self: &Arc<Self>,
        rt: &tokio::runtime::Runtime,
        fanout: Arc<Fanout>,
        srv: Arc<ServerShared>,
    ) -> Result<(), String> {
        let (conn, (sink, stream)) = rt
            .block_on(async {
                tokio::try_join!(self.connect_publisher(), self.connect_subscriber())
            })
            .map_err(|e| format!("cannot connect to the pub/sub backplane {}: {e}", self.url))?;
        let out_rx = self.out_rx.lock().take();
        let watch_rx = self.watch_rx.lock().take();
        let (Some(out_rx), Some(watch_rx)) = (out_rx, watch_rx) else {
            return Err("the pub/sub relay was already started".into());
        };
        self.pub_up.store(true, Ordering::Release);
        self.sub_up.store(true, Ordering::Release);
        rt.spawn(self.clone().publisher(conn, out_rx, srv.clone()));
        rt.spawn(
            self.clone()
                .subscriber((sink, stream), watch_rx, fanout, srv),
        );
        Ok(())
    }

    /// Hand `frame` (a complete data frame) for `topic` to the publisher task. Never
    /// waits; a full queue counts the message in `unrelayed`.
    pub fn publish(&self, topic: &str, frame: Bytes) {
        let msg = Outgoing {
            topic: topic.into(),
            frame,
        };
        if self.out.try_send(msg).is_err() {
            self.unrelayed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `topic` got its first local subscriber: SUBSCRIBE its channel.
    pub fn watch(&self, topic: Arc<str>) {
        let _ = self.watch.send(Watch::Add(topic));
    }

    /// `topic` lost its last local subscriber: UNSUBSCRIBE.
    pub fn unwatch(&self, topic: Arc<str>) {
        let _ = self.watch.send(Watch::Remove(topic));
    }

    async fn connect_publisher(&self) -> redis::RedisResult<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(PING_TIMEOUT));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        // The connection is only known good once the server has answered.
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(conn)
    }

    async fn connect_subscriber(&self) -> redis::RedisResult<(PubSubSink, PubSubStream)> {
        let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| timed_out("connect"))??;
        Ok(pubsub.split())
    }

    /// Send what the publishers queue, one pipeline per batch; reconnect when the
    /// connection fails.
    async fn publisher(
        self: Arc<Self>,
        conn: MultiplexedConnection,
        mut rx: mpsc::Receiver<Outgoing>,
        srv: Arc<ServerShared>,
    ) {
        let mut conn = Some(conn);
        let mut backoff = BACKOFF_MIN;
        let mut batch = Vec::with_capacity(BATCH);
        let mut payload = Vec::new();
        loop {
            let Some(c) = conn.as_mut() else {
                // Down: wait, counting what is published meanwhile, then try again.
                if self.drain_for(&mut rx, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                match self.connect_publisher().await {
                    Ok(c) => {
                        conn = Some(c);
                        backoff = BACKOFF_MIN;
                        self.pub_up.store(true, Ordering::Release);
                        self.log_state(&srv);
                    }
                    Err(_) => {
                        self.relay_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            };
            let failed = tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return; // the server is gone
                    }
                    let mut pipe = redis::pipe();
                    for m in &batch {
                        payload.clear();
                        payload.extend_from_slice(&MAGIC);
                        payload.extend_from_slice(&self.id);
                        payload.extend_from_slice(&m.frame);
                        pipe.cmd("PUBLISH")
                            .arg(format!("{CHANNEL_PREFIX}{}", m.topic))
                            .arg(&payload[..])
                            .ignore();
                    }
                    let r = pipe.query_async::<()>(c).await;
                    let n = batch.len() as u64;
                    batch.clear();
                    match r {
                        Ok(()) => {
                            self.relayed.fetch_add(n, Ordering::Relaxed);
                            None
                        }
                        Err(e) => {
                            self.unrelayed.fetch_add(n, Ordering::Relaxed);
                            Some(e)
                        }
                    }
                }
                _ = tokio::time::sleep(PING_INTERVAL) => {
                    redis::cmd("PING").query_async::<()>(c).await.err()
                }
            };
            if let Some(e) = failed {
                conn = None;
                self.pub_up.store(false, Ordering::Release);
                self.relay_errors.fetch_add(1, Ordering::Relaxed);
                srv.log(LogLevel::Warn, None, || {
                    format!(
                        "pub/sub backplane {}: publishing connection lost ({e}); reconnecting",
                        self.url
                    )
                });
            }
        }
    }

    /// Wait `pause`, counting messages published meanwhile as unrelayed. True if the
    /// channel closed (the server is gone).
    async fn drain_for(&self, rx: &mut mpsc::Receiver<Outgoing>, pause: Duration) -> bool {
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        let mut lost = Vec::new();
        loop {
            tokio::select! {
                _ = &mut sleep => return false,
                n = rx.recv_many(&mut lost, BATCH) => {
                    if n == 0 {
                        return true;
                    }
                    self.unrelayed.fetch_add(n as u64, Ordering::Relaxed);
                    lost.clear();
                }
            }
        }
    }

    /// Keep the SUBSCRIBEd channels equal to the local topics and hand what arrives to
    /// the local fan-out; reconnect and re-subscribe when the connection fails.
    async fn subscriber(
        self: Arc<Self>,
        first: (PubSubSink, PubSubStream),
        mut watch: mpsc::UnboundedReceiver<Watch>,
        fanout: Arc<Fanout>,
        srv: Arc<ServerShared>,
    ) {
        // The topics with local subscribers, as of the changes received so far.
        let mut topics: HashSet<Arc<str>> = HashSet::new();
        let mut next = Some(first);
        let mut backoff = BACKOFF_MIN;
        let mut changes = Vec::new();
        loop {
            let (mut sink, mut stream) = match next.take() {
                Some(c) => c,
                None => {
                    // Down: keep following the local topics while waiting.
                    let sleep = tokio::time::sleep(backoff);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            n = watch.recv_many(&mut changes, 1024) => {
                                if n == 0 {
                                    return;
                                }
                                apply(&mut topics, changes.drain(..));
                            }
                        }
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    match self.connect_subscriber().await {
                        Ok(c) => c,
                        Err(_) => {
                            self.relay_errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
            };
            // Changes that arrived while (re)connecting, then every topic at once.
            while let Ok(c) = watch.try_recv() {
                apply(&mut topics, std::iter::once(c));
            }
            let all: Vec<Arc<str>> = topics.iter().cloned().collect();
            let resubscribed = subscribe(&mut sink, &all, true).await;
            let error = match resubscribed {
                Err(e) => Some(e),
                Ok(()) => {
                    if !self.sub_up.swap(true, Ordering::AcqRel) {
                        backoff = BACKOFF_MIN;
                        self.log_state(&srv);
                    }
                    self.follow(&mut sink, &mut stream, &mut watch, &mut topics, &fanout)
                        .await
                }
            };
            let Some(error) = error else {
                return; // the server is gone
            };
            self.sub_up.store(false, Ordering::Release);
            self.relay_errors.fetch_add(1, Ordering::Relaxed);
            srv.log(LogLevel::Warn, None, || {
                format!(
                    "pub/sub backplane {}: subscribing connection lost ({error}); reconnecting",
                    self.url
                )
            });
        }
    }

    /// The connected state of the subscriber: returns the error that ended it, or None
    /// when the server is gone.
    async fn follow(
        &self,
        sink: &mut PubSubSink,
        stream: &mut PubSubStream,
        watch: &mut mpsc::UnboundedReceiver<Watch>,
        topics: &mut HashSet<Arc<str>>,
        fanout: &Fanout,
    ) -> Option<redis::RedisError> {
        let mut changes = Vec::new();
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(m) => self.deliver(fanout, &m),
                    None => return Some(closed()),
                },
                n = watch.recv_many(&mut changes, 1024) => {
                    if n == 0 {
                        return None;
                    }
                    // The net change of the batch: a topic that came and went is no
                    // round trip at all.
                    let touched: HashSet<Arc<str>> =
                        changes.iter().map(|c| c.topic().clone()).collect();
                    let before: HashSet<Arc<str>> =
                        touched.iter().filter(|t| topics.contains(*t)).cloned().collect();
                    apply(topics, changes.drain(..));
                    let (mut add, mut remove) = (Vec::new(), Vec::new());
                    for t in touched {
                        match (before.contains(&t), topics.contains(&t)) {
                            (false, true) => add.push(t),
                            (true, false) => remove.push(t),
                            _ => {}
                        }
                    }
                    if let Err(e) = subscribe(sink, &add, true).await {
                        return Some(e);
                    }
                    if let Err(e) = subscribe(sink, &remove, false).await {
                        return Some(e);
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Some(e),
                        Err(_) => return Some(timed_out("PING")),
                    }
                }
            }
        }
    }

    /// A message from Redis: check it, skip our own, hand the frame to the fan-out.
    fn deliver(&self, fanout: &Fanout, m: &redis::Msg) {
        let Some(topic) = m.get_channel_name().strip_prefix(CHANNEL_PREFIX) else {
            return;
        };
        let payload = m.get_payload_bytes();
        if payload.len() < HEADER_LEN || payload[..MAGIC.len()] != MAGIC {
            return; // not ours: something else published on a lightws: channel
        }
        if payload[MAGIC.len()..HEADER_LEN] == self.id {
            return; // our own: delivered locally when it was published
        }
        let frame = &payload[HEADER_LEN..];
        if !is_data_frame(frame) {
            return;
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        fanout.publish_local(topic, Bytes::copy_from_slice(frame), None);
    }

    fn log_state(&self, srv: &ServerShared) {
        if self.state() == "connected" {
            srv.log(LogLevel::Info, None, || {
                format!("pub/sub backplane {}: connected", self.url)
            });
        }
    }
}

/// SUBSCRIBE (or UNSUBSCRIBE) `topics`' channels. One command per channel, sent
/// together: redis-rs pairs each reply with one request, so a multi-channel command
/// (one reply per channel) would put its later replies on the wrong requests.
async fn subscribe(
    sink: &mut PubSubSink,
    topics: &[Arc<str>],
    on: bool,
) -> Result<(), redis::RedisError> {
    let requests = topics.iter().map(|t| {
        let mut sink = sink.clone();
        let channel = format!("{CHANNEL_PREFIX}{t}");
        async move {
            if on {
                sink.subscribe(channel).await
            } else {
                sink.unsubscribe(channel).await
            }
        }
    });
    let all = futures_util::future::try_join_all(requests);
    match tokio::time::timeout(
        PING_TIMEOUT + Duration::from_millis(topics.len() as u64),
        all,
    )
    .await
    {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(timed_out(if on { "SUBSCRIBE" } else { "UNSUBSCRIBE" })),
    }
}

fn apply(topics: &mut HashSet<Arc<str>>, changes: impl Iterator<Item = Watch>) {
    for c in changes {
        match c {
            Watch::Add(t) => {
                topics.insert(t);
            }
            Watch::Remove(t) => {
                topics.remove(&t);
            }
        }
    }
}

fn timed_out(what: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer to {what} within {PING_TIMEOUT:?}"),
    ))
}

fn closed() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection closed",
    ))
}

/// True if `f` is exactly one complete, unmasked, final TEXT or BINARY frame (what
/// `publish` encodes). Checked on receipt: whatever else appears on a `lightws:`
/// channel must not reach a client's byte stream.
pub fn is_data_frame(f: &[u8]) -> bool {
    let [b0, b1, rest @ ..] = f else {
        return false;
    };
    if !matches!(b0, 0x81 | 0x82) || b1 & 0x80 != 0 {
        return false;
    }
    let (len, rest) = match b1 & 0x7f {
        126 => match rest {
            [a, b, rest @ ..] => (u64::from(u16::from_be_bytes([*a, *b])), rest),
            _ => return false,
        },
        127 => match rest.split_first_chunk::<8>() {
            Some((n, rest)) => (u64::from_be_bytes(*n), rest),
            None => return false,
        },
        n => (u64::from(n), rest),
    };
    rest.len() as u64 == len
}

/// 16 random bytes: this server's id in the payloads it publishes.
fn random_id() -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != ID_LEN as isize {
        // No getrandom(2): the process and the clock are unique enough between the
        // servers of one deployment.
        use std::hash::{BuildHasher, Hasher};
        let s = std::collections::hash_map::RandomState::new();
        let mut h = s.build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let a = h.finish();
        h.write_u64(a);
        id[..8].copy_from_slice(&a.to_le_bytes());
        id[8..].copy_from_slice(&h.finish().to_le_bytes());
    }
    id
}

/// `url` with the password (if any) replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(p) => p,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_header, OpCode};

    fn frame(op: OpCode, len: usize) -> Vec<u8> {
        let mut f = Vec::new();
        encode_header(&mut f, true, op, len as u64, None);
        f.resize(f.len() + len, b'x');
        f
    }

    #[test]
    fn data_frames_are_accepted_whatever_their_length_encoding() {
        for len in [0, 1, 125, 126, 65535, 65536, 200_000] {
            assert!(is_data_frame(&frame(OpCode::Text, len)), "{len}");
            assert!(is_data_frame(&frame(OpCode::Binary, len)), "{len}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        let f = frame(OpCode::Text, 300);
        assert!(!is_data_frame(&f[..f.len() - 1]), "short");
        assert!(!is_data_frame(&[f.clone(), vec![0]].concat()), "trailing");
        assert!(!is_data_frame(&frame(OpCode::Ping, 3)), "control");
        let mut masked = frame(OpCode::Text, 3);
        masked[1] |= 0x80;
        assert!(!is_data_frame(&masked), "masked");
        let mut unfinished = frame(OpCode::Text, 3);
        unfinished[0] &= 0x7f;
        assert!(!is_data_frame(&unfinished), "not FIN");
        assert!(!is_data_frame(b""));
        assert!(!is_data_frame(&[0x81]));
        assert!(!is_data_frame(&[0x81, 127, 0, 0]));
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact("redis://u:secret@h:1/2"), "redis://u:***@h:1/2");
        assert_eq!(redact("redis://:secret@h:1"), "redis://:***@h:1");
        assert_eq!(redact("redis://tok@h:1"), "redis://***@h:1");
    }

    #[test]
    fn urls_are_checked_without_connecting() {
        assert!(Relay::new("redis://127.0.0.1:1/0").is_ok());
        let e = Relay::new("http://u:pw@h:1").err().unwrap();
        assert!(e.contains("redis://") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn ids_differ() {
        assert_ne!(random_id(), random_id());
    }
}
