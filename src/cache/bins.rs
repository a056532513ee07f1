//! Block caches: per thread, engine blocks above `MEDIUM_MAX` that users
//! freed, kept whole in size classes for the thread's next allocations.
//!
//! Above `MEDIUM_MAX` (the largest block of the medium pages, see
//! `kinds`) blocks come from the shared engine, whose every
//! allocation and free claims and publishes nodes with read-modify-writes
//! that all threads contend on. A freed block of up to `BIN_MAX` bytes goes
//! instead into the freeing thread's cache (one CAS on its header, `Used ->
//! Cached`), and an allocation of its class takes it back with plain
//! stores: in a steady state a thread's medium allocations touch only its
//! own cache and the blocks' headers. Any thread of any process frees any
//! block into its own cache (a cached block is a plain engine block, it has
//! no home), so frees from elsewhere are O(1) too.
//!
//! Classes are four per doubling (1.25 KiB, 1.5, 1.75, 2, 2.5, ... 4 MiB),
//! as mimalloc's; the first `MEDIUM_CLASSES` are the medium pages', and
//! a block of theirs is not kept here. An allocation of class `k` takes a
//! block from list `k`,
//! or asks the engine for exactly `class_size(k)` bytes; a freed block goes
//! on the list of the largest class it can serve (`floor_class` of its
//! payload). So every block on list `k` holds at least `class_size(k)`
//! bytes, and a block is at most a quarter larger than its request.
//!
//! A cache's lists live in the segment, in a *record* (an engine block)
//! registered in `Control::bin_records`, so that a process killed with
//! blocks cached loses them only until `reclaim_dead`, which gives back
//! the blocks of every record whose owner is dead. A record's *tag* is its
//! registration word, `owner slot and generation << 32 | record position`;
//! every block on its lists carries the tag in header word 1.
//!
//! Invariants (the owner is the thread that registered the record):
//! - only the owner reads or writes a record's lists; once the owner is
//!   dead, only the reclaimer that won its registration word by CAS;
//! - every block on list `k` is `Cached` under the record's tag, with a
//!   payload of at least `class_size(k)`; `counts[k]` is the list's length
//!   and `bytes` the payload bytes of all lists;
//! - a block is `Cached` under a tag only on that record's lists, or for
//!   the moment between its CAS and its push or between its pop and its
//!   store back to `Used` (an owner killed then loses that one block:
//!   `check()` counts it orphaned).
//!
//! The links live in the free blocks (the first four bytes of the payload,
//! the next block's position). A program that writes to a block after
//! freeing it can change one; every block is checked against the tag
//! before it is followed, and a list whose link is damaged is dropped from
//! there on (those blocks stay cached, counted orphaned) instead of handing
//! out memory that is not a cached block.
//!
//! Orderings: the record fields are `Relaxed` atomics, written by one
//! thread at a time (so that a concurrent `check()` reads without UB). A
//! registration word is CAS'd `AcqRel` (registering, and a reclaimer
//! taking it) and cleared `Release` after the record is drained and freed.
//! A reclaimer reads a dead owner's last stores: they were made before the
//! process died, which the reclaimer learnt from the kernel.

use super::SWEEPER;
use crate::engine::words::NIL;
use crate::engine::{payload_bytes, Engine};
use crate::geometry::{class_size, BIN_CLASSES, MEDIUM_CLASSES, SMALL_MAX};
use crate::sync::{AtomicU32, AtomicU64, Ordering::*};
use crate::Error;

/// The largest class a block with `payload` bytes serves, if any.
fn floor_class(payload: usize) -> Option<usize> {
    if payload < class_size(0) || payload >= class_size(BIN_CLASSES) {
        return None;
    }
    let d = payload.ilog2() as usize - SMALL_MAX.ilog2() as usize;
    let s = (payload - (SMALL_MAX << d)) >> (SMALL_MAX.ilog2() as usize - 2 + d);
    Some((4 * d + s).min(BIN_CLASSES) - 1)
}

/// A cache's state in the segment.
#[repr(C)]
struct Record {
    /// Payload bytes of the blocks on the lists.
    bytes: AtomicU64,
    /// Per class, the first block's position, or `NIL`.
    heads: [AtomicU32; BIN_CLASSES],
    counts: [AtomicU32; BIN_CLASSES],
}

