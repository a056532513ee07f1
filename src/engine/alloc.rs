//! Allocation: finding a free block large enough (good fit over the
//! segregated lists, then the list below, then waiting out memory in
//! flight) and carving the request out of it, with its alignment; and the
//! small-object pages' blocks, aligned as blocks rather than payloads.

use super::mapping::{map_ceil, map_floor};
use super::nodes::{Covered, Top};
use super::ops::{granules_for, out_of_patience, Held};
use super::words::{BlockState, HeaderWord, GRANULE, GRANULE_LOG, HEADER, MIN_BLOCK};
use super::Engine;
use crate::geometry::PAGE_SIZE;
use crate::sync::Ordering::*;
use crate::Error;

/// A successful allocation.
pub(crate) struct Allocated {
    pub pos: u32,
    /// Block size in bytes (header included).
    pub block_bytes: u64,
}

/// What an alignment applies to: the payload (every user request), or the
/// block with its header (a page); the value is the payload's granule
/// offset from the aligned position.
#[derive(Clone, Copy)]
enum Aligned {
    Block = 0,
    Payload = 1,
}

/// The payload of the block of a page of `span` units: the page less the
/// block's header.
pub(crate) const fn page_payload(span: usize) -> usize {
    span * PAGE_SIZE - HEADER
}

impl Engine {
    /// Allocates a block with at least `size` payload bytes whose payload is
    /// aligned to `align` (a power of two). Writes the requested size into the
    /// header.
    pub(crate) fn alloc(&self, size: usize, align: usize) -> Result<Allocated, Error> {
        self.alloc_placed(size, align, Aligned::Payload)
    }

    /// Allocates a page of `span` units: a block of exactly `span *
    /// PAGE_SIZE` bytes, its header included, starting at a multiple of
    /// `PAGE_SIZE`, so that pages lie side by side. (Aligning the payload
    /// instead left a free gap of a page less one header between every two
    /// pages: half the address space, and a third more resident memory, of
    /// small blocks.)
    pub(crate) fn alloc_pages(&self, span: usize) -> Result<Allocated, Error> {
        self.alloc_placed(page_payload(span), PAGE_SIZE, Aligned::Block)
    }

    fn alloc_placed(
        &self,
        size: usize,
        align: usize,
        aligned: Aligned,
    ) -> Result<Allocated, Error> {
        debug_assert!(align.is_power_of_two());
        self.purge_if_due();
        // (`ok_or_else`: an `Error` made and dropped on every allocation
        // costs a call to its destructor.)
        let oom = || Error::OutOfMemory { requested: size };
        let need = granules_for(size).ok_or_else(oom)?;
        let align_g = u32::try_from(align.max(GRANULE) >> GRANULE_LOG).map_err(|_| oom())?;
        // An over-aligned payload may need a front pad of up to two alignments
        // (the pad must itself be empty or a whole block).
        let extra = if align_g > 1 {
            align_g.checked_mul(2)
        } else {
            Some(0)
        };
        let search = extra
            .and_then(|e| need.checked_add(e))
            .filter(|s| (*s as u64) <= self.capacity() >> GRANULE_LOG)
            .ok_or_else(oom)?;
        let held = self.take_block(search).ok_or_else(oom)?;
        let hidden = held.hidden;
        let allocated = self.carve(held, need, (align_g, aligned), size);
        self.unhide(hidden);
        Ok(allocated)
    }

