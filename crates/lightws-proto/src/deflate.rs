//! permessage-deflate (RFC 7692), sans I/O: negotiation of the four parameters, the
//! per-direction codec with window bits 8-15, and bounded inflation.
//!
//! # Memory: windows, not zlib states, live in a connection
//!
//! A zlib state is large: zlib-rs (the pure Rust zlib behind `flate2`'s `zlib-rs`
//! feature) allocates a 32 KiB inflate window whatever the window bits, and its deflate
//! state holds a fixed 128 KiB hash head plus buffers sized by memLevel: about 250 KiB
//! at window bits 12. Keeping one of each per connection (what websockets and
//! permessage-deflate implementations usually do) is what makes compression expensive.
//!
//! Here a connection keeps, per direction, only what context takeover needs to carry
//! from one message to the next: the last `2^window_bits` bytes of uncompressed data
//! received (4 KiB at window bits 12; the peer may refer to all of it), and the last
//! [`OUT_DICTIONARY`] bytes sent (we may refer back less than the window), allocated on
//! the first compressed message and never with no context takeover in that direction.
//! Each message is (de)compressed by a zlib state borrowed from a small per-thread pool,
//! primed with that window as a preset dictionary (`deflateSetDictionary` /
//! `inflateSetDictionary` on a raw stream) and reset before its next use; a deflater
//! whose last user was a connection with context takeover continues that connection's
//! stream as is when the same connection comes back first (a burst). The stream the peer sees is the same as with a long-lived state:
//! each of our messages ends with a sync flush (byte-aligned, no BFINAL), so a fresh
//! deflater that starts with a new block continues the peer's inflate stream, and the
//! dictionary makes every back-reference the peer may use (at most the agreed window)
//! resolvable on our side.
//!
//! An inbound message spanning several reads keeps its borrowed inflater until its last
//! frame (a tokio task may move between threads between reads); the inflater returns to
//! the cache of the thread that finishes the message.
//!
//! # Window bits 8
//!
//! zlib (and zlib-rs) refuse a raw deflate stream with windowBits 8 and use 9 for a zlib
//! stream instead. A deflater with a 512-byte window never emits a distance above 250
//! (`MAX_DIST = w_size - MIN_LOOKAHEAD`, 262), so its output fits a 256-byte window:
//! an agreed `*_max_window_bits=8` is compressed with 9, and honoured. Peers that
//! compress with zlib do the same when they agreed to 8, so inflating always uses at
//! least 9 (a larger inflate window accepts every smaller one).
//!
//! # Errors
//!
//! A corrupt deflate stream fails the connection with 1002 (the payload does not follow
//! the negotiated extension: a protocol error, RFC 6455 §7.4.1; RFC 7692 §8 says only
//! that the endpoint fails the connection); inflated TEXT that is not UTF-8 is 1007; an
//! inflated message over the size limit is 1009, found while inflating, after at most
//! `limit` bytes of output.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// The 4 bytes a sync flush ends with; stripped from each compressed message and put
/// back before inflating (RFC 7692 §7.2.1, §7.2.2).
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The server's compression settings (`lightws.Deflate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Largest window the server compresses with (8-15).
    pub server_max_window_bits: u8,
    /// Largest window the server asks the client to compress with (8-15), when the
    /// client's offer allows asking.
    pub client_max_window_bits: u8,
    /// Reset the server's compression context after each message (saves the 2^bits
    /// window per connection).
    pub server_no_context_takeover: bool,
    /// Ask the client to reset its context after each message.
    pub client_no_context_takeover: bool,
    /// zlib compression level (0-9).
    pub level: u8,
    /// Messages shorter than this are sent uncompressed (by the default policy).
    pub min_size: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self {
            server_max_window_bits: 12,
            client_max_window_bits: 12,
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            level: 6,
            min_size: 64,
        }
    }
}

impl DeflateConfig {
    /// Check the ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("server_max_window_bits", self.server_max_window_bits),
            ("client_max_window_bits", self.client_max_window_bits),
        ] {
            if !(8..=15).contains(&v) {
                return Err(format!("{name} must be between 8 and 15, got {v}"));
            }
        }
        if self.level > 9 {
            return Err(format!("level must be between 0 and 9, got {}", self.level));
        }
        Ok(())
    }
}

/// What one connection agreed (RFC 7692 §7.1), plus the compression level. Small and
/// `Copy`: a connection stores it inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeflateParams {
    /// The window the server compresses with (8-15; what it announced, or its own
    /// setting when the client did not ask).
    pub server_max_window_bits: u8,
    /// The window the client may compress with (15 when the offer did not let the
    /// server limit it).
    pub client_max_window_bits: u8,
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub level: u8,
}

/// One direction's settings: window bits and whether the context is reset after each
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Direction {
    pub window_bits: u8,
    pub no_context_takeover: bool,
}

impl DeflateParams {
    /// What the server compresses with (outbound for a server, inbound for a client).
    pub fn server_direction(&self) -> Direction {
        Direction {
            window_bits: self.server_max_window_bits,
            no_context_takeover: self.server_no_context_takeover,
        }
    }

    /// What the client compresses with.
    pub fn client_direction(&self) -> Direction {
        Direction {
            window_bits: self.client_max_window_bits,
            no_context_takeover: self.client_no_context_takeover,
        }
    }
}

