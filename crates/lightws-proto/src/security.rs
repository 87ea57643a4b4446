//! Admission policy for a public deployment: which origins may open a WebSocket, which
//! peers are proxies whose `X-Forwarded-For` is believed, and how many connections one
//! client address may hold.
//!
//! Pure like `handshake`: strings and addresses in, decisions out. No socket, no tokio,
//! no Python, so the rules are unit-tested here and `server.rs` only applies them.
//!
//! - [`OriginPolicy`] checks the `Origin` header (RFC 6455 section 10.2, RFC 6454).
//! - [`IpNet`] and [`forwarded_client`] find the client behind trusted proxies.
//! - [`IpLimiter`] counts connections per client address; an [`IpSlot`] is one
//!   connection's share, released when the slot is dropped (RAII), whatever ends it.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::handshake::Request;

// ---------------------------------------------------------------------------------------
// Origins
// ---------------------------------------------------------------------------------------

/// A parsed, normalised origin: `scheme://host[:port]` (RFC 6454 section 6.2).
///
/// Normalisation, so that two spellings of the same origin compare equal:
/// - scheme and host are lowercased (both are case-insensitive, RFC 3986 section 3.1
///   and 3.2.2);
/// - an IPv6 host is parsed and written back in canonical form;
/// - for `http`/`ws` (80) and `https`/`wss` (443) the default port is made explicit, so
///   `https://a.example` and `https://a.example:443` are the same origin (RFC 6454
///   section 4 step 6: the origin's port is the URI's port or the scheme's default).
///   Browsers omit a default port when they serialise an origin, so this only matters
///   for how a configuration entry is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    /// The effective port: explicit, else the scheme's default, else None.
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        match self.port {
            Some(p) if Some(p) != default_port(&self.scheme) => write!(f, ":{p}"),
            _ => Ok(()),
        }
    }
}

impl Origin {
    /// Parses an origin as serialised by RFC 6454 section 6.2: `scheme "://" host
    /// [ ":" port ]`, nothing else (no path, not even a trailing `/`; no userinfo).
    ///
    /// # Errors
    ///
    /// A sentence saying what is wrong with `s`, suitable for a Python `ValueError`.
    pub fn parse(s: &str) -> Result<Origin, String> {
        if s.eq_ignore_ascii_case("null") {
            // RFC 6454 section 7.1: "null" is what sandboxed frames, file: pages and
            // redirected requests send. Every such page sends the same value, so
            // allowing it would allow any site's sandboxed iframe.
            return Err(format!(
                "{s:?} is the opaque origin shared by sandboxed and file: pages; it cannot \
                 be allowed (use None to admit clients that send no Origin)"
            ));
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(format!(
                "{s:?} is not an origin: expected scheme://host[:port], e.g. \"https://{s}\""
            ));
        };
        let mut chars = scheme.chars();
        let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return Err(format!("{s:?}: {scheme:?} is not a URI scheme"));
        }
        if let Some(c) = rest.chars().find(|c| matches!(c, '/' | '?' | '#')) {
            return Err(format!(
                "{s:?} has a path, query or fragment (found {c:?}): an origin is only \
                 scheme://host[:port], without a trailing '/'"
            ));
        }
        if rest.contains('@') {
            return Err(format!(
                "{s:?} has user information ('@'): an origin is only scheme://host[:port]"
            ));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (inside, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: '[' without ']' around an IPv6 address"))?;
            let v6: Ipv6Addr = inside
                .parse()
                .map_err(|_| format!("{s:?}: {inside:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: unexpected {p:?} after ']'"))?,
                ),
            };
            (v6.to_string(), port)
        } else {
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            };
            if host.is_empty() {
                return Err(format!("{s:?} has no host"));
            }
            if let Some(c) = host
                .chars()
                .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
            {
                return Err(format!(
                    "{s:?}: the host contains {c:?} (wildcards are not supported; \
                     internationalised names must be written in punycode, xn--)"
                ));
            }
            (host.to_ascii_lowercase(), port)
        };
        let scheme = scheme.to_ascii_lowercase();
        let port = match port {
            None => default_port(&scheme),
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => return Err(format!("{s:?}: port {p:?} is not a number from 1 to 65535")),
            },
        };
        Ok(Origin { scheme, host, port })
    }
}

