//! Position-independent references into a segment.

/// A byte offset from the start of a segment.
///
/// Offsets mean the same thing in every process that maps the segment, so they
/// are what gets stored in shared data and handed between processes. Offset 0
/// is the segment header, so it doubles as the null value ([`Offset::NULL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Offset(pub u64);

impl Offset {
    /// The null offset: never the address of a block.
    pub const NULL: Offset = Offset(0);

    /// Whether this is [`Offset::NULL`].
    pub const fn is_null(self) -> bool {
        self.0 == 0
    }

    /// The raw byte offset.
    pub const fn get(self) -> u64 {
        self.0
    }
}
