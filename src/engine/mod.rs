//! The lock-free allocator over offsets.
//!
//! Everything the engine knows lives in the segment: a [`Control`] block
//! (free-list heads, bitmaps, counters), a node table, and the heap, whose
//! blocks carry their own headers. Positions are granule indices counted from
//! the start of the segment, so they mean the same in every process.
//!
//! # How ownership works
//!
//! A block is owned by exactly one party at a time:
//! - a **user**, while it is `Used`;
//! - the **thread that is freeing it**, while it is `Freeing` (until that
//!   thread binds a node to it);
//! - a **free list**, while it is `Free` and its node is `Live`;
//! - the **thread that holds its node** (`Claimed`, with that thread's
//!   holder tag: taken by CAS from `Live`, or bound fresh), while it
//!   merges, splits, frees or allocates it. What a killed process held is
//!   given back by [`recover`].
//!
//! Only the owner writes a block's header, footer or size. The free lists do
//! not link blocks but *nodes* in a separate table, so a list never points into
//! memory that a user may be writing: a block absorbed by its neighbour leaves
//! a `Dead` node behind in its list, which the next popper recycles. See
//! [`nodes`] for the claim protocol and its invariants, and [`ops`] for
//! allocation, freeing and coalescing.

mod alloc;
mod cached;
mod check;
mod map;
mod mapping;
mod nodes;
mod ops;
mod purge;
mod recover;
mod resize;
pub(crate) mod words;

pub(crate) use alloc::{page_payload, Allocated};
pub(crate) use cached::payload_bytes;
pub use check::HeapReport;
pub use map::{Region, RegionKind};

use crate::geometry::{PAGE_CLASSES, PAGE_HEAD, PAGE_SIZE};
use crate::stats::Counters;
use crate::sync::{AtomicU32, AtomicU64, Ordering::*};
use mapping::{FL_COUNT, SL_COUNT};
use words::{ListHead, GRANULE, GRANULE_LOG};

/// The shared control block of the engine, at a fixed offset in the segment.
///
/// Invariants (quiescent heap):
/// - bit `sl` of `sl_bitmap[fl]` is set if list `heads[fl][sl]` holds a `Live`
///   node, and bit `fl` of `fl_bitmap` is set if `sl_bitmap[fl] != 0`
///   (bits may be set for lists that hold only `Dead` nodes: they are hints);
/// - every node index below `node_hwm` is in exactly one of {the pool, one
///   free list, held by a thread};
/// - summed over the slots, `hidden` is at least the total size (granules)
///   of the free blocks that are claimed right now, i.e. invisible to
///   allocators, and `popping` counts allocations between popping a node and
///   counting its block in `hidden`; `epoch` counts publications. Together
///   they let an allocation that found nothing tell a real out-of-memory
///   from memory held for a moment by a live process (see
///   `ops::take_block`).
#[repr(C)]
pub(crate) struct Control {
    pub(crate) fl_bitmap: AtomicU64,
    pub(crate) sl_bitmap: [AtomicU64; FL_COUNT],
    pub(crate) heads: [[AtomicU64; SL_COUNT]; FL_COUNT],
    pub(crate) pool: AtomicU64,
    pub(crate) node_hwm: AtomicU32,
    _pad: u32,
    pub(crate) epoch: AtomicU64,
    pub(crate) slots: [Slot; SLOTS],
    /// Per page class: a tagged list (page numbers) of pages whose owner
    /// thread exited; any thread may adopt them.
    pub(crate) abandoned: [AtomicU64; PAGE_CLASSES],
    /// Empty pages kept for any thread of any process (a tagged list of page
    /// numbers through the page table), and how many there are.
    pub(crate) page_pool: AtomicU64,
    pub(crate) pooled: AtomicU64,
    pub(crate) counters: Counters,
    /// Offset of the segment's named directory (`crate::directory`), 0
    /// until the first use makes one.
    pub(crate) directory: AtomicU64,
    /// The threads' block-cache records (`cache::bins`): registration
    /// words, 0 where no thread has one.
    pub(crate) bin_records: [AtomicU64; BIN_RECORDS],
    /// When the next delayed purge is due (`purge`), in `CLOCK_MONOTONIC_COARSE`
    /// nanoseconds; 0 while none is.
    pub(crate) purge_due: AtomicU64,
}

