//! `SharedVec<T>`: a growable array whose elements live in a segment,
//! reached by offset.

use super::{grown_capacity, Storage};
use crate::{Error, Matrix, Shareable};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A growable array in a segment, usable from every process that maps it,
/// at any address (see the [module documentation](super)).
///
/// It is `Vec` with the segment's `&Matrix` passed to each operation that
/// reaches the elements; each such operation checks the storage first and
/// returns an [`Error`] where `Vec` would panic or where the storage is not
/// what the fields say (another segment's, freed, damaged).
///
/// ```
/// use matrix_alloc::collections::SharedVec;
/// use matrix_alloc::Matrix;
///
/// let m = Matrix::anonymous(16 << 20)?;
/// let mut v = SharedVec::new();
/// for i in 0..1000u32 {
///     v.push(&m, i)?;
/// }
/// assert_eq!(v.len(), 1000);
/// assert_eq!(v.get(&m, 999)?, Some(&999));
/// assert_eq!(v.pop(&m)?, Some(999));
/// v.as_mut_slice(&m)?[0] = 7;
/// assert_eq!(v.as_slice(&m)?[..3], [7, 1, 2]);
/// v.free(&m)?;
/// assert_eq!(m.check()?.used_blocks, 0);
/// # Ok::<(), matrix_alloc::Error>(())
/// ```
#[repr(C)]
pub struct SharedVec<T> {
    storage: Storage,
    len: u64,
    cap: u64,
    _elements: PhantomData<T>,
}

// SAFETY: offsets and counts only; the elements are `Shareable` and live in
// the segment.
unsafe impl<T: Shareable> Shareable for SharedVec<T> {}

impl<T> Default for SharedVec<T> {
    fn default() -> Self {
        SharedVec::new()
    }
}

impl<T> std::fmt::Debug for SharedVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedVec")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .field("storage", &self.storage.block)
            .finish()
    }
}

impl<T> SharedVec<T> {
    /// An empty vector; it allocates nothing until elements are added.
    pub const fn new() -> Self {
        SharedVec {
            storage: Storage::NONE,
            len: 0,
            cap: 0,
            _elements: PhantomData,
        }
    }
}

impl<T: Shareable> SharedVec<T> {
    /// An empty vector with room for `capacity` elements in `m`.
    pub fn with_capacity(m: &Matrix, capacity: usize) -> Result<Self, Error> {
        let mut v = SharedVec::new();
        v.reserve(m, capacity)?;
        Ok(v)
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many elements fit without growing (`usize::MAX` for a
    /// zero-sized `T`, which needs no storage).
    pub fn capacity(&self) -> usize {
        if size_of::<T>() == 0 {
            usize::MAX
        } else {
            self.cap as usize
        }
    }

    /// The first element's place, after the checks (see the type's docs).
    fn base(&self, m: &Matrix) -> Result<NonNull<T>, Error> {
        if self.len > self.cap && size_of::<T>() != 0 {
            return Err(Error::Corrupt("SharedVec length exceeds its capacity"));
        }
        self.storage.elements(m, self.cap)
    }

    /// Makes room for at least `additional` more elements.
    pub fn reserve(&mut self, m: &Matrix, additional: usize) -> Result<(), Error> {
        let needed = self
            .len
            .checked_add(additional as u64)
            .ok_or(Error::InvalidLayout)?;
        if size_of::<T>() == 0 || needed <= self.cap {
            return Ok(());
        }
        self.base(m)?;
        let cap = grown_capacity(self.cap, needed, 4);
        let (storage, _) = self.storage.grow::<T>(m, self.cap, cap)?;
        self.storage = storage;
        self.cap = cap;
        Ok(())
    }

    /// Appends `value`. If no room can be made, the error is returned and
    /// `value` dropped; the vector is unchanged.
    pub fn push(&mut self, m: &Matrix, value: T) -> Result<(), Error> {
        self.reserve(m, 1)?;
        let base = self.base(m)?;
        // SAFETY: `len < cap` after `reserve`, so slot `len` is in the live
        // block `base` was checked to start (or `T` is zero-sized).
        unsafe { base.as_ptr().add(self.len as usize).write(value) };
        self.len += 1;
        Ok(())
    }

    /// Removes the last element and returns it.
    pub fn pop(&mut self, m: &Matrix) -> Result<Option<T>, Error> {
        let base = self.base(m)?;
        if self.len == 0 {
            return Ok(None);
        }
        self.len -= 1;
        // SAFETY: slot `len` held an initialised element (it was below the
        // old length) and is outside the vector from now on.
        Ok(Some(unsafe { base.as_ptr().add(self.len as usize).read() }))
    }

    /// The elements.
    pub fn as_slice<'a>(&'a self, m: &'a Matrix) -> Result<&'a [T], Error> {
        let base = self.base(m)?;
        // SAFETY: the first `len` slots are initialised elements in a live
        // block of `m` (checked), which lives while `m` does and is freed
        // only through `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts(base.as_ptr(), self.len as usize) })
    }

    /// The elements, to change in place.
    pub fn as_mut_slice<'a>(&'a mut self, m: &'a Matrix) -> Result<&'a mut [T], Error> {
        let base = self.base(m)?;
        // SAFETY: as in `as_slice`; `&mut self` makes the access exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(base.as_ptr(), self.len as usize) })
    }

    /// The element at `index`, if there is one.
    pub fn get<'a>(&'a self, m: &'a Matrix, index: usize) -> Result<Option<&'a T>, Error> {
        Ok(self.as_slice(m)?.get(index))
    }

    /// The element at `index`, to change in place, if there is one.
    pub fn get_mut<'a>(
        &'a mut self,
        m: &'a Matrix,
        index: usize,
    ) -> Result<Option<&'a mut T>, Error> {
        Ok(self.as_mut_slice(m)?.get_mut(index))
    }

