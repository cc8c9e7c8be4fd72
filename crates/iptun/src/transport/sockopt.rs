//! The few socket options the standard library and socket2 don't cover.

use std::io;
use std::os::fd::RawFd;

/// Socket buffer size we ask for: most tunnels lose packets at the receive
/// buffer long before the link is full.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// Set an option whose value is a plain C value.
pub fn set<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live `T` and we pass its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Ask for big socket buffers. As root `SO_*BUFFORCE` bypasses the
/// namespace's `rmem_max`; otherwise take what the kernel allows.
pub fn size_buffers(fd: RawFd) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set(fd, libc::SOL_SOCKET, force, &SOCKET_BUFFER).is_err() {
            let _ = set(fd, libc::SOL_SOCKET, plain, &SOCKET_BUFFER);
        }
    }
}

/// Whether the socket has send-buffer room now (`poll` with no timeout:
/// a check, never a wait).
pub fn writable_now(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&raw mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLOUT != 0 }
}
