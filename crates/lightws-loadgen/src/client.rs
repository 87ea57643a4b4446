//! The client side of the load generator: TCP/TLS connect, the opening handshake,
//! and the per-connection loops of the three modes.
//!
//! Shared with `lightws.connect` (one client implementation): the URL parser, the
//! upgrade request, the response checks (lightws-proto `handshake::client`), the
//! masking keys (lightws-proto `mask`) and the frame codec. Not shared: the session.
//! This loop decodes and counts echoes without assembling messages, delivering them
//! anywhere or keeping a close-handshake state machine; routing it through
//! `Session` would add an inbox and a message copy per echo to the measuring tool.
//!
//! Every connection is one tokio task. The socket is split into read and write
//! halves inside that task and both are polled from one `select!`, so a client
//! that is writing never stops reading (a closed loop with pipelining or 1 MiB
//! messages would otherwise deadlock against a server that is writing too).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

use super::{chat, mono_ns, Mode, Options, Phase, Shared};
use lightws_proto::frame::{self, close_code, Decoder, Event, OpCode, Role};
use lightws_proto::handshake::client::{self as hs, ResponseError};
use lightws_proto::mask::random_mask;

/// The URL of a run: shared with `lightws.connect` (lightws-proto, handshake/client.rs).
pub use lightws_proto::handshake::client::Target;

