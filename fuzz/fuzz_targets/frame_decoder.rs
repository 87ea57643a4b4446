//! Fuzz `frame::Decoder` (server role) on arbitrary bytes.
//!
//! Input layout: byte 0 = flags (bit 0: set a max message size), bytes 1-2 =
//! the max size (big endian, so limits near real frame sizes are reachable),
//! bytes 3-10 = seed of the chunking, the rest = the byte stream.
//!
//! Contract checked:
//! - every call returns `Ok` or a `ProtocolError` whose close code is one of
//!   1002, 1007, 1009 (`MessageTooBig` only with a limit, and only over it);
//!   after an error the decoder keeps returning the same error;
//! - events are well formed (control payloads <= 125 bytes, close codes
//!   valid, `first`/`fin` flags consistent, messages within the limit);
//! - decoding the stream in arbitrary chunks (fed like a socket driver does:
//!   append, decode until more input is needed, drop what was consumed) gives
//!   the same events, data payloads concatenated per message, as decoding it
//!   in one piece; when one errors, both error with the same error after the
//!   same events (the chunked run may have handed out more of the failing
//!   message's payload: everything it handed out before the bad byte);
//! - nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod rng;
use lightws_proto::frame::{is_valid_close_code, Decoder, Event, OpCode, ProtocolError, Role};
use rng::Rng;

