//! Sharing objects between processes (issue 20): typed handles, the named
//! directory and the robust lock, with real child processes.
//!
//! This binary is its own child: `--child ROLE ID ...` plays one role on the
//! named segment `ID`; otherwise it runs every scenario as the parent. Every
//! child has a watchdog, so a wedge fails the test instead of hanging CI.

mod common;
use common::RemoveOnDrop;
use matrix_alloc::{shareable, Error, Handle, LockError, Matrix, ShmMutex};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::{Duration, Instant};
use uuid::Uuid;

const SEGMENT: usize = 16 << 20;
const WATCHDOG: Duration = Duration::from_secs(60);

shareable! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Record { pub id: u64, pub payload: [u8; 32], pub next: Handle<u64> }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        let id: Uuid = args[at + 2].parse().unwrap();
        let m = Matrix::open(id).expect("open the parent's segment");
        return child(&args[at + 1], &m, &args[at + 3..]);
    }
    let tests: &[(&str, fn())] = &[
        (
            "handles_resolve_in_another_process",
            handles_resolve_in_another_process,
        ),
        ("bad_handles_are_typed_errors", bad_handles_are_typed_errors),
        (
            "the_directory_across_processes",
            the_directory_across_processes,
        ),
        (
            "bad_names_and_a_full_directory",
            bad_names_and_a_full_directory,
        ),
        (
            "eight_processes_construct_once",
            eight_processes_construct_once,
        ),
        (
            "a_death_at_any_step_of_a_publish",
            a_death_at_any_step_of_a_publish,
        ),
        (
            "a_holder_killed_hands_over_the_lock",
            a_holder_killed_hands_over_the_lock,
        ),
    ];
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-'));
    let mut passed = 0;
    for (name, test) in tests {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        test();
        println!("test {name} ... ok");
        passed += 1;
    }
    println!("{passed} passed, 0 failed");
}

/// A named segment for one scenario, removed when the scenario ends.
fn segment() -> (Matrix, RemoveOnDrop) {
    let m = Matrix::create(SEGMENT).unwrap();
    let guard = RemoveOnDrop(m.id());
    (m, guard)
}

