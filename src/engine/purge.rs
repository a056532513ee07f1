//! Memory that goes back: the pages inside free blocks are given back to
//! the OS (`os::purge`), so that a program that frees a large working set
//! no longer holds it resident, in any kind of segment.
//!
//! As mimalloc does it, the purge is delayed: a freed (merged) block of at
//! least `PURGE_MIN` is stamped with the time it was freed and a purge is
//! scheduled (`Control::purge_due`) `PURGE_DELAY` later. The first engine
//! allocation or free after that time sweeps the lists of such blocks and
//! purges those still free and freed at least `PURGE_DELAY` ago; a block
//! taken again before then is never purged, so a program that frees and
//! takes large blocks in a loop (a growing `Vec`) faults no pages in.
//! `trim()` purges every free block at once (`purge_free_blocks`).
//!
//! A block is purged while the sweep holds it exclusively (claimed, off its
//! list), so no one can be using its memory. What stays is what a free
//! block's bookkeeping needs: its header and stamp (the first 24 bytes) and
//! its footer (the last 8); the pages between go. Blocks in the per-thread
//! caches are not free and are not purged.
//!
//! The stamp is a hint, not an invariant: a block split off a stamped one,
//! or merged by `settle`, carries whatever its first payload word held. A
//! stamp that is zero or in the future is taken as "freed now"; one in the
//! past purges the block early, which costs only page faults. `purge_due`
//! is one word for the whole segment: a scheduled time is only ever moved
//! earlier (`schedule`), and the thread that swaps it to 0 sweeps.

use super::mapping::map_floor;
use super::words::{GRANULE_LOG, HEADER};
use super::{Engine, NO_PURGE};
use crate::os::{self, Purge};
use std::sync::atomic::Ordering::Relaxed;

/// The smallest free block whose pages go back without `trim()`.
pub(crate) const PURGE_MIN: usize = 1 << 20;

/// How long a free block stays resident before the purge: mimalloc's arena
/// purge delay (`purge_delay` 10 ms times `arena_purge_mult` 10).
/// (Purging at once, every freed block of 64 KiB and more, made the
/// benches' steady states and a growing `Vec` two to twelve times slower:
/// a system call per free, and a page fault per page when the memory was
/// taken again.)
pub(crate) const PURGE_DELAY_NS: u64 = 100_000_000;

/// The stamp of a block whose pages were given back.
const PURGED: u64 = u64::MAX;

const OS_PAGE: usize = 4096;

/// What a sweep of the free lists does with each block it holds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SweepPurge {
    /// Nothing: it only recycles `Dead` nodes.
    None,
    /// Gives back the pages of every block (`trim`).
    All,
    /// Gives back those of blocks of `PURGE_MIN` and more freed at least
    /// `PURGE_DELAY_NS` before `now`.
    Aged { now: u64 },
}

fn encode(how: Option<Purge>) -> u8 {
    match how {
        None => NO_PURGE,
        Some(Purge::DontNeed) => 1,
        Some(Purge::Punch(_)) => 2,
    }
}

impl Engine {
    /// Sets how this handle gives freed memory back (from the segment's kind).
    pub(crate) fn set_purge(&mut self, how: Purge) {
        if let Purge::Punch(fd) = how {
            self.purge_fd = fd;
        }
        self.purge.store(encode(Some(how)), Relaxed);
    }

    fn purge_how(&self) -> Option<Purge> {
        match self.purge.load(Relaxed) {
            1 => Some(Purge::DontNeed),
            2 => Some(Purge::Punch(self.purge_fd)),
            _ => None,
        }
    }

    /// The free-time stamp of the block at `pos`: its first payload word,
    /// ours while the block is held.
    fn stamp(&self, pos: u32) -> &std::sync::atomic::AtomicU64 {
        &self.header(pos + (HEADER >> GRANULE_LOG) as u32)[0]
    }

