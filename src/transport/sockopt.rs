//! Socket options no crate covers: `TCP_INFO`'s `tcpi_bytes_acked` and the
//! send queue size (SIOCOUTQ). The only module besides hand-over and repair
//! that may use `unsafe`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Offset of `tcpi_bytes_acked` (u64) in `struct tcp_info` (Linux >= 4.1).
const TCPI_BYTES_ACKED: usize = 120;

/// Bytes of data the peer's TCP acknowledged on this socket.
pub fn tcp_bytes_acked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes and outlives the call; the
    // kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < TCPI_BYTES_ACKED + 8 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel tcp_info has no tcpi_bytes_acked",
        ));
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&buf[TCPI_BYTES_ACKED..TCPI_BYTES_ACKED + 8]);
    Ok(u64::from_ne_bytes(v))
}

/// Bytes in the socket's send queue (SIOCOUTQ): for a Unix stream socket,
/// bytes written that the peer has not read yet.
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// Bytes received and not yet read (SIOCINQ).
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCINQ (FIONREAD) writes one c_int through the pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// The soft `RLIMIT_NOFILE` of this process (`None` if unknown or
/// unlimited).
pub fn nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call's duration.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(lim.rlim_cur)
}
