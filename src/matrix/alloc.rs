//! The checked allocation API of `Matrix`: allocate, free, reallocate,
//! with the per-thread caches' fast paths in front of the engine.

use super::*;

impl Matrix {
    /// Allocates a block for `layout`. A zero size gets a minimal block of
    /// its own. Every power-of-two alignment is honoured.
    ///
    /// ```
    /// # fn main() -> Result<(), matrix_alloc::Error> {
    /// use matrix_alloc::Matrix;
    /// use std::alloc::Layout;
    /// let m = Matrix::anonymous(1 << 20)?;
    /// let p = m.alloc(Layout::from_size_align(100, 64).unwrap())?;
    /// assert_eq!(p.as_ptr() as usize % 64, 0);
    /// // SAFETY: a fresh block of 100 bytes, freed once.
    /// unsafe {
    ///     p.as_ptr().write_bytes(7, 100);
    ///     m.free(p)?;
    /// }
    /// assert_eq!(m.stats().curr_blocks, 0);
    /// # Ok(())
    /// # }
    /// ```
    #[inline(always)]
    pub fn alloc(&self, layout: Layout) -> Result<NonNull<u8>, Error> {
        if let Some(p) = self.alloc_fast(layout) {
            return Ok(p);
        }
        self.alloc_slow(layout)
    }

    /// The call-free part of [`Matrix::alloc`]: a small block from this
    /// thread's cache, or `None` when more is needed (a new page, a counter
    /// flush, a large request, a thread without a cache), with nothing
    /// changed; `alloc` then does the rest. For adapters that keep their
    /// own slow path out of line, so that their fast path needs no stack
    /// frame (the global allocator).
    #[doc(hidden)]
    #[inline(always)]
    pub fn alloc_fast(&self, layout: Layout) -> Option<NonNull<u8>> {
        if !cache::is_small(layout.size(), layout.align()) {
            return None;
        }
        let size = layout.size();
        // SAFETY: `alloc_fast` makes no calls.
        unsafe { cache::with_heap_fast(&self.shared, |h| h.alloc_fast(size)) }
    }

    /// Everything the call-free fast path leaves: a new page or a counter
    /// flush for a small request, large or over-aligned requests, and
    /// threads without a cache. Kept out of line so that the fast path
    /// stays small.
    #[cold]
    #[inline(never)]
    fn alloc_slow(&self, layout: Layout) -> Result<NonNull<u8>, Error> {
        if cache::is_small(layout.size(), layout.align()) {
            if let Some(p) = self.alloc_cached(layout.size()) {
                return Ok(p);
            }
        } else if let Some(class) = cache::medium_class(layout.size(), layout.align()) {
            let size = layout.size();
            // SAFETY: `alloc_medium_fast` makes no calls.
            let fast = unsafe {
                cache::with_heap_fast(&self.shared, |h| h.alloc_medium_fast(class, size))
            };
            if let Some(p) = fast.or_else(|| self.alloc_medium(class, size)) {
                return Ok(p);
            }
        } else if let Some(k) = cache::bin_class(layout.size(), layout.align()) {
            if let Some(p) = self.alloc_binned(k, layout.size()) {
                return Ok(p);
            }
        }
        let p = self.alloc_uncounted(layout, false)?;
        self.count(|d| d.on_alloc(layout.size() as u64));
        Ok(p)
    }

    /// A small block from this thread's cache, counted in its batch.
    fn alloc_cached(&self, size: usize) -> Option<NonNull<u8>> {
        cache::with_heap(&self.shared, |h| {
            let p = h.alloc(size)?;
            if h.delta.on_alloc(size as u64) {
                self.engine().counters().flush(&mut h.delta);
            }
            Some(p)
        })
        .flatten()
    }

    /// A block of the medium page class `class` from this thread's pages,
    /// counted in its batch.
    fn alloc_medium(&self, class: usize, size: usize) -> Option<NonNull<u8>> {
        cache::with_heap(&self.shared, |h| {
            let p = h.alloc_medium(class, size)?;
            if h.delta.on_alloc(size as u64) {
                self.engine().counters().flush(&mut h.delta);
            }
            Some(p)
        })
        .flatten()
    }

