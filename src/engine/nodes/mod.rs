//! Nodes, free lists, bitmaps, and the claim protocol.
//!
//! # Lists
//! Free lists and the node pool are Treiber stacks of node indices whose head
//! word carries an ABA tag ([`ListHead`]). A pop reads `next` of a node that
//! another thread may have popped and reused meanwhile; that read is harmless
//! (node memory is never handed to users) and the tagged CAS then fails.
//! Orderings: a push publishes `next` and the node's fields with `Release` on
//! the head CAS; a pop's `Acquire` load of the head pairs with it.
//!
//! # Claims
//! A free block is owned through its node's claim word ([`ClaimWord`]). The
//! transitions, each a CAS on that one word, are:
//!
//! ```text
//! Pool --prepare--> Claimed(unlisted) --go_live--> Live(listed) --claim--> Claimed
//! Claimed --retire--> Dead (if listed) / Pool      Claimed --release--> Live (if listed) / republish
//!  popper: Live -> Claimed(unlisted) | Claimed -> Claimed(unlisting) -> Claimed(unlisted) | Dead -> Pool
//!  sweep:  Dead/Claimed(unlisted) --recycle--> Claimed(set aside, no block) --prepare--> Claimed | --end--> Pool
//! ```
//!
//! Invariants:
//! - a node is `Live` only while its block is free, published, and unchanged
//!   since it was published; whoever moves it out of `Live` owns the block;
//! - a `Claimed` node names its holder (process slot and slot generation),
//!   so that what a killed process held can be found and given back (see
//!   `recover`, which states what the holder keeps true at every step);
//! - `listed` is set from just before the node is pushed until it is
//!   popped; the popper clears it. A node that is not listed and not `Pool`
//!   is recycled by its holder, a listed one by its popper: exactly one
//!   party recycles a node;
//! - a holder makes a listed node `Live` again only while it is not marked
//!   `unlisting`: a popper marks a `Claimed` top before it unlinks it, so a
//!   node that may be off its list is never made `Live` where it is (see
//!   `mark_unlisting`);
//! - a failed claim on a `Claimed` node sets `recheck`, and the holder settles
//!   the block again when it lets go of it. So no thread ever waits for a
//!   holder, and no merge is lost: the holder inherits it.
//!
//! # Orderings
//! All claim-word operations are `SeqCst` (see below). The `Relaxed` sites:
//! - `node.next` store before a push: published by the push's head CAS.
//! - `node.next` load in a pop: used only if the tagged CAS then succeeds, in
//!   which case the head did not move and `next` is the value written before
//!   the push, visible through the `Acquire` head load.
//! - `node.block` store in `prepare`: published by the `SeqCst` store that
//!   makes the node held, and then by its `Live` CAS; every use follows a
//!   claim-word load or CAS that read one of those (and is discarded when
//!   the state read is not the one expected).
//! - `node_hwm`: a counter handing out distinct indices; a node's contents are
//!   published through its claim word and list push, not through it.
//! - peeks (`peek_node`, `largest_free`): hints, confirmed by a claim.
//! - CAS failure orderings: the failure value is only decoded and retried,
//!   never used to read other memory.
//! - list heads set in `Engine::format`: before the segment header's ready
//!   mark (`Release`), which every opener reads with `Acquire`.
//!
//! # Files
//! This one: the node pool, the lists and the bitmaps, and peeks at them;
//! `claims`: publication and the claim transitions; `sweep`: dropping
//! `Dead` tops and the last-resort sweep; `tests`.
//!
//! All claim-word operations are `SeqCst`. Publication and the neighbour check
//! that follows it form a store-buffer pattern with the same pair on the
//! neighbour's side (see `ops::settle`): with sequential consistency at least
//! one of the two sees the other, so two free neighbours are always merged by
//! someone.

use super::mapping::{map_floor, FL_COUNT, SL_COUNT};
use super::words::{BlockState, ClaimWord, HeaderWord, Hint, ListHead, NodeState, NIL};
use super::Engine;
use crate::sync::{AtomicU64, Ordering::*};
use std::cell::Cell;
use std::convert::Infallible;