/// `Config.origins`: the origins allowed to open a WebSocket, RFC 6455 section 10.2.
///
/// Browsers send `Origin` with every WebSocket handshake (section 4.1 item 8) and
/// scripts cannot forge it, but nothing else protects a server from cross-site
/// WebSocket hijacking: the upgrade is not subject to CORS, so any page the user visits
/// may open a connection that carries the user's cookies. Section 10.2: "If the
/// origin indicated is unacceptable to the server, then it SHOULD respond to the
/// WebSocket handshake with a reply containing HTTP 403 Forbidden status code."
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    allowed: Vec<Origin>,
    /// `None` was in the list: requests without an `Origin` header (non-browser
    /// clients, which can send any Origin they like anyway) are admitted.
    allow_missing: bool,
}

impl OriginPolicy {
    /// Builds the policy from `Config.origins` entries (`None` admits requests without
    /// an `Origin` header).
    ///
    /// # Errors
    ///
    /// The first malformed entry, named by its index, e.g.
    /// `Config.origins[1]: "app.example" is not an origin: ...`.
    pub fn new(entries: &[Option<String>]) -> Result<OriginPolicy, String> {
        let mut policy = OriginPolicy {
            allowed: Vec::with_capacity(entries.len()),
            allow_missing: false,
        };
        for (i, entry) in entries.iter().enumerate() {
            match entry {
                None => policy.allow_missing = true,
                Some(s) => {
                    let origin =
                        Origin::parse(s).map_err(|e| format!("Config.origins[{i}]: {e}"))?;
                    policy.allowed.push(origin);
                }
            }
        }
        Ok(policy)
    }

    /// Is this request's `Origin` acceptable?
    ///
    /// # Errors
    ///
    /// Why not, for the log (the client only gets a plain 403): no `Origin` and `None`
    /// is not allowed, several `Origin` headers (RFC 6454 section 7.3: a user agent
    /// MUST NOT send more than one), an unparsable value, or an origin not in the list.
    pub fn check(&self, req: &Request) -> Result<(), String> {
        let mut values = req.headers_all("Origin");
        match (values.next(), values.next()) {
            (None, _) if self.allow_missing => Ok(()),
            (None, _) => Err("no Origin header (add None to Config.origins to allow)".into()),
            (Some(_), Some(_)) => Err("more than one Origin header".into()),
            (Some(value), None) => {
                let value = value.trim_matches(|c| c == ' ' || c == '\t');
                match Origin::parse(value) {
                    Ok(o) if self.allowed.contains(&o) => Ok(()),
                    // The normalised form too when it differs: it is what was compared.
                    Ok(o) if o.to_string() != value => {
                        Err(format!("Origin {value:?} ({o}) is not in Config.origins"))
                    }
                    Ok(_) => Err(format!("Origin {value:?} is not in Config.origins")),
                    Err(_) => Err(format!("Origin {value:?} is not in Config.origins")),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client addresses behind proxies
// ---------------------------------------------------------------------------------------

/// An IP network (`10.0.0.0/8`, `fd00::/8`) or a single address (`192.0.2.7`): an entry
/// of `Config.trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `addr` or `addr/prefix`. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`)
    /// are taken as the IPv4 address, which is how peers are compared too.
    ///
    /// # Errors
    ///
    /// A sentence saying what is wrong, e.g. host bits set after the prefix.
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network (a.b.c.d[/n], v6[/n])"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("{s:?}: prefix length {p:?} is not 0-{max}")),
            },
        };
        // A mapped address with a prefix covering the mapping maps to IPv4 too.
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => {
                (addr.to_canonical(), prefix - 96)
            }
            _ => (addr, prefix),
        };
        let net = IpNet { addr, prefix };
        if net.network() != addr {
            return Err(format!(
                "{s:?} has bits set after the /{prefix} prefix: did you mean \"{}/{prefix}\"?",
                net.network()
            ));
        }
        Ok(net)
    }

