//! Where things sit in a page: the colour of its header, the capacity and
//! the offset of block 0 for a class (`geometry`), and the arithmetic that
//! turns an offset into a block index without a division.

use super::{HEADER_BYTES, PAGE_HEAD, PAGE_SIZE};

/// Page colours: the header of page `n` sits `PAGE_HEAD + (n % COLOURS) *
/// 64` bytes into the page, past the engine block's header (which the
/// page's first line holds, so that the page header has a line of its own).
/// Pages are aligned to `PAGE_SIZE`, so without this every header
/// (and the start of every size array) would fall into the same few sets of
/// the L1 and L2 caches, and a workload spread over more than a dozen pages
/// would miss on nearly every header access.
pub(crate) const COLOURS: usize = 16;

/// Bytes between the page start and the header of page number `n`.
#[inline]
pub(crate) const fn colour_offset(n: usize) -> usize {
    PAGE_HEAD + colour(n)
}

/// Page `n`'s colour: bytes past `PAGE_HEAD` to its header.
#[inline]
pub(crate) const fn colour(n: usize) -> usize {
    (n % COLOURS) * 64
}

/// Blocks per page and offset of block 0 from the header, for blocks of
/// `block_size` bytes in a page of `span` units with the header `offset`
/// bytes into it; `medium`: with a requested size per block.
pub(crate) const fn geometry(
    block_size: usize,
    offset: usize,
    span: usize,
    medium: bool,
) -> (u32, u32) {
    let room = span * PAGE_SIZE - offset;
    let per_block = if medium { 4 } else { 0 };
    let mut capacity = (room - HEADER_BYTES) / (block_size + 1 + per_block);
    loop {
        let data = (requested_at(capacity) + per_block * capacity).next_multiple_of(16);
        if data + capacity * block_size <= room {
            return (capacity as u32, data as u32);
        }
        capacity -= 1;
    }
}

/// Offset from the header of a medium page's `requested` array, past
/// its `capacity` size entries.
pub(super) const fn requested_at(capacity: usize) -> usize {
    (HEADER_BYTES + capacity).next_multiple_of(4)
}

/// The inverse of odd `m` modulo 2^32 (Newton's iteration: each step
/// doubles the bits that are right; `m` itself is right to 3 bits).
pub(super) const fn odd_inverse(m: u32) -> u32 {
    let mut x = m;
    let mut i = 0;
    while i < 4 {
        x = x.wrapping_mul(2u32.wrapping_sub(m.wrapping_mul(x)));
        i += 1;
    }
    x
}

/// `n / d` if `d` divides `n`, and else a value above `u32::MAX / d`, for
/// `d = m << shift` (`m` odd, `inverse` its `odd_inverse`) and any `n`: the
/// exact-division test of Hacker's Delight (10-16). Multiplying by the
/// inverse takes multiples of `m` to their quotients and every other value
/// above them; the rotation moves any of the low `shift` bits that are set
/// (`n` not a multiple of `1 << shift`) to the top.
#[inline]
pub(super) fn exact_quotient(n: u32, inverse: u32, shift: u32) -> u32 {
    n.wrapping_mul(inverse).rotate_right(shift)
}
