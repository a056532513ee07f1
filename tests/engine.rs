//! Single-process behaviour of the engine through the public API: coalescing,
//! alignment, zero sizes, size limits, in-place resizing, offsets, stats.

// Test code: every unsafe call frees, reallocates or reads a block that
// this test allocated and still owns; that is the whole safety argument.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
use allocator_api2::alloc::Allocator;
use common::*;
use matrix_alloc::{Error, Matrix, Offset};
use rand::seq::SliceRandom;
use rand::{rngs::SmallRng, SeedableRng};
use std::ptr::NonNull;

fn fill_with_small_blocks(m: &Matrix) -> Vec<NonNull<u8>> {
    let mut v = Vec::new();
    let mut i = 0usize;
    while let Ok(p) = m.alloc(layout(16 + (i * 7) % 112, 8)) {
        v.push(p);
        i += 1;
    }
    assert!(v.len() > 1000, "only {} blocks fit", v.len());
    v
}

/// Frees live blocks of `m`.
fn free_all(m: &Matrix, blocks: &[NonNull<u8>]) {
    for &p in blocks {
        unsafe { m.free(p).unwrap() };
    }
}

fn coalesces_after_freeing_in(order: impl FnOnce(&mut Vec<NonNull<u8>>)) {
    let m = Matrix::anonymous(512 * 1024).unwrap();
    let mut blocks = fill_with_small_blocks(&m);
    order(&mut blocks);
    for p in blocks {
        unsafe { m.free(p).unwrap() };
    }
    assert_pristine(&m);
    // One allocation of nearly the whole capacity now succeeds.
    let big = m.capacity() - 64;
    let p = m.alloc(layout(big, 16)).expect("nearly whole capacity");
    unsafe { m.free(p).unwrap() };
    assert_pristine(&m);
}

#[test]
fn coalesces_freeing_left_to_right() {
    coalesces_after_freeing_in(|_| {});
}

#[test]
fn coalesces_freeing_right_to_left() {
    coalesces_after_freeing_in(|v| v.reverse());
}

#[test]
fn coalesces_freeing_in_random_order() {
    for seed in 0..4 {
        coalesces_after_freeing_in(|v| v.shuffle(&mut SmallRng::seed_from_u64(seed)));
    }
}

#[test]
fn coalesces_freeing_every_other_block_first() {
    coalesces_after_freeing_in(|v| {
        let (even, odd): (Vec<_>, Vec<_>) = v.iter().enumerate().partition(|(i, _)| i % 2 == 0);
        *v = even.into_iter().chain(odd).map(|(_, p)| *p).collect();
    });
}

#[test]
fn every_power_of_two_alignment_up_to_4096_and_beyond() {
    let m = Matrix::anonymous(4 << 20).unwrap();
    let mut live = Vec::new();
    for log in 0..=14 {
        let align = 1usize << log;
        for size in [1, 7, 64, 100, 4096, 10_000] {
            let p = m.alloc(layout(size, align)).unwrap();
            assert_eq!(p.as_ptr() as usize % align, 0, "align {align} size {size}");
            stamp(p, size, (log * 100 + size) as u64);
            live.push((p, size, (log * 100 + size) as u64));
        }
    }
    m.check().unwrap();
    let mut ranges: Vec<_> = live
        .iter()
        .map(|(p, s, _)| (p.as_ptr() as usize, *s))
        .collect();
    assert_disjoint(&mut ranges);
    for (p, s, st) in live {
        assert!(has_stamp(p, s, st));
        unsafe { m.free(p).unwrap() };
    }
    assert_pristine(&m);
}

#[test]
fn zero_size_requests_follow_the_allocator_trait() {
    let m = Matrix::anonymous(1 << 20).unwrap();
    let a = &m;
    for align in [1, 8, 64, 4096] {
        let l = layout(0, align);
        let p = a.allocate(l).unwrap();
        assert_eq!(p.len(), 0);
        assert_eq!(p.cast::<u8>().as_ptr() as usize % align, 0);
        unsafe { a.deallocate(p.cast(), l) };
    }
    assert_eq!(
        m.stats().total_blocks,
        0,
        "zero-size requests take no block"
    );
    // The checked API gives a zero-size request a block of its own.
    let p = m.alloc(layout(0, 1)).unwrap();
    unsafe { m.free(p).unwrap() };
    assert_pristine(&m);
}

#[test]
fn oversized_and_overflowing_requests_are_errors() {
    let m = Matrix::anonymous(1 << 20).unwrap();
    for size in [
        m.capacity(),
        m.capacity() * 2,
        isize::MAX as usize - 4096,
        isize::MAX as usize / 2 + 1,
    ] {
        assert!(
            matches!(m.alloc(layout(size, 1)), Err(Error::OutOfMemory { .. })),
            "size {size}"
        );
    }
    assert!(matches!(
        m.alloc(layout(1, 1 << 40)),
        Err(Error::OutOfMemory { .. })
    ));
    assert!((&m).allocate(layout(m.capacity(), 8)).is_err());
    assert_pristine(&m);
}

