//! Two processes share one segment.
//!
//! The parent builds a `Vec` inside a named shared-memory segment and hands
//! it to a child process as (offset, length, capacity). The child opens the
//! segment by id, reads the vector, builds a `HashMap` of its own there, and
//! frees the parent's vector: a block allocated by one process, freed by
//! another. Both print the segment's counters, which cover both processes.
//!
//! Run: `cargo run --release --example two_processes`

use allocator_api2::vec::Vec;
use hashbrown::HashMap;
use matrix_alloc::{Matrix, Offset, Stats};
use std::process::Command;

fn print_stats(who: &str, s: &Stats) {
    println!(
        "[{who}] live {} blocks / {} bytes | total {} blocks / {} bytes | peak {} blocks / {} bytes | free {} of {} bytes",
        s.curr_blocks, s.curr_bytes, s.total_blocks, s.total_bytes, s.max_blocks, s.max_bytes, s.free_bytes, s.capacity
    );
}

fn parent() -> Result<(), Box<dyn std::error::Error>> {
    // The creating handle removes the segment's name when it is dropped.
    let m = Matrix::create(64 << 20)?;
    println!(
        "[parent {}] created segment {} ({} MiB)",
        std::process::id(),
        m.id(),
        m.segment_size() >> 20
    );

    let mut squares = Vec::new_in(&m);
    squares.extend((1..=1000u64).map(|i| i * i));
    let expected: u64 = squares.iter().sum();
    let (ptr, len, cap) = squares.into_raw_parts();
    let offset = m.offset_of(ptr).ok_or("vector outside the segment")?;
    print_stats("parent", &m.stats());

    let status = Command::new(std::env::current_exe()?)
        .args([
            "--child",
            &m.id().to_string(),
            &offset.get().to_string(),
            &len.to_string(),
            &cap.to_string(),
        ])
        .args([expected.to_string()])
        .status()?;
    if !status.success() {
        return Err(format!("child failed: {status}").into());
    }

    let s = m.stats();
    print_stats("parent", &s);
    let report = m.check()?;
    println!(
        "[parent] heap check passed: {} free block(s), {} free bytes, {} live blocks",
        report.free_blocks, report.free_bytes, report.used_blocks
    );
    assert_eq!(s.curr_blocks, 1, "only the child's map is left");
    Ok(())
}

fn child(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let m = Matrix::open(args[0].parse()?)?;
    let (offset, len, cap, expected): (u64, usize, usize, u64) = (
        args[1].parse()?,
        args[2].parse()?,
        args[3].parse()?,
        args[4].parse()?,
    );
    let ptr = m.resolve::<u64>(Offset(offset)).ok_or("bad offset")?;
    // SAFETY: the parent gave up this vector (into_raw_parts) to us; the parts
    // describe a live allocation of this segment.
    let squares = unsafe { Vec::from_raw_parts_in(ptr.as_ptr(), len, cap, &m) };
    let sum: u64 = squares.iter().sum();
    println!(
        "[child {}] opened {}; the parent's {} squares sum to {sum}",
        std::process::id(),
        m.id(),
        squares.len()
    );
    assert_eq!(sum, expected);

    let mut words = HashMap::new_in(&m);
    for w in "the quick brown fox jumps over the lazy dog the end".split(' ') {
        *words.entry(w.len()).or_insert(0u32) += 1;
    }
    println!("[child] word lengths in a HashMap in the segment: {:?}", {
        let mut v: std::vec::Vec<_> = words.iter().map(|(k, v)| (*k, *v)).collect();
        v.sort();
        v
    });
    drop(squares); // a block the parent allocated, freed by the child
    print_stats("child", &m.stats());
    // Leave the map in the segment for the parent to see in the counters.
    std::mem::forget(words);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: std::vec::Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--child") => child(&args[2..]),
        _ => parent(),
    }
}