/// One extension of a `Sec-WebSocket-Extensions` value: its name and parameters (a
/// quoted value is unquoted; a parameter without `=` has `None`).
type Offer<'a> = (&'a str, Vec<(&'a str, Option<String>)>);

/// Split header values into extensions (RFC 6455 §9.1 grammar; quoted strings may hold
/// `,` and `;`). Malformed pieces yield an empty name, which matches nothing.
fn parse_extensions<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Offer<'a>> {
    let mut out = Vec::new();
    for value in values {
        for ext in split_outside_quotes(value, b',') {
            let mut parts = split_outside_quotes(ext, b';').into_iter();
            let name = parts.next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            let params = parts
                .map(|p| match p.split_once('=') {
                    None => (p.trim(), None),
                    Some((k, v)) => {
                        let v = v.trim();
                        let v = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
                            v[1..v.len() - 1].replace('\\', "")
                        } else {
                            v.to_owned()
                        };
                        (k.trim(), Some(v))
                    }
                })
                .collect();
            out.push((name, params));
        }
    }
    out
}

fn split_outside_quotes(s: &str, sep: u8) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            out.push(&s[start..i]);
            start = i + 1;
        }
    }
    out.push(&s[start..]);
    out
}

/// A window-bits value: 1-2 digits, 8-15, no sign or leading zero (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) || v.starts_with('0') {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// The server side of the negotiation (RFC 7692 §7.1): walk the client's offers of
/// `permessage-deflate` in order and accept the first one that is valid and that this
/// configuration can satisfy. Returns the `Sec-WebSocket-Extensions` value to answer
/// with and the agreed parameters, or None to decline (no extension).
///
/// - `server_no_context_takeover` is agreed when offered or configured;
///   `client_no_context_takeover` when configured (a client must accept it in any
///   response, §7.1.1.2).
/// - `server_max_window_bits=N` offered: the server uses and announces
///   `min(N, configured)`. Not offered: the server uses its configured window without
///   announcing it (§7.1.2.1: the response must not include it).
/// - `client_max_window_bits` offered (with or without a value): the server announces
///   `min(value, configured)`. Not offered: the client may use 15, nothing is announced.
/// - An offer with an unknown or repeated parameter, or an invalid value, is declined
///   (§7.1: "MUST decline"), and the next one is considered.
pub fn negotiate<'a>(
    cfg: &DeflateConfig,
    header_values: impl IntoIterator<Item = &'a str>,
) -> Option<(String, DeflateParams)> {
    'offers: for (name, params) in parse_extensions(header_values) {
        if !name.eq_ignore_ascii_case(EXTENSION) {
            continue;
        }
        let mut snct = false;
        let mut cnct = false;
        let mut smwb: Option<u8> = None;
        // Some(None): offered without a value.
        let mut cmwb: Option<Option<u8>> = None;
        let mut seen = [false; 4];
        for (key, value) in params {
            let slot = match key.to_ascii_lowercase().as_str() {
                "server_no_context_takeover" => 0,
                "client_no_context_takeover" => 1,
                "server_max_window_bits" => 2,
                "client_max_window_bits" => 3,
                _ => continue 'offers,
            };
            if std::mem::replace(&mut seen[slot], true) {
                continue 'offers; // a parameter given twice
            }
            match slot {
                0 | 1 if value.is_some() => continue 'offers,
                0 => snct = true,
                1 => cnct = true,
                2 => match value.as_deref().and_then(window_bits) {
                    Some(b) => smwb = Some(b),
                    None => continue 'offers,
                },
                _ => match value {
                    None => cmwb = Some(None),
                    Some(v) => match window_bits(&v) {
                        Some(b) => cmwb = Some(Some(b)),
                        None => continue 'offers,
                    },
                },
            }
        }
        // The client's own hint of client_no_context_takeover needs no answer; we agree
        // to it only when configured (then the client must honour it).
        let _ = cnct;
        let agreed = DeflateParams {
            server_max_window_bits: smwb.map_or(cfg.server_max_window_bits, |n| {
                n.min(cfg.server_max_window_bits)
            }),
            client_max_window_bits: match cmwb {
                None => 15,
                Some(None) => cfg.client_max_window_bits,
                Some(Some(n)) => n.min(cfg.client_max_window_bits),
            },
            server_no_context_takeover: snct || cfg.server_no_context_takeover,
            client_no_context_takeover: cfg.client_no_context_takeover,
            level: cfg.level,
        };
        let mut response = String::from(EXTENSION);
        if agreed.server_no_context_takeover {
            response.push_str("; server_no_context_takeover");
        }
        if agreed.client_no_context_takeover {
            response.push_str("; client_no_context_takeover");
        }
        if smwb.is_some() {
            response.push_str(&format!(
                "; server_max_window_bits={}",
                agreed.server_max_window_bits
            ));
        }
        if cmwb.is_some() {
            response.push_str(&format!(
                "; client_max_window_bits={}",
                agreed.client_max_window_bits
            ));
        }
        return Some((response, agreed));
    }
    None
}

// -- the codec ---------------------------------------------------------------------------

/// Why inflating failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InflateError {
    /// The input is not a valid deflate stream (close code 1002).
    Corrupt(String),
    /// The inflated message would exceed the limit (close code 1009). Found while
    /// inflating: no more than the limit was produced.
    TooBig,
}