/// `Engine::purge` while freed memory is not given back.
const NO_PURGE: u8 = 0;

/// Threads (of all processes together) that can have a block cache at
/// once; more allocate without one.
pub(crate) const BIN_RECORDS: usize = 256;

pub(crate) use crate::geometry::PAGE_MARK;
use crate::geometry::{BACK_MASK, BACK_SHIFT};

/// How many processes (handles) can be attached with their own slot. More
/// share the last slot, which is never considered dead.
pub(crate) const SLOTS: usize = 128;
const _: () = assert!(SLOTS <= 128, "dead_slots keeps one bit per slot in a u128");

/// Per-process bookkeeping: who is attached, and what it holds in flight.
#[repr(C)]
pub(crate) struct Slot {
    /// Pid of the process holding the slot; 0 when free.
    pub(crate) pid: AtomicU64,
    /// Granules of free blocks this process has claimed right now.
    pub(crate) hidden: AtomicU64,
    /// This process's allocations between a pop and its claim.
    pub(crate) popping: AtomicU64,
    /// Bumped each time the slot is taken, so that a page owned by a thread
    /// of an earlier holder of the slot is recognised as orphaned.
    pub(crate) gen: AtomicU64,
}

/// One entry of the node table.
#[repr(C)]
pub(crate) struct Node {
    /// [`words::ClaimWord`]: state, listed, recheck, generation.
    pub(crate) claim: AtomicU64,
    /// Next node in whichever list (free list or pool) this node is in.
    pub(crate) next: AtomicU32,
    /// Position of the block this node stands for (valid while not `Pool`).
    pub(crate) block: AtomicU32,
}

/// Where the engine's parts sit in a segment of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub control_offset: u64,
    /// The page table: one `u32` per `PAGE_SIZE` of the segment. Bit 31 is
    /// set while that unit belongs to a page (see `crate::cache`); on a
    /// page's first unit the low bits link the page into a page list, on
    /// the others they say where it starts (see `crate::geometry`). It
    /// lives outside the heap so that a stale reader never reads user
    /// memory.
    pub pagemap_offset: u64,
    pub nodes_offset: u64,
    pub node_capacity: u64,
    pub heap_offset: u64,
    pub heap_size: u64,
}

/// One node per this many heap bytes: more than the number of free blocks a
/// coalesced heap can hold (free blocks are at least 32 bytes and are never
/// adjacent, so at most one per 64 bytes).
const HEAP_BYTES_PER_NODE: u64 = 64;
const PAGE: u64 = 4096;

impl Layout {
    /// Splits a segment of `segment_size` bytes, whose first `first_free`
    /// bytes are taken by the segment header, into control, nodes and heap.
    /// `None` if the segment is too small to hold a useful heap.
    pub(crate) fn for_segment(segment_size: u64, first_free: u64) -> Option<Layout> {
        let control_offset = align_up(first_free, 64);
        let pagemap_offset = align_up(control_offset + size_of::<Control>() as u64, 64);
        let pagemap_bytes = segment_size.div_ceil(PAGE_SIZE as u64) * 4;
        let nodes_offset = align_up(pagemap_offset + pagemap_bytes, 64);
        let rest = segment_size.checked_sub(nodes_offset)?;
        // heap + heap / HEAP_BYTES_PER_NODE * size_of::<Node>() + page slack <= rest
        let node_size = size_of::<Node>() as u64;
        let heap_guess =
            rest.checked_sub(PAGE)? * HEAP_BYTES_PER_NODE / (HEAP_BYTES_PER_NODE + node_size);
        let node_capacity = (heap_guess / HEAP_BYTES_PER_NODE).min(u32::MAX as u64 - 1);
        let heap_offset = align_up(nodes_offset + node_capacity * node_size, PAGE);
        let heap_size = (segment_size.checked_sub(heap_offset)?) & !(GRANULE as u64 - 1);
        if heap_size < PAGE || node_capacity < 4 {
            return None;
        }
        Some(Layout {
            control_offset,
            pagemap_offset,
            nodes_offset,
            node_capacity,
            heap_offset,
            heap_size,
        })
    }
}

