#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod adapters;
pub mod blocks;
mod cache;
pub mod collections;
pub mod directory;
mod engine;
mod error;
mod geometry;
mod handle;
mod inspect;
mod lock;
mod matrix;
mod offset;
mod os;
mod pinned;
mod profile;
mod segment;
mod shared;
mod stats;
mod sync;

/// With `--features global-alloc-tests`, the unit tests run with the matrix
/// as their global allocator too (a second copy of this crate, built as a
/// dependency of `matrix-alloc-global`).
#[cfg(all(test, feature = "global-alloc-tests"))]
#[global_allocator]
static GLOBAL: matrix_alloc_global::MatrixGlobal = matrix_alloc_global::MatrixGlobal::new();

/// Test hook for crash tests: this process kills itself with SIGKILL just
/// before its `n`-th access to the engine's shared state (block headers and
/// nodes) from now on; 0 turns it off. Stepping through `n` puts a death at
/// every point of the engine's protocols in turn (`tests/processes.rs`).
#[doc(hidden)]
pub fn die_at_engine_step(n: u64) {
    os::signal_at_step(n, libc::SIGKILL);
}

/// Test hook for liveness tests: as [`die_at_engine_step`], but the process
/// stops (SIGSTOP) instead, in the middle of whatever the engine was doing,
/// and goes on when it gets SIGCONT: a process descheduled for as long as
/// the test likes (`tests/processes.rs`).
#[doc(hidden)]
pub fn stop_at_engine_step(n: u64) {
    os::signal_at_step(n, libc::SIGSTOP);
}

pub use cache::PageInfo;
pub use cache::Reclaimed;
pub use engine::{HeapReport, Region, RegionKind};
pub use error::Error;
pub use handle::{Handle, Shareable};
pub use inspect::{named_segment_id, named_segment_path, named_segments, Attached, Inspector};
pub use lock::{LockError, ShmGuard, ShmMutex, LIVENESS_POLL};
#[doc(hidden)]
pub use matrix::Declined;
pub use matrix::Matrix;
pub use offset::Offset;
pub use pinned::{FixedState, PinnedAlloc};
pub use segment::{MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE};
pub use stats::{Stats, PENDING_BYTES};
