//! Hand-over of listening sockets to a new holdfast process (an upgrade).
//!
//! The old process listens on `[handover] socket`; the new one
//! (`holdfast run --takeover`) connects, and the old one sends one message:
//! a versioned JSON [`Manifest`] (the listeners by name, in order, with their
//! endpoints) with the listening descriptors attached (SCM_RIGHTS). The new
//! process checks the version and that it received exactly as many
//! descriptors as the manifest names, wraps them as `OwnedFd` at once, starts
//! serving, and answers one byte ([`ACK`]). Until that byte arrives the old
//! process keeps accepting: both processes hold the same sockets, so no
//! connection is refused at any moment.
//!
//! This slice carries listeners only: live sessions stay with the old
//! process, which drains them as on SIGTERM. It owns the wire format and the
//! socket calls (through `rustix`, no `unsafe` here); what to export and how
//! to serve what arrives belong to `proxy` and the binary.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// The manifest version this build speaks.
pub const VERSION: u32 = 1;
/// The byte the new process sends once it serves every listener it took.
pub const ACK: u8 = 1;
/// Most descriptors one hand-over carries (listeners plus admin).
pub const MAX_FDS: usize = 64;
/// Largest manifest accepted.
const MAX_MANIFEST: usize = 64 * 1024;

/// What a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A `[[listener]]`, matched by name.
    Listener,
    /// The `[admin]` endpoint.
    Admin,
}

/// One descriptor of the hand-over, in the order the descriptors travel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// The listener's name (empty for admin).
    pub name: String,
    /// Its bound address, for logs and checks.
    pub endpoint: String,
}

/// What travels with the descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The old process's pid, for logs.
    pub pid: u32,
    /// One entry per descriptor, in order.
    pub entries: Vec<Entry>,
}

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("hand-over io: {0}")]
    Io(#[from] io::Error),
    #[error("hand-over peer runs as uid {peer}, we run as uid {ours}")]
    WrongUid { peer: u32, ours: u32 },
    #[error("hand-over manifest version {got}, this build speaks {VERSION}")]
    Version { got: u32 },
    #[error("hand-over manifest names {expected} descriptors, {got} arrived")]
    FdCount { expected: usize, got: usize },
    #[error("hand-over control message truncated (MSG_CTRUNC): descriptors were lost")]
    Truncated,
    #[error("hand-over manifest is {0} bytes, more than allowed")]
    TooLarge(usize),
    #[error("hand-over manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    #[error("the new process closed the hand-over before confirming")]
    NoAck,
}

/// Sends `manifest` with `fds` (one per entry, in order) on `sock`.
pub fn send(
    sock: &UnixStream,
    manifest: &Manifest,
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandoverError> {
    if fds.len() != manifest.entries.len() {
        return Err(HandoverError::FdCount {
            expected: manifest.entries.len(),
            got: fds.len(),
        });
    }
    let json = serde_json::to_vec(manifest)?;
    if json.len() > MAX_MANIFEST || fds.len() > MAX_FDS {
        return Err(HandoverError::TooLarge(json.len()));
    }
    let len = (json.len() as u32).to_be_bytes();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(HandoverError::TooLarge(json.len()));
    }
    let iov = [IoSlice::new(&len), IoSlice::new(&json)];
    let sent = rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)
        .map_err(io::Error::from)?;
    // The descriptors went with the first byte; the rest is plain bytes.
    let mut rest = [len.as_slice(), json.as_slice()].concat();
    rest.drain(..sent);
    let mut w = sock;
    w.write_all(&rest)?;
    Ok(())
}

/// Receives a manifest and its descriptors from `sock`, wrapped as
/// `OwnedFd` at once (so they close on any error below).
pub fn recv(sock: &UnixStream) -> Result<(Manifest, Vec<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; 4 + MAX_MANIFEST];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(HandoverError::Truncated);
    }
    let mut got = msg.bytes;
    if got == 0 {
        return Err(HandoverError::NoAck);
    }
    let mut r = sock;
    while got < 4 {
        let n = r.read(&mut buf[got..4])?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_MANIFEST {
        return Err(HandoverError::TooLarge(len));
    }
    if got < 4 + len {
        r.read_exact(&mut buf[got..4 + len])?;
    }
    let manifest = Manifest::decode(&buf[4..4 + len], fds.len())?;
    Ok((manifest, fds))
}

