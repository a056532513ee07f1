//! Mappings at a fixed address, for pinned segments: every process maps a
//! pinned segment at the address its header names, so that pointers into it
//! (std-style collections) mean the same everywhere.
//!
//! `memmap2` places mappings where the kernel likes; this maps with
//! `MAP_FIXED_NOREPLACE`, which fails with `EEXIST` instead of replacing
//! whatever is mapped there already.

use crate::Error;
use std::os::fd::AsRawFd;

/// A shared mapping of a file at a fixed address, unmapped when dropped.
#[derive(Debug)]
pub(crate) struct FixedMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, owned by this value until it
// is dropped; what is read and written through it is the segment's
// business (atomics and the engine's protocols).
unsafe impl Send for FixedMap {}
// SAFETY: as above.
unsafe impl Sync for FixedMap {}

/// The lowest and highest addresses the default choice of `create_pinned`
/// uses: 32 TiB of the x86_64 and aarch64 (48-bit) user address space that
/// Linux places nothing in by itself (the heap is far below, mappings and
/// stacks near the top).
pub(crate) const DEFAULT_RANGE: (u64, u64) = (0x1000_0000_0000, 0x3000_0000_0000);
/// Default addresses are multiples of this (the largest segment's size).
pub(crate) const DEFAULT_ALIGN: u64 = 1 << 36;

impl FixedMap {
    /// Maps `len` bytes of `file` at `address`; `Error::AddressInUse` if any
    /// of the range is mapped already.
    pub(crate) fn map(file: &std::fs::File, address: u64, len: usize) -> Result<FixedMap, Error> {
        if address == 0 || address % 4096 != 0 || address.checked_add(len as u64).is_none() {
            return Err(Error::InvalidLayout);
        }
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping:
        // on a collision the call fails and nothing is touched.
        let p = unsafe {
            libc::mmap(
                address as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EEXIST) => Error::AddressInUse {
                    address,
                    len: len as u64,
                },
                _ => Error::Io(e),
            });
        }
        let map = FixedMap {
            ptr: p as *mut u8,
            len,
        };
        // Kernels before 4.17 ignore the flag and treat the address as a
        // hint: a mapping elsewhere is a collision too.
        if p as u64 != address {
            return Err(Error::AddressInUse {
                address,
                len: len as u64,
            });
        }
        Ok(map)
    }

    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for FixedMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; the segment that used it
        // is gone (it owns this value).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
