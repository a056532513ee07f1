//! The thread-local registry: which heap this thread uses for which
//! segment, the fast-path lookup, and teardown at thread exit.

use super::*;

const MAX_HEAPS: usize = 4;

struct Heaps {
    entries: [Option<Heap>; MAX_HEAPS],
}

impl Drop for Heaps {
    fn drop(&mut self) {
        // From here on this thread takes the uncached path.
        let _ = FAST.try_with(|f| {
            f.heap.set(std::ptr::null_mut());
            f.shared.set(BUSY);
        });
        for entry in self.entries.iter_mut() {
            if let Some(mut heap) = entry.take() {
                heap.retire();
            }
        }
    }
}

thread_local! {
    static HEAPS: UnsafeCell<Heaps> = const {
        UnsafeCell::new(Heaps { entries: [const { None }; MAX_HEAPS] })
    };
}

/// This thread's fast path: the heap it used last and for which segment.
/// `shared` is `BUSY` while a slow path borrows a heap (re-entry, e.g. an
/// allocation made from inside the cache code when the matrix is the global
/// allocator, then takes the uncached path instead of aliasing the heap)
/// and after the thread's heaps are torn down; so the one comparison of
/// `shared` in `with_heap` checks both the segment and that no heap is
/// borrowed. The fast paths make no calls, so nothing can re-enter while
/// they hold the heap, and they leave `shared` as it is. It has no
/// destructor, so reading it is a plain thread-local load; `heap` points
/// into `HEAPS`, whose entries do not move, and is reset whenever an entry
/// is retired (`find`) or the thread exits. Separate cells, so that each
/// access is one load or store.
struct Fast {
    shared: Cell<*const crate::shared::Shared>,
    heap: Cell<*mut Heap>,
}

/// `Fast::shared` while a heap is borrowed: an address no `Shared` has.
const BUSY: *const crate::shared::Shared = NonNull::dangling().as_ptr();

impl Fast {
    fn forget(&self) {
        self.shared.set(std::ptr::null());
        self.heap.set(std::ptr::null_mut());
    }
}

thread_local! {
    static FAST: Fast = const {
        Fast {
            shared: Cell::new(std::ptr::null()),
            heap: Cell::new(std::ptr::null_mut()),
        }
    };
}

/// This thread's `FAST`.
#[inline(always)]
fn fast() -> &'static Fast {
    // Taking the reference out of `with` keeps `LocalKey::with` small
    // enough to inline into every caller.
    FAST.with(|fast| {
        // SAFETY: `FAST` is const-initialised and has no destructor, so its
        // storage is a plain thread-local static that lives as long as the
        // thread: the reference stays valid past `with`.
        unsafe { &*(fast as *const Fast) }
    })
}

/// Runs `f` on this thread's heap for `shared` if it is the segment the
/// thread used last and no slow path borrows a heap; `None` otherwise.
/// Makes no call of its own, and no store: for the fast paths.
///
/// # Safety
/// `f` makes no call that could reach the cache again: nothing else on
/// this thread may use the heap while `f` holds it. (A signal handler that
/// allocates could interrupt `f`; allocating in a signal handler is not
/// supported, as with `malloc`.)
#[inline(always)]
pub(crate) unsafe fn with_heap_fast<R>(
    shared: &SharedRef,
    f: impl FnOnce(&mut Heap) -> Option<R>,
) -> Option<R> {
    let fast = fast();
    // `shared` is never `BUSY`, so a match also says no slow path borrows
    // a heap.
    if fast.shared.get() != shared.as_ptr() {
        return None;
    }
    // SAFETY: a remembered segment always has its heap, live in `HEAPS`;
    // no other reference to it is live (no slow path holds it, and the
    // caller's `f` cannot make one).
    f(unsafe { &mut *fast.heap.get() })
}

