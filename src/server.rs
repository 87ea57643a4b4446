//! Listener, per-connection task (TLS, HTTP upgrade, then the frame driver), shutdown.
//!
//! Everything here runs on tokio threads and never touches Python: the handshake
//! callable is reached through the hub (an event plus a oneshot for the answer).

use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::{timeout_at, Instant};

use crate::conn::{Driver, Transport};
use crate::handshake::{self, HandshakeError, Upgrade};
use crate::onloop::{Adopted, Reactor};
use crate::security::{self, IpLimiter, IpNet, IpSlot, OriginPolicy};
use crate::session::{CloseInfo, LogLevel, ABNORMAL_CLOSURE};
use crate::shared::{
    Backpressure, ClosedGuard, ConnConfig, ConnShared, Event, EventHub, HandshakeEvent, LogEvent,
    Reply,
};
use crate::stats::Stats;
use crate::tls::CertStore;

/// Everything the server needs, validated (bridge.rs builds it from `lightws.Config`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: String,
    pub conn: Arc<ConnConfig>,
    pub sock_read_buffer: Option<usize>,
    pub sock_write_buffer: Option<usize>,
    pub http_read_buffer: usize,
    pub http_write_buffer: usize,
    pub handshake_read_timeout: Duration,
    pub handshake_write_timeout: Duration,
    pub tcp_keepalive: Option<Duration>,
    /// 0 = unlimited.
    pub max_connections: usize,
    /// Connections per client address (IPv4 address or IPv6 /64); 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<IpNet>,
    /// `Config.origins`; None admits any origin.
    pub origins: Option<OriginPolicy>,
    pub backlog: i32,
    pub threads: usize,
    pub http_fallback: bool,
    pub io_statistics: bool,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// The slow-consumer policy for fanned-out frames (publish, broadcast).
    pub backpressure: Backpressure,
    /// SO_REUSEPORT: several processes (`python -m lightws serve --workers N`) share
    /// the address and the kernel spreads new connections over them.
    pub reuse_port: bool,
    /// `Config.pubsub`: the Redis URL of the backplane (relay.rs), if any.
    pub pubsub: Option<String>,
}

/// State shared by the accept loop and every connection task.
pub struct ServerShared {
    pub cfg: ServerConfig,
    pub hub: Arc<EventHub>,
    pub stats: Arc<Stats>,
    pub tls: Option<(Arc<CertStore>, tokio_rustls::TlsAcceptor)>,
    /// Open connections per client address; None without `max_connections_per_ip`.
    pub per_ip: Option<IpLimiter>,
    /// `Config(threads=0)`: plain TCP connections are driven on the event-loop thread
    /// after the upgrade (onloop.rs).
    pub on_loop: Option<Arc<Reactor>>,
}

impl ServerShared {
    fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.cfg.trusted_proxies.iter().any(|net| net.contains(ip))
    }

    /// The per-address limit's verdict at accept. A direct peer is the client, so it is
    /// counted now and its connections pending in the TLS or HTTP handshake count too
    /// (that is what bounds one address's slowloris sockets). A trusted proxy speaks
    /// for many clients: the client is known only from the request head.
    fn admit_at_accept(&self, peer: SocketAddr) -> PerIp {
        match &self.per_ip {
            None => PerIp::Unlimited,
            Some(_) if self.is_trusted_proxy(peer.ip()) => PerIp::AfterHead,
            Some(limiter) => match limiter.acquire(peer.ip()) {
                Some(slot) => PerIp::Held(slot),
                None => PerIp::Refused,
            },
        }
    }

    pub fn log(&self, level: LogLevel, peer: Option<SocketAddr>, msg: impl FnOnce() -> String) {
        if level <= self.cfg.conn.log_level {
            self.hub.push(Event::Log(Box::new(LogEvent {
                level,
                conn: peer.map(|p| (0, p)),
                msg: msg(),
            })));
        }
    }
}

/// Resolve `"host:port"`; `":port"` means every interface.
pub fn parse_addr(addr: &str) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("addr {addr:?} must be \"host:port\" or \":port\""))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("addr {addr:?}: port {port:?} is not a number from 0 to 65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Ok(vec![SocketAddr::from(([0, 0, 0, 0], port))]);
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("addr {addr:?}: cannot resolve {host:?}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("addr {addr:?}: {host:?} resolves to no address"));
    }
    Ok(addrs)
}

