//! The one error type of the crate.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in `matrix-alloc`, as a typed value.
///
/// Library code never panics on bad input; it returns one of these.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    Io(io::Error),
    /// A named segment or file that was to be opened does not exist.
    NotFound(PathBuf),
    /// A segment with this name or path already exists (exclusive create).
    AlreadyExists(PathBuf),
    /// The requested segment size is below the minimum or above the maximum.
    InvalidSize {
        /// What was asked for.
        requested: u64,
        /// The smallest size accepted.
        min: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// The file is smaller than a segment header, or shorter than its header says.
    Truncated {
        /// The file's length.
        file_len: u64,
        /// The length the header or format requires.
        expected: u64,
    },
    /// The file does not start with the matrix magic number: not a segment.
    BadMagic,
    /// The segment was written by an incompatible layout version.
    VersionMismatch {
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// A header field is out of bounds or inconsistent; the segment is corrupt.
    Corrupt(&'static str),
    /// The path is not a regular file (a symlink, directory, device, FIFO …).
    NotARegularFile(PathBuf),
    /// The creator of the segment died while formatting it.
    CreatorDied {
        /// The creator's process id.
        pid: u32,
    },
    /// The segment did not become ready in time (creator slow or gone).
    InitTimeout,
    /// The request cannot be satisfied: not enough free memory right now.
    OutOfMemory {
        /// The size asked for.
        requested: usize,
    },
    /// A size/alignment combination that overflows or cannot be represented.
    InvalidLayout,
    /// The pointer does not lie in this segment's heap, or is not a block start.
    InvalidPointer,
    /// The block was already freed (double free).
    DoubleFree,
    /// `check()` found a broken heap invariant.
    HeapCorrupt(String),
    /// This machine lacks something the crate needs (named).
    Unsupported(&'static str),
    /// A handle whose bits name no place an object can be in this segment
    /// (out of bounds, misaligned, or damaged).
    InvalidHandle,
    /// A handle made for another segment.
    ForeignHandle,
    /// A handle whose object is gone: no live block starts there, or the
    /// block is too small for the type.
    StaleHandle,
    /// An object was asked for as another type than the one it was made or
    /// published as (size, alignment or type identity differ).
    TypeMismatch {
        /// The type asked for.
        expected: String,
        /// The type it has.
        found: String,
    },
    /// A directory name that is empty or longer than `directory::NAME_MAX`
    /// bytes.
    InvalidName(String),
    /// The segment's directory has no free entry.
    DirectoryFull,
    /// `publish` of a name that is already published.
    NameTaken(String),
    /// A pinned segment's address range is taken in this process.
    AddressInUse {
        /// Where the segment must be mapped.
        address: u64,
        /// How long it is.
        len: u64,
    },
    /// The object is not in this segment (a lock or collection handed
    /// another segment's matrix).
    NotInSegment,
    /// A block id whose block has been freed (use after free).
    StaleBlock,
    /// A block id that names no block this front end ever gave out
    /// (forged, damaged, or of another segment).
    InvalidBlock,
    /// A read or write past the end of a block.
    OutOfBounds {
        /// Where the access starts.
        offset: usize,
        /// How many bytes it covers.
        len: usize,
        /// The block's length.
        block_len: usize,
    },
    /// A block size outside the configured bounds.
    BlockSize {
        /// What was asked for.
        size: usize,
        /// The smallest size allowed.
        min: usize,
        /// The largest size allowed.
        max: usize,
    },
    /// A configuration that cannot work, and why.
    InvalidConfig(String),
    /// A wait (for memory) ran out of time.
    Timeout,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::NotFound(p) => write!(f, "segment not found: {}", p.display()),
            Error::AlreadyExists(p) => write!(f, "segment already exists: {}", p.display()),
            Error::InvalidSize {
                requested,
                min,
                max,
            } => write!(
                f,
                "invalid segment size {requested} (must be between {min} and {max} bytes)"
            ),
            Error::Truncated { file_len, expected } => write!(
                f,
                "segment file is truncated: {file_len} bytes, at least {expected} expected"
            ),
            Error::BadMagic => write!(f, "not a matrix-alloc segment (bad magic)"),
            Error::VersionMismatch { found, expected } => write!(
                f,
                "segment layout version {found} is not supported (expected {expected})"
            ),
            Error::Corrupt(what) => write!(f, "corrupt segment header: {what}"),
            Error::NotARegularFile(p) => write!(f, "not a regular file: {}", p.display()),
            Error::CreatorDied { pid } => {
                write!(f, "segment creator (pid {pid}) died while formatting it")
            }
            Error::InitTimeout => write!(f, "timed out waiting for the segment to be formatted"),
            Error::OutOfMemory { requested } => {
                write!(f, "out of memory: no free block for {requested} bytes")
            }
            Error::InvalidLayout => write!(f, "size or alignment overflows or is unsupported"),
            Error::InvalidPointer => {
                write!(f, "pointer is not the start of a block of this segment")
            }
            Error::DoubleFree => write!(f, "double free: block is not allocated"),
            Error::HeapCorrupt(what) => write!(f, "heap invariant broken: {what}"),
            Error::Unsupported(what) => write!(f, "unsupported here: {what}"),
            Error::InvalidHandle => write!(f, "invalid handle: no object can be there"),
            Error::ForeignHandle => write!(f, "handle of another segment"),
            Error::StaleHandle => write!(f, "stale handle: its object was freed"),
            Error::TypeMismatch { expected, found } => {
                write!(
                    f,
                    "type mismatch: asked for {expected}, the object is {found}"
                )
            }
            Error::InvalidName(name) => write!(
                f,
                "invalid name {name:?}: names are 1 to {} bytes of UTF-8",
                crate::directory::NAME_MAX
            ),
            Error::DirectoryFull => write!(f, "the segment's directory is full"),
            Error::NameTaken(name) => write!(f, "name {name:?} is already published"),
            Error::AddressInUse { address, len } => write!(
                f,
                "address range {address:#x}..{:#x} is in use in this process",
                address + len
            ),
            Error::NotInSegment => write!(f, "the object does not lie in this segment"),
            Error::StaleBlock => write!(f, "the block has been freed (stale block id)"),
            Error::InvalidBlock => write!(f, "no such block (forged or damaged block id)"),
            Error::OutOfBounds {
                offset,
                len,
                block_len,
            } => write!(
                f,
                "access of {len} bytes at offset {offset} is outside a block of {block_len} bytes"
            ),
            Error::BlockSize { size, min, max } => write!(
                f,
                "block size {size} is outside the configured bounds {min}..={max}"
            ),
            Error::InvalidConfig(why) => write!(f, "invalid configuration: {why}"),
            Error::Timeout => write!(f, "timed out waiting for memory"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}
