//! The blocks front end (issue 21): generations, bounds, configuration,
//! backpressure and cancellation, under tokio's multi-threaded runtime and
//! under `pollster::block_on`, with real child processes.
//!
//! This binary is its own child: `--child ROLE ID ARGS...` plays one role on
//! the named segment `ID`; otherwise it runs every scenario as the parent.

mod common;
use common::RemoveOnDrop;
use matrix_alloc::blocks::{BlockId, Blocks, BlocksConfig};
use matrix_alloc::{Error, Matrix};
use std::alloc::Layout;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEGMENT: usize = 16 << 20;
const WATCHDOG: Duration = Duration::from_secs(60);

fn config(max_memory: usize) -> BlocksConfig {
    BlocksConfig {
        max_memory,
        max_block_size: max_memory.min(1 << 20),
        ..BlocksConfig::default()
    }
}

/// tokio's multi-threaded runtime with `workers` threads, timers on.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

fn bytes(n: usize) -> Layout {
    Layout::from_size_align(n, 1).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        let m = Matrix::open(args[at + 2].parse().unwrap()).expect("open the parent's segment");
        return child(&args[at + 1], m, &args[at + 3..]);
    }
    let tests: &[(&str, fn())] = &[
        (
            "atomallocs_readme_example_ported",
            atomallocs_readme_example_ported,
        ),
        ("stale_double_and_forged_ids", stale_double_and_forged_ids),
        ("bounds_and_overflow", bounds_and_overflow),
        ("over_every_kind_of_segment", over_every_kind_of_segment),
        ("configuration_errors", configuration_errors),
        (
            "zero_on_dealloc_zeroes_freed_bytes",
            zero_on_dealloc_zeroes_freed_bytes,
        ),
        ("a_thousand_tokio_tasks", a_thousand_tokio_tasks),
        ("waiting_under_block_on", waiting_under_block_on),
        (
            "cancelled_waiters_pass_their_turn",
            cancelled_waiters_pass_their_turn,
        ),
        ("waiters_time_out", waiters_time_out),
        ("waiters_are_served_in_order", waiters_are_served_in_order),
        ("ids_across_processes", ids_across_processes),
        (
            "a_free_in_another_process_wakes_a_waiter",
            a_free_in_another_process_wakes_a_waiter,
        ),
        (
            "a_killed_waiter_wedges_nobody",
            a_killed_waiter_wedges_nobody,
        ),
        (
            "reads_racing_frees_in_another_process",
            reads_racing_frees_in_another_process,
        ),
    ];
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-'));
    for (name, test) in tests {
        if filter.is_none_or(|f| name.contains(f.as_str())) {
            test();
            println!("test {name} ... ok");
        }
    }
}

fn segment() -> (Matrix, RemoveOnDrop) {
    let m = Matrix::create(SEGMENT).unwrap();
    let id = m.id();
    (m, RemoveOnDrop(id))
}

fn spawn_child(m: &Matrix, role: &str, args: &[String]) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--child", role, &m.id().to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_child(mut c: std::process::Child) -> String {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(c.stdout.as_mut().unwrap(), &mut out).unwrap();
            assert!(status.success(), "child failed: {status}: {out}");
            return out;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("child wedged");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn raw(id: BlockId) -> [String; 2] {
    id.to_raw().map(|w| w.to_string())
}

fn parse_id(words: &[String]) -> BlockId {
    BlockId::from_raw([words[0].parse().unwrap(), words[1].parse().unwrap()])
}

