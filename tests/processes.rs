//! Real child processes on one segment: cross-process frees, a bootstrap
//! race on one id, `kill -9` in the middle of allocating, and a process
//! stopped (SIGSTOP) in the middle of the free-list sweep.
//!
//! This binary is its own child: run with `--child ROLE ...` it plays one
//! child role; otherwise it runs every scenario as the parent. Every child is
//! watched by a watchdog that kills it if it hangs, so a deadlock fails the
//! test instead of hanging CI. (Do not use this as a benchmark.)
//!
//! `cargo test --release --test processes -- --ignored` runs every scenario
//! 50 times, and the deaths at engine steps at every one of the first
//! `STEP_DEATH_SWEEP` steps: the long kill soak.

// Test code: every unsafe call frees, reallocates or reads a block that
// this test allocated and still owns; that is the whole safety argument.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use matrix_alloc::{Matrix, Offset};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::{Duration, Instant};
use uuid::Uuid;

const SEGMENT: usize = 32 << 20;
const SLOTS: usize = 512;
const WATCHDOG: Duration = Duration::from_secs(120);
/// Operations of the `die_at_step` child.
const STEP_DEATH_OPS: usize = 400;
/// Engine steps the `die_at_step` deaths are spread over.
const STEP_DEATH_SWEEP: u64 = 20_000;

// ---- blocks that say who made them -------------------------------------------

/// Writes a block that records its own size and maker, then a pattern.
fn make_block(m: &Matrix, rng: &mut SmallRng, maker: u64, seq: u64) -> Option<NonNull<u8>> {
    let size = rng.gen_range(16..2000usize);
    let p = m.alloc(layout(size, 8)).ok()?;
    let id = (size as u64) << 40 | maker << 32 | (seq & 0xffff_ffff);
    // SAFETY (test): the block is at least 16 bytes and ours.
    unsafe { p.cast::<u64>().write(id) };
    stamp(
        NonNull::new(unsafe { p.as_ptr().add(8) }).unwrap(),
        size - 8,
        id,
    );
    Some(p)
}

/// Verifies a block made by `make_block` (by anyone); returns its maker.
fn verify_block(p: NonNull<u8>) -> u64 {
    let id = unsafe { p.cast::<u64>().read() };
    let size = (id >> 40) as usize;
    assert!((16..2000).contains(&size), "block header garbled: {id:x}");
    assert!(
        has_stamp(
            NonNull::new(unsafe { p.as_ptr().add(8) }).unwrap(),
            size - 8,
            id
        ),
        "block {id:x} overwritten"
    );
    (id >> 32) & 0xff
}

/// The exchange table: `SLOTS` offsets of blocks in flight, inside the segment.
fn table(m: &Matrix, at: Offset) -> &[AtomicU64] {
    let p = m.resolve::<AtomicU64>(at).expect("table offset");
    // SAFETY (test): the parent allocated SLOTS words there and keeps them
    // alive until every child has exited.
    unsafe { std::slice::from_raw_parts(p.as_ptr(), SLOTS) }
}

/// Allocates an exchange table of `SLOTS` zeroed words in the segment.
fn new_table(m: &Matrix) -> (NonNull<u8>, Offset) {
    let p = m.alloc(layout(SLOTS * 8, 8)).unwrap();
    // SAFETY: (test) a fresh allocation of that size.
    unsafe { p.as_ptr().write_bytes(0, SLOTS * 8) };
    (p, m.offset_of(p.as_ptr()).unwrap())
}

/// Empties the table: verifies and frees every block in it; returns their makers.
fn drain_table(m: &Matrix, at: Offset) -> Vec<u64> {
    let mut makers = Vec::new();
    for slot in table(m, at) {
        let off = slot.swap(0, AcqRel);
        if off != 0 {
            let q = m.resolve::<u8>(Offset(off)).unwrap();
            makers.push(verify_block(q));
            unsafe { m.free(q).unwrap() };
        }
    }
    makers
}

// ---- child roles -------------------------------------------------------------

