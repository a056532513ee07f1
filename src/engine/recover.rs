//! Taking back the free memory a killed process held mid-operation.
//!
//! # What a thread holds
//! A thread inside the engine owns free memory only through nodes it holds:
//! `Claimed` nodes whose claim word names it as holder (its process slot and
//! the slot's generation, see `ClaimWord::holder`). The operations keep one
//! invariant at every instruction, so that a process may die anywhere:
//!
//! > Every free granule outside the published (`Live`) blocks lies in the
//! > extent of a node its holder holds *intact*, or is part of a user
//! > block that holder is allocating or freeing right then.
//!
//! A held node `X` bound to position `p` is *intact* when the header at `p`
//! says `Free` and its word 1 names `X` (or is a `BESIDE_USED` marker whose
//! `Used` block ends exactly at `p`); its extent is the header's size. Each
//! operation moves from one intact state to the next with a single store,
//! its *commit*:
//! - a merge or absorption grows the left block's header over its right
//!   neighbour (the neighbour is still intact, but *covered*: its position
//!   lies inside another intact extent);
//! - a publication either keeps the block's node, when that node is on no
//!   list, or binds a fresh one and rewrites word 1, after which the old
//!   node is no longer intact; the node goes on its list while still held
//!   and only then becomes `Live` (`go_live`);
//! - a split prepares its pieces inside the block, then shrinks the block's
//!   header to its first piece;
//! - growing or cutting a `Used` block marks the free piece `BESIDE_USED`
//!   first, then moves the `Used` header's end.
//!
//! # Recovery
//! Once a holder is known dead its nodes are frozen: only a holder changes
//! what it holds (others only set `recheck` or clear `listed`). So the
//! recovery looks at all of them at once, then
//! 1. retires every dead-held node that is not intact, or is covered;
//! 2. republishes the extent of every other one, and settles it.
//!
//! Each action on a node starts by stealing it (one CAS from the dead
//! holder to us), so two recoveries never act on one node, and a decision
//! made on a stale look fails its steal: a covering node is only stolen
//! after the nodes it covers stopped being dead-held, so a look that found
//! the covering node gone cannot still find the covered node dead-held
//! when it tries to steal it. A recovery that dies itself leaves what it
//! stole held by its own (now dead) process, in states that the next
//! recovery reads the same way.
//!
//! What is lost: the user block a dead thread was allocating or freeing at
//! that instant (a `Used` block nobody knows of, or a block `check()`
//! reports as orphaned; both, for a realloc that moves), never the free
//! memory around it. A death between marking a node listed and pushing it
//! also leaves that one node unusable (it is retired as if listed).
//! Allocations claim a list's top node before they unlink it
//! (`take_top`), and mark a `Claimed` top `unlisting` before they unlink
//! it, so that its holder publishes the block through a fresh node rather
//! than make an unlinked node `Live` (`mark_unlisting`): no free block is
//! ever off its list without a holder. A popper killed between that
//! unlink and `take_popped` leaves the node itself unused (`Dead`, off
//! every list, once its holder lets go), as a death between listing a node
//! and pushing it does. The last-resort sweep for `Dead` nodes when the
//! node table is full (`sweep_dead`) takes lists apart the same way, one
//! claimed top at a time, and holds what it took until it lists it again.
//! The nodes it sets aside for its own publications are held by it and
//! bound to no block: not intact, so step 1 below retires them to the pool.

use super::nodes::RECOVERING;
use super::words::{BlockState, ClaimWord, HeaderWord, Hint, NodeState, BESIDE_USED, GRANULE_LOG};
use super::Engine;
use crate::sync::Ordering::*;
use std::cell::Cell;

/// Remembers the liveness of the last few holders asked about: whether a
/// holder is alive is a question to the OS, and one dead process usually
/// held several nodes. A fixed array: the recovery runs on the
/// out-of-memory path, also under the global allocator, so it must not
/// allocate.
#[derive(Default)]
struct Holders {
    seen: Cell<[(u32, bool); 8]>,
    next: Cell<usize>,
}

impl Holders {
    fn dead(&self, engine: &Engine, holder: u32) -> bool {
        let mut seen = self.seen.get();
        if let Some(&(_, dead)) = seen.iter().find(|(h, _)| *h == holder) {
            return dead;
        }
        let dead = engine.holder_dead(holder);
        seen[self.next.get() % seen.len()] = (holder, dead);
        self.seen.set(seen);
        self.next.set(self.next.get() + 1);
        dead
    }
}

impl Engine {
    /// Takes back what holders that died held inside the engine (see the
    /// module docs). Returns the bytes republished. Slow: it reads every
    /// node ever used, and again per dead-held node.
    ///
    /// It counts as a pop in flight (`popping`) while it runs, as a sweep
    /// does: what the dead held comes back one block at a time, each hidden
    /// only while it is republished, so an allocation that found nothing
    /// meanwhile would see too little in flight and fail (a parent thread
    /// did, once in 300 kills of a child that died holding every free block
    /// mid-sweep). It waits for the recovery instead. It ends as a
    /// publication does (then `epoch`, then the count; see
    /// `ops::take_block`).
    pub(crate) fn recover_dead_holds(&self) -> u64 {
        self.as_pop_in_flight(|| {
            let nested = RECOVERING.with(|r| r.replace(true));
            let bytes = self.recover_dead_holds_counted();
            RECOVERING.with(|r| r.set(nested));
            bytes
        })
    }