mod claims;
mod sweep;

thread_local! {
    /// This thread's sweep, if it is in one (see `sweep_dead`).
    /// Const-initialised and without destructor: it never allocates, also
    /// under the global allocator.
    static SWEEP: Sweep = const {
        Sweep {
            active: Cell::new(false),
            aside: Cell::new(NIL),
            set_aside: Cell::new(0),
            wanted: Cell::new(0),
        }
    };

    /// Whether this thread is inside `recover_dead_holds`, which counts as
    /// a pop in flight: a `node_alloc` inside it does not wait for itself.
    pub(super) static RECOVERING: Cell<bool> = const { Cell::new(false) };
}

/// A thread's sweep of the free lists (`sweep_dead`), which publishes
/// blocks and so may need nodes itself, from a pool that the other threads
/// drain meanwhile: it sets aside some of the `Dead` nodes it recycles.
struct Sweep {
    /// Whether this thread is inside `sweep_dead`.
    active: Cell<bool>,
    /// The nodes set aside, chained through `next` (`NIL`: none). Each is
    /// held by this thread, bound to no block (`NO_BLOCK`), so that a
    /// recovery after a death retires it to the pool (it is not intact).
    aside: Cell<u32>,
    /// How many are set aside.
    set_aside: Cell<u32>,
    /// How many the sweep wants at most: a node for each block it holds
    /// (each may merge once it is listed again), and `SWEEP_MARGIN`.
    wanted: Cell<u32>,
}

/// Nodes a sweep sets aside beyond one per block it holds: for the
/// blocks whose unlink lost a race and that a popper marked `unlisting`
/// (they need a fresh node at once), and for merges with blocks others
/// published meanwhile.
const SWEEP_MARGIN: u32 = 16;

/// How many blocks whose unlink lost a race a sweep keeps until it has
/// taken their list apart (see `sweep_list`): a few, on the stack.
const LOST_RACES: usize = 16;

/// `Node::block` of a node set aside by a sweep: no block.
const NO_BLOCK: u32 = u32::MAX;

/// Outcome of taking the top of a free list ([`Engine::take_top`]).
pub(crate) enum Top {
    /// The list is empty.
    Empty,
    /// The caller now holds the node `.0` of the free block at `.1`, whose
    /// `.2` granules were added to `hidden`.
    Taken(Hint, u32, u32),
    /// Nothing taken this time (a race, or a top that was not `Live`): look
    /// again.
    Other,
}

/// Outcome of claiming a block through a hint.
pub(crate) enum Claim {
    /// The caller now owns the free block at `.0`, whose `.1` granules were
    /// added to `hidden`: the caller must `unhide` them when the memory is
    /// visible again or consumed.
    Got(u32, u32),
    /// Someone else holds it; they were asked (`recheck`) to settle it again.
    Busy,
    /// The hint is stale: the block was allocated, merged or republished.
    Gone,
}

/// Whether the caller of a publication still counts the block as hidden
/// (its claim's `hidden` covers it) until the publication is done.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Covered {
    Yes,
    No,
}

/// CAS of a held node's claim word from `cur` to `Live` (keeping `listed`
/// and the generation, dropping `recheck` and the holder).
fn make_live(node: &super::Node, cur: u64) -> Result<u64, u64> {
    let live = ClaimWord {
        state: NodeState::Live,
        recheck: false,
        unlisting: false,
        holder: 0,
        ..ClaimWord::from(cur)
    };
    node.claim
        .compare_exchange(cur, live.value(), SeqCst, SeqCst)
}

impl Engine {
    // ---- lists -------------------------------------------------------------

    fn push(&self, head: &AtomicU64, n: u32) {
        let node = self.node(n);
        let mut cur = head.load(Relaxed);
        loop {
            let h = ListHead::from(cur);
            node.next.store(h.top, Relaxed);
            // Release: makes `next` and the node's fields visible to the
            // popper. SeqCst (the same instruction on x86): `set_bits` relies
            // on the push preceding its bitmap read in the total order.
            match head.compare_exchange_weak(cur, h.replaced(n).value(), SeqCst, Relaxed) {
                Ok(_) => return,
                Err(v) => cur = v,
            }
        }
    }

