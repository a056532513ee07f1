//! Speed for every size (issue 22): a live set of blocks of random sizes
//! in a range, replaced at random (free one, allocate one, touch its first
//! and last byte), on 1 and 2 threads, through `Matrix::alloc`/`free` and
//! through `MatrixGlobal`, against mimalloc and `System`.
//!
//! Each thread keeps its own live set per allocator, for the whole run, on
//! threads that live as long as the run (so that no block is freed by a
//! thread other than its allocator's, and no thread start is timed). A call
//! is one batch of replacements on every thread at once, timed from the
//! start to the last thread's end. The figure is interleaved: the median,
//! over alternating calls, of one allocator's time over the other's.
//!
//! Last, growth: an `allocator_api2` `Vec<u64>` pushed from empty to 64 MiB,
//! and a byte string built by appending 16-byte pieces to 16 MiB, through
//! `&Matrix` as the allocator against mimalloc (`mi_realloc`) and `System`.
//!
//! Run: `cargo bench --bench sizes` (`-- MiB`: only the ranges named so)

mod common;

use allocator_api2::alloc::{Allocator, Global};
use allocator_api2::vec::Vec as AVec;
use common::{BenchAlloc, GlobalMatrix, Mi, Peer};
use matrix_alloc::Matrix;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::alloc::Layout;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

const ALTERNATIONS: usize = 41;

