//! Offset-based collections (issue 20): `SharedVec` and `SharedMap` against
//! `Vec` and `HashMap` under random operations, through two mappings of one
//! segment at different addresses, and from a real child process that
//! changes and grows them.

mod common;
use common::RemoveOnDrop;
use matrix_alloc::collections::{SharedMap, SharedVec};
use matrix_alloc::{shareable, Error, Handle, Matrix, ShmMutex};
use proptest::prelude::*;
use std::collections::HashMap;
use std::process::Command;

/// Set in the child's environment: the segment to open.
const CHILD_ENV: &str = "MATRIX_ALLOC_COLLECTIONS_CHILD";
const ENTRIES: u64 = 20_000;

shareable! {
    /// What the parent publishes: a map and a vector, behind one lock.
    pub struct Tables {
        pub map: SharedMap<u64, [u8; 24]>,
        pub log: SharedVec<u64>,
    }
}

type Shared = ShmMutex<Tables>;

fn value_of(k: u64) -> [u8; 24] {
    let mut v = [k as u8; 24];
    v[..8].copy_from_slice(&k.to_le_bytes());
    v
}

/// Everything is freed: with the caches' empty pages given back, the heap
/// is one free block and the counters agree with it.
fn assert_heap_empty(m: &Matrix) {
    m.trim();
    let r = m.check().unwrap();
    assert_eq!((r.used_blocks, r.pages, r.free_blocks), (0, 0, 1), "{r:?}");
    assert!(r.counters_agree, "{r:?}");
}

#[derive(Debug, Clone)]
enum VecOp {
    Push(u64),
    Pop,
    Set(usize, u64),
    Truncate(usize),
    Extend(Vec<u64>),
    Clear,
}

fn vec_op() -> impl Strategy<Value = VecOp> {
    prop_oneof![
        4 => any::<u64>().prop_map(VecOp::Push),
        2 => Just(VecOp::Pop),
        2 => (any::<usize>(), any::<u64>()).prop_map(|(i, v)| VecOp::Set(i, v)),
        1 => (0usize..64).prop_map(VecOp::Truncate),
        1 => proptest::collection::vec(any::<u64>(), 0..100).prop_map(VecOp::Extend),
        1 => Just(VecOp::Clear),
    ]
}

#[derive(Debug, Clone)]
enum MapOp {
    Insert(u16, u64),
    Remove(u16),
    Get(u16),
    Clear,
}

