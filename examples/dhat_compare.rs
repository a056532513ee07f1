//! Runs deterministic workloads in child processes, once with
//! `dhat::Alloc` as the global allocator and twice under `MatrixGlobal`
//! (batched counts, the default, and exact counts), and prints dhat's six
//! `HeapStats` numbers beside the matrix's, plus the matrix's overhead: the
//! peak heap bytes it had to provide divided by dhat's `max_bytes`.
//!
//! Two workloads: word counting on one thread (`examples/support/workload.rs`
//! `run`), and four threads that allocate, hand blocks to each other, free
//! and peak at different times (`run_threads`). Exact counts equal dhat's
//! on both; batched ones equal dhat's on one thread and stay within the
//! README's bound on four. Every child writes a dhat-format profile: open
//! them side by side in dh_view (valgrind's `dh_view.html`).
//!
//! `cargo run --release --example dhat_compare [-- WORDS [BLOCKS]]`

#[path = "support/chosen_alloc.rs"]
mod chosen_alloc;
#[path = "support/dhat_compare.rs"]
mod compare;
#[path = "support/workload.rs"]
mod workload;

use chosen_alloc::{Chosen, Under};
use compare::Workload;

#[global_allocator]
static ALLOC: Chosen = Chosen::new();

fn main() {
    if let Some((dir, work)) = compare::child_args() {
        return compare::child(&ALLOC, work, &dir);
    }
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|w| w.parse().ok())
            .unwrap_or(default)
    };
    let dir = std::env::temp_dir().join("matrix-alloc-dhat-compare");
    std::fs::create_dir_all(&dir).expect("output directory");
    let mut all_good = true;
    for work in [
        Workload::Words(arg(1, 200_000)),
        Workload::Threads(arg(2, 4_000)),
    ] {
        let dhat = compare::spawn(Under::Dhat, work, &dir);
        let batched = compare::spawn(Under::Matrix, work, &dir);
        let exact = compare::spawn(Under::MatrixExact, work, &dir);
        println!("workload: {work:?} (examples/support/workload.rs)\n");
        println!(
            "{:<14} {:>14} {:>14} {:>14}",
            "", "dhat", "matrix", "matrix exact"
        );
        for (i, name) in compare::NAMES.iter().enumerate() {
            let (d, b, e) = (dhat.requested[i], batched.requested[i], exact.requested[i]);
            let mark = if d == b && d == e { "" } else { "  <- differs" };
            println!("{name:<14} {d:>14} {b:>14} {e:>14}{mark}");
        }
        let bound = compare::batched_bound(work);
        let batched_ok = compare::within_bound(&dhat, &batched, work);
        let exact_ok = dhat.requested == exact.requested;
        println!(
            "\nexact counts equal dhat's: {}; batched within {bound} bytes of dhat's max_bytes \
             (and the rest equal): {}",
            yes(exact_ok),
            yes(batched_ok)
        );
        println!(
            "matrix overhead: provided {} bytes at its peak / dhat max_bytes {} = {:.3}",
            batched.provided,
            dhat.max_bytes(),
            batched.provided as f64 / dhat.max_bytes() as f64
        );
        for under in [Under::Dhat, Under::Matrix, Under::MatrixExact] {
            println!(
                "profile: {}",
                compare::profile_path(&dir, under, work).display()
            );
        }
        println!();
        all_good &= batched_ok && exact_ok;
    }
    if !all_good {
        std::process::exit(1);
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}
