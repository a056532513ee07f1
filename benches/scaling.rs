//! Scaling, cross-thread and cross-process benchmarks, and the shared-memory
//! peers on their own ground. Every group runs its allocators side by side.
//!
//! Dimensions: workload (mixed 32-544 B with ~10,000 live / 64-byte pair /
//! producer-consumer / cross-process exchange / small objects 32-1024 B)
//! × threads or processes (1, 2, 8) × allocator (matrix, System, mimalloc,
//! atomic-matrix 0.4.1, rts-alloc 5). The mixed thread group also measures
//! the machine itself (`machine-cpu`, `machine-memory`: no allocation), so
//! that each run shows what scaling its two cores allowed at the time.
//!
//! Every group takes turns over `ROUNDS` rounds, and each figure is the
//! lowest round median (see `bench.rs`). The main comparisons are made
//! again by interleaved calls (`interleaved_views`), and thread scaling a
//! third way too, by one thread's time beside another (`beside`).
//!
//! Run: `cargo bench --bench scaling`; the last lines print the ratios.

mod common;

use common::{
    interleaved, median, median_ratio, pair, round_medians, round_name, timed, timed_pairs,
    BenchAlloc, GlobalMatrix, Mixed, Peer, ALTERNATIONS, ROUNDS,
};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion};
use matrix_alloc::{Matrix, Offset};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::alloc::{Layout, System};
use std::process::Command;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::time::{Duration, Instant};

/// Runs `work(thread)` on `threads` threads that start together; returns the
/// wall time from their start until the last one is done.
///
/// The clock starts before the threads are let go and stops in the last
/// thread to finish: were it read by this thread after a barrier, with 8
/// threads on 2 cores it could be scheduled a time slice after the workers
/// had started, and miss that much of their work (the `machine` rows then
/// showed 8 threads doing more than twice the work of one on 2 cores).
fn timed_threads(threads: usize, work: impl Fn(usize) + Sync) -> Duration {
    let ready = AtomicUsize::new(0);
    let go = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (ready, go, work) = (&ready, &go, &work);
                s.spawn(move || {
                    ready.fetch_add(1, AcqRel);
                    while !go.load(Acquire) {
                        std::thread::yield_now();
                    }
                    work(t);
                    Instant::now()
                })
            })
            .collect();
        while ready.load(Acquire) < threads {
            std::thread::yield_now();
        }
        let start = Instant::now();
        go.store(true, Release);
        let end = handles.into_iter().map(|h| h.join().unwrap()).max();
        end.map_or(Duration::ZERO, |end| end - start)
    })
}

/// How much a second thread slows a thread down: the median, over
/// `interleaved` pairs of calls, of one thread's time for `work` alone
/// over its time for the same work while a second thread runs that work
/// over and over. The second thread is busy before the clock starts and
/// until it stops, and parked between calls, so that neither thread
/// starts, nor a host's drift from one moment to the next, is in the
/// figure: only what the two threads do to each other (for an allocator,
/// its shared state and cache lines; for the machine, its cores, caches
/// and memory). Twice this is the 2-thread scaling the work would have
/// if both threads were timed.
fn beside(work: &(dyn Fn(usize) + Sync)) -> f64 {
    // Whether the second thread is to work, whether it is working, and
    // whether it is to leave.
    let (wanted, working, leave) = (
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    );
    let wait_for = |what: &dyn Fn() -> bool| {
        while !what() {
            std::thread::yield_now();
        }
    };
    std::thread::scope(|s| {
        let second = s.spawn(|| loop {
            if leave.load(Acquire) {
                return;
            }
            if !wanted.load(Acquire) {
                std::thread::park();
                continue;
            }
            working.store(true, Release);
            while wanted.load(Acquire) {
                work(1);
            }
            working.store(false, Release);
        });
        let alone = || timed(|| work(0));
        let together = || {
            wanted.store(true, Release);
            second.thread().unpark();
            wait_for(&|| working.load(Acquire));
            let t = timed(|| work(0));
            wanted.store(false, Release);
            wait_for(&|| !working.load(Acquire));
            t
        };
        let ratio = interleaved(alone, together);
        leave.store(true, Release);
        second.thread().unpark();
        ratio
    })
}

