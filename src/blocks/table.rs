//! The blocks front end's state in the segment: the configuration, a table
//! of slots that give each block its generation, the free-slot stack, the
//! byte count against the limit and the futex word that waiters sleep on.
//!
//! ## A slot's state word
//! `generation << GEN_SHIFT | pins << 1 | LIVE`. Invariants:
//! - the generation only grows: +1 on every free, so an id (slot,
//!   generation) names one block ever; an id whose generation is below the
//!   slot's was freed (`DoubleFree`/`StaleBlock`), above it never existed
//!   (`InvalidBlock`);
//! - a pin is taken only while `LIVE` and the generation matches (one CAS),
//!   and the block's memory is given back only when the slot is not `LIVE`
//!   and has no pins; whoever makes that so (the freer, or the last
//!   unpinner) gives it back, exactly once (only one CAS or `fetch_sub`
//!   can reach the state "dead, no pins" from one with pins or `LIVE`).
//!   So an access that pinned the block reads and writes its memory and no
//!   one else's, however it races a free in any process: it completes, and
//!   the free takes effect after it;
//! - `offset` and `len` are written before the `Release` store that makes
//!   the slot `LIVE`; every pin is an `AcqRel` CAS that reads that state, so
//!   a pinned access sees them.

use crate::{Error, Offset, Shareable};
use std::sync::atomic::Ordering::*;
use std::sync::atomic::{AtomicU32, AtomicU64};

pub(crate) const LIVE: u64 = 1;
pub(crate) const PIN: u64 = 2;
const PIN_MASK: u64 = (1 << GEN_SHIFT) - 2;
pub(crate) const GEN_SHIFT: u32 = 24;

/// The name the table is published under in the segment's directory.
pub(crate) const TABLE_NAME: &str = "matrix-alloc.blocks";

#[repr(C)]
pub(crate) struct Slot {
    state: AtomicU64,
    offset: AtomicU64,
    len: AtomicU64,
    /// The next free slot's index + 1, while on the free-slot stack.
    next: AtomicU64,
}

/// What the creator configured; every process uses the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_memory: u64,
    pub min_block: u64,
    pub max_block: u64,
    pub alignment: u64,
    pub zero_on_free: u64,
    pub max_blocks: u64,
}

#[repr(C)]
pub(crate) struct Table {
    pub limits: Limits,
    /// A random tag of this table, in every id it gives out.
    pub tag: u32,
    slots: Offset,
    next_unused: AtomicU64,
    /// Free-slot stacks, one per stripe of threads, so that threads reuse
    /// their own slots and do not take turns on one cache line: each top
    /// index + 1 (0: empty) | ABA tag << 32.
    free_tops: [Line<AtomicU64>; STRIPES],
    /// Bytes of live blocks, against `limits.max_memory`, and their number.
    pub in_use: Line<Usage>,
    /// Bumped after every free: the futex word waiters sleep on.
    pub freed: Line<AtomicU32>,
    /// Threads (of any process) sleeping on `freed`.
    pub waiters: AtomicU32,
}

/// Live blocks (and those being made): one cache line for both, changed
/// together.
#[repr(C)]
#[derive(Default)]
pub(crate) struct Usage {
    pub bytes: AtomicU64,
    pub blocks: AtomicU64,
}

/// Free-slot stacks in a table.
pub(crate) const STRIPES: usize = 8;

