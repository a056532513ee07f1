//! A global allocator chosen per process by the environment variable
//! `MATRIX_ALLOC_UNDER` (`system`, `mimalloc`, `dhat`, `matrix`,
//! `matrix-exact` (the matrix with exact counts); default
//! `system`), read on the first allocation with `getenv`, which does not
//! allocate. It lets one binary run the same work under each allocator in
//! child processes (a binary has one `#[global_allocator]`).
//!
//! Shared by the dhat comparison example, its test and the real-program
//! benchmark (`#[path]` includes).

use matrix_alloc_global::MatrixGlobal;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

pub const VAR: &str = "MATRIX_ALLOC_UNDER";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Under {
    System = 1,
    Mimalloc = 2,
    Dhat = 3,
    Matrix = 4,
    MatrixExact = 5,
}

impl Under {
    pub fn name(self) -> &'static str {
        match self {
            Under::System => "system",
            Under::Mimalloc => "mimalloc",
            Under::Dhat => "dhat",
            Under::Matrix => "matrix",
            Under::MatrixExact => "matrix-exact",
        }
    }

    /// The matrix this process allocates from, if it is one.
    #[allow(dead_code)] // the dhat comparison's, not the real-program bench's
    pub fn matrix(self) -> Option<&'static MatrixGlobal> {
        match self {
            Under::Matrix => Some(&MATRIX),
            Under::MatrixExact => Some(&MATRIX_EXACT),
            _ => None,
        }
    }

    fn from_env() -> Under {
        // SAFETY: a NUL-terminated name; the result is NULL or a C string
        // owned by the environment, read before returning.
        let v = unsafe { libc::getenv(c"MATRIX_ALLOC_UNDER".as_ptr()) };
        if v.is_null() {
            return Under::System;
        }
        // SAFETY: non-null, NUL-terminated (above).
        match unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes() {
            b"mimalloc" => Under::Mimalloc,
            b"dhat" => Under::Dhat,
            b"matrix" => Under::Matrix,
            b"matrix-exact" => Under::MatrixExact,
            _ => Under::System,
        }
    }
}

pub static MATRIX: MatrixGlobal = MatrixGlobal::new();
pub static MATRIX_EXACT: MatrixGlobal = MatrixGlobal::new().exact_counts();

pub struct Chosen(AtomicU8);

impl Chosen {
    pub const fn new() -> Chosen {
        Chosen(AtomicU8::new(0))
    }

    #[inline]
    pub fn under(&self) -> Under {
        match self.0.load(Relaxed) {
            1 => Under::System,
            2 => Under::Mimalloc,
            3 => Under::Dhat,
            4 => Under::Matrix,
            5 => Under::MatrixExact,
            _ => {
                // Racing first calls all read the same environment.
                let u = Under::from_env();
                self.0.store(u as u8, Relaxed);
                u
            }
        }
    }
}

macro_rules! forward {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.under() {
            Under::System => System.$method($($arg),*),
            Under::Mimalloc => mimalloc::MiMalloc.$method($($arg),*),
            Under::Dhat => dhat::Alloc.$method($($arg),*),
            Under::Matrix => MATRIX.$method($($arg),*),
            Under::MatrixExact => MATRIX_EXACT.$method($($arg),*),
        }
    };
}

// SAFETY: every call goes to the one allocator this process chose on its
// first call, which never changes, so each block is freed by the allocator
// that made it.
unsafe impl GlobalAlloc for Chosen {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { forward!(self, alloc(layout)) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { forward!(self, alloc_zeroed(layout)) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { forward!(self, dealloc(ptr, layout)) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { forward!(self, realloc(ptr, layout, new_size)) }
    }
}
