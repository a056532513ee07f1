//! What the bench targets share: the allocator interface, the peers, the
//! workloads, and reading criterion's medians back.
#![allow(dead_code)]

use allocator_api2::alloc::{AllocError, Allocator};
use criterion::black_box;
use matrix_alloc::Matrix;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;

/// The minimal interface the workloads need.
pub trait BenchAlloc {
    fn name(&self) -> &'static str;
    fn alloc(&self, layout: Layout) -> *mut u8;
    /// # Safety
    /// `ptr` comes from `alloc` with `layout` and is freed once.
    unsafe fn free(&self, ptr: *mut u8, layout: Layout);
}

/// The matrix through its own API, as a program that holds a `Matrix` (or
/// uses it as an `Allocator`) calls it: the fast paths inline into the
/// caller. (`inline(always)`: LLVM would otherwise keep this wrapper a call
/// of its own, which a direct caller does not pay; `GlobalMatrix` below is
/// the out-of-line path.)
impl BenchAlloc for Matrix {
    fn name(&self) -> &'static str {
        "matrix"
    }
    #[inline(always)]
    fn alloc(&self, layout: Layout) -> *mut u8 {
        Matrix::alloc(self, layout).map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }
    #[inline(always)]
    unsafe fn free(&self, ptr: *mut u8, _: Layout) {
        // SAFETY: forwarded contract; the pointer came from `alloc`.
        unsafe { Matrix::free(self, std::ptr::NonNull::new_unchecked(ptr)).unwrap() }
    }
}

/// A `GlobalAlloc` peer under a name.
pub struct Peer<A>(pub &'static str, pub A);

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

/// The matrix as `#[global_allocator]` sees it: `MatrixGlobal`, one call
/// per operation that does not inline into the caller (as `__rust_alloc`
/// does not), like mimalloc's calls here.
pub struct GlobalMatrix(pub matrix_alloc_global::MatrixGlobal);

impl GlobalMatrix {
    pub fn new(size: usize) -> GlobalMatrix {
        GlobalMatrix(matrix_alloc_global::MatrixGlobal::new().size(size))
    }
}

impl BenchAlloc for GlobalMatrix {
    fn name(&self) -> &'static str {
        "matrix-global"
    }
    #[inline(never)]
    fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: layouts here have non-zero size.
        unsafe { self.0.alloc(layout) }
    }
    #[inline(never)]
    unsafe fn free(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.0.dealloc(ptr, layout) }
    }
}

/// Random sizes 32..=544 B, 70% allocate / 30% free (of a random live
/// block) until about 10,000 blocks are live, then free the rest: a fixed,
/// pre-generated sequence so every allocator sees the same one.
pub struct Mixed {
    ops: Vec<Option<usize>>, // Some(size): allocate; None: free a random live block
    picks: Vec<usize>,
}

impl Mixed {
    pub fn new() -> Mixed {
        Mixed::with(32..=544, 10_000, 42)
    }

