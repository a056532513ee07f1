//! Multi-thread stress: every live block is stamped and verified before it is
//! freed, so an overlap or a lost write shows up as a wrong stamp. Blocks move
//! between threads, so most frees are of blocks another thread allocated.
//! (Do not use this as a benchmark.)

// Test code: every unsafe call frees, reallocates or reads a block that
// this test allocated and still owns; that is the whole safety argument.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use matrix_alloc::{Error, Matrix};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Barrier;

const OPS_PER_THREAD: usize = 40_000;

/// Joins explicitly: unlike the end of `thread::scope`, a join waits until
/// the thread has run its thread-local destructors, which hand its cache
/// back to the segment.
fn join_all(handles: Vec<std::thread::ScopedJoinHandle<'_, ()>>) {
    for h in handles {
        h.join().unwrap();
    }
}

/// A block in flight between threads: address, size and stamp, packed.
struct Slot {
    ptr: AtomicUsize,
    len: AtomicU64,
}

/// `churn`, then the heap must be one free block again.
fn stress(threads: usize, m: &Matrix, max_size: usize) {
    churn(threads, m, max_size);
    assert_pristine(m);
}

/// `threads` threads allocate (1 to `max_size` bytes, aligned to up to
/// 128), verify and free blocks, handing some to each other; at the end
/// every block is freed.
fn churn(threads: usize, m: &Matrix, max_size: usize) {
    let slots: Vec<Slot> = (0..threads * 64)
        .map(|_| Slot {
            ptr: AtomicUsize::new(0),
            len: AtomicU64::new(0),
        })
        .collect();
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for t in 0..threads {
            let (slots, barrier) = (&slots, &barrier);
            handles.push(s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t as u64 * 7919);
                let mut mine: Vec<(NonNull<u8>, usize, u64)> = Vec::new();
                barrier.wait();
                for i in 0..OPS_PER_THREAD {
                    let tag = (t as u64) << 48 | i as u64;
                    if mine.len() < 200 && rng.gen_bool(0.6) {
                        let size = rng.gen_range(1..max_size);
                        let align = 1 << rng.gen_range(0..8);
                        match m.alloc(layout(size, align)) {
                            Ok(p) => {
                                assert_eq!(p.as_ptr() as usize % align, 0);
                                stamp(p, size, tag);
                                mine.push((p, size, tag));
                            }
                            Err(Error::OutOfMemory { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    } else if let Some((p, size, st)) =
                        (!mine.is_empty()).then(|| mine.swap_remove(rng.gen_range(0..mine.len())))
                    {
                        assert!(
                            has_stamp(p, size, st),
                            "thread {t}: block at {p:p} was overwritten"
                        );
                        if rng.gen_bool(0.5) {
                            unsafe { m.free(p).unwrap() };
                        } else {
                            // Hand it to whichever thread takes this slot next;
                            // free what was there (usually another thread's block).
                            let slot = &slots[rng.gen_range(0..slots.len())];
                            let len = (size as u64) << 32 | (st & 0xffff_ffff) | (st >> 48) << 24;
                            let _ = len;
                            let old = slot.ptr.swap(p.as_ptr() as usize, AcqRel);
                            let old_len = slot.len.swap(size as u64, AcqRel);
                            if old != 0 {
                                let _ = old_len;
                                unsafe { m.free(NonNull::new(old as *mut u8).unwrap()).unwrap() };
                            }
                        }
                    }
                }
                for (p, size, st) in mine {
                    assert!(has_stamp(p, size, st));
                    unsafe { m.free(p).unwrap() };
                }
            }));
        }
        join_all(handles);
    });
    for slot in &slots {
        let p = slot.ptr.swap(0, AcqRel);
        if p != 0 {
            unsafe { m.free(NonNull::new(p as *mut u8).unwrap()).unwrap() };
        }
    }
}

#[test]
fn two_threads() {
    stress(2, &Matrix::anonymous(16 << 20).unwrap(), 600);
}

