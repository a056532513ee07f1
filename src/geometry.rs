//! The heap's shared geometry, below both the engine and the caches: the
//! small-object page size and the small size classes. (The engine marks
//! pages in its page table; the caches carve them into blocks.)

/// Bytes per small-object page; pages are aligned to it.
pub(crate) const PAGE_SIZE: usize = 16 * 1024;

/// Bytes at the start of every page before its header can begin: the
/// engine block's header (a page is one engine block of `PAGE_SIZE`
/// bytes) and the rest of its cache line.
pub(crate) const PAGE_HEAD: usize = 64;

/// The largest request served from pages.
pub(crate) const SMALL_MAX: usize = 1024;

/// Size classes: 16, 32, ..., `SMALL_MAX` bytes.
pub(crate) const SMALL_CLASSES: usize = SMALL_MAX / 16;
