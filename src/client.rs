//! The client role's I/O (`lightws.connect`): resolve the host, connect TCP, TLS with
//! rustls, the opening handshake, then the same [`Driver`] and `Session` as a server
//! connection, in `Role::Client`.
//!
//! Runs on tokio threads and never touches Python: the outcome goes to the loop thread
//! as an [`Event::Connected`] (bridge/client.rs turns it into the `Connection` or the
//! exception). The handshake's bytes are lightws-proto's `handshake::client` (shared
//! with the load generator); masking keys come from `ConnConfig::mask`.
//!
//! `open_timeout` bounds everything up to the `Connected` event: resolution, TCP, TLS,
//! the request and the response (and a refused upgrade's body).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::conn::{Driver, Transport};
use crate::handshake::client::{self as hs, ResponseError, Target};
use crate::handshake::parse_request;
use crate::session::LogLevel;
use crate::shared::{
    ClosedGuard, ConnConfig, ConnShared, ConnectError, ConnectEvent, Connected, Event, EventHub,
};
use crate::stats::Stats;

/// Largest response head accepted from a server.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most of a refused upgrade's body kept for `InvalidHandshake.body`.
const MAX_REFUSAL_BODY: usize = 64 * 1024;
/// How long a refused upgrade's body may take to arrive (within `open_timeout`).
const REFUSAL_BODY_WAIT: Duration = Duration::from_secs(2);

/// What one `connect()` asks for (validated by bridge/client.rs).
pub struct ClientSettings {
    pub target: Target,
    pub subprotocols: Vec<String>,
    /// Extra request headers, in order.
    pub headers: Vec<(String, String)>,
    /// `Some` for `wss://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// None: no limit.
    pub open_timeout: Option<Duration>,
    pub conn: Arc<ConnConfig>,
}

/// A TLS client stream, boxed for the same reason as the server's (server.rs): the
/// driver holds a pointer, not 1 KB of rustls state in every state of its future.
type ClientTls = Box<tokio_rustls::client::TlsStream<TcpStream>>;

impl Transport for ClientTls {}

/// The rustls client configuration: ring provider passed explicitly (as tls.rs does for
/// the server, never the process default), TLS 1.2 and 1.3, ALPN `http/1.1`.
///
/// Roots: the PEM certificates of `cafile` if given; otherwise the system's store
/// (`rustls-native-certs`: the platform's bundle, or `SSL_CERT_FILE` /
/// `SSL_CERT_DIR`), read once per process.
///
/// # Errors
///
/// A message if `cafile` cannot be read or holds no certificate, or if the system store
/// has no usable certificate.
pub fn tls_config(cafile: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    match cafile {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| format!("{path}: {e}"))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{path}: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{path}: unusable CA certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("{path}: no PEM certificate in the file"));
            }
            build_tls(roots)
        }
        None => {
            static SYSTEM: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
            SYSTEM
                .get_or_init(|| {
                    let found = rustls_native_certs::load_native_certs();
                    let mut roots = rustls::RootCertStore::empty();
                    // A system bundle may hold certificates rustls cannot use: skip those.
                    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                    if added == 0 {
                        let why = found
                            .errors
                            .first()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default();
                        return Err(format!(
                            "no usable CA certificate in the system's store{why} (pass cafile=)"
                        ));
                    }
                    build_tls(roots)
                })
                .clone()
        }
    }
}

fn build_tls(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Open the connection and run it to its end. The outcome of the opening goes to the
/// hub as `Event::Connected` (exactly once, unless the task is aborted first); after a
/// successful opening, the connection's end is reported like a server connection's
/// (`Event::Closed`).
pub async fn run(token: u64, s: Arc<ClientSettings>, hub: Arc<EventHub>, stats: Arc<Stats>) {
    let deadline = s.open_timeout.map(|d| Instant::now() + d);
    let tcp = match bounded(deadline, open_tcp(&s.target)).await {
        Ok(tcp) => tcp,
        Err(e) => return fail(&hub, token, e),
    };
    let remote = match tcp.peer_addr() {
        Ok(a) => a,
        Err(e) => return fail(&hub, token, io_error("getpeername", &e)),
    };
    match &s.tls {
        None => established(tcp, remote, token, &s, &hub, &stats, deadline).await,
        Some(cfg) => {
            let name = match ServerName::try_from(s.target.host.clone()) {
                Ok(n) => n,
                Err(e) => {
                    let e = ConnectError::Tls(format!("{:?}: {e}", s.target.host));
                    return fail(&hub, token, e);
                }
            };
            let connector = tokio_rustls::TlsConnector::from(cfg.clone());
            let tls = bounded(deadline, async {
                connector.connect(name, tcp).await.map_err(tls_error)
            })
            .await;
            match tls {
                Ok(tls) => {
                    let mut tls: ClientTls = Box::new(tls);
                    // Our outbox does the queueing (and the back-pressure) before rustls.
                    tls.get_mut().1.set_buffer_limit(Some(64 * 1024));
                    established(tls, remote, token, &s, &hub, &stats, deadline).await;
                }
                Err(e) => fail(&hub, token, e),
            }
        }
    }
}

fn fail(hub: &EventHub, token: u64, e: ConnectError) {
    hub.push(Event::Connected(Box::new(ConnectEvent {
        token,
        result: Err(e),
    })));
}

/// `fut` within `deadline` (if any); `ConnectError::Timeout` after it.
async fn bounded<T>(
    deadline: Option<Instant>,
    fut: impl std::future::Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    match deadline {
        None => fut.await,
        Some(d) => timeout_at(d, fut).await.unwrap_or_else(|_| {
            Err(ConnectError::Timeout(
                "the opening handshake did not complete within open_timeout".into(),
            ))
        }),
    }
}

fn io_error(what: &str, e: &io::Error) -> ConnectError {
    ConnectError::Io {
        errno: e.raw_os_error(),
        message: format!("{what}: {e}"),
    }
}

/// rustls reports through io::Error; a certificate problem gets its own exception.
fn tls_error(e: io::Error) -> ConnectError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => {
            ConnectError::Certificate(format!("certificate verify failed: {c:?}"))
        }
        Some(other) => ConnectError::Tls(format!("TLS handshake failed: {other}")),
        None => io_error("TLS handshake", &e),
    }
}