/// Bind and listen (synchronously, so errors reach `start()` before anything runs).
pub fn bind(cfg: &ServerConfig) -> io::Result<std::net::TcpListener> {
    let addrs =
        parse_addr(&cfg.addr).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut last = None;
    for addr in addrs {
        match bind_one(cfg, addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no address to bind")))
}

fn bind_one(cfg: &ServerConfig, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if cfg.reuse_port {
        sock.set_reuse_port(true)?;
    }
    // Set before listen(): accepted sockets inherit them, and the receive buffer must be
    // known before the handshake for TCP window scaling. None keeps kernel autotuning.
    if let Some(n) = cfg.sock_read_buffer {
        sock.set_recv_buffer_size(n)?;
    }
    if let Some(n) = cfg.sock_write_buffer {
        sock.set_send_buffer_size(n)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(cfg.backlog)?;
    Ok(sock.into())
}

/// Accept until `stop` turns true.
pub async fn accept_loop(
    listener: TcpListener,
    srv: Arc<ServerShared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    // Counted here, in accept order: tasks may start in another order.
                    let per_ip = srv.admit_at_accept(peer);
                    let srv2 = srv.clone();
                    tokio::spawn(async move {
                        let fut = AssertUnwindSafe(handle(stream, peer, srv2.clone(), per_ip));
                        if let Err(p) = fut.catch_unwind().await {
                            let what = panic_message(&p);
                            srv2.log(LogLevel::Error, Some(peer), || format!("internal error (bug): {what}"));
                        }
                    });
                }
                Err(e) => {
                    srv.log(LogLevel::Error, None, || format!("accept failed: {e}"));
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}

/// Where a connection stands with `max_connections_per_ip`.
enum PerIp {
    /// No per-address limit.
    Unlimited,
    /// Counted; the slot is released when the connection's task drops it.
    Held(IpSlot),
    /// Over the limit: answered 429 once the request head is read.
    Refused,
    /// From a trusted proxy: counted for the `X-Forwarded-For` client after the head.
    AfterHead,
}

/// Counts a TCP connection for its whole life.
struct ConnCount(Arc<Stats>);

impl ConnCount {
    /// Hand the count over to an owner that ends it itself (`ConnTask`, through the
    /// connection's own `stats`): one pointer less in every connection's task.
    fn hand_over(self) {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the field is moved out exactly once and `this` is never dropped.
        drop(unsafe { std::ptr::read(&this.0) });
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.conn_closed();
    }
}

async fn handle(stream: TcpStream, peer: SocketAddr, srv: Arc<ServerShared>, per_ip: PerIp) {
    let count = srv.stats.conn_opened();
    let counted = ConnCount(srv.stats.clone());
    let _ = stream.set_nodelay(true);
    if let Some(idle) = srv.cfg.tcp_keepalive {
        let ka = TcpKeepalive::new().with_time(idle).with_interval(idle);
        let _ = SockRef::from(&stream).set_tcp_keepalive(&ka);
    }
    let over_limit = srv.cfg.max_connections > 0 && count as usize > srv.cfg.max_connections;
    // The handshake read timeout covers the TLS handshake and the HTTP request.
    let deadline = Instant::now() + srv.cfg.handshake_read_timeout;
    // NOTE: this task runs the handshake only. An upgraded connection continues in a
    // task of its own (`Upgraded::spawn`) whose future is the frame driver and nothing
    // else, so an idle connection holds one task allocation sized for the driver; the
    // handshake's state (the TLS branch, the request) went with this task. The
    // handshake phase is boxed so that this task stays small while it waits.
    match &srv.tls {
        None => {
            let up = Box::pin(upgrade(stream, peer, &srv, deadline, over_limit, per_ip)).await;
            if let Some(up) = up {
                match &srv.on_loop {
                    Some(reactor) => up.adopt(reactor, counted),
                    None => up.spawn(counted),
                }
            }
        }
        Some((_, acceptor)) => {
            let acceptor = acceptor.clone();
            Box::pin(serve_tls(
                stream, acceptor, peer, &srv, deadline, over_limit, per_ip, counted,
            ))
            .await;
        }
    }
}

type TlsConn = Box<tokio_rustls::server::TlsStream<TcpStream>>;

/// The TLS handshake, then as for plain TCP. Its own boxed future (not inline in
/// `handle`) so that the per-connection state it holds across the TLS handshake
/// (`per_ip`) does not grow every connection's task.
#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    peer: SocketAddr,
    srv: &Arc<ServerShared>,
    deadline: Instant,
    over_limit: bool,
    per_ip: PerIp,
    counted: ConnCount,
) {
    let accept = Box::pin(timeout_at(deadline, acceptor.accept(stream)));
    let mut tls: TlsConn = match accept.await {
        // Boxed: a rustls connection is about 1.2 KB, and the driver then holds
        // a pointer instead of a copy in each state of its future.
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => {
            return srv.log(LogLevel::Info, Some(peer), || {
                format!("TLS handshake failed: {e}")
            })
        }
        Err(_) => {
            return srv.log(LogLevel::Info, Some(peer), || {
                "TLS handshake not finished within handshake_read_timeout".into()
            })
        }
    };
    // Bound rustls' buffered outgoing plaintext; our own outbox does the queueing (and
    // the back-pressure) before it.
    tls.get_mut().1.set_buffer_limit(Some(64 * 1024));
    let up = Box::pin(upgrade(tls, peer, srv, deadline, over_limit, per_ip)).await;
    if let Some(up) = up {
        up.spawn(counted);
    }
}

/// A connection that completed the upgrade: what the frame driver needs.
struct Upgraded<S> {
    io: S,
    shared: Arc<ConnShared>,
    guard: ClosedGuard,
    leftover: Vec<u8>,
    /// The connection's place under `max_connections_per_ip`, held until the driver
    /// ends.
    slot: Option<IpSlot>,
}

impl<S: Transport> Upgraded<S> {
    fn into_task(self, counted: ConnCount) -> ConnTask<S> {
        let Upgraded {
            io,
            shared,
            guard,
            leftover,
            slot,
        } = self;
        shared.log(LogLevel::Debug, || "connection open".into());
        // The task reports the end itself (see `ConnTask`): one pointer less than the
        // guard with its room for the outcome.
        guard.disarm();
        counted.hand_over();
        ConnTask {
            driver: Driver::new(io, shared, leftover),
            _slot: slot.map(Box::new),
            reported: false,
        }
    }

    /// Run the connection in a task of its own.
    fn spawn(self, counted: ConnCount) {
        tokio::spawn(self.into_task(counted));
    }
}

/// The task of an upgraded connection: the driver, and what lives exactly as long as
/// it. A hand-written future (not an `async` block), so that the task stores the
/// driver once and nothing per await point. The end is reported to Python (as a
/// `ClosedGuard` would) when the driver finishes, or with 1006 when the task is
/// dropped unfinished (a panic, the runtime shutting down).
struct ConnTask<S> {
    driver: Driver<S>,
    /// The connection's place under `max_connections_per_ip` (boxed: 8 bytes, and an
    /// allocation only with that limit on).
    _slot: Option<Box<IpSlot>>,
    reported: bool,
}

impl<S: Transport> ConnTask<S> {
    fn report(&mut self, info: Option<CloseInfo>) {
        self.reported = true;
        drop(ClosedGuard {
            shared: self.driver.conn_shared().clone(),
            info,
        });
    }
}

impl<S: Transport> Future for ConnTask<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let polled =
            std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut this.driver).poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(outcome)) => {
                this.driver.conn_shared().log(LogLevel::Debug, || {
                    format!("connection closed: {} {:?}", outcome.code, outcome.reason)
                });
                this.report(Some(outcome));
                Poll::Ready(())
            }
            Err(p) => {
                let what = panic_message(&p);
                this.driver
                    .conn_shared()
                    .log(LogLevel::Error, || format!("internal error (bug): {what}"));
                this.report(None);
                Poll::Ready(())
            }
        }
    }
}

