//! A small bump arena for allocations made while the segment is mapped.
//!
//! Mapping is written not to allocate, so this should never be used; it is
//! a safety net (a dependency that starts allocating in a later version
//! must not deadlock or recurse the first allocation of a program). Its
//! memory is never reused: `dealloc` of an arena pointer does nothing.

use std::alloc::Layout;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

const EARLY_BYTES: usize = 16 * 1024;

#[repr(C, align(4096))]
pub(crate) struct Early {
    bytes: UnsafeCell<[u8; EARLY_BYTES]>,
    /// Bytes handed out so far (including alignment padding).
    next: AtomicUsize,
}

impl Early {
    pub(crate) const fn new() -> Early {
        Early {
            bytes: UnsafeCell::new([0; EARLY_BYTES]),
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn used(&self) -> usize {
        self.next.load(Relaxed).min(EARLY_BYTES)
    }

    /// A fresh block for `layout`, or null when the arena cannot fit it.
    pub(crate) fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.bytes.get() as usize;
        let mut cur = self.next.load(Relaxed);
        loop {
            let start = (base + cur).next_multiple_of(layout.align()) - base;
            let Some(end) = start.checked_add(layout.size()) else {
                return std::ptr::null_mut();
            };
            if end > EARLY_BYTES {
                return std::ptr::null_mut();
            }
            // Relaxed: the range is claimed by this CAS alone, and the bytes
            // are only ever written by whoever claims them.
            match self.next.compare_exchange_weak(cur, end, Relaxed, Relaxed) {
                // SAFETY: `start..end` lies inside the arena.
                Ok(_) => return unsafe { (self.bytes.get() as *mut u8).add(start) },
                Err(v) => cur = v,
            }
        }
    }

    #[inline]
    pub(crate) fn contains(&self, ptr: *mut u8) -> bool {
        let base = self.bytes.get() as usize;
        (base..base + EARLY_BYTES).contains(&(ptr as usize))
    }
}
