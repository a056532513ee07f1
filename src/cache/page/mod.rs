//! A page: `span` units of `PAGE_SIZE` bytes of the segment (one engine
//! block of exactly that size, starting at a multiple of `PAGE_SIZE`)
//! holding blocks of one size class (see `kinds`).
//!
//! ```text
//! [engine header | colour | PageHeader | sizes: [AtomicU8; capacity] | requested | pad | block 0 | block 1 | ...]
//! ```
//!
//! `sizes[i]` says what block `i` is: allocated, with its slack (block size
//! minus requested size, below 16 since a small class spans 16 bytes;
//! `MEDIUM_USED` on a medium page, whose `requested: [AtomicU32;
//! capacity]` array holds the requested sizes, as a medium class spans
//! more than a byte); `FREE`
//! while it is free in the owner's hands; or `REMOTE` while it is freed by
//! another thread and on its way through the remote list. One byte per
//! block keeps the entries a page's blocks touch in few cache lines. A free
//! block holds the next one of its list in its first four bytes: on the
//! owner's list (`local`) as a byte offset from the header, so that taking
//! and giving back a block need no multiplication by the block size in the
//! chain that each operation waits for; on the remote list as an index.
//! The colour (see `colour_offset`) is unused.
//!
//! Invariants, with `local` the owner's free list, `remote` the remote list
//! and `bump` the first block never listed (see `extend`):
//! - every block below `bump` is exactly one of: allocated (`sizes` below
//!   16), in `local` (`FREE`), or in `remote` or about to be pushed
//!   there (`REMOTE`); blocks at or above `bump` are `FREE` and in no list;
//! - `used` == allocated blocks + `REMOTE` blocks not yet collected;
//! - only the owner (the thread whose token is in `owner`) touches `local`,
//!   `bump`, `used`, the ring links and `tidy_below`; anyone may push on
//!   `remote`.
//!
//! Orderings: a remote free stores `REMOTE` into `sizes` and the link into
//! the block, then pushes with a `Release` CAS; the owner takes the whole list
//! with an `Acquire` swap, so it sees both. Everything else is owner-only
//! (`Relaxed` atomics, so that a concurrent `check()` reads without UB).