impl<S> Drop for ConnTask<S> {
    fn drop(&mut self) {
        let shared = self.driver.conn_shared();
        if !self.reported {
            drop(ClosedGuard {
                shared: shared.clone(),
                info: None,
            });
        }
        // What `ConnCount` would do (see `into_task`).
        shared.stats.conn_closed();
    }
}

impl Upgraded<TcpStream> {
    /// `Config(threads=0)`: hand the connection to the event-loop thread (onloop.rs);
    /// `count` and the per-address slot go with it, held until it closes.
    fn adopt(self, reactor: &Reactor, count: ConnCount) {
        let Upgraded {
            io,
            shared,
            guard,
            leftover,
            slot,
        } = self;
        // On failure the guard reports the connection closed.
        if let Ok(sock) = io.into_std() {
            reactor.adopt(Adopted {
                sock,
                shared,
                leftover,
                guard,
                hold: Box::new((slot, count)),
            });
        }
    }
}

impl Transport for TlsConn {}

/// Read one HTTP request head into `buf` (at most `max` bytes).
async fn read_head<S: Transport>(
    io: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<(handshake::Request, usize)>, HandshakeError> {
    loop {
        if let Some(done) = handshake::parse_request(buf, max)? {
            return Ok(Some(done));
        }
        if buf.len() >= max {
            return Err(HandshakeError::HeadTooLarge);
        }
        let room = max - buf.len();
        let start = buf.len();
        buf.resize(start + room.min(4096), 0);
        match io.read(&mut buf[start..]).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.truncate(start + n),
        }
    }
}

