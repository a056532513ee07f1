//! Allocator benchmarks: the matrix against `System` and mimalloc, side by
//! side in one run.
//!
//! Dimensions: workload (mixed random sizes with a live set / 64-byte pair)
//! × allocator. One thread; thread scaling and cross-process workloads come
//! with the per-thread caches. After criterion's own report, the ratios of
//! the medians (matrix / peer) are printed.
//!
//! Run: `cargo bench --bench bench`

mod common;

use common::{median_ns, BenchAlloc, Mixed, Peer};
use criterion::{black_box, Criterion};
use matrix_alloc::Matrix;
use std::alloc::{Layout, System};
use std::time::Duration;

fn bench_mixed<A: BenchAlloc>(c: &mut Criterion, a: &A, w: &Mixed) {
    let mut g = c.benchmark_group("mixed_32_544_live10k");
    g.throughput(criterion::Throughput::Elements(w.op_count() as u64));
    let mut live = Vec::with_capacity(20_000);
    g.bench_function(a.name(), |b| b.iter(|| w.run(a, &mut live)));
    g.finish();
}

fn bench_pair<A: BenchAlloc>(c: &mut Criterion, a: &A) {
    let mut g = c.benchmark_group("pair_64");
    g.throughput(criterion::Throughput::Elements(1));
    let layout = Layout::from_size_align(64, 8).unwrap();
    g.bench_function(a.name(), |b| {
        b.iter(|| {
            let p = a.alloc(layout);
            // SAFETY: p was just allocated with `layout`.
            unsafe { a.free(black_box(p), layout) };
        })
    });
    g.finish();
}

fn print_ratios(mixed_ops: usize) {
    println!("\nratios of medians, matrix / peer (below 1.0: the matrix is faster)");
    for (group, per_op_div) in [("mixed_32_544_live10k", mixed_ops as f64), ("pair_64", 1.0)] {
        let Some(m) = median_ns(group, "matrix") else {
            continue;
        };
        let mut line = format!("{group:>22}: matrix {:8.1} ns/op", m / per_op_div);
        for peer in ["system", "mimalloc"] {
            if let Some(p) = median_ns(group, peer) {
                line += &format!(
                    " | {peer} {:8.1} ns/op, ratio {:5.2}",
                    p / per_op_div,
                    m / p
                );
            }
        }
        println!("{line}");
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let matrix = Matrix::create(256 << 20).expect("segment");
    let w = Mixed::new();
    bench_mixed(&mut c, &matrix, &w);
    let (system, mimalloc) = (Peer("system", System), Peer("mimalloc", mimalloc::MiMalloc));
    bench_mixed(&mut c, &system, &w);
    bench_mixed(&mut c, &mimalloc, &w);
    bench_pair(&mut c, &matrix);
    bench_pair(&mut c, &system);
    bench_pair(&mut c, &mimalloc);
    assert_eq!(
        matrix
            .check()
            .expect("heap check after the benches")
            .used_blocks,
        0
    );
    c.final_summary();
    print_ratios(w.op_count());
}
