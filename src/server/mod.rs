//! The server library: lets a service accept *resumable sessions* over the
//! resume protocol (HFRP/2, `docs/protocol.md`, this side is the
//! **acceptor**), so that a broken transport, or a restart of the service
//! process, loses nothing.
//!
//! [`ResumeListener`] listens on TCP or a Unix socket, optionally with TLS
//! ([`TlsConfig`]: a certificate, and client certificates checked against a
//! CA for mutual TLS), runs each connection's handshake and yields each new
//! (or restored) session once as a [`ResumableSession`], which is
//! `AsyncRead + AsyncWrite`. A resume of a session still alive in this
//! process is routed to it internally, whether it comes over plain TCP or a
//! new TLS connection: the application never sees transports come and go.
//!
//! Exactly-once needs [`AckPolicy::Manual`]: the application acknowledges
//! up-stream bytes with [`ResumableSession::ack`] only once it has durably
//! committed them, and installs a [`ServerConfig::restore`] callback that
//! tells a restarted process how far each session had been committed.
//!
//! This module owns the listening socket, the session table and one task
//! per session; the frame codec and the per-leg logic are `crate::proto`'s
//! ([`Link`](crate::proto::Link)), the handshake decision is the pure
//! `handshake` module.
//!
//! ```no_run
//! use holdfast::server::{ResumeListener, ServerConfig};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # async fn run() -> std::io::Result<()> {
//! let key = std::fs::read("/etc/holdfast/resume.key")?;
//! let listener = ResumeListener::bind("127.0.0.1:7001", ServerConfig::new(key)).await?;
//! loop {
//!     let mut session = listener.accept().await?;
//!     tokio::spawn(async move {
//!         // An echo service: each byte read is acked (AckPolicy::Auto) and
//!         // what is written is kept until the initiator acknowledges it.
//!         let mut buf = vec![0u8; 4096];
//!         loop {
//!             match session.read(&mut buf).await {
//!                 Ok(0) | Err(_) => break,
//!                 Ok(n) => {
//!                     if session.write_all(&buf[..n]).await.is_err() {
//!                         break;
//!                     }
//!                 }
//!             }
//!         }
//!         let _ = session.shutdown().await;
//!     });
//! }
//! # }
//! ```
//!
//! Over mutual TLS (the initiator, such as an edge holdfast with backend
//! `tls = { ca, cert, key }`, must present a certificate signed by
//! `client-ca.pem`):
//!
//! ```no_run
//! use holdfast::server::{ResumeListener, ServerConfig, TlsConfig};
//!
//! # async fn run() -> std::io::Result<()> {
//! let key = std::fs::read("/etc/holdfast/resume.key")?;
//! let mut cfg = ServerConfig::new(key);
//! cfg.tls = Some(TlsConfig::from_pem_files(
//!     "/etc/holdfast/server.pem".as_ref(),
//!     "/etc/holdfast/server-key.pem".as_ref(),
//!     Some("/etc/holdfast/client-ca.pem".as_ref()),
//! )?);
//! let listener = ResumeListener::bind("0.0.0.0:7001", cfg).await?;
//! // ... accept as above. After rotating the certificate files:
//! listener.set_tls(Some(TlsConfig::from_pem_files(
//!     "/etc/holdfast/server.pem".as_ref(),
//!     "/etc/holdfast/server-key.pem".as_ref(),
//!     Some("/etc/holdfast/client-ca.pem".as_ref()),
//! )?));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::proto::{
    ClientAddr, Decoder, ErrorCode, Frame, Hello, LinkConfig, ProtoError, Welcome, MAX_MAX_FRAME,
    MIN_MAX_FRAME, TOKEN_LEN, VERSION,
};
use crate::transport::Conn;

mod handover;
mod handshake;
mod session;

pub use handover::{fuzz_parked_state, Imported, LegKind, Parked};

use handshake::{decide, Decision, Known};
use session::{PendingLeg, Shared};

/// A session id: 16 random bytes chosen by the initiator.
pub type SessionId = [u8; 16];

/// The application's restore callback: given a session id being resumed
/// that this process does not know, the up-stream offset it had durably
/// consumed (the session is restored: WELCOME flag `RESTORED`), or `None`
/// (REFUSE `unknown_session`).
pub type RestoreFn = Arc<dyn Fn(SessionId) -> Option<u64> + Send + Sync>;

/// Shortest accepted key.
pub const MIN_KEY_LEN: usize = 32;

