//! Memory goes back (issue 22, target 7): after a program frees most of a
//! 1 GiB working set of 64 KiB – 4 MiB blocks, the segment's resident
//! memory is within 10% of what stays live once the purge delay has passed
//! (the next allocation purges), and again after `trim()`, in anonymous
//! and named (tmpfs) segments (file segments: see below). Resident memory
//! is read from the kernel:
//! the mapping's `Rss` in `/proc/self/smaps`, and for named and file
//! segments also the file's allocated blocks (`st_blocks`).

mod common;

use common::TempDir;
use matrix_alloc::Matrix;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::alloc::Layout;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const SEGMENT: usize = 2 << 30;
const WORKING_SET: usize = 1 << 30;
const MIB: u64 = 1 << 20;

/// `Rss` of the mapping that holds `addr`, in bytes.
fn rss_of_mapping(addr: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
                continue;
            }
        }
        if inside {
            if let Some(kb) = line.strip_prefix("Rss:") {
                let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                return kb * 1024;
            }
        }
    }
    panic!("no mapping holds {addr:#x}");
}

/// Bytes of the file's storage in use.
fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Fills a working set of `WORKING_SET` bytes in blocks of 64 KiB – 4 MiB
/// (every byte written), keeps every fourth block and frees the others,
/// and checks with `resident` (bytes, of the segment) that what stays
/// resident is within 10% of the live bytes (beyond what the segment held
/// before). Frees the rest at the end.
fn frees_give_memory_back(m: &Matrix, what: &str, resident: &dyn Fn() -> u64) {
    let before = resident();
    let mut rng = SmallRng::seed_from_u64(22);
    let mut blocks = Vec::new();
    let mut total = 0;
    while total < WORKING_SET {
        let len = rng.gen_range(64 << 10..=4 << 20);
        let p = m.alloc(Layout::from_size_align(len, 8).unwrap()).unwrap();
        // SAFETY: a fresh block of `len` bytes.
        unsafe { p.as_ptr().write_bytes(0x5a, len) };
        blocks.push((p, len));
        total += len;
    }
    let full = resident() - before;
    assert!(
        full >= WORKING_SET as u64 * 9 / 10,
        "{what}: only {full} bytes resident"
    );
    let mut kept = Vec::new();
    let mut live = 0u64;
    for (i, (p, len)) in blocks.into_iter().enumerate() {
        if i % 4 == 0 {
            kept.push(p);
            live += len as u64;
        } else {
            // SAFETY: a live block of this segment, freed once.
            unsafe { m.free(p).unwrap() };
        }
    }
    let freed = resident().saturating_sub(before);
    // Free blocks of 1 MiB and more give their pages back once they have
    // stayed free for the purge delay, at the next engine call: here an
    // allocation too large for the block caches.
    std::thread::sleep(std::time::Duration::from_millis(250));
    let big = Layout::from_size_align(8 << 20, 8).unwrap();
    // SAFETY: freed once, right away.
    unsafe { m.free(m.alloc(big).unwrap()).unwrap() };
    let delayed = resident().saturating_sub(before);
    // `trim()` gives back the rest: smaller free blocks, and the block
    // caches' blocks.
    m.trim();
    let after = resident().saturating_sub(before);
    println!(
        "{what}: {} MiB resident with the working set; {} MiB after freeing 3/4 of it, \
         {} MiB after the purge delay, {} MiB after trim() ({} MiB stay live)",
        full / MIB,
        freed / MIB,
        delayed / MIB,
        after / MIB,
        live / MIB
    );
    for (resident, when) in [(delayed, "after the purge delay"), (after, "after trim()")] {
        assert!(
            resident <= live + full / 10,
            "{what}: {resident} bytes resident {when} for {live} live bytes"
        );
    }
    for p in kept {
        // SAFETY: as above.
        unsafe { m.free(p).unwrap() };
    }
    // The next measurement in this segment starts from what stays.
    m.trim();
}

#[test]
fn anonymous_segments_give_freed_memory_back() {
    let m = Matrix::anonymous(SEGMENT).unwrap();
    let probe = m.alloc(Layout::new::<u64>()).unwrap().as_ptr() as usize;
    frees_give_memory_back(&m, "anonymous", &|| rss_of_mapping(probe));
}

#[test]
fn named_segments_give_freed_memory_back() {
    let m = Matrix::create(SEGMENT).unwrap();
    let path = m.path().unwrap().to_path_buf();
    let probe = m.alloc(Layout::new::<u64>()).unwrap().as_ptr() as usize;
    frees_give_memory_back(&m, "named (mapping)", &|| rss_of_mapping(probe));
    frees_give_memory_back(&m, "named (tmpfs file)", &|| file_bytes(&path));
}

#[test]
fn file_segments_give_freed_memory_back() {
    let dir = TempDir::new("memory-back");
    let path = dir.path("segment");
    let m = Matrix::create_file(&path, SEGMENT).unwrap();
    // Only the file's blocks are looked at: the kernel writes the dirty
    // pages of a file mapping back and may drop them, so the mapping's
    // `Rss` says little about what the segment holds. (On ext4, a punch
    // through a dirty large folio that reaches past the freed range kept
    // a third of the working set allocated until the purge wrote those
    // folios back first: `os::write_back_ends`.)
    frees_give_memory_back(&m, "file (on disk)", &|| file_bytes(&path));
}