fn child(role: &str, m: Matrix, args: &[String]) {
    let blocks = Blocks::new(m, config(64 << 10)).unwrap();
    match role {
        "read_and_free" => {
            let b = blocks.open(parse_id(args)).unwrap();
            assert_eq!(b.read(0, 4).unwrap(), [9, 8, 7, 6]);
            blocks.free_id(b.id()).unwrap();
            assert!(matches!(b.read(0, 1), Err(Error::StaleBlock)));
            assert!(matches!(blocks.free_id(b.id()), Err(Error::DoubleFree)));
            println!("freed");
        }
        "free_later" => {
            std::thread::sleep(Duration::from_millis(200));
            blocks.free_id(parse_id(args)).unwrap();
        }
        "wait" => {
            println!("waiting");
            std::io::stdout().flush().unwrap();
            let b = pollster::block_on(blocks.allocate(bytes(40 << 10))).unwrap();
            blocks.deallocate(b).unwrap();
        }
        "hammer" => {
            // Each line: an id and the byte its block is filled with. Read
            // it until it is stale; every read must be all that byte.
            let mut reads = 0u64;
            for line in std::io::stdin().lock().lines() {
                let words: Vec<String> = line.unwrap().split(' ').map(String::from).collect();
                let Ok(b) = blocks.open(parse_id(&words)) else {
                    continue;
                };
                let fill: u8 = words[2].parse().unwrap();
                let mut buf = [0u8; 256];
                loop {
                    match b.read_into(0, &mut buf) {
                        Ok(()) => {
                            assert!(buf.iter().all(|&x| x == fill), "read another owner's bytes");
                            reads += 1;
                        }
                        Err(Error::StaleBlock) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            println!("{reads}");
        }
        other => panic!("unknown role {other}"),
    }
}

fn assert_all_freed(blocks: &Blocks) {
    let s = blocks.stats();
    assert_eq!((s.current_bytes, s.current_blocks), (0, 0), "{s:?}");
    let r = blocks.matrix().check().unwrap();
    // The table itself and the directory stay; every block is gone.
    assert!(r.used_blocks <= 3, "{r:?}");
}

/// atomalloc's README example, written against this API.
fn atomallocs_readme_example_ported() {
    pollster::block_on(async {
        let alloc = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), BlocksConfig::default())?;
        let layout = Layout::new::<[u8; 1024]>();
        let block = alloc.allocate(layout).await?;
        block.write(0, &[1, 2, 3, 4])?;
        assert_eq!(
            (alloc.stats().current_blocks, alloc.stats().current_bytes),
            (1, 1024)
        );
        let data = block.read(0, 4)?;
        assert_eq!(data, [1, 2, 3, 4]);
        alloc.deallocate(block)?;
        let stats = alloc.stats();
        assert_eq!(
            (stats.allocated, stats.freed, stats.current_bytes),
            (1, 1, 0)
        );
        Ok::<(), Error>(())
    })
    .unwrap();
}

fn stale_double_and_forged_ids() {
    let blocks = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), config(1 << 20)).unwrap();
    let a = blocks.try_allocate(bytes(100)).unwrap();
    a.write(0, &[1; 100]).unwrap();
    let old = a.id();
    let twin = blocks.open(old).unwrap();
    blocks.deallocate(a).unwrap();
    assert!(matches!(twin.read(0, 1), Err(Error::StaleBlock)));
    assert!(matches!(twin.write(0, &[2]), Err(Error::StaleBlock)));
    assert!(matches!(blocks.open(old), Err(Error::StaleBlock)));
    assert!(matches!(blocks.free_id(old), Err(Error::DoubleFree)));
    // The slot is reused with a new generation: the old id stays stale and
    // cannot touch the new owner's bytes.
    let b = blocks.try_allocate(bytes(100)).unwrap();
    b.write(0, &[3; 100]).unwrap();
    assert!(matches!(twin.write(0, &[9; 100]), Err(Error::StaleBlock)));
    assert_eq!(b.read(0, 100).unwrap(), [3; 100]);
    let [w0, w1] = b.id().to_raw();
    for forged in [
        [w0, w1 + 1],
        [w0 ^ 1 << 40, w1],
        [w0 | 0xffff, w1],
        [0, 0],
        [u64::MAX; 2],
    ] {
        let id = BlockId::from_raw(forged);
        assert!(
            matches!(blocks.open(id), Err(Error::InvalidBlock)),
            "{forged:?}"
        );
        assert!(
            matches!(blocks.free_id(id), Err(Error::InvalidBlock)),
            "{forged:?}"
        );
    }
    blocks.deallocate(b).unwrap();
    assert_all_freed(&blocks);
}

fn bounds_and_overflow() {
    let blocks = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), config(1 << 20)).unwrap();
    let b = blocks.try_allocate(bytes(64)).unwrap();
    assert_eq!(b.len(), 64);
    b.write(60, &[1, 2, 3, 4]).unwrap();
    b.write(64, &[]).unwrap();
    let oob = |r: Result<(), Error>| matches!(r, Err(Error::OutOfBounds { block_len: 64, .. }));
    assert!(oob(b.write(61, &[1, 2, 3, 4])));
    assert!(oob(b.write(usize::MAX, &[1])));
    assert!(oob(b.read_into(usize::MAX - 1, &mut [0; 4])));
    assert!(matches!(
        b.read(1, usize::MAX),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(b.read(65, 0), Err(Error::OutOfBounds { .. })));
    assert_eq!(b.read(60, 4).unwrap(), [1, 2, 3, 4]);
    blocks.deallocate(b).unwrap();
}

