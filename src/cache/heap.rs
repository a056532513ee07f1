//! The thread heap: one thread's cache of pages (small and medium) for
//! one segment, and its allocation and free paths.

use super::*;

/// One thread's cache for one segment.
///
/// `repr(C)` and aligned to a cache line: `token` and the first part of
/// `delta`, which every fast-path operation touches, share the first line
/// (a heap placed across lines ran its fast paths half again as slow).
#[repr(C, align(64))]
pub(crate) struct Heap {
    token: u64,
    pub(crate) delta: Delta,
    pub(super) shared: SharedRef,
    /// The page each class allocates from (its address, or `no_page()`).
    current: [*mut u8; PAGE_CLASSES],
    /// Per class, the owned pages that may have free blocks, and those that
    /// were full when last looked at (see `ring`).
    available: [Ring; PAGE_CLASSES],
    full: [Ring; PAGE_CLASSES],
    /// Empty small pages kept for reuse by any small class, so that a
    /// thread that frees everything and allocates again does not go back
    /// to the pool or the engine; per class, most recently emptied first (a
    /// page taken again for its own class keeps its free list and needs no
    /// formatting). At most `stash_limit` in all; `stash_classes` has bit
    /// `c` set when `stash[c]` is not empty. (Empty medium pages go back to
    /// the engine at once: kept, they cost a fifth more memory on the 4 -
    /// 64 KiB workload of `tests/efficiency.rs`.)
    stash: [Ring; SMALL_CLASSES],
    stash_classes: u64,
    stashed: usize,
    stash_limit: usize,
    /// The cache of blocks above `SMALL_MAX` (see `bins`).
    pub(crate) bins: Bins,
}

// The fast paths' part of a heap is one cache line.
const _: () = assert!(std::mem::offset_of!(Heap, delta) + Delta::HOT_BYTES <= 64);

impl Heap {
    pub(super) fn new(shared: SharedRef) -> Heap {
        let (slot, gen) = shared.engine.slot_identity();
        let thread = THREAD_NUMBERS.fetch_add(1, Relaxed);
        let delta = shared.engine.counters().fresh_delta();
        let stash_limit = stash_limit(&shared.engine);
        let token = make_token(slot, gen, thread);
        let bins = Bins::new(&shared.engine, token);
        Heap {
            token,
            bins,
            shared,
            current: [no_page(); PAGE_CLASSES],
            available: [Ring::EMPTY; PAGE_CLASSES],
            full: [Ring::EMPTY; PAGE_CLASSES],
            stash: [Ring::EMPTY; SMALL_CLASSES],
            stash_classes: 0,
            stashed: 0,
            stash_limit,
            delta,
        }
    }

    fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    pub(super) fn page(&self, n: u32) -> Page {
        page_at(self.engine(), n)
    }

    /// The fast path of an allocation, free of calls: a block of the
    /// class's current page, counted. `None` when more is needed (no
    /// current page, a full one, or a counter flush due), with nothing
    /// changed: the caller's slow path does it all then.
    #[inline(always)]
    pub(crate) fn alloc_fast(&mut self, size: usize) -> Option<NonNull<u8>> {
        if !self.delta.alloc_in_batch() {
            return None;
        }
        let p = Page(self.current[class_of(size) % SMALL_CLASSES]).pop(size)?;
        self.delta.count_alloc(size as u64);
        Some(p)
    }

    /// Allocates a small block (`is_small`); the request is not counted here.
    #[inline]
    pub(crate) fn alloc(&mut self, size: usize) -> Option<NonNull<u8>> {
        let class = class_of(size) % SMALL_CLASSES;
        if let Some(p) = Page(self.current[class]).pop(size) {
            return Some(p);
        }
        self.alloc_slow(class, size)
    }

    /// The fast path of a medium allocation, free of calls, as
    /// `alloc_fast`: a block of the medium page class `class`'s current
    /// page for `size` bytes, counted.
    #[inline(always)]
    pub(crate) fn alloc_medium_fast(&mut self, class: usize, size: usize) -> Option<NonNull<u8>> {
        if !self.delta.alloc_in_batch_bytes(size as u64) {
            return None;
        }
        let p = Page(self.current[class % PAGE_CLASSES]).pop_medium(size)?;
        self.delta.count_alloc(size as u64);
        Some(p)
    }