/// When up-stream bytes count as consumed (and are acknowledged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckPolicy {
    /// As the application reads them.
    #[default]
    Auto,
    /// When the application calls [`ResumableSession::ack`], typically
    /// after it has durably committed them. Bytes read but not acked are
    /// replayed by the initiator after a transport break (and skipped, not
    /// delivered twice, while this process still has them).
    Manual,
}

/// TLS on a [`ResumeListener`]: every accepted connection completes this
/// handshake, in its own task and within `handshake_timeout`, before its
/// HELLO is read. A resume arrives over a new connection and so makes a new
/// handshake; the session itself does not change.
#[derive(Clone)]
pub struct TlsConfig {
    /// The rustls server side: certificate(s), and a client certificate
    /// verifier for mutual TLS. Use holdfast's crypto provider
    /// ([`crate::transport::tls::provider`], ring) or any other.
    pub server: Arc<rustls::ServerConfig>,
    /// A connection whose TLS handshake has not completed by then is
    /// closed ([`Rejection::TlsTimeout`]).
    pub handshake_timeout: Duration,
}

/// Default [`TlsConfig::handshake_timeout`].
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsConfig {
    /// TLS with `server` and the default handshake timeout (10 s).
    pub fn new(server: Arc<rustls::ServerConfig>) -> TlsConfig {
        TlsConfig {
            server,
            handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        }
    }

    /// TLS 1.2 and 1.3 with the certificate chain `cert` and its private
    /// key `key` (PEM files), and, with `client_ca`, mutual TLS: an
    /// initiator must present a certificate that chains to one of the CA
    /// certificates in that PEM file. Fails ([`ServerError::Tls`]) on a
    /// missing or bad file, or a key that does not fit the certificate.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsConfig, ServerError> {
        use crate::transport::tls;
        let pair = tls::load_cert_key(cert, key).map_err(|(_, e)| ServerError::Tls(e))?;
        let client_ca = client_ca
            .map(tls::load_ca)
            .transpose()
            .map_err(ServerError::Tls)?;
        let server = tls::server_config(&tls::ServerSettings {
            default: &pair,
            sni_certs: Vec::new(),
            client_ca,
            tls12: true,
            alpn: &[],
        })
        .map_err(ServerError::Tls)?;
        Ok(TlsConfig::new(server))
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Why a [`ResumeListener`] closed a connection before reading its HELLO
/// (refusals of a HELLO are answered with REFUSE and logged instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The TLS handshake failed: no or a bad client certificate, a
    /// plaintext client, no common version or cipher suite.
    TlsHandshake,
    /// The TLS handshake did not complete within its timeout.
    TlsTimeout,
}

impl Rejection {
    /// `tls_handshake` or `tls_timeout` (holdfast's metric reasons).
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::TlsHandshake => "tls_handshake",
            Rejection::TlsTimeout => "tls_timeout",
        }
    }
}

/// Told of every [`Rejection`] (to count them). It runs in the
/// connection's task: it must be quick and must not block.
pub type RejectFn = Arc<dyn Fn(Rejection) + Send + Sync>;

/// How a [`ResumeListener`] behaves.
#[derive(Clone)]
pub struct ServerConfig {
    /// The shared key (at least [`MIN_KEY_LEN`] bytes) that handshake
    /// tokens are made with.
    pub key: Vec<u8>,
    /// Frame size, window, heartbeat and dead-peer timeout of each leg.
    /// `window` also bounds the up-stream bytes queued for the application
    /// and the down-stream bytes written but not yet acknowledged.
    pub link: LinkConfig,
    /// When up-stream bytes are acknowledged.
    pub ack: AckPolicy,
    /// A connection that has not sent a complete HELLO by then is dropped
    /// (after a best-effort REFUSE `timeout`).
    pub handshake_timeout: Duration,
    /// How long a session without a transport waits for the initiator to
    /// resume before it ends.
    pub resume_timeout: Duration,
    /// For a restarted process: see [`RestoreFn`]. It is called with the
    /// session table locked: it must be quick and must not block.
    pub restore: Option<RestoreFn>,
    /// TLS for every accepted connection; `None` for plain TCP or Unix.
    /// [`ResumeListener::set_tls`] replaces it (certificate rotation).
    pub tls: Option<TlsConfig>,
    /// Told of connections closed before their HELLO; see
    /// [`ResumeListener::set_on_reject`].
    pub on_reject: Option<RejectFn>,
}

