//! Offset-based collections for segments mapped at any address:
//! [`SharedVec<T>`] and [`SharedMap<K, V>`]. They hold offsets, never
//! pointers, so any process that maps the segment can use them, wherever its
//! mapping lies.
//!
//! A collection is plain data (`#[repr(C)]`, [`Shareable`](crate::Shareable)):
//! put it in the segment with [`Matrix::alloc_value`], usually inside a
//! [`ShmMutex`](crate::ShmMutex) when several processes change it, and hand
//! its [`Handle`](crate::Handle) to the others or publish it by name. Every
//! operation takes the `&Matrix` of the process calling it and checks,
//! before it makes a pointer, that the storage belongs to that segment, lies
//! in it, is aligned and is a live block large enough for what the
//! collection's fields say it holds: a damaged or foreign collection is a
//! typed error, never a stray access.
//!
//! Dropping a collection frees nothing: it cannot reach the segment without
//! a `&Matrix`, and a process that exits must not take with it storage that
//! others still use. Call `free(&m)` when it is no longer needed.
//!
//! ```
//! use matrix_alloc::collections::{SharedMap, SharedVec};
//! use matrix_alloc::{Matrix, ShmMutex};
//!
//! let m = Matrix::anonymous(16 << 20)?;
//! let h = m.alloc_value(ShmMutex::new(SharedVec::<u64>::new()))?;
//! m.publish("numbers", h)?;
//!
//! // In any process that opened the segment:
//! let h = m.lookup::<ShmMutex<SharedVec<u64>>>("numbers")?.unwrap();
//! let mut v = m.get(h)?.lock(&m)?;
//! v.extend_from_slice(&m, &[1, 2, 3])?;
//! assert_eq!(v.as_slice(&m)?, &[1, 2, 3]);
//!
//! let mut ages = SharedMap::<u64, u32>::new();
//! ages.insert(&m, 7, 70)?;
//! assert_eq!(ages.get(&m, &7)?, Some(&70));
//! ages.free(&m)?;
//! # v.free(&m)?;
//! # Ok::<(), matrix_alloc::Error>(())
//! ```

mod map;
mod vec;

pub use map::{Iter, SharedMap};
pub use vec::SharedVec;

use crate::{Error, Matrix, Offset};
use std::alloc::Layout;
use std::ptr::NonNull;

const _: () = assert!(
    usize::BITS == 64,
    "collections keep their lengths as u64 and assume a 64-bit usize"
);

/// Where a collection's elements are: the key of the segment they were
/// allocated in (0 while there are none) and their block's offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Storage {
    segment: u64,
    block: Offset,
}

impl Storage {
    const NONE: Storage = Storage {
        segment: 0,
        block: Offset::NULL,
    };

    fn is_none(self) -> bool {
        self.block.is_null()
    }

    /// A fresh block for `count` elements of `T` (`count > 0`, `T` sized).
    fn allocate<T>(m: &Matrix, count: u64) -> Result<(Storage, NonNull<T>), Error> {
        let layout = layout_of::<T>(count)?;
        let p = m.alloc(layout)?;
        let block = m.offset_of(p.as_ptr()).ok_or(Error::NotInSegment)?;
        let storage = Storage {
            segment: m.segment_key(),
            block,
        };
        Ok((storage, p.cast()))
    }

    /// The first of `count` elements of `T`, after checking that this
    /// storage is `m`'s and a live block with room for them. Zero elements
    /// of any type, and any number of a zero-sized type, need no storage.
    fn elements<T>(self, m: &Matrix, count: u64) -> Result<NonNull<T>, Error> {
        if self.is_none() {
            return if count == 0 || size_of::<T>() == 0 {
                Ok(NonNull::dangling())
            } else {
                Err(Error::Corrupt("collection holds elements but no storage"))
            };
        }
        if self.segment != m.segment_key() {
            return Err(Error::NotInSegment);
        }
        let p = m.resolve::<T>(self.block).ok_or(Error::InvalidHandle)?;
        let bytes = (size_of::<T>() as u64)
            .checked_mul(count)
            .ok_or(Error::Corrupt("collection capacity overflows"))?;
        if (m.live_block_len(p.as_ptr().cast())? as u64) < bytes {
            return Err(Error::StaleHandle);
        }
        Ok(p)
    }

    /// Moves `count` elements' storage to room for `new_count` (more).
    fn grow<T>(
        self,
        m: &Matrix,
        count: u64,
        new_count: u64,
    ) -> Result<(Storage, NonNull<T>), Error> {
        if self.is_none() {
            return Storage::allocate(m, new_count);
        }
        let old = self.elements::<T>(m, count)?;
        let layout = layout_of::<T>(new_count)?;
        // SAFETY: `old` is the start of a live block of `m` (checked by
        // `elements`) that only this collection refers to, and the caller
        // holds it exclusively (`&mut` of the collection).
        let p = unsafe { m.realloc(old.cast(), layout) }?;
        let block = m.offset_of(p.as_ptr()).ok_or(Error::NotInSegment)?;
        Ok((Storage { block, ..self }, p.cast()))
    }

    /// Frees the block, if there is one.
    fn release<T>(self, m: &Matrix, count: u64) -> Result<(), Error> {
        if self.is_none() {
            return Ok(());
        }
        let p = self.elements::<T>(m, count)?;
        // SAFETY: as in `grow`: a live block of `m` owned by the collection,
        // which the caller holds exclusively and stops using.
        unsafe { m.free(p.cast()) }
    }
}

fn layout_of<T>(count: u64) -> Result<Layout, Error> {
    let count = usize::try_from(count).map_err(|_| Error::InvalidLayout)?;
    Layout::array::<T>(count).map_err(|_| Error::InvalidLayout)
}

/// The capacity to grow to for `needed` elements from `cap`: at least
/// double, so that pushes cost amortised O(1).
fn grown_capacity(cap: u64, needed: u64, min: u64) -> u64 {
    needed.max(cap.saturating_mul(2)).max(min)
}