    /// The fast path of a free of a medium block, free of calls, as
    /// `free_fast` (which leaves medium blocks here).
    ///
    /// # Safety
    /// As for `free_owned`.
    #[inline(always)]
    pub(crate) unsafe fn free_medium_fast(
        &mut self,
        page: Page,
        i: u32,
        block: *mut u8,
    ) -> Option<bool> {
        // SAFETY: forwarded contract.
        let (entry, s) = unsafe { self.owned_entry::<false>(page, i) }?;
        if s != MEDIUM_USED {
            return None;
        }
        let requested = page.requested_of(i, s);
        if !self.delta.free_in_batch_bytes(requested) {
            return None;
        }
        let used = list_freed(page, entry, block);
        self.delta.count_free(requested);
        Some(self.needs_tidy(page, used))
    }

    /// Allocates a block of the medium page class `class` for `size`
    /// bytes; the request is not counted here.
    #[inline]
    pub(crate) fn alloc_medium(&mut self, class: usize, size: usize) -> Option<NonNull<u8>> {
        let class = class % PAGE_CLASSES;
        if let Some(p) = Page(self.current[class]).pop_medium(size) {
            return Some(p);
        }
        self.alloc_slow(class, size)
    }

    #[cold]
    #[inline(never)]
    fn alloc_slow(&mut self, class: usize, size: usize) -> Option<NonNull<u8>> {
        let page = self.find_page(class)?;
        self.set_current(class, page.0);
        page.take(size)
    }

    /// Makes `page` (an owned page of `class`, or `no_page()`) the class's current
    /// page, and keeps both pages' `tidy_below` in step.
    pub(super) fn set_current(&mut self, class: usize, page: *mut u8) {
        let old = self.current[class];
        if old == page {
            return;
        }
        // A page on the full ring keeps `ON_FULL_RING` either way.
        let retag = |page: *mut u8, from: u32, to: u32| {
            if page != no_page() {
                let h = Page(page).header();
                if h.tidy_below.load(Relaxed) == from {
                    h.tidy_below.store(to, Relaxed);
                }
            }
        };
        retag(old, CURRENT, AVAILABLE);
        retag(page, AVAILABLE, CURRENT);
        self.current[class] = page;
    }

    /// A page of `class` with a free block: the current page after
    /// collecting its remote frees, another page of the class's available
    /// ring (full ones move to the full ring on the way), a full page that
    /// other threads have freed into since, an abandoned page, a new page,
    /// or (when the engine is out of memory) a page taken over from a dead
    /// process.
    fn find_page(&mut self, class: usize) -> Option<Page> {
        let cur = Page(self.current[class]);
        if cur.0 != no_page() && (cur.collect() || cur.has_free()) {
            return Some(cur);
        }
        // Each turn returns or moves the head to the full ring: it ends.
        while let Some(n) = self.available[class].head() {
            let page = self.page(n);
            page.collect();
            if page.has_free() {
                return Some(page);
            }
            self.set_full(class, page, true);
        }
        if let Some(page) = self.revisit_full(class) {
            return Some(page);
        }
        if let Some(page) = self.adopt(class) {
            return Some(page);
        }
        if let Some(page) = self.new_page(class) {
            return Some(page);
        }
        // Out of memory: what this thread holds idle may be it; then what
        // dead processes held.
        if self.release_idle() {
            if let Some(page) = self.new_page(class) {
                return Some(page);
            }
        }
        reclaim_dead(self.engine());
        self.adopt(class).or_else(|| self.new_page(class))
    }

    /// Looks at a few full pages, oldest first, for blocks that other
    /// threads freed since (the owner's own frees move a page back at
    /// once). Bounded, so that a slow allocation costs O(1) however many
    /// full pages the thread owns; the ring turns, so every full page is
    /// looked at again after a while.
    fn revisit_full(&mut self, class: usize) -> Option<Page> {
        for _ in 0..REVISIT_FULL {
            let page = self.page(self.full[class].head()?);
            if page.collect() {
                self.set_full(class, page, false);
                return Some(page);
            }
            let (engine, ring) = self.ring(class, true);
            ring.rotate(engine);
        }
        None
    }

    /// The class's full ring, or its available ring, with the engine that
    /// resolves the page numbers on it.
    pub(super) fn ring(&mut self, class: usize, full: bool) -> (&Engine, &mut Ring) {
        let ring = if full {
            &mut self.full[class]
        } else {
            &mut self.available[class]
        };
        (&self.shared.engine, ring)
    }

