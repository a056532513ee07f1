//! The named directory of a segment: objects published under a name, found
//! by any process that maps the segment, type-checked.
//!
//! The directory is one table in the segment's heap, made on first use
//! (its offset lives in the engine's control block), of `ENTRIES` entries
//! and a [`ShmMutex`] that every change and every lookup holds. An entry is
//! invisible until its last write, `state = READY`, so a process killed at
//! any step of a publish leaves either no entry or a whole one; the lock
//! survives it (the next locker takes over within `LIVENESS_POLL`), so no
//! name is wedged. The kill tests step through every point of the protocol
//! with the engine-step hook, which each step below counts.
//!
//! Type identity: the hash of `std::any::type_name::<T>()`, the size and
//! the alignment. It is the same in every process built from the same code;
//! a lookup under another type is `Error::TypeMismatch`.

use crate::engine::Engine;
use crate::handle::TypeIdentity;
use crate::lock::ShmMutex;
use crate::os::engine_step;
use crate::{Error, Handle, Matrix, Offset, Shareable};
use std::sync::atomic::{
    AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};

/// The longest name, in bytes of UTF-8.
pub const NAME_MAX: usize = 64;
/// Entries in a segment's directory.
pub const ENTRIES: usize = 128;
/// Bytes of a type's name kept for listings (the identity uses all of it).
const TYPE_NAME_KEPT: usize = 64;

const FREE: u64 = 0;
const READY: u64 = 1;

#[repr(C)]
struct Entry {
    /// `FREE` or `READY`; written last when an entry is made, first when it
    /// is removed.
    state: AtomicU64,
    handle: AtomicU64,
    type_hash: AtomicU64,
    size: AtomicU64,
    align: AtomicU64,
    name_len: AtomicU64,
    /// Name bytes, eight to a word.
    name: [AtomicU64; NAME_MAX / 8],
    type_name_len: AtomicU64,
    type_name: [AtomicU64; TYPE_NAME_KEPT / 8],
}

#[repr(C)]
struct Table {
    lock: ShmMutex<()>,
    entries: [Entry; ENTRIES],
}

/// One published object, as [`Matrix::directory`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name it is published under.
    pub name: String,
    /// Its type's name (the first 64 bytes of `std::any::type_name`).
    pub type_name: String,
    /// `size_of` its type.
    pub size: u64,
    /// `align_of` its type.
    pub align: u64,
    /// Where it is in the segment.
    pub offset: Offset,
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(Error::InvalidName(name.into()));
    }
    Ok(())
}

fn store_bytes(words: &[AtomicU64], len: &AtomicU64, bytes: &[u8]) {
    for (i, w) in words.iter().enumerate() {
        let mut chunk = [0u8; 8];
        let part = bytes.get(i * 8..).unwrap_or(&[]);
        let n = part.len().min(8);
        chunk[..n].copy_from_slice(&part[..n]);
        w.store(u64::from_le_bytes(chunk), Relaxed);
        engine_step();
    }
    len.store(bytes.len() as u64, Relaxed);
}

fn load_bytes(words: &[AtomicU64], len: &AtomicU64) -> Vec<u8> {
    let len = (len.load(Relaxed) as usize).min(words.len() * 8);
    let mut out: Vec<u8> = words
        .iter()
        .flat_map(|w| w.load(Relaxed).to_le_bytes())
        .collect();
    out.truncate(len);
    out
}

impl Entry {
    fn name_is(&self, name: &str) -> bool {
        self.name_len.load(Relaxed) == name.len() as u64
            && load_bytes(&self.name, &self.name_len) == name.as_bytes()
    }

    fn identity(&self) -> TypeIdentity {
        TypeIdentity {
            hash: self.type_hash.load(Relaxed),
            size: self.size.load(Relaxed),
            align: self.align.load(Relaxed),
        }
    }

    fn type_name(&self) -> String {
        String::from_utf8_lossy(&load_bytes(&self.type_name, &self.type_name_len)).into_owned()
    }