    /// A block of class `k` from this thread's block cache, handed out for
    /// `size` bytes and counted in its batch.
    #[inline(always)]
    fn alloc_binned(&self, k: usize, size: usize) -> Option<NonNull<u8>> {
        let engine = self.engine();
        cache::with_heap(&self.shared, |h| {
            let p = h.bins.pop(engine, k, size as u64)?;
            if h.delta.on_alloc(size as u64) {
                engine.counters().flush(&mut h.delta);
            }
            NonNull::new(p)
        })
        .flatten()
    }

    /// Allocates without counting the request (the caller counts it);
    /// `cached_ok`: the request may be served from this thread's caches
    /// (the caller has not tried them).
    fn alloc_uncounted(&self, layout: Layout, cached_ok: bool) -> Result<NonNull<u8>, Error> {
        let size = layout.size();
        let class = cache::bin_class(size, layout.align());
        if cached_ok {
            let engine = self.engine();
            let cached = if cache::is_small(size, layout.align()) {
                cache::with_heap(&self.shared, |h| h.alloc(size)).flatten()
            } else if let Some(class) = cache::medium_class(size, layout.align()) {
                cache::with_heap(&self.shared, |h| h.alloc_medium(class, size)).flatten()
            } else if let Some(k) = class {
                cache::with_heap(&self.shared, |h| h.bins.pop(engine, k, size as u64))
                    .flatten()
                    .and_then(NonNull::new)
            } else {
                None
            };
            if let Some(p) = cached {
                return Ok(p);
            }
        }
        // A request the block caches serve gets a block of its whole class,
        // so that the block serves any request of the class once cached.
        let engine_size = class.map_or(size, cache::class_size);
        let a = self.alloc_engine(engine_size, size, layout.align())?;
        if engine_size != size {
            self.engine().set_requested(a.pos, size as u64);
        }
        if class.is_some() {
            let payload = self.engine().usable(a.pos);
            let _ = cache::with_heap(&self.shared, |h| h.bins.note_alloc(payload));
        }
        self.engine().counters().add_block_bytes(a.block_bytes);
        // SAFETY: payload addresses are inside the mapping, never null.
        Ok(unsafe { NonNull::new_unchecked(self.engine().payload(a.pos)) })
    }

    /// An engine block of `rounded` bytes (`size` rounded up to its block
    /// cache class), or else of `size`, aligned to `align`; when the heap
    /// is out of memory, after giving what this thread holds idle back
    /// (its cached blocks and empty pages may be what is missing, and
    /// merged with their neighbours, more), and after taking back what
    /// dead processes held (only when a process died: this path runs on
    /// every failed engine allocation, and taking back pages walks the page
    /// table; then once more, even if
    /// another thread took the memory back first: it is counted as hidden
    /// while that thread republishes it, so the next attempt waits for it).
    fn alloc_engine(
        &self,
        rounded: usize,
        size: usize,
        align: usize,
    ) -> Result<crate::engine::Allocated, Error> {
        let engine = self.engine();
        let attempt = || match engine.alloc(rounded, align) {
            Err(Error::OutOfMemory { .. }) if rounded != size => engine.alloc(size, align),
            other => other,
        };
        let a = match attempt() {
            Err(Error::OutOfMemory { .. }) if self.release_idle() => attempt(),
            other => other,
        };
        match a {
            Err(oom @ Error::OutOfMemory { .. }) => {
                let dead = engine.dead_slots();
                if dead == 0 {
                    return Err(oom);
                }
                reclaim_dead_slots(engine, dead);
                attempt()
            }
            other => other,
        }
    }

    /// Gives what this thread holds idle (cached blocks, empty pages) back
    /// to the engine; whether it had any.
    #[cold]
    fn release_idle(&self) -> bool {
        cache::with_heap(&self.shared, |h| h.release_idle()).unwrap_or(false)
    }