/// Resolve the host and connect to the first address that answers.
async fn open_tcp(target: &Target) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| ConnectError::Resolve(format!("cannot resolve {:?}: {e}", target.host)))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => last = Some(io_error(&format!("cannot connect to {addr}"), &e)),
        }
    }
    Err(last.unwrap_or_else(|| {
        ConnectError::Resolve(format!("{:?} resolved to no address", target.host))
    }))
}

/// Connected (TCP or TLS): the opening handshake, then the driver until the end.
async fn established<S: Transport>(
    mut io: S,
    remote: SocketAddr,
    token: u64,
    s: &ClientSettings,
    hub: &Arc<EventHub>,
    stats: &Arc<Stats>,
    deadline: Option<Instant>,
) {
    let key = hs::new_key();
    let mut request = Vec::with_capacity(256);
    hs::write_request(&mut request, &s.target, &key, &s.subprotocols, &s.headers);
    let opened = bounded(deadline, handshake(&mut io, &request, &key, s, deadline)).await;
    let (response, subprotocol, leftover) = match opened {
        Ok(v) => v,
        Err(e) => return fail(hub, token, e),
    };
    // The request as sent, for `conn.request` (our own bytes: this parse cannot fail).
    let request = match parse_request(&request, request.len()) {
        Ok(Some((req, _))) => req,
        _ => crate::handshake::Request {
            method: "GET".into(),
            target: s.target.path.clone(),
            headers: Vec::new(),
        },
    };
    let shared = ConnShared::new(remote, hub.clone(), stats.clone(), s.conn.clone());
    let guard = ClosedGuard {
        shared: shared.clone(),
        info: None,
    };
    shared.log(LogLevel::Debug, || "client connection open".into());
    hub.push(Event::Connected(Box::new(ConnectEvent {
        token,
        result: Ok(Connected {
            shared: shared.clone(),
            subprotocol,
            response,
            request,
        }),
    })));
    let mut driver = Driver::new(io, shared, leftover);
    let outcome = (&mut driver).await;
    guard.shared.log(LogLevel::Debug, || {
        format!("connection closed: {} {:?}", outcome.code, outcome.reason)
    });
    guard.finish(outcome);
}

type Opened = (hs::Response, Option<String>, Vec<u8>);

/// Send the request, read the response head, check it (lightws-proto). Returns the
/// response, the chosen subprotocol and the bytes after the head (first frames).
async fn handshake<S: Transport>(
    io: &mut S,
    request: &[u8],
    key: &str,
    s: &ClientSettings,
    deadline: Option<Instant>,
) -> Result<Opened, ConnectError> {
    io.write_all(request)
        .await
        .map_err(|e| io_error("sending the upgrade request", &e))?;
    io.flush()
        .await
        .map_err(|e| io_error("sending the upgrade request", &e))?;
    let mut buf = Vec::with_capacity(1024);
    let (response, head) = loop {
        let n = io
            .read_buf(&mut buf)
            .await
            .map_err(|e| io_error("reading the upgrade response", &e))?;
        if n == 0 {
            return Err(ConnectError::Invalid {
                message: if buf.is_empty() {
                    "the server closed the connection without answering the upgrade".into()
                } else {
                    "the server closed the connection in the middle of its response".into()
                },
                response: None,
            });
        }
        match hs::parse_response(&buf, MAX_RESPONSE_HEAD) {
            Ok(Some(v)) => break v,
            Ok(None) => continue,
            Err(e) => {
                return Err(ConnectError::Invalid {
                    message: e.to_string(),
                    response: None,
                })
            }
        }
    };
    match hs::check_response(&response, key, &s.subprotocols) {
        Ok(subprotocol) => Ok((response, subprotocol, buf.split_off(head))),
        Err(ResponseError::Refused(_)) => {
            let mut body = buf.split_off(head);
            read_body(io, &response, &mut body, deadline).await;
            Err(ConnectError::Refused { response, body })
        }
        Err(e) => Err(ConnectError::Invalid {
            message: e.to_string(),
            response: Some(response),
        }),
    }
}

/// Read what arrives of a refused upgrade's body, within a short wait: it only
/// explains the refusal, so a server that keeps the connection open without saying
/// how long the body is costs at most [`REFUSAL_BODY_WAIT`].
async fn read_body<S: Transport>(
    io: &mut S,
    response: &hs::Response,
    body: &mut Vec<u8>,
    deadline: Option<Instant>,
) {
    let want = response
        .body_length()
        .unwrap_or(MAX_REFUSAL_BODY)
        .min(MAX_REFUSAL_BODY);
    let mut until = Instant::now() + REFUSAL_BODY_WAIT;
    if let Some(d) = deadline {
        until = until.min(d);
    }
    while body.len() < want {
        match timeout_at(until, io.read_buf(body)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    body.truncate(want);
}
