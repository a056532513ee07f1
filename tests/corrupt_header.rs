//! Header fuzzing (stable stand-in for cargo-fuzz): random bytes written over
//! random places of a real segment's header or control block.
//! - Header: opening must return a typed error or a working segment, never
//!   panic; a segment it accepts must allocate, free and pass `check()`.
//! - Control block (lists, bitmaps, counters: the header still validates):
//!   operations may fail with typed errors and `check()` may report the
//!   corruption, but nothing panics or hangs.

// Test code: the only unsafe calls free blocks this test allocated.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use matrix_alloc::Matrix;
use proptest::prelude::*;
use std::io::{Seek, SeekFrom, Write};

const SIZE: usize = 1 << 20;

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn corrupted_headers_give_errors_not_panics(
        patches in proptest::collection::vec((0u64..256, proptest::collection::vec(any::<u8>(), 1..9)), 1..4)
    ) {
        let dir = TempDir::new("fuzz");
        let path = dir.path("seg");
        drop(Matrix::create_file(&path, SIZE).unwrap());
        corrupt(&path, &patches);
        let opened = std::panic::catch_unwind(|| Matrix::open_file(&path).map(|_| ()));
        prop_assert!(opened.is_ok(), "open panicked on patches {:?}", patches);
        if let Ok(Ok(())) = opened {
            // Accepted: the patches hit bytes that do not matter (padding,
            // the creator pid, the id) or rewrote them with the same values.
            let m = Matrix::open_file(&path).unwrap();
            let p = m.alloc(layout(100, 8)).unwrap();
            let q = m.alloc(layout(5000, 64)).unwrap();
            unsafe {
                m.free(p).unwrap();
                m.free(q).unwrap();
            }
            assert_pristine(&m);
        }
    }
}

fn corrupt(path: &std::path::Path, patches: &[(u64, Vec<u8>)]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (at, bytes) in patches {
        f.seek(SeekFrom::Start(*at)).unwrap();
        f.write_all(bytes).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn corrupted_control_blocks_give_errors_not_panics(
        patches in proptest::collection::vec((256u64..1024, proptest::collection::vec(any::<u8>(), 1..9)), 1..4)
    ) {
        let dir = TempDir::new("fuzz-control");
        let path = dir.path("seg");
        drop(Matrix::create_file(&path, SIZE).unwrap());
        corrupt(&path, &patches);
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(move || {
                let m = Matrix::open_file(&p).expect("the header is intact");
                let blocks: Vec<_> = (0..50).filter_map(|i| m.alloc(layout(16 + i * 40, 8)).ok()).collect();
                for b in blocks {
                    let _ = unsafe { m.free(b) };
                }
                let _ = m.check();
                let _ = m.stats();
                m.trim();
            });
            let _ = tx.send(outcome.is_ok());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(no_panic) => prop_assert!(no_panic, "panicked on patches {:?}", patches),
            Err(_) => prop_assert!(false, "hung on patches {:?}", patches),
        }
    }
}