    /// Finds and claims a free block of at least `search` granules. The
    /// caller holds its node until it is done with the block.
    ///
    /// When no list has one, the memory may still be there, claimed for a
    /// moment by an operation that will publish it again (a split or a
    /// merge). So while `hidden` could hold the request, the scan is repeated
    /// as long as blocks keep being published, and gives up after
    /// `OOM_PATIENCE` without any publication.
    fn take_block(&self, search: u32) -> Option<Held> {
        let ctrl = self.control();
        let ceil = map_ceil(search);
        let mut stalled_since: Option<std::time::Instant> = None;
        loop {
            let epoch = ctrl.epoch.load(SeqCst);
            let Some((fl, sl)) = ceil.and_then(|(fl, sl)| self.find_list(fl, sl)) else {
                // Good fit found nothing; the class below the rounded-up one
                // may still hold a block that is large enough.
                if let Some(h) = self.take_from_floor_list(search) {
                    return Some(h);
                }
                // The bitmaps are hints that another thread may be clearing
                // and re-setting right now: look at the lists themselves.
                if ceil.is_some_and(|(fl, sl)| self.repair_bits_from(fl, sl)) {
                    continue;
                }
                // Nothing listed. Memory may still be in flight: in a pop
                // (`popping`), claimed (`hidden`), or published while we
                // scanned (`epoch`). Only live processes count: what a dead
                // one held will not come back by waiting. Read in this order: a holder un-hides
                // after its pop ended and after its publication bumped
                // `epoch`, so seeing the un-hide means seeing those too.
                let (popping, hidden) = self.in_flight_of_live();
                let published = ctrl.epoch.load(SeqCst) != epoch;
                if published {
                    stalled_since = None;
                    continue;
                }
                if popping == 0 && hidden < search as u64 {
                    return None;
                }
                if out_of_patience(&mut stalled_since) {
                    return None;
                }
                std::thread::yield_now();
                continue;
            };
            // A top that is not `Live` is popped before it is looked at:
            // if it turns `Live` in between, the block is neither listed
            // nor hidden until `take_popped` claims it, which `popping`
            // covers.
            self.my_slot().popping.fetch_add(1, SeqCst);
            let top = self.take_top(&ctrl.heads[fl][sl]);
            self.my_slot().popping.fetch_sub(1, SeqCst);
            let (hint, pos, hidden) = match top {
                Top::Taken(hint, pos, hidden) => (hint, pos, hidden),
                Top::Empty => {
                    self.clear_bits_if_empty(fl, sl);
                    continue;
                }
                Top::Other => continue,
            };
            let Some(held) = self.checked(hint, pos, hidden, None) else {
                continue;
            };
            if held.size < search {
                // Filed under a larger class than its size (cannot happen
                // with map_floor filing); put it back and go on.
                self.put_back(held);
                continue;
            }
            return Some(held);
        }
    }

    /// Looks through (up to 64 entries of) the list that blocks of exactly
    /// `search` granules are filed under, for one that is large enough, and
    /// claims it in place. Its node stays listed (and is retired `Dead` when
    /// the caller is done).
    fn take_from_floor_list(&self, search: u32) -> Option<Held> {
        let (fl, sl) = map_floor(search);
        let mut n = self.list_top(fl, sl);
        for _ in 0..64 {
            let (hint, pos, next) = self.peek_node(n)?;
            if self.live_block_size(pos).is_some_and(|s| s >= search) {
                if let Some(h) = self.take(hint, Some(pos)) {
                    if h.size >= search {
                        return Some(h);
                    }
                    self.put_back(h);
                }
            }
            n = next;
        }
        None
    }

    /// Cuts the claimed free block `held` into an optional front pad, the
    /// user block, and an optional tail; publishes pad and tail.
    ///
    /// Crash safety (see `recover`): the pieces are prepared inside the
    /// block while its header still says it is one free block held by us,
    /// so a recovery before the commit gives the whole block back and
    /// retires the pieces' nodes as covered by it. The commit is the store
    /// that shrinks the block's header to its first piece.
    fn carve(&self, held: Held, need: u32, align: (u32, Aligned), requested: usize) -> Allocated {
        let (align_g, aligned) = align;
        let Held {
            hint,
            pos,
            size: bsize,
            ..
        } = held;
        let end = pos + bsize;
        let mut start = pos;
        if align_g > 1 {
            // The payload (`start + 1`), or the block itself, must start at
            // a multiple of align_g.
            let phase = aligned as u32;
            start = (pos + phase).next_multiple_of(align_g) - phase;
            if start > pos && start - pos < MIN_BLOCK {
                start += align_g;
            }
        }
        let tail = start + need;
        let split_tail = end - tail >= MIN_BLOCK;
        let size = if split_tail { need } else { end - start };
        let tail_node = if split_tail {
            self.prepare(tail, end - tail, None)
        } else {
            None
        };
        let pad_node = if start > pos {
            self.header(start)[1].store(requested as u64, SeqCst);
            self.header(start)[0].store(
                HeaderWord::new(start, size, BlockState::Used).value(),
                SeqCst,
            );
            // Takes the block's header over (word 1 first: from then on the
            // pad's node stands for the whole block), and its last store,
            // the pad's size, is the commit.
            self.prepare(pos, start - pos, None)
        } else {
            // The commit: the block's header becomes the user block's.
            self.header(pos)[0].store(HeaderWord::new(pos, size, BlockState::Used).value(), SeqCst);
            self.header(pos)[1].store(requested as u64, SeqCst);
            None
        };
        self.retire(hint);
        if let Some(t) = tail_node {
            self.go_live(t, end - tail, Covered::Yes);
            self.settle(tail);
        }
        if let Some(p) = pad_node {
            self.go_live(p, start - pos, Covered::Yes);
            self.settle(pos);
        }
        Allocated {
            pos: start,
            block_bytes: (size as u64) << GRANULE_LOG,
        }
    }
}
