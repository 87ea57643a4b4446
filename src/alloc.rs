//! The extension's global allocator: the system allocator, except for small blocks
//! aligned to a cache line, which come from slabs.
//!
//! Two of an idle connection's allocations are aligned to 128 bytes on x86_64: its
//! tokio task (the task cell is cache-line padded) and its I/O registration (tokio's
//! `ScheduledIo`). glibc serves an aligned request with `memalign`, which takes
//! size + alignment + 32 bytes and splits off the unused parts; over thousands of
//! connections those fragments cost about 170 bytes per aligned block (measured:
//! `cargo test --release --lib memtest -- --nocapture`, BENCHMARKS.md "Memory per idle
//! connection"). Here such a block comes from a slab of same-sized blocks carved from
//! 64 KiB regions: no header, no fragment. Everything else goes to the system
//! allocator unchanged.
//!
//! Freed slab blocks go back to their size class's free list and are reused by the
//! next block of that class; the regions themselves are never returned to the system
//! (as with glibc's heap, memory stays at its high-water mark). Only the Rust side of
//! the process uses it: Python objects come from Python's own allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::{self, NonNull};
use std::sync::Mutex;

/// Blocks up to this size, with an alignment above 16 and up to `ALIGN`, use slabs.
const MAX: usize = 1024;
/// Every slab block is aligned to this (a multiple of any alignment it serves).
const ALIGN: usize = 128;
const CLASSES: usize = MAX / ALIGN;
/// Bytes the system gives a class at a time.
const REGION: usize = 64 * 1024;

/// The free blocks of one size class (each free block holds the next one's address)
/// and the rest of its current region.
struct Class {
    free: Option<NonNull<u8>>,
    next: *mut u8,
    end: *mut u8,
}

// SAFETY: the pointers are only touched under the class's mutex.
unsafe impl Send for Class {}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Mutex<Class> = Mutex::new(Class {
    free: None,
    next: ptr::null_mut(),
    end: ptr::null_mut(),
});
static SLABS: [Mutex<Class>; CLASSES] = [EMPTY; CLASSES];

pub struct Allocator;

/// The size class of `layout`, if a slab serves it.
fn class_of(layout: Layout) -> Option<usize> {
    let (size, align) = (layout.size(), layout.align());
    (align > 16 && align <= ALIGN && size > 0 && size <= MAX).then(|| size.div_ceil(ALIGN) - 1)
}

impl Allocator {
    fn slab_alloc(class: usize) -> *mut u8 {
        let block = (class + 1) * ALIGN;
        // A poisoned lock only means another thread panicked while holding it; the
        // free list is updated in one step, so it is consistent either way.
        let mut c = SLABS[class].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = c.free {
            // SAFETY: a free block holds the address of the next free block.
            c.free = NonNull::new(unsafe { p.as_ptr().cast::<*mut u8>().read() });
            return p.as_ptr();
        }
        if (c.end as usize) - (c.next as usize) < block {
            // SAFETY: REGION and ALIGN make a valid, non-zero layout.
            let region = unsafe { System.alloc(Layout::from_size_align_unchecked(REGION, ALIGN)) };
            if region.is_null() {
                return region;
            }
            c.next = region;
            // SAFETY: within the region just allocated (one past its end).
            c.end = unsafe { region.add(REGION) };
        }
        let p = c.next;
        // SAFETY: at least `block` bytes remain in the region.
        c.next = unsafe { p.add(block) };
        p
    }

    /// # Safety
    /// `p` came from `slab_alloc(class)` and is not in use.
    unsafe fn slab_free(p: *mut u8, class: usize) {
        let mut c = SLABS[class].lock().unwrap_or_else(|e| e.into_inner());
        let next = c.free.map_or(ptr::null_mut(), NonNull::as_ptr);
        // SAFETY: the block is ours again and at least 128 bytes, aligned for a pointer.
        unsafe { p.cast::<*mut u8>().write(next) };
        c.free = NonNull::new(p);
    }
}

// SAFETY: slab blocks are aligned to ALIGN (regions are, and blocks are multiples of
// it), at least as large as asked, and handed out once until freed; the rest is the
// system allocator's.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => Self::slab_alloc(class),
            // SAFETY: same contract as ours.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => {
                let p = Self::slab_alloc(class);
                if !p.is_null() {
                    // SAFETY: the block has at least layout.size() bytes.
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                }
                p
            }
            // SAFETY: same contract as ours.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match class_of(layout) {
            // SAFETY: a layout of this class was allocated from this class.
            Some(class) => unsafe { Self::slab_free(p, class) },
            // SAFETY: same contract as ours.
            None => unsafe { System.dealloc(p, layout) },
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees the new size makes a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new)) {
            // SAFETY: same contract as ours.
            (None, None) => unsafe { System.realloc(p, layout, new_size) },
            (old_class, new_class) if old_class == new_class => p,
            _ => {
                // SAFETY: `new` is a valid layout; on success both blocks are live and
                // distinct, and the old one is released after its bytes are copied.
                unsafe {
                    let q = self.alloc(new);
                    if !q.is_null() {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                    q
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_small_cache_line_aligned_blocks_use_slabs() {
        let l = |size, align| Layout::from_size_align(size, align).unwrap();
        assert_eq!(class_of(l(256, 128)), Some(1));
        assert_eq!(class_of(l(129, 128)), Some(1));
        assert_eq!(class_of(l(512, 128)), Some(3));
        assert_eq!(class_of(l(40, 64)), Some(0));
        assert_eq!(class_of(l(1024, 128)), Some(7));
        assert_eq!(class_of(l(1025, 128)), None);
        assert_eq!(class_of(l(256, 16)), None);
        assert_eq!(class_of(l(256, 8)), None);
        assert_eq!(class_of(l(256, 256)), None);
    }

    proptest! {
        /// Blocks are aligned, as large as asked, never shared while live, and reused
        /// once freed.
        #[test]
        fn blocks_are_aligned_disjoint_and_reused(
            ops in proptest::collection::vec((1usize..=1024, 0usize..3, any::<bool>()), 1..200),
        ) {
            let a = Allocator;
            let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
            for (i, (size, align, free_one)) in ops.into_iter().enumerate() {
                if free_one && !live.is_empty() {
                    let (p, layout, tag) = live.swap_remove(i % live.len());
                    // SAFETY: allocated below with this layout and still live.
                    unsafe {
                        prop_assert!((0..layout.size()).all(|k| *p.add(k) == tag));
                        a.dealloc(p, layout);
                    }
                    continue;
                }
                let layout = Layout::from_size_align(size, [32, 64, 128][align]).unwrap();
                // SAFETY: a valid, non-zero layout.
                let p = unsafe { a.alloc(layout) };
                prop_assert!(!p.is_null());
                prop_assert_eq!(p as usize % layout.align(), 0);
                let tag = (i % 251) as u8;
                // SAFETY: the block has layout.size() bytes.
                unsafe { ptr::write_bytes(p, tag, layout.size()) };
                live.push((p, layout, tag));
            }
            for (p, layout, tag) in live {
                // SAFETY: allocated above with this layout and still live.
                unsafe {
                    prop_assert!((0..layout.size()).all(|k| *p.add(k) == tag));
                    a.dealloc(p, layout);
                }
            }
        }
    }
}