fn configuration_errors() {
    let m = Arc::new(Matrix::anonymous(SEGMENT).unwrap());
    let bad: [fn(&mut BlocksConfig); 6] = [
        |c| c.min_block_size = 0,
        |c| (c.min_block_size, c.max_block_size) = (10, 5),
        |c| c.max_block_size = 2 << 20,
        |c| c.alignment = 3,
        |c| c.alignment = 1 << 30,
        |c| c.max_blocks = 0,
    ];
    for spoil in bad {
        let mut c = config(1 << 20);
        spoil(&mut c);
        assert!(
            matches!(Blocks::new(m.clone(), c), Err(Error::InvalidConfig(_))),
            "{c:?}"
        );
    }
    let blocks = Blocks::new(m.clone(), config(1 << 20)).unwrap();
    let other = BlocksConfig {
        zero_on_dealloc: true,
        ..config(1 << 20)
    };
    assert!(matches!(
        Blocks::new(m.clone(), other),
        Err(Error::InvalidConfig(_))
    ));
    let sizes = BlocksConfig {
        min_block_size: 16,
        max_block_size: 1024,
        ..config(1 << 20)
    };
    let m2 = Matrix::anonymous(SEGMENT).unwrap();
    let sized = Blocks::new(m2, sizes).unwrap();
    assert!(matches!(
        sized.try_allocate(bytes(8)),
        Err(Error::BlockSize { min: 16, .. })
    ));
    assert!(matches!(
        sized.try_allocate(bytes(2048)),
        Err(Error::BlockSize { max: 1024, .. })
    ));
    let aligned = sized
        .try_allocate(Layout::from_size_align(16, 4096).unwrap())
        .unwrap();
    sized.deallocate(aligned).unwrap();
    drop(blocks);
}

/// 1,000 tasks on tokio's multi-threaded runtime, in a limit that makes
/// many of them wait; every block's contents are verified before its free.
fn a_thousand_tokio_tasks() {
    let rt = runtime(4);
    let blocks = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), config(256 << 10)).unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..1000u64)
            .map(|t| {
                let blocks = blocks.clone();
                tokio::spawn(async move {
                    for round in 0..5u64 {
                        let len = 64 + ((t * 7919 + round * 104_729) % 8192) as usize;
                        let b = blocks.allocate(bytes(len)).await.unwrap();
                        let fill = (t ^ round) as u8;
                        b.write(0, &vec![fill; len]).unwrap();
                        tokio::task::yield_now().await;
                        assert!(b.read(0, len).unwrap().iter().all(|&x| x == fill));
                        blocks.deallocate(b).unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let s = blocks.stats();
    assert_eq!((s.allocated, s.freed), (5000, 5000), "{s:?}");
    assert!(s.waits > 0, "the limit made tasks wait: {s:?}");
    assert_all_freed(&blocks);
}

/// A waiter under `pollster::block_on`, released by a free on another thread.
fn waiting_under_block_on() {
    let blocks = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), config(64 << 10)).unwrap();
    let hog = blocks.try_allocate(bytes(60 << 10)).unwrap();
    assert!(matches!(
        blocks.try_allocate(bytes(8 << 10)),
        Err(Error::OutOfMemory { .. })
    ));
    let freer = {
        let blocks = blocks.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            blocks.deallocate(hog).unwrap();
        })
    };
    let b = pollster::block_on(blocks.allocate(bytes(8 << 10))).unwrap();
    freer.join().unwrap();
    let s = blocks.stats();
    assert_eq!(s.waits, 1, "{s:?}");
    assert!(s.time_waited > Duration::ZERO);
    blocks.deallocate(b).unwrap();
}

