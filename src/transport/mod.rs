//! The only place that makes sockets: TCP and Unix listeners and connections,
//! and the socket options holdfast sets on them.
//!
//! [`Conn`] is one byte-stream connection: TCP, Unix, or TLS over either
//! (`tls`); [`Listener`] accepts them. Nothing here knows about sessions or
//! offsets.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};

use crate::config::{Endpoint, SocketOptions};

pub mod sockopt;
pub mod splice;
pub mod tls;

/// Listen backlog (the kernel caps it at `net.core.somaxconn`): deep enough
/// for a burst of reconnecting clients.
const LISTEN_BACKLOG: u32 = 4096;

/// A connection to a client or a server.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A client's TLS connection to a TLS listener (over TCP or Unix).
    TlsIn(Box<tokio_rustls::server::TlsStream<Conn>>),
    /// holdfast's TLS connection to a TLS backend's server.
    TlsOut(Box<tokio_rustls::client::TlsStream<Conn>>),
    /// A session of a resume-protocol listener: a byte stream that outlives
    /// the transports (legs) of the edge that initiated it.
    Resumable(Box<crate::server::ResumableSession>),
}

/// A connection between two session threads' runtimes: in neither's epoll.
#[derive(Debug)]
pub enum Unregistered {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Unregistered {
    /// Registers it with the runtime this is called in.
    pub fn register(self) -> io::Result<Conn> {
        Ok(match self {
            Unregistered::Tcp(s) => Conn::Tcp(TcpStream::from_std(s)?),
            Unregistered::Unix(s) => Conn::Unix(UnixStream::from_std(s)?),
        })
    }
}

/// Forwards a call to the inner stream of every variant.
macro_rules! each {
    ($conn:expr, $s:ident => $e:expr) => {
        match $conn {
            Conn::Tcp($s) => $e,
            Conn::Unix($s) => $e,
            Conn::TlsIn($s) => $e,
            Conn::TlsOut($s) => $e,
            Conn::Resumable($s) => $e,
        }
    };
}

impl Conn {
    /// A connected TCP socket received as a descriptor (a hand-over), made
    /// non-blocking and registered with the runtime (call it inside one).
    pub fn from_tcp_fd(fd: OwnedFd) -> io::Result<Conn> {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        Ok(Conn::Tcp(TcpStream::from_std(s)?))
    }

