//! The client side of the opening handshake (RFC 6455 section 4.1), pure like the
//! server side: a URL in, request bytes out; response bytes in, a verdict out.
//!
//! One implementation for every lightws client: `lightws.connect` (the extension's
//! `src/client.rs`) and the load generator (`crates/lightws-loadgen`) both build their
//! request with [`write_request`] and judge the answer with [`parse_response`] and
//! [`check_response`].
//!
//! - [`Target::parse`]: `ws://` / `wss://` URLs (host, port, request target).
//! - [`new_key`]: the random `Sec-WebSocket-Key` (§4.1, item 7 of the request).
//! - [`write_request`]: the upgrade request: `Host`, `Upgrade`, `Connection`,
//!   `Sec-WebSocket-Key`, `Sec-WebSocket-Version: 13`, `Sec-WebSocket-Protocol`, then
//!   the caller's headers.
//! - [`parse_response`]: the response head (httparse); bytes after it are WebSocket
//!   frames the server sent right behind its 101 and belong to the session.
//! - [`check_response`]: the client's checks of §4.1 (status 101, `Upgrade`,
//!   `Connection`, `Sec-WebSocket-Accept`, no extension we did not offer, a subprotocol
//!   we offered).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::{accept_key, check_header, WEBSOCKET_VERSION};

/// A parsed `ws://` or `wss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `wss://`.
    pub tls: bool,
    /// The host as written, without the brackets of an IPv6 literal.
    pub host: String,
    /// The port (default 80 for `ws://`, 443 for `wss://`).
    pub port: u16,
    /// The request target: path and query, at least `/` (a fragment is dropped).
    pub path: String,
}

impl Target {
    /// Parse `ws[s]://host[:port][/path][?query][#fragment]`. The scheme and host are
    /// case-insensitive (RFC 3986); user information (`user@host`) is refused.
    ///
    /// # Errors
    ///
    /// A message naming what is wrong with `url`.
    pub fn parse(url: &str) -> Result<Target, String> {
        let lower = url
            .get(..6)
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        let (tls, rest) = if lower.starts_with("ws://") {
            (false, &url[5..])
        } else if lower.starts_with("wss://") {
            (true, &url[6..])
        } else {
            return Err(format!("{url:?}: the URL must start with ws:// or wss://"));
        };
        // RFC 6455 3: fragments are not used in WebSocket URIs; drop one if given.
        let rest = rest.split('#').next().unwrap_or("");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(format!(
                "{url:?}: user information in the URL is not supported (send an \
                 Authorization header instead)"
            ));
        }
        if path
            .chars()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(format!(
                "{url:?}: the path contains whitespace or control characters"
            ));
        }
        let path = match path.chars().next() {
            None => "/".to_string(),
            Some('?') => format!("/{path}"),
            Some(_) => path.to_string(),
        };
        let default_port = if tls { 443 } else { 80 };
        let port_of = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("{url:?}: bad port {p:?}")),
                Ok(n) => Ok(n),
            }
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unterminated [IPv6] host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => port_of(p)?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{url:?}: junk after the host")),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), port_of(p)?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        if host
            .chars()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control() || c == '/')
        {
            return Err(format!("{url:?}: bad host {host:?}"));
        }
        Ok(Target {
            tls,
            host,
            port,
            path,
        })
    }

    /// The `Host` header value: the host (IPv6 in brackets), with `:port` unless it is
    /// the scheme's default (RFC 7230 section 5.4).
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// A fresh `Sec-WebSocket-Key`: base64 of 16 unpredictable bytes (RFC 6455 4.1).
pub fn new_key() -> String {
    let mut nonce = [0u8; 16];
    crate::mask::fill_random(&mut nonce);
    BASE64.encode(nonce)
}

/// Request headers the handshake writes itself; [`write_request`] drops them from the
/// caller's headers (except `Host`, which a caller may set to reach a virtual host
/// through an address).
pub const OWNED_REQUEST_HEADERS: &[&str] = &[
    "Upgrade",
    "Connection",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Protocol",
    // No extension is offered (permessage-deflate is not implemented): a server that
    // answered one would fail the handshake.
    "Sec-WebSocket-Extensions",
];

