//! Resizing engine blocks in place: growing over a free right neighbour,
//! and giving back the tail of a shrunk block.

use super::nodes::Covered;
use super::ops::{granules_for, Held};
use super::words::{BlockState, HeaderWord, Hint, GRANULE_LOG, HEADER, MIN_BLOCK};
use super::Engine;
use crate::sync::Ordering::*;

impl Engine {
    /// Grows the `Used` block at `pos` in place to hold `new_size` payload
    /// bytes by absorbing free right neighbours. Returns the new block bytes,
    /// or `None` (block unchanged) if the neighbours do not suffice.
    pub(crate) fn grow_in_place(&self, pos: u32, new_size: usize) -> Option<u64> {
        let need = granules_for(new_size)?;
        let original = self.used_block(pos).ok()?.size;
        let (mut size, mut hidden) = (original, 0);
        // What was absorbed stays counted as hidden until `trim` has
        // published the part the block does not keep: un-hidden before, it
        // would be neither listed nor hidden for a moment, and an
        // allocation that looked then would report out-of-memory.
        let bytes = loop {
            if size >= need {
                self.header(pos)[1].store(new_size as u64, SeqCst);
                break Some(self.trim(pos, size, need));
            }
            let Some(r) = self.grow_over_right(pos, size) else {
                // Not enough room: give back what was absorbed, so that a
                // failed grow leaves the block as it was.
                self.trim(pos, size, original);
                break None;
            };
            size += r.size;
            hidden += r.hidden;
        };
        self.unhide(hidden);
        bytes
    }

    /// Claims the free right neighbour of the `Used` block `[pos, pos +
    /// size)` and grows the block over it. The neighbour is marked
    /// `BESIDE_USED` first, so that a recovery decides by the `Used` block's
    /// header whether the growth (the commit) happened.
    fn grow_over_right(&self, pos: u32, size: u32) -> Option<Held> {
        let right = self.claim_right(pos, size)?;
        self.header(right.pos)[1].store(Hint::beside_used(pos).value(), SeqCst);
        self.header(pos)[0].store(
            HeaderWord::new(pos, size + right.size, BlockState::Used).value(),
            SeqCst,
        );
        self.absorbed(&right);
        Some(right)
    }

    /// Shrinks the `Used` block at `pos` to `new_size` payload bytes, giving
    /// the tail back when it is big enough to be a block. Returns the new
    /// block bytes.
    pub(crate) fn shrink_in_place(&self, pos: u32, new_size: usize) -> Option<u64> {
        let need = granules_for(new_size)?;
        let h = self.used_block(pos).ok()?;
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
        // The tail is prepared inside the block, marked as beside it; the
        // cut is the commit (see `BESIDE_USED`), after which the tail's
        // header names its node.
        let node = self.prepare(tail, size - need, Some(Hint::beside_used(pos)));
        self.header(pos)[0].store(HeaderWord::new(pos, need, BlockState::Used).value(), SeqCst);
        if let Some(t) = node {
            self.header(tail)[1].store(t.value(), SeqCst);
            self.go_live(t, size - need, Covered::No);
        }
        self.settle(tail);
        (need as u64) << GRANULE_LOG
    }

    /// Payload capacity of the `Used` block at `pos`.
    pub(crate) fn usable(&self, pos: u32) -> usize {
        let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
        ((h.size as usize) << GRANULE_LOG) - HEADER
    }
}
