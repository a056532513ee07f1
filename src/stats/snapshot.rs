//! `Stats`: the snapshot of a segment's counters that users read.

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
    /// Payload bytes of freed blocks above 1 KiB that the per-thread block
    /// caches keep for reuse (part of `block_bytes`).
    pub cached_bytes: u64,
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
    ///
    /// ```
    /// # fn main() -> Result<(), matrix_alloc::Error> {
    /// use matrix_alloc::Matrix;
    /// use std::alloc::Layout;
    /// let m = Matrix::anonymous(1 << 20)?.exact_counts();
    /// let base = m.reset_peak();
    /// let p = m.alloc(Layout::new::<[u8; 300]>())?;
    /// // SAFETY: freed once.
    /// unsafe { m.free(p)? };
    /// let window = m.stats().since(&base);
    /// assert_eq!((window.total_blocks, window.total_bytes, window.max_bytes), (1, 300, 300));
    /// # Ok(())
    /// # }
    /// ```
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
