//! The packed atomic words of the engine: bit layouts, pack and unpack.
//!
//! Every word that is CAS'd is built and taken apart here, so that the field
//! layouts are stated once and unit-tested for non-overlap.

/// Bytes per granule: the unit of block sizes and positions.
pub(crate) const GRANULE: usize = 16;
/// log2 of [`GRANULE`].
pub(crate) const GRANULE_LOG: u32 = 4;
/// Bytes of the header in front of every block's payload.
pub(crate) const HEADER: usize = 16;
/// The smallest block, in granules: header plus room for a free block's footer.
pub(crate) const MIN_BLOCK: u32 = 2;
/// "No node" in list links and list heads.
pub(crate) const NIL: u32 = u32::MAX;

/// State of a block, kept in its header word 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum BlockState {
    /// Handed to a user. Header word 1 holds the requested size.
    Used = 1,
    /// Free and published through a node. Word 1 and the footer hold its [`Hint`].
    Free = 2,
    /// Being freed by the thread that won the `Used -> Freeing` CAS.
    Freeing = 3,
    /// No longer a block start: absorbed into its left neighbour.
    Absorbed = 4,
    /// Freed by its user and kept, whole, in a thread's block cache
    /// (`cache::bins`). Header word 1 holds the tag of the cache's record.
    Cached = 5,
}

/// Header word 0 of a block:
///
/// ```text
/// bits  0..32  size in granules (header included)
/// bits 32..40  BlockState
/// bits 40..64  check: a hash of the block's position, so that a pointer that
///              is not a block start is recognised with high probability
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeaderWord {
    pub size: u32,
    pub state: u8,
    pub check: u32,
}

const CHECK_MASK: u64 = (1 << 24) - 1;

impl HeaderWord {
    pub(crate) fn new(pos: u32, size: u32, state: BlockState) -> Self {
        HeaderWord {
            size,
            state: state as u8,
            check: position_check(pos),
        }
    }

    pub(crate) fn from(v: u64) -> Self {
        HeaderWord {
            size: v as u32,
            state: (v >> 32) as u8,
            check: ((v >> 40) & CHECK_MASK) as u32,
        }
    }

    pub(crate) fn value(self) -> u64 {
        self.size as u64 | (self.state as u64) << 32 | (self.check as u64 & CHECK_MASK) << 40
    }

    /// Whether this word is a plausible header for a block at `pos` in `state`.
    pub(crate) fn is(self, pos: u32, state: BlockState) -> bool {
        self.state == state as u8 && self.check == position_check(pos)
    }
}

/// 24-bit hash of a granule position (Fibonacci hashing).
pub(crate) fn position_check(pos: u32) -> u32 {
    ((pos as u64 ^ 0x5bd1_e995).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32
}

/// A reference to one incarnation of a node: index plus generation. Stored in
/// a free block's header word 1 and footer, so that neighbours can find the
/// node that owns the block. It is only a hint: it is valid only if the node's
/// claim word still carries the same generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hint {
    pub node: u32,
    pub gen: u32,
}

/// `Hint::node` of a marker, not a node: the free block is held by the
/// thread that is moving the boundary between it and the `Used` block at
/// granule `Hint::gen` (growing that block over it, or cutting it off that
/// block's end). Whichever side the `Used` block's header puts the block on
/// is the truth (see `recover`).
pub(crate) const BESIDE_USED: u32 = NIL - 1;

impl Hint {
    /// The marker for a block beside the `Used` block at `used`.
    pub(crate) fn beside_used(used: u32) -> Self {
        Hint {
            node: BESIDE_USED,
            gen: used,
        }
    }

    pub(crate) fn from(v: u64) -> Self {
        Hint {
            node: v as u32,
            gen: (v >> 32) as u32,
        }
    }
    pub(crate) fn value(self) -> u64 {
        self.node as u64 | (self.gen as u64) << 32
    }
}

/// State of a node, in its claim word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum NodeState {
    /// In the node pool, bound to no block.
    Pool = 0,
    /// Bound to a published free block that anyone may claim.
    Live = 1,
    /// Its block is owned by the thread that claimed it.
    Claimed = 2,
    /// Its block is gone (merged or allocated) but the node is still in a
    /// free list; the popper recycles it.
    Dead = 3,
}