    /// Puts an owned page, on no ring yet, on the class's full or available
    /// ring.
    fn put(&mut self, class: usize, page: Page, full: bool) {
        let tidy_below = if full {
            ON_FULL_RING
        } else if self.current[class] == page.0 {
            CURRENT
        } else {
            AVAILABLE
        };
        page.header().tidy_below.store(tidy_below, Relaxed);
        let n = page_number(self.engine(), page);
        let (engine, ring) = self.ring(class, full);
        ring.push(engine, n);
    }

    /// Puts a page that just became ours on the class's available ring.
    fn link(&mut self, class: usize, page: Page) {
        self.put(class, page, false);
    }

    /// Takes an owned page off whichever ring it is on.
    fn unlink(&mut self, class: usize, page: Page) {
        let n = page_number(self.engine(), page);
        let (engine, ring) = self.ring(class, on_full_ring(page));
        ring.remove(engine, n);
    }

    /// Moves an owned page to the full ring, or back.
    fn set_full(&mut self, class: usize, page: Page, full: bool) {
        self.unlink(class, page);
        self.put(class, page, full);
    }

    fn new_page(&mut self, class: usize) -> Option<Page> {
        let stashed = self.unstash(class);
        // A page stashed by this class is ready as it is: empty, with every
        // block on its free list or never used.
        let ready = stashed.is_some_and(|page| page.header().class as usize == class);
        let pooled = || match kinds::is_medium(class) {
            true => None,
            false => pop_pooled(self.engine()),
        };
        if let Some(page) = stashed.or_else(pooled) {
            if !ready {
                let offset = colour_offset(page_number(self.engine(), page) as usize);
                // (One of another class is a one-unit page of a small class,
                // for a small class: see `unstash` and `pooled`.)
                // SAFETY: a stashed or pooled page is empty and ours: no live
                // block points into it, so only a double free could touch it.
                unsafe { page.init(class, self.token, offset) };
            }
            self.link(class, page);
            return Some(page);
        }
        let engine = self.engine();
        let span = kinds::span(class);
        let a = engine.alloc_pages(span).ok()?;
        let start = engine.payload(a.pos);
        // The block starts at the page: its payload, one header later.
        let n = (start as usize - engine.base_ptr() as usize) / PAGE_SIZE;
        let page = page_in(engine.page_table().headers(), n);
        engine.counters().add_block_bytes(a.block_bytes);
        engine.counters().add_page_bytes(a.block_bytes as i64);
        // SAFETY: the engine just gave us the `span` units from `n` but for
        // their first `HEADER` bytes (the block's header, before
        // `colour_offset`); the page is unreachable until marked below.
        unsafe { page.init(class, self.token, colour_offset(n)) };
        engine.set_pages(n, span, true);
        self.link(class, page);
        Some(page)
    }

    /// Lets go of an empty owned page: into the stash, or back to the engine.
    pub(super) fn release(&mut self, class: usize, page: Page) {
        self.unlink(class, page);
        let n = page_number(self.engine(), page);
        if self.current[class] == page.0 {
            self.set_current(class, no_page());
        }
        if !kinds::is_medium(class) && self.stashed < self.stash_limit {
            self.stash[class].push_front(&self.shared.engine, n);
            self.stash_classes |= 1 << class;
            self.stashed += 1;
        } else {
            pool_or_release(self.engine(), page);
        }
    }

    /// Takes the most recently stashed empty page of the small `class`, or
    /// else of the lowest small class that has one; none for a medium
    /// class.
    fn unstash(&mut self, class: usize) -> Option<Page> {
        let from = if kinds::is_medium(class) {
            return None;
        } else if self.stash_classes & 1 << class != 0 {
            class
        } else if self.stash_classes != 0 {
            self.stash_classes.trailing_zeros() as usize
        } else {
            return None;
        };
        let ring = &mut self.stash[from];
        let n = ring.head()?;
        ring.remove(&self.shared.engine, n);
        if ring.head().is_none() {
            self.stash_classes &= !(1 << from);
        }
        self.stashed -= 1;
        Some(self.page(n))
    }

    /// Moves the stashed empty pages to the shared pool (or the engine).
    pub(super) fn drain_stash(&mut self) {
        // (Class 0 first, then any: the order does not matter here.)
        while let Some(page) = self.unstash(0) {
            pool_or_release(self.engine(), page);
        }
    }

