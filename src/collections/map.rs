//! `SharedMap<K, V>`: a hash map whose entries live in a segment, reached
//! by offset.
//!
//! Open addressing with linear probing in a power-of-two table of slots, at
//! most 7/8 full; removal shifts the following entries back (no
//! tombstones), so every entry is reachable from its home slot without
//! crossing an empty one. The hash is [`FixedState`]'s, the same in every
//! process built from the same code; a process with other keys would look
//! in the wrong slots. Fixed keys mean: do not key a shared map by
//! untrusted input.

use super::{grown_capacity, Storage};
use crate::{Error, FixedState, Matrix, Shareable};
use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ptr::NonNull;

/// A slot's `hash` when it holds no entry; a full slot's has the top bit set.
const EMPTY: u64 = 0;
const FULL: u64 = 1 << 63;

#[repr(C)]
struct Slot<K, V> {
    hash: u64,
    key: MaybeUninit<K>,
    value: MaybeUninit<V>,
}

impl<K, V> Slot<K, V> {
    fn is_full(&self) -> bool {
        self.hash != EMPTY
    }

    /// # Safety
    /// The slot must be full.
    unsafe fn entry(&self) -> (&K, &V) {
        // SAFETY: a full slot holds an initialised key and value (caller).
        unsafe { (self.key.assume_init_ref(), self.value.assume_init_ref()) }
    }
}

/// A hash map in a segment, usable from every process that maps it, at any
/// address (see the [module documentation](super)).
///
/// It is `HashMap` with the segment's `&Matrix` passed to each operation;
/// each checks the table first and returns an [`Error`] where the table is
/// not what the fields say (another segment's, freed, damaged) or cannot
/// grow.
///
/// ```
/// use matrix_alloc::collections::SharedMap;
/// use matrix_alloc::Matrix;
///
/// let m = Matrix::anonymous(16 << 20)?;
/// let mut squares = SharedMap::new();
/// for i in 0..1000u64 {
///     squares.insert(&m, i, i * i)?;
/// }
/// assert_eq!(squares.get(&m, &12)?, Some(&144));
/// assert_eq!(squares.remove(&m, &12)?, Some(144));
/// assert_eq!(squares.get(&m, &12)?, None);
/// assert_eq!(squares.iter(&m)?.count(), 999);
/// squares.free(&m)?;
/// assert_eq!(m.check()?.used_blocks, 0);
/// # Ok::<(), matrix_alloc::Error>(())
/// ```
#[repr(C)]
pub struct SharedMap<K, V> {
    storage: Storage,
    len: u64,
    /// Slots in the table: 0 or a power of two.
    slots: u64,
    _entries: PhantomData<(K, V)>,
}

// SAFETY: offsets and counts only; keys and values are `Shareable` and live
// in the segment.
unsafe impl<K: Shareable, V: Shareable> Shareable for SharedMap<K, V> {}

impl<K, V> Default for SharedMap<K, V> {
    fn default() -> Self {
        SharedMap::new()
    }
}