/// The registration word of a record at `pos` for the owner `token`
/// (`cache::make_token`: its top 32 bits are the slot and generation).
fn tag_of(token: u64, pos: u32) -> u64 {
    token & !0xffff_ffff | pos as u64
}

fn record_pos(tag: u64) -> u32 {
    tag as u32
}

/// Whether the owner named by a registration word is dead.
fn tag_dead(engine: &Engine, tag: u64) -> bool {
    super::owner_dead(engine, tag & !0xffff_ffff)
}

/// One thread's block cache for one segment (in its `Heap`).
pub(crate) struct Bins {
    /// The record, registered on the first free that keeps a block;
    /// null before, and after `release`.
    record: *const Record,
    tag: u64,
    /// Index of the registration word.
    entry: usize,
    token: u64,
    /// Payload bytes the cache keeps at most, whatever the thread holds.
    limit: u64,
    /// Payload bytes of the blocks this thread took from the caches' sizes
    /// less those it freed (an estimate of what it holds: blocks freed by
    /// other threads are not subtracted here).
    live: i64,
    /// No free registration word was left: the thread does without.
    refused: bool,
}

impl Bins {
    pub(crate) fn new(engine: &Engine, token: u64) -> Bins {
        Bins {
            record: std::ptr::null(),
            tag: 0,
            entry: 0,
            token,
            limit: limit(engine),
            live: 0,
            refused: false,
        }
    }

    fn record(&self) -> Option<&Record> {
        // SAFETY: a non-null `record` is the payload of an engine block
        // this cache registered and has not freed, in the mapping its heap
        // keeps alive; the record is atomics only.
        unsafe { self.record.as_ref() }
    }

    /// Takes a block of class `k` and hands it out for `requested` bytes.
    /// Returns its payload address.
    #[inline(always)]
    pub(crate) fn pop(&mut self, engine: &Engine, k: usize, requested: u64) -> Option<*mut u8> {
        let rec = self.record()?;
        let k = k % BIN_CLASSES;
        // A block of the next class (at most a fifth larger) rather than
        // none: the caches serve more of a mix of sizes for the same room.
        // (A `match`, not `or_else`: that one was a call, with its closure
        // set up on every allocation.)
        let (pos, size) = match take(engine, rec, self.tag, k) {
            Some(taken) => taken,
            None => take(engine, rec, self.tag, (k + 1).min(BIN_CLASSES - 1))?,
        };
        engine.uncache_block(pos, size, requested);
        self.live += payload_bytes(size) as i64;
        Some(engine.payload(pos))
    }

    /// Frees the block at `pos` into this cache, if it is a `Used` block
    /// the cache has room for. `None`: not taken (nothing changed; the
    /// caller frees it to the engine); else its requested size, or the
    /// error (`DoubleFree`, `InvalidPointer`) with nothing changed.
    #[inline(always)]
    pub(crate) fn free(&mut self, engine: &Engine, pos: u32) -> Option<Result<u64, Error>> {
        let h = match engine.used_block(pos) {
            Ok(h) => h,
            Err(e) => return Some(Err(e)),
        };
        let payload = payload_bytes(h.size);
        // Medium pages serve the medium classes: a block of theirs here
        // (an engine block, allocated when no page could be had) goes back.
        let k = floor_class(payload).filter(|k| *k >= MEDIUM_CLASSES)?;
        self.live -= payload as i64;
        if self.record.is_null() && !self.register(engine) {
            return None;
        }
        let rec = self.record()?;
        // At most an eighth of what the thread holds (so that the cache
        // costs little memory, and a thread that frees most of what it
        // held gives most of it back), and no more than `limit`.
        let room = (self.live.max(0) as u64 / 8).max(MIN_ROOM).min(self.limit);
        if rec.bytes.load(Relaxed) > room {
            // The thread holds less than when these were cached.
            self.evict_one(engine);
        }
        let rec = self.record()?;
        let mut bytes = rec.bytes.load(Relaxed) + payload as u64;
        if bytes > room {
            bytes = self.make_room(engine, k, payload as u64, room)?;
        }
        let requested = match engine.cache_block(pos, h, self.tag) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        link(engine.payload(pos)).store(rec.heads[k].load(Relaxed), Relaxed);
        rec.heads[k].store(pos, Relaxed);
        rec.counts[k].store(rec.counts[k].load(Relaxed) + 1, Relaxed);
        rec.bytes.store(bytes, Relaxed);
        Some(Ok(requested))
    }

