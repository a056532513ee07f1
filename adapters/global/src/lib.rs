//! The matrix as Rust's global allocator.
//!
//! ```no_run
//! use matrix_alloc_global::MatrixGlobal;
//!
//! #[global_allocator]
//! static GLOBAL: MatrixGlobal = MatrixGlobal::new();
//!
//! fn main() {
//!     let v: Vec<u64> = (0..1000).collect();
//!     let stats = GLOBAL.stats().expect("the segment is mapped");
//!     assert!(stats.curr_bytes >= 8000);
//!     drop(v);
//! }
//! ```
//!
//! The segment is mapped on the first allocation (Rust's runtime makes one
//! before `main`). Making it does not allocate: the matrix is built with
//! [`Matrix::anonymous_leaked`] or [`Matrix::create_with_id_leaked`] and
//! kept in the static itself. Threads that allocate while another thread is
//! mapping the segment wait for it (a few hundred microseconds, once).
//!
//! By default the segment is private anonymous memory of
//! [`MatrixGlobal::DEFAULT_SIZE`] bytes, reserved but committed only as it
//! is used. [`MatrixGlobal::named`] makes it a named shared segment instead,
//! so that another process can open it (`Matrix::open(id)`) and read the
//! running program's heap statistics or check its heap; its name is removed
//! when the program exits normally.
//!
//! Choices made where a global allocator has no way to report an error:
//! - If the segment cannot be made (bad size, `/dev/shm` full), the reason is
//!   written to stderr once and every allocation returns null, which Rust
//!   turns into its "memory allocation failed" abort.
//! - Freeing a pointer that is not a live block of the segment (a double
//!   free, a foreign pointer) writes the error to stderr and aborts: a
//!   global allocator must not unwind, and going on would corrupt memory.

use matrix_alloc::{Declined, Error, Matrix, Stats};
use std::alloc::{GlobalAlloc, Layout};
use std::cell::{Cell, UnsafeCell};
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::*};
use uuid::Uuid;

mod early;
use early::Early;

/// The matrix as a global allocator: `#[global_allocator] static GLOBAL:
/// MatrixGlobal = MatrixGlobal::new();`. See the crate documentation.
pub struct MatrixGlobal {
    size: usize,
    backing: Backing,
    /// The segment counts exactly (`Matrix::exact_counts`).
    exact: bool,
    /// `UNMAPPED` → `MAPPING` (one thread maps the segment) → `READY` or
    /// `FAILED`; never back.
    state: AtomicU8,
    /// Written once by the mapping thread, before the `Release` store of
    /// `READY`/`FAILED`; read only after an `Acquire` load of either.
    made: UnsafeCell<MaybeUninit<Result<Matrix, Error>>>,
    /// Serves allocations that the mapping thread itself makes while it maps
    /// (none are expected: see `early_bytes`).
    early: Early,
}

#[derive(Clone, Copy)]
enum Backing {
    Private,
    Named { id: Option<Uuid>, keep: bool },
}

const UNMAPPED: u8 = 0;
const MAPPING: u8 = 1;
const READY: u8 = 2;
const FAILED: u8 = 3;

// SAFETY: `made` is written by one thread before `state` is published with
// `Release` and only read after an `Acquire` load sees it published;
// `Matrix` is `Sync`, and `Early` hands out disjoint ranges atomically.
unsafe impl Sync for MatrixGlobal {}

thread_local! {
    /// Whether this thread is mapping a segment right now (so that its own
    /// allocations, if any, are served from `early` instead of waiting for
    /// itself). Const-initialised and without destructor: reading it never
    /// allocates.
    static MAPPING_HERE: Cell<bool> = const { Cell::new(false) };
}

impl MatrixGlobal {
    /// The default reserved size: 16 GiB of address space, committed only as
    /// it is used.
    pub const DEFAULT_SIZE: usize = 16 << 30;

    /// A private segment of [`MatrixGlobal::DEFAULT_SIZE`] bytes.
    pub const fn new() -> MatrixGlobal {
        MatrixGlobal {
            size: MatrixGlobal::DEFAULT_SIZE,
            backing: Backing::Private,
            exact: false,
            state: AtomicU8::new(UNMAPPED),
            made: UnsafeCell::new(MaybeUninit::uninit()),
            early: Early::new(),
        }
    }

    /// Sets the segment size in bytes (between `matrix_alloc::MIN_SEGMENT_SIZE`
    /// and `MAX_SEGMENT_SIZE`; another size makes every allocation fail, see
    /// the crate documentation).
    pub const fn size(mut self, bytes: usize) -> MatrixGlobal {
        self.size = bytes;
        self
    }

