//! What exact counts cost (issue 19): the mixed workload and the 64-byte
//! pair, with the segment's counts batched (the default) and exact
//! (`Matrix::exact_counts`), through `Matrix` and through `MatrixGlobal`,
//! against mimalloc, side by side in one run.
//!
//! Dimensions: workload (mixed random sizes with a live set / 64-byte pair)
//! × counting mode × way in (`Matrix` / `MatrixGlobal`), one thread.
//!
//! Every figure is an interleaved comparison (see `common::interleaved`):
//! the median, over paired calls milliseconds apart, of one allocator's
//! time over the other's, so that the host's drift falls on both sides. The
//! lines also give each allocator's median time per operation.
//!
//! Run: `cargo bench --bench counters`

mod common;

use common::{interleaved, median, timed, timed_pairs, BenchAlloc, GlobalMatrix, Mixed, Peer};
use matrix_alloc::Matrix;
use matrix_alloc_global::MatrixGlobal;
use std::alloc::Layout;

/// A matrix under another name (the exact-counting one).
struct Named<'a>(&'static str, &'a Matrix);

impl BenchAlloc for Named<'_> {
    fn name(&self) -> &'static str {
        self.0
    }
    #[inline(always)]
    fn alloc(&self, layout: Layout) -> *mut u8 {
        BenchAlloc::alloc(self.1, layout)
    }
    #[inline(always)]
    unsafe fn free(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { BenchAlloc::free(self.1, ptr, layout) }
    }
}

/// Median time per operation of `a` on the mixed workload and on the pair.
fn per_op<A: BenchAlloc>(w: &Mixed, a: &A) -> (f64, f64) {
    let mut live = Vec::with_capacity(20_000);
    let mixed = median(
        (0..51)
            .map(|_| timed(|| w.run(a, &mut live)).as_nanos() as f64 / w.op_count() as f64)
            .collect(),
    );
    let pair = median(
        (0..51)
            .map(|_| timed_pairs(a).as_nanos() as f64 / common::PAIRS_PER_CALL as f64)
            .collect(),
    );
    (mixed, pair)
}

/// `a`'s time over `b`'s, mixed and pair, by interleaved calls.
fn ratio<A: BenchAlloc, B: BenchAlloc>(w: &Mixed, a: &A, b: &B) -> (f64, f64) {
    let mut live = [(); 2].map(|_| Vec::with_capacity(20_000));
    let [la, lb] = &mut live;
    let mixed = interleaved(|| timed(|| w.run(a, la)), || timed(|| w.run(b, lb)));
    (mixed, interleaved(|| timed_pairs(a), || timed_pairs(b)))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there is none.
    }
    let cpu = common::CpuTimes::now();
    let batched = Matrix::create(256 << 20).expect("segment");
    let exact_matrix = Matrix::create(256 << 20).expect("segment").exact_counts();
    let exact = Named("matrix-exact", &exact_matrix);
    let global = GlobalMatrix::new(256 << 20);
    let global_exact = GlobalMatrix(MatrixGlobal::new().size(256 << 20).exact_counts());
    let mimalloc = Peer("mimalloc", mimalloc::MiMalloc);
    let w = Mixed::new();

    println!("median time per operation, ns: mixed, pair");
    for (name, (mixed, pair)) in [
        (batched.name(), per_op(&w, &batched)),
        (exact.name(), per_op(&w, &exact)),
        ("global", per_op(&w, &global)),
        ("global-exact", per_op(&w, &global_exact)),
        (mimalloc.name(), per_op(&w, &mimalloc)),
    ] {
        println!("{name:>14}: {mixed:6.1} {pair:6.1}");
    }
    println!("\ninterleaved time ratios: mixed, pair");
    for (line, (mixed, pair)) in [
        ("matrix-exact / matrix", ratio(&w, &exact, &batched)),
        ("matrix-exact / mimalloc", ratio(&w, &exact, &mimalloc)),
        ("matrix / mimalloc", ratio(&w, &batched, &mimalloc)),
        ("global-exact / global", ratio(&w, &global_exact, &global)),
        (
            "global-exact / mimalloc",
            ratio(&w, &global_exact, &mimalloc),
        ),
        ("global / mimalloc", ratio(&w, &global, &mimalloc)),
    ] {
        println!("{line:>24}: {mixed:5.2} {pair:5.2}");
    }
    for m in [&batched, &exact_matrix] {
        assert_eq!(m.check().expect("heap check").used_blocks, 0);
    }
    let s = exact_matrix.stats();
    assert_eq!((s.curr_blocks, s.curr_bytes), (0, 0));
    if let Some(cpu) = cpu {
        println!("{}", cpu.steal_line());
    }
}