impl ServerConfig {
    /// Defaults for everything but the key: `LinkConfig::default()`,
    /// [`AckPolicy::Auto`], a 5 s handshake timeout, a 30 s resume timeout,
    /// no restore callback, no TLS.
    pub fn new(key: Vec<u8>) -> ServerConfig {
        ServerConfig {
            key,
            link: LinkConfig::default(),
            ack: AckPolicy::Auto,
            handshake_timeout: Duration::from_secs(5),
            resume_timeout: Duration::from_secs(30),
            restore: None,
            tls: None,
            on_reject: None,
        }
    }

    /// Checks the key length and the link limits.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.key.len() < MIN_KEY_LEN {
            return Err(ServerError::KeyTooShort {
                len: self.key.len(),
            });
        }
        let l = &self.link;
        if !(MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&l.max_frame) || l.window < l.max_frame {
            return Err(ServerError::BadLink {
                max_frame: l.max_frame,
                window: l.window,
            });
        }
        Ok(())
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("key", &"***")
            .field("link", &self.link)
            .field("ack", &self.ack)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("resume_timeout", &self.resume_timeout)
            .field("restore", &self.restore.as_ref().map(|_| "Fn"))
            .field("tls", &self.tls)
            .field("on_reject", &self.on_reject.as_ref().map(|_| "Fn"))
            .finish()
    }
}

/// Errors of the server library. Inside `io::Error`s (from `bind`, reads
/// and writes) they are the error's inner value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// Local: the configured key is too short.
    #[error("the resume key has {len} bytes; at least 32 are needed")]
    KeyTooShort { len: usize },
    /// Local: the link settings are out of the protocol's range.
    #[error("max_frame {max_frame} must be within 1024..=16777216 and window {window} at least max_frame")]
    BadLink { max_frame: u32, window: u32 },
    /// Local: `addr` is neither `host:port` nor `unix:/path`.
    #[error("bad listen address {0:?}: use host:port or unix:/path")]
    BadAddress(String),
    /// Local: a TLS certificate, key or CA file could not be used.
    #[error("tls: {0}")]
    Tls(String),
    /// Peer: the initiator ended the session with ABORT.
    #[error("the initiator aborted the session: {code}: {reason}")]
    PeerAborted { code: ErrorCode, reason: String },
    /// Peer: the initiator broke the protocol; we sent ABORT and ended the
    /// session.
    #[error("the initiator broke the protocol, session aborted: {0}")]
    Protocol(ProtoError),
    /// Peer: no transport resumed the session in time.
    #[error("no transport resumed the session within {0:?}")]
    ResumeTimeout(Duration),
    /// Application: `ack` beyond the bytes read.
    #[error("ack of offset {offset} beyond the {consumed} bytes read")]
    AckBeyondRead { offset: u64, consumed: u64 },
    /// Application: a write after `shutdown`.
    #[error("write after shutdown")]
    WriteAfterShutdown,
    /// The session completed (both directions closed and acknowledged):
    /// nothing more can be written.
    #[error("the session is complete")]
    Complete,
}

impl ServerError {
    fn kind(&self) -> io::ErrorKind {
        match self {
            ServerError::KeyTooShort { .. }
            | ServerError::BadLink { .. }
            | ServerError::BadAddress(_)
            | ServerError::Tls(_)
            | ServerError::AckBeyondRead { .. } => io::ErrorKind::InvalidInput,
            ServerError::PeerAborted { .. } => io::ErrorKind::ConnectionAborted,
            ServerError::Protocol(_) => io::ErrorKind::InvalidData,
            ServerError::ResumeTimeout(_) => io::ErrorKind::TimedOut,
            ServerError::WriteAfterShutdown | ServerError::Complete => io::ErrorKind::BrokenPipe,
        }
    }
}

