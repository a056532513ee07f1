#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod adapters;
mod cache;
mod engine;
mod error;
mod matrix;
mod offset;
mod os;
mod profile;
mod segment;
mod stats;
mod sync;

/// With `--features global-alloc-tests`, the unit tests run with the matrix
/// as their global allocator too (a second copy of this crate, built as a
/// dependency of `matrix-alloc-global`).
#[cfg(all(test, feature = "global-alloc-tests"))]
#[global_allocator]
static GLOBAL: matrix_alloc_global::MatrixGlobal = matrix_alloc_global::MatrixGlobal::new();

pub use engine::HeapReport;
pub use error::Error;
pub use matrix::Matrix;
pub use offset::Offset;
pub use segment::{MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE};
pub use stats::Stats;
