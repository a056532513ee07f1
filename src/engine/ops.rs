//! Claiming, freeing and coalescing (allocation: `alloc`; in-place
//! resizing: `resize`).
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
//! A freed block is `Freeing` only until its freer has bound a node to it
//! (it then reads `Free`, held); merges, splits and resizes move the heap
//! from one recoverable state to the next with one store each, their
//! *commit*, so that a process killed anywhere in them loses no free memory
//! (see `recover`).
//!
//! Why no merge is lost: take two adjacent free blocks L and R that are both
//! published and unmerged when all threads are done. Each was last published
//! (its node's `Live` CAS, `SeqCst`, after its header and footer) and then
//! settled, reading the neighbour's
//! header or footer `SeqCst`. Of the two publish-then-read sequences, one
//! reads the other's publication (store-buffer argument), so some settle saw
//! both free and tried the pair. That attempt can only have failed on a
//! `Claimed` node, whose holder then re-settles, or on a node that changed,
//! which means the block was republished and settled again later.

use super::nodes::{Claim, Covered};
use super::words::{BlockState, HeaderWord, Hint, GRANULE, GRANULE_LOG, HEADER, MIN_BLOCK};
use super::Engine;
use crate::sync::Ordering::*;
use crate::Error;

/// How long an allocation that found nothing keeps rescanning while
/// claimed (momentarily invisible) blocks could still hold its request and
/// no block is published anywhere. A holder preempted in its claim window
/// publishes once it runs again; a holder that was killed never does, so
/// the wait is bounded (and this path only runs when the heap looks full:
/// the clock is never read on the fast path). Generous, because a young
/// segment is one large free block that every engine allocation claims in
/// turn. (A `GlobalAlloc` test once failed a 32 KiB allocation in a 16 GiB
/// segment, which led to raising this from 200 ms; the likelier cause was
/// found later: `grow_in_place` un-hid what it absorbed before publishing
/// the excess, which made the memory briefly neither listed nor hidden and
/// failed the allocation at once, without waiting.)
const OOM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a wait for memory (or nodes) in flight that began at `since`
/// (now, if it had not begun) has gone on longer than `OOM_PATIENCE`.
pub(super) fn out_of_patience(since: &mut Option<std::time::Instant>) -> bool {
    since.get_or_insert_with(std::time::Instant::now).elapsed() > OOM_PATIENCE
}

/// Outcome of trying to merge a pair of neighbours.
enum Pair {
    Merged(u32),
    /// The left block could not be claimed: someone else is responsible.
    LeftUnavailable,
    /// The left block was claimed but its right neighbour could not be; the
    /// left block was released. `again`: it needs settling again.
    RightUnavailable {
        left: u32,
        again: bool,
    },
}

/// A free block the calling thread has claimed.
pub(super) struct Held {
    pub(super) hint: Hint,
    pub(super) pos: u32,
    pub(super) size: u32,
    /// Granules this claim added to `hidden`; to be un-hidden once the
    /// memory is visible again or consumed.
    pub(super) hidden: u32,
}

/// The size in granules of a block that holds `size` payload bytes.
pub(super) fn granules_for(size: usize) -> Option<u32> {
    let bytes = size.checked_add(HEADER)?.checked_add(GRANULE - 1)?;
    let g = u32::try_from(bytes >> GRANULE_LOG).ok()?;
    Some(g.max(MIN_BLOCK))
}

impl Engine {
    // ---- claiming ------------------------------------------------------------------

    /// Claims the block `hint` names and checks its header; with `at`, it
    /// must be the block at that position. Anything else is given back.
    pub(super) fn take(&self, hint: Hint, at: Option<u32>) -> Option<Held> {
        let Claim::Got(pos, hidden) = self.claim(hint) else {
            return None;
        };
        self.checked(hint, pos, hidden, at)
    }

    /// After `hint` was claimed with the block at `pos` (`hidden` granules
    /// hidden): the held block if its header matches (and, with `at`, it is
    /// the block at that position). A block elsewhere is given back; a
    /// header that does not match (corruption, which the protocol never
    /// produces) drops the block rather than hand out memory we cannot
    /// vouch for.
    pub(super) fn checked(
        &self,
        hint: Hint,
        pos: u32,
        hidden: u32,
        at: Option<u32>,
    ) -> Option<Held> {
        match self.claimed_size(hint, pos) {
            Some(size) if at.is_none_or(|a| a == pos) => Some(Held {
                hint,
                pos,
                size,
                hidden,
            }),
            Some(size) => {
                self.put_back(Held {
                    hint,
                    pos,
                    size,
                    hidden,
                });
                None
            }
            None => {
                self.retire(hint);
                self.unhide(hidden);
                None
            }
        }
    }