impl Manifest {
    /// Parses a manifest's JSON and checks it against what arrived: the
    /// version, and one descriptor per entry. Pure: the fuzz target and
    /// its corpus test call it directly.
    pub fn decode(json: &[u8], fds: usize) -> Result<Manifest, HandoverError> {
        if json.len() > MAX_MANIFEST {
            return Err(HandoverError::TooLarge(json.len()));
        }
        let manifest: Manifest = serde_json::from_slice(json)?;
        if manifest.version != VERSION {
            return Err(HandoverError::Version {
                got: manifest.version,
            });
        }
        if fds != manifest.entries.len() {
            return Err(HandoverError::FdCount {
                expected: manifest.entries.len(),
                got: fds,
            });
        }
        Ok(manifest)
    }
}

/// Checks that the peer of a hand-over connection runs as our uid.
pub fn check_peer(sock: &UnixStream) -> Result<(), HandoverError> {
    let cred = rustix::net::sockopt::socket_peercred(sock).map_err(io::Error::from)?;
    let peer = cred.uid.as_raw();
    let ours = rustix::process::geteuid().as_raw();
    if peer != ours {
        return Err(HandoverError::WrongUid { peer, ours });
    }
    Ok(())
}

/// Binds the hand-over socket at `path`: its directory is created private
/// (0700) when missing, and the socket is bound at a temporary name, made
/// 0600, then renamed over `path`, so a process connecting there always
/// finds a listening socket (the previous holder's, then ours).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, HandoverError> {
    let err = |source| HandoverError::Socket {
        path: path.display().to_string(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let tmp = dir.join(format!(
        ".{}.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(listener)
}

/// Connects to a running holdfast's hand-over socket and receives its
/// listeners. The returned stream is where [`ACK`] goes.
pub fn connect(path: &Path) -> Result<(UnixStream, Manifest, Vec<OwnedFd>), HandoverError> {
    let sock = UnixStream::connect(path).map_err(|source| HandoverError::Socket {
        path: path.display().to_string(),
        source,
    })?;
    check_peer(&sock)?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let (manifest, fds) = recv(&sock)?;
    Ok((sock, manifest, fds))
}

/// Waits for the new process's [`ACK`] (or its failure: EOF, an error).
pub fn wait_ack(sock: &UnixStream) -> Result<(), HandoverError> {
    let mut b = [0u8; 1];
    let mut r = sock;
    match r.read(&mut b)? {
        1 if b[0] == ACK => Ok(()),
        _ => Err(HandoverError::NoAck),
    }
}

/// The old process's side: answers hand-over requests on `listener` until
/// one succeeds. For each connection from our uid it asks the proxy for its
/// listening sockets (`exports`), sends them, and waits for the new
/// process's [`ACK`]. Only then does it mark Unix socket files as no longer
/// ours and start the drain (`shutdown.drain`): until then every socket
/// stays open and accepting here, so no connection is refused. A failure
/// (the new process exits, times out, sends garbage) is logged and this
/// process keeps serving.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    exports: tokio::sync::mpsc::Sender<crate::proxy::ExportRequest>,
    shutdown: crate::lifecycle::Shutdown,
    ack_timeout: std::time::Duration,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "hand-over socket unusable: upgrades disabled");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = shutdown.drain.cancelled() => return,
            _ = shutdown.stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "hand-over accept failed");
                    continue;
                }
            },
        };
        match hand_over(stream, &exports, ack_timeout).await {
            Ok(export) => {
                for (_, l) in &export.listeners {
                    l.keep_socket_file();
                }
                tracing::info!(
                    listeners = export.listeners.len(),
                    "hand-over confirmed by the new process: draining"
                );
                shutdown.drain.cancel();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "hand-over failed: this process keeps serving");
            }
        }
    }
}

