//! The last-resort sweep of the free lists, which runs when the node
//! table is exhausted, and the dropping of `Dead` tops.

use super::*;
use crate::engine::purge::SweepPurge;

impl Engine {
    /// Pops `Dead` nodes off the top of a list and recycles them, so that
    /// lists that are pushed to but rarely popped do not collect garbage.
    ///
    /// Safe without claiming: a listed `Dead` node stays `Dead` until popped,
    /// and the tagged CAS succeeds only if the node we looked at is still the
    /// top, so the node we pop is the one we saw `Dead`.
    pub(super) fn drop_dead_tops(&self, head: &AtomicU64) {
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
        self.sweep_from(0, SweepPurge::None);
    }

    /// `sweep_dead` over the lists from the `first`-th on (in the order of
    /// `Control::heads`, which is by size), also purging the blocks it
    /// holds as `purge` says (`purge::sweep_purge`) before listing them
    /// again. Returns the earliest time a block it saw is due for a purge.
    pub(crate) fn sweep_from(&self, first: usize, purge: SweepPurge) -> Option<u64> {
        // `node_alloc` does not sweep inside a sweep: a publication in ours
        // that finds the pool empty takes a node set aside, or fails (what
        // this sweep has not reached yet, another would not find either).
        let nested = SWEEP.with(|s| {
            s.wanted.set(SWEEP_MARGIN);
            s.active.replace(true)
        });
        debug_assert!(!nested, "a sweep inside a sweep");
        let mut due = None;
        self.as_pop_in_flight(|| {
            // Bounded: others may push to a list as fast as the sweep takes
            // from it.
            let turns = 2 * self
                .control()
                .node_hwm
                .load(Relaxed)
                .min(self.node_capacity);
            for head in self.control().heads.iter().flatten().skip(first) {
                due = earliest(due, self.sweep_list(head, turns, purge));
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
        due
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
    fn sweep_list(&self, head: &AtomicU64, turns: u32, purge: SweepPurge) -> Option<u64> {
        let mut due = None;
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
                        self.put_back(crate::engine::ops::Held {
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
            self.put_back(crate::engine::ops::Held {
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
            due = earliest(due, self.sweep_purge(pos, size, purge));
            self.relist(crate::engine::ops::Held {
                hint,
                pos,
                size,
                hidden: size,
            });
        }
        due
    }
}

fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        _ => a.or(b),
    }
}