    fn network(&self) -> IpAddr {
        mask(self.addr, self.prefix)
    }

    /// Is `ip` in this network?
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

/// `ip` with every bit after the first `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

/// Parses one `X-Forwarded-For` item: an address, optionally with a port
/// (`192.0.2.7:4711`, `[2001:db8::1]:4711`) as some proxies write it.
fn parse_forwarded_item(item: &str) -> Option<IpAddr> {
    if let Ok(ip) = item.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = item.strip_prefix('[') {
        let (inside, _port) = rest.split_once(']')?;
        return inside
            .parse::<Ipv6Addr>()
            .ok()
            .map(|v6| IpAddr::V6(v6).to_canonical());
    }
    let (v4, _port) = item.rsplit_once(':')?;
    v4.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The client's address: `peer` itself, or, when `peer` is a trusted proxy, the
/// right-most `X-Forwarded-For` address that is not itself a trusted proxy.
///
/// Each proxy appends the address it received the request from, so reading from the
/// right, every item up to and including the first untrusted one was written by a
/// proxy we trust; everything to its left came from the client and may be forged (so
/// the left-most "original client" is never believed). If every item is trusted, the
/// left-most one is the answer; an unparsable item stops the walk at the proxy that
/// wrote it. Several header lines are one list (RFC 7230 section 3.2.2), in order.
///
/// Returns `peer` (canonical) unless the header moved the answer elsewhere.
pub fn forwarded_client(peer: IpAddr, req: &Request, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(client) {
        return client;
    }
    let items: Vec<&str> = req
        .headers_all("X-Forwarded-For")
        .flat_map(|v| v.split(','))
        .map(|item| item.trim_matches(|c| c == ' ' || c == '\t'))
        .filter(|item| !item.is_empty())
        .collect();
    for item in items.into_iter().rev() {
        match parse_forwarded_item(item) {
            Some(ip) => client = ip,
            None => break,
        }
        if !is_trusted(client) {
            break;
        }
    }
    client
}

// ---------------------------------------------------------------------------------------
// Connections per client address
// ---------------------------------------------------------------------------------------

/// The unit counted by the per-address limit: an IPv4 address, or an IPv6 /64.
///
/// A /64 is the smallest prefix an IPv6 site is normally given (RFC 6177; SLAAC needs
/// it), so one host can use 2^64 addresses: counting single IPv6 addresses would not
/// limit anyone.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        v4 @ IpAddr::V4(_) => v4,
        v6 @ IpAddr::V6(_) => mask(v6, 64),
    }
}

/// [`limit_key`] as 16 bytes (IPv4 as IPv4-mapped IPv6), so that an [`IpSlot`] is 24
/// bytes instead of 32: it lives in every connection's task, which is kept small.
type Key = [u8; 16];

