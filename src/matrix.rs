//! `Matrix`: a segment plus the engine in it, and the checked API.

use crate::engine::words::GRANULE;
use crate::engine::{Engine, HeapReport};
use crate::segment::{self, Segment};
use crate::{Error, Offset, Stats};
use std::alloc::Layout;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use uuid::Uuid;

/// Where a matrix's memory comes from.
#[derive(Debug)]
enum Backing {
    /// A named segment under `/dev/shm`; `owner`: this handle created it and
    /// removes the name when dropped (unless told to keep it).
    Named { path: PathBuf, owner: bool },
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
    // Declared before `segment`: the engine points into the mapping and is
    // dropped first.
    engine: Engine,
    segment: Segment,
    backing: Backing,
    keep: AtomicBool,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrix")
            .field("id", &self.id())
            .field("backing", &self.backing)
            .field("size", &self.segment.len())
            .finish()
    }
}

impl Matrix {
    fn from_segment(segment: Segment, backing: Backing) -> Matrix {
        let mut engine = segment.engine();
        engine.join();
        Matrix {
            engine,
            segment,
            backing,
            keep: AtomicBool::new(false),
        }
    }

    /// Creates a new named shared-memory segment of `size` bytes under
    /// `/dev/shm`, named from a fresh uuid ([`Matrix::id`]).
    pub fn create(size: usize) -> Result<Matrix, Error> {
        Matrix::create_with_id(Uuid::new_v4(), size)
    }

