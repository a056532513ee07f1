//! Helpers shared by the integration tests.
#![allow(dead_code)]
// Test helpers: callers pass blocks they allocated and own.
#![allow(clippy::undocumented_unsafe_blocks)]

use matrix_alloc::Matrix;

/// With `--features global-alloc-tests`, every test binary runs with the
/// matrix as its global allocator (its own private segment).
#[cfg(feature = "global-alloc-tests")]
#[global_allocator]
static GLOBAL: matrix_alloc_global::MatrixGlobal = matrix_alloc_global::MatrixGlobal::new();

/// Runs in every test binary that includes this module: its allocations do
/// go through the matrix, and mapping the segment allocated nothing.
#[cfg(feature = "global-alloc-tests")]
#[test]
fn global_allocator_is_the_matrix() {
    let before = GLOBAL.stats().unwrap().total_blocks;
    let v = std::hint::black_box(vec![1u8; 100]);
    assert!(GLOBAL.stats().unwrap().total_blocks > before);
    assert!(GLOBAL.matrix().unwrap().offset_of(v.as_ptr()).is_some());
    assert_eq!(GLOBAL.early_bytes(), 0);
}
use std::alloc::Layout;
use std::ptr::NonNull;

/// Removes a named segment when dropped, also when the test panics.
pub struct RemoveOnDrop(pub uuid::Uuid);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = Matrix::remove(self.0);
    }
}

/// A temporary directory removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("matrix-alloc-test-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fills a block with a pattern derived from `stamp`.
pub fn stamp(ptr: NonNull<u8>, len: usize, stamp: u64) {
    let bytes = stamp.to_le_bytes();
    for i in 0..len {
        // SAFETY (test): the caller owns `len` bytes at `ptr`.
        unsafe { ptr.as_ptr().add(i).write(bytes[i % 8] ^ (i as u8)) };
    }
}

/// Whether a block still holds the pattern written by [`stamp`].
pub fn has_stamp(ptr: NonNull<u8>, len: usize, stamp: u64) -> bool {
    let bytes = stamp.to_le_bytes();
    // SAFETY (test): the caller owns `len` bytes at `ptr`.
    (0..len).all(|i| unsafe { ptr.as_ptr().add(i).read() } == bytes[i % 8] ^ (i as u8))
}

/// Asserts that no two of the given (address, length) ranges overlap.
pub fn assert_disjoint(blocks: &mut [(usize, usize)]) {
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "blocks overlap: {:x}+{} and {:x}",
            w[0].0,
            w[0].1,
            w[1].0
        );
    }
}

pub fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// After everything is freed (and the calling thread's caches trimmed):
/// one free block covering the heap, counters at zero.
pub fn assert_pristine(m: &Matrix) {
    m.trim();
    let r = m.check().expect("check");
    assert_eq!(r.used_blocks, 0, "{r:?}");
    assert_eq!(r.free_blocks, 1, "heap is not one free block again: {r:?}");
    assert_eq!(r.free_bytes, r.capacity, "{r:?}");
    assert_no_crash_marks(&r);
    let s = m.stats();
    assert_eq!(
        (s.curr_blocks, s.curr_bytes, s.block_bytes),
        (0, 0, 0),
        "{s:?}"
    );
}

/// Asserts what must hold in a heap no killed process has touched: counters
/// agree, nothing orphaned, unlisted, unmerged or missing from the bitmaps.
pub fn assert_no_crash_marks(r: &matrix_alloc::HeapReport) {
    assert!(r.counters_agree, "counters disagree: {r:?}");
    let marks = (
        r.orphaned_blocks,
        r.unlisted_free_blocks,
        r.unmerged_pairs,
        r.unindexed_lists,
    );
    assert_eq!(marks, (0, 0, 0, 0), "merges lost or blocks orphaned: {r:?}");
}