/// One turn of `name` in `g`, its id `name-r{round}/{threads}`: `threads`
/// threads start together, each runs `work(iters)`, and the time is until
/// the last one is done.
fn bench_threads(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    round: usize,
    threads: usize,
    work: impl Fn(u64) + Sync,
) {
    g.bench_with_input(
        BenchmarkId::new(round_name(name, round), threads),
        &threads,
        |b, &threads| b.iter_custom(|iters| timed_threads(threads, |_| work(iters))),
    );
}

fn thread_scaling(c: &mut Criterion, allocators: &[&(dyn BenchAlloc + Sync)]) {
    let w = Mixed::new();
    for (group, pairs_per_iter) in [("threads_mixed", 0usize), ("threads_pair_64", 1000)] {
        let mut g = c.benchmark_group(group);
        for round in 0..ROUNDS {
            for a in allocators {
                for threads in [1, 2, 8] {
                    bench_threads(&mut g, a.name(), round, threads, |iters| {
                        let mut live = Vec::with_capacity(20_000);
                        for _ in 0..iters {
                            if pairs_per_iter == 0 {
                                w.run(*a, &mut live);
                            } else {
                                (0..pairs_per_iter).for_each(|_| pair(*a));
                            }
                        }
                    });
                }
            }
            if pairs_per_iter == 0 {
                // The machine's own scaling in the same round, on work
                // that shares nothing: arithmetic alone (`cpu`), and
                // random updates of a private buffer the size of the
                // workload's live set (`memory`). On 2 idle cores both
                // would reach 2.0 at 2 threads; a neighbour's load lowers
                // them, and an allocator's figure with them.
                for (name, work) in MACHINE_ROWS {
                    let next = AtomicUsize::new(0);
                    for threads in [1, 2, 8] {
                        bench_threads(&mut g, name, round, threads, |iters| {
                            let t = next.fetch_add(1, Relaxed);
                            (0..iters).for_each(|_| {
                                criterion::black_box(work(t));
                            })
                        });
                    }
                }
            }
        }
        g.finish();
    }
}

/// The names under which `thread_scaling` measures `cpu` and `memory`.
const CPU: &str = "machine-cpu";
const MEMORY: &str = "machine-memory";

/// One call's work of a machine row, given the thread.
type MachineWork = fn(usize) -> u64;

/// The machine's own rows, by name.
const MACHINE_ROWS: [(&str, MachineWork); 2] = [(CPU, cpu), (MEMORY, memory)];

/// Steps of `cpu` and `memory` per call: some tens of microseconds.
const MACHINE_STEPS: usize = 10_000;

/// One step of xorshift64: dependent arithmetic the compiler cannot fold.
fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^ (x << 17)
}

/// Arithmetic only, no memory access.
fn cpu(_: usize) -> u64 {
    (0..MACHINE_STEPS).fold(criterion::black_box(1), |x, _| xorshift(x))
}

/// Random updates of buffer `t % 8`, 3 MiB (about the mixed workload's
/// live set per thread), so that concurrent threads use different ones.
fn memory(t: usize) -> u64 {
    const WORDS: usize = 3 << 17;
    static BUFFERS: std::sync::OnceLock<Vec<Vec<AtomicU64>>> = std::sync::OnceLock::new();
    let buffers = BUFFERS.get_or_init(|| {
        (0..8)
            .map(|_| (0..WORDS).map(|_| AtomicU64::new(0)).collect())
            .collect()
    });
    let buffer = &buffers[t % buffers.len()];
    (0..MACHINE_STEPS).fold(criterion::black_box(1), |x, _| {
        let x = xorshift(x);
        let word = &buffer[x as usize % WORDS];
        word.store(word.load(Relaxed).wrapping_add(x), Relaxed);
        x
    })
}