    pub(super) fn pop(&self, head: &AtomicU64) -> Option<u32> {
        let mut cur = head.load(Acquire);
        loop {
            let h = ListHead::from(cur);
            if h.top == NIL || h.top >= self.node_capacity {
                return None;
            }
            // Racy read validated by the tagged CAS below.
            let next = self.node(h.top).next.load(Relaxed);
            match head.compare_exchange_weak(cur, h.replaced(next).value(), Acquire, Acquire) {
                Ok(_) => return Some(h.top),
                Err(v) => cur = v,
            }
        }
    }

    // ---- node pool -----------------------------------------------------------

    /// Takes a node out of the pool (or the never-used tail of the table) and
    /// returns it with its next generation. The node stays `Pool` until
    /// [`Engine::publish`] makes it `Live`, so stale hints cannot claim it.
    fn node_alloc(&self) -> Option<(u32, u32)> {
        let ctrl = self.control();
        let n = match self.pop(&ctrl.pool) {
            Some(n) => n,
            None => {
                let mut swept = false;
                let mut hwm = ctrl.node_hwm.load(Relaxed);
                let mut waiting_since: Option<std::time::Instant> = None;
                loop {
                    if hwm >= self.node_capacity {
                        if SWEEP.with(|s| s.active.get()) {
                            // Inside our own sweep (see `sweep_dead`): what
                            // it set aside, or else the `Dead` nodes on top
                            // of any list (of those it has not reached yet,
                            // say), which need no block held to reach.
                            let n = self.take_aside().or_else(|| {
                                for head in ctrl.heads.iter().flatten() {
                                    self.drop_dead_tops(head);
                                }
                                self.take_aside().or_else(|| self.pop(&ctrl.pool))
                            });
                            return n.map(|n| (n, self.next_gen(n)));
                        }
                        if !std::mem::replace(&mut swept, true) {
                            self.sweep_dead();
                        } else if self.in_flight_of_live().0 <= RECOVERING.with(Cell::get) as u64
                            || super::ops::out_of_patience(&mut waiting_since)
                        {
                            return None;
                        } else {
                            // Another thread's sweep is in flight (it
                            // counts as a pop): it holds the blocks of the
                            // list it is taking apart, so ours found nothing
                            // there, and it hands the `Dead` nodes to the
                            // pool as it goes. Wait for it rather than
                            // leave a block on no node.
                            std::thread::yield_now();
                        }
                        match self.pop(&ctrl.pool) {
                            Some(n) => break n,
                            None => continue,
                        }
                    }
                    match ctrl
                        .node_hwm
                        .compare_exchange_weak(hwm, hwm + 1, Relaxed, Relaxed)
                    {
                        Ok(_) => break hwm,
                        Err(v) => hwm = v,
                    }
                }
            }
        };
        Some((n, self.next_gen(n)))
    }

    /// The generation node `n` is bound in next.
    fn next_gen(&self, n: u32) -> u32 {
        ClaimWord::from(self.node(n).claim.load(SeqCst))
            .gen
            .wrapping_add(1)
    }

    /// Sets the node `n`, which nobody else references (unlisted, held by
    /// this thread or `Dead`), aside for this thread's sweep. It is held
    /// by this thread in a new generation (stale hints to it fail), bound
    /// to no block: were the process killed, recovery would retire it.
    fn set_aside(&self, sweep: &Sweep, n: u32) {
        self.hold_unlisted(n, NO_BLOCK, self.next_gen(n));
        self.node(n).next.store(sweep.aside.get(), Relaxed);
        sweep.aside.set(n);
        sweep.set_aside.set(sweep.set_aside.get() + 1);
    }