impl InflateError {
    /// The close code to fail the connection with.
    pub fn close_code(&self) -> u16 {
        match self {
            InflateError::Corrupt(_) => 1002,
            InflateError::TooBig => 1009,
        }
    }
}

impl std::fmt::Display for InflateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InflateError::Corrupt(why) => write!(f, "invalid compressed data: {why}"),
            InflateError::TooBig => f.write_str("inflated message exceeds max_msg_len"),
        }
    }
}

/// Inflaters kept per thread, reused by every connection the thread serves.
const CACHED: usize = 4;

/// Deflaters kept per thread (LRU). A deflater last used by a connection with context
/// takeover stays that connection's until another one needs it: the connection's
/// next message (a burst) continues its stream as is, without the reset (zlib-rs
/// clears a 128 KiB hash table) and the preset dictionary that a fresh state needs.
/// Few on purpose: measured with 50 connections echoing 1 KiB JSON, 64 states (one per
/// connection, 13 MiB) ran at half the rate of 4 states reset and primed per message,
/// which stay in the CPU's cache.
pub const DEFLATERS_PER_THREAD: usize = 4;

/// A pooled deflater and whose stream it holds.
struct Pooled {
    bits: u8,
    level: u8,
    /// The [`Compressor`] whose stream this is (0: none; it needs a reset).
    owner: u64,
    /// That compressor's message count when it gave the state back.
    seq: u64,
    c: Box<Compress>,
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static DEFLATERS: RefCell<Vec<Pooled>> = const { RefCell::new(Vec::new()) };
    // Boxed: a connection holds the one it borrowed for a message as a pointer.
    #[allow(clippy::vec_box)]
    static INFLATERS: RefCell<Vec<Box<Decompress>>> = const { RefCell::new(Vec::new()) };
}

/// The window bits zlib can compress a raw stream with (8 becomes 9, see the module
/// documentation).
fn deflate_bits(bits: u8) -> u8 {
    bits.clamp(9, 15)
}

/// A deflater for (`bits`, `level`), and whether it continues `owner`'s stream at
/// message `seq` (else it is reset, ready for a dictionary).
fn take_deflater(bits: u8, level: u8, owner: u64, seq: u64) -> (Box<Compress>, bool) {
    let found = DEFLATERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if owner != 0 {
            if let Some(i) = pool.iter().position(|p| {
                p.owner == owner && p.seq == seq && p.bits == bits && p.level == level
            }) {
                return Some((pool.remove(i).c, true));
            }
        }
        // One nobody continues (no context takeover), else, once the pool is full, the
        // least recently used one of these parameters (its owner will start afresh
        // from its window); below that a new state, so that busy connections keep
        // theirs.
        let same = |p: &Pooled| p.bits == bits && p.level == level;
        let i = match pool.iter().position(|p| p.owner == 0 && same(p)) {
            Some(i) => i,
            None if pool.len() < DEFLATERS_PER_THREAD => return None,
            None => pool.iter().position(same)?,
        };
        Some((pool.remove(i).c, false))
    });
    match found {
        Some((c, true)) => (c, true),
        Some((mut c, false)) => {
            c.reset();
            (c, false)
        }
        None => (
            Box::new(Compress::new_with_window_bits(
                Compression::new(u32::from(level)),
                false,
                bits,
            )),
            false,
        ),
    }
}

fn put_deflater(bits: u8, level: u8, owner: u64, seq: u64, c: Box<Compress>) {
    DEFLATERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() >= DEFLATERS_PER_THREAD {
            pool.remove(0);
        }
        pool.push(Pooled {
            bits,
            level,
            owner,
            seq,
            c,
        });
    });
}

fn take_inflater() -> Box<Decompress> {
    INFLATERS
        .with(|c| c.borrow_mut().pop())
        // 15 accepts every smaller window; zlib-rs allocates 32 KiB whatever the bits.
        .unwrap_or_else(|| Box::new(Decompress::new_with_window_bits(false, 15)))
}

fn put_inflater(mut d: Box<Decompress>) {
    d.reset(false);
    INFLATERS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() < CACHED {
            cache.push(d);
        }
    });
}

/// The last `2^bits` bytes of one direction's uncompressed data (context takeover).
#[derive(Debug, Default)]
struct Window {
    buf: Vec<u8>,
}

impl Window {
    fn push(&mut self, data: &[u8], size: usize) {
        if data.len() >= size {
            self.buf.clear();
            self.buf.reserve_exact(size);
            self.buf.extend_from_slice(&data[data.len() - size..]);
            return;
        }
        let keep = size - data.len();
        if self.buf.len() > keep {
            self.buf.drain(..self.buf.len() - keep);
        }
        if self.buf.capacity() < size {
            self.buf.reserve_exact(size - self.buf.len());
        }
        self.buf.extend_from_slice(data);
    }
}

/// The compressing side of one direction.
#[derive(Debug)]
pub struct Compressor {
    dir: Direction,
    level: u8,
    window: Window,
    /// This compressor's identity in the per-thread pool (0 until its first message).
    owner: u64,
    /// Messages compressed so far.
    seq: u64,
}

impl Compressor {
    pub fn new(dir: Direction, level: u8) -> Self {
        Self {
            dir,
            level,
            window: Window::default(),
            owner: 0,
            seq: 0,
        }
    }

