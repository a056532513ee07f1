//! The segment header at offset 0: what every opener validates.

use crate::engine::Layout;
use crate::sync::{AtomicU64, Ordering::*};
use crate::Error;

/// "MATRIXAL" in little-endian.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"MATRIXAL");
/// Bumped on every change of anything another process reads in the segment.
pub(crate) const LAYOUT_VERSION: u32 = 15;
/// Bytes reserved for the header (the engine's control block follows).
pub(crate) const HEADER_SPACE: u64 = 256;

/// `state` word: bits 32.. the phase, bits 0..32 the formatting pid.
pub(crate) const PHASE_FORMATTING: u64 = 1;
pub(crate) const PHASE_READY: u64 = 2;

/// The segment header. Every field but `state` is written once by the
/// creator before `state` becomes `READY` (`Release`); openers read `state`
/// with `Acquire` and only then trust — after validating — the rest.
#[repr(C)]
pub(crate) struct SegmentHeader {
    pub magic: AtomicU64,
    pub state: AtomicU64,
    pub layout_version: u32,
    pub header_size: u32,
    pub segment_size: u64,
    pub creator_pid: u32,
    pub _pad: u32,
    pub control_offset: u64,
    pub nodes_offset: u64,
    pub node_capacity: u64,
    pub heap_offset: u64,
    pub heap_size: u64,
    /// The segment's identity; for named segments also its name.
    pub id: [u8; 16],
    pub pagemap_offset: u64,
    /// The address every process maps the segment at; 0 if not pinned.
    pub pinned_at: u64,
}

const _: () = assert!(size_of::<SegmentHeader>() as u64 <= HEADER_SPACE);

impl SegmentHeader {
    /// Writes everything but the ready mark.
    pub(crate) fn write(
        &mut self,
        segment_size: u64,
        layout: &Layout,
        id: uuid::Uuid,
        pinned_at: u64,
    ) {
        self.id = *id.as_bytes();
        self.pinned_at = pinned_at;
        self.layout_version = LAYOUT_VERSION;
        self.header_size = size_of::<SegmentHeader>() as u32;
        self.segment_size = segment_size;
        self.creator_pid = std::process::id();
        self.control_offset = layout.control_offset;
        self.pagemap_offset = layout.pagemap_offset;
        self.nodes_offset = layout.nodes_offset;
        self.node_capacity = layout.node_capacity;
        self.heap_offset = layout.heap_offset;
        self.heap_size = layout.heap_size;
    }

    pub(crate) fn mark_formatting(&self) {
        self.magic.store(MAGIC, Relaxed);
        self.state
            .store(PHASE_FORMATTING << 32 | std::process::id() as u64, Release);
    }

    pub(crate) fn mark_ready(&self) {
        self.state
            .store(PHASE_READY << 32 | std::process::id() as u64, Release);
    }

    /// Checks a ready header against the mapped length; returns the layout.
    /// Nothing is trusted before it is checked here.
    pub(crate) fn validate(&self, mapped_len: u64) -> Result<Layout, Error> {
        if self.magic.load(Relaxed) != MAGIC {
            return Err(Error::BadMagic);
        }
        if self.layout_version != LAYOUT_VERSION {
            return Err(Error::VersionMismatch {
                found: self.layout_version,
                expected: LAYOUT_VERSION,
            });
        }
        if self.header_size != size_of::<SegmentHeader>() as u32 {
            return Err(Error::Corrupt("header size"));
        }
        if self.segment_size > mapped_len {
            return Err(Error::Truncated {
                file_len: mapped_len,
                expected: self.segment_size,
            });
        }
        if self.segment_size != mapped_len {
            return Err(Error::Corrupt("segment size does not match the file size"));
        }
        // The layout is a pure function of the size: recompute and compare,
        // which checks every offset and bound at once.
        let expected = Layout::for_segment(self.segment_size, HEADER_SPACE)
            .ok_or(Error::Corrupt("segment size"))?;
        let found = Layout {
            control_offset: self.control_offset,
            pagemap_offset: self.pagemap_offset,
            nodes_offset: self.nodes_offset,
            node_capacity: self.node_capacity,
            heap_offset: self.heap_offset,
            heap_size: self.heap_size,
        };
        if found != expected {
            return Err(Error::Corrupt("layout offsets"));
        }
        if self.pinned_at % 4096 != 0 || self.pinned_at.checked_add(self.segment_size).is_none() {
            return Err(Error::Corrupt("pinned address"));
        }
        Ok(found)
    }
}
