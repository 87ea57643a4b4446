//! An outbound queue of encoded frames as chunks, written with vectored writes.
//!
//! Two kinds of bytes go out on a connection: frames encoded for it alone (a `send()`,
//! a pong) and frames shared by many connections (a published message, encoded once
//! into a reference-counted [`Bytes`]). The queue keeps both in order without copying
//! the shared ones: small frames of its own are appended to a `tail` buffer (one
//! allocation for a burst of small sends), a shared chunk closes the tail into a
//! chunk of its own and goes in by reference. [`OutQueue::slices`] hands the writer
//! every chunk at once for `writev`.
//!
//! An empty queue holds no buffer: an idle connection pays for the struct only.
//!
//! A third kind of item exists only in the application's queue, never in one being
//! written: a whole message to compress (permessage-deflate), queued uncompressed by
//! the loop thread ([`OutQueue::push_compress`]) so that compression runs on the
//! connection's tokio thread, where the session turns it into a frame in order
//! ([`OutQueue::into_items`]).

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::Bytes;

use crate::frame::OpCode;

/// One item of a queue.
enum Chunk {
    Bytes(Bytes),
    /// A data message to compress and frame (counted in `len` by its raw size).
    Compress(Box<(OpCode, Bytes)>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Bytes(b) => b,
            Chunk::Compress(_) => {
                debug_assert!(false, "a message to compress reached the writer");
                &[]
            }
        }
    }
}

/// An item taken out of a queue by [`OutQueue::into_items`].
pub enum OutItem {
    /// Encoded frames.
    Frames(Bytes),
    /// A whole data message to compress and frame.
    Compress(OpCode, Bytes),
}

/// See the module documentation. An empty queue is one null pointer: its state is
/// boxed while it holds anything and freed when it is written out or cleared, so an
/// idle connection's two queues (its session's and its outbox) cost 8 bytes each
/// instead of 80.
#[derive(Default)]
pub struct OutQueue(Option<Box<Queue>>);

impl OutQueue {
    pub const fn new() -> Self {
        Self(None)
    }

    fn queue(&mut self) -> &mut Queue {
        self.0.get_or_insert_with(Default::default)
    }

    /// Queue a whole data message to be compressed and framed by the session (see the
    /// module documentation). Counted in [`OutQueue::len`] by its raw size.
    pub fn push_compress(&mut self, opcode: OpCode, data: Bytes) {
        self.queue().push_compress(opcode, data);
    }

    /// Whether messages to compress are queued.
    pub fn has_compress(&self) -> bool {
        self.0.as_ref().is_some_and(|q| q.has_compress())
    }

    /// Every item, in order (a partly written front keeps only its unwritten part).
    pub fn into_items(self) -> Vec<OutItem> {
        self.0.map_or_else(Vec::new, |q| q.into_items())
    }

    /// Unwritten bytes.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append to the tail with `encode` (one or more whole frames).
    pub fn push_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        self.queue().push_with(encode);
        self.release_if_empty();
    }

    /// The tail, to encode into directly; call [`OutQueue::added`] with how many bytes
    /// were appended.
    pub fn tail_mut(&mut self) -> &mut Vec<u8> {
        &mut self.queue().tail
    }

    /// `n` bytes were appended through [`OutQueue::tail_mut`].
    pub fn added(&mut self, n: usize) {
        self.queue().len += n;
        self.release_if_empty();
    }

    /// Append a chunk by reference (a frame shared with other connections).
    pub fn push_chunk(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.queue().push_chunk(chunk);
        }
    }

    /// Move everything from `other` to the end of this queue (`other` is left empty).
    pub fn append(&mut self, other: &mut OutQueue) {
        let Some(taken) = other.0.take() else {
            return;
        };
        match &mut self.0 {
            _ if taken.len == 0 => {}
            Some(q) if q.len > 0 => q.append(*taken),
            mine => *mine = Some(taken),
        }
    }

    /// Drop every unwritten byte (and the buffers).
    pub fn clear(&mut self) {
        self.0 = None;
    }

    /// Fill `dst` with the unwritten bytes in order; returns how many slices it used.
    pub fn slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        self.0.as_ref().map_or(0, |q| q.slices(dst))
    }

    /// The first unwritten bytes (for writers without vectored writes).
    pub fn front(&self) -> &[u8] {
        self.0.as_ref().map_or(&[], |q| q.front())
    }

    /// `n` bytes were written. Fully written chunks are released; once everything is
    /// written the buffers go back to the allocator.
    ///
    /// # Panics
    /// If `n` is more than [`OutQueue::len`].
    pub fn advance(&mut self, n: usize) {
        assert!(n <= self.len(), "advance past the end of the queue");
        if let Some(q) = &mut self.0 {
            q.advance(n);
        }
        self.release_if_empty();
    }

    fn release_if_empty(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }

    /// Every unwritten byte, copied (for tests and logs).
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.as_ref().map_or_else(Vec::new, |q| q.to_vec())
    }

    /// Bytes of buffer this queue holds (for memory accounting in tests).
    pub fn capacity(&self) -> usize {
        self.0.as_ref().map_or(0, |q| {
            std::mem::size_of::<Queue>()
                + q.tail.capacity()
                + q.chunks.capacity() * std::mem::size_of::<Chunk>()
        })
    }
}