    /// Takes a page of `class` that another thread abandoned.
    fn adopt(&mut self, class: usize) -> Option<Page> {
        loop {
            let page = pop_abandoned(self.engine(), class)?;
            if page
                .header()
                .owner
                .compare_exchange(0, self.token, Acquire, Relaxed)
                .is_err()
            {
                continue; // cannot happen: abandoned pages have no owner
            }
            page.collect();
            self.link(class, page);
            if page.has_free() {
                return Some(page);
            }
        }
    }

    /// Gives back to the engine what this thread holds without use, for an
    /// allocation the heap is out of memory for: its empty current pages,
    /// its stash, its cached blocks, and the shared pool's empty pages.
    /// Returns whether it gave anything back.
    pub(crate) fn release_idle(&mut self) -> bool {
        let mut given = self.stashed != 0;
        for class in 0..PAGE_CLASSES {
            let page = Page(self.current[class]);
            if page.0 == no_page() {
                continue;
            }
            page.collect();
            if page.used() == 0 {
                self.release(class, page);
                given = true;
            }
        }
        self.drain_stash();
        while let Some(page) = pop_pooled(self.engine()) {
            release_page(self.engine(), page);
            given = true;
        }
        self.bins.release(&self.shared.engine) || given
    }

    /// Frees block `i` of `page`, which `ptr` pointed to. Returns the
    /// requested size. Sequential double frees are detected; two threads
    /// freeing the same block at once (a race in the caller) may not be.
    pub(crate) fn free(&mut self, page: Page, i: u32) -> Result<u64, Error> {
        let block = page.block(i);
        // SAFETY: block `i` of `page` is at `block`, and the caller's `i`
        // comes from `locate`, so it is below the capacity.
        if let Some(requested) = unsafe { self.free_owned(page, i, block) } {
            return Ok(requested);
        }
        // Not allocated, or another thread's page: `free_remote` tells
        // which, and frees the block in the second case.
        free_remote(page, i)
    }

    /// The fast path of a free, free of calls: this thread frees a live
    /// block of its own page, counted. `None` when more is needed (not
    /// allocated, another thread's page, or a counter flush due), with
    /// nothing changed (as in `alloc_fast`); `Some(true)`
    /// when the page needs `tidy` after it (this free emptied it, or it was
    /// on the full ring).
    ///
    /// # Safety
    /// As for `free_owned`.
    #[inline(always)]
    pub(crate) unsafe fn free_fast(&mut self, page: Page, i: u32, block: *mut u8) -> Option<bool> {
        if !self.delta.free_in_batch() {
            return None;
        }
        // SAFETY: forwarded contract.
        let (s, used) = unsafe { self.take_owned::<true>(page, i, block) }?;
        self.delta.count_free(page.small_requested(s));
        Some(self.needs_tidy(page, used))
    }

    /// The fast path of a reallocation, to `new_size` bytes (a small
    /// request), of the live block `i` of this thread's `page`, at `block`:
    /// the same block when the size stays in its class, else a block of the
    /// new class's current page, with the contents copied and the old block
    /// freed. Returns the block and whether `page` needs `tidy` (as
    /// `free_fast`). `None` when more is needed (not allocated, another
    /// thread's page, no free block at hand, a counter flush due), with
    /// nothing changed. Its one call is the copy.
    ///
    /// # Safety
    /// As for `free_owned`.
    #[inline(always)]
    pub(crate) unsafe fn realloc_fast(
        &mut self,
        page: Page,
        i: u32,
        block: *mut u8,
        new_size: usize,
    ) -> Option<(NonNull<u8>, bool)> {
        if !(self.delta.alloc_in_batch() && self.delta.free_in_batch()) {
            return None;
        }
        // SAFETY: forwarded contract.
        let (entry, s) = unsafe { self.owned_entry::<true>(page, i) }?;
        let old = page.small_requested(s);
        let class = class_of(new_size) % SMALL_CLASSES;
        if class == page.header().class as usize {
            entry.store(page.entry_for(new_size), Relaxed);
            self.delta.count_realloc(old, new_size as u64);
            // SAFETY: `block` is a block of `page`, not null.
            return Some((unsafe { NonNull::new_unchecked(block) }, false));
        }
        let new = Page(self.current[class]).pop(new_size)?;
        // SAFETY: the old block is live and the caller's, at least `old`
        // bytes; the new one was just taken, at least `new_size` bytes, and
        // on another page (another class).
        unsafe { std::ptr::copy_nonoverlapping(block, new.as_ptr(), (old as usize).min(new_size)) };
        let used = list_freed(page, entry, block);
        self.delta.count_realloc(old, new_size as u64);
        Some((new, self.needs_tidy(page, used)))
    }

