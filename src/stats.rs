//! Heap counters kept in the segment, shared by every process.
//!
//! The six request counters mean exactly what dhat's `HeapStats` fields mean:
//! sizes are the sizes users asked for, a reallocation counts as one more
//! block in the totals and changes `curr_bytes` by the difference, and the
//! peak is taken whenever `curr_bytes` reaches or passes `max_bytes`.
//!
//! Each counter is updated with its own atomic operation (`Relaxed`: they
//! order nothing else), in batches per thread (see [`Delta`]). Between a
//! thread's flushes its changes are not visible to others; `stats()` flushes
//! the calling thread. With several threads at once `max_blocks` is the count
//! one of them saw at its peak, not an atomic snapshot.

use crate::sync::{
    compiler_fence, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};

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
    /// Bytes of small-object pages held by threads (part of `block_bytes`).
    page_bytes: AtomicU64,
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
    /// Bytes of small-object pages (part of `block_bytes`): memory held by
    /// the per-thread caches, whether in live blocks or free in the pages.
    pub page_bytes: u64,
}

impl Stats {
    /// What happened since `base`, counted as dhat counts a profile that
    /// started at `base`: totals and current values are differences, and the
    /// peaks are measured above `base`'s live blocks.
    ///
    /// `base` must come from [`Matrix::reset_peak`](crate::Matrix::reset_peak)
    /// (so that the peaks belong to the window), and the window must not
    /// free blocks allocated before it (dhat does not see those frees). The
    /// capacity and memory figures are `self`'s.
    pub fn since(&self, base: &Stats) -> Stats {
        Stats {
            total_blocks: self.total_blocks.wrapping_sub(base.total_blocks),
            total_bytes: self.total_bytes.wrapping_sub(base.total_bytes),
            curr_blocks: self.curr_blocks.wrapping_sub(base.curr_blocks),
            curr_bytes: self.curr_bytes.wrapping_sub(base.curr_bytes),
            max_blocks: self.max_blocks.wrapping_sub(base.curr_blocks),
            max_bytes: self.max_bytes.wrapping_sub(base.curr_bytes),
            ..*self
        }
    }
}

/// Counter changes a thread has made but not yet applied to the segment.
///
/// Applying every change at once would cost several shared atomic RMWs per
/// allocation; a thread applies its changes every `FLUSH_EVERY` operations,
/// and whenever it reads the counters (`stats()`, `check()`) or exits.
///
/// The peak is tracked here too: from the segment's counters as of the last
/// flush plus this thread's changes since, the thread knows the would-be
/// `curr_bytes` after each of its operations and keeps the latest point at
/// which it reached the known maximum (dhat's `>=` rule). With one thread at
/// work this gives exactly dhat's `max_bytes` and `max_blocks`.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Delta {
    // The fields every operation touches come first: with `Heap::token`
    // before them they fill one cache line.
    total_blocks: u64,
    total_bytes: u64,
    /// This thread's changes to `curr_blocks` / `curr_bytes` since the last
    /// flush (wrapping: they go below zero when it frees more than it
    /// allocates).
    blocks: u64,
    bytes: u64,
    /// The change of `curr_bytes` at which this thread reaches the highest
    /// value it knows: the segment's `max_bytes` at the last flush, or its
    /// own latest peak since, less `base_bytes`. Signed.
    peak_at: u64,
    /// `blocks` at that local peak, or `NO_PEAK` while there is none.
    peak_blocks: u64,
    /// Operations until the next flush: a countdown, one decrement and a
    /// test per operation (see `fast_tick`). Above zero between operations:
    /// every tick that reaches zero is followed by a flush, which restarts it.
    left: u32,
    /// The segment's `curr_blocks` / `curr_bytes` as of the last flush,
    /// which the changes are relative to (read at flushes only).
    base_blocks: u64,
    base_bytes: u64,
}

impl Default for Delta {
    fn default() -> Delta {
        Delta {
            total_blocks: 0,
            total_bytes: 0,
            blocks: 0,
            bytes: 0,
            peak_at: 0,
            peak_blocks: NO_PEAK,
            left: FLUSH_EVERY,
            base_blocks: 0,
            base_bytes: 0,
        }
    }
}

impl Delta {
    /// Bytes at the start of a `Delta` that every operation touches.
    pub(crate) const HOT_BYTES: usize = std::mem::offset_of!(Delta, left) + size_of::<u32>();
}