    /// Random sizes in `sizes`, 70% allocate / 30% free until `live` blocks
    /// are live, then free all.
    pub fn with(sizes: std::ops::RangeInclusive<usize>, live_target: usize, seed: u64) -> Mixed {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (mut ops, mut picks, mut live) = (Vec::new(), Vec::new(), 0usize);
        while live < live_target {
            if live == 0 || rng.gen_bool(0.7) {
                ops.push(Some(rng.gen_range(sizes.clone())));
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
    pub fn op_count(&self) -> usize {
        let allocs = self.ops.iter().filter(|o| o.is_some()).count();
        self.ops.len() + (allocs - (self.ops.len() - allocs))
    }

    pub fn run<A: BenchAlloc + ?Sized>(&self, a: &A, live: &mut Vec<(*mut u8, Layout)>) {
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

/// One 64-byte allocate + free pair. Always inlined, so that every
/// allocator's calls sit in the measuring loop itself, as they would in a
/// program (left to itself, the compiler kept it out of line in `scaling`
/// only, which added a call and the reloading of the matrix's fields to
/// every pair there).
#[inline(always)]
pub fn pair<A: BenchAlloc + ?Sized>(a: &A) {
    let layout = Layout::from_size_align(64, 8).unwrap();
    let p = a.alloc(layout);
    // SAFETY: p was just allocated with `layout`.
    unsafe { a.free(black_box(p), layout) };
}

/// Turns each allocator takes (see `bench.rs`): the machines these run on
/// are shared, and a neighbour's load can slow one turn by half; load only
/// ever adds time, so each figure is the lowest of its turns' medians.
/// Many short turns rather than a few long ones: the load comes and goes
/// over seconds, so that each allocator gets some quiet turns.
pub const ROUNDS: usize = 8;

/// Warm-up and measurement time of one turn.
pub const WARM_UP: std::time::Duration = std::time::Duration::from_millis(250);
pub const MEASURE: std::time::Duration = std::time::Duration::from_millis(500);

/// The benchmark name of `name`'s turn in `round`.
pub fn round_name(name: &str, round: usize) -> String {
    format!("{name}-r{round}")
}

/// The medians (ns) of `name`'s turns, `suffix` being the rest of the
/// benchmark id after the name (e.g. `/2` for a parameter).
pub fn round_medians(group: &str, name: &str, suffix: &str) -> Vec<f64> {
    (0..ROUNDS)
        .filter_map(|r| median_ns(group, &format!("{}{suffix}", round_name(name, r))))
        .collect()
}

/// The median over rounds of `mine / peer` within each round: the two
/// turns of a round ran seconds apart, so this pairs them under similar
/// load (a second view besides the ratio of the lowest medians, which one
/// lucky turn can move).
pub fn median_ratio(mine: &[f64], peer: &[f64]) -> f64 {
    median(mine.iter().zip(peer).map(|(a, b)| a / b).collect())
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Calls of each side in `interleaved`.
pub const ALTERNATIONS: usize = 201;

/// The median over `ALTERNATIONS` pairs of calls of `time(a) / time(b)`,
/// each call timing itself (a few milliseconds at most), in the order
/// a b, b a, a b, ... so that a drift in the machine's speed favours
/// neither side.
///
/// A third view besides criterion's turns, for these shared machines: the
/// two calls of a pair run milliseconds apart and share that moment's
/// load, where two turns of a round are a second or more apart.
pub fn interleaved(
    a: impl FnMut() -> std::time::Duration,
    b: impl FnMut() -> std::time::Duration,
) -> f64 {
    interleaved_n(ALTERNATIONS, a, b)
}

/// As [`interleaved`], over `n` pairs (for calls too long for 201).
pub fn interleaved_n(
    n: usize,
    mut a: impl FnMut() -> std::time::Duration,
    mut b: impl FnMut() -> std::time::Duration,
) -> f64 {
    median(
        (0..n)
            .map(|k| {
                let (ta, tb) = if k % 2 == 0 {
                    let ta = a();
                    (ta, b())
                } else {
                    let tb = b();
                    (a(), tb)
                };
                ta.as_secs_f64() / tb.as_secs_f64()
            })
            .collect(),
    )
}

/// How long `f` takes.
pub fn timed(f: impl FnOnce()) -> std::time::Duration {
    let start = std::time::Instant::now();
    f();
    start.elapsed()
}

/// 64-byte pairs per call of `interleaved`.
pub const PAIRS_PER_CALL: usize = 10_000;

/// `PAIRS_PER_CALL` pairs of `a`, timed.
pub fn timed_pairs<A: BenchAlloc + ?Sized>(a: &A) -> std::time::Duration {
    timed(|| (0..PAIRS_PER_CALL).for_each(|_| pair(a)))
}

/// Reads criterion's median estimate (ns) for one benchmark.
fn median_ns(group: &str, name: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{name}/new/estimates.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

/// The machine's CPU time counters (`/proc/stat`, all CPUs, in ticks):
/// what this VM ran, and what the hypervisor gave to others while this VM
/// had work (steal).
#[derive(Clone, Copy)]
pub struct CpuTimes {
    busy: u64,
    steal: u64,
}

impl CpuTimes {
    /// `None` where `/proc/stat` cannot be read.
    pub fn now() -> Option<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|t| t.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal
        let field = |i: usize| ticks.get(i).copied().unwrap_or(0);
        Some(CpuTimes {
            busy: field(0) + field(1) + field(2) + field(5) + field(6),
            steal: field(7),
        })
    }

    /// The line that says how much of the run's CPU time the hypervisor
    /// took for its other guests since `self`: time the benchmarks waited
    /// for, on every allocator alike but not at the same moments.
    pub fn steal_line(self) -> String {
        match CpuTimes::now() {
            Some(end) => {
                let (busy, steal) = (end.busy - self.busy, end.steal - self.steal);
                format!(
                    "machine: the hypervisor took {:.0}% of this run's CPU time for other guests (steal {steal} of {} ticks)",
                    100.0 * steal as f64 / (busy + steal).max(1) as f64,
                    busy + steal
                )
            }
            None => "machine: /proc/stat not readable".into(),
        }
    }
}

/// mimalloc as an `allocator_api2` allocator, for a `Vec` of its own;
/// growing goes through `mi_realloc`, as a `Vec` under mimalloc as the
/// global allocator would.
#[derive(Clone, Copy)]
pub struct Mi;

// SAFETY: forwards to mimalloc, whose blocks stay valid until freed;
// `realloc` keeps the contents as `grow` requires.
unsafe impl Allocator for Mi {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: layouts here have non-zero size.
        let p = NonNull::new(unsafe { mimalloc::MiMalloc.alloc(layout) }).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { mimalloc::MiMalloc.dealloc(ptr.as_ptr(), layout) }
    }
    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract; same alignment in these benches.
        let p = unsafe { mimalloc::MiMalloc.realloc(ptr.as_ptr(), old, new.size()) };
        let p = NonNull::new(p).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, new.size()))
    }
}