/// A value on a cache line (pair) of its own.
#[repr(C, align(128))]
#[derive(Default)]
pub(crate) struct Line<T>(pub T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

// SAFETY: integers, atomics and an offset; `#[repr(C)]`.
unsafe impl Shareable for Table {}

// SAFETY: atomics only; `#[repr(C)]`.
unsafe impl Shareable for Slot {}

/// Why an id does not name a live block.
pub(crate) fn stale_or_invalid(state: u64, generation: u64) -> Error {
    if generation < state >> GEN_SHIFT {
        Error::StaleBlock
    } else {
        Error::InvalidBlock
    }
}

impl Table {
    pub(crate) fn new(limits: Limits, tag: u32, slots: Offset) -> Table {
        Table {
            limits,
            tag,
            slots,
            next_unused: AtomicU64::new(0),
            free_tops: Default::default(),
            in_use: Line::default(),
            freed: Line::default(),
            waiters: AtomicU32::new(0),
        }
    }

    pub(crate) fn slots_offset(&self) -> Offset {
        self.slots
    }

    /// Reserves `bytes` against the limit.
    pub(crate) fn reserve(&self, bytes: u64) -> bool {
        let limit = self.limits.max_memory;
        let reserved = self
            .in_use
            .bytes
            .fetch_update(Relaxed, Relaxed, |used| {
                used.checked_add(bytes).filter(|&n| n <= limit)
            })
            .is_ok();
        if reserved {
            self.in_use.blocks.fetch_add(1, Relaxed);
        }
        reserved
    }

    pub(crate) fn unreserve(&self, bytes: u64) {
        self.in_use.bytes.fetch_sub(bytes, Relaxed);
        self.in_use.blocks.fetch_sub(1, Relaxed);
    }

    /// Takes a free slot: a recycled one, from stripe `stripe`'s stack
    /// first, else one never used.
    pub(crate) fn take_slot(&self, slots: &[Slot], stripe: usize) -> Option<u32> {
        let recycled =
            (0..STRIPES).find_map(|i| self.pop(slots, &self.free_tops[(stripe + i) % STRIPES]));
        if recycled.is_some() {
            return recycled;
        }
        let fresh = self
            .next_unused
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < self.limits.max_blocks).then_some(n + 1)
            })
            .ok()?;
        Some(fresh as u32)
    }

    fn pop(&self, slots: &[Slot], stack: &AtomicU64) -> Option<u32> {
        let mut top = stack.load(Acquire);
        loop {
            let index = (top & u32::MAX as u64) as usize;
            if index == 0 {
                return None;
            }
            let next = slots.get(index - 1)?.next.load(Relaxed);
            let tagged = next | ((top >> 32) + 1) << 32;
            // Acquire: the slot's `next`, as pushed; the tag makes a slot
            // popped and pushed again meanwhile fail this CAS (ABA).
            match stack.compare_exchange(top, tagged, Acquire, Acquire) {
                Ok(_) => return Some(index as u32 - 1),
                Err(now) => top = now,
            }
        }
    }

    /// Puts slot `index` (dead, no pins) on stripe `stripe`'s stack.
    pub(crate) fn give_back_slot(&self, slots: &[Slot], index: u32, stripe: usize) {
        let stack = &self.free_tops[stripe % STRIPES];
        let mut top = stack.load(Relaxed);
        loop {
            slots[index as usize]
                .next
                .store(top & u32::MAX as u64, Relaxed);
            let tagged = (index as u64 + 1) | ((top >> 32) + 1) << 32;
            // Release: the `next` just written, for the popper's Acquire.
            match stack.compare_exchange(top, tagged, Release, Relaxed) {
                Ok(_) => return,
                Err(now) => top = now,
            }
        }
    }
}

impl Slot {
    /// Makes a taken slot live for a block at `offset` of `len` bytes;
    /// returns its generation.
    pub(crate) fn make_live(&self, offset: u64, len: u64) -> u64 {
        self.offset.store(offset, Relaxed);
        self.len.store(len, Relaxed);
        let state = self.state.load(Relaxed);
        // Release: `offset` and `len` for every pin's Acquire. A taken slot
        // is ours alone (dead, no pins), so a store is enough.
        self.state.store(state | LIVE, Release);
        state >> GEN_SHIFT
    }

    /// Pins the block of generation `generation`; returns its offset and
    /// length.
    pub(crate) fn pin(&self, generation: u64) -> Result<(u64, u64), Error> {
        let mut state = self.state.load(Relaxed);
        loop {
            if state & LIVE == 0 || state >> GEN_SHIFT != generation {
                return Err(stale_or_invalid(state, generation));
            }
            if state & PIN_MASK == PIN_MASK {
                return Err(Error::Unsupported("too many accesses of one block at once"));
            }
            match self
                .state
                .compare_exchange_weak(state, state + PIN, AcqRel, Relaxed)
            {
                Ok(_) => return Ok((self.offset.load(Relaxed), self.len.load(Relaxed))),
                Err(now) => state = now,
            }
        }
    }

    /// Drops a pin; true if the block is to be given back now (the slot was
    /// freed while pinned and this was the last pin).
    pub(crate) fn unpin(&self) -> bool {
        // AcqRel: the access's reads and writes happen before the memory is
        // given back by whoever sees no pins.
        let before = self.state.fetch_sub(PIN, AcqRel);
        before & LIVE == 0 && before & PIN_MASK == PIN
    }

    /// Frees the block of generation `generation`: the slot stops being
    /// live and its generation moves on. True if the block is to be given
    /// back now (no pins); else the last unpinner does it.
    pub(crate) fn kill(&self, generation: u64) -> Result<bool, Error> {
        let mut state = self.state.load(Relaxed);
        loop {
            if state & LIVE == 0 || state >> GEN_SHIFT != generation {
                return Err(match stale_or_invalid(state, generation) {
                    Error::StaleBlock => Error::DoubleFree,
                    e => e,
                });
            }
            let dead = ((generation + 1) << GEN_SHIFT) | (state & PIN_MASK);
            match self
                .state
                .compare_exchange_weak(state, dead, AcqRel, Relaxed)
            {
                Ok(_) => return Ok(state & PIN_MASK == 0),
                Err(now) => state = now,
            }
        }
    }

    /// Where the block is, for whoever gives it back (no pins, dead).
    pub(crate) fn place(&self) -> (u64, u64) {
        (self.offset.load(Relaxed), self.len.load(Relaxed))
    }
}

