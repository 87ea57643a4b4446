//! Fuzz the decoder's incremental UTF-8 validation of text messages against
//! `std::str::from_utf8` on the joined payload.
//!
//! Input layout: byte 0 = number of fragments minus one (mod 16), bytes 1-8 =
//! seed for the fragment boundaries, the masks and the chunking, the rest =
//! the text payload. The payload is sent as one text message split into
//! masked frames (TEXT then CONTINUATIONs), some with a ping in between, and
//! the wire bytes are fed to the decoder in random chunks.
//!
//! Contract checked:
//! - the message is accepted iff std accepts the joined payload, and the
//!   only error is `InvalidUtf8`;
//! - fail fast: whatever was handed out before an error (or at any time) is
//!   valid UTF-8 up to at most an incomplete code point at its end, so an
//!   invalid byte never reaches the application;
//! - the bytes handed out are the payload, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod rng;
use lightws_proto::frame::{encode_frame, Decoder, Event, OpCode, ProtocolError, Role};
use rng::Rng;

/// Is `b` valid UTF-8 except possibly for an incomplete code point at its end?
fn valid_prefix(b: &[u8]) -> bool {
    match std::str::from_utf8(b) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let fragments = usize::from(data[0] & 0x0F) + 1;
    let mut rng = Rng::new(&data[1..9]);
    let payload = &data[9..];

    // Fragment boundaries: sorted random cut points (fragments may be empty).
    let mut cuts: Vec<usize> = (1..fragments)
        .map(|_| (rng.next() % (payload.len() as u64 + 1)) as usize)
        .collect();
    cuts.sort_unstable();
    cuts.push(payload.len());

    let mut wire = Vec::new();
    let mut start = 0;
    for (i, &end) in cuts.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        let mask = (rng.next() as u32).to_le_bytes();
        let fin = i + 1 == cuts.len();
        encode_frame(&mut wire, fin, opcode, &payload[start..end], Some(mask));
        if !fin && rng.next().is_multiple_of(4) {
            // RFC 6455 5.4: control frames may be injected between fragments.
            encode_frame(&mut wire, true, OpCode::Ping, b"x", Some([1, 2, 3, 4]));
        }
        start = end;
    }

    let mut dec = Decoder::new(Role::Server, None);
    let mut pending: Vec<u8> = Vec::new();
    let mut received: Vec<u8> = Vec::new();
    let mut rest = &wire[..];
    let mut done = false;
    let mut error = None;
    'feed: while !rest.is_empty() {
        let r = rng.next();
        let limit = [1u64, 2, 3, 5, 64, 1 << 20][(r % 6) as usize];
        let n = (1 + ((r >> 8) % limit) as usize).min(rest.len());
        pending.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        let mut pos = 0;
        loop {
            match dec.decode(&mut pending[pos..]) {
                Ok((0, _)) => break,
                Ok((k, event)) => {
                    pos += k;
                    match event {
                        Some(Event::Data {
                            opcode,
                            payload,
                            fin,
                            ..
                        }) => {
                            assert_eq!(opcode, OpCode::Text);
                            received.extend_from_slice(payload);
                            assert!(valid_prefix(&received), "invalid UTF-8 handed out");
                            if fin {
                                assert!(!done);
                                done = true;
                            }
                        }
                        Some(Event::Ping(p)) => assert_eq!(p, b"x"),
                        None => {}
                        Some(other) => panic!("unexpected event {other:?}"),
                    }
                }
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
        pending.drain(..pos);
    }

    assert!(payload.starts_with(&received), "payload corrupted");
    match std::str::from_utf8(payload) {
        Ok(_) => {
            assert_eq!(error, None, "valid UTF-8 rejected");
            assert!(done, "message not finished");
            assert_eq!(received, payload);
        }
        Err(_) => {
            assert_eq!(
                error,
                Some(ProtocolError::InvalidUtf8),
                "invalid UTF-8 accepted"
            );
            assert!(!done);
        }
    }
});
