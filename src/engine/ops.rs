//! Allocation, freeing, coalescing and in-place resizing.
//!
//! # Coalescing without waiting
//! Freeing a block first absorbs the free neighbours it can claim, then
//! publishes the result and *settles* it: it tries again to merge the block
//! with its right and its left neighbour, claiming the left block of a pair
//! first, then the right one. A pair whose claim fails is not retried by this
//! thread: a `Busy` claim has set `recheck` on the holder's node, so the holder
//! settles that block when it lets go of it; a block that is `Freeing` will
//! be settled by its freer after it publishes.
//!
//! Why no merge is lost: take two adjacent free blocks L and R that are both
//! published and unmerged when all threads are done. Each was last published
//! (header word 0 stored `SeqCst`) and then settled, reading the neighbour's
//! header or footer `SeqCst`. Of the two publish-then-read sequences, one
//! reads the other's publication (store-buffer argument), so some settle saw
//! both free and tried the pair. That attempt can only have failed on a
//! `Claimed` node, whose holder then re-settles, or on a node that changed,
//! which means the block was republished and settled again later.

use super::mapping::{map_ceil, map_floor};
use super::nodes::Claim;
use super::words::{BlockState, HeaderWord, Hint, GRANULE, GRANULE_LOG, HEADER, MIN_BLOCK};
use super::Engine;
use crate::sync::Ordering::*;
use crate::Error;

/// How often an allocation that found no block re-scans while other
/// operations are in progress (they may be holding the memory it needs for a
/// moment). Bounded, so that a process killed mid-operation cannot make
/// allocations spin forever.
const OOM_RESCANS: u32 = 256;

/// Outcome of trying to merge a pair of neighbours.
enum Pair {
    Merged(u32),
    /// The left block could not be claimed: someone else is responsible.
    LeftUnavailable,
    /// The left block was claimed but its right neighbour could not be; the
    /// left block was released. `again`: it needs settling again.
    RightUnavailable { left: u32, again: bool },
}

/// A successful allocation.
pub(crate) struct Allocated {
    pub pos: u32,
    /// Block size in bytes (header included).
    pub block_bytes: u64,
}

/// The size in granules of a block that holds `size` payload bytes.
fn granules_for(size: usize) -> Option<u32> {
    let bytes = size.checked_add(HEADER)?.checked_add(GRANULE - 1)?;
    let g = u32::try_from(bytes >> GRANULE_LOG).ok()?;
    Some(g.max(MIN_BLOCK))
}

