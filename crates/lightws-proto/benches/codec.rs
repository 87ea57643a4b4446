//! Codec micro-benchmarks: `cargo bench -p lightws-proto --bench codec`.
//!
//! - `decode_unmask/{binary,text}/SIZE`: one masked client frame decoded by a
//!   server-role `Decoder` (header parse + in-place unmask; text adds the
//!   incremental UTF-8 check). Throughput in payload bytes.
//! - `encode/{server,client}/SIZE`: `encode_frame` into a reused buffer,
//!   unmasked (what the server sends) and masked (what a client sends).
//! - `utf8/{ascii,mixed}/SIZE`: `simdutf8::basic::from_utf8`, the validator
//!   the decoder uses.
//! - `handshake/parse_validate_accept`: `parse_request` + `validate` +
//!   `write_accept` of a typical browser upgrade request (elements/s).
//!
//! The buffer is decoded in place again on every iteration: unmasking twice
//! restores the original bytes, so a binary frame stays a valid frame. Text
//! frames use an all-zero masking key (the mask bit is set and the XOR still
//! runs) so the payload stays valid UTF-8 however often it is unmasked.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lightws_proto::frame::{self, Decoder, Event, OpCode, Role};
use lightws_proto::handshake;

const SIZES: &[(usize, &str)] = &[
    (64, "64B"),
    (1024, "1KiB"),
    (64 * 1024, "64KiB"),
    (1024 * 1024, "1MiB"),
];

/// Bytes that are valid UTF-8: ASCII, or a mix of 1-4 byte code points.
fn text(len: usize, mixed: bool) -> Vec<u8> {
    let unit: &str = if mixed {
        "héllo wörld — ἀλφα 😀 "
    } else {
        "hello world, the quick brown fox "
    };
    let mut s = String::with_capacity(len);
    for c in unit.chars().cycle() {
        if s.len() + c.len_utf8() > len {
            break;
        }
        s.push(c);
    }
    // Pad with ASCII to hit the size exactly.
    while s.len() < len {
        s.push('.');
    }
    s.into_bytes()
}

fn decode_once(buf: &mut [u8]) -> usize {
    let mut dec = Decoder::new(Role::Server, None);
    let mut pos = 0;
    let mut got = 0;
    while pos < buf.len() {
        match dec.decode(&mut buf[pos..]) {
            Ok((0, _)) => break,
            Ok((n, ev)) => {
                pos += n;
                if let Some(Event::Data { payload, .. }) = ev {
                    got += payload.len();
                }
            }
            Err(e) => panic!("decode failed: {e}"),
        }
    }
    got
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_unmask");
    for &(size, name) in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        let mut bin = Vec::new();
        frame::encode_frame(
            &mut bin,
            true,
            OpCode::Binary,
            &payload,
            Some([0x37, 0xfa, 0x21, 0x3d]),
        );
        g.bench_function(BenchmarkId::new("binary", name), |b| {
            b.iter(|| black_box(decode_once(black_box(&mut bin))))
        });
        let mut txt = Vec::new();
        frame::encode_frame(
            &mut txt,
            true,
            OpCode::Text,
            &text(size, true),
            Some([0; 4]),
        );
        g.bench_function(BenchmarkId::new("text", name), |b| {
            b.iter(|| black_box(decode_once(black_box(&mut txt))))
        });
    }
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for &(size, name) in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let payload = vec![0x5au8; size];
        let mut dst = Vec::with_capacity(size + frame::MAX_HEADER_LEN);
        g.bench_function(BenchmarkId::new("server", name), |b| {
            b.iter(|| {
                dst.clear();
                frame::encode_frame(&mut dst, true, OpCode::Binary, black_box(&payload), None);
                black_box(dst.len())
            })
        });
        g.bench_function(BenchmarkId::new("client", name), |b| {
            b.iter(|| {
                dst.clear();
                frame::encode_frame(
                    &mut dst,
                    true,
                    OpCode::Binary,
                    black_box(&payload),
                    Some([1, 2, 3, 4]),
                );
                black_box(dst.len())
            })
        });
    }
    g.finish();
}

fn bench_utf8(c: &mut Criterion) {
    let mut g = c.benchmark_group("utf8");
    for &(size, name) in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        for (kind, mixed) in [("ascii", false), ("mixed", true)] {
            let t = text(size, mixed);
            assert!(std::str::from_utf8(&t).is_ok());
            g.bench_function(BenchmarkId::new(kind, name), |b| {
                b.iter(|| black_box(simdutf8::basic::from_utf8(black_box(&t)).is_ok()))
            });
        }
    }
    g.finish();
}

fn bench_handshake(c: &mut Criterion) {
    let req = b"GET /chat?room=1 HTTP/1.1\r\n\
Host: example.com:9001\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Sec-WebSocket-Version: 13\r\n\
Origin: https://example.com\r\n\
Sec-WebSocket-Extensions: permessage-deflate\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Connection: keep-alive, Upgrade\r\n\
Cookie: session=abc123; theme=dark\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
Upgrade: websocket\r\n\r\n";
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(256);
    g.bench_function("parse_validate_accept", |b| {
        b.iter(|| {
            let (request, _) = handshake::parse_request(black_box(req), 4096)
                .expect("valid")
                .expect("complete");
            match handshake::validate(&request) {
                handshake::Upgrade::WebSocket { key, .. } => {
                    out.clear();
                    handshake::write_accept(&mut out, &key, None, &[]);
                }
                other => panic!("not an upgrade: {other:?}"),
            }
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_encode,
    bench_utf8,
    bench_handshake
);
criterion_main!(benches);
