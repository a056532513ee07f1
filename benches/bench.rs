//! Allocator benchmarks: the matrix against `System` and mimalloc, side by
//! side in one run.
//!
//! Dimensions: workload (mixed random sizes with a live set / 64-byte pair)
//! × allocator. One thread; thread scaling and cross-process workloads come
//! with the per-thread caches. After criterion's own report, the ratios of
//! the medians (matrix / peer) are printed.
//!
//! Run: `cargo bench --bench bench`

use criterion::{black_box, Criterion};
use matrix_alloc::Matrix;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::time::Duration;

/// The minimal interface the workloads need.
trait BenchAlloc {
    fn name(&self) -> &'static str;
    fn alloc(&self, layout: Layout) -> *mut u8;
    /// # Safety
    /// `ptr` comes from `alloc` with `layout` and is freed once.
    unsafe fn free(&self, ptr: *mut u8, layout: Layout);
}

impl BenchAlloc for Matrix {
    fn name(&self) -> &'static str {
        "matrix"
    }
    fn alloc(&self, layout: Layout) -> *mut u8 {
        Matrix::alloc(self, layout).map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }
    unsafe fn free(&self, ptr: *mut u8, _: Layout) {
        // SAFETY: forwarded contract; the pointer came from `alloc`.
        unsafe { Matrix::free(self, std::ptr::NonNull::new_unchecked(ptr)).unwrap() }
    }
}

/// A `GlobalAlloc` peer under a name.
struct Peer<A>(&'static str, A);

impl<A: GlobalAlloc> BenchAlloc for Peer<A> {
    fn name(&self) -> &'static str {
        self.0
    }
    fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: layouts here have non-zero size.
        unsafe { self.1.alloc(layout) }
    }
    unsafe fn free(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.1.dealloc(ptr, layout) }
    }
}

/// Random sizes 32..=544 B, 70% allocate / 30% free (of a random live
/// block) until about 10,000 blocks are live, then free the rest: a fixed,
/// pre-generated sequence so every allocator sees the same one.
struct Mixed {
    ops: Vec<Option<usize>>, // Some(size): allocate; None: free a random live block
    picks: Vec<usize>,
}

impl Mixed {
    fn new() -> Mixed {
        let mut rng = SmallRng::seed_from_u64(42);
        let (mut ops, mut picks, mut live) = (Vec::new(), Vec::new(), 0usize);
        while live < 10_000 {
            if live == 0 || rng.gen_bool(0.7) {
                ops.push(Some(rng.gen_range(32..=544)));
                live += 1;
            } else {
                ops.push(None);
                picks.push(rng.gen::<usize>());
                live -= 1;
            }
        }
        Mixed { ops, picks }
    }

    /// Operations per run (the allocations and frees of the ramp plus the
    /// final frees).
    fn op_count(&self) -> usize {
        let allocs = self.ops.iter().filter(|o| o.is_some()).count();
        self.ops.len() + (allocs - (self.ops.len() - allocs))
    }

    fn run<A: BenchAlloc>(&self, a: &A, live: &mut Vec<(*mut u8, Layout)>) {
        let mut picks = self.picks.iter();
        for op in &self.ops {
            match op {
                Some(size) => {
                    let layout = Layout::from_size_align(*size, 8).unwrap();
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    live.push((black_box(p), layout));
                }
                None => {
                    let i = picks.next().unwrap() % live.len();
                    let (p, l) = live.swap_remove(i);
                    // SAFETY: p is live and freed once.
                    unsafe { a.free(p, l) };
                }
            }
        }
        for (p, l) in live.drain(..) {
            // SAFETY: p is live and freed once.
            unsafe { a.free(p, l) };
        }
    }
}

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

/// Reads criterion's median estimate (ns) for one benchmark.
fn median_ns(group: &str, name: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{name}/new/estimates.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
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
