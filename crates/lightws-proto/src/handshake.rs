//! The HTTP/1.1 side of the WebSocket opening handshake, server role; the client role
//! is in [`client`] (`handshake/client.rs`).
//!
//! Pure: bytes in, values out, bytes appended to a caller's buffer. Nothing here reads
//! or writes a socket, so the same code serves every driver and is easy to fuzz.
//!
//! - [`parse_request`] turns the request head into a [`Request`] (RFC 7230 via httparse).
//! - [`validate`] applies the server's checks of RFC 6455 section 4.2.1 and says whether
//!   the request is a WebSocket upgrade, a plain HTTP request, or a broken upgrade.
//! - [`write_accept`] writes the `101 Switching Protocols` answer of RFC 6455 section
//!   4.2.2; [`write_response`] writes any other (rejection or plain HTTP) response.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

pub mod client;

/// Most header lines accepted in one request head; more is answered with 431.
pub const MAX_HEADERS: usize = 64;

/// The GUID appended to the client's key, RFC 6455 section 1.3 and 4.2.2 step 5.4.
pub const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version this server speaks, RFC 6455 section 4.2.2 step 4.
pub const WEBSOCKET_VERSION: &str = "13";

/// A parsed request head.
///
/// Header values are decoded as Latin-1 (ISO-8859-1) into `String`, so every byte the
/// client sent survives (byte `b` becomes `char::from(b)`). Header names are RFC 7230
/// tokens and therefore ASCII.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `"GET"`.
    pub method: String,
    /// The request-target as sent, e.g. `"/echo?reverse=1"`.
    pub target: String,
    /// Header lines in order, names spelled as sent.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The request-target up to (not including) the first `?`.
    pub fn path(&self) -> &str {
        match self.target.split_once('?') {
            Some((path, _)) => path,
            None => &self.target,
        }
    }

    /// The request-target after the first `?`; `""` if there is none.
    pub fn query(&self) -> &str {
        match self.target.split_once('?') {
            Some((_, query)) => query,
            None => "",
        }
    }

    /// The first value of the header `name` (ASCII case-insensitive), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of the header `name` (ASCII case-insensitive), in order.
    pub fn headers_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request head could not be parsed. Both variants are the peer's fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The bytes are not an HTTP/1.1 request head (httparse rejected them, or the
    /// version is not 1.1). Answered with 400.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// No complete head within the configured limit (`http_read_buffer`), or more than
    /// [`MAX_HEADERS`] header lines. Answered with 431.
    #[error("request head too large")]
    HeadTooLarge,
}

impl HandshakeError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::Malformed(_) => 400,
            HandshakeError::HeadTooLarge => 431,
        }
    }

    /// The response to send before closing the connection.
    pub fn rejection(&self) -> Rejection {
        Rejection::new(self.status(), self.to_string())
    }
}

/// Parses an HTTP/1.1 request head from the start of `buf`.
///
/// Returns:
/// - `Ok(None)` if the head is not complete yet and `buf.len() < max_head`: read more
///   and call again with the longer buffer (nothing is consumed).
/// - `Ok(Some((request, head_len)))` once the head (through the empty line) is complete.
///   Bytes from `head_len` on are not part of the request (a client may send its first
///   WebSocket frame in the same packet) and stay with the caller.
///
/// # Errors
///
/// - [`HandshakeError::HeadTooLarge`] if the first `max_head` bytes hold no complete
///   head, or the head has more than [`MAX_HEADERS`] header lines.
/// - [`HandshakeError::Malformed`] if the bytes are not valid HTTP, or the version is
///   not HTTP/1.1 (RFC 6455 section 4.2.1 item 1 requires 1.1 or higher).
pub fn parse_request(
    buf: &[u8],
    max_head: usize,
) -> Result<Option<(Request, usize)>, HandshakeError> {
    // Only the first max_head bytes may hold the head; looking further would let a
    // client make us scan an unbounded amount.
    let window = &buf[..buf.len().min(max_head)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(HandshakeError::HeadTooLarge),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::HeadTooLarge),
        Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
    };
    // httparse only knows HTTP/1.x; it reports the minor version.
    if parsed.version != Some(1) {
        return Err(HandshakeError::Malformed(
            "HTTP version must be 1.1".to_string(),
        ));
    }
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        // Unreachable for a complete parse, but not worth a panic.
        return Err(HandshakeError::Malformed(
            "incomplete request line".to_string(),
        ));
    };
    let headers = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), latin1(h.value)))
        .collect();
    let request = Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
    };
    Ok(Some((request, head_len)))
}

