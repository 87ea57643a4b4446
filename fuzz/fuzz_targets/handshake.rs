//! Fuzz the opening handshake: `parse_request`, `validate`, and the response
//! writers fed with what the request carried.
//!
//! Input layout: bytes 0-1 = `max_head` (big endian), bytes 2-3 = a status
//! code for `write_response`, the rest = the bytes a client sent.
//!
//! Contract checked:
//! - `parse_request` returns `Ok(None)`, `Ok(Some(..))` with a head length
//!   within the buffer and within `max_head`, or a documented error (400 or
//!   431); short input below `max_head` is never an error;
//! - every strict prefix of a successfully parsed head gives `Ok(None)` (so a
//!   server reading a request in pieces reaches the same result), and the
//!   same head followed by arbitrary bytes parses to the same request;
//! - `validate` never panics, and an accepted key yields a 28-byte accept
//!   value;
//! - `write_accept` / `Rejection::write_to` / `write_response` with headers
//!   taken from the request produce one well-formed response head: CRLF line
//!   ends, no bare CR or LF (no response splitting), a correct
//!   `Content-Length`;
//! - nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lightws_proto::handshake::{
    accept_key, parse_request, reason_phrase, validate, write_accept, write_response,
    HandshakeError, Upgrade,
};

/// Split a response into its head lines and body, checking the framing.
fn check_response(resp: &[u8], status: u16) -> Vec<u8> {
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head not terminated");
    let head = &resp[..end];
    let body = &resp[end + 4..];
    let mut lines = head.split(|&b| b == b'\n');
    let status_line = lines.next().unwrap();
    let expected = format!("HTTP/1.1 {status} {}\r", reason_phrase(status));
    assert_eq!(status_line, expected.as_bytes());
    let mut content_length = None;
    let mut count = 0;
    for line in head.split(|&b| b == b'\n').skip(1) {
        // Every line but the last ends in CR (the last one's CRLF is part of
        // the terminator found above).
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(!line.contains(&b'\r'), "bare CR in the response head");
        assert!(!line.is_empty(), "empty line inside the response head");
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .expect("header line without a colon");
        let name = &line[..colon];
        assert!(!name.is_empty());
        assert!(name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b)));
        if name.eq_ignore_ascii_case(b"content-length") {
            count += 1;
            let v = std::str::from_utf8(&line[colon + 1..]).unwrap().trim();
            content_length = Some(v.parse::<usize>().unwrap());
        }
    }
    if status == 101 {
        // A 101 has no body; extra headers are the caller's (here: copied
        // from the request), so their names are not checked.
        assert!(body.is_empty());
    } else {
        assert_eq!(count, 1, "Content-Length missing or repeated");
        assert_eq!(content_length, Some(body.len()));
    }
    body.to_vec()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let max_head = usize::from(u16::from_be_bytes([data[0], data[1]]));
    let status = u16::from_be_bytes([data[2], data[3]]);
    let buf = &data[4..];

    let parsed = parse_request(buf, max_head);
    let (req, head_len) = match parsed {
        Ok(None) => {
            assert!(buf.len() < max_head, "Ok(None) at or past max_head");
            return;
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 431));
            if e == HandshakeError::HeadTooLarge {
                assert_eq!(e.status(), 431);
            }
            let mut out = Vec::new();
            e.rejection().write_to(&mut out);
            check_response(&out, e.status());
            return;
        }
        Ok(Some(ok)) => ok,
    };
    assert!(head_len > 0 && head_len <= buf.len() && head_len <= max_head);

    // A request read in pieces: each strict prefix is "not yet" (quadratic,
    // so only every prefix of short heads and a sample of long ones).
    let step = (head_len / 256).max(1);
    for k in (0..head_len)
        .step_by(step)
        .chain(std::iter::once(head_len - 1))
    {
        match parse_request(&buf[..k], max_head) {
            Ok(None) => {}
            other => panic!("prefix of {k}/{head_len} bytes gave {other:?}"),
        }
    }
    // The head alone, and the head followed by other bytes, parse the same.
    let alone = parse_request(&buf[..head_len], max_head).unwrap().unwrap();
    assert_eq!(alone, (req.clone(), head_len));

    let _ = (req.path(), req.query());
    assert!(req.path().len() + req.query().len() <= req.target.len());

    let mut out = Vec::new();
    match validate(&req) {
        Upgrade::WebSocket { key, subprotocols } => {
            assert_eq!(accept_key(&key).len(), 28);
            assert!(subprotocols.iter().all(|p| !p.is_empty()));
            // Headers from the request stand in for user-supplied extras.
            let sub = subprotocols.first().map(String::as_str);
            // The subprotocol is written as given (the caller picks it from the
            // offered list); a request can't put CR/LF in a header value.
            write_accept(&mut out, &key, sub, &req.headers);
            check_response(&out, 101);
        }
        Upgrade::NotUpgrade => {
            // 101 is the accept path's; any other status goes through here.
            let status = if status == 101 { 200 } else { status };
            write_response(&mut out, status, &req.headers, req.target.as_bytes());
            let body = check_response(&out, status);
            assert_eq!(body, req.target.as_bytes());
        }
        Upgrade::Reject(r) => {
            assert!(matches!(r.status, 400 | 405 | 426), "status {}", r.status);
            r.write_to(&mut out);
            let body = check_response(&out, r.status);
            assert_eq!(body, r.body);
        }
    }
});