#[test]
fn four_threads() {
    stress(4, &Matrix::anonymous(16 << 20).unwrap(), 600);
}

#[test]
fn eight_threads_with_large_blocks() {
    stress(8, &Matrix::anonymous(64 << 20).unwrap(), 20_000);
}

#[test]
fn eight_threads_in_a_tight_segment() {
    // Out-of-memory happens here for real; the heap must stay consistent.
    stress(8, &Matrix::anonymous(512 << 10).unwrap(), 3000);
}

/// Threads racing on one size class in a segment that has room for all of
/// them at once never get an out-of-memory error.
#[test]
fn no_spurious_out_of_memory_on_one_size_class() {
    for threads in [2, 4, 8] {
        let m = Matrix::anonymous(1 << 20).unwrap();
        let per_thread = 16; // 8 threads x 16 x 64 B is far below 1 MiB
        let barrier = Barrier::new(threads);
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            for _ in 0..threads {
                let (m, barrier) = (&m, &barrier);
                handles.push(s.spawn(move || {
                    barrier.wait();
                    for round in 0..3000 {
                        let held: Vec<_> = (0..per_thread)
                            .map(|i| {
                                m.alloc(layout(64, 8))
                                    .unwrap_or_else(|e| panic!("round {round} block {i}: {e}"))
                            })
                            .collect();
                        for p in held {
                            unsafe { m.free(p).unwrap() };
                        }
                    }
                }));
            }
            join_all(handles);
        });
        assert_pristine(&m);
    }
}

/// `churn`, with the last-resort sweep of the free lists (which otherwise
/// runs only when the node table is full) running over and over on one
/// more thread meanwhile; then the heap must be one free block again.
/// Returns the sweeps made.
fn stress_while_sweeping(threads: usize, m: &Matrix, max_size: usize) -> u64 {
    let done = AtomicBool::new(false);
    let sweeps = std::thread::scope(|s| {
        let sweeper = s.spawn(|| {
            let mut sweeps = 0u64;
            while !done.load(Acquire) {
                m.sweep_free_lists();
                sweeps += 1;
                // A sweep holds every free block until it ends; allocations
                // that found nothing wait for it. Back-to-back sweeps would
                // starve them (a real sweep runs only when the node table
                // is full).
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            sweeps
        });
        churn(threads, m, max_size);
        done.store(true, Release);
        sweeper.join().unwrap()
    });
    assert_pristine(m);
    sweeps
}

/// The sweep amid four threads that allocate, verify, free and hand
/// around engine and small blocks: no block is overwritten, none is lost.
#[test]
fn the_free_list_sweep_is_safe_amid_allocations() {
    let sweeps = stress_while_sweeping(4, &Matrix::anonymous(64 << 20).unwrap(), 20_000);
    assert!(sweeps > 10, "only {sweeps} sweeps ran during the churn");
}

/// Long soak: many rounds of the 8-thread stress (one in five with the
/// free-list sweep running too). Run with
/// `cargo test --release --test threads -- --ignored`.
#[test]
#[ignore = "long soak; the default run has the short versions above"]
fn soak_eight_threads_many_rounds() {
    for round in 0..200 {
        println!("round {round}");
        let m = Matrix::anonymous(if round % 2 == 0 { 512 << 10 } else { 16 << 20 }).unwrap();
        let max_size = if round % 3 == 0 { 20_000 } else { 600 };
        if round % 5 == 0 {
            stress_while_sweeping(8, &m, max_size);
        } else {
            stress(8, &m, max_size);
        }
    }
}

/// A thread's cache is bounded, shown in `stats()`, and handed back to the
/// segment when the thread exits; `trim()` returns it to the heap.
#[test]
fn thread_caches_are_bounded_shown_and_returned_on_exit() {
    const PAGE: u64 = 16 << 10;
    // Current page per class + the thread's stash (1/64 of a 64 MiB heap:
    // 64 pages) + the segment's pool (1/32: 128 pages).
    const BOUND: u64 = (64 + 64 + 128) * (PAGE + 64);
    let m = Matrix::anonymous(64 << 20).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Allocate over 4 MiB of small blocks over many classes, then free them.
            let blocks: Vec<_> = (0..20_000)
                .map(|i| m.alloc(layout(16 + (i % 64) * 16, 8)).unwrap())
                .collect();
            let during = m.stats().page_bytes;
            assert!(during >= 4 << 20, "pages hold the live blocks: {during}");
            for p in blocks {
                unsafe { m.free(p).unwrap() };
            }
            let after = m.stats().page_bytes;
            assert!(after <= BOUND, "caches hold {after} bytes");
        })
        .join()
        .unwrap()
    });
    // The thread has exited (joined): no page is owned any more; what is
    // left are empty pages in the segment's pool, for any thread or process.
    let s = m.stats();
    assert!(s.page_bytes <= 128 * (PAGE + 64), "{s:?}");
    assert_eq!(s.curr_blocks, 0);
    m.trim();
    let s = m.stats();
    assert_eq!(s.page_bytes, 0, "{s:?}");
    let r = m.check().unwrap();
    assert_eq!((r.pages, r.free_blocks), (0, 1), "{r:?}");
}

