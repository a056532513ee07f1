//! Per-thread caches: small objects served from pages owned by one thread.
//!
//! Requests of at most `SMALL_MAX` bytes (alignment at most 16) are served
//! from 16 KiB pages (`PAGE_SIZE`), each holding blocks of one size class (16-byte steps)
//! and owned by one thread (its *token*). The owner allocates and frees with
//! plain loads and stores on its page; any other thread or process frees by
//! pushing onto the page's remote list, which the owner collects when its
//! local list runs dry. Pages come from, and go back to, the engine.
//!
//! Lifecycle of a page: created by a thread (engine block, marked in the
//! page table) → used → released to the engine when its last block is freed
//! by the owner (unless it is the class's current page) → or, when the owner
//! thread exits with blocks still live, *abandoned* (owner 0, pushed on the
//! class's abandoned list) and later adopted by another thread of any
//! process. Pages of a process that died are recognised by their owner token
//! (slot and slot generation) and taken over by `reclaim_dead`.
//!
//! Memory held by caches is the pages: `Stats::page_bytes`. Besides its
//! current page per class, a thread keeps up to `stash_limit` empty pages
//! (1/64 of the heap, between 8 and 512 pages: 128 KiB to 8 MiB) for reuse
//! by any class (its own class first: such a page keeps its free list, and
//! is not formatted and listed again block by block), and the segment
//! keeps at most `pool_pages` empty pages (1/32 of the heap) for any thread
//! of any process (one CAS to take one, instead of an engine allocation);
//! `Matrix::trim` gives both back to the engine. The thread's own stash
//! comes first because the pool is shared:
//! a workload that frees its whole live set and builds it again would
//! otherwise move every page through the pool's contended cache lines, and
//! get pages last touched by another core.

mod page;
mod ring;

use page::{allocated, AVAILABLE, CURRENT, FREE, ON_FULL_RING, REMOTE};
use page::{colour_offset, no_page};
pub(crate) use page::{Page, PAGE_SIZE};
use ring::Ring;

