//! `allocator_api2::alloc::Allocator` for `&Matrix`.

use crate::Matrix;
use allocator_api2::alloc::{AllocError, Allocator};
use std::alloc::Layout;
use std::ptr::NonNull;

fn dangling(layout: Layout) -> NonNull<[u8]> {
    // A zero-size block: any non-null, aligned address will do.
    let ptr = NonNull::new(layout.align() as *mut u8).unwrap_or(NonNull::dangling());
    NonNull::slice_from_raw_parts(ptr, 0)
}

// SAFETY: blocks returned by `allocate` stay valid until deallocated through
// any handle to the same segment (the engine never moves or reuses a live
// block); `grow`/`shrink` copy or keep the contents as the trait requires;
// `&Matrix` is `Copy`, and all copies allocate from the same segment.
unsafe impl Allocator for &Matrix {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        let ptr = self.alloc(layout).map_err(|_| AllocError)?;
        Ok(NonNull::slice_from_raw_parts(ptr, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // SAFETY: the trait's contract: `ptr` was allocated by this allocator
        // with `layout` and is not used afterwards.
        if let Err(e) = unsafe { self.free(ptr) } {
            panic!(
                "matrix-alloc: deallocate({ptr:p}, size {}): {e}",
                layout.size()
            );
        }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() == 0 {
            return self.allocate(new);
        }
        // SAFETY: the trait's contract: `ptr` is a live block of this allocator.
        let p = unsafe { self.realloc(ptr, new) }.map_err(|_| AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, new.size()))
    }

    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract.
        let block = unsafe { self.grow(ptr, old, new) }?;
        // SAFETY: the new block is `new.size()` bytes long; bytes past the old
        // size are ours to initialise.
        unsafe {
            block
                .cast::<u8>()
                .as_ptr()
                .add(old.size())
                .write_bytes(0, new.size() - old.size())
        };
        Ok(block)
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if new.size() == 0 {
            // SAFETY: forwarded contract.
            unsafe { self.deallocate(ptr, old) };
            return Ok(dangling(new));
        }
        // SAFETY: the trait's contract: `ptr` is a live block of this allocator.
        let p = unsafe { self.realloc(ptr, new) }.map_err(|_| AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, new.size()))
    }
}