    /// Bytes this compressor holds between messages (the window, with context
    /// takeover).
    pub fn retained(&self) -> usize {
        self.window.buf.capacity()
    }

    /// Compress one whole message, appending its payload (sync-flushed, the 4-byte
    /// tail stripped, RFC 7692 §7.2.1) to `out`.
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let bits = deflate_bits(self.dir.window_bits);
        let takeover = !self.dir.no_context_takeover;
        if takeover && self.owner == 0 {
            self.owner = NEXT_OWNER.fetch_add(1, Ordering::Relaxed);
        }
        let (mut c, continues) = take_deflater(bits, self.level, self.owner, self.seq);
        if takeover && !continues && !self.window.buf.is_empty() {
            // A raw deflate stream takes a dictionary before its first input.
            c.set_dictionary(&self.window.buf)
                .expect("a raw deflate stream accepts a dictionary after reset");
        }
        let start = out.len();
        let in0 = c.total_in();
        out.reserve(data.len() / 2 + 64);
        loop {
            let consumed = (c.total_in() - in0) as usize;
            let before = out.len();
            c.compress_vec(&data[consumed..], out, FlushCompress::Sync)
                .expect("deflate does not fail on valid parameters");
            let done = (c.total_in() - in0) as usize;
            let room_left = out.len() < out.capacity();
            if done == data.len() && room_left {
                break;
            }
            if out.len() == before && done == consumed && room_left {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        self.seq += 1;
        // With no context takeover the state is nobody's: the next user resets it.
        let owner = if takeover { self.owner } else { 0 };
        put_deflater(bits, self.level, owner, self.seq, c);
        if out.len() >= start + 4 && out[out.len() - 4..] == TAIL {
            out.truncate(out.len() - 4);
        }
        if out.len() == start {
            // An empty message: a single 0x00 byte (RFC 7692 §7.2.3.6).
            out.push(0);
        }
        if takeover {
            self.window
                .push(data, (1 << self.dir.window_bits.max(9)).min(OUT_DICTIONARY));
        }
    }
}

/// The most a compressor keeps (and primes a fresh state with) for context takeover.
/// Referring back less than the agreed window is always allowed (the peer keeps all
/// of it); priming costs about 2 ns a byte, and on 1 KiB JSON messages 2 KiB compressed
/// as well as 4 KiB (ratio 0.157 both) for two thirds of the time
/// (`timing_dict::interleaved_connections_by_dictionary_size`).
pub const OUT_DICTIONARY: usize = 2048;

/// The inflating side of one direction.
#[derive(Debug)]
pub struct Decompressor {
    dir: Direction,
    window: Window,
    /// The borrowed zlib state, while a message is being inflated.
    active: Option<Box<Decompress>>,
    /// The stream of this message ended (a block with BFINAL): the rest is ignored.
    ended: bool,
}

impl Decompressor {
    pub fn new(dir: Direction) -> Self {
        Self {
            dir,
            window: Window::default(),
            active: None,
            ended: false,
        }
    }

    /// Bytes this decompressor holds between messages (the window, with context
    /// takeover).
    pub fn retained(&self) -> usize {
        self.window.buf.capacity()
    }

    /// Whether a message is being inflated (a zlib state is borrowed).
    pub fn in_message(&self) -> bool {
        self.active.is_some()
    }

    fn state(&mut self) -> &mut Decompress {
        if self.active.is_none() {
            let mut d = take_inflater();
            if !self.dir.no_context_takeover && !self.window.buf.is_empty() {
                d.set_dictionary(&self.window.buf)
                    .expect("a raw inflate stream accepts a dictionary");
            }
            self.ended = false;
            self.active = Some(d);
        }
        self.active.as_mut().expect("just set")
    }

    /// Inflate the next piece of a message's compressed payload, appending at most
    /// `max_new` bytes to `out` (TooBig if it would take more).
    pub fn inflate(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max_new: usize,
    ) -> Result<(), InflateError> {
        let start = out.len();
        let r = self.run(input, out, max_new);
        if r.is_err() {
            self.abandon();
        } else if !self.dir.no_context_takeover {
            let size = 1usize << self.dir.window_bits.max(9);
            self.window.push(&out[start..], size);
        }
        r
    }

    /// The message's last payload is in: inflate the sync-flush tail (appending any
    /// last output to `out`) and give the zlib state back.
    pub fn finish(&mut self, out: &mut Vec<u8>, max_new: usize) -> Result<(), InflateError> {
        let r = self.inflate(&TAIL, out, max_new);
        if let Some(d) = self.active.take() {
            put_inflater(d);
        }
        if self.dir.no_context_takeover {
            self.window = Window::default();
        }
        r
    }

    /// Drop the message in progress (the connection failed).
    pub fn abandon(&mut self) {
        self.active = None;
        self.ended = false;
    }

