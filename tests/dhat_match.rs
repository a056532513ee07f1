//! The matrix counts exactly what dhat counts: one fixed workload, run in a
//! child process under `dhat::Alloc` and in one under `MatrixGlobal` (the
//! code of `examples/dhat_compare.rs`), gives the same six numbers; and the
//! profile the matrix writes parses as dhat's format with those totals.

#[path = "../examples/support/chosen_alloc.rs"]
mod chosen_alloc;
#[path = "../examples/support/dhat_compare.rs"]
mod compare;
#[path = "../examples/support/workload.rs"]
mod workload;

use chosen_alloc::{Chosen, Under};
use compare::Counts;

#[global_allocator]
static ALLOC: Chosen = Chosen::new();

const WORDS: usize = 50_000;

fn main() {
    if let Some((dir, words)) = compare::child_args() {
        return compare::child(&ALLOC, words, &dir);
    }
    let dir = std::env::temp_dir().join(format!("matrix-alloc-dhat-match-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let result = std::panic::catch_unwind(|| {
        let dhat = compare::spawn(Under::Dhat, WORDS, &dir);
        let matrix = compare::spawn(Under::Matrix, WORDS, &dir);
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

        let dhat_file = profile(&dir, Under::Dhat);
        let matrix_file = profile(&dir, Under::Matrix);
        assert_eq!(Counts::from_profile(&dhat_file), Some(dhat.requested));
        assert_eq!(Counts::from_profile(&matrix_file), Some(matrix.requested));
    });
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(()) => println!("1 passed, 0 failed"),
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Reads a profile and checks the parts of dhat's format dh_view relies on.
fn profile(dir: &std::path::Path, under: Under) -> serde_json::Value {
    let path = compare::profile_path(dir, under);
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