/// The thread scaling and producer/consumer comparisons again, by
/// `interleaved` calls (see `common`): a call of one thread against a call
/// of 2 or 8 threads that each do the same work, milliseconds apart, and
/// one thread's time beside another (`beside`); and producer/consumer
/// through `global` (the `GlobalAlloc` adapter) too. Returns the lines to
/// print.
fn interleaved_views(
    allocators: &[&(dyn BenchAlloc + Sync)],
    global: &(dyn BenchAlloc + Sync),
) -> Vec<String> {
    let w = Mixed::new();
    let scaling = |n: usize, work: &(dyn Fn(usize) + Sync)| {
        n as f64 * interleaved(|| timed_threads(1, work), || timed_threads(n, work))
    };
    let mut lines = vec![format!(
        "interleaved: median of {ALTERNATIONS} paired calls; throughput n threads / 1 = n x time(1 thread) / time(n threads), each thread doing the same work"
    )];
    for &a in allocators {
        // Each thread's work in one call: a few milliseconds, so that
        // starting the thread (and its cache) is a small part of it.
        let w = &w;
        let m = move |_: usize| {
            let mut live = Vec::with_capacity(20_000);
            (0..4).for_each(|_| w.run(a, &mut live));
        };
        let p = move |_: usize| {
            (0..40).for_each(|_| {
                timed_pairs(a);
            })
        };
        lines.push(format!(
            "{:>14}: mixed 2/1 = {:.2}, 8/1 = {:.2}; pair 2/1 = {:.2}, 8/1 = {:.2}; beside another (2/1 by one thread's time): mixed {:.2}, pair {:.2}",
            a.name(),
            scaling(2, &m),
            scaling(8, &m),
            scaling(2, &p),
            scaling(8, &p),
            2.0 * beside(&m),
            2.0 * beside(&p)
        ));
    }
    for (name, work) in MACHINE_ROWS {
        let call = move |t: usize| {
            (0..50).for_each(|_| {
                criterion::black_box(work(t));
            })
        };
        lines.push(format!(
            "{name:>14}: 2/1 = {:.2}, 8/1 = {:.2}; beside another: {:.2}",
            scaling(2, &call),
            scaling(8, &call),
            2.0 * beside(&call)
        ));
    }
    let [matrix, peers @ ..] = allocators else {
        return lines;
    };
    // The global adapter too: its consumer's frees are all remote, the
    // path that `dealloc` hands out of line.
    for ours in [*matrix, global] {
        for peer in peers {
            let r = interleaved(
                || produce_consume(ours, 20_000),
                || produce_consume(*peer, 20_000),
            );
            lines.push(format!(
                "producer/consumer, 20,000 blocks a call: {} / {} = {r:.2} (time)",
                ours.name(),
                peer.name()
            ));
        }
    }
    lines
}

/// A bounded single-producer single-consumer ring of pointers.
struct Ring {
    slots: Vec<AtomicUsize>,
    head: AtomicUsize,
    tail: AtomicUsize,
}

impl Ring {
    fn new(n: usize) -> Ring {
        Ring {
            slots: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
        }
    }
    fn push(&self, v: usize) {
        let t = self.tail.load(Relaxed);
        while t - self.head.load(Acquire) == self.slots.len() {
            std::hint::spin_loop();
        }
        self.slots[t % self.slots.len()].store(v, Relaxed);
        self.tail.store(t + 1, Release);
    }
    fn pop(&self) -> usize {
        let h = self.head.load(Relaxed);
        while self.tail.load(Acquire) == h {
            std::hint::spin_loop();
        }
        let v = self.slots[h % self.slots.len()].load(Relaxed);
        self.head.store(h + 1, Release);
        v
    }
}