/// A size range: its name, the sizes, the live blocks per thread and the
/// replacements per call.
struct Range(&'static str, usize, usize, usize, usize);

const RANGES: [Range; 5] = [
    Range("16 B - 1 KiB", 16, 1 << 10, 4096, 20_000),
    Range("1 - 4 KiB", 1 << 10, 4 << 10, 2048, 20_000),
    Range("4 - 64 KiB", 4 << 10, 64 << 10, 512, 5_000),
    Range("64 - 512 KiB", 64 << 10, 512 << 10, 128, 2_000),
    Range("0.5 - 4 MiB", 512 << 10, 4 << 20, 32, 500),
];

type Alloc = &'static (dyn BenchAlloc + Sync);

/// One thread's live set for one allocator.
struct Live {
    blocks: Vec<(*mut u8, Layout)>,
    rng: SmallRng,
}

fn layout(rng: &mut SmallRng, r: &Range) -> Layout {
    Layout::from_size_align(rng.gen_range(r.1..=r.2), 8).unwrap()
}

fn alloc_touched(a: Alloc, l: Layout) -> *mut u8 {
    let p = a.alloc(l);
    assert!(!p.is_null(), "{} ran out of memory", a.name());
    // SAFETY: a fresh block of `l.size()` bytes.
    unsafe {
        p.write_volatile(1);
        p.add(l.size() - 1).write_volatile(1);
    }
    p
}

impl Live {
    fn new(a: Alloc, r: &Range, seed: u64) -> Live {
        let mut rng = SmallRng::seed_from_u64(seed);
        let blocks = (0..r.3)
            .map(|_| {
                let l = layout(&mut rng, r);
                (alloc_touched(a, l), l)
            })
            .collect();
        Live { blocks, rng }
    }

    fn replace(&mut self, a: Alloc, r: &Range) {
        for _ in 0..r.4 {
            let i = self.rng.gen_range(0..self.blocks.len());
            let (p, l) = self.blocks[i];
            // SAFETY: a live block of `a` with `l`, freed once.
            unsafe { a.free(p, l) };
            let l = layout(&mut self.rng, r);
            self.blocks[i] = (alloc_touched(a, l), l);
        }
    }

    fn free_all(self, a: Alloc) {
        for (p, l) in self.blocks {
            // SAFETY: as in `replace`.
            unsafe { a.free(p, l) };
        }
    }
}

/// Threads that each keep a live set per allocator and run one call of
/// allocator `k` when told.
struct Workers {
    start: Arc<Barrier>,
    done: Arc<Barrier>,
    job: Arc<Mutex<Option<usize>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn new(n: usize, allocs: &'static [Alloc], r: &'static Range) -> Workers {
        let start = Arc::new(Barrier::new(n + 1));
        let done = Arc::new(Barrier::new(n + 1));
        let job = Arc::new(Mutex::new(Some(usize::MAX)));
        let threads = (0..n)
            .map(|t| {
                let (start, done, job) = (start.clone(), done.clone(), job.clone());
                std::thread::spawn(move || {
                    let mut live: Vec<Live> = allocs
                        .iter()
                        .map(|&a| Live::new(a, r, 1000 + t as u64))
                        .collect();
                    loop {
                        start.wait();
                        let Some(k) = *job.lock().unwrap() else { break };
                        if k != usize::MAX {
                            live[k].replace(allocs[k], r);
                        }
                        done.wait();
                    }
                    for (l, &a) in live.into_iter().zip(allocs) {
                        l.free_all(a);
                    }
                })
            })
            .collect();
        let w = Workers {
            start,
            done,
            job,
            threads,
        };
        w.call(usize::MAX); // every live set filled
        w
    }

    fn call(&self, k: usize) -> Duration {
        *self.job.lock().unwrap() = Some(k);
        let t = Instant::now();
        self.start.wait();
        self.done.wait();
        t.elapsed()
    }

    fn stop(self) {
        *self.job.lock().unwrap() = None;
        self.start.wait();
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

/// Pushes `u64`s onto an empty `Vec` until it holds 64 MiB.
fn vec_growth<A: Allocator>(a: A) -> Duration {
    common::timed(|| {
        let mut v = AVec::new_in(a);
        for i in 0..(64u64 << 20) / 8 {
            v.push(i);
        }
        std::hint::black_box(&v);
    })
}

/// Appends 16-byte pieces to an empty byte string until it holds 16 MiB.
fn string_growth<A: Allocator>(a: A) -> Duration {
    common::timed(|| {
        let mut s = AVec::new_in(a);
        for _ in 0..(16 << 20) / 16 {
            s.extend_from_slice(b"sixteen bytes, !");
        }
        std::hint::black_box(&s);
    })
}

fn growth(matrix: &Matrix) {
    const CALLS: usize = 11;
    let vec_mi = common::interleaved_n(CALLS, || vec_growth(matrix), || vec_growth(Mi));
    let vec_sys = common::interleaved_n(CALLS, || vec_growth(matrix), || vec_growth(Global));
    let str_mi = common::interleaved_n(CALLS, || string_growth(matrix), || string_growth(Mi));
    let str_sys = common::interleaved_n(CALLS, || string_growth(matrix), || string_growth(Global));
    let ms = |f: &dyn Fn() -> Duration| {
        common::median((0..5).map(|_| f().as_secs_f64() * 1e3).collect())
    };
    println!(
        "Vec<u64> pushed to 64 MiB: matrix / mimalloc {vec_mi:.2}, matrix / System {vec_sys:.2} (ms: matrix {:.1}, mimalloc {:.1}, System {:.1})",
        ms(&|| vec_growth(matrix)),
        ms(&|| vec_growth(Mi)),
        ms(&|| vec_growth(Global))
    );
    println!(
        "bytes appended to 16 MiB: matrix / mimalloc {str_mi:.2}, matrix / System {str_sys:.2} (ms: matrix {:.1}, mimalloc {:.1}, System {:.1})",
        ms(&|| string_growth(matrix)),
        ms(&|| string_growth(Mi)),
        ms(&|| string_growth(Global))
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cpu = common::CpuTimes::now();
    let matrix: &'static Matrix = Box::leak(Box::new(Matrix::anonymous(4 << 30).unwrap()));
    let global: &'static GlobalMatrix = Box::leak(Box::new(GlobalMatrix::new(4 << 30)));
    let allocs: &'static [Alloc] = Box::leak(Box::new([
        matrix as Alloc,
        global,
        &Peer("mimalloc", mimalloc::MiMalloc),
        &Peer("System", std::alloc::System),
    ]));
    let pairs = [(0, 2), (0, 3), (1, 2), (1, 3)];
    println!("interleaved time ratios, median of {ALTERNATIONS} alternating calls:");
    // `cargo bench --bench sizes -- KiB` runs the ranges whose name has "KiB".
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for r in RANGES
        .iter()
        .filter(|r| filter.as_ref().is_none_or(|f| r.0.contains(f.as_str())))
    {
        for threads in [1, 2] {
            let w = Workers::new(threads, allocs, r);
            let mut figures = Vec::new();
            for (a, b) in pairs {
                let ratio = common::interleaved_n(ALTERNATIONS, || w.call(a), || w.call(b));
                figures.push(format!(
                    "{} / {} {ratio:.2}",
                    allocs[a].name(),
                    allocs[b].name()
                ));
            }
            let ns = |k: usize| {
                let times: Vec<f64> = (0..11).map(|_| w.call(k).as_nanos() as f64).collect();
                common::median(times) / r.4 as f64
            };
            let per_op: Vec<String> = (0..allocs.len())
                .map(|k| format!("{} {:.0}", allocs[k].name(), ns(k)))
                .collect();
            w.stop();
            println!("{:>13}, {threads} thread(s): {}", r.0, figures.join(", "));
            println!("{:>13}  ns per replacement: {}", "", per_op.join(", "));
        }
    }
    growth(matrix);
    if let Some(cpu) = cpu {
        println!("{}", cpu.steal_line());
    }
}