impl<K, V> SharedMap<K, V> {
    /// An empty map; it allocates nothing until an entry is inserted.
    pub const fn new() -> Self {
        SharedMap {
            storage: Storage::NONE,
            len: 0,
            slots: 0,
            _entries: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for SharedMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMap")
            .field("len", &self.len)
            .field("slots", &self.slots)
            .field("storage", &self.storage.block)
            .finish()
    }
}

fn hash_of<Q: Hash + ?Sized>(key: &Q) -> u64 {
    FixedState::default().hash_one(key) | FULL
}

/// Where `hash`'s probe sequence starts.
fn home(hash: u64, mask: usize) -> usize {
    hash as usize & mask
}

/// Where probing for `hash` in `table` ends: the slot holding a key that
/// `is_key` accepts, or else the empty slot where such a key would go.
/// `Corrupt` if the table has no empty slot (it never fills up).
fn probe<K, V>(
    table: &[Slot<K, V>],
    hash: u64,
    is_key: impl Fn(&K) -> bool,
) -> Result<(usize, bool), Error> {
    let mask = table.len() - 1;
    let mut i = home(hash, mask);
    for _ in 0..table.len() {
        let slot = &table[i];
        if !slot.is_full() {
            return Ok((i, false));
        }
        // SAFETY: the slot is full.
        if slot.hash == hash && is_key(unsafe { slot.entry() }.0) {
            return Ok((i, true));
        }
        i = (i + 1) & mask;
    }
    Err(Error::Corrupt("SharedMap table has no empty slot"))
}

impl<K: Shareable + Hash + Eq, V: Shareable> SharedMap<K, V> {
    /// An empty map with room for `capacity` entries in `m`.
    pub fn with_capacity(m: &Matrix, capacity: usize) -> Result<Self, Error> {
        let mut map = SharedMap::new();
        map.reserve(m, capacity)?;
        Ok(map)
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many entries fit without growing the table.
    pub fn capacity(&self) -> usize {
        (self.slots / 8 * 7) as usize
    }

    /// The table, after the checks (see the type's docs).
    fn table<'a>(&'a self, m: &'a Matrix) -> Result<&'a [Slot<K, V>], Error> {
        let base = self.checked_base(m)?;
        // SAFETY: `slots` slots in a live block of `m` (checked), every one
        // initialised (`hash` written when the table was made); the block is
        // freed only through `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts(base.as_ptr(), self.slots as usize) })
    }

    /// The table, to change.
    fn table_mut<'a>(&'a mut self, m: &'a Matrix) -> Result<&'a mut [Slot<K, V>], Error> {
        let base = self.checked_base(m)?;
        // SAFETY: as in `table`; `&mut self` makes the access exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(base.as_ptr(), self.slots as usize) })
    }

    fn checked_base(&self, m: &Matrix) -> Result<NonNull<Slot<K, V>>, Error> {
        if !(self.slots == 0 || self.slots.is_power_of_two()) || self.len > self.slots {
            return Err(Error::Corrupt("SharedMap length or table size is damaged"));
        }
        self.storage.elements(m, self.slots)
    }

    /// Makes room for at least `additional` more entries.
    pub fn reserve(&mut self, m: &Matrix, additional: usize) -> Result<(), Error> {
        let needed = self
            .len
            .checked_add(additional as u64)
            .ok_or(Error::InvalidLayout)?;
        if needed <= self.capacity() as u64 {
            return Ok(());
        }
        let slots = needed
            .checked_mul(8)
            .map(|n| n.div_ceil(7))
            .and_then(u64::checked_next_power_of_two)
            .ok_or(Error::InvalidLayout)?;
        self.rehash(m, grown_capacity(self.slots, slots, 8))
    }

    /// Moves every entry into a fresh table of `slots` slots.
    fn rehash(&mut self, m: &Matrix, slots: u64) -> Result<(), Error> {
        let old = self.checked_base(m)?;
        let (storage, base) = Storage::allocate::<Slot<K, V>>(m, slots)?;
        for i in 0..slots as usize {
            // SAFETY: slot `i` of the fresh block, which has room for
            // `slots`; only its `hash` is written, the rest stays uninit.
            unsafe { (&raw mut (*base.as_ptr().add(i)).hash).write(EMPTY) };
        }
        // SAFETY: every slot was just initialised; the block is ours alone.
        let fresh = unsafe { std::slice::from_raw_parts_mut(base.as_ptr(), slots as usize) };
        // SAFETY: the old table, checked above, as in `table`.
        let old_table = unsafe { std::slice::from_raw_parts(old.as_ptr(), self.slots as usize) };
        for slot in old_table.iter().filter(|s| s.is_full()) {
            let (i, _) = probe(fresh, slot.hash, |_| false)?;
            fresh[i].hash = slot.hash;
            // SAFETY: the old slot is full; its entry moves (bitwise) to
            // the new table and the old block is freed without dropping it.
            unsafe {
                fresh[i].key.write(slot.key.assume_init_read());
                fresh[i].value.write(slot.value.assume_init_read());
            }
        }
        let old_storage = std::mem::replace(&mut self.storage, storage);
        let old_slots = std::mem::replace(&mut self.slots, slots);
        old_storage.release::<Slot<K, V>>(m, old_slots)
    }

    /// Inserts `value` under `key`; returns the value it replaces. If the
    /// table cannot grow, the error is returned, `key` and `value` dropped
    /// and the map unchanged.
    pub fn insert(&mut self, m: &Matrix, key: K, value: V) -> Result<Option<V>, Error> {
        self.reserve(m, 1)?;
        let hash = hash_of(&key);
        let table = self.table_mut(m)?;
        let (i, found) = probe(table, hash, |k| *k == key)?;
        if found {
            // SAFETY: the slot is full: its value is initialised.
            return Ok(Some(std::mem::replace(
                unsafe { table[i].value.assume_init_mut() },
                value,
            )));
        }
        table[i] = Slot {
            hash,
            key: MaybeUninit::new(key),
            value: MaybeUninit::new(value),
        };
        self.len += 1;
        Ok(None)
    }

    /// Where `key`'s entry is, if it has one.
    fn find<Q>(&self, m: &Matrix, key: &Q) -> Result<Option<usize>, Error>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let table = self.table(m)?;
        if table.is_empty() {
            return Ok(None);
        }
        let (i, found) = probe(table, hash_of(key), |k| k.borrow() == key)?;
        Ok(found.then_some(i))
    }

