//! The blocks front end: safe, async, generation-checked blocks in a
//! segment, with backpressure across processes.
//!
//! [`Blocks`] hands out [`Block`]s: byte buffers in the segment that safe
//! code reads and writes with bounds checks ([`Block::write`],
//! [`Block::read`]). Each has a [`BlockId`] (`Copy`, 16 bytes of plain
//! data) that can be sent to another task or process, or stored in the
//! segment, and opened there ([`Blocks::open`]). Every block has a slot in a
//! table in the segment whose generation moves on when the block is freed,
//! so a freed id is `Error::StaleBlock` (or `DoubleFree` when freed again)
//! in every process, and a forged one `Error::InvalidBlock`.
//!
//! Reads and writes pin the block for the copy (see `table`): a free in
//! another process at the same time takes effect after it, so a read never
//! returns bytes of the block's next owner; it completes or, if the free
//! came first, is `StaleBlock`.
//!
//! When the configured memory limit, the table or the segment is full,
//! [`Blocks::allocate`] waits until memory is freed by any process (see
//! `wait`); [`Blocks::try_allocate`] does not wait and
//! [`Blocks::allocate_timeout`] waits at most so long.
//!
//! Crash behaviour: a process killed in the middle of an operation loses at
//! most that operation's block and slot (they stay taken); a process killed
//! while it pins a block (a read or write under way) keeps that block from
//! ever being given back. Nothing else is affected: no other process waits
//! on it.

mod table;
mod wait;

pub use wait::Allocate;

use crate::{Error, Matrix, Offset};
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use table::{Limits, Slot, Table, TABLE_NAME};

/// Makes the segment's table, unless another front end (of any process)
/// makes it first; returns the one published.
fn make_table(matrix: &Matrix, config: &BlocksConfig) -> Result<crate::Handle<Table>, Error> {
    let slot_layout = Layout::array::<Slot>(config.max_blocks).map_err(|_| Error::InvalidLayout)?;
    let fresh = matrix.alloc(slot_layout)?;
    // SAFETY: a fresh block of `slot_layout`; zero is a free slot of
    // generation 0.
    unsafe { fresh.as_ptr().write_bytes(0, slot_layout.size()) };
    let slots_offset = matrix
        .offset_of(fresh.as_ptr())
        .ok_or(Error::NotInSegment)?;
    let mut made = false;
    let found = matrix.find_or_construct(TABLE_NAME, || {
        made = true;
        Table::new(
            config.limits(),
            uuid::Uuid::new_v4().as_u128() as u32,
            slots_offset,
        )
    });
    if !made || found.is_err() {
        // SAFETY: our own fresh block, which no published table refers to.
        unsafe { matrix.free(fresh) }?;
    }
    found
}

/// A blocks front end's configuration, fixed when its table is made in the
/// segment; [`BlocksConfig::validate`] says what is wrong with one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlocksConfig {
    /// Bytes of live blocks allowed at once, over all processes.
    pub max_memory: usize,
    /// The smallest block allowed (`Error::BlockSize` below it).
    pub min_block_size: usize,
    /// The largest block allowed.
    pub max_block_size: usize,
    /// Every block is aligned to at least this (a power of two).
    pub alignment: usize,
    /// Whether a block's bytes are zeroed when it is freed (before the
    /// memory goes back to the segment, whose own bookkeeping may then
    /// write a few bytes of its own there: never the freed block's data).
    pub zero_on_dealloc: bool,
    /// Blocks live at once, over all processes: the size of the table.
    pub max_blocks: usize,
}

impl Default for BlocksConfig {
    fn default() -> Self {
        BlocksConfig {
            max_memory: usize::MAX,
            min_block_size: 1,
            max_block_size: 1 << 30,
            alignment: 8,
            zero_on_dealloc: false,
            max_blocks: 1 << 16,
        }
    }
}

impl BlocksConfig {
    /// `Ok` if this configuration can work, else `Error::InvalidConfig`
    /// saying why.
    pub fn validate(&self) -> Result<(), Error> {
        let why = if self.min_block_size == 0 {
            "min_block_size must be at least 1"
        } else if self.min_block_size > self.max_block_size {
            "min_block_size is larger than max_block_size"
        } else if self.max_block_size > self.max_memory {
            "max_block_size is larger than max_memory"
        } else if !self.alignment.is_power_of_two() || self.alignment > 1 << 20 {
            "alignment must be a power of two of at most 1 MiB"
        } else if self.max_blocks == 0 || self.max_blocks > u32::MAX as usize - 1 {
            "max_blocks must be between 1 and 2^32 - 2"
        } else if Layout::from_size_align(self.max_block_size, self.alignment).is_err() {
            "max_block_size rounded up to alignment overflows"
        } else {
            return Ok(());
        };
        Err(Error::InvalidConfig(why.into()))
    }