    /// Frees a block allocated from this segment, by any thread of any
    /// process.
    ///
    /// Returns [`Error::InvalidPointer`] for a pointer that is not a block of
    /// this segment and [`Error::DoubleFree`] for a block that is not
    /// allocated; both are detected before anything is changed (two threads
    /// freeing the same small block at the same moment, a race in the
    /// caller, may go undetected).
    ///
    /// # Safety
    /// - `ptr` must not be used after this call (by anyone);
    /// - `ptr` must come from an allocation of this segment that has not been
    ///   freed since. Violations are detected as far as a header check can
    ///   (see the errors), but a pointer into the middle of a live block, or a
    ///   stale pointer to a block that was since reallocated, cannot always be.
    #[inline(always)]
    pub unsafe fn free(&self, ptr: NonNull<u8>) -> Result<(), Error> {
        // SAFETY: forwarded contract.
        match unsafe { self.free_fast(ptr) } {
            Ok(()) => Ok(()),
            // SAFETY: forwarded contract; `free_fast` declined with nothing
            // changed, and `declined` is what it said.
            Err(declined) => unsafe { self.free_declined(ptr, declined) },
        }
    }

    /// The call-free part of [`Matrix::free`] (but for a page's `tidy`):
    /// `Ok` if `ptr` was a live small block of this thread's cache and is
    /// now free; else, with nothing changed, where the block is, for
    /// [`Matrix::free_declined`] to do the rest (another thread's block, an
    /// engine block, a counter flush, an error). For adapters that keep
    /// their own slow path out of line (the global allocator).
    ///
    /// # Safety
    /// As for [`Matrix::free`].
    #[doc(hidden)]
    #[inline(always)]
    pub unsafe fn free_fast(&self, ptr: NonNull<u8>) -> Result<(), Declined> {
        let Some((page, i)) = cache::locate(&self.pages, ptr.as_ptr()) else {
            return Err(Declined {
                page: std::ptr::null_mut(),
            });
        };
        let block = ptr.as_ptr();
        // SAFETY: `free_fast` makes no calls; `locate` found block `i` of
        // `page` at `block`.
        let done = unsafe { cache::with_heap_fast(&self.shared, |h| h.free_fast(page, i, block)) };
        match done {
            Some(false) => Ok(()),
            Some(true) => {
                self.tidy(page);
                Ok(())
            }
            None => Err(Declined { page: page.0 }),
        }
    }

    /// The rest of [`Matrix::free`], for a block that [`Matrix::free_fast`]
    /// declined: out of line, so that the fast path stays small.
    ///
    /// # Safety
    /// As for [`Matrix::free`], and `declined` is what `free_fast` returned
    /// for `ptr` on this matrix.
    #[doc(hidden)]
    #[cold]
    #[inline(never)]
    pub unsafe fn free_declined(&self, ptr: NonNull<u8>, declined: Declined) -> Result<(), Error> {
        if declined.page.is_null() {
            // SAFETY: forwarded contract.
            return unsafe { self.free_engine_counted(ptr) };
        }
        let page = cache::Page(declined.page);
        // (Not `ok_or`: an `Error` made and dropped on every free costs a
        // call to its destructor.)
        let Some(i) = page.index_of(ptr.as_ptr()) else {
            return Err(Error::InvalidPointer);
        };
        let block = ptr.as_ptr();
        // SAFETY: `free_medium_fast` makes no calls; `index_of` found block
        // `i` of `page` at `block`.
        let medium =
            unsafe { cache::with_heap_fast(&self.shared, |h| h.free_medium_fast(page, i, block)) };
        match medium {
            Some(false) => Ok(()),
            Some(true) => {
                self.tidy(page);
                Ok(())
            }
            None => self.free_small_slow(page, i),
        }
    }

