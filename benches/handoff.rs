//! Blocks handed from a producer to a consumer that frees them (issue 22,
//! target 2): between two processes through a named segment, against the
//! same hand-over between two threads of one process with `System`,
//! mimalloc and the matrix.
//!
//! Dimensions: block size (4 KiB, 64 KiB) × way (matrix between processes
//! / matrix between threads / `System` between threads / mimalloc between
//! threads). The producer allocates `BLOCKS` blocks, writes their first and
//! last byte, and pushes each through a bounded single-producer
//! single-consumer ring of `RING` slots (offsets in the segment, pointers
//! between threads); the consumer checks both bytes and frees the block.
//! The time runs from the producer's first allocation until the consumer
//! has freed the last block; a child process is started and has opened the
//! segment before the clock starts. `RUNS` runs of each, alternating; the
//! figure is the median, with the spread, and the ratios of the medians.
//!
//! Run: `cargo bench --bench handoff`

mod common;

use common::{BenchAlloc, Peer};
use matrix_alloc::{Matrix, Offset};
use std::alloc::Layout;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

const BLOCKS: u64 = 200_000;
const RING: usize = 1024;
const RUNS: usize = 7;
const SEGMENT: usize = 1 << 30;

/// The ring: `head` counts pushes (written by the producer), `tail` pops
/// (by the consumer); slot `i % RING` holds push `i` while
/// `tail <= i < head`. Release on each counter publishes the slot writes
/// before it; Acquire on the other side's counter sees them.
#[repr(C)]
struct Ring {
    ready: AtomicU64,
    head: AtomicU64,
    tail: AtomicU64,
    slots: [AtomicU64; RING],
}

impl Ring {
    fn new() -> Ring {
        Ring {
            ready: AtomicU64::new(0),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            slots: [const { AtomicU64::new(0) }; RING],
        }
    }

    fn push(&self, v: u64) {
        let head = self.head.load(Relaxed);
        wait_until(|| head - self.tail.load(Acquire) < RING as u64);
        self.slots[head as usize % RING].store(v, Relaxed);
        self.head.store(head + 1, Release);
    }

    fn pop(&self) -> u64 {
        let tail = self.tail.load(Relaxed);
        wait_until(|| self.head.load(Acquire) > tail);
        let v = self.slots[tail as usize % RING].load(Relaxed);
        self.tail.store(tail + 1, Release);
        v
    }
}

