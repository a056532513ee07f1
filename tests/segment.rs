//! Segment lifetime and every way opening can fail: each returns a typed
//! error, opening never changes the file, created files are private.

// Test code: every unsafe call frees, reallocates or reads a block that
// this test allocated and still owns; that is the whole safety argument.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use matrix_alloc::{Error, Matrix, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

const SIZE: usize = 1 << 20;

#[test]
fn named_segment_is_created_private_and_removed_on_drop() {
    let m = Matrix::create(SIZE).unwrap();
    let path = m.path().unwrap().to_path_buf();
    assert!(path.starts_with("/dev/shm"));
    assert!(path.to_str().unwrap().contains(&m.id().to_string()));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), SIZE as u64);
    let other = Matrix::open(m.id()).unwrap();
    assert_eq!(other.id(), m.id());
    drop(m);
    assert!(!path.exists(), "the creating handle removes the name");
    // An open handle keeps working after the name is gone.
    let p = other.alloc(layout(100, 8)).unwrap();
    unsafe { other.free(p).unwrap() };
    assert!(matches!(Matrix::open(other.id()), Err(Error::NotFound(_))));
}

#[test]
fn keep_leaves_the_segment_for_others_until_removed() {
    let m = Matrix::create(SIZE).unwrap();
    let id = m.id();
    let _guard = RemoveOnDrop(id);
    m.keep();
    drop(m);
    let again = Matrix::open(id).unwrap();
    drop(again);
    Matrix::remove(id).unwrap();
    assert!(matches!(Matrix::remove(id), Err(Error::NotFound(_))));
}

#[test]
fn creating_an_existing_segment_is_an_error() {
    let m = Matrix::create(SIZE).unwrap();
    assert!(matches!(
        Matrix::create_with_id(m.id(), SIZE),
        Err(Error::AlreadyExists(_))
    ));
    let dir = TempDir::new("exists");
    let path = dir.path("seg");
    let _f = Matrix::create_file(&path, SIZE).unwrap();
    assert!(matches!(
        Matrix::create_file(&path, SIZE),
        Err(Error::AlreadyExists(_))
    ));
}

#[test]
fn invalid_sizes_are_errors() {
    for size in [
        0,
        1,
        MIN_SEGMENT_SIZE as usize - 1,
        MAX_SEGMENT_SIZE as usize + 1,
        usize::MAX,
    ] {
        assert!(
            matches!(Matrix::anonymous(size), Err(Error::InvalidSize { .. })),
            "{size}"
        );
        assert!(
            matches!(Matrix::create(size), Err(Error::InvalidSize { .. })),
            "{size}"
        );
    }
}