/// The pid held in `slot` if that process is gone (it died without giving
/// the slot back). Slow path: it asks the OS.
fn dead_pid(slot: &Slot) -> Option<u64> {
    let pid = slot.pid.load(SeqCst);
    (pid != 0 && !crate::os::process_alive(pid as u32)).then_some(pid)
}

/// `ClaimWord::holder` of the threads of the handle in slot `slot` at
/// generation `gen`: slot + 1 in bits 16..24, the generation's low 16 bits
/// below.
const fn holder_tag(slot: usize, gen: u64) -> u32 {
    ((slot as u32 + 1) << 16) | (gen & 0xffff) as u32
}

pub(crate) const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

/// Where the page table is, and the mapping it maps. `Matrix` keeps a copy,
/// so that finding the page of a freed pointer is one load away from the
/// handle instead of two (handle → engine → table); it is on the critical
/// path of every free.
#[derive(Clone, Copy)]
pub(crate) struct PageTable {
    base: *mut u8,
    /// `base + PAGE_HEAD`: where page 0's header would be but for its
    /// colour, kept so that finding a page's header costs no addition.
    headers: *mut u8,
    entries: *const AtomicU32,
    len: usize,
}

// SAFETY: as for `Engine`: pointers into a mapping that outlives every copy
// (the `Matrix` that holds one also holds the mapping), used through atomics.
unsafe impl Send for PageTable {}
// SAFETY: as above.
unsafe impl Sync for PageTable {}

impl PageTable {
    /// Start of the mapping.
    #[inline]
    pub(crate) fn base(&self) -> *mut u8 {
        self.base
    }

    /// `base() + PAGE_HEAD`.
    #[inline]
    pub(crate) fn headers(&self) -> *mut u8 {
        self.headers
    }

    #[inline]
    fn entry(&self, n: usize) -> Option<&AtomicU32> {
        // SAFETY: `n < len`, and the table has that many entries inside the
        // mapping.
        (n < self.len).then(|| unsafe { &*self.entries.add(n) })
    }

    /// Whether unit `n` is the first of a page. `Acquire`: pairs with the
    /// `Release` marking, after which the page header is initialised.
    #[inline]
    pub(crate) fn is_page(&self, n: usize) -> bool {
        self.page_start(n) == Some(n)
    }

    /// The first unit of the page that unit `n` belongs to, if it belongs
    /// to one (`Acquire`, as `is_page`). A damaged entry pointing before
    /// the table gives `None`.
    #[inline]
    pub(crate) fn page_start(&self, n: usize) -> Option<usize> {
        let e = self.entry(n)?.load(Acquire);
        // A page's first unit (every small page's) in one comparison: the
        // mark, and no distance back.
        if e >> BACK_SHIFT == PAGE_MARK >> BACK_SHIFT {
            return Some(n);
        }
        if e & PAGE_MARK == 0 {
            return None;
        }
        n.checked_sub(((e >> BACK_SHIFT) & BACK_MASK) as usize)
    }
}

/// A process-local view of the engine inside one mapped segment.
///
/// It holds raw pointers into the mapping and is only handed out by
/// [`crate::Matrix`], which keeps the mapping alive for as long as the engine.
pub(crate) struct Engine {
    ctrl: *const Control,
    nodes: *const Node,
    node_capacity: u32,
    heap_start: u32,
    heap_end: u32,
    /// The page table, and the start of the mapping (`base_ptr`).
    pages: PageTable,
    /// This handle's slot in `Control::slots`.
    slot: usize,
    /// What this handle's threads write into the claim words of the nodes
    /// they hold (see `holder_tag`).
    holder: u32,
    /// How freed memory goes back to the OS (see `purge`); `NO_PURGE` once
    /// the kernel refused.
    purge: std::sync::atomic::AtomicU8,
    /// The segment file's descriptor, for `Purge::Punch`.
    purge_fd: std::os::fd::RawFd,
}