/// `" (via proxy a.b.c.d:p)"` when the client is not the TCP peer, for log lines.
fn via(peer: SocketAddr, client: SocketAddr) -> String {
    if peer == client {
        String::new()
    } else {
        format!(" (via proxy {peer})")
    }
}

async fn write_all_by<S: Transport>(io: &mut S, data: &[u8], deadline: Instant) -> bool {
    let fut = async {
        io.write_all(data).await?;
        io.flush().await
    };
    matches!(timeout_at(deadline, fut).await, Ok(Ok(())))
}

async fn respond<S: Transport>(
    io: &mut S,
    srv: &ServerShared,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) {
    let mut out = Vec::with_capacity(srv.cfg.http_write_buffer.min(body.len() + 256));
    handshake::write_response(&mut out, status, headers, body);
    let deadline = Instant::now() + srv.cfg.handshake_write_timeout;
    if write_all_by(io, &out, deadline).await {
        let _ = timeout_at(deadline, io.shutdown()).await;
    }
}

/// TLS is done; read the request, validate it, ask the handshake callable, answer.
/// Returns the connection if it was upgraded.
async fn upgrade<S: Transport>(
    mut io: S,
    peer: SocketAddr,
    srv: &Arc<ServerShared>,
    deadline: Instant,
    over_limit: bool,
    per_ip: PerIp,
) -> Option<Upgraded<S>> {
    let mut buf = Vec::with_capacity(srv.cfg.http_read_buffer.min(4096));
    let head = timeout_at(
        deadline,
        read_head(&mut io, &mut buf, srv.cfg.http_read_buffer),
    )
    .await;
    let (req, head_len) = match head {
        Err(_) => {
            srv.stats.handshake_failed();
            srv.log(LogLevel::Info, Some(peer), || {
                "request head not received within handshake_read_timeout".into()
            });
            return None;
        }
        Ok(Ok(None)) => return None, // closed before sending a request
        Ok(Err(e)) => {
            srv.stats.handshake_failed();
            srv.log(LogLevel::Info, Some(peer), || format!("bad request: {e}"));
            let r = e.rejection();
            respond(&mut io, srv, r.status, &r.headers, &r.body).await;
            return None;
        }
        Ok(Ok(Some(done))) => done,
    };
    // Bytes after the head are the start of the WebSocket stream: keep them.
    let leftover = buf[head_len..].to_vec();
    drop(buf);

    if over_limit {
        srv.stats.handshake_failed();
        srv.log(LogLevel::Info, Some(peer), || {
            "max_connections reached: 503".into()
        });
        let headers = vec![("Retry-After".to_owned(), "1".to_owned())];
        respond(&mut io, srv, 503, &headers, b"server is at max_connections").await;
        return None;
    }

    // Behind a trusted proxy the client is named by X-Forwarded-For. It becomes the
    // connection's remote address (port 0: proxies do not forward the client's port),
    // so `request.remote_address`, `conn.remote_address` and the logs show the client.
    let client = if srv.cfg.trusted_proxies.is_empty() {
        peer
    } else {
        let ip = security::forwarded_client(peer.ip(), &req, &srv.cfg.trusted_proxies);
        if ip == peer.ip().to_canonical() {
            peer
        } else {
            SocketAddr::new(ip, 0)
        }
    };
    let slot = match per_ip {
        PerIp::Unlimited => Ok(None),
        PerIp::Held(slot) => Ok(Some(slot)),
        PerIp::Refused => Err(()),
        PerIp::AfterHead => match srv.per_ip.as_ref().map(|l| l.acquire(client.ip())) {
            Some(Some(slot)) => Ok(Some(slot)),
            Some(None) => Err(()),
            None => Ok(None),
        },
    };
    let Ok(slot) = slot else {
        srv.stats.handshake_failed();
        srv.log(LogLevel::Info, Some(client), || {
            format!(
                "max_connections_per_ip ({}) reached for {}{}: 429",
                srv.cfg.max_connections_per_ip,
                client.ip(),
                via(peer, client)
            )
        });
        let body = b"too many connections from your address (max_connections_per_ip)";
        respond(&mut io, srv, 429, &[], body).await;
        return None;
    };

    let (key, subprotocols, upgrade) = match handshake::validate(&req) {
        Upgrade::WebSocket { key, subprotocols } => (key, subprotocols, true),
        Upgrade::Reject(r) => {
            srv.stats.handshake_failed();
            srv.log(LogLevel::Info, Some(peer), || {
                format!(
                    "rejected upgrade ({}): {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                )
            });
            respond(&mut io, srv, r.status, &r.headers, &r.body).await;
            return None;
        }
        Upgrade::NotUpgrade if srv.cfg.http_fallback => (String::new(), Vec::new(), false),
        Upgrade::NotUpgrade => {
            srv.stats.handshake_failed();
            let body = b"this is a WebSocket endpoint: expected an Upgrade: websocket request";
            respond(&mut io, srv, 400, &[], body).await;
            return None;
        }
    };

    // RFC 6455 section 10.2: an unacceptable Origin gets 403, here before the
    // handshake callable runs. Only upgrades are checked: a plain request shown through
    // http_fallback is ordinary HTTP, which browsers already confine (CORS).
    if let (true, Some(policy)) = (upgrade, &srv.cfg.origins) {
        if let Err(why) = policy.check(&req) {
            srv.stats.handshake_failed();
            srv.log(LogLevel::Info, Some(client), || {
                format!("refused upgrade (403): {why}{}", via(peer, client))
            });
            respond(&mut io, srv, 403, &[], b"origin not allowed").await;
            return None;
        }
    }

    // permessage-deflate (RFC 7692): agreed here, answered in the 101, before the
    // handshake callable runs (it sees the request's offer in its headers).
    let deflate = match (&srv.cfg.conn.deflate, upgrade) {
        (Some(dc), true) => {
            crate::deflate::negotiate(dc, req.headers_all("Sec-WebSocket-Extensions"))
        }
        _ => None,
    };
    let (extension, agreed) = match deflate {
        Some((header, params)) => (Some(header), Some(params)),
        None => (None, None),
    };
    let shared = ConnShared::with_deflate(
        client,
        srv.hub.clone(),
        srv.stats.clone(),
        srv.cfg.conn.clone(),
        agreed,
    );
    let mut guard = ClosedGuard {
        shared: shared.clone(),
        info: None,
    };
    let (tx, rx) = oneshot::channel();
    srv.hub.push(Event::Handshake(Box::new(HandshakeEvent {
        conn: shared.clone(),
        request: req,
        upgrade,
        subprotocols,
        reply: tx,
    })));
    let reply = match rx.await {
        Ok(r) => r,
        Err(_) => return None, // the server is shutting down
    };
    match reply {
        Reply::Respond {
            status,
            headers,
            body,
        } => {
            if upgrade {
                srv.stats.handshake_failed();
            }
            respond(&mut io, srv, status, &headers, &body).await;
            guard.info = Some(CloseInfo {
                code: ABNORMAL_CLOSURE,
                reason: String::new(),
            });
            None
        }
        Reply::Accept {
            mut headers,
            subprotocol,
        } => {
            if let Some(ext) = extension {
                // The server owns this header once it negotiated an extension.
                headers.retain(|(n, _)| !n.eq_ignore_ascii_case("Sec-WebSocket-Extensions"));
                headers.insert(0, ("Sec-WebSocket-Extensions".to_owned(), ext));
            }
            let mut out = Vec::with_capacity(256);
            handshake::write_accept(&mut out, &key, subprotocol.as_deref(), &headers);
            let wdeadline = Instant::now() + srv.cfg.handshake_write_timeout;
            if !write_all_by(&mut io, &out, wdeadline).await {
                srv.stats.handshake_failed();
                srv.log(LogLevel::Info, Some(peer), || {
                    "could not send the 101 response within handshake_write_timeout".into()
                });
                return None;
            }
            srv.stats.handshake_ok();
            Some(Upgraded {
                io,
                shared,
                guard,
                leftover,
                slot,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_only_addresses_bind_every_interface() {
        assert_eq!(
            parse_addr(":9001").unwrap(),
            vec![SocketAddr::from(([0, 0, 0, 0], 9001))]
        );
    }

    #[test]
    fn host_and_port_resolve() {
        assert_eq!(
            parse_addr("127.0.0.1:0").unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 0))]
        );
        assert!(parse_addr("[::1]:80").unwrap()[0].is_ipv6());
    }

    #[test]
    fn malformed_addresses_say_what_is_wrong() {
        assert!(parse_addr("9001").unwrap_err().contains("host:port"));
        assert!(parse_addr("h:99999").unwrap_err().contains("port"));
    }
}

/// A small valid configuration for tests (memtest.rs, size_tests below).
#[cfg(test)]
pub(crate) fn probe_config() -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".into(),
        conn: Arc::new(ConnConfig {
            session: Arc::new(crate::session::SessionConfig {
                role: crate::frame::Role::Server,
                max_msg_len: 1 << 20,
                close_timeout: Duration::from_secs(1),
                auto_pong: true,
                ping_interval: None,
                ping_timeout: None,
                idle_timeout: None,
                max_backlog: 3 << 16,
            }),
            ws_read_buffer: 4096,
            ws_write_buffer: 4096,
            write_limit: 1 << 16,
            inbox_limit: 1 << 16,
            log_level: LogLevel::Error,
            io_statistics: false,
            deflate: None,
        }),
        sock_read_buffer: None,
        sock_write_buffer: None,
        http_read_buffer: 4096,
        http_write_buffer: 4096,
        handshake_read_timeout: Duration::from_secs(1),
        handshake_write_timeout: Duration::from_secs(1),
        tcp_keepalive: None,
        max_connections: 0,
        max_connections_per_ip: 0,
        trusted_proxies: Vec::new(),
        origins: None,
        backlog: 16,
        threads: 1,
        http_fallback: false,
        io_statistics: false,
        cert_file: None,
        key_file: None,
        backpressure: Backpressure {
            max: 1 << 20,
            close: true,
        },
        reuse_port: false,
        pubsub: None,
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// SO_REUSEPORT is what lets the workers of `python -m lightws serve` share a port;
    /// without it a second bind fails as before.
    #[test]
    fn reuse_port_lets_listeners_share_an_address() {
        let mut cfg = probe_config();
        let first = bind(&cfg).unwrap();
        cfg.addr = first.local_addr().unwrap().to_string();
        assert!(bind(&cfg).is_err(), "a second plain bind must fail");
        drop(first);
        cfg.reuse_port = true;
        let a = bind(&cfg).unwrap();
        let b = bind(&cfg).unwrap();
        assert_eq!(a.local_addr().unwrap(), b.local_addr().unwrap());
    }

    /// The per-connection task is the bulk of the Rust memory of an idle connection:
    /// the handshake's task stays small while it waits (it was 8.7 KB with the TLS
    /// branch inline), and an upgraded connection's task is the driver plus a little.
    #[test]
    fn task_future_stays_small() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stream = TcpStream::connect(addr).await.unwrap();
            let srv = Arc::new(ServerShared {
                cfg: probe_config(),
                hub: Arc::new(EventHub::new().unwrap()),
                stats: Arc::new(Stats::new()),
                tls: None,
                per_ip: None,
                on_loop: None,
            });
            let (server_side, _) = listener.accept().await.unwrap();
            let task = std::mem::size_of_val(&handle(stream, addr, srv.clone(), PerIp::Unlimited));
            let shared = ConnShared::new(
                addr,
                srv.hub.clone(),
                srv.stats.clone(),
                srv.cfg.conn.clone(),
            );
            let up = Upgraded {
                io: server_side,
                shared: shared.clone(),
                guard: ClosedGuard { shared, info: None },
                leftover: Vec::new(),
                slot: None,
            };
            let conn_task = std::mem::size_of_val(&up.into_task(ConnCount(srv.stats.clone())));
            let driver = std::mem::size_of::<Driver<TcpStream>>();
            eprintln!("handshake task {task} B, connection task {conn_task} B, driver {driver} B");
            assert!(task <= 320, "handshake task future {task} B");
            // NOTE: tokio's task cell is the future plus 104 bytes (header, scheduler,
            // id, stage tag, trailer), cache-line aligned: 128-byte steps on x86_64. At
            // 280 bytes or less the cell is 384 bytes; 8 more and it is 512
            // (memtest.rs measures the blocks). Debug builds of tokio are bigger.
            assert!(
                conn_task <= driver + 16,
                "connection task {conn_task} B, driver {driver} B"
            );
            assert!(
                cfg!(debug_assertions) || conn_task <= 280,
                "connection task {conn_task} B: over 280, tokio's cell grows to 512 B"
            );
        });
    }
}
