//! Issue 19's peaks with exact counts; see `support/peaks.rs`.

use matrix_alloc_global::MatrixGlobal;

#[path = "support/peaks.rs"]
mod peaks;

#[global_allocator]
static GLOBAL: MatrixGlobal = MatrixGlobal::new().exact_counts();

fn main() {
    assert!(GLOBAL.matrix().unwrap().counts_exactly());
    peaks::main(&GLOBAL);
}
