//! Handing a map to another process (issue 20): through a pinned segment,
//! where the other process uses the map where it lies, against serialising
//! it through a pipe (bincode and serde_json), as processes without shared
//! memory must; and lookups from a second process in the shared map
//! against the same lookups in the process that built it.
//!
//! Dimensions: way of handing over (segment / bincode pipe / JSON pipe) ×
//! where lookups run (this process / another one). 1,000,000 entries
//! `u64` → `[u8; 32]`.
//!
//! Each hand-over is timed from the producer's first insert to the
//! consumer's exit after it has checked every entry, so both sides pay the
//! same process start; the pipe ways build a std `HashMap` (with the same
//! fixed hasher), the segment way builds its map in the segment. `RUNS`
//! runs of each, alternating; the figure is the median, with the spread.
//!
//! Run: `cargo bench --bench sharing`

mod common;

use allocator_api2::alloc::Allocator;
use hashbrown::HashMap;
use matrix_alloc::{FixedState, Matrix, PinnedAlloc, ShmMutex};
use std::io::{BufReader, BufWriter, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ENTRIES: u64 = 1_000_000;
const RUNS: usize = 7;
const LOOKUPS: u64 = 2_000_000;

type SharedMap = ShmMutex<HashMap<u64, [u8; 32], FixedState, PinnedAlloc>>;

fn value(k: u64) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..8].copy_from_slice(&k.to_le_bytes());
    v[31] = k as u8;
    v
}

/// Checks every entry of a map that came from the producer.
fn verify<A: Allocator>(map: &HashMap<u64, [u8; 32], FixedState, A>) {
    assert_eq!(map.len() as u64, ENTRIES);
    for k in 0..ENTRIES {
        assert_eq!(map.get(&k), Some(&value(k)), "entry {k}");
    }
}

/// `LOOKUPS` pseudo-random lookups; returns a checksum (and so keeps them).
fn lookups<A: Allocator>(map: &HashMap<u64, [u8; 32], FixedState, A>) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut sum = 0u64;
    for _ in 0..LOOKUPS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sum = sum.wrapping_add(map.get(&(x % ENTRIES)).map_or(0, |v| v[31] as u64));
    }
    sum
}

fn child(role: &str, arg: &str) {
    match role {
        "segment" => {
            let m = Matrix::open(arg.parse().unwrap()).unwrap();
            let h = m.lookup::<SharedMap>("map").unwrap().unwrap();
            verify(&m.get(h).unwrap().lock(&m).unwrap());
        }
        "lookups" => {
            let m = Matrix::open(arg.parse().unwrap()).unwrap();
            let h = m.lookup::<SharedMap>("map").unwrap().unwrap();
            let map = m.get(h).unwrap().lock(&m).unwrap();
            let start = Instant::now();
            let sum = lookups(&map);
            println!("{} {sum}", start.elapsed().as_nanos());
        }
        "bincode" | "json" => {
            let mut input = BufReader::new(std::io::stdin().lock());
            let map: std::collections::HashMap<u64, [u8; 32], FixedState> = if role == "bincode" {
                bincode::deserialize_from(&mut input).unwrap()
            } else {
                let mut text = String::new();
                input.read_to_string(&mut text).unwrap();
                serde_json::from_str(&text).unwrap()
            };
            assert_eq!(map.len() as u64, ENTRIES);
            for k in 0..ENTRIES {
                assert_eq!(map.get(&k), Some(&value(k)));
            }
        }
        other => panic!("unknown role {other}"),
    }
}

fn spawn(role: &str, arg: &str, stdin: Stdio) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--child", role, arg])
        .stdin(stdin)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Builds the map in a pinned segment, publishes it, and waits until a
/// child has looked it up and checked every entry.
fn through_segment() -> Duration {
    let m = Matrix::create_pinned(512 << 20).unwrap();
    let start = Instant::now();
    let mut map = HashMap::with_hasher_in(FixedState::default(), m.pinned_alloc().unwrap());
    for k in 0..ENTRIES {
        map.insert(k, value(k));
    }
    let h = m.alloc_value(ShmMutex::new(map)).unwrap();
    m.publish("map", h).unwrap();
    let status = spawn("segment", &m.id().to_string(), Stdio::null())
        .wait()
        .unwrap();
    let took = start.elapsed();
    assert!(status.success());
    // SAFETY: the child has exited.
    unsafe { m.free_value(h) }.unwrap();
    took
}

/// Builds a std map, serialises it into a pipe to a child that rebuilds
/// and checks it.
fn through_pipe(json: bool) -> Duration {
    let start = Instant::now();
    let mut map = std::collections::HashMap::with_hasher(FixedState::default());
    for k in 0..ENTRIES {
        map.insert(k, value(k));
    }
    let mut c = spawn(if json { "json" } else { "bincode" }, "-", Stdio::piped());
    {
        let mut out = BufWriter::new(c.stdin.take().unwrap());
        if json {
            serde_json::to_writer(&mut out, &map).unwrap();
        } else {
            bincode::serialize_into(&mut out, &map).unwrap();
        }
        out.flush().unwrap();
    }
    let status = c.wait().unwrap();
    let took = start.elapsed();
    assert!(status.success());
    took
}

/// Lookups in this process and in another one, in the same shared map.
fn lookups_here_and_there() -> (Duration, Duration) {
    let m = Matrix::create_pinned(512 << 20).unwrap();
    let mut map = HashMap::with_hasher_in(FixedState::default(), m.pinned_alloc().unwrap());
    for k in 0..ENTRIES {
        map.insert(k, value(k));
    }
    let h = m.alloc_value(ShmMutex::new(map)).unwrap();
    m.publish("map", h).unwrap();
    let (here, sum) = {
        let map = m.get(h).unwrap().lock(&m).unwrap();
        let start = Instant::now();
        let sum = lookups(&map);
        (start.elapsed(), sum)
    };
    let out = spawn("lookups", &m.id().to_string(), Stdio::null())
        .wait_with_output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut words = text.split_whitespace();
    let there = Duration::from_nanos(words.next().unwrap().parse().unwrap());
    assert_eq!(words.next().unwrap().parse::<u64>().unwrap(), sum);
    // SAFETY: the child has exited.
    unsafe { m.free_value(h) }.unwrap();
    (here, there)
}

fn summary(name: &str, runs: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = runs.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    println!(
        "{name:>34}: median {median:8.1} ms (runs {:.1} to {:.1})",
        ms[0],
        ms[ms.len() - 1]
    );
    median
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        return child(&args[at + 1], &args[at + 2]);
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there is none.
    }
    let cpu = common::CpuTimes::now();
    let (mut seg, mut bin, mut json, mut here, mut there) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        seg.push(through_segment());
        bin.push(through_pipe(false));
        json.push(through_pipe(true));
        let (h, t) = lookups_here_and_there();
        here.push(h);
        there.push(t);
    }
    println!("handing {ENTRIES} entries to another process, build to checked ({RUNS} runs each):");
    let s = summary("pinned segment, used in place", &seg);
    let b = summary("bincode through a pipe", &bin);
    let j = summary("serde_json through a pipe", &json);
    println!(
        "ratios: segment / bincode {:.2}, segment / json {:.2}",
        s / b,
        s / j
    );
    println!("\n{LOOKUPS} lookups in the shared map:");
    let h = summary("in the process that built it", &here);
    let t = summary("in another process", &there);
    println!("ratio: another process / the same one {:.2}", t / h);
    if let Some(cpu) = cpu {
        println!("{}", cpu.steal_line());
    }
}