/// Runs a child role on `m`'s segment; returns its exit status and stdout.
fn run_child(m: &Matrix, role: &str, args: &[String]) -> (ExitStatus, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .arg(role)
        .arg(m.id().to_string())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > WATCHDOG {
            let _ = child.kill();
            panic!("child {role} {args:?} hung (watchdog)");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let out = std::io::read_to_string(child.stdout.take().unwrap()).unwrap();
    (status, out)
}

fn child(role: &str, m: &Matrix, args: &[String]) {
    let arg = |i: usize| -> u64 { args[i].parse().unwrap() };
    match role {
        // Prints the record behind a handle and what the stale one says.
        "resolve" => {
            let h = Handle::<Record>::from_raw(arg(0));
            let r = m.get(h).unwrap();
            let next = m.get(r.next).unwrap();
            let stale = m.get(Handle::<Record>::from_raw(arg(1))).err();
            println!("{} {} {} {:?}", r.id, r.payload[31], next, stale);
        }
        // Looks a name up under two types, updates it under its lock.
        "lookup" => {
            let h = m.lookup::<ShmMutex<[u64; 4]>>("table").unwrap().unwrap();
            let mismatch = m.lookup::<u64>("table").unwrap_err();
            assert!(
                matches!(mismatch, Error::TypeMismatch { .. }),
                "{mismatch:?}"
            );
            let mut g = m.get(h).unwrap().lock(m).unwrap();
            g[1] += 10;
            println!(
                "{:?} {}",
                *g,
                m.lookup::<u64>("no such name").unwrap().is_none()
            );
        }
        // Races on one name: counts constructions in the shared counter.
        "construct" => {
            let constructions = m.get(Handle::<AtomicU64>::from_raw(arg(0))).unwrap();
            let go = m.get(Handle::<AtomicU64>::from_raw(arg(1))).unwrap();
            while go.load(Acquire) == 0 {
                std::hint::spin_loop();
            }
            let h = m
                .find_or_construct("counter", || {
                    constructions.fetch_add(1, SeqCst);
                    ShmMutex::new(0u64)
                })
                .unwrap();
            *m.get(h).unwrap().lock(m).unwrap() += 1;
        }
        // Dies at engine step `k` of a publish of "victim".
        "publish_dying" => {
            let h = Handle::<Record>::from_raw(arg(1));
            matrix_alloc::die_at_engine_step(arg(0));
            m.publish("victim", h).unwrap();
            matrix_alloc::die_at_engine_step(0);
            println!("published");
        }
        // Locks, changes half of the data, and is killed holding the lock.
        "die_holding" => {
            let h = Handle::<ShmMutex<[u64; 2]>>::from_raw(arg(0));
            let mut g = m.get(h).unwrap().lock(m).unwrap();
            g[0] = 7;
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: sending a signal to ourselves.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!();
        }
        other => panic!("unknown role {other}"),
    }
}

fn handles_resolve_in_another_process() {
    let (m, _g) = segment();
    let next = m.alloc_value(41u64).unwrap();
    let mut payload = [0u8; 32];
    payload[31] = 9;
    let h = m
        .alloc_value(Record {
            id: 5,
            payload,
            next,
        })
        .unwrap();
    let gone = m
        .alloc_value(Record {
            id: 6,
            payload,
            next,
        })
        .unwrap();
    // SAFETY: no reference to it is held.
    unsafe { m.free_value(gone) }.unwrap();
    let (status, out) = run_child(
        &m,
        "resolve",
        &[h.to_raw().to_string(), gone.to_raw().to_string()],
    );
    assert!(status.success(), "{out}");
    assert_eq!(out.trim(), "5 9 41 Some(StaleHandle)");
}

fn bad_handles_are_typed_errors() {
    let (m, _g) = segment();
    let other = Matrix::anonymous(1 << 20).unwrap();
    let h = m.alloc_value(7u64).unwrap();
    assert_eq!(*m.get(h).unwrap(), 7);
    // Another segment's handle, another type, a forged offset, out of
    // bounds, inside a block, a value that is not at a block's start.
    assert!(matches!(other.get(h), Err(Error::ForeignHandle)));
    let as_u32 = Handle::<u32>::from_raw(h.to_raw());
    assert!(matches!(m.get(as_u32), Err(Error::TypeMismatch { .. })));
    let raw = h.to_raw();
    let moved = |granules: u64| {
        Handle::<u64>::from_raw(raw & !0xffff_ffff | (raw + granules) & 0xffff_ffff)
    };
    assert!(matches!(
        m.get(moved(1)),
        Err(Error::StaleHandle | Error::InvalidHandle)
    ));
    assert!(matches!(m.get(moved(1 << 30)), Err(Error::InvalidHandle)));
    let big = m.alloc_value([0u64; 64]).unwrap();
    let inside = &m.get(big).unwrap()[4];
    assert!(m.handle(inside).is_err());
    let local = 5u64;
    assert!(matches!(m.handle(&local), Err(Error::NotInSegment)));
    // Every bit pattern: never a pointer outside a live block.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let forged = Handle::<u64>::from_raw(raw & !0xffff_ffff | x & 0xffff_ffff);
        if let Ok(v) = m.get(forged) {
            assert!(m.offset_of(v).is_some());
        }
    }
    // SAFETY: nothing else refers to them.
    unsafe {
        m.free_value(h).unwrap();
        assert!(matches!(m.free_value(h), Err(Error::StaleHandle)));
        m.free_value(big).unwrap();
    }
}

fn the_directory_across_processes() {
    let (m, _g) = segment();
    let h = m.alloc_value(ShmMutex::new([1u64, 2, 3, 4])).unwrap();
    m.publish("table", h).unwrap();
    assert!(matches!(m.publish("table", h), Err(Error::NameTaken(_))));
    let (status, out) = run_child(&m, "lookup", &[]);
    assert!(status.success(), "{out}");
    assert_eq!(out.trim(), "[1, 12, 3, 4] true");
    let listed = m.directory().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "table");
    assert!(listed[0].type_name.contains("ShmMutex"), "{listed:?}");
    assert_eq!(listed[0].size, size_of::<ShmMutex<[u64; 4]>>() as u64);
    assert!(m.unpublish("table").unwrap());
    assert!(!m.unpublish("table").unwrap());
    assert!(m.lookup::<ShmMutex<[u64; 4]>>("table").unwrap().is_none());
    // SAFETY: no process uses it any more.
    unsafe { m.free_value(h) }.unwrap();
}

