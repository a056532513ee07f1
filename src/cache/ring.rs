//! A thread heap's lists of its own pages: circular, doubly linked through
//! the pages' headers (owner-only fields, so plain `Relaxed` accesses).
//!
//! Each class has two: pages that may have free blocks (`available`), and
//! pages that were full when last looked at (`full`), so that finding a page
//! with room does not walk every full page again and again (a program with
//! a large live set owns thousands of them). A page's `tidy_below` says which
//! list it is on. The heap's stash of empty pages is a ring too.

use super::page_at;
use crate::engine::words::NIL;
use crate::engine::Engine;
use crate::sync::Ordering::Relaxed;

#[derive(Clone, Copy)]
pub(crate) struct Ring {
    head: u32,
}

impl Ring {
    pub(crate) const EMPTY: Ring = Ring { head: NIL };

    /// The first page, if any.
    pub(crate) fn head(self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    /// Adds page `n` at the end (just before the head).
    pub(crate) fn push(&mut self, engine: &Engine, n: u32) {
        let h = page_at(engine, n).header();
        if self.head == NIL {
            h.next_owned.store(n, Relaxed);
            h.prev_owned.store(n, Relaxed);
            self.head = n;
            return;
        }
        let head = page_at(engine, self.head).header();
        let last = head.prev_owned.load(Relaxed);
        h.next_owned.store(self.head, Relaxed);
        h.prev_owned.store(last, Relaxed);
        page_at(engine, last).header().next_owned.store(n, Relaxed);
        head.prev_owned.store(n, Relaxed);
    }

    /// Adds page `n` at the front: it becomes the head.
    pub(crate) fn push_front(&mut self, engine: &Engine, n: u32) {
        self.push(engine, n);
        self.head = n;
    }

    /// Takes page `n` (which is on this ring) off it.
    pub(crate) fn remove(&mut self, engine: &Engine, n: u32) {
        let h = page_at(engine, n).header();
        let (prev, next) = (h.prev_owned.load(Relaxed), h.next_owned.load(Relaxed));
        if next == n {
            self.head = NIL;
            return;
        }
        page_at(engine, prev)
            .header()
            .next_owned
            .store(next, Relaxed);
        page_at(engine, next)
            .header()
            .prev_owned
            .store(prev, Relaxed);
        if self.head == n {
            self.head = next;
        }
    }

    /// How many pages are on the ring (walks it).
    pub(crate) fn len(self, engine: &Engine) -> usize {
        let Some(head) = self.head() else { return 0 };
        let mut n = 1;
        let mut cur = page_at(engine, head).header().next_owned.load(Relaxed);
        while cur != head {
            n += 1;
            cur = page_at(engine, cur).header().next_owned.load(Relaxed);
        }
        n
    }

    /// Makes the second page the head (the old head becomes the last).
    pub(crate) fn rotate(&mut self, engine: &Engine) {
        if self.head != NIL {
            self.head = page_at(engine, self.head).header().next_owned.load(Relaxed);
        }
    }
}
