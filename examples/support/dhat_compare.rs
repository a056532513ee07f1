#![allow(dead_code)] // each includer uses part of it
//! The dhat comparison: a workload measured in child processes of the
//! running binary, one under `dhat::Alloc` and others under `MatrixGlobal`
//! with batched or exact counts (see `chosen_alloc`). Each child also
//! writes a dhat-format profile.

use super::chosen_alloc::{self, Chosen, Under};
use super::workload;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// dhat's six `HeapStats` numbers, in this order.
pub const NAMES: [&str; 6] = [
    "total_blocks",
    "total_bytes",
    "curr_blocks",
    "curr_bytes",
    "max_blocks",
    "max_bytes",
];

/// The keys of those numbers in a dhat profile's program points (`gb`/`gbk`,
/// at the global peak, sum to `max_*` over the points).
const PROFILE_KEYS: [&str; 6] = ["tbk", "tb", "ebk", "eb", "gbk", "gb"];

/// What a child measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// The six numbers of `NAMES`.
    pub requested: [u64; 6],
    /// Peak heap bytes the matrix had to provide during the workload
    /// (blocks with their headers, and the small-object pages); 0 for dhat.
    pub provided: u64,
}

impl Counts {
    fn line(&self) -> String {
        let all: Vec<String> = self
            .requested
            .iter()
            .chain([&self.provided])
            .map(u64::to_string)
            .collect();
        format!("counts {}", all.join(" "))
    }

    fn parse(out: &str) -> Option<Counts> {
        let line = out.lines().find_map(|l| l.strip_prefix("counts "))?;
        let v: Vec<u64> = line
            .split(' ')
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        Some(Counts {
            requested: v.get(..6)?.try_into().ok()?,
            provided: *v.get(6)?,
        })
    }

    /// The six numbers of a dhat-format profile, summed over its program points.
    pub fn from_profile(json: &serde_json::Value) -> Option<[u64; 6]> {
        let pps = json["pps"].as_array()?;
        let mut out = [0; 6];
        for (slot, key) in out.iter_mut().zip(PROFILE_KEYS) {
            *slot = pps.iter().map(|pp| pp[key].as_u64()).sum::<Option<u64>>()?;
        }
        Some(out)
    }

    pub fn max_bytes(&self) -> u64 {
        self.requested[5]
    }
}

/// A workload and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// `workload::run` over this many words, on one thread.
    Words(usize),
    /// `workload::run_threads` with this many blocks per thread.
    Threads(usize),
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Words(_) => "words",
            Workload::Threads(_) => "threads",
        }
    }

    fn size(self) -> usize {
        match self {
            Workload::Words(n) | Workload::Threads(n) => n,
        }
    }

    fn parse(name: &str, size: usize) -> Option<Workload> {
        match name {
            "words" => Some(Workload::Words(size)),
            "threads" => Some(Workload::Threads(size)),
            _ => None,
        }
    }

    /// Runs it; what it returns stays live until the counts are taken.
    fn run(self) -> Vec<Vec<u8>> {
        match self {
            Workload::Words(n) => workload::run(n)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
            Workload::Threads(n) => workload::run_threads(n),
        }
    }
}

/// The profile file a child writes into `dir`.
pub fn profile_path(dir: &Path, under: Under, work: Workload) -> PathBuf {
    dir.join(format!("{}-{}-heap.json", under.name(), work.name()))
}

/// In a child: runs the workload under this process's allocator, prints
/// its counts and writes the profile into `dir`.
pub fn child(alloc: &Chosen, work: Workload, dir: &Path) {
    let under = alloc.under();
    let path = profile_path(dir, under, work);
    let counts = match under.matrix() {
        None if under == Under::Dhat => {
            let profiler = dhat::Profiler::builder().file_name(&path).build();
            let report = work.run();
            let s = dhat::HeapStats::get();
            // The profile is written with the report still live, so that
            // its end state is the one measured.
            drop(profiler);
            drop(report);
            Counts {
                requested: [
                    s.total_blocks,
                    s.total_bytes,
                    s.curr_blocks as u64,
                    s.curr_bytes as u64,
                    s.max_blocks as u64,
                    s.max_bytes as u64,
                ],
                provided: 0,
            }
        }
        Some(global) => {
            let m = global.matrix().expect("the segment is mapped");
            let base = m.reset_peak();
            let start = Instant::now();
            let report = work.run();
            let after = m.stats();
            let elapsed = start.elapsed();
            let s = after.since(&base);
            let json = s.to_dhat_json(elapsed, "matrix-alloc: the workload");
            std::fs::write(&path, json).expect("profile written");
            drop(report);
            Counts {
                requested: [
                    s.total_blocks,
                    s.total_bytes,
                    s.curr_blocks,
                    s.curr_bytes,
                    s.max_blocks,
                    s.max_bytes,
                ],
                provided: after.max_block_bytes - base.block_bytes,
            }
        }
        None => panic!("the child runs under dhat or the matrix, not {under:?}"),
    };
    println!("{}", counts.line());
}

/// Runs this binary as a child under `under`; its counts.
pub fn spawn(under: Under, work: Workload, dir: &Path) -> Counts {
    let out = Command::new(std::env::current_exe().expect("own path"))
        .arg("--child")
        .arg(dir)
        .arg(work.name())
        .arg(work.size().to_string())
        .env(chosen_alloc::VAR, under.name())
        .output()
        .expect("child started");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} child failed: {}\n{}",
        under.name(),
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    Counts::parse(&stdout).unwrap_or_else(|| panic!("no counts in {stdout}"))
}

/// `Some((dir, workload))` when this process is a child.
pub fn child_args() -> Option<(PathBuf, Workload)> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == "--child")?;
    let work = Workload::parse(args.get(at + 2)?, args.get(at + 3)?.parse().ok()?)?;
    Some((args.get(at + 1)?.into(), work))
}

/// How far batched counts may be from dhat's on `work`: nothing on one
/// thread, and for `T` threads the bound of `matrix_alloc::PENDING_BYTES`
/// (see `Counters::flush`), on `max_bytes` only; the other five numbers
/// are exact once every thread has applied its counts.
pub fn batched_bound(work: Workload) -> u64 {
    match work {
        Workload::Words(_) => 0,
        Workload::Threads(_) => 2 * (workload::THREADS as u64 + 1) * matrix_alloc::PENDING_BYTES,
    }
}

/// Whether batched counts `matrix` are as close to dhat's as `work` allows.
pub fn within_bound(dhat: &Counts, matrix: &Counts, work: Workload) -> bool {
    let (d, m) = (dhat.requested, matrix.requested);
    d[..4] == m[..4]
        && d[5].abs_diff(m[5]) <= batched_bound(work)
        && (batched_bound(work) != 0 || d[4] == m[4])
}