// SAFETY: `Engine` only holds pointers into a shared mapping that outlives it
// (guaranteed by `Matrix`), and every access through them is an atomic
// operation or a write to memory the calling thread owns by the protocol
// described in the module docs. Nothing in it is tied to one thread.
unsafe impl Send for Engine {}
// SAFETY: as above; all shared state is accessed through atomics.
unsafe impl Sync for Engine {}

impl Engine {
    /// # Safety
    /// - `base` must point to a mapping of at least `layout.heap_offset +
    ///   layout.heap_size` bytes, aligned to 4096, that stays mapped for the
    ///   lifetime of the returned engine;
    /// - `layout` must have been validated against the mapping (in bounds,
    ///   aligned as `Layout::for_segment` produces).
    pub(crate) unsafe fn attach(base: *mut u8, layout: &Layout) -> Engine {
        Engine {
            // SAFETY: offsets are in bounds of the mapping (caller's contract).
            ctrl: unsafe { base.add(layout.control_offset as usize) } as *const Control,
            // SAFETY: as above.
            nodes: unsafe { base.add(layout.nodes_offset as usize) } as *const Node,
            node_capacity: layout.node_capacity as u32,
            heap_start: (layout.heap_offset >> GRANULE_LOG) as u32,
            heap_end: ((layout.heap_offset + layout.heap_size) >> GRANULE_LOG) as u32,
            pages: PageTable {
                base,
                // SAFETY: a mapping is larger than a page.
                headers: unsafe { base.add(PAGE_HEAD) },
                // SAFETY: in bounds of the mapping (caller's contract).
                entries: unsafe { base.add(layout.pagemap_offset as usize) } as *const AtomicU32,
                len: (layout.heap_offset + layout.heap_size).div_ceil(PAGE_SIZE as u64) as usize,
            },
            slot: SLOTS - 1,
            holder: holder_tag(SLOTS - 1, 0),
            purge: std::sync::atomic::AtomicU8::new(NO_PURGE),
            purge_fd: -1,
        }
    }

    /// Takes a slot for this handle: a free one, else one whose process is
    /// gone (its counters are reset: what it held is lost until reclaimed),
    /// else the shared last slot.
    pub(crate) fn join(&mut self) {
        let me = std::process::id() as u64;
        let slots = &self.control().slots[..SLOTS - 1];
        let free = slots
            .iter()
            .position(|s| s.pid.compare_exchange(0, me, SeqCst, Relaxed).is_ok());
        let taken = free.or_else(|| {
            slots.iter().position(|s| {
                dead_pid(s)
                    .is_some_and(|pid| s.pid.compare_exchange(pid, me, SeqCst, Relaxed).is_ok())
            })
        });
        if let Some(i) = taken {
            let slot = &self.control().slots[i];
            slot.hidden.store(0, SeqCst);
            slot.popping.store(0, SeqCst);
            let gen = slot.gen.fetch_add(1, SeqCst) + 1;
            self.slot = i;
            self.holder = holder_tag(i, gen);
            if free.is_none() {
                // The slot's last holder died: what its threads held inside
                // the engine would no longer show as a dead slot.
                self.recover_dead_holds();
            }
        }
    }

    /// Slots (a bit each) whose process died without giving its slot
    /// back. Slow path: it asks the OS about each pid in use.
    pub(crate) fn dead_slots(&self) -> u128 {
        let mut dead = 0u128;
        for (i, slot) in self.control().slots[..SLOTS - 1].iter().enumerate() {
            if dead_pid(slot).is_some() {
                dead |= 1 << i;
            }
        }
        dead
    }

    /// Frees the slots in `dead` (from `dead_slots`) once what their
    /// processes held has been taken back, so that later out-of-memory
    /// paths do not look again. A slot taken over meanwhile is left alone.
    /// Their holder tags stay dead: a freed slot holds no live process, and
    /// the next one to take it bumps its generation.
    pub(crate) fn free_dead_slots(&self, dead: u128) {
        for (i, slot) in self.control().slots[..SLOTS - 1].iter().enumerate() {
            if dead & (1 << i) == 0 {
                continue;
            }
            if let Some(pid) = dead_pid(slot) {
                let _ = slot.pid.compare_exchange(pid, 0, SeqCst, Relaxed);
            }
        }
    }

