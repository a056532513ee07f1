//! The only module that names the atomic types the engine uses.
//!
//! Keeping them behind one path is the seam a loom model can replace later
//! (see STYLE.md §5): the engine never imports `std::sync::atomic` directly.
//! `AtomicU128` comes from `portable-atomic` (std has none on stable); it is
//! used only where `stats::check_atomics` found it lock-free.

pub(crate) use portable_atomic::AtomicU128;
pub(crate) use std::sync::atomic::{compiler_fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
