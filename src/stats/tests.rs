//! The counters' unit tests: the pair's halves, the scenario, and
//! simulated threads in both counting modes.

use super::*;

/// dhat's counters, kept the plain way.
#[derive(Default)]
struct Model {
    total_blocks: u64,
    total_bytes: u64,
    curr_blocks: u64,
    curr_bytes: u64,
    max_blocks: u64,
    max_bytes: u64,
}

impl Model {
    /// Asserts that `s` counts what the model does (`peaks`: the peak too).
    fn check(&self, s: &Stats, peaks: bool, op: u64) {
        let got = (s.total_blocks, s.total_bytes, s.curr_blocks, s.curr_bytes);
        let want = (
            self.total_blocks,
            self.total_bytes,
            self.curr_blocks,
            self.curr_bytes,
        );
        assert_eq!(got, want, "op {op}");
        if peaks {
            assert_eq!(
                (s.max_bytes, s.max_blocks),
                (self.max_bytes, self.max_blocks),
                "op {op}"
            );
        }
    }

    fn peak(&mut self) {
        if self.curr_bytes >= self.max_bytes {
            self.max_bytes = self.curr_bytes;
            self.max_blocks = self.curr_blocks;
        }
    }
}

/// One thread's batches, through the fast paths' tests and counts when
/// they allow and the slow paths' otherwise, add up to dhat's counters
/// after every flush, and a batch never holds more than `FLUSH_EVERY`
/// allocations or frees.
#[test]
fn batched_counts_match_dhat_at_every_flush() {
    let c = Counters::default();
    let mut d = c.fresh_delta();
    let mut m = Model::default();
    let mut live: Vec<u64> = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut due_flushes = 0;
    for op in 0..200_000u64 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = 1 + seed % 600;
        // Long runs of one kind of operation, so that both batch
        // limits are reached, and short ones in between.
        let phase = (op / 5000) % 3;
        let due = match (seed >> 20) % 10 {
            _ if live.is_empty() || phase == 0 && seed % 8 != 0 => {
                live.push(size);
                (m.total_blocks, m.total_bytes) = (m.total_blocks + 1, m.total_bytes + size);
                (m.curr_blocks, m.curr_bytes) = (m.curr_blocks + 1, m.curr_bytes + size);
                m.peak();
                if d.alloc_in_batch() {
                    d.count_alloc(size);
                    false
                } else {
                    d.on_alloc(size)
                }
            }
            0 => {
                let i = (seed >> 32) as usize % live.len();
                let old = std::mem::replace(&mut live[i], size);
                (m.total_blocks, m.total_bytes) = (m.total_blocks + 1, m.total_bytes + size);
                m.curr_bytes = m.curr_bytes - old + size;
                m.peak();
                if d.alloc_in_batch() && d.free_in_batch() {
                    d.count_realloc(old, size);
                    false
                } else {
                    d.on_realloc(old, size)
                }
            }
            _ => {
                let i = (seed >> 32) as usize % live.len();
                let old = live.swap_remove(i);
                (m.curr_blocks, m.curr_bytes) = (m.curr_blocks - 1, m.curr_bytes - old);
                if d.free_in_batch() {
                    d.count_free(old);
                    false
                } else {
                    d.on_free(old)
                }
            }
        };
        due_flushes += due as u32;
        if due || op % 7919 == 0 {
            c.flush(&mut d);
            m.check(&c.snapshot(0, 0), true, op);
        }
        assert!(d.allocs < FLUSH_EVERY && d.frees < FLUSH_EVERY);
    }
    // About one flush per `FLUSH_EVERY` allocations or frees.
    assert!(due_flushes >= 100, "{due_flushes} flushes were due");
}

