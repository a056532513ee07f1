//! Publication and claims: binding a node to a free block, making it
//! live, and taking and giving back ownership of listed blocks (see the
//! module documentation for the transitions).

use super::*;

impl Engine {
    // ---- publication and claims -------------------------------------------------

    /// Publishes the block `[pos, pos + size)`, which the caller owns, as free:
    /// binds a node to it ([`Engine::prepare`]) and makes the node `Live` on
    /// its size class's list ([`Engine::go_live`]).
    ///
    /// If the node table is exhausted the block stays owned by nobody and is
    /// reported by `check()` as unlisted; this cannot happen while free
    /// blocks are coalesced (see `HEAP_BYTES_PER_NODE`).
    pub(in crate::engine) fn publish(&self, pos: u32, size: u32, covered: Covered) {
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
    pub(in crate::engine) fn prepare(
        &self,
        pos: u32,
        size: u32,
        word1: Option<Hint>,
    ) -> Option<Hint> {
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
    pub(super) fn hold_unlisted(&self, n: u32, block: u32, gen: u32) {
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
    pub(in crate::engine) fn go_live(&self, mut hint: Hint, size: u32, covered: Covered) {
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
    pub(super) fn make_pushed_live(&self, hint: Hint, size: u32) -> Result<(), Hint> {
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

    /// Tries to take ownership of the free block a hint points to.
    pub(in crate::engine) fn claim(&self, hint: Hint) -> Claim {
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
    pub(in crate::engine) fn take_top(&self, head: &AtomicU64) -> Top {
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
    pub(super) fn unlink_top(&self, head: &AtomicU64, cur: u64, n: u32) -> bool {
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
    pub(super) fn mark_unlisting(&self, n: u32, seen: ClaimWord) -> bool {
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
    pub(in crate::engine) fn take_popped(&self, n: u32) -> Option<(Hint, u32, u32)> {
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
    pub(in crate::engine) fn retire(&self, hint: Hint) -> bool {
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
    pub(in crate::engine) fn release(&self, hint: Hint, pos: u32, size: u32, hidden: u32) -> bool {
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
                self.republish(crate::engine::ops::Held {
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
    pub(in crate::engine) fn is_listed(&self, hint: Hint) -> bool {
        ClaimWord::from(self.node(hint.node).claim.load(SeqCst)).listed
    }

    /// Counts the free block at `pos` as hidden; returns its granules.
    pub(in crate::engine) fn hide(&self, pos: u32) -> u32 {
        let size = self.live_block_size(pos).unwrap_or(0);
        if size != 0 {
            self.my_slot().hidden.fetch_add(size as u64, SeqCst);
        }
        size
    }

    /// Ends the hiding of `granules` counted by a claim.
    pub(in crate::engine) fn unhide(&self, granules: u32) {
        if granules != 0 {
            self.my_slot().hidden.fetch_sub(granules as u64, SeqCst);
        }
    }

    /// The hint stored in the header of the block at `pos`.
    pub(in crate::engine) fn hint_at(&self, pos: u32) -> Hint {
        Hint::from(self.header(pos)[1].load(SeqCst))
    }

    /// The hint in the footer of the block that ends at `end`, if any.
    pub(in crate::engine) fn hint_below(&self, end: u32) -> Hint {
        Hint::from(self.word_below(end).load(SeqCst))
    }

    /// After a claim of `hint` succeeded at `pos`: the block's header, which
    /// nobody may change while the node was `Live`. `None` if it does not
    /// match (which would mean corruption), in which case the claim is
    /// released.
    pub(in crate::engine) fn claimed_size(&self, hint: Hint, pos: u32) -> Option<u32> {
        if pos < self.heap_start || pos >= self.heap_end {
            return None;
        }
        let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
        let ok = h.is(pos, BlockState::Free)
            && self.hint_at(pos) == hint
            && h.size >= crate::engine::words::MIN_BLOCK
            && pos as u64 + h.size as u64 <= self.heap_end as u64;
        ok.then_some(h.size)
    }
}
