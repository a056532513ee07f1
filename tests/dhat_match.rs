//! The matrix counts exactly what dhat counts: fixed workloads, each run in
//! a child process under `dhat::Alloc` and in children under `MatrixGlobal`
//! (the code of `examples/dhat_compare.rs`), give the same six numbers: on
//! one thread in both counting modes, on four threads with exact counts,
//! and within the documented bound with batched counts; and the profiles
//! the matrix writes parse as dhat's format with those totals.

#[path = "../examples/support/chosen_alloc.rs"]
mod chosen_alloc;
#[path = "../examples/support/dhat_compare.rs"]
mod compare;
#[path = "../examples/support/workload.rs"]
mod workload;

use chosen_alloc::{Chosen, Under};
use compare::{Counts, Workload};

#[global_allocator]
static ALLOC: Chosen = Chosen::new();

const WORDS: usize = 50_000;
const BLOCKS: usize = 2_000;

fn main() {
    if let Some((dir, work)) = compare::child_args() {
        return compare::child(&ALLOC, work, &dir);
    }
    let dir = std::env::temp_dir().join(format!("matrix-alloc-dhat-match-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let result = std::panic::catch_unwind(|| {
        one_thread(&dir);
        many_threads(&dir);
    });
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(()) => println!("2 passed, 0 failed"),
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// The word-count workload on one thread: both counting modes give dhat's
/// numbers, the memory the matrix needed is near dhat's peak, and every
/// profile carries the numbers its child printed.
fn one_thread(dir: &std::path::Path) {
    let work = Workload::Words(WORDS);
    let [dhat, matrix, _exact] = run_all(dir, work);
    assert_eq!(
        dhat.requested, matrix.requested,
        "dhat {dhat:?}\nmatrix {matrix:?}"
    );
    let [total_blocks, _, curr_blocks, _, _, max_bytes] = dhat.requested;
    assert!(total_blocks > 100_000 && curr_blocks > 0 && max_bytes > 0);
    // What the matrix had to provide, against the peak of requests.
    assert!(matrix.provided >= max_bytes);
    assert!(
        (matrix.provided as f64) < 1.25 * max_bytes as f64,
        "{matrix:?}"
    );
}

/// Four threads that allocate, hand blocks over, free and peak at their
/// own times: exact counts are dhat's to the byte; batched ones have the
/// same totals and current values, and a `max_bytes` within the bound.
fn many_threads(dir: &std::path::Path) {
    let work = Workload::Threads(BLOCKS);
    let [dhat, matrix, _exact] = run_all(dir, work);
    assert!(
        compare::within_bound(&dhat, &matrix, work),
        "dhat {dhat:?}\nbatched {matrix:?}"
    );
    let [total_blocks, _, curr_blocks, _, max_blocks, max_bytes] = dhat.requested;
    assert!(total_blocks > 20_000 && curr_blocks > 1_000);
    // The peak is the last thread's burst: 5,000 blocks (and 20 MB) above
    // what the threads hold.
    assert!(
        max_blocks > 5_000 + curr_blocks && max_bytes > 20 << 20,
        "{dhat:?}"
    );
}

/// Runs `work` under dhat, the batched matrix and the exact matrix;
/// checks that exact counts are dhat's and that every profile carries the
/// numbers its child printed.
fn run_all(dir: &std::path::Path, work: Workload) -> [Counts; 3] {
    let all =
        [Under::Dhat, Under::Matrix, Under::MatrixExact].map(|u| (u, compare::spawn(u, work, dir)));
    let [(_, dhat), _, (_, exact)] = all;
    assert_eq!(
        dhat.requested, exact.requested,
        "dhat {dhat:?}\nexact {exact:?}"
    );
    for (under, counts) in all {
        let json = profile(dir, under, work);
        assert_eq!(
            Counts::from_profile(&json),
            Some(counts.requested),
            "{under:?}"
        );
    }
    all.map(|(_, c)| c)
}

/// Reads a profile and checks the parts of dhat's format dh_view relies on.
fn profile(dir: &std::path::Path, under: Under, work: Workload) -> serde_json::Value {
    let path = compare::profile_path(dir, under, work);
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["dhatFileVersion"], 2, "{path:?}");
    assert_eq!(json["mode"], "rust-heap");
    assert_eq!(json["bklt"], true);
    assert!(json["te"].is_u64() && json["pid"].is_u64() && json["cmd"].is_string());
    let frames = json["ftbl"].as_array().unwrap().len();
    assert_eq!(json["ftbl"][0], "[root]");
    for pp in json["pps"].as_array().unwrap() {
        for key in ["tb", "tbk", "tl", "mb", "mbk", "gb", "gbk", "eb", "ebk"] {
            assert!(pp[key].is_u64(), "{under:?}: {key} in {pp}");
        }
        assert!(pp["fs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| (f.as_u64().unwrap() as usize) < frames));
    }
    json
}