/// dhat's `>=`: reaching the peak again with other blocks moves
/// `max_blocks` to the latest; reaching it with the same ones (an
/// allocate/free loop, which the fast path writes nothing for) keeps it.
#[test]
fn the_latest_of_equal_peaks_counts() {
    let c = Counters::default();
    let mut d = c.fresh_delta();
    d.count_alloc(100);
    d.count_free(100);
    d.count_alloc(60);
    d.count_alloc(40);
    for _ in 0..3 {
        d.count_free(40);
        d.count_alloc(40);
    }
    c.flush(&mut d);
    let s = c.snapshot(0, 0);
    assert_eq!((s.max_bytes, s.max_blocks), (100, 2));
    assert_eq!((s.total_blocks, s.curr_blocks, s.curr_bytes), (6, 2, 100));
}

#[test]
fn a_count_below_zero_is_no_peak_and_reads_as_zero() {
    let c = Counters::default();
    // Thread B frees a block that thread A allocated but has not counted yet.
    let mut a = c.fresh_delta();
    let mut b = c.fresh_delta();
    a.on_alloc(100);
    b.on_free(100);
    c.flush(&mut b);
    let s = c.snapshot(0, 0);
    assert_eq!((s.curr_blocks, s.curr_bytes, s.max_bytes), (0, 0, 0));
    c.flush(&mut a);
    let s = c.snapshot(0, 0);
    assert_eq!((s.curr_blocks, s.curr_bytes), (0, 0));
    assert_eq!(
        (s.total_blocks, s.total_bytes, s.max_bytes, s.max_blocks),
        (1, 100, 100, 1)
    );
}

#[test]
fn pair_fields_do_not_overlap() {
    let p = Pair {
        bytes: u64::MAX,
        blocks: 0,
    };
    assert_eq!(Pair::from(p.value()), p);
    let q = Pair {
        bytes: 0,
        blocks: u64::MAX,
    };
    assert_eq!(Pair::from(q.value()), q);
    assert_eq!(p.value() & q.value(), 0);
    assert_eq!(
        Pair::from(p.value() | q.value()).add(Pair {
            bytes: 1,
            blocks: 1
        }),
        Pair {
            bytes: 0,
            blocks: 0
        }
    );
}

/// The program at the level of the counters: thread A's 500
/// allocations are pending when thread B frees them, and thread C then
/// allocates 1 GiB. The view below zero must not swallow C's peak.
#[test]
fn a_peak_after_a_view_below_zero_counts() {
    let c = Counters::default();
    let mut a = c.fresh_delta();
    for _ in 0..500 {
        a.count_alloc(100);
    }
    let mut b = c.fresh_delta();
    for _ in 0..500 {
        b.count_free(100);
    }
    c.flush(&mut b);
    let s = c.snapshot(0, 0);
    assert_eq!((s.curr_bytes, s.curr_blocks, s.max_bytes), (0, 0, 0));
    let mut t = c.fresh_delta();
    assert!(t.on_alloc(1 << 30), "a 1 GiB request is applied at once");
    c.flush(&mut t);
    let s = c.snapshot(0, 0);
    assert!(s.max_bytes >= 1 << 30, "{s:?}");
    assert!(s.max_bytes >= s.curr_bytes);
    assert_eq!(s.max_blocks, 1);
    t.on_free(1 << 30);
    c.flush(&mut t);
    c.flush(&mut a);
    let s = c.snapshot(0, 0);
    assert_eq!((s.curr_bytes, s.curr_blocks), (0, 0));
    assert_eq!(s.max_bytes, 1 << 30);
    assert_eq!(s.total_blocks, 501);
}