/// Decodes ISO-8859-1: each byte is the code point of the same value.
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// What [`validate`] decided about a request, RFC 6455 section 4.2.1.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// A valid WebSocket upgrade.
    WebSocket {
        /// The `Sec-WebSocket-Key` value (whitespace trimmed), input to [`accept_key`].
        key: String,
        /// Offered subprotocols: every `Sec-WebSocket-Protocol` line split on `,` and
        /// trimmed, empty items dropped, in order.
        subprotocols: Vec<String>,
    },
    /// No `Upgrade` header at all: a plain HTTP request. The caller answers 400 unless
    /// it has opted in to serve plain HTTP.
    NotUpgrade,
    /// A broken upgrade: send this response and close.
    Reject(Rejection),
}

/// A response refusing a request: status, extra headers and a short plain-text body.
/// Send it with [`Rejection::write_to`] (or [`write_response`]) and close.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Rejection {
    /// HTTP status code.
    pub status: u16,
    /// Headers besides Content-Type, Content-Length and Connection.
    pub headers: Vec<(String, String)>,
    /// Plain-text reason saying what was wrong.
    pub body: Vec<u8>,
}

impl Rejection {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Rejection {
            status,
            headers: Vec::new(),
            body: reason.into().into_bytes(),
        }
    }

    fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Appends this response to `dst` (see [`write_response`]).
    pub fn write_to(&self, dst: &mut Vec<u8>) {
        write_response(dst, self.status, &self.headers, &self.body);
    }
}

/// Items of a comma-separated header list across every line of `name`, trimmed, empty
/// items dropped (RFC 7230 section 7, `#rule`).
fn list_items<'a>(req: &'a Request, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    req.headers_all(name)
        .flat_map(|v| v.split(','))
        .map(|item| item.trim_matches(|c| c == ' ' || c == '\t'))
        .filter(|item| !item.is_empty())
}

/// Decides whether `req` is a WebSocket upgrade, following the server's checks of
/// RFC 6455 section 4.2.1.
///
/// - No `Upgrade` header: [`Upgrade::NotUpgrade`].
/// - Method other than GET: 405 with `Allow: GET` (item 1).
/// - `Upgrade` without the token `websocket` (any case): 400 (item 3).
/// - `Host` missing or repeated: 400 (item 2; RFC 7230 section 5.4).
/// - `Connection` token list without `upgrade` (any case, any line): 400 (item 4).
/// - `Sec-WebSocket-Key` missing, repeated, or not base64 of 16 bytes: 400 (item 5).
/// - `Sec-WebSocket-Version` missing or not `13`: 426 with `Sec-WebSocket-Version: 13`
///   (item 6, and section 4.4).
pub fn validate(req: &Request) -> Upgrade {
    match check_upgrade(req) {
        Ok(Some(upgrade)) => upgrade,
        Ok(None) => Upgrade::NotUpgrade,
        Err(rejection) => Upgrade::Reject(rejection),
    }
}