fn key_bytes(ip: IpAddr) -> Key {
    match limit_key(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

type Table = Arc<Mutex<HashMap<Key, u32>>>;

/// Counts open connections per [`limit_key`]; `Config.max_connections_per_ip`.
#[derive(Debug)]
pub struct IpLimiter {
    max: u32,
    table: Table,
}

/// One connection's place in the [`IpLimiter`]; dropping it gives the place back.
///
/// Held by the connection's task from admission to the end of the frame driver, so a
/// normal close, a reset, a failed handshake, a timeout, a panic (the task's future is
/// dropped while unwinding) and server shutdown all release it.
#[derive(Debug)]
pub struct IpSlot {
    table: Table,
    key: Key,
}

impl IpLimiter {
    /// A limiter allowing `max` connections per key; None when `max` is 0 (no limit).
    pub fn new(max: usize) -> Option<IpLimiter> {
        (max > 0).then(|| IpLimiter {
            max: u32::try_from(max).unwrap_or(u32::MAX),
            table: Arc::default(),
        })
    }

    /// Takes a place for `ip`, or None if its key already holds `max` connections.
    pub fn acquire(&self, ip: IpAddr) -> Option<IpSlot> {
        let key = key_bytes(ip);
        let mut table = self.table.lock();
        let n = table.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.table.clone(),
            key,
        })
    }

    /// Connections currently counted for `ip`'s key (for tests and diagnostics).
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.table.lock().get(&key_bytes(ip)).copied().unwrap_or(0)
    }

    /// Number of keys with at least one connection (entries are removed at zero, so
    /// the table never outgrows the connections it counts).
    pub fn keys(&self) -> usize {
        self.table.lock().len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        if let Some(n) = table.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                table.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(s: &str) -> Origin {
        Origin::parse(s).unwrap()
    }

    fn req(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "GET".into(),
            target: "/".into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn policy(entries: &[Option<&str>]) -> OriginPolicy {
        let entries: Vec<Option<String>> = entries.iter().map(|e| e.map(str::to_string)).collect();
        OriginPolicy::new(&entries).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn scheme_and_host_compare_case_insensitively() {
        assert_eq!(origin("HTTPS://App.Example"), origin("https://app.example"));
        assert_ne!(origin("http://app.example"), origin("https://app.example"));
    }

    #[test]
    fn an_explicit_default_port_equals_no_port() {
        assert_eq!(origin("https://a.example:443"), origin("https://a.example"));
        assert_eq!(origin("http://a.example:80"), origin("http://a.example"));
        assert_eq!(origin("wss://a.example:443"), origin("wss://a.example"));
        assert_ne!(
            origin("https://a.example:8443"),
            origin("https://a.example")
        );
        assert_ne!(origin("http://a.example:443"), origin("http://a.example"));
        assert_eq!(
            origin("https://a.example:443").to_string(),
            "https://a.example"
        );
        assert_eq!(
            origin("http://localhost:8080").to_string(),
            "http://localhost:8080"
        );
    }

    #[test]
    fn ipv6_hosts_are_compared_in_canonical_form() {
        assert_eq!(origin("http://[::1]:8080"), origin("http://[0:0::1]:8080"));
        assert_eq!(origin("http://[::1]").to_string(), "http://[::1]");
    }

    #[test]
    fn malformed_origins_say_what_is_wrong() {
        for (bad, says) in [
            ("app.example", "https://app.example"),
            ("https://app.example/", "trailing '/'"),
            ("https://app.example/path", "path"),
            ("https://app.example?q", "path, query"),
            ("https://user@app.example", "user information"),
            ("https://", "no host"),
            ("https://:443", "no host"),
            ("https://app.example:0", "port"),
            ("https://app.example:99999", "port"),
            ("https://app.example:+1", "port"),
            ("https://*.example", "wildcards"),
            ("https://[::1", "']'"),
            ("https://[nope]", "IPv6"),
            ("1http://a", "scheme"),
            ("null", "opaque"),
        ] {
            let err = Origin::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_config_error_names_the_entry() {
        let err = OriginPolicy::new(&[Some("https://ok.example".into()), Some("bad".into())])
            .unwrap_err();
        assert!(err.starts_with("Config.origins[1]: "), "{err}");
    }

    #[test]
    fn listed_origins_pass_and_others_do_not() {
        let p = policy(&[Some("https://app.example"), Some("http://localhost:8080")]);
        assert!(p.check(&req(&[("Origin", "https://app.example")])).is_ok());
        assert!(p
            .check(&req(&[("origin", "HTTPS://APP.EXAMPLE:443")]))
            .is_ok());
        assert!(p
            .check(&req(&[("Origin", "http://localhost:8080")]))
            .is_ok());
        for refused in [
            "http://app.example",
            "https://app.example:8443",
            "https://evil.example",
            "https://app.example.evil.example",
            "http://localhost",
            "null",
            "",
            "https://app.example/",
        ] {
            let err = p.check(&req(&[("Origin", refused)])).unwrap_err();
            assert!(err.contains(&format!("{refused:?}")), "{err}");
        }
    }

    #[test]
    fn a_missing_origin_needs_none_in_the_list() {
        let strict = policy(&[Some("https://app.example")]);
        assert!(strict.check(&req(&[])).unwrap_err().contains("no Origin"));
        let lenient = policy(&[Some("https://app.example"), None]);
        assert!(lenient.check(&req(&[])).is_ok());
        // None admits a missing header, not a wrong one.
        assert!(lenient
            .check(&req(&[("Origin", "https://evil.example")]))
            .is_err());
    }

    #[test]
    fn two_origin_headers_are_refused() {
        let p = policy(&[Some("https://app.example"), None]);
        let two = req(&[
            ("Origin", "https://app.example"),
            ("Origin", "https://app.example"),
        ]);
        assert!(p.check(&two).unwrap_err().contains("more than one"));
    }

    #[test]
    fn an_empty_list_refuses_everything() {
        let p = policy(&[]);
        assert!(p.check(&req(&[])).is_err());
        assert!(p.check(&req(&[("Origin", "https://a.example")])).is_err());
    }

    #[test]
    fn networks_parse_and_contain() {
        let net = IpNet::parse("10.0.0.0/8").unwrap();
        assert!(net.contains(ip("10.1.2.3")));
        assert!(net.contains(ip("::ffff:10.1.2.3")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("::1")));
        let one = IpNet::parse("127.0.0.1").unwrap();
        assert!(one.contains(ip("127.0.0.1")));
        assert!(!one.contains(ip("127.0.0.2")));
        let v6 = IpNet::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("2001:db9::5")));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(ip("192.0.2.1")));
        assert!(IpNet::parse("::ffff:10.0.0.0/104")
            .unwrap()
            .contains(ip("10.9.9.9")));
    }

    #[test]
    fn bad_networks_say_what_is_wrong() {
        for (bad, says) in [
            ("proxy.example", "not an IP"),
            ("10.0.0.1/8", "10.0.0.0/8"),
            ("10.0.0.0/33", "0-32"),
            ("::/129", "0-128"),
            ("10.0.0.0/", "prefix"),
        ] {
            let err = IpNet::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let trusted = [IpNet::parse("127.0.0.1").unwrap()];
        let r = req(&[("X-Forwarded-For", "203.0.113.9")]);
        assert_eq!(
            forwarded_client(ip("127.0.0.2"), &r, &trusted),
            ip("127.0.0.2")
        );
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &r, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(forwarded_client(ip("127.0.0.1"), &r, &[]), ip("127.0.0.1"));
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let trusted = [
            IpNet::parse("127.0.0.1").unwrap(),
            IpNet::parse("10.0.0.0/8").unwrap(),
        ];
        // The client forged the first item; 10.1.1.1 is a second proxy we trust.
        let r = req(&[("X-Forwarded-For", "1.2.3.4, 198.51.100.7, 10.1.1.1")]);
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &r, &trusted),
            ip("198.51.100.7")
        );
        // Split over lines, the list is the same.
        let r = req(&[
            ("X-Forwarded-For", "1.2.3.4"),
            ("x-forwarded-for", "198.51.100.7 ,10.1.1.1"),
        ]);
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &r, &trusted),
            ip("198.51.100.7")
        );
        // Every item trusted: the left-most.
        let r = req(&[("X-Forwarded-For", "10.2.2.2, 10.1.1.1")]);
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &r, &trusted),
            ip("10.2.2.2")
        );
        // No header: the proxy itself.
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &req(&[]), &trusted),
            ip("127.0.0.1")
        );
        // Garbage stops the walk at the proxy that wrote it.
        let r = req(&[("X-Forwarded-For", "198.51.100.7, unknown, 10.1.1.1")]);
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &r, &trusted),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn forwarded_items_may_carry_ports_and_mapped_addresses() {
        let trusted = [IpNet::parse("::1").unwrap()];
        for (item, want) in [
            ("198.51.100.7:4711", "198.51.100.7"),
            ("[2001:db8::7]:4711", "2001:db8::7"),
            ("[2001:db8::7]", "2001:db8::7"),
            ("2001:db8::7", "2001:db8::7"),
            ("::ffff:198.51.100.7", "198.51.100.7"),
        ] {
            let r = req(&[("X-Forwarded-For", item)]);
            assert_eq!(
                forwarded_client(ip("::1"), &r, &trusted),
                ip(want),
                "{item}"
            );
        }
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        assert_eq!(limit_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(limit_key(ip("192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn the_limiter_counts_per_key_and_slots_give_back_on_drop() {
        assert!(IpLimiter::new(0).is_none());
        let lim = IpLimiter::new(2).unwrap();
        let a = lim.acquire(ip("192.0.2.1")).unwrap();
        let b = lim.acquire(ip("::ffff:192.0.2.1")).unwrap();
        assert!(lim.acquire(ip("192.0.2.1")).is_none());
        let other = lim.acquire(ip("192.0.2.2")).unwrap();
        let v6a = lim.acquire(ip("2001:db8::1")).unwrap();
        let v6b = lim.acquire(ip("2001:db8::ffff:2")).unwrap();
        assert!(lim.acquire(ip("2001:db8::3")).is_none());
        assert!(lim.acquire(ip("2001:db8:0:1::3")).is_some());
        assert_eq!(lim.count(ip("192.0.2.1")), 2);
        drop(a);
        assert_eq!(lim.count(ip("192.0.2.1")), 1);
        let again = lim.acquire(ip("192.0.2.1")).unwrap();
        drop((b, again, other, v6a, v6b));
        assert_eq!(lim.keys(), 0, "entries are removed at zero");
    }

    proptest::proptest! {
        /// Config entries and request headers are arbitrary text: never a panic.
        #[test]
        fn parsers_never_panic(s in "\\PC{0,40}", t in "[0-9a-f:.\\[\\]/, ]{0,40}") {
            let _ = Origin::parse(&s);
            let _ = Origin::parse(&format!("https://{s}"));
            let _ = IpNet::parse(&s);
            let _ = IpNet::parse(&t);
            let r = req(&[("X-Forwarded-For", &t), ("Origin", &s)]);
            let _ = forwarded_client(ip("127.0.0.1"), &r, &[IpNet::parse("0.0.0.0/0").unwrap()]);
            let _ = policy(&[Some("https://a.example"), None]).check(&r);
        }

        /// Whatever parses prints back to something that parses to the same origin.
        #[test]
        fn origins_round_trip(s in "[a-zA-Z][a-z+.-]{0,5}://[a-zA-Z0-9.-]{1,12}(:[0-9]{1,5})?") {
            if let Ok(o) = Origin::parse(&s) {
                proptest::prop_assert_eq!(Origin::parse(&o.to_string()).unwrap(), o);
            }
        }
    }

    #[test]
    fn a_slot_is_three_words() {
        assert_eq!(std::mem::size_of::<IpSlot>(), 24);
    }

    #[test]
    fn a_slot_is_released_by_a_panic() {
        let lim = IpLimiter::new(1).unwrap();
        let slot = lim.acquire(ip("192.0.2.1")).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = slot;
            panic!("bug");
        }));
        assert!(r.is_err());
        assert_eq!(lim.count(ip("192.0.2.1")), 0);
    }
}
