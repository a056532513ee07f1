//! Segment lifetime: creating, opening and mapping the memory the engine
//! lives in, and the init guard.
//!
//! Backends: a named segment (a file under `/dev/shm` named from a uuid, the
//! Linux form of POSIX shared memory), a file at any path, and anonymous
//! memory. All are mapped with `memmap2`. Named and file segments are created
//! with `O_CREAT | O_EXCL` (which refuses symlinks and existing files),
//! `O_NOFOLLOW`, `O_CLOEXEC`, mode `0600`; they are sized with `ftruncate`,
//! which leaves them sparse: memory is committed only as pages are touched.

mod fixed;
pub(crate) mod header;

use crate::engine::{Engine, Layout};
use crate::Error;
use header::{SegmentHeader, HEADER_SPACE, PHASE_FORMATTING, PHASE_READY};
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// Smallest segment accepted.
pub const MIN_SEGMENT_SIZE: u64 = 64 * 1024;
/// Largest segment accepted: block positions are 32-bit granule indices.
pub const MAX_SEGMENT_SIZE: u64 = (1u64 << 36) - 4096;

/// How long `bootstrap` waits for a racing creator to finish formatting.
pub(crate) const RACE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a plain open waits: the segment was normally created before its
/// name was handed over, so only a short grace period.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_millis(100);

pub(crate) use fixed::{DEFAULT_ALIGN, DEFAULT_RANGE};

/// A mapped segment with a validated header.
pub(crate) struct Segment {
    map: Mapping,
    pub(crate) layout: Layout,
    backing: Backing,
}

/// What is behind the mapping, which says how freed memory goes back to
/// the OS (`Segment::purge`).
enum Backing {
    /// Private anonymous memory: its pages are dropped.
    Anonymous,
    /// A file, in tmpfs or on disk, kept open: holes are punched in it.
    File(File),
    /// A read-only view: nothing is freed through it.
    ReadOnly,
}

/// The memory behind a segment: where the kernel put it, or at the fixed
/// address of a pinned segment.
enum Mapping {
    Anywhere(MmapRaw),
    Fixed(fixed::FixedMap),
}

pub(crate) fn check_size(size: u64) -> Result<(), Error> {
    if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&size) {
        return Err(Error::InvalidSize {
            requested: size,
            min: MIN_SEGMENT_SIZE,
            max: MAX_SEGMENT_SIZE,
        });
    }
    Ok(())
}