/// One hand-over attempt; returns what was handed over once confirmed.
async fn hand_over(
    stream: tokio::net::UnixStream,
    exports: &tokio::sync::mpsc::Sender<crate::proxy::ExportRequest>,
    ack_timeout: std::time::Duration,
) -> Result<crate::proxy::Export, HandoverError> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    check_peer(&stream)?;
    let (reply, export) = tokio::sync::oneshot::channel();
    let stopped = || io::Error::other("the proxy is stopping");
    exports
        .send(crate::proxy::ExportRequest { reply })
        .await
        .map_err(|_| stopped())?;
    let export = export.await.map_err(|_| stopped())?;
    tokio::task::spawn_blocking(move || {
        let mut entries = Vec::new();
        let mut fds = Vec::new();
        for (name, l) in &export.listeners {
            match l.handover_fd() {
                Some(fd) => {
                    entries.push(Entry {
                        kind: Kind::Listener,
                        name: name.clone(),
                        endpoint: l.local_endpoint().to_string(),
                    });
                    fds.push(fd);
                }
                None => {
                    tracing::warn!(listener = %name, "a resume-protocol listener cannot be handed over yet")
                }
            }
        }
        if let Some(fd) = &export.admin {
            entries.push(Entry {
                kind: Kind::Admin,
                name: String::new(),
                endpoint: String::new(),
            });
            use std::os::fd::AsFd;
            fds.push(fd.as_fd());
        }
        let manifest = Manifest {
            version: VERSION,
            pid: std::process::id(),
            entries,
        };
        send(&stream, &manifest, &fds)?;
        tracing::info!(
            descriptors = fds.len(),
            "hand-over: listeners sent; waiting for the new process"
        );
        stream.set_read_timeout(Some(ack_timeout))?;
        wait_ack(&stream)?;
        drop(fds);
        Ok(export)
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn manifest(n: usize) -> Manifest {
        Manifest {
            version: VERSION,
            pid: 1,
            entries: (0..n)
                .map(|i| Entry {
                    kind: Kind::Listener,
                    name: format!("l{i}"),
                    endpoint: "127.0.0.1:1".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn listeners_travel_with_their_manifest() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let m = manifest(2);
        send(&a, &m, &[l1.as_fd(), l2.as_fd()]).unwrap();
        let (got, fds) = recv(&b).unwrap();
        assert_eq!(got, m);
        assert_eq!(fds.len(), 2);
        let back = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(back.local_addr().unwrap(), l1.local_addr().unwrap());
        check_peer(&b).unwrap();
    }

    #[test]
    fn wrong_version_and_count_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut m = manifest(0);
        m.version = 99;
        send(&a, &m, &[]).unwrap();
        assert!(matches!(recv(&b), Err(HandoverError::Version { got: 99 })));

        // A manifest naming one descriptor, sent with none.
        let (a, b) = UnixStream::pair().unwrap();
        let json = serde_json::to_vec(&manifest(1)).unwrap();
        let mut w = &a;
        w.write_all(&(json.len() as u32).to_be_bytes()).unwrap();
        w.write_all(&json).unwrap();
        assert!(matches!(
            recv(&b),
            Err(HandoverError::FdCount {
                expected: 1,
                got: 0
            })
        ));
    }

    #[test]
    fn truncated_descriptors_are_an_error() {
        // More descriptors than the receiver has room for: the kernel sets
        // MSG_CTRUNC and closes the ones that did not fit.
        let (a, b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..MAX_FDS + 8).map(|_| l.as_fd()).collect();
        let json = serde_json::to_vec(&manifest(fds.len())).unwrap();
        let len = (json.len() as u32).to_be_bytes();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        let iov = [IoSlice::new(&len), IoSlice::new(&json)];
        rustix::net::sendmsg(&a, &iov, &mut control, SendFlags::empty()).unwrap();
        assert!(matches!(recv(&b), Err(HandoverError::Truncated)));
    }

    #[test]
    fn ack_or_eof() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[ACK]).unwrap();
        wait_ack(&b).unwrap();
        drop(a);
        assert!(matches!(wait_ack(&b), Err(HandoverError::NoAck)));
    }
}