/// Largest response head accepted from the server.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// Connect + TLS + opening handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts any server certificate (`--insecure`) but still checks that the
/// handshake signatures are made by the certificate's key, so the TLS work the
/// server does is the same as with verification on.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Where trusted roots come from when neither `--cafile` nor `--insecure` is given.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The rustls client configuration for `wss://`: ring provider passed
/// explicitly (as src/tls.rs does for the server), TLS 1.2 and 1.3.
///
/// Roots: `cafile` if given, else `$SSL_CERT_FILE`, else the system bundle.
///
/// # Errors
///
/// A message if the CA file cannot be read or holds no certificate.
pub fn tls_config(
    insecure: bool,
    cafile: Option<&str>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth()
    } else {
        let env = std::env::var("SSL_CERT_FILE").ok();
        let path = cafile
            .map(str::to_string)
            .or(env)
            .or_else(|| {
                SYSTEM_CA_FILES
                    .iter()
                    .find(|p| std::path::Path::new(p).exists())
                    .map(|p| p.to_string())
            })
            .ok_or("no CA bundle found: pass --cafile or --insecure")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&path).map_err(|e| format!("{path}: {e}"))? {
            let cert = cert.map_err(|e| format!("{path}: {e}"))?;
            // A bundle may hold certificates rustls cannot use; skip those.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(format!("{path}: no usable CA certificate"));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Everything a connection task needs that is the same for all connections.
pub struct Plan {
    /// What to connect to.
    pub target: Target,
    /// The resolved server address.
    pub addr: SocketAddr,
    /// `Some` for `wss://`.
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// SNI / certificate name for `wss://`.
    pub server_name: ServerName<'static>,
    /// Source addresses to spread connections over (empty: let the kernel choose).
    pub sources: Vec<Ipv4Addr>,
    /// The message payload every connection sends.
    pub payload: Vec<u8>,
    /// TEXT or BINARY.
    pub opcode: OpCode,
    /// The run's options.
    pub opts: Options,
}

/// Open TCP connection `index`, bound to its source address if any.
async fn connect_tcp(plan: &Plan, index: usize) -> io::Result<TcpStream> {
    let socket = match plan.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if plan.opts.mode == Mode::Chat && chat::role(&plan.opts, index) == chat::Role::Stalled {
        // A never-reading client advertises a small window, so the server's own
        // buffering, not the kernel's, holds what it cannot send.
        socket.set_recv_buffer_size(chat::STALLED_RCVBUF)?;
    }
    if !plan.sources.is_empty() {
        let src = plan.sources[index % plan.sources.len()];
        // Let connect() pick the port, so that the 4-tuple, not the source
        // port alone, has to be unique: each source address then reaches the
        // whole ephemeral range per server address.
        let one: libc::c_int = 1;
        // SAFETY: valid socket fd, option value is a c_int of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    }
    let stream = socket.connect(plan.addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Send the upgrade request and check the server's `101`: the request and the checks
/// are lightws-proto's (`handshake::client`), the same code as `lightws.connect`'s.
/// Returns the bytes that followed the response head.
async fn opening_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    target: &Target,
) -> Result<Vec<u8>, String> {
    let key = hs::new_key();
    let mut request = Vec::with_capacity(256);
    hs::write_request(&mut request, target, &key, &[], &[]);
    stream
        .write_all(&request)
        .await
        .map_err(|e| format!("sending the upgrade request: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("reading the upgrade response: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection during the handshake".into());
        }
        let parsed = hs::parse_response(&buf, MAX_RESPONSE_HEAD).map_err(|e| e.to_string())?;
        let Some((response, head)) = parsed else {
            continue;
        };
        return match hs::check_response(&response, &key, &[]) {
            Ok(_) => Ok(buf.split_off(head)),
            Err(ResponseError::Refused(status)) => Err(format!(
                "the server answered {status} {} instead of 101",
                response.reason
            )),
            Err(e) => Err(e.to_string()),
        };
    }
}

/// Connection `index` from connect to close: connect, handshake (both bounded
/// by [`HANDSHAKE_TIMEOUT`]), then the mode's loop.
pub async fn run(
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    index: usize,
    phase: watch::Receiver<Phase>,
    gate: Arc<tokio::sync::Semaphore>,
) {
    let result = session(&plan, &shared, index, phase, gate).await;
    if let Err(e) = result {
        shared.fail(e);
    }
}

async fn session(
    plan: &Plan,
    shared: &Shared,
    index: usize,
    phase: watch::Receiver<Phase>,
    gate: Arc<tokio::sync::Semaphore>,
) -> Result<(), String> {
    // Only so many connections handshake at once, so a burst of 10,000
    // connects does not overflow the server's accept backlog.
    let permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
    let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_tcp(plan, index))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    match &plan.tls {
        None => established(tcp, plan, shared, index, phase, permit).await,
        Some(connector) => {
            let tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                connector.connect(plan.server_name.clone(), tcp),
            )
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
            established(tls, plan, shared, index, phase, permit).await
        }
    }
}

async fn established<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    plan: &Plan,
    shared: &Shared,
    index: usize,
    phase: watch::Receiver<Phase>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), String> {
    let leftover = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        opening_handshake(&mut stream, &plan.target),
    )
    .await
    .map_err(|_| "opening handshake timed out".to_string())??;
    drop(permit);
    let role = chat::role(&plan.opts, index);
    if plan.opts.mode == Mode::Chat {
        // Counted before `opened`, so the controller sees the final count once every
        // connection is open.
        shared.chat.opened(role);
    }
    shared.opened.fetch_add(1, Ordering::Relaxed);
    shared.open.fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn::new(stream, leftover);
    let result = match plan.opts.mode {
        Mode::Echo => conn.echo(plan, shared, phase).await,
        Mode::Rate => conn.rate(plan, shared, index, phase).await,
        Mode::Idle => conn.idle(phase).await,
        Mode::Chat => chat::run(&mut conn, role, plan, shared, phase).await,
    };
    shared.open.fetch_sub(1, Ordering::Relaxed);
    result
}

/// What one pass over the read buffer found.
#[derive(Default)]
struct Received {
    /// Whole data messages.
    messages: u64,
    /// Payload bytes of data messages.
    bytes: u64,
    /// The server's close frame arrived.
    closed: bool,
}

