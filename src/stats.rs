//! Heap counters kept in the segment, shared by every process.
//!
//! The six request counters mean exactly what dhat's `HeapStats` fields mean:
//! sizes are the sizes users asked for, a reallocation counts as one more
//! block in the totals and changes `curr_bytes` by the difference, and the
//! peak is taken whenever `curr_bytes` reaches or passes `max_bytes`.
//!
//! Each counter is updated with its own atomic operation (`Relaxed`: they
//! order nothing else). `max_blocks` is read together with `curr_blocks` at
//! the moment of a new peak; with several threads at once it is the count one
//! of them saw, not an atomic snapshot.

use crate::sync::{AtomicU64, Ordering::Relaxed};

#[repr(C)]
#[derive(Default)]
pub(crate) struct Counters {
    total_blocks: AtomicU64,
    total_bytes: AtomicU64,
    curr_blocks: AtomicU64,
    curr_bytes: AtomicU64,
    max_blocks: AtomicU64,
    max_bytes: AtomicU64,
    /// Bytes of blocks handed out (headers and padding included).
    block_bytes: AtomicU64,
    max_block_bytes: AtomicU64,
}

/// A snapshot of a segment's counters, over all processes using it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Allocations (and reallocations) ever made.
    pub total_blocks: u64,
    /// Bytes requested by them.
    pub total_bytes: u64,
    /// Live blocks now.
    pub curr_blocks: u64,
    /// Requested bytes of the live blocks.
    pub curr_bytes: u64,
    /// Live blocks at the peak of `curr_bytes`.
    pub max_blocks: u64,
    /// The peak of `curr_bytes`.
    pub max_bytes: u64,
    /// Heap bytes in total.
    pub capacity: u64,
    /// Heap bytes not in live blocks (`capacity - block_bytes`).
    pub free_bytes: u64,
    /// The largest free block (approximate under concurrency), in bytes.
    pub largest_free: u64,
    /// Heap bytes in live blocks, headers and padding included.
    pub block_bytes: u64,
    /// The peak of `block_bytes`: what the segment had to provide.
    pub max_block_bytes: u64,
}

impl Counters {
    fn raise_peak(&self, curr_bytes: u64, curr_blocks: u64) {
        if curr_bytes >= self.max_bytes.load(Relaxed) {
            self.max_bytes.fetch_max(curr_bytes, Relaxed);
            self.max_blocks.store(curr_blocks, Relaxed);
        }
    }

    fn add_block_bytes(&self, bytes: u64) {
        let now = self.block_bytes.fetch_add(bytes, Relaxed) + bytes;
        self.max_block_bytes.fetch_max(now, Relaxed);
    }

    pub(crate) fn on_alloc(&self, requested: u64, block_bytes: u64) {
        self.total_blocks.fetch_add(1, Relaxed);
        self.total_bytes.fetch_add(requested, Relaxed);
        let blocks = self.curr_blocks.fetch_add(1, Relaxed) + 1;
        let bytes = self.curr_bytes.fetch_add(requested, Relaxed) + requested;
        self.add_block_bytes(block_bytes);
        self.raise_peak(bytes, blocks);
    }

    pub(crate) fn on_free(&self, requested: u64, block_bytes: u64) {
        self.curr_blocks.fetch_sub(1, Relaxed);
        self.curr_bytes.fetch_sub(requested, Relaxed);
        self.block_bytes.fetch_sub(block_bytes, Relaxed);
    }

    /// A reallocation from `old` to `new` requested bytes, whose block went
    /// from `old_block` to `new_block` bytes.
    pub(crate) fn on_realloc(&self, old: u64, new: u64, old_block: u64, new_block: u64) {
        self.total_blocks.fetch_add(1, Relaxed);
        self.total_bytes.fetch_add(new, Relaxed);
        let bytes = if new >= old {
            self.curr_bytes.fetch_add(new - old, Relaxed) + (new - old)
        } else {
            self.curr_bytes.fetch_sub(old - new, Relaxed) - (old - new)
        };
        if new_block >= old_block {
            self.add_block_bytes(new_block - old_block);
        } else {
            self.block_bytes.fetch_sub(old_block - new_block, Relaxed);
        }
        self.raise_peak(bytes, self.curr_blocks.load(Relaxed));
    }

    pub(crate) fn snapshot(&self, capacity: u64, largest_free: u64) -> Stats {
        let block_bytes = self.block_bytes.load(Relaxed);
        Stats {
            total_blocks: self.total_blocks.load(Relaxed),
            total_bytes: self.total_bytes.load(Relaxed),
            curr_blocks: self.curr_blocks.load(Relaxed),
            curr_bytes: self.curr_bytes.load(Relaxed),
            max_blocks: self.max_blocks.load(Relaxed),
            max_bytes: self.max_bytes.load(Relaxed),
            capacity,
            free_bytes: capacity.saturating_sub(block_bytes),
            largest_free,
            block_bytes,
            max_block_bytes: self.max_block_bytes.load(Relaxed),
        }
    }
}
