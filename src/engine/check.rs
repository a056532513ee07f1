//! The invariant walker behind `Matrix::check()`.
//!
//! It reads the heap without claiming anything, so it is exact only while no
//! other thread or process is allocating or freeing; under concurrency it may
//! report transient states as errors. What a process killed mid-operation can
//! leave behind is not an error but counted: orphaned blocks (until
//! `reclaim_dead`), unmerged free neighbours, lists missing from the bitmaps.

use super::mapping::{map_floor, FL_COUNT, SL_COUNT};
use super::words::{
    BlockState, ClaimWord, HeaderWord, ListHead, NodeState, GRANULE_LOG, MIN_BLOCK, NIL,
};
use super::Engine;
use crate::sync::Ordering::*;
use crate::Error;

/// What `check()` found: a census of the heap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapReport {
    /// Heap bytes in total.
    pub capacity: u64,
    /// Blocks handed to users (small blocks in pages included).
    pub used_blocks: u64,
    /// Bytes of engine blocks in use: user blocks outside pages (headers and
    /// padding included) and whole pages.
    pub used_bytes: u64,
    /// Sum of the sizes users asked for, over the used blocks.
    pub requested_bytes: u64,
    /// Published free blocks.
    pub free_blocks: u64,
    /// Bytes of those blocks.
    pub free_bytes: u64,
    /// The largest published free block, in bytes.
    pub largest_free: u64,
    /// Blocks held mid-operation (claimed, being freed or split):
    /// in a quiescent heap, only what processes that died left behind, and
    /// after `Matrix::reclaim_dead`, only the blocks they were freeing.
    pub orphaned_blocks: u64,
    /// Bytes of those blocks.
    pub orphaned_bytes: u64,
    /// Nodes bound to blocks or waiting in lists.
    pub nodes_in_use: u64,
    /// Size of the node table.
    pub node_capacity: u64,
    /// Free blocks that are published but in no free list: neighbours can
    /// still merge them, allocations cannot find them. Only left when the
    /// node table ran out (nodes go on their list before they are
    /// published, so a killed process cannot leave one).
    pub unlisted_free_blocks: u64,
    /// Pairs of adjacent published free blocks that were not merged. Only
    /// left by a process killed between publishing a block and settling it;
    /// zero otherwise (merges may be deferred, never lost).
    pub unmerged_pairs: u64,
    /// Free lists that hold free blocks while their bitmap bit is clear.
    /// Only left by a process killed between a push and setting the bit; an
    /// allocation that finds nothing repairs the bits from the lists.
    pub unindexed_lists: u64,
    /// Small-object pages (each is one used engine block).
    pub pages: u64,
    /// Blocks kept whole in the threads' block caches (part of
    /// `used_bytes`, not of `used_blocks`), and their bytes.
    pub cached_blocks: u64,
    /// Bytes of those blocks.
    pub cached_bytes: u64,
    /// Whether the counters (`Stats::curr_blocks`, `curr_bytes`,
    /// `block_bytes`) agree with the blocks found. They can only disagree
    /// after a process was killed between changing the heap and counting it.
    pub counters_agree: bool,
}

fn corrupt(msg: String) -> Error {
    Error::HeapCorrupt(msg)
}