impl Engine {
    /// RAII marker of an operation in progress (see `OOM_RESCANS`).
    fn enter(&self) -> Busy<'_> {
        self.control().busy.fetch_add(1, SeqCst);
        Busy(self)
    }

    // ---- allocation --------------------------------------------------------------

    /// Allocates a block with at least `size` payload bytes whose payload is
    /// aligned to `align` (a power of two). Writes the requested size into the
    /// header.
    pub(crate) fn alloc(&self, size: usize, align: usize) -> Result<Allocated, Error> {
        debug_assert!(align.is_power_of_two());
        let need = granules_for(size).ok_or(Error::OutOfMemory { requested: size })?;
        let oom = Error::OutOfMemory { requested: size };
        let align_g = u32::try_from(align.max(GRANULE) >> GRANULE_LOG).map_err(|_| oom)?;
        // An over-aligned payload may need a front pad of up to two alignments
        // (the pad must itself be empty or a whole block).
        let extra = if align_g > 1 { align_g.checked_mul(2) } else { Some(0) };
        let search = extra
            .and_then(|e| need.checked_add(e))
            .filter(|s| (*s as u64) <= self.capacity() >> GRANULE_LOG)
            .ok_or(Error::OutOfMemory { requested: size })?;
        let _busy = self.enter();
        let (pos, bsize) = self.take_block(search).ok_or(Error::OutOfMemory { requested: size })?;
        Ok(self.carve(pos, bsize, need, align_g, size))
    }

    /// Finds, claims and unlists a free block of at least `search` granules.
    fn take_block(&self, search: u32) -> Option<(u32, u32)> {
        let ceil = map_ceil(search);
        let mut rescans = 0;
        loop {
            let Some((fl, sl)) = ceil.and_then(|(fl, sl)| self.find_list(fl, sl)) else {
                // Good fit found nothing; the class below the rounded-up one
                // may still hold a block that is large enough.
                if let Some(found) = self.take_from_floor_list(search) {
                    return Some(found);
                }
                // Nothing visible. Other operations may hold memory for a
                // moment (a block being split or merged): look again, boundedly.
                if rescans < OOM_RESCANS && self.control().busy.load(SeqCst) > 1 {
                    rescans += 1;
                    std::thread::yield_now();
                    continue;
                }
                return None;
            };
            let Some(n) = self.pop(&self.control().heads[fl][sl]) else {
                self.clear_bits_if_empty(fl, sl);
                continue;
            };
            let Some(pos) = self.take_popped(n) else { continue };
            let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
            if !h.is(pos, BlockState::Free) || pos as u64 + h.size as u64 > self.heap_end as u64 {
                // Corrupt entry (cannot happen under the protocol): drop it
                // rather than hand out memory we cannot vouch for.
                continue;
            }
            if h.size < search {
                // Filed under a larger class than its size (cannot happen
                // with map_floor filing); put it back and go on.
                self.publish(pos, h.size);
                continue;
            }
            return Some((pos, h.size));
        }
    }

    /// Looks through (up to 64 entries of) the list that blocks of exactly
    /// `search` granules are filed under, for one that is large enough, and
    /// claims it in place. Its node stays listed and is retired `Dead`.
    fn take_from_floor_list(&self, search: u32) -> Option<(u32, u32)> {
        let (fl, sl) = map_floor(search);
        let mut n = self.list_top(fl, sl);
        for _ in 0..64 {
            let (hint, pos, next) = self.peek_node(n)?;
            if self.live_block_size(pos).is_some_and(|s| s >= search) {
                if let Claim::Got(got) = self.claim(hint) {
                    match self.claimed_size(hint, got) {
                        Some(size) if size >= search => {
                            self.retire(hint);
                            return Some((got, size));
                        }
                        Some(size) => {
                            if self.release(hint, got, size) {
                                self.settle(got);
                            }
                        }
                        None => {
                            self.retire(hint);
                        }
                    }
                }
            }
            n = next;
        }
        None
    }

    /// Cuts the owned free block `[pos, pos + bsize)` into an optional front
    /// pad, the user block, and an optional tail; publishes pad and tail.
    fn carve(&self, pos: u32, bsize: u32, need: u32, align_g: u32, requested: usize) -> Allocated {
        let end = pos + bsize;
        let mut start = pos;
        if align_g > 1 {
            // Payload (start + 1) must be a multiple of align_g.
            start = (pos + 1).next_multiple_of(align_g) - 1;
            if start > pos && start - pos < MIN_BLOCK {
                start += align_g;
            }
        }
        let tail = start + need;
        let split_tail = end - tail >= MIN_BLOCK;
        let size = if split_tail { need } else { end - start };
        // Headers of later pieces first: until `pos`'s header is rewritten,
        // a heap walk still sees one block over the whole range.
        if split_tail {
            self.header(tail)[0].store(HeaderWord::new(tail, end - tail, BlockState::Freeing).value(), SeqCst);
        }
        self.header(start)[1].store(requested as u64, SeqCst);
        self.header(start)[0].store(HeaderWord::new(start, size, BlockState::Used).value(), SeqCst);
        if start > pos {
            self.header(pos)[0].store(HeaderWord::new(pos, start - pos, BlockState::Freeing).value(), SeqCst);
        }
        if split_tail {
            self.publish(tail, end - tail);
            self.settle(tail);
        }
        if start > pos {
            self.publish(pos, start - pos);
            self.settle(pos);
        }
        Allocated { pos: start, block_bytes: (size as u64) << GRANULE_LOG }
    }

    // ---- freeing -----------------------------------------------------------------

    /// Validates that `pos` is a `Used` block and returns its header.
    pub(crate) fn used_block(&self, pos: u32) -> Result<HeaderWord, Error> {
        let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
        if h.check != super::words::position_check(pos) {
            return Err(Error::InvalidPointer);
        }
        match h.state {
            s if s == BlockState::Used as u8 => {}
            s if s == BlockState::Free as u8 || s == BlockState::Freeing as u8 || s == BlockState::Absorbed as u8 => {
                return Err(Error::DoubleFree)
            }
            _ => return Err(Error::InvalidPointer),
        }
        if h.size < MIN_BLOCK || pos as u64 + h.size as u64 > self.heap_end as u64 {
            return Err(Error::InvalidPointer);
        }
        Ok(h)
    }

    /// The requested size recorded for the `Used` block at `pos`.
    pub(crate) fn requested(&self, pos: u32) -> u64 {
        self.header(pos)[1].load(SeqCst)
    }

    /// Frees the `Used` block at `pos`. Returns (requested size, block bytes).
    pub(crate) fn free(&self, pos: u32) -> Result<(u64, u64), Error> {
        let h = self.used_block(pos)?;
        let freeing = HeaderWord { state: BlockState::Freeing as u8, ..h };
        // The CAS makes exactly one of two racing frees win.
        if self.header(pos)[0].compare_exchange(h.value(), freeing.value(), SeqCst, SeqCst).is_err() {
            return Err(self.used_block(pos).err().unwrap_or(Error::DoubleFree));
        }
        let requested = self.requested(pos);
        let _busy = self.enter();
        let (mut pos, mut size) = (pos, h.size);
        // Absorb free right neighbours.
        while let Some(grown) = self.absorb_right(pos, size, BlockState::Freeing) {
            size = grown;
        }
        // Let free left neighbours absorb us.
        let mut resettle = None;
        while pos > self.heap_start {
            let hint = self.hint_below(pos);
            let Claim::Got(left) = self.claim(hint) else { break };
            match self.claimed_size(hint, left) {
                Some(lsize) if left + lsize == pos => {
                    self.header(left)[0].store(HeaderWord::new(left, lsize + size, BlockState::Freeing).value(), SeqCst);
                    self.header(pos)[0].store(HeaderWord::new(pos, 0, BlockState::Absorbed).value(), SeqCst);
                    self.retire(hint);
                    (pos, size) = (left, lsize + size);
                }
                Some(lsize) => {
                    // A stale footer led to a block that is not our neighbour.
                    if self.release(hint, left, lsize) {
                        resettle = Some(left);
                    }
                    break;
                }
                None => {
                    self.retire(hint);
                    break;
                }
            }
        }
        self.publish(pos, size);
        self.settle(pos);
        if let Some(left) = resettle {
            self.settle(left);
        }
        Ok((requested, (h.size as u64) << GRANULE_LOG))
    }

    /// Claims the free right neighbour of the owned block `[pos, pos + size)`
    /// and absorbs it; the block keeps `state`. Returns the new size.
    fn absorb_right(&self, pos: u32, size: u32, state: BlockState) -> Option<u32> {
        let right = pos + size;
        if right >= self.heap_end || !HeaderWord::from(self.header(right)[0].load(SeqCst)).is(right, BlockState::Free) {
            return None;
        }
        let hint = self.hint_at(right);
        let Claim::Got(got) = self.claim(hint) else { return None };
        match self.claimed_size(hint, got) {
            Some(rsize) if got == right => {
                self.header(pos)[0].store(HeaderWord::new(pos, size + rsize, state).value(), SeqCst);
                self.header(right)[0].store(HeaderWord::new(right, 0, BlockState::Absorbed).value(), SeqCst);
                // A re-check request is served: the merged block is settled
                // by our caller.
                self.retire(hint);
                Some(size + rsize)
            }
            Some(rsize) => {
                if self.release(hint, got, rsize) {
                    self.settle(got);
                }
                None
            }
            None => {
                self.retire(hint);
                None
            }
        }
    }

    // ---- settling ------------------------------------------------------------------

    /// Merges the published block at `pos` with its free neighbours until no
    /// merge is possible or another thread has taken over (see module docs).
    pub(super) fn settle(&self, mut pos: u32) {
        loop {
            match self.merge_pair(self.hint_at(pos)) {
                Pair::Merged(p) => {
                    pos = p;
                    continue;
                }
                Pair::LeftUnavailable => return,
                Pair::RightUnavailable { again: true, .. } => continue,
                Pair::RightUnavailable { again: false, .. } => {}
            }
            if pos <= self.heap_start {
                return;
            }
            match self.merge_pair(self.hint_below(pos)) {
                Pair::Merged(p) => pos = p,
                Pair::RightUnavailable { left, again: true } => pos = left,
                _ => return,
            }
        }
    }

    /// Claims the block `left_hint` names, then its right neighbour, and
    /// merges them into one published block.
    fn merge_pair(&self, left_hint: Hint) -> Pair {
        let Claim::Got(left) = self.claim(left_hint) else { return Pair::LeftUnavailable };
        let Some(lsize) = self.claimed_size(left_hint, left) else {
            self.retire(left_hint);
            return Pair::LeftUnavailable;
        };
        let right = left + lsize;
        let give_back = |this: &Self| Pair::RightUnavailable { left, again: this.release(left_hint, left, lsize) };
        if right >= self.heap_end || !HeaderWord::from(self.header(right)[0].load(SeqCst)).is(right, BlockState::Free) {
            return give_back(self);
        }
        let right_hint = self.hint_at(right);
        let Claim::Got(got) = self.claim(right_hint) else { return give_back(self) };
        let rsize = match self.claimed_size(right_hint, got) {
            Some(rsize) if got == right => rsize,
            Some(rsize) => {
                if self.release(right_hint, got, rsize) {
                    self.settle(got);
                }
                return give_back(self);
            }
            None => {
                self.retire(right_hint);
                return give_back(self);
            }
        };
        self.header(left)[0].store(HeaderWord::new(left, lsize + rsize, BlockState::Freeing).value(), SeqCst);
        self.header(right)[0].store(HeaderWord::new(right, 0, BlockState::Absorbed).value(), SeqCst);
        self.retire(left_hint);
        self.retire(right_hint);
        self.publish(left, lsize + rsize);
        Pair::Merged(left)
    }

    // ---- resizing in place ---------------------------------------------------------

    /// Grows the `Used` block at `pos` in place to hold `new_size` payload
    /// bytes by absorbing free right neighbours. Returns the new block bytes,
    /// or `None` if the neighbours do not suffice (the block may then have
    /// grown anyway; it stays valid).
    pub(crate) fn grow_in_place(&self, pos: u32, new_size: usize) -> Option<u64> {
        let need = granules_for(new_size)?;
        let h = self.used_block(pos).ok()?;
        let _busy = self.enter();
        let mut size = h.size;
        while size < need {
            size = self.absorb_right(pos, size, BlockState::Used)?;
        }
        self.header(pos)[1].store(new_size as u64, SeqCst);
        Some(self.trim(pos, size, need))
    }

    /// Shrinks the `Used` block at `pos` to `new_size` payload bytes, giving
    /// the tail back when it is big enough to be a block. Returns the new
    /// block bytes.
    pub(crate) fn shrink_in_place(&self, pos: u32, new_size: usize) -> Option<u64> {
        let need = granules_for(new_size)?;
        let h = self.used_block(pos).ok()?;
        let _busy = self.enter();
        self.header(pos)[1].store(new_size as u64, SeqCst);
        Some(self.trim(pos, h.size, need.min(h.size)))
    }

    /// Cuts the owned `Used` block `[pos, pos + size)` down to `need`
    /// granules if the rest can be a block of its own.
    fn trim(&self, pos: u32, size: u32, need: u32) -> u64 {
        if size - need < MIN_BLOCK {
            return (size as u64) << GRANULE_LOG;
        }
        let tail = pos + need;
        self.header(tail)[0].store(HeaderWord::new(tail, size - need, BlockState::Freeing).value(), SeqCst);
        self.header(pos)[0].store(HeaderWord::new(pos, need, BlockState::Used).value(), SeqCst);
        self.publish(tail, size - need);
        self.settle(tail);
        (need as u64) << GRANULE_LOG
    }

    /// Payload capacity of the `Used` block at `pos`.
    pub(crate) fn usable(&self, pos: u32) -> usize {
        let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
        ((h.size as usize) << GRANULE_LOG) - HEADER
    }
}

struct Busy<'a>(&'a Engine);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.control().busy.fetch_sub(1, SeqCst);
    }
}