/// An owned, normalised event: data chunks of one run are merged.
#[derive(Debug, PartialEq, Eq, Clone)]
enum Item {
    Data {
        opcode: OpCode,
        payload: Vec<u8>,
        first: bool,
        fin: bool,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

#[derive(Debug)]
struct Outcome {
    items: Vec<Item>,
    error: Option<ProtocolError>,
}

/// Tracks the invariants that hold whatever the chunking.
struct Checker {
    max: Option<u64>,
    /// Type of the message in progress, from its first chunk.
    message: Option<OpCode>,
    message_len: u64,
    items: Vec<Item>,
}

impl Checker {
    fn new(max: Option<u64>) -> Self {
        Checker {
            max,
            message: None,
            message_len: 0,
            items: Vec::new(),
        }
    }

    fn push(&mut self, event: Event<'_>) {
        match event {
            Event::Data {
                opcode,
                payload,
                first,
                fin,
            } => {
                assert!(
                    matches!(opcode, OpCode::Text | OpCode::Binary),
                    "{opcode:?}"
                );
                match self.message {
                    None => assert!(first, "message started without `first`"),
                    Some(op) => {
                        assert!(!first, "`first` in the middle of a message");
                        assert_eq!(op, opcode, "message changed type");
                    }
                }
                self.message_len += payload.len() as u64;
                if let Some(max) = self.max {
                    assert!(self.message_len <= max, "message over the limit handed out");
                }
                if fin {
                    self.message = None;
                    self.message_len = 0;
                } else {
                    self.message = Some(opcode);
                }
                // Merge with the previous chunk of the same run.
                if !first {
                    if let Some(Item::Data {
                        payload: p, fin: f, ..
                    }) = self.items.last_mut()
                    {
                        assert!(!*f);
                        p.extend_from_slice(payload);
                        *f = fin;
                        return;
                    }
                }
                self.items.push(Item::Data {
                    opcode,
                    payload: payload.to_vec(),
                    first,
                    fin,
                });
            }
            Event::Ping(p) => {
                assert!(p.len() <= 125);
                self.items.push(Item::Ping(p.to_vec()));
            }
            Event::Pong(p) => {
                assert!(p.len() <= 125);
                self.items.push(Item::Pong(p.to_vec()));
            }
            Event::Close { code, reason } => {
                if let Some(code) = code {
                    assert!(is_valid_close_code(code), "close code {code} let through");
                } else {
                    assert!(reason.is_empty());
                }
                assert!(reason.len() <= 123);
                self.items.push(Item::Close(code, reason.to_string()));
            }
        }
    }
}

fn check_error(e: &ProtocolError, max: Option<u64>) {
    match e {
        ProtocolError::MessageTooBig { size, max: m } => {
            assert_eq!(Some(*m), max, "MessageTooBig without that limit");
            assert!(size > m);
        }
        ProtocolError::ReservedOpcode(op) => {
            assert!(
                matches!(op, 3..=7 | 0xB..=0xF),
                "opcode {op} called reserved"
            );
        }
        ProtocolError::ControlFrameTooLong(n) => assert!(*n > 125),
        ProtocolError::InvalidCloseCode(c) => assert!(!is_valid_close_code(*c)),
        _ => {}
    }
    assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
}

/// Decode `pending` until the decoder needs more input; drop what it consumed.
/// Returns the error, if any.
fn drain(dec: &mut Decoder, pending: &mut Vec<u8>, checker: &mut Checker) -> Option<ProtocolError> {
    let mut pos = 0;
    let mut steps = 0usize;
    loop {
        steps += 1;
        // Every step either consumes input or stops; an event with nothing
        // consumed could loop forever.
        assert!(steps <= pending.len() + 2, "decoder made no progress");
        let avail = pending.len() - pos;
        match dec.decode(&mut pending[pos..]) {
            Ok((0, event)) => {
                assert!(event.is_none(), "event without consuming input: {event:?}");
                break;
            }
            Ok((n, event)) => {
                assert!(n <= avail);
                pos += n;
                if let Some(event) = event {
                    checker.push(event);
                }
            }
            Err(e) => {
                check_error(&e, checker.max);
                // Poisoned: the same error again, whatever the input.
                assert_eq!(dec.decode(&mut pending[pos..]), Err(e.clone()));
                assert_eq!(dec.decode(&mut []), Err(e.clone()));
                pending.drain(..pos);
                return Some(e);
            }
        }
    }
    pending.drain(..pos);
    None
}

fn decode(stream: &[u8], max: Option<u64>, chunks: &mut dyn FnMut() -> usize) -> Outcome {
    let mut dec = Decoder::new(Role::Server, max);
    assert_eq!(dec.max_message_size(), max);
    let mut checker = Checker::new(max);
    let mut pending = Vec::new();
    let mut rest = stream;
    let mut error = None;
    while !rest.is_empty() {
        let n = chunks().clamp(1, rest.len());
        pending.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        if let Some(e) = drain(&mut dec, &mut pending, &mut checker) {
            error = Some(e);
            break;
        }
        // A message whose first chunk was handed out but not its last is in
        // progress (the converse need not hold: a data frame's header may
        // have been consumed before any payload arrived).
        if checker.message.is_some() {
            assert!(dec.in_message());
        }
    }
    Outcome {
        items: checker.items,
        error,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 11 {
        return;
    }
    let flags = data[0];
    let max = (flags & 1 != 0).then(|| u64::from(u16::from_be_bytes([data[1], data[2]])));
    let seed = &data[3..11];
    let stream = &data[11..];

    let whole = decode(stream, max, &mut || usize::MAX);

    // Chunk sizes: mostly small (headers and code points split everywhere),
    // sometimes large.
    let mut rng = Rng::new(seed);
    let mut chunked_sizes = || {
        let r = rng.next();
        let limit = [1u64, 2, 3, 7, 16, 130, 70_000][(r % 7) as usize];
        1 + ((r >> 8) % limit) as usize
    };
    let chunked = decode(stream, max, &mut chunked_sizes);

    // One byte at a time: the harshest chunking, for short inputs.
    let bytewise = (stream.len() <= 512).then(|| decode(stream, max, &mut || 1));

    for other in std::iter::once(&chunked).chain(bytewise.as_ref()) {
        assert_eq!(whole.error, other.error, "different errors");
        if whole.error.is_none() {
            assert_eq!(whole.items, other.items, "different events");
        } else {
            // Same events up to the failing message; the chunked run may have
            // handed out a longer prefix of that message's data (every chunk
            // before the one holding the bad byte), never a shorter one.
            let n = whole.items.len();
            assert!(
                other.items.len() == n || other.items.len() == n + 1,
                "{:?}\n{:?}",
                whole.items,
                other.items
            );
            for (i, (a, b)) in whole.items.iter().zip(&other.items).enumerate() {
                match (a, b) {
                    (
                        Item::Data {
                            opcode: oa,
                            payload: pa,
                            first: fa,
                            fin: false,
                        },
                        Item::Data {
                            opcode: ob,
                            payload: pb,
                            first: fb,
                            fin: false,
                        },
                    ) if i + 1 == n => {
                        assert_eq!((oa, fa), (ob, fb));
                        assert!(pb.starts_with(pa), "chunked run lost data");
                    }
                    _ => assert_eq!(a, b),
                }
            }
            if other.items.len() > n {
                // The extra item must be part of the unfinished message.
                assert!(matches!(other.items[n], Item::Data { fin: false, .. }));
            }
        }
    }
});
