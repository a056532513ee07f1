//! The matrix's own dhat-format profile, and profiling windows
//! (`reset_peak` / `Stats::since`) counted as dhat counts them.

mod common;

use common::layout;
use matrix_alloc::Matrix;

#[test]
fn a_window_counts_as_dhat_would_from_its_start() {
    let m = Matrix::anonymous(16 << 20).unwrap();
    // Live before the window: not part of it, and never freed in it.
    let early: Vec<_> = (0..10)
        .map(|_| m.alloc(layout(1000, 16)).unwrap())
        .collect();
    let base = m.reset_peak();
    let a = m.alloc(layout(100, 8)).unwrap();
    let b = m.alloc(layout(200, 8)).unwrap();
    let c = m.alloc(layout(3000, 64)).unwrap();
    // SAFETY: live blocks of `m`, not used after.
    unsafe { m.free(b).unwrap() };
    let d = m.alloc(layout(50, 8)).unwrap();
    // SAFETY: `a` is live; a reallocation counts as one more block.
    let a = unsafe { m.realloc(a, layout(120, 8)).unwrap() };
    let w = m.stats().since(&base);
    assert_eq!(
        (w.total_blocks, w.total_bytes),
        (5, 100 + 200 + 3000 + 50 + 120)
    );
    assert_eq!((w.curr_blocks, w.curr_bytes), (3, 120 + 3000 + 50));
    // The peak: a, b and c live (3300 bytes), reached before b's free.
    assert_eq!((w.max_blocks, w.max_bytes), (3, 3300));
    for p in early.into_iter().chain([a, c, d]) {
        // SAFETY: live blocks of `m`.
        unsafe { m.free(p).unwrap() };
    }
}

#[test]
fn the_dhat_profile_parses_and_its_totals_equal_stats() {
    let m = Matrix::anonymous(16 << 20).unwrap();
    let mut live = Vec::new();
    for i in 0..500usize {
        live.push(m.alloc(layout(i % 700 + 1, 8)).unwrap());
        if i % 3 == 0 {
            // SAFETY: a live block of `m`, not used after.
            unsafe { m.free(live.swap_remove(i / 7)).unwrap() };
        }
    }
    let dir = common::TempDir::new("profile");
    let path = dir.path("matrix-heap.json");
    let written = m.write_dhat_profile(&path).unwrap();
    // Writing the file allocated nothing from `m`.
    let stats = m.stats();
    assert_eq!(written, stats);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(json["dhatFileVersion"], 2);
    assert_eq!(json["mode"], "rust-heap");
    assert_eq!(json["ftbl"][0], "[root]");
    let pps = json["pps"].as_array().unwrap();
    let sum = |key: &str| pps.iter().map(|pp| pp[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        (sum("tbk"), sum("tb")),
        (stats.total_blocks, stats.total_bytes)
    );
    assert_eq!(
        (sum("ebk"), sum("eb")),
        (stats.curr_blocks, stats.curr_bytes)
    );
    assert_eq!((sum("gbk"), sum("gb")), (stats.max_blocks, stats.max_bytes));
    assert_eq!((sum("mbk"), sum("mb")), (stats.max_blocks, stats.max_bytes));
    for p in live {
        // SAFETY: live blocks of `m`.
        unsafe { m.free(p).unwrap() };
    }
}