/// The queue's state, boxed in [`OutQueue`] while it holds anything.
#[derive(Default)]
struct Queue {
    /// Whole chunks, oldest first; the front one may be partly written (`pos`).
    chunks: VecDeque<Chunk>,
    /// Frames appended after every chunk, not yet closed into a chunk. When `chunks`
    /// is empty it is the front, and `pos` applies to it.
    tail: Vec<u8>,
    /// Bytes of the front (the first chunk, or the tail) already written.
    pos: usize,
    /// Unwritten bytes in all.
    len: usize,
    /// Messages to compress among the chunks.
    compress: usize,
}

impl Queue {
    /// Queue a whole data message to be compressed and framed by the session (see the
    /// module documentation). Counted in [`OutQueue::len`] by its raw size.
    fn push_compress(&mut self, opcode: OpCode, data: Bytes) {
        self.close_tail();
        self.len += data.len();
        self.compress += 1;
        self.chunks
            .push_back(Chunk::Compress(Box::new((opcode, data))));
    }

    /// Whether messages to compress are queued.
    fn has_compress(&self) -> bool {
        self.compress > 0
    }

    /// Every item, in order (a partly written front keeps only its unwritten part).
    fn into_items(mut self) -> Vec<OutItem> {
        self.close_tail();
        let mut skip = self.pos;
        let mut out = Vec::with_capacity(self.chunks.len());
        for c in std::mem::take(&mut self.chunks) {
            match c {
                Chunk::Bytes(b) => {
                    let b = if skip > 0 { b.slice(skip..) } else { b };
                    skip = 0;
                    if !b.is_empty() {
                        out.push(OutItem::Frames(b));
                    }
                }
                Chunk::Compress(m) => {
                    let (op, data) = *m;
                    out.push(OutItem::Compress(op, data));
                }
            }
        }
        out
    }