    /// Gives the first block of the largest class that has one back to
    /// the engine.
    #[cold]
    fn evict_one(&mut self, engine: &Engine) {
        let Some(rec) = self.record() else {
            return;
        };
        let Some(k) = (0..BIN_CLASSES)
            .rev()
            .find(|k| rec.heads[*k].load(Relaxed) != NIL)
        else {
            return;
        };
        if let Some((pos, _)) = take(engine, rec, self.tag, k) {
            if let Some(bytes) = engine.free_cached(pos, self.tag) {
                engine.counters().sub_block_bytes(bytes);
            }
        }
    }

    /// Makes room for a block of class `k` with `payload` bytes in a full
    /// cache by giving back (at most four) blocks of the class it holds the
    /// most of, while that is more than class `k` would hold: a cache that
    /// covers more classes serves more of a mix of sizes in the same room
    /// (it halved the engine allocations of the 64 – 512 KiB workload, and
    /// took a quarter of them off the 4 – 64 KiB one). Returns the cache's
    /// payload bytes with the block, if it fits now.
    #[cold]
    fn make_room(&self, engine: &Engine, k: usize, payload: u64, room: u64) -> Option<u64> {
        let rec = self.record()?;
        for _ in 0..4 {
            let counts = |c: usize| rec.counts[c].load(Relaxed);
            let fullest = (0..BIN_CLASSES).max_by_key(|&c| counts(c))?;
            if counts(fullest) <= counts(k) + 1 {
                return None;
            }
            if let Some((pos, _)) = take(engine, rec, self.tag, fullest) {
                if let Some(bytes) = engine.free_cached(pos, self.tag) {
                    engine.counters().sub_block_bytes(bytes);
                }
            }
            let bytes = rec.bytes.load(Relaxed) + payload;
            if bytes <= room {
                return Some(bytes);
            }
        }
        None
    }

    /// A block of `payload` bytes of the caches' sizes came from the engine
    /// for this thread.
    pub(crate) fn note_alloc(&mut self, payload: usize) {
        self.live += payload as i64;
    }

    /// Allocates and registers this thread's record. Returns whether it
    /// has one now.
    #[cold]
    fn register(&mut self, engine: &Engine) -> bool {
        if self.refused {
            return false;
        }
        let Ok(a) = engine.alloc(size_of::<Record>(), 64) else {
            return false;
        };
        let record = engine.payload(a.pos) as *const Record;
        // SAFETY: the engine just gave us this block, large and aligned
        // enough for a record; no one else can reach it yet.
        unsafe {
            let r = record as *mut Record;
            (*r).bytes = AtomicU64::new(0);
            (*r).heads = [const { AtomicU32::new(NIL) }; BIN_CLASSES];
            (*r).counts = [const { AtomicU32::new(0) }; BIN_CLASSES];
        }
        let tag = tag_of(self.token, a.pos);
        let words = &engine.control().bin_records;
        let Some(entry) = words
            .iter()
            .position(|w| w.compare_exchange(0, tag, AcqRel, Relaxed).is_ok())
        else {
            let _ = engine.free(a.pos);
            self.refused = true;
            return false;
        };
        engine.counters().add_block_bytes(a.block_bytes);
        (self.record, self.tag, self.entry) = (record, tag, entry);
        true
    }

    /// Gives every cached block back to the engine, frees the record and
    /// unregisters it (the thread exits, or `trim`). The next free that
    /// keeps a block registers a record again.
    /// Returns whether it held any block.
    pub(crate) fn release(&mut self, engine: &Engine) -> bool {
        let Some(rec) = self.record() else {
            return false;
        };
        let given = drain(engine, rec, self.tag);
        free_record(engine, self.tag);
        engine.control().bin_records[self.entry].store(0, Release);
        self.record = std::ptr::null();
        given != 0
    }
}

/// The link of a cached block: the first four bytes of its payload.
fn link(payload: *mut u8) -> &'static AtomicU32 {
    // SAFETY: a cached block's payload is more than `SMALL_MAX` bytes,
    // 16-aligned, inside the mapping; while cached its first four bytes are
    // the link, written only by the cache that holds it.
    unsafe { &*(payload as *const AtomicU32) }
}

/// The room a cache has whatever its thread holds (within `limit`): a few
/// blocks, so that a thread that frees and allocates one block at a time
/// reuses it.
const MIN_ROOM: u64 = 256 << 10;