    /// Runs `f` counted as a pop in flight (`popping`), so that an
    /// allocation that finds nothing meanwhile waits for what `f` holds
    /// instead of failing, and ends it as a publication does: then `epoch`,
    /// then the count, so that an allocation that sees the count drop also
    /// sees the publications (see `take_block`). For the sweep and the
    /// recovery, which hold blocks over many steps.
    pub(super) fn as_pop_in_flight<R>(&self, f: impl FnOnce() -> R) -> R {
        self.my_slot().popping.fetch_add(1, SeqCst);
        let r = f();
        self.control().epoch.fetch_add(1, SeqCst);
        self.my_slot().popping.fetch_sub(1, SeqCst);
        r
    }

    /// Gives a claimed block back unchanged; whether it needs settling again.
    fn give_back(&self, h: Held) -> bool {
        self.release(h.hint, h.pos, h.size, h.hidden)
    }

    /// Gives a claimed block back unchanged, and settles it when a claim
    /// failed on it meanwhile (`give_back`).
    pub(super) fn put_back(&self, h: Held) {
        let pos = h.pos;
        if self.give_back(h) {
            self.settle(pos);
        }
    }

    // ---- freeing -----------------------------------------------------------------

    /// Validates that `pos` is a `Used` block and returns its header;
    /// `pos` itself is checked too (it may come from a damaged word).
    #[inline(always)]
    pub(crate) fn used_block(&self, pos: u32) -> Result<HeaderWord, Error> {
        if pos < self.heap_start || pos >= self.heap_end {
            return Err(Error::InvalidPointer);
        }
        let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
        if h.check != super::words::position_check(pos) {
            return Err(Error::InvalidPointer);
        }
        match h.state {
            s if s == BlockState::Used as u8 => {}
            s if s == BlockState::Free as u8
                || s == BlockState::Freeing as u8
                || s == BlockState::Absorbed as u8
                || s == BlockState::Cached as u8 =>
            {
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
        let freeing = HeaderWord {
            state: BlockState::Freeing as u8,
            ..h
        };
        // The CAS makes exactly one of two racing frees win.
        if self.header(pos)[0]
            .compare_exchange(h.value(), freeing.value(), SeqCst, SeqCst)
            .is_err()
        {
            return Err(self.used_block(pos).err().unwrap_or(Error::DoubleFree));
        }
        let requested = self.requested(pos);
        let bytes = self.free_claimed(pos, h);
        self.purge_if_due();
        Ok((requested, bytes))
    }

    /// The rest of a free, once this thread has moved the block at `pos`
    /// (whose header was `h`) to `Freeing`: lists it, merged with its free
    /// neighbours. Returns its block bytes.
    pub(super) fn free_claimed(&self, pos: u32, h: HeaderWord) -> u64 {
        // A node held by us from here on: a process killed while freeing
        // loses at most this block, never the neighbours it absorbs.
        let Some(hint) = self.prepare(pos, h.size, None) else {
            // Node table exhausted: the block stays free but unlisted (see
            // `publish`).
            return (h.size as u64) << GRANULE_LOG;
        };
        let mut cur = Held {
            hint,
            pos,
            size: h.size,
            hidden: 0,
        };
        // Absorb free right neighbours.
        while let Some(r) = self.absorb_right(&cur) {
            cur.size += r.size;
            cur.hidden += r.hidden;
        }
        // Let free left neighbours absorb us.
        let mut resettle = None;
        while cur.pos > self.heap_start {
            let Some(l) = self.take(self.hint_below(cur.pos), None) else {
                break;
            };
            if l.pos + l.size != cur.pos {
                // A stale footer led to a block that is not our neighbour.
                let left = l.pos;
                if self.give_back(l) {
                    resettle = Some(left);
                }
                break;
            }
            self.cover(&l, &cur);
            cur = Held {
                size: l.size + cur.size,
                hidden: cur.hidden + l.hidden,
                ..l
            };
        }
        self.note_freed(cur.pos, cur.size);
        self.relist(cur);
        if let Some(left) = resettle {
            self.settle(left);
        }
        (h.size as u64) << GRANULE_LOG
    }

    /// Claims the free right neighbour of the held free block `cur` and
    /// absorbs it: the store that grows `cur`'s header over it is the
    /// commit (before it, a recovery gives both back; after it, the
    /// neighbour is covered). Returns what was absorbed. A re-check request
    /// on the absorbed node is served by the caller, which settles the
    /// grown block.
    fn absorb_right(&self, cur: &Held) -> Option<Held> {
        let right = self.claim_right(cur.pos, cur.size)?;
        self.cover(cur, &right);
        Some(right)
    }

    /// Merges the held free block `right` into the held free block `left`
    /// that ends where it starts. The commit is the store that grows
    /// `left`'s header over `right` (from then on a recovery finds `right`
    /// covered); `right` is then no longer a block start, and its node goes.
    fn cover(&self, left: &Held, right: &Held) {
        self.header(left.pos)[0].store(
            HeaderWord::new(left.pos, left.size + right.size, BlockState::Free).value(),
            SeqCst,
        );
        self.absorbed(right);
    }

    /// Claims the free block right after `[pos, pos + size)`, if there is one.
    pub(super) fn claim_right(&self, pos: u32, size: u32) -> Option<Held> {
        let right = pos + size;
        if right >= self.heap_end || self.live_block_size(right).is_none() {
            return None;
        }
        self.take(self.hint_at(right), Some(right))
    }

    /// After the commit that covered the held block `h`: it is no longer a
    /// block start.
    pub(super) fn absorbed(&self, h: &Held) {
        self.header(h.pos)[0].store(
            HeaderWord::new(h.pos, 0, BlockState::Absorbed).value(),
            SeqCst,
        );
        self.retire(h.hint);
    }

    /// Publishes the held free block `h` as it stands now (its header says
    /// so already). A node on no list (bound by this thread, or popped) is
    /// published as it is, once the header and the footer at the block's
    /// end name it. One still on a list is on the list of the size it was
    /// claimed at, so a fresh node takes the block over: binding it
    /// rewrites word 1 of the header, after which the old node no longer
    /// stands for the block and is retired.
    pub(super) fn republish(&self, h: Held) {
        // Covered when its claims hid all of it (a merge of two claimed
        // blocks), not when part of it was the caller's own (a freed block).
        let covered = if h.hidden >= h.size {
            Covered::Yes
        } else {
            Covered::No
        };
        if !self.is_listed(h.hint) {
            // Word 1 too: a recovered block may still carry its
            // `BESIDE_USED` marker there.
            self.header(h.pos)[1].store(h.hint.value(), SeqCst);
            self.word_below(h.pos + h.size)
                .store(h.hint.value(), SeqCst);
            self.go_live(h.hint, h.size, covered);
            return;
        }
        let fresh = self.prepare(h.pos, h.size, None);
        self.retire(h.hint);
        if let Some(f) = fresh {
            self.go_live(f, h.size, covered);
        }
    }

    /// Lists the held free block `h` again as it stands (`republish`),
    /// un-hides what its claims hid, and merges it with its free
    /// neighbours (`settle`): the end of a free, of the sweep's hold, and of
    /// a recovery's.
    pub(super) fn relist(&self, h: Held) {
        let (pos, hidden) = (h.pos, h.hidden);
        self.republish(h);
        self.unhide(hidden);
        self.settle(pos);
    }

    // ---- settling ------------------------------------------------------------------

    /// Merges the published block at `pos` with its free neighbours until no
    /// merge is possible or another thread has taken over (see module docs).
    pub(super) fn settle(&self, mut pos: u32) {
        loop {
            // Each pair is only claimed if it looks mergeable: reading the
            // neighbour first is the read half of the store-buffer pattern
            // (a neighbour not published yet will see us when it settles).
            if self.right_looks_free(pos) {
                match self.merge_pair(self.hint_at(pos)) {
                    Pair::Merged(p) => {
                        pos = p;
                        continue;
                    }
                    Pair::LeftUnavailable => return,
                    Pair::RightUnavailable { again: true, .. } => continue,
                    Pair::RightUnavailable { again: false, .. } => {}
                }
            }
            if pos <= self.heap_start {
                return;
            }
            let left = self.hint_below(pos);
            if !self.looks_live(left) {
                return;
            }
            match self.merge_pair(left) {
                Pair::Merged(p) => pos = p,
                Pair::RightUnavailable { left, again: true } => pos = left,
                _ => return,
            }
        }
    }

    /// Whether the block after the one at `pos` is published free right now
    /// (a racy look; the claims decide).
    fn right_looks_free(&self, pos: u32) -> bool {
        let size = HeaderWord::from(self.header(pos)[0].load(SeqCst)).size;
        let right = pos as u64 + size as u64;
        right < self.heap_end as u64 && size != 0 && self.live_block_size(right as u32).is_some()
    }

    /// Claims the block `left_hint` names, then its right neighbour, and
    /// merges them into one published block.
    fn merge_pair(&self, left_hint: Hint) -> Pair {
        let Some(l) = self.take(left_hint, None) else {
            return Pair::LeftUnavailable;
        };
        let left = l.pos;
        let Some(r) = self.claim_right(l.pos, l.size) else {
            return Pair::RightUnavailable {
                left,
                again: self.give_back(l),
            };
        };
        // The merged block is published before it is un-hidden, so the
        // memory is never invisible and uncounted at once.
        self.cover(&l, &r);
        let hidden = l.hidden + r.hidden;
        self.republish(Held {
            size: l.size + r.size,
            hidden,
            ..l
        });
        self.unhide(hidden);
        Pair::Merged(left)
    }
}