/// xmalloc-test style: one thread allocates 64-byte blocks, another frees them.
fn producer_consumer(c: &mut Criterion, allocators: &[&(dyn BenchAlloc + Sync)]) {
    let mut g = c.benchmark_group("producer_consumer_64");
    g.throughput(criterion::Throughput::Elements(1));
    for round in 0..ROUNDS {
        for a in allocators {
            g.bench_function(round_name(a.name(), round), |b| {
                b.iter_custom(|iters| produce_consume(*a, iters))
            });
        }
    }
    g.finish();
}

/// One thread allocates `blocks` 64-byte blocks and hands them through a
/// ring to another, which frees them; the time until both are done.
fn produce_consume(a: &(dyn BenchAlloc + Sync), blocks: u64) -> Duration {
    let layout = Layout::from_size_align(64, 8).unwrap();
    let ring = Ring::new(4096);
    timed_threads(2, |t| {
        for _ in 0..blocks {
            if t == 0 {
                ring.push(a.alloc(layout) as usize);
            } else {
                // SAFETY: every pointer was allocated with `layout`, once.
                unsafe { a.free(ring.pop() as *mut u8, layout) };
            }
        }
    })
}

// ---- two processes against two threads ----------------------------------------

const EXCHANGE_SLOTS: usize = 1024;
const EXCHANGE_OPS: usize = 20_000;

/// Allocates random 32-544 B blocks and swaps each into a random slot of the
/// table; frees what was there (usually a block of the other worker).
fn exchange(m: &Matrix, table: &[AtomicU64], seed: u64, ops: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..ops {
        let p = m
            .alloc(Layout::from_size_align(rng.gen_range(32..=544), 8).unwrap())
            .unwrap();
        let old = table[rng.gen_range(0..EXCHANGE_SLOTS)]
            .swap(m.offset_of(p.as_ptr()).unwrap().get(), AcqRel);
        if old != 0 {
            // SAFETY: the slot held a live block that is now ours alone.
            unsafe { m.free(m.resolve::<u8>(Offset(old)).unwrap()).unwrap() };
        }
    }
}

fn table(m: &Matrix, at: Offset) -> &[AtomicU64] {
    &words(m, at)[..EXCHANGE_SLOTS]
}

/// The start gate of the two child processes: each adds one, and starts
/// when it reads two.
fn gate(m: &Matrix, at: Offset) -> &AtomicU64 {
    &words(m, at)[EXCHANGE_SLOTS]
}

fn words(m: &Matrix, at: Offset) -> &[AtomicU64] {
    // SAFETY: `at` is an allocation of EXCHANGE_SLOTS + 1 words that
    // outlives the run.
    unsafe {
        std::slice::from_raw_parts(
            m.resolve::<AtomicU64>(at).unwrap().as_ptr(),
            EXCHANGE_SLOTS + 1,
        )
    }
}

fn drain(m: &Matrix, table: &[AtomicU64]) {
    for slot in table {
        let old = slot.swap(0, AcqRel);
        if old != 0 {
            // SAFETY: as in `exchange`.
            unsafe { m.free(m.resolve::<u8>(Offset(old)).unwrap()).unwrap() };
        }
    }
}

fn cross_process(c: &mut Criterion) {
    let (m, at) = exchange_segment();
    let mut g = c.benchmark_group("cross_process_exchange");
    g.throughput(criterion::Throughput::Elements(2 * EXCHANGE_OPS as u64));
    for round in 0..ROUNDS {
        g.bench_function(
            BenchmarkId::new(round_name("matrix", round), "2_threads"),
            |b| b.iter_custom(|iters| exchange_threads(&m, at, iters)),
        );
        g.bench_function(
            BenchmarkId::new(round_name("matrix", round), "2_processes"),
            |b| b.iter_custom(|iters| exchange_processes(&m, at, iters)),
        );
    }
    g.finish();
}

/// The interleaved view of `cross_process`: two processes against two
/// threads, one call of each (two exchange runs per worker) at a time.
fn interleaved_cross_process() -> String {
    let (m, at) = exchange_segment();
    let r = interleaved(
        || exchange_threads(&m, at, 2),
        || exchange_processes(&m, at, 2),
    );
    format!(
        "cross-process, 2 x {} exchanges a call: 2 processes reach {:.0}% of 2 threads' throughput",
        2 * EXCHANGE_OPS,
        100.0 * r
    )
}

