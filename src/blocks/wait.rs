//! Waiting for memory: the `Allocate` future, this process's queue of
//! waiters, and the thread that sleeps on the segment's futex for them.
//!
//! Order: this process's waiters are served first come, first served. Only
//! the queue's head tries to allocate; a later, smaller request waits
//! behind it even if it would fit, so a large request is never starved by
//! small ones of this process. `try_allocate` does not queue. Across
//! processes there is no order: another process's requests can take the
//! memory a waiter here wants, indefinitely if they never stop.
//!
//! Wakeups: every free bumps the table's `freed` word and, if any thread
//! sleeps on it, wakes it (`table::recycle`). One thread per front end
//! sleeps there while the queue is not empty, with the `freed` value the
//! head saw before its last failed attempt, so a free between that
//! attempt and the sleep is not missed (the kernel compares the word). It
//! then wakes the head, which tries again. The sleep is also cut at 100 ms
//! (memory can come back without a free: `reclaim_dead`) and at the
//! nearest deadline. No lost wakeups on cancellation: a dropped head passes
//! its turn to the next waiter.

use super::{Block, Blocks};
use crate::Error;
use std::alloc::Layout;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The longest the waiter thread sleeps before the head tries again.
const RECHECK: Duration = Duration::from_millis(100);

#[derive(Default)]
pub(crate) struct Queue {
    state: Mutex<State>,
    changed: Condvar,
    /// `state.entries.len()`, for the fast path to read without the lock
    /// (a stale read only lets one attempt jump the queue once).
    queued: AtomicUsize,
}

#[derive(Default)]
struct State {
    entries: VecDeque<Entry>,
    next_ticket: u64,
    /// `freed` as the head saw it before its last failed attempt.
    seen: u32,
    /// The head was woken and has not tried again yet.
    woken: bool,
    thread: bool,
    closed: bool,
}

struct Entry {
    ticket: u64,
    waker: Waker,
    deadline: Option<Instant>,
}

impl State {
    fn is_head(&self, ticket: u64) -> bool {
        self.entries.front().is_some_and(|e| e.ticket == ticket)
    }

    /// Removes `ticket`; if it was the head, wakes the next one.
    fn remove(&mut self, ticket: u64) {
        let was_head = self.is_head(ticket);
        self.entries.retain(|e| e.ticket != ticket);
        if was_head {
            self.woken = !self.entries.is_empty();
            if let Some(next) = self.entries.front() {
                next.waker.wake_by_ref();
            }
        }
    }

    fn nearest_deadline(&self) -> Option<Instant> {
        self.entries.iter().filter_map(|e| e.deadline).min()
    }

    /// Wakes the entries whose deadline has passed.
    fn wake_expired(&self, now: Instant) {
        for e in self
            .entries
            .iter()
            .filter(|e| e.deadline.is_some_and(|d| d <= now))
        {
            e.waker.wake_by_ref();
        }
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the waiter thread to stop (the front end is gone).
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// The sleeper: runs while the front end lives.
fn run_waiter(queue: Arc<Queue>, blocks: Weak<super::Inner>) {
    let mut st = queue.lock();
    loop {
        if st.closed {
            return;
        }
        let now = Instant::now();
        st.wake_expired(now);
        let nap = st
            .nearest_deadline()
            .map_or(RECHECK, |d| d.saturating_duration_since(now).min(RECHECK));
        if st.entries.is_empty() || st.woken {
            st = queue
                .changed
                .wait_timeout(st, nap)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let seen = st.seen;
        drop(st);
        if let Some(inner) = blocks.upgrade() {
            // SAFETY: the table lives as long as `inner` keeps it mapped.
            let table = unsafe { inner.table.as_ref() };
            // SeqCst: see `table::recycle`.
            table.waiters.fetch_add(1, SeqCst);
            crate::os::futex_wait(&table.freed, seen, nap.max(Duration::from_micros(1)));
            table.waiters.fetch_sub(1, SeqCst);
        }
        st = queue.lock();
        if let Some(head) = st.entries.front() {
            head.waker.wake_by_ref();
            st.woken = true;
        }
    }
}

/// The future of [`Blocks::allocate`] and [`Blocks::allocate_timeout`].
#[must_use = "futures do nothing unless polled"]
pub struct Allocate<'a> {
    blocks: &'a Blocks,
    layout: Layout,
    deadline: Option<Instant>,
    /// Our place in the queue, once we wait.
    ticket: Option<u64>,
    since: Option<Instant>,
}

impl std::fmt::Debug for Allocate<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocate")
            .field("layout", &self.layout)
            .field("waiting", &self.ticket.is_some())
            .finish()
    }
}