    /// Moves a page the fast path freed into to where it belongs now (see
    /// `Heap::tidy`): a second borrow of the heap, out of line, so that the
    /// fast path makes no call while it holds the heap.
    #[cold]
    #[inline(never)]
    fn tidy(&self, page: cache::Page) {
        // `None` only on re-entry (when the matrix is the global allocator
        // and a slow path allocates): the page then stays where it is,
        // owned and correct, until the thread next tidies it or exits.
        let _ = cache::with_heap(&self.shared, |h| h.tidy(page));
    }

    /// A small block the fast path left: another thread's (or process's),
    /// a thread without a cache, or an error; by the page `free_fast` found.
    fn free_small_slow(&self, page: cache::Page, i: u32) -> Result<(), Error> {
        let counters = self.engine().counters();
        // One borrow of the heap for the free and its count.
        let freed = cache::with_heap(&self.shared, |h| {
            let requested = h.free(page, i)?;
            if h.delta.on_free(requested) {
                counters.flush(&mut h.delta);
            }
            Ok(())
        });
        freed.unwrap_or_else(|| {
            let requested = cache::free_remote(page, i)?;
            self.count(|d| d.on_free(requested));
            Ok(())
        })
    }

    /// Frees block `i` of `page` (this thread's or not) without counting;
    /// returns the requested size.
    fn free_small_uncounted(&self, page: cache::Page, i: u32) -> Result<u64, Error> {
        cache::with_heap(&self.shared, |h| h.free(page, i))
            .unwrap_or_else(|| cache::free_remote(page, i))
    }

    /// An engine block (anything that is not in a page).
    ///
    /// # Safety
    /// As for [`Matrix::free`].
    #[inline(always)]
    unsafe fn free_engine_counted(&self, ptr: NonNull<u8>) -> Result<(), Error> {
        let engine = self.engine();
        // (Not `ok_or`: an `Error` made and dropped on every free costs a
        // call to its destructor.)
        let Some(pos) = engine.block_of(ptr.as_ptr()) else {
            return Err(Error::InvalidPointer);
        };
        // Into this thread's block cache, counted in the same borrow.
        let kept = cache::with_heap(&self.shared, |h| {
            let requested = h.bins.free(engine, pos)?;
            Some(requested.map(|requested| {
                if h.delta.on_free(requested) {
                    engine.counters().flush(&mut h.delta);
                }
            }))
        });
        if let Some(Some(done)) = kept {
            return done;
        }
        let requested = self.free_engine_block(pos)?;
        self.count(|d| d.on_free(requested));
        Ok(())
    }

    /// Frees without counting; returns the requested size.
    ///
    /// # Safety
    /// As for [`Matrix::free`].
    unsafe fn free_uncounted(&self, ptr: NonNull<u8>) -> Result<u64, Error> {
        match cache::locate(&self.pages, ptr.as_ptr()) {
            Some((page, i)) => self.free_small_uncounted(page, i),
            None => self.free_engine(ptr),
        }
    }

    /// Frees an engine block without counting the request; returns its
    /// requested size.
    fn free_engine(&self, ptr: NonNull<u8>) -> Result<u64, Error> {
        let engine = self.engine();
        let Some(pos) = engine.block_of(ptr.as_ptr()) else {
            return Err(Error::InvalidPointer);
        };
        if let Some(Some(kept)) = cache::with_heap(&self.shared, |h| h.bins.free(engine, pos)) {
            return kept;
        }
        self.free_engine_block(pos)
    }

    /// Gives the engine block at `pos` back to the engine, without counting
    /// the request; returns its requested size.
    fn free_engine_block(&self, pos: u32) -> Result<u64, Error> {
        let (requested, block_bytes) = self.engine().free(pos)?;
        self.engine().counters().sub_block_bytes(block_bytes);
        Ok(requested)
    }

