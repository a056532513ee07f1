//! The per-thread block caches of blocks above 32 KiB (`cache::bins`;
//! medium pages serve the sizes between, see `tests/medium_pages.rs`):
//! freed blocks are reused by the freeing thread, frees from other threads
//! and processes land in the freeing thread's cache, double frees are
//! caught, out-of-memory takes the cached blocks back, a damaged link loses
//! blocks instead of handing out wrong memory, and a killed process's
//! cached blocks come back with `reclaim_dead()`.
//!
//! `harness = false`: the kill test runs this binary again as a child.
// The tests free blocks they allocated and own.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use common::{assert_disjoint, assert_pristine, has_stamp, layout, stamp};
use matrix_alloc::{Error, Matrix};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::process::{Command, Stdio};
use std::ptr::NonNull;
use std::sync::mpsc;

const SEGMENT: usize = 256 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        return child_caches_then_dies(args[at + 1].parse().unwrap());
    }
    let tests: &[(&str, fn())] = &[
        (
            "a_freed_block_is_reused_by_its_class",
            a_freed_block_is_reused_by_its_class,
        ),
        (
            "a_full_cache_makes_room_for_a_class_it_lacks",
            a_full_cache_makes_room_for_a_class_it_lacks,
        ),
        ("random_sizes_never_overlap", random_sizes_never_overlap),
        ("frees_from_another_thread", frees_from_another_thread),
        (
            "double_frees_of_cached_blocks",
            double_frees_of_cached_blocks,
        ),
        (
            "out_of_memory_takes_cached_blocks_back",
            out_of_memory_takes_cached_blocks_back,
        ),
        (
            "a_damaged_link_loses_blocks_not_memory",
            a_damaged_link_loses_blocks_not_memory,
        ),
        (
            "a_killed_process_s_cache_comes_back",
            a_killed_process_s_cache_comes_back,
        ),
    ];
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-'));
    let mut ran = 0;
    for (name, test) in tests {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        println!("test {name} ...");
        test();
        ran += 1;
    }
    println!("{ran} passed, 0 failed");
}

/// A block freed and allocated again at a size of its class is the same
/// block, counted as a fresh allocation; `stats()` shows the cached bytes.
fn a_freed_block_is_reused_by_its_class() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let p = m.alloc(layout(100_000, 8)).unwrap();
    stamp(p, 100_000, 1);
    unsafe { m.free(p).unwrap() };
    let s = m.stats();
    assert!(s.cached_bytes >= 100_000, "{s:?}");
    assert_eq!((s.curr_blocks, s.curr_bytes), (0, 0));
    // 100,000 and 99,000 share the class of 112 KiB.
    let q = m.alloc(layout(99_000, 8)).unwrap();
    assert_eq!(p, q);
    assert!(m.usable_size(q).unwrap() >= 112 << 10);
    let s = m.stats();
    assert_eq!(
        (s.curr_blocks, s.curr_bytes, s.cached_bytes),
        (1, 99_000, 0)
    );
    let r = m.check().unwrap();
    assert_eq!((r.used_blocks, r.requested_bytes), (1, 99_000), "{r:?}");
    assert!(r.counters_agree, "{r:?}");
    unsafe { m.free(q).unwrap() };
    assert_pristine(&m);
}

/// A cache full of one class gives a block of it back to keep a block of
/// a class it has none of, which the next allocation of that class gets.
fn a_full_cache_makes_room_for_a_class_it_lacks() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    // 64 blocks of the 40 KiB class, freed: the cache keeps what its room
    // (256 KiB for a thread that holds little) allows.
    let many: Vec<_> = (0..64)
        .map(|_| m.alloc(layout(40_000, 8)).unwrap())
        .collect();
    for p in many {
        unsafe { m.free(p).unwrap() };
    }
    let full = m.stats().cached_bytes;
    assert!(full >= 200 << 10, "{full}");
    let p = m.alloc(layout(100_000, 8)).unwrap();
    assert_eq!(m.stats().cached_bytes, full, "taken from the engine");
    unsafe { m.free(p).unwrap() };
    let kept = m.stats().cached_bytes;
    // Kept, for a few blocks of 40 KiB given back.
    assert!(
        (1..=4).any(|j| kept + j * 40960 == full + (112 << 10)),
        "the 112 KiB block was not kept: {full} -> {kept}"
    );
    let q = m.alloc(layout(100_000, 8)).unwrap();
    assert_eq!(p, q);
    unsafe { m.free(q).unwrap() };
    assert_pristine(&m);
}

