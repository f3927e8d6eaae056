//! systemd integration: readiness notification (`sd_notify`) and socket
//! activation (`sd_listen_fds`), written against the documented protocols
//! with std and libc, no libsystemd.
//!
//! It owns the `NOTIFY_SOCKET` datagram protocol and the descriptors systemd
//! passes at start (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`), kept in a
//! process-wide table that `transport` takes listeners from by name. It does
//! not decide when to notify (the binary watches the lifecycle phases) and
//! does not turn descriptors into listeners (that is `transport`). Taking
//! inherited descriptors is the one `unsafe` here, so the module allows it.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
const LISTEN_PID: &str = "LISTEN_PID";
const LISTEN_FDS: &str = "LISTEN_FDS";
const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// The name of a descriptor passed without `LISTEN_FDNAMES`.
const UNKNOWN_NAME: &str = "unknown";
/// More descriptors than any socket unit passes; a larger count is garbage.
const MAX_LISTEN_FDS: usize = 65_536;

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service
/// manager. A no-op returning `Ok` when `NOTIFY_SOCKET` is unset (not run by
/// systemd, or `Type=simple`).
pub fn notify(state: &str) -> io::Result<()> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(socket) => notify_to(&socket, state),
        None => Ok(()),
    }
}

/// Sends `state` to the notification socket `socket`: a path, or an abstract
/// socket name when it starts with `@`.
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None if bytes.first() == Some(&b'/') => SocketAddr::from_pathname(socket)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{NOTIFY_SOCKET}={socket:?} is neither an absolute path nor @abstract"),
            ))
        }
    };
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to the notification socket",
        ));
    }
    Ok(())
}

/// `READY=1`: startup (or a reload) is finished; every listener is bound.
pub fn ready() -> io::Result<()> {
    notify("READY=1")
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd ≥ 253 requires for
/// `Type=notify-reload`. Send [`ready`] when the reload is done.
pub fn reloading() -> io::Result<()> {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        monotonic_usec()?
    ))
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() -> io::Result<()> {
    notify("STOPPING=1")
}

/// `STATUS=msg`: a one-line status shown by `systemctl status` (newlines
/// become spaces).
pub fn status(msg: &str) -> io::Result<()> {
    notify(&format!("STATUS={}", msg.replace(['\n', '\r'], " ")))
}

/// `MAINPID=pid`: the service's main process is `pid`.
pub fn mainpid(pid: u32) -> io::Result<()> {
    notify(&format!("MAINPID={pid}"))
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares reloads on.
fn monotonic_usec() -> io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let micros = u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000;
    Ok(secs.saturating_mul(1_000_000).saturating_add(micros))
}

/// Why the socket-activation environment could not be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListenFdsError {
    #[error("{LISTEN_PID}={0:?} is not a process id")]
    BadPid(String),
    #[error("{LISTEN_FDS}={0:?} is not a descriptor count (0 to {MAX_LISTEN_FDS})")]
    BadCount(String),
    #[error("{LISTEN_FDNAMES}={names:?} has {got} names for {count} descriptors")]
    NameCount {
        names: String,
        got: usize,
        count: usize,
    },
    #[error("descriptor {fd} passed by systemd is not open: {reason}")]
    NotOpen { fd: RawFd, reason: String },
}

/// The pure part of `sd_listen_fds`: which descriptor numbers, with which
/// names, the environment passes to the process `our_pid`. Nothing when
/// `LISTEN_PID` or `LISTEN_FDS` is unset or `LISTEN_PID` names another
/// process (the variables were meant for a parent).
pub fn parse_listen_env(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    our_pid: u32,
) -> Result<Vec<(RawFd, String)>, ListenFdsError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ListenFdsError::BadPid(pid.to_owned()))?;
    if pid != our_pid {
        return Ok(Vec::new());
    }
    let count: usize = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| *n <= MAX_LISTEN_FDS)
        .ok_or_else(|| ListenFdsError::BadCount(fds.to_owned()))?;
    let names: Vec<String> = match names {
        Some(list) => {
            let split: Vec<String> = if count == 0 && list.is_empty() {
                Vec::new()
            } else {
                list.split(':').map(str::to_owned).collect()
            };
            if split.len() != count {
                return Err(ListenFdsError::NameCount {
                    names: list.to_owned(),
                    got: split.len(),
                    count,
                });
            }
            split
        }
        None => vec![UNKNOWN_NAME.to_owned(); count],
    };
    // count ≤ MAX_LISTEN_FDS, so the descriptor numbers fit a RawFd.
    Ok((LISTEN_FDS_START..).zip(names).collect())
}

/// Set once the socket-activation environment has been consumed: the
/// descriptors it names are owned by whoever got them then.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes the descriptors systemd passed (`sd_listen_fds_with_names`): checks
/// `LISTEN_PID`, sets FD_CLOEXEC on each, and unsets the three variables so
/// children do not see them. Only the first call in a process returns
/// descriptors; later calls return none.
///
/// Call it before starting threads: it changes the environment.
pub fn listen_fds() -> Result<Vec<(String, OwnedFd)>, ListenFdsError> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let var = |k| std::env::var(k).ok();
    let parsed = parse_listen_env(
        var(LISTEN_PID).as_deref(),
        var(LISTEN_FDS).as_deref(),
        var(LISTEN_FDNAMES).as_deref(),
        std::process::id(),
    );
    for k in [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES] {
        std::env::remove_var(k);
    }
    let mut out = Vec::new();
    for (fd, name) in parsed? {
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails with
        // EBADF for a number that is not open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(ListenFdsError::NotOpen {
                fd,
                reason: io::Error::last_os_error().to_string(),
            });
        }
        // SAFETY: the descriptor is open (checked above) and was passed to
        // this process by its parent for it to own; `TAKEN` makes this the
        // only place in the process that wraps it, once, and nothing else in
        // holdfast uses descriptor numbers 3 and up by number.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sets a flag on the descriptor we now own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        out.push((name, owned));
    }
    Ok(out)
}

