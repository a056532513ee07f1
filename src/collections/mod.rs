//! Offset-based collections for segments mapped at any address:
//! `SharedVec<T>` and `SharedMap<K, V>`. They hold offsets, never pointers,
//! so any process that maps the segment can use them, wherever its mapping
//! lies.