fn check_upgrade(req: &Request) -> Result<Option<Upgrade>, Rejection> {
    // A request without Upgrade never asked for WebSocket; it is plain HTTP and
    // whether to serve it is the caller's decision.
    if req.header("Upgrade").is_none() {
        return Ok(None);
    }
    // 4.2.1 item 1: "An HTTP/1.1 or higher GET request". RFC 7231 section 6.5.5
    // requires Allow on a 405.
    if req.method != "GET" {
        return Err(
            Rejection::new(405, "WebSocket upgrade requires the GET method")
                .with_header("Allow", "GET"),
        );
    }
    // 4.2.1 item 3: Upgrade contains "websocket", ASCII case-insensitive. The header
    // is a list of protocols (RFC 7230 section 6.7), so look at each item.
    if !list_items(req, "Upgrade").any(|p| p.eq_ignore_ascii_case("websocket")) {
        return Err(Rejection::new(
            400,
            "Upgrade header does not contain \"websocket\"",
        ));
    }
    // 4.2.1 item 2: a Host header field. RFC 7230 section 5.4: exactly one.
    match req.headers_all("Host").count() {
        0 => return Err(Rejection::new(400, "missing Host header")),
        1 => {}
        _ => return Err(Rejection::new(400, "more than one Host header")),
    }
    // 4.2.1 item 4: Connection includes the token "Upgrade", ASCII case-insensitive.
    // Browsers send e.g. "keep-alive, Upgrade"; proxies may split it over lines.
    if req.header("Connection").is_none() {
        return Err(Rejection::new(400, "missing Connection header"));
    }
    if !list_items(req, "Connection").any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return Err(Rejection::new(
            400,
            "Connection header does not contain \"Upgrade\"",
        ));
    }
    // 4.2.1 item 5: Sec-WebSocket-Key, base64 of a 16-byte nonce. Section 11.3.1: it
    // must not appear more than once.
    let mut keys = req.headers_all("Sec-WebSocket-Key");
    let key = match (keys.next(), keys.next()) {
        (None, _) => return Err(Rejection::new(400, "missing Sec-WebSocket-Key header")),
        (Some(_), Some(_)) => {
            return Err(Rejection::new(
                400,
                "more than one Sec-WebSocket-Key header",
            ));
        }
        (Some(key), None) => key.trim_matches(|c| c == ' ' || c == '\t'),
    };
    match BASE64.decode(key) {
        Ok(nonce) if nonce.len() == 16 => {}
        Ok(_) => {
            return Err(Rejection::new(
                400,
                "Sec-WebSocket-Key does not decode to 16 bytes",
            ));
        }
        Err(_) => return Err(Rejection::new(400, "Sec-WebSocket-Key is not base64")),
    }
    // 4.2.1 item 6 and 4.2.2 step 4: version 13; otherwise 426 listing the versions
    // we speak (section 4.4). Several values (lines or list items) are not "13".
    let mut versions = list_items(req, "Sec-WebSocket-Version");
    match (versions.next(), versions.next()) {
        (Some(WEBSOCKET_VERSION), None) => {}
        (None, _) => {
            return Err(Rejection::new(426, "missing Sec-WebSocket-Version header")
                .with_header("Sec-WebSocket-Version", WEBSOCKET_VERSION));
        }
        _ => {
            return Err(Rejection::new(
                426,
                "unsupported Sec-WebSocket-Version, this server speaks 13",
            )
            .with_header("Sec-WebSocket-Version", WEBSOCKET_VERSION));
        }
    }
    // 4.2.1 item 8 (optional): the subprotocols the client offers, in its order of
    // preference.
    let subprotocols = list_items(req, "Sec-WebSocket-Protocol")
        .map(str::to_string)
        .collect();
    Ok(Some(Upgrade::WebSocket {
        key: key.to_string(),
        subprotocols,
    }))
}

/// `base64(SHA-1(key + GUID))`, the `Sec-WebSocket-Accept` value of RFC 6455 section
/// 4.2.2 step 5.4.
pub fn accept_key(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// Is `b` a `tchar` of RFC 7230 section 3.2.6?
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks a header supplied by user code before it goes on the wire.
///
/// The name must be an RFC 7230 token; the value must not contain CR, LF or NUL (which
/// would let it end the header line early: response splitting).
///
/// # Errors
///
/// A message naming the problem, suitable for a Python `ValueError`.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name is empty".to_string());
    }
    if let Some(c) = name.chars().find(|&c| !(c.is_ascii() && is_tchar(c as u8))) {
        return Err(format!(
            "header name {name:?} contains {c:?}, which is not allowed in an HTTP token"
        ));
    }
    if let Some(c) = value.chars().find(|&c| matches!(c, '\r' | '\n' | '\0')) {
        return Err(format!("value of header {name:?} contains {c:?}"));
    }
    Ok(())
}

/// Appends `name: value\r\n`. Values are written as UTF-8.
fn push_header(dst: &mut Vec<u8>, name: &str, value: &str) {
    dst.extend_from_slice(name.as_bytes());
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value.as_bytes());
    dst.extend_from_slice(b"\r\n");
}