impl From<ServerError> for io::Error {
    fn from(e: ServerError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// State shared by the accept loop, the handshake tasks and the sessions.
pub(crate) struct Ctx {
    pub(crate) cfg: ServerConfig,
    pub(crate) table: Mutex<Table>,
    new_tx: mpsc::Sender<ResumableSession>,
    /// The TLS of new connections (`cfg.tls` at first; `set_tls`).
    tls: RwLock<Option<TlsConfig>>,
    /// `cfg.on_reject` at first; `set_on_reject`.
    on_reject: RwLock<Option<RejectFn>>,
    /// The bound address, for logs.
    local: String,
}

impl Ctx {
    fn reject(&self, why: Rejection) {
        let f = self.on_reject.read().expect("on_reject lock").clone();
        if let Some(f) = f {
            f(why);
        }
    }
}

/// Session id → session, plus recently completed sessions (§4).
#[derive(Default)]
pub(crate) struct Table {
    map: HashMap<SessionId, Entry>,
    last_purge: Option<Instant>,
}

pub(crate) enum Entry {
    Live(Arc<Shared>),
    /// Handed over to another process (which serves its resumes now): a
    /// resume that still reaches this one is closed unanswered, so the
    /// initiator tries again (and reaches the other process) instead of
    /// being told the session is unknown.
    Moved {
        until: Instant,
    },
    Completed {
        epoch: u64,
        up_end: u64,
        down_end: u64,
        until: Instant,
    },
}

impl Table {
    fn purge(&mut self, now: Instant) {
        if self
            .last_purge
            .is_some_and(|t| now < t + Duration::from_secs(1))
        {
            return;
        }
        self.last_purge = Some(now);
        self.map.retain(|_, e| match e {
            Entry::Completed { until, .. } | Entry::Moved { until } => *until > now,
            Entry::Live(_) => true,
        });
    }

    /// Marks a live session handed over to another process, for as long as
    /// resumes may still reach this one (its listener is the other
    /// process's now).
    pub(crate) fn moved(&mut self, id: &SessionId, shared: &Arc<Shared>) {
        if let Some(Entry::Live(s)) = self.map.get(id) {
            if Arc::ptr_eq(s, shared) {
                self.map.insert(
                    *id,
                    Entry::Moved {
                        until: Instant::now() + Duration::from_secs(60),
                    },
                );
            }
        }
    }

    /// Removes a live session (when it ends), remembering it for `ttl` if
    /// it completed.
    pub(crate) fn end(
        &mut self,
        id: &SessionId,
        shared: &Arc<Shared>,
        completed: Option<(u64, u64, u64)>,
        ttl: Duration,
    ) {
        if let Some(Entry::Live(s)) = self.map.get(id) {
            if !Arc::ptr_eq(s, shared) {
                return;
            }
        }
        match completed {
            Some((epoch, up_end, down_end)) => {
                self.map.insert(
                    *id,
                    Entry::Completed {
                        epoch,
                        up_end,
                        down_end,
                        until: Instant::now() + ttl,
                    },
                );
            }
            None => {
                self.map.remove(id);
            }
        }
    }
}

enum Listening {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listening {
    async fn accept(&self) -> io::Result<(Conn, String)> {
        match self {
            Listening::Tcp(l) => {
                let (s, a) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Tcp(s), a.to_string()))
            }
            Listening::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Conn::Unix(s), "unix".to_owned()))
            }
        }
    }
}

