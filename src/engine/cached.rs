//! The engine's half of the block caches (`cache::bins`): blocks that a
//! user freed and a thread keeps whole for its next allocations.
//!
//! A block moves `Used -> Cached` when its user frees it into a cache (a
//! CAS on header word 0: of two racing frees exactly one wins, the other
//! gets `DoubleFree`); `Cached -> Used` when the cache hands it out again
//! (stores by the cache's owner, which alone holds it then); and `Cached ->
//! Freeing` when the cache gives it back to the heap (a CAS, then the free
//! path). While cached, header word 1 holds the cache's tag instead of the
//! requested size, so that the owner, and whoever reclaims a dead owner's
//! cache, tells the cache's blocks from anything else a damaged link could
//! lead to. A cached block is not free: no neighbour merges with it.
//!
//! Orderings: the CAS into `Cached` is `AcqRel` and the store back to
//! `Used` is `Release`, so a `check()` or reclaimer that reads the state
//! with `Acquire` reads the word 1 that goes with it. The handing over of
//! blocks between users is ordered by the users, as for any allocator.

use super::words::{BlockState, HeaderWord, GRANULE_LOG, HEADER, MIN_BLOCK};
use super::Engine;
use crate::sync::Ordering::*;
use crate::Error;

impl Engine {
    /// Moves the `Used` block at `pos`, whose header `used_block` returned
    /// as `h`, into a cache with tag `tag`. Returns its requested size.
    #[inline(always)]
    pub(crate) fn cache_block(&self, pos: u32, h: HeaderWord, tag: u64) -> Result<u64, Error> {
        let cached = HeaderWord {
            state: BlockState::Cached as u8,
            ..h
        };
        if self.header(pos)[0]
            .compare_exchange(h.value(), cached.value(), AcqRel, Relaxed)
            .is_err()
        {
            return Err(self.used_block(pos).err().unwrap_or(Error::DoubleFree));
        }
        let requested = self.header(pos)[1].load(Relaxed);
        self.header(pos)[1].store(tag, Relaxed);
        Ok(requested)
    }

    /// Hands the block at `pos`, `Cached` by the caller (`cached_block`
    /// said so), out again for `requested` bytes.
    #[inline(always)]
    pub(crate) fn uncache_block(&self, pos: u32, size: u32, requested: u64) {
        self.header(pos)[1].store(requested, Relaxed);
        self.header(pos)[0].store(
            HeaderWord::new(pos, size, BlockState::Used).value(),
            Release,
        );
    }

    /// The size (granules) of the block at `pos`, if `pos` is in the heap
    /// and a block `Cached` under `tag` starts there; checked without
    /// trusting `pos`.
    #[inline(always)]
    pub(crate) fn cached_block(&self, pos: u32, tag: u64) -> Option<u32> {
        if pos < self.heap_start || pos >= self.heap_end {
            return None;
        }
        let h = HeaderWord::from(self.header(pos)[0].load(Acquire));
        let fits = h.size >= MIN_BLOCK && pos as u64 + h.size as u64 <= self.heap_end as u64;
        (h.is(pos, BlockState::Cached) && fits && self.header(pos)[1].load(Relaxed) == tag)
            .then_some(h.size)
    }

    /// Gives the block at `pos`, `Cached` under `tag` and held by the
    /// caller, back to the heap. Returns its block bytes; `None` (nothing
    /// changed) if no such block is there.
    pub(crate) fn free_cached(&self, pos: u32, tag: u64) -> Option<u64> {
        let size = self.cached_block(pos, tag)?;
        let h = HeaderWord::new(pos, size, BlockState::Cached);
        let freeing = HeaderWord {
            state: BlockState::Freeing as u8,
            ..h
        };
        self.header(pos)[0]
            .compare_exchange(h.value(), freeing.value(), SeqCst, SeqCst)
            .ok()?;
        let bytes = self.free_claimed(pos, h);
        self.purge_if_due();
        Some(bytes)
    }

    /// Records `requested` as the requested size of the `Used` block at
    /// `pos`, which the caller holds (an allocation rounded up to a cache
    /// class asked the engine for more than the user did).
    pub(crate) fn set_requested(&self, pos: u32, requested: u64) {
        self.header(pos)[1].store(requested, Relaxed);
    }
}

/// Payload bytes of a block of `size` granules.
pub(crate) fn payload_bytes(size: u32) -> usize {
    ((size as usize) << GRANULE_LOG) - HEADER
}