    /// Whether an owner free that left `used` blocks in `page` needs `tidy`:
    /// it emptied a page that is not the current one, or freed into a page
    /// on the full ring (see `PageHeader::tidy_below`).
    #[inline(always)]
    fn needs_tidy(&self, page: Page, used: u32) -> bool {
        used < page.header().tidy_below.load(Relaxed)
    }

    /// The size entry of block `i` and its value, if the block is allocated
    /// (`SMALL`: and of a small page, as the fast paths need: a medium
    /// block is counted on the slow path, which flushes by bytes too, see
    /// `stats::PENDING_BYTES`) and `page` is this thread's.
    ///
    /// # Safety
    /// As for `free_owned`.
    #[inline(always)]
    unsafe fn owned_entry<const SMALL: bool>(
        &self,
        page: Page,
        i: u32,
    ) -> Option<(&'static AtomicU8, u8)> {
        // SAFETY: `i < capacity` (the caller's contract).
        let entry = unsafe { page.size_entry_unchecked(i) };
        let s = entry.load(Relaxed);
        let live = if SMALL {
            small_allocated(s)
        } else {
            allocated(s)
        };
        // Only this thread can make, or unmake, its own token the owner.
        (live && page.header().owner.load(Relaxed) == self.token).then_some((entry, s))
    }

    /// The owner's free of block `i`, if it is allocated and `page` is this
    /// thread's: marks it `FREE` and lists it. Returns its old size entry
    /// and the blocks still in use; else changes nothing.
    ///
    /// # Safety
    /// As for `free_owned`.
    #[inline(always)]
    unsafe fn take_owned<const SMALL: bool>(
        &self,
        page: Page,
        i: u32,
        block: *mut u8,
    ) -> Option<(u8, u32)> {
        // SAFETY: forwarded contract.
        let (entry, s) = unsafe { self.owned_entry::<SMALL>(page, i) }?;
        Some((s, list_freed(page, entry, block)))
    }

    /// Frees block `i` if it is allocated and `page` is this thread's, and
    /// returns its requested size; else changes nothing and returns `None`.
    ///
    /// # Safety
    /// `i` and `block` are the index and address of one block of `page`, as
    /// `locate` finds them (so `i` is below the page's capacity).
    unsafe fn free_owned(&mut self, page: Page, i: u32, block: *mut u8) -> Option<u64> {
        // SAFETY: forwarded contract.
        let (s, used) = unsafe { self.take_owned::<false>(page, i, block) }?;
        // (Read before `tidy`, which may give the page back.)
        let requested = page.requested_of(i, s);
        if self.needs_tidy(page, used) {
            self.tidy(page);
        }
        Some(requested)
    }

    /// After an owner free that emptied `page` (not the page in use: it
    /// goes to the stash or the pool) or freed into a full one (back to the
    /// available ring, and the class's current page if that one has no
    /// free block at hand, so that the next allocation takes the block
    /// without a slow path: with medium pages of a few blocks, a random
    /// replacement frees into a full page most of the time). Rare for
    /// small pages; harmless when there is nothing to do.
    #[cold]
    #[inline(never)]
    pub(crate) fn tidy(&mut self, page: Page) {
        let class = page.header().class as usize % PAGE_CLASSES;
        if page.used() == 0 && self.current[class] != page.0 {
            self.release(class, page);
        } else if on_full_ring(page) {
            self.set_full(class, page, false);
            if !Page(self.current[class]).has_free() {
                self.set_current(class, page.0);
            }
        }
    }

    /// The thread is done with this segment: empty pages go back to the
    /// engine, the others are abandoned for adoption; counters are flushed.
    pub(super) fn retire(&mut self) {
        for class in 0..PAGE_CLASSES {
            self.set_current(class, no_page());
            while let Some(n) = self.available[class].head().or(self.full[class].head()) {
                let page = self.page(n);
                page.collect();
                if page.used() == 0 {
                    self.release(class, page);
                } else {
                    self.unlink(class, page);
                    page.header().owner.store(0, Release);
                    push_abandoned(self.engine(), class, page);
                }
            }
        }
        self.drain_stash();
        let _ = self.bins.release(&self.shared.engine);
        self.shared.engine.counters().flush(&mut self.delta);
    }
}