/// Inherited descriptors by name, waiting for a `systemd:NAME` listener.
fn table() -> &'static Mutex<HashMap<String, Vec<OwnedFd>>> {
    static TABLE: OnceLock<Mutex<HashMap<String, Vec<OwnedFd>>>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Takes the sockets systemd passed ([`listen_fds`]) into the table that
/// `systemd:NAME` listeners bind from; returns their names, in order.
pub fn init_listen_fds() -> Result<Vec<String>, ListenFdsError> {
    let fds = listen_fds()?;
    let names = fds.iter().map(|(n, _)| n.clone()).collect();
    add_listen_fds(fds);
    Ok(names)
}

/// Adds descriptors to the table (what [`init_listen_fds`] does with the
/// inherited ones; embedders and tests may add their own).
pub fn add_listen_fds(fds: Vec<(String, OwnedFd)>) {
    let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
    for (name, fd) in fds {
        t.entry(name).or_default().push(fd);
    }
}

/// Takes the first socket passed under `name`, if one is left.
pub fn take_listen_fd(name: &str) -> Option<OwnedFd> {
    let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
    let fds = t.get_mut(name)?;
    let fd = (!fds.is_empty()).then(|| fds.remove(0));
    if fds.is_empty() {
        t.remove(name);
    }
    fd
}

/// The names of the sockets still in the table, sorted, each once.
pub fn listen_fd_names() -> Vec<String> {
    let t = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<String> = t.keys().cloned().collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        pid: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
    ) -> Result<Vec<(RawFd, String)>, ListenFdsError> {
        parse_listen_env(pid, fds, names, 42)
    }

    fn named(list: &[(RawFd, &str)]) -> Vec<(RawFd, String)> {
        list.iter().map(|(fd, n)| (*fd, (*n).to_owned())).collect()
    }

    #[test]
    fn listen_env_names_and_counts() {
        assert_eq!(
            parse(Some("42"), Some("1"), Some("orders")),
            Ok(named(&[(3, "orders")]))
        );
        assert_eq!(
            parse(Some("42"), Some("3"), Some("a:b:a")),
            Ok(named(&[(3, "a"), (4, "b"), (5, "a")]))
        );
        assert_eq!(
            parse(Some("42"), Some("2"), None),
            Ok(named(&[(3, "unknown"), (4, "unknown")]))
        );
        assert_eq!(parse(Some("42"), Some("0"), None), Ok(vec![]));
        assert_eq!(parse(Some("42"), Some("0"), Some("")), Ok(vec![]));
        // Empty names are names systemd can pass.
        assert_eq!(
            parse(Some("42"), Some("2"), Some(":x")),
            Ok(named(&[(3, ""), (4, "x")]))
        );
    }

    #[test]
    fn listen_env_for_someone_else_or_absent() {
        assert_eq!(parse(Some("41"), Some("1"), Some("orders")), Ok(vec![]));
        assert_eq!(parse(None, Some("1"), Some("orders")), Ok(vec![]));
        assert_eq!(parse(Some("42"), None, None), Ok(vec![]));
        assert_eq!(parse(None, None, None), Ok(vec![]));
    }

    #[test]
    fn listen_env_garbage() {
        for pid in ["", "x", "-1", "0", "4294967296"] {
            assert_eq!(
                parse(Some(pid), Some("1"), None),
                Err(ListenFdsError::BadPid(pid.to_owned())),
                "{pid:?}"
            );
        }
        for n in ["", "x", "-1", "65537", "99999999999999999999"] {
            assert_eq!(
                parse(Some("42"), Some(n), None),
                Err(ListenFdsError::BadCount(n.to_owned())),
                "{n:?}"
            );
        }
        let err = parse(Some("42"), Some("2"), Some("orders")).unwrap_err();
        assert_eq!(
            err,
            ListenFdsError::NameCount {
                names: "orders".into(),
                got: 1,
                count: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "LISTEN_FDNAMES=\"orders\" has 1 names for 2 descriptors"
        );
        assert!(parse(Some("42"), Some("1"), Some("a:b")).is_err());
    }

    #[test]
    fn notify_reaches_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("holdfast-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let by_path = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = by_path.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("holdfast-notify-test-{}", std::process::id());
        let abs = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(notify_to(OsStr::new("relative.sock"), "READY=1").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_usec().unwrap();
        let b = monotonic_usec().unwrap();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn table_takes_each_socket_once() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        add_listen_fds(vec![
            ("table-test".into(), OwnedFd::from(a)),
            ("table-test".into(), OwnedFd::from(b)),
        ]);
        assert!(listen_fd_names().contains(&"table-test".to_owned()));
        assert!(take_listen_fd("table-test").is_some());
        assert!(take_listen_fd("table-test").is_some());
        assert!(take_listen_fd("table-test").is_none());
        assert!(!listen_fd_names().contains(&"table-test".to_owned()));
    }
}
