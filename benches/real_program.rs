//! A real allocation-heavy program under three global allocators:
//! `MatrixGlobal`, `System` and mimalloc. The program builds and queries a
//! large map of strings, sorts, serializes to JSON and parses it back, on
//! one thread and then on two. Each run is a child process of this binary
//! (a binary has one global allocator; see `examples/support/chosen_alloc.rs`);
//! the allocators take turns, round after round, and the medians of wall
//! time and peak RSS (`wait4`'s `ru_maxrss`) are compared.
//!
//! `cargo bench --bench real_program`

#[path = "../examples/support/chosen_alloc.rs"]
mod chosen_alloc;

use chosen_alloc::{Chosen, Under};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: Chosen = Chosen::new();

const ROUNDS: usize = 7;
const KEYS: usize = 300_000;

fn main() {
    if std::env::args().any(|a| a == "--child") {
        return child();
    }
    let unders = [Under::System, Under::Mimalloc, Under::Matrix];
    let mut runs: Vec<Vec<(Duration, u64)>> = vec![Vec::new(); unders.len()];
    let mut checksums = Vec::new();
    for round in 0..ROUNDS {
        for k in 0..unders.len() {
            let i = (k + round) % unders.len();
            let (wall, rss, sum) = run_child(unders[i]);
            runs[i].push((wall, rss));
            checksums.push(sum);
        }
    }
    assert!(
        checksums.windows(2).all(|w| w[0] == w[1]),
        "results differ: {checksums:?}"
    );
    let median = |v: &Vec<(Duration, u64)>| {
        let mut walls: Vec<_> = v.iter().map(|r| r.0).collect();
        let mut rss: Vec<_> = v.iter().map(|r| r.1).collect();
        walls.sort();
        rss.sort();
        (walls[walls.len() / 2], rss[rss.len() / 2])
    };
    let med: Vec<_> = runs.iter().map(median).collect();
    println!("real program ({KEYS} keys; medians of {ROUNDS} runs each, interleaved)");
    println!(
        "{:<10} {:>12} {:>14}",
        "allocator", "wall ms", "peak RSS MiB"
    );
    for (u, (w, r)) in unders.iter().zip(&med) {
        println!(
            "{:<10} {:>12.1} {:>14.1}",
            u.name(),
            w.as_secs_f64() * 1e3,
            *r as f64 / 1024.0
        );
    }
    let (mw, mr) = med[2];
    for (u, (w, r)) in unders.iter().zip(&med).take(2) {
        println!(
            "matrix / {:<8}: wall time {:.2}x, peak RSS {:.2}x",
            u.name(),
            mw.as_secs_f64() / w.as_secs_f64(),
            mr as f64 / *r as f64
        );
    }
}

/// Runs the program in a child under `under`: (wall time, peak RSS in KiB,
/// the program's checksum).
// The child is reaped by `wait4` (for its rusage), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_child(under: Under) -> (Duration, u64, u64) {
    let start = Instant::now();
    let child = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .env(chosen_alloc::VAR, under.name())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    let mut status = 0;
    // SAFETY: plain out-parameters; `pid` is our child, reaped only here.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    assert!(
        r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{under:?} child failed"
    );
    let sum = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{under:?} child printed {out:?}"));
    (wall, usage.ru_maxrss as u64, sum)
}

fn child() {
    let one = program(0);
    let two: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (1..3).map(|t| s.spawn(move || program(t))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!("{}", one.wrapping_add(two));
}

/// The program: returns a checksum of its results.
fn program(seed: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Build a large map of strings.
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for _ in 0..KEYS {
        let k = format!("user-{:06}", next() % (KEYS as u64 / 4));
        let v = format!(
            "event-{}-{}",
            next() % 1000,
            "x".repeat((next() % 40) as usize)
        );
        map.entry(k).or_default().push(v);
    }
    // Query it.
    let mut hits = 0u64;
    for i in 0..KEYS / 2 {
        let k = format!("user-{:06}", (i * 7) % (KEYS / 4));
        if let Some(v) = map.get(&k) {
            hits += v.iter().filter(|e| e.len() > 20).count() as u64;
        }
    }
    // Sort.
    let mut rows: Vec<(String, usize)> = map.iter().map(|(k, v)| (k.clone(), v.len())).collect();
    rows.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    // Serialize and parse JSON.
    let doc: Value = rows
        .iter()
        .take(50_000)
        .map(|(k, n)| json!({ "key": k, "events": map[k], "count": n }))
        .collect();
    let text = serde_json::to_string(&doc).unwrap();
    let back: Value = serde_json::from_str(&text).unwrap();
    let parsed = back.as_array().unwrap().len() as u64;
    hits + parsed + text.len() as u64
}
