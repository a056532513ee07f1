//! A multi-GiB reservation used sparsely: a 48 GiB segment, blocks of
//! several GiB touched a page at a time, and the process's resident memory
//! stays small.

use matrix_alloc_global::MatrixGlobal;

#[global_allocator]
static GLOBAL: MatrixGlobal = MatrixGlobal::new().size(48 << 30);

/// Resident memory of this process in bytes (from /proc/self/statm).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn a_48_gib_reservation_used_sparsely() {
    let m = GLOBAL.matrix().unwrap();
    assert_eq!(m.segment_size(), 48 << 30);
    // This thread's counts are exact (`stats()` applies its batch); the
    // harness's other threads are idle while the test runs.
    let base = GLOBAL.stats().unwrap();
    let rss_before = resident_bytes();
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    for _ in 0..4 {
        // 8 GiB each (32 GiB in all), one byte written per MiB.
        let mut v: Vec<u8> = Vec::with_capacity(8 << 30);
        let spare = v.spare_capacity_mut();
        for i in (0..spare.len()).step_by(1 << 20) {
            spare[i].write(i as u8);
        }
        assert!(m.offset_of(v.as_ptr()).is_some());
        blocks.push(v);
    }
    let s = GLOBAL.stats().unwrap();
    assert!(s.curr_bytes >= base.curr_bytes + (32 << 30), "{s:?}");
    let grew = resident_bytes().saturating_sub(rss_before);
    // 32,768 touched pages of 4 KiB: 128 MiB, plus the heap's bookkeeping.
    assert!(grew < 512 << 20, "resident memory grew by {grew} bytes");
    drop(blocks);
    let s = GLOBAL.stats().unwrap();
    assert!(s.curr_bytes < base.curr_bytes + (1 << 20), "{s:?}");
}