/// Blocks of random sizes from 1 KiB to 4 MiB (medium pages' and the
/// caches' alike), replaced at random: no two
/// live blocks overlap, each keeps its contents, the counters agree with
/// the heap at every check, and everything comes back.
fn random_sizes_never_overlap() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let mut rng = SmallRng::seed_from_u64(7);
    let mut live: Vec<(NonNull<u8>, usize, u64)> = Vec::new();
    for round in 0..6000u64 {
        if live.len() > 40 || (!live.is_empty() && rng.gen_bool(0.4)) {
            let (p, len, s) = live.swap_remove(rng.gen_range(0..live.len()));
            assert!(has_stamp(p, len, s), "round {round}: contents changed");
            unsafe { m.free(p).unwrap() };
        }
        let len = if rng.gen_bool(0.98) {
            rng.gen_range(1025..64 << 10)
        } else {
            rng.gen_range(64 << 10..=4 << 20)
        };
        let p = m.alloc(layout(len, 16)).unwrap();
        stamp(p, len, round);
        live.push((p, len, round));
        if round % 1000 == 0 {
            let mut ranges: Vec<_> = live.iter().map(|b| (b.0.as_ptr() as usize, b.1)).collect();
            assert_disjoint(&mut ranges);
            let r = m.check().unwrap();
            assert!(r.counters_agree, "round {round}: {r:?}");
            assert_eq!(r.used_blocks, live.len() as u64, "round {round}: {r:?}");
        }
    }
    for (p, len, s) in live {
        assert!(has_stamp(p, len, s));
        unsafe { m.free(p).unwrap() };
    }
    assert_pristine(&m);
}

/// Blocks allocated on one thread and freed on another go into the freeing
/// thread's cache, and that thread allocates them again.
fn frees_from_another_thread() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let (tx, rx) = mpsc::channel::<usize>();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..2000 {
                let len = (32 << 10) + 1 + (i * 997) % (96 << 10);
                let p = m.alloc(layout(len, 8)).unwrap();
                stamp(p, len, i as u64);
                tx.send(p.as_ptr() as usize).unwrap();
            }
            drop(tx);
        });
        let mut reused = 0;
        let mut mine = Vec::new();
        for (i, addr) in rx.iter().enumerate() {
            let len = (32 << 10) + 1 + (i * 997) % (96 << 10);
            let p = NonNull::new(addr as *mut u8).unwrap();
            assert!(has_stamp(p, len, i as u64));
            unsafe { m.free(p).unwrap() };
            // The block just freed comes back for its class here.
            let q = m.alloc(layout(len, 8)).unwrap();
            reused += (q == p) as u32;
            mine.push(q);
        }
        assert!(reused > 1900, "only {reused} of 2000 frees were reused");
        for q in mine {
            unsafe { m.free(q).unwrap() };
        }
        m.trim();
    });
    assert_pristine(&m);
}

/// A second free of a block in a cache, and a free of a pointer into one,
/// are errors that change nothing.
fn double_frees_of_cached_blocks() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let p = m.alloc(layout(50_000, 8)).unwrap();
    unsafe { m.free(p).unwrap() };
    assert!(matches!(unsafe { m.free(p) }, Err(Error::DoubleFree)));
    let inside = NonNull::new(unsafe { p.as_ptr().add(64) }).unwrap();
    assert!(matches!(
        unsafe { m.free(inside) },
        Err(Error::InvalidPointer)
    ));
    assert!(m.usable_size(p).is_none());
    let q = m.alloc(layout(50_000, 8)).unwrap();
    assert_eq!(p, q, "the cache still holds the block, once");
    let r = m.alloc(layout(50_000, 8)).unwrap();
    assert_ne!(q, r);
    unsafe { m.free(q).unwrap() };
    unsafe { m.free(r).unwrap() };
    assert_pristine(&m);
}