/// A thread that frees its whole working set and builds it again gets its
/// own pages back (from its stash, not the shared pool), up to the stash
/// limit; the pages it emptied beyond that go to the pool, where another
/// thread finds them.
#[test]
fn emptied_pages_stay_with_their_thread_up_to_the_stash_limit() {
    const PAGE: usize = 16 << 10;
    // 1 GiB: a thread's stash holds 1/64 of the heap up to 512 pages, so
    // 512; the pool 1/32, 2048 pages.
    const STASH: usize = 512;
    let m = Matrix::anonymous(1 << 30).unwrap();
    let page_of = |p: &NonNull<u8>| p.as_ptr() as usize & !(PAGE - 1);
    // 64-byte blocks until they span `n` pages; returns them and the pages.
    let alloc_pages = |n: usize| {
        let (mut blocks, mut pages) = (Vec::new(), std::collections::BTreeSet::new());
        while pages.len() < n {
            let p = m.alloc(layout(64, 8)).unwrap();
            stamp(p, 64, blocks.len() as u64);
            pages.insert(page_of(&p));
            blocks.push(p);
        }
        (blocks, pages)
    };
    let free = |blocks: Vec<NonNull<u8>>| {
        for (i, p) in blocks.into_iter().enumerate() {
            assert!(has_stamp(p, 64, i as u64));
            // SAFETY: each block was allocated above and is freed once.
            unsafe { m.free(p).unwrap() };
        }
    };
    // The other thread must not exit before the first has allocated again:
    // its pages would be abandoned, and adopting them is the first
    // thread's next choice before its stash.
    let (emptied, taken, checked) = (Barrier::new(2), Barrier::new(2), Barrier::new(2));
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            let (blocks, first) = alloc_pages(3 * STASH);
            free(blocks);
            emptied.wait();
            taken.wait(); // the other thread has taken pages meanwhile
            let (blocks, again) = alloc_pages(STASH - 8);
            checked.wait();
            assert!(again.is_subset(&first), "the thread got its own pages back");
            free(blocks);
            first
        });
        let b = s.spawn(|| {
            emptied.wait();
            // Takes pages until one comes from the engine: the pool is empty.
            let held = m.stats().page_bytes;
            let (mut blocks, mut pages) = (Vec::new(), std::collections::BTreeSet::new());
            while m.stats().page_bytes == held {
                let p = m.alloc(layout(64, 8)).unwrap();
                stamp(p, 64, blocks.len() as u64);
                pages.insert(page_of(&p));
                blocks.push(p);
            }
            taken.wait();
            checked.wait();
            free(blocks);
            pages
        });
        let first = a.join().unwrap();
        let pages = b.join().unwrap();
        let pooled = pages.intersection(&first).count();
        assert!(
            pooled >= 2 * STASH - 8,
            "{pooled} emptied pages reached the pool"
        );
    });
    assert_pristine(&m);
}