/// Runs `f` on this thread's heap for `shared`, creating it if needed.
/// `None` when no heap can be had: during thread teardown, on re-entry, or
/// when the thread already caches `MAX_HEAPS` other live segments.
#[inline(always)]
pub(crate) fn with_heap<R>(shared: &SharedRef, f: impl FnOnce(&mut Heap) -> R) -> Option<R> {
    let fast = fast();
    // `shared` is never `BUSY`, so a match also says no heap is borrowed;
    // and a remembered segment always has its heap.
    let heap = if fast.shared.get() == shared.as_ptr() {
        fast.heap.get()
    } else {
        let heap = find(shared, fast);
        if heap.is_null() {
            return None;
        }
        heap
    };
    // `BUSY` for the time `f` runs: a nested call (re-entry) finds no heap
    // instead of a second reference to this one.
    fast.shared.set(BUSY);
    // SAFETY: `heap` is a live entry of `HEAPS` (remembered, or just found),
    // and `BUSY` keeps this the only reference while `f` runs.
    let r = f(unsafe { &mut *heap });
    fast.shared.set(shared.as_ptr());
    Some(r)
}

/// Slow path of `with_heap`: finds or makes the heap and remembers it
/// (null while a heap is borrowed, or when there is none).
#[cold]
#[inline(never)]
fn find(shared: &SharedRef, fast: &Fast) -> *mut Heap {
    if fast.shared.get() == BUSY {
        return std::ptr::null_mut();
    }
    fast.shared.set(BUSY);
    let heap = HEAPS
        .try_with(|cell| {
            // SAFETY: the cell is this thread's and `BUSY` is set, so no
            // other reference into it is live.
            let heaps = unsafe { &mut *cell.get() };
            heaps
                .find_or_make(shared)
                .map_or(std::ptr::null_mut(), |h| h as *mut Heap)
        })
        .unwrap_or(std::ptr::null_mut());
    if heap.is_null() {
        fast.forget();
    } else {
        fast.shared.set(shared.as_ptr());
        fast.heap.set(heap);
    }
    heap
}

/// Applies the pending counter changes of every heap of the calling thread
/// (all handles, all segments), so that this thread's reads of the counters
/// include everything it did.
pub(crate) fn flush_thread() {
    let _ = FAST.try_with(|fast| {
        let remembered = fast.shared.get();
        if remembered == BUSY {
            return;
        }
        fast.shared.set(BUSY);
        let _ = HEAPS.try_with(|cell| {
            // SAFETY: as in `find`.
            let heaps = unsafe { &mut *cell.get() };
            for heap in heaps.entries.iter_mut().flatten() {
                heap.shared.engine.counters().flush(&mut heap.delta);
            }
        });
        fast.shared.set(remembered);
    });
}

/// The `Matrix` that holds `shared` goes: if this thread's heap for it is
/// the one other holder, retires the heap now (instead of when the thread
/// next makes a heap, or exits), so that its pages and cached blocks go
/// back while the segment is still in use.
pub(crate) fn retire_if_last(shared: &SharedRef) {
    let _ = FAST.try_with(|fast| {
        let mut remembered = fast.shared.get();
        if remembered == BUSY {
            return;
        }
        fast.shared.set(BUSY);
        let _ = HEAPS.try_with(|cell| {
            // SAFETY: as in `find`.
            let heaps = unsafe { &mut *cell.get() };
            for entry in heaps.entries.iter_mut() {
                let last = entry.as_ref().is_some_and(|h| {
                    h.shared.as_ptr() == shared.as_ptr() && h.shared.holders() == 2
                });
                if let Some(mut heap) = entry.take_if(|_| last) {
                    heap.retire();
                    if remembered == shared.as_ptr() {
                        remembered = std::ptr::null();
                        fast.heap.set(std::ptr::null_mut());
                    }
                }
            }
        });
        fast.shared.set(remembered);
    });
}

impl Heaps {
    #[inline]
    fn find_or_make(&mut self, shared: &SharedRef) -> Option<&mut Heap> {
        let at = self.entries.iter().position(|e| {
            e.as_ref()
                .is_some_and(|h| h.shared.as_ptr() == shared.as_ptr())
        });
        let at = match at {
            Some(i) => i,
            None => self.make(shared)?,
        };
        self.entries[at].as_mut()
    }

    #[cold]
    fn make(&mut self, shared: &SharedRef) -> Option<usize> {
        // Heaps of segments whose last `Matrix` is gone are retired first.
        for entry in self.entries.iter_mut() {
            if entry.as_ref().is_some_and(|h| h.shared.is_last()) {
                if let Some(mut heap) = entry.take() {
                    heap.retire();
                }
            }
        }
        let i = self.entries.iter().position(Option::is_none)?;
        self.entries[i] = Some(Heap::new(shared.clone()));
        Some(i)
    }
}