    /// Uses a named shared segment under `/dev/shm`, with a fresh id, that
    /// other processes can open; see [`MatrixGlobal::id`]. The name is
    /// removed when the program exits normally (not when it is killed).
    pub const fn named(mut self) -> MatrixGlobal {
        self.backing = Backing::Named {
            id: None,
            keep: false,
        };
        self
    }

    /// Uses the named shared segment `id` (created by this program; it must
    /// not exist yet), so that other processes know its name in advance.
    pub const fn named_with_id(mut self, id: Uuid) -> MatrixGlobal {
        self.backing = Backing::Named {
            id: Some(id),
            keep: false,
        };
        self
    }

    /// Leaves the named segment in place when the program exits, for a
    /// post-mortem look; remove it with `Matrix::remove(id)`.
    pub const fn keep_name(mut self) -> MatrixGlobal {
        if let Backing::Named { id, .. } = self.backing {
            self.backing = Backing::Named { id, keep: true };
        }
        self
    }

    /// Counts every allocation and free at once in the shared counters, so
    /// that [`MatrixGlobal::stats`] gives dhat's six numbers exactly on any
    /// number of threads, at the cost of speed (see `Matrix::exact_counts`).
    /// The default batches counts per thread: exact for one thread, within
    /// a bound on many (the README's "Counters").
    pub const fn exact_counts(mut self) -> MatrixGlobal {
        self.exact = true;
        self
    }

    /// The matrix behind the allocator, mapping it if this is the first use;
    /// the error if it could not be made.
    pub fn matrix(&self) -> Result<&Matrix, &Error> {
        match self.made() {
            Some(made) => made.as_ref(),
            None => unreachable_while_mapping(),
        }
    }

    /// The matrix's counters (see `Matrix::stats`).
    pub fn stats(&self) -> Result<Stats, &Error> {
        self.matrix().map(Matrix::stats)
    }

    /// The segment's id; for a named segment, the name other processes open.
    pub fn id(&self) -> Result<Uuid, &Error> {
        self.matrix().map(Matrix::id)
    }

    /// Bytes handed out from the small static arena that serves allocations
    /// made *while* the segment is being mapped. Mapping makes none, so this
    /// stays 0; it is here so that tests can check that.
    pub fn early_bytes(&self) -> usize {
        self.early.used()
    }

    /// The made matrix (or error), or `None` when called by the thread that
    /// is mapping it right now.
    #[inline]
    fn made(&self) -> Option<&Result<Matrix, Error>> {
        if self.state.load(Acquire) >= READY {
            // SAFETY: published (see `made`); never written again.
            return Some(unsafe { (*self.made.get()).assume_init_ref() });
        }
        self.map_slow()
    }

    #[cold]
    #[inline(never)]
    fn map_slow(&self) -> Option<&Result<Matrix, Error>> {
        loop {
            match self
                .state
                .compare_exchange(UNMAPPED, MAPPING, Acquire, Acquire)
            {
                Ok(_) => {
                    MAPPING_HERE.with(|m| m.set(true));
                    let made = self.make();
                    let failed = made.is_err();
                    if let Err(e) = &made {
                        report("matrix-alloc-global: cannot map the segment: ", e);
                    }
                    // SAFETY: only the thread that won the CAS writes, once,
                    // before publishing.
                    unsafe { (*self.made.get()).write(made) };
                    self.state
                        .store(if failed { FAILED } else { READY }, Release);
                    MAPPING_HERE.with(|m| m.set(false));
                }
                Err(MAPPING) if MAPPING_HERE.with(Cell::get) => return None,
                Err(MAPPING) => std::thread::yield_now(),
                Err(_) => {
                    // SAFETY: READY or FAILED: published.
                    return Some(unsafe { (*self.made.get()).assume_init_ref() });
                }
            }
        }
    }

    fn make(&self) -> Result<Matrix, Error> {
        let m = self.make_segment()?;
        Ok(if self.exact { m.exact_counts() } else { m })
    }

    fn make_segment(&self) -> Result<Matrix, Error> {
        match self.backing {
            Backing::Private => Matrix::anonymous_leaked(self.size),
            Backing::Named { id, keep } => {
                let m = Matrix::create_with_id_leaked(id.unwrap_or_else(Uuid::new_v4), self.size)?;
                if !keep {
                    remove_at_exit(m.id());
                }
                Ok(m)
            }
        }
    }
}