/// A segment for the exchange, and its table (and gate) in it.
fn exchange_segment() -> (Matrix, Offset) {
    let m = Matrix::create(512 << 20).unwrap();
    let t = m
        .alloc(Layout::from_size_align((EXCHANGE_SLOTS + 1) * 8, 8).unwrap())
        .unwrap();
    // SAFETY: fresh allocation of that size.
    unsafe { t.as_ptr().write_bytes(0, (EXCHANGE_SLOTS + 1) * 8) };
    let at = m.offset_of(t.as_ptr()).unwrap();
    (m, at)
}

/// Two threads of this process run `iters` exchange runs each; the time
/// until both are done. The table is emptied afterwards, untimed.
fn exchange_threads(m: &Matrix, at: Offset, iters: u64) -> Duration {
    let d = timed_threads(2, |w| {
        for i in 0..iters {
            exchange(m, table(m, at), i * 2 + w as u64, EXCHANGE_OPS)
        }
    });
    drain(m, table(m, at));
    d
}

/// Two child processes run `iters` exchange runs each; the longer of their
/// own times. Each child times its own work from the moment both have
/// passed the gate: starting a process (exec, loading, mapping the
/// segment) is not throughput.
fn exchange_processes(m: &Matrix, at: Offset, iters: u64) -> Duration {
    gate(m, at).store(0, SeqCst);
    let children: Vec<_> = (0..2)
        .map(|w| {
            Command::new(std::env::current_exe().unwrap())
                .env(
                    "MATRIX_BENCH_CHILD",
                    format!("{} {} {} {}", m.id(), at.get(), iters, w),
                )
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let d = children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            let nanos = String::from_utf8(out.stdout).unwrap();
            Duration::from_nanos(nanos.trim().parse().unwrap())
        })
        .max()
        .unwrap();
    drain(m, table(m, at));
    d
}

/// The child side of `cross_process`: `MATRIX_BENCH_CHILD="id table iters worker"`.
fn exchange_child(spec: &str) {
    let f: Vec<&str> = spec.split(' ').collect();
    let m = Matrix::open(f[0].parse().unwrap()).unwrap();
    let at = Offset(f[1].parse().unwrap());
    let (iters, w): (u64, u64) = (f[2].parse().unwrap(), f[3].parse().unwrap());
    let gate = gate(&m, at);
    gate.fetch_add(1, SeqCst);
    while gate.load(SeqCst) < 2 {
        std::thread::yield_now();
    }
    let start = Instant::now();
    for i in 0..iters {
        exchange(&m, table(&m, at), i * 2 + w, EXCHANGE_OPS);
    }
    println!("{}", start.elapsed().as_nanos());
}

// ---- shared-memory peers ----------------------------------------------------------

/// atomic-matrix 0.4.1: a lock-free shm TLSF with u32 offsets.
struct AtomicMatrixPeer {
    handler: atomic_matrix::prelude::MatrixHandler,
    path: String,
}

impl AtomicMatrixPeer {
    /// The peer's segment is `/dev/shm/matrix-{id}` (its naming).
    fn new(id: &str, size: usize) -> AtomicMatrixPeer {
        let handler = atomic_matrix::prelude::AtomicMatrix::bootstrap(Some(id.to_string()), size)
            .expect("atomic-matrix bootstrap");
        AtomicMatrixPeer {
            handler,
            path: format!("/dev/shm/matrix-{id}"),
        }
    }
}

