//! Typed, position-independent handles to objects in a segment, and the
//! `Shareable` marker for the types that may live there.
//!
//! A [`Handle<T>`] is 8 bytes of plain data: the object's offset in the
//! segment (in 16-byte granules), a tag of the segment and a tag of the type.
//! It means the same in every process that maps the segment, wherever the
//! mapping lies, so it can be stored in the segment, published by name (see
//! [`crate::directory`]) or sent over a pipe. Resolving one
//! ([`Matrix::get`]) checks, before any pointer is made, that it names this
//! segment, lies in its heap, is aligned for `T`, is the start of a live
//! block large enough for `T`, and was made for `T`; anything else is a typed
//! error.
//!
//! What the check cannot see: a block freed and allocated again since, for
//! an object of the same type (its bits are then a live `T` again, just not
//! the one the handle was made for). The blocks front end's generations catch
//! that; here it is the user's protocol, as with any pointer.

use crate::{Error, Matrix, Offset};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Types that may live in a segment and be read by another process.
///
/// # Safety
/// Implement it only for a type that:
/// - holds no pointer or reference into process-local memory (the heap,
///   stacks, statics, code: no `Box`, `String`, `&T`, `fn` pointers or trait
///   objects); offsets and [`Handle`]s are fine, and so are pointers into a
///   *pinned* segment, for objects stored in that segment (see
///   [`Matrix::create_pinned`](crate::Matrix::create_pinned));
/// - has no `Drop` that frees process memory;
/// - has the same layout in every process built from the same code
///   (`#[repr(C)]` structs of such fields, primitives, arrays and tuples);
/// - is valid for any bits that a live object of the type can leave in
///   memory another process may be writing (use atomics or a
///   [`ShmMutex`](crate::ShmMutex) for what several processes change).
///
/// The [`shareable!`](crate::shareable) macro declares a `#[repr(C)]` struct
/// and implements this for it after checking that every field is
/// `Shareable`. Process-local types are refused at compile time:
///
/// ```compile_fail,E0277
/// # use matrix_alloc::Matrix;
/// let m = Matrix::anonymous(1 << 20).unwrap();
/// m.alloc_value(Box::new(1u64)); // Box<u64> is not Shareable
/// ```
/// ```compile_fail,E0277
/// # use matrix_alloc::Matrix;
/// let m = Matrix::anonymous(1 << 20).unwrap();
/// m.alloc_value(String::from("local")); // String is not Shareable
/// ```
/// ```compile_fail,E0277
/// # use matrix_alloc::Matrix;
/// let m = Matrix::anonymous(1 << 20).unwrap();
/// let x = 5u64;
/// m.alloc_value(&x); // &u64 is not Shareable
/// ```
pub unsafe trait Shareable: Sized + 'static {}

macro_rules! shareable_impls {
    ($($t:ty),* $(,)?) => {
        // SAFETY: plain values without pointers or `Drop`, the same layout
        // in every process.
        $(unsafe impl Shareable for $t {})*
    };
}

shareable_impls!(
    (),
    bool,
    char,
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    Offset,
    std::sync::atomic::AtomicBool,
    std::sync::atomic::AtomicU8,
    std::sync::atomic::AtomicU16,
    std::sync::atomic::AtomicU32,
    std::sync::atomic::AtomicU64,
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicI8,
    std::sync::atomic::AtomicI16,
    std::sync::atomic::AtomicI32,
    std::sync::atomic::AtomicI64,
    std::sync::atomic::AtomicIsize,
);

// SAFETY: an array of shareable values is laid out the same everywhere.
unsafe impl<T: Shareable, const N: usize> Shareable for [T; N] {}
// SAFETY: offset-based, plain data (see `Handle`).
unsafe impl<T: 'static> Shareable for Handle<T> {}
// SAFETY: no data at all.
unsafe impl<T: 'static> Shareable for PhantomData<T> {}

macro_rules! shareable_tuples {
    ($(($($n:ident),+)),* $(,)?) => {
        // SAFETY: tuples of shareable values: one layout per build, which
        // every process of the same code shares.
        $(unsafe impl<$($n: Shareable),+> Shareable for ($($n,)+) {})*
    };
}

shareable_tuples!(
    (A),
    (A, B),
    (A, B, C),
    (A, B, C, D),
    (A, B, C, D, E),
    (A, B, C, D, E, F),
    (A, B, C, D, E, F, G),
    (A, B, C, D, E, F, G, H),
);