/// Allocates, verifies and frees blocks, swapping them through the table so
/// that most frees are of blocks another process made. Prints how many.
fn child_exchange(id: Uuid, table_at: u64, maker: u64, ops: u64) {
    let m = Matrix::open(id).unwrap();
    let t = table(&m, Offset(table_at));
    let mut rng = SmallRng::seed_from_u64(maker);
    let (mut foreign, mut own) = (0u64, 0u64);
    for seq in 0..ops {
        let Some(p) = make_block(&m, &mut rng, maker, seq) else {
            continue;
        };
        let off = m.offset_of(p.as_ptr()).unwrap().get();
        let old = t[rng.gen_range(0..SLOTS)].swap(off, AcqRel);
        if old != 0 {
            let q = m.resolve::<u8>(Offset(old)).unwrap();
            if verify_block(q) == maker {
                own += 1
            } else {
                foreign += 1
            }
            unsafe { m.free(q).unwrap() };
        }
    }
    println!("freed own={own} foreign={foreign}");
}

/// One engine-only operation on a random entry of `slots` (offsets of
/// blocks, 0 for none): every request is above the small-object limit, some
/// over-aligned; a recorded block is freed or resized (in place or moved).
/// An entry is updated after an allocation returns and cleared before a
/// free, so that a process killed in the middle leaves at most the block in
/// flight unrecorded (or a moved block's old offset recorded).
fn engine_op(m: &Matrix, slots: &[AtomicU64], rng: &mut SmallRng) {
    let slot = &slots[rng.gen_range(0..slots.len())];
    let off = slot.load(Acquire);
    if off == 0 {
        let align = [8, 64, 256, 4096][rng.gen_range(0..4)];
        // Above the medium pages' 32 KiB: engine blocks.
        let p = m
            .alloc(layout(rng.gen_range(33_000..50_000), align))
            .unwrap();
        slot.store(m.offset_of(p.as_ptr()).unwrap().get(), Release);
    } else if rng.gen_bool(0.5) {
        let p = m.resolve::<u8>(Offset(off)).unwrap();
        slot.store(0, Release);
        unsafe { m.free(p).unwrap() };
    } else {
        let p = m.resolve::<u8>(Offset(off)).unwrap();
        let q = unsafe { m.realloc(p, layout(rng.gen_range(33_000..60_000), 8)) }.unwrap();
        slot.store(m.offset_of(q.as_ptr()).unwrap().get(), Release);
    }
}

/// Bytes a process may lose per thread that was inside an engine
/// operation when it died: the block it was allocating or freeing, and for
/// a moving realloc, both blocks (see `engine_op`).
const IN_FLIGHT_BYTES: u64 = 2 * (60_000 + 2 * 4096 + 64);

/// Frees every block recorded in `slots` (tolerating `in_flight` failures:
/// blocks a dead process was freeing or moving when it died).
fn free_recorded(m: &Matrix, slots: &[AtomicU64], in_flight: u32, what: &str) {
    let mut failed = 0;
    for slot in slots {
        let off = slot.swap(0, AcqRel);
        if off != 0 {
            let p = m.resolve::<u8>(Offset(off)).unwrap();
            failed += unsafe { m.free(p) }.is_err() as u32;
        }
    }
    assert!(failed <= in_flight, "{what}: {failed} frees failed");
}

/// Frees every block recorded in the table, all of which must be live,
/// and the table itself; then the heap must be one free block again.
fn free_all_recorded(m: &Matrix, (table_ptr, table_at): (NonNull<u8>, Offset), what: &str) {
    free_recorded(m, table(m, table_at), 0, what);
    unsafe { m.free(table_ptr).unwrap() };
    m.trim(); // what this thread's caches keep goes back too
    let r = m.check().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        (
            r.used_blocks,
            r.orphaned_blocks,
            r.free_blocks,
            r.free_bytes
        ),
        (0, 0, 1, r.capacity),
        "{what}: {r:?}"
    );
}

/// After a process died with `threads` threads inside the engine (and what
/// it held was taken back): frees every block it recorded in the table and
/// the table itself, then checks that no free memory was lost, only the
/// user blocks in flight (at most two per thread, see `engine_op`), and
/// that every free block is listed and merged.
fn assert_only_in_flight_lost(
    m: &Matrix,
    (table_ptr, table_at): (NonNull<u8>, Offset),
    threads: u64,
    what: &str,
) -> matrix_alloc::HeapReport {
    free_recorded(m, table(m, table_at), threads as u32, what);
    unsafe { m.free(table_ptr).unwrap() };
    m.trim(); // what this thread's caches keep goes back too
    let r = m.check().unwrap_or_else(|e| panic!("{what}: {e}"));
    let (in_flight, lost) = (r.used_blocks + r.orphaned_blocks, r.capacity - r.free_bytes);
    assert!(
        in_flight <= 2 * threads && lost <= threads * IN_FLIGHT_BYTES,
        "{what} lost {lost} bytes in {in_flight} blocks: {r:?}"
    );
    assert_eq!(
        (r.unlisted_free_blocks, r.unmerged_pairs),
        (0, 0),
        "{what}: {r:?}"
    );
    r
}