/// Listens for HFRP initiators (versions 1 and 2) and yields their sessions.
///
/// Dropping it stops accepting connections (and so resumes); sessions
/// already yielded keep running on their current transport.
pub struct ResumeListener {
    local: String,
    ctx: Arc<Ctx>,
    rx: tokio::sync::Mutex<mpsc::Receiver<ResumableSession>>,
    listening: Arc<Listening>,
    /// The accept loop (None while paused).
    task: Mutex<Option<JoinHandle<()>>>,
    unix_path: Option<PathBuf>,
    /// Whether dropping the listener removes its socket file (cleared once
    /// the socket was handed over to a process that serves it).
    unlink: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for ResumeListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResumeListener")
            .field("local", &self.local)
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl ResumeListener {
    /// Binds `addr` (`host:port`, or `unix:/path`: a stale socket file is
    /// replaced) and starts accepting. Fails on a bad config
    /// ([`ServerError`] inside the `io::Error`) or address. Must be called
    /// within a tokio runtime.
    pub async fn bind(addr: &str, cfg: ServerConfig) -> io::Result<ResumeListener> {
        cfg.validate()?;
        let (listening, local, unix_path) = if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ServerError::BadAddress(addr.to_owned()).into());
            }
            if std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path)?;
            (
                Listening::Unix(l),
                format!("unix:{path}"),
                Some(PathBuf::from(path)),
            )
        } else {
            if !addr.contains(':') {
                return Err(ServerError::BadAddress(addr.to_owned()).into());
            }
            let l = TcpListener::bind(addr).await?;
            let local = l.local_addr()?.to_string();
            (Listening::Tcp(l), local, None)
        };
        Ok(ResumeListener::start(listening, local, unix_path, cfg))
    }

    /// Takes a listening socket bound elsewhere (TCP or Unix; a previous
    /// process handed it over) and starts accepting on it. Its socket file,
    /// if any, is not removed on drop. Must be called within a tokio
    /// runtime.
    pub fn from_listening_fd(
        fd: std::os::fd::OwnedFd,
        cfg: ServerConfig,
    ) -> io::Result<ResumeListener> {
        cfg.validate()?;
        let sock = socket2::Socket::from(fd);
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        let (listening, local) = match local.as_socket() {
            Some(a) => (
                Listening::Tcp(TcpListener::from_std(std::net::TcpListener::from(sock))?),
                a.to_string(),
            ),
            None => {
                let path = local
                    .as_pathname()
                    .map(|p| format!("unix:{}", p.display()))
                    .unwrap_or_else(|| "unix:?".into());
                (
                    Listening::Unix(UnixListener::from_std(
                        std::os::unix::net::UnixListener::from(sock),
                    )?),
                    path,
                )
            }
        };
        let l = ResumeListener::start(listening, local, None, cfg);
        Ok(l)
    }

    fn start(
        listening: Listening,
        local: String,
        unix_path: Option<PathBuf>,
        cfg: ServerConfig,
    ) -> ResumeListener {
        let (new_tx, rx) = mpsc::channel(1024);
        let ctx = Arc::new(Ctx {
            tls: RwLock::new(cfg.tls.clone()),
            on_reject: RwLock::new(cfg.on_reject.clone()),
            cfg,
            table: Mutex::new(Table::default()),
            new_tx,
            local: local.clone(),
        });
        let listening = Arc::new(listening);
        let task = tokio::spawn(accept_loop(listening.clone(), ctx.clone()));
        ResumeListener {
            local,
            ctx,
            rx: tokio::sync::Mutex::new(rx),
            listening,
            task: Mutex::new(Some(task)),
            unlink: std::sync::atomic::AtomicBool::new(unix_path.is_some()),
            unix_path,
        }
    }

    /// The listening socket (to hand over to another process).
    pub fn listening_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match &*self.listening {
            Listening::Tcp(l) => l.as_fd(),
            Listening::Unix(l) => l.as_fd(),
        }
    }

    /// Stops accepting connections (they queue on the socket); handshakes
    /// under way and live sessions carry on.
    pub fn pause_accepting(&self) {
        if let Some(t) = self.task.lock().expect("accept task lock").take() {
            t.abort();
        }
    }

    /// Accepts again after [`pause_accepting`](Self::pause_accepting).
    pub fn resume_accepting(&self) {
        let mut t = self.task.lock().expect("accept task lock");
        if t.is_none() {
            *t = Some(tokio::spawn(accept_loop(
                self.listening.clone(),
                self.ctx.clone(),
            )));
        }
    }

    /// Another process serves this socket now: dropping the listener must
    /// not remove its file.
    pub fn keep_socket_file(&self) {
        self.unlink
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bound address: `ip:port` (the real port when bound to port 0)
    /// or `unix:/path`.
    pub fn local_addr(&self) -> &str {
        &self.local
    }

    /// Replaces the TLS settings (or turns TLS on or off) for connections
    /// accepted from now on: a certificate rotation. Connections already
    /// accepted finish their handshake with the settings they started with;
    /// live sessions are untouched until they resume, when the new
    /// connection's handshake uses the new settings.
    pub fn set_tls(&self, tls: Option<TlsConfig>) {
        *self.ctx.tls.write().expect("tls lock") = tls;
    }

    /// Whether new connections must speak TLS.
    pub fn is_tls(&self) -> bool {
        self.ctx.tls.read().expect("tls lock").is_some()
    }

    /// Replaces [`ServerConfig::on_reject`].
    pub fn set_on_reject(&self, f: Option<RejectFn>) {
        *self.ctx.on_reject.write().expect("on_reject lock") = f;
    }

    /// The next new or restored session. A session is yielded once, however
    /// many transports it goes through.
    pub async fn accept(&self) -> io::Result<ResumableSession> {
        self.rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "the accept loop has stopped"))
    }
}

