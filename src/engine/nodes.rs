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

    // ---- publication and claims -------------------------------------------------

    /// Publishes the block `[pos, pos + size)`, which the caller owns, as free:
    /// binds a node to it ([`Engine::prepare`]) and makes the node `Live` on
    /// its size class's list ([`Engine::go_live`]).
    ///
    /// If the node table is exhausted the block stays owned by nobody and is
    /// reported by `check()` as unlisted; this cannot happen while free
    /// blocks are coalesced (see `HEAP_BYTES_PER_NODE`).
    pub(super) fn publish(&self, pos: u32, size: u32, covered: Covered) {
        if let Some(hint) = self.prepare(pos, size, None) {
            self.go_live(hint, size, covered);
        }
    }

    /// Binds a node, held by this thread, to the free block `[pos, pos +
    /// size)` that the caller owns, and writes the block's free header and
    /// footer: from here on a process killed while holding the block leaves
    /// it recoverable (see `recover`). Word 1 of the header gets the node's
    /// hint, or `word1` if given (a `BESIDE_USED` marker). `None` if the
    /// node table is exhausted: the block is then written free but bound to
    /// no node.
    pub(super) fn prepare(&self, pos: u32, size: u32, word1: Option<Hint>) -> Option<Hint> {
        let hint = self.bind(pos, size, word1);
        if hint.is_none() {
            let header = self.header(pos);
            header[1].store(Hint { node: NIL, gen: 0 }.value(), SeqCst);
            header[0].store(HeaderWord::new(pos, size, BlockState::Free).value(), SeqCst);
        }
        hint
    }

    /// Makes node `n`, which nobody else references, held by this thread in
    /// generation `gen`, on no list, bound to the block at `block`.
    fn hold_unlisted(&self, n: u32, block: u32, gen: u32) {
        let node = self.node(n);
        // Relaxed: published by the claim word's store below, which a
        // recovery reads (SeqCst, so acquire) before it reads `block`.
        node.block.store(block, Relaxed);
        node.claim.store(
            ClaimWord {
                state: NodeState::Claimed,
                listed: false,
                recheck: false,
                unlisting: false,
                holder: self.holder_tag(),
                gen,
            }
            .value(),
            SeqCst,
        );
    }

    /// `prepare`, except that when no node is left it returns `None` with
    /// nothing written.
    fn bind(&self, pos: u32, size: u32, word1: Option<Hint>) -> Option<Hint> {
        let header = self.header(pos);
        let (n, gen) = self.node_alloc()?;
        // Held before anything of the block names it, so that no claim
        // through the new hint can succeed until `go_live`.
        self.hold_unlisted(n, pos, gen);
        let hint = Hint { node: n, gen };
        header[1].store(word1.unwrap_or(hint).value(), SeqCst);
        self.word_below(pos + size).store(hint.value(), SeqCst);
        header[0].store(HeaderWord::new(pos, size, BlockState::Free).value(), SeqCst);
        Some(hint)
    }

    /// Makes the held, unlisted node `hint` (bound by [`Engine::prepare`] to a
    /// block of `size` granules) `Live` on its size class's list. Header
    /// word 1 must name the node by now.
    ///
    /// The node goes on the list while still held, and only then `Live`: a
    /// holder killed in between still holds a block its node stands for,
    /// which `recover` gives back, where a `Live` node that never reached
    /// its list would leave its block to merges only. A popper that takes
    /// the held node off the list meanwhile clears `listed` and leaves it to
    /// us (`take_popped`): it goes on the list again. One that marked it
    /// `unlisting` may be about to take it off, or have died doing so: the
    /// block then moves to a fresh node (see `mark_unlisting`).
    ///
    /// The `Live` CAS is the publication point and comes after the header
    /// and footer: a thread whose claim reads it also sees them. All stores
    /// are `SeqCst`, so a neighbour's `SeqCst` reads that come after it in
    /// the single total order see them too (the store-buffer argument of
    /// `ops`). Claims that failed on the held node may have set `recheck`;
    /// the caller settles the block after publishing it in any case, which
    /// serves them.
    pub(super) fn go_live(&self, mut hint: Hint, size: u32, covered: Covered) {
        let (fl, sl) = map_floor(size);
        let head = &self.control().heads[fl][sl];
        self.drop_dead_tops(head);
        // A popper that takes the held node off the list finds nothing it
        // may use: until the block is `Live` it must count as hidden, so
        // that such an allocation waits for this publication instead of
        // reporting out-of-memory (see `ops::take_block`).
        let hide = covered == Covered::No;
        if hide {
            self.my_slot().hidden.fetch_add(size as u64, SeqCst);
        }
        loop {
            debug_assert!({
                let w = ClaimWord::from(self.node(hint.node).claim.load(SeqCst));
                w.state == NodeState::Claimed && w.gen == hint.gen && !w.listed
            });
            self.set_listed(hint.node, true);
            self.push(head, hint.node);
            match self.make_pushed_live(hint, size) {
                Ok(()) => break,
                Err(next) => hint = next,
            }
        }
        self.set_bits(fl, sl);
        // After the push: an allocation that saw `hidden` drop after this
        // publication also sees this increment (see `ops::take_block`).
        self.control().epoch.fetch_add(1, SeqCst);
        if hide {
            self.unhide(size);
        }
    }

    /// The end of `go_live`, once the held node `hint` is pushed: makes it
    /// `Live`, or returns the held, unlisted node to push instead: the same
    /// one if a popper took it off the list meanwhile, or a fresh one bound
    /// to the block if a popper marked it `unlisting` (it may have taken it
    /// off the list and been killed before clearing `listed`, see
    /// `mark_unlisting`; the old node goes to its popper). With no node to
    /// spare, a marked node goes `Live` where it is, as before the mark.
    fn make_pushed_live(&self, hint: Hint, size: u32) -> Result<(), Hint> {
        let node = self.node(hint.node);
        let mut cur = node.claim.load(SeqCst);
        loop {
            let w = ClaimWord::from(cur);
            if !w.listed {
                return Err(hint);
            }
            if w.unlisting {
                if let Some(fresh) = self.bind(node.block.load(Relaxed), size, None) {
                    self.retire(hint);
                    return Err(fresh);
                }
            }
            // From this CAS on the block may be claimed and rewritten by
            // someone else, so nothing of it may be written after it.
            match make_live(node, cur) {
                Ok(_) => return Ok(()),
                Err(v) => cur = v,
            }
        }
    }

    /// Pops `Dead` nodes off the top of a list and recycles them, so that
    /// lists that are pushed to but rarely popped do not collect garbage.
    ///
    /// Safe without claiming: a listed `Dead` node stays `Dead` until popped,
    /// and the tagged CAS succeeds only if the node we looked at is still the
    /// top, so the node we pop is the one we saw `Dead`.
    fn drop_dead_tops(&self, head: &AtomicU64) {
        loop {
            let cur = head.load(Acquire);
            let h = ListHead::from(cur);
            if h.top == NIL || h.top >= self.node_capacity {
                return;
            }
            if ClaimWord::from(self.node(h.top).claim.load(SeqCst)).state != NodeState::Dead {
                return;
            }
            if self.unlink_top(head, cur, h.top) {
                self.recycle(h.top);
            }
        }
    }

    /// Last resort when the node table is exhausted: recycles the `Dead`
    /// nodes buried in the free lists, one list at a time (`sweep_list`).
    ///
    /// While it runs it counts as a pop in flight (`popping`): an
    /// allocation that finds nothing waits for it instead of reporting
    /// out-of-memory, as the sweep holds the blocks of the list it is
    /// taking apart. It holds no more than that one list's blocks at any
    /// time: each list is listed again before the next is taken apart, so
    /// allocations meanwhile find the blocks of every other list. It ends
    /// as a publication does (then `epoch`, then the count; see
    /// `ops::take_block`).
    ///
    /// Nodes for the sweep's own publications: listing a block again
    /// through its own node needs none, but a merge needs a fresh node,
    /// and so does a block whose node a popper marked `unlisting`; one
    /// that found none would leave its block free on no node, lost. The
    /// other threads keep taking nodes from the pool while the sweep runs
    /// (every free needs one), so the pool may be empty again by the time
    /// the sweep needs one. Hence the sweep sets aside, of the `Dead` nodes
    /// it recycles, one for each block it holds and `SWEEP_MARGIN` more
    /// (`Sweep`), and its publications draw on them when the pool is
    /// empty. Between lists it keeps `SWEEP_MARGIN` of them for the next
    /// list (whose own `Dead` nodes may be few) and hands the rest to the
    /// pool; what is left at the end goes to the pool too.
    ///
    /// A death anywhere in the sweep leaves at most the one node it was
    /// unlinking unusable, and no block off its list without a holder: the
    /// nodes set aside are held by the sweeper and bound to no block, so
    /// the recovery retires them to the pool.
    pub(crate) fn sweep_dead(&self) {
        // `node_alloc` does not sweep inside a sweep: a publication in ours
        // that finds the pool empty takes a node set aside, or fails (what
        // this sweep has not reached yet, another would not find either).
        let nested = SWEEP.with(|s| {
            s.wanted.set(SWEEP_MARGIN);
            s.active.replace(true)
        });
        debug_assert!(!nested, "a sweep inside a sweep");
        self.as_pop_in_flight(|| {
            // Bounded: others may push to a list as fast as the sweep takes
            // from it.
            let turns = 2 * self
                .control()
                .node_hwm
                .load(Relaxed)
                .min(self.node_capacity);
            for head in self.control().heads.iter().flatten() {
                self.sweep_list(head, turns);
                // Nodes set aside beyond the margin go where the other
                // threads' frees can have them.
                self.release_aside(SWEEP_MARGIN);
                #[cfg(test)]
                tests::between_lists(self);
            }
            // What was set aside and not used goes to the pool.
            SWEEP.with(|s| s.active.set(false));
            self.release_aside(0);
        });
    }

    /// Hands the nodes set aside for this thread's sweep to the pool, but
    /// for `keep` of them (which the sweep then wants, and no more: see
    /// `recycle`).
    fn release_aside(&self, keep: u32) {
        SWEEP.with(|s| s.wanted.set(keep));
        while SWEEP.with(|s| s.set_aside.get() > keep) {
            let Some(n) = self.take_aside() else { break };
            self.recycle(n);
        }
    }

    /// One list of `sweep_dead`, taken apart from the top as allocations
    /// take it (`take_top`), at most `turns` times: a `Live` node is
    /// claimed before it is unlinked, so its block is held (hidden, and
    /// recoverable after a death) all the while it is off its list; a
    /// `Dead` one is recycled; a `Claimed` one goes back to its holder, who
    /// lists it again. The claimed nodes wait on a private chain through
    /// their `next` words (off every list, ours to use) until the list is
    /// done, and are then listed again as they are (`relist`) and settled,
    /// to serve the claims that found them held meanwhile.
    ///
    /// Nothing is published before the list is done (but for lost races
    /// past `LOST_RACES`, below), so that what follows finds the pool as
    /// full as this list can make it. A block whose unlink lost a race
    /// (its node still on its list) is given back only then, when the
    /// sweep has nodes set aside; by then its popper has usually unlinked
    /// it and left it to us, and it needs no new node at all.
    fn sweep_list(&self, head: &AtomicU64, turns: u32) {
        let mut held = NIL;
        let mut lost_races = [(Hint { node: NIL, gen: 0 }, 0, 0); LOST_RACES];
        let mut lost = 0;
        for _ in 0..turns {
            match self.take_top(head) {
                Top::Empty => break,
                Top::Other => {}
                // The unlink lost a race: the node is still on its list,
                // below the new top. It is made `Live` there again once the
                // list is done (no node needed, unless a popper marked it
                // `unlisting`; by then the popper has most likely unlinked
                // it and left it to us, so that it goes on its list as it
                // is, and else the sweep has set nodes aside). Past
                // `LOST_RACES`, at once.
                // (`hidden` is the block's size: `take_top` hid it whole.)
                Top::Taken(hint, pos, hidden) if self.is_listed(hint) => {
                    if lost < LOST_RACES {
                        lost_races[lost] = (hint, pos, hidden);
                        lost += 1;
                    } else {
                        self.put_back(super::ops::Held {
                            hint,
                            pos,
                            size: hidden,
                            hidden,
                        });
                    }
                }
                Top::Taken(hint, _, _) => {
                    self.node(hint.node).next.store(held, Relaxed);
                    held = hint.node;
                    SWEEP.with(|s| s.wanted.set(s.wanted.get().saturating_add(1)));
                }
            }
        }
        for &(hint, pos, hidden) in &lost_races[..lost] {
            self.put_back(super::ops::Held {
                hint,
                pos,
                size: hidden,
                hidden,
            });
        }
        // List what was taken again, through the same nodes, and settle it
        // for the claims that found it held meanwhile.
        while held != NIL {
            let node = self.node(held);
            let next = node.next.load(Relaxed);
            let hint = Hint {
                node: held,
                gen: ClaimWord::from(node.claim.load(SeqCst)).gen,
            };
            let pos = node.block.load(Relaxed);
            held = next;
            // Held since `take_top` found it free: only we change it.
            let Some(size) = self.live_block_size(pos) else {
                debug_assert!(false, "a held block that is not free");
                continue;
            };
            self.relist(super::ops::Held {
                hint,
                pos,
                size,
                hidden: size,
            });
        }
    }

    /// Tries to take ownership of the free block a hint points to.
    pub(super) fn claim(&self, hint: Hint) -> Claim {
        if hint.node >= self.node_capacity {
            return Claim::Gone;
        }
        let node = self.node(hint.node);
        let mut cur = node.claim.load(SeqCst);
        loop {
            let w = ClaimWord::from(cur);
            if w.gen != hint.gen {
                return Claim::Gone;
            }
            let new = match w.state {
                NodeState::Live => ClaimWord {
                    state: NodeState::Claimed,
                    recheck: false,
                    holder: self.holder_tag(),
                    ..w
                },
                NodeState::Claimed if w.recheck => return Claim::Busy,
                NodeState::Claimed => ClaimWord { recheck: true, ..w },
                NodeState::Pool | NodeState::Dead => return Claim::Gone,
            };
            // Count the block as hidden before it disappears, so that no
            // scanner sees it neither listed nor hidden. The load above read
            // the publisher's `Live` store, so `block` and the header are the
            // published ones.
            let pos = node.block.load(Relaxed);
            let size = if w.state == NodeState::Live {
                self.hide(pos)
            } else {
                0
            };
            match node
                .claim
                .compare_exchange(cur, new.value(), SeqCst, SeqCst)
            {
                Ok(_) if w.state == NodeState::Live => return Claim::Got(pos, size),
                Ok(_) => return Claim::Busy,
                Err(v) => {
                    self.unhide(size);
                    cur = v;
                }
            }
        }
    }

    /// Takes the block of the top node of the free list `head`, if that node
    /// is `Live`: claims it where it lies, then unlinks it if it is still
    /// the top. Claiming first means that the block is held (hidden, and
    /// recoverable after a death) whenever it is off the list; a claim
    /// whose unlink loses a race leaves the node listed below the new top,
    /// as a claim through a hint does, to be retired `Dead`. A top that is
    /// not `Live` is unlinked and handed to `take_popped`; a `Claimed` one
    /// is first marked `unlisting` (see `mark_unlisting`).
    pub(super) fn take_top(&self, head: &AtomicU64) -> Top {
        let cur = head.load(Acquire);
        let n = ListHead::from(cur).top;
        if n == NIL || n >= self.node_capacity {
            return Top::Empty;
        }
        let w = ClaimWord::from(self.node(n).claim.load(SeqCst));
        if w.state == NodeState::Live {
            let hint = Hint {
                node: n,
                gen: w.gen,
            };
            let Claim::Got(pos, hidden) = self.claim(hint) else {
                return Top::Other;
            };
            if self.unlink_top(head, cur, n) {
                self.set_listed(n, false);
            }
            return Top::Taken(hint, pos, hidden);
        }
        if w.state == NodeState::Claimed && !self.mark_unlisting(n, w) {
            return Top::Other;
        }
        if !self.unlink_top(head, cur, n) {
            return Top::Other;
        }
        match self.take_popped(n) {
            Some((hint, pos, hidden)) => Top::Taken(hint, pos, hidden),
            None => Top::Other,
        }
    }

    /// Unlinks `n` from `head` if the head is still `cur` (whose top is
    /// `n`): the tag makes the CAS fail if anything was pushed or popped
    /// since, so `next` read now is `n`'s successor.
    fn unlink_top(&self, head: &AtomicU64, cur: u64, n: u32) -> bool {
        let next = self.node(n).next.load(Relaxed);
        let new = ListHead::from(cur).replaced(next).value();
        head.compare_exchange(cur, new, Acquire, Acquire).is_ok()
    }

    /// Marks the `Claimed` node `n` (claim word as `seen`, flags aside)
    /// `unlisting` before a popper unlinks it from the top of its list.
    /// Returns false if it is no longer so held (the caller looks again).
    ///
    /// Why: between the unlink and `take_popped`, which clears `listed`,
    /// the node is off its list yet still says listed. A holder letting go
    /// of it then would make it `Live` where it is (right for a listed
    /// node), and were the popper killed before `take_popped`, the block
    /// would stay published on no list, out of reach of allocations. The
    /// mark, a CAS on the claim word that the holder's own CAS is ordered
    /// with, tells the holder that the node may be off its list: it
    /// publishes the block through a fresh node instead and retires this
    /// one (`Dead`, which its popper, if alive, recycles; a killed popper
    /// leaves one node unused, no memory). A popper whose unlink then fails
    /// leaves the mark: it costs the holder a fresh node, nothing else.
    fn mark_unlisting(&self, n: u32, seen: ClaimWord) -> bool {
        let marked = self.update_claim(n, |w| {
            if w.state != NodeState::Claimed || w.gen != seen.gen || !w.listed {
                Err(false)
            } else if w.unlisting {
                Err(true)
            } else {
                Ok(ClaimWord {
                    unlisting: true,
                    ..w
                })
            }
        });
        // `Err(true)`: marked before; `Err(false)`: no longer so held.
        marked.map_or_else(|held| held, |_| true)
    }

    /// Sets `listed` on a node the caller holds: before pushing it, or
    /// (clearing it) after unlinking it. Either way an `unlisting` mark from
    /// an earlier stay on a list is stale, and goes. A CAS loop, because
    /// others may set `recheck` (or `unlisting`, while it is listed) on the
    /// held node meanwhile.
    fn set_listed(&self, n: u32, listed: bool) {
        let Ok(_) = self.update_claim(n, |w| {
            Ok::<_, Infallible>(ClaimWord {
                listed,
                unlisting: false,
                ..w
            })
        });
    }

    /// Updates node `n`'s claim word by `f` until a CAS lands: `f` maps the
    /// word it finds to the one to write, or to `Err` to leave it as it is
    /// (which is returned). Returns the word replaced.
    fn update_claim<E>(
        &self,
        n: u32,
        mut f: impl FnMut(ClaimWord) -> Result<ClaimWord, E>,
    ) -> Result<ClaimWord, E> {
        let claim = &self.node(n).claim;
        let mut cur = claim.load(SeqCst);
        loop {
            let w = ClaimWord::from(cur);
            match claim.compare_exchange(cur, f(w)?.value(), SeqCst, SeqCst) {
                Ok(_) => return Ok(w),
                Err(v) => cur = v,
            }
        }
    }

    /// After popping node `n` off a free list: takes its block if it is
    /// `Live`, hands responsibility to the holder if it is `Claimed`, and
    /// recycles it if it is `Dead`. Returns the hint and position of the
    /// block if taken: the caller then holds the (now unlisted) node and
    /// owns the block, and retires the node when done with it. The block's
    /// granules were added to `hidden` (returned as `.2`).
    pub(super) fn take_popped(&self, n: u32) -> Option<(Hint, u32, u32)> {
        let node = self.node(n);
        let mut cur = node.claim.load(SeqCst);
        loop {
            let w = ClaimWord::from(cur);
            let pos = node.block.load(Relaxed);
            let size = if w.state == NodeState::Live {
                self.hide(pos)
            } else {
                0
            };
            let new = match w.state {
                NodeState::Live => ClaimWord {
                    state: NodeState::Claimed,
                    listed: false,
                    recheck: false,
                    unlisting: false,
                    holder: self.holder_tag(),
                    gen: w.gen,
                },
                NodeState::Claimed => ClaimWord {
                    listed: false,
                    unlisting: false,
                    ..w
                },
                NodeState::Dead => {
                    self.recycle(n);
                    return None;
                }
                // Not reachable for a listed node; leave it alone rather than
                // corrupt the pool.
                NodeState::Pool => return None,
            };
            match node
                .claim
                .compare_exchange(cur, new.value(), SeqCst, SeqCst)
            {
                Ok(_) if w.state == NodeState::Live => {
                    return Some((
                        Hint {
                            node: n,
                            gen: w.gen,
                        },
                        pos,
                        size,
                    ));
                }
                Ok(_) => return None,
                Err(v) => {
                    self.unhide(size);
                    cur = v;
                }
            }
        }
    }

    /// The holder of `hint` is done with the block: it was merged or used.
    /// Returns whether someone asked for a re-check meanwhile.
    pub(super) fn retire(&self, hint: Hint) -> bool {
        let retired = self.update_claim(hint.node, |w| {
            debug_assert!(w.state == NodeState::Claimed && w.gen == hint.gen);
            if !w.listed {
                return Err(w);
            }
            Ok(ClaimWord {
                state: NodeState::Dead,
                holder: 0,
                ..w
            })
        });
        match retired {
            Ok(w) => w.recheck,
            Err(unlisted) => {
                self.recycle(hint.node);
                unlisted.recheck
            }
        }
    }

    /// The holder of `hint` gives the block at `pos` (of `size`) back
    /// unchanged, and un-hides the `hidden` granules its claim counted.
    /// Returns whether the block must be settled again (a claim failed on it
    /// meanwhile, or it had to be republished).
    pub(super) fn release(&self, hint: Hint, pos: u32, size: u32, hidden: u32) -> bool {
        let node = self.node(hint.node);
        let mut cur = node.claim.load(SeqCst);
        let again = loop {
            let w = ClaimWord::from(cur);
            if !w.listed || w.unlisting {
                // Popped while we held it (the popper left it to us), never
                // listed, or maybe taken off its list by a popper that has
                // not cleared `listed` yet (`mark_unlisting`). The first
                // two go on their list again as they are; the last through
                // a fresh node, this one left `Dead` to its popper (see
                // `republish`). Held at every moment either way (`recover`),
                // and without a new node where none is needed: a sweep of
                // an exhausted node table hands popped nodes back this way.
                self.republish(super::ops::Held {
                    hint,
                    pos,
                    size,
                    hidden,
                });
                break true;
            }
            match make_live(node, cur) {
                Ok(_) => break w.recheck,
                Err(v) => cur = v,
            }
        };
        self.unhide(hidden);
        again
    }

    /// Whether the node `hint`, which the caller holds, is on a list. Only
    /// its holder lists a held node, so an answer of no stays true.
    pub(super) fn is_listed(&self, hint: Hint) -> bool {
        ClaimWord::from(self.node(hint.node).claim.load(SeqCst)).listed
    }

    /// Counts the free block at `pos` as hidden; returns its granules.
    pub(super) fn hide(&self, pos: u32) -> u32 {
        let size = self.live_block_size(pos).unwrap_or(0);
        if size != 0 {
            self.my_slot().hidden.fetch_add(size as u64, SeqCst);
        }
        size
    }

    /// Ends the hiding of `granules` counted by a claim.
    pub(super) fn unhide(&self, granules: u32) {
        if granules != 0 {
            self.my_slot().hidden.fetch_sub(granules as u64, SeqCst);
        }
    }

    /// The hint stored in the header of the block at `pos`.
    pub(super) fn hint_at(&self, pos: u32) -> Hint {
        Hint::from(self.header(pos)[1].load(SeqCst))
    }

    /// The hint in the footer of the block that ends at `end`, if any.
    pub(super) fn hint_below(&self, end: u32) -> Hint {
        Hint::from(self.word_below(end).load(SeqCst))
    }

    /// After a claim of `hint` succeeded at `pos`: the block's header, which
    /// nobody may change while the node was `Live`. `None` if it does not
    /// match (which would mean corruption), in which case the claim is
    /// released.
    pub(super) fn claimed_size(&self, hint: Hint, pos: u32) -> Option<u32> {
        if pos < self.heap_start || pos >= self.heap_end {
            return None;
        }
        let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
        let ok = h.is(pos, BlockState::Free)
            && self.hint_at(pos) == hint
            && h.size >= super::words::MIN_BLOCK
            && pos as u64 + h.size as u64 <= self.heap_end as u64;
        ok.then_some(h.size)
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
mod tests {
    use super::super::words::{ClaimWord, ListHead, NodeState};
    use super::super::Engine;
    use super::{map_floor, Claim, Covered, Hint};
    use crate::sync::{AtomicU64, Ordering::SeqCst};
    use crate::Matrix;
    use std::cell::Cell;

    thread_local! {
        /// What `sweep_dead` calls on this thread after each list.
        static BETWEEN_LISTS: Cell<Option<fn(&Engine)>> = const { Cell::new(None) };
    }

    /// The sweep's hook between lists (see `BETWEEN_LISTS`).
    pub(super) fn between_lists(e: &Engine) {
        if let Some(f) = BETWEEN_LISTS.with(Cell::get) {
            f(e);
        }
    }

    /// A free block between two used ones, its node the top of its list,
    /// claimed through its hint.
    struct Lone {
        pos: u32,
        size: u32,
        hint: Hint,
        /// Granules the claim hid.
        hidden: u32,
    }

    fn claimed_lone_block(e: &Engine) -> Lone {
        let [_, pos, _] = [1, 2, 3].map(|_| e.alloc(4000, 16).unwrap().pos);
        e.free(pos).unwrap();
        let size = e
            .live_block_size(pos)
            .expect("a free block, merged with nothing");
        let hint = e.hint_at(pos);
        let Claim::Got(_, hidden) = e.claim(hint) else {
            panic!("claim");
        };
        Lone {
            pos,
            size,
            hint,
            hidden,
        }
    }

    /// A free block whose first node is `Dead` under the node it is listed
    /// through now: the node is retired while listed, after the block went
    /// back through a fresh node (as a release of a marked node does).
    /// Returns the block and the dead node's hint.
    fn buried_dead_node(e: &Engine) -> (u32, Hint) {
        let Lone {
            pos,
            size,
            hint,
            hidden,
        } = claimed_lone_block(e);
        e.publish(pos, size, Covered::Yes);
        e.retire(hint);
        e.unhide(hidden);
        (pos, hint)
    }

    /// The free list of blocks of `size` granules.
    fn list_of(e: &Engine, size: u32) -> &AtomicU64 {
        let (fl, sl) = map_floor(size);
        &e.control().heads[fl][sl]
    }

    /// For every interleaving: a popper that finds the held node of a
    /// `claimed_lone_block` (after `prepare`) at the top of its list and
    /// takes it as `take_top` does (reads the head, marks the node, unlinks
    /// it, `take_popped`), killed after 0 to 3 of those steps, with
    /// `holder` run before any one of the popper's steps or after its
    /// last. Then the block must be on a list, and allocatable.
    fn popper_killed_at_any_step(
        prepare: impl Fn(&Engine, &Lone),
        holder: impl Fn(&Engine, &Lone),
    ) {
        for steps in 0..=3 {
            for holder_at in 0..=steps {
                let m = Matrix::anonymous(1 << 20).unwrap();
                let e = m.engine();
                let b = claimed_lone_block(e);
                prepare(e, &b);
                let head = list_of(e, b.size);
                let n = b.hint.node;
                let cur = head.load(SeqCst);
                assert_eq!(ListHead::from(cur).top, n);
                let seen = ClaimWord::from(e.node(n).claim.load(SeqCst));
                let mut going = true;
                for step in 0..=steps {
                    if step == holder_at {
                        holder(e, &b);
                    }
                    if step < steps && going {
                        going = match step {
                            0 => e.mark_unlisting(n, seen),
                            1 => e.unlink_top(head, cur, n),
                            _ => {
                                // A holder never makes a marked node
                                // `Live`, so there is nothing to take.
                                assert!(e.take_popped(n).is_none());
                                true
                            }
                        };
                    }
                }
                let why =
                    format!("popper killed after {steps} steps, holder before step {holder_at}");
                assert_eq!(e.check().unwrap().unlisted_free_blocks, 0, "{why}");
                assert_eq!(e.alloc(3000, 16).unwrap().pos, b.pos, "{why}");
            }
        }
    }

    /// A holder that lets go of a `Claimed` top (`release`) while a popper
    /// takes it, and the popper is killed at any step.
    #[test]
    fn a_released_top_survives_its_popper_dying_at_any_step() {
        popper_killed_at_any_step(
            |_, _| {},
            |e, b| {
                e.release(b.hint, b.pos, b.size, b.hidden);
            },
        );
    }

    /// A holder that publishes a block (`go_live`, its node pushed and not
    /// yet `Live`) while a popper takes the node, and the popper is killed
    /// at any step.
    #[test]
    fn a_top_being_published_survives_its_popper_dying_at_any_step() {
        popper_killed_at_any_step(
            // Held, listed, and pushed again after an unlink: the state
            // `go_live` leaves a node in before it makes it `Live`.
            |e, b| {
                let head = list_of(e, b.size);
                assert!(e.unlink_top(head, head.load(SeqCst), b.hint.node));
                e.push(head, b.hint.node);
            },
            |e, b| {
                if let Err(next) = e.make_pushed_live(b.hint, b.size) {
                    e.go_live(next, b.size, Covered::Yes);
                }
                e.unhide(b.hidden);
            },
        );
    }

    #[test]
    fn the_last_resort_sweep_recycles_buried_dead_nodes_and_keeps_the_rest_listed() {
        let m = Matrix::anonymous(1 << 20).unwrap();
        let e = m.engine();
        // A `Dead` node under two others on one list: another block of the
        // class is freed on top.
        let (pos, hint) = buried_dead_node(e);
        let [_, other, _] = [1, 2, 3].map(|_| e.alloc(4000, 16).unwrap().pos);
        e.free(other).unwrap();
        let state = |n: u32| ClaimWord::from(e.node(n).claim.load(SeqCst)).state;
        assert_eq!(state(hint.node), NodeState::Dead);
        let epoch = e.control().epoch.load(SeqCst);

        e.sweep_dead();

        assert_eq!(state(hint.node), NodeState::Pool, "recycled");
        assert!(e.control().epoch.load(SeqCst) > epoch);
        assert_eq!(e.my_slot().popping.load(SeqCst), 0);
        let report = e.check().unwrap();
        assert_eq!(report.unlisted_free_blocks, 0);
        // Both blocks are still there for allocations.
        let mut got = [0, 1].map(|_| e.alloc(3000, 16).unwrap().pos);
        got.sort();
        let mut want = [pos, other];
        want.sort();
        assert_eq!(got, want);
    }

    /// Between two lists the sweep holds no block: every free block is
    /// published and listed, so allocations meanwhile find all of them but
    /// the ones of the list being swept.
    #[test]
    fn a_sweep_holds_one_list_at_a_time() {
        thread_local! {
            /// Free bytes of the heap before the sweep; lists the sweep
            /// has done.
            static FREE_BYTES: Cell<u64> = const { Cell::new(0) };
            static LISTS_DONE: Cell<usize> = const { Cell::new(0) };
        }
        let m = Matrix::anonymous(4 << 20).unwrap();
        let e = m.engine();
        // Free blocks on three lists, each between two used blocks, and on
        // one of them a `Dead` node for the sweep to recycle.
        let mut middles = vec![];
        for size in [4000, 16_000, 64_000] {
            for _ in 0..4 {
                let [_, pos, _] = [1, 2, 3].map(|_| e.alloc(size, 16).unwrap().pos);
                middles.push(pos);
            }
        }
        for pos in middles {
            e.free(pos).unwrap();
        }
        let (_, hint) = buried_dead_node(e);
        let before = e.check().unwrap();
        assert_eq!(before.orphaned_bytes, 0);
        assert!(before.free_blocks > 3 * 4);
        FREE_BYTES.with(|f| f.set(before.free_bytes));
        BETWEEN_LISTS.with(|h| {
            h.set(Some(|e| {
                let r = e.check().unwrap();
                let done = LISTS_DONE.with(|d| d.replace(d.get() + 1));
                assert_eq!(r.orphaned_bytes, 0, "held after list {done}");
                assert_eq!(
                    r.free_bytes,
                    FREE_BYTES.with(Cell::get),
                    "after list {done}"
                );
                assert_eq!(r.unlisted_free_blocks, 0, "after list {done}");
            }))
        });

        e.sweep_dead();

        BETWEEN_LISTS.with(|h| h.set(None));
        let lists = e.control().heads.iter().flatten().count();
        assert_eq!(LISTS_DONE.with(Cell::get), lists);
        let state = |n: u32| ClaimWord::from(e.node(n).claim.load(SeqCst)).state;
        assert_eq!(state(hint.node), NodeState::Pool, "recycled");
        assert_eq!(e.my_slot().popping.load(SeqCst), 0);
        let after = e.check().unwrap();
        assert_eq!(after.free_bytes, before.free_bytes);
        assert_eq!(after.free_blocks, before.free_blocks);
    }
}
