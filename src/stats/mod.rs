//! Heap counters kept in the segment, shared by every process.
//!
//! The six request counters mean exactly what dhat's `HeapStats` fields mean:
//! sizes are the sizes users asked for, a reallocation counts as one more
//! block in the totals and changes `curr_bytes` by the difference, and the
//! peak is taken whenever an allocation brings `curr_bytes` to or past
//! `max_bytes`.
//!
//! # Two modes
//! - **Batched** (the default): each thread keeps its changes in a [`Delta`]
//!   and applies them every `FLUSH_EVERY` operations or `BATCH_BYTES`
//!   requested bytes, and whenever it reads the counters or exits. With one
//!   thread at work the six numbers are exactly dhat's; with `T` threads,
//!   `max_bytes` is within `T × 2 × PENDING_BYTES` of dhat's (see
//!   `Counters::flush` for why).
//! - **Exact** ([`Counters::set_exact`]): every operation is applied at once,
//!   so the counters step through exactly the states dhat sees, in the order
//!   in which the operations were counted.
//!
//! # Invariants
//! - `now` holds `(curr_bytes, curr_blocks)` as one 128-bit word and `peak`
//!   holds `(max_bytes, max_blocks)` as one, so that neither pair is ever
//!   torn: `max_blocks` is the count of the same state as `max_bytes`.
//! - `peak.bytes >= 0` and `peak.blocks >= 0`; `now` may dip below zero in
//!   batched mode (a thread applied frees of blocks whose allocation another
//!   thread has not applied yet) and reads as zero then.
//! - Every state `now` takes after a flush is offered to `peak` (strictly
//!   greater wins), and a snapshot offers the `now` it read too, so a read
//!   never sees `max_bytes < curr_bytes`.
//!
//! The counters order no other memory. Their one pairing: a flush adds to
//! the totals before it writes `now` and `peak` (`Release`), and a snapshot
//! reads `peak` and `now` (`Acquire`) before the totals, so that no read
//! shows more live blocks than were ever made. What exact mode needs is
//! coherence alone: an allocation is counted (a
//! read-modify-write of `now`) before its block is returned, so the free of
//! that block by any thread, which the user's hand-over orders after it, is
//! counted later in `now`'s modification order.

use crate::sync::{
    compiler_fence, AtomicU128, AtomicU64,
    Ordering::{Acquire, Relaxed, Release, SeqCst},
};
use crate::Error;

mod snapshot;
pub use snapshot::Stats;

#[repr(C)]
#[derive(Default)]
pub(crate) struct Counters {
    /// [`Pair`]: `curr_bytes`, `curr_blocks`.
    now: AtomicU128,
    /// [`Pair`]: `max_bytes`, `max_blocks`.
    peak: AtomicU128,
    total_blocks: AtomicU64,
    total_bytes: AtomicU64,
    /// Bytes of blocks handed out (headers and padding included).
    block_bytes: AtomicU64,
    max_block_bytes: AtomicU64,
    /// Bytes of small-object pages held by threads (part of `block_bytes`).
    page_bytes: AtomicU64,
    /// Nonzero: exact mode (see the module documentation).
    exact: AtomicU64,
}

/// A `(bytes, blocks)` state of the counters, each a wrapping signed
/// count, packed into one 128-bit word (bytes in the low half).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pair {
    bytes: u64,
    blocks: u64,
}

impl Pair {
    fn from(v: u128) -> Pair {
        Pair {
            bytes: v as u64,
            blocks: (v >> 64) as u64,
        }
    }

    fn value(self) -> u128 {
        self.bytes as u128 | (self.blocks as u128) << 64
    }

    fn add(self, other: Pair) -> Pair {
        Pair {
            bytes: self.bytes.wrapping_add(other.bytes),
            blocks: self.blocks.wrapping_add(other.blocks),
        }
    }