    /// `recover_dead_holds`, while counted as a pop in flight.
    fn recover_dead_holds_counted(&self) -> u64 {
        let holders = Holders::default();
        // 1. Retire what is not intact or is covered.
        for (n, claim) in self.dead_held(&holders) {
            if self.kept_extent(n, claim, &holders).is_none() {
                if let Some(hint) = self.steal(n, claim) {
                    self.retire(hint);
                }
            }
        }
        // 2. Republish the rest.
        let mut bytes = 0;
        for (n, claim) in self.dead_held(&holders) {
            let Some((pos, _)) = self.kept_extent(n, claim, &holders) else {
                continue;
            };
            // Counted as hidden before it is ours, as a claim does: an
            // allocation that finds the heap empty meanwhile then waits for
            // this republication instead of failing.
            let hidden = self.hide(pos);
            let Some(hint) = self.steal(n, claim) else {
                self.unhide(hidden);
                continue;
            };
            // Frozen since the look: nobody but a holder changes it.
            let Some((pos, size)) = self.intact_extent(n, claim) else {
                self.retire(hint);
                self.unhide(hidden);
                continue;
            };
            self.relist(super::ops::Held {
                hint,
                pos,
                size,
                hidden,
            });
            bytes += (size as u64) << GRANULE_LOG;
        }
        bytes
    }

    /// The extent of the dead-held node `n` if recovery republishes it:
    /// intact, and covered by no other intact dead-held node.
    fn kept_extent(&self, n: u32, claim: u64, holders: &Holders) -> Option<(u32, u32)> {
        self.intact_extent(n, claim)
            .filter(|&(pos, _)| !self.covered(pos, holders))
    }

    /// The nodes held by dead holders right now, with their claim words.
    fn dead_held<'a>(&'a self, holders: &'a Holders) -> impl Iterator<Item = (u32, u64)> + 'a {
        let hwm = self.control().node_hwm.load(SeqCst).min(self.node_capacity);
        (0..hwm).filter_map(move |n| {
            let claim = self.node(n).claim.load(SeqCst);
            let w = ClaimWord::from(claim);
            (w.state == NodeState::Claimed && w.holder != 0 && holders.dead(self, w.holder))
                .then_some((n, claim))
        })
    }

    /// Whether `pos` lies strictly inside the extent of an intact node that
    /// a dead holder holds.
    fn covered(&self, pos: u32, holders: &Holders) -> bool {
        self.dead_held(holders).any(|(n, claim)| {
            self.intact_extent(n, claim)
                .is_some_and(|(start, size)| start < pos && pos < start + size)
        })
    }

    /// The extent of node `n` (claim word `claim`) if it is intact.
    fn intact_extent(&self, n: u32, claim: u64) -> Option<(u32, u32)> {
        let gen = ClaimWord::from(claim).gen;
        let pos = self.node(n).block.load(SeqCst);
        // A free block starts at `pos` (inside the heap: word 1 may be read).
        self.live_block_size(pos)?;
        let word1 = self.hint_at(pos);
        let intact = word1 == Hint { node: n, gen }
            || (word1.node == BESIDE_USED && self.used_ends_at(word1.gen, pos));
        // The same header checks as after a claim through word 1.
        let size = intact.then(|| self.claimed_size(word1, pos))??;
        Some((pos, size))
    }

    /// Whether the block at `used` is `Used` and ends exactly at `end`.
    fn used_ends_at(&self, used: u32, end: u32) -> bool {
        used >= self.heap_start && used < end && {
            let h = HeaderWord::from(self.header(used)[0].load(SeqCst));
            h.is(used, BlockState::Used) && used as u64 + h.size as u64 == end as u64
        }
    }

    /// Takes node `n` over for this thread if it is still held as `seen`
    /// says (flags aside). Returns its hint.
    fn steal(&self, n: u32, seen: u64) -> Option<Hint> {
        let seen = ClaimWord::from(seen);
        let node = self.node(n);
        let mut cur = node.claim.load(SeqCst);
        loop {
            let w = ClaimWord::from(cur);
            if w.state != NodeState::Claimed || w.gen != seen.gen || w.holder != seen.holder {
                return None;
            }
            let mine = ClaimWord {
                holder: self.holder_tag(),
                ..w
            };
            match node
                .claim
                .compare_exchange(cur, mine.value(), SeqCst, SeqCst)
            {
                Ok(_) => {
                    return Some(Hint {
                        node: n,
                        gen: w.gen,
                    })
                }
                Err(v) => cur = v,
            }
        }
    }
}
