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
//!
//! Files: `page` (a page's header, free lists and remote list), `ring` (a
//! heap's lists of pages), `heap` (the thread heap and its paths),
//! `registry` (which heap a thread uses for which segment); this one: size
//! classes, owner tokens, the page lists shared by all threads (pool,
//! abandoned pages), `trim` and `reclaim_dead`.

mod bins;
mod heap;
mod kinds;
mod page;
mod registry;
mod ring;

pub(crate) use crate::geometry::{bin_class, class_size};
use bins::Bins;
pub(crate) use bins::Census as BinCensus;
pub(crate) use heap::Heap;
use page::{
    allocated, small_allocated, AVAILABLE, CURRENT, FREE, MEDIUM_USED, ON_FULL_RING, REMOTE,
};
use page::{colour, colour_offset, no_page};
pub(crate) use page::{Page, PAGE_SIZE};
pub(crate) use registry::{flush_thread, retire_if_last, with_heap, with_heap_fast};
use ring::Ring;

use crate::engine::words::{ListHead, HEADER, NIL};
use crate::engine::{Engine, PageTable, PAGE_MARK, SLOTS};
use crate::geometry::{LINK_MASK, LINK_NIL, MEDIUM_CLASSES, PAGE_CLASSES};
use crate::shared::SharedRef;
use crate::stats::Delta;
use crate::sync::{AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use crate::Error;
use std::cell::{Cell, UnsafeCell};
use std::ptr::NonNull;

pub(crate) use crate::geometry::{SMALL_CLASSES, SMALL_MAX};
// `Heap::stash_classes` has a bit per small class.
const _: () = assert!(SMALL_CLASSES <= 64);
/// Full pages a slow allocation looks at for remote frees (`revisit_full`).
const REVISIT_FULL: usize = 8;

/// The class of a request of `size` bytes (`size <= SMALL_MAX`); 0 for 0.
#[inline]
fn class_of(size: usize) -> usize {
    size.saturating_sub(1) >> 4
}

/// Whether a request goes to the caches: 1 to `SMALL_MAX` bytes, aligned
/// to at most 16. (A zero-size request gets an engine block of its own.)
#[inline]
pub(crate) fn is_small(size: usize, align: usize) -> bool {
    size.wrapping_sub(1) < SMALL_MAX && align <= 16
}

/// The page class of a request of `size` bytes aligned to `align` that
/// medium pages serve (see `kinds`), if it is one.
#[inline]
pub(crate) fn medium_class(size: usize, align: usize) -> Option<usize> {
    bin_class(size, align)
        .filter(|k| *k < MEDIUM_CLASSES)
        .map(kinds::medium_class)
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

// ---- pages and the page table -----------------------------------------------------

#[inline]
fn page_at(engine: &Engine, n: u32) -> Page {
    page_in(engine.page_table().headers(), n as usize)
}

/// Page number `n` (its header, see `colour_offset`) of the mapping whose
/// `PageTable::headers` is `headers`.
#[inline]
fn page_in(headers: *mut u8, n: usize) -> Page {
    // SAFETY: page numbers come from the page table or from pages this
    // thread made, so they lie inside the mapping.
    Page(unsafe { headers.add(n * PAGE_SIZE + colour(n)) })
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

/// The payload of `page`'s engine block (the block starts at the page).
fn page_payload(engine: &Engine, page: Page) -> *mut u8 {
    let n = page_number(engine, page) as usize;
    // SAFETY: as in `page_in`.
    unsafe { engine.base_ptr().add(n * PAGE_SIZE + HEADER) }
}

fn page_number(engine: &Engine, page: Page) -> u32 {
    ((page.0 as usize - engine.base_ptr() as usize) / PAGE_SIZE) as u32
}

/// The page and block index `ptr` points to, if it is a block of a page.
#[inline]
pub(crate) fn locate(table: &PageTable, ptr: *const u8) -> Option<(Page, u32)> {
    let page = page_of(table, ptr)?;
    Some((page, page.index_of(ptr)?))
}

/// The page that `ptr` points into, if it points into one.
#[inline]
fn page_of(table: &PageTable, ptr: *const u8) -> Option<Page> {
    // Wrapping: a pointer below the mapping gives a page number past the
    // table, which `page_start` rejects.
    let off = (ptr as usize).wrapping_sub(table.base() as usize);
    Some(page_in(table.headers(), table.page_start(off / PAGE_SIZE)?))
}

/// Payload bytes of the live block that starts at `ptr`, checked without
/// trusting `ptr`: a pointer into a page must be one of its allocated
/// blocks (never the page's own engine block), any other one the start of
/// a used engine block. `StaleHandle`: a block that is not live;
/// `InvalidHandle`: no block starts there.
pub(crate) fn live_block_len(engine: &Engine, ptr: *const u8) -> Result<usize, Error> {
    if let Some(page) = page_of(&engine.page_table(), ptr) {
        let i = page.index_of(ptr).ok_or(Error::StaleHandle)?;
        return match requested(page, i) {
            Ok(_) => Ok(usable(page)),
            Err(_) => Err(Error::StaleHandle),
        };
    }
    let pos = engine.block_of(ptr).ok_or(Error::InvalidHandle)?;
    match engine.used_block(pos) {
        Ok(_) => Ok(engine.usable(pos)),
        Err(_) => Err(Error::StaleHandle),
    }
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
    Ok(page.requested_of(i, s))
}

/// Resizes the live block `i` in place if `new_size` is of the same class.
pub(crate) fn resize_in_place(page: Page, i: u32, new_size: usize) -> bool {
    let class = if is_small(new_size, 1) {
        Some(class_of(new_size))
    } else {
        medium_class(new_size, 1)
    };
    let same = class == Some(page.header().class as usize);
    if same {
        page.set_requested(i, new_size);
    }
    same
}

/// Payload bytes of a block of `page`.
pub(crate) fn usable(page: Page) -> usize {
    page.header().block_size as usize
}

/// What the pages hold (`check()`).
#[derive(Default)]
pub(crate) struct PageCensus {
    pub(crate) pages: u64,
    /// The payload bytes of the pages' engine blocks.
    pub(crate) page_payloads: u64,
    /// Live blocks in pages, and their requested bytes.
    pub(crate) blocks: u64,
    pub(crate) bytes: u64,
}

/// What the pages hold; `Err`: the number of a page whose header is
/// damaged.
pub(crate) fn census(engine: &Engine) -> Result<PageCensus, usize> {
    engine
        .marked_pages()
        .try_fold(PageCensus::default(), |c, p| {
            let page = page_at(engine, p as u32);
            if !page.is_sound(colour_offset(p)) {
                return Err(p);
            }
            let (blocks, bytes) = page.census();
            let span = page.header().span as usize;
            Ok(PageCensus {
                pages: c.pages + 1,
                page_payloads: c.page_payloads + crate::engine::page_payload(span) as u64,
                blocks: c.blocks + blocks,
                bytes: c.bytes + bytes,
            })
        })
}

/// One small-object page, as tools list it (`Inspector::pages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInfo {
    /// Page number (byte offset in the segment / the page size).
    pub number: usize,
    /// Bytes of the page (a multiple of the page size: medium pages span
    /// several).
    pub bytes: usize,
    /// Bytes of each of its blocks.
    pub block_size: u32,
    /// Blocks it has room for.
    pub capacity: u32,
    /// Blocks allocated from it.
    pub allocated: u32,
    /// Slot of the process whose thread owns it (`None`: abandoned, free
    /// for any thread to adopt).
    pub owner_slot: Option<usize>,
}

/// Every small-object page (`Err`: the number of one whose header is
/// damaged). Reads only.
pub(crate) fn pages(engine: &Engine) -> Result<Vec<PageInfo>, usize> {
    engine
        .marked_pages()
        .map(|n| {
            let page = page_at(engine, n as u32);
            if !page.is_sound(colour_offset(n)) {
                return Err(n);
            }
            let h = page.header();
            let token = h.owner.load(Relaxed);
            let slot = (token >> 48) as usize;
            Ok(PageInfo {
                number: n,
                bytes: h.span as usize * PAGE_SIZE,
                block_size: h.block_size,
                capacity: h.capacity,
                allocated: page.census().0 as u32,
                owner_slot: (token != 0 && (1..=SLOTS).contains(&slot)).then(|| slot - 1),
            })
        })
        .collect()
}

/// Gives back what caches hold without use: the calling thread's empty
/// pages, and abandoned pages whose blocks were all freed since.
pub(crate) fn trim(shared: &SharedRef) {
    let engine = &shared.engine;
    with_heap(shared, |heap| {
        for class in 0..PAGE_CLASSES {
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
        let _ = heap.bins.release(&heap.shared.engine);
        heap.shared.engine.counters().flush(&mut heap.delta);
    });
    while let Some(page) = pop_pooled(engine) {
        release_page(engine, page);
    }

    for class in 0..PAGE_CLASSES {
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
    // Last, with the pages and cached blocks back: the free memory goes back
    // to the OS.
    engine.purge_free_blocks();
}

fn release_page(engine: &Engine, page: Page) {
    let n = page_number(engine, page);
    engine.set_pages(n as usize, page.header().span as usize, false);
    if let Some(pos) = engine.block_of(page_payload(engine, page)) {
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
        entry.store(PAGE_MARK | (h.top & LINK_MASK), Relaxed);
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
        let next = entry.load(Relaxed) & LINK_MASK;
        let next = if next == LINK_NIL { NIL } else { next };
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
/// when the pool is full or the page is a medium one (the pool holds
/// one-unit pages, which any small class can use).
fn pool_or_release(engine: &Engine, page: Page) {
    let ctrl = engine.control();
    if page.is_medium() {
        release_page(engine, page);
    } else if ctrl.pooled.fetch_add(1, Relaxed) < pool_pages(engine) {
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
pub(crate) fn reclaim_dead_pages(engine: &Engine) -> usize {
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

// ---- what a dead process held ------------------------------------------------

/// What [`Matrix::reclaim_dead`](crate::Matrix::reclaim_dead) took back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Bytes of free memory that threads of dead processes held inside the
    /// engine (mid-split or mid-merge), published again.
    pub engine_bytes: u64,
    /// Small-object pages of dead processes taken over.
    pub pages: usize,
    /// Bytes of blocks that threads of dead processes kept in their block
    /// caches, with the caches' records, given back to the heap.
    pub cached_bytes: u64,
}

/// What `Matrix::reclaim_dead` does, for any path that needs it (the
/// out-of-memory paths of the engine and the caches). The engine's nodes
/// are only looked through when a slot's process died; then those slots
/// are freed, so that the next out-of-memory does not look again. (Holders
/// of a dead slot that a new process took over were recovered by it when
/// it joined.)
pub(crate) fn reclaim_dead(engine: &Engine) -> Reclaimed {
    reclaim_dead_slots(engine, engine.dead_slots())
}

/// `reclaim_dead` for the slots `dead` (from `Engine::dead_slots`).
pub(crate) fn reclaim_dead_slots(engine: &Engine, dead: u128) -> Reclaimed {
    let engine_bytes = if dead != 0 {
        engine.recover_dead_holds()
    } else {
        0
    };
    let pages = reclaim_dead_pages(engine);
    let cached_bytes = bins::reclaim_dead(engine);
    engine.free_dead_slots(dead);
    Reclaimed {
        engine_bytes,
        pages,
        cached_bytes,
    }
}

/// Gives back the block caches of dead threads, as a process joins (where
/// a dead process's slot is taken over, this is how its cached blocks come
/// back without a `reclaim_dead`). Returns the bytes given back.
pub(crate) fn reclaim_dead_bins(engine: &Engine) -> u64 {
    bins::reclaim_dead(engine)
}

/// What the block caches hold (`check()`).
pub(crate) fn bin_census(engine: &Engine) -> BinCensus {
    bins::census(engine)
}

/// Payload bytes in the block caches (`stats()`).
pub(crate) fn cached_bytes(engine: &Engine) -> u64 {
    bins::cached_bytes(engine)
}

impl Reclaimed {
    /// Whether anything was taken back.
    pub fn any(&self) -> bool {
        self.engine_bytes != 0 || self.pages != 0 || self.cached_bytes != 0
    }
}