/// User headers that are safe to write: valid per [`check_header`] and not in `owned`.
/// Invalid ones should have been refused earlier via [`check_header`]; they are dropped
/// here as a last line of defence against response splitting.
fn user_headers<'a>(
    headers: &'a [(String, String)],
    owned: &'a [&'a str],
) -> impl Iterator<Item = &'a (String, String)> + 'a {
    headers.iter().filter(move |(name, value)| {
        !owned.iter().any(|o| o.eq_ignore_ascii_case(name)) && check_header(name, value).is_ok()
    })
}

/// Appends the `101 Switching Protocols` response of RFC 6455 section 4.2.2 step 5.
///
/// Writes the status line, `Upgrade: websocket`, `Connection: Upgrade`,
/// `Sec-WebSocket-Accept` (from `key`), `Sec-WebSocket-Protocol` if `subprotocol` is
/// given, then `extra` in order, then the empty line. `Upgrade`, `Connection`,
/// `Sec-WebSocket-Accept` and `Sec-WebSocket-Protocol` in `extra` are skipped (the
/// handshake owns them), as are headers that fail [`check_header`].
pub fn write_accept(
    dst: &mut Vec<u8>,
    key: &str,
    subprotocol: Option<&str>,
    extra: &[(String, String)],
) {
    const OWNED: &[&str] = &[
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Accept",
        "Sec-WebSocket-Protocol",
    ];
    dst.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    push_header(dst, "Upgrade", "websocket");
    push_header(dst, "Connection", "Upgrade");
    push_header(dst, "Sec-WebSocket-Accept", &accept_key(key));
    if let Some(protocol) = subprotocol {
        push_header(dst, "Sec-WebSocket-Protocol", protocol);
    }
    for (name, value) in user_headers(extra, OWNED) {
        push_header(dst, name, value);
    }
    dst.extend_from_slice(b"\r\n");
}

/// Appends a complete non-101 response (a rejection or a plain HTTP answer).
///
/// Writes `HTTP/1.1 {status} {reason}`, then `headers` in order, then
/// `Content-Type: text/plain; charset=utf-8` unless `headers` has a Content-Type, then
/// `Content-Length` (always computed from `body`), then `Connection: close`, the empty
/// line and `body`. Content-Length, Transfer-Encoding and Connection in `headers` are
/// skipped (the framing is ours and the connection closes after this), as are headers
/// that fail [`check_header`].
pub fn write_response(dst: &mut Vec<u8>, status: u16, headers: &[(String, String)], body: &[u8]) {
    const OWNED: &[&str] = &["Content-Length", "Transfer-Encoding", "Connection"];
    dst.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes());
    let mut has_content_type = false;
    for (name, value) in user_headers(headers, OWNED) {
        has_content_type |= name.eq_ignore_ascii_case("Content-Type");
        push_header(dst, name, value);
    }
    if !has_content_type {
        push_header(dst, "Content-Type", "text/plain; charset=utf-8");
    }
    push_header(dst, "Content-Length", &body.len().to_string());
    push_header(dst, "Connection", "close");
    dst.extend_from_slice(b"\r\n");
    dst.extend_from_slice(body);
}

