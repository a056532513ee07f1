//! Allocator benchmarks: the matrix against `System` and mimalloc, side by
//! side in one run.
//!
//! Dimensions: workload (mixed random sizes with a live set / 64-byte pair)
//! × allocator. One thread; thread scaling and cross-process workloads are
//! in `scaling.rs`.
//!
//! The machines this runs on are shared, and a neighbour's load can slow
//! one allocator's turn by half. So the allocators take turns: `ROUNDS`
//! rounds (in `common`), each measuring every allocator once, and each
//! allocator's figure is the lowest of its round medians (load only ever
//! adds time). After criterion's own report, every round's medians and the
//! ratios are printed, then the same comparisons made by `interleaved`
//! calls (see `common`): calls milliseconds apart instead of turns.
//!
//! Run: `cargo bench --bench bench`

mod common;

use common::{
    interleaved, median_ratio, pair, round_medians, round_name, timed, timed_pairs, BenchAlloc,
    GlobalMatrix, Mixed, Peer, ALTERNATIONS, PAIRS_PER_CALL, ROUNDS,
};
use criterion::Criterion;
use matrix_alloc::Matrix;
use std::alloc::System;

fn bench_mixed<A: BenchAlloc>(c: &mut Criterion, round: usize, a: &A, w: &Mixed) {
    let mut g = c.benchmark_group("mixed_32_544_live10k");
    g.throughput(criterion::Throughput::Elements(w.op_count() as u64));
    let mut live = Vec::with_capacity(20_000);
    g.bench_function(round_name(a.name(), round), |b| {
        b.iter(|| w.run(a, &mut live))
    });
    g.finish();
}

fn bench_pair<A: BenchAlloc>(c: &mut Criterion, round: usize, a: &A) {
    let mut g = c.benchmark_group("pair_64");
    g.throughput(criterion::Throughput::Elements(1));
    g.bench_function(round_name(a.name(), round), |b| b.iter(|| pair(a)));
    g.finish();
}

/// Prints every round, then each of the matrix's rows (`ours` of them,
/// first in `names`) against each peer.
fn print_ratios(group: &str, names: &[&str], ours: usize, per_op_div: f64) {
    let medians: Vec<Vec<f64>> = names.iter().map(|n| round_medians(group, n, "")).collect();
    let best: Vec<f64> = medians
        .iter()
        .map(|m| m.iter().copied().fold(f64::INFINITY, f64::min) / per_op_div)
        .collect();
    for (name, m) in names.iter().zip(&medians) {
        let rounds: Vec<String> = m.iter().map(|t| format!("{:.1}", t / per_op_div)).collect();
        println!("{group:>22} {name:>13}: rounds {} ns/op", rounds.join(" "));
    }
    for (k, (name, mine)) in names.iter().zip(&best).enumerate().take(ours) {
        let mut line = format!("{group:>22}: {name:>13} {mine:6.1} ns/op");
        for (j, (peer, b)) in names.iter().zip(&best).enumerate().skip(ours) {
            line += &format!(
                " | {peer} {b:6.1} ns/op, ratio {:5.2} (per round {:5.2})",
                mine / b,
                median_ratio(&medians[k], &medians[j])
            );
        }
        println!("{line}");
    }
}

fn main() {
    let cpu = common::CpuTimes::now();
    let mut c = Criterion::default()
        .warm_up_time(common::WARM_UP)
        .measurement_time(common::MEASURE)
        .configure_from_args();
    let matrix = Matrix::create(256 << 20).expect("segment");
    let (system, mimalloc) = (Peer("system", System), Peer("mimalloc", mimalloc::MiMalloc));
    let global = GlobalMatrix::new(256 << 20);
    let names = [matrix.name(), global.name(), system.name(), mimalloc.name()];
    let w = Mixed::new();
    // Generic calls, not `dyn`: the matrix's fast path inlines into the
    // loop as it does in a program that uses it directly; `matrix-global`
    // is the same matrix code through the `GlobalAlloc` adapter, one call
    // per operation, as mimalloc's is here.
    for round in 0..ROUNDS {
        bench_mixed(&mut c, round, &matrix, &w);
        bench_mixed(&mut c, round, &global, &w);
        bench_mixed(&mut c, round, &system, &w);
        bench_mixed(&mut c, round, &mimalloc, &w);
    }
    for round in 0..ROUNDS {
        bench_pair(&mut c, round, &matrix);
        bench_pair(&mut c, round, &global);
        bench_pair(&mut c, round, &system);
        bench_pair(&mut c, round, &mimalloc);
    }
    assert_eq!(
        matrix
            .check()
            .expect("heap check after the benches")
            .used_blocks,
        0
    );
    c.final_summary();
    println!("\nlowest round median per allocator, ns/op; ratio = matrix / peer (below 1.0: the matrix is faster); per round = median of the rounds' ratios");
    for (group, per_op_div) in [
        ("mixed_32_544_live10k", w.op_count() as f64),
        ("pair_64", 1.0),
    ] {
        print_ratios(group, &names, 2, per_op_div);
    }
    println!(
        "\ninterleaved: median of {ALTERNATIONS} paired calls (one mixed run, or {PAIRS_PER_CALL} pairs, each), time matrix / peer"
    );
    for (mine, peer, (mixed, pair)) in [
        ("matrix", "system", interleaved_pair(&w, &matrix, &system)),
        (
            "matrix",
            "mimalloc",
            interleaved_pair(&w, &matrix, &mimalloc),
        ),
        (
            "matrix-global",
            "mimalloc",
            interleaved_pair(&w, &global, &mimalloc),
        ),
    ] {
        println!("{mine:>13} / {peer:<8}: mixed {mixed:5.2}, pair {pair:5.2}");
    }
    if let Some(cpu) = cpu {
        println!("{}", cpu.steal_line());
    }
}

/// `a`'s time over `b`'s on the mixed workload and on the pair, by
/// `interleaved` calls.
fn interleaved_pair<A: BenchAlloc, B: BenchAlloc>(w: &Mixed, a: &A, b: &B) -> (f64, f64) {
    let mut live = [(); 2].map(|_| Vec::with_capacity(20_000));
    let [la, lb] = &mut live;
    let mixed = interleaved(|| timed(|| w.run(a, la)), || timed(|| w.run(b, lb)));
    (mixed, interleaved(|| timed_pairs(a), || timed_pairs(b)))
}