    /// The value under `key`.
    pub fn get<'a, Q>(&'a self, m: &'a Matrix, key: &Q) -> Result<Option<&'a V>, Error>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(i) = self.find(m, key)? else {
            return Ok(None);
        };
        // SAFETY: `find` returns full slots only.
        Ok(Some(unsafe { self.table(m)?[i].entry() }.1))
    }

    /// The value under `key`, to change in place.
    pub fn get_mut<'a, Q>(&'a mut self, m: &'a Matrix, key: &Q) -> Result<Option<&'a mut V>, Error>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(i) = self.find(m, key)? else {
            return Ok(None);
        };
        // SAFETY: `find` returns full slots only.
        Ok(Some(unsafe {
            self.table_mut(m)?[i].value.assume_init_mut()
        }))
    }

    /// Whether `key` has an entry.
    pub fn contains_key<Q>(&self, m: &Matrix, key: &Q) -> Result<bool, Error>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        Ok(self.find(m, key)?.is_some())
    }

    /// Removes `key`'s entry and returns its value.
    pub fn remove<Q>(&mut self, m: &Matrix, key: &Q) -> Result<Option<V>, Error>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(mut hole) = self.find(m, key)? else {
            return Ok(None);
        };
        let table = self.table_mut(m)?;
        let mask = table.len() - 1;
        table[hole].hash = EMPTY;
        // SAFETY: the slot was full; it is empty from now on, so its key and
        // value are read out exactly once.
        let value = unsafe {
            drop(table[hole].key.assume_init_read());
            table[hole].value.assume_init_read()
        };
        // Shift back the entries after the hole that may sit in it: those
        // whose home is not between the hole and themselves.
        let mut j = (hole + 1) & mask;
        while table[j].is_full() {
            let home = home(table[j].hash, mask);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                table.swap(hole, j);
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.len -= 1;
        Ok(Some(value))
    }

    /// The entries, in table order.
    pub fn iter<'a>(&'a self, m: &'a Matrix) -> Result<Iter<'a, K, V>, Error> {
        Ok(Iter {
            slots: self.table(m)?.iter(),
        })
    }

    /// Drops every entry; the table stays.
    pub fn clear(&mut self, m: &Matrix) -> Result<(), Error> {
        for slot in self.table_mut(m)?.iter_mut().filter(|s| s.is_full()) {
            slot.hash = EMPTY;
            // SAFETY: the slot was full and is empty from now on.
            unsafe {
                slot.key.assume_init_drop();
                slot.value.assume_init_drop();
            }
        }
        self.len = 0;
        Ok(())
    }

    /// Drops every entry and frees the table: the map is empty and
    /// allocates nothing, and can be used again.
    pub fn free(&mut self, m: &Matrix) -> Result<(), Error> {
        self.clear(m)?;
        self.storage.release::<Slot<K, V>>(m, self.slots)?;
        *self = SharedMap::new();
        Ok(())
    }
}

/// The entries of a [`SharedMap`], from [`SharedMap::iter`].
pub struct Iter<'a, K, V> {
    slots: std::slice::Iter<'a, Slot<K, V>>,
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        let slot = self.slots.find(|s| s.is_full())?;
        // SAFETY: the slot is full.
        Some(unsafe { slot.entry() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_fields_are_errors_not_hangs() {
        let m = Matrix::anonymous(1 << 20).unwrap();
        let mut map = SharedMap::<u64, u64>::new();
        for k in 0..5 {
            map.insert(&m, k, k).unwrap();
        }
        let slots = map.slots;
        map.slots = 3;
        assert!(matches!(map.get(&m, &1), Err(Error::Corrupt(_))));
        map.slots = slots;
        map.len = slots + 1;
        assert!(matches!(map.iter(&m), Err(Error::Corrupt(_))));
        map.len = 5;
        map.slots = slots << 20;
        assert!(matches!(map.get(&m, &1), Err(Error::StaleHandle)));
        map.slots = slots;
        // A table with no empty slot (as a damaged one could be): lookups
        // of absent keys end with an error instead of probing forever.
        let saved: Vec<u64> = map.table(&m).unwrap().iter().map(|s| s.hash).collect();
        for slot in map.table_mut(&m).unwrap().iter_mut() {
            if !slot.is_full() {
                slot.hash = FULL | 12345;
                slot.key.write(u64::MAX);
                slot.value.write(0);
            }
        }
        assert!(matches!(map.get(&m, &99), Err(Error::Corrupt(_))));
        for (slot, hash) in map.table_mut(&m).unwrap().iter_mut().zip(saved) {
            slot.hash = hash;
        }
        assert_eq!(map.get(&m, &4).unwrap(), Some(&4));
        map.free(&m).unwrap();
        assert_eq!(m.check().unwrap().used_blocks, 0);
    }
}