    /// Resizes the block at `ptr` to `new` (size and alignment), in place
    /// when the neighbours allow (or, for small blocks, when the size class
    /// stays the same), else by moving it. Counted as one reallocation, as
    /// dhat counts `realloc`.
    ///
    /// # Safety
    /// As for [`Matrix::free`]; on success the old pointer must no longer be
    /// used unless it equals the returned one.
    ///
    /// ```
    /// # fn main() -> Result<(), matrix_alloc::Error> {
    /// use matrix_alloc::Matrix;
    /// use std::alloc::Layout;
    /// let m = Matrix::anonymous(1 << 20)?;
    /// let p = m.alloc(Layout::new::<[u8; 16]>())?;
    /// // SAFETY: `p` is live and 16 bytes long; the old pointer is not used
    /// // after the call, and the new block is freed once.
    /// unsafe {
    ///     p.as_ptr().write_bytes(1, 16);
    ///     let q = m.realloc(p, Layout::new::<[u8; 5000]>())?;
    ///     assert_eq!(*q.as_ptr().add(15), 1);
    ///     m.free(q)?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub unsafe fn realloc(&self, ptr: NonNull<u8>, new: Layout) -> Result<NonNull<u8>, Error> {
        let old_req = match cache::locate(&self.pages, ptr.as_ptr()) {
            Some((page, i)) => {
                if cache::is_small(new.size(), new.align()) {
                    let block = ptr.as_ptr();
                    // SAFETY: `realloc_fast` makes no call that reaches the
                    // cache (its one call copies bytes); `locate` found block
                    // `i` of `page` at `block`.
                    let done = unsafe {
                        cache::with_heap_fast(&self.shared, |h| {
                            h.realloc_fast(page, i, block, new.size())
                        })
                    };
                    if let Some((p, tidy)) = done {
                        if tidy {
                            self.tidy(page);
                        }
                        return Ok(p);
                    }
                }
                let old_req = cache::requested(page, i)?;
                if new.align() <= 16 && cache::resize_in_place(page, i, new.size()) {
                    self.count(|d| d.on_realloc(old_req, new.size() as u64));
                    return Ok(ptr);
                }
                old_req
            }
            None => {
                let pos = self
                    .engine()
                    .block_of(ptr.as_ptr())
                    .ok_or(Error::InvalidPointer)?;
                let header = self.engine().used_block(pos)?;
                let old_req = self.engine().requested(pos);
                let old_block = (header.size as u64) * GRANULE as u64;
                if (ptr.as_ptr() as usize) % new.align() == 0
                    && !cache::is_small(new.size(), new.align())
                {
                    let in_place = if new.size() as u64 >= old_req {
                        self.engine().grow_in_place(pos, new.size())
                    } else {
                        self.engine().shrink_in_place(pos, new.size())
                    };
                    if let Some(new_block) = in_place {
                        let counters = self.engine().counters();
                        counters.sub_block_bytes(old_block);
                        counters.add_block_bytes(new_block);
                        self.count(|d| d.on_realloc(old_req, new.size() as u64));
                        return Ok(ptr);
                    }
                }
                old_req
            }
        };
        let dst = self.alloc_uncounted(new, true)?;
        let len = (old_req as usize).min(new.size());
        // SAFETY: both blocks are live and owned by the caller, distinct, and
        // at least `len` bytes long (`len` <= both requested sizes).
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), dst.as_ptr(), len) };
        // SAFETY: forwarded contract; the contents were copied.
        unsafe { self.free_uncounted(ptr) }?;
        self.count(|d| d.on_realloc(old_req, new.size() as u64));
        Ok(dst)
    }

    /// Payload bytes of the live block that starts at `ptr`, checked without
    /// trusting `ptr` (see `cache::live_block_len`).
    pub(crate) fn live_block_len(&self, ptr: *const u8) -> Result<usize, Error> {
        cache::live_block_len(self.engine(), ptr)
    }

    /// Payload bytes usable in the block at `ptr` (at least what was asked).
    pub fn usable_size(&self, ptr: NonNull<u8>) -> Option<usize> {
        if let Some((page, i)) = cache::locate(&self.pages, ptr.as_ptr()) {
            return cache::requested(page, i).ok().map(|_| cache::usable(page));
        }
        let pos = self.engine().block_of(ptr.as_ptr())?;
        self.engine().used_block(pos).ok()?;
        Some(self.engine().usable(pos))
    }
}