    /// Creates a new named segment with a given id; fails with
    /// [`Error::AlreadyExists`] if it exists. The handle owns the name.
    pub fn create_with_id(id: Uuid, size: usize) -> Result<Matrix, Error> {
        let path = segment::named_path(&id);
        let seg = Segment::create_file(&path, size as u64, id)?;
        Ok(Matrix::from_segment(
            seg,
            Backing::Named { path, owner: true },
        ))
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
            match Segment::create_file(&path, size as u64, id) {
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
        Err(last.unwrap_or(Error::NotFound(path)))
    }

    /// Creates a segment in a new regular file at `path` (which must not
    /// exist). The file outlives the processes; it is never removed by the crate.
    pub fn create_file(path: impl AsRef<Path>, size: usize) -> Result<Matrix, Error> {
        let path = path.as_ref();
        let seg = Segment::create_file(path, size as u64, Uuid::new_v4())?;
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

    /// Removes the named segment `id`. Processes that have it mapped keep
    /// using it; the memory is released when the last of them unmaps it.
    pub fn remove(id: Uuid) -> Result<(), Error> {
        let path = segment::named_path(&id);
        std::fs::remove_file(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(path),
            _ => Error::Io(e),
        })
    }

    /// Keeps a named segment after this (creating) handle is dropped.
    pub fn keep(&self) {
        self.keep.store(true, Relaxed);
    }

    /// The segment's id. For named segments it is also the name.
    pub fn id(&self) -> Uuid {
        self.segment.id()
    }

    /// The file behind the segment, if any.
    pub fn path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Named { path, .. } | Backing::File(path) => Some(path),
            Backing::Anonymous => None,
        }
    }

    /// Size of the whole segment in bytes.
    pub fn segment_size(&self) -> usize {
        self.segment.len()
    }

    /// Heap bytes: what blocks (headers included) can occupy.
    pub fn capacity(&self) -> usize {
        self.engine.capacity() as usize
    }

    /// The segment's counters, over all processes using it.
    pub fn stats(&self) -> Stats {
        self.engine
            .counters()
            .snapshot(self.engine.capacity(), self.engine.largest_free())
    }

    /// Walks the heap and verifies every invariant: the blocks cover the heap
    /// exactly, free blocks are merged and filed in the right lists, lists are
    /// acyclic and disjoint, and bitmaps agree. Whether the counters agree
    /// with the blocks is reported in [`HeapReport::counters_agree`] rather
    /// than failing the check: a process killed between changing the heap
    /// and counting it leaves them off by that one operation.
    ///
    /// Exact only while no thread or process is allocating or freeing.
    pub fn check(&self) -> Result<HeapReport, Error> {
        let mut report = self.engine.check()?;
        let s = self.stats();
        report.counters_agree = report.used_blocks == s.curr_blocks
            && report.requested_bytes == s.curr_bytes
            && report.used_bytes == s.block_bytes;
        Ok(report)
    }

    /// The offset of `ptr` in this segment, if it points into it.
    pub fn offset_of<T: ?Sized>(&self, ptr: *const T) -> Option<Offset> {
        let off = (ptr as *const u8 as usize).checked_sub(self.segment.base() as usize)?;
        (off > 0 && off < self.segment.len()).then_some(Offset(off as u64))
    }

    /// A pointer to a `T` at `offset`, if one fits there: not null, in
    /// bounds, and aligned for `T`. Dereferencing it is up to the caller.
    pub fn resolve<T>(&self, offset: Offset) -> Option<NonNull<T>> {
        let off = usize::try_from(offset.0).ok()?;
        let end = off.checked_add(size_of::<T>())?;
        if offset.is_null() || end > self.segment.len() || off % align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: `off` is in bounds of the mapping, checked above.
        NonNull::new(unsafe { self.segment.base().add(off) }.cast())
    }

    // ---- the checked allocation API -------------------------------------------

    /// Allocates a block for `layout`. A zero size gets a minimal block of
    /// its own. Every power-of-two alignment is honoured.
    pub fn alloc(&self, layout: Layout) -> Result<NonNull<u8>, Error> {
        let a = self.engine.alloc(layout.size(), layout.align())?;
        self.engine
            .counters()
            .on_alloc(layout.size() as u64, a.block_bytes);
        // SAFETY: payload addresses are inside the mapping, never null.
        Ok(unsafe { NonNull::new_unchecked(self.engine.payload(a.pos)) })
    }

    /// Frees a block allocated from this segment, by any process.
    ///
    /// Returns [`Error::InvalidPointer`] for a pointer that is not a block of
    /// this segment and [`Error::DoubleFree`] for a block that is not
    /// allocated; both are detected before anything is changed.
    ///
    /// # Safety
    /// - `ptr` must not be used after this call (by anyone);
    /// - `ptr` must come from an allocation of this segment that has not been
    ///   freed since. Violations are detected as far as a header check can
    ///   (see the errors), but a pointer into the middle of a live block, or a
    ///   stale pointer to a block that was since reallocated, cannot always be.
    pub unsafe fn free(&self, ptr: NonNull<u8>) -> Result<(), Error> {
        let pos = self
            .engine
            .block_of(ptr.as_ptr())
            .ok_or(Error::InvalidPointer)?;
        let (requested, block_bytes) = self.engine.free(pos)?;
        self.engine.counters().on_free(requested, block_bytes);
        Ok(())
    }

    /// Resizes the block at `ptr` to `new` (size and alignment), in place
    /// when the neighbours allow, else by moving it. Counted as one
    /// reallocation, as dhat counts `realloc`.
    ///
    /// # Safety
    /// As for [`Matrix::free`]; on success the old pointer must no longer be
    /// used unless it equals the returned one.
    pub unsafe fn realloc(&self, ptr: NonNull<u8>, new: Layout) -> Result<NonNull<u8>, Error> {
        let pos = self
            .engine
            .block_of(ptr.as_ptr())
            .ok_or(Error::InvalidPointer)?;
        let header = self.engine.used_block(pos)?;
        let old_req = self.engine.requested(pos);
        let old_block = (header.size as u64) * GRANULE as u64;
        let counters = self.engine.counters();
        if (ptr.as_ptr() as usize) % new.align() == 0 {
            let in_place = if new.size() as u64 >= old_req {
                self.engine.grow_in_place(pos, new.size())
            } else {
                self.engine.shrink_in_place(pos, new.size())
            };
            if let Some(new_block) = in_place {
                counters.on_realloc(old_req, new.size() as u64, old_block, new_block);
                return Ok(ptr);
            }
        }
        let moved = self.engine.alloc(new.size(), new.align())?;
        let dst = self.engine.payload(moved.pos);
        let len = (old_req as usize).min(new.size());
        // SAFETY: both blocks are live and owned by the caller, distinct, and
        // at least `len` bytes long (`len` <= both requested sizes).
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), dst, len) };
        self.engine.free(pos)?;
        counters.on_realloc(old_req, new.size() as u64, old_block, moved.block_bytes);
        // SAFETY: payload addresses are never null.
        Ok(unsafe { NonNull::new_unchecked(dst) })
    }

    /// Payload bytes usable in the block at `ptr` (at least what was asked).
    pub fn usable_size(&self, ptr: NonNull<u8>) -> Option<usize> {
        let pos = self.engine.block_of(ptr.as_ptr())?;
        self.engine.used_block(pos).ok()?;
        Some(self.engine.usable(pos))
    }
}

impl Drop for Matrix {
    fn drop(&mut self) {
        self.engine.leave();
        if let Backing::Named { path, owner: true } = &self.backing {
            if !self.keep.load(Relaxed) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
