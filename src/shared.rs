//! The state that every handle and thread cache of one segment in this
//! process shares: the mapping and the engine in it. Below the caches
//! (which hold it) and the `Matrix` (which makes it).

use crate::engine::Engine;
use crate::segment::Segment;
use crate::Error;
use std::ptr::NonNull;
use std::sync::Arc;

/// The mapping and the engine in it. Thread caches hold an `Arc` to it, so
/// the mapping outlives every cache that points into it.
pub(crate) struct Shared {
    // Declared before `segment`: the engine points into the mapping and is
    // dropped first.
    pub(crate) engine: Engine,
    pub(crate) segment: Segment,
    /// When this process mapped it (the start of its dhat profiles).
    pub(crate) joined: std::time::Instant,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.engine.leave();
    }
}

/// How a handle (and each thread cache made through it) holds the shared
/// state: reference-counted, or leaked for the rest of the process by the
/// allocation-free constructors that global allocators use. The pointer is
/// kept apart from the count so that the hot path reads it with one load.
#[derive(Clone)]
pub(crate) struct SharedRef {
    ptr: NonNull<Shared>,
    /// `None` for a leaked state.
    counted: Option<Arc<Shared>>,
}

// SAFETY: a `SharedRef` is an `Arc<Shared>` or a `&'static Shared`, both
// of which are `Send` and `Sync` because `Shared` is `Sync` and `Send`.
unsafe impl Send for SharedRef {}
// SAFETY: as above.
unsafe impl Sync for SharedRef {}

impl SharedRef {
    pub(crate) fn counted(shared: Shared) -> SharedRef {
        let arc = Arc::new(shared);
        SharedRef {
            ptr: NonNull::from(&*arc),
            counted: Some(arc),
        }
    }

    pub(crate) fn leaked(shared: &'static Shared) -> SharedRef {
        SharedRef {
            ptr: NonNull::from(shared),
            counted: None,
        }
    }

    #[inline]
    pub(crate) fn as_ptr(&self) -> *const Shared {
        self.ptr.as_ptr()
    }

    /// Whether nothing but this reference keeps the state alive (a leaked
    /// state is always kept).
    pub(crate) fn is_last(&self) -> bool {
        self.holders() == 1
    }

    /// How many references keep the state alive (`usize::MAX` for a leaked
    /// state, which is always kept).
    pub(crate) fn holders(&self) -> usize {
        self.counted.as_ref().map_or(usize::MAX, Arc::strong_count)
    }
}

impl std::ops::Deref for SharedRef {
    type Target = Shared;
    #[inline]
    fn deref(&self) -> &Shared {
        // SAFETY: `ptr` points to the `Arc`'s value, alive while `counted`
        // holds it, or to a leaked `Shared` that lives until the process ends.
        unsafe { self.ptr.as_ref() }
    }
}

/// Moves `shared` into memory of its own, mapped from the kernel (not the
/// heap, so that a global allocator can do this on its first call), and
/// never gives it back.
pub(crate) fn leak(shared: Shared) -> Result<&'static Shared, Error> {
    let len = size_of::<Shared>();
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    let p = p as *mut Shared;
    // SAFETY: `p` is page-aligned (enough for `Shared`), writable, at least
    // `len` bytes, and ours alone; it is never unmapped, so `'static` holds.
    unsafe {
        p.write(shared);
        Ok(&*p)
    }
}

impl Shared {
    pub(crate) fn join(segment: Segment) -> Shared {
        let mut engine = segment.engine();
        engine.join();
        Shared {
            engine,
            segment,
            joined: std::time::Instant::now(),
        }
    }
}