/// Runs `engine_op` on the first 64 table entries until it kills itself at
/// engine step `die_at`.
fn child_die_at_step(id: Uuid, table_at: u64, die_at: u64) {
    let m = Matrix::open(id).unwrap();
    let t = table(&m, Offset(table_at));
    let mut rng = SmallRng::seed_from_u64(7);
    matrix_alloc::die_at_engine_step(die_at);
    for _ in 0..STEP_DEATH_OPS {
        engine_op(&m, &t[..64], &mut rng);
    }
    println!("done");
}

/// Leaves `Dead` nodes buried in a free list, records the blocks it keeps
/// in the table, then runs the last-resort sweep of the free lists and
/// kills itself at engine step `die_at` of it (prints "done" if the sweep
/// ends first).
fn child_sweep_die_at(id: Uuid, table_at: u64, die_at: u64) {
    let m = Matrix::open(id).unwrap();
    let t = table(&m, Offset(table_at));
    // Engine blocks of one size (above the medium pages' 32 KiB), carved
    // one after the other: in group `i`,
    // blocks 0 and 3 stay in use; 1 is freed alone and listed, 4 is freed
    // alone on top of it in the same list, and 2 is freed last, so that it
    // merges with 1 and 1's node dies where it lies, under 4's.
    const GROUPS: usize = 24;
    let blocks: Vec<NonNull<u8>> = (0..5 * GROUPS + 1)
        .map(|_| m.alloc(layout(40_000, 8)).unwrap())
        .collect();
    let mut kept = 0;
    for (k, p) in blocks.iter().enumerate() {
        if k % 5 == 0 || k % 5 == 3 {
            t[kept].store(m.offset_of(p.as_ptr()).unwrap().get(), Release);
            kept += 1;
        }
    }
    for second in [1, 4, 2] {
        for g in 0..GROUPS {
            unsafe { m.free(blocks[5 * g + second]).unwrap() };
        }
        // Into the engine now, in this order, not kept in the block cache.
        m.trim();
    }
    matrix_alloc::die_at_engine_step(die_at);
    m.sweep_free_lists();
    matrix_alloc::die_at_engine_step(0);
    println!("done");
}

/// Free blocks of one size per list, `STOPPED_SWEEP_LISTS[i].1` blocks of
/// `.0` bytes each: the same bytes on each of the three lists (engine
/// blocks, of block-cache classes: 40, 160 and 640 KiB).
const STOPPED_SWEEP_LISTS: [(usize, usize); 3] = [(40_000, 16), (160_000, 4), (640_000, 1)];

/// Makes free blocks on three lists (`STOPPED_SWEEP_LISTS`), each between
/// two blocks in use, and takes the rest of the heap with blocks in use,
/// so that those lists hold all the free memory; records the blocks in use
/// in the table. Then runs the last-resort sweep of the free lists and
/// stops itself (SIGSTOP) at engine step `stop_at` of it; prints "done" when
/// the sweep has ended.
fn child_sweep_stop_at(id: Uuid, table_at: u64, stop_at: u64) {
    let m = Matrix::open(id).unwrap();
    let t = table(&m, Offset(table_at));
    let mut kept = 0;
    let mut keep = |p: NonNull<u8>| {
        t[kept].store(m.offset_of(p.as_ptr()).unwrap().get(), Release);
        kept += 1;
    };
    let mut to_free = vec![];
    for (size, count) in STOPPED_SWEEP_LISTS {
        for k in 0..2 * count + 1 {
            let p = m.alloc(layout(size, 8)).unwrap();
            if k % 2 == 1 {
                to_free.push(p);
            } else {
                keep(p);
            }
        }
    }
    let mut size = SEGMENT;
    while size >= 64 {
        match m.alloc(layout(size, 8)) {
            Ok(p) => keep(p),
            Err(_) => size /= 2,
        }
    }
    for p in to_free {
        unsafe { m.free(p).unwrap() };
    }
    m.trim(); // onto the engine's lists, not kept in the block cache
    matrix_alloc::stop_at_engine_step(stop_at);
    m.sweep_free_lists();
    matrix_alloc::stop_at_engine_step(0);
    println!("done");
}