impl Segment {
    pub(crate) fn base(&self) -> *mut u8 {
        match &self.map {
            Mapping::Anywhere(m) => m.as_mut_ptr(),
            Mapping::Fixed(m) => m.as_mut_ptr(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.map {
            Mapping::Anywhere(m) => m.len(),
            Mapping::Fixed(m) => m.len(),
        }
    }

    /// The address every process maps this segment at, if it is pinned.
    pub(crate) fn pinned_at(&self) -> Option<u64> {
        Some(self.header().pinned_at).filter(|&a| a != 0)
    }

    /// The id stored in the header.
    pub(crate) fn id(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.header().id)
    }

    fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping is at least MIN_SEGMENT_SIZE bytes (checked by
        // every constructor before this is called), page-aligned, and the
        // header's fields are plain integers or atomics.
        unsafe { &*(self.base() as *const SegmentHeader) }
    }

    /// The engine view of this segment.
    pub(crate) fn engine(&self) -> Engine {
        // SAFETY: `layout` was computed for, or validated against, this
        // mapping, which lives as long as `Segment`; `Matrix` drops the engine
        // with (never after) the segment.
        let mut engine = unsafe { Engine::attach(self.base(), &self.layout) };
        if let Some(how) = self.purge() {
            engine.set_purge(how);
        }
        engine
    }

    /// How memory freed in this segment goes back to the OS, if it does.
    fn purge(&self) -> Option<crate::os::Purge> {
        match &self.backing {
            Backing::Anonymous => Some(crate::os::Purge::DontNeed),
            Backing::File(f) => Some(crate::os::Purge::Punch(f.as_raw_fd())),
            Backing::ReadOnly => None,
        }
    }

    /// Formats a new, zero-filled mapping: header, engine, ready mark.
    fn format(map: Mapping, backing: Backing, id: uuid::Uuid) -> Result<Segment, Error> {
        crate::stats::check_atomics()?;
        let (size, pinned_at) = match &map {
            Mapping::Anywhere(m) => (m.len() as u64, 0),
            Mapping::Fixed(m) => (m.len() as u64, m.as_mut_ptr() as u64),
        };
        let layout = Layout::for_segment(size, HEADER_SPACE).ok_or(Error::InvalidSize {
            requested: size,
            min: MIN_SEGMENT_SIZE,
            max: MAX_SEGMENT_SIZE,
        })?;
        let seg = Segment {
            map,
            layout,
            backing,
        };
        seg.header().mark_formatting();
        // SAFETY: nobody else reads the fields written here before the
        // `Release` store of the ready mark below; the mapping is writable.
        unsafe { (*(seg.base() as *mut SegmentHeader)).write(size, &layout, id, pinned_at) };
        seg.engine().format();
        seg.header().mark_ready();
        Ok(seg)
    }

    /// Creates an anonymous, process-private segment.
    pub(crate) fn anonymous(size: u64, id: uuid::Uuid) -> Result<Segment, Error> {
        check_size(size)?;
        let map = MmapOptions::new()
            .len(size as usize)
            .no_reserve_swap()
            .map_anon()?;
        Segment::format(
            Mapping::Anywhere(MmapRaw::from(map)),
            Backing::Anonymous,
            id,
        )
    }

    /// Creates a new segment in a file that must not exist yet, mapped at
    /// `pinned_at` if given (see `fixed`).
    pub(crate) fn create_file(
        path: &Path,
        size: u64,
        id: uuid::Uuid,
        pinned_at: Option<u64>,
    ) -> Result<Segment, Error> {
        check_size(size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Error::AlreadyExists(path.to_path_buf()),
                _ => Error::Io(e),
            })?;
        let formatted = (|| {
            file.set_len(size)?;
            let map = match pinned_at {
                None => Mapping::Anywhere(MmapOptions::new().len(size as usize).map_raw(&file)?),
                Some(at) => Mapping::Fixed(fixed::FixedMap::map(&file, at, size as usize)?),
            };
            Segment::format(map, Backing::File(file), id)
        })();
        if formatted.is_err() {
            // Don't leave a half-made file behind.
            let _ = std::fs::remove_file(path);
        }
        formatted
    }

