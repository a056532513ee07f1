//! The heap's shared geometry, below both the engine and the caches: the
//! page size, the size classes, and how the page table marks pages. (The
//! engine marks pages in its page table; the caches carve them into
//! blocks.)

/// Bytes per small-object page; pages are aligned to it.
pub(crate) const PAGE_SIZE: usize = 16 * 1024;

/// Bytes at the start of every page before its header can begin: the
/// engine block's header (a page is one engine block of `PAGE_SIZE`
/// bytes) and the rest of its cache line.
pub(crate) const PAGE_HEAD: usize = 64;

/// The largest request served from pages.
pub(crate) const SMALL_MAX: usize = 1024;

/// Size classes: 16, 32, ..., `SMALL_MAX` bytes.
pub(crate) const SMALL_CLASSES: usize = SMALL_MAX / 16;

/// The largest request the caches serve.
pub(crate) const BIN_MAX: usize = 4 << 20;
/// Classes: four per doubling from `SMALL_MAX` (exclusive) to `BIN_MAX`.
pub(crate) const BIN_CLASSES: usize = 4 * (BIN_MAX / SMALL_MAX).ilog2() as usize;

/// The payload of class `k`'s blocks.
pub(crate) const fn class_size(k: usize) -> usize {
    let (d, s) = ((k + 1) / 4, (k + 1) % 4);
    (SMALL_MAX << d) + s * ((SMALL_MAX / 4) << d)
}

/// The class of a request of `size` bytes aligned to `align`, if the
/// caches serve it: above `SMALL_MAX`, up to `BIN_MAX`, alignment up to 16.
#[inline]
pub(crate) fn bin_class(size: usize, align: usize) -> Option<usize> {
    if size <= SMALL_MAX || size > BIN_MAX || align > 16 {
        return None;
    }
    // The smallest class at least `size`: the doubling `d` of `size - 1`
    // above `SMALL_MAX`, and the quarter of it past which `size` falls.
    let x = size - 1;
    let d = x.ilog2() as usize - SMALL_MAX.ilog2() as usize;
    let s = ((x - (SMALL_MAX << d)) >> (SMALL_MAX.ilog2() as usize - 2 + d)) + 1;
    Some(4 * d + s - 1)
}

/// The block-cache classes served from pages of their own (medium pages,
/// several `PAGE_SIZE` units long), the first `MEDIUM_CLASSES` of them:
/// above `SMALL_MAX` up to `MEDIUM_MAX`. Larger ones are engine blocks,
/// kept in the block caches. (Above this, a class's pages hold few
/// blocks and a live set of a few hundred random sizes leaves most of its
/// pages part empty: a simulation of the 4 - 64 KiB workload gave 1.19
/// bytes provided per byte asked for with pages up to 32 KiB, and 1.32 -
/// 1.37 with pages up to 64 KiB.)
pub(crate) const MEDIUM_CLASSES: usize = 20;
/// The largest request served from medium pages.
pub(crate) const MEDIUM_MAX: usize = class_size(MEDIUM_CLASSES - 1);
const _: () = assert!(MEDIUM_MAX == 32 << 10);

/// Page classes: the small classes, then the medium ones.
pub(crate) const PAGE_CLASSES: usize = SMALL_CLASSES + MEDIUM_CLASSES;

/// Page-table entries (one `u32` per `PAGE_SIZE` unit): bit 31 marks a
/// unit of a page; on a page's first unit bits 0..24 link it on a page
/// list (`LINK_NIL`: the end); on its other units bits 24..31 say how
/// many units back the page starts.
pub(crate) const PAGE_MARK: u32 = 1 << 31;
pub(crate) const BACK_SHIFT: u32 = 24;
pub(crate) const BACK_MASK: u32 = 0x7f;
pub(crate) const LINK_MASK: u32 = (1 << BACK_SHIFT) - 1;
pub(crate) const LINK_NIL: u32 = LINK_MASK;
/// The most units a page spans.
pub(crate) const MAX_SPAN: usize = BACK_MASK as usize + 1;
// Every unit number of the largest segment fits a link.
const _: () = assert!(((1u64 << 36) / PAGE_SIZE as u64) < LINK_NIL as u64);