/// `*field += by` (wrapping), as a scalar update of its own.
///
/// The compiler merges neighbouring counter updates into 16-byte vector
/// loads and stores, which differ from one operation to the next (the
/// allocation also reads its fields for the peak). A 16-byte load of two
/// recent 8-byte stores cannot be forwarded from the store buffer: on an
/// allocate/free pair that stalled every free (10.4 -> 8.9 ns per pair when
/// kept apart), and the merged additions took more instructions too. The
/// fence emits no instruction; it only keeps the updates apart.
#[inline(always)]
fn add_apart(field: &mut u64, by: u64) {
    *field = field.wrapping_add(by);
    compiler_fence(SeqCst);
}

/// `Delta::peak_blocks` when there is no local peak to apply: a change no
/// thread can make.
const NO_PEAK: u64 = i64::MIN as u64;

/// How many operations a thread batches before applying its counter changes.
///
/// Each flush is a handful of RMWs on one cache line that every thread
/// shares; at 128 operations that bouncing cost two threads a third of their
/// throughput on a 64-byte allocate/free loop. A thread's own reads flush it
/// first, so only other threads' views lag.
pub(crate) const FLUSH_EVERY: u32 = 1024;

impl Delta {
    /// Counts an allocation; returns whether it is time to flush.
    #[inline]
    pub(crate) fn on_alloc(&mut self, requested: u64) -> bool {
        self.count_alloc(requested);
        self.tick()
    }

    /// Counts an allocation whose tick `fast_tick` took.
    #[inline(always)]
    pub(crate) fn count_alloc(&mut self, requested: u64) {
        add_apart(&mut self.total_blocks, 1);
        add_apart(&mut self.total_bytes, requested);
        add_apart(&mut self.blocks, 1);
        add_apart(&mut self.bytes, requested);
        self.mark_peak();
    }

    /// Counts a free; returns whether it is time to flush.
    #[inline]
    pub(crate) fn on_free(&mut self, requested: u64) -> bool {
        self.count_free(requested);
        self.tick()
    }

    /// Counts a free whose tick `fast_tick` took.
    #[inline(always)]
    pub(crate) fn count_free(&mut self, requested: u64) {
        add_apart(&mut self.blocks, 1u64.wrapping_neg());
        add_apart(&mut self.bytes, requested.wrapping_neg());
    }

    /// A reallocation from `old` to `new` requested bytes (dhat counts it as
    /// one more block in the totals).
    pub(crate) fn on_realloc(&mut self, old: u64, new: u64) -> bool {
        self.count_realloc(old, new);
        self.tick()
    }

    /// Counts a reallocation whose tick `fast_tick` took.
    #[inline(always)]
    pub(crate) fn count_realloc(&mut self, old: u64, new: u64) {
        add_apart(&mut self.total_blocks, 1);
        add_apart(&mut self.total_bytes, new);
        add_apart(&mut self.bytes, new.wrapping_sub(old));
        self.mark_peak();
    }

    #[inline]
    fn mark_peak(&mut self) {
        // Signed: the changes, and the thread's view of the counters, can
        // dip below zero while another thread has not yet applied the
        // allocations this one frees.
        if self.bytes as i64 >= self.peak_at as i64 {
            self.peak_at = self.bytes;
            self.peak_blocks = self.blocks;
        }
    }

    /// The tick of a fast path, taken before its operation: `false` when
    /// the operation is due to flush, which the fast path then leaves to
    /// the slow one. One decrement and one branch. A fast path that gives
    /// up after its tick (for a reason of its own) leaves the slow path to
    /// tick the same operation again: the flush comes one operation early.
    #[inline(always)]
    pub(crate) fn fast_tick(&mut self) -> bool {
        // (A test for zero, not below: that one compiles to a decrement in
        // memory and a branch on its flags.)
        self.left = self.left.wrapping_sub(1);
        self.left != 0
    }

    /// The tick of a slow path: whether to flush now (which restarts the
    /// countdown). Stops at zero, also after `fast_tick` took it there.
    #[inline]
    fn tick(&mut self) -> bool {
        self.left = self.left.saturating_sub(1);
        self.left == 0
    }
}