    fn limits(&self) -> Limits {
        Limits {
            max_memory: self.max_memory as u64,
            min_block: self.min_block_size as u64,
            max_block: self.max_block_size as u64,
            alignment: self.alignment as u64,
            zero_on_free: self.zero_on_dealloc as u64,
            max_blocks: self.max_blocks as u64,
        }
    }
}

/// A block's id: plain data, the same in every process (slot, table tag,
/// generation). Send it anywhere, open it with [`Blocks::open`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockId {
    slot: u32,
    table: u32,
    generation: u64,
}

// SAFETY: integers; `#[repr(C)]`.
unsafe impl crate::Shareable for BlockId {}

impl BlockId {
    /// The id as two words, to send over a pipe or socket.
    pub fn to_raw(self) -> [u64; 2] {
        [
            self.slot as u64 | (self.table as u64) << 32,
            self.generation,
        ]
    }

    /// An id from [`BlockId::to_raw`]'s words. Any words are accepted; what
    /// they name is checked when the id is used.
    pub fn from_raw(raw: [u64; 2]) -> BlockId {
        BlockId {
            slot: raw[0] as u32,
            table: (raw[0] >> 32) as u32,
            generation: raw[1],
        }
    }
}

/// What this process's front end did (allocations, frees, waits), and the
/// bytes live in the segment's table over all processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlocksStats {
    /// Blocks allocated by this process.
    pub allocated: u64,
    /// Blocks freed by this process.
    pub freed: u64,
    /// Bytes of live blocks, all processes (what counts against
    /// `max_memory`).
    pub current_bytes: u64,
    /// Live blocks, all processes.
    pub current_blocks: u64,
    /// Allocations of this process that had to wait for memory.
    pub waits: u64,
    /// Time those allocations spent waiting.
    pub time_waited: Duration,
    /// Waits that ended in `Error::Timeout`.
    pub timeouts: u64,
}

/// This process's allocation and free counts, in one cache line per shard
/// so that threads do not contend on them.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    allocated: AtomicU64,
    freed: AtomicU64,
}

const SHARDS: usize = 16;

/// The calling thread's shard.
fn shard_index() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local!(static INDEX: usize = NEXT.fetch_add(1, Relaxed) as usize % SHARDS);
    INDEX.with(|i| *i)
}

#[derive(Default)]
struct Counters {
    shards: [Shard; SHARDS],
    waits: AtomicU64,
    waited_ns: AtomicU64,
    timeouts: AtomicU64,
}

struct Inner {
    /// Keeps the segment mapped; reached through `Blocks::matrix`.
    _mapping: Arc<Matrix>,
    table: NonNull<Table>,
    counters: Counters,
    waiting: Arc<wait::Queue>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.waiting.close();
    }
}

// SAFETY: `table` points into the segment that `_mapping` keeps mapped;
// everything reached through it is atomics or immutable.
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

/// The blocks front end of one segment in this process; cheap to clone
/// (clones share one state). See the [module documentation](self).
#[derive(Clone)]
pub struct Blocks {
    inner: Arc<Inner>,
    /// Copies of `inner`'s pointers, read on every operation: kept here so
    /// that those reads do not share a cache line with the `Arc`'s count,
    /// which every `Block` made or dropped on another thread changes.
    matrix: NonNull<Matrix>,
    table: NonNull<Table>,
    slots: NonNull<Slot>,
}

// SAFETY: the pointers are `inner`'s (an `Arc<Matrix>` and the segment it
// keeps mapped), valid while `inner` lives; `Inner` is `Send + Sync`.
unsafe impl Send for Blocks {}
// SAFETY: as above.
unsafe impl Sync for Blocks {}

impl std::fmt::Debug for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocks")
            .field("limits", &self.table().limits)
            .finish()
    }
}

impl Blocks {
    /// The front end of `matrix`'s segment, with `config`: its table is made
    /// if this is the first front end of the segment, else the existing one
    /// is used and must have been made with the same configuration
    /// (`Error::InvalidConfig` if not).
    pub fn new(matrix: impl Into<Arc<Matrix>>, config: BlocksConfig) -> Result<Blocks, Error> {
        config.validate()?;
        let matrix = matrix.into();
        let found = match matrix.lookup::<Table>(TABLE_NAME)? {
            Some(h) => h,
            None => make_table(&matrix, &config)?,
        };
        let table = matrix.get_ptr(found)?;
        // SAFETY: a live `Table` in the segment (checked by `get_ptr`).
        let t = unsafe { table.as_ref() };
        if t.limits != config.limits() {
            return Err(Error::InvalidConfig(format!(
                "the segment's blocks table was made with another configuration: {:?}",
                t.limits
            )));
        }
        let slots = matrix
            .resolve::<Slot>(t.slots_offset())
            .ok_or(Error::Corrupt("blocks table"))?;
        let bytes = (t.limits.max_blocks as usize).saturating_mul(size_of::<Slot>());
        if matrix.live_block_len(slots.as_ptr().cast())? < bytes {
            return Err(Error::Corrupt("blocks table"));
        }
        let matrix_ptr = NonNull::from(&*matrix);
        Ok(Blocks {
            inner: Arc::new(Inner {
                _mapping: matrix,
                table,
                counters: Counters::default(),
                waiting: Arc::default(),
            }),
            matrix: matrix_ptr,
            table,
            slots,
        })
    }