    /// Append to the tail with `encode` (one or more whole frames).
    fn push_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let before = self.tail.len();
        encode(&mut self.tail);
        self.len += self.tail.len() - before;
    }

    /// Append a chunk by reference (a frame shared with other connections).
    fn push_chunk(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.close_tail();
        self.len += chunk.len();
        self.chunks.push_back(Chunk::Bytes(chunk));
    }

    /// Close the tail into a chunk, so that what follows goes after it.
    fn close_tail(&mut self) {
        if !self.tail.is_empty() {
            let tail = std::mem::take(&mut self.tail);
            self.chunks.push_back(Chunk::Bytes(Bytes::from(tail)));
        }
    }

    /// Move everything from `taken` to the end of this queue.
    fn append(&mut self, mut taken: Queue) {
        taken.close_tail();
        // The other's written prefix (if any) is dropped from its front chunk.
        if taken.pos > 0 {
            if let Some(Chunk::Bytes(front)) = taken.chunks.front_mut() {
                *front = front.slice(taken.pos..);
            }
        }
        self.close_tail();
        self.len += taken.len;
        self.compress += taken.compress;
        self.chunks.extend(taken.chunks);
    }

    /// Fill `dst` with the unwritten bytes in order; returns how many slices it used.
    fn slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let mut skip = self.pos;
        for chunk in self
            .chunks
            .iter()
            .map(Chunk::bytes)
            .chain(std::iter::once(&self.tail[..]))
        {
            if n == dst.len() {
                break;
            }
            let part = &chunk[skip.min(chunk.len())..];
            skip = 0;
            if !part.is_empty() {
                dst[n] = IoSlice::new(part);
                n += 1;
            }
        }
        n
    }

    /// The first unwritten bytes (for writers without vectored writes).
    fn front(&self) -> &[u8] {
        match self.chunks.front() {
            Some(c) => &c.bytes()[self.pos..],
            None => &self.tail[self.pos..],
        }
    }

    /// `n` bytes were written (at most `len`). Fully written chunks are released.
    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            match self.chunks.front() {
                Some(c) => {
                    let left = c.bytes().len() - self.pos;
                    if n >= left {
                        n -= left;
                        self.chunks.pop_front();
                        self.pos = 0;
                    } else {
                        self.pos += n;
                        n = 0;
                    }
                }
                None => {
                    self.pos += n;
                    n = 0;
                }
            }
        }
    }

    /// Every unwritten byte, copied (for tests and logs).
    fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        let mut slices = vec![IoSlice::new(&[]); self.chunks.len() + 1];
        let n = self.slices(&mut slices);
        for s in &slices[..n] {
            out.extend_from_slice(s);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write_all(q: &mut OutQueue, step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while !q.is_empty() {
            let mut s = [IoSlice::new(&[]); 4];
            let n = q.slices(&mut s);
            let mut budget = step;
            let mut wrote = 0;
            for sl in &s[..n] {
                let k = sl.len().min(budget);
                out.extend_from_slice(&sl[..k]);
                wrote += k;
                budget -= k;
                if budget == 0 {
                    break;
                }
            }
            q.advance(wrote);
        }
        out
    }

    #[test]
    fn own_and_shared_frames_keep_their_order() {
        let mut q = OutQueue::new();
        q.push_with(|b| b.extend_from_slice(b"ab"));
        let shared = Bytes::from_static(b"SHARED");
        q.push_chunk(shared.clone());
        q.push_with(|b| b.extend_from_slice(b"cd"));
        q.push_chunk(shared);
        assert_eq!(q.len(), 16);
        assert_eq!(q.to_vec(), b"abSHAREDcdSHARED");
        assert_eq!(write_all(&mut q, 3), b"abSHAREDcdSHARED");
        assert!(q.is_empty());
        assert_eq!(q.capacity(), 0, "an empty queue holds no buffer");
    }

    #[test]
    fn an_empty_queue_is_one_null_pointer() {
        assert_eq!(
            std::mem::size_of::<OutQueue>(),
            std::mem::size_of::<usize>()
        );
        let mut q = OutQueue::new();
        q.push_with(|_| {});
        assert_eq!(q.capacity(), 0, "nothing queued, nothing held");
        q.tail_mut().extend_from_slice(b"ab");
        q.added(2);
        q.push_chunk(Bytes::from_static(b"c"));
        assert!(q.capacity() > 0);
        q.advance(3);
        assert_eq!(q.capacity(), 0, "written out, freed");
    }

    #[test]
    fn a_partly_written_tail_keeps_its_offset_when_a_chunk_follows() {
        let mut q = OutQueue::new();
        q.push_with(|b| b.extend_from_slice(b"hello"));
        q.advance(2);
        assert_eq!(q.front(), b"llo");
        q.push_chunk(Bytes::from_static(b"X"));
        assert_eq!(q.to_vec(), b"lloX");
        q.advance(3);
        assert_eq!(q.front(), b"X");
    }

    #[test]
    fn append_moves_a_partly_written_queue_behind_this_one() {
        let mut a = OutQueue::new();
        a.push_with(|b| b.extend_from_slice(b"12"));
        let mut b = OutQueue::new();
        b.push_with(|v| v.extend_from_slice(b"xyz"));
        b.advance(1);
        b.push_chunk(Bytes::from_static(b"S"));
        a.append(&mut b);
        assert!(b.is_empty());
        assert_eq!(a.to_vec(), b"12yzS");
        assert_eq!(a.len(), 5);
        let mut e = OutQueue::new();
        e.append(&mut a);
        assert_eq!(e.to_vec(), b"12yzS");
    }

    #[test]
    fn messages_to_compress_keep_their_place() {
        let mut q = OutQueue::new();
        q.push_with(|b| b.extend_from_slice(b"ab"));
        q.push_compress(OpCode::Text, Bytes::from_static(b"hello"));
        q.push_chunk(Bytes::from_static(b"S"));
        assert!(q.has_compress());
        assert_eq!(q.len(), 8);
        let mut other = OutQueue::new();
        other.push_with(|b| b.extend_from_slice(b"0"));
        other.append(&mut q);
        assert!(other.has_compress());
        let items = other.into_items();
        let shown: Vec<String> = items
            .iter()
            .map(|i| match i {
                OutItem::Frames(b) => String::from_utf8_lossy(b).into_owned(),
                OutItem::Compress(op, d) => format!("{op:?}:{}", String::from_utf8_lossy(d)),
            })
            .collect();
        assert_eq!(shown, ["0", "ab", "Text:hello", "S"]);
        assert_eq!(std::mem::size_of::<Chunk>(), std::mem::size_of::<Bytes>());
    }

    #[test]
    fn slices_stop_at_the_room_given() {
        let mut q = OutQueue::new();
        for i in 0..10u8 {
            q.push_chunk(Bytes::from(vec![i]));
        }
        let mut s = [IoSlice::new(&[]); 4];
        assert_eq!(q.slices(&mut s), 4);
        assert_eq!(&*s[3], &[3]);
    }

    proptest! {
        #[test]
        fn any_mix_of_pushes_and_partial_writes_delivers_every_byte_in_order(
            ops in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..20)), 0..30),
            step in 1usize..17,
        ) {
            let mut q = OutQueue::new();
            let mut expect = Vec::new();
            let mut got = Vec::new();
            for (i, (shared, data)) in ops.iter().enumerate() {
                if *shared {
                    q.push_chunk(Bytes::from(data.clone()));
                } else {
                    q.push_with(|b| b.extend_from_slice(data));
                }
                expect.extend_from_slice(data);
                if i % 3 == 0 && !q.is_empty() {
                    let k = q.front().len().min(step);
                    got.extend_from_slice(&q.front()[..k]);
                    q.advance(k);
                }
            }
            got.extend(write_all(&mut q, step));
            prop_assert_eq!(got, expect);
        }
    }
}
