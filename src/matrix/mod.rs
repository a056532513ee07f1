//! `Matrix`: a segment plus the engine in it, and the checked API.

use crate::cache::{self, reclaim_dead, reclaim_dead_slots, Reclaimed};
use crate::engine::words::GRANULE;
use crate::engine::{Engine, HeapReport, PageTable};
use crate::segment::{self, NamedPath, Segment};
use crate::shared::{leak, Shared, SharedRef};
use crate::stats::Delta;
use crate::{Error, Offset, Stats};
use std::alloc::Layout;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use uuid::Uuid;

mod alloc;

/// Where a matrix's memory comes from.
#[derive(Debug)]
enum Backing {
    /// A named segment under `/dev/shm`; `owner`: this handle created it and
    /// removes the name when dropped (unless told to keep it).
    Named { path: NamedPath, owner: bool },
    /// A file at a path; never removed by the crate.
    File(PathBuf),
    /// Private anonymous memory.
    Anonymous,
}

/// A lock-free allocator in a memory segment that many processes can map.
///
/// Blocks allocated by one process can be freed by any other process that
/// maps the same segment. `&Matrix` implements
/// [`allocator_api2::alloc::Allocator`], so std-style collections can live in
/// the segment.
///
/// # Lifetime of named segments
/// A handle made by [`Matrix::create`] owns the segment's name and removes it
/// when dropped, so a test or program that panics leaves nothing in
/// `/dev/shm`. Call [`Matrix::keep`] to leave the segment in place for other
/// processes; then remove it with [`Matrix::remove`]. Handles from
/// [`Matrix::open`] and [`Matrix::bootstrap`] never remove the name. Removing
/// the name does not unmap it: processes that have it open keep working.
pub struct Matrix {
    shared: SharedRef,
    /// A copy of the engine's page table (see `PageTable`).
    pages: PageTable,
    backing: Backing,
    keep: AtomicBool,
    /// This handle put its pinned segment in the `PinnedAlloc` registry,
    /// and takes it out when dropped.
    registered: bool,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrix")
            .field("id", &self.id())
            .field("backing", &self.backing)
            .field("size", &self.shared.segment.len())
            .finish()
    }
}

/// Where a block lies that [`Matrix::free_fast`] could not free, so that
/// [`Matrix::free_declined`] finishes the free without looking the page up
/// again in the page table.
///
/// One word, the page, so that it passes to an out-of-line slow path in a
/// register, and the fast path keeps no more values live than it needs for
/// itself (with the block's index too, the global allocator's `dealloc`
/// had to save a register). The slow path finds the index again from the
/// page's header, which the fast path has just read.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct Declined {
    /// The small-object page's header, or null for a block on no page (an
    /// engine block, or no block at all).
    page: *mut u8,
}

impl Matrix {
    fn from_segment(segment: Segment, backing: Backing) -> Matrix {
        let shared = Shared::join(segment);
        cache::reclaim_dead_bins(&shared.engine);
        let mut m = Matrix::with_shared(SharedRef::counted(shared), backing);
        if m.pinned_address().is_some() {
            crate::pinned::register(&m);
            m.registered = true;
        }
        m
    }

    /// Another handle to the same mapping, which never removes the name
    /// (for the pinned-segment registry).
    pub(crate) fn second_handle(&self) -> Matrix {
        Matrix::with_shared(self.shared.clone(), Backing::Anonymous)
    }

    pub(crate) fn shared_segment(&self) -> &Segment {
        &self.shared.segment
    }

    /// Where this process mapped the segment.
    pub(crate) fn base_address(&self) -> u64 {
        self.shared.segment.base() as u64
    }

    fn from_segment_leaked(segment: Segment, backing: Backing) -> Result<Matrix, Error> {
        let shared = Shared::join(segment);
        cache::reclaim_dead_bins(&shared.engine);
        let shared = SharedRef::leaked(leak(shared)?);
        Ok(Matrix::with_shared(shared, backing))
    }