impl MatrixGlobal {
    /// The matrix and the pointer handed to `dealloc` or `realloc`, if the
    /// matrix is mapped and the pointer is not null.
    #[inline]
    fn mapped(&self, ptr: *mut u8) -> Option<(&Matrix, NonNull<u8>)> {
        match (self.made(), NonNull::new(ptr)) {
            (Some(Ok(m)), Some(p)) => Some((m, p)),
            _ => None,
        }
    }

    /// The matrix, if it is mapped and usable: one load and compare, for
    /// the fast paths (which leave every other case to the slow ones).
    #[inline]
    fn ready(&self) -> Option<&Matrix> {
        if self.state.load(Acquire) != READY {
            return None;
        }
        // SAFETY: published (see `made`); never written again.
        match unsafe { (*self.made.get()).assume_init_ref() } {
            Ok(m) => Some(m),
            // SAFETY: `READY` is stored only after an `Ok` was written
            // (`map_slow`); saying so spares the fast paths a test.
            Err(_) => unsafe { std::hint::unreachable_unchecked() },
        }
    }

    /// `GlobalAlloc::alloc` beyond the cache's fast path.
    #[cold]
    #[inline(never)]
    fn alloc_slow(&self, layout: Layout) -> *mut u8 {
        match self.made() {
            Some(Ok(m)) => m
                .alloc(layout)
                .map_or(std::ptr::null_mut(), NonNull::as_ptr),
            Some(Err(_)) => std::ptr::null_mut(),
            None => self.early.alloc(layout),
        }
    }

    /// `GlobalAlloc::dealloc` of a block the cache's fast path declined:
    /// another thread's block (the consumer of a producer/consumer pair), an
    /// engine block, a counter flush, or a pointer the matrix refuses. The
    /// matrix finishes the free from where the fast path found the block.
    ///
    /// # Safety
    /// As for `GlobalAlloc::dealloc`; `declined` is what `m.free_fast`
    /// returned for `ptr`.
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_declined(&self, m: &Matrix, ptr: NonNull<u8>, declined: Declined) {
        // SAFETY: forwarded contract.
        let freed = unsafe { m.free_declined(ptr, declined) };
        self.freed_or_abort(ptr.as_ptr(), freed);
    }

    /// `GlobalAlloc::dealloc` before the matrix is ready, or of null.
    ///
    /// # Safety
    /// As for `GlobalAlloc::dealloc`.
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_slow(&self, ptr: *mut u8) {
        if let Some((m, p)) = self.mapped(ptr) {
            // SAFETY: the caller's `GlobalAlloc` contract: `ptr` is a live
            // block of this allocator that is not used after this call.
            let freed = unsafe { m.free(p) };
            return self.freed_or_abort(ptr, freed);
        }
        if !self.early.contains(ptr) {
            never_gave_out("matrix-alloc-global: dealloc: ");
        }
    }

    /// The end of a `dealloc` by the matrix: a refused pointer is fine if it
    /// lies in the early arena (arena memory is never reused, and lies
    /// outside the segment, which `free` checks before it changes anything);
    /// anything else refused aborts.
    fn freed_or_abort(&self, ptr: *mut u8, freed: Result<(), Error>) {
        match freed {
            Ok(()) => {}
            Err(_) if self.early.contains(ptr) => {}
            Err(e) => fatal_error("matrix-alloc-global: dealloc: ", &e),
        }
    }

    /// `mapped`, or abort (after `what` on stderr): this allocator never
    /// gave the pointer out.
    #[inline]
    fn owner_of(&self, ptr: *mut u8, what: &str) -> (&Matrix, NonNull<u8>) {
        self.mapped(ptr).unwrap_or_else(|| never_gave_out(what))
    }
}

#[cold]
#[inline(never)]
fn never_gave_out(what: &str) -> ! {
    write_stderr(&[what, "a pointer this allocator never gave out\n"]);
    std::process::abort()
}

impl Default for MatrixGlobal {
    fn default() -> MatrixGlobal {
        MatrixGlobal::new()
    }
}

/// `matrix()` is public, and the mapping thread never calls it while
/// mapping (the matrix crate does not know it is the global allocator).
fn unreachable_while_mapping() -> ! {
    fatal("matrix-alloc-global: the allocator was queried while it maps its segment")
}