/// The canonical reason phrase for `status` (IANA HTTP status code registry), or
/// `"Unknown"` for an unregistered code.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        102 => "Processing",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        207 => "Multi-Status",
        208 => "Already Reported",
        226 => "IM Used",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        305 => "Use Proxy",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        418 => "I'm a teapot",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        423 => "Locked",
        424 => "Failed Dependency",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        506 => "Variant Also Negotiates",
        507 => "Insufficient Storage",
        508 => "Loop Detected",
        510 => "Not Extended",
        511 => "Network Authentication Required",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The client handshake of RFC 6455 section 1.2.
    const VALID: &[u8] = b"GET /chat?room=1 HTTP/1.1\r\n\
        Host: server.example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Origin: http://example.com\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\n\
        Sec-WebSocket-Version: 13\r\n\
        \r\n";

    fn parse(buf: &[u8]) -> (Request, usize) {
        parse_request(buf, 4096).unwrap().unwrap()
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: method.to_string(),
            target: "/".to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    const GOOD: &[(&str, &str)] = &[
        ("Host", "h"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];

    /// GOOD with header `name` replaced by `values` (one line each; none = removed).
    fn good_with(name: &str, values: &[&str]) -> Request {
        let mut headers: Vec<(&str, &str)> =
            GOOD.iter().copied().filter(|(n, _)| *n != name).collect();
        headers.extend(values.iter().map(|v| (name, *v)));
        request("GET", &headers)
    }

    fn rejected(req: &Request) -> Rejection {
        match validate(req) {
            Upgrade::Reject(r) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn accepted(req: &Request) -> (String, Vec<String>) {
        match validate(req) {
            Upgrade::WebSocket { key, subprotocols } => (key, subprotocols),
            other => panic!("expected an upgrade, got {other:?}"),
        }
    }

    fn s(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// RFC 6455 sections 1.3 and 4.2.2 (checked against Python's hashlib too).
    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn the_rfc_request_parses_and_validates() {
        let (req, len) = parse(VALID);
        assert_eq!(len, VALID.len());
        assert_eq!(req.method, "GET");
        assert_eq!(req.target, "/chat?room=1");
        assert_eq!(req.path(), "/chat");
        assert_eq!(req.query(), "room=1");
        assert_eq!(req.header("host"), Some("server.example.com"));
        assert_eq!(req.headers.len(), 7);
        assert_eq!(req.headers[0].0, "Host");
        let (key, subprotocols) = accepted(&req);
        assert_eq!(key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(subprotocols, ["chat", "superchat"]);
    }

    #[test]
    fn query_is_empty_without_question_mark() {
        let req = request("GET", &[]);
        assert_eq!(req.path(), "/");
        assert_eq!(req.query(), "");
    }

    #[test]
    fn headers_all_returns_every_line_in_order() {
        let req = request("GET", &[("X-A", "1"), ("x-b", "2"), ("x-a", "3")]);
        assert_eq!(req.headers_all("X-a").collect::<Vec<_>>(), ["1", "3"]);
        assert_eq!(req.header("X-B"), Some("2"));
        assert_eq!(req.header("X-C"), None);
    }

    #[test]
    fn a_partial_head_is_incomplete_at_every_split_point() {
        for n in 0..VALID.len() {
            assert_eq!(parse_request(&VALID[..n], 4096), Ok(None), "split at {n}");
        }
    }

    #[test]
    fn bytes_after_the_head_are_left_to_the_caller() {
        let mut buf = VALID.to_vec();
        buf.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4]);
        let (_, len) = parse(&buf);
        assert_eq!(len, VALID.len());
        assert_eq!(&buf[len..], &[0x81, 0x85, 1, 2, 3, 4]);
    }

    #[test]
    fn a_head_exactly_max_head_long_is_accepted() {
        let (_, len) = parse_request(VALID, VALID.len()).unwrap().unwrap();
        assert_eq!(len, VALID.len());
    }

    #[test]
    fn a_head_one_byte_over_max_head_is_431() {
        let max = VALID.len() - 1;
        let err = parse_request(VALID, max).unwrap_err();
        assert_eq!(err, HandshakeError::HeadTooLarge);
        assert_eq!(err.status(), 431);
        // Still short of max_head: wait for more.
        assert_eq!(parse_request(&VALID[..max - 1], max), Ok(None));
    }

    #[test]
    fn a_frame_beyond_max_head_does_not_count_against_the_head() {
        let mut buf = VALID.to_vec();
        buf.extend_from_slice(&[0u8; 100]);
        assert!(parse_request(&buf, VALID.len()).unwrap().is_some());
    }

    #[test]
    fn more_than_64_headers_is_431() {
        let mut buf = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            buf.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        buf.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_request(&buf, 1 << 20),
            Err(HandshakeError::HeadTooLarge)
        );
    }

    #[test]
    fn exactly_64_headers_are_accepted() {
        let mut buf = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            buf.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        buf.extend_from_slice(b"\r\n");
        assert_eq!(parse(&buf).0.headers.len(), MAX_HEADERS);
    }

    #[test]
    fn http_1_0_is_malformed() {
        let err = parse_request(b"GET / HTTP/1.0\r\nHost: h\r\n\r\n", 4096).unwrap_err();
        assert!(matches!(err, HandshakeError::Malformed(_)));
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn garbage_is_malformed() {
        let err = parse_request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 4096);
        assert!(matches!(err, Err(HandshakeError::Malformed(_))));
        let err = parse_request(b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n", 4096);
        assert!(matches!(err, Err(HandshakeError::Malformed(_))));
    }

    #[test]
    fn latin1_header_bytes_survive() {
        let (req, _) = parse(b"GET / HTTP/1.1\r\nX-Name: caf\xe9 \x80\xff\r\n\r\n");
        let value = req.header("x-name").unwrap();
        assert_eq!(value, "caf\u{e9} \u{80}\u{ff}");
        let bytes: Vec<u8> = value.chars().map(|c| c as u8).collect();
        assert_eq!(bytes, b"caf\xe9 \x80\xff");
    }

    #[test]
    fn handshake_error_rejection_carries_the_status() {
        let r = HandshakeError::HeadTooLarge.rejection();
        assert_eq!(r.status, 431);
        assert_eq!(r.body, b"request head too large");
    }

    #[test]
    fn a_request_without_upgrade_is_not_an_upgrade() {
        assert_eq!(validate(&good_with("Upgrade", &[])), Upgrade::NotUpgrade);
        assert_eq!(
            validate(&request("POST", &[("Host", "h")])),
            Upgrade::NotUpgrade
        );
    }

    #[test]
    fn a_method_other_than_get_is_405_with_allow() {
        let mut req = good_with("Upgrade", &["websocket"]);
        req.method = "POST".to_string();
        let r = rejected(&req);
        assert_eq!(r.status, 405);
        assert_eq!(r.headers, s(&[("Allow", "GET")]));
    }

    #[test]
    fn an_upgrade_to_something_else_is_400() {
        let r = rejected(&good_with("Upgrade", &["h2c"]));
        assert_eq!(r.status, 400);
        assert_eq!(r.body, b"Upgrade header does not contain \"websocket\"");
    }

    #[test]
    fn upgrade_is_matched_case_insensitively_in_a_list() {
        accepted(&good_with("Upgrade", &["WebSocket"]));
        accepted(&good_with("Upgrade", &["foo/2, websocket"]));
        accepted(&good_with("Upgrade", &["foo", "WEBSOCKET"]));
    }

    #[test]
    fn a_missing_host_is_400() {
        let r = rejected(&good_with("Host", &[]));
        assert_eq!(
            (r.status, r.body.as_slice()),
            (400, &b"missing Host header"[..])
        );
        assert_eq!(rejected(&good_with("Host", &["a", "b"])).status, 400);
    }

    #[test]
    fn a_missing_connection_is_400() {
        let r = rejected(&good_with("Connection", &[]));
        assert_eq!(r.status, 400);
        assert_eq!(r.body, b"missing Connection header");
    }

    #[test]
    fn a_connection_without_upgrade_is_400() {
        let r = rejected(&good_with("Connection", &["keep-alive"]));
        assert_eq!(r.status, 400);
        assert_eq!(r.body, b"Connection header does not contain \"Upgrade\"");
        // A token that merely contains "upgrade" is not the token.
        assert_eq!(
            rejected(&good_with("Connection", &["upgraded"])).status,
            400
        );
    }

    #[test]
    fn connection_token_lists_are_accepted_in_any_form() {
        for values in [
            &["keep-alive, Upgrade"][..],
            &["upgrade"],
            &["Keep-Alive,Upgrade"],
            &["keep-alive", "Upgrade"],
            &["  UPGRADE\t"],
            &["close ,\tupgrade , te"],
        ] {
            accepted(&good_with("Connection", values));
        }
    }

    #[test]
    fn a_missing_key_is_400() {
        let r = rejected(&good_with("Sec-WebSocket-Key", &[]));
        assert_eq!(r.status, 400);
        assert_eq!(r.body, b"missing Sec-WebSocket-Key header");
    }

    #[test]
    fn two_keys_are_400() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let r = rejected(&good_with("Sec-WebSocket-Key", &[key, key]));
        assert_eq!(r.status, 400);
    }

    #[test]
    fn a_key_that_is_not_base64_of_16_bytes_is_400() {
        for key in [
            "",
            "not base64!",
            "dGhlIHNhbXBsZSBub25jZQ",         // no padding
            "dGhlIHNhbXBsZSBub25jZSE=",       // 17 bytes
            "dGhlIHNhbXBsZSBub25j",           // 15 bytes
            "dGhlIHNhbXBsZSBub25jZQ==, abcd", // two merged
        ] {
            let r = rejected(&good_with("Sec-WebSocket-Key", &[key]));
            assert_eq!(r.status, 400, "key {key:?}");
        }
    }

    #[test]
    fn a_key_with_surrounding_whitespace_is_trimmed() {
        let (key, _) = accepted(&good_with(
            "Sec-WebSocket-Key",
            &[" dGhlIHNhbXBsZSBub25jZQ== "],
        ));
        assert_eq!(key, "dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn a_missing_version_is_426_with_the_supported_version() {
        let r = rejected(&good_with("Sec-WebSocket-Version", &[]));
        assert_eq!(r.status, 426);
        assert_eq!(r.headers, s(&[("Sec-WebSocket-Version", "13")]));
        assert_eq!(r.body, b"missing Sec-WebSocket-Version header");
    }

    #[test]
    fn another_version_is_426_with_the_supported_version() {
        for versions in [&["8"][..], &["13, 8"], &["13", "13"], &["0x0d"]] {
            let r = rejected(&good_with("Sec-WebSocket-Version", versions));
            assert_eq!(r.status, 426, "{versions:?}");
            assert_eq!(r.headers, s(&[("Sec-WebSocket-Version", "13")]));
        }
    }

    #[test]
    fn subprotocols_are_collected_across_lines_in_order() {
        let (_, subprotocols) = accepted(&good_with(
            "Sec-WebSocket-Protocol",
            &["chat, superchat", " v2.json ,,", "mqtt"],
        ));
        assert_eq!(subprotocols, ["chat", "superchat", "v2.json", "mqtt"]);
        let (_, none) = accepted(&good_with("Sec-WebSocket-Protocol", &[]));
        assert!(none.is_empty());
    }

    #[test]
    fn check_header_accepts_ordinary_headers() {
        assert_eq!(check_header("Set-Cookie", "seen=1; Path=/"), Ok(()));
        assert_eq!(
            check_header("X-Weird!#$%&'*+-.^_`|~", "caf\u{e9}\t"),
            Ok(())
        );
        assert_eq!(check_header("X-Empty", ""), Ok(()));
    }

    #[test]
    fn check_header_rejects_crlf_injection() {
        let err = check_header("X-A", "1\r\nSet-Cookie: evil=1").unwrap_err();
        assert!(err.contains("X-A"), "{err}");
        assert!(check_header("X-A", "1\n").is_err());
        assert!(check_header("X-A", "1\r").is_err());
        assert!(check_header("X-A", "1\0").is_err());
        assert!(check_header("X-A\r\nEvil", "1").is_err());
    }

    #[test]
    fn check_header_rejects_names_that_are_not_tokens() {
        for name in ["", "X A", "X:A", "X-\u{e9}", "(x)", "X\t"] {
            assert!(check_header(name, "v").is_err(), "{name:?}");
        }
    }

    #[test]
    fn write_accept_writes_the_rfc_response() {
        let mut dst = b"prefix".to_vec();
        write_accept(&mut dst, "dGhlIHNhbXBsZSBub25jZQ==", None, &[]);
        assert_eq!(
            dst,
            b"prefixHTTP/1.1 101 Switching Protocols\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
              \r\n"
        );
    }

    #[test]
    fn write_accept_adds_subprotocol_and_extra_headers_but_not_owned_ones() {
        let mut dst = Vec::new();
        let extra = s(&[
            ("Set-Cookie", "seen=1"),
            ("connection", "close"),
            ("Sec-WebSocket-Accept", "forged"),
            ("UPGRADE", "h2c"),
            ("sec-websocket-protocol", "other"),
            ("X-Bad", "a\r\nb"),
            ("X-Server", "lightws"),
        ]);
        write_accept(&mut dst, "dGhlIHNhbXBsZSBub25jZQ==", Some("chat"), &extra);
        assert_eq!(
            dst,
            b"HTTP/1.1 101 Switching Protocols\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
              Sec-WebSocket-Protocol: chat\r\n\
              Set-Cookie: seen=1\r\n\
              X-Server: lightws\r\n\
              \r\n"
        );
    }

    #[test]
    fn write_response_writes_a_plain_text_response() {
        let mut dst = Vec::new();
        write_response(&mut dst, 404, &s(&[("X-A", "1")]), b"no such endpoint");
        assert_eq!(
            dst,
            b"HTTP/1.1 404 Not Found\r\n\
              X-A: 1\r\n\
              Content-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 16\r\n\
              Connection: close\r\n\
              \r\n\
              no such endpoint"
        );
    }

    #[test]
    fn write_response_keeps_user_content_type_and_computes_length() {
        let mut dst = Vec::new();
        let headers = s(&[
            ("content-type", "application/json"),
            ("Content-Length", "999"),
            ("Connection", "keep-alive"),
            ("Transfer-Encoding", "chunked"),
        ]);
        write_response(&mut dst, 599, &headers, b"{}");
        assert_eq!(
            dst,
            b"HTTP/1.1 599 Unknown\r\n\
              content-type: application/json\r\n\
              Content-Length: 2\r\n\
              Connection: close\r\n\
              \r\n\
              {}"
        );
    }

    #[test]
    fn a_rejection_writes_its_headers_and_reason() {
        let r = rejected(&good_with("Sec-WebSocket-Version", &["8"]));
        let mut dst = Vec::new();
        r.write_to(&mut dst);
        let text = String::from_utf8(dst).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(text.ends_with("\r\n\r\nunsupported Sec-WebSocket-Version, this server speaks 13"));
    }

    #[test]
    fn reason_phrases_cover_the_handshake_codes() {
        assert_eq!(reason_phrase(101), "Switching Protocols");
        assert_eq!(reason_phrase(400), "Bad Request");
        assert_eq!(reason_phrase(403), "Forbidden");
        assert_eq!(reason_phrase(405), "Method Not Allowed");
        assert_eq!(reason_phrase(426), "Upgrade Required");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(500), "Internal Server Error");
        assert_eq!(reason_phrase(299), "Unknown");
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(
            buf in proptest::collection::vec(any::<u8>(), 0..600),
            max in 0usize..700,
        ) {
            match parse_request(&buf, max) {
                Ok(Some((_, len))) => prop_assert!(len <= buf.len() && len <= max),
                Ok(None) => prop_assert!(buf.len() < max),
                Err(_) => {}
            }
        }

        #[test]
        fn parse_never_panics_on_mutated_requests(
            at in 0usize..VALID.len(),
            byte in any::<u8>(),
        ) {
            let mut buf = VALID.to_vec();
            buf[at] = byte;
            let _ = parse_request(&buf, 4096).map(|r| r.map(|(req, _)| validate(&req)));
        }

        #[test]
        fn any_prefix_of_a_valid_request_is_incomplete(
            target in "/[a-zA-Z0-9/?=&%._~-]{0,40}",
            headers in proptest::collection::vec(
                ("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~\u{80}-\u{ff}]{0,30}"), 0..10),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut buf = format!("GET {target} HTTP/1.1\r\n").into_bytes();
            for (name, value) in &headers {
                buf.extend_from_slice(name.as_bytes());
                buf.extend_from_slice(b": ");
                // Latin-1 encode so every char is one byte on the wire.
                buf.extend(value.trim().chars().map(|c| c as u8));
                buf.extend_from_slice(b"\r\n");
            }
            buf.extend_from_slice(b"\r\n");
            let (req, len) = parse_request(&buf, 4096).unwrap().unwrap();
            prop_assert_eq!(len, buf.len());
            prop_assert_eq!(req.headers.len(), headers.len());
            let n = cut.index(buf.len());
            prop_assert_eq!(parse_request(&buf[..n], 4096), Ok(None));
        }
    }
}
