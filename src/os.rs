//! The few operating-system questions the engine asks (slow paths only).

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
    /// `MADV_REMOVE`: memory shared through a file, in tmpfs (`/dev/shm`)
    /// or on disk (the file's blocks are punched out; `MADV_DONTNEED`
    /// would only unmap them from this process).
    Remove,
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

/// Gives the pages of `[addr, addr + len)` (page-aligned) back to the OS;
/// they read as zero afterwards. Returns whether the kernel did (a file
/// system without hole punching refuses `MADV_REMOVE`).
pub(crate) fn purge(addr: *mut u8, len: usize, how: Purge) -> bool {
    let advice = match how {
        Purge::DontNeed => libc::MADV_DONTNEED,
        Purge::Remove => libc::MADV_REMOVE,
    };
    // SAFETY: the caller owns the range exclusively, inside a live mapping
    // of its segment, and needs none of its contents: dropping the pages
    // cannot affect memory anyone else uses.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) == 0 }
}