/// A page emptied by its thread and taken back from the stash for its own
/// class keeps its free list (the blocks come back last freed first, as
/// from any page in use); taken for another class, it is formatted for
/// that class. Either way every block is whole and the heap comes back.
#[test]
fn stashed_pages_keep_their_free_list_for_their_class() {
    const PAGE: usize = 16 << 10;
    let m = Matrix::anonymous(16 << 20).unwrap();
    let page_of = |p: NonNull<u8>| p.as_ptr() as usize & !(PAGE - 1);
    std::thread::scope(|s| {
        s.spawn(|| {
            // 64-byte blocks over three pages: the first is full and not
            // the page in use.
            let mut blocks = Vec::new();
            let mut pages = Vec::new();
            while pages.len() < 3 {
                let p = m.alloc(layout(64, 8)).unwrap();
                stamp(p, 64, blocks.len() as u64);
                if pages.last() != Some(&page_of(p)) {
                    pages.push(page_of(p));
                }
                blocks.push(p);
            }
            let first = pages[0];
            let (emptied, mut rest): (Vec<_>, Vec<_>) =
                blocks.into_iter().partition(|&p| page_of(p) == first);
            // Free the first page's blocks in a scattered order: it goes
            // to the stash.
            let n = emptied.len();
            let order: Vec<NonNull<u8>> = (0..n).map(|i| emptied[(i * 7) % n]).collect();
            assert_eq!(
                order.iter().collect::<std::collections::HashSet<_>>().len(),
                n
            );
            for &p in &order {
                unsafe { m.free(p).unwrap() };
            }
            // Allocate until the page comes back: from then on the blocks
            // come in the reverse order of their frees.
            let mut again = Vec::new();
            while again.len() < n {
                let p = m.alloc(layout(64, 8)).unwrap();
                if page_of(p) == first {
                    again.push(p);
                } else {
                    rest.push(p);
                }
            }
            let expected: Vec<_> = order.iter().rev().copied().collect();
            assert!(again == expected, "the page kept its free list");
            // The page is full again: the next block makes another page the
            // one in use. Empty this one again, then allocate another class
            // until it comes back: formatted for 128-byte blocks, each whole.
            let p = m.alloc(layout(64, 8)).unwrap();
            assert_ne!(page_of(p), first);
            rest.push(p);
            for &p in &again {
                unsafe { m.free(p).unwrap() };
            }
            let mut big = Vec::new();
            for _ in 0..PAGE / 128 {
                let p = m.alloc(layout(128, 8)).unwrap();
                stamp(p, 128, big.len() as u64);
                big.push(p);
                if page_of(p) == first {
                    break;
                }
            }
            assert_eq!(
                page_of(*big.last().unwrap()),
                first,
                "the stashed page served"
            );
            let mut spans: Vec<_> = big
                .iter()
                .map(|p| (p.as_ptr() as usize, 128))
                .chain(rest.iter().map(|p| (p.as_ptr() as usize, 64)))
                .collect();
            assert_disjoint(&mut spans);
            for (i, &p) in big.iter().enumerate() {
                assert!(has_stamp(p, 128, i as u64));
                unsafe { m.free(p).unwrap() };
            }
            for p in rest {
                unsafe { m.free(p).unwrap() };
            }
        })
        .join()
        .unwrap()
    });
    assert_pristine(&m);
}

/// Blocks allocated by a thread that exited stay valid, and any thread can
/// free them into the abandoned pages; trim() then returns those pages.
#[test]
fn blocks_outlive_their_thread_and_abandoned_pages_come_back() {
    let m = Matrix::anonymous(16 << 20).unwrap();
    let blocks: Vec<usize> = std::thread::scope(|s| {
        s.spawn(|| {
            (0..5000)
                .map(|i| {
                    let p = m.alloc(layout(40 + i % 300, 8)).unwrap();
                    stamp(p, 40 + i % 300, i as u64);
                    p.as_ptr() as usize
                })
                .collect()
        })
        .join()
        .unwrap()
    });
    assert!(
        m.stats().page_bytes > 0,
        "the exited thread's pages were abandoned, not lost"
    );
    for (i, p) in blocks.into_iter().enumerate() {
        let p = NonNull::new(p as *mut u8).unwrap();
        assert!(has_stamp(p, 40 + i % 300, i as u64));
        unsafe { m.free(p).unwrap() };
    }
    assert_pristine(&m);
}