    /// Appends clones of `items`.
    pub fn extend_from_slice(&mut self, m: &Matrix, items: &[T]) -> Result<(), Error>
    where
        T: Clone,
    {
        self.reserve(m, items.len())?;
        for item in items {
            self.push(m, item.clone())?;
        }
        Ok(())
    }

    /// Drops the elements from `len` on; nothing if there are fewer.
    pub fn truncate(&mut self, m: &Matrix, len: usize) -> Result<(), Error> {
        let base = self.base(m)?;
        while self.len > len as u64 {
            self.len -= 1;
            // SAFETY: as in `pop`, dropped in place instead of returned.
            unsafe { base.as_ptr().add(self.len as usize).drop_in_place() };
        }
        Ok(())
    }

    /// Drops every element; the capacity stays.
    pub fn clear(&mut self, m: &Matrix) -> Result<(), Error> {
        self.truncate(m, 0)
    }

    /// Drops every element and frees the storage: the vector is empty and
    /// allocates nothing, and can be used again.
    pub fn free(&mut self, m: &Matrix) -> Result<(), Error> {
        self.clear(m)?;
        self.storage.release::<T>(m, self.cap)?;
        *self = SharedVec::new();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_keeps_order_and_frees_everything() {
        let m = Matrix::anonymous(8 << 20).unwrap();
        let mut v = SharedVec::<u64>::with_capacity(&m, 3).unwrap();
        assert!(v.capacity() >= 3);
        for i in 0..10_000 {
            v.push(&m, i * 3).unwrap();
        }
        assert!(v
            .as_slice(&m)
            .unwrap()
            .iter()
            .copied()
            .eq((0..10_000).map(|i| i * 3)));
        v.truncate(&m, 10).unwrap();
        assert_eq!(v.len(), 10);
        v.free(&m).unwrap();
        assert_eq!((v.len(), v.capacity()), (0, 0));
        m.trim();
        let r = m.check().unwrap();
        assert_eq!((r.used_blocks, r.free_blocks), (0, 1));
    }

    #[test]
    fn zero_sized_elements_need_no_storage() {
        let m = Matrix::anonymous(1 << 20).unwrap();
        let mut v = SharedVec::<()>::new();
        for _ in 0..100 {
            v.push(&m, ()).unwrap();
        }
        assert_eq!((v.len(), v.pop(&m).unwrap()), (100, Some(())));
        assert_eq!(m.check().unwrap().used_blocks, 0);
    }

    #[test]
    fn another_segments_matrix_is_refused() {
        let a = Matrix::anonymous(1 << 20).unwrap();
        let b = Matrix::anonymous(1 << 20).unwrap();
        let mut v = SharedVec::<u32>::new();
        v.push(&a, 1).unwrap();
        assert!(matches!(v.as_slice(&b), Err(Error::NotInSegment)));
        assert!(matches!(v.push(&b, 2), Err(Error::NotInSegment)));
        assert!(matches!(v.free(&b), Err(Error::NotInSegment)));
        assert_eq!(v.as_slice(&a).unwrap(), &[1]);
        v.free(&a).unwrap();
    }

    #[test]
    fn damaged_fields_are_errors() {
        let m = Matrix::anonymous(1 << 20).unwrap();
        let mut v = SharedVec::<u64>::new();
        v.push(&m, 1).unwrap();
        let cap = v.cap;
        v.len = cap + 1;
        assert!(matches!(v.as_slice(&m), Err(Error::Corrupt(_))));
        v.len = 1;
        v.cap = 1 << 40;
        assert!(matches!(v.as_slice(&m), Err(Error::StaleHandle)));
        v.cap = cap;
        let block = v.storage.block;
        v.storage.block = crate::Offset(block.0 + 4);
        assert!(v.as_slice(&m).is_err());
        v.storage.block = crate::Offset(u64::MAX - 7);
        assert!(matches!(v.as_slice(&m), Err(Error::InvalidHandle)));
        v.storage.block = block;
        v.free(&m).unwrap();
        assert_eq!(m.check().unwrap().used_blocks, 0);
    }
}
