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