    /// A node this thread's sweep set aside, if any is left.
    fn take_aside(&self) -> Option<u32> {
        SWEEP.with(|sweep| {
            let n = sweep.aside.get();
            (n != NIL).then(|| {
                sweep.aside.set(self.node(n).next.load(Relaxed));
                sweep.set_aside.set(sweep.set_aside.get() - 1);
                n
            })
        })
    }

    /// Returns a node that nobody else references (unlisted, held by the
    /// caller) to the pool.
    fn recycle(&self, n: u32) {
        let kept = SWEEP.with(|sweep| {
            let keep = sweep.active.get() && sweep.set_aside.get() < sweep.wanted.get();
            if keep {
                self.set_aside(sweep, n);
            }
            keep
        });
        if kept {
            return;
        }
        let node = self.node(n);
        let w = ClaimWord::from(node.claim.load(SeqCst));
        node.claim.store(
            ClaimWord {
                state: NodeState::Pool,
                listed: false,
                recheck: false,
                unlisting: false,
                holder: 0,
                gen: w.gen,
            }
            .value(),
            SeqCst,
        );
        self.push(&self.control().pool, n);
    }

    // ---- bitmaps -------------------------------------------------------------

    /// Sets the bits of list `(fl, sl)` after a push to it. Bits that are
    /// already set are only read: a clearer that clears them after our read
    /// re-checks the list head afterwards and sees our push (`SeqCst` push,
    /// read, clear and re-check are in one total order).
    fn set_bits(&self, fl: usize, sl: usize) {
        let ctrl = self.control();
        if ctrl.sl_bitmap[fl].load(SeqCst) & (1 << sl) == 0 {
            ctrl.sl_bitmap[fl].fetch_or(1 << sl, SeqCst);
        }
        if ctrl.fl_bitmap.load(SeqCst) & (1 << fl) == 0 {
            ctrl.fl_bitmap.fetch_or(1 << fl, SeqCst);
        }
    }

    /// Whether a list head names a node. A top that is neither `NIL` nor a
    /// valid index (a stray write into the segment) counts as empty, as
    /// `pop` treats it, so that no scan keeps finding a list it cannot pop.
    fn holds_nodes(&self, head: &AtomicU64) -> bool {
        ListHead::from(head.load(SeqCst)).top < self.node_capacity
    }

    /// Clears the bits of a list found empty, then re-checks the list: a push
    /// that raced with the clear is either seen here (bits set again) or set
    /// its bits after the clear. `SeqCst` orders the clear before the re-check
    /// against the pusher's push-then-set.
    pub(super) fn clear_bits_if_empty(&self, fl: usize, sl: usize) {
        let ctrl = self.control();
        let left = ctrl.sl_bitmap[fl].fetch_and(!(1 << sl), SeqCst) & !(1 << sl);
        if left == 0 {
            ctrl.fl_bitmap.fetch_and(!(1 << fl), SeqCst);
            // A push to a sibling list may have set its bits between our two
            // RMWs; its first-level bit must survive our clear.
            if ctrl.sl_bitmap[fl].load(SeqCst) != 0 {
                ctrl.fl_bitmap.fetch_or(1 << fl, SeqCst);
            }
        }
        if self.holds_nodes(&ctrl.heads[fl][sl]) {
            self.set_bits(fl, sl);
        }
    }

    /// Slow path: looks at every list head at or above `(fl, sl)` and sets
    /// the bits of any non-empty one. Returns whether one was found.
    pub(super) fn repair_bits_from(&self, fl: usize, sl: usize) -> bool {
        let ctrl = self.control();
        let mut found = false;
        for f in fl..ctrl.heads.len() {
            let first = if f == fl { sl } else { 0 };
            for s in first..SL_COUNT {
                if self.holds_nodes(&ctrl.heads[f][s]) {
                    self.set_bits(f, s);
                    found = true;
                }
            }
        }
        found
    }

    /// The first-level bitmap, with only the bits of classes that exist: the
    /// segment is shared memory, so a bit beyond them (a stray write) must
    /// not become an index.
    fn fl_map(&self) -> u64 {
        self.control().fl_bitmap.load(SeqCst) & ((1u64 << FL_COUNT) - 1)
    }