/// Spins, then yields (the two sides may share one core).
fn wait_until(cond: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !cond() {
        if spins < 100 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

fn mark(i: u64) -> u8 {
    (i % 251) as u8
}

/// Allocates `BLOCKS` blocks of `size` bytes, marks their first and last
/// byte, and pushes what `to_word` makes of each pointer.
fn produce(a: &dyn BenchAlloc, size: usize, ring: &Ring, to_word: impl Fn(*mut u8) -> u64) {
    let layout = Layout::from_size_align(size, 8).unwrap();
    for i in 0..BLOCKS {
        let p = a.alloc(layout);
        assert!(!p.is_null(), "{}: out of memory", a.name());
        // SAFETY: a fresh block of `size` bytes.
        unsafe {
            p.write(mark(i));
            p.add(size - 1).write(mark(i));
        }
        ring.push(to_word(p));
    }
}

/// Pops `BLOCKS` blocks, checks their marks and frees them.
fn consume(a: &dyn BenchAlloc, size: usize, ring: &Ring, to_ptr: impl Fn(u64) -> *mut u8) {
    let layout = Layout::from_size_align(size, 8).unwrap();
    for i in 0..BLOCKS {
        let p = to_ptr(ring.pop());
        // SAFETY: the producer handed over this live block of `size` bytes
        // and no longer touches it.
        unsafe {
            assert_eq!((p.read(), p.add(size - 1).read()), (mark(i), mark(i)));
            a.free(p, layout);
        }
    }
}

/// Producer and consumer on two threads of this process.
fn between_threads(a: &(dyn BenchAlloc + Sync), size: usize) -> Duration {
    let ring = Ring::new();
    std::thread::scope(|s| {
        let consumer = s.spawn(|| {
            ring.ready.store(1, Release);
            consume(a, size, &ring, |w| w as *mut u8);
        });
        wait_until(|| ring.ready.load(Acquire) == 1);
        let start = Instant::now();
        produce(a, size, &ring, |p| p as u64);
        consumer.join().unwrap();
        start.elapsed()
    })
}

/// The consumer in a child process that opens the segment by its id.
fn between_processes(size: usize) -> Duration {
    let m = Matrix::create(SEGMENT).unwrap();
    let ring_ptr = m.alloc(Layout::new::<Ring>()).unwrap().cast::<Ring>();
    // SAFETY: a fresh block large and aligned enough for a `Ring`.
    unsafe { ring_ptr.as_ptr().write(Ring::new()) };
    // SAFETY: initialised above; it stays live until the end of this function.
    let ring = unsafe { ring_ptr.as_ref() };
    let at = m.offset_of(ring_ptr.as_ptr()).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--child", &m.id().to_string(), &at.get().to_string()])
        .arg(size.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(|| ring.ready.load(Acquire) == 1);
    let start = Instant::now();
    produce(&m, size, ring, |p| m.offset_of(p).unwrap().get());
    wait_until(|| ring.tail.load(Acquire) == BLOCKS);
    let took = start.elapsed();
    assert!(child.wait().unwrap().success());
    // SAFETY: the child has exited; nothing else uses the ring.
    unsafe { m.free(ring_ptr.cast()).unwrap() };
    took
}

/// The child's side of `between_processes`.
fn child(id: &str, ring_at: &str, size: &str) {
    let m = Matrix::open(id.parse().unwrap()).unwrap();
    let ring = m.resolve::<Ring>(Offset(ring_at.parse().unwrap())).unwrap();
    // SAFETY: the parent initialised the ring there and keeps it live until
    // this process has exited.
    let ring = unsafe { ring.as_ref() };
    ring.ready.store(1, Release);
    let size = size.parse().unwrap();
    consume(&m, size, ring, |w| {
        m.resolve::<u8>(Offset(w)).unwrap().as_ptr()
    });
}

fn median_ms(runs: &[Duration]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = runs.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0], ms[ms.len() - 1])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        return child(&args[at + 1], &args[at + 2], &args[at + 3]);
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there is none.
    }
    let cpu = common::CpuTimes::now();
    let matrix = Matrix::anonymous(SEGMENT).unwrap();
    let system = Peer("System", std::alloc::System);
    let mimalloc = Peer("mimalloc", mimalloc::MiMalloc);
    println!("{BLOCKS} blocks handed from a producer to a consumer that frees them ({RUNS} runs):");
    for size in [4 << 10, 64 << 10] {
        let mut times: [Vec<Duration>; 4] = Default::default();
        for _ in 0..RUNS {
            times[0].push(between_processes(size));
            times[1].push(between_threads(&matrix, size));
            times[2].push(between_threads(&system, size));
            times[3].push(between_threads(&mimalloc, size));
        }
        let names = [
            "matrix, two processes",
            "matrix, two threads",
            "System, two threads",
            "mimalloc, two threads",
        ];
        let medians: Vec<f64> = times
            .iter()
            .zip(names)
            .map(|(t, name)| {
                let (median, lo, hi) = median_ms(t);
                println!(
                    "{:>6} KiB, {name:>22}: median {median:7.1} ms, {:5.2} M blocks/s (runs {lo:.1} to {hi:.1})",
                    size >> 10,
                    BLOCKS as f64 / median / 1e3
                );
                median
            })
            .collect();
        println!(
            "{:>6} KiB, time ratios: matrix two processes / System two threads {:.2}, / mimalloc two threads {:.2}; matrix two threads / System {:.2}, / mimalloc {:.2}",
            size >> 10,
            medians[0] / medians[2],
            medians[0] / medians[3],
            medians[1] / medians[2],
            medians[1] / medians[3]
        );
    }
    if let Some(cpu) = cpu {
        println!("{}", cpu.steal_line());
    }
}
