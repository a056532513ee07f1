//! Shadow-model property test: random allocate / grow / shrink / free
//! sequences against a simple reference, with `check()` after every step.

// Test code: every unsafe call frees, reallocates or reads a block that
// this test allocated and still owns; that is the whole safety argument.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use matrix_alloc::Matrix;
use proptest::prelude::*;
use std::ptr::NonNull;

#[derive(Clone, Debug)]
enum Op {
    Alloc { size: usize, align_log: u32 },
    Free(usize),
    Realloc(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3000, 0u32..13).prop_map(|(size, align_log)| Op::Alloc { size, align_log }),
        3 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), 0usize..5000).prop_map(|(i, s)| Op::Realloc(i, s)),
    ]
}

struct Live {
    ptr: NonNull<u8>,
    size: usize,
    align: usize,
    stamp: u64,
}

fn run(ops: Vec<Op>) {
    let m = Matrix::anonymous(256 * 1024).unwrap();
    let mut live: Vec<Live> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Alloc { size, align_log } => {
                let align = 1 << align_log;
                match m.alloc(layout(size, align)) {
                    Ok(ptr) => {
                        assert_eq!(
                            ptr.as_ptr() as usize % align,
                            0,
                            "alignment {align} not honoured"
                        );
                        stamp(ptr, size, step as u64);
                        live.push(Live {
                            ptr,
                            size,
                            align,
                            stamp: step as u64,
                        });
                    }
                    Err(matrix_alloc::Error::OutOfMemory { .. }) => {
                        // Only when the heap really cannot hold it.
                        let s = m.stats();
                        assert!(
                            s.largest_free < (size + align * 2 + 32) as u64,
                            "spurious OOM: {s:?}"
                        );
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            Op::Free(i) if !live.is_empty() => {
                let b = live.swap_remove(i % live.len());
                assert!(has_stamp(b.ptr, b.size, b.stamp), "block contents changed");
                unsafe { m.free(b.ptr).unwrap() };
            }
            Op::Realloc(i, new_size) if !live.is_empty() => {
                let i = i % live.len();
                let b = &mut live[i];
                assert!(has_stamp(b.ptr, b.size, b.stamp));
                if let Ok(p) = unsafe { m.realloc(b.ptr, layout(new_size, b.align)) } {
                    let kept = b.size.min(new_size);
                    assert!(has_stamp(p, kept, b.stamp), "realloc lost contents");
                    b.ptr = p;
                    b.size = new_size;
                    stamp(p, new_size, b.stamp);
                }
            }
            _ => {}
        }
        let report = m.check().unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert_eq!(report.used_blocks, live.len() as u64);
        assert_no_crash_marks(&report);
        let mut ranges: Vec<_> = live
            .iter()
            .map(|b| (b.ptr.as_ptr() as usize, b.size.max(1)))
            .collect();
        assert_disjoint(&mut ranges);
    }
    for b in live.drain(..) {
        assert!(has_stamp(b.ptr, b.size, b.stamp));
        unsafe { m.free(b.ptr).unwrap() };
    }
    assert_pristine(&m);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn random_sequences_keep_every_invariant(ops in proptest::collection::vec(op(), 1..250)) {
        run(ops);
    }
}
