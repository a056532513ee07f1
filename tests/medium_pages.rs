//! Medium pages (`cache::kinds`): requests above 1 KiB up to 32 KiB come
//! from thread-owned pages of several 16 KiB units, sized to their class.
//! Their blocks never overlap, keep their contents and exact requested
//! sizes, are freed by other threads through the page's remote list,
//! resize within and across kinds, and go back whole: the heap is one free
//! block after everything is freed. (Other processes' frees and a killed
//! owner's pages are covered by `tests/processes.rs`, whose blocks reach
//! 2000 bytes.)
// The tests free blocks they allocated and own.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use common::{assert_disjoint, assert_pristine, has_stamp, layout, stamp};
use matrix_alloc::{Error, Inspector, Matrix};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::ptr::NonNull;

const SEGMENT: usize = 128 << 20;
/// The sizes medium pages serve.
const MEDIUM: std::ops::RangeInclusive<usize> = 1025..=32 << 10;
const UNIT: usize = 16 << 10;

#[test]
fn medium_blocks_come_from_pages_sized_to_them() {
    let m = Matrix::create(SEGMENT).unwrap();
    let mut rng = SmallRng::seed_from_u64(7);
    let mut live: Vec<(NonNull<u8>, usize)> = Vec::new();
    let mut bytes = 0;
    for i in 0..3000u64 {
        let size = rng.gen_range(MEDIUM);
        let p = m.alloc(layout(size, 16)).unwrap();
        assert_eq!(p.as_ptr() as usize % 16, 0);
        stamp(p, size, i);
        live.push((p, size));
        bytes += size as u64;
    }
    let s = m.stats();
    assert_eq!((s.curr_blocks, s.curr_bytes), (3000, bytes), "{s:?}");
    let mut spans: Vec<_> = live
        .iter()
        .map(|&(p, _)| (p.as_ptr() as usize, m.usable_size(p).unwrap()))
        .collect();
    assert_disjoint(&mut spans);
    for (i, &(p, size)) in live.iter().enumerate() {
        assert!(has_stamp(p, size, i as u64), "block {i} changed");
    }

    let pages = Inspector::open(m.id()).unwrap().pages().unwrap();
    let medium: Vec<_> = pages.iter().filter(|p| p.block_size > 1024).collect();
    assert!(!medium.is_empty(), "no medium page: {pages:?}");
    for p in &medium {
        assert!(p.bytes % UNIT == 0 && p.bytes > UNIT, "{p:?}");
        assert!(p.capacity >= 4 && p.capacity as usize * p.block_size as usize <= p.bytes);
    }
    let held: u32 = medium.iter().map(|p| p.allocated).sum();
    assert_eq!(held, 3000, "every block is on a medium page");
    let report = m.check().unwrap();
    assert!(report.counters_agree, "{report:?}");
    assert_eq!(report.used_blocks, 3000, "{report:?}");
    assert_eq!(report.requested_bytes, bytes, "{report:?}");

    for (p, _) in live {
        unsafe { m.free(p).unwrap() };
    }
    assert_pristine(&m);
}

#[test]
fn a_freed_medium_block_is_reused_and_a_double_free_caught() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let p = m.alloc(layout(5000, 8)).unwrap();
    unsafe { m.free(p).unwrap() };
    assert!(matches!(unsafe { m.free(p) }, Err(Error::DoubleFree)));
    let q = m.alloc(layout(4800, 8)).unwrap();
    assert_eq!(p, q, "the block of the same class comes back");
    // Inside a block is no block.
    let inside = NonNull::new(unsafe { q.as_ptr().add(16) }).unwrap();
    assert!(matches!(
        unsafe { m.free(inside) },
        Err(Error::InvalidPointer)
    ));
    unsafe { m.free(q).unwrap() };
    assert_pristine(&m);
}

#[test]
fn medium_blocks_freed_by_another_thread() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let mut rng = SmallRng::seed_from_u64(9);
    let blocks: Vec<(usize, usize)> = (0..2000u64)
        .map(|i| {
            let size = rng.gen_range(MEDIUM);
            let p = m.alloc(layout(size, 8)).unwrap();
            stamp(p, size, i);
            (p.as_ptr() as usize, size)
        })
        .collect();
    let requested: u64 = blocks.iter().map(|b| b.1 as u64).sum();
    std::thread::scope(|s| {
        s.spawn(|| {
            for (i, &(p, size)) in blocks.iter().enumerate() {
                let p = NonNull::new(p as *mut u8).unwrap();
                assert!(has_stamp(p, size, i as u64));
                unsafe { m.free(p).unwrap() };
            }
            // Applies this thread's counts (the scope may end before the
            // thread's exit does).
            m.trim();
        });
    });
    let s = m.stats();
    assert_eq!(
        (s.curr_blocks, s.curr_bytes),
        (0, 0),
        "{s:?} of {requested}"
    );
    // The owner collects the remote frees: the same pages serve it again.
    let before = m.check().unwrap().pages;
    let again: Vec<_> = blocks
        .iter()
        .map(|&(_, size)| m.alloc(layout(size, 8)).unwrap())
        .collect();
    assert_eq!(m.check().unwrap().pages, before, "no new page was needed");
    for p in again {
        unsafe { m.free(p).unwrap() };
    }
    assert_pristine(&m);
}

#[test]
fn medium_blocks_resize_within_and_across_kinds() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let p = m.alloc(layout(3000, 8)).unwrap();
    stamp(p, 3000, 1);
    // Same class (2.5 - 3 KiB): in place, the requested size follows.
    let q = unsafe { m.realloc(p, layout(2900, 8)).unwrap() };
    assert_eq!(p, q);
    assert_eq!(m.stats().curr_bytes, 2900);
    // Down to a small block, up to another medium class, up to an engine
    // block, back down: the contents move along.
    let mut p = q;
    let mut len = 2900;
    for size in [600, 20_000, 100_000, 1500] {
        p = unsafe { m.realloc(p, layout(size, 8)).unwrap() };
        let kept = len.min(size);
        assert!(has_stamp(p, kept, 1), "to {size}");
        stamp(p, size, 1);
        len = size;
        assert_eq!(m.stats().curr_bytes, size as u64);
        assert!(m.check().unwrap().counters_agree);
    }
    unsafe { m.free(p).unwrap() };
    assert_pristine(&m);
}

#[test]
fn a_thread_that_exits_leaves_its_medium_pages_to_others() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let blocks: Vec<usize> = std::thread::scope(|s| {
        s.spawn(|| {
            (0..500)
                .map(|i| m.alloc(layout(1100 + i * 50, 8)).unwrap().as_ptr() as usize)
                .collect()
        })
        .join()
        .unwrap()
    });
    // Its pages are abandoned; this thread frees into them and adopts
    // them for its own allocations.
    for p in blocks {
        unsafe { m.free(NonNull::new(p as *mut u8).unwrap()).unwrap() };
    }
    let r = m.check().unwrap();
    assert_eq!(r.used_blocks, 0, "{r:?}");
    assert_pristine(&m);
}
