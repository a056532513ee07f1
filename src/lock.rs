//! `ShmMutex<T>`: a mutex that lives in a segment, is shared by every
//! process that maps it, sleeps on a futex, and survives its holder.
//!
//! # The lock word
//! One `AtomicU32`: bits 0..24 the holder's tag (the engine's holder tag of
//! the `Matrix` handle that locked: its process slot and the slot's
//! generation, never 0), bit 31 `WAITERS` (someone may be asleep on the
//! word). 0 is unlocked.
//!
//! # Invariants and orderings
//! - At most one holder: the word goes from "no holder" to a holder only by
//!   a compare-and-swap, which succeeds for one locker (`Acquire`, pairing
//!   with the `Release` of the unlock or of the holder's death-taking CAS,
//!   so the data the last holder wrote is visible).
//! - A holder whose process is gone (`Engine::holder_dead`: its slot was
//!   released, retaken or its pid is gone) is replaced by a
//!   compare-and-swap from exactly the word that named it, so two waiters
//!   that both see the death cannot both take over. The taker gets the lock
//!   with [`LockError::OwnerDied`]: the data is as the dead holder left it,
//!   perhaps half updated, for the taker to repair, as a robust pthread
//!   mutex's `EOWNERDEAD`.
//! - No lost wake-up: a waiter sets `WAITERS` before it sleeps and sleeps
//!   only while the word still reads that value; an unlock that clears a
//!   word with `WAITERS` wakes one sleeper, and a waiter that slept takes
//!   the lock with `WAITERS` set, so that its own unlock wakes the next.
//! - Never a wedge: a sleeper wakes by itself every `LIVENESS_POLL` to see
//!   whether the holder is still alive, so a holder killed with `kill -9`
//!   (which wakes nobody) is noticed within that time.
//!
//! Holders are told apart by process (a slot), not by thread: a thread that
//! locks a mutex it holds already deadlocks, as with `std::sync::Mutex`.
//! Processes past the 127th attached to a segment share its last slot, and
//! their deaths are not detected.

use crate::os::{futex_wait, futex_wake};
use crate::{Error, Matrix, Shareable};
use std::cell::UnsafeCell;
use std::sync::atomic::{
    AtomicU32,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::Duration;

const OWNER: u32 = 0x00ff_ffff;
const WAITERS: u32 = 1 << 31;

/// How often a waiter looks whether the holder is still alive.
pub const LIVENESS_POLL: Duration = Duration::from_millis(10);

/// Spins before a locker sleeps: a holder that is running usually lets go
/// within a few hundred nanoseconds.
const SPINS: u32 = 100;

/// A mutex in a segment, for any process that maps it (see the module
/// documentation). Put it in the segment with [`Matrix::alloc_value`] (or
/// inside another shareable object) and lock it with the `Matrix` of the
/// process at hand:
///
/// ```
/// use matrix_alloc::{Matrix, ShmMutex};
///
/// let m = Matrix::anonymous(1 << 20)?;
/// let h = m.alloc_value(ShmMutex::new(0u64))?;
/// let counter = m.get(h)?;
/// *counter.lock(&m).expect("no holder died") += 1;
/// assert_eq!(*counter.lock(&m).unwrap(), 1);
/// # Ok::<(), matrix_alloc::Error>(())
/// ```
#[repr(C)]
pub struct ShmMutex<T> {
    word: AtomicU32,
    data: UnsafeCell<T>,
}

// SAFETY: the data is reached only through a guard, which the lock word
// grants to one holder at a time; `T: Send` because holders on different
// threads take turns with it.
unsafe impl<T: Send> Sync for ShmMutex<T> {}
// SAFETY: a lock word (an atomic) and a shareable value, `#[repr(C)]`.
unsafe impl<T: Shareable> Shareable for ShmMutex<T> {}

/// Why [`ShmMutex::lock`] gave no plain guard.
pub enum LockError<'a, T> {
    /// The previous holder died holding the lock. The lock is now held by
    /// the caller, through this guard: the data is as the dead holder left
    /// it, for the caller to check and repair.
    OwnerDied(ShmGuard<'a, T>),
    /// The mutex does not lie in the segment of the `Matrix` given.
    NotInSegment,
}

impl<'a, T> LockError<'a, T> {
    /// The guard of `OwnerDied`, if that is what this is.
    pub fn into_guard(self) -> Option<ShmGuard<'a, T>> {
        match self {
            LockError::OwnerDied(g) => Some(g),
            LockError::NotInSegment => None,
        }
    }
}

impl<T> std::fmt::Debug for LockError<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::OwnerDied(_) => f.write_str("OwnerDied(..)"),
            LockError::NotInSegment => f.write_str("NotInSegment"),
        }
    }
}

impl<T> From<LockError<'_, T>> for Error {
    fn from(e: LockError<'_, T>) -> Error {
        match e {
            LockError::OwnerDied(_) => Error::Corrupt("a lock's holder died"),
            LockError::NotInSegment => Error::NotInSegment,
        }
    }
}

/// Holds a [`ShmMutex`]; unlocks when dropped.
pub struct ShmGuard<'a, T> {
    mutex: &'a ShmMutex<T>,
}