    /// Gives the slot back (when the handle is dropped).
    pub(crate) fn leave(&self) {
        if self.slot != SLOTS - 1 {
            self.control().slots[self.slot].pid.store(0, SeqCst);
        }
    }

    /// This handle's slot index and the slot's generation.
    pub(crate) fn slot_identity(&self) -> (usize, u64) {
        (self.slot, self.my_slot().gen.load(SeqCst))
    }

    /// Whether slot `i` is held, in generation `gen`, by a live process.
    pub(crate) fn slot_alive(&self, i: usize, gen: u64) -> bool {
        if i == SLOTS - 1 {
            return true;
        }
        let Some(slot) = self.control().slots.get(i) else {
            return false;
        };
        let pid = slot.pid.load(SeqCst);
        pid != 0
            && slot.gen.load(SeqCst) == gen
            && (pid == std::process::id() as u64 || crate::os::process_alive(pid as u32))
    }

    /// The holder tag of this handle's threads (see `ClaimWord::holder`).
    #[inline]
    pub(crate) fn holder_tag(&self) -> u32 {
        self.holder
    }

    /// Whether the holder named by `tag` can no longer be running (its slot
    /// was released or retaken, or its process is gone). A tag that names
    /// no slot (0, or a stray value) is not dead: nothing is taken from it.
    pub(crate) fn holder_dead(&self, tag: u32) -> bool {
        let slot = (tag >> 16) as usize;
        slot != 0 && slot <= SLOTS && !self.slot_alive_gen16(slot - 1, tag as u16)
    }

    /// `slot_alive` for a generation known only by its low 16 bits.
    pub(crate) fn slot_alive_gen16(&self, i: usize, gen16: u16) -> bool {
        let Some(slot) = self.control().slots.get(i) else {
            return false;
        };
        self.slot_alive(i, (slot.gen.load(SeqCst) & !0xffff) | gen16 as u64)
    }