use crate::engine::words::{ListHead, NIL};
use crate::engine::{Engine, PageTable, PAGE_MARK, SLOTS};
use crate::matrix::SharedRef;
use crate::stats::Delta;
use crate::sync::{AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use crate::Error;
use std::cell::{Cell, UnsafeCell};
use std::ptr::NonNull;

/// The largest request served from pages.
pub(crate) const SMALL_MAX: usize = 1024;
/// Size classes: 16, 32, ..., `SMALL_MAX` bytes.
pub(crate) const SMALL_CLASSES: usize = SMALL_MAX / 16;
// `Heap::stash_classes` has a bit per class.
const _: () = assert!(SMALL_CLASSES <= 64);
/// Full pages a slow allocation looks at for remote frees (`revisit_full`).
const REVISIT_FULL: usize = 8;

/// The class of a request of `size` bytes (`size <= SMALL_MAX`); 0 for 0.
#[inline]
fn class_of(size: usize) -> usize {
    size.saturating_sub(1) >> 4
}

fn block_size(class: usize) -> u32 {
    (class as u32 + 1) * 16
}

/// Whether a request goes to the caches: 1 to `SMALL_MAX` bytes, aligned
/// to at most 16. (A zero-size request gets an engine block of its own.)
#[inline]
pub(crate) fn is_small(size: usize, align: usize) -> bool {
    size.wrapping_sub(1) < SMALL_MAX && align <= 16
}

// ---- owner tokens --------------------------------------------------------------

/// `slot + 1` (16 bits) | slot generation (16 bits) | thread number (32 bits).
/// 0 means "no owner".
const fn make_token(slot: usize, gen: u64, thread: u32) -> u64 {
    (slot as u64 + 1) << 48 | (gen & 0xffff) << 32 | thread as u64
}

/// Whether the owner named by `token` can no longer be running: its slot was
/// released or retaken, or its process is gone.
fn owner_dead(engine: &Engine, token: u64) -> bool {
    let slot = (token >> 48) as usize;
    if token == 0 || slot == 0 || slot > SLOTS {
        return false;
    }
    !engine.slot_alive_gen16(slot - 1, ((token >> 32) & 0xffff) as u16)
}

/// Owner of a page while `trim` or `reclaim_dead` sweeps it: the shared
/// last slot, which is never considered dead, so no one else takes the page.
const SWEEPER: u64 = make_token(SLOTS - 1, 0, 0);

static THREAD_NUMBERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

// ---- the thread heap ---------------------------------------------------------------

/// One thread's cache for one segment.
///
/// `repr(C)` and aligned to a cache line: `token` and the first part of
/// `delta`, which every fast-path operation touches, share the first line
/// (a heap placed across lines ran its fast paths half again as slow).
#[repr(C, align(64))]
pub(crate) struct Heap {
    token: u64,
    pub(crate) delta: Delta,
    shared: SharedRef,
    /// The page each class allocates from (its address, or `no_page()`).
    current: [*mut u8; SMALL_CLASSES],
    /// Per class, the owned pages that may have free blocks, and those that
    /// were full when last looked at (see `ring`).
    available: [Ring; SMALL_CLASSES],
    full: [Ring; SMALL_CLASSES],
    /// Empty pages kept for reuse by any class, so that a thread that frees
    /// everything and allocates again does not go back to the pool or the
    /// engine; per class, most recently emptied first (a page taken again
    /// for its own class keeps its free list and needs no formatting). At
    /// most `stash_limit` in all; `stash_classes` has bit `c` set when
    /// `stash[c]` is not empty.
    stash: [Ring; SMALL_CLASSES],
    stash_classes: u64,
    stashed: usize,
    stash_limit: usize,
}

// The fast paths' part of a heap is one cache line.
const _: () = assert!(std::mem::offset_of!(Heap, delta) + Delta::HOT_BYTES <= 64);

impl Heap {
    fn new(shared: SharedRef) -> Heap {
        let (slot, gen) = shared.engine.slot_identity();
        let thread = THREAD_NUMBERS.fetch_add(1, Relaxed);
        let delta = shared.engine.counters().fresh_delta();
        let stash_limit = stash_limit(&shared.engine);
        Heap {
            token: make_token(slot, gen, thread),
            shared,
            current: [no_page(); SMALL_CLASSES],
            available: [Ring::EMPTY; SMALL_CLASSES],
            full: [Ring::EMPTY; SMALL_CLASSES],
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

    fn page(&self, n: u32) -> Page {
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

    #[cold]
    #[inline(never)]
    fn alloc_slow(&mut self, class: usize, size: usize) -> Option<NonNull<u8>> {
        let page = self.find_page(class)?;
        self.set_current(class, page.0);
        page.take(size)
    }

    /// Makes `page` (an owned page of `class`, or `no_page()`) the class's current
    /// page, and keeps both pages' `tidy_below` in step.
    fn set_current(&mut self, class: usize, page: *mut u8) {
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
        crate::matrix::reclaim_dead(self.engine());
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
    fn ring(&mut self, class: usize, full: bool) -> (&Engine, &mut Ring) {
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
        if let Some(page) = stashed.or_else(|| pop_pooled(self.engine())) {
            if !ready {
                let offset = colour_offset(page_number(self.engine(), page) as usize);
                // SAFETY: a stashed or pooled page is empty and ours: no live
                // block points into it, so nothing but a double free can
                // touch it.
                unsafe { page.init(class as u16, block_size(class), self.token, offset) };
            }
            self.link(class, page);
            return Some(page);
        }
        let engine = self.engine();
        let a = engine.alloc(PAGE_SIZE, PAGE_SIZE).ok()?;
        let start = engine.payload(a.pos);
        let n = (start as usize - engine.base_ptr() as usize) / PAGE_SIZE;
        let page = page_in(engine.base_ptr(), n);
        engine.counters().add_block_bytes(a.block_bytes);
        engine.counters().add_page_bytes(a.block_bytes as i64);
        // SAFETY: the engine just gave us these PAGE_SIZE bytes (from
        // `start`, a multiple of `PAGE_SIZE` into the mapping); the page is
        // unreachable until marked below.
        unsafe {
            page.init(
                class as u16,
                block_size(class),
                self.token,
                colour_offset(n),
            )
        };
        engine.set_page(n, true);
        self.link(class, page);
        Some(page)
    }

    /// Lets go of an empty owned page: into the stash, or back to the engine.
    fn release(&mut self, class: usize, page: Page) {
        self.unlink(class, page);
        let n = page_number(self.engine(), page);
        if self.current[class] == page.0 {
            self.set_current(class, no_page());
        }
        if self.stashed < self.stash_limit {
            self.stash[class].push_front(&self.shared.engine, n);
            self.stash_classes |= 1 << class;
            self.stashed += 1;
        } else {
            pool_or_release(self.engine(), page);
        }
    }

    /// Takes the most recently stashed empty page of `class`, or else of
    /// the lowest class that has one.
    fn unstash(&mut self, class: usize) -> Option<Page> {
        let from = if self.stash_classes & 1 << class != 0 {
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
    fn drain_stash(&mut self) {
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
        let (s, used) = unsafe { self.take_owned(page, i, block) }?;
        self.delta.count_free(page.requested_of(s));
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
        let (entry, s) = unsafe { self.owned_entry(page, i) }?;
        let old = page.requested_of(s);
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
    /// and `page` is this thread's.
    ///
    /// # Safety
    /// As for `free_owned`.
    #[inline(always)]
    unsafe fn owned_entry(&self, page: Page, i: u32) -> Option<(&'static AtomicU8, u8)> {
        // SAFETY: `i < capacity` (the caller's contract).
        let entry = unsafe { page.size_entry_unchecked(i) };
        let s = entry.load(Relaxed);
        // Only this thread can make, or unmake, its own token the owner.
        (allocated(s) && page.header().owner.load(Relaxed) == self.token).then_some((entry, s))
    }

    /// The owner's free of block `i`, if it is allocated and `page` is this
    /// thread's: marks it `FREE` and lists it. Returns its old size entry
    /// and the blocks still in use; else changes nothing.
    ///
    /// # Safety
    /// As for `free_owned`.
    #[inline(always)]
    unsafe fn take_owned(&self, page: Page, i: u32, block: *mut u8) -> Option<(u8, u32)> {
        // SAFETY: forwarded contract.
        let (entry, s) = unsafe { self.owned_entry(page, i) }?;
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
        let (s, used) = unsafe { self.take_owned(page, i, block) }?;
        if self.needs_tidy(page, used) {
            self.tidy(page);
        }
        Some(page.requested_of(s))
    }

    /// After an owner free that emptied `page` (not the page in use: it
    /// goes to the stash or the pool) or freed into a full one (back to the
    /// available ring). Rare; harmless when there is nothing to do.
    #[cold]
    #[inline(never)]
    pub(crate) fn tidy(&mut self, page: Page) {
        let class = page.header().class as usize % SMALL_CLASSES;
        if page.used() == 0 && self.current[class] != page.0 {
            self.release(class, page);
        } else if on_full_ring(page) {
            self.set_full(class, page, false);
        }
    }

    /// The thread is done with this segment: empty pages go back to the
    /// engine, the others are abandoned for adoption; counters are flushed.
    fn retire(&mut self) {
        for class in 0..SMALL_CLASSES {
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
        self.shared.engine.counters().flush(&mut self.delta);
    }
}

// ---- pages and the page table -----------------------------------------------------

#[inline]
fn page_at(engine: &Engine, n: u32) -> Page {
    page_in(engine.base_ptr(), n as usize)
}

/// Page number `n` of the mapping at `base` (its header, see `colour_offset`).
#[inline]
fn page_in(base: *mut u8, n: usize) -> Page {
    // SAFETY: page numbers come from the page table or from pages this
    // thread made, so they lie inside the mapping.
    Page(unsafe { base.add(n * PAGE_SIZE + colour_offset(n)) })
}

/// Marks the owner's block at `block`, whose size entry is `entry`, `FREE`
/// and lists it; returns the blocks still in use (see `Page::push_local`).
#[inline(always)]
fn list_freed(page: Page, entry: &AtomicU8, block: *mut u8) -> u32 {
    entry.store(FREE, Relaxed);
    page.push_local(block)
}

/// Whether an owned `page` is on its class's full ring (else the available one).
fn on_full_ring(page: Page) -> bool {
    page.header().tidy_below.load(Relaxed) == ON_FULL_RING
}

/// The first byte of `page`: where its engine block starts.
fn page_start(engine: &Engine, page: Page) -> *mut u8 {
    let n = page_number(engine, page) as usize;
    // SAFETY: as in `page_in`.
    unsafe { engine.base_ptr().add(n * PAGE_SIZE) }
}

fn page_number(engine: &Engine, page: Page) -> u32 {
    ((page.0 as usize - engine.base_ptr() as usize) / PAGE_SIZE) as u32
}

/// The page and block index `ptr` points to, if it is a small block.
#[inline]
pub(crate) fn locate(table: &PageTable, ptr: *const u8) -> Option<(Page, u32)> {
    // Wrapping: a pointer below the mapping gives a page number past the
    // table, which `is_page` rejects.
    let off = (ptr as usize).wrapping_sub(table.base() as usize);
    let n = off / PAGE_SIZE;
    if !table.is_page(n) {
        return None;
    }
    let page = page_in(table.base(), n);
    Some((page, page.index_of(ptr)?))
}

/// Frees block `i` of a page this thread does not own: marks it `REMOTE`
/// and pushes it on the page's remote list. Returns the requested size.
#[inline(never)]
pub(crate) fn free_remote(page: Page, i: u32) -> Result<u64, Error> {
    let requested = requested(page, i)?;
    page.size_entry(i).store(REMOTE, Relaxed);
    page.push_remote(i);
    Ok(requested)
}

/// Requested size of the live block `i` of `page`.
pub(crate) fn requested(page: Page, i: u32) -> Result<u64, Error> {
    let s = page.size_entry(i).load(Relaxed);
    if !allocated(s) {
        return Err(Error::DoubleFree);
    }
    Ok(page.requested_of(s))
}

/// Resizes the live block `i` in place if `new_size` is of the same class.
pub(crate) fn resize_in_place(page: Page, i: u32, new_size: usize) -> bool {
    let same = is_small(new_size, 1) && class_of(new_size) == page.header().class as usize;
    if same {
        page.size_entry(i).store(page.entry_for(new_size), Relaxed);
    }
    same
}

/// Payload bytes of a block of `page`.
pub(crate) fn usable(page: Page) -> usize {
    page.header().block_size as usize
}

/// Live small blocks and their requested bytes, over all pages (`check()`).
pub(crate) fn census(engine: &Engine) -> (u64, u64, u64) {
    engine.marked_pages().fold((0, 0, 0), |(pages, n, b), p| {
        let (pn, pb) = page_at(engine, p as u32).census();
        (pages + 1, n + pn, b + pb)
    })
}

/// Gives back what caches hold without use: the calling thread's empty
/// pages, and abandoned pages whose blocks were all freed since.
pub(crate) fn trim(shared: &SharedRef) {
    let engine = &shared.engine;
    with_heap(shared, |heap| {
        for class in 0..SMALL_CLASSES {
            heap.set_current(class, no_page());
            for full in [false, true] {
                // Visits each page once: released pages leave the ring,
                // kept ones are rotated behind.
                let (engine, ring) = heap.ring(class, full);
                let mut left = ring.len(engine);
                while left > 0 {
                    left -= 1;
                    let Some(n) = heap.ring(class, full).1.head() else {
                        break;
                    };
                    let page = heap.page(n);
                    page.collect();
                    if page.used() == 0 {
                        heap.release(class, page);
                    } else {
                        let (engine, ring) = heap.ring(class, full);
                        ring.rotate(engine);
                    }
                }
            }
        }
        heap.drain_stash();
        heap.shared.engine.counters().flush(&mut heap.delta);
    });
    while let Some(page) = pop_pooled(engine) {
        release_page(engine, page);
    }
    for class in 0..SMALL_CLASSES {
        let mut keep = Vec::new();
        while let Some(page) = pop_abandoned(engine, class) {
            if page
                .header()
                .owner
                .compare_exchange(0, SWEEPER, AcqRel, Relaxed)
                .is_err()
            {
                continue;
            }
            page.collect();
            if page.used() == 0 {
                release_page(engine, page);
            } else {
                keep.push(page);
            }
        }
        for page in keep {
            page.header().owner.store(0, Release);
            push_abandoned(engine, class, page);
        }
    }
}

fn release_page(engine: &Engine, page: Page) {
    let n = page_number(engine, page);
    engine.set_page(n as usize, false);
    if let Some(pos) = engine.block_of(page_start(engine, page)) {
        if let Ok((_, bytes)) = engine.free(pos) {
            engine.counters().sub_block_bytes(bytes);
            engine.counters().add_page_bytes(-(bytes as i64));
        }
    }
}

/// Page lists (the abandoned list of each class, the page pool) are tagged
/// stacks of page numbers linked through the page table, never through page
/// memory, which a stale popper might otherwise read after the page was
/// taken and released.
fn push_page(engine: &Engine, head: &AtomicU64, page: Page) {
    let n = page_number(engine, page);
    let Some(entry) = engine.page_entry(n as usize) else {
        return;
    };
    let mut cur = head.load(Relaxed);
    loop {
        let h = ListHead::from(cur);
        entry.store(PAGE_MARK | (h.top & !PAGE_MARK), Relaxed);
        match head.compare_exchange_weak(cur, h.replaced(n).value(), Release, Relaxed) {
            Ok(_) => return,
            Err(v) => cur = v,
        }
    }
}

fn pop_page(engine: &Engine, head: &AtomicU64) -> Option<Page> {
    let mut cur = head.load(Acquire);
    loop {
        let h = ListHead::from(cur);
        let entry: &AtomicU32 = engine.page_entry(h.top as usize)?;
        let next = entry.load(Relaxed) & !PAGE_MARK;
        let next = if next == NIL & !PAGE_MARK { NIL } else { next };
        match head.compare_exchange_weak(cur, h.replaced(next).value(), Acquire, Acquire) {
            Ok(_) => return Some(page_at(engine, h.top)),
            Err(v) => cur = v,
        }
    }
}

fn push_abandoned(engine: &Engine, class: usize, page: Page) {
    push_page(engine, &engine.control().abandoned[class], page);
}

fn pop_abandoned(engine: &Engine, class: usize) -> Option<Page> {
    pop_page(engine, &engine.control().abandoned[class])
}

/// Empty pages the pool keeps at most: 1/32 of the heap, and between 64 and
/// 4096 pages (1 MiB to 64 MiB); beyond, they go back to the engine. Sized
/// from the heap so that several threads' working sets fit in a large
/// segment, without a small one holding much of itself in the pool.
fn pool_pages(engine: &Engine) -> u64 {
    (engine.capacity() / 32 / PAGE_SIZE as u64).clamp(64, 4096)
}

/// Empty pages one thread keeps for itself: 1/64 of the heap, between 8
/// and 512 pages (128 KiB to 8 MiB). Enough for a thread that frees and
/// rebuilds a working set of a few MiB to stay off the shared pool, while
/// the threads of a small segment cannot hide much of it from each other.
/// (At 1/128, a 256 MiB segment's thread kept 128 pages: the mixed
/// workload's 3 MB working set sent a third of its pages through the pool
/// each round, to be formatted again, for 4% more instructions.)
fn stash_limit(engine: &Engine) -> usize {
    (engine.capacity() / 64 / PAGE_SIZE as u64).clamp(8, 512) as usize
}

/// Puts an empty page in the shared pool, or gives it back to the engine
/// when the pool is full.
fn pool_or_release(engine: &Engine, page: Page) {
    let ctrl = engine.control();
    if ctrl.pooled.fetch_add(1, Relaxed) < pool_pages(engine) {
        page.header().owner.store(0, Relaxed);
        push_page(engine, &ctrl.page_pool, page);
    } else {
        ctrl.pooled.fetch_sub(1, Relaxed);
        release_page(engine, page);
    }
}

fn pop_pooled(engine: &Engine) -> Option<Page> {
    let ctrl = engine.control();
    let page = pop_page(engine, &ctrl.page_pool)?;
    ctrl.pooled.fetch_sub(1, Relaxed);
    Some(page)
}

/// Takes over the pages of threads whose process died: rebuilds each
/// page's lists from its size entries, then gives it back to the engine if
/// it is empty or abandons it for adoption. Returns how many pages it took.
/// Slow path (it walks the page table); runs when the engine is out of
/// memory and from `Matrix::reclaim_dead`.
pub(crate) fn reclaim_dead(engine: &Engine) -> usize {
    let mut taken = 0;
    // Walking the page table while pages are released is fine: each entry
    // is read once, atomically, and every candidate is re-checked below.
    // (No allocation here: this runs on the out-of-memory path, also when
    // the matrix is the global allocator.)
    for n in engine.marked_pages() {
        let page = page_at(engine, n as u32);
        let h = page.header();
        let owner = h.owner.load(Acquire);
        if !owner_dead(engine, owner) {
            continue;
        }
        // One reclaimer wins the page; from here on it is ours alone.
        if h.owner
            .compare_exchange(owner, SWEEPER, AcqRel, Relaxed)
            .is_err()
        {
            continue;
        }
        page.rebuild();
        taken += 1;
        if page.used() == 0 {
            release_page(engine, page);
        } else {
            h.owner.store(0, Release);
            push_abandoned(engine, h.class as usize, page);
        }
    }
    taken
}

// ---- the thread-local registry ---------------------------------------------------

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
    shared: Cell<*const crate::matrix::Shared>,
    heap: Cell<*mut Heap>,
}

/// `Fast::shared` while a heap is borrowed: an address no `Shared` has.
const BUSY: *const crate::matrix::Shared = NonNull::dangling().as_ptr();

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
