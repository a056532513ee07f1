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