/// Payload bytes one thread's cache keeps at most: 1/64 of the heap, and
/// no more than 32 MiB. (A thread's working set of medium blocks is freed
/// and allocated again through it; beyond, blocks go back to the engine.
/// Other threads cannot use what a cache keeps, so it stays a small part
/// of the heap.)
fn limit(engine: &Engine) -> u64 {
    (engine.capacity() / 64).min(32 << 20)
}

/// Takes the first block off list `k` of `rec` (cached under `tag`):
/// its position and size. The list stays whole at every step, so that an
/// owner killed here loses at most this block. A head that is not a block
/// cached under `tag` (a damaged link, see the module notes) empties the list.
#[inline(always)]
fn take(engine: &Engine, rec: &Record, tag: u64, k: usize) -> Option<(u32, u32)> {
    let head = &rec.heads[k];
    let pos = head.load(Relaxed);
    if pos == NIL {
        return None;
    }
    let Some(size) = engine.cached_block(pos, tag) else {
        head.store(NIL, Relaxed);
        rec.counts[k].store(0, Relaxed);
        // What the dropped blocks held is not known: count the rest again.
        let mut bytes = 0;
        walk(engine, rec, tag, |size| bytes += payload_bytes(size) as u64);
        rec.bytes.store(bytes, Relaxed);
        return None;
    };
    head.store(link(engine.payload(pos)).load(Relaxed), Relaxed);
    let count = &rec.counts[k];
    count.store(count.load(Relaxed).wrapping_sub(1), Relaxed);
    let bytes = payload_bytes(size) as u64;
    rec.bytes
        .store(rec.bytes.load(Relaxed).wrapping_sub(bytes), Relaxed);
    Some((pos, size))
}

/// The blocks of `rec`'s lists that are cached under `tag`, each visited
/// once (a list is followed while its blocks check out, and for no more
/// than its count), without changing them. `visit` gets each block's size.
fn walk(engine: &Engine, rec: &Record, tag: u64, mut visit: impl FnMut(u32)) {
    for k in 0..BIN_CLASSES {
        let mut pos = rec.heads[k].load(Relaxed);
        // A damaged record may count more blocks than the heap can hold
        // and link them in a cycle: no more than the heap holds are visited.
        let most = engine.capacity() / class_size(k) as u64;
        let mut left = (rec.counts[k].load(Relaxed) as u64).min(most);
        while pos != NIL && left > 0 {
            let Some(size) = engine.cached_block(pos, tag) else {
                break;
            };
            visit(size);
            pos = link(engine.payload(pos)).load(Relaxed);
            left -= 1;
        }
    }
}

/// Gives the blocks of `rec`'s lists back to the engine, one by one off
/// their lists (as `take`), and empties the lists. Returns the block bytes
/// given back.
fn drain(engine: &Engine, rec: &Record, tag: u64) -> u64 {
    let mut given = 0;
    for k in 0..BIN_CLASSES {
        // Bounded: a damaged list could loop.
        let mut left = rec.counts[k].load(Relaxed);
        while left > 0 {
            let Some((pos, _)) = take(engine, rec, tag, k) else {
                break;
            };
            if let Some(bytes) = engine.free_cached(pos, tag) {
                engine.counters().sub_block_bytes(bytes);
                given += bytes;
            }
            left -= 1;
        }
        rec.heads[k].store(NIL, Relaxed);
        rec.counts[k].store(0, Relaxed);
    }
    rec.bytes.store(0, Relaxed);
    given
}

fn free_record(engine: &Engine, tag: u64) {
    if let Ok((_, bytes)) = engine.free(record_pos(tag)) {
        engine.counters().sub_block_bytes(bytes);
    }
}

fn record_at(engine: &Engine, tag: u64) -> Option<&Record> {
    // A registered tag names the position of a live record block (records
    // are freed only after their word is taken off, by the registered
    // owner or by the reclaimer that won the word); a damaged word may name
    // anything, so what it names is checked first.
    let pos = record_pos(tag);
    let h = engine.used_block(pos).ok()?;
    (crate::engine::payload_bytes(h.size) >= size_of::<Record>()).then_some(())?;
    // SAFETY: a used block inside the heap (checked above) with room for a
    // record; the record is atomics only, so any bytes there are a value.
    Some(unsafe { &*(engine.payload(pos) as *const Record) })
}