    fn with_shared(shared: SharedRef, backing: Backing) -> Matrix {
        Matrix {
            pages: shared.engine.page_table(),
            shared,
            backing,
            keep: AtomicBool::new(false),
            registered: false,
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// How long ago this process mapped the segment.
    pub(crate) fn age(&self) -> std::time::Duration {
        self.shared.joined.elapsed()
    }

    /// Creates a new named shared-memory segment of `size` bytes under
    /// `/dev/shm`, named from a fresh uuid ([`Matrix::id`]).
    pub fn create(size: usize) -> Result<Matrix, Error> {
        Matrix::create_with_id(Uuid::new_v4(), size)
    }

    /// Creates a new named segment with a given id; fails with
    /// [`Error::AlreadyExists`] if it exists. The handle owns the name.
    pub fn create_with_id(id: Uuid, size: usize) -> Result<Matrix, Error> {
        Matrix::create_named(id, size, None)
    }

    /// A new named segment, owned by the handle, mapped at `pinned_at` if given.
    pub(crate) fn create_named(
        id: Uuid,
        size: usize,
        pinned_at: Option<u64>,
    ) -> Result<Matrix, Error> {
        let path = segment::named_path(&id);
        let seg = Segment::create_file(&path, size as u64, id, pinned_at)?;
        Ok(Matrix::from_segment(
            seg,
            Backing::Named { path, owner: true },
        ))
    }

    /// Like [`Matrix::create_with_id`], but without allocating from the
    /// heap, so that a global allocator can call it on its first call (see
    /// `matrix-alloc-global`). The mapping is never unmapped, even after the
    /// handle is dropped; the name is removed on drop as usual.
    pub fn create_with_id_leaked(id: Uuid, size: usize) -> Result<Matrix, Error> {
        let path = segment::named_path(&id);
        let seg = Segment::create_file(&path, size as u64, id, None)?;
        Matrix::from_segment_leaked(seg, Backing::Named { path, owner: true })
    }

    /// Opens the named segment `id` created by any process.
    pub fn open(id: Uuid) -> Result<Matrix, Error> {
        let path = segment::named_path(&id);
        let seg = Segment::open_file(&path, segment::OPEN_TIMEOUT)?;
        Ok(Matrix::from_segment(
            seg,
            Backing::Named { path, owner: false },
        ))
    }

    /// Creates the named segment `id` if it does not exist, else opens it.
    /// Safe when many processes race on the same id: exactly one formats it,
    /// the others wait (boundedly) until it is ready. The returned handle
    /// does not own the name: remove it with [`Matrix::remove`].
    pub fn bootstrap(id: Uuid, size: usize) -> Result<Matrix, Error> {
        let path = segment::named_path(&id);
        // A segment removed between our create and open attempts is retried;
        // a few rounds suffice unless someone removes it in a loop.
        let mut last = None;
        for _ in 0..8 {
            match Segment::create_file(&path, size as u64, id, None) {
                Ok(seg) => {
                    return Ok(Matrix::from_segment(
                        seg,
                        Backing::Named { path, owner: false },
                    ))
                }
                Err(Error::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
            match Segment::open_file(&path, segment::RACE_TIMEOUT) {
                Ok(seg) => {
                    return Ok(Matrix::from_segment(
                        seg,
                        Backing::Named { path, owner: false },
                    ))
                }
                Err(e @ Error::NotFound(_)) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::NotFound(path.to_path_buf())))
    }

    /// Creates a segment in a new regular file at `path` (which must not
    /// exist). The file outlives the processes; it is never removed by the crate.
    pub fn create_file(path: impl AsRef<Path>, size: usize) -> Result<Matrix, Error> {
        let path = path.as_ref();
        let seg = Segment::create_file(path, size as u64, Uuid::new_v4(), None)?;
        Ok(Matrix::from_segment(seg, Backing::File(path.to_path_buf())))
    }

    /// Opens a segment file made by [`Matrix::create_file`].
    pub fn open_file(path: impl AsRef<Path>) -> Result<Matrix, Error> {
        let path = path.as_ref();
        let seg = Segment::open_file(path, segment::OPEN_TIMEOUT)?;
        Ok(Matrix::from_segment(seg, Backing::File(path.to_path_buf())))
    }

    /// Creates a segment in private anonymous memory (no name, this process only).
    pub fn anonymous(size: usize) -> Result<Matrix, Error> {
        let seg = Segment::anonymous(size as u64, Uuid::new_v4())?;
        Ok(Matrix::from_segment(seg, Backing::Anonymous))
    }

    /// Like [`Matrix::anonymous`], but without allocating from the heap (see
    /// [`Matrix::create_with_id_leaked`]). The mapping is never unmapped.
    pub fn anonymous_leaked(size: usize) -> Result<Matrix, Error> {
        let seg = Segment::anonymous(size as u64, Uuid::new_v4())?;
        Matrix::from_segment_leaked(seg, Backing::Anonymous)
    }

    /// Removes the named segment `id`. Processes that have it mapped keep
    /// using it; the memory is released when the last of them unmaps it.
    pub fn remove(id: Uuid) -> Result<(), Error> {
        let path = segment::named_path(&id);
        std::fs::remove_file(&*path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(path.to_path_buf()),
            _ => Error::Io(e),
        })
    }

    /// Keeps a named segment after this (creating) handle is dropped.
    pub fn keep(&self) {
        self.keep.store(true, Relaxed);
    }

    /// The segment's id. For named segments it is also the name.
    pub fn id(&self) -> Uuid {
        self.shared.segment.id()
    }

    /// The file behind the segment, if any.
    pub fn path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Named { path, .. } => Some(path),
            Backing::File(path) => Some(path),
            Backing::Anonymous => None,
        }
    }

    /// Size of the whole segment in bytes.
    pub fn segment_size(&self) -> usize {
        self.shared.segment.len()
    }

    /// Heap bytes: what blocks (headers included) can occupy.
    pub fn capacity(&self) -> usize {
        self.engine().capacity() as usize
    }

    /// The segment's counters, over all processes using it. The calling
    /// thread's pending counter changes (through any handle) are applied
    /// first; other threads apply theirs every 1024 operations (or 4 MiB
    /// requested) and when they exit, unless the segment counts exactly
    /// ([`Matrix::exact_counts`]). Every read has `max_bytes >= curr_bytes`,
    /// and `max_blocks` is the block count of the state whose bytes are
    /// `max_bytes`.
    pub fn stats(&self) -> Stats {
        self.flush_counters();
        stats_of(self.engine())
    }

    /// Starts the peaks (`max_bytes`, `max_blocks`, `max_block_bytes`) afresh
    /// from the current values and returns the counters as they are then:
    /// the base of a profiling window, as dhat starts one (see
    /// [`Stats::since`]). Other threads' batched changes join at their next
    /// flush, so a window is exact for work done by the calling thread.
    pub fn reset_peak(&self) -> Stats {
        self.flush_counters();
        self.engine().counters().reset_peak();
        // Re-bases this thread's batch on the new peak.
        self.flush_counters();
        self.stats()
    }

    /// Switches the segment to exact counting, for profiling: every
    /// allocation, free and reallocation is applied to the shared counters
    /// at once, so that the six dhat numbers of [`Matrix::stats`] equal
    /// dhat's on any number of threads and processes (the default batches
    /// them per thread, see the README's "Counters"). Costs speed: the
    /// per-thread fast paths are skipped.
    ///
    /// The mode belongs to the segment, so it holds for every process that
    /// maps it. Use it on a new segment, before other threads count in it:
    /// a thread that already has changes batched applies them, and counts
    /// exactly from then on, at its next flush (at most `FLUSH_EVERY`
    /// operations later).
    ///
    /// ```
    /// # use matrix_alloc::Matrix;
    /// let m = Matrix::anonymous(8 << 20)?.exact_counts();
    /// assert!(m.counts_exactly());
    /// # Ok::<(), matrix_alloc::Error>(())
    /// ```
    pub fn exact_counts(self) -> Matrix {
        self.flush_counters();
        self.engine().counters().set_exact(true);
        // Re-bases this thread's batch in the new mode.
        self.flush_counters();
        self
    }

    /// Whether the segment counts exactly (see [`Matrix::exact_counts`]).
    pub fn counts_exactly(&self) -> bool {
        self.engine().counters().is_exact()
    }

    fn flush_counters(&self) {
        cache::flush_thread();
    }

    /// Records a counter change through this thread's batch (or directly,
    /// for a thread without a cache).
    fn count(&self, change: impl Fn(&mut Delta) -> bool) {
        let counters = self.engine().counters();
        let batched = cache::with_heap(&self.shared, |h| {
            if change(&mut h.delta) {
                counters.flush(&mut h.delta);
            }
        });
        if batched.is_none() {
            let mut d = counters.fresh_delta();
            change(&mut d);
            counters.flush(&mut d);
        }
    }

    /// Gives back memory that the per-thread caches hold without using it:
    /// the calling thread's empty pages and cached blocks, and abandoned
    /// pages (of threads that exited) whose blocks have all been freed
    /// since; then gives the pages of every free block back to the OS
    /// (`MADV_DONTNEED`, or a hole punched in the file of memory shared
    /// through one). After every block is freed and every other thread has exited,
    /// `trim()` leaves the heap one free block again.
    pub fn trim(&self) {
        cache::trim(&self.shared);
    }

    /// Takes back what processes that died held: free memory they were
    /// splitting or merging inside the engine goes back to the heap, and
    /// their small-object pages are taken over (blocks they had freed
    /// become reusable, empty pages go back to the heap). Runs by itself
    /// when the heap runs out of memory. What stays lost is the block each
    /// of their threads was allocating or freeing at that instant.
    pub fn reclaim_dead(&self) -> Reclaimed {
        reclaim_dead(self.engine())
    }

    /// Test hook for crash tests: runs the engine's last-resort sweep of
    /// the free lists (which otherwise runs only when the node table is
    /// exhausted), so that a child can be killed at every step of it
    /// (`tests/processes.rs`).
    #[doc(hidden)]
    pub fn sweep_free_lists(&self) {
        self.engine().sweep_dead();
    }

    /// Walks the heap and verifies every invariant: the blocks cover the heap
    /// exactly, free blocks are merged and filed in the right lists, lists are
    /// acyclic and disjoint, and bitmaps agree. Small blocks in pages are
    /// counted from the pages. Whether the counters agree with the blocks is
    /// reported in [`HeapReport::counters_agree`] rather than failing the
    /// check: a process killed between changing the heap and counting it
    /// leaves them off by that one operation, and other threads' pending
    /// counter changes (see [`Matrix::stats`]) are not in them yet.
    ///
    /// Exact only while no thread or process is allocating or freeing.
    pub fn check(&self) -> Result<HeapReport, Error> {
        self.flush_counters();
        check_segment(self.engine())
    }

    /// The offset of `ptr` in this segment, if it points into it.
    pub fn offset_of<T: ?Sized>(&self, ptr: *const T) -> Option<Offset> {
        let off = (ptr as *const u8 as usize).checked_sub(self.shared.segment.base() as usize)?;
        (off > 0 && off < self.shared.segment.len()).then_some(Offset(off as u64))
    }

    /// A pointer to a `T` at `offset`, if one fits there: not null, in
    /// bounds, and aligned for `T`. Dereferencing it is up to the caller.
    pub fn resolve<T>(&self, offset: Offset) -> Option<NonNull<T>> {
        let off = usize::try_from(offset.0).ok()?;
        let end = off.checked_add(size_of::<T>())?;
        if offset.is_null() || end > self.shared.segment.len() || off % align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: `off` is in bounds of the mapping, checked above.
        NonNull::new(unsafe { self.shared.segment.base().add(off) }.cast())
    }
}

impl Drop for Matrix {
    fn drop(&mut self) {
        cache::retire_if_last(&self.shared);
        if self.registered {
            crate::pinned::unregister(self.base_address());
        }
        if let Backing::Named { path, owner: true } = &self.backing {
            if !self.keep.load(Relaxed) {
                let _ = std::fs::remove_file(&**path);
            }
        }
    }
}

/// `Matrix::check` without flushing this thread's counters: reads only,
/// so it also runs over a read-only mapping (`Inspector::check`).
pub(crate) fn check_segment(engine: &Engine) -> Result<HeapReport, Error> {
    let mut report = engine.check()?;
    let pages = cache::census(engine)
        .map_err(|p| Error::HeapCorrupt(format!("page {p} has a damaged header")))?;
    report.pages = pages.pages;
    // The engine counted each page as one used block whose requested bytes
    // are its payload, and each cache record as a used block. (Checked:
    // in a damaged segment the page table may mark more pages than the
    // engine found blocks.)
    let bins = cache::bin_census(engine);
    let unaccounted = || Error::HeapCorrupt("more pages and cache records than used blocks".into());
    report.used_blocks = (report.used_blocks + pages.blocks)
        .checked_sub(pages.pages + bins.records)
        .ok_or_else(unaccounted)?;
    report.requested_bytes = (report.requested_bytes + pages.bytes)
        .checked_sub(pages.page_payloads + bins.record_bytes)
        .ok_or_else(unaccounted)?;
    if bins.inconsistent != 0 {
        return Err(Error::HeapCorrupt(format!(
            "{} block caches disagree with their counts",
            bins.inconsistent
        )));
    }
    // Cached blocks off every list were lost by a killed owner.
    report.orphaned_blocks += report.cached_blocks.saturating_sub(bins.blocks);
    report.orphaned_bytes += report.cached_bytes.saturating_sub(bins.block_bytes);
    let s = engine.counters().snapshot(0, 0);
    report.counters_agree = report.used_blocks == s.curr_blocks
        && report.requested_bytes == s.curr_bytes
        && report.used_bytes == s.block_bytes;
    Ok(report)
}

/// The counters of the segment as they are (`Matrix::stats` after its
/// flush); reads only.
pub(crate) fn stats_of(engine: &Engine) -> Stats {
    let mut s = engine
        .counters()
        .snapshot(engine.capacity(), engine.largest_free());
    s.cached_bytes = cache::cached_bytes(engine);
    s
}
