//! Real, allocation-heavy work with the matrix as this binary's global
//! allocator: std collections, strings and formatting, many threads, large
//! and over-aligned allocations. Every result is checked, and the matrix's
//! counters must show the work.

use matrix_alloc_global::MatrixGlobal;
use std::alloc::{alloc, dealloc, realloc, Layout};
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};

#[global_allocator]
static GLOBAL: MatrixGlobal = MatrixGlobal::new();

/// Whether `p` lies inside the matrix's segment.
fn in_segment<T>(p: *const T) -> bool {
    GLOBAL.matrix().unwrap().offset_of(p).is_some()
}

#[test]
fn mapping_the_segment_allocated_nothing() {
    let m = GLOBAL.matrix().unwrap();
    assert_eq!(GLOBAL.early_bytes(), 0);
    assert_eq!(m.segment_size(), MatrixGlobal::DEFAULT_SIZE);
    assert!(
        GLOBAL.stats().unwrap().total_blocks > 0,
        "the runtime allocates before main"
    );
}

#[test]
fn std_collections_live_in_the_segment() {
    let before = GLOBAL.stats().unwrap();
    let mut map: HashMap<String, Vec<u32>> = HashMap::new();
    for i in 0..20_000u32 {
        map.entry(format!("key-{}", i % 5_000)).or_default().push(i);
    }
    assert_eq!(map.len(), 5_000);
    assert!(map.values().all(|v| v.len() == 4));
    assert_eq!(map["key-42"], vec![42, 5_042, 10_042, 15_042]);

    let tree: BTreeMap<u64, String> = (0..10_000u64)
        .map(|i| (i * 7919 % 10_007, i.to_string()))
        .collect();
    assert_eq!(tree.len(), 10_000);
    assert!(tree.keys().zip(tree.keys().skip(1)).all(|(a, b)| a < b));

    let mut deque: VecDeque<Box<[u8]>> = VecDeque::new();
    for i in 0..5_000usize {
        deque.push_back(vec![i as u8; i % 700 + 1].into_boxed_slice());
        if i % 3 == 0 {
            let b = deque.pop_front().unwrap();
            assert!(b.iter().all(|x| *x == b[0]));
        }
    }
    let set: HashSet<&[u8]> = deque.iter().map(|b| &b[..]).collect();
    assert!(!set.is_empty());

    let mut heap: BinaryHeap<(u32, String)> = (0..3_000)
        .map(|i| (i * 31 % 3_001, format!("{i:08}")))
        .collect();
    let mut last = u32::MAX;
    while let Some((k, _)) = heap.pop() {
        assert!(k <= last);
        last = k;
    }

    assert!(in_segment(map.values().next().unwrap().as_ptr()));
    assert!(in_segment(tree.values().next().unwrap().as_ptr()));
    let after = GLOBAL.stats().unwrap();
    assert!(after.total_blocks > before.total_blocks + 40_000);
    assert!(after.total_bytes > before.total_bytes + 1_000_000);
}

#[test]
fn strings_and_formatting() {
    let mut s = String::new();
    for i in 0..50_000 {
        use std::fmt::Write;
        write!(s, "{i:x},").unwrap();
    }
    let parsed: Vec<u32> = s
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| u32::from_str_radix(p, 16).unwrap())
        .collect();
    assert_eq!(parsed, (0..50_000).collect::<Vec<_>>());
    let joined = parsed
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join("+");
    assert_eq!(joined.matches('+').count(), 49_999);
    let upper = format!("{:?}", joined.len()).repeat(1000).to_uppercase();
    assert_eq!(upper.len(), 6 * 1000);
    assert!(in_segment(s.as_ptr()) && in_segment(joined.as_ptr()));
}

#[test]
fn many_threads_spawned_and_joined() {
    for round in 0..4 {
        let handles: Vec<_> = (0..32)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut v: Vec<String> = Vec::new();
                    for i in 0..2_000 {
                        v.push(format!("{round}-{t}-{i}"));
                        if i % 4 == 0 {
                            v.swap_remove(i / 8);
                        }
                    }
                    let total: usize = v.iter().map(String::len).sum();
                    // A block allocated here is freed by the joining thread.
                    (v, total)
                })
            })
            .collect();
        for h in handles {
            let (v, total) = h.join().unwrap();
            assert_eq!(v.len(), 1_500);
            assert_eq!(v.iter().map(String::len).sum::<usize>(), total);
        }
    }
    // The threads' caches went back to the segment when they exited.
    let s = GLOBAL.stats().unwrap();
    assert!(s.page_bytes < s.capacity / 4, "{s:?}");
}

#[test]
fn large_allocations() {
    for mib in [1usize, 16, 256] {
        let len = mib << 20;
        let mut v = vec![0u8; len];
        for i in (0..len).step_by(4096) {
            v[i] = (i / 4096) as u8;
        }
        assert!(in_segment(v.as_ptr()));
        assert!((0..len).step_by(4096).all(|i| v[i] == (i / 4096) as u8));
    }
}

#[test]
fn over_aligned_allocations() {
    for shift in 4..=21 {
        let align = 1usize << shift;
        for size in [1, align / 2 + 1, align, 3 * align] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size; freed below with the same layout.
            unsafe {
                let p = alloc(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "align {align} size {size}");
                p.write_bytes(0xab, size);
                let q = realloc(p, layout, size * 2);
                assert!(!q.is_null());
                assert_eq!(q as usize % align, 0);
                assert!(std::slice::from_raw_parts(q, size)
                    .iter()
                    .all(|b| *b == 0xab));
                dealloc(q, Layout::from_size_align(size * 2, align).unwrap());
            }
        }
    }
}