    /// Opens an existing segment file, waiting up to `patience` for a
    /// creator that is still sizing or formatting it. Never truncates or
    /// resizes the file.
    pub(crate) fn open_file(path: &Path, patience: Duration) -> Result<Segment, Error> {
        crate::stats::check_atomics()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_error(path, e))?;
        let deadline = Instant::now() + patience;
        // A racing creator may not have sized the file yet.
        let len = loop {
            let meta = file.metadata()?;
            let ft = meta.file_type();
            if !ft.is_file()
                || ft.is_fifo()
                || ft.is_socket()
                || ft.is_block_device()
                || ft.is_char_device()
            {
                return Err(Error::NotARegularFile(path.to_path_buf()));
            }
            if meta.len() > 0 || Instant::now() >= deadline {
                break meta.len();
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if len < MIN_SEGMENT_SIZE {
            return Err(Error::Truncated {
                file_len: len,
                expected: MIN_SEGMENT_SIZE,
            });
        }
        if len > MAX_SEGMENT_SIZE {
            return Err(Error::InvalidSize {
                requested: len,
                min: MIN_SEGMENT_SIZE,
                max: MAX_SEGMENT_SIZE,
            });
        }
        let map = MmapOptions::new().len(len as usize).map_raw(&file)?;
        let mut seg = Segment {
            map: Mapping::Anywhere(map),
            layout: Layout::for_segment(len, HEADER_SPACE).ok_or(Error::Corrupt("size"))?,
            backing: Backing::File(file),
        };
        seg.wait_ready(deadline)?;
        seg.layout = seg.header().validate(len)?;
        if let (Some(at), Backing::File(file)) = (seg.pinned_at(), &seg.backing) {
            // A pinned segment is only ever used at its own address: map it
            // there (the header is read from the first mapping).
            seg.map = Mapping::Fixed(fixed::FixedMap::map(file, at, len as usize)?);
            seg.layout = seg.header().validate(len)?;
            if seg.pinned_at() != Some(at) {
                return Err(Error::Corrupt("pinned address changed"));
            }
        }
        Ok(seg)
    }

    /// Opens the segment file at `path` for reading only: a read-only
    /// mapping (anywhere, even for a pinned segment: nothing read here is
    /// an address), so that nothing done through it can change the segment.
    /// No waiting: a segment still being formatted is an error.
    pub(crate) fn open_read_only(path: &Path) -> Result<Segment, Error> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_error(path, e))?;
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(Error::NotARegularFile(path.to_path_buf()));
        }
        let len = meta.len();
        if len < MIN_SEGMENT_SIZE {
            return Err(Error::Truncated {
                file_len: len,
                expected: MIN_SEGMENT_SIZE,
            });
        }
        check_size(len)?;
        let map = MmapOptions::new()
            .len(len as usize)
            .map_raw_read_only(&file)?;
        let mut seg = Segment {
            map: Mapping::Anywhere(map),
            layout: Layout::for_segment(len, HEADER_SPACE).ok_or(Error::Corrupt("size"))?,
            backing: Backing::ReadOnly,
        };
        seg.wait_ready(Instant::now())?;
        seg.layout = seg.header().validate(len)?;
        Ok(seg)
    }

    /// The layout version the header states, whatever it is.
    pub(crate) fn layout_version(&self) -> u32 {
        self.header().layout_version
    }

    /// Waits until the header's state word says ready, failing fast on a
    /// foreign file and on a creator that died while formatting.
    fn wait_ready(&self, deadline: Instant) -> Result<(), Error> {
        let h = self.header();
        loop {
            let magic = h.magic.load(std::sync::atomic::Ordering::Relaxed);
            if magic != 0 && magic != header::MAGIC {
                return Err(Error::BadMagic);
            }
            let state = h.state.load(std::sync::atomic::Ordering::Acquire);
            let (phase, pid) = (state >> 32, state as u32);
            match phase {
                PHASE_READY => return Ok(()),
                PHASE_FORMATTING if !crate::os::process_alive(pid) => {
                    return Err(Error::CreatorDied { pid })
                }
                PHASE_FORMATTING | 0 => {}
                _ => return Err(Error::Corrupt("state word")),
            }
            if Instant::now() >= deadline {
                return Err(if magic == 0 {
                    Error::BadMagic
                } else {
                    Error::InitTimeout
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn open_error(path: &Path, e: io::Error) -> Error {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) => Error::NotFound(path.to_path_buf()),
        (_, Some(libc::ELOOP)) => Error::NotARegularFile(path.to_path_buf()),
        _ => Error::Io(e),
    }
}

/// Where named segments live.
pub(crate) const SHM_DIR: &str = "/dev/shm";
/// Prefix of the file name of a named segment.
pub(crate) const NAME_PREFIX: &str = "matrix-alloc-";

/// The path of the named segment with this id.
pub(crate) fn named_path(id: &uuid::Uuid) -> NamedPath {
    let mut buf = [0u8; NAMED_PATH_LEN];
    let (dir, prefix) = (SHM_DIR.as_bytes(), NAME_PREFIX.as_bytes());
    buf[..dir.len()].copy_from_slice(dir);
    buf[dir.len()] = b'/';
    let name = dir.len() + 1;
    buf[name..name + prefix.len()].copy_from_slice(prefix);
    id.as_hyphenated()
        .encode_lower(&mut buf[name + prefix.len()..]);
    NamedPath(buf)
}

const NAMED_PATH_LEN: usize = SHM_DIR.len() + 1 + NAME_PREFIX.len() + uuid::fmt::Hyphenated::LENGTH;

/// The path of a named segment, held inline: making one does not allocate,
/// which the allocation-free constructors rely on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct NamedPath([u8; NAMED_PATH_LEN]);

impl std::ops::Deref for NamedPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        use std::os::unix::ffi::OsStrExt;
        Path::new(std::ffi::OsStr::from_bytes(&self.0))
    }
}

impl std::fmt::Debug for NamedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}
