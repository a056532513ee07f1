//! Sharing objects between processes (issue 20): typed handles, the named
//! directory and the robust lock, with real child processes.
//!
//! This binary is its own child: `--child ROLE ID ...` plays one role on the
//! named segment `ID`; otherwise it runs every scenario as the parent. Every
//! child has a watchdog, so a wedge fails the test instead of hanging CI.

mod common;
use allocator_api2::vec::Vec as PVec;
use common::RemoveOnDrop;
use matrix_alloc::{
    shareable, Error, FixedState, Handle, LockError, Matrix, PinnedAlloc, ShmMutex,
};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::{Duration, Instant};
use uuid::Uuid;

const SEGMENT: usize = 16 << 20;
/// Names each process publishes in `processes_publish_and_look_up_at_once`.
const NAMES_EACH: u64 = 25;
const WATCHDOG: Duration = Duration::from_secs(60);

shareable! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Record { pub id: u64, pub payload: [u8; 32], pub next: Handle<u64> }
}

type SharedMap = ShmMutex<hashbrown::HashMap<u64, [u8; 32], FixedState, PinnedAlloc>>;
type SharedVec = ShmMutex<PVec<u64, PinnedAlloc>>;
const PINNED_ENTRIES: u64 = 20_000;

fn value_of(k: u64) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..8].copy_from_slice(&k.to_le_bytes());
    v[31] = k as u8;
    v
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        let id: Uuid = args[at + 2].parse().unwrap();
        if args[at + 1] == "pinned_taken" {
            let address: u64 = args[at + 3].parse().unwrap();
            take_range(address);
            let e = Matrix::open(id).unwrap_err();
            assert!(
                matches!(e, Error::AddressInUse { address: a, .. } if a == address),
                "{e:?}"
            );
            println!("{e}");
            return;
        }
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
        (
            "pinned_collections_across_processes",
            pinned_collections_across_processes,
        ),
        ("a_pinned_address_in_use", a_pinned_address_in_use),
        (
            "processes_publish_and_look_up_at_once",
            processes_publish_and_look_up_at_once,
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
        // Publishes its names while the others publish theirs, and looks
        // all of them up until every one is there with the right value.
        "publisher" => {
            let (me, of) = (arg(0), arg(1));
            for i in 0..NAMES_EACH {
                let h = m.alloc_value(me * 1000 + i).unwrap();
                m.publish(&format!("p{me}-{i}"), h).unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            'all: loop {
                assert!(Instant::now() < deadline, "names never appeared");
                for p in 0..of {
                    for i in 0..NAMES_EACH {
                        match m.lookup::<u64>(&format!("p{p}-{i}")).unwrap() {
                            Some(h) => assert_eq!(*m.get(h).unwrap(), p * 1000 + i),
                            None => continue 'all,
                        }
                    }
                }
                break;
            }
            println!("saw all");
        }
        // Reads, grows, updates and frees the pinned collections.
        "pinned" => {
            assert_eq!(
                m.pinned_address(),
                Some(arg(0)),
                "mapped at the pinned address"
            );
            let map = m
                .get(m.lookup::<SharedMap>("map").unwrap().unwrap())
                .unwrap();
            let vec = m
                .get(m.lookup::<SharedVec>("vec").unwrap().unwrap())
                .unwrap();
            let mut map = map.lock(m).unwrap();
            let mut vec = vec.lock(m).unwrap();
            assert_eq!(map.len(), PINNED_ENTRIES as usize);
            for k in 0..PINNED_ENTRIES {
                assert_eq!(map[&k], value_of(k), "entry {k}");
            }
            assert!(vec.iter().copied().eq(0..PINNED_ENTRIES));
            // Grow both (their storage moves, allocated by this process),
            // update, and free what this process owns now.
            for k in PINNED_ENTRIES..2 * PINNED_ENTRIES {
                map.insert(k, value_of(k));
                vec.push(k);
            }
            for k in 0..PINNED_ENTRIES / 2 {
                map.get_mut(&k).unwrap()[0] = 0xff;
                assert!(map.remove(&(k + PINNED_ENTRIES)).is_some());
            }
            vec.truncate(10);
            vec.shrink_to_fit();
            println!("{} {}", map.len(), vec.len());
        }
        // Maps something at the pinned address first, then opens.
        "pinned_taken" => {
            unreachable!("opened before the role runs");
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

/// Maps 1 MiB of anonymous memory at `address` in this process.
fn take_range(address: u64) {
    // SAFETY: a fresh private mapping that replaces nothing (NOREPLACE).
    let p = unsafe {
        libc::mmap(
            address as *mut libc::c_void,
            1 << 20,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, address, "could not take the range");
}

fn pinned_collections_across_processes() {
    let m = Matrix::create_pinned(64 << 20).unwrap();
    let _g = RemoveOnDrop(m.id());
    let alloc = m.pinned_alloc().unwrap();
    let mut map = hashbrown::HashMap::with_hasher_in(FixedState::default(), alloc);
    let mut vec = PVec::new_in(alloc);
    for k in 0..PINNED_ENTRIES {
        map.insert(k, value_of(k));
        vec.push(k);
    }
    let hm = m.alloc_value(ShmMutex::new(map)).unwrap();
    let hv = m.alloc_value(ShmMutex::new(vec)).unwrap();
    m.publish("map", hm).unwrap();
    m.publish("vec", hv).unwrap();
    let base = m.pinned_address().unwrap();
    let (status, out) = run_child(&m, "pinned", &[base.to_string()]);
    assert!(status.success(), "{out}");
    assert_eq!(
        out.trim(),
        format!("{} 10", PINNED_ENTRIES + PINNED_ENTRIES / 2)
    );
    {
        let map = m.get(hm).unwrap().lock(&m).unwrap();
        for k in 0..2 * PINNED_ENTRIES {
            let mut want = value_of(k);
            if k < PINNED_ENTRIES / 2 {
                want[0] = 0xff;
            }
            let gone = (PINNED_ENTRIES..PINNED_ENTRIES + PINNED_ENTRIES / 2).contains(&k);
            assert_eq!(map.get(&k), (!gone).then_some(&want), "entry {k}");
        }
        let vec = m.get(hv).unwrap().lock(&m).unwrap();
        assert!(vec.iter().copied().eq(0..10));
    }
    // Free everything: the collections' storage (through PinnedAlloc, freed
    // here although the child allocated it), then the objects.
    for name in ["map", "vec"] {
        assert!(m.unpublish(name).unwrap());
    }
    // SAFETY: no process uses them any more.
    unsafe {
        m.free_value(hm).unwrap();
        m.free_value(hv).unwrap();
    }
    let r = m.check().unwrap();
    assert_eq!(r.used_blocks, 1, "only the directory is left: {r:?}");
}

fn a_pinned_address_in_use() {
    let m = Matrix::create_pinned(1 << 20).unwrap();
    let _g = RemoveOnDrop(m.id());
    let base = m.pinned_address().unwrap();
    // Taken in this process: by the segment itself.
    let e = Matrix::create_pinned_at(base, 1 << 20).unwrap_err();
    assert!(matches!(e, Error::AddressInUse { .. }), "{e:?}");
    // Taken in another process by something else.
    let (status, out) = run_child(&m, "pinned_taken", &[base.to_string()]);
    assert!(status.success(), "{out}");
    assert!(out.contains("in use"), "{out}");
    // A segment that is not pinned is refused by open_pinned.
    let plain = Matrix::create(1 << 20).unwrap();
    assert!(Matrix::open_pinned(plain.id()).is_err());
    assert!(plain.pinned_alloc().is_err());
}

fn processes_publish_and_look_up_at_once() {
    let (m, _g) = segment();
    let of = 4u64;
    std::thread::scope(|s| {
        let children: Vec<_> = (0..of)
            .map(|k| {
                let m = &m;
                s.spawn(move || run_child(m, "publisher", &[k.to_string(), of.to_string()]))
            })
            .collect();
        for c in children {
            let (status, out) = c.join().unwrap();
            assert!(status.success() && out.trim() == "saw all", "{out}");
        }
    });
    let listed = m.directory().unwrap();
    assert_eq!(listed.len() as u64, of * NAMES_EACH);
    assert!(listed.iter().all(|e| e.type_name == "u64" && e.size == 8));
}