impl Drop for ResumeListener {
    fn drop(&mut self) {
        self.pause_accepting();
        if let Some(p) = &self.unix_path {
            if *self.unlink.get_mut() {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

async fn accept_loop(l: Arc<Listening>, ctx: Arc<Ctx>) {
    let mut logged = false;
    loop {
        match l.accept().await {
            Ok((conn, peer)) => {
                logged = false;
                // The TLS settings at accept time; the handshake itself
                // runs in the connection's task.
                let tls = ctx.tls.read().expect("tls lock").clone();
                tokio::spawn(handshake_task(ctx.clone(), conn, peer, tls));
            }
            Err(e) => {
                // EMFILE and friends: back off, log once, keep accepting.
                if !logged {
                    tracing::warn!(error = %e, "resume listener: accept failed");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Why no HELLO could be read.
enum HelloError {
    Closed,
    Proto(ProtoError),
}

async fn read_hello(
    conn: &mut Conn,
    buf: &mut BytesMut,
    dec: &Decoder,
) -> Result<Hello, HelloError> {
    loop {
        match dec.decode(buf) {
            Ok(Some(Frame::Hello(h))) => return Ok(h),
            Ok(Some(_)) => {
                return Err(HelloError::Proto(ProtoError::new(
                    ErrorCode::Malformed,
                    "the first frame is not a HELLO",
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(HelloError::Proto(e)),
        }
        buf.reserve(1024);
        match conn.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(HelloError::Closed),
            Ok(_) => {}
        }
    }
}

/// Sends a REFUSE (best effort, bounded) and closes.
async fn refuse(mut conn: Conn, peer: &str, e: ProtoError) {
    tracing::warn!(client.addr = %peer, code = e.code.as_str(), detail = %e.detail, "resume handshake refused");
    let mut out = BytesMut::new();
    crate::proto::encode(
        &Frame::Refuse {
            code: e.code,
            reason: e.detail,
        },
        &mut out,
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        conn.write_all(&out).await?;
        conn.shutdown().await
    })
    .await;
}

fn welcome(
    cfg: &ServerConfig,
    hello: &Hello,
    resumed: bool,
    restored: bool,
    recv_offset: u64,
) -> Bytes {
    let mut w = Welcome {
        // `decide` checked that a common version exists.
        version: hello.version().unwrap_or(VERSION),
        resumed,
        restored,
        session_id: hello.session_id,
        recv_offset,
        max_frame: cfg.link.max_frame,
        window: cfg.link.window,
        heartbeat_ms: u32::try_from(cfg.link.heartbeat.as_millis()).unwrap_or(u32::MAX),
        token: [0; TOKEN_LEN],
    };
    w.encode(&cfg.key, &hello.token)
}

/// The server side of a TLS handshake; `None` (after a log line and a
/// [`Rejection`]) when it failed.
async fn tls_accept(ctx: &Ctx, conn: Conn, peer: &str, tls: &TlsConfig) -> Option<Conn> {
    use crate::transport::tls::{accept, HandshakeError};
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let (why, error) = match accept(&acceptor, conn, tls.handshake_timeout).await {
        Ok(conn) => return Some(conn),
        Err(HandshakeError::Failed(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            // Closed before a ClientHello: a port probe, not a refusal.
            tracing::debug!(listener.addr = %ctx.local, client.addr = %peer, error = %e, "connection closed during the tls handshake");
            return None;
        }
        Err(HandshakeError::Failed(e)) => (Rejection::TlsHandshake, e.to_string()),
        Err(HandshakeError::Timeout) => (
            Rejection::TlsTimeout,
            format!(
                "no handshake within {} ms",
                tls.handshake_timeout.as_millis()
            ),
        ),
    };
    tracing::warn!(listener.addr = %ctx.local, client.addr = %peer, reason = why.as_str(), error = %error, "resume listener: tls handshake failed: closing the connection");
    ctx.reject(why);
    None
}

async fn handshake_task(ctx: Arc<Ctx>, conn: Conn, peer: String, tls: Option<TlsConfig>) {
    let mut conn = match &tls {
        None => conn,
        Some(tls) => match tls_accept(&ctx, conn, &peer, tls).await {
            Some(conn) => conn,
            None => return,
        },
    };
    let cfg = &ctx.cfg;
    let mut buf = BytesMut::with_capacity(1024);
    let dec = Decoder::new(cfg.link.max_frame);
    let hello =
        match tokio::time::timeout(cfg.handshake_timeout, read_hello(&mut conn, &mut buf, &dec))
            .await
        {
            Ok(Ok(h)) => h,
            Ok(Err(HelloError::Closed)) => {
                tracing::debug!(client.addr = %peer, "connection closed before a complete HELLO");
                return;
            }
            Ok(Err(HelloError::Proto(e))) => return refuse(conn, &peer, e).await,
            Err(_) => {
                let e = ProtoError::new(
                    ErrorCode::Timeout,
                    format!("no HELLO within {:?}", cfg.handshake_timeout),
                );
                return refuse(conn, &peer, e).await;
            }
        };
    let id = hello.session_id;
    let now = Instant::now();
    enum Act {
        Spawn(Arc<Shared>),
        Routed,
        Completed(Bytes),
    }
    let mut conn = Some(conn);
    let mut take = || conn.take().expect("the connection is taken once");
    let act = {
        let mut table = ctx.table.lock().expect("session table lock");
        table.purge(now);
        let entry = table.map.get(&id);
        // (A session released to the new process is moved already, even
        // before its task here has marked it so.)
        let moved = match entry {
            Some(Entry::Moved { .. }) => true,
            Some(Entry::Live(s)) => s.handed_over(),
            _ => false,
        };
        if moved {
            drop(table);
            tracing::debug!(client.addr = %peer, "resume of a session handed over to another process: closed unanswered, the initiator retries there");
            return;
        }
        let known = match entry {
            None | Some(Entry::Moved { .. }) => Known::Unknown,
            Some(Entry::Live(s)) => s.known(),
            Some(Entry::Completed {
                epoch, down_end, ..
            }) => Known::Completed {
                epoch: *epoch,
                down_end: *down_end,
            },
        };
        match decide(&hello, &cfg.key, known) {
            Err(e) => Err(e),
            Ok(Decision::New) => {
                let w = welcome(cfg, &hello, false, false, 0);
                let s = Shared::new(
                    cfg,
                    &hello,
                    None,
                    PendingLeg::new(take(), buf, &hello, w, 0),
                );
                table.map.insert(id, Entry::Live(s.clone()));
                Ok(Act::Spawn(s))
            }
            Ok(Decision::Restore) => match cfg.restore.as_ref().and_then(|f| f(id)) {
                None => Err(ProtoError::new(
                    ErrorCode::UnknownSession,
                    "no such session, and the application did not restore it",
                )),
                Some(up) => {
                    let w = welcome(cfg, &hello, false, true, up);
                    let s = Shared::new(
                        cfg,
                        &hello,
                        Some(up),
                        PendingLeg::new(take(), buf, &hello, w, up),
                    );
                    table.map.insert(id, Entry::Live(s.clone()));
                    Ok(Act::Spawn(s))
                }
            },
            Ok(Decision::Resume) => {
                let Some(Entry::Live(s)) = entry else {
                    unreachable!("decide says Resume only for live sessions")
                };
                let s = s.clone();
                s.route(cfg, &hello, take(), buf);
                Ok(Act::Routed)
            }
            Ok(Decision::Completed) => {
                let Some(Entry::Completed {
                    up_end, down_end, ..
                }) = entry
                else {
                    unreachable!("decide says Completed only for completed sessions")
                };
                let (up_end, down_end) = (*up_end, *down_end);
                if let Some(Entry::Completed { epoch, .. }) = table.map.get_mut(&id) {
                    *epoch = hello.epoch;
                }
                let mut out = BytesMut::new();
                out.extend_from_slice(&welcome(cfg, &hello, true, false, up_end));
                crate::proto::encode(&Frame::Ack(up_end + 1), &mut out);
                crate::proto::encode(&Frame::Fin(down_end), &mut out);
                Ok(Act::Completed(out.freeze()))
            }
        }
    };
    match act {
        Err(e) => refuse(take(), &peer, e).await,
        Ok(Act::Routed) => {
            tracing::debug!(client.addr = %peer, epoch = hello.epoch, "resume routed to its session");
        }
        Ok(Act::Completed(out)) => {
            tracing::debug!(client.addr = %peer, "resume of a completed session answered");
            let mut conn = take();
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                conn.write_all(&out).await?;
                conn.shutdown().await
            })
            .await;
        }
        Ok(Act::Spawn(s)) => {
            let restored = s.restored;
            tracing::info!(session.id = %hex(&id), client.addr = %peer, restored, "session opened");
            tokio::spawn(session::run(s.clone(), ctx.clone()));
            let _ = ctx.new_tx.send(ResumableSession { shared: s }).await;
        }
    }
}

/// Lowercase hex of a session id, for logs and file names.
pub fn hex(id: &SessionId) -> String {
    Hex(*id).to_string()
}

/// A session id that displays as lowercase hex, formatted only when shown
/// (a log line that is filtered out formats nothing; [`hex`] allocated 16
/// strings per session).
#[derive(Clone, Copy)]
pub(crate) struct Hex(pub(crate) SessionId);

impl std::fmt::Display for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// One resumable session, as the application sees it: the up stream is
/// read with `AsyncRead`, the down stream written with `AsyncWrite`.
///
/// Writes append to the down stream and are kept until the initiator
/// acknowledges them (a write waits while `link.window` bytes are
/// unacknowledged); `poll_shutdown` sends our FIN once every byte before it
/// is out. Reads return end-of-file after the initiator's FIN. Dropping the
/// session shuts the down stream and discards (acknowledges) what the
/// initiator still sends; the session then ends when both FINs are
/// acknowledged.
pub struct ResumableSession {
    shared: Arc<Shared>,
}

impl fmt::Debug for ResumableSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResumableSession")
            .field("id", &hex(&self.shared.id))
            .finish()
    }
}

impl ResumableSession {
    /// The session id.
    pub fn id(&self) -> SessionId {
        self.shared.id
    }

    /// Whether this session was restored by the [`ServerConfig::restore`]
    /// callback (a resume of a session this process did not know).
    pub fn is_restored(&self) -> bool {
        self.shared.restored
    }

    /// The client's address, as the initiator reported it in its HELLO.
    pub fn client_addr(&self) -> ClientAddr {
        self.shared.client
    }

    /// Up-stream offset of the next byte the application will read: bytes
    /// read so far (for a restored session, counted from the start of the
    /// session, so it starts at the restored offset).
    pub fn consumed(&self) -> u64 {
        self.shared.lock().consumed
    }

    /// Down-stream offset of the next byte written (for a restored session
    /// it starts where the initiator had received up to, so a service can
    /// regenerate lost output).
    pub fn written(&self) -> u64 {
        self.shared.lock().down.read()
    }

    /// Up-stream bytes acknowledged to the initiator as consumed (with
    /// `Auto`, the bytes read).
    pub fn acked(&self) -> u64 {
        let g = self.shared.lock();
        match self.shared.policy {
            AckPolicy::Auto => g.consumed,
            AckPolicy::Manual => g.app_acked,
        }
    }

    /// With [`AckPolicy::Manual`]: the application has durably consumed
    /// the up stream up to `offset` (at most [`consumed`](Self::consumed));
    /// the initiator may drop those bytes. Older offsets are ignored. With
    /// `Auto` this only checks `offset`.
    pub fn ack(&self, offset: u64) -> Result<(), ServerError> {
        let mut g = self.shared.lock();
        if offset > g.consumed {
            return Err(ServerError::AckBeyondRead {
                offset,
                consumed: g.consumed,
            });
        }
        if self.shared.policy == AckPolicy::Manual && offset > g.app_acked {
            g.app_acked = offset;
            drop(g);
            self.shared.notify.notify_one();
        }
        Ok(())
    }
}

impl AsyncRead for ResumableSession {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        let mut g = shared.lock();
        if g.up_queued > 0 {
            let was_full = g.up_queued >= shared.queue_limit;
            let mut n = 0;
            while buf.remaining() > 0 {
                let Some(front) = g.up.front_mut() else { break };
                let k = front.len().min(buf.remaining());
                buf.put_slice(&front[..k]);
                if k == front.len() {
                    g.up.pop_front();
                } else {
                    let _ = front.split_to(k);
                }
                n += k;
            }
            g.up_queued -= n;
            g.consumed += n as u64;
            drop(g);
            if was_full || shared.policy == AckPolicy::Auto {
                shared.notify.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        if g.up_fin.is_some() {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = g.end.clone() {
            return Poll::Ready(match e {
                ServerError::Complete => Ok(()),
                e => Err(e.into()),
            });
        }
        g.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for ResumableSession {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut g = shared.lock();
        if let Some(e) = g.end.clone() {
            return Poll::Ready(Err(e.into()));
        }
        if g.down_fin {
            return Poll::Ready(Err(ServerError::WriteAfterShutdown.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = shared.send_limit.saturating_sub(g.down.buffered());
        if room == 0 {
            g.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        g.down.push(Bytes::copy_from_slice(&buf[..n]));
        drop(g);
        shared.notify.notify_one();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the replay buffer: nothing to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.shutdown_down();
        Poll::Ready(Ok(()))
    }
}

impl Drop for ResumableSession {
    fn drop(&mut self) {
        {
            let mut g = self.shared.lock();
            g.app_gone = true;
        }
        self.shared.shutdown_down();
    }
}