    /// Fills a free entry and makes it visible (the caller holds the lock).
    fn fill<T>(&self, name: &str, h: Handle<T>) {
        let id = TypeIdentity::of::<T>();
        self.handle.store(h.to_raw(), Relaxed);
        engine_step();
        self.type_hash.store(id.hash, Relaxed);
        self.size.store(id.size, Relaxed);
        self.align.store(id.align, Relaxed);
        engine_step();
        store_bytes(&self.name, &self.name_len, name.as_bytes());
        let type_name = std::any::type_name::<T>().as_bytes();
        let kept = &type_name[..type_name.len().min(TYPE_NAME_KEPT)];
        store_bytes(&self.type_name, &self.type_name_len, kept);
        // `Release`: a reader that sees `READY` (under the lock, or a tool
        // reading without it) sees every field above.
        self.state.store(READY, Release);
        engine_step();
    }
}

impl Matrix {
    /// The directory table, made if this is the segment's first use of it.
    fn table(&self) -> Result<&Table, Error> {
        let word = self.engine().directory_word();
        let mut off = word.load(Acquire);
        if off == 0 {
            let layout = std::alloc::Layout::new::<Table>();
            let p = self.alloc(layout)?;
            // SAFETY: a fresh block of `size_of::<Table>()` bytes; all zero
            // is an empty table with an unlocked lock.
            unsafe { p.as_ptr().write_bytes(0, layout.size()) };
            let mine = self.offset_of(p.as_ptr()).ok_or(Error::NotInSegment)?.0;
            // `AcqRel`: publishes the zeroed table (`Release`), and a loser
            // reads the winner's (`Acquire`).
            match word.compare_exchange(0, mine, AcqRel, Acquire) {
                Ok(_) => off = mine,
                Err(theirs) => {
                    // SAFETY: our own block, never published.
                    unsafe { self.free(p) }?;
                    off = theirs;
                }
            }
        }
        let p = self
            .resolve::<Table>(Offset(off))
            .ok_or(Error::Corrupt("directory offset"))?;
        if self.live_block_len(p.as_ptr().cast())? < size_of::<Table>() {
            return Err(Error::Corrupt("directory block"));
        }
        // SAFETY: in bounds, aligned, a live block large enough; the table
        // is atomics only, and it is never freed while the segment exists.
        Ok(unsafe { p.as_ref() })
    }

    /// Runs `f` with the directory locked. A holder that died is taken over:
    /// entries are whole or invisible, so nothing needs repair.
    fn with_directory<R>(&self, f: impl FnOnce(&Table) -> R) -> Result<R, Error> {
        let table = self.table()?;
        let guard = match table.lock.lock(self) {
            Ok(g) => g,
            Err(e) => e.into_guard().ok_or(Error::NotInSegment)?,
        };
        engine_step();
        let r = f(table);
        drop(guard);
        Ok(r)
    }

    /// Publishes `h` under `name`. `Error::NameTaken` if the name is in use,
    /// `Error::DirectoryFull` if every entry is.
    ///
    /// ```
    /// # fn main() -> Result<(), matrix_alloc::Error> {
    /// use matrix_alloc::Matrix;
    /// let m = Matrix::create(1 << 20)?;
    /// let h = m.alloc_value(42u64)?;
    /// m.publish("answer", h)?;
    /// // Any process that opens the segment by its id finds it by name.
    /// let other = Matrix::open(m.id())?;
    /// let found = other.lookup::<u64>("answer")?.expect("published");
    /// assert_eq!(*other.get(found)?, 42);
    /// // Under another type, the lookup is refused.
    /// assert!(other.lookup::<u32>("answer").is_err());
    /// # m.unpublish("answer")?;
    /// # // SAFETY: `h` is live, unpublished, and no reference to it remains.
    /// # unsafe { m.free_value(h)? };
    /// # Ok(())
    /// # }
    /// ```
    pub fn publish<T: Shareable>(&self, name: &str, h: Handle<T>) -> Result<(), Error> {
        check_name(name)?;
        self.get_ptr(h)?;
        self.with_directory(|t| publish_in(t, name, h))?
    }

    /// The handle published under `name`, if any, as a `T`:
    /// `Error::TypeMismatch` if it was published as another type.
    pub fn lookup<T: Shareable>(&self, name: &str) -> Result<Option<Handle<T>>, Error> {
        check_name(name)?;
        self.with_directory(|t| lookup_in::<T>(t, name))?
    }

