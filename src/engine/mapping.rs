//! TLSF size-class mapping (Masmano et al., "TLSF: a new dynamic memory
//! allocator for real-time systems", 2004), over sizes counted in granules.
//!
//! A size `s` maps to a first-level index (its power of two) and a
//! second-level index (one of `SL_COUNT` linear slices of that power of two).
//! Sizes below `SL_COUNT` granules map linearly into first level 0.
//! `map_floor` says which free list a block of size `s` belongs to;
//! `map_ceil` gives the first list whose every block is at least `s`.

/// log2 of the number of second-level lists per first level.
pub(crate) const SL_LOG: u32 = 4;
/// Second-level lists per first level.
pub(crate) const SL_COUNT: usize = 1 << SL_LOG;
/// First-level classes: enough for any `u32` granule count.
pub(crate) const FL_COUNT: usize = 32 - SL_LOG as usize + 1;

/// The list a free block of `size` granules is filed under. `size >= 1`.
#[inline]
pub(crate) fn map_floor(size: u32) -> (usize, usize) {
    debug_assert!(size > 0);
    if (size as usize) < SL_COUNT {
        return (0, size as usize);
    }
    let msb = 31 - size.leading_zeros();
    let sl = (size >> (msb - SL_LOG)) as usize ^ SL_COUNT;
    ((msb - SL_LOG + 1) as usize, sl)
}

/// The first list all of whose blocks hold at least `size` granules, or
/// `None` when no list can (the size is beyond the largest class).
#[inline]
pub(crate) fn map_ceil(size: u32) -> Option<(usize, usize)> {
    debug_assert!(size > 0);
    if (size as usize) < SL_COUNT {
        return Some((0, size as usize));
    }
    let msb = 31 - size.leading_zeros();
    let round = (1u32 << (msb - SL_LOG)) - 1;
    size.checked_add(round).map(|s| map_floor(s & !round))
}

/// The smallest size filed under list `(fl, sl)`.
#[cfg(test)]
pub(crate) fn class_min(fl: usize, sl: usize) -> u64 {
    if fl == 0 {
        sl as u64
    } else {
        let msb = fl as u32 + SL_LOG - 1;
        (1u64 << msb) + ((sl as u64) << (msb - SL_LOG))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_sizes_are_linear() {
        for s in 1..SL_COUNT as u32 {
            assert_eq!(map_floor(s), (0, s as usize));
            assert_eq!(map_ceil(s), Some((0, s as usize)));
        }
        assert_eq!(map_floor(16), (1, 0));
        assert_eq!(map_floor(31), (1, 15));
        assert_eq!(map_floor(32), (2, 0));
        assert_eq!(map_floor(u32::MAX), (FL_COUNT - 1, SL_COUNT - 1));
    }

    proptest! {
        #[test]
        fn floor_class_contains_size(s in 1u32..) {
            let (fl, sl) = map_floor(s);
            prop_assert!(fl < FL_COUNT && sl < SL_COUNT);
            prop_assert!(class_min(fl, sl) <= s as u64);
            // The next class starts above s.
            let next = if sl + 1 < SL_COUNT { class_min(fl, sl + 1) } else { class_min(fl + 1, 0) };
            prop_assert!((s as u64) < next);
        }

        #[test]
        fn ceil_class_fits_every_block(s in 1u32..) {
            if let Some((fl, sl)) = map_ceil(s) {
                prop_assert!(class_min(fl, sl) >= s as u64);
                prop_assert!((fl, sl) >= map_floor(s));
            } else {
                prop_assert!(s > (u32::MAX >> 1));
            }
        }
    }
}
