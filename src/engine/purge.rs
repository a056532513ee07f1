//! Memory that goes back: the pages inside a block freed to the heap are
//! given back to the OS (`os::purge`), so that a program that frees a large
//! working set no longer holds it resident, in any kind of segment.
//!
//! Freed blocks of at least `PURGE_MIN` are purged at once; `trim()`
//! purges every free block (`purge_free_blocks`). A block is purged while
//! its freer (or the sweep) holds it exclusively (`Freeing`, or claimed,
//! before it is listed), so no one can be using its memory. What stays is
//! what a free block's bookkeeping needs: its header (the first 16 bytes)
//! and its footer (the last 8); the pages between go. Blocks in the
//! per-thread caches are not free and are not purged.

use super::words::GRANULE_LOG;
use super::{Engine, NO_PURGE};
use crate::os::{self, Purge};
use std::sync::atomic::Ordering::Relaxed;

/// The smallest block whose pages are given back when it is freed; smaller
/// free blocks give theirs back at `Matrix::trim`. (Purging every freed
/// block of 64 KiB and more, or every one while the heap was below half of
/// its peak, made the benches' steady states and a growing `Vec` two to
/// twelve times slower: a system call per free, and a page fault per page
/// when the memory is taken again.)
pub(crate) const PURGE_MIN: usize = 32 << 20;

const OS_PAGE: usize = 4096;

fn encode(how: Option<Purge>) -> u8 {
    match how {
        None => NO_PURGE,
        Some(Purge::DontNeed) => 1,
        Some(Purge::Remove) => 2,
    }
}

impl Engine {
    /// Sets how this handle gives freed memory back (from the segment's kind).
    pub(crate) fn set_purge(&mut self, how: Purge) {
        self.purge.store(encode(Some(how)), Relaxed);
    }

    fn purge_how(&self) -> Option<Purge> {
        match self.purge.load(Relaxed) {
            1 => Some(Purge::DontNeed),
            2 => Some(Purge::Remove),
            _ => None,
        }
    }

    /// Gives back the whole pages inside the block at `pos` of `size`
    /// granules, which the caller is freeing and holds exclusively. If the
    /// kernel refuses (a file system that cannot punch holes), this handle
    /// stops trying.
    pub(super) fn purge_block(&self, pos: u32, size: u32) {
        let bytes = (size as usize) << GRANULE_LOG;
        if bytes >= PURGE_MIN {
            self.purge_range(pos, bytes);
        }
    }

    /// Gives back the pages of every free block (`Matrix::trim`): the
    /// free-list sweep, purging each block while it holds it.
    pub(crate) fn purge_free_blocks(&self) {
        if self.purge_how().is_some() {
            self.sweep(true);
        }
    }

    /// `purge_block` without the conditions: the pages inside the
    /// `bytes` bytes of the block at `pos`, which the caller holds.
    pub(super) fn purge_range(&self, pos: u32, bytes: usize) {
        if bytes < OS_PAGE * 2 {
            return;
        }
        let Some(how) = self.purge_how() else {
            return;
        };
        let start = self.pages.base as usize + ((pos as usize) << GRANULE_LOG);
        let from = (start + 16).next_multiple_of(OS_PAGE);
        let to = (start + bytes - 8) / OS_PAGE * OS_PAGE;
        if to > from && !os::purge(from as *mut u8, to - from, how) {
            self.purge.store(NO_PURGE, Relaxed);
        }
    }
}