    /// The object published under `name`; if there is none, allocates
    /// `init()` and publishes it, all under the directory's lock, so that of
    /// many threads and processes racing on one name exactly one constructs
    /// it. A process killed while constructing publishes nothing (its block
    /// is lost, as a dead process's in-flight blocks are).
    ///
    /// ```
    /// # fn main() -> Result<(), matrix_alloc::Error> {
    /// use matrix_alloc::Matrix;
    /// let m = Matrix::create(1 << 20)?;
    /// let a = m.find_or_construct("counter", || 0u64)?;
    /// let b = m.find_or_construct("counter", || 99u64)?; // found, not made
    /// assert_eq!(a, b);
    /// assert_eq!(*m.get(b)?, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn find_or_construct<T: Shareable>(
        &self,
        name: &str,
        init: impl FnOnce() -> T,
    ) -> Result<Handle<T>, Error> {
        check_name(name)?;
        self.with_directory(|t| {
            if let Some(h) = lookup_in::<T>(t, name)? {
                return Ok(h);
            }
            let h = self.alloc_value(init())?;
            match publish_in(t, name, h) {
                Ok(()) => Ok(h),
                Err(e) => {
                    // SAFETY: our own object, never published.
                    unsafe { self.free_value(h) }?;
                    Err(e)
                }
            }
        })?
    }

    /// Removes `name` from the directory; returns whether it was there. The
    /// object itself stays: free it through its handle when no process uses
    /// it any more.
    pub fn unpublish(&self, name: &str) -> Result<bool, Error> {
        check_name(name)?;
        self.with_directory(|t| match find(t, name) {
            Some(e) => {
                e.state.store(FREE, Release);
                engine_step();
                true
            }
            None => false,
        })
    }

    /// Every published object: name, type, size (for tools).
    pub fn directory(&self) -> Result<Vec<DirEntry>, Error> {
        self.with_directory(list)
    }
}

fn list(t: &Table) -> Vec<DirEntry> {
    t.entries
        .iter()
        .filter(|e| e.state.load(Acquire) == READY)
        .map(|e| DirEntry {
            name: String::from_utf8_lossy(&load_bytes(&e.name, &e.name_len)).into_owned(),
            type_name: e.type_name(),
            size: e.size.load(Relaxed),
            align: e.align.load(Relaxed),
            offset: Handle::<()>::from_raw(e.handle.load(Relaxed)).offset(),
        })
        .collect()
}

/// The published objects, read without the directory's lock and without
/// making a directory where there is none (`Inspector`, over a read-only
/// mapping): an entry being written meanwhile may be missed.
pub(crate) fn list_unlocked(engine: &Engine) -> Result<Vec<DirEntry>, Error> {
    let off = engine.directory_word().load(Acquire);
    if off == 0 {
        return Ok(Vec::new());
    }
    let ptr = engine.base_ptr().wrapping_add(off as usize);
    let len = crate::cache::live_block_len(engine, ptr)
        .map_err(|_| Error::Corrupt("directory offset"))?;
    if len < size_of::<Table>() || off as usize % align_of::<Table>() != 0 {
        return Err(Error::Corrupt("directory block"));
    }
    // SAFETY: a live block inside the heap, aligned and large enough for
    // the table, which is atomics only.
    Ok(list(unsafe { &*(ptr as *const Table) }))
}

fn find<'t>(t: &'t Table, name: &str) -> Option<&'t Entry> {
    t.entries
        .iter()
        .find(|e| e.state.load(Acquire) == READY && e.name_is(name))
}

fn lookup_in<T>(t: &Table, name: &str) -> Result<Option<Handle<T>>, Error> {
    let Some(e) = find(t, name) else {
        return Ok(None);
    };
    if e.identity() != TypeIdentity::of::<T>() {
        return Err(Error::TypeMismatch {
            expected: std::any::type_name::<T>().into(),
            found: format!("{} (published as such)", e.type_name()),
        });
    }
    Ok(Some(Handle::from_raw(e.handle.load(Relaxed))))
}

fn publish_in<T>(t: &Table, name: &str, h: Handle<T>) -> Result<(), Error> {
    if find(t, name).is_some() {
        return Err(Error::NameTaken(name.into()));
    }
    let free = t
        .entries
        .iter()
        .find(|e| e.state.load(Relaxed) == FREE)
        .ok_or(Error::DirectoryFull)?;
    free.fill(name, h);
    Ok(())
}