/// Declares a `#[repr(C)]` struct and implements [`Shareable`] for it, after
/// checking at compile time that every field's type is `Shareable`.
///
/// ```
/// use matrix_alloc::{shareable, Matrix};
///
/// shareable! {
///     #[derive(Debug, Clone, Copy, PartialEq)]
///     pub struct Point { pub x: i32, pub y: i32 }
/// }
///
/// let m = Matrix::anonymous(1 << 20)?;
/// let h = m.alloc_value(Point { x: 1, y: 2 })?;
/// assert_eq!(*m.get(h)?, Point { x: 1, y: 2 });
/// # Ok::<(), matrix_alloc::Error>(())
/// ```
///
/// A field that is not `Shareable` does not compile:
///
/// ```compile_fail,E0277
/// matrix_alloc::shareable! {
///     pub struct Bad { pub name: String }
/// }
/// ```
#[macro_export]
macro_rules! shareable {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($fvis:vis $field:ident : $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        $vis struct $name {
            $($fvis $field: $ty),*
        }

        // SAFETY: `#[repr(C)]`, and every field is `Shareable` (checked by
        // the function below, which does not compile otherwise).
        unsafe impl $crate::Shareable for $name {}

        const _: () = {
            fn all_fields_shareable() {
                fn shareable<T: $crate::Shareable>() {}
                $(shareable::<$ty>();)*
            }
        };
    };
}

/// A typed, position-independent handle to a `T` in a segment: `Copy`,
/// 8 bytes, the same in every process (see the module documentation).
///
/// Made by [`Matrix::handle`] or [`Matrix::alloc_value`]; resolved by
/// [`Matrix::get`].
#[repr(transparent)]
pub struct Handle<T> {
    /// Bits 0..32: offset / 16; 32..48: segment tag; 48..64: type tag.
    raw: u64,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Handle<T> {}
impl<T> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl<T> Eq for Handle<T> {}
impl<T> std::fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Handle<{}>({:#x})",
            std::any::type_name::<T>(),
            self.offset().0
        )
    }
}

const _: () = assert!(size_of::<Handle<u64>>() == 8);

/// Offsets are multiples of this in a handle (the engine's granule).
const HANDLE_GRANULE: u64 = 16;

impl<T> Handle<T> {
    /// The handle's bits, to send to another process or store as plain data.
    pub const fn to_raw(self) -> u64 {
        self.raw
    }

    /// A handle from bits made by [`Handle::to_raw`]. Any bits are safe:
    /// resolving checks them.
    pub const fn from_raw(raw: u64) -> Handle<T> {
        Handle {
            raw,
            _type: PhantomData,
        }
    }

    /// The object's offset in its segment.
    pub const fn offset(self) -> Offset {
        Offset((self.raw & 0xffff_ffff) * HANDLE_GRANULE)
    }

    fn segment_tag(self) -> u16 {
        (self.raw >> 32) as u16
    }

    fn type_tag(self) -> u16 {
        (self.raw >> 48) as u16
    }
}

/// What identifies a type across processes built from the same code: its
/// name's hash, size and alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TypeIdentity {
    pub(crate) hash: u64,
    pub(crate) size: u64,
    pub(crate) align: u64,
}

impl TypeIdentity {
    pub(crate) fn of<T>() -> TypeIdentity {
        TypeIdentity {
            hash: fnv1a(std::any::type_name::<T>().as_bytes()),
            size: size_of::<T>() as u64,
            align: align_of::<T>() as u64,
        }
    }

    /// 16 bits of it, for a handle.
    fn tag(self) -> u16 {
        let h = self.hash ^ self.size.rotate_left(17) ^ self.align.rotate_left(41);
        (h ^ h >> 16 ^ h >> 32 ^ h >> 48) as u16
    }
}