impl Drop for AtomicMatrixPeer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl BenchAlloc for AtomicMatrixPeer {
    fn name(&self) -> &'static str {
        "atomic-matrix"
    }
    fn alloc(&self, layout: Layout) -> *mut u8 {
        use atomic_matrix::prelude::HandlerFunctions;
        let base = self.handler.base_ptr();
        match self.handler.matrix().allocate(base, layout.size() as u32) {
            // SAFETY: the offset is inside the peer's mapping.
            Ok(p) => unsafe { base.add(p.offset() as usize) as *mut u8 },
            Err(_) => std::ptr::null_mut(),
        }
    }
    unsafe fn free(&self, ptr: *mut u8, _: Layout) {
        use atomic_matrix::prelude::{BlockHeader, HandlerFunctions, RelativePtr, HEADER_SPACE};
        let base = self.handler.base_ptr();
        let off = ptr as usize - base as usize;
        let header = RelativePtr::<BlockHeader>::new(off as u32 - HEADER_SPACE);
        self.handler.matrix().ack(&header, base);
    }
}

/// rts-alloc 5: a lock-free shm slab allocator; one `Allocator` per worker.
struct RtsPeer {
    /// Worker allocators, handed out to the threads of a run (they are not `Sync`).
    workers: std::sync::Mutex<Vec<rts_alloc::Allocator>>,
    path: std::path::PathBuf,
}

impl RtsPeer {
    fn new(workers: usize, size: usize) -> RtsPeer {
        let path =
            std::path::Path::new("/dev/shm").join(format!("rts-bench-{}", uuid::Uuid::new_v4()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        // SAFETY: `create` is called once for this new file.
        let first = unsafe { rts_alloc::Allocator::create(&file, size, workers as u32, 64 * 1024) };
        let first = first.unwrap_or_else(|e| {
            let _ = std::fs::remove_file(&path);
            panic!("rts-alloc create: {e:?}")
        });
        let mut all = vec![];
        for _ in 1..workers {
            all.push(rts_alloc::Allocator::join_from_existing(&first).expect("rts-alloc join"));
        }
        all.insert(0, first);
        RtsPeer {
            workers: std::sync::Mutex::new(all),
            path,
        }
    }
}

impl Drop for RtsPeer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One rts-alloc worker as a `BenchAlloc`.
struct RtsWorker<'a>(&'a rts_alloc::Allocator);

impl BenchAlloc for RtsWorker<'_> {
    fn name(&self) -> &'static str {
        "rts-alloc"
    }
    fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .allocate(layout.size() as u32)
            .map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }
    unsafe fn free(&self, ptr: *mut u8, _: Layout) {
        // SAFETY: forwarded contract; `ptr` came from this allocator.
        unsafe { self.0.free(NonNull::new_unchecked(ptr)) }
    }
}

static PEER_CRASHES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Where the atomic-matrix child of `round` leaves its interleaved ratio
/// on the pair.
fn interleaved_peer_file(round: &str) -> std::path::PathBuf {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    std::path::Path::new(&dir).join(format!("criterion/atomic-matrix-interleaved-r{round}"))
}

/// One single-thread workload for one allocator, in group `peers_single_thread`.
/// Generic, as in `bench`: each allocator's calls inline into the loop
/// as far as its code allows.
fn single_thread<A: BenchAlloc>(c: &mut Criterion, a: &A, workload: &str, round: usize) {
    let mut g = c.benchmark_group("peers_single_thread");
    let w = Mixed::new();
    g.bench_function(
        BenchmarkId::new(workload, round_name(a.name(), round)),
        |b| {
            if workload == "pair_64" {
                b.iter(|| pair(a))
            } else {
                let mut live = Vec::with_capacity(20_000);
                b.iter(|| w.run(a, &mut live))
            }
        },
    );
    g.finish();
}