    /// The segment's matrix.
    pub fn matrix(&self) -> &Matrix {
        // SAFETY: `inner.matrix`'s, which `inner` keeps alive.
        unsafe { self.matrix.as_ref() }
    }

    fn table(&self) -> &Table {
        // SAFETY: checked in `new`; lives as long as the mapping.
        unsafe { self.table.as_ref() }
    }

    fn slots(&self) -> &[Slot] {
        let n = self.table().limits.max_blocks as usize;
        // SAFETY: `n` slots in a live block (checked in `new`).
        unsafe { std::slice::from_raw_parts(self.slots.as_ptr(), n) }
    }

    fn slot(&self, id: BlockId) -> Result<&Slot, Error> {
        if id.table != self.table().tag {
            return Err(Error::InvalidBlock);
        }
        self.slots()
            .get(id.slot as usize)
            .ok_or(Error::InvalidBlock)
    }

    /// The layout a request gets, after the size bounds and alignment.
    fn layout_for(&self, layout: Layout) -> Result<Layout, Error> {
        let l = self.table().limits;
        let size = layout.size();
        if (size as u64) < l.min_block || size as u64 > l.max_block {
            return Err(Error::BlockSize {
                size,
                min: l.min_block as usize,
                max: l.max_block as usize,
            });
        }
        Layout::from_size_align(size, layout.align().max(l.alignment as usize))
            .map_err(|_| Error::InvalidLayout)
    }

    /// Allocates a block now, or `Error::OutOfMemory` if the limit, the
    /// table or the segment is full. It does not queue behind waiting
    /// `allocate` calls.
    pub fn try_allocate(&self, layout: Layout) -> Result<Block, Error> {
        let layout = self.layout_for(layout)?;
        let full = Error::OutOfMemory {
            requested: layout.size(),
        };
        let t = self.table();
        if !t.reserve(layout.size() as u64) {
            return Err(full);
        }
        let Some(index) = t.take_slot(self.slots(), shard_index()) else {
            t.unreserve(layout.size() as u64);
            table::notify(t);
            return Err(full);
        };
        let p = match self.matrix().alloc(layout) {
            Ok(p) => p,
            Err(e) => {
                t.give_back_slot(self.slots(), index, shard_index());
                t.unreserve(layout.size() as u64);
                table::notify(t);
                return Err(e);
            }
        };
        let offset = self.matrix().offset_of(p.as_ptr()).map_or(0, |o| o.0);
        let generation = self.slots()[index as usize].make_live(offset, layout.size() as u64);
        self.inner.counters.shards[shard_index()]
            .allocated
            .fetch_add(1, Relaxed);
        Ok(Block {
            blocks: self.clone(),
            id: BlockId {
                slot: index,
                table: t.tag,
                generation,
            },
            len: layout.size(),
        })
    }

