//! Fuzz the client side of the opening handshake (`handshake::client`): what a
//! server may send back is untrusted input to `lightws.connect` and the load
//! generator.
//!
//! Input layout: byte 0 = how many subprotocols were offered (0-3, of "a", "b",
//! "c"), bytes 1-2 = `max_head` (big endian), the rest = the bytes a server sent.
//!
//! Contract checked:
//! - `parse_response` returns `Ok(None)` only below `max_head`, a head length
//!   within the buffer and within `max_head`, or a documented error; every strict
//!   prefix of a parsed head is `Ok(None)`;
//! - `check_response` never panics; a subprotocol it accepts is one offered; it
//!   accepts only a 101 carrying the right `Sec-WebSocket-Accept`;
//! - `Target::parse` of the input as text never panics, and for any URL it
//!   accepts, `write_request` writes a request the server side parses and
//!   validates as a WebSocket upgrade with the same key and subprotocols.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lightws_proto::handshake::client::{
    check_response, parse_response, write_request, ResponseError, Target,
};
use lightws_proto::handshake::{accept_key, parse_request, validate, Upgrade};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let offered: Vec<String> = ["a", "b", "c"][..usize::from(data[0] % 4)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let max_head = usize::from(u16::from_be_bytes([data[1], data[2]]));
    let buf = &data[3..];

    match parse_response(buf, max_head) {
        Ok(None) => assert!(buf.len() < max_head),
        Err(ResponseError::Malformed(_) | ResponseError::HeadTooLarge(_)) => {}
        Err(other) => panic!("parse_response gave {other:?}"),
        Ok(Some((resp, head))) => {
            assert!(head > 0 && head <= buf.len() && head <= max_head);
            let step = (head / 256).max(1);
            for k in (0..head).step_by(step) {
                assert!(matches!(parse_response(&buf[..k], max_head), Ok(None)));
            }
            let _ = resp.body_length();
            match check_response(&resp, KEY, &offered) {
                Ok(sub) => {
                    assert_eq!(resp.status, 101);
                    let accept = resp.header("Sec-WebSocket-Accept").unwrap();
                    assert_eq!(accept.trim(), accept_key(KEY));
                    if let Some(p) = sub {
                        assert!(offered.contains(&p));
                    }
                }
                Err(ResponseError::Refused(s)) => assert_ne!(s, 101),
                Err(ResponseError::Invalid(_)) => assert_eq!(resp.status, 101),
                Err(other) => panic!("check_response gave {other:?}"),
            }
        }
    }

    if let Ok(text) = std::str::from_utf8(buf) {
        if let Ok(target) = Target::parse(text) {
            let _ = target.host_header();
            let mut out = Vec::new();
            write_request(&mut out, &target, KEY, &offered, &[]);
            // Our own request must pass our own server's checks (when its target
            // is a valid HTTP request-target: httparse is stricter than the URL
            // parser about some bytes).
            if let Ok(Some((req, used))) = parse_request(&out, usize::MAX) {
                assert_eq!(used, out.len());
                match validate(&req) {
                    Upgrade::WebSocket { key, subprotocols } => {
                        assert_eq!(key, KEY);
                        assert_eq!(subprotocols, offered);
                    }
                    other => panic!("our request for {text:?} was not an upgrade: {other:?}"),
                }
            }
        }
    }
});