    /// Takes a plain TCP or Unix connection out of its runtime's epoll, to
    /// run on another session thread ([`Unregistered::register`] there).
    pub fn into_unregistered(self) -> io::Result<Unregistered> {
        match self {
            Conn::Tcp(s) => Ok(Unregistered::Tcp(s.into_std()?)),
            Conn::Unix(s) => Ok(Unregistered::Unix(s.into_std()?)),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only a plain TCP or Unix connection moves between threads",
            )),
        }
    }

    /// [`Conn::from_tcp_fd`] for a connected Unix stream socket.
    pub fn from_unix_fd(fd: OwnedFd) -> io::Result<Conn> {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true)?;
        Ok(Conn::Unix(UnixStream::from_std(s)?))
    }

    /// The kernel's confirmation of bytes written, for `ack = "tcp"`:
    /// `tcpi_bytes_acked` on TCP; on a Unix socket, `written` minus the bytes
    /// still queued (SIOCOUTQ counts what the peer has not read yet).
    /// Over TLS the kernel counts record bytes, not plaintext: unsupported
    /// (config validation refuses `ack = "tcp"` with backend TLS).
    pub fn bytes_acked(&self, written: u64) -> io::Result<u64> {
        match self {
            Conn::Tcp(s) => sockopt::tcp_bytes_acked(s.as_fd()),
            Conn::Unix(s) => {
                let queued = sockopt::outq(s.as_fd())?;
                Ok(written.saturating_sub(queued))
            }
            Conn::TlsIn(_) | Conn::TlsOut(_) | Conn::Resumable(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "tcp acks only count plaintext on plain tcp and unix connections",
            )),
        }
    }

    /// Whether this is a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::TlsIn(_) | Conn::TlsOut(_))
    }

    /// Whether writes may sit in a user-space buffer (TLS records, a
    /// resumable session), so the connection needs flushing and an async
    /// shutdown (close_notify, a FIN frame) rather than `shutdown_write`.
    pub fn is_buffered(&self) -> bool {
        !matches!(self, Conn::Tcp(_) | Conn::Unix(_))
    }

    /// The SNI name a TLS client asked for, if any.
    pub fn sni(&self) -> Option<&str> {
        match self {
            Conn::TlsIn(s) => s.get_ref().1.server_name(),
            _ => None,
        }
    }

    /// Shuts down the write side (sends FIN), synchronously. On TLS this
    /// skips close_notify: use `poll_shutdown` for a graceful TLS close.
    pub fn shutdown_write(&self) -> io::Result<()> {
        SockRef::from(&self.fd()?).shutdown(std::net::Shutdown::Write)
    }

    /// The socket's descriptor; a resumable session has none of its own.
    pub fn fd(&self) -> io::Result<BorrowedFd<'_>> {
        match self {
            Conn::Tcp(s) => Ok(s.as_fd()),
            Conn::Unix(s) => Ok(s.as_fd()),
            Conn::TlsIn(s) => s.get_ref().0.fd(),
            Conn::TlsOut(s) => s.get_ref().0.fd(),
            Conn::Resumable(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a resumable session has no socket of its own",
            )),
        }
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> String {
        match self {
            Conn::Tcp(s) => s
                .peer_addr()
                .map(|a| addr_text(&a))
                .unwrap_or_else(|_| "?".into()),
            Conn::Unix(_) => "unix".into(),
            Conn::TlsIn(s) => s.get_ref().0.peer(),
            Conn::TlsOut(s) => s.get_ref().0.peer(),
            Conn::Resumable(s) => match s.client_addr() {
                crate::proto::ClientAddr::Ip(ip, port) => {
                    addr_text(&std::net::SocketAddr::new(ip, port))
                }
                crate::proto::ClientAddr::Unknown => "resume".into(),
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Applies TCP_NODELAY, keepalive and TCP_USER_TIMEOUT to a TCP socket.
pub fn apply_tcp_options(sock: SockRef<'_>, opts: &SocketOptions) -> io::Result<()> {
    sock.set_nodelay(opts.nodelay)?;
    match opts.keepalive {
        Some(k) => {
            // `set_tcp_keepalive` turns SO_KEEPALIVE on itself (a second
            // setsockopt per socket otherwise, two per session).
            let ka = TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count);
            sock.set_tcp_keepalive(&ka)?;
        }
        None => sock.set_keepalive(false)?,
    }
    if let Some(t) = opts.user_timeout {
        sock.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

/// The options [`apply_tcp_options`] sets, read back from a socket.
///
/// On a listening socket this says what the sockets it accepts start with:
/// Linux copies TCP_NODELAY, keepalive and TCP_USER_TIMEOUT from a
/// listening socket to each connection it accepts (tested below).
pub fn tcp_options(sock: SockRef<'_>) -> io::Result<SocketOptions> {
    let keepalive = if sock.keepalive()? {
        Some(crate::config::Keepalive {
            idle: sock.keepalive_time()?,
            interval: sock.keepalive_interval()?,
            count: sock.keepalive_retries()?,
        })
    } else {
        None
    };
    Ok(SocketOptions {
        nodelay: sock.nodelay()?,
        keepalive,
        user_timeout: sock.tcp_user_timeout()?,
    })
}

/// Connects to a server, applying the backend's socket options, within
/// `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    opts: &SocketOptions,
    timeout: Duration,
) -> io::Result<Conn> {
    let fut = async {
        match endpoint {
            Endpoint::Tcp(addr) => {
                let mut last = None;
                for a in tokio::net::lookup_host(addr.as_str()).await? {
                    let sock = if a.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    match sock.connect(a).await {
                        Ok(s) => {
                            apply_tcp_options(SockRef::from(&s), opts)?;
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{addr} resolves to nothing"),
                    )
                }))
            }
            Endpoint::Unix(path) => Ok(Conn::Unix(UnixStream::connect(path).await?)),
            Endpoint::Systemd(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot connect to {endpoint}: systemd sockets are for listeners only"),
            )),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// A resume-protocol listener: yields sessions, not connections (an
    /// initiator's later transports are routed to its session inside).
    Resume {
        listener: Box<crate::server::ResumeListener>,
        endpoint: Endpoint,
    },
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// Whether dropping the listener removes its socket file: true when
        /// holdfast created it, false for a socket systemd passed (systemd
        /// owns the file and keeps listening on it), and cleared once the
        /// socket has been handed over to a new process (which serves it).
        unlink: std::sync::atomic::AtomicBool,
    },
}

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot bind {endpoint}: {source}")]
    Io {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind {endpoint}: another process is listening on {path}")]
    InUse { endpoint: String, path: PathBuf },
    #[error("cannot bind {endpoint}: {path} exists and is not a socket")]
    NotASocket { endpoint: String, path: PathBuf },
    #[error("cannot bind systemd:{name}: systemd passed no socket named {name:?} (passed: {passed}); check FileDescriptorName= in the .socket unit")]
    NoSystemdSocket { name: String, passed: String },
    #[error("cannot use systemd:{name}: the socket systemd passed is {why}")]
    BadSystemdSocket { name: String, why: String },
}

impl Listener {
    /// Binds a listener. TCP listeners get SO_REUSEADDR (a restarted holdfast
    /// binds at once despite TIME_WAIT) and `opts`, set before `listen`, so
    /// that every connection they accept starts with them (see
    /// [`Listener::accepted_options`]). A Unix listener removes a stale
    /// socket file only when nothing is listening on it.
    pub async fn bind(endpoint: &Endpoint, opts: &SocketOptions) -> Result<Listener, BindError> {
        let io_err = |source| BindError::Io {
            endpoint: endpoint.to_string(),
            source,
        };
        match endpoint {
            Endpoint::Tcp(addr) => {
                let mut last = None;
                for a in tokio::net::lookup_host(addr.as_str())
                    .await
                    .map_err(io_err)?
                {
                    let sock = if a.is_ipv4() {
                        TcpSocket::new_v4()
                    } else {
                        TcpSocket::new_v6()
                    }
                    .map_err(io_err)?;
                    sock.set_reuseaddr(true).map_err(io_err)?;
                    apply_tcp_options(SockRef::from(&sock), opts).map_err(io_err)?;
                    match sock.bind(a).and_then(|_| sock.listen(LISTEN_BACKLOG)) {
                        Ok(l) => return Ok(Listener::Tcp(l)),
                        Err(e) => last = Some(e),
                    }
                }
                Err(io_err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "resolves to nothing")
                })))
            }
            Endpoint::Unix(path) => {
                remove_stale_socket(endpoint, path).await?;
                let listener = UnixListener::bind(path).map_err(io_err)?;
                Ok(Listener::Unix {
                    listener,
                    path: path.clone(),
                    unlink: std::sync::atomic::AtomicBool::new(true),
                })
            }
            Endpoint::Systemd(name) => {
                let fd = crate::systemd::take_listen_fd(name).ok_or_else(|| {
                    let names = crate::systemd::listen_fd_names();
                    BindError::NoSystemdSocket {
                        name: name.clone(),
                        passed: if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        },
                    }
                })?;
                Listener::from_inherited(name, fd)
            }
        }
    }

    /// Wraps a listening socket received from the previous process in a
    /// hand-over (checked like a socket systemd passes; a Unix socket's
    /// file is left alone on drop, as the previous process also serves it
    /// until it exits).
    pub fn adopt(name: &str, fd: OwnedFd) -> Result<Listener, BindError> {
        Listener::from_inherited(name, fd)
    }

    /// The listening descriptor, for a hand-over.
    pub fn handover_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Listener::Tcp(l) => Some(l.as_fd()),
            Listener::Unix { listener, .. } => Some(listener.as_fd()),
            Listener::Resume { listener, .. } => Some(listener.listening_fd()),
        }
    }

    /// After a hand-over: the new process serves this socket, so dropping
    /// it here must not remove its file.
    pub fn keep_socket_file(&self) {
        match self {
            Listener::Unix { unlink, .. } => {
                unlink.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            Listener::Resume { listener, .. } => listener.keep_socket_file(),
            Listener::Tcp(_) => {}
        }
    }

    /// Wraps a listening socket received from the previous process in a
    /// hand-over as a resume-protocol listener (`protocol = "resume"`).
    pub fn adopt_resume(
        name: &str,
        endpoint: &Endpoint,
        fd: OwnedFd,
        settings: &crate::config::ResumeSettings,
        tls: Option<&crate::config::ListenerTls>,
    ) -> Result<Listener, BindError> {
        let listener = crate::server::ResumeListener::from_listening_fd(
            fd,
            resume_server_config(settings, tls),
        )
        .map_err(|source| BindError::Io {
            endpoint: format!("{endpoint} (listener {name}, handed over)"),
            source,
        })?;
        let endpoint = Endpoint::parse(listener.local_addr()).unwrap_or_else(|_| endpoint.clone());
        Ok(Listener::Resume {
            listener: Box::new(listener),
            endpoint,
        })
    }

    /// Wraps a listening socket passed by systemd: it must be a stream
    /// socket in the listening state, TCP or Unix. It is made non-blocking;
    /// a Unix socket's file is left alone on drop.
    fn from_inherited(name: &str, fd: OwnedFd) -> Result<Listener, BindError> {
        let bad = |why: String| BindError::BadSystemdSocket {
            name: name.to_owned(),
            why,
        };
        let io_err = |source: io::Error| BindError::Io {
            endpoint: format!("systemd:{name}"),
            source,
        };
        let sock = Socket::from(fd);
        let ty = sock
            .r#type()
            .map_err(|e| bad(format!("not a socket ({e})")))?;
        if ty != Type::STREAM {
            return Err(bad(
                "not a stream socket (use ListenStream= in the .socket unit)".into(),
            ));
        }
        if !sock.is_listener().map_err(io_err)? {
            return Err(bad(
                "not listening (a socket unit needs Accept=no, the default)".into(),
            ));
        }
        let local = sock.local_addr().map_err(io_err)?;
        sock.set_nonblocking(true).map_err(io_err)?;
        match local.domain() {
            Domain::IPV4 | Domain::IPV6 => {
                let std_listener = std::net::TcpListener::from(sock);
                Ok(Listener::Tcp(
                    TcpListener::from_std(std_listener).map_err(io_err)?,
                ))
            }
            Domain::UNIX => {
                let path = match (local.as_pathname(), local.as_abstract_namespace()) {
                    (Some(p), _) => p.to_path_buf(),
                    (None, Some(abs)) => {
                        PathBuf::from(format!("@{}", String::from_utf8_lossy(abs)))
                    }
                    (None, None) => PathBuf::from(format!("systemd:{name}")),
                };
                let std_listener = std::os::unix::net::UnixListener::from(sock);
                Ok(Listener::Unix {
                    listener: UnixListener::from_std(std_listener).map_err(io_err)?,
                    path,
                    unlink: std::sync::atomic::AtomicBool::new(false),
                })
            }
            other => Err(bad(format!("of family {other:?}, not TCP or Unix"))),
        }
    }

    /// Binds a resume-protocol listener (`protocol = "resume"`), with TLS
    /// on every connection when `tls` is given (the server library runs the
    /// handshake, before the HELLO).
    pub async fn bind_resume(
        endpoint: &Endpoint,
        settings: &crate::config::ResumeSettings,
        tls: Option<&crate::config::ListenerTls>,
    ) -> Result<Listener, BindError> {
        let io_err = |source| BindError::Io {
            endpoint: endpoint.to_string(),
            source,
        };
        let cfg = resume_server_config(settings, tls);
        let addr = match endpoint {
            Endpoint::Tcp(a) => a.clone(),
            Endpoint::Unix(p) => {
                remove_stale_socket(endpoint, p).await?;
                format!("unix:{}", p.display())
            }
            Endpoint::Systemd(name) => {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("a resume listener cannot take systemd socket {name:?} yet"),
                )))
            }
        };
        let listener = crate::server::ResumeListener::bind(&addr, cfg)
            .await
            .map_err(io_err)?;
        let endpoint = match Endpoint::parse(listener.local_addr()) {
            Ok(e) => e,
            Err(_) => endpoint.clone(),
        };
        Ok(Listener::Resume {
            listener: Box::new(listener),
            endpoint,
        })
    }

    /// Another handle on the same listening socket (a duplicated
    /// descriptor), registered with the runtime this is called in, for one
    /// more thread to accept on; dropping it never removes a socket file.
    /// None for a resume-protocol listener, whose own tasks accept.
    pub fn duplicate(&self) -> io::Result<Option<Listener>> {
        use std::os::fd::AsFd;
        Ok(Some(match self {
            Listener::Resume { .. } => return Ok(None),
            Listener::Tcp(l) => {
                let l = std::net::TcpListener::from(l.as_fd().try_clone_to_owned()?);
                Listener::Tcp(TcpListener::from_std(l)?)
            }
            Listener::Unix { listener, path, .. } => {
                let fd = listener.as_fd().try_clone_to_owned()?;
                let l = std::os::unix::net::UnixListener::from(fd);
                Listener::Unix {
                    listener: UnixListener::from_std(l)?,
                    path: path.clone(),
                    unlink: std::sync::atomic::AtomicBool::new(false),
                }
            }
        }))
    }

    /// The server library's listener of a resume-protocol listener.
    pub fn resume(&self) -> Option<&crate::server::ResumeListener> {
        match self {
            Listener::Resume { listener, .. } => Some(listener),
            _ => None,
        }
    }

    /// A resume-protocol listener's TLS for new connections (a reload:
    /// certificates rotate, live sessions are untouched). Other listeners
    /// take their TLS from the proxy's accept context: nothing to do here.
    pub fn set_resume_tls(&self, tls: Option<&crate::config::ListenerTls>) {
        if let Some(l) = self.resume() {
            l.set_tls(resume_tls(tls));
        }
    }

    /// The bound address: for TCP the real port (useful with port 0).
    pub fn local_endpoint(&self) -> Endpoint {
        match self {
            Listener::Resume { endpoint, .. } => endpoint.clone(),
            Listener::Tcp(l) => Endpoint::Tcp(
                l.local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "?".into()),
            ),
            Listener::Unix { path, .. } => Endpoint::Unix(path.clone()),
        }
    }

    /// The socket options every connection this listener accepts starts
    /// with, when it is a TCP listener: what its listening socket has (Linux
    /// copies them to each accepted socket). holdfast sets a listening
    /// socket's options only before `listen` (in [`Listener::bind`]), so the
    /// connections already queued have them too. `None` for other listeners
    /// or when they cannot be read.
    pub fn accepted_options(&self) -> Option<SocketOptions> {
        match self {
            Listener::Tcp(l) => tcp_options(SockRef::from(l)).ok(),
            _ => None,
        }
    }

    /// Accepts one connection; returns it with the peer's address.
    pub async fn accept(&self) -> io::Result<(Conn, Peer)> {
        match self {
            Listener::Resume { listener, .. } => {
                let session = listener.accept().await?;
                let addr = match session.client_addr() {
                    crate::proto::ClientAddr::Ip(ip, port) => {
                        Some(std::net::SocketAddr::new(ip, port))
                    }
                    crate::proto::ClientAddr::Unknown => None,
                };
                let conn = Conn::Resumable(Box::new(session));
                let text = conn.peer();
                Ok((conn, Peer { text, addr }))
            }
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                let text = addr_text(&a);
                Ok((
                    Conn::Tcp(s),
                    Peer {
                        text,
                        addr: Some(a),
                    },
                ))
            }
            Listener::Unix { listener, path, .. } => {
                let (s, _) = listener.accept().await?;
                let text = format!("unix:{}", path.display());
                Ok((Conn::Unix(s), Peer { text, addr: None }))
            }
        }
    }
}

