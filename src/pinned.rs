//! Pinned segments: mapped at the same address in every process, so that
//! std-style collections with absolute pointers (`allocator_api2::vec::Vec`,
//! `hashbrown::HashMap`) stored in the segment work from any process.
//!
//! The address is chosen when the segment is made (at random in
//! `DEFAULT_RANGE`, or by the caller), kept in the header, and every
//! `Matrix::open` of the segment maps it there with `MAP_FIXED_NOREPLACE`:
//! `Error::AddressInUse` if something else of that process is in the way.
//!
//! Collections allocate through [`PinnedAlloc`]: a `Copy` allocator handle
//! that is only the segment's address, valid in every process that has the
//! segment open. It finds the process's `Matrix` for that address in a
//! process-wide registry, filled when the segment is made or opened and
//! emptied when that `Matrix` is dropped. An allocation through a handle
//! whose segment this process has not open fails (`AllocError`); a free
//! through one is dropped (the memory stays allocated in the segment).

use crate::segment::{DEFAULT_ALIGN, DEFAULT_RANGE};
use crate::{Error, Matrix, Shareable};
use allocator_api2::alloc::{AllocError, Allocator};
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::RwLock;

/// The hasher state to use for a `hashbrown::HashMap` in a segment: the
/// same in every process (SipHash-1-3 with fixed keys, std's
/// `DefaultHasher::new()`). hashbrown's default `RandomState` draws its keys
/// per process, so another process would look for every key in the wrong
/// place. Fixed keys mean that whoever chooses the keys can choose
/// colliding ones: do not key a shared map by untrusted input.
pub type FixedState = std::hash::BuildHasherDefault<std::hash::DefaultHasher>;

/// A `Copy` allocator handle for a pinned segment, valid in every process
/// that has it open (see the module documentation).
///
/// ```
/// use allocator_api2::vec::Vec;
/// use matrix_alloc::{Matrix, PinnedAlloc};
///
/// let m = Matrix::create_pinned(16 << 20)?;
/// let mut v: Vec<u64, PinnedAlloc> = Vec::new_in(m.pinned_alloc()?);
/// v.extend([1, 2, 3]);
/// assert!(m.offset_of(v.as_ptr()).is_some());
/// # Ok::<(), matrix_alloc::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct PinnedAlloc {
    /// The segment's address: the same in every process.
    base: u64,
}

// SAFETY: an address that means the same in every process mapping the
// pinned segment; no process-local pointer.
unsafe impl Shareable for PinnedAlloc {}
// SAFETY: a zero-sized hasher builder without state.
unsafe impl Shareable for FixedState {}
// SAFETY: its buffer is in the pinned segment (its allocator is a
// `PinnedAlloc`), at the same address in every process; elements are
// shareable.
unsafe impl<T: Shareable> Shareable for allocator_api2::vec::Vec<T, PinnedAlloc> {}
// SAFETY: as for the vector: its table is in the pinned segment, and the
// hasher state is the same everywhere.
unsafe impl<K: Shareable, V: Shareable> Shareable
    for hashbrown::HashMap<K, V, FixedState, PinnedAlloc>
{
}

/// The pinned segments this process has open: address, and a handle of
/// its own to each (so that allocations through a `PinnedAlloc` need no
/// `Matrix` at hand).
static REGISTRY: RwLock<Vec<(u64, Matrix)>> = RwLock::new(Vec::new());

/// Makes `m`'s segment reachable through `PinnedAlloc` in this process.
pub(crate) fn register(m: &Matrix) {
    let base = m.base_address();
    let mut r = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    if r.iter().all(|(b, _)| *b != base) {
        r.push((base, m.second_handle()));
    }
}

/// Forgets `base` (when the `Matrix` that registered it is dropped).
pub(crate) fn unregister(base: u64) {
    let gone = {
        let mut r = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
        r.iter()
            .position(|(b, _)| *b == base)
            .map(|i| r.swap_remove(i))
    };
    // Dropped outside the lock: dropping a `Matrix` may unmap.
    drop(gone);
}

fn with_matrix<R>(base: u64, f: impl FnOnce(&Matrix) -> R) -> Option<R> {
    let r = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    r.iter().find(|(b, _)| *b == base).map(|(_, m)| f(m))
}

// SAFETY: every call goes to the `&Matrix` allocator of the one segment at
// `base` (the registry holds one handle per address), whose blocks stay
// valid until freed through any handle of that segment.
unsafe impl Allocator for PinnedAlloc {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        with_matrix(self.base, |m| m.allocate(layout)).unwrap_or(Err(AllocError))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract; the block is of the segment at `base`.
        with_matrix(self.base, |m| unsafe { m.deallocate(ptr, layout) });
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract.
        with_matrix(self.base, |m| unsafe { m.grow(ptr, old, new) }).unwrap_or(Err(AllocError))
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract.
        with_matrix(self.base, |m| unsafe { m.shrink(ptr, old, new) }).unwrap_or(Err(AllocError))
    }
}

impl Matrix {
    /// Creates a named segment that every process maps at the same address,
    /// chosen at random in a range Linux leaves empty (see the module
    /// documentation); another address is tried if one is in use here.
    pub fn create_pinned(size: usize) -> Result<Matrix, Error> {
        let id = uuid::Uuid::new_v4();
        let slots = (DEFAULT_RANGE.1 - DEFAULT_RANGE.0) / DEFAULT_ALIGN;
        let mut last = None;
        for attempt in 0..8u128 {
            let pick = (id.as_u128().wrapping_add(attempt * 0x9e37_79b9) % slots as u128) as u64;
            match Matrix::create_pinned_at(DEFAULT_RANGE.0 + pick * DEFAULT_ALIGN, size) {
                Err(e @ Error::AddressInUse { .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or(Error::InvalidLayout))
    }

    /// Creates a named pinned segment at `address` (a multiple of 4096):
    /// `Error::AddressInUse` if anything of this process is mapped there.
    pub fn create_pinned_at(address: u64, size: usize) -> Result<Matrix, Error> {
        Matrix::create_named(uuid::Uuid::new_v4(), size, Some(address))
    }

    /// Opens the named segment `id`, which must be pinned: mapped at its
    /// address, or `Error::AddressInUse`. (`Matrix::open` maps a pinned
    /// segment at its address too; this one also refuses an unpinned one.)
    pub fn open_pinned(id: uuid::Uuid) -> Result<Matrix, Error> {
        let m = Matrix::open(id)?;
        if m.pinned_address().is_none() {
            return Err(Error::Unsupported("the segment is not pinned"));
        }
        Ok(m)
    }

    /// The address every process maps this segment at, if it is pinned.
    pub fn pinned_address(&self) -> Option<u64> {
        self.shared_segment().pinned_at()
    }

    /// The allocator handle for collections in this pinned segment.
    pub fn pinned_alloc(&self) -> Result<PinnedAlloc, Error> {
        let base = self
            .pinned_address()
            .ok_or(Error::Unsupported("the segment is not pinned"))?;
        Ok(PinnedAlloc { base })
    }
}