/// Where the peers are measured on their own ground.
fn peers(c: &mut Criterion, matrix: &Matrix) {
    // The same single-thread workloads as `bench`, in turns like the other
    // groups; atomic-matrix runs each turn in a child process of this run,
    // so that a crash is recorded, not fatal (and not retried).
    for workload in ["mixed_32_544_live10k", "pair_64"] {
        let mut crashed = false;
        for round in 0..ROUNDS {
            single_thread(c, matrix, workload, round);
            if crashed {
                continue;
            }
            let id = uuid::Uuid::new_v4().to_string();
            let _ = std::fs::remove_file(interleaved_peer_file(&round.to_string()));
            let status = Command::new(std::env::current_exe().unwrap())
                .env("MATRIX_BENCH_ISOLATED", format!("{workload} {id} {round}"))
                .args(std::env::args().skip(1))
                .status()
                .unwrap();
            // A crashed child cannot remove its segment: do it here.
            let _ = std::fs::remove_file(format!("/dev/shm/matrix-{id}"));
            if !status.success() {
                crashed = true;
                println!("atomic-matrix crashed on {workload}: {status}");
                PEER_CRASHES
                    .lock()
                    .unwrap()
                    .push(format!("atomic-matrix crashed on {workload} ({status})"));
            }
        }
    }

    // rts-alloc: small objects, 1 and 2 workers (threads).
    let small = Mixed::with(32..=1024, 1000, 7);
    let mut g = c.benchmark_group("peers_small_objects_32_1024");
    for workers in [1usize, 2] {
        let rts = RtsPeer::new(workers, 256 << 20);
        for round in 0..ROUNDS {
            bench_threads(&mut g, "rts-alloc", round, workers, |iters| {
                let worker = rts.workers.lock().unwrap().pop().unwrap();
                let mut live = Vec::with_capacity(2000);
                (0..iters).for_each(|_| small.run(&RtsWorker(&worker), &mut live));
                rts.workers.lock().unwrap().push(worker);
            });
            bench_threads(&mut g, "matrix", round, workers, |iters| {
                let mut live = Vec::with_capacity(2000);
                (0..iters).for_each(|_| small.run(matrix, &mut live));
            });
        }
    }
    g.finish();
}

fn print_ratios() {
    println!("\nratios of the lowest round medians (time; below 1.0 means the first is faster); per round = median of the rounds' own ratios");
    for group in ["threads_mixed", "threads_pair_64"] {
        // Each thread does the same work: throughput scaling = n * t1 / tn.
        let scaling = |a: &str, n: u32| {
            let (ratio, per_round) = time_ratio(group, a, a, ("/1", &format!("/{n}")))?;
            Some((n as f64 * ratio, n as f64 * per_round))
        };
        for a in ["matrix", "system", "mimalloc", CPU, MEMORY] {
            if let (Some((s2, s2_round)), Some((s8, s8_round))) = (scaling(a, 2), scaling(a, 8)) {
                println!(
                    "{group:>16} {a:>9}: throughput 2 threads / 1 = {s2:.2} (per round {s2_round:.2}), 8 threads / 1 = {s8:.2} (per round {s8_round:.2})"
                );
            }
        }
        // DESIGN.md's bar: the matrix's own 2-thread scaling against
        // mimalloc's, measured in the same run.
        if let (Some((m, m_round)), Some((mi, mi_round))) =
            (scaling("matrix", 2), scaling("mimalloc", 2))
        {
            println!(
                "{group:>16}: matrix's 2-thread scaling is {:.0}% of mimalloc's (per round {:.0}%)",
                100.0 * m / mi,
                100.0 * m_round / mi_round
            );
        }
    }
    let pc = |peer| time_ratio("producer_consumer_64", "matrix", peer, ("", ""));
    if let (Some((s, s_round)), Some((mi, mi_round))) = (pc("system"), pc("mimalloc")) {
        println!(
            "producer/consumer: matrix / system = {s:.2} (per round {s_round:.2}), matrix / mimalloc = {mi:.2} (per round {mi_round:.2}) (time)"
        );
    }
    let exchange = ("/2_threads", "/2_processes");
    if let Some((r, r_round)) = time_ratio("cross_process_exchange", "matrix", "matrix", exchange) {
        println!(
            "cross-process: 2 processes reach {:.0}% of 2 threads' throughput (per round {:.0}%)",
            100.0 * r,
            100.0 * r_round
        );
    }
    for crash in PEER_CRASHES.lock().unwrap().iter() {
        println!("{crash}");
    }
    for w in ["mixed_32_544_live10k", "pair_64"] {
        let g = format!("peers_single_thread/{w}");
        if let Some((r, r_round)) = time_ratio(&g, "atomic-matrix", "matrix", ("", "")) {
            println!("{w:>22}: atomic-matrix / matrix = {r:.1}x (per round {r_round:.1}x) (time)");
        }
    }
    for n in [1, 2] {
        let g = "peers_small_objects_32_1024";
        if let Some((r, r_round)) = time_ratio(
            g,
            "rts-alloc",
            "matrix",
            (&format!("/{n}"), &format!("/{n}")),
        ) {
            println!(
                "small objects, {n} worker(s): rts-alloc / matrix = {r:.2} (per round {r_round:.2}) (time)"
            );
        }
    }
}