    /// The second-level bitmap of `fl` (`fl < FL_COUNT`), masked likewise.
    fn sl_map(&self, fl: usize) -> u64 {
        self.control().sl_bitmap[fl].load(SeqCst) & ((1u64 << SL_COUNT) - 1)
    }

    /// The first non-empty list at or above `(fl, sl)` by the bitmaps.
    pub(super) fn find_list(&self, fl: usize, sl: usize) -> Option<(usize, usize)> {
        let sl_map = self.sl_map(fl) & (!0u64 << sl);
        if sl_map != 0 {
            return Some((fl, sl_map.trailing_zeros() as usize));
        }
        let mut fl_map = self.fl_map() & (!0u64).checked_shl(fl as u32 + 1).unwrap_or(0);
        while fl_map != 0 {
            let f = fl_map.trailing_zeros() as usize;
            let sl_map = self.sl_map(f);
            if sl_map != 0 {
                return Some((f, sl_map.trailing_zeros() as usize));
            }
            fl_map &= fl_map - 1;
        }
        None
    }
}

impl Engine {
    /// The top node of list `(fl, sl)`.
    pub(super) fn list_top(&self, fl: usize, sl: usize) -> u32 {
        ListHead::from(self.control().heads[fl][sl].load(Acquire)).top
    }

    /// Reads node `n` without claiming it: its current hint, the block it
    /// stands for and the next node. `None` past the end of a list.
    pub(super) fn peek_node(&self, n: u32) -> Option<(Hint, u32, u32)> {
        if n >= self.node_capacity {
            return None;
        }
        let node = self.node(n);
        let w = ClaimWord::from(node.claim.load(SeqCst));
        Some((
            Hint {
                node: n,
                gen: w.gen,
            },
            node.block.load(Relaxed),
            node.next.load(Relaxed),
        ))
    }

    /// The size of the block at `pos` if it looks like a published free block
    /// right now (a racy look, to be confirmed by a claim).
    pub(super) fn live_block_size(&self, pos: u32) -> Option<u32> {
        if pos < self.heap_start || pos >= self.heap_end {
            return None;
        }
        let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
        h.is(pos, BlockState::Free).then_some(h.size)
    }

    /// Whether `hint` names a node that is `Live` in that generation right
    /// now (a racy look; a claim decides).
    pub(super) fn looks_live(&self, hint: Hint) -> bool {
        hint.node < self.node_capacity && {
            let w = ClaimWord::from(self.node(hint.node).claim.load(SeqCst));
            w.gen == hint.gen && w.state == NodeState::Live
        }
    }

    /// The largest free block in the highest size class that holds a live
    /// one, in bytes (looking at up to 64 entries per list: an estimate
    /// under concurrency).
    pub(crate) fn largest_free(&self) -> u64 {
        let mut fl_map = self.fl_map();
        while fl_map != 0 {
            let fl = 63 - fl_map.leading_zeros() as usize;
            let mut sl_map = self.sl_map(fl);
            while sl_map != 0 {
                let sl = 63 - sl_map.leading_zeros() as usize;
                let best = self.largest_in_list(fl, sl);
                if best != 0 {
                    return best;
                }
                sl_map &= !(1 << sl);
            }
            fl_map &= !(1 << fl);
        }
        0
    }

    /// The largest live block among (up to 64) entries of one list.
    fn largest_in_list(&self, fl: usize, sl: usize) -> u64 {
        let mut n = self.list_top(fl, sl);
        let mut best = 0u64;
        for _ in 0..64 {
            let Some((hint, pos, next)) = self.peek_node(n) else {
                break;
            };
            if let Some(size) = self.live_block_size(pos).filter(|_| self.looks_live(hint)) {
                best = best.max((size as u64) << super::words::GRANULE_LOG);
            }
            n = next;
        }
        best
    }
}

#[cfg(test)]
mod tests;