/// Full pages that other threads free into are found again by their owner
/// (a few per slow allocation), and pages the owner frees into leave the
/// full ring at once: a second round of the same allocations needs no new
/// pages. Blocks stay disjoint throughout.
#[test]
fn full_pages_freed_into_are_reused() {
    let m = Matrix::anonymous(64 << 20).unwrap();
    const N: usize = 20_000;
    std::thread::scope(|s| {
        let owner = s.spawn(|| {
            let round = |n: usize, tag: u64| -> Vec<usize> {
                (0..n)
                    .map(|i| {
                        let p = m.alloc(layout(48, 8)).unwrap();
                        stamp(p, 48, tag + i as u64);
                        p.as_ptr() as usize
                    })
                    .collect()
            };
            let first = round(N, 0);
            let pages = m.stats().page_bytes;
            // Another thread frees every other block (remote frees into
            // full pages); this thread frees a few more itself.
            let (theirs, mine): (Vec<_>, Vec<_>) =
                first.iter().enumerate().partition(|(i, _)| i % 2 == 0);
            std::thread::scope(|s2| {
                let freer = s2.spawn(|| {
                    for (i, p) in &theirs {
                        let p = NonNull::new(**p as *mut u8).unwrap();
                        assert!(has_stamp(p, 48, *i as u64));
                        unsafe { m.free(p).unwrap() };
                    }
                });
                join_all(vec![freer]);
            });
            for (i, p) in mine.iter().step_by(10) {
                let p = NonNull::new(**p as *mut u8).unwrap();
                assert!(has_stamp(p, 48, *i as u64));
                unsafe { m.free(p).unwrap() };
            }
            // As many as were freed: all fit in the pages there are.
            let freed = theirs.len() + mine.len().div_ceil(10);
            let second = round(freed, 1 << 32);
            assert_eq!(
                m.stats().page_bytes,
                pages,
                "the second round reused the freed blocks"
            );
            let mut live: Vec<usize> = mine
                .iter()
                .enumerate()
                .filter(|(k, _)| k % 10 != 0)
                .map(|(_, (_, p))| **p)
                .collect();
            live.extend(&second);
            live.sort_unstable();
            assert!(live.windows(2).all(|w| w[1] - w[0] >= 48), "blocks overlap");
            for p in live {
                unsafe { m.free(NonNull::new(p as *mut u8).unwrap()).unwrap() };
            }
        });
        owner.join().unwrap();
    });
    assert_pristine(&m);
}

/// Eight threads in a segment so tight that its node table fills for real,
/// round after round: the free-list sweep then runs amid the churn, while
/// the other threads drain the pool it refills. A sweep that found no node
/// for a block it had to publish left that block free on no node (32
/// bytes lost in one round in a hundred or so, before the sweep set nodes
/// aside for itself). The soak runs 400 rounds (about two minutes); the
/// default run, 10.
fn tight_segment_rounds(rounds: usize) {
    for round in 0..rounds {
        let m = Matrix::anonymous(512 << 10).unwrap();
        churn(8, &m, 600);
        m.trim();
        let r = m.check().unwrap();
        assert_eq!(
            (r.free_blocks, r.orphaned_blocks),
            (1, 0),
            "round {round}: {r:?}"
        );
        assert_pristine(&m);
    }
}

#[test]
fn a_tight_segment_with_a_full_node_table_loses_nothing() {
    tight_segment_rounds(10);
}

#[test]
#[ignore]
fn soak_a_tight_segment_with_a_full_node_table() {
    tight_segment_rounds(400);
}