    fn run(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        max_new: usize,
    ) -> Result<(), InflateError> {
        let limit = out.len() + max_new;
        self.state();
        loop {
            if self.ended {
                return Ok(());
            }
            let d = self.active.as_mut().expect("state() set it");
            let room = limit - out.len();
            let (in0, out0) = (d.total_in(), d.total_out());
            let (status, full) = if room == 0 {
                // At the limit: one more byte of output means the message is too big.
                let mut probe = [0u8; 1];
                let st = d
                    .decompress(input, &mut probe, FlushDecompress::Sync)
                    .map_err(|e| InflateError::Corrupt(e.to_string()))?;
                if d.total_out() > out0 {
                    return Err(InflateError::TooBig);
                }
                (st, false)
            } else {
                // Output in steps proportional to the input (a bomb never gets a big
                // buffer ahead of its output), never past the limit.
                let step = room.min((input.len() * 8).clamp(4096, 256 * 1024));
                let at = out.len();
                out.resize(at + step, 0);
                let st = d.decompress(input, &mut out[at..], FlushDecompress::Sync);
                let produced = (d.total_out() - out0) as usize;
                out.truncate(at + produced);
                let st = st.map_err(|e| InflateError::Corrupt(e.to_string()))?;
                (st, produced == step)
            };
            let consumed = (d.total_in() - in0) as usize;
            input = &input[consumed..];
            if status == Status::StreamEnd {
                // A block with BFINAL ended this message's stream; trailing bytes (our
                // own sync tail among them) carry nothing.
                self.ended = true;
                return Ok(());
            }
            if !full {
                // zlib stops short of filling the output only when it has used all the
                // input it can.
                return Ok(());
            }
        }
    }
}

/// Incremental UTF-8 validation of a text message inflated piece by piece: at most 3
/// bytes of a split code point are carried between pieces.
#[derive(Debug, Default, Clone)]
pub struct Utf8Check {
    pending: [u8; 4],
    len: u8,
}

impl Utf8Check {
    /// Validate the next piece; false at the first invalid byte.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        self.feed_inner(chunk).is_some()
    }