use super::kinds;
use crate::engine::words::{ListHead, NIL};
use crate::sync::{AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::ptr::NonNull;

pub(crate) use crate::geometry::{PAGE_HEAD, PAGE_SIZE};
mod layout;
pub(crate) use layout::{colour, colour_offset, geometry, COLOURS};
use layout::{exact_quotient, odd_inverse, requested_at};
/// "MTXP".
const PAGE_MAGIC: u32 = u32::from_le_bytes(*b"MTXP");
pub(crate) const FREE: u8 = 0x80;
pub(crate) const REMOTE: u8 = 0xff;
/// The size entry of an allocated block of a medium page (its requested
/// size is in the page's `requested` array).
pub(crate) const MEDIUM_USED: u8 = 0x40;

/// Whether a size entry says "allocated": a slack below 16 (a small
/// page's block), or `MEDIUM_USED`; anything else, `FREE`, `REMOTE` or a
/// value no block has, is not.
#[inline]
pub(crate) fn allocated(entry: u8) -> bool {
    small_allocated(entry) || entry == MEDIUM_USED
}

/// Whether a size entry says "an allocated block of a small page": the
/// fast paths' test, which thereby leave medium blocks (counted by bytes
/// too, see `Heap::free_fast`) to the slow paths at no cost.
#[inline(always)]
pub(crate) fn small_allocated(entry: u8) -> bool {
    entry < 16
}

#[repr(C)]
pub(crate) struct PageHeader {
    magic: u32,
    pub(crate) class: u8,
    /// `block_size.trailing_zeros()`, for `index_of`.
    shift: u8,
    /// `PAGE_SIZE` units the page spans (`kinds::span`).
    pub(crate) span: u16,
    pub(crate) block_size: u32,
    pub(crate) capacity: u32,
    /// Offset of block 0 from the page start.
    data: u32,
    /// The inverse of `block_size`'s odd part modulo 2^32, for `index_of`.
    inverse: u32,
    /// Owner token (see `cache::Token`); 0 while abandoned.
    pub(crate) owner: AtomicU64,
    /// `ListHead` of block indices freed by non-owners.
    remote: AtomicU64,
    local: AtomicU32,
    bump: AtomicU32,
    used: AtomicU32,
    /// Links of the owner's ring of its pages of this class (page numbers;
    /// see `ring`).
    pub(crate) next_owned: AtomicU32,
    pub(crate) prev_owned: AtomicU32,
    /// The owner's free must call `tidy` when it leaves fewer blocks in use
    /// than this: `ON_FULL_RING` (always: the page goes back to the
    /// available ring), `CURRENT` (never: the page in use stays, even
    /// empty), or `AVAILABLE` (when it empties: it goes to the stash). One
    /// comparison on the fast path instead of three tests; it also says
    /// which of the class's two rings the page is on.
    pub(crate) tidy_below: AtomicU32,
}

/// `PageHeader::tidy_below` of a page on the full ring.
pub(crate) const ON_FULL_RING: u32 = u32::MAX;
/// `PageHeader::tidy_below` of its class's current page (not on the full ring).
pub(crate) const CURRENT: u32 = 0;
/// `PageHeader::tidy_below` of any other page on the available ring.
pub(crate) const AVAILABLE: u32 = 1;

const HEADER_BYTES: usize = size_of::<PageHeader>();

/// A page with no blocks, outside any segment: a heap's current page for a
/// class that has none, so that the allocation fast path needs no test for
/// "no page" (`pop` finds nothing here, and writes nothing).
static NO_PAGE: PageHeader = PageHeader::new(0, (0, 1), 16, (0, 0), 0, CURRENT);

impl PageHeader {
    /// The header of a page with no block in use yet: `kind` is (class,
    /// span), `geometry` (capacity, data), see `geometry`.
    const fn new(
        magic: u32,
        kind: (u8, u16),
        block_size: u32,
        geometry: (u32, u32),
        owner: u64,
        tidy_below: u32,
    ) -> PageHeader {
        let shift = block_size.trailing_zeros();
        PageHeader {
            magic,
            class: kind.0,
            shift: shift as u8,
            span: kind.1,
            block_size,
            capacity: geometry.0,
            data: geometry.1,
            inverse: odd_inverse(block_size >> shift),
            owner: AtomicU64::new(owner),
            remote: AtomicU64::new(ListHead::EMPTY),
            local: AtomicU32::new(NIL),
            bump: AtomicU32::new(0),
            used: AtomicU32::new(0),
            next_owned: AtomicU32::new(NIL),
            prev_owned: AtomicU32::new(NIL),
            tidy_below: AtomicU32::new(tidy_below),
        }
    }
}

/// The address of `NO_PAGE`, as a `Page`'s.
pub(crate) fn no_page() -> *mut u8 {
    &NO_PAGE as *const PageHeader as *mut u8
}

/// Bytes of never-used blocks that `Page::extend` lists at a time: few
/// enough that a page touches its memory as it is used, enough that the
/// slow path runs once per many allocations.
const EXTEND_BYTES: u32 = 4096;

/// The link of a free block: its first four bytes.
#[inline]
fn link_at(block: *mut u8) -> &'static AtomicU32 {
    // SAFETY: a block is at least 16 bytes and 16-aligned, inside a mapped
    // page; while free its first four bytes are the link, written only by
    // whoever frees it.
    unsafe { &*(block as *const AtomicU32) }
}

/// A page, by the address of its header in this process (`colour_offset`
/// bytes past the page start).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Page(pub(crate) *mut u8);

