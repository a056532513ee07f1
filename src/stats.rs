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
/// allocation; a thread applies its changes once it has counted
/// `FLUSH_EVERY` allocations or `FLUSH_EVERY` frees, and whenever it reads
/// the counters (`stats()`, `check()`) or exits.
///
/// The changes are kept as four sums that only grow, each updated by one
/// kind of operation: an allocation adds to `allocs` and `alloc_bytes`, a
/// free to `frees` and `freed_bytes`, a reallocation to all four (one block
/// more in the totals, the old size out and the new one in). The changes
/// of `curr_blocks` and `curr_bytes` are the differences. Compared with
/// keeping those two as well, this takes two stores off every allocation,
/// and the counts double as the flush countdown. On a 64-byte
/// allocate/free pair, where every store counts, the counters had taken a
/// quarter of the time.
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
    /// Allocations and reallocations since the last flush (the change of
    /// `total_blocks`), and the bytes they asked for (of `total_bytes`).
    allocs: u64,
    alloc_bytes: u64,
    /// Frees and reallocations since the last flush, and the bytes their
    /// blocks had been asked for: `curr_blocks` changed by `allocs - frees`
    /// and `curr_bytes` by `alloc_bytes - freed_bytes` (wrapping: below
    /// zero when the thread frees more than it allocates).
    frees: u64,
    freed_bytes: u64,
    /// The change of `curr_bytes` at which this thread reaches the highest
    /// value it knows: the segment's `max_bytes` at the last flush, or its
    /// own latest peak since, less `base_bytes`. Signed.
    peak_at: u64,
    /// The change of `curr_blocks` at that local peak, or `NO_PEAK` while
    /// there is none.
    peak_blocks: u64,
    /// The segment's `curr_blocks` / `curr_bytes` as of the last flush,
    /// which the changes are relative to (read at flushes only).
    base_blocks: u64,
    base_bytes: u64,
}

impl Default for Delta {
    fn default() -> Delta {
        Delta {
            allocs: 0,
            alloc_bytes: 0,
            frees: 0,
            freed_bytes: 0,
            peak_at: 0,
            peak_blocks: NO_PEAK,
            base_blocks: 0,
            base_bytes: 0,
        }
    }
}

impl Delta {
    /// Bytes at the start of a `Delta` that every operation touches.
    pub(crate) const HOT_BYTES: usize = std::mem::offset_of!(Delta, base_blocks);
}

/// `*field += by` (wrapping), as a scalar update of its own; returns the
/// new value.
///
/// The compiler merges neighbouring counter updates into 16-byte vector
/// loads and stores, which differ from one operation to the next (the
/// allocation also reads its fields for the peak). A 16-byte load of two
/// recent 8-byte stores cannot be forwarded from the store buffer: on an
/// allocate/free pair that stalled every free (10.4 -> 8.9 ns per pair when
/// kept apart), and the merged additions took more instructions too. The
/// fence emits no instruction; it only keeps the updates apart.
#[inline(always)]
fn add_apart(field: &mut u64, by: u64) -> u64 {
    let new = field.wrapping_add(by);
    *field = new;
    compiler_fence(SeqCst);
    new
}

/// `Delta::peak_blocks` when there is no local peak to apply: a change no
/// thread can make.
const NO_PEAK: u64 = i64::MIN as u64;

/// How many allocations, or frees, a thread batches before applying its
/// counter changes.
///
/// Each flush is a handful of RMWs on one cache line that every thread
/// shares; at 128 operations that bouncing cost two threads a third of their
/// throughput on a 64-byte allocate/free loop. A thread's own reads flush it
/// first, so only other threads' views lag.
pub(crate) const FLUSH_EVERY: u64 = 1024;

impl Delta {
    /// Whether an allocation can be counted without a flush: the fast
    /// paths' test, taken before they change anything (when it fails, the
    /// slow path counts the operation and flushes).
    #[inline(always)]
    pub(crate) fn alloc_in_batch(&self) -> bool {
        self.allocs < FLUSH_EVERY - 1
    }