    /// The nearest state that can be real: no count below zero, and at
    /// least one block where there are bytes. (A batched view can be off
    /// by other threads' pending changes, see `Counters::flush`: 1 GiB
    /// counted by one thread while another has yet to apply the 500
    /// allocations a third thread freed.)
    fn as_real(self) -> Pair {
        let p = self.floor_zero();
        Pair {
            bytes: p.bytes,
            blocks: p.blocks.max((p.bytes > 0) as u64),
        }
    }

    /// Each count below zero read as zero.
    fn floor_zero(self) -> Pair {
        Pair {
            bytes: not_below_zero(self.bytes),
            blocks: not_below_zero(self.blocks),
        }
    }
}

/// Fails where 128-bit atomics would not be lock-free: there the fallback
/// is a lock inside this process, which other processes cannot see.
pub(crate) fn check_atomics() -> Result<(), Error> {
    if AtomicU128::is_lock_free() {
        Ok(())
    } else {
        Err(Error::Unsupported(
            "this CPU has no lock-free 128-bit compare-and-swap",
        ))
    }
}

/// Counter changes a thread has made but not yet applied to the segment.
///
/// Applying every change at once would cost several shared atomic RMWs per
/// allocation; a thread applies its changes once it has counted
/// `FLUSH_EVERY` allocations or `FLUSH_EVERY` frees, or `BATCH_BYTES`
/// requested bytes allocated or freed, and whenever it reads the counters
/// (`stats()`, `check()`) or exits. In exact mode it applies every change
/// at once (see `bias`).
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
    /// `total_blocks`), plus `bias`, and the bytes they asked for (of
    /// `total_bytes`).
    allocs: u64,
    alloc_bytes: u64,
    /// Frees and reallocations since the last flush, plus `bias`, and the
    /// bytes their blocks had been asked for: `curr_blocks` changed by
    /// `allocs - frees` and `curr_bytes` by `alloc_bytes - freed_bytes`
    /// (wrapping: below zero when the thread frees more than it allocates).
    frees: u64,
    freed_bytes: u64,
    /// The change of `curr_bytes` at which this thread reaches the highest
    /// value it knows: the segment's `max_bytes` at the last flush, or its
    /// own latest peak since, less `base_bytes` (floored at zero). Signed.
    peak_at: u64,
    /// The change of `curr_blocks` at that local peak, or `NO_PEAK` while
    /// there is none.
    peak_blocks: u64,
    /// The segment's `curr_blocks` / `curr_bytes` as of the last flush,
    /// which the changes are relative to (read at flushes only).
    base_blocks: u64,
    base_bytes: u64,
    /// The lowest changes of `curr_bytes` / `curr_blocks` (signed, at most
    /// 0) after a slow-path free since the last flush. A thread's own
    /// blocks are freed on the fast paths; what the slow paths free may
    /// have been allocated by another thread that has yet to apply it, and
    /// a fall below the base is then that other thread's pending
    /// allocations (see `Counters::flush`).
    dip_bytes: u64,
    dip_blocks: u64,
    /// 0 in batched mode; `FLUSH_EVERY` in exact mode, added to `allocs`
    /// and `frees` at every re-base, so that the fast paths' batch tests
    /// (`alloc_in_batch`, `free_in_batch`) fail and every operation takes
    /// the slow path, which flushes it at once. The fast paths test nothing
    /// more for exact mode.
    bias: u64,
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
            dip_bytes: 0,
            dip_blocks: 0,
            bias: 0,
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

/// Requested bytes a thread allocates, or frees, before it applies its
/// counter changes, checked on the slow paths (every request above the
/// small-block limit takes one). The fast paths count blocks of at most
/// `cache::SMALL_MAX` bytes, at most `FLUSH_EVERY` of them, so a thread's
/// pending bytes stay below `PENDING_BYTES` in each direction.
pub(crate) const BATCH_BYTES: u64 = 4 << 20;