/// Simulated threads, each with its own batch, allocate, hand blocks to
/// each other and free them, in a random interleaving; the model
/// applies every operation at once, in that order, as dhat does. At
/// every read: `max_bytes >= curr_bytes`, `max_blocks` is the count of
/// a state the model passed through at `max_bytes` or of one within the
/// bound, and batched `max_bytes` is within `2 × T × PENDING_BYTES` of
/// the model's; in exact mode all six numbers are the model's.
fn simulate(exact: bool, threads: usize, seed: u64) {
    let c = Counters::default();
    c.set_exact(exact);
    let mut deltas: Vec<Delta> = (0..threads).map(|_| c.fresh_delta()).collect();
    let mut m = Model::default();
    // Live blocks, each with the size it was asked for; any thread may free any.
    let mut live: Vec<u64> = Vec::new();
    let mut rng = seed | 1;
    let bound = 2 * threads as u64 * PENDING_BYTES;
    for op in 0..60_000u64 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let t = (rng >> 8) as usize % threads;
        let d = &mut deltas[t];
        // Phases of growth and of shrinking, so that peaks come and go.
        let grow = (op / 3000) % 2 == 0;
        let due = if live.is_empty() || (grow && rng % 4 != 0) || (!grow && rng % 4 == 0) {
            let size = match rng % 100 {
                0 => 1 << 20,
                1..=5 => 1 + (rng >> 40) % (64 << 10),
                _ => 1 + (rng >> 40) % 1024,
            };
            live.push(size);
            (m.total_blocks, m.total_bytes) = (m.total_blocks + 1, m.total_bytes + size);
            (m.curr_blocks, m.curr_bytes) = (m.curr_blocks + 1, m.curr_bytes + size);
            m.peak();
            if size <= 1024 && d.alloc_in_batch() {
                d.count_alloc(size);
                false
            } else {
                d.on_alloc(size)
            }
        } else {
            let size = live.swap_remove((rng >> 32) as usize % live.len());
            (m.curr_blocks, m.curr_bytes) = (m.curr_blocks - 1, m.curr_bytes - size);
            if size <= 1024 && d.free_in_batch() {
                d.count_free(size);
                false
            } else {
                d.on_free(size)
            }
        };
        if due {
            c.flush(d);
        }
        if op % 101 == 0 {
            // A reader that has nothing pending of its own.
            let s = c.snapshot(0, 0);
            assert!(s.max_bytes >= s.curr_bytes, "op {op}: {s:?}");
            assert!(s.max_bytes <= m.max_bytes + bound, "op {op}: {s:?}");
            assert!(s.max_bytes + bound >= m.max_bytes, "op {op}: {s:?}");
            assert!(s.max_blocks <= s.total_blocks);
            if exact {
                m.check(&s, true, op);
            }
        }
    }
    for d in deltas.iter_mut() {
        c.flush(d);
    }
    let s = c.snapshot(0, 0);
    m.check(&s, exact || threads == 1, u64::MAX);
    assert!(s.max_bytes.abs_diff(m.max_bytes) <= bound, "{s:?}");
}

#[test]
fn batched_counts_on_many_threads_stay_within_the_bound() {
    for (threads, seed) in [(1, 7), (2, 11), (4, 13), (8, 17)] {
        simulate(false, threads, seed);
    }
}

#[test]
fn exact_counts_on_many_threads_are_dhats() {
    for (threads, seed) in [(1, 7), (2, 11), (4, 13), (8, 17)] {
        simulate(true, threads, seed);
    }
}

/// Switching a segment with batches pending to exact mode: the pending
/// changes are applied at the next flush, and from then on every
/// operation is applied at once.
#[test]
fn a_batch_pending_at_the_switch_joins_at_its_next_flush() {
    let c = Counters::default();
    let mut d = c.fresh_delta();
    d.count_alloc(10);
    c.set_exact(true);
    assert!(d.alloc_in_batch(), "still batched until it flushes");
    d.count_alloc(20);
    c.flush(&mut d);
    assert!(!d.alloc_in_batch() && !d.free_in_batch());
    assert!(d.on_alloc(30), "exact: every operation is due");
    c.flush(&mut d);
    let s = c.snapshot(0, 0);
    assert_eq!(
        (s.total_blocks, s.curr_bytes, s.max_bytes, s.max_blocks),
        (3, 60, 60, 3)
    );
}