impl<T> ShmMutex<T> {
    /// An unlocked mutex holding `value`.
    pub const fn new(value: T) -> ShmMutex<T> {
        ShmMutex {
            word: AtomicU32::new(0),
            data: UnsafeCell::new(value),
        }
    }

    /// Locks, waiting (asleep) while another thread or process holds it.
    /// `m` is this process's handle of the segment the mutex lies in.
    pub fn lock<'a>(&'a self, m: &Matrix) -> Result<ShmGuard<'a, T>, LockError<'a, T>> {
        if m.offset_of(self).is_none() {
            return Err(LockError::NotInSegment);
        }
        let died = raw_lock(&self.word, m);
        let guard = ShmGuard { mutex: self };
        if died {
            Err(LockError::OwnerDied(guard))
        } else {
            Ok(guard)
        }
    }

    /// Locks if no one holds it, or if its holder died; `None` if a live
    /// holder has it.
    pub fn try_lock<'a>(&'a self, m: &Matrix) -> Option<Result<ShmGuard<'a, T>, LockError<'a, T>>> {
        if m.offset_of(self).is_none() {
            return Some(Err(LockError::NotInSegment));
        }
        let died = try_take(&self.word, m, 0)?;
        let guard = ShmGuard { mutex: self };
        Some(if died {
            Err(LockError::OwnerDied(guard))
        } else {
            Ok(guard)
        })
    }

    /// The data, for the sole owner of the mutex (no lock needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

impl<T> std::ops::Deref for ShmGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, so no one else reaches the data.
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T> std::ops::DerefMut for ShmGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and the guard is borrowed mutably.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T> Drop for ShmGuard<'_, T> {
    fn drop(&mut self) {
        raw_unlock(&self.mutex.word);
    }
}

/// One attempt to take the lock from its state `cur`: free, or held by a
/// dead holder. `Some(died)` if taken. `keep` is or-ed into the new word
/// (`WAITERS` for a locker that slept).
fn try_take(word: &AtomicU32, m: &Matrix, keep: u32) -> Option<bool> {
    let cur = word.load(Relaxed);
    let owner = cur & OWNER;
    let died = owner != 0 && m.engine().holder_dead(owner);
    if owner != 0 && !died {
        return None;
    }
    let me = m.engine().holder_tag() & OWNER;
    word.compare_exchange(cur, me | (cur & WAITERS) | keep, Acquire, Relaxed)
        .ok()
        .map(|_| died)
}

/// Takes the lock; returns whether the previous holder had died.
fn raw_lock(word: &AtomicU32, m: &Matrix) -> bool {
    let mut keep = 0;
    let mut spins = 0;
    loop {
        if let Some(died) = try_take(word, m, keep) {
            return died;
        }
        if spins < SPINS {
            spins += 1;
            std::hint::spin_loop();
            continue;
        }
        let cur = word.load(Relaxed);
        if cur & OWNER == 0 {
            continue;
        }
        if cur & WAITERS == 0
            && word
                .compare_exchange(cur, cur | WAITERS, Relaxed, Relaxed)
                .is_err()
        {
            continue;
        }
        futex_wait(word, cur | WAITERS, LIVENESS_POLL);
        // Others may sleep too: this locker's unlock must wake one.
        keep = WAITERS;
    }
}

fn raw_unlock(word: &AtomicU32) {
    if word.swap(0, Release) & WAITERS != 0 {
        futex_wake(word, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_take_turns_and_every_increment_counts() {
        let m = Matrix::anonymous(1 << 20).unwrap();
        let h = m.alloc_value(ShmMutex::new((0u64, 0u64))).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mutex = m.get(h).unwrap();
                    for _ in 0..20_000 {
                        let mut g = mutex.lock(&m).unwrap();
                        // Two fields changed apart: a second holder at once
                        // would make them differ.
                        g.0 += 1;
                        std::hint::black_box(&mut *g);
                        g.1 += 1;
                    }
                });
            }
        });
        let g = m.get(h).unwrap().lock(&m).unwrap();
        assert_eq!(*g, (80_000, 80_000));
    }

    #[test]
    fn a_mutex_of_another_segment_is_refused() {
        let a = Matrix::anonymous(1 << 20).unwrap();
        let b = Matrix::anonymous(1 << 20).unwrap();
        let h = a.alloc_value(ShmMutex::new(1u32)).unwrap();
        let mutex = a.get(h).unwrap();
        assert!(matches!(mutex.lock(&b), Err(LockError::NotInSegment)));
        assert!(mutex.try_lock(&a).unwrap().is_ok());
    }

    #[test]
    fn try_lock_fails_while_held() {
        let m = Matrix::anonymous(1 << 20).unwrap();
        let h = m.alloc_value(ShmMutex::new(1u32)).unwrap();
        let mutex = m.get(h).unwrap();
        let g = mutex.lock(&m).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| assert!(mutex.try_lock(&m).is_none()));
        });
        drop(g);
        assert!(mutex.try_lock(&m).unwrap().is_ok());
    }
}