/// The most requested bytes a thread can have allocated, or freed, without
/// applying them: the bound on how far batched counters lag.
pub const PENDING_BYTES: u64 = BATCH_BYTES + FLUSH_EVERY * crate::geometry::SMALL_MAX as u64;

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

    /// `alloc_in_batch` for a medium block of `bytes` requested bytes:
    /// also within the bytes a batch may hold (`BATCH_BYTES`, which the
    /// slow paths' `due` applies), so that medium blocks counted on the
    /// fast paths add nothing to `PENDING_BYTES`.
    #[inline(always)]
    pub(crate) fn alloc_in_batch_bytes(&self, bytes: u64) -> bool {
        self.alloc_in_batch() && self.alloc_bytes + bytes < BATCH_BYTES
    }

    /// The same for a free.
    #[inline(always)]
    pub(crate) fn free_in_batch_bytes(&self, bytes: u64) -> bool {
        self.free_in_batch() && self.freed_bytes + bytes < BATCH_BYTES
    }

    /// Whether the batch is full: after any count that is not in a batch.
    #[inline]
    fn due(&self) -> bool {
        self.allocs >= FLUSH_EVERY - 1
            || self.frees >= FLUSH_EVERY - 1
            || self.alloc_bytes >= BATCH_BYTES
            || self.freed_bytes >= BATCH_BYTES
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
        self.mark_dip();
        self.due()
    }

    /// Keeps the lowest changes reached (`dip_bytes`, `dip_blocks`).
    fn mark_dip(&mut self) {
        self.dip_bytes = (self.dip_bytes as i64).min(self.bytes() as i64) as u64;
        self.dip_blocks = (self.dip_blocks as i64).min(self.blocks() as i64) as u64;
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
        self.mark_dip();
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
    ///
    /// Why batched `max_bytes` stays near dhat's: let `P` bound what a
    /// thread has pending in each direction (`PENDING_BYTES`) and `T` be the
    /// threads with changes pending. dhat's true `curr_bytes` at any instant
    /// is `now` plus every thread's pending change, so `now` is within
    /// `T × P` of it.
    /// - Not lower by more than `T × P`: every value `now` takes is offered
    ///   to `peak`, and at dhat's peak `now` was at most `T × P` below it.
    /// - Not higher by more than `2 × T × P`: a `now` value is at most
    ///   `T × P` above a true state; a thread's local peak is its base (at
    ///   most `(T - 1) × P` above the truth then) plus its own changes,
    ///   which are true, and a changed order of its batch against the
    ///   others adds at most `P`. Raising a base to the thread's dip below
    ///   zero adds at most `P` (the dip is bytes it freed).
    ///
    /// With one thread `now` is the truth and the local peak exact, so the
    /// counters are dhat's. In exact mode nothing is pending (`T × P` = 0).
    #[inline(never)]
    pub(crate) fn flush(&self, d: &mut Delta) {
        let change = Pair {
            bytes: d.bytes(),
            blocks: d.blocks(),
        };
        // The totals first: a reader that sees this flush in `now` or
        // `peak` sees it in the totals too (see `snapshot`).
        let allocs = d.allocs - d.bias;
        if allocs != 0 {
            self.total_blocks.fetch_add(allocs, Relaxed);
            self.total_bytes.fetch_add(d.alloc_bytes, Relaxed);
        }
        let before = self.add_now(change);
        let after = before.add(change);
        if d.peak_blocks != NO_PEAK {
            // In exact mode the one operation's state is `after`: take it
            // from `before`, not from a base that other threads have moved
            // since (that base is what batched mode has: see above).
            let base = if d.bias != 0 {
                before
            } else {
                // A fall of the changes below zero (`dip_*`) freed that
                // much of other threads' pending allocations, which were
                // live then: the base was at least that high.
                Pair {
                    bytes: (d.base_bytes as i64).max(-(d.dip_bytes as i64)) as u64,
                    blocks: (d.base_blocks as i64).max(-(d.dip_blocks as i64)) as u64,
                }
            };
            let local = Pair {
                bytes: d.peak_at,
                blocks: d.peak_blocks,
            };
            self.raise_peak(base.add(local), Tie::Latest);
        }
        self.raise_peak(after, Tie::Keep);
        let bias = if self.exact.load(Relaxed) != 0 {
            FLUSH_EVERY
        } else {
            0
        };
        let max = Pair::from(self.peak.load(Relaxed)).bytes;
        *d = Delta {
            base_blocks: after.blocks,
            base_bytes: after.bytes,
            // Exact mode: every allocation is a candidate, judged against
            // the peak as it is when it is applied.
            peak_at: if bias != 0 {
                i64::MIN as u64
            } else {
                max.wrapping_sub(not_below_zero(after.bytes))
            },
            allocs: bias,
            frees: bias,
            bias,
            ..Delta::default()
        };
    }

    /// Adds `change` to `now`; returns the state before.
    fn add_now(&self, change: Pair) -> Pair {
        if change
            == (Pair {
                bytes: 0,
                blocks: 0,
            })
        {
            return Pair::from(self.now.load(Relaxed));
        }
        let old = self.now.fetch_update(Release, Relaxed, |v| {
            Some(Pair::from(v).add(change).value())
        });
        // `fetch_update` with a closure that always returns `Some` never fails.
        Pair::from(old.unwrap_or_else(|v| v))
    }

    /// Makes `state` the peak if it is higher than the peak (or as high, for
    /// `Tie::Latest`: dhat's `>=`, for a state an allocation reached).
    /// States that cannot be real are made so first (`Pair::as_real`).
    fn raise_peak(&self, state: Pair, tie: Tie) {
        let state = state.as_real();
        let mut cur = self.peak.load(Relaxed);
        loop {
            let peak = Pair::from(cur);
            let higher = state.bytes > peak.bytes
                || (tie == Tie::Latest && state.bytes == peak.bytes && state != peak);
            if !higher {
                return;
            }
            match self
                .peak
                .compare_exchange_weak(cur, state.value(), Release, Relaxed)
            {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Switches the segment to exact counting (or back): every thread that
    /// counts in it applies each change at once from its next flush on.
    pub(crate) fn set_exact(&self, exact: bool) {
        self.exact.store(exact as u64, Relaxed);
    }

    /// Whether the segment counts exactly.
    pub(crate) fn is_exact(&self) -> bool {
        self.exact.load(Relaxed) != 0
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
        let now = Pair::from(self.now.load(Relaxed)).as_real();
        self.peak.store(now.value(), Relaxed);
        self.max_block_bytes
            .store(self.block_bytes.load(Relaxed), Relaxed);
    }

    pub(crate) fn snapshot(&self, capacity: u64, largest_free: u64) -> Stats {
        let block_bytes = self.block_bytes.load(Relaxed);
        // `peak`, then `now`, then the totals, each `Acquire` against the
        // `Release` of the flush that wrote it: whatever flush a value read
        // came from, its totals (added before) are in the totals read.
        let mut peak = Pair::from(self.peak.load(Acquire));
        let now = Pair::from(self.now.load(Acquire)).as_real();
        let total_blocks = self.total_blocks.load(Relaxed);
        let total_bytes = self.total_bytes.load(Relaxed);
        // A flush between its update of `now` and its offer to `peak` (or
        // one after the read of `peak`): the state read is real, and is the
        // peak if it is higher.
        if now.bytes > peak.bytes {
            self.raise_peak(now, Tie::Keep);
            peak = now;
        }
        // A batched view raised to what must have been live (`as_real`, the
        // dips in `flush`) can count blocks whose allocations are still
        // pending; no read says more blocks than were ever made.
        let fit = |blocks: u64| blocks.min(total_blocks);
        Stats {
            total_blocks,
            total_bytes,
            curr_blocks: fit(now.blocks),
            curr_bytes: now.bytes,
            max_blocks: fit(peak.blocks),
            max_bytes: peak.bytes,
            capacity,
            free_bytes: capacity.saturating_sub(block_bytes),
            largest_free,
            block_bytes,
            max_block_bytes: self.max_block_bytes.load(Relaxed),
            page_bytes: self.page_bytes.load(Relaxed),
            cached_bytes: 0,
        }
    }
}

/// How `Counters::raise_peak` treats a state as high as the peak.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tie {
    /// Takes it: an allocation reached it (dhat's `>=`).
    Latest,
    /// Keeps the peak: a state after frees is no new peak.
    Keep,
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
mod tests;
