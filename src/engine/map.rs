//! The heap's blocks in address order, for tools (`Inspector::regions`):
//! what each stretch of the heap is, read without claiming anything.

use super::words::{BlockState, HeaderWord, GRANULE_LOG, MIN_BLOCK};
use super::Engine;
use crate::geometry::PAGE_SIZE;
use crate::sync::Ordering::*;
use crate::Error;

/// What a block of the heap is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// A block handed to a user.
    Used,
    /// A small-object page (a used block that holds small blocks).
    Page,
    /// A block kept whole in a thread's block cache.
    Cached,
    /// A published free block.
    Free,
    /// A block held mid-operation: by a live process for a moment, or left
    /// by one that died (`Matrix::reclaim_dead` takes it back).
    Orphaned,
}

/// One block of the heap, as [`crate::Inspector::regions`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Byte offset of the block (its header) in the segment.
    pub offset: u64,
    /// Bytes of the block, header included.
    pub len: u64,
    /// What it is.
    pub kind: RegionKind,
}

impl Engine {
    /// Every block of the heap, in address order; `HeapCorrupt` (with
    /// where) at the first header that is not a block's.
    pub(crate) fn regions(&self) -> Result<Vec<Region>, Error> {
        let mut out = Vec::new();
        let mut pos = self.heap_start;
        while pos < self.heap_end {
            let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
            if h.check != super::words::position_check(pos)
                || h.size < MIN_BLOCK
                || pos as u64 + h.size as u64 > self.heap_end as u64
            {
                return Err(Error::HeapCorrupt(format!(
                    "block at granule {pos}: damaged header"
                )));
            }
            let offset = (pos as u64) << GRANULE_LOG;
            let kind = match h.state {
                s if s == BlockState::Used as u8 => {
                    // A page's block starts where its page does.
                    let page = offset as usize;
                    if page % PAGE_SIZE == 0 && self.is_page(page / PAGE_SIZE) {
                        RegionKind::Page
                    } else {
                        RegionKind::Used
                    }
                }
                s if s == BlockState::Free as u8 => RegionKind::Free,
                s if s == BlockState::Cached as u8 => RegionKind::Cached,
                s if s == BlockState::Freeing as u8 => RegionKind::Orphaned,
                s => {
                    return Err(Error::HeapCorrupt(format!(
                        "block at granule {pos}: invalid state {s}"
                    )))
                }
            };
            out.push(Region {
                offset,
                len: (h.size as u64) << GRANULE_LOG,
                kind,
            });
            pos += h.size;
        }
        Ok(out)
    }
}