    /// Allocates a block, waiting until memory is freed (by any process) if
    /// there is not enough now. Waiters of this process are served first
    /// come, first served (see `wait`). Cancel-safe: dropping the future
    /// before it is ready allocates nothing and passes its turn on.
    pub fn allocate(&self, layout: Layout) -> Allocate<'_> {
        Allocate::new(self, layout, None)
    }

    /// As [`Blocks::allocate`], but `Error::Timeout` after `timeout`.
    pub fn allocate_timeout(&self, layout: Layout, timeout: Duration) -> Allocate<'_> {
        Allocate::new(self, layout, Some(timeout))
    }

    /// The block `id` names, if it is live: to read, write or free a block
    /// that another task or process allocated.
    pub fn open(&self, id: BlockId) -> Result<Block, Error> {
        let len = self.with_pinned(id, |_, len| len)?;
        Ok(Block {
            blocks: self.clone(),
            id,
            len,
        })
    }

    /// Frees `block`: every id of it is stale from now on, in every process.
    pub fn deallocate(&self, block: Block) -> Result<(), Error> {
        self.free_id(block.id)
    }

    /// Frees the block `id` names: `Error::DoubleFree` if it was freed
    /// already, `InvalidBlock` if it never existed.
    pub fn free_id(&self, id: BlockId) -> Result<(), Error> {
        if self.slot(id)?.kill(id.generation)? {
            self.give_back(id.slot);
        }
        self.inner.counters.shards[shard_index()]
            .freed
            .fetch_add(1, Relaxed);
        Ok(())
    }

    /// Gives a dead, unpinned slot's block back to the segment.
    fn give_back(&self, index: u32) {
        let slot = &self.slots()[index as usize];
        let (offset, len) = slot.place();
        if let Some(p) = self.matrix().resolve::<u8>(Offset(offset)) {
            if self.table().limits.zero_on_free != 0 {
                // SAFETY: the block's `len` bytes; nobody else uses them
                // (dead, no pins).
                unsafe { p.as_ptr().write_bytes(0, len as usize) };
            }
            // SAFETY: the block this slot owned, given back exactly once
            // (see `table`). An error means a damaged slot: the block is
            // then left as it is rather than freed wrongly.
            let _ = unsafe { self.matrix().free(p) };
        }
        table::recycle(self.table(), self.slots(), index, len, shard_index());
    }

    /// Runs `f` on the block's memory while it is pinned.
    fn with_pinned<R>(
        &self,
        id: BlockId,
        f: impl FnOnce(NonNull<u8>, usize) -> R,
    ) -> Result<R, Error> {
        let slot = self.slot(id)?;
        let (offset, len) = slot.pin(id.generation)?;
        let r = self
            .matrix()
            .resolve::<u8>(Offset(offset))
            .ok_or(Error::Corrupt("blocks slot"))
            .map(|p| f(p, len as usize));
        if slot.unpin() {
            self.give_back(id.slot);
        }
        r
    }

    fn access(
        &self,
        id: BlockId,
        offset: usize,
        len: usize,
        f: impl FnOnce(*mut u8),
    ) -> Result<(), Error> {
        self.with_pinned(id, |p, block_len| {
            match offset.checked_add(len) {
                Some(end) if end <= block_len => {
                    // SAFETY: `offset..end` lies in the pinned block.
                    f(unsafe { p.as_ptr().add(offset) });
                    Ok(())
                }
                _ => Err(Error::OutOfBounds {
                    offset,
                    len,
                    block_len,
                }),
            }
        })?
    }

    /// This process's counts and the segment's live bytes.
    pub fn stats(&self) -> BlocksStats {
        let c = &self.inner.counters;
        BlocksStats {
            allocated: c.shards.iter().map(|s| s.allocated.load(Relaxed)).sum(),
            freed: c.shards.iter().map(|s| s.freed.load(Relaxed)).sum(),
            current_bytes: self.table().in_use.bytes.load(Relaxed),
            current_blocks: self.table().in_use.blocks.load(Relaxed),
            waits: c.waits.load(Relaxed),
            time_waited: Duration::from_nanos(c.waited_ns.load(Relaxed)),
            timeouts: c.timeouts.load(Relaxed),
        }
    }
}

/// A block in the segment (see the [module documentation](self)). Several
/// `Block`s, in several processes, may name one block; once it is freed
/// through any of them, the others' accesses are `Error::StaleBlock`.
#[derive(Debug)]
pub struct Block {
    blocks: Blocks,
    id: BlockId,
    len: usize,
}

impl Block {
    /// Its id, to hand to another task or process.
    pub fn id(&self) -> BlockId {
        self.id
    }

    /// Its length in bytes (what was asked for).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether its length is 0: never, as `min_block_size` is at least 1.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `bytes` at `offset`. Other `Block`s of the same block (in
    /// any thread or process) may read and write it at the same time: the
    /// bytes are copied with relaxed atomic stores, so that is no data
    /// race, but which writer's byte wins is not ordered.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), Error> {
        self.blocks.access(self.id, offset, bytes.len(), |p| {
            for (i, &b) in bytes.iter().enumerate() {
                // SAFETY: byte `i` lies in the pinned block; `AtomicU8` has
                // the layout of `u8`, and every access to block bytes goes
                // through atomics.
                unsafe { AtomicU8::from_ptr(p.add(i)) }.store(b, Relaxed);
            }
        })
    }

    /// Reads `out.len()` bytes at `offset` into `out` (relaxed atomic
    /// loads, see [`Block::write`]).
    pub fn read_into(&self, offset: usize, out: &mut [u8]) -> Result<(), Error> {
        self.blocks.access(self.id, offset, out.len(), |p| {
            for (i, o) in out.iter_mut().enumerate() {
                // SAFETY: as in `write`.
                *o = unsafe { AtomicU8::from_ptr(p.add(i)) }.load(Relaxed);
            }
        })
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>, Error> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(Error::OutOfBounds {
                offset,
                len,
                block_len: self.len,
            });
        }
        let mut out = vec![0; len];
        self.read_into(offset, &mut out)?;
        Ok(out)
    }
}