/// Dropping waiting futures (the head among them) loses no wakeup: the
/// waiter behind them still gets the memory when it is freed.
fn cancelled_waiters_pass_their_turn() {
    let rt = runtime(2);
    let blocks = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), config(64 << 10)).unwrap();
    let hog = blocks.try_allocate(bytes(64 << 10)).unwrap();
    rt.block_on(async {
        let first = tokio::spawn({
            let b = blocks.clone();
            async move { b.allocate(bytes(1024)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = tokio::spawn({
            let b = blocks.clone();
            async move { b.allocate(bytes(1024)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A timeout that drops its future in the middle of the wait.
        let third =
            tokio::time::timeout(Duration::from_millis(20), blocks.allocate(bytes(1024))).await;
        assert!(third.is_err());
        first.abort(); // the head, cancelled
        assert!(first.await.unwrap_err().is_cancelled());
        blocks.deallocate(hog).unwrap();
        let b = tokio::time::timeout(WATCHDOG, second)
            .await
            .expect("woken")
            .unwrap()
            .unwrap();
        blocks.deallocate(b).unwrap();
    });
    assert_all_freed(&blocks);
}

fn waiters_time_out() {
    let blocks = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), config(64 << 10)).unwrap();
    let hog = blocks.try_allocate(bytes(64 << 10)).unwrap();
    let r = pollster::block_on(blocks.allocate_timeout(bytes(10), Duration::from_millis(50)));
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    assert_eq!(blocks.stats().timeouts, 1);
    // Larger than the segment: an error at once, not a wait forever.
    let huge = BlocksConfig {
        max_block_size: 1 << 30,
        ..config(1 << 30)
    };
    let big = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), huge).unwrap();
    assert!(matches!(
        pollster::block_on(big.allocate(bytes(1 << 30))),
        Err(Error::OutOfMemory { .. })
    ));
    blocks.deallocate(hog).unwrap();
}

fn ids_across_processes() {
    let (m, _cleanup) = segment();
    let blocks = Blocks::new(m, config(64 << 10)).unwrap();
    let b = blocks.try_allocate(bytes(4)).unwrap();
    b.write(0, &[9, 8, 7, 6]).unwrap();
    let out = wait_child(spawn_child(blocks.matrix(), "read_and_free", &raw(b.id())));
    assert!(out.contains("freed"), "{out}");
    assert!(matches!(b.read(0, 4), Err(Error::StaleBlock)));
    assert!(matches!(blocks.deallocate(b), Err(Error::DoubleFree)));
    assert_all_freed(&blocks);
}

fn a_free_in_another_process_wakes_a_waiter() {
    let (m, _cleanup) = segment();
    let blocks = Blocks::new(m, config(64 << 10)).unwrap();
    let hog = blocks.try_allocate(bytes(64 << 10)).unwrap();
    let c = spawn_child(blocks.matrix(), "free_later", &raw(hog.id()));
    let b = pollster::block_on(blocks.allocate_timeout(bytes(1 << 10), WATCHDOG)).unwrap();
    wait_child(c);
    assert!(matches!(hog.read(0, 1), Err(Error::StaleBlock)));
    assert_eq!(blocks.stats().waits, 1);
    blocks.deallocate(b).unwrap();
    assert_all_freed(&blocks);
}

fn a_killed_waiter_wedges_nobody() {
    let (m, _cleanup) = segment();
    let blocks = Blocks::new(m, config(64 << 10)).unwrap();
    let hog = blocks.try_allocate(bytes(60 << 10)).unwrap();
    let mut c = spawn_child(blocks.matrix(), "wait", &[]);
    let mut line = String::new();
    std::io::BufReader::new(c.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "waiting");
    std::thread::sleep(Duration::from_millis(100)); // asleep on the futex by now
    c.kill().unwrap();
    c.wait().unwrap();
    let freer = {
        let blocks = blocks.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            blocks.deallocate(hog).unwrap();
        })
    };
    let b = pollster::block_on(blocks.allocate_timeout(bytes(40 << 10), WATCHDOG)).unwrap();
    freer.join().unwrap();
    blocks.deallocate(b).unwrap();
    assert_all_freed(&blocks);
}

/// A child reads blocks as fast as it can while this process frees them and
/// allocates new ones (the same memory, other bytes): every read returns the
/// block's own bytes or `StaleBlock`, never the next owner's.
fn reads_racing_frees_in_another_process() {
    let (m, _cleanup) = segment();
    let blocks = Blocks::new(m, config(64 << 10)).unwrap();
    let mut c = spawn_child(blocks.matrix(), "hammer", &[]);
    let mut to_child = c.stdin.take().unwrap();
    for i in 0..2000u32 {
        let fill = (i % 251) as u8 + 1;
        let b = blocks.try_allocate(bytes(256)).unwrap();
        b.write(0, &[fill; 256]).unwrap();
        let [w0, w1] = b.id().to_raw();
        writeln!(to_child, "{w0} {w1} {fill}").unwrap();
        to_child.flush().unwrap();
        std::thread::sleep(Duration::from_micros((i % 7) as u64 * 30));
        blocks.deallocate(b).unwrap();
    }
    drop(to_child);
    let out = wait_child(c);
    let reads: u64 = out.trim().parse().unwrap();
    println!("  {reads} reads raced 2000 frees");
    assert_all_freed(&blocks);
}

/// A large request queued first is served before smaller ones queued after
/// it, although they would fit sooner: first come, first served.
fn waiters_are_served_in_order() {
    let rt = runtime(2);
    let blocks = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), config(64 << 10)).unwrap();
    let hog = blocks.try_allocate(bytes(40 << 10)).unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    rt.block_on(async {
        let big = tokio::spawn({
            let (b, order) = (blocks.clone(), order.clone());
            async move {
                // All of the limit: the small ones fit again only after its free.
                let block = b.allocate(bytes(64 << 10)).await.unwrap();
                order.lock().unwrap().push("big");
                tokio::time::sleep(Duration::from_millis(20)).await;
                b.deallocate(block).unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // 1 KiB would fit now (24 KiB are free), but the big one is first.
        let small: Vec<_> = (0..4)
            .map(|_| {
                let (b, order) = (blocks.clone(), order.clone());
                tokio::spawn(async move {
                    let block = b.allocate(bytes(1 << 10)).await.unwrap();
                    order.lock().unwrap().push("small");
                    b.deallocate(block).unwrap();
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(order.lock().unwrap().is_empty(), "nobody jumped the queue");
        blocks.deallocate(hog).unwrap();
        big.await.unwrap();
        for s in small {
            s.await.unwrap();
        }
    });
    assert_eq!(
        *order.lock().unwrap(),
        ["big", "small", "small", "small", "small"]
    );
    assert_all_freed(&blocks);
}

/// Named, file, anonymous and pinned segments all carry a front end, and a
/// second `Matrix` of the same segment finds the same table.
fn over_every_kind_of_segment() {
    let dir = common::TempDir::new("blocks");
    let named = Matrix::create(SEGMENT).unwrap();
    let _named = RemoveOnDrop(named.id());
    let pinned = Matrix::create_pinned(SEGMENT).unwrap();
    let _pinned = RemoveOnDrop(pinned.id());
    let file = dir.path("segment");
    let kinds = [
        (
            "named",
            named,
            Some(Matrix::open as fn(uuid::Uuid) -> Result<Matrix, Error>),
        ),
        ("pinned", pinned, None),
        ("file", Matrix::create_file(&file, SEGMENT).unwrap(), None),
        ("anonymous", Matrix::anonymous(SEGMENT).unwrap(), None),
    ];
    for (kind, m, reopen) in kinds {
        let id = m.id();
        let blocks = Blocks::new(m, config(1 << 20)).unwrap();
        let b = blocks.try_allocate(bytes(32)).unwrap();
        b.write(0, kind.as_bytes()).unwrap();
        let second = match (kind, reopen) {
            (_, Some(open)) => Some(open(id).unwrap()),
            ("file", _) => Some(Matrix::open_file(&file).unwrap()),
            _ => None,
        };
        if let Some(m2) = second {
            let other = Blocks::new(m2, config(1 << 20)).unwrap();
            let seen = other.open(b.id()).unwrap();
            assert_eq!(seen.read(0, kind.len()).unwrap(), kind.as_bytes(), "{kind}");
            other.free_id(b.id()).unwrap();
            assert!(matches!(b.read(0, 1), Err(Error::StaleBlock)), "{kind}");
        } else {
            blocks.deallocate(b).unwrap();
        }
        assert_all_freed(&blocks);
    }
}

/// The same allocations with and without `zero_on_dealloc`: the second
/// block reuses the first one's memory (its bytes are still there without
/// zeroing), and with zeroing it reads zeros.
fn zero_on_dealloc_zeroes_freed_bytes() {
    for zero in [false, true] {
        let c = BlocksConfig {
            zero_on_dealloc: zero,
            ..config(1 << 20)
        };
        let blocks = Blocks::new(Matrix::anonymous(SEGMENT).unwrap(), c).unwrap();
        let first = blocks.try_allocate(bytes(4096)).unwrap();
        first.write(0, &[0xab; 4096]).unwrap();
        blocks.deallocate(first).unwrap();
        let second = blocks.try_allocate(bytes(4096)).unwrap();
        let expected = if zero { 0 } else { 0xab };
        // The first and last bytes may hold the allocator's bookkeeping of
        // the freed block (a cache link, a footer), written after the
        // zeroing: no user data.
        let got = second.read(16, 4096 - 32).unwrap();
        assert!(got.iter().all(|&x| x == expected), "zero_on_dealloc {zero}");
        blocks.deallocate(second).unwrap();
    }
}