/// Two threads run `engine_op` on their own halves of the table, and a
/// third runs the last-resort sweep of the free lists every millisecond,
/// until the process is killed.
fn child_engine_churn(id: Uuid, table_at: u64) {
    // A failure in either thread ends the process at once, so that the
    // parent sees it (a panicking scoped thread would leave the other one
    // running until the kill).
    // (No backtrace: printing one takes long enough for the kill to land
    // first.)
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{info}");
        std::process::abort();
    }));
    let m = Matrix::open(id).unwrap();
    let t = table(&m, Offset(table_at));
    std::thread::scope(|s| {
        for half in t.chunks(SLOTS / 2) {
            let m = &m;
            s.spawn(move || {
                let mut rng = SmallRng::from_entropy();
                for seq in 0.. {
                    if seq == 500 {
                        println!("ready");
                    }
                    engine_op(m, half, &mut rng);
                }
            });
        }
        s.spawn(|| loop {
            m.sweep_free_lists();
            std::thread::sleep(Duration::from_millis(1));
        });
    });
}

/// Races its siblings on `bootstrap`, then allocates and frees.
fn child_bootstrap(id: Uuid, start_at_ms: u64, maker: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    std::thread::sleep(Duration::from_millis(start_at_ms.saturating_sub(now)));
    let m = Matrix::bootstrap(id, SEGMENT).unwrap();
    let mut rng = SmallRng::seed_from_u64(maker);
    let blocks: Vec<_> = (0..2000)
        .filter_map(|i| make_block(&m, &mut rng, maker, i))
        .collect();
    for p in blocks {
        assert_eq!(verify_block(p), maker);
        unsafe { m.free(p).unwrap() };
    }
    println!("bootstrapped ok");
}

/// Allocates and frees forever (until killed), holding up to 300 blocks.
fn child_churn(id: Uuid, maker: u64) {
    let m = Matrix::open(id).unwrap();
    let mut rng = SmallRng::seed_from_u64(maker);
    let mut held = Vec::new();
    for seq in 0.. {
        if seq == 2000 {
            println!("ready");
        }
        if held.len() < 300 && rng.gen_bool(0.55) {
            if let Some(p) = make_block(&m, &mut rng, maker, seq) {
                held.push(p);
            }
        } else if !held.is_empty() {
            let p = held.swap_remove(rng.gen_range(0..held.len()));
            verify_block(p);
            unsafe { m.free(p).unwrap() };
        }
    }
}

// ---- the parent's harness --------------------------------------------------------

fn spawn(args: &[String]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Spawns a child in `role` on `m`'s segment and the table at `table_at`.
fn spawn_on(m: &Matrix, role: &str, table_at: Offset, more: &[String]) -> Child {
    let mut args = vec![role.into(), m.id().to_string(), table_at.get().to_string()];
    args.extend_from_slice(more);
    spawn(&args)
}

/// Waits for a child, looking every `poll`; kills it and fails if it
/// outlives the watchdog.
fn wait_watched(child: &mut Child, poll: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}child hung: killed by the watchdog");
        }
        std::thread::sleep(poll);
    }
}

/// Waits for a child that must succeed; returns what it printed.
fn finish(mut child: Child) -> String {
    let status = wait_watched(&mut child, Duration::from_millis(10), "");
    let mut out = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        out.push_str(&line.unwrap());
        out.push('\n');
    }
    assert!(status.success(), "child failed ({status}): {out}");
    out
}

/// Waits for a child that may kill itself: true if it ran to the end,
/// false if SIGKILL ended it; fails on any other end, or a hang.
fn wait_or_killed(mut child: Child, what: &str) -> bool {
    let status = wait_watched(&mut child, Duration::from_millis(1), &format!("{what}: "));
    if status.signal() == Some(libc::SIGKILL) {
        return false;
    }
    assert!(status.success(), "{what}: child failed ({status})");
    true
}