/// Appends the upgrade request of RFC 6455 section 4.1 for `target`.
///
/// Writes `GET {path} HTTP/1.1`, `Host` (from `target` unless `extra` has one),
/// `Upgrade: websocket`, `Connection: Upgrade`, `Sec-WebSocket-Key: {key}`,
/// `Sec-WebSocket-Version: 13`, `Sec-WebSocket-Protocol` listing `subprotocols` (if
/// any), then `extra` in order, then the empty line. Headers of `extra` named in
/// [`OWNED_REQUEST_HEADERS`], or failing [`check_header`], are skipped.
pub fn write_request(
    dst: &mut Vec<u8>,
    target: &Target,
    key: &str,
    subprotocols: &[String],
    extra: &[(String, String)],
) {
    let usable = |(name, value): &&(String, String)| {
        !OWNED_REQUEST_HEADERS
            .iter()
            .any(|o| o.eq_ignore_ascii_case(name))
            && check_header(name, value).is_ok()
    };
    dst.extend_from_slice(b"GET ");
    dst.extend_from_slice(target.path.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    if !extra
        .iter()
        .filter(usable)
        .any(|(n, _)| n.eq_ignore_ascii_case("Host"))
    {
        push(dst, "Host", &target.host_header());
    }
    push(dst, "Upgrade", "websocket");
    push(dst, "Connection", "Upgrade");
    push(dst, "Sec-WebSocket-Key", key);
    push(dst, "Sec-WebSocket-Version", WEBSOCKET_VERSION);
    if !subprotocols.is_empty() {
        push(dst, "Sec-WebSocket-Protocol", &subprotocols.join(", "));
    }
    for (name, value) in extra.iter().filter(usable) {
        push(dst, name, value);
    }
    dst.extend_from_slice(b"\r\n");
}

fn push(dst: &mut Vec<u8>, name: &str, value: &str) {
    dst.extend_from_slice(name.as_bytes());
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value.as_bytes());
    dst.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase as sent (may be empty).
    pub reason: String,
    /// Header lines in order, names spelled as sent, values decoded as Latin-1.
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// The first value of the header `name` (ASCII case-insensitive), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of the header `name`, in order.
    pub fn headers_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Items of a comma-separated header list over every line of `name`, trimmed.
    fn list_items<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers_all(name)
            .flat_map(|v| v.split(','))
            .map(|item| item.trim_matches(|c| c == ' ' || c == '\t'))
            .filter(|item| !item.is_empty())
    }

    /// How many body bytes follow this head, as far as a refused upgrade's body is
    /// worth reading: `Some(n)` from `Content-Length`, `Some(0)` for a status that has
    /// no body, `None` when the body runs until the server closes (no length given,
    /// not chunked) and `Some(0)` for a chunked body (not decoded: not needed to report
    /// a refusal).
    pub fn body_length(&self) -> Option<usize> {
        if self.status < 200 || self.status == 204 || self.status == 304 {
            return Some(0);
        }
        if self.header("Transfer-Encoding").is_some() {
            return Some(0);
        }
        self.header("Content-Length")
            .map(|v| v.trim().parse().unwrap_or(0))
    }
}

/// Why the server's answer does not complete the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not an HTTP/1.x response head.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    /// No complete head within the limit.
    #[error("response head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// A well-formed answer other than 101: the server refused the upgrade.
    #[error("server rejected the WebSocket upgrade: HTTP {0}")]
    Refused(u16),
    /// A 101 that breaks RFC 6455 section 4.1: the client must fail the connection.
    #[error("invalid 101 response: {0}")]
    Invalid(String),
}

/// Parses an HTTP/1.x response head from the start of `buf`.
///
/// - `Ok(None)`: the head is not complete and `buf` is shorter than `max_head`.
/// - `Ok(Some((response, head_len)))`: bytes from `head_len` on follow the head (the
///   first WebSocket frames, or a refusal's body).
///
/// # Errors
///
/// [`ResponseError::HeadTooLarge`] past `max_head` bytes (or more than
/// [`super::MAX_HEADERS`] header lines), [`ResponseError::Malformed`] for bytes httparse
/// rejects.
pub fn parse_response(
    buf: &[u8],
    max_head: usize,
) -> Result<Option<(Response, usize)>, ResponseError> {
    let window = &buf[..buf.len().min(max_head)];
    let mut headers = [httparse::EMPTY_HEADER; super::MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Ok(None),
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(ResponseError::HeadTooLarge(max_head))
        }
        Err(e) => return Err(ResponseError::Malformed(e.to_string())),
    };
    let status = parsed
        .code
        .ok_or_else(|| ResponseError::Malformed("no status code".into()))?;
    let response = Response {
        status,
        reason: parsed.reason.unwrap_or("").to_string(),
        headers: parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    h.value.iter().map(|&b| char::from(b)).collect(),
                )
            })
            .collect(),
    };
    Ok(Some((response, head_len)))
}