#[repr(align(4096))]
struct Page([u8; 4096]);

#[test]
fn over_aligned_types_in_collections() {
    let pages: Vec<Box<Page>> = (0..64).map(|i| Box::new(Page([i as u8; 4096]))).collect();
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(&**p as *const Page as usize % 4096, 0);
        assert!(p.0.iter().all(|b| *b == i as u8));
    }
}

/// Not the global allocator: used through `GlobalAlloc` directly, so that
/// its first call can be raced.
static RACED: MatrixGlobal = MatrixGlobal::new().size(64 << 20);

#[test]
fn the_first_call_is_thread_safe() {
    use std::alloc::GlobalAlloc;
    let threads = 8;
    let start = std::sync::Barrier::new(threads);
    let layout = Layout::from_size_align(48, 16).unwrap();
    let ptrs: Vec<Vec<usize>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    // SAFETY: non-zero size; freed below.
                    (0..100)
                        .map(|_| unsafe { RACED.alloc(layout) } as usize)
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let m = RACED.matrix().unwrap();
    let mut all: Vec<usize> = ptrs.into_iter().flatten().collect();
    assert!(all.iter().all(|p| m.offset_of(*p as *const u8).is_some()));
    all.sort_unstable();
    assert!(all.windows(2).all(|w| w[1] - w[0] >= 48), "blocks overlap");
    assert_eq!(RACED.early_bytes(), 0);
    for p in all {
        // SAFETY: each pointer came from RACED.alloc with this layout.
        unsafe { RACED.dealloc(p as *mut u8, layout) };
    }
    m.trim();
    let s = RACED.stats().unwrap();
    assert_eq!((s.curr_blocks, s.total_blocks), (0, 800), "{s:?}");
}

static TOO_SMALL: MatrixGlobal = MatrixGlobal::new().size(4096);

#[test]
fn a_segment_that_cannot_be_made_fails_allocations_cleanly() {
    use std::alloc::GlobalAlloc;
    // SAFETY: non-zero size; nothing to free (null).
    let p = unsafe { TOO_SMALL.alloc(Layout::new::<u64>()) };
    assert!(p.is_null());
    assert!(matches!(
        TOO_SMALL.stats(),
        Err(matrix_alloc::Error::InvalidSize {
            requested: 4096,
            ..
        })
    ));
}

static HANDOFF: MatrixGlobal = MatrixGlobal::new().size(64 << 20);

/// Producer/consumer through the adapter: every free is of another
/// thread's block (the path `dealloc` hands out of line with the page its
/// fast path found), small and engine blocks alike. Each block keeps its
/// stamp until freed, the counters add up, and once both threads are gone
/// the heap is one free block again.
#[test]
fn blocks_freed_by_another_thread_come_back() {
    use std::alloc::GlobalAlloc;
    const BLOCKS: usize = 20_000;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Layout)>(256);
    let requested = std::thread::scope(|s| {
        s.spawn(move || {
            for i in 0..BLOCKS {
                // Mostly small sizes of every class, one in 64 an engine block.
                let size = if i % 64 == 63 {
                    40_000
                } else {
                    1 + i * 7 % 1024
                };
                let layout = Layout::from_size_align(size, 8).unwrap();
                // SAFETY: non-zero size; the consumer frees it.
                let p = unsafe { HANDOFF.alloc(layout) };
                assert!(!p.is_null());
                // SAFETY: `p` is `size` bytes, ours until sent.
                unsafe { std::ptr::write_bytes(p, i as u8, size) };
                tx.send((p as usize, layout)).unwrap();
            }
        });
        let consumer = s.spawn(move || {
            let mut requested = 0;
            for (i, (p, layout)) in rx.iter().enumerate() {
                let p = p as *mut u8;
                // SAFETY: the producer wrote `layout.size()` bytes at `p`
                // and handed the block over.
                let bytes = unsafe { std::slice::from_raw_parts(p, layout.size()) };
                assert!(bytes.iter().all(|&b| b == i as u8), "block {i} overwritten");
                requested += layout.size() as u64;
                // SAFETY: allocated by HANDOFF with `layout`, freed once.
                unsafe { HANDOFF.dealloc(p, layout) };
            }
            requested
        });
        consumer.join().unwrap()
    });
    let s = HANDOFF.stats().unwrap();
    assert_eq!((s.curr_blocks, s.curr_bytes), (0, 0), "{s:?}");
    assert_eq!(s.total_blocks, BLOCKS as u64, "{s:?}");
    assert_eq!(s.total_bytes, requested, "{s:?}");
    let m = HANDOFF.matrix().unwrap();
    m.trim();
    let r = m.check().unwrap();
    assert_eq!((r.used_blocks, r.free_blocks), (0, 1), "{r:?}");
    assert_eq!(r.free_bytes, r.capacity, "{r:?}");
}

/// Issue 19: libtest's threads free what others allocated, and a view of
/// the counters below zero must not swallow a later peak: a 1 GiB `Vec`
/// this test keeps live shows in `max_bytes`.
#[test]
fn a_live_gib_shows_in_the_peak_under_libtest() {
    let v: Vec<u8> = Vec::with_capacity(1 << 30);
    let s = GLOBAL.stats().unwrap();
    assert!(s.max_bytes >= 1 << 30, "{s:?}");
    assert!(s.max_bytes >= s.curr_bytes, "{s:?}");
    drop(v);
    let s = GLOBAL.stats().unwrap();
    assert!(s.max_bytes >= 1 << 30, "{s:?}");
}