fn processes_free_each_others_blocks() {
    let m = Matrix::create(SEGMENT).unwrap();
    let (table_ptr, table_at) = new_table(&m);
    let children: Vec<_> = (1..=3u64)
        .map(|maker| {
            spawn(&[
                "exchange".into(),
                m.id().to_string(),
                table_at.get().to_string(),
                maker.to_string(),
                "20000".into(),
            ])
        })
        .collect();
    // The parent takes part too.
    let mut rng = SmallRng::seed_from_u64(0);
    let t = table(&m, table_at);
    for seq in 0..5000 {
        if let Some(p) = make_block(&m, &mut rng, 0, seq) {
            let old =
                t[rng.gen_range(0..SLOTS)].swap(m.offset_of(p.as_ptr()).unwrap().get(), AcqRel);
            if old != 0 {
                let q = m.resolve::<u8>(Offset(old)).unwrap();
                verify_block(q);
                unsafe { m.free(q).unwrap() };
            }
        }
    }
    let mut foreign = 0u64;
    for child in children {
        let out = finish(child);
        foreign += out
            .trim()
            .rsplit('=')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap();
    }
    assert!(
        foreign > 1000,
        "children freed only {foreign} foreign blocks"
    );
    drain_table(&m, table_at);
    unsafe { m.free(table_ptr).unwrap() };
    assert_pristine(&m);
}

fn bootstrap_race_on_one_id() {
    for round in 0..3 {
        let id = Uuid::new_v4();
        let _guard = RemoveOnDrop(id);
        let start_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 300;
        let children: Vec<_> = (1..=6u64)
            .map(|maker| {
                spawn(&[
                    "bootstrap".into(),
                    id.to_string(),
                    start_at.to_string(),
                    maker.to_string(),
                ])
            })
            .collect();
        for child in children {
            assert!(finish(child).contains("bootstrapped ok"), "round {round}");
        }
        let m = Matrix::open(id).unwrap();
        assert_eq!(
            m.stats().total_blocks,
            6 * 2000,
            "every child used the one segment"
        );
        assert_pristine(&m);
    }
}