impl Page {
    pub(crate) fn header(self) -> &'static PageHeader {
        // ('static is a convenience of this module's internals: no reference
        // outlives the heap that made the `Page`.)
        // SAFETY: `Page` values are only made for the header addresses of
        // pages inside a live mapping (by `cache`), which the thread heap
        // keeps mapped while it holds them; the header is all integers and atomics.
        unsafe { &*(self.0 as *const PageHeader) }
    }

    fn sizes(self) -> &'static [AtomicU8] {
        let cap = self.header().capacity as usize;
        // SAFETY: `capacity` entries follow the header inside the page.
        unsafe { std::slice::from_raw_parts(self.0.add(HEADER_BYTES) as *const AtomicU8, cap) }
    }

    /// The atomic size entry of block `i` (`i < capacity`).
    #[inline]
    pub(crate) fn size_entry(self, i: u32) -> &'static AtomicU8 {
        &self.sizes()[i as usize]
    }

    /// `size_entry` without the bounds check.
    ///
    /// # Safety
    /// `i < capacity`.
    #[inline]
    pub(crate) unsafe fn size_entry_unchecked(self, i: u32) -> &'static AtomicU8 {
        // SAFETY: `capacity` entries follow the header inside the page, and
        // the caller guarantees `i < capacity`.
        unsafe { &*(self.0.add(HEADER_BYTES) as *const AtomicU8).add(i as usize) }
    }

    /// The size entry of a block allocated for `requested` bytes, a size of
    /// this page's class: its slack. A class's blocks are `requested`
    /// rounded up to 16 bytes, so the slack is `-requested mod 16`, which
    /// spares the allocation fast path a load of the header's block size.
    #[inline]
    pub(crate) fn entry_for(self, requested: usize) -> u8 {
        let slack = (requested as u8).wrapping_neg() & 15;
        debug_assert_eq!(
            slack as usize,
            self.header().block_size as usize - requested,
            "{requested} is not of this page's class"
        );
        slack
    }

    /// The requested size of a block of a small page allocated with size
    /// entry `entry`.
    #[inline]
    pub(crate) fn small_requested(self, entry: u8) -> u64 {
        (self.header().block_size - entry as u32) as u64
    }

    /// The requested size of the allocated block `i` (`i < capacity`),
    /// whose size entry is `entry`, of any page.
    #[inline]
    pub(crate) fn requested_of(self, i: u32, entry: u8) -> u64 {
        if entry == MEDIUM_USED {
            self.requested_slot(i).load(Relaxed) as u64
        } else {
            self.small_requested(entry)
        }
    }

    /// Whether this is a medium page (requested sizes in an array).
    #[inline]
    pub(crate) fn is_medium(self) -> bool {
        kinds::is_medium(self.header().class as usize)
    }

    /// A medium page's requested size entry of block `i` (`i < capacity`).
    fn requested_slot(self, i: u32) -> &'static AtomicU32 {
        let cap = self.header().capacity as usize;
        // SAFETY: a medium page has `capacity` 4-aligned entries at
        // `requested_at(capacity)` (see `geometry`), inside the page; the
        // header is 64-aligned.
        let slots = unsafe {
            std::slice::from_raw_parts(self.0.add(requested_at(cap)) as *const AtomicU32, cap)
        };
        &slots[i as usize]
    }

    /// Records `requested` bytes, a size of this page's class (the caller
    /// checked), for the allocated block `i` (`i < capacity`).
    pub(crate) fn set_requested(self, i: u32, requested: usize) {
        if self.is_medium() {
            self.set_medium_requested(i, requested);
        } else {
            self.size_entry(i).store(self.entry_for(requested), Relaxed);
        }
    }

    /// `set_requested` on a medium page.
    #[inline]
    fn set_medium_requested(self, i: u32, requested: usize) {
        self.requested_slot(i).store(requested as u32, Relaxed);
        self.size_entry(i).store(MEDIUM_USED, Relaxed);
    }

    pub(crate) fn block(self, i: u32) -> *mut u8 {
        let h = self.header();
        // SAFETY: `i < capacity`, so the block lies inside the page.
        unsafe {
            self.0
                .add(h.data as usize + i as usize * h.block_size as usize)
        }
    }

    fn link(self, i: u32) -> &'static AtomicU32 {
        link_at(self.block(i))
    }

    /// The index of the block that `ptr`, an address inside this page,
    /// points to the start of.
    #[inline]
    pub(crate) fn index_of(self, ptr: *const u8) -> Option<u32> {
        let h = self.header();
        if h.magic != PAGE_MAGIC {
            return None;
        }
        // `ptr` is inside the page: its offset from the header fits in 32
        // bits once wrapped, as `index_at` needs.
        let i = self.index_at((ptr as usize).wrapping_sub(self.0 as usize) as u32);
        (i < h.capacity).then_some(i)
    }

    /// The index of the block that starts `off` bytes past the header, or
    /// a value past the capacity if no block starts there (`off` may have
    /// wrapped below zero, or be `NIL`).
    ///
    /// Past block 0 and inside the page, the offset from block 0 is below
    /// the page's bytes (at most `MAX_SPAN * PAGE_SIZE`, 2 MiB); before
    /// block 0 it wraps to at least `2^32` less that. `exact_quotient` is
    /// above `u32::MAX / block_size` (more than any capacity) unless that
    /// offset is a multiple of the block size, and then it is the index:
    /// beyond the last block, or (wrapped) at least `(2^32 - 2 MiB) /
    /// MEDIUM_MAX`, it is past the capacity too (a page holds fewer than
    /// 2 MiB / 16 blocks). So one comparison with the capacity says "a block
    /// start of this page".
    #[inline]
    fn index_at(self, off: u32) -> u32 {
        let h = self.header();
        exact_quotient(off.wrapping_sub(h.data), h.inverse, h.shift as u32)
    }

    /// Formats a fresh page for `class` owned by `owner`.
    ///
    /// # Safety
    /// The caller owns the `kinds::span(class)` units of the page, whose
    /// start is `offset` bytes before `self` (just allocated from the
    /// engine, or an empty page of the same span), and no one else can
    /// reach the page before it is marked in the page map.
    pub(crate) unsafe fn init(self, class: usize, owner: u64, offset: usize) {
        let block_size = kinds::block_size(class);
        let span = kinds::span(class);
        let (capacity, data) = kinds::geometry_of(class, offset);
        let h = self.0 as *mut PageHeader;
        // SAFETY: the caller owns the memory; plain writes before publication.
        unsafe {
            h.write(PageHeader::new(
                PAGE_MAGIC,
                (class as u8, span as u16),
                block_size,
                (capacity, data),
                owner,
                AVAILABLE,
            ));
            std::ptr::write_bytes(self.0.add(HEADER_BYTES), FREE, capacity as usize);
        }
    }

    // ---- owner-only operations ----------------------------------------------

    /// Takes the first block of the owner's list for an allocation of
    /// `requested` bytes (owner only); returns its address. `None` when the
    /// list is empty: never-used blocks join the list in batches, in `take`,
    /// so that this fast path has no branch that goes one way for a page
    /// being filled and the other for a page being reused (that branch was
    /// mispredicted on a third of the mixed workload's allocations).
    #[inline]
    pub(crate) fn pop(self, requested: usize) -> Option<NonNull<u8>> {
        let (block, i) = self.pop_block()?;
        // SAFETY: `i < capacity`, checked by `pop_block`.
        unsafe { self.size_entry_unchecked(i) }.store(self.entry_for(requested), Relaxed);
        NonNull::new(block)
    }

    /// `pop` on a medium page.
    #[inline]
    pub(crate) fn pop_medium(self, requested: usize) -> Option<NonNull<u8>> {
        let (block, i) = self.pop_block()?;
        self.set_medium_requested(i, requested);
        NonNull::new(block)
    }

    /// Takes the first block of the owner's list and counts it used; its
    /// size entry is the caller's to write. Returns its address and index.
    #[inline(always)]
    fn pop_block(self) -> Option<(*mut u8, u32)> {
        let h = self.header();
        let off = h.local.load(Relaxed);
        let i = self.index_at(off);
        if i >= h.capacity {
            // The list is empty (`NIL`), or its head is no block start: a
            // link lives in block memory, which a program that writes to a
            // block after freeing it could have changed. The rest of the
            // list is dropped then (those blocks leak) instead of reaching
            // outside the page or into the middle of a block.
            if off != NIL {
                h.local.store(NIL, Relaxed);
            }
            return None;
        }
        // SAFETY: `off` is the offset of block `i`, inside the page.
        let block = unsafe { self.0.add(off as usize) };
        h.local.store(link_at(block).load(Relaxed), Relaxed);
        h.used.store(h.used.load(Relaxed) + 1, Relaxed);
        Some((block, i))
    }

    /// `pop`, after listing a batch of never-used blocks when the owner's
    /// list is empty (owner only; for the slow paths). `None` when the page
    /// has no free block at hand.
    pub(crate) fn take(self, requested: usize) -> Option<NonNull<u8>> {
        let pop = |page: Page| {
            if page.is_medium() {
                page.pop_medium(requested)
            } else {
                page.pop(requested)
            }
        };
        pop(self).or_else(|| {
            self.extend();
            pop(self)
        })
    }

    /// Lists up to `EXTEND_BYTES` of never-used blocks (at least one, if
    /// any is left) on the owner's list, which is empty, in address order.
    fn extend(self) {
        let h = self.header();
        let bump = h.bump.load(Relaxed);
        let n = (EXTEND_BYTES / h.block_size)
            .max(1)
            .min(h.capacity.saturating_sub(bump));
        for i in (bump..bump + n).rev() {
            self.list_local(i);
        }
        h.bump.store(bump + n, Relaxed);
    }

    /// Returns the block at `block`, already marked `FREE`, to the owner's
    /// list. Returns the blocks still in use.
    #[inline]
    pub(crate) fn push_local(self, block: *mut u8) -> u32 {
        let h = self.header();
        self.list_block(block);
        let used = h.used.load(Relaxed) - 1;
        h.used.store(used, Relaxed);
        used
    }

    /// Moves the remote list into the local one (owner only). Returns
    /// whether any block came back.
    pub(crate) fn collect(self) -> bool {
        let h = self.header();
        if ListHead::from(h.remote.load(Relaxed)).top == NIL {
            return false;
        }
        let mut cur = h.remote.load(Acquire);
        let taken = loop {
            let head = ListHead::from(cur);
            match h
                .remote
                .compare_exchange_weak(cur, head.replaced(NIL).value(), Acquire, Acquire)
            {
                Ok(_) => break head.top,
                Err(v) => cur = v,
            }
        };
        let mut i = taken;
        let mut n = 0;
        while i != NIL && i < h.capacity {
            let next = self.link(i).load(Relaxed);
            self.size_entry(i).store(FREE, Relaxed);
            self.list_local(i);
            n += 1;
            i = next;
        }
        h.used.store(h.used.load(Relaxed) - n, Relaxed);
        n > 0
    }

    /// Puts block `i` at the front of the owner's list.
    fn list_local(self, i: u32) {
        self.list_block(self.block(i));
    }

    /// Puts the free block at `block` at the front of the owner's list,
    /// linked by its offset from the header (see the module notes).
    #[inline]
    fn list_block(self, block: *mut u8) {
        let h = self.header();
        link_at(block).store(h.local.load(Relaxed), Relaxed);
        h.local
            .store((block as usize - self.0 as usize) as u32, Relaxed);
    }

    /// Whether the owner could allocate here without collecting.
    pub(crate) fn has_free(self) -> bool {
        let h = self.header();
        h.local.load(Relaxed) != NIL || h.bump.load(Relaxed) < h.capacity
    }

    #[inline]
    pub(crate) fn used(self) -> u32 {
        self.header().used.load(Relaxed)
    }

    /// Rebuilds the owner-only state from the size entries, for a page taken
    /// over from a dead process (whose owner may have died mid-update):
    /// collects the remote list, then lists every `FREE` block below `bump`.
    pub(crate) fn rebuild(self) {
        let h = self.header();
        self.collect();
        h.local.store(NIL, Relaxed);
        let bump = h.bump.load(Relaxed).min(h.capacity);
        let mut used = 0;
        for i in (0..bump).rev() {
            match self.size_entry(i).load(Relaxed) {
                FREE => self.list_local(i),
                _ => used += 1,
            }
        }
        h.used.store(used, Relaxed);
    }

    // ---- anyone ------------------------------------------------------------

    /// Pushes block `i`, already marked `REMOTE`, on the remote list.
    pub(crate) fn push_remote(self, i: u32) {
        let h = self.header();
        let mut cur = h.remote.load(Relaxed);
        loop {
            let head = ListHead::from(cur);
            self.link(i).store(head.top, Relaxed);
            // Release: the link and the REMOTE mark reach the collector.
            match h
                .remote
                .compare_exchange_weak(cur, head.replaced(i).value(), Release, Relaxed)
            {
                Ok(_) => return,
                Err(v) => cur = v,
            }
        }
    }

    /// Whether the header's fixed fields are those `init` writes for a page
    /// of its class with the header `offset` bytes into the page: what
    /// `check()` makes sure of before it follows the capacity into the size
    /// entries (a damaged segment may hold anything there).
    pub(crate) fn is_sound(self, offset: usize) -> bool {
        let h = self.header();
        let class = h.class as usize;
        if h.magic != PAGE_MAGIC || class >= crate::geometry::PAGE_CLASSES {
            return false;
        }
        let size = kinds::block_size(class);
        let shift = size.trailing_zeros();
        h.block_size == size
            && h.shift as u32 == shift
            && h.span as usize == kinds::span(class)
            && h.inverse == odd_inverse(size >> shift)
            && (h.capacity, h.data) == kinds::geometry_of(class, offset)
    }

    /// (allocated blocks, their requested bytes), from the size entries
    /// (for `check()`, once `is_sound` said so).
    pub(crate) fn census(self) -> (u64, u64) {
        (0..self.header().capacity)
            .map(|i| (i, self.size_entry(i).load(Relaxed)))
            .filter(|(_, s)| allocated(*s))
            .fold((0, 0), |(n, b), (i, s)| {
                (n + 1, b + self.requested_of(i, s))
            })
    }
}

#[cfg(test)]
mod tests;