/// An accepted client's address: as text (logs, `/sessions`, the access
/// log) and, when it has one, as an address (per-client limits, the resume
/// protocol's HELLO), so that neither is made from the other per client.
#[derive(Debug, Clone)]
pub struct Peer {
    pub text: String,
    pub addr: Option<std::net::SocketAddr>,
}

/// `a` as `Display` writes it (`1.2.3.4:5`, `[::1]:5`), without the
/// formatting machinery for IPv4: a connection's address is written once
/// per connection, and `Display` took about 1,700 instructions for it.
pub fn addr_text(a: &std::net::SocketAddr) -> String {
    let std::net::SocketAddr::V4(v4) = a else {
        return a.to_string();
    };
    let mut s = String::with_capacity(21);
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        push_decimal(&mut s, octet.into());
    }
    s.push(':');
    push_decimal(&mut s, v4.port().into());
    s
}

fn push_decimal(s: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        s.push(char::from(d));
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, unlink, .. } = self {
            if *unlink.get_mut() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The server library's settings for a resume-protocol listener.
fn resume_server_config(
    settings: &crate::config::ResumeSettings,
    tls: Option<&crate::config::ListenerTls>,
) -> crate::server::ServerConfig {
    let mut cfg = crate::server::ServerConfig::new(settings.key.0.to_vec());
    cfg.link.max_frame = settings.max_frame;
    cfg.link.window = settings.window;
    cfg.link.heartbeat = settings.heartbeat_interval;
    cfg.link.dead_peer_timeout = settings.dead_peer_timeout;
    cfg.resume_timeout = settings.resume_timeout;
    cfg.tls = resume_tls(tls);
    cfg
}

/// A listener's checked `tls` settings as the server library takes them.
fn resume_tls(tls: Option<&crate::config::ListenerTls>) -> Option<crate::server::TlsConfig> {
    tls.map(|t| crate::server::TlsConfig {
        server: t.server.0.clone(),
        handshake_timeout: t.handshake_timeout,
    })
}

async fn remove_stale_socket(endpoint: &Endpoint, path: &Path) -> Result<(), BindError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BindError::Io {
                endpoint: endpoint.to_string(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket {
            endpoint: endpoint.to_string(),
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(BindError::InUse {
            endpoint: endpoint.to_string(),
            path: path.to_path_buf(),
        }),
        Err(_) => std::fs::remove_file(path).map_err(|source| BindError::Io {
            endpoint: endpoint.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut addrs: Vec<std::net::SocketAddr> = vec![
            "0.0.0.0:0".parse().unwrap(),
            "255.255.255.255:65535".parse().unwrap(),
            "10.0.9.100:8080".parse().unwrap(),
            "[::1]:443".parse().unwrap(),
            "[fe80::1%2]:22".parse().unwrap(),
        ];
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ip = std::net::Ipv4Addr::from((x >> 16) as u32);
            addrs.push(std::net::SocketAddr::new(ip.into(), x as u16));
        }
        for a in addrs {
            assert_eq!(addr_text(&a), a.to_string());
        }
    }
    use crate::config::Keepalive;

    #[test]
    fn tcp_options_are_applied() {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let mut opts = SocketOptions {
            nodelay: true,
            keepalive: Some(Keepalive {
                idle: Duration::from_secs(61),
                interval: Duration::from_secs(11),
                count: 7,
            }),
            user_timeout: Some(Duration::from_secs(29)),
        };
        apply_tcp_options(SockRef::from(&sock), &opts).unwrap();
        assert!(sock.nodelay().unwrap());
        assert!(
            sock.keepalive().unwrap(),
            "set_tcp_keepalive turns SO_KEEPALIVE on"
        );
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(61));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(11));
        assert_eq!(sock.keepalive_retries().unwrap(), 7);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(29))
        );
        opts.keepalive = None;
        opts.nodelay = false;
        apply_tcp_options(SockRef::from(&sock), &opts).unwrap();
        assert!(!sock.keepalive().unwrap());
        assert!(!sock.nodelay().unwrap());
    }

    /// What `start_session` relies on to skip setting options on each
    /// accepted socket: Linux copies them from the listening socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        for opts in [
            SocketOptions {
                nodelay: true,
                keepalive: Some(Keepalive {
                    idle: Duration::from_secs(61),
                    interval: Duration::from_secs(11),
                    count: 7,
                }),
                user_timeout: Some(Duration::from_secs(29)),
            },
            SocketOptions {
                nodelay: false,
                keepalive: None,
                user_timeout: None,
            },
        ] {
            let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into()), &opts)
                .await
                .unwrap();
            assert_eq!(l.accepted_options(), Some(opts));
            let Listener::Tcp(tl) = &l else {
                panic!("a tcp listener")
            };
            let addr = tl.local_addr().unwrap();
            // Queued before the accept, as after a burst.
            let _client = std::net::TcpStream::connect(addr).unwrap();
            let (conn, _) = l.accept().await.unwrap();
            let Conn::Tcp(s) = &conn else {
                panic!("a tcp connection")
            };
            assert_eq!(tcp_options(SockRef::from(s)).unwrap(), opts);
        }
    }
}