/// One established WebSocket connection (client role).
pub(crate) struct Conn<S> {
    pub(crate) rd: tokio::io::ReadHalf<S>,
    pub(crate) wr: tokio::io::WriteHalf<S>,
    pub(crate) inbuf: Vec<u8>,
    /// Encoded frames not yet written, from `out_pos` on.
    pub(crate) out: Vec<u8>,
    pub(crate) out_pos: usize,
    pub(crate) dec: Decoder,
    /// Payload bytes of the message being received.
    pub(crate) msg_len: u64,
    /// Bytes asked of the socket per read.
    pub(crate) chunk: usize,
}

impl<S: AsyncRead + AsyncWrite> Conn<S> {
    fn new(stream: S, leftover: Vec<u8>) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        Conn {
            rd,
            wr,
            inbuf: leftover,
            out: Vec::new(),
            out_pos: 0,
            dec: Decoder::new(Role::Client, None),
            msg_len: 0,
            chunk: READ_CHUNK,
        }
    }

    pub(crate) fn pending(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Account for `n` written bytes.
    pub(crate) fn wrote(&mut self, n: usize) {
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
    }

    /// Make room for the next read.
    pub(crate) fn reserve(&mut self) {
        if self.inbuf.capacity() - self.inbuf.len() < self.chunk / 4 {
            self.inbuf.reserve(self.chunk);
        }
    }

    /// Decode everything buffered. Whole messages are checked against
    /// `expect` (payload length) when given; pings are answered.
    fn process(&mut self, expect: Option<u64>) -> Result<Received, String> {
        let mut got = Received::default();
        let mut pos = 0;
        while pos < self.inbuf.len() {
            let (n, event) = self
                .dec
                .decode(&mut self.inbuf[pos..])
                .map_err(|e| format!("protocol error from the server: {e}"))?;
            if n == 0 {
                break;
            }
            pos += n;
            match event {
                None => {}
                Some(Event::Data { payload, fin, .. }) => {
                    self.msg_len += payload.len() as u64;
                    got.bytes += payload.len() as u64;
                    if fin {
                        if let Some(want) = expect {
                            if self.msg_len != want {
                                return Err(format!(
                                    "echo of {} bytes for a {want}-byte message",
                                    self.msg_len
                                ));
                            }
                        }
                        got.messages += 1;
                        self.msg_len = 0;
                    }
                }
                Some(Event::Ping(p)) => {
                    frame::encode_frame(&mut self.out, true, OpCode::Pong, p, Some(random_mask()));
                }
                Some(Event::Pong(_)) => {}
                Some(Event::Close { .. }) => {
                    got.closed = true;
                    break;
                }
            }
        }
        self.inbuf.drain(..pos);
        Ok(got)
    }

    /// Queue our close frame, then keep reading (and discarding) until the
    /// server's close frame or EOF, writing whatever is still queued.
    pub(crate) async fn close(&mut self) -> Result<(), String> {
        let payload = frame::close_payload(Some(close_code::NORMAL_CLOSURE), "");
        frame::encode_frame(
            &mut self.out,
            true,
            OpCode::Close,
            &payload,
            Some(random_mask()),
        );
        let closing = async {
            loop {
                self.reserve();
                tokio::select! {
                    r = self.wr.write(&self.out[self.out_pos..]), if self.pending() => {
                        let n = r.map_err(|e| e.to_string())?;
                        self.wrote(n);
                    }
                    r = self.rd.read_buf(&mut self.inbuf) => {
                        if r.map_err(|e| e.to_string())? == 0 {
                            return Ok::<(), String>(());
                        }
                        if self.process(None)?.closed && !self.pending() {
                            return Ok(());
                        }
                    }
                }
            }
        };
        // A server that never answers the close costs the run no more than this.
        let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
        let _ = self.wr.shutdown().await;
        Ok(())
    }

    /// Closed loop: keep `pipeline` messages in flight; send one whenever one
    /// comes back.
    async fn echo(
        &mut self,
        plan: &Plan,
        shared: &Shared,
        mut phase: watch::Receiver<Phase>,
    ) -> Result<(), String> {
        if !wait_running(&mut phase).await {
            return self.close().await;
        }
        let size = plan.payload.len() as u64;
        for _ in 0..plan.opts.pipeline {
            frame::encode_frame(
                &mut self.out,
                true,
                plan.opcode,
                &plan.payload,
                Some(random_mask()),
            );
        }
        loop {
            self.reserve();
            tokio::select! {
                biased;
                _ = phase.changed() => {
                    if *phase.borrow() == Phase::Stop {
                        return self.close().await;
                    }
                }
                r = self.wr.write(&self.out[self.out_pos..]), if self.pending() => {
                    let n = r.map_err(|e| format!("write: {e}"))?;
                    self.wrote(n);
                }
                r = self.rd.read_buf(&mut self.inbuf) => {
                    if r.map_err(|e| format!("read: {e}"))? == 0 {
                        return Err("the server closed the TCP connection".into());
                    }
                    let got = self.process(Some(size))?;
                    if got.messages > 0 {
                        shared.messages.fetch_add(got.messages, Ordering::Relaxed);
                    }
                    if got.bytes > 0 {
                        shared.bytes.fetch_add(got.bytes, Ordering::Relaxed);
                    }
                    if got.closed {
                        return Err("the server closed the WebSocket".into());
                    }
                    for _ in 0..got.messages {
                        frame::encode_frame(
                            &mut self.out, true, plan.opcode, &plan.payload, Some(random_mask()),
                        );
                    }
                }
            }
        }
    }

    /// Open loop: send on a fixed schedule (a timerfd, so wake-ups are not
    /// rounded to tokio's 1 ms timer wheel) and measure each echo from the
    /// time its message was *scheduled*, so a stalled server is charged for
    /// every message it delayed (no coordinated omission).
    async fn rate(
        &mut self,
        plan: &Plan,
        shared: &Shared,
        index: usize,
        mut phase: watch::Receiver<Phase>,
    ) -> Result<(), String> {
        let Some(t0) = wait_start(&mut phase).await else {
            return self.close().await;
        };
        let opts = &plan.opts;
        let size = plan.payload.len() as u64;
        // Connection i sends at t0 + i/R + k*N/R: the N connections together
        // send one message every 1/R seconds.
        let interval = (opts.connections as f64 / opts.rate * 1e9).max(1.0);
        let offset = (index as f64 / opts.rate * 1e9) as u64;
        let measure_from = t0 + (opts.warmup * 1e9) as u64;
        let end = measure_from + (opts.duration * 1e9) as u64;
        let mut k: u64 = 0;
        let sched_at = |k: u64| t0 + offset + (k as f64 * interval) as u64;
        let mut next = sched_at(0);
        let mut scheduled: VecDeque<u64> = VecDeque::new();
        let timer = Timer::new().map_err(|e| format!("timerfd: {e}"))?;
        timer.arm_at(next).map_err(|e| format!("timerfd: {e}"))?;
        let mut sending = next < end;
        loop {
            self.reserve();
            tokio::select! {
                biased;
                _ = phase.changed() => {
                    if *phase.borrow() == Phase::Stop {
                        // Messages still unanswered count with their age now.
                        let now = mono_ns();
                        for s in scheduled.drain(..) {
                            if s >= measure_from {
                                shared.record_latency(now.saturating_sub(s));
                                shared.timeouts.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        return self.close().await;
                    }
                }
                r = timer.wait(), if sending => {
                    r.map_err(|e| format!("timerfd: {e}"))?;
                    let now = mono_ns();
                    let mut n = 0;
                    while next <= now && next < end {
                        frame::encode_frame(
                            &mut self.out, true, plan.opcode, &plan.payload, Some(random_mask()),
                        );
                        scheduled.push_back(next);
                        n += 1;
                        k += 1;
                        next = sched_at(k);
                    }
                    shared.sent.fetch_add(n, Ordering::Relaxed);
                    if next < end {
                        timer.arm_at(next).map_err(|e| format!("timerfd: {e}"))?;
                    } else {
                        sending = false;
                    }
                }
                r = self.wr.write(&self.out[self.out_pos..]), if self.pending() => {
                    let n = r.map_err(|e| format!("write: {e}"))?;
                    self.wrote(n);
                }
                r = self.rd.read_buf(&mut self.inbuf) => {
                    let now = mono_ns();
                    if r.map_err(|e| format!("read: {e}"))? == 0 {
                        return Err("the server closed the TCP connection".into());
                    }
                    let got = self.process(Some(size))?;
                    for _ in 0..got.messages {
                        let s = scheduled
                            .pop_front()
                            .ok_or("an echo for a message never sent")?;
                        if s >= measure_from {
                            shared.record_latency(now.saturating_sub(s));
                            shared.messages.fetch_add(1, Ordering::Relaxed);
                            shared.bytes.fetch_add(size, Ordering::Relaxed);
                        }
                    }
                    shared.received.fetch_add(got.messages, Ordering::Relaxed);
                    if got.closed {
                        return Err("the server closed the WebSocket".into());
                    }
                }
            }
        }
    }

    /// Hold the connection open, answering pings, until told to stop.
    async fn idle(&mut self, mut phase: watch::Receiver<Phase>) -> Result<(), String> {
        // An idle client keeps only a small read buffer (pings, the close).
        self.inbuf.shrink_to(256);
        loop {
            if self.inbuf.capacity() == self.inbuf.len() {
                self.inbuf.reserve(256);
            }
            if *phase.borrow_and_update() == Phase::Stop {
                return self.close().await;
            }
            tokio::select! {
                _ = phase.changed() => {}
                r = self.wr.write(&self.out[self.out_pos..]), if self.pending() => {
                    let n = r.map_err(|e| format!("write: {e}"))?;
                    self.wrote(n);
                }
                r = self.rd.read_buf(&mut self.inbuf) => {
                    if r.map_err(|e| format!("read: {e}"))? == 0 {
                        return Err("the server closed the TCP connection".into());
                    }
                    let got = self.process(None)?;
                    if got.closed {
                        return Err("the server closed the WebSocket".into());
                    }
                }
            }
        }
    }
}

/// Wait for [`Phase::Run`]; `false` if the run stopped first.
pub(crate) async fn wait_running(phase: &mut watch::Receiver<Phase>) -> bool {
    wait_start(phase).await.is_some()
}

/// Wait for [`Phase::Run`] and return its start time; `None` if the run
/// stopped first.
async fn wait_start(phase: &mut watch::Receiver<Phase>) -> Option<u64> {
    loop {
        match *phase.borrow_and_update() {
            Phase::Run(t0) => return Some(t0),
            Phase::Stop => return None,
            Phase::Connect => {}
        }
        if phase.changed().await.is_err() {
            return None;
        }
    }
}

/// A `timerfd` on CLOCK_MONOTONIC registered with tokio: nanosecond-precise
/// absolute deadlines (tokio's own timers are rounded to 1 ms).
struct Timer {
    fd: AsyncFd<OwnedFd>,
}

impl Timer {
    fn new() -> io::Result<Timer> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns `fd`, which stays open until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? };
        Ok(Timer { fd })
    }

    /// Fire at `ns` on CLOCK_MONOTONIC (at once if that is past).
    fn arm_at(&self, ns: u64) -> io::Result<()> {
        let ns = ns.max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: valid timerfd and itimerspec; old value not requested.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.get_ref().as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wait until the timer has fired.
    async fn wait(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|fd| {
                let mut count = [0u8; 8];
                // SAFETY: reads at most 8 bytes into `count`.
                let n =
                    unsafe { libc::read(fd.get_ref().as_raw_fd(), count.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match res {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

// The URL parser, the handshake and the masking keys are lightws-proto's and tested
// there (handshake/client.rs, mask.rs).