/// Returns a dead, unpinned slot to the stack and wakes the waiters.
pub(crate) fn recycle(table: &Table, slots: &[Slot], index: u32, len: u64, stripe: usize) {
    table.unreserve(len);
    table.give_back_slot(slots, index, stripe);
    notify(table);
}

/// Tells the waiters of every process that bytes or a slot came back.
pub(crate) fn notify(table: &Table) {
    // SeqCst with the waiters' SeqCst increment: either a sleeper sees the
    // new `freed` (and does not sleep) or this sees it counted (and wakes).
    table.freed.fetch_add(1, SeqCst);
    if table.waiters.load(SeqCst) > 0 {
        // The kernel reads the count as an `int`: `i32::MAX` is "all".
        crate::os::futex_wake(&table.freed, i32::MAX as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize) -> Vec<Slot> {
        (0..n)
            .map(|_| Slot {
                state: AtomicU64::new(0),
                offset: AtomicU64::new(0),
                len: AtomicU64::new(0),
                next: AtomicU64::new(0),
            })
            .collect()
    }

    fn table(max_blocks: u64, max_memory: u64) -> Table {
        let limits = Limits {
            max_memory,
            min_block: 1,
            max_block: max_memory,
            alignment: 8,
            zero_on_free: 0,
            max_blocks,
        };
        Table::new(limits, 7, Offset::NULL)
    }

    #[test]
    fn generations_move_on_and_ids_are_told_apart() {
        let s = &slots(1)[0];
        let g = s.make_live(64, 10);
        assert_eq!(g, 0);
        assert_eq!(s.pin(g).unwrap(), (64, 10));
        assert!(!s.unpin());
        assert!(matches!(s.pin(g + 1), Err(Error::InvalidBlock)));
        assert!(s.kill(g).unwrap(), "no pins: given back by the freer");
        assert!(matches!(s.pin(g), Err(Error::StaleBlock)));
        assert!(matches!(s.kill(g), Err(Error::DoubleFree)));
        assert!(
            matches!(s.kill(g + 1), Err(Error::InvalidBlock)),
            "not live yet"
        );
        let g2 = s.make_live(128, 20);
        assert_eq!(g2, g + 1);
        assert!(matches!(s.pin(g), Err(Error::StaleBlock)));
        assert_eq!(s.pin(g2).unwrap(), (128, 20));
        s.unpin();
    }

    #[test]
    fn the_last_unpinner_gives_a_freed_block_back() {
        let s = &slots(1)[0];
        let g = s.make_live(64, 10);
        s.pin(g).unwrap();
        s.pin(g).unwrap();
        assert!(!s.kill(g).unwrap(), "pinned: not given back by the freer");
        assert!(matches!(s.pin(g), Err(Error::StaleBlock)), "no new pins");
        assert!(!s.unpin());
        assert!(s.unpin(), "the last pin gives it back");
        assert_eq!(s.state.load(Relaxed), (g + 1) << GEN_SHIFT);
    }

    #[test]
    fn slots_come_back_to_their_stripe_first_and_run_out() {
        let t = table(3, 100);
        let s = slots(3);
        let taken: Vec<u32> = (0..3).map(|_| t.take_slot(&s, 0).unwrap()).collect();
        assert_eq!(taken, [0, 1, 2]);
        assert_eq!(t.take_slot(&s, 0), None);
        t.give_back_slot(&s, 1, 0);
        t.give_back_slot(&s, 2, 5);
        // Its own stripe's first, then the others'.
        assert_eq!(t.take_slot(&s, 5), Some(2));
        assert_eq!(t.take_slot(&s, 5), Some(1));
        assert_eq!(t.take_slot(&s, 0), None);
    }

    #[test]
    fn the_limit_holds() {
        let t = table(3, 100);
        assert!(t.reserve(60));
        assert!(!t.reserve(41));
        assert!(t.reserve(40));
        assert!(!t.reserve(u64::MAX));
        assert_eq!(t.in_use.blocks.load(Relaxed), 2);
        t.unreserve(60);
        t.unreserve(40);
        assert_eq!(t.in_use.blocks.load(Relaxed), 0);
        assert!(t.reserve(100));
    }

    #[test]
    fn pins_and_frees_on_many_threads_give_back_once() {
        let s = &slots(1)[0];
        for round in 0..200 {
            let g = s.make_live(64, 10);
            let given_back = AtomicU64::new(0);
            std::thread::scope(|scope| {
                for _ in 0..3 {
                    scope.spawn(|| {
                        for _ in 0..50 {
                            if s.pin(g).is_ok() && s.unpin() {
                                given_back.fetch_add(1, Relaxed);
                            }
                        }
                    });
                }
                scope.spawn(|| {
                    if s.kill(g).unwrap() {
                        given_back.fetch_add(1, Relaxed);
                    }
                });
            });
            assert_eq!(given_back.load(Relaxed), 1, "round {round}");
            assert_eq!(s.state.load(Relaxed), (g + 1) << GEN_SHIFT);
        }
    }
}