    fn feed_inner(&mut self, mut chunk: &[u8]) -> Option<()> {
        while self.len > 0 {
            let Some((&b, rest)) = chunk.split_first() else {
                return Some(());
            };
            self.pending[usize::from(self.len)] = b;
            self.len += 1;
            chunk = rest;
            match std::str::from_utf8(&self.pending[..usize::from(self.len)]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() => {}
                Err(_) => return None,
            }
        }
        match simdutf8::compat::from_utf8(chunk) {
            Ok(_) => Some(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &chunk[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                Some(())
            }
            Err(_) => None,
        }
    }

    /// The message ended: false if a code point is cut off.
    pub fn finish(&mut self) -> bool {
        let ok = self.len == 0;
        self.len = 0;
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeflateConfig {
        DeflateConfig::default()
    }

    fn neg(cfg: &DeflateConfig, offer: &str) -> Option<(String, DeflateParams)> {
        negotiate(cfg, [offer])
    }

    // -- negotiation -------------------------------------------------------------------

    #[test]
    fn a_bare_offer_is_accepted_with_the_servers_own_window_unannounced() {
        let (resp, p) = neg(&cfg(), "permessage-deflate").unwrap();
        assert_eq!(resp, "permessage-deflate");
        assert_eq!(p.server_max_window_bits, 12);
        assert_eq!(p.client_max_window_bits, 15, "the client was not limited");
        assert!(!p.server_no_context_takeover && !p.client_no_context_takeover);
    }

    #[test]
    fn a_browser_offer_gets_the_client_window_limited() {
        let (resp, p) = neg(&cfg(), "permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(resp, "permessage-deflate; client_max_window_bits=12");
        assert_eq!(p.client_max_window_bits, 12);
    }

    #[test]
    fn every_combination_of_the_four_parameters_and_window_bits() {
        for snct in [false, true] {
            for cnct in [false, true] {
                for smwb in [None, Some(8u8), Some(9), Some(12), Some(15)] {
                    for cmwb in [
                        None,
                        Some(None),
                        Some(Some(8u8)),
                        Some(Some(10)),
                        Some(Some(15)),
                    ] {
                        for conf_snct in [false, true] {
                            for conf_cnct in [false, true] {
                                let mut offer = String::from("permessage-deflate");
                                if snct {
                                    offer.push_str("; server_no_context_takeover");
                                }
                                if cnct {
                                    offer.push_str("; client_no_context_takeover");
                                }
                                if let Some(b) = smwb {
                                    offer.push_str(&format!("; server_max_window_bits={b}"));
                                }
                                match cmwb {
                                    None => {}
                                    Some(None) => offer.push_str("; client_max_window_bits"),
                                    Some(Some(b)) => {
                                        offer.push_str(&format!("; client_max_window_bits={b}"))
                                    }
                                }
                                let c = DeflateConfig {
                                    server_no_context_takeover: conf_snct,
                                    client_no_context_takeover: conf_cnct,
                                    ..cfg()
                                };
                                let (resp, p) = neg(&c, &offer).expect(&offer);
                                assert_eq!(p.server_no_context_takeover, snct || conf_snct);
                                assert_eq!(p.client_no_context_takeover, conf_cnct);
                                assert_eq!(
                                    p.server_max_window_bits,
                                    smwb.map_or(12, |b| b.min(12))
                                );
                                let want_c = match cmwb {
                                    None => 15,
                                    Some(None) => 12,
                                    Some(Some(b)) => b.min(12),
                                };
                                assert_eq!(p.client_max_window_bits, want_c);
                                // The response says exactly what was agreed, and only
                                // what the RFC lets it say.
                                let back = parse_extensions([resp.as_str()]);
                                assert_eq!(back.len(), 1);
                                let params = &back[0].1;
                                let has = |k: &str| params.iter().find(|(n, _)| *n == k);
                                assert_eq!(
                                    has("server_no_context_takeover").is_some(),
                                    p.server_no_context_takeover
                                );
                                assert_eq!(
                                    has("client_no_context_takeover").is_some(),
                                    p.client_no_context_takeover
                                );
                                assert_eq!(
                                    has("server_max_window_bits")
                                        .and_then(|(_, v)| v.as_deref()?.parse::<u8>().ok()),
                                    smwb.map(|_| p.server_max_window_bits)
                                );
                                assert_eq!(
                                    has("client_max_window_bits")
                                        .and_then(|(_, v)| v.as_deref()?.parse::<u8>().ok()),
                                    cmwb.map(|_| p.client_max_window_bits)
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn invalid_offers_are_declined_and_the_next_one_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown_param",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(neg(&cfg(), bad), None, "{bad}");
            let two = format!("{bad}, permessage-deflate; client_max_window_bits");
            let (resp, _) = neg(&cfg(), &two).expect(&two);
            assert_eq!(resp, "permessage-deflate; client_max_window_bits=12");
        }
    }

    #[test]
    fn offers_span_header_lines_and_quoted_values_are_unquoted() {
        let (resp, p) = negotiate(
            &cfg(),
            [
                "foo; a=\"x,y\"",
                "permessage-deflate; server_max_window_bits=\"10\"",
            ],
        )
        .unwrap();
        assert_eq!(resp, "permessage-deflate; server_max_window_bits=10");
        assert_eq!(p.server_max_window_bits, 10);
    }

    #[test]
    fn the_first_satisfiable_offer_wins() {
        let (resp, p) = neg(
            &cfg(),
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=8, \
             permessage-deflate; server_no_context_takeover, permessage-deflate",
        )
        .unwrap();
        assert_eq!(
            resp,
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=8"
        );
        assert_eq!(p.server_max_window_bits, 8);
    }

    #[test]
    fn config_ranges_are_checked() {
        assert!(cfg().validate().is_ok());
        for bad in [
            DeflateConfig {
                server_max_window_bits: 7,
                ..cfg()
            },
            DeflateConfig {
                client_max_window_bits: 16,
                ..cfg()
            },
            DeflateConfig { level: 10, ..cfg() },
        ] {
            assert!(bad.validate().is_err());
        }
    }

    // -- codec ---------------------------------------------------------------------------

    fn dir(bits: u8, no_takeover: bool) -> Direction {
        Direction {
            window_bits: bits,
            no_context_takeover: no_takeover,
        }
    }

    fn json(i: usize) -> Vec<u8> {
        format!(
            "{{\"id\":{i},\"user\":\"alice\",\"items\":[{{\"sku\":\"A-{i}\",\"qty\":3}},\
             {{\"sku\":\"B-{}\",\"qty\":1}}],\"note\":\"hello hello hello\"}}",
            i * 7
        )
        .into_bytes()
    }

    /// Compress a sequence of messages and inflate them back, for every window and
    /// takeover setting.
    #[test]
    fn messages_round_trip_at_every_window_with_and_without_takeover() {
        for bits in 8..=15u8 {
            for no_takeover in [false, true] {
                let mut c = Compressor::new(dir(bits, no_takeover), 6);
                let mut d = Decompressor::new(dir(bits, no_takeover));
                for i in 0..30 {
                    let msg = if i % 7 == 3 {
                        Vec::new()
                    } else {
                        json(i).repeat(1 + i % 5)
                    };
                    let mut wire = Vec::new();
                    c.compress(&msg, &mut wire);
                    let mut back = Vec::new();
                    // In two pieces, as two frames would bring it.
                    let half = wire.len() / 2;
                    d.inflate(&wire[..half], &mut back, 1 << 20).unwrap();
                    d.inflate(&wire[half..], &mut back, 1 << 20).unwrap();
                    d.finish(&mut back, 1 << 20).unwrap();
                    assert_eq!(back, msg, "bits {bits} no_takeover {no_takeover} msg {i}");
                }
                if no_takeover {
                    assert_eq!(c.retained() + d.retained(), 0);
                } else {
                    assert!(c.retained() <= 1 << bits.max(9));
                }
            }
        }
    }

    #[test]
    fn context_takeover_makes_repeated_messages_smaller() {
        let msg = json(1);
        let mut c = Compressor::new(dir(12, false), 6);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        c.compress(&msg, &mut a);
        c.compress(&msg, &mut b);
        assert!(b.len() < a.len() / 3, "{} vs {}", b.len(), a.len());
        let mut c = Compressor::new(dir(12, true), 6);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        c.compress(&msg, &mut a);
        c.compress(&msg, &mut b);
        assert_eq!(a, b, "no takeover: every message compresses alike");
    }

    /// A raw deflate stream made by a reference zlib: the one the peer keeps for the
    /// whole connection (context takeover), sync-flushed per message.
    #[test]
    fn a_long_lived_peer_stream_inflates_message_by_message() {
        for bits in 9..=15u8 {
            let mut peer = Compress::new_with_window_bits(Compression::new(6), false, bits);
            let mut d = Decompressor::new(dir(bits, false));
            for i in 0..40 {
                let msg = json(i % 4).repeat(1 + i % 9);
                let mut wire = Vec::with_capacity(msg.len() + 64);
                let start = peer.total_in();
                loop {
                    let done = (peer.total_in() - start) as usize;
                    peer.compress_vec(&msg[done..], &mut wire, FlushCompress::Sync)
                        .unwrap();
                    if (peer.total_in() - start) as usize == msg.len()
                        && wire.len() < wire.capacity()
                    {
                        break;
                    }
                    wire.reserve(wire.capacity());
                }
                assert_eq!(wire[wire.len() - 4..], TAIL);
                wire.truncate(wire.len() - 4);
                let mut back = Vec::new();
                for piece in wire.chunks(7) {
                    d.inflate(piece, &mut back, 1 << 20).unwrap();
                }
                d.finish(&mut back, 1 << 20).unwrap();
                assert_eq!(back, msg, "bits {bits} msg {i}");
            }
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit_without_a_big_buffer() {
        // 16 MiB of zeros compress to about 16 KiB.
        let mut c = Compressor::new(dir(15, true), 9);
        let zeros = vec![0u8; 16 << 20];
        let mut wire = Vec::new();
        c.compress(&zeros, &mut wire);
        assert!(wire.len() < 32 * 1024);
        let mut d = Decompressor::new(dir(15, true));
        let mut out = Vec::new();
        let e = d.inflate(&wire, &mut out, 100_000).unwrap_err();
        assert_eq!(e, InflateError::TooBig);
        assert_eq!(e.close_code(), 1009);
        assert!(out.len() <= 100_000);
        assert!(out.capacity() < 400_000, "capacity {}", out.capacity());
    }

    #[test]
    fn exactly_the_limit_is_allowed() {
        let msg = vec![b'a'; 5000];
        let mut c = Compressor::new(dir(12, true), 6);
        let mut wire = Vec::new();
        c.compress(&msg, &mut wire);
        let mut d = Decompressor::new(dir(12, true));
        let mut out = Vec::new();
        d.inflate(&wire, &mut out, 5000).unwrap();
        let room = 5000 - out.len();
        d.finish(&mut out, room).unwrap();
        assert_eq!(out, msg);
        let mut d = Decompressor::new(dir(12, true));
        let mut out = Vec::new();
        let r = d.inflate(&wire, &mut out, 4999).and_then(|_| {
            let room = 4999 - out.len();
            d.finish(&mut out, room)
        });
        assert_eq!(r, Err(InflateError::TooBig));
    }

    #[test]
    fn garbage_is_a_corrupt_stream() {
        let mut d = Decompressor::new(dir(15, false));
        let mut out = Vec::new();
        // Block type 3 is reserved.
        let e = d.inflate(&[0xff, 0xff, 0xff], &mut out, 1000).unwrap_err();
        assert!(matches!(e, InflateError::Corrupt(_)));
        assert_eq!(e.close_code(), 1002);
        assert!(!d.in_message());
    }

    #[test]
    fn a_final_block_ends_the_message_and_the_tail_is_ignored() {
        let mut peer = Compress::new_with_window_bits(Compression::new(6), false, 15);
        let mut wire = Vec::with_capacity(256);
        peer.compress_vec(b"final", &mut wire, FlushCompress::Finish)
            .unwrap();
        let mut d = Decompressor::new(dir(15, false));
        let mut out = Vec::new();
        d.inflate(&wire, &mut out, 100).unwrap();
        d.finish(&mut out, 100).unwrap();
        assert_eq!(out, b"final");
    }

    #[test]
    fn utf8_is_checked_across_pieces() {
        let s = "héllo wörld €𝄞".as_bytes();
        for cut in 0..=s.len() {
            let mut u = Utf8Check::default();
            assert!(u.feed(&s[..cut]));
            assert!(u.feed(&s[cut..]));
            assert!(u.finish());
        }
        let mut u = Utf8Check::default();
        assert!(u.feed(&[0xe2, 0x82]));
        assert!(!u.finish(), "cut off");
        let mut u = Utf8Check::default();
        assert!(u.feed(&[0xe2]));
        assert!(!u.feed(&[0x28]));
        assert!(!Utf8Check::default().feed(&[0xff]));
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "timing, run with --release --ignored --nocapture"]
    fn per_message_costs() {
        let msgs: Vec<Vec<u8>> = (0..2000)
            .map(|i| {
                let mut s = String::new();
                while s.len() < 1024 {
                    s.push_str(&format!(
                        "{{\"id\":{i},\"sym\":\"S{:03}\",\"px\":{}.{:02},\"qty\":{}}},",
                        i % 50,
                        100 + i % 900,
                        i % 100,
                        i % 1000
                    ));
                }
                s.truncate(1024);
                s.into_bytes()
            })
            .collect();
        for nct in [false, true] {
            let dir = Direction {
                window_bits: 12,
                no_context_takeover: nct,
            };
            let mut c = Compressor::new(dir, 6);
            let mut wires = Vec::new();
            let t = Instant::now();
            for m in &msgs {
                let mut w = Vec::new();
                c.compress(m, &mut w);
                wires.push(w);
            }
            let ct = t.elapsed() / msgs.len() as u32;
            let mut d = Decompressor::new(dir);
            let t = Instant::now();
            for w in &wires {
                let mut out = Vec::new();
                d.inflate(w, &mut out, 1 << 20).unwrap();
                d.finish(&mut out, 1 << 20).unwrap();
            }
            let dt = t.elapsed() / msgs.len() as u32;
            let ratio = wires.iter().map(Vec::len).sum::<usize>() as f64 / (1024.0 * 2000.0);
            eprintln!("nct={nct}: compress {ct:?}, inflate {dt:?}, ratio {ratio:.2}");
        }
        // Raw zlib-rs costs for comparison: a long-lived deflater / inflater.
        let mut z = Compress::new_with_window_bits(Compression::new(6), false, 12);
        let t = Instant::now();
        for m in &msgs {
            let mut w = Vec::with_capacity(2048);
            z.compress_vec(m, &mut w, FlushCompress::Sync).unwrap();
        }
        eprintln!("long-lived compress {:?}", t.elapsed() / msgs.len() as u32);
        let t = Instant::now();
        for _ in &msgs {
            z.reset();
        }
        eprintln!("deflate reset {:?}", t.elapsed() / msgs.len() as u32);
        let dict = &msgs[0][..];
        let t = Instant::now();
        for _ in &msgs {
            z.reset();
            z.set_dictionary(&[dict, dict, dict, dict].concat())
                .unwrap();
        }
        eprintln!(
            "deflate reset+4K dict {:?}",
            t.elapsed() / msgs.len() as u32
        );
    }
}

#[cfg(test)]
mod timing_dict {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "timing, run with --release --ignored --nocapture"]
    fn interleaved_connections_by_dictionary_size() {
        let msg = |n: u64| -> Vec<u8> {
            let mut s = format!("{{\"type\":\"quotes\",\"seq\":{n},\"rows\":[");
            let mut k = 0u64;
            while s.len() < 1024 {
                let i = n.wrapping_mul(31).wrapping_add(k);
                s.push_str(&format!(
                    "{{\"id\":{},\"sym\":\"S{:03}\",\"px\":{}.{:02},\"qty\":{}}},",
                    n * 10 + k,
                    i % 50,
                    100 + i.wrapping_mul(7) % 900,
                    k * 13 % 100,
                    i.wrapping_mul(3) % 1000
                ));
                k += 1;
            }
            s.truncate(1024);
            s.into_bytes()
        };
        let msgs: Vec<Vec<u8>> = (0..3000).map(msg).collect();
        for rep in 0..2 {
            for bits in [12u8, 11, 10, 9] {
                let dict = 1usize << bits;
                let dir = Direction {
                    window_bits: bits,
                    no_context_takeover: false,
                };
                let mut cs: Vec<Compressor> = (0..50).map(|_| Compressor::new(dir, 6)).collect();
                let mut total = 0;
                let t = Instant::now();
                for (i, m) in msgs.iter().enumerate() {
                    let mut w = Vec::new();
                    cs[i % 50].compress(m, &mut w);
                    total += w.len();
                }
                let per = t.elapsed() / msgs.len() as u32;
                eprintln!(
                    "rep {rep} dict {dict}: {per:?}/msg, ratio {:.3}",
                    total as f64 / (msgs.len() * 1024) as f64
                );
            }
        }
    }
}

#[cfg(test)]
mod props {
    //! The fuzz target's contract (fuzz/fuzz_targets/inflate.rs) as a property test, so
    //! `cargo test` checks it on every run: arbitrary input inflates to output or a
    //! documented error, never more than the limit; valid input round-trips.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_input_inflates_or_fails_within_the_limit(
            bits in 8u8..=15,
            no_takeover in any::<bool>(),
            limit in 0usize..70_000,
            chunk in 1usize..300,
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..4),
        ) {
            let dir = Direction { window_bits: bits, no_context_takeover: no_takeover };
            let mut d = Decompressor::new(dir);
            for m in &messages {
                let mut out = Vec::new();
                let mut r = Ok(());
                for piece in m.chunks(chunk) {
                    let room = limit - out.len();
                    r = d.inflate(piece, &mut out, room);
                    prop_assert!(out.len() <= limit);
                    if r.is_err() {
                        break;
                    }
                }
                if r.is_ok() {
                    let room = limit - out.len();
                    r = d.finish(&mut out, room);
                }
                prop_assert!(out.len() <= limit);
                prop_assert!(!d.in_message());
                if let Err(e) = r {
                    prop_assert!(matches!(e.close_code(), 1002 | 1009));
                    d = Decompressor::new(dir);
                }
            }
        }

        #[test]
        fn anything_compressed_round_trips(
            bits in 8u8..=15,
            no_takeover in any::<bool>(),
            level in 0u8..=9,
            messages in proptest::collection::vec(proptest::collection::vec(0u8..8, 0..3000), 1..5),
            chunk in 1usize..500,
        ) {
            let dir = Direction { window_bits: bits, no_context_takeover: no_takeover };
            let mut c = Compressor::new(dir, level);
            let mut d = Decompressor::new(dir);
            for m in &messages {
                let mut wire = Vec::new();
                c.compress(m, &mut wire);
                let mut out = Vec::new();
                for piece in wire.chunks(chunk) {
                    d.inflate(piece, &mut out, 1 << 20).unwrap();
                }
                d.finish(&mut out, 1 << 20).unwrap();
                prop_assert_eq!(&out, m);
            }
        }
    }
}
