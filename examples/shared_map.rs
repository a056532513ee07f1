//! A `hashbrown::HashMap` and a `Vec` shared by three processes, used
//! directly: no serialising, no copying.
//!
//! The producer (this process) makes a pinned segment, builds a map of
//! 1,000,000 entries (`u64` → `[u8; 32]`) and a `Vec` in it, each behind a
//! `ShmMutex`, and publishes both by name. Two real consumer processes open
//! the segment by its id, look both up by name, verify every entry, update
//! their half of the entries under the lock, add and remove entries of
//! their own (the map's storage grows, allocated by them), publish and free
//! an object of their own, and exit. The producer checks their work, prints
//! the segment's figures, frees everything and removes the segment.
//!
//! `cargo run --release --example shared_map`

use allocator_api2::vec::Vec as SegVec;
use hashbrown::HashMap;
use matrix_alloc::{FixedState, Matrix, PinnedAlloc, ShmMutex};
use std::process::Command;
use std::time::Instant;

type Map = ShmMutex<HashMap<u64, [u8; 32], FixedState, PinnedAlloc>>;
type List = ShmMutex<SegVec<u64, PinnedAlloc>>;

const ENTRIES: u64 = 1_000_000;
/// Keys each consumer adds, and removes again, from this one up.
const OWN_KEYS: u64 = 10_000_000;

fn value(k: u64) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..8].copy_from_slice(&k.to_le_bytes());
    v[8..16].copy_from_slice(&(k * k).to_le_bytes());
    v
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--consumer" {
        return consumer(args[2].parse()?, args[3].parse()?);
    }
    let m = Matrix::create_pinned(1 << 30)?;
    println!(
        "producer: pinned segment {} at {:#x}",
        m.id(),
        m.pinned_address().unwrap_or(0)
    );
    let alloc = m.pinned_alloc()?;
    let start = Instant::now();
    let mut map =
        HashMap::with_capacity_and_hasher_in(ENTRIES as usize, FixedState::default(), alloc);
    let mut list = SegVec::with_capacity_in(ENTRIES as usize, alloc);
    for k in 0..ENTRIES {
        map.insert(k, value(k));
        list.push(k);
    }
    let map = m.alloc_value(ShmMutex::new(map))?;
    let list = m.alloc_value(ShmMutex::new(list))?;
    m.publish("map", map)?;
    m.publish("list", list)?;
    println!(
        "producer: built and published {ENTRIES} entries in {:?}",
        start.elapsed()
    );

    let consumers: Vec<_> = (0..2)
        .map(|k| {
            Command::new(std::env::current_exe()?)
                .args(["--consumer", &m.id().to_string(), &k.to_string()])
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut c in consumers {
        if !c.wait()?.success() {
            return Err("a consumer failed".into());
        }
    }

    {
        let map = m
            .get(map)?
            .lock(&m)
            .map_err(|_| "a consumer died holding the map")?;
        let wrong = (0..ENTRIES)
            .filter(|k| map.get(k).map(|v| v[31]) != Some(1 + (k % 2) as u8))
            .count();
        println!(
            "producer: {} entries, {wrong} not updated by their consumer",
            map.len()
        );
        let list = m
            .get(list)?
            .lock(&m)
            .map_err(|_| "a consumer died holding the list")?;
        println!(
            "producer: list of {} ({} appended by the consumers)",
            list.len(),
            list.len() as u64 - ENTRIES
        );
        if wrong != 0 || map.len() as u64 != ENTRIES {
            return Err("the consumers' updates are not all there".into());
        }
    }
    let s = m.stats();
    println!(
        "segment: {} blocks live, {} bytes requested, peak {} bytes; {} of {} heap bytes free; objects {:?}",
        s.curr_blocks,
        s.curr_bytes,
        s.max_bytes,
        s.free_bytes,
        s.capacity,
        m.directory()?.iter().map(|e| e.name.as_str()).collect::<Vec<_>>()
    );
    m.unpublish("map")?;
    m.unpublish("list")?;
    // SAFETY: the consumers have exited; nothing else uses the objects.
    unsafe {
        m.free_value(map)?;
        m.free_value(list)?;
    }
    let r = m.check()?;
    println!(
        "after freeing: {} blocks in use (the directory), heap check passed; segment removed on exit",
        r.used_blocks
    );
    Ok(())
}

fn consumer(id: uuid::Uuid, k: u64) -> Result<(), Box<dyn std::error::Error>> {
    let m = Matrix::open(id)?;
    let map = m.get(m.lookup::<Map>("map")?.ok_or("no map")?)?;
    let list = m.get(m.lookup::<List>("list")?.ok_or("no list")?)?;
    let start = Instant::now();
    let mut mine = 0;
    {
        let mut map = map.lock(&m).map_err(|_| "the map's holder died")?;
        for key in 0..ENTRIES {
            let v = map.get_mut(&key).ok_or("missing entry")?;
            if v[..16] != value(key)[..16] {
                return Err(format!("entry {key} is wrong").into());
            }
            if key % 2 == k {
                v[31] = 1 + k as u8;
                mine += 1;
            }
        }
        // Entries of its own: the table grows (storage this process
        // allocates), then they go again.
        let own = OWN_KEYS + k * ENTRIES;
        for key in own..own + ENTRIES {
            map.insert(key, value(key));
        }
        for key in own..own + ENTRIES {
            map.remove(&key);
        }
    }
    list.lock(&m)
        .map_err(|_| "the list's holder died")?
        .extend([k; 1000]);
    // An object of its own, published and freed again.
    let scratch = m.alloc_value([k; 512])?;
    let name = format!("consumer-{k}");
    m.publish(&name, scratch)?;
    m.unpublish(&name)?;
    // SAFETY: this process made it and nobody else knows it any more.
    unsafe { m.free_value(scratch)? };
    println!(
        "consumer {k} (pid {}): verified {ENTRIES} entries, updated {mine}, in {:?}",
        std::process::id(),
        start.elapsed()
    );
    Ok(())
}