/// FNV-1a: a fixed hash, the same in every process and build.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Matrix {
    /// A key of this segment's id, never 0: what collections record to
    /// tell their own segment's storage from another's.
    pub(crate) fn segment_key(&self) -> u64 {
        fnv1a(self.id().as_bytes()).max(1)
    }

    fn segment_tag(&self) -> u16 {
        let h = self.segment_key();
        (h ^ h >> 16 ^ h >> 32 ^ h >> 48) as u16
    }

    /// A handle to `value`, which must be an object at the start of a live
    /// block of this segment (as [`Matrix::alloc_value`] makes, or a
    /// collection's storage).
    pub fn handle<T: Shareable>(&self, value: &T) -> Result<Handle<T>, Error> {
        let off = self.offset_of(value).ok_or(Error::NotInSegment)?;
        if off.0 % HANDLE_GRANULE != 0 {
            return Err(Error::InvalidHandle);
        }
        let h = Handle::from_raw(
            (off.0 / HANDLE_GRANULE)
                | ((self.segment_tag() as u64) << 32)
                | ((TypeIdentity::of::<T>().tag() as u64) << 48),
        );
        self.get_ptr(h)?;
        Ok(h)
    }

    /// Where `h`'s object is, after every check (see the module
    /// documentation). Dereferencing it is up to the caller: use
    /// [`Matrix::get`] for a shared reference.
    pub fn get_ptr<T: Shareable>(&self, h: Handle<T>) -> Result<NonNull<T>, Error> {
        if h.segment_tag() != self.segment_tag() {
            return Err(Error::ForeignHandle);
        }
        if h.type_tag() != TypeIdentity::of::<T>().tag() {
            return Err(Error::TypeMismatch {
                expected: std::any::type_name::<T>().into(),
                found: "another type (the handle's type tag differs)".into(),
            });
        }
        let p = self.resolve::<T>(h.offset()).ok_or(Error::InvalidHandle)?;
        if self.live_block_len(p.as_ptr().cast())? < size_of::<T>() {
            return Err(Error::StaleHandle);
        }
        Ok(p)
    }

    /// The object `h` names, after every check (see the module documentation).
    pub fn get<T: Shareable>(&self, h: Handle<T>) -> Result<&T, Error> {
        let p = self.get_ptr(h)?;
        // A live block for a `T` (checked by `get_ptr`), valid for any bits a
        // `T` leaves (`Shareable`); `free_value`'s contract keeps it alive.
        // SAFETY: so `p` may be read as a `&T` for as long as `&self`.
        Ok(unsafe { p.as_ref() })
    }

    /// Allocates a block for `value`, moves it there and returns its handle.
    pub fn alloc_value<T: Shareable>(&self, value: T) -> Result<Handle<T>, Error> {
        let p = self.alloc(std::alloc::Layout::new::<T>())?.cast::<T>();
        // SAFETY: a fresh block, aligned and large enough for a `T`.
        unsafe { p.as_ptr().write(value) };
        // SAFETY: just written.
        self.handle(unsafe { p.as_ref() })
    }

    /// Frees the object `h` names, dropping it in place first.
    ///
    /// # Safety
    /// - no reference to the object (from [`Matrix::get`], in any process)
    ///   may be used after this call;
    /// - no other thread or process frees it at the same time.
    pub unsafe fn free_value<T: Shareable>(&self, h: Handle<T>) -> Result<(), Error> {
        let p = self.get_ptr(h)?;
        // SAFETY: a live `T` (checked), no longer used (caller's contract).
        unsafe { std::ptr::drop_in_place(p.as_ptr()) };
        // SAFETY: the start of a live block of this segment (checked), not
        // used after this (caller's contract).
        unsafe { self.free(p.cast()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_fields_do_not_overlap() {
        let h = Handle::<u64>::from_raw(0x1234_5678 | 0xabcd << 32 | 0xef01 << 48);
        assert_eq!(h.offset().0, 0x1234_5678 * 16);
        assert_eq!(h.segment_tag(), 0xabcd);
        assert_eq!(h.type_tag(), 0xef01);
        assert_eq!(Handle::<u64>::from_raw(h.to_raw()), h);
    }

    #[test]
    fn type_identities_differ_by_name_size_and_alignment() {
        assert_ne!(TypeIdentity::of::<u64>(), TypeIdentity::of::<i64>());
        assert_ne!(TypeIdentity::of::<[u8; 8]>(), TypeIdentity::of::<[u8; 9]>());
        assert_eq!(TypeIdentity::of::<u64>(), TypeIdentity::of::<u64>());
        assert_ne!(
            TypeIdentity::of::<u64>().tag(),
            TypeIdentity::of::<u32>().tag()
        );
    }
}