#[test]
fn file_segments_outlive_their_handles_and_keep_data() {
    let dir = TempDir::new("file");
    let path = dir.path("seg");
    let off;
    {
        let m = Matrix::create_file(&path, SIZE).unwrap();
        let p = m.alloc(layout(64, 8)).unwrap();
        stamp(p, 64, 42);
        off = m.offset_of(p.as_ptr()).unwrap();
    }
    let m = Matrix::open_file(&path).unwrap();
    let p = m.resolve::<u8>(off).unwrap();
    assert!(has_stamp(p, 64, 42), "data survived close and reopen");
    assert_eq!(m.stats().curr_blocks, 1);
    unsafe { m.free(p).unwrap() };
    assert_pristine(&m);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

fn write_at(path: &std::path::Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn foreign_too_small_truncated_and_corrupt_files_are_rejected() {
    let dir = TempDir::new("bad");
    // A foreign file of plausible size.
    let foreign = dir.path("foreign");
    std::fs::write(&foreign, vec![0xA5u8; SIZE]).unwrap();
    assert!(matches!(Matrix::open_file(&foreign), Err(Error::BadMagic)));
    // A file too small to hold a header.
    let tiny = dir.path("tiny");
    std::fs::write(&tiny, b"MATRIXAL").unwrap();
    assert!(matches!(
        Matrix::open_file(&tiny),
        Err(Error::Truncated { .. })
    ));
    // An empty file.
    let empty = dir.path("empty");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        Matrix::open_file(&empty),
        Err(Error::Truncated { .. })
    ));
    // A real segment cut short.
    let cut = dir.path("cut");
    drop(Matrix::create_file(&cut, SIZE).unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(SIZE as u64 / 2)
        .unwrap();
    assert!(matches!(
        Matrix::open_file(&cut),
        Err(Error::Truncated { .. })
    ));
    // A real segment with another layout version (bytes 16..20).
    let version = dir.path("version");
    drop(Matrix::create_file(&version, SIZE).unwrap());
    write_at(&version, 16, &99u32.to_le_bytes());
    assert!(matches!(
        Matrix::open_file(&version),
        Err(Error::VersionMismatch { found: 99, .. })
    ));
    // Corrupt layout offsets (the heap offset field, bytes 64..72).
    let offsets = dir.path("offsets");
    drop(Matrix::create_file(&offsets, SIZE).unwrap());
    write_at(&offsets, 64, &u64::MAX.to_le_bytes());
    assert!(matches!(
        Matrix::open_file(&offsets),
        Err(Error::Corrupt(_))
    ));
    // A segment whose file grew after creation: the header no longer matches.
    let grown = dir.path("grown");
    drop(Matrix::create_file(&grown, SIZE).unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&grown)
        .unwrap()
        .set_len(SIZE as u64 * 2)
        .unwrap();
    assert!(matches!(Matrix::open_file(&grown), Err(Error::Corrupt(_))));
    // Failed opens changed nothing.
    assert_eq!(std::fs::metadata(&cut).unwrap().len(), SIZE as u64 / 2);
    assert_eq!(std::fs::metadata(&foreign).unwrap().len(), SIZE as u64);
    assert_eq!(std::fs::metadata(&grown).unwrap().len(), SIZE as u64 * 2);
    assert!(matches!(
        Matrix::open_file(dir.path("missing")),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn opening_never_truncates_or_resizes() {
    let dir = TempDir::new("resize");
    let path = dir.path("seg");
    drop(Matrix::create_file(&path, SIZE).unwrap());
    let before = std::fs::metadata(&path).unwrap();
    let m = Matrix::open_file(&path).unwrap();
    drop(m);
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(before.len(), after.len());
    assert_eq!(before.ino(), after.ino());
}

#[test]
fn symlinks_are_never_followed() {
    let dir = TempDir::new("symlink");
    let target = dir.path("target");
    drop(Matrix::create_file(&target, SIZE).unwrap());
    let link = dir.path("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(matches!(
        Matrix::open_file(&link),
        Err(Error::NotARegularFile(_))
    ));
    assert!(matches!(
        Matrix::create_file(&link, SIZE),
        Err(Error::AlreadyExists(_))
    ));
    // A dangling symlink is not followed to create its target either.
    let dangling = dir.path("dangling");
    std::os::unix::fs::symlink(dir.path("nowhere"), &dangling).unwrap();
    assert!(Matrix::create_file(&dangling, SIZE).is_err());
    assert!(!dir.path("nowhere").exists());
    // Directories and devices are not segments.
    assert!(matches!(
        Matrix::open_file(&dir.0),
        Err(Error::NotARegularFile(_)) | Err(Error::Io(_))
    ));
    assert!(matches!(
        Matrix::open_file("/dev/null"),
        Err(Error::NotARegularFile(_))
    ));
}

#[test]
fn a_creator_that_died_while_formatting_is_reported() {
    let dir = TempDir::new("died");
    let path = dir.path("seg");
    drop(Matrix::create_file(&path, SIZE).unwrap());
    // A pid that existed and is gone now.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    // state word (bytes 8..16): phase FORMATTING (1) in the high half, the pid low.
    write_at(&path, 8, &(1u64 << 32 | pid as u64).to_le_bytes());
    let started = std::time::Instant::now();
    assert!(matches!(Matrix::open_file(&path), Err(Error::CreatorDied { pid: p }) if p == pid));
    // Reported at once, not after a timeout (generous bound; not a benchmark).
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn a_sixteen_gib_segment_commits_memory_only_as_touched() {
    let m = Matrix::create(16 << 30).unwrap();
    assert!(m.capacity() > 12 << 30);
    let mut blocks = Vec::new();
    for size in [1 << 30, 4 << 30, 100, 1 << 20] {
        let p = m.alloc(layout(size, 4096)).unwrap();
        // Touch the first and last page only.
        unsafe {
            p.as_ptr().write(1);
            p.as_ptr().add(size - 1).write(1);
        }
        blocks.push(p);
    }
    m.check().unwrap();
    let used = std::fs::metadata(m.path().unwrap()).unwrap().blocks() * 512;
    assert!(
        used < 64 << 20,
        "{used} bytes committed for a sparse 16 GiB segment"
    );
    for p in blocks {
        unsafe { m.free(p).unwrap() };
    }
    assert_pristine(&m);
}

#[test]
fn anonymous_segments_work_and_are_private() {
    let m = Matrix::anonymous(16 << 30).unwrap();
    assert!(m.path().is_none());
    let p = m.alloc(layout(8 << 30, 64)).unwrap();
    unsafe { m.free(p).unwrap() };
    assert_pristine(&m);
}
