//! The heap's shared geometry, below both the engine and the caches: the
//! small-object page size and the small size classes. (The engine marks
//! pages in its page table; the caches carve them into blocks.)

/// Bytes per small-object page; pages are aligned to it.
pub(crate) const PAGE_SIZE: usize = 16 * 1024;

/// The largest request served from pages.
pub(crate) const SMALL_MAX: usize = 1024;

/// Size classes: 16, 32, ..., `SMALL_MAX` bytes.
pub(crate) const SMALL_CLASSES: usize = SMALL_MAX / 16;