fn bad_names_and_a_full_directory() {
    let (m, _g) = segment();
    let h = m.alloc_value(1u8).unwrap();
    let long = "n".repeat(matrix_alloc::directory::NAME_MAX + 1);
    for bad in ["", long.as_str()] {
        assert!(matches!(m.publish(bad, h), Err(Error::InvalidName(_))));
        assert!(matches!(m.lookup::<u8>(bad), Err(Error::InvalidName(_))));
    }
    let longest = "é".repeat(matrix_alloc::directory::NAME_MAX / 2);
    m.publish(&longest, h).unwrap();
    assert_eq!(m.lookup::<u8>(&longest).unwrap(), Some(h));
    for i in 1..matrix_alloc::directory::ENTRIES {
        m.publish(&format!("name-{i}"), h).unwrap();
    }
    assert!(matches!(
        m.publish("one too many", h),
        Err(Error::DirectoryFull)
    ));
    assert!(m.unpublish("name-7").unwrap());
    m.publish("one too many", h).unwrap();
    assert_eq!(
        m.directory().unwrap().len(),
        matrix_alloc::directory::ENTRIES
    );
}

fn eight_processes_construct_once() {
    let (m, _g) = segment();
    let constructions = m.alloc_value(AtomicU64::new(0)).unwrap();
    let go = m.alloc_value(AtomicU64::new(0)).unwrap();
    let args = [constructions.to_raw().to_string(), go.to_raw().to_string()];
    std::thread::scope(|s| {
        let children: Vec<_> = (0..8)
            .map(|_| s.spawn(|| run_child(&m, "construct", &args)))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        m.get(go).unwrap().store(1, Release);
        for c in children {
            let (status, out) = c.join().unwrap();
            assert!(status.success(), "{out}");
        }
    });
    assert_eq!(m.get(constructions).unwrap().load(SeqCst), 1);
    let h = m.lookup::<ShmMutex<u64>>("counter").unwrap().unwrap();
    assert_eq!(*m.get(h).unwrap().lock(&m).unwrap(), 8);
}

fn a_death_at_any_step_of_a_publish() {
    let (m, _g) = segment();
    let next = m.alloc_value(3u64).unwrap();
    let h = m
        .alloc_value(Record {
            id: 77,
            payload: [7; 32],
            next,
        })
        .unwrap();
    let mut deaths = 0;
    for k in 1.. {
        let (status, out) = run_child(
            &m,
            "publish_dying",
            &[k.to_string(), h.to_raw().to_string()],
        );
        // Whatever step it died at: the name is absent or whole, and usable.
        match m.lookup::<Record>("victim").unwrap() {
            Some(found) => {
                assert_eq!(found, h);
                assert_eq!(m.get(found).unwrap().id, 77);
            }
            None => assert!(!status.success(), "published yet absent: {out}"),
        }
        assert!(m.unpublish("victim").is_ok());
        m.publish("after", next).unwrap();
        assert!(m.unpublish("after").unwrap());
        if status.success() {
            assert_eq!(out.trim(), "published");
            break;
        }
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        deaths += 1;
    }
    assert!(deaths >= 10, "the publish has {deaths} steps");
}

fn a_holder_killed_hands_over_the_lock() {
    let (m, _g) = segment();
    let h = m.alloc_value(ShmMutex::new([0u64, 0])).unwrap();
    let mutex = m.get(h).unwrap();
    std::thread::scope(|s| {
        let child = s.spawn(|| run_child(&m, "die_holding", &[h.to_raw().to_string()]));
        // Until the child holds it (a free lock that we take, we give back).
        while let Some(r) = mutex.try_lock(&m) {
            drop(r);
            std::thread::sleep(Duration::from_millis(1));
        }
        // Asleep while the child is killed holding the lock: nobody wakes
        // this waiter, it must notice by itself.
        let got = mutex.lock(&m);
        let died = matches!(got, Err(LockError::OwnerDied(_)));
        let data = match got {
            Ok(g) => *g,
            Err(e) => *e.into_guard().unwrap(),
        };
        let (status, _) = child.join().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(died, "the waiter was not told that the holder died");
        assert_eq!(data, [7, 0], "the dead holder's half update is handed over");
    });
    // From then on it is an ordinary lock again.
    assert!(mutex.lock(&m).is_ok());
}