fn kill_9_while_allocating_leaves_a_usable_heap() {
    let m = Matrix::create(SEGMENT).unwrap();
    let mut rng = SmallRng::seed_from_u64(99);
    for round in 0..8u64 {
        let mut child = spawn(&["churn".into(), m.id().to_string(), (round + 1).to_string()]);
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        std::thread::sleep(Duration::from_millis(rng.gen_range(1..40)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let report = m.check().unwrap_or_else(|e| panic!("round {round}: {e}"));
        // The survivor keeps allocating and freeing.
        let mut mine = Vec::new();
        for seq in 0..3000 {
            if let Some(p) = make_block(&m, &mut rng, 0, seq) {
                mine.push(p);
            }
            if mine.len() > 200 {
                let p = mine.swap_remove(0);
                verify_block(p);
                unsafe { m.free(p).unwrap() };
            }
        }
        for p in mine {
            verify_block(p);
            unsafe { m.free(p).unwrap() };
        }
        let after = m.check().unwrap();
        assert_eq!(
            after.used_blocks, report.used_blocks,
            "the survivor freed all it made"
        );
        println!(
            "  kill {round}: dead process left {} blocks ({} bytes) allocated; orphaned {} ({} bytes), unlisted {}, unmerged {}",
            report.used_blocks,
            report.used_bytes,
            report.orphaned_blocks,
            report.orphaned_bytes,
            report.unlisted_free_blocks,
            report.unmerged_pairs
        );
    }
    // What the dead left behind is lost, but the rest of the heap still holds
    // one large allocation.
    let r = m.check().unwrap();
    let big = m
        .alloc(layout(r.largest_free as usize / 2, 64))
        .expect("large allocation after kills");
    unsafe { m.free(big).unwrap() };
}

/// Allocates small blocks (from its per-thread pages), frees most of them
/// again into its own cache, publishes the offsets of the ones it keeps in
/// the table, then waits to be killed.
fn child_cache_then_die(id: Uuid, table_at: u64, maker: u64) {
    let m = Matrix::open(id).unwrap();
    let t = table(&m, Offset(table_at));
    let mut rng = SmallRng::seed_from_u64(maker);
    let blocks: Vec<_> = (0..5000)
        .filter_map(|i| make_block(&m, &mut rng, maker, i))
        .collect();
    for (i, p) in blocks.into_iter().enumerate() {
        if i % 10 == 0 && i / 10 < SLOTS {
            t[i / 10].store(m.offset_of(p.as_ptr()).unwrap().get(), Release);
        } else {
            unsafe { m.free(p).unwrap() };
        }
    }
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn pages_of_a_killed_process_are_reclaimed() {
    let m = Matrix::create(SEGMENT).unwrap();
    let (table_ptr, table_at) = new_table(&m);
    let mut child = spawn_on(&m, "cache_then_die", table_at, &["5".into()]);
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child.kill().unwrap();
    child.wait().unwrap();

    let before = m.check().unwrap();
    assert!(
        before.pages > 0,
        "the child's pages are still there: {before:?}"
    );
    let taken = m.reclaim_dead().pages;
    assert!(taken > 0, "no page of the dead process was taken over");
    // The blocks the child kept are still valid; the parent frees them
    // (remote frees into the reclaimed, now abandoned, pages).
    let makers = drain_table(&m, table_at);
    assert!(
        makers.iter().all(|k| *k == 5),
        "blocks of an unexpected maker: {makers:?}"
    );
    unsafe { m.free(table_ptr).unwrap() };
    // Everything the dead process's cache held comes back.
    m.trim();
    let after = m.check().unwrap();
    assert_eq!(after.pages, 0, "{after:?}");
    assert_eq!(after.used_blocks, 0, "{after:?}");
    assert_eq!(
        after.free_blocks, 1,
        "the heap is one free block again: {after:?}"
    );
    println!("  took over {taken} pages of the dead process; all memory came back");
}

/// A child dies at engine step `k` for many `k` (every one of the first
/// `STEP_DEATH_SWEEP` with `-- --ignored`), so that the death falls on
/// every point of the engine's protocols: inside splits, merges,
/// publications, in-place growth and shrinking. After `reclaim_dead()` and
/// freeing everything the child had recorded, the heap must have lost no
/// free memory: at most the one or two user blocks the child was
/// allocating, freeing or moving right then.
fn killed_at_every_engine_step_loses_no_free_memory() {
    let soak = std::env::args().any(|a| a == "--ignored" || a == "--include-ignored");
    let steps: Vec<u64> = if soak {
        (1..=STEP_DEATH_SWEEP).collect()
    } else {
        // A spread over the whole run, and a dense stretch in its middle.
        (1..=STEP_DEATH_SWEEP)
            .step_by(97)
            .chain(5000..5100)
            .collect()
    };
    let (mut died, mut engine_bytes) = (0, 0);
    for k in steps {
        let m = Matrix::create(SEGMENT).unwrap();
        let (table_ptr, table_at) = new_table(&m);
        let mut child = spawn_on(&m, "die_at_step", table_at, &[k.to_string()]);
        let status = child.wait().unwrap();
        if !status.success() {
            died += 1;
        }
        engine_bytes += m.reclaim_dead().engine_bytes;
        let what = format!("death at step {k}");
        // Right after the recovery, before any free could merge a stray
        // block back: every free block is on its list.
        let r = m.check().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.unlisted_free_blocks, 0, "{what}: {r:?}");
        let r = assert_only_in_flight_lost(&m, (table_ptr, table_at), 1, &what);
        if r.used_blocks + r.orphaned_blocks == 0 {
            assert_eq!(r.free_blocks, 1, "{what}: {r:?}");
        }
    }
    println!("  {died} deaths; reclaim_dead() gave back {engine_bytes} bytes held mid-operation");
    assert!(died > 0, "the child never died: no step was reached");
}

/// A child that runs the last-resort sweep of the free lists (see
/// `child_sweep_die_at`) dies at each of its engine steps in turn, until one
/// sweep ends. After `reclaim_dead()` every free block is on its list, and
/// with the child's blocks freed the heap is one free block again: a sweep
/// holds every block it takes off a list, so a death in it loses nothing.
fn killed_at_every_step_of_the_free_list_sweep_loses_nothing() {
    let (mut k, mut died) = (1, 0);
    loop {
        let m = Matrix::create(SEGMENT).unwrap();
        let (table_ptr, table_at) = new_table(&m);
        let child = spawn_on(&m, "sweep_die_at", table_at, &[k.to_string()]);
        let what = format!("death at sweep step {k}");
        let finished = wait_or_killed(child, &what);
        m.reclaim_dead();
        let r = m.check().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.unlisted_free_blocks, 0, "{what}: {r:?}");
        free_all_recorded(&m, (table_ptr, table_at), &what);
        // No node is lost either (the nodes the sweep set aside for itself
        // are retired by the recovery) but the one a death may leave
        // unlinked and unused: once the `Dead` nodes are swept from the
        // lists, the one free block's node and at most that one are in use.
        m.sweep_free_lists();
        let r = m.check().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(r.nodes_in_use <= 2, "{what}: nodes lost: {r:?}");
        if finished {
            break;
        }
        died += 1;
        k += 1;
        assert!(k < 100_000, "the sweep never ended");
    }
    println!("  {died} deaths inside the sweep, then one sweep to the end");
    assert!(died > 100, "too few steps: were no nodes buried?");
}

/// A sweep stopped anywhere (SIGSTOP at engine steps spread over one) holds
/// the blocks of one list at most: another process still allocates from
/// the other lists at once, and `check()` sees no more than one list's
/// bytes held. (A sweep that took every list apart before it listed any
/// again held them all, and an allocation waited for it, then failed.)
/// Once the sweep goes on and ends, nothing is lost.
fn a_stopped_sweep_holds_one_list_at_most() {
    let one_list: usize = STOPPED_SWEEP_LISTS[0].0 * STOPPED_SWEEP_LISTS[0].1;
    let (mut k, mut stops, mut most_held) = (1, 0, 0);
    loop {
        let m = Matrix::create(SEGMENT).unwrap();
        let (table_ptr, table_at) = new_table(&m);
        let child = spawn_on(&m, "sweep_stop_at", table_at, &[k.to_string()]);
        let what = format!("sweep stopped at step {k}");
        let pid = child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: waits for our own child; WUNTRACED returns when it stops.
        assert_eq!(
            unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) },
            pid
        );
        let stopped = libc::WIFSTOPPED(status);
        if stopped {
            stops += 1;
            // A failure here must not leave the child stopped for ever.
            let looked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let r = m.check().unwrap_or_else(|e| panic!("{what}: {e}"));
                // Block sizes round up a little (headers, granules).
                assert!(
                    r.orphaned_bytes < (one_list * 5 / 4) as u64,
                    "{what}: {} bytes held: {r:?}",
                    r.orphaned_bytes
                );
                let p = m
                    .alloc(layout(STOPPED_SWEEP_LISTS[0].0, 8))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                unsafe { m.free(p).unwrap() };
                r.orphaned_bytes
            }));
            let held = looked.unwrap_or_else(|e| {
                // SAFETY: signals our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                std::panic::resume_unwind(e)
            });
            most_held = most_held.max(held);
            // SAFETY: signals our own child.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
            assert_eq!(finish(child), "done\n", "{what}");
        } else {
            // The sweep ended before step `k`: the child exited, and was
            // reaped by the `waitpid` above.
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{what}"
            );
            drop(child);
        }
        free_all_recorded(&m, (table_ptr, table_at), &what);
        if !stopped {
            break;
        }
        k += 15;
    }
    println!("  {stops} stops inside the sweep; at most {most_held} bytes held at one");
    assert!(stops > 5 && most_held > 0, "the stops missed the sweep");
}