/// Keys from a small range, so that inserts replace, removes hit and probe
/// runs are long (the backward shift of `remove` is exercised).
fn map_op() -> impl Strategy<Value = MapOp> {
    let key = 0u16..300;
    prop_oneof![
        60 => (key.clone(), any::<u64>()).prop_map(|(k, v)| MapOp::Insert(k, v)),
        30 => key.clone().prop_map(MapOp::Remove),
        20 => key.prop_map(MapOp::Get),
        1 => Just(MapOp::Clear),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn shared_vec_behaves_as_vec(ops in proptest::collection::vec(vec_op(), 1..300)) {
        let m = Matrix::anonymous(8 << 20).unwrap();
        let mut ours = SharedVec::<u64>::new();
        let mut model = Vec::new();
        for op in ops {
            match op {
                VecOp::Push(v) => { ours.push(&m, v).unwrap(); model.push(v); }
                VecOp::Pop => prop_assert_eq!(ours.pop(&m).unwrap(), model.pop()),
                VecOp::Set(i, v) => {
                    let i = if model.is_empty() { i } else { i % model.len() };
                    if let Some(x) = ours.get_mut(&m, i).unwrap() { *x = v; }
                    if let Some(x) = model.get_mut(i) { *x = v; }
                }
                VecOp::Truncate(n) => { ours.truncate(&m, n).unwrap(); model.truncate(n); }
                VecOp::Extend(items) => {
                    ours.extend_from_slice(&m, &items).unwrap();
                    model.extend_from_slice(&items);
                }
                VecOp::Clear => { ours.clear(&m).unwrap(); model.clear(); }
            }
            prop_assert_eq!(ours.as_slice(&m).unwrap(), &model[..]);
            prop_assert!(ours.capacity() >= ours.len());
        }
        ours.free(&m).unwrap();
        assert_heap_empty(&m);
    }

    #[test]
    fn shared_map_behaves_as_hash_map(ops in proptest::collection::vec(map_op(), 1..600)) {
        let m = Matrix::anonymous(8 << 20).unwrap();
        let mut ours = SharedMap::<u16, u64>::new();
        let mut model = HashMap::new();
        for op in ops {
            match op {
                MapOp::Insert(k, v) => {
                    prop_assert_eq!(ours.insert(&m, k, v).unwrap(), model.insert(k, v));
                }
                MapOp::Remove(k) => prop_assert_eq!(ours.remove(&m, &k).unwrap(), model.remove(&k)),
                MapOp::Get(k) => prop_assert_eq!(ours.get(&m, &k).unwrap(), model.get(&k)),
                MapOp::Clear => { ours.clear(&m).unwrap(); model.clear(); }
            }
            prop_assert_eq!(ours.len(), model.len());
        }
        // Every key is found, and the table holds exactly the model.
        for (k, v) in &model {
            prop_assert_eq!(ours.get(&m, k).unwrap(), Some(v));
        }
        let mut entries: Vec<(u16, u64)> = ours.iter(&m).unwrap().map(|(k, v)| (*k, *v)).collect();
        let mut expected: Vec<(u16, u64)> = model.into_iter().collect();
        entries.sort_unstable();
        expected.sort_unstable();
        prop_assert_eq!(entries, expected);
        ours.free(&m).unwrap();
        assert_heap_empty(&m);
    }
}

#[test]
fn a_second_mapping_at_another_address_sees_and_grows_them() {
    let m = Matrix::create(16 << 20).unwrap();
    let _cleanup = RemoveOnDrop(m.id());
    let mut map = SharedMap::<u64, u64>::new();
    let mut log = SharedVec::<u64>::new();
    for k in 0..1000 {
        map.insert(&m, k, k * 7).unwrap();
        log.push(&m, k).unwrap();
    }
    let h = m.alloc_value((map, log)).unwrap();

    let other = Matrix::open(m.id()).unwrap();
    let here = m.get(h).unwrap() as *const _ as usize;
    let there = other.get(h).unwrap() as *const _ as usize;
    assert_ne!(
        here, there,
        "the two mappings must lie at different addresses"
    );
    // SAFETY: this test is the only user of the pair; the reference from
    // `m.get` above is no longer used.
    let (map, log) = unsafe { &mut *other.get_ptr(h).unwrap().as_ptr() };
    for k in 0..1000 {
        assert_eq!(map.get(&other, &k).unwrap(), Some(&(k * 7)));
    }
    for k in 1000..5000 {
        map.insert(&other, k, k * 7).unwrap(); // grows through the second mapping
        log.push(&other, k).unwrap();
    }
    let (map, log) = m.get(h).unwrap();
    assert_eq!(map.len(), 5000);
    assert!((0..5000).all(|k| map.get(&m, &k).unwrap() == Some(&(k * 7))));
    assert!(log.as_slice(&m).unwrap().iter().copied().eq(0..5000));
    // SAFETY: nothing refers to the pair any more; free it and its storage.
    let (map, log) = unsafe { &mut *m.get_ptr(h).unwrap().as_ptr() };
    map.free(&m).unwrap();
    log.free(&m).unwrap();
    // SAFETY: as above.
    unsafe { m.free_value(h) }.unwrap();
    drop(other);
    assert_heap_empty(&m);
}

/// The child's half of `another_process_changes_and_grows_them`.
fn child(id: &str) {
    let m = Matrix::open(id.parse().unwrap()).unwrap();
    let h: Handle<Shared> = m.lookup("tables").unwrap().expect("published");
    let mut t = m.get(h).unwrap().lock(&m).unwrap();
    for k in 0..ENTRIES {
        assert_eq!(t.map.get(&m, &k).unwrap(), Some(&value_of(k)), "key {k}");
    }
    assert!(t.log.as_slice(&m).unwrap().iter().copied().eq(0..ENTRIES));
    for k in 0..ENTRIES / 2 {
        assert_eq!(t.map.remove(&m, &k).unwrap(), Some(value_of(k)));
    }
    for k in ENTRIES..ENTRIES * 3 {
        assert_eq!(t.map.insert(&m, k, value_of(k)).unwrap(), None);
    }
    let Tables { map, log } = &mut *t;
    log.extend_from_slice(&m, &[u64::MAX; 10_000]).unwrap();
    log.push(&m, map.len() as u64).unwrap();
}

#[test]
fn another_process_changes_and_grows_them() {
    if let Ok(id) = std::env::var(CHILD_ENV) {
        return child(&id);
    }
    let m = Matrix::create(64 << 20).unwrap();
    let _cleanup = RemoveOnDrop(m.id());
    let mut tables = Tables {
        map: SharedMap::new(),
        log: SharedVec::new(),
    };
    for k in 0..ENTRIES {
        tables.map.insert(&m, k, value_of(k)).unwrap();
        tables.log.push(&m, k).unwrap();
    }
    let h = m.alloc_value(ShmMutex::new(tables)).unwrap();
    m.publish("tables", h).unwrap();

    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "another_process_changes_and_grows_them",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, m.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "child: {status}");

    let mut t = m.get(h).unwrap().lock(&m).unwrap();
    let expected = ENTRIES * 5 / 2;
    assert_eq!(t.map.len() as u64, expected);
    for k in 0..ENTRIES * 3 {
        let want = (k >= ENTRIES / 2).then(|| value_of(k));
        assert_eq!(t.map.get(&m, &k).unwrap(), want.as_ref(), "key {k}");
    }
    let log = t.log.as_slice(&m).unwrap();
    assert_eq!(log.len() as u64, ENTRIES + 10_001);
    assert_eq!(log.last(), Some(&expected));
    let Tables { map, log } = &mut *t;
    map.free(&m).unwrap();
    log.free(&m).unwrap();
    drop(t);
    assert!(m.unpublish("tables").unwrap());
    // SAFETY: nothing refers to the lock any more.
    unsafe { m.free_value(h) }.unwrap();
    m.trim();
    let r = m.check().unwrap();
    assert!(r.counters_agree, "{r:?}");
    // The directory's table stays allocated once made (a medium block, in
    // a page of its class); nothing else does, the child's pages included.
    assert_eq!((r.used_blocks, r.pages), (1, 1), "{r:?}");
}