/// Takes back the caches of dead threads: gives their blocks and records
/// back to the engine. Returns the block bytes given back (records
/// included).
pub(crate) fn reclaim_dead(engine: &Engine) -> u64 {
    let mut given = 0;
    for word in &engine.control().bin_records {
        let tag = word.load(Acquire);
        if tag == 0 || !tag_dead(engine, tag) {
            continue;
        }
        let swept = tag_of(SWEEPER, record_pos(tag));
        if word.compare_exchange(tag, swept, AcqRel, Relaxed).is_err() {
            continue;
        }
        if let Some(rec) = record_at(engine, tag) {
            given += drain(engine, rec, tag);
        }
        if let Ok((_, bytes)) = engine.free(record_pos(tag)) {
            engine.counters().sub_block_bytes(bytes);
            given += bytes;
        }
        word.store(0, Release);
    }
    given
}

/// What the caches hold, for `check()` and `stats()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Census {
    /// Registered records, and their requested bytes (the engine counts
    /// each as a used block).
    pub(crate) records: u64,
    pub(crate) record_bytes: u64,
    /// Blocks on the lists, and their block bytes.
    pub(crate) blocks: u64,
    pub(crate) block_bytes: u64,
    /// Records of live owners whose lists disagree with their counts.
    pub(crate) inconsistent: u64,
}

/// Counts what the registered caches hold. Exact while no thread is using
/// its cache.
pub(crate) fn census(engine: &Engine) -> Census {
    let mut c = Census::default();
    for word in &engine.control().bin_records {
        let tag = word.load(Acquire);
        if tag == 0 {
            continue;
        }
        c.records += 1;
        c.record_bytes += size_of::<Record>() as u64;
        let Some(rec) = record_at(engine, tag) else {
            c.inconsistent += 1;
            continue;
        };
        let (mut n, mut bytes, mut payload) = (0u64, 0u64, 0u64);
        walk(engine, rec, tag, |size| {
            n += 1;
            bytes += (size as u64) << crate::engine::words::GRANULE_LOG;
            payload += payload_bytes(size) as u64;
        });
        let counted: u64 = rec.counts.iter().map(|c| c.load(Relaxed) as u64).sum();
        if (n != counted || payload != rec.bytes.load(Relaxed)) && !tag_dead(engine, tag) {
            c.inconsistent += 1;
        }
        c.blocks += n;
        c.block_bytes += bytes;
    }
    c
}

/// Payload bytes kept in all registered caches (for `Stats::cached_bytes`).
pub(crate) fn cached_bytes(engine: &Engine) -> u64 {
    engine
        .control()
        .bin_records
        .iter()
        .map(|w| w.load(Acquire))
        .filter(|t| *t != 0)
        .filter_map(|t| record_at(engine, t).map(|r| r.bytes.load(Relaxed)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{bin_class, BIN_MAX};

    #[test]
    fn classes_are_four_per_doubling_and_cover_the_range() {
        assert_eq!(class_size(0), 1280);
        assert_eq!(class_size(3), 2048);
        assert_eq!(class_size(BIN_CLASSES - 1), BIN_MAX);
        assert_eq!(bin_class(SMALL_MAX, 16), None);
        assert_eq!(bin_class(BIN_MAX + 1, 16), None);
        assert_eq!(bin_class(2048, 32), None);
        for size in (SMALL_MAX + 1..=BIN_MAX).step_by(7).chain([BIN_MAX]) {
            let k = bin_class(size, 8).unwrap();
            assert!(class_size(k) >= size, "{size}: class {k}");
            assert!(k == 0 || class_size(k - 1) < size, "{size}: class {k}");
            // At most a quarter of waste.
            assert!(class_size(k) * 4 <= size * 5 + 4 * 256, "{size}");
        }
        for payload in (class_size(0)..class_size(BIN_CLASSES) + 100).step_by(5) {
            match floor_class(payload) {
                Some(k) => {
                    assert!(class_size(k) <= payload);
                    assert!(k + 1 == BIN_CLASSES || class_size(k + 1) > payload);
                }
                None => assert!(payload >= class_size(BIN_CLASSES)),
            }
        }
        assert_eq!(floor_class(class_size(0) - 1), None);
    }

    #[test]
    fn tags_name_the_owner_and_the_record() {
        let token = super::super::make_token(5, 9, 1234);
        let tag = tag_of(token, 77);
        assert_eq!(record_pos(tag), 77);
        assert_eq!(tag >> 32, token >> 32);
    }
}