/// A child with two threads inside the engine (and a third that sweeps the
/// free lists every millisecond, so that some kills land in a sweep) is
/// killed (`kill -9` from outside, at a random moment) while two threads of
/// the parent keep
/// allocating, freeing and resizing engine blocks, and go on while the
/// parent runs `reclaim_dead()` on two more threads at once. Afterwards, with every
/// recorded block freed, the heap has lost at most what the child's two
/// threads had in flight.
fn kill_9_inside_the_engine_loses_no_free_memory() {
    let mut rng = SmallRng::from_entropy();
    for round in 0..6 {
        let m = Matrix::create(SEGMENT).unwrap();
        let (table_ptr, table_at) = new_table(&m);
        let mut child = spawn_on(&m, "engine_churn", table_at, &[]);
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        let stop = AtomicU64::new(0);
        let ours: Vec<AtomicU64> = (0..128).map(|_| AtomicU64::new(0)).collect();
        let reclaimed = std::thread::scope(|s| {
            for half in ours.chunks(64) {
                let (m, stop) = (&m, &stop);
                s.spawn(move || {
                    let mut rng = SmallRng::from_entropy();
                    while stop.load(Relaxed) == 0 {
                        engine_op(m, half, &mut rng);
                    }
                    // The thread's caches go back at its exit, which the
                    // scope does not wait for: give them back now.
                    m.trim();
                });
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(1..30)));
            child.kill().unwrap(); // SIGKILL
            let status = child.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(9),
                "round {round}: the child failed before it was killed ({status})"
            );
            // Two recoveries at once: each node goes to one of them.
            let recoveries = [s.spawn(|| m.reclaim_dead()), s.spawn(|| m.reclaim_dead())];
            let reclaimed: u64 = recoveries
                .map(|r| r.join().unwrap().engine_bytes)
                .iter()
                .sum();
            std::thread::sleep(Duration::from_millis(5));
            stop.store(1, Relaxed);
            reclaimed
        });
        let what = format!("round {round}");
        assert!(
            !m.reclaim_dead().any(),
            "{what}: a second reclaim_dead() found more"
        );
        free_recorded(&m, &ours, 0, &what);
        let r = assert_only_in_flight_lost(&m, (table_ptr, table_at), 2, &what);
        println!(
            "  kill {round}: reclaim_dead() gave back {reclaimed} bytes; {} blocks ({} bytes) were in flight",
            r.used_blocks + r.orphaned_blocks,
            r.capacity - r.free_bytes
        );
    }
}

