//! Runs one deterministic workload twice, once in a process whose global
//! allocator is `dhat::Alloc` and once under `MatrixGlobal`, and prints
//! dhat's six `HeapStats` numbers side by side with the matrix's, plus the
//! matrix's overhead: the peak heap bytes it had to provide divided by
//! dhat's `max_bytes`. Both processes write a dhat-format profile; open
//! them side by side in dh_view (valgrind's `dh_view.html`).
//!
//! `cargo run --release --example dhat_compare [-- WORDS]`

#[path = "support/chosen_alloc.rs"]
mod chosen_alloc;
#[path = "support/dhat_compare.rs"]
mod compare;
#[path = "support/workload.rs"]
mod workload;

use chosen_alloc::{Chosen, Under};

#[global_allocator]
static ALLOC: Chosen = Chosen::new();

fn main() {
    if let Some((dir, words)) = compare::child_args() {
        return compare::child(&ALLOC, words, &dir);
    }
    let words = std::env::args()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or(200_000);
    let dir = std::env::temp_dir().join("matrix-alloc-dhat-compare");
    std::fs::create_dir_all(&dir).expect("output directory");
    let dhat = compare::spawn(Under::Dhat, words, &dir);
    let matrix = compare::spawn(Under::Matrix, words, &dir);

    println!("workload: {words} words (examples/support/workload.rs)\n");
    println!("{:<14} {:>16} {:>16}", "", "dhat", "matrix");
    for ((name, d), m) in compare::NAMES
        .iter()
        .zip(dhat.requested)
        .zip(matrix.requested)
    {
        let mark = if d == m { "" } else { "  <- differs" };
        println!("{name:<14} {d:>16} {m:>16}{mark}");
    }
    println!(
        "\nmatrix overhead: provided {} bytes at its peak / dhat max_bytes {} = {:.3}",
        matrix.provided,
        dhat.max_bytes(),
        matrix.provided as f64 / dhat.max_bytes() as f64
    );
    println!(
        "profiles: {} and {}",
        compare::profile_path(&dir, Under::Dhat).display(),
        compare::profile_path(&dir, Under::Matrix).display()
    );
    if dhat.requested != matrix.requested {
        std::process::exit(1);
    }
}
