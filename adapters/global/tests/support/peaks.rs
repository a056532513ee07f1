//! The peak survives frees from other threads: the program of issue 19 and
//! variations of it, run by `peaks.rs` (batched counts) and
//! `peaks_exact.rs` (exact counts), each with the matrix as the binary's
//! global allocator. Every `stats()` read, from any thread, is checked:
//! `max_bytes >= curr_bytes`, `max_blocks` no more than the blocks ever
//! made and at least one when a peak has bytes, and no count below zero
//! (a `u64` read of a negative count would be huge).

use matrix_alloc::{Stats, PENDING_BYTES};
use matrix_alloc_global::MatrixGlobal;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Barrier};

/// Reads the counters and checks what every read must satisfy.
pub fn read(g: &MatrixGlobal) -> Stats {
    let s = g.stats().unwrap();
    assert!(s.max_bytes >= s.curr_bytes, "{s:?}");
    assert!(s.max_blocks <= s.total_blocks, "{s:?}");
    assert!(s.curr_blocks <= s.total_blocks, "{s:?}");
    assert!(s.max_bytes == 0 || s.max_blocks >= 1, "{s:?}");
    for v in [s.curr_bytes, s.curr_blocks, s.max_bytes, s.max_blocks] {
        assert!(v < 1 << 62, "a count below zero: {s:?}");
    }
    s
}

/// How far `curr_bytes` may lag behind the truth with `threads` threads
/// counting: nothing when counts are exact.
fn lag(g: &MatrixGlobal, threads: u64) -> u64 {
    if g.matrix().unwrap().counts_exactly() {
        0
    } else {
        threads * PENDING_BYTES
    }
}

/// The issue's program: 500 boxes allocated by this thread, freed by
/// another, and a third thread's 1 GiB `Vec` must show in the peak.
pub fn issue_program(g: &'static MatrixGlobal) {
    let boxes: Vec<Box<[u8; 100]>> = (0..500).map(|_| Box::new([0u8; 100])).collect();
    std::thread::spawn(move || drop(boxes)).join().unwrap();
    std::thread::spawn(move || {
        // (`black_box`: an allocation nothing reads may be left out.)
        let v: Vec<u8> = std::hint::black_box(Vec::with_capacity(1 << 30));
        let live = read(g);
        assert!(live.curr_bytes + lag(g, 3) >= 1 << 30, "{live:?}");
        assert!(live.max_bytes >= 1 << 30, "{live:?}");
        drop(v);
        let after = read(g);
        assert!(after.max_bytes >= 1 << 30, "{after:?}");
    })
    .join()
    .unwrap();
    assert!(read(g).max_bytes >= 1 << 30);
}

/// Producers allocate blocks of many sizes and hand them to consumers that
/// free them, while three other threads each peak at their own time with a
/// large buffer, and a reader checks the counters all along. Afterwards
/// every block is freed: the current counts are back where they started.
pub fn handoff_peaks(g: &'static MatrixGlobal) {
    const BURSTS: [usize; 3] = [24 << 20, 40 << 20, 56 << 20];
    let before = read(g);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Relaxed) {
                read(g);
                reads += 1;
            }
            reads
        })
    };
    let mut workers = Vec::new();
    for p in 0..2u64 {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(256);
        workers.push(std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15 ^ p;
            for i in 0..40_000u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let size = match x % 64 {
                    0 => 1 + (x >> 20) as usize % (256 << 10),
                    1..=8 => 1 + (x >> 20) as usize % (8 << 10),
                    _ => 1 + (x >> 20) as usize % 1024,
                };
                tx.send(vec![i as u8; size]).unwrap();
            }
        }));
        workers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            for block in rx {
                assert!(block.iter().all(|&b| b == block[0]));
                n += 1;
            }
            assert_eq!(n, 40_000);
        }));
    }
    let turns = Arc::new(Barrier::new(BURSTS.len()));
    let bursts: Vec<_> = BURSTS
        .iter()
        .enumerate()
        .map(|(k, &size)| {
            let turns = turns.clone();
            std::thread::spawn(move || {
                for turn in 0..BURSTS.len() {
                    turns.wait();
                    if turn == k {
                        let buf = vec![k as u8 + 1; size];
                        let s = read(g);
                        assert!(s.curr_bytes + lag(g, 9) >= size as u64, "{s:?}");
                        assert!(s.max_bytes >= size as u64, "{s:?}");
                        drop(buf);
                    }
                }
            })
        })
        .collect();
    for t in bursts.into_iter().chain(workers) {
        t.join().unwrap();
    }
    stop.store(true, Relaxed);
    assert!(reader.join().unwrap() > 0);
    drop((stop, turns));
    let after = read(g);
    assert!(
        after.max_bytes >= *BURSTS.last().unwrap() as u64,
        "{after:?}"
    );
    assert!(after.total_blocks >= before.total_blocks + 80_000);
    // Every thread of the scenario has exited (and so applied its counts),
    // and what it made it freed.
    assert_eq!(
        (after.curr_blocks, after.curr_bytes),
        (before.curr_blocks, before.curr_bytes),
        "before {before:?}\nafter {after:?}"
    );
}

/// Runs every scenario; prints the closing line the CI reads.
pub fn main(g: &'static MatrixGlobal) {
    issue_program(g);
    handoff_peaks(g);
    println!("2 passed, 0 failed");
}
