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

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::Bytes;

/// See the module documentation.
#[derive(Default)]
pub struct OutQueue {
    /// Whole chunks, oldest first; the front one may be partly written (`pos`).
    chunks: VecDeque<Bytes>,
    /// Frames appended after every chunk, not yet closed into a chunk. When `chunks`
    /// is empty it is the front, and `pos` applies to it.
    tail: Vec<u8>,
    /// Bytes of the front (the first chunk, or the tail) already written.
    pos: usize,
    /// Unwritten bytes in all.
    len: usize,
}

impl OutQueue {
    pub const fn new() -> Self {
        Self {
            chunks: VecDeque::new(),
            tail: Vec::new(),
            pos: 0,
            len: 0,
        }
    }

    /// Unwritten bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append to the tail with `encode` (one or more whole frames).
    pub fn push_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let before = self.tail.len();
        encode(&mut self.tail);
        self.len += self.tail.len() - before;
    }

    /// The tail, to encode into directly; call [`OutQueue::added`] with how many bytes
    /// were appended.
    pub fn tail_mut(&mut self) -> &mut Vec<u8> {
        &mut self.tail
    }

    /// `n` bytes were appended through [`OutQueue::tail_mut`].
    pub fn added(&mut self, n: usize) {
        self.len += n;
    }

    /// Append a chunk by reference (a frame shared with other connections).
    pub fn push_chunk(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.close_tail();
        self.len += chunk.len();
        self.chunks.push_back(chunk);
    }

    /// Close the tail into a chunk, so that what follows goes after it.
    fn close_tail(&mut self) {
        if !self.tail.is_empty() {
            let tail = std::mem::take(&mut self.tail);
            self.chunks.push_back(Bytes::from(tail));
        }
    }

    /// Move everything from `other` to the end of this queue (`other` is left empty).
    pub fn append(&mut self, other: &mut OutQueue) {
        if other.is_empty() {
            *other = OutQueue::new();
            return;
        }
        if self.is_empty() {
            std::mem::swap(self, other);
            *other = OutQueue::new();
            return;
        }
        let mut taken = std::mem::take(other);
        taken.close_tail();
        // The other's written prefix (if any) is dropped from its front chunk.
        if taken.pos > 0 {
            if let Some(front) = taken.chunks.front_mut() {
                *front = front.slice(taken.pos..);
            }
        }
        self.close_tail();
        self.len += taken.len;
        self.chunks.extend(taken.chunks);
    }

    /// Drop every unwritten byte (and the buffers).
    pub fn clear(&mut self) {
        *self = OutQueue::new();
    }

    /// Fill `dst` with the unwritten bytes in order; returns how many slices it used.
    pub fn slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let mut skip = self.pos;
        for chunk in self
            .chunks
            .iter()
            .map(|c| &c[..])
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
    pub fn front(&self) -> &[u8] {
        match self.chunks.front() {
            Some(c) => &c[self.pos..],
            None => &self.tail[self.pos..],
        }
    }

    /// `n` bytes were written. Fully written chunks are released; once everything is
    /// written the buffers go back to the allocator.
    pub fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len, "advance past the end of the queue");
        self.len -= n;
        while n > 0 {
            match self.chunks.front() {
                Some(c) => {
                    let left = c.len() - self.pos;
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
        if self.len == 0 {
            *self = OutQueue::new();
        }
    }

    /// Every unwritten byte, copied (for tests and logs).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        let mut slices = vec![IoSlice::new(&[]); self.chunks.len() + 1];
        let n = self.slices(&mut slices);
        for s in &slices[..n] {
            out.extend_from_slice(s);
        }
        out
    }

    /// Bytes of buffer this queue holds (for memory accounting in tests).
    pub fn capacity(&self) -> usize {
        self.tail.capacity() + self.chunks.capacity() * std::mem::size_of::<Bytes>()
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