/// A process that dies inside the engine holds a slot; when every other
/// slot is taken by a live handle, the next `Matrix::open` takes the dead
/// slot over, and, as it joins, takes back what the dead process held in
/// the engine: nobody calls `reclaim_dead()` here.
fn taking_a_dead_slot_over_recovers_what_it_held() {
    // Slots a process can hold a slot of its own in (the engine has 128;
    // the last is shared and never taken over).
    const OWN_SLOTS: usize = 127;
    let mut held_at_death = 0;
    for k in (5000..5040).step_by(8) {
        let m = Matrix::create(SEGMENT).unwrap();
        let (table_ptr, table_at) = new_table(&m);
        let mut child = spawn_on(&m, "die_at_step", table_at, &[k.to_string()]);
        child.wait().unwrap();
        // `m` and the dead child hold two slots; live handles take the rest.
        let others: Vec<Matrix> = (0..OWN_SLOTS - 2)
            .map(|_| Matrix::open(m.id()).unwrap())
            .collect();
        held_at_death += m.check().unwrap().orphaned_bytes;
        let heir = Matrix::open(m.id()).unwrap();
        let what = format!("death at step {k}, slot taken over");
        assert_only_in_flight_lost(&m, (table_ptr, table_at), 1, &what);
        drop((heir, others));
    }
    assert!(held_at_death > 0, "no death fell inside the engine");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let id: Uuid = args[3].parse().unwrap();
        let num = |i: usize| args[i].parse::<u64>().unwrap();
        match args[2].as_str() {
            "exchange" => child_exchange(id, num(4), num(5), num(6)),
            "bootstrap" => child_bootstrap(id, num(4), num(5)),
            "churn" => child_churn(id, num(4)),
            "cache_then_die" => child_cache_then_die(id, num(4), num(5)),
            "die_at_step" => child_die_at_step(id, num(4), num(5)),
            "engine_churn" => child_engine_churn(id, num(4)),
            "sweep_die_at" => child_sweep_die_at(id, num(4), num(5)),
            "sweep_stop_at" => child_sweep_stop_at(id, num(4), num(5)),
            role => panic!("unknown child role {role}"),
        }
        return;
    }
    let tests: [(&str, fn()); 9] = [
        (
            "processes_free_each_others_blocks",
            processes_free_each_others_blocks,
        ),
        ("bootstrap_race_on_one_id", bootstrap_race_on_one_id),
        (
            "kill_9_while_allocating_leaves_a_usable_heap",
            kill_9_while_allocating_leaves_a_usable_heap,
        ),
        (
            "pages_of_a_killed_process_are_reclaimed",
            pages_of_a_killed_process_are_reclaimed,
        ),
        (
            "kill_9_inside_the_engine_loses_no_free_memory",
            kill_9_inside_the_engine_loses_no_free_memory,
        ),
        (
            "taking_a_dead_slot_over_recovers_what_it_held",
            taking_a_dead_slot_over_recovers_what_it_held,
        ),
        (
            "killed_at_every_engine_step_loses_no_free_memory",
            killed_at_every_engine_step_loses_no_free_memory,
        ),
        (
            "killed_at_every_step_of_the_free_list_sweep_loses_nothing",
            killed_at_every_step_of_the_free_list_sweep_loses_nothing,
        ),
        (
            "a_stopped_sweep_holds_one_list_at_most",
            a_stopped_sweep_holds_one_list_at_most,
        ),
    ];
    // `-- --ignored` (or `--include-ignored`): the long soak, every scenario
    // many times over.
    let soak = args
        .iter()
        .any(|a| a == "--ignored" || a == "--include-ignored");
    // The step-death sweep covers every step once instead.
    let rounds = |name: &str| {
        if soak && !name.starts_with("killed_at_every") {
            50
        } else {
            1
        }
    };
    let filter: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut passed = 0;
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        println!("test {name} ...");
        for _ in 0..rounds(name) {
            test();
        }
        println!("test {name} ... ok");
        passed += 1;
    }
    println!("{passed} passed, 0 failed");
}