#[test]
fn a_collection_from_another_segment_is_refused() {
    let a = Matrix::anonymous(1 << 20).unwrap();
    let b = Matrix::anonymous(1 << 20).unwrap();
    let mut map = SharedMap::<u64, u64>::new();
    map.insert(&a, 1, 2).unwrap();
    assert!(matches!(map.get(&b, &1), Err(Error::NotInSegment)));
    assert!(matches!(map.insert(&b, 3, 4), Err(Error::NotInSegment)));
    assert!(matches!(map.iter(&b), Err(Error::NotInSegment)));
    assert_eq!(map.get(&a, &1).unwrap(), Some(&2));
    map.free(&a).unwrap();
    assert_heap_empty(&a);
}

#[test]
fn running_out_of_memory_leaves_them_unchanged() {
    let m = Matrix::anonymous(1 << 20).unwrap();
    let mut v = SharedVec::<u64>::new();
    let mut grown = 0u64;
    let e = loop {
        match v.push(&m, grown) {
            Ok(()) => grown += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
    assert!(v.as_slice(&m).unwrap().iter().copied().eq(0..grown));
    assert!(matches!(
        v.reserve(&m, usize::MAX),
        Err(Error::InvalidLayout)
    ));
    v.free(&m).unwrap();

    let mut map = SharedMap::<u64, u64>::new();
    let mut k = 0;
    let e = loop {
        match map.insert(&m, k, k) {
            Ok(_) => k += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
    assert_eq!(map.len() as u64, k);
    assert!((0..k).all(|i| map.get(&m, &i).unwrap() == Some(&i)));
    assert!(k > 1000, "{k} entries fit");
    map.free(&m).unwrap();
    assert_heap_empty(&m);
}