impl Counters {
    /// Applies a thread's pending changes and re-bases it on the result.
    #[inline(never)]
    pub(crate) fn flush(&self, d: &mut Delta) {
        if d.peak_blocks != NO_PEAK {
            let bytes = d.base_bytes.wrapping_add(d.peak_at);
            let blocks = d.base_blocks.wrapping_add(d.peak_blocks);
            // A view below zero (see `mark_peak`) is no peak.
            if bytes as i64 >= 0 && blocks as i64 >= 0 && bytes >= self.max_bytes.load(Relaxed) {
                self.max_bytes.fetch_max(bytes, Relaxed);
                self.max_blocks.store(blocks, Relaxed);
            }
        }
        if d.total_blocks != 0 {
            self.total_blocks.fetch_add(d.total_blocks, Relaxed);
            self.total_bytes.fetch_add(d.total_bytes, Relaxed);
        }
        let blocks = apply(&self.curr_blocks, d.blocks as i64);
        let bytes = apply(&self.curr_bytes, d.bytes as i64);
        *d = Delta {
            base_blocks: blocks,
            base_bytes: bytes,
            peak_at: self.max_bytes.load(Relaxed).wrapping_sub(bytes),
            ..Delta::default()
        };
    }

    /// A delta based on the counters as they are now (for one-off updates
    /// by threads without a cache).
    pub(crate) fn fresh_delta(&self) -> Delta {
        let mut d = Delta::default();
        self.flush(&mut d);
        d
    }

    /// Engine blocks (headers, padding and whole small-object pages
    /// included) handed out or taken back.
    pub(crate) fn add_block_bytes(&self, bytes: u64) {
        let now = self.block_bytes.fetch_add(bytes, Relaxed) + bytes;
        self.max_block_bytes.fetch_max(now, Relaxed);
    }

    pub(crate) fn sub_block_bytes(&self, bytes: u64) {
        self.block_bytes.fetch_sub(bytes, Relaxed);
    }

    /// Small-object pages held (in bytes), for `Stats::page_bytes`.
    pub(crate) fn add_page_bytes(&self, bytes: i64) {
        apply(&self.page_bytes, bytes);
    }

    /// Starts the peaks afresh from the current values (see
    /// `Matrix::reset_peak`).
    pub(crate) fn reset_peak(&self) {
        self.max_bytes.store(self.curr_bytes.load(Relaxed), Relaxed);
        self.max_blocks
            .store(self.curr_blocks.load(Relaxed), Relaxed);
        self.max_block_bytes
            .store(self.block_bytes.load(Relaxed), Relaxed);
    }

    pub(crate) fn snapshot(&self, capacity: u64, largest_free: u64) -> Stats {
        let block_bytes = self.block_bytes.load(Relaxed);
        Stats {
            total_blocks: self.total_blocks.load(Relaxed),
            total_bytes: self.total_bytes.load(Relaxed),
            curr_blocks: not_below_zero(self.curr_blocks.load(Relaxed)),
            curr_bytes: not_below_zero(self.curr_bytes.load(Relaxed)),
            max_blocks: self.max_blocks.load(Relaxed),
            max_bytes: self.max_bytes.load(Relaxed),
            capacity,
            free_bytes: capacity.saturating_sub(block_bytes),
            largest_free,
            block_bytes,
            max_block_bytes: self.max_block_bytes.load(Relaxed),
            page_bytes: self.page_bytes.load(Relaxed),
        }
    }
}

/// A current count read as signed: it is below zero for a moment when
/// blocks were freed by one thread and their allocation is still in another
/// thread's batch; that reads as 0.
fn not_below_zero(v: u64) -> u64 {
    (v as i64).max(0) as u64
}

/// Adds a signed change to a counter; returns the new value.
fn apply(counter: &AtomicU64, change: i64) -> u64 {
    if change >= 0 {
        counter
            .fetch_add(change as u64, Relaxed)
            .wrapping_add(change as u64)
    } else {
        counter
            .fetch_sub(change.unsigned_abs(), Relaxed)
            .wrapping_sub(change.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_below_zero_is_no_peak_and_reads_as_zero() {
        let c = Counters::default();
        // Thread B frees a block that thread A allocated but has not counted yet.
        let mut a = c.fresh_delta();
        let mut b = c.fresh_delta();
        a.on_alloc(100);
        b.on_free(100);
        c.flush(&mut b);
        let s = c.snapshot(0, 0);
        assert_eq!((s.curr_blocks, s.curr_bytes, s.max_bytes), (0, 0, 0));
        c.flush(&mut a);
        let s = c.snapshot(0, 0);
        assert_eq!((s.curr_blocks, s.curr_bytes), (0, 0));
        assert_eq!(
            (s.total_blocks, s.total_bytes, s.max_bytes, s.max_blocks),
            (1, 100, 100, 1)
        );
    }
}