/// The client's checks of RFC 6455 section 4.1 on the server's response to a request
/// made with `key` offering `offered` subprotocols. Returns the subprotocol the server
/// chose, if any.
///
/// # Errors
///
/// - [`ResponseError::Refused`] if the status is not 101 (the server said no).
/// - [`ResponseError::Invalid`] if it is 101 but: `Upgrade` is not `websocket`;
///   `Connection` lacks `Upgrade`; `Sec-WebSocket-Accept` is missing, repeated or not
///   `base64(SHA-1(key + GUID))`; an extension is accepted that was not offered (none
///   ever is); the subprotocol is not one offered, or more than one.
pub fn check_response(
    response: &Response,
    key: &str,
    offered: &[String],
) -> Result<Option<String>, ResponseError> {
    let invalid = |m: String| Err(ResponseError::Invalid(m));
    if response.status != 101 {
        return Err(ResponseError::Refused(response.status));
    }
    // 4.1, response item 2: Upgrade is "websocket", case-insensitive.
    if !response
        .list_items("Upgrade")
        .any(|p| p.eq_ignore_ascii_case("websocket"))
    {
        return invalid(match response.header("Upgrade") {
            None => "missing Upgrade header".into(),
            Some(v) => format!("Upgrade header is {v:?}, not \"websocket\""),
        });
    }
    // Item 3: Connection has the token "Upgrade", case-insensitive.
    if !response
        .list_items("Connection")
        .any(|t| t.eq_ignore_ascii_case("upgrade"))
    {
        return invalid(match response.header("Connection") {
            None => "missing Connection header".into(),
            Some(v) => format!("Connection header is {v:?}, without \"Upgrade\""),
        });
    }
    // Item 4: Sec-WebSocket-Accept is base64(SHA-1(key + GUID)).
    let expected = accept_key(key);
    let mut accepts = response.headers_all("Sec-WebSocket-Accept");
    match (accepts.next(), accepts.next()) {
        (None, _) => return invalid("missing Sec-WebSocket-Accept header".into()),
        (Some(_), Some(_)) => return invalid("more than one Sec-WebSocket-Accept header".into()),
        (Some(v), None) if v.trim() == expected => {}
        (Some(v), None) => {
            return invalid(format!(
                "Sec-WebSocket-Accept is {:?}, expected {expected:?}",
                v.trim()
            ))
        }
    }
    // Item 5: no extension we did not offer (we offer none).
    if let Some(ext) = response.list_items("Sec-WebSocket-Extensions").next() {
        return invalid(format!(
            "the server accepted extension {ext:?}, which was not offered"
        ));
    }
    // Item 6: at most one subprotocol, and one we offered.
    let mut chosen = response.list_items("Sec-WebSocket-Protocol");
    match (chosen.next(), chosen.next()) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) => invalid("the server chose more than one subprotocol".into()),
        (Some(p), None) if offered.iter().any(|o| o == p) => Ok(Some(p.to_string())),
        (Some(p), None) if offered.is_empty() => invalid(format!(
            "the server chose subprotocol {p:?}, but none was offered"
        )),
        (Some(p), None) => invalid(format!(
            "the server chose subprotocol {p:?}, which was not offered (offered: {})",
            offered.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key and accept value of RFC 6455 section 1.3.
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn target(url: &str) -> Target {
        Target::parse(url).unwrap()
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> Response {
        Response {
            status,
            reason: String::new(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn ok_headers() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", ACCEPT),
        ]
    }

    fn offered(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    // -- URLs ------------------------------------------------------------------------

    #[test]
    fn urls_parse_with_defaults() {
        let t = target("ws://127.0.0.1:9001/echo?x=1");
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (false, "127.0.0.1", 9001, "/echo?x=1")
        );
        let t = target("wss://example.org");
        assert_eq!((t.tls, t.port, t.path.as_str()), (true, 443, "/"));
        assert_eq!(t.host_header(), "example.org");
        let t = target("ws://[::1]:8080?q");
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 8080, "/?q")
        );
        assert_eq!(t.host_header(), "[::1]:8080");
        assert_eq!(target("WS://Example.org:80/a#frag").path, "/a");
        assert_eq!(target("ws://example.org:80/").host_header(), "example.org");
        assert_eq!(target("wss://h:8443/").host_header(), "h:8443");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, what) in [
            ("http://x/", "ws:// or wss://"),
            ("ws://x:notaport/", "bad port"),
            ("ws://x:0/", "bad port"),
            ("ws://x:70000/", "bad port"),
            ("ws:///", "no host"),
            ("ws://[::1/", "unterminated"),
            ("ws://user:pw@x/", "user information"),
            ("ws://x/a b", "whitespace"),
        ] {
            let e = Target::parse(url).unwrap_err();
            assert!(e.contains(what), "{url}: {e}");
        }
    }

    // -- the request -----------------------------------------------------------------

    #[test]
    fn the_request_is_what_a_server_validates() {
        let mut out = Vec::new();
        write_request(
            &mut out,
            &target("ws://server.example.com/chat?room=1"),
            KEY,
            &offered(&["chat", "superchat"]),
            &[("Origin".into(), "http://example.com".into())],
        );
        let (req, used) = super::super::parse_request(&out, 4096).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(req.target, "/chat?room=1");
        assert_eq!(req.header("Host"), Some("server.example.com"));
        assert_eq!(req.header("Origin"), Some("http://example.com"));
        match super::super::validate(&req) {
            super::super::Upgrade::WebSocket { key, subprotocols } => {
                assert_eq!(key, KEY);
                assert_eq!(subprotocols, offered(&["chat", "superchat"]));
            }
            other => panic!("not a valid upgrade: {other:?}"),
        }
    }

    #[test]
    fn owned_and_invalid_extra_headers_are_dropped_but_host_may_be_set() {
        let mut out = Vec::new();
        write_request(
            &mut out,
            &target("ws://10.0.0.1:9000/"),
            KEY,
            &[],
            &[
                ("Host".into(), "virtual.example".into()),
                ("Sec-WebSocket-Key".into(), "forged".into()),
                (
                    "sec-websocket-extensions".into(),
                    "permessage-deflate".into(),
                ),
                ("X-Split".into(), "a\r\nInjected: 1".into()),
                ("X-Fine".into(), "yes".into()),
            ],
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("Host:").count(), 1);
        assert!(text.contains("Host: virtual.example\r\n"));
        assert!(!text.contains("forged"));
        assert!(!text.contains("deflate"));
        assert!(!text.contains("Injected"));
        assert!(text.contains("X-Fine: yes\r\n"));
        assert!(!text.contains("Sec-WebSocket-Protocol"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn keys_are_fresh_16_byte_nonces() {
        let a = new_key();
        let b = new_key();
        assert_ne!(a, b);
        assert_eq!(BASE64.decode(&a).unwrap().len(), 16);
    }

    // -- the response ----------------------------------------------------------------

    #[test]
    fn a_response_head_parses_and_leaves_the_frames_after_it() {
        let mut buf = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        )
        .into_bytes();
        let head = buf.len();
        buf.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
        assert_eq!(parse_response(&buf[..10], 4096), Ok(None));
        let (resp, used) = parse_response(&buf, 4096).unwrap().unwrap();
        assert_eq!(used, head);
        assert_eq!(resp.status, 101);
        assert_eq!(resp.reason, "Switching Protocols");
        assert_eq!(check_response(&resp, KEY, &[]), Ok(None));
    }

    #[test]
    fn malformed_and_oversized_heads_are_errors() {
        assert!(matches!(
            parse_response(b"HTTP/1.1 abc\r\n\r\n", 4096),
            Err(ResponseError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", 4096),
            Err(ResponseError::Malformed(_))
        ));
        let long = format!("HTTP/1.1 101 OK\r\nX: {}\r\n", "a".repeat(100));
        assert_eq!(
            parse_response(long.as_bytes(), 64),
            Err(ResponseError::HeadTooLarge(64))
        );
    }

    #[test]
    fn any_status_but_101_is_a_refusal() {
        for status in [200, 301, 400, 403, 404, 426, 500, 503] {
            assert_eq!(
                check_response(&response(status, &ok_headers()), KEY, &[]),
                Err(ResponseError::Refused(status))
            );
        }
    }

    #[test]
    fn a_wrong_or_missing_accept_key_fails() {
        let mut h = ok_headers();
        h[2].1 = "dGhlIHNhbXBsZSBub25jZQ==";
        let e = check_response(&response(101, &h), KEY, &[]).unwrap_err();
        assert!(
            matches!(&e, ResponseError::Invalid(m) if m.contains("expected")),
            "{e}"
        );
        h.remove(2);
        let e = check_response(&response(101, &h), KEY, &[]).unwrap_err();
        assert!(
            matches!(&e, ResponseError::Invalid(m) if m.contains("missing")),
            "{e}"
        );
        let mut twice = ok_headers();
        twice.push(("Sec-WebSocket-Accept", ACCEPT));
        assert!(check_response(&response(101, &twice), KEY, &[]).is_err());
    }

    #[test]
    fn upgrade_and_connection_are_checked_as_token_lists_in_any_case() {
        let h = [
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, UPGRADE"),
            ("sec-websocket-accept", ACCEPT),
        ];
        assert_eq!(check_response(&response(101, &h), KEY, &[]), Ok(None));
        for drop in ["Upgrade", "Connection"] {
            let h: Vec<_> = ok_headers()
                .into_iter()
                .filter(|(n, _)| *n != drop)
                .collect();
            let e = check_response(&response(101, &h), KEY, &[]).unwrap_err();
            assert!(
                matches!(&e, ResponseError::Invalid(m) if m.contains(drop)),
                "{e}"
            );
        }
        let mut h = ok_headers();
        h[0].1 = "h2c";
        assert!(check_response(&response(101, &h), KEY, &[]).is_err());
    }

    #[test]
    fn an_extension_never_offered_fails() {
        let mut h = ok_headers();
        h.push(("Sec-WebSocket-Extensions", "permessage-deflate"));
        let e = check_response(&response(101, &h), KEY, &[]).unwrap_err();
        assert!(matches!(&e, ResponseError::Invalid(m) if m.contains("permessage-deflate")));
    }

    #[test]
    fn the_subprotocol_must_be_one_offered() {
        let mut h = ok_headers();
        h.push(("Sec-WebSocket-Protocol", "chat"));
        let r = response(101, &h);
        assert_eq!(
            check_response(&r, KEY, &offered(&["superchat", "chat"])),
            Ok(Some("chat".into()))
        );
        assert!(check_response(&r, KEY, &offered(&["superchat"])).is_err());
        assert!(check_response(&r, KEY, &[]).is_err());
        h.push(("Sec-WebSocket-Protocol", "superchat"));
        assert!(check_response(&response(101, &h), KEY, &offered(&["superchat", "chat"])).is_err());
        // None chosen from those offered: allowed (the application decides).
        assert_eq!(
            check_response(&response(101, &ok_headers()), KEY, &offered(&["chat"])),
            Ok(None)
        );
    }

    proptest::proptest! {
        /// What a server sends is untrusted: parsing and checking never panic, a
        /// prefix of a head is "not yet", and only a 101 with the right accept value
        /// and an offered subprotocol passes (fuzz/fuzz_targets/handshake_client.rs
        /// checks the same with libFuzzer).
        #[test]
        fn any_server_answer_is_judged_without_panicking(
            head in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            n in 0usize..4,
        ) {
            let offered = offered(&["a", "b", "c"][..n]);
            let mut buf = b"HTTP/1.1 101 OK\r\n".to_vec();
            buf.extend_from_slice(&head);
            for b in [head.as_slice(), buf.as_slice()] {
                if let Ok(Some((resp, used))) = parse_response(b, 4096) {
                    proptest::prop_assert!(used <= b.len());
                    proptest::prop_assert_eq!(parse_response(&b[..used - 1], 4096), Ok(None));
                    if let Ok(sub) = check_response(&resp, KEY, &offered) {
                        proptest::prop_assert_eq!(resp.status, 101);
                        proptest::prop_assert!(sub.is_none_or(|p| offered.contains(&p)));
                    }
                }
            }
        }

        /// Every URL the parser accepts gives a request our own server validates.
        #[test]
        fn every_accepted_url_gives_a_valid_upgrade(
            url in "wss?://[a-zA-Z0-9.-]{1,20}(:[0-9]{1,5})?(/[a-zA-Z0-9/._~%-]{0,20})?(\\?[a-z0-9=&]{0,10})?",
            n in 0usize..3,
        ) {
            let offered = offered(&["a", "b"][..n]);
            if let Ok(t) = Target::parse(&url) {
                let mut out = Vec::new();
                write_request(&mut out, &t, KEY, &offered, &[]);
                let (req, used) = super::super::parse_request(&out, 8192).unwrap().unwrap();
                proptest::prop_assert_eq!(used, out.len());
                match super::super::validate(&req) {
                    super::super::Upgrade::WebSocket { key, subprotocols } => {
                        proptest::prop_assert_eq!(key, KEY);
                        proptest::prop_assert_eq!(subprotocols, offered);
                    }
                    other => proptest::prop_assert!(false, "{url}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn body_length_of_a_refusal() {
        assert_eq!(
            response(403, &[("Content-Length", "12")]).body_length(),
            Some(12)
        );
        assert_eq!(response(204, &[]).body_length(), Some(0));
        assert_eq!(
            response(500, &[("Transfer-Encoding", "chunked")]).body_length(),
            Some(0)
        );
        assert_eq!(response(404, &[]).body_length(), None);
    }
}
