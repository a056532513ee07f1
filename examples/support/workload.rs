//! One deterministic, allocation-heavy workload: the same requests in the
//! same order on every run and under every allocator (no random hashing,
//! no dependence on addresses), so that dhat and the matrix must count
//! exactly the same numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A small xorshift generator with a fixed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Word counts over generated text, sorted and formatted; buffers of many
/// sizes (up to 2 MiB) freed in a scattered order; a growing report.
/// Returns the report, still live, so that the end state is not empty.
pub fn run(words: usize) -> Vec<String> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let text: Vec<String> = (0..words)
        .map(|_| format!("w{}", rng.next() % (words as u64 / 8 + 1)))
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for w in &text {
        *counts.entry(w.as_str()).or_default() += 1;
    }
    let mut ranked: Vec<(usize, String)> =
        counts.iter().map(|(w, n)| (*n, w.to_string())).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));

    let mut buffers: Vec<Option<Vec<u8>>> = (0..2_000)
        .map(|i| {
            let size = match i % 50 {
                0 => 2 << 20,
                1..=4 => 64 << 10,
                _ => (rng.next() % 1_500) as usize + 1,
            };
            Some(vec![i as u8; size])
        })
        .collect();
    for i in (0..buffers.len()).step_by(3) {
        buffers[i] = None;
    }
    let mut json = String::from("[");
    for (n, w) in ranked.iter().take(1_000) {
        let _ = write!(json, "{{\"word\":\"{w}\",\"count\":{n}}},");
    }
    json.push(']');

    let mut report: Vec<String> = Vec::new();
    for chunk in ranked.chunks(64) {
        report.push(
            chunk
                .iter()
                .map(|(n, w)| format!("{w}={n}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    report.push(json);
    report.push(format!(
        "{}",
        buffers.iter().flatten().map(Vec::len).sum::<usize>()
    ));
    report
}

/// Worker threads of `run_threads`.
pub const THREADS: usize = 4;

/// A multi-threaded workload whose six dhat numbers do not depend on how
/// the threads interleave: threads allocate blocks of many sizes, hand half
/// of them to the next thread, which frees them, then take turns at a burst
/// each (a peak per thread, each at its own time, the last the highest)
/// while the others hold what they kept, and grow and shrink buffers side
/// by side. Only the bursts reach the peak, each made by one thread while
/// the others wait, so the peak's bytes and blocks are the same in every
/// run; everything done side by side stays well below it. Returns the
/// blocks the threads kept, still live.
pub fn run_threads(blocks: usize) -> Vec<Vec<u8>> {
    use std::sync::{Barrier, Mutex};
    let barrier = Barrier::new(THREADS);
    let mailboxes: Vec<Mutex<Vec<Vec<u8>>>> = (0..THREADS)
        .map(|_| Mutex::new(Vec::with_capacity(blocks)))
        .collect();
    // Made before the threads start, so that the main thread allocates
    // nothing while they run (its allocations would race the bursts).
    let mut kept: Vec<Vec<Vec<u8>>> = Vec::with_capacity(THREADS);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (barrier, mailboxes) = (&barrier, &mailboxes);
                s.spawn(move || worker(t, blocks, barrier, mailboxes))
            })
            .collect();
        kept.extend(workers.into_iter().map(|w| w.join().unwrap()));
    });
    kept.into_iter().flatten().collect()
}

fn worker(
    t: usize,
    blocks: usize,
    barrier: &std::sync::Barrier,
    mailboxes: &[std::sync::Mutex<Vec<Vec<u8>>>],
) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1) << 32);
    let mut mine: Vec<Vec<u8>> = (0..blocks)
        .map(|i| {
            let size = match rng.next() % 50 {
                0 => 64 << 10,
                _ => (rng.next() % 1_500) as usize + 1,
            };
            vec![(t + i) as u8; size]
        })
        .collect();
    barrier.wait();
    // Half to the next thread, which frees them.
    let given = mine.split_off(blocks / 2);
    mailboxes[(t + 1) % THREADS].lock().unwrap().extend(given);
    barrier.wait();
    let received = std::mem::take(&mut *mailboxes[t].lock().unwrap());
    let from = (t + THREADS - 1) % THREADS;
    for (i, block) in received.iter().enumerate() {
        let first = (from + blocks / 2 + i) as u8;
        assert!(block.iter().all(|&b| b == first), "a handed block changed");
    }
    drop(received);
    for i in (0..mine.len()).step_by(3) {
        mine[i] = Vec::new();
    }
    // Bursts, one thread at a time: up, then down.
    for turn in 0..THREADS {
        barrier.wait();
        if turn == t {
            // Larger than all the threads' first blocks together, so that
            // the last burst, not that side-by-side phase, is the peak.
            let burst: Vec<Vec<u8>> = (0..(t + 2) * blocks / 2)
                .map(|i| vec![i as u8; (rng.next() % 8_000) as usize + 1])
                .chain([vec![t as u8; (t + 1) << 20]])
                .collect();
            barrier.wait();
            drop(burst);
        } else {
            barrier.wait();
        }
    }
    barrier.wait();
    // Side by side, well below the peak: a buffer grown by pushes (each
    // growth a reallocation), then shrunk and freed.
    let mut grown: Vec<u64> = Vec::new();
    for i in 0..(32 << 10) {
        grown.push(i);
    }
    grown.truncate(1_000);
    grown.shrink_to_fit();
    assert_eq!(grown.iter().sum::<u64>(), 999 * 1_000 / 2);
    drop(grown);
    mine.retain(|b| !b.is_empty());
    mine
}
