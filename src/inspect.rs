//! A read-only view of a segment, for tools (the `matrix-alloc` command):
//! figures, the `check()` census, the heap's blocks, pages and processes,
//! and the directory, read through a read-only mapping without attaching.
//!
//! Nothing done through an [`Inspector`] can change the segment: the kernel
//! refuses every write to the mapping, and the inspector takes no slot,
//! flushes no counters and takes no lock. So it works on a segment that
//! other processes are using, and on a damaged one; what it reads from a
//! segment in use is a snapshot that may be caught mid-operation (as
//! [`crate::Matrix::check`] says of itself).

use crate::cache::{self, PageInfo};
use crate::directory::DirEntry;
use crate::engine::{Engine, HeapReport, Region, SLOTS};
use crate::matrix::{check_segment, stats_of};
use crate::segment::{self, Segment};
use crate::{Error, Stats};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use uuid::Uuid;

/// A process attached to a segment (one slot of its control block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The slot it holds.
    pub slot: usize,
    /// Its pid.
    pub pid: u32,
    /// Whether a process with that pid exists (a reused pid reads alive).
    pub alive: bool,
}

/// A segment opened for reading only (see the module notes).
///
/// ```
/// # fn main() -> Result<(), matrix_alloc::Error> {
/// use matrix_alloc::{Inspector, Matrix};
/// let m = Matrix::create(1 << 20)?;
/// let p = m.alloc(std::alloc::Layout::new::<[u8; 4096]>())?;
/// let seen = Inspector::open(m.id())?;
/// assert_eq!(seen.processes().len(), 1);
/// assert!(seen.check()?.used_blocks >= 1);
/// # // SAFETY: `p` is live and freed once.
/// # unsafe { m.free(p)? };
/// # Ok(())
/// # }
/// ```
pub struct Inspector {
    engine: Engine,
    segment: Segment,
    path: PathBuf,
}

impl Inspector {
    /// Opens the named segment `id` (under `/dev/shm`) for reading.
    pub fn open(id: Uuid) -> Result<Inspector, Error> {
        Inspector::open_file(&*segment::named_path(&id))
    }

    /// Opens the segment file at `path` for reading.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Inspector, Error> {
        let path = path.as_ref();
        let segment = Segment::open_read_only(path)?;
        Ok(Inspector {
            engine: segment.engine(),
            segment,
            path: path.to_path_buf(),
        })
    }

    /// The segment's id.
    pub fn id(&self) -> Uuid {
        self.segment.id()
    }

    /// The file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the segment (the file's size).
    pub fn segment_size(&self) -> usize {
        self.segment.len()
    }

    /// Bytes of its heap.
    pub fn capacity(&self) -> usize {
        self.engine.capacity() as usize
    }

    /// The layout version it was made with (this crate's, or opening fails).
    pub fn layout_version(&self) -> u32 {
        self.segment.layout_version()
    }

    /// The counters, as [`crate::Matrix::stats`] gives them but for the batched
    /// changes that live threads have not applied yet.
    pub fn stats(&self) -> Stats {
        stats_of(&self.engine)
    }

    /// The census and invariant walk of [`crate::Matrix::check`]; damage is
    /// `Error::HeapCorrupt` with where.
    pub fn check(&self) -> Result<HeapReport, Error> {
        check_segment(&self.engine)
    }

    /// The processes attached, live and dead.
    pub fn processes(&self) -> Vec<Attached> {
        self.engine.control().slots[..SLOTS]
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                let pid = u32::try_from(s.pid.load(Relaxed)).ok()?;
                (pid != 0).then(|| Attached {
                    slot,
                    pid,
                    alive: crate::os::process_alive(pid),
                })
            })
            .collect()
    }

    /// Every block of the heap in address order: the fragmentation map.
    pub fn regions(&self) -> Result<Vec<Region>, Error> {
        self.engine.regions()
    }

    /// Every small-object page: its block size, how full, whose.
    pub fn pages(&self) -> Result<Vec<PageInfo>, Error> {
        cache::pages(&self.engine)
            .map_err(|n| Error::HeapCorrupt(format!("small-object page {n} has a damaged header")))
    }

    /// The objects published in the segment's directory.
    pub fn directory(&self) -> Result<Vec<DirEntry>, Error> {
        crate::directory::list_unlocked(&self.engine)
    }
}

/// Every named segment under `/dev/shm` (by the crate's file names):
/// (id, path), whether or not it opens.
pub fn named_segments() -> std::io::Result<Vec<(Uuid, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(segment::SHM_DIR)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(named_segment_id) else {
            continue;
        };
        out.push((id, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// The file of the named segment `id`, whether or not it exists.
pub fn named_segment_path(id: Uuid) -> PathBuf {
    segment::named_path(&id).to_path_buf()
}

/// The id of the named segment whose file is called `file_name`, if that
/// is the name of one.
///
/// ```
/// let id = uuid::Uuid::new_v4();
/// let path = matrix_alloc::named_segment_path(id);
/// let name = path.file_name().unwrap().to_str().unwrap();
/// assert_eq!(matrix_alloc::named_segment_id(name), Some(id));
/// assert_eq!(matrix_alloc::named_segment_id("notes.txt"), None);
/// ```
pub fn named_segment_id(file_name: &str) -> Option<Uuid> {
    let id = file_name.strip_prefix(segment::NAME_PREFIX)?;
    Uuid::parse_str(id).ok()
}
