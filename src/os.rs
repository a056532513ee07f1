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

/// Engine accesses left before this process kills itself (0: never). A test
/// hook, set through [`crate::die_at_engine_step`].
static DIE_AT_STEP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts one engine step (every access to a block header or a node); the
/// process sends itself SIGKILL at the step `die_at_engine_step` named. One
/// relaxed load when unused, on engine paths only.
#[inline(always)]
pub(crate) fn engine_step() {
    if DIE_AT_STEP.load(std::sync::atomic::Ordering::Relaxed) != 0 {
        countdown();
    }
}

#[cold]
fn countdown() {
    if DIE_AT_STEP.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1 {
        // SAFETY: sending a signal to ourselves; SIGKILL cannot be caught,
        // so this is the death a `kill -9` from outside would be.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

pub(crate) fn set_die_at_step(n: u64) {
    DIE_AT_STEP.store(n, std::sync::atomic::Ordering::Relaxed);
}