    /// The same for a free.
    #[inline(always)]
    pub(crate) fn free_in_batch(&self) -> bool {
        self.frees < FLUSH_EVERY - 1
    }

    /// Whether the batch is full: after any count that is not in a batch.
    #[inline]
    fn due(&self) -> bool {
        self.allocs >= FLUSH_EVERY - 1 || self.frees >= FLUSH_EVERY - 1
    }

    /// Counts an allocation; returns whether it is time to flush.
    #[inline]
    pub(crate) fn on_alloc(&mut self, requested: u64) -> bool {
        self.count_alloc(requested);
        self.due()
    }

    /// Counts an allocation (of a fast path that found `alloc_in_batch`).
    #[inline(always)]
    pub(crate) fn count_alloc(&mut self, requested: u64) {
        let allocs = add_apart(&mut self.allocs, 1);
        let alloc_bytes = add_apart(&mut self.alloc_bytes, requested);
        self.mark_peak(
            alloc_bytes.wrapping_sub(self.freed_bytes),
            allocs.wrapping_sub(self.frees),
        );
    }

    /// Counts a free; returns whether it is time to flush.
    #[inline]
    pub(crate) fn on_free(&mut self, requested: u64) -> bool {
        self.count_free(requested);
        self.due()
    }

    /// Counts a free (of a fast path that found `free_in_batch`).
    #[inline(always)]
    pub(crate) fn count_free(&mut self, requested: u64) {
        add_apart(&mut self.frees, 1);
        add_apart(&mut self.freed_bytes, requested);
    }

    /// A reallocation from `old` to `new` requested bytes (dhat counts it as
    /// one more block in the totals).
    pub(crate) fn on_realloc(&mut self, old: u64, new: u64) -> bool {
        self.count_realloc(old, new);
        self.due()
    }

    /// Counts a reallocation (of a fast path that found both
    /// `alloc_in_batch` and `free_in_batch`).
    #[inline(always)]
    pub(crate) fn count_realloc(&mut self, old: u64, new: u64) {
        add_apart(&mut self.frees, 1);
        add_apart(&mut self.freed_bytes, old);
        self.count_alloc(new);
    }

    /// The change of `curr_blocks` since the last flush.
    fn blocks(&self) -> u64 {
        self.allocs.wrapping_sub(self.frees)
    }

    /// The change of `curr_bytes` since the last flush.
    fn bytes(&self) -> u64 {
        self.alloc_bytes.wrapping_sub(self.freed_bytes)
    }

