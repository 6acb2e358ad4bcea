//! Pidfds: taking one for a socket's peer, and asking it whether its process is still there.
//!
//! The only unsafe code in spiffed lives here: `getsockopt(SO_PEERPIDFD)`, which neither rustix
//! nor nix wraps yet, and adopting the descriptor it returns. Everything else in this module is
//! safe code that belongs with it (`pidfd_open`, and reading a pidfd's state back).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags};

/// `SO_PEERPIDFD` (Linux 6.5). The libc crate does not define it yet; 77 is its value in
/// `asm-generic/socket.h` and on the architectures with their own `socket.h` except sparc, where
/// we do not ask and fall back to `pidfd_open` as on an old kernel.
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_PEERPIDFD: Option<libc::c_int> = Some(77);
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_PEERPIDFD: Option<libc::c_int> = None;

/// Returns a pidfd for the process that opened the peer end of `sock` (`SO_PEERPIDFD`).
///
/// Fails with `ENOPROTOOPT` on kernels before 6.5. On 6.5 to 6.15 it fails with `EINVAL` when
/// the peer has already been reaped; later kernels return a pidfd that reports the exit.
pub(crate) fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let Some(optname) = SO_PEERPIDFD else {
        return Err(io::Error::from_raw_os_error(libc::ENOPROTOOPT));
    };
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `sock` is borrowed, so it stays open for the call. `fd` and `len` are live, writable
    // locals and `len` holds the size of `fd`, so the kernel writes at most that many bytes into
    // `fd` and the written length into `len`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            optname,
            (&raw mut fd).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "so_peerpidfd succeeded without a descriptor",
        ));
    }
    // SAFETY: getsockopt succeeded, so the kernel installed `fd` as a new descriptor in our table
    // and nothing else refers to it; the returned `OwnedFd` becomes its only owner and closes it
    // exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Returns a pidfd for `pid` (`pidfd_open(2)`, Linux 5.3).
///
/// Pins whichever process has `pid` now, which is only the peer if it has not exited and had its
/// pid reused since it connected; prefer [`peer_pidfd`].
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// The pid the process behind `pidfd` has in our PID namespace, read from the `Pid:` line of
/// `/proc/self/fdinfo/FD`.
///
/// The kernel reports -1 once the process has been reaped and 0 when it lives in a PID namespace
/// we cannot see. `None` when fdinfo cannot be read or has no `Pid:` line.
pub(crate) fn pidfd_pid(pidfd: BorrowedFd<'_>) -> Option<i32> {
    let path = format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd());
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_fdinfo_pid(&text),
        Err(error) => {
            tracing::debug!(%path, %error, "cannot read pidfd fdinfo");
            None
        }
    }
}

fn parse_fdinfo_pid(text: &str) -> Option<i32> {
    text.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether the process behind `pidfd` has exited (it may still be an unreaped zombie).
///
/// A pidfd polls readable once its process has exited; fdinfo keeps showing the pid until the
/// zombie is reaped, so this catches the gap. Errors count as exited: callers fail closed.
pub(crate) fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::from_borrowed_fd(pidfd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&now)) {
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL),
        Err(error) => {
            tracing::debug!(%error, "cannot poll pidfd; treating its process as gone");
            true
        }
    }
}

/// Whether `pidfd` still refers to a running process that has `pid` in our PID namespace.
pub(crate) fn pidfd_is_running(pidfd: BorrowedFd<'_>, pid: u32) -> bool {
    let expected = i32::try_from(pid).ok();
    // fdinfo first, then poll: if the poll says "running", the process was alive after fdinfo
    // named it, and a pid is not reused while its process is alive.
    pidfd_pid(pidfd) == expected && expected.is_some() && !pidfd_exited(pidfd)
}

/// Hands heap memory that is free but kept by glibc's allocator back to the kernel
/// (`malloc_trim(0)`); returns whether any was released. Without it, memory freed after a
/// burst of connections or streams stays in the process's RSS. A no-op on other C libraries.
pub(crate) fn malloc_trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and only walks the allocator's own arenas
        // under their locks; it is safe to call from any thread at any time.
        let released = unsafe { libc::malloc_trim(0) };
        released != 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn parses_fdinfo_pid_lines() {
        let live = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nPid:\t4242\nNSpid:\t4242\n";
        assert_eq!(parse_fdinfo_pid(live), Some(4242));
        assert_eq!(
            parse_fdinfo_pid("pos:\t0\nPid:\t-1\nNSpid:\t-1\n"),
            Some(-1)
        );
        assert_eq!(parse_fdinfo_pid("pos:\t0\nPid:\t0\n"), Some(0));
        assert_eq!(parse_fdinfo_pid("pos:\t0\nflags:\t02\n"), None);
    }

    #[test]
    fn pidfd_of_ourselves_is_running() {
        let me = std::process::id();
        let fd = pidfd_open(me).unwrap();
        assert_eq!(pidfd_pid(fd.as_fd()), i32::try_from(me).ok());
        assert!(pidfd_is_running(fd.as_fd(), me));
        assert!(!pidfd_is_running(fd.as_fd(), me + 1));
    }

    #[test]
    fn pidfd_of_a_zombie_and_a_reaped_child_is_not_running() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let fd = pidfd_open(pid).unwrap();
        assert!(pidfd_is_running(fd.as_fd(), pid));
        child.kill().unwrap();
        // Not reaped yet: wait until the kill lands, while fdinfo still names the zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !pidfd_exited(fd.as_fd()) {
            assert!(std::time::Instant::now() < deadline, "sleep did not die");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!pidfd_is_running(fd.as_fd(), pid));
        child.wait().unwrap();
        assert_eq!(pidfd_pid(fd.as_fd()), Some(-1));
        assert!(!pidfd_is_running(fd.as_fd(), pid));
    }

    #[test]
    fn pidfd_open_refuses_pid_zero() {
        assert!(pidfd_open(0).is_err());
    }
}