/// A node's claim word, the single point of ownership of a free block:
///
/// ```text
/// bits  0..2   NodeState
/// bit   2      listed: the node is in a free list (or about to be pushed by
///              its publisher); cleared only by the thread that pops it
/// bit   3      recheck: a claim failed while the node was Claimed; the holder
///              must settle the block again when it lets go of it
/// bit   4      unlisting: a popper found the node Claimed at the top of its
///              list and may unlink it (and die before clearing `listed`);
///              its holder must then not make it Live where it is
/// bits  8..32  holder: who holds a Claimed node ([`Engine::holder_tag`]:
///              slot + 1 and the slot generation's low 16 bits), so that
///              what a killed process held can be found; 0 otherwise
/// bits 32..64  generation, bumped each time the node leaves the pool
/// ```
///
/// [`Engine::holder_tag`]: super::Engine::holder_tag
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClaimWord {
    pub state: NodeState,
    pub listed: bool,
    pub recheck: bool,
    pub unlisting: bool,
    pub holder: u32,
    pub gen: u32,
}

/// Bits of [`ClaimWord::holder`].
pub(crate) const HOLDER_MASK: u32 = (1 << 24) - 1;

impl ClaimWord {
    pub(crate) fn from(v: u64) -> Self {
        let state = match v & 3 {
            0 => NodeState::Pool,
            1 => NodeState::Live,
            2 => NodeState::Claimed,
            _ => NodeState::Dead,
        };
        ClaimWord {
            state,
            listed: v & 4 != 0,
            recheck: v & 8 != 0,
            unlisting: v & 16 != 0,
            holder: (v >> 8) as u32 & HOLDER_MASK,
            gen: (v >> 32) as u32,
        }
    }

    pub(crate) fn value(self) -> u64 {
        self.state as u64
            | (self.listed as u64) << 2
            | (self.recheck as u64) << 3
            | (self.unlisting as u64) << 4
            | ((self.holder & HOLDER_MASK) as u64) << 8
            | (self.gen as u64) << 32
    }
}

/// A lock-free list head: top node index plus an ABA tag bumped by every
/// successful CAS, so that a head that was popped and pushed back between a
/// load and a CAS makes the CAS fail.
///
/// ```text
/// bits  0..32  node index, NIL when empty
/// bits 32..64  tag
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListHead {
    pub top: u32,
    pub tag: u32,
}

impl ListHead {
    pub(crate) const EMPTY: u64 = NIL as u64;

    pub(crate) fn from(v: u64) -> Self {
        ListHead {
            top: v as u32,
            tag: (v >> 32) as u32,
        }
    }
    pub(crate) fn value(self) -> u64 {
        self.top as u64 | (self.tag as u64) << 32
    }
    pub(crate) fn replaced(self, top: u32) -> Self {
        ListHead {
            top,
            tag: self.tag.wrapping_add(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_do_not_overlap() {
        let w = HeaderWord {
            size: u32::MAX,
            state: 0,
            check: 0,
        };
        assert_eq!(HeaderWord::from(w.value()), w);
        let w = HeaderWord {
            size: 0,
            state: u8::MAX,
            check: 0,
        };
        assert_eq!(HeaderWord::from(w.value()), w);
        let w = HeaderWord {
            size: 0,
            state: 0,
            check: CHECK_MASK as u32,
        };
        assert_eq!(HeaderWord::from(w.value()), w);
        let w = HeaderWord::new(12345, 77, BlockState::Used);
        assert!(HeaderWord::from(w.value()).is(12345, BlockState::Used));
        assert!(!HeaderWord::from(w.value()).is(12346, BlockState::Used));
    }

    #[test]
    fn claim_fields_do_not_overlap() {
        for state in [
            NodeState::Pool,
            NodeState::Live,
            NodeState::Claimed,
            NodeState::Dead,
        ] {
            for flags in 0..8 {
                let (listed, recheck, unlisting) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
                for holder in [0, 1, HOLDER_MASK] {
                    let w = ClaimWord {
                        state,
                        listed,
                        recheck,
                        unlisting,
                        holder,
                        gen: 0xdead_beef,
                    };
                    assert_eq!(ClaimWord::from(w.value()), w);
                }
            }
        }
    }

    #[test]
    fn hint_and_head_round_trip() {
        let h = Hint {
            node: 0xffff_fffe,
            gen: 0x8000_0001,
        };
        assert_eq!(Hint::from(h.value()), h);
        let l = ListHead {
            top: NIL,
            tag: u32::MAX,
        };
        assert_eq!(ListHead::from(l.value()), l);
        assert_eq!(l.replaced(3).tag, 0);
        assert_eq!(ListHead::from(ListHead::EMPTY).top, NIL);
    }
}
