//! Fuzz permessage-deflate inflation (`lightws_proto::deflate::Decompressor`) with
//! arbitrary input.
//!
//! Input layout: byte 0 = window bits (8 + b % 8) and no-context-takeover (bit 3),
//! bytes 1-2 = the output limit (little endian, 0-65535), byte 3 = chunk size
//! (1 + b), the rest = compressed messages separated by the bytes `0xff 0x00`.
//!
//! Contract checked: inflating arbitrary input in chunks gives output or a documented
//! error (`Corrupt` → 1002, `TooBig` → 1009), never more than the limit per message,
//! and never a buffer much bigger than the limit; after an error the decompressor is
//! idle (no zlib state borrowed). Valid input (a message compressed by
//! `Compressor`) always round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lightws_proto::deflate::{Compressor, Decompressor, Direction, InflateError};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let dir = Direction {
        window_bits: 8 + (data[0] & 7),
        no_context_takeover: data[0] & 8 != 0,
    };
    let limit = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let chunk = usize::from(data[3]) + 1;
    let body = &data[4..];

    let mut d = Decompressor::new(dir);
    for message in body.split(|&b| b == 0xff) {
        let mut out = Vec::new();
        let mut result = Ok(());
        for piece in message.chunks(chunk) {
            let room = limit - out.len();
            result = d.inflate(piece, &mut out, room);
            assert!(out.len() <= limit, "{} > {limit}", out.len());
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            let room = limit - out.len();
            result = d.finish(&mut out, room);
        }
        assert!(out.len() <= limit);
        assert!(out.capacity() <= limit.max(4096) * 2 + 256 * 1024);
        match result {
            Ok(()) => assert!(!d.in_message()),
            Err(e) => {
                assert!(matches!(e, InflateError::Corrupt(_) | InflateError::TooBig));
                assert!(matches!(e.close_code(), 1002 | 1009));
                assert!(!d.in_message());
                // The connection would be failed: start over, as a new one would.
                d = Decompressor::new(dir);
            }
        }
    }

    // Valid input round-trips.
    let mut c = Compressor::new(dir, 6);
    let mut d = Decompressor::new(dir);
    let mut wire = Vec::new();
    c.compress(body, &mut wire);
    let mut out = Vec::new();
    for piece in wire.chunks(chunk) {
        d.inflate(piece, &mut out, usize::MAX / 2).unwrap();
    }
    d.finish(&mut out, usize::MAX / 2).unwrap();
    assert_eq!(out, body);
});
