//! The few operating-system questions the engine asks (slow paths only).

use std::os::fd::RawFd;

/// Whether a process with this pid exists. A reused pid reads as alive; a
/// process in another pid namespace reads as dead, so all processes sharing a
/// segment must be in one pid namespace.
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks existence and
    // permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Engine accesses left before this process kills or stops itself (0:
/// never). A test hook, set through [`crate::die_at_engine_step`] and
/// [`crate::stop_at_engine_step`].
static STEPS_TO_SIGNAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The signal the process sends itself at that step: SIGKILL or SIGSTOP.
static STEP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(libc::SIGKILL);

/// Counts one engine step (every access to a block header or a node); the
/// process sends itself SIGKILL (or SIGSTOP) at the step the hook named.
/// One relaxed load when unused, on engine paths only.
#[inline(always)]
pub(crate) fn engine_step() {
    if STEPS_TO_SIGNAL.load(std::sync::atomic::Ordering::Relaxed) != 0 {
        countdown();
    }
}

#[cold]
fn countdown() {
    if STEPS_TO_SIGNAL.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1 {
        // SIGKILL cannot be caught, so this is the death a `kill -9` from
        // outside would be; SIGSTOP cannot be caught either, and the
        // process goes on where it stopped once it gets SIGCONT.
        let signal = STEP_SIGNAL.load(std::sync::atomic::Ordering::Relaxed);
        // SAFETY: sending a signal to ourselves.
        unsafe { libc::kill(libc::getpid(), signal) };
    }
}

/// Sends `signal` to this process at the `n`-th engine step from now (0: never).
pub(crate) fn signal_at_step(n: u64, signal: libc::c_int) {
    STEP_SIGNAL.store(signal, std::sync::atomic::Ordering::Relaxed);
    STEPS_TO_SIGNAL.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// Sleeps while `*word == expected`, for at most `timeout`, on a futex shared
/// between processes (no `FUTEX_PRIVATE_FLAG`: the word may be in a
/// segment other processes map). Returns on a wake, a timeout, a signal or
/// a changed word alike; callers re-check.
pub(crate) fn futex_wait(
    word: &std::sync::atomic::AtomicU32,
    expected: u32,
    timeout: std::time::Duration,
) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned 32-bit atomic for the duration of
    // the call; the kernel only reads it and the timespec.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Wakes up to `n` threads (of any process) sleeping in `futex_wait` on `word`.
pub(crate) fn futex_wake(word: &std::sync::atomic::AtomicU32, n: u32) {
    // SAFETY: `word` is a live, aligned 32-bit atomic; FUTEX_WAKE only uses
    // its address.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n) };
}

/// How a segment's freed memory goes back to the OS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purge {
    /// `MADV_DONTNEED`: private anonymous memory (the pages read as zero
    /// afterwards).
    DontNeed,
    /// `fallocate(PUNCH_HOLE)` on the segment's file (in tmpfs or on disk),
    /// open as this descriptor and mapped from offset 0: the file's pages
    /// or blocks go, in every process's mapping. (`MADV_DONTNEED` would
    /// only unmap them from this process; `MADV_REMOVE` left a third of a
    /// freed working set allocated in an ext4 file whose pages were still
    /// dirty, where `fallocate` on the same ranges freed it all.)
    Punch(RawFd),
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: one clock for every process of
/// the machine, so that times stored in a segment compare across them, and
/// read without the time counter (a few nanoseconds; it moves in steps of
/// a few milliseconds, fine for the purge delay).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE
    // exists on Linux since 2.6.32, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Gives the pages of `[addr, addr + len)` (page-aligned, at `offset` in
/// the segment) back to the OS; they read as zero afterwards. Returns
/// whether the kernel did (a file system without hole punching refuses).
pub(crate) fn purge(addr: *mut u8, offset: u64, len: usize, how: Purge) -> bool {
    match how {
        // SAFETY: the caller owns the range exclusively, inside a live
        // mapping of its segment, and needs none of its contents: dropping
        // the pages cannot affect memory anyone else uses.
        Purge::DontNeed => unsafe {
            libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0
        },
        Purge::Punch(fd) => {
            write_back_ends(fd, offset, len as u64);
            // SAFETY: as above, for the same bytes of the file behind the
            // mapping; the descriptor is the segment's, open while it lives.
            unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                ) == 0
            }
        }
    }
}

/// The largest folio the page cache may keep a file's pages in (a PMD).
const LARGE_FOLIO: u64 = 2 << 20;

/// Writes back the file's pages around both ends of `[offset, offset +
/// len)`. The page cache may hold them in a large folio that reaches past
/// the range into live memory; the kernel cannot split such a folio while
/// it is dirty, and then only zeroes the range's part of it and keeps its
/// blocks (seen on ext4, Linux 6.18: a third of a freed working set stayed
/// allocated after its punches succeeded). Once clean, it splits and the
/// punch frees everything. (tmpfs has no write-back: this returns at once.)
fn write_back_ends(fd: RawFd, offset: u64, len: u64) {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let write_back = |at: u64| {
        // SAFETY: a plain system call on the segment's descriptor; a
        // failure leaves only the punch less complete.
        unsafe { libc::sync_file_range(fd, at as libc::off_t, LARGE_FOLIO as libc::off_t, flags) };
    };
    let head = offset / LARGE_FOLIO * LARGE_FOLIO;
    let tail = (offset + len) / LARGE_FOLIO * LARGE_FOLIO;
    write_back(head);
    if tail != head {
        write_back(tail);
    }
}