impl<'a> Allocate<'a> {
    pub(crate) fn new(blocks: &'a Blocks, layout: Layout, timeout: Option<Duration>) -> Self {
        Allocate {
            blocks,
            layout,
            // A timeout too long to represent is no deadline.
            deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
            ticket: None,
            since: None,
        }
    }

    fn queue(&self) -> &Arc<Queue> {
        &self.blocks.inner.waiting
    }

    /// One attempt: `None` if there is not enough memory now.
    fn attempt(&self) -> (u32, Option<Result<Block, Error>>) {
        let seen = self.blocks.table().freed.load(SeqCst);
        match self.blocks.try_allocate(self.layout) {
            Err(Error::OutOfMemory { .. }) => (seen, None),
            other => (seen, Some(other)),
        }
    }

    fn enqueue(
        &mut self,
        st: &mut State,
        (seen, tried): (u32, bool),
        waker: &Waker,
    ) -> Result<(), Error> {
        if !st.thread {
            let queue = Arc::clone(self.queue());
            let inner = Arc::downgrade(&self.blocks.inner);
            std::thread::Builder::new()
                .name("matrix-blocks-waiter".into())
                .spawn(move || run_waiter(queue, inner))
                .map_err(Error::Io)?;
            st.thread = true;
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        if st.entries.is_empty() {
            st.seen = seen;
            // The head: if it has not tried yet (it saw others queued, who
            // left since), it tries at its next poll, which is now.
            st.woken = !tried;
            if !tried {
                waker.wake_by_ref();
            }
        }
        st.entries.push_back(Entry {
            ticket,
            waker: waker.clone(),
            deadline: self.deadline,
        });
        self.queue().queued.store(st.entries.len(), Relaxed);
        self.ticket = Some(ticket);
        self.since = Some(Instant::now());
        self.blocks.inner.counters.waits.fetch_add(1, Relaxed);
        self.queue().changed.notify_all();
        Ok(())
    }

    /// Leaves the queue (done, failed or cancelled) and counts the wait.
    fn leave(&mut self, timed_out: bool) {
        if let Some(ticket) = self.ticket.take() {
            let mut st = self.queue().lock();
            st.remove(ticket);
            self.queue().queued.store(st.entries.len(), Relaxed);
            drop(st);
            self.queue().changed.notify_all();
            let c = &self.blocks.inner.counters;
            let waited = self
                .since
                .take()
                .map_or(0, |s| s.elapsed().as_nanos() as u64);
            c.waited_ns.fetch_add(waited, Relaxed);
            if timed_out {
                c.timeouts.fetch_add(1, Relaxed);
            }
        }
    }

    fn finish(&mut self, r: Result<Block, Error>) -> Poll<Result<Block, Error>> {
        self.leave(matches!(r, Err(Error::Timeout)));
        Poll::Ready(r)
    }
}

impl Future for Allocate<'_> {
    type Output = Result<Block, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.layout.size() > this.blocks.matrix().capacity() {
            // No amount of freeing makes it fit.
            let requested = this.layout.size();
            return this.finish(Err(Error::OutOfMemory { requested }));
        }
        let Some(ticket) = this.ticket else {
            let queued = this.queue().queued.load(Relaxed) != 0;
            let seen = if queued {
                (this.blocks.table().freed.load(SeqCst), false)
            } else {
                match this.attempt() {
                    (_, Some(r)) => return Poll::Ready(r),
                    (seen, None) => (seen, true),
                }
            };
            let queue = Arc::clone(this.queue());
            let mut st = queue.lock();
            return match this.enqueue(&mut st, seen, cx.waker()) {
                Ok(()) => Poll::Pending,
                Err(e) => {
                    drop(st);
                    this.finish(Err(e))
                }
            };
        };
        if this.deadline.is_some_and(|d| Instant::now() >= d) {
            return this.finish(Err(Error::Timeout));
        }
        let queue = Arc::clone(this.queue());
        let mut st = queue.lock();
        if let Some(e) = st.entries.iter_mut().find(|e| e.ticket == ticket) {
            e.waker.clone_from(cx.waker());
        }
        if !st.is_head(ticket) {
            return Poll::Pending;
        }
        drop(st);
        match this.attempt() {
            (_, Some(r)) => this.finish(r),
            (seen, None) => {
                let mut st = queue.lock();
                st.seen = seen;
                st.woken = false;
                drop(st);
                queue.changed.notify_all();
                Poll::Pending
            }
        }
    }
}

impl Drop for Allocate<'_> {
    fn drop(&mut self) {
        self.leave(false);
    }
}
