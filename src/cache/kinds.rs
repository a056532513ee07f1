//! Page kinds: for each page class, the size of its blocks and how many
//! `PAGE_SIZE` units its pages span.
//!
//! Small classes (16-byte steps up to `SMALL_MAX`) have pages of one unit.
//! Medium classes (the block caches' first `MEDIUM_CLASSES`, four per
//! doubling up to `MEDIUM_MAX`) have pages sized to them, as mimalloc's
//! page kinds are: the fewest units that hold at least `MIN_BLOCKS` blocks
//! with at most a sixteenth of the page left over (or, when no span up to
//! `MAX_MEDIUM_SPAN` does, the one that leaves the least). So a medium
//! block is allocated and freed as a small one is, by the thread that owns
//! its page with plain stores, instead of through the shared engine.

use super::page::{colour_offset, geometry, COLOURS};
use crate::geometry::{class_size, MAX_SPAN, MEDIUM_CLASSES, PAGE_CLASSES, SMALL_CLASSES};

/// The fewest blocks a medium page holds.
const MIN_BLOCKS: usize = 4;
/// The longest medium page, in units (512 KiB).
const MAX_MEDIUM_SPAN: usize = 32;
const _: () = assert!(MAX_MEDIUM_SPAN <= MAX_SPAN);

/// Whether `class` is a medium class.
#[inline]
pub(crate) fn is_medium(class: usize) -> bool {
    class >= SMALL_CLASSES
}

/// The page class of medium request class `k` (a block-cache class below
/// `MEDIUM_CLASSES`).
pub(crate) fn medium_class(k: usize) -> usize {
    SMALL_CLASSES + k
}

/// Bytes of each block of `class`.
pub(crate) const fn block_size(class: usize) -> u32 {
    if class < SMALL_CLASSES {
        (class as u32 + 1) * 16
    } else {
        class_size(class - SMALL_CLASSES) as u32
    }
}

/// Units a page of `class` spans.
#[inline]
pub(crate) fn span(class: usize) -> usize {
    SPANS[class % PAGE_CLASSES] as usize
}

/// (capacity, data) of a page of `class` whose header is `offset` bytes
/// into it (see `page::geometry`).
pub(crate) fn geometry_of(class: usize, offset: usize) -> (u32, u32) {
    geometry(
        block_size(class) as usize,
        offset,
        span(class),
        is_medium(class),
    )
}

static SPANS: [u8; PAGE_CLASSES] = spans();

const fn spans() -> [u8; PAGE_CLASSES] {
    let mut spans = [1u8; PAGE_CLASSES];
    let mut k = 0;
    while k < MEDIUM_CLASSES {
        spans[SMALL_CLASSES + k] = medium_span(class_size(k)) as u8;
        k += 1;
    }
    spans
}

/// The span of a medium class of `size`-byte blocks (see the module notes),
/// for the header furthest into its page.
const fn medium_span(size: usize) -> usize {
    let worst = colour_offset(COLOURS - 1);
    let (mut best, mut best_waste) = (MAX_MEDIUM_SPAN, usize::MAX);
    let mut span = 1;
    while span <= MAX_MEDIUM_SPAN {
        let bytes = span * crate::geometry::PAGE_SIZE;
        let blocks = geometry(size, worst, span, true).0 as usize;
        let waste = bytes - blocks * size;
        if blocks >= MIN_BLOCKS {
            if waste * 16 <= bytes {
                return span;
            }
            // Compared per byte of the page: waste / bytes.
            if best_waste == usize::MAX
                || waste * (best * crate::geometry::PAGE_SIZE) < best_waste * bytes
            {
                (best, best_waste) = (span, waste);
            }
        }
        span += 1;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::PAGE_SIZE;

    #[test]
    fn medium_pages_hold_enough_blocks_with_little_left_over() {
        for k in 0..MEDIUM_CLASSES {
            let class = medium_class(k);
            let (capacity, _) = geometry_of(class, colour_offset(COLOURS - 1));
            let bytes = span(class) * PAGE_SIZE;
            let used = capacity as usize * block_size(class) as usize;
            assert!(
                capacity as usize >= MIN_BLOCKS,
                "class {k}: {capacity} blocks"
            );
            assert!(used * 8 >= bytes * 7, "class {k}: {used} of {bytes} bytes");
        }
    }
}
