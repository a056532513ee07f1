//! Unit tests of the claim protocol and the sweep: a popper that stops at
//! any step of taking a top, buried dead nodes, one list held at a time.

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
fn popper_killed_at_any_step(prepare: impl Fn(&Engine, &Lone), holder: impl Fn(&Engine, &Lone)) {
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
            let why = format!("popper killed after {steps} steps, holder before step {holder_at}");
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
