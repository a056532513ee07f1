#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod adapters;
mod cache;
mod engine;
mod error;
mod matrix;
mod offset;
mod os;
mod segment;
mod stats;
mod sync;

pub use engine::HeapReport;
pub use error::Error;
pub use matrix::Matrix;
pub use offset::Offset;
pub use segment::{MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE};
pub use stats::Stats;