    /// Called by a freer that holds the merged free block at `pos` of
    /// `size` granules, before listing it: stamps it and schedules its
    /// purge if it is large enough.
    pub(super) fn note_freed(&self, pos: u32, size: u32) {
        if ((size as usize) << GRANULE_LOG) < PURGE_MIN || self.purge_how().is_none() {
            return;
        }
        let now = os::monotonic_ns();
        self.stamp(pos).store(now, Relaxed);
        self.schedule(now + PURGE_DELAY_NS);
    }

    /// Makes the next purge happen at `due` at the latest.
    fn schedule(&self, due: u64) {
        let word = &self.control().purge_due;
        // Relaxed: the word only says when to look; the sweep finds the
        // blocks through the lists, which carry their own orderings.
        let _ = word.fetch_update(Relaxed, Relaxed, |cur| {
            (cur == 0 || due < cur).then_some(due)
        });
    }

    /// On the engine's allocation and free paths: one load while no purge
    /// is due; the thread that takes a due purge sweeps the lists of large
    /// blocks, and schedules the next one for the blocks still too young.
    #[inline]
    pub(super) fn purge_if_due(&self) {
        let due = self.control().purge_due.load(Relaxed);
        if due != 0 {
            self.purge_due_slow(due);
        }
    }

    #[cold]
    fn purge_due_slow(&self, due: u64) {
        let now = os::monotonic_ns();
        if now < due
            || self
                .control()
                .purge_due
                .compare_exchange(due, 0, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let (fl, sl) = map_floor((PURGE_MIN >> GRANULE_LOG) as u32);
        if let Some(next) = self.sweep_from(fl * super::SL_COUNT + sl, SweepPurge::Aged { now }) {
            self.schedule(next);
        }
    }

    /// Gives back the pages of every free block (`Matrix::trim`): the
    /// free-list sweep, purging each block while it holds it.
    pub(crate) fn purge_free_blocks(&self) {
        if self.purge_how().is_some() {
            self.sweep_from(0, SweepPurge::All);
        }
    }

    /// What the sweep does with the block at `pos` of `size` granules, which
    /// it holds: purges it as `mode` says. Returns when this block's purge
    /// is due, if it is not yet.
    pub(super) fn sweep_purge(&self, pos: u32, size: u32, mode: SweepPurge) -> Option<u64> {
        let bytes = (size as usize) << GRANULE_LOG;
        match mode {
            SweepPurge::None => None,
            SweepPurge::All => {
                self.purge_range(pos, bytes);
                None
            }
            SweepPurge::Aged { now } => {
                if bytes < PURGE_MIN {
                    return None;
                }
                let stamp = self.stamp(pos).load(Relaxed);
                if stamp == PURGED {
                    None
                } else if stamp == 0 || stamp > now {
                    self.stamp(pos).store(now, Relaxed);
                    Some(now + PURGE_DELAY_NS)
                } else if now - stamp < PURGE_DELAY_NS {
                    Some(stamp + PURGE_DELAY_NS)
                } else {
                    self.purge_range(pos, bytes);
                    None
                }
            }
        }
    }

    /// The pages inside the `bytes` bytes of the block at `pos`, which the
    /// caller holds, but for its header, stamp and footer. If the kernel
    /// refuses (a file system that cannot punch holes), this handle stops
    /// trying.
    fn purge_range(&self, pos: u32, bytes: usize) {
        let Some(how) = self.purge_how() else {
            return;
        };
        let base = self.pages.base as usize;
        let start = base + ((pos as usize) << GRANULE_LOG);
        let from = (start + HEADER + 8).next_multiple_of(OS_PAGE);
        let to = (start + bytes - 8) / OS_PAGE * OS_PAGE;
        if to > from {
            if os::purge(from as *mut u8, (from - base) as u64, to - from, how) {
                if bytes >= PURGE_MIN {
                    self.stamp(pos).store(PURGED, Relaxed);
                }
            } else {
                self.purge.store(NO_PURGE, Relaxed);
            }
        }
    }
}