#[test]
fn vec_and_hashmap_live_in_the_segment() {
    let m = Matrix::anonymous(8 << 20).unwrap();
    {
        let mut v = allocator_api2::vec::Vec::new_in(&m);
        for i in 0..100_000u64 {
            v.push(i);
        }
        assert!(m.offset_of(v.as_ptr()).is_some());
        assert_eq!(v.iter().sum::<u64>(), 99_999 * 100_000 / 2);
        let mut map = hashbrown::HashMap::new_in(&m);
        for i in 0..10_000u32 {
            map.insert(i, i * 2);
        }
        assert_eq!(map.get(&777), Some(&1554));
        v.truncate(10);
        v.shrink_to_fit();
        assert_eq!(&v[..], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        m.check().unwrap();
    }
    assert_pristine(&m);
}

#[test]
fn grow_and_shrink_in_place_when_the_neighbour_allows() {
    let m = Matrix::anonymous(1 << 20).unwrap();
    // Blocks above the medium-page limit (32 KiB) live in the engine, where
    // a grow absorbs the free right neighbour.
    let a = m.alloc(layout(40_000, 8)).unwrap();
    stamp(a, 40_000, 1);
    let b = unsafe { m.realloc(a, layout(150_000, 8)) }.unwrap();
    assert_eq!(a, b, "grow did not happen in place");
    assert!(has_stamp(b, 40_000, 1));
    let c = unsafe { m.realloc(b, layout(60_000, 8)) }.unwrap();
    assert_eq!(b, c, "shrink did not happen in place");
    assert!(m.usable_size(c).unwrap() < 60_100, "shrink kept the tail");
    // A blocked neighbour forces a move, contents kept.
    let blocker = m.alloc(layout(40_000, 8)).unwrap();
    stamp(c, 60_000, 2);
    let d = unsafe { m.realloc(c, layout(150_000, 8)) }.unwrap();
    assert_ne!(c, d);
    assert!(has_stamp(d, 60_000, 2));
    // Small blocks resize in place within their size class, and move
    // (contents kept) across classes.
    let e = m.alloc(layout(40, 8)).unwrap();
    stamp(e, 40, 3);
    let f = unsafe { m.realloc(e, layout(48, 8)) }.unwrap();
    assert_eq!(e, f, "same size class: in place");
    let g = unsafe { m.realloc(f, layout(500, 8)) }.unwrap();
    assert_ne!(f, g);
    assert!(has_stamp(g, 40, 3));
    m.check().unwrap();
    free_all(&m, &[d, blocker, g]);
    // dhat semantics: 3 allocations + 5 reallocations.
    let s = m.stats();
    assert_eq!(s.total_blocks, 8);
    assert_eq!(
        s.total_bytes,
        40_000 + 150_000 + 60_000 + 40_000 + 150_000 + 40 + 48 + 500
    );
    assert_eq!(s.max_bytes, 150_000 + 40_000 + 500);
    assert_eq!(s.max_blocks, 3);
    assert_pristine(&m);
}

/// A small block resized to another small class whose page is at hand (the
/// reallocation fast path) and one resized by another thread (the slow
/// path): contents kept, the old blocks free again, dhat's counts.
#[test]
fn small_reallocations_move_between_classes_and_threads() {
    let m = Matrix::anonymous(1 << 20).unwrap();
    // Both classes get a current page first.
    let a = m.alloc(layout(100, 8)).unwrap();
    let keep = m.alloc(layout(300, 8)).unwrap();
    stamp(a, 100, 7);
    let b = unsafe { m.realloc(a, layout(290, 8)) }.unwrap();
    assert_ne!(a, b, "another class: moved");
    assert!(has_stamp(b, 100, 7));
    let back = m.alloc(layout(100, 8)).unwrap();
    assert_eq!(back, a, "the old block is free again, first on its list");
    stamp(b, 290, 8);
    // Another thread resizes this thread's block.
    let b_addr = b.as_ptr() as usize;
    let c = std::thread::scope(|s| {
        s.spawn(|| {
            let b = std::ptr::NonNull::new(b_addr as *mut u8).unwrap();
            unsafe { m.realloc(b, layout(20, 8)) }.unwrap().as_ptr() as usize
        })
        .join()
        .unwrap()
    });
    let c = std::ptr::NonNull::new(c as *mut u8).unwrap();
    assert!(has_stamp(c, 20, 8));
    assert_eq!(m.check().unwrap().used_blocks, 3);
    free_all(&m, &[c, back, keep]);
    // dhat semantics: 3 allocations + 2 reallocations.
    let s = m.stats();
    assert_eq!(s.total_blocks, 5);
    assert_eq!(s.total_bytes, 100 + 300 + 290 + 100 + 20);
    assert_eq!((s.max_bytes, s.max_blocks), (290 + 300 + 100, 3));
    assert_eq!((s.curr_blocks, s.curr_bytes), (0, 0));
    assert_pristine(&m);
}

#[test]
fn stats_follow_dhat_semantics() {
    let m = Matrix::anonymous(1 << 20).unwrap();
    let a = m.alloc(layout(100, 8)).unwrap();
    let b = m.alloc(layout(200, 8)).unwrap();
    unsafe { m.free(a).unwrap() };
    let c = m.alloc(layout(50, 8)).unwrap();
    let s = m.stats();
    assert_eq!((s.total_blocks, s.total_bytes), (3, 350));
    assert_eq!((s.curr_blocks, s.curr_bytes), (2, 250));
    assert_eq!((s.max_blocks, s.max_bytes), (2, 300));
    assert!(s.block_bytes >= 250 && s.max_block_bytes >= s.block_bytes);
    assert_eq!(s.free_bytes, s.capacity - s.block_bytes);
    assert!(s.largest_free > 0 && s.largest_free <= s.free_bytes);
    unsafe {
        m.free(b).unwrap();
        m.free(c).unwrap();
    }
    assert_pristine(&m);
}

#[test]
fn offsets_are_checked_for_bounds_and_alignment() {
    let m = Matrix::anonymous(1 << 20).unwrap();
    let p = m.alloc(layout(64, 8)).unwrap();
    let off = m.offset_of(p.as_ptr()).unwrap();
    assert_eq!(m.resolve::<u64>(off), Some(p.cast()));
    assert_eq!(m.resolve::<u64>(Offset(off.get() + 1)), None, "misaligned");
    assert_eq!(m.resolve::<u8>(Offset::NULL), None, "null");
    assert_eq!(
        m.resolve::<u8>(Offset(m.segment_size() as u64)),
        None,
        "out of bounds"
    );
    assert_eq!(
        m.resolve::<[u8; 16]>(Offset(m.segment_size() as u64 - 8)),
        None,
        "straddles the end"
    );
    let outside = 0u64;
    assert_eq!(m.offset_of(&outside as *const u64), None);
    unsafe { m.free(p).unwrap() };
}

#[test]
fn double_free_and_foreign_pointers_are_detected() {
    let m = Matrix::anonymous(1 << 20).unwrap();
    let other = Matrix::anonymous(1 << 20).unwrap();
    let p = m.alloc(layout(64, 8)).unwrap();
    let q = m.alloc(layout(64, 8)).unwrap();
    unsafe {
        m.free(p).unwrap();
        assert!(matches!(m.free(p), Err(Error::DoubleFree)));
        let mut x = 0u64;
        assert!(matches!(
            m.free(NonNull::from(&mut x).cast()),
            Err(Error::InvalidPointer)
        ));
        assert!(matches!(other.free(q), Err(Error::InvalidPointer)));
        assert!(matches!(
            m.free(NonNull::new_unchecked(q.as_ptr().add(16))),
            Err(Error::InvalidPointer)
        ));
        assert!(matches!(
            m.free(NonNull::new_unchecked(q.as_ptr().add(1))),
            Err(Error::InvalidPointer)
        ));
        m.free(q).unwrap();
    }
    assert_pristine(&m);
    // The Allocator path panics with a clear message.
    let p = m.alloc(layout(32, 8)).unwrap();
    unsafe { m.free(p).unwrap() };
    let msg = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
        (&m).deallocate(p, layout(32, 8))
    }))
    .expect_err("double free through the Allocator must panic");
    let msg = msg.downcast_ref::<String>().unwrap();
    assert!(msg.contains("double free"), "{msg}");
    assert_pristine(&m);
}

