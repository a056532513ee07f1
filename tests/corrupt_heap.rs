//! Heap fuzzing (issue 23): 1–16 random bytes written over one to three
//! places of a file segment's control block, node table and heap
//! (small-object pages, block headers and footers, cache records; a third
//! of them at page headers, a third at the start of a granule), then `open_file`, `check()` and `stats()`. They
//! may report the damage with a typed error, but nothing may crash, panic
//! or hang: `check()` is what people run when something is wrong.
//!
//! A crash (SIGSEGV) cannot be caught inside the process, so the cases run
//! in child processes (this test binary again, `--exact child_cases`), a
//! batch each; a child prints each case's number before it runs it, and a
//! watchdog kills a child that prints nothing for `WATCHDOG`. A child that
//! dies names the case that killed it. The default run tries `CASES`
//! cases; `cargo test --release --test corrupt_heap -- --ignored` tries
//! `LONG_CASES`.

// Test code: the only unsafe calls free blocks this test allocated.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use matrix_alloc::Matrix;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SIZE: usize = 4 << 20;
/// The small-object page size.
const PAGE: u64 = 16 << 10;
const CASES: u64 = 3_000;
const LONG_CASES: u64 = 60_000;
const BATCH: u64 = 1_000;
const WATCHDOG: Duration = Duration::from_secs(10);

/// Builds the segment every case starts from: small blocks in pages of
/// several classes, medium blocks of 1 - 2 KiB in medium pages, engine
/// blocks of tens of KiB,
/// a quarter of them freed (into pages, block caches and the free lists).
/// Returns the bytes up to which the segment holds anything (the rest is
/// one free block).
fn template(path: &Path) -> u64 {
    let m = Matrix::create_file(path, SIZE).unwrap();
    let base = m
        .offset_of(m.alloc(layout(8, 8)).unwrap().as_ptr())
        .unwrap()
        .get();
    let mut live = Vec::new();
    let mut end = base;
    let mut rng = SmallRng::seed_from_u64(23);
    for i in 0..90 {
        let size = match i % 6 {
            0..=3 => [16, 48, 100, 256, 1000][rng.gen_range(0..5)],
            4 => rng.gen_range(1025..=2048),
            _ => rng.gen_range(33_000..=36_000),
        };
        let p = m.alloc(layout(size, 8)).unwrap();
        end = end.max(m.offset_of(p.as_ptr()).unwrap().get() + size as u64);
        live.push(p);
    }
    for (i, p) in live.into_iter().enumerate() {
        if i % 4 == 1 {
            unsafe { m.free(p).unwrap() };
        }
    }
    assert!(m.stats().cached_bytes > 0, "the template has cached blocks");
    // Left attached, as a process that is still running: its pages stay
    // owned and its block cache's record and blocks stay in the segment,
    // for the cases to damage.
    std::mem::forget(m);
    end + 4096
}

/// Runs the cases `first..last` on copies of a template segment, printing
/// each case's number before it runs it.
fn run_cases(first: u64, last: u64) {
    let dir = TempDir::new("corrupt-heap");
    let template_path = dir.path("template");
    let end = template(&template_path);
    let original = std::fs::read(&template_path).unwrap();
    let path = dir.path("case");
    for case in first..last {
        println!("case {case}");
        std::fs::write(&path, &original).unwrap();
        let mut rng = SmallRng::seed_from_u64(case);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for _ in 0..rng.gen_range(1..=3) {
            let len = rng.gen_range(1..=16);
            // Anywhere; or where page headers and their size entries are
            // (the first KiB of a 16 KiB page); or over the words that
            // begin a granule (block headers, footers, links, nodes).
            let at = match rng.gen_range(0..3) {
                0 => rng.gen_range(0..end),
                1 => rng.gen_range(0..end / PAGE) * PAGE + rng.gen_range(0..1024),
                _ => rng.gen_range(0..end / 16) * 16 + 8 * rng.gen_range(0..2),
            }
            .min(end - len as u64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            file.write_all_at(&bytes, at).unwrap();
        }
        drop(file);
        let outcome = std::panic::catch_unwind(|| {
            if let Ok(m) = Matrix::open_file(&path) {
                let _ = m.check();
                let _ = m.stats();
            }
        });
        assert!(outcome.is_ok(), "case {case} panicked");
    }
}

/// The child's side: `CORRUPT_HEAP_CASES=first:last` (also the way to run
/// one case by hand, under a debugger).
#[test]
fn child_cases() {
    let Ok(spec) = std::env::var("CORRUPT_HEAP_CASES") else {
        return; // Run as a test of its own: nothing to do.
    };
    let (first, last) = spec.split_once(':').unwrap();
    run_cases(first.parse().unwrap(), last.parse().unwrap());
}

/// Runs `cases` cases in batches of child processes, and fails on the
/// first case that crashed, panicked or hung.
fn fuzz(cases: u64) {
    let mut failures = Vec::new();
    for first in (0..cases).step_by(BATCH as usize) {
        let last = (first + BATCH).min(cases);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_cases",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("CORRUPT_HEAP_CASES", format!("{first}:{last}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("case ") {
                    let _ = tx.send(n.parse::<u64>().unwrap());
                }
            }
        });
        let mut current = None;
        loop {
            match rx.recv_timeout(WATCHDOG) {
                Ok(n) => current = Some(n),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    failures.push(format!("case {current:?} hung"));
                    break;
                }
            }
        }
        let status = child.wait().unwrap();
        if !status.success() && failures.is_empty() {
            failures.push(format!("case {current:?} ended the child with {status}"));
        }
        if !failures.is_empty() {
            break;
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn corrupted_heaps_give_errors_not_crashes() {
    fuzz(CASES);
}

#[test]
#[ignore = "long: 60,000 cases, a few minutes"]
fn corrupted_heaps_give_errors_not_crashes_long() {
    fuzz(LONG_CASES);
}

/// The case of issue 23 that crashed `check()`: one byte of a small-object
/// page's header flipped in a file segment. Each field `check()` follows
/// (class, block size, capacity, offset of block 0) is damaged in turn;
/// `check()` must name the damaged page.
#[test]
fn a_damaged_page_header_is_reported() {
    let dir = TempDir::new("page-header");
    let path = dir.path("segment");
    let first = {
        let m = Matrix::create_file(&path, SIZE).unwrap();
        let blocks: Vec<_> = (0..40).map(|_| m.alloc(layout(48, 8)).unwrap()).collect();
        let first = m.offset_of(blocks[0].as_ptr()).unwrap().get();
        for b in blocks.into_iter().skip(20) {
            unsafe { m.free(b).unwrap() };
        }
        m.check().unwrap();
        first
    };
    let pristine = std::fs::read(&path).unwrap();
    let page = first / PAGE * PAGE;
    let magic = (page..page + 1024)
        .find(|&at| &pristine[at as usize..at as usize + 4] == b"MTXP")
        .expect("the page header");
    // magic: u32, class: u16, shift: u16, block_size: u32, capacity: u32,
    // data: u32 (`cache::page::PageHeader`).
    for field in [4u64, 8, 12, 15, 16] {
        let mut damaged = pristine.clone();
        damaged[(magic + field) as usize] ^= 0x40;
        std::fs::write(&path, &damaged).unwrap();
        let m = Matrix::open_file(&path).unwrap();
        match m.check() {
            Err(matrix_alloc::Error::HeapCorrupt(what)) => {
                assert!(what.contains("page"), "byte {field}: {what}")
            }
            other => panic!("byte {field} of the page header flipped: {other:?}"),
        }
    }
}
