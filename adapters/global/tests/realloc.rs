//! `realloc` grows and shrinks in place where it can. One test alone in
//! its binary, so that no other test takes the neighbouring memory.

use matrix_alloc_global::MatrixGlobal;
use std::alloc::{alloc, dealloc, realloc, Layout};

#[global_allocator]
static GLOBAL: MatrixGlobal = MatrixGlobal::new();

#[test]
fn realloc_grows_and_shrinks_in_place() {
    let m = GLOBAL.matrix().unwrap();
    let small = Layout::from_size_align(64 << 10, 16).unwrap();
    // SAFETY: every pointer is live and used with the layout it has.
    unsafe {
        let p = alloc(small);
        assert!(!p.is_null());
        p.write_bytes(7, small.size());
        let before = GLOBAL.stats().unwrap();
        // Growing: the block after a fresh large block is free heap.
        let q = realloc(p, small, 8 << 20);
        assert_eq!(q, p, "grown in place");
        assert!(m.usable_size(std::ptr::NonNull::new(q).unwrap()).unwrap() >= 8 << 20);
        assert!(std::slice::from_raw_parts(q, small.size())
            .iter()
            .all(|b| *b == 7));
        let big = Layout::from_size_align(8 << 20, 16).unwrap();
        // Shrinking gives the tail back.
        let r = realloc(q, big, 32 << 10);
        assert_eq!(r, p, "shrunk in place");
        let after = GLOBAL.stats().unwrap();
        assert!(
            after.block_bytes < before.block_bytes,
            "{before:?} {after:?}"
        );
        // A realloc is counted as dhat counts it: one more block in the totals.
        assert_eq!(after.total_blocks, before.total_blocks + 2);
        assert_eq!(after.curr_blocks, before.curr_blocks);
        dealloc(r, Layout::from_size_align(32 << 10, 16).unwrap());
    }
}