// SAFETY: every block comes from the matrix (or from `early` during
// mapping), is at least `layout.size()` bytes, aligned to `layout.align()`,
// and disjoint from every other live block; `dealloc` and `realloc` accept
// exactly the blocks handed out.
//
// `alloc` and `dealloc` try the matrix's call-free fast paths first and
// leave everything else to an out-of-line function: the fast function then
// needs no stack frame and saves no registers (as mimalloc's `mi_malloc`
// and `mi_free`), which the pair of calls per allocation otherwise paid.
unsafe impl GlobalAlloc for MatrixGlobal {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(p) = self.ready().and_then(|m| m.alloc_fast(layout)) {
            return p.as_ptr();
        }
        self.alloc_slow(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        if let (Some(m), Some(p)) = (self.ready(), NonNull::new(ptr)) {
            // SAFETY: the caller's `GlobalAlloc` contract: `ptr` is a live
            // block of this allocator that is not used after this call.
            match unsafe { m.free_fast(p) } {
                Ok(()) => return,
                // SAFETY: forwarded contract; `d` is what `free_fast` said.
                Err(d) => return unsafe { self.dealloc_declined(m, p, d) },
            }
        }
        // SAFETY: forwarded contract.
        unsafe { self.dealloc_slow(ptr) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        if self.early.contains(ptr) {
            // SAFETY: `new` is a valid layout of non-zero size (the caller's
            // contract); the copy stays inside both blocks.
            unsafe {
                let dst = self.alloc(new);
                if !dst.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, dst, layout.size().min(new_size));
                }
                return dst;
            }
        }
        let (m, p) = self.owner_of(ptr, "matrix-alloc-global: realloc: ");
        // SAFETY: the caller's contract: `ptr` is a live block of ours, and
        // on success it is no longer used unless returned.
        match unsafe { m.realloc(p, new) } {
            Ok(q) => q.as_ptr(),
            Err(Error::OutOfMemory { .. }) => std::ptr::null_mut(),
            Err(e) => fatal_error("matrix-alloc-global: realloc: ", &e),
        }
    }
}

// ---- reporting without allocating --------------------------------------------

/// Writes `prefix` and a short description of `e` to stderr, without
/// allocating (the allocator may be what failed).
fn report(prefix: &str, e: &Error) {
    let what = match e {
        Error::Io(_) => "an operating-system call failed",
        Error::AlreadyExists(_) => "a segment with this id already exists",
        Error::InvalidSize { .. } => "the segment size is out of range",
        Error::DoubleFree => "double free (the block is not allocated)",
        Error::InvalidPointer => "the pointer is not a block of this segment",
        Error::OutOfMemory { .. } => "out of memory",
        _ => "the segment is unusable",
    };
    write_stderr(&[prefix, what, "\n"]);
}

/// `report`, then abort.
fn fatal_error(prefix: &str, e: &Error) -> ! {
    report(prefix, e);
    std::process::abort()
}

fn fatal(message: &str) -> ! {
    write_stderr(&[message, "\n"]);
    std::process::abort()
}

fn write_stderr(parts: &[&str]) {
    for part in parts {
        // SAFETY: writes `part.len()` bytes from a live `&str` to fd 2.
        let _ = unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
}

// ---- removing names at exit --------------------------------------------------

/// Named segments whose names `atexit` removes: ids as two halves (there is
/// no 128-bit atomic on stable Rust); a slot is claimed via `REMOVE_COUNT`.
const MAX_NAMED: usize = 8;
static REMOVE_IDS: [[AtomicU64; 2]; MAX_NAMED] =
    [const { [AtomicU64::new(0), AtomicU64::new(0)] }; MAX_NAMED];
static REMOVE_COUNT: AtomicUsize = AtomicUsize::new(0);

fn remove_at_exit(id: Uuid) {
    let i = REMOVE_COUNT.fetch_add(1, Relaxed);
    if i >= MAX_NAMED {
        return; // beyond 8 named global segments, names are left in place
    }
    let (hi, lo) = id.as_u64_pair();
    REMOVE_IDS[i][0].store(hi, Relaxed);
    REMOVE_IDS[i][1].store(lo, Release);
    if i == 0 {
        // SAFETY: registers a plain `extern "C" fn()`, as atexit requires.
        unsafe { libc::atexit(remove_names) };
    }
}

extern "C" fn remove_names() {
    for ids in REMOVE_IDS.iter() {
        let (hi, lo) = (ids[0].load(Relaxed), ids[1].load(Acquire));
        if hi != 0 || lo != 0 {
            let _ = Matrix::remove(Uuid::from_u64_pair(hi, lo));
        }
    }
}