    /// Takes the peak after an allocation that left the changes of
    /// `curr_bytes` and `curr_blocks` at `bytes` and `blocks`.
    #[inline(always)]
    fn mark_peak(&mut self, bytes: u64, blocks: u64) {
        // Signed: the changes, and the thread's view of the counters, can
        // dip below zero while another thread has not yet applied the
        // allocations this one frees. At the same peak again (an
        // allocate/free loop is there on every allocation) nothing is
        // written: loads are cheaper than stores on the fast paths.
        if bytes as i64 >= self.peak_at as i64
            && (bytes, blocks) != (self.peak_at, self.peak_blocks)
        {
            self.peak_at = bytes;
            self.peak_blocks = blocks;
        }
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
        if d.allocs != 0 {
            self.total_blocks.fetch_add(d.allocs, Relaxed);
            self.total_bytes.fetch_add(d.alloc_bytes, Relaxed);
        }
        let blocks = apply(&self.curr_blocks, d.blocks() as i64);
        let bytes = apply(&self.curr_bytes, d.bytes() as i64);
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

    /// dhat's counters, kept the plain way.
    #[derive(Default)]
    struct Model {
        total_blocks: u64,
        total_bytes: u64,
        curr_blocks: u64,
        curr_bytes: u64,
        max_blocks: u64,
        max_bytes: u64,
    }

    impl Model {
        fn peak(&mut self) {
            if self.curr_bytes >= self.max_bytes {
                self.max_bytes = self.curr_bytes;
                self.max_blocks = self.curr_blocks;
            }
        }
    }

    /// One thread's batches, through the fast paths' tests and counts when
    /// they allow and the slow paths' otherwise, add up to dhat's counters
    /// after every flush, and a batch never holds more than `FLUSH_EVERY`
    /// allocations or frees.
    #[test]
    fn batched_counts_match_dhat_at_every_flush() {
        let c = Counters::default();
        let mut d = c.fresh_delta();
        let mut m = Model::default();
        let mut live: Vec<u64> = Vec::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut due_flushes = 0;
        for op in 0..200_000u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let size = 1 + seed % 600;
            // Long runs of one kind of operation, so that both batch
            // limits are reached, and short ones in between.
            let phase = (op / 5000) % 3;
            let due = match (seed >> 20) % 10 {
                _ if live.is_empty() || phase == 0 && seed % 8 != 0 => {
                    live.push(size);
                    (m.total_blocks, m.total_bytes) = (m.total_blocks + 1, m.total_bytes + size);
                    (m.curr_blocks, m.curr_bytes) = (m.curr_blocks + 1, m.curr_bytes + size);
                    m.peak();
                    if d.alloc_in_batch() {
                        d.count_alloc(size);
                        false
                    } else {
                        d.on_alloc(size)
                    }
                }
                0 => {
                    let i = (seed >> 32) as usize % live.len();
                    let old = std::mem::replace(&mut live[i], size);
                    (m.total_blocks, m.total_bytes) = (m.total_blocks + 1, m.total_bytes + size);
                    m.curr_bytes = m.curr_bytes - old + size;
                    m.peak();
                    if d.alloc_in_batch() && d.free_in_batch() {
                        d.count_realloc(old, size);
                        false
                    } else {
                        d.on_realloc(old, size)
                    }
                }
                _ => {
                    let i = (seed >> 32) as usize % live.len();
                    let old = live.swap_remove(i);
                    (m.curr_blocks, m.curr_bytes) = (m.curr_blocks - 1, m.curr_bytes - old);
                    if d.free_in_batch() {
                        d.count_free(old);
                        false
                    } else {
                        d.on_free(old)
                    }
                }
            };
            due_flushes += due as u32;
            if due || op % 7919 == 0 {
                c.flush(&mut d);
                let s = c.snapshot(0, 0);
                let got = (s.total_blocks, s.total_bytes, s.curr_blocks, s.curr_bytes);
                assert_eq!(
                    got,
                    (m.total_blocks, m.total_bytes, m.curr_blocks, m.curr_bytes)
                );
                assert_eq!(
                    (s.max_bytes, s.max_blocks),
                    (m.max_bytes, m.max_blocks),
                    "op {op}"
                );
            }
            assert!(d.allocs < FLUSH_EVERY && d.frees < FLUSH_EVERY);
        }
        // About one flush per `FLUSH_EVERY` allocations or frees.
        assert!(due_flushes >= 100, "{due_flushes} flushes were due");
    }

    /// dhat's `>=`: reaching the peak again with other blocks moves
    /// `max_blocks` to the latest; reaching it with the same ones (an
    /// allocate/free loop, which the fast path writes nothing for) keeps it.
    #[test]
    fn the_latest_of_equal_peaks_counts() {
        let c = Counters::default();
        let mut d = c.fresh_delta();
        d.count_alloc(100);
        d.count_free(100);
        d.count_alloc(60);
        d.count_alloc(40);
        for _ in 0..3 {
            d.count_free(40);
            d.count_alloc(40);
        }
        c.flush(&mut d);
        let s = c.snapshot(0, 0);
        assert_eq!((s.max_bytes, s.max_blocks), (100, 2));
        assert_eq!((s.total_blocks, s.curr_blocks, s.curr_bytes), (6, 2, 100));
    }

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