#[test]
fn matrix_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Matrix>();
    // And usable from several threads through a shared reference.
    let m = Matrix::anonymous(1 << 20).unwrap();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 0..2 {
            handles.push(s.spawn(|| {
                let mut v = allocator_api2::vec::Vec::new_in(&m);
                v.extend(0..1000u32);
                assert_eq!(v.len(), 1000);
            }));
        }
        // An explicit join also waits for the threads' cache hand-back.
        for h in handles {
            h.join().unwrap();
        }
    });
    assert_pristine(&m);
}

#[test]
fn vec_growth_through_the_allocator_trait_happens_in_place() {
    let m = Matrix::anonymous(4 << 20).unwrap();
    // 40,000 bytes: above the medium-page limit, so an engine block.
    let mut v: allocator_api2::vec::Vec<u8, &Matrix> =
        allocator_api2::vec::Vec::with_capacity_in(40_000, &m);
    v.extend(std::iter::repeat_n(7u8, 40_000));
    let before = v.as_ptr();
    v.reserve_exact(100_000); // the rest of the heap is free to the right
    assert_eq!(
        v.as_ptr(),
        before,
        "grow moved the vector although its neighbour was free"
    );
    assert!(v.iter().all(|b| *b == 7));
    v.shrink_to(50_000);
    assert_eq!(v.as_ptr(), before, "shrink moved the vector");
    drop(v);
    assert_pristine(&m);
}
