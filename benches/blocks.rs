//! The blocks front end (issue 21): allocate + write 64 bytes + read them
//! back + free, per operation, on one task and on 64 tasks of tokio's
//! multi-threaded runtime, against the same work with a `Vec<u8>` under the
//! system allocator and under mimalloc; and how long a waiter takes to wake
//! after a free in another process.
//!
//! The ratios are interleaved: the median, over alternating runs, of the
//! blocks' time over the peer's. Latency: the waiter's wake-up time minus
//! the freer's time just before its free, both from `CLOCK_MONOTONIC`.
//!
//! Run: `cargo bench --bench blocks`

mod common;

use common::Mi;

use allocator_api2::alloc::{Allocator, Global};
use allocator_api2::vec::Vec as AVec;
use matrix_alloc::blocks::{BlockId, Blocks, BlocksConfig};
use matrix_alloc::Matrix;
use std::alloc::Layout;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const OPS: usize = 200_000;
const TASKS: usize = 64;
const ALTERNATIONS: usize = 11;
const WAKES: usize = 200;

fn vec_ops<A: Allocator + Copy>(a: A, ops: usize) {
    let data = [7u8; 64];
    let mut out = [0u8; 64];
    for _ in 0..ops {
        let mut v = AVec::with_capacity_in(64, a);
        v.extend_from_slice(&data);
        out.copy_from_slice(std::hint::black_box(&v[..]));
        drop(v);
    }
    std::hint::black_box(out);
}

async fn block_ops(blocks: &Blocks, ops: usize) {
    let layout = Layout::from_size_align(64, 8).unwrap();
    let data = [7u8; 64];
    let mut out = [0u8; 64];
    for _ in 0..ops {
        let b = blocks.allocate(layout).await.unwrap();
        b.write(0, &data).unwrap();
        b.read_into(0, &mut out).unwrap();
        blocks.deallocate(b).unwrap();
    }
    std::hint::black_box(out);
}

fn on_tasks(
    rt: &tokio::runtime::Runtime,
    job: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> Duration {
    common::timed(|| {
        rt.block_on(async {
            let tasks: Vec<_> = (0..TASKS).map(|_| tokio::spawn(job())).collect();
            for t in tasks {
                t.await.unwrap();
            }
        })
    })
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn wake_config() -> BlocksConfig {
    BlocksConfig {
        max_memory: 64 << 10,
        max_block_size: 64 << 10,
        ..BlocksConfig::default()
    }
}

/// The freer: frees each id it is sent after a pause, printing the time
/// just before the free.
fn freer(id: uuid::Uuid) {
    let blocks = Blocks::new(Matrix::open(id).unwrap(), wake_config()).unwrap();
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let w: Vec<u64> = line
            .unwrap()
            .split(' ')
            .map(|s| s.parse().unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(2));
        let t = now_ns();
        blocks.free_id(BlockId::from_raw([w[0], w[1]])).unwrap();
        writeln!(out, "{t}").unwrap();
        out.flush().unwrap();
    }
}

fn wake_latency() -> (f64, f64) {
    let m = Matrix::create(16 << 20).unwrap();
    let id = m.id();
    let blocks = Blocks::new(m, wake_config()).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--freer", &id.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = child.stdin.take().unwrap();
    let mut from = BufReader::new(child.stdout.take().unwrap());
    let small = Layout::from_size_align(1024, 8).unwrap();
    let mut lat = Vec::with_capacity(WAKES);
    for _ in 0..WAKES {
        let hog = blocks
            .try_allocate(Layout::from_size_align(64 << 10, 8).unwrap())
            .unwrap();
        let [a, b] = hog.id().to_raw();
        writeln!(to, "{a} {b}").unwrap();
        to.flush().unwrap();
        let got = pollster::block_on(blocks.allocate(small)).unwrap();
        let woke = now_ns();
        let mut line = String::new();
        from.read_line(&mut line).unwrap();
        let freed: u64 = line.trim().parse().unwrap();
        lat.push(woke.saturating_sub(freed) as f64 / 1000.0);
        blocks.deallocate(got).unwrap();
    }
    drop(to);
    child.wait().unwrap();
    lat.sort_by(f64::total_cmp);
    (common::median(lat.clone()), lat[lat.len() * 99 / 100])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--freer") {
        return freer(args[at + 1].parse().unwrap());
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let cpu = common::CpuTimes::now();
    let blocks = Blocks::new(
        Matrix::anonymous(256 << 20).unwrap(),
        BlocksConfig::default(),
    )
    .unwrap();

    // One task.
    let per_op = |d: Duration| d.as_nanos() as f64 / OPS as f64;
    let (mut t_blocks, mut t_sys, mut t_mi) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ALTERNATIONS {
        t_blocks.push(per_op(common::timed(|| {
            pollster::block_on(block_ops(&blocks, OPS))
        })));
        t_sys.push(per_op(common::timed(|| vec_ops(Global, OPS))));
        t_mi.push(per_op(common::timed(|| vec_ops(Mi, OPS))));
    }
    println!(
        "one task, ns per op (allocate + write 64 B + read + free), median of {ALTERNATIONS}:"
    );
    println!(
        "  blocks {:.1}, Vec<u8> system {:.1}, Vec<u8> mimalloc {:.1}",
        common::median(t_blocks.clone()),
        common::median(t_sys.clone()),
        common::median(t_mi.clone())
    );
    println!(
        "  ratios (interleaved): blocks/system {:.2}, blocks/mimalloc {:.2}",
        common::median_ratio(&t_blocks, &t_sys),
        common::median_ratio(&t_blocks, &t_mi)
    );

    // Many tasks.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let per = OPS / TASKS;
    let (mut m_blocks, mut m_sys, mut m_mi) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ALTERNATIONS {
        m_blocks.push(
            on_tasks(&rt, || {
                let b = blocks.clone();
                Box::pin(async move { block_ops(&b, per).await })
            })
            .as_nanos() as f64
                / OPS as f64,
        );
        m_sys.push(
            on_tasks(&rt, || Box::pin(async move { vec_ops(Global, per) })).as_nanos() as f64
                / OPS as f64,
        );
        m_mi.push(
            on_tasks(&rt, || Box::pin(async move { vec_ops(Mi, per) })).as_nanos() as f64
                / OPS as f64,
        );
    }
    println!("{TASKS} tasks on 2 tokio workers, wall ns per op, median of {ALTERNATIONS}:");
    println!(
        "  blocks {:.1}, Vec<u8> system {:.1}, Vec<u8> mimalloc {:.1}",
        common::median(m_blocks.clone()),
        common::median(m_sys.clone()),
        common::median(m_mi.clone())
    );
    println!(
        "  ratios (interleaved): blocks/system {:.2}, blocks/mimalloc {:.2}",
        common::median_ratio(&m_blocks, &m_sys),
        common::median_ratio(&m_blocks, &m_mi)
    );

    let (median, p99) = wake_latency();
    println!("a waiter woken by a free in another process, {WAKES} wakes: median {median:.0} µs, 99th percentile {p99:.0} µs");
    if let Some(cpu) = cpu {
        println!("{}", cpu.steal_line());
    }
}