/// A heap whose free memory sits in this thread's cache, in pieces too
/// small for a request: the request takes the cached blocks back, merged,
/// and succeeds.
fn out_of_memory_takes_cached_blocks_back() {
    let m = Matrix::anonymous(4 << 20).unwrap();
    let mut blocks = Vec::new();
    while let Ok(p) = m.alloc(layout(40_000, 8)) {
        blocks.push(p);
    }
    assert!(blocks.len() > 80);
    // The cache keeps at most 1/64 of the heap (the first block freed
    // here); the rest goes back to the engine and merges. So the largest
    // free block lacks that block's and its neighbour's room until the
    // cache gives its block back.
    let (odd, even): (Vec<_>, Vec<_>) = blocks.iter().enumerate().partition(|(i, _)| i % 2 == 1);
    for (_, p) in odd.into_iter().chain(even) {
        unsafe { m.free(*p).unwrap() };
    }
    assert!(m.stats().cached_bytes >= 40_000, "{:?}", m.stats());
    assert!(m.stats().largest_free < (m.capacity() - (64 << 10)) as u64);
    let big = m.alloc(layout(m.capacity() - (32 << 10), 8)).unwrap();
    assert_eq!(m.stats().cached_bytes, 0);
    unsafe { m.free(big).unwrap() };
    assert_pristine(&m);
}

/// A program writes into a block after freeing it and changes the cache's
/// link: the cache drops the rest of that list (the blocks stay cached,
/// counted orphaned) and never hands out memory that is not a free block.
fn a_damaged_link_loses_blocks_not_memory() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let blocks: Vec<_> = (0..4)
        .map(|_| m.alloc(layout(50_000, 8)).unwrap())
        .collect();
    for &p in &blocks {
        unsafe { m.free(p).unwrap() };
    }
    // The top of the list is the last block freed; its first bytes link to
    // the next. Point the link at the middle of another block.
    let top = blocks[3];
    let bogus = (m.offset_of(blocks[0].as_ptr()).unwrap().get() / 16 + 7) as u32;
    unsafe { (top.as_ptr() as *mut u32).write(bogus) };
    let a = m.alloc(layout(50_000, 8)).unwrap();
    assert_eq!(a, top);
    let b = m.alloc(layout(50_000, 8)).unwrap();
    assert!(
        !blocks[..3].contains(&b),
        "a block after the damaged link was handed out"
    );
    let r = m.check().unwrap();
    assert_eq!(r.orphaned_blocks, 3, "{r:?}");
    unsafe { m.free(a).unwrap() };
    unsafe { m.free(b).unwrap() };
}

/// The child's half of `a_killed_process_s_cache_comes_back`: frees blocks
/// of many sizes into its cache, says so, and waits to be killed.
fn child_caches_then_dies(id: uuid::Uuid) {
    let m = Matrix::open(id).unwrap();
    let blocks: Vec<_> = (0..200)
        .map(|i| m.alloc(layout(33_000 + i * 37, 8)).unwrap())
        .collect();
    for p in blocks {
        unsafe { m.free(p).unwrap() };
    }
    println!("cached {}", m.stats().cached_bytes);
    std::thread::sleep(std::time::Duration::from_secs(60));
}

/// A process killed (`kill -9`) with blocks in its cache: `check()` counts
/// them cached, `reclaim_dead()` gives them back, and the heap is one free
/// block again.
fn a_killed_process_s_cache_comes_back() {
    let m = Matrix::create(SEGMENT).unwrap();
    let _remove = common::RemoveOnDrop(m.id());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .arg(m.id().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let cached: u64 = line
        .trim()
        .strip_prefix("cached ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(cached > 0, "{line}");
    child.kill().unwrap();
    child.wait().unwrap();
    let r = m.check().unwrap();
    assert!(r.cached_blocks >= 4, "{r:?}");
    assert_eq!(m.stats().cached_bytes, cached);
    let back = m.reclaim_dead();
    assert!(back.cached_bytes > cached, "{back:?}");
    assert_eq!(m.stats().cached_bytes, 0);
    assert_pristine(&m);
}