/// `a`'s time over `b`'s in `group` (with the benchmark id suffixes of
/// each): the ratio of their lowest round medians, and the median of the
/// rounds' own ratios (see `median_ratio`).
fn time_ratio(group: &str, a: &str, b: &str, suffix: (&str, &str)) -> Option<(f64, f64)> {
    let (ra, rb) = (
        round_medians(group, a, suffix.0),
        round_medians(group, b, suffix.1),
    );
    let best = |r: &[f64]| r.iter().copied().reduce(f64::min);
    Some((best(&ra)? / best(&rb)?, median_ratio(&ra, &rb)))
}

fn main() {
    if let Ok(spec) = std::env::var("MATRIX_BENCH_CHILD") {
        exchange_child(&spec);
        return;
    }
    if let Ok(spec) = std::env::var("MATRIX_BENCH_ISOLATED") {
        let [workload, id, round] = spec.split(' ').collect::<Vec<_>>()[..] else {
            panic!("MATRIX_BENCH_ISOLATED: {spec}");
        };
        let mut c = Criterion::default()
            .warm_up_time(common::WARM_UP)
            .measurement_time(common::MEASURE)
            .sample_size(20)
            .configure_from_args();
        let am = AtomicMatrixPeer::new(id, 256 << 20);
        single_thread(&mut c, &am, workload, round.parse().unwrap());
        if workload == "pair_64" {
            // Side by side in this process too, for the interleaved view.
            let m = Matrix::anonymous(64 << 20).expect("segment");
            let r = interleaved(|| timed_pairs(&am), || timed_pairs(&m));
            std::fs::write(interleaved_peer_file(round), r.to_string()).unwrap();
        }
        return;
    }
    let cpu = common::CpuTimes::now();
    let mut c = Criterion::default()
        .warm_up_time(common::WARM_UP)
        .measurement_time(common::MEASURE)
        .sample_size(20)
        .configure_from_args();
    let matrix = Matrix::create(1 << 30).expect("segment");
    let (system, mimalloc) = (Peer("system", System), Peer("mimalloc", mimalloc::MiMalloc));
    let all: [&(dyn BenchAlloc + Sync); 3] = [&matrix, &system, &mimalloc];
    thread_scaling(&mut c, &all);
    producer_consumer(&mut c, &all);
    cross_process(&mut c);
    peers(&mut c, &matrix);
    let global = GlobalMatrix::new(256 << 20);
    let mut views = interleaved_views(&all, &global);
    views.push(interleaved_cross_process());
    c.final_summary();
    print_ratios();
    println!();
    for line in views {
        println!("{line}");
    }
    let am: Vec<f64> = (0..ROUNDS)
        .filter_map(|r| std::fs::read_to_string(interleaved_peer_file(&r.to_string())).ok())
        .filter_map(|t| t.parse().ok())
        .collect();
    if !am.is_empty() {
        println!(
            "pair, {} child runs: atomic-matrix / matrix = {:.1}x (median of the runs' interleaved medians)",
            am.len(),
            median(am)
        );
    }
    if let Some(cpu) = cpu {
        println!("{}", cpu.steal_line());
    }
}