impl Engine {
    pub(crate) fn check(&self) -> Result<HeapReport, Error> {
        let ctrl = self.control();
        let hwm = ctrl.node_hwm.load(SeqCst).min(self.node_capacity);
        let mut report = HeapReport {
            capacity: self.capacity(),
            node_capacity: self.node_capacity as u64,
            ..HeapReport::default()
        };
        // node index -> position of the live free block it stands for.
        let mut live_block_of = vec![u32::MAX; hwm as usize];

        // 1. The block chain covers the heap exactly.
        let mut pos = self.heap_start;
        let mut prev_live_free = false;
        while pos < self.heap_end {
            let h = HeaderWord::from(self.header(pos)[0].load(SeqCst));
            if h.check != super::words::position_check(pos) {
                return Err(corrupt(format!("block at granule {pos}: bad header check")));
            }
            if h.size < MIN_BLOCK || pos as u64 + h.size as u64 > self.heap_end as u64 {
                return Err(corrupt(format!(
                    "block at granule {pos}: size {} out of bounds",
                    h.size
                )));
            }
            let bytes = (h.size as u64) << GRANULE_LOG;
            let mut live_free = false;
            match h.state {
                s if s == BlockState::Used as u8 => {
                    report.used_blocks += 1;
                    report.used_bytes += bytes;
                    report.requested_bytes += self.requested(pos);
                }
                s if s == BlockState::Free as u8 => {
                    let hint = self.hint_at(pos);
                    let node_ok = hint.node < hwm;
                    let w =
                        node_ok.then(|| ClaimWord::from(self.node(hint.node).claim.load(SeqCst)));
                    match w {
                        Some(w) if w.gen == hint.gen && w.state == NodeState::Live => {
                            if self.hint_below(pos + h.size) != hint {
                                return Err(corrupt(format!(
                                    "free block at granule {pos}: footer does not match header"
                                )));
                            }
                            if self.node(hint.node).block.load(SeqCst) != pos {
                                return Err(corrupt(format!(
                                    "free block at granule {pos}: its node points elsewhere"
                                )));
                            }
                            if prev_live_free {
                                report.unmerged_pairs += 1;
                            }
                            live_block_of[hint.node as usize] = pos;
                            live_free = true;
                            report.free_blocks += 1;
                            report.free_bytes += bytes;
                            report.largest_free = report.largest_free.max(bytes);
                        }
                        _ => {
                            report.orphaned_blocks += 1;
                            report.orphaned_bytes += bytes;
                        }
                    }
                }
                s if s == BlockState::Freeing as u8 => {
                    report.orphaned_blocks += 1;
                    report.orphaned_bytes += bytes;
                }
                s if s == BlockState::Cached as u8 => {
                    report.used_bytes += bytes;
                    report.cached_blocks += 1;
                    report.cached_bytes += bytes;
                }
                s => {
                    return Err(corrupt(format!(
                        "block at granule {pos}: invalid state {s}"
                    )))
                }
            }
            prev_live_free = live_free;
            pos += h.size;
        }

        // 2. Every list holds distinct nodes; live ones are in the right list.
        let mut seen = vec![false; hwm as usize];
        let mut walk = |head: u64,
                        mut visit: Box<dyn FnMut(u32) -> Result<(), Error> + '_>|
         -> Result<(), Error> {
            let mut n = ListHead::from(head).top;
            while n != NIL {
                if n >= hwm || std::mem::replace(&mut seen[n as usize], true) {
                    return Err(corrupt(format!("node {n} is out of range or in two lists")));
                }
                visit(n)?;
                n = self.node(n).next.load(SeqCst);
            }
            Ok(())
        };
        let mut listed_live = 0u64;
        for fl in 0..FL_COUNT {
            for sl in 0..SL_COUNT {
                let mut has_live = false;
                walk(
                    ctrl.heads[fl][sl].load(SeqCst),
                    Box::new(|n| {
                        let w = ClaimWord::from(self.node(n).claim.load(SeqCst));
                        if w.state == NodeState::Live {
                            let pos = live_block_of[n as usize];
                            if pos == u32::MAX {
                                return Err(corrupt(format!(
                                    "live node {n} stands for no free block"
                                )));
                            }
                            let size = HeaderWord::from(self.header(pos)[0].load(SeqCst)).size;
                            if map_floor(size) != (fl, sl) {
                                return Err(corrupt(format!(
                                    "free block at granule {pos} is filed in the wrong list"
                                )));
                            }
                            has_live = true;
                            listed_live += 1;
                        }
                        Ok(())
                    }),
                )?;
                let bit = ctrl.sl_bitmap[fl].load(SeqCst) & (1 << sl) != 0
                    && ctrl.fl_bitmap.load(SeqCst) & (1 << fl) != 0;
                if has_live && !bit {
                    report.unindexed_lists += 1;
                }
            }
        }
        report.unlisted_free_blocks = report.free_blocks - listed_live;
        let mut pooled = 0u64;
        walk(
            ctrl.pool.load(SeqCst),
            Box::new(|n| {
                if ClaimWord::from(self.node(n).claim.load(SeqCst)).state != NodeState::Pool {
                    return Err(corrupt(format!("node {n} is in the pool but not free")));
                }
                pooled += 1;
                Ok(())
            }),
        )?;
        report.nodes_in_use = hwm as u64 - pooled;

        // 3. Bytes add up.
        let total = report.used_bytes + report.free_bytes + report.orphaned_bytes;
        if total != report.capacity {
            return Err(corrupt(format!(
                "blocks cover {total} bytes of a {} byte heap",
                report.capacity
            )));
        }
        Ok(report)
    }
}