    /// Start of the mapping.
    #[inline]
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.pages.base
    }

    /// This handle's slot.
    pub(crate) fn my_slot(&self) -> &Slot {
        &self.control().slots[self.slot]
    }

    /// (popping, hidden) summed over the slots of live processes: memory
    /// that may reappear. Slow path only: it asks the OS about each pid.
    pub(crate) fn in_flight_of_live(&self) -> (u64, u64) {
        let me = std::process::id() as u64;
        let mut sum = (0, 0);
        for (i, slot) in self.control().slots.iter().enumerate() {
            let pid = slot.pid.load(SeqCst);
            let counted =
                i == SLOTS - 1 || pid == me || (pid != 0 && crate::os::process_alive(pid as u32));
            if counted {
                sum.0 += slot.popping.load(SeqCst);
                sum.1 += slot.hidden.load(SeqCst);
            }
        }
        sum
    }

    /// Formats a fresh (zero-filled) segment: empty lists, and the whole heap
    /// as one free block. Only the creator calls this, before anyone else can
    /// see the segment.
    pub(crate) fn format(&self) {
        let ctrl = self.control();
        for fl in ctrl.heads.iter() {
            for head in fl.iter() {
                head.store(ListHead::EMPTY, Relaxed);
            }
        }
        ctrl.pool.store(ListHead::EMPTY, Relaxed);
        for head in ctrl.abandoned.iter() {
            head.store(ListHead::EMPTY, Relaxed);
        }
        ctrl.page_pool.store(ListHead::EMPTY, Relaxed);
        let size = self.heap_end - self.heap_start;
        // The initial block has no neighbours to merge with: no settle needed.
        self.publish(self.heap_start, size, nodes::Covered::Yes);
    }

    #[inline]
    pub(crate) fn control(&self) -> &Control {
        // SAFETY: `ctrl` points into the live mapping (contract of `attach`)
        // and `Control` consists of atomics only.
        unsafe { &*self.ctrl }
    }

    /// The word that holds the directory's offset.
    pub(crate) fn directory_word(&self) -> &AtomicU64 {
        &self.control().directory
    }

    #[inline]
    pub(crate) fn counters(&self) -> &Counters {
        &self.control().counters
    }

    /// Heap capacity in bytes.
    pub(crate) fn capacity(&self) -> u64 {
        ((self.heap_end - self.heap_start) as u64) << GRANULE_LOG
    }

    /// The two header words of the block at `pos`.
    ///
    /// Callers guarantee `heap_start <= pos < heap_end`; the words are read
    /// and written atomically, so a stale or racing position only yields a
    /// stale value, which the protocol validates.
    fn header(&self, pos: u32) -> &[AtomicU64; 2] {
        debug_assert!(pos >= self.heap_start && pos < self.heap_end);
        crate::os::engine_step();
        // SAFETY: `pos` is inside the heap, which lies in the mapping; it is
        // 16-byte aligned because the heap starts page-aligned.
        unsafe { &*(self.pages.base.add((pos as usize) << GRANULE_LOG) as *const [AtomicU64; 2]) }
    }

    /// The 8-byte word just below position `end` (the footer of a free block
    /// that ends at `end`). Callers guarantee `heap_start < end <= heap_end`.
    fn word_below(&self, end: u32) -> &AtomicU64 {
        debug_assert!(end > self.heap_start && end <= self.heap_end);
        crate::os::engine_step();
        // SAFETY: the word lies in the heap (`end > heap_start`) and is 8-byte aligned.
        unsafe { &*(self.pages.base.add(((end as usize) << GRANULE_LOG) - 8) as *const AtomicU64) }
    }

    /// The node at index `n`. Callers guarantee `n < node_capacity`.
    fn node(&self, n: u32) -> &Node {
        debug_assert!(n < self.node_capacity);
        crate::os::engine_step();
        // SAFETY: the node table holds `node_capacity` nodes inside the mapping.
        unsafe { &*self.nodes.add(n as usize) }
    }

    /// Granule position of the block whose payload starts at byte `ptr`,
    /// if `ptr` is a possible payload address of this heap.
    pub(crate) fn block_of(&self, ptr: *const u8) -> Option<u32> {
        let off = (ptr as usize).checked_sub(self.pages.base as usize)?;
        if off % GRANULE != 0 {
            return None;
        }
        let pos = (off >> GRANULE_LOG).checked_sub(1)?;
        (pos >= self.heap_start as usize && pos + 1 < self.heap_end as usize).then_some(pos as u32)
    }

    /// The page-table entry of page number `n` (byte offset / `PAGE_SIZE`).
    #[inline]
    pub(crate) fn page_entry(&self, n: usize) -> Option<&AtomicU32> {
        self.pages.entry(n)
    }

    /// Whether unit `n` is the first of a page.
    #[inline]
    pub(crate) fn is_page(&self, n: usize) -> bool {
        self.pages.is_page(n)
    }

    /// The page table, to copy into a handle (see `PageTable`).
    pub(crate) fn page_table(&self) -> PageTable {
        self.pages
    }

    /// Marks (or unmarks) the `span` units from `n` as one page. Marking
    /// is `Release`, after the header is written (see `is_page`), the
    /// first unit last; its link bits are left as they are. A page is
    /// unmarked once it is empty and its releaser's alone, so no live
    /// block's lookup meets it half unmarked.
    pub(crate) fn set_pages(&self, n: usize, span: usize, on: bool) {
        let tails = (1..span).filter_map(|i| Some((i, self.page_entry(n + i)?)));
        if on {
            for (i, e) in tails {
                e.store(PAGE_MARK | (i as u32) << BACK_SHIFT, Release);
            }
            if let Some(e) = self.page_entry(n) {
                e.fetch_or(PAGE_MARK, Release);
            }
        } else {
            if let Some(e) = self.page_entry(n) {
                e.fetch_and(!PAGE_MARK, SeqCst);
            }
            for (_, e) in tails {
                e.store(0, SeqCst);
            }
        }
    }

    /// The first units of all pages marked in the page table (slow paths:
    /// recovery, `check()`, tools).
    pub(crate) fn marked_pages(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.pages.len).filter(move |n| self.is_page(*n))
    }

    /// Payload address of the block at `pos`.
    pub(crate) fn payload(&self, pos: u32) -> *mut u8 {
        // SAFETY: `pos + 1 <= heap_end`, inside the mapping.
        unsafe { self.pages.base.add(((pos as usize) + 1) << GRANULE_LOG) }
    }
}
