//! The async shell of one session: owns the client connection, the current
//! leg's server connection, the connect attempt and the timers, feeds their
//! events into the [`SessionCore`] and carries its outputs out.
//!
//! One task per session, written as a single poll loop (no `select!`, no
//! `copy_bidirectional`): every byte that moves goes through the core, which
//! keeps the offsets. Decisions live in the core; this file only does IO.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::core::{Action, CloseReason, Event, Generation, LegFailure, SessionCore, SessionId};
use super::status::{ExportReply, SessionStatus};
use crate::config::{AckMode, BackendConfig};
use crate::metrics::ListenerMetrics;
use crate::proxy::Backend;
use crate::stream::Dir;
use crate::transport::{self, Conn};

/// Bytes asked of the kernel per read, at most: a direction's read size
/// doubles from `READ_MIN` while reads fill the space they were given and
/// halves when they return under an eighth of it.
pub(crate) const READ_SIZE: usize = 64 * 1024;
/// The smallest read size. At this size a read buffer left empty is freed,
/// so an idle session holds no read buffer.
pub(crate) const READ_MIN: usize = 4 * 1024;
/// Chunks per vectored write.
const MAX_IOV: usize = 64;
/// Longest a hand-over waits for the failover replication task's copy of a
/// session it exports.
const REPLICATION_EXPORT: Duration = Duration::from_secs(1);
/// How often `ack = "tcp"` samples the server's acks while bytes are in flight.
const ACK_SAMPLE_INTERVAL: Duration = Duration::from_millis(5);
/// How often a session blocked on the global buffer memory looks again.
const MEMORY_RETRY: Duration = Duration::from_millis(10);
/// How long a graceful close may take before the session is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a closed session keeps reading (and discarding) what the client
/// still sends, so that closing does not reset it.
const LINGER: Duration = Duration::from_secs(2);
/// Loop turns before the task yields to others.
const TURNS_PER_POLL: usize = 64;
/// Bytes a session reads (both sockets together, spliced ones too) in one
/// poll before its task yields to others: four full reads, or one full
/// splice. Without it a session in bulk ran until its sockets' buffers ran
/// dry (megabytes) and a light session beside it waited for that
/// (docs/benchmarks.md, "A light session beside bulk").
const POLL_READ_BUDGET: u64 = 256 * 1024;
/// [`Driver::read_pending`] bits.
const PENDING_CLIENT: u8 = 1;
const PENDING_SERVER: u8 = 2;

/// Process-wide state shared by all sessions.
#[derive(Debug)]
pub struct Shared {
    /// Bytes held in replay buffers across all sessions.
    pub buffer_used: AtomicU64,
    /// `[limits] buffer_memory` (a reload may change it).
    buffer_limit: AtomicU64,
    /// Every open session's published status.
    pub sessions: Mutex<HashMap<SessionId, Arc<SessionStatus>>>,
    /// `buffer_used` reached `buffer_limit` and nobody has read since.
    pub memory_full: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn new(buffer_limit: u64) -> Shared {
        Shared {
            buffer_used: AtomicU64::new(0),
            buffer_limit: AtomicU64::new(buffer_limit),
            sessions: Mutex::new(HashMap::new()),
            memory_full: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn buffer_limit(&self) -> u64 {
        self.buffer_limit.load(Ordering::Relaxed)
    }

    pub fn set_buffer_limit(&self, limit: u64) {
        self.buffer_limit.store(limit, Ordering::Relaxed);
    }

    /// Snapshots of every open session.
    pub fn session_views(&self) -> Vec<super::status::SessionView> {
        let mut views: Vec<_> = self.statuses().iter().map(|s| s.view()).collect();
        views.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
        views
    }

    /// Asks every open session to close gracefully, each at its next turn.
    /// Call it after cancelling the close token the sessions were given:
    /// a session that publishes itself after this looks finds it cancelled.
    pub fn close_sessions(&self) {
        for s in self.statuses() {
            s.close();
        }
    }

    /// Every open session's status, taken out of the lock.
    fn statuses(&self) -> Vec<Arc<SessionStatus>> {
        match self.sessions.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// What a session task needs from the proxy around it.
#[derive(Clone)]
pub struct SessionCtx {
    pub backend: Arc<Backend>,
    pub listener: ListenerMetrics,
    pub shared: Arc<Shared>,
}

/// What a finished session reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub reason: CloseReason,
    /// Bytes sent again on later legs.
    pub replayed: u64,
    /// The client connection ended with a reset from holdfast's side
    /// (unread input at close).
    pub client_reset: bool,
    /// What a peer said went wrong, when it said (resume protocol).
    pub error: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub legs: u64,
    pub duration: Duration,
}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>>;
type UpReceiver = tokio::sync::watch::Receiver<(u64, usize)>;
type UpFuture = Pin<Box<dyn Future<Output = (UpReceiver, Option<usize>)> + Send>>;

struct ServerConn {
    gen: Generation,
    conn: Conn,
    rbuf: BytesMut,
    /// Bytes to ask for per read, `READ_MIN..=READ_SIZE`.
    read_size: usize,
    /// Resume protocol legs: frames are decoded from `rbuf`.
    decoder: Option<crate::proto::Decoder>,
    /// Bytes written on this leg (for Unix-socket acks).
    written: u64,
}

/// How a socket of a session travels in a hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SockKind {
    Tcp,
    Unix,
    /// A session of a resume-protocol listener (the state travels in
    /// `ExportedResumable`).
    Resumable,
}

impl SockKind {
    fn of(conn: &Conn) -> Option<SockKind> {
        match conn {
            Conn::Tcp(_) => Some(SockKind::Tcp),
            Conn::Unix(_) => Some(SockKind::Unix),
            _ => None,
        }
    }

    /// Wraps a received descriptor (inside a tokio runtime).
    pub fn wrap(self, fd: std::os::fd::OwnedFd) -> io::Result<Conn> {
        Ok(match self {
            SockKind::Resumable => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a resumable session is not one socket",
                ))
            }
            SockKind::Tcp => Conn::from_tcp_fd(fd)?,
            SockKind::Unix => Conn::from_unix_fd(fd)?,
        })
    }
}

/// A session exported for a hand-over: duplicates of its sockets and its
/// core's state. The session task waits, paused, for `verdict`: true means
/// the new process owns the session now (the task ends without touching
/// the sockets); false or a dropped sender means it carries on here as if
/// nothing happened (nothing moved while it was paused).
#[derive(Debug)]
pub struct Exported {
    pub id: SessionId,
    pub listener: String,
    pub peer: String,
    /// The client's socket; for a resumable client, its leg's, when one
    /// travels.
    pub client: Option<std::os::fd::OwnedFd>,
    pub client_kind: SockKind,
    /// A resumable client's state (`client_kind` is `Resumable`).
    pub resumable: Option<ExportedResumable>,
    /// Host failover: the session's replication (its records, encoded,
    /// and its tap's counters), for the new process to carry on.
    pub replication: Option<(Vec<u8>, crate::failover::tap::TapCounters)>,
    pub server: Option<ExportedLeg>,
    /// [`SessionCore::export`]'s bytes.
    pub snapshot: Vec<u8>,
    pub client_eof: bool,
    pub age: Duration,
    pub legs: u64,
    pub replayed: u64,
    /// The backend's ack mode ([`crate::proxy::ack_kind`]).
    pub ack: String,
    /// When the session stopped moving bytes here (its pause ends when the
    /// new process first runs it).
    pub paused_at: std::time::Instant,
    pub verdict: tokio::sync::oneshot::Sender<bool>,
}

/// The server library's state of a resumable client, parked until the
/// verdict.
#[derive(Debug)]
pub struct ExportedResumable {
    pub state: Vec<u8>,
    /// The kind of the leg's socket (in `Exported::client`), if one travels.
    pub leg: Option<SockKind>,
}

/// The server connection of an exported session's leg.
#[derive(Debug)]
pub struct ExportedLeg {
    pub gen: u64,
    pub fd: std::os::fd::OwnedFd,
    pub kind: SockKind,
    /// Bytes read from the server and not yet decoded (a partial frame of
    /// the resume protocol).
    pub rbuf: bytes::Bytes,
    /// Bytes written on this leg (Unix-socket acks count from it).
    pub written: u64,
}

/// What a session taken over from another process brings besides its core.
pub struct Restored {
    pub client_eof: bool,
    pub age: Duration,
    pub legs: u64,
    pub replayed: u64,
    /// The leg's server connection, when one was up.
    pub server: Option<(Generation, Conn, BytesMut, u64)>,
    /// Host failover: the session's replication, carried on.
    pub tap: Option<Box<crate::failover::tap::Tap>>,
}

/// How a session task ended.
#[derive(Debug)]
pub enum Ended {
    Closed(Summary),
    /// Handed over to a new process, which carries it on.
    HandedOver(HandedOver),
}

/// A session handed over to a new process, for the log.
#[derive(Debug)]
pub struct HandedOver {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub legs: u64,
    pub duration: Duration,
}

enum Outcome {
    Closed(CloseReason),
    Export(ExportReply),
}

/// A log line of the session, in its span: entered for the line only (the
/// span entered on every poll cost 5% of a round trip's instructions at
/// the default log level).
macro_rules! slog {
    ($self:ident, $($event:tt)+) => {{
        let _in = $self.span.enter();
        tracing::$($event)+;
    }};
}

/// Drives one session to its end.
pub struct Driver {
    core: SessionCore,
    /// The session's span (`session.id`, `listener`, `backend`), for its log
    /// lines ([`slog!`]).
    span: tracing::Span,
    backend: Arc<BackendConfig>,
    shared_backend: Arc<Backend>,
    /// Whether this session is counted as held in `shared_backend`.
    held: bool,
    /// Whether it is counted against `max_held_sessions` (in the backend it
    /// was counted in: a reload may swap `shared_backend`).
    holding: Option<Arc<Backend>>,
    /// "Server is up" announcements, listened to while held.
    up_rx: Option<UpReceiver>,
    up_fut: Option<UpFuture>,
    shared: Arc<Shared>,
    listener: ListenerMetrics,
    status: Arc<SessionStatus>,
    connect_started: Option<Instant>,
    replayed: u64,
    client_eof: bool,
    client: Conn,
    client_rbuf: BytesMut,
    /// Bytes to ask for per client read, `READ_MIN..=READ_SIZE`.
    client_read_size: usize,
    server: Option<ServerConn>,
    /// The leg being connected, whether it may send early data (resume
    /// protocol), and the connect.
    connecting: Option<(Generation, bool, ConnectFuture)>,
    /// The core's deadline; freed while there is none.
    timer: LazyTimer,
    timer_at: Option<std::time::Instant>,
    ack_timer: LazyTimer,
    ack_timer_armed: bool,
    mem_timer: LazyTimer,
    mem_timer_armed: bool,
    /// Bytes of this session counted in `shared.buffer_used`.
    mem_counted: u64,
    /// The core's last activity as last published in the status.
    active_published: std::time::Instant,
    /// The task waker last given to the status's bell (a close or an
    /// export request rings it: [`SessionStatus::poll_bell`]).
    bell_task: Option<std::task::Waker>,
    /// A hand-over asked for this session.
    export_req: Option<ExportReply>,
    closing_since: Option<Instant>,
    legs: u64,
    /// A graceful shutdown of the server connection of this leg is under
    /// way (`poll_shutdown`: close_notify on TLS, then FIN).
    server_shutdown: Option<Generation>,
    /// The same for the client connection.
    client_shutdown: bool,
    /// The client connection's write side is shut down (our FIN is sent).
    client_fin_sent: bool,
    /// The time given to the core's inputs: read once per turn of the poll
    /// loop but the second (a clock read per input was a tenth of a round
    /// trip's instructions).
    now: std::time::Instant,
    /// Reads that returned `Pending` in this call of [`Driver::poll`]
    /// (`PENDING_CLIENT`, `PENDING_SERVER`): their wakers are registered,
    /// so later turns of the same call skip them (each poll of a socket that
    /// is not ready registers the waker again, under a lock).
    read_pending: u8,
    /// The server's acks were sampled in this call of [`Driver::poll`]
    /// (`ack = "tcp"`): a full replay buffer does not sample them again.
    acks_sampled: bool,
    /// Host failover, on the active: the session's replication hook (one
    /// empty pointer for a session without).
    tap: Option<Box<crate::failover::tap::Tap>>,
}

impl Driver {
    /// The status this session publishes (through which it can be asked
    /// to close).
    pub fn status(&self) -> Arc<SessionStatus> {
        self.status.clone()
    }

    pub fn new(
        core: SessionCore,
        client: Conn,
        client_addr: String,
        ctx: SessionCtx,
        close: CancellationToken,
    ) -> Driver {
        let now = std::time::Instant::now();
        Driver::with_start(core, client, client_addr, ctx, close, now)
    }

    /// [`Driver::new`] for a session that started at `started`.
    fn with_start(
        core: SessionCore,
        client: Conn,
        client_addr: String,
        ctx: SessionCtx,
        close: CancellationToken,
        started: std::time::Instant,
    ) -> Driver {
        let backend = core.backend().clone();
        let up_rx = Some(ctx.backend.subscribe());
        let status = Arc::new(SessionStatus::new(
            core.id(),
            ctx.listener.shared_name(),
            backend.clone(),
            client_addr,
            started,
        ));
        if let Ok(mut m) = ctx.shared.sessions.lock() {
            m.insert(core.id(), status.clone());
        }
        // Published first: a shutdown that started before this rang every
        // session it found, and this one it finds cancelled.
        if close.is_cancelled() {
            status.close();
        }
        Driver {
            core,
            span: tracing::Span::none(),
            backend,
            shared_backend: ctx.backend,
            held: false,
            holding: None,
            up_rx,
            up_fut: None,
            shared: ctx.shared,
            listener: ctx.listener,
            status,
            connect_started: None,
            replayed: 0,
            client_eof: false,
            client,
            client_rbuf: BytesMut::new(),
            client_read_size: READ_MIN,
            server: None,
            connecting: None,
            timer: LazyTimer(None),
            timer_at: None,
            ack_timer: LazyTimer(None),
            ack_timer_armed: false,
            mem_timer: LazyTimer(None),
            mem_timer_armed: false,
            mem_counted: 0,
            active_published: started,
            bell_task: None,
            export_req: None,
            closing_since: None,
            legs: 0,
            server_shutdown: None,
            client_shutdown: false,
            client_fin_sent: false,
            now: Self::now(),
            read_pending: 0,
            acks_sampled: false,
            tap: None,
        }
    }

    /// The span the session's log lines go in (before it runs).
    pub fn set_span(&mut self, span: tracing::Span) {
        self.span = span;
    }

    /// Host failover, on the active: replicate this session through `tap`
    /// (before it runs).
    pub fn set_tap(&mut self, tap: Box<crate::failover::tap::Tap>) {
        self.tap = Some(tap);
    }

    /// A session taken over from another process: its core (imported), its
    /// client connection and, when a leg was up, that leg's server
    /// connection with the bytes read from it and not yet decoded.
    pub fn restored(
        core: SessionCore,
        client: Conn,
        client_addr: String,
        ctx: SessionCtx,
        close: CancellationToken,
        restored: Restored,
    ) -> Driver {
        let started = std::time::Instant::now()
            .checked_sub(restored.age)
            .unwrap_or_else(std::time::Instant::now);
        let mut d = Driver::with_start(core, client, client_addr, ctx, close, started);
        d.client_eof = restored.client_eof;
        d.legs = restored.legs;
        d.replayed = restored.replayed;
        d.tap = restored.tap;
        if let Some((gen, conn, rbuf, written)) = restored.server {
            d.server = Some(ServerConn {
                gen,
                conn,
                rbuf,
                read_size: READ_MIN,
                decoder: d
                    .core
                    .framed_legs()
                    .then(|| crate::proto::Decoder::new(d.core.max_frame_in())),
                written,
            });
        }
        d
    }

    /// Runs the session until it ends here: closed, or handed over.
    ///
    /// Not an `async fn`: its argument would be stored twice in the future
    /// (as the argument and as the local it is moved into), and a session
    /// task holds this future all its life.
    #[allow(clippy::manual_async_fn)]
    pub fn run(mut self) -> impl Future<Output = Ended> + Send {
        async move { self.drive().await }
    }

    async fn drive(&mut self) -> Ended {
        let reason = loop {
            match std::future::poll_fn(|cx| self.poll(cx)).await {
                Outcome::Closed(reason) => {
                    self.status.mark_closing();
                    break reason;
                }
                Outcome::Export(reply) => {
                    // Boxed: rare, and it would grow every session's future.
                    if let Some(summary) = Box::pin(self.export(reply)).await {
                        return Ended::HandedOver(summary);
                    }
                }
            }
        };
        self.release_memory();
        if self.held {
            self.shared_backend.set_held(false);
        }
        if let Some(b) = self.holding.take() {
            b.stop_holding();
        }
        if let Some(tap) = self.tap.take() {
            tap.closed();
        }
        self.server = None;
        self.connecting = None;
        let client_reset = if reason == CloseReason::ClientError {
            false
        } else {
            // Boxed: its read buffer and timers would otherwise make this
            // future (held by every session task all its life) larger.
            Box::pin(self.linger()).await
        };
        if let Ok(mut m) = self.shared.sessions.lock() {
            m.remove(&self.core.id());
        }
        Ended::Closed(self.summary(reason, client_reset))
    }

    fn summary(&self, reason: CloseReason, client_reset: bool) -> Summary {
        Summary {
            reason,
            replayed: self.replayed,
            client_reset,
            error: self.core.error().map(str::to_string),
            bytes_up: self.core.stream(Dir::Up).read(),
            bytes_down: self.core.stream(Dir::Down).sent(),
            legs: self.legs,
            // The status was made with the driver: its start is ours.
            duration: self.status.started.elapsed(),
        }
    }

    /// Whether the session can be exported now, and if not why. Called at a
    /// quiescent point (see `poll`).
    fn exportable(&self) -> Result<(), &'static str> {
        if self.closing_since.is_some() || self.core.done().is_some() {
            return Err("closing");
        }
        if self.server_shutdown.is_some() || self.client_shutdown {
            return Err("shutting down a connection");
        }
        if SockKind::of(&self.client).is_none() && !matches!(self.client, Conn::Resumable(_)) {
            return Err("client connection is TLS");
        }
        if let Some(s) = &self.server {
            if SockKind::of(&s.conn).is_none() {
                return Err("server connection is TLS");
            }
        }
        Ok(())
    }

    /// Exports the session on `reply` and waits, paused, for the verdict.
    /// Returns the summary when the new process took it; None when it stays.
    async fn export(&mut self, reply: ExportReply) -> Option<HandedOver> {
        // The session stops moving bytes here: its pause starts.
        let paused_at = std::time::Instant::now();
        let (verdict_tx, verdict) = tokio::sync::oneshot::channel();
        // A resumable client's own task parks too (its state is its own).
        let mut parked = None;
        let mut ready = self.exportable();
        if ready.is_ok() {
            if let Conn::Resumable(s) = &self.client {
                match s.park_for_handover().await {
                    Ok(p) => parked = Some(p),
                    Err(why) => ready = Err(why),
                }
            }
        }
        // Host failover: what the standby has of this session, for the new
        // process to replicate it on.
        // A replication task that does not answer (a stalled link) keeps the
        // session here, still replicated.
        let mut replication = None;
        if ready.is_ok() {
            if let Some(tap) = &self.tap {
                match tokio::time::timeout(REPLICATION_EXPORT, tap.export()).await {
                    Ok(Some((records, counters))) => {
                        let mut out = bytes::BytesMut::new();
                        for r in &records {
                            crate::failover::codec::encode(r, &mut out);
                        }
                        replication = Some((out.to_vec(), counters));
                    }
                    // The task ended (or lost the session): it moves as it is.
                    Ok(None) => {}
                    Err(_) => ready = Err("the failover replication did not answer in time"),
                }
            }
        }
        let bundle = ready.and_then(|()| {
            self.bundle(verdict_tx, parked, replication, paused_at)
                .map_err(|_| "cannot duplicate a socket")
        });
        let taken = match bundle {
            Err(why) => {
                let _ = reply.send(Err(why));
                false
            }
            Ok(b) => reply.send(Ok(b)) && verdict.await == Ok(true),
        };
        if let Conn::Resumable(s) = &self.client {
            s.release_handover(taken);
        }
        if !taken {
            // Still ours: a close asked for meanwhile still comes.
            self.status.rearm();
            return None;
        }
        // The new process owns the sockets now: drop our duplicates without
        // a shutdown, and give back what this process counted.
        self.release_memory();
        if self.held {
            self.shared_backend.set_held(false);
        }
        if let Some(b) = self.holding.take() {
            b.stop_holding();
        }
        if let Ok(mut m) = self.shared.sessions.lock() {
            m.remove(&self.core.id());
        }
        if let Some(tap) = self.tap.take() {
            tap.closed();
        }
        self.server = None;
        self.connecting = None;
        Some(HandedOver {
            bytes_up: self.core.stream(Dir::Up).read(),
            bytes_down: self.core.stream(Dir::Down).sent(),
            legs: self.legs,
            duration: self.status.started.elapsed(),
        })
    }

    fn bundle(
        &self,
        verdict: tokio::sync::oneshot::Sender<bool>,
        parked: Option<crate::server::Parked>,
        replication: Option<(Vec<u8>, crate::failover::tap::TapCounters)>,
        paused_at: std::time::Instant,
    ) -> io::Result<Exported> {
        let (client_kind, client, resumable) = match parked {
            Some(p) => {
                let (fd, leg) = match p.leg {
                    Some((fd, crate::server::LegKind::Tcp)) => (Some(fd), Some(SockKind::Tcp)),
                    Some((fd, crate::server::LegKind::Unix)) => (Some(fd), Some(SockKind::Unix)),
                    None => (None, None),
                };
                let r = ExportedResumable {
                    state: p.state,
                    leg,
                };
                (SockKind::Resumable, fd, Some(r))
            }
            None => (
                SockKind::of(&self.client).ok_or(io::ErrorKind::Unsupported)?,
                Some(self.client.fd()?.try_clone_to_owned()?),
                None,
            ),
        };
        let server = match &self.server {
            None => None,
            Some(s) => Some(ExportedLeg {
                gen: s.gen.0,
                fd: s.conn.fd()?.try_clone_to_owned()?,
                kind: SockKind::of(&s.conn).ok_or(io::ErrorKind::Unsupported)?,
                rbuf: bytes::Bytes::copy_from_slice(&s.rbuf),
                written: s.written,
            }),
        };
        let mut snapshot = Vec::new();
        self.core.export(Self::now(), &mut snapshot);
        Ok(Exported {
            id: self.core.id(),
            listener: self.status.listener.to_string(),
            peer: self.status.client.clone(),
            client,
            client_kind,
            resumable,
            replication,
            server,
            snapshot,
            client_eof: self.client_eof,
            age: self.status.started.elapsed(),
            legs: self.legs,
            replayed: self.replayed,
            ack: crate::proxy::ack_kind(&self.backend.ack),
            paused_at,
            verdict,
        })
    }

    /// After the session ended: make sure the client has our FIN, then read
    /// and discard what it still sends until its FIN or `LINGER`, so that
    /// closing does not reset the connection. Returns true if input was still
    /// unread when the socket was dropped (the kernel then sends a reset).
    async fn linger(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        if self.client.is_buffered() {
            // close_notify, then FIN.
            let _ =
                tokio::time::timeout(CLOSE_GRACE, AsyncWriteExt::shutdown(&mut self.client)).await;
        } else if !self.client_fin_sent {
            // (Not again: on a closed connection it only fails, ENOTCONN.)
            let _ = self.client.shutdown_write();
        }
        if self.client_eof {
            return false;
        }
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + LINGER;
        loop {
            match tokio::time::timeout_at(deadline, self.client.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(_)) => continue,
                Err(_) => {
                    return self
                        .client
                        .fd()
                        .and_then(crate::transport::sockopt::inq)
                        .unwrap_or(0)
                        > 0
                }
            }
        }
    }

    /// Bytes the session has read from its client and its servers (the
    /// offsets of both streams), spliced ones included.
    fn bytes_read(&self) -> u64 {
        self.core.stream(Dir::Up).read() + self.core.stream(Dir::Down).read()
    }

    fn now() -> std::time::Instant {
        Instant::now().into_std()
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        self.read_pending = 0;
        self.acks_sampled = false;
        // Bytes read from either socket (spliced ones too) before this call.
        let read_before = self.bytes_read();
        for turn in 0..TURNS_PER_POLL {
            // A wake-up usually takes two turns, the second finding nothing
            // to do: it keeps the first one's time (microseconds old).
            if turn != 1 {
                self.now = Self::now();
            }
            let mut progress = false;
            progress |= self.poll_close(cx);
            progress |= self.run_actions();
            progress |= self.poll_shutdowns(cx);
            if let Some(reason) = self.core.done() {
                self.drain_events();
                if let Some(reply) = self.export_req.take() {
                    let _ = reply.send(Err("closing"));
                }
                return Poll::Ready(Outcome::Closed(reason));
            }
            if self.export_req.is_some() {
                // Quiescent: every action the core asked for is carried out
                // and every event drained, so its state is all there is.
                while self.run_actions() | self.poll_shutdowns(cx) {}
                self.drain_events();
                if self.core.done().is_none() {
                    let reply = self.export_req.take().expect("checked");
                    return Poll::Ready(Outcome::Export(reply));
                }
                continue;
            }
            progress |= self.poll_connect(cx);
            // Reads before writes: what a turn reads is written in the same
            // turn, so a wake-up by a readable socket takes two turns (the
            // second only registers the wakers), not three.
            progress |= self.poll_read_client(cx);
            progress |= self.poll_read_server(cx);
            progress |= self.poll_write_server(cx);
            progress |= self.poll_write_client(cx);
            progress |= self.poll_timers(cx);
            progress |= self.poll_server_up(cx);
            self.drain_events();
            self.account_memory();
            if !progress {
                return Poll::Pending;
            }
            if self.bytes_read() - read_before >= POLL_READ_BUDGET {
                break;
            }
        }
        // More to do: yield behind the sockets. A task woken at once would
        // run again before the runtime next looks at epoll (tokio does that
        // only every 61 polls while tasks are ready), so sessions in bulk
        // kept a light session's readable socket unseen for milliseconds.
        // A deferred wake-up comes after the other ready tasks ran and the
        // runtime polled the I/O driver.
        let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
        Poll::Pending
    }

    /// Shutdown: the first time, ask the core for a graceful end; after
    /// `CLOSE_GRACE`, give up on the client.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closing_since.is_none() && self.export_req.is_none() {
            if self.status.poll_bell(cx, &mut self.bell_task).is_ready() {
                if let Some(reply) = self.status.take_export() {
                    // A hand-over asks for this session, not a close.
                    self.export_req = Some(reply);
                    return true;
                }
                self.status.mark_closing();
                self.closing_since = Some(Instant::now());
                self.core.on_shutdown(self.now);
                return true;
            }
            return false;
        }
        false
    }

    fn run_actions(&mut self) -> bool {
        let mut progress = false;
        while let Some(action) = self.core.poll_action() {
            progress = true;
            match action {
                Action::Connect { gen, server } => {
                    let server = self.adopt_reloaded_backend(server);
                    self.shared_backend.metrics.connect_attempts.inc();
                    self.connect_started = Some(Instant::now());
                    let timeout = self.backend.connect_timeout;
                    let tls = self.backend.tls.as_ref().map(|t| {
                        (
                            t.client_config.0.clone(),
                            t.server_names[server].clone(),
                            self.backend.servers[server].to_string(),
                            self.span.clone(),
                        )
                    });
                    let handshake = move |conn: Conn| async move {
                        let Some((config, name, addr, span)) = tls else {
                            return Ok(conn);
                        };
                        transport::tls::connect(config, name, conn, timeout)
                            .await
                            .inspect_err(|e| {
                                span.in_scope(|| tracing::warn!(server.addr = %addr, error = %e, "tls handshake with the server failed"));
                            })
                    };
                    let early = self.shared_backend.early_data(server);
                    if let Some(conn) = self.shared_backend.take_ready(server) {
                        // The prober's connection: no connect to wait for
                        // (a TLS backend still shakes hands on it).
                        self.connecting = Some((gen, early, Box::pin(handshake(conn))));
                        continue;
                    }
                    let endpoint = self.backend.servers[server].clone();
                    let opts = self.backend.socket;
                    self.connecting = Some((
                        gen,
                        early,
                        Box::pin(async move {
                            let conn = transport::connect(&endpoint, &opts, timeout).await?;
                            handshake(conn).await
                        }),
                    ));
                }
                Action::CloseLeg { gen } => {
                    if self.server.as_ref().is_some_and(|s| s.gen == gen) {
                        self.server = None;
                    }
                    if self.connecting.as_ref().is_some_and(|(g, _, _)| *g == gen) {
                        self.connecting = None;
                    }
                }
                Action::ShutdownServer { gen } => {
                    if self.server.as_ref().is_some_and(|s| s.gen == gen) {
                        self.server_shutdown = Some(gen);
                    }
                }
                Action::ShutdownClient => self.client_shutdown = true,
            }
        }
        progress
    }

    /// Drives pending graceful shutdowns (`poll_shutdown`: immediate on TCP
    /// and Unix, close_notify then FIN on TLS) and reports them when done.
    fn poll_shutdowns(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        if let Some(gen) = self.server_shutdown {
            match self.server.as_mut().filter(|s| s.gen == gen) {
                // The leg is gone: nothing left to shut down.
                None => self.server_shutdown = None,
                Some(s) => match Pin::new(&mut s.conn).poll_shutdown(cx) {
                    Poll::Ready(Ok(())) => {
                        self.server_shutdown = None;
                        self.core.on_server_shutdown(gen, self.now);
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => {
                        self.server_shutdown = None;
                        slog!(self, debug!(error = %e, "server shutdown failed"));
                        self.server_failed(gen);
                        progress = true;
                    }
                    Poll::Pending => {}
                },
            }
        }
        if self.client_shutdown {
            match Pin::new(&mut self.client).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => {
                    self.client_shutdown = false;
                    self.client_fin_sent = true;
                    self.core.on_client_shutdown(self.now);
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    self.client_shutdown = false;
                    slog!(self, debug!(error = %e, "client shutdown failed"));
                    self.core.on_client_error(self.now);
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        progress
    }

    /// A reload replaced the backend: a new leg uses its settings (servers,
    /// timeouts, backoff, socket options) unless its ack mode differs, which a
    /// live session can't change. Returns the server index to use.
    fn adopt_reloaded_backend(&mut self, server: usize) -> usize {
        let Some(next) = self.shared_backend.successor() else {
            return server;
        };
        if next.config.ack != self.backend.ack {
            return server;
        }
        if self.held {
            self.shared_backend.set_held(false);
            next.set_held(true);
        }
        self.up_rx = Some(next.subscribe());
        self.up_fut = None;
        self.shared_backend = next;
        self.backend = self.shared_backend.config.clone();
        self.core.set_backend(self.backend.clone());
        server % self.backend.servers.len().max(1)
    }

    fn poll_connect(&mut self, cx: &mut Context<'_>) -> bool {
        let Some((gen, early, fut)) = self.connecting.as_mut() else {
            return false;
        };
        let (gen, early) = (*gen, *early);
        let Poll::Ready(res) = fut.as_mut().poll(cx) else {
            return false;
        };
        self.connecting = None;
        if let Some(t) = self.connect_started.take() {
            if res.is_ok() {
                self.shared_backend
                    .metrics
                    .connect_duration
                    .observe(t.elapsed().as_secs_f64());
            }
        }
        match res {
            Ok(conn) => {
                self.legs += 1;
                self.read_pending &= !PENDING_SERVER;
                self.server = Some(ServerConn {
                    gen,
                    conn,
                    rbuf: BytesMut::new(),
                    read_size: READ_MIN,
                    decoder: self
                        .core
                        .framed_legs()
                        .then(|| crate::proto::Decoder::new(self.core.max_frame_in())),
                    written: 0,
                });
                self.core.on_connected(gen, early, self.now);
            }
            Err(e) => {
                let reason = match e.kind() {
                    io::ErrorKind::ConnectionRefused => LegFailure::ConnectRefused,
                    io::ErrorKind::TimedOut => LegFailure::ConnectTimeout,
                    _ => LegFailure::ConnectError,
                };
                slog!(self, debug!(leg.gen = gen.0, error = %e, "connect failed"));
                self.core.on_connect_failed(gen, reason, self.now);
            }
        }
        true
    }

    /// The server connection of `gen` failed: take a last ack sample (it
    /// survives a reset), then tell the core.
    fn server_failed(&mut self, gen: Generation) {
        self.sample_acks();
        self.core.on_server_error(gen, self.now);
    }

    fn sample_acks(&mut self) {
        if !matches!(self.backend.ack, AckMode::Tcp) {
            return;
        }
        if let Some(s) = &self.server {
            self.acks_sampled = true;
            if let Ok(acked) = s.conn.bytes_acked(s.written) {
                self.core.on_server_acked(s.gen, acked, self.now);
            }
        }
    }

    fn poll_write_server(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        loop {
            let Some(server) = self.server.as_mut() else {
                return progress;
            };
            if !self.core.has_up_writes() {
                break;
            }
            // Slices borrow the replay buffer (or the link's frames): no
            // `Bytes` clones, no allocation.
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n_iov = self.core.up_io_slices(&mut slices);
            if n_iov == 0 {
                break;
            }
            let gen = server.gen;
            match Pin::new(&mut server.conn).poll_write_vectored(cx, &slices[..n_iov]) {
                Poll::Ready(Ok(n)) => {
                    server.written += n as u64;
                    self.core.on_server_written(gen, n, self.now);
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    slog!(
                        self,
                        debug!(leg.gen = gen.0, error = %e, "server write failed")
                    );
                    self.server_failed(gen);
                    return true;
                }
                Poll::Pending => break,
            }
        }
        if let Some(server) = self.server.as_mut().filter(|s| s.conn.is_buffered()) {
            // TLS buffers records that a write could not send yet.
            if let Poll::Ready(Err(e)) = Pin::new(&mut server.conn).poll_flush(cx) {
                let gen = server.gen;
                slog!(
                    self,
                    debug!(leg.gen = gen.0, error = %e, "server flush failed")
                );
                self.server_failed(gen);
                return true;
            }
        }
        if progress {
            self.sample_acks();
        }
        progress
    }

    fn poll_write_client(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(tap) = &mut self.tap {
            // Replicated before written (and the server's acks after the
            // answers they cover).
            tap.sync(&self.core);
        }
        let mut progress = false;
        loop {
            if self.core.stream(Dir::Down).unsent() == 0 {
                break; // before setting up the slices: the common case
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n_iov = self.core.down_io_slices(&mut slices);
            if n_iov == 0 {
                break;
            }
            match Pin::new(&mut self.client).poll_write_vectored(cx, &slices[..n_iov]) {
                Poll::Ready(Ok(n)) => {
                    self.listener.bytes_down.inc_by(n as u64);
                    self.core.on_client_written(n, self.now);
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    slog!(self, debug!(error = %e, "client write failed"));
                    self.core.on_client_error(self.now);
                    return true;
                }
                Poll::Pending => break,
            }
        }
        if self.client.is_buffered() {
            // TLS buffers records that a write could not send yet.
            if let Poll::Ready(Err(e)) = Pin::new(&mut self.client).poll_flush(cx) {
                slog!(self, debug!(error = %e, "client flush failed"));
                self.core.on_client_error(self.now);
                return true;
            }
        }
        if progress {
            if let (Some(tap), Ok(fd)) = (&mut self.tap, self.client.fd()) {
                tap.client_written(fd, self.core.stream(Dir::Down).sent());
            }
        }
        progress
    }

    /// Host failover, active: false (and `cx` woken later) while the
    /// replication link is behind by its whole backlog: nothing more is read
    /// until the standby catches up.
    fn replication_room(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.tap {
            Some(tap) => tap.poll_room(cx).is_ready(),
            None => true,
        }
    }

    fn poll_read_client(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.core.want_read_client()
            && matches!(self.backend.ack, AckMode::Tcp)
            && !self.acks_sampled
            && self.core.stream(Dir::Up).in_flight() > 0
        {
            // `ack = "tcp"` with the replay buffer full: what the server's
            // host acknowledged since the last sample may free it (else the
            // client waits for the next timed sample).
            self.sample_acks();
        }
        if !self.core.want_read_client() || !self.replication_room(cx) {
            return false;
        }
        if self.shared.buffer_used.load(Ordering::Relaxed) >= self.shared.buffer_limit() {
            // Over the global buffer memory: look again shortly. The first
            // session to find it full says so (once per episode).
            if !self.shared.memory_full.swap(true, Ordering::Relaxed) {
                self.listener.all().buffer_memory_full();
                slog!(self, warn!(
                    limit = self.shared.buffer_limit(),
                    "[limits] buffer_memory reached: sessions stop reading their clients until servers catch up"
                ));
            }
            if !self.mem_timer_armed {
                self.mem_timer.reset(Instant::now() + MEMORY_RETRY);
                self.mem_timer_armed = true;
            }
            return false;
        }
        if self.shared.memory_full.load(Ordering::Relaxed)
            && self.shared.memory_full.swap(false, Ordering::Relaxed)
        {
            slog!(self, info!("buffer_memory available again"));
        }
        if self.read_pending & PENDING_CLIENT != 0 {
            return false;
        }
        if let Some(progress) = self.poll_splice_up(cx) {
            return progress;
        }
        let read = poll_read_adaptive(
            &mut self.client,
            cx,
            &mut self.client_rbuf,
            &mut self.client_read_size,
        );
        match read {
            Poll::Ready(Ok(0)) => {
                self.client_eof = true;
                self.core.on_client_eof(self.now);
            }
            Poll::Ready(Ok(_)) => {
                let chunk = take_read(&mut self.client_rbuf, self.client_read_size);
                self.listener.bytes_up.inc_by(chunk.len() as u64);
                if let Some(tap) = &self.tap {
                    // Before the server (or the client's next ACK) sees them.
                    tap.read(self.core.stream(Dir::Up).read(), &chunk);
                }
                self.core.on_client_data(chunk, self.now);
            }
            Poll::Ready(Err(e)) => {
                slog!(self, debug!(error = %e, "client read failed"));
                self.core.on_client_error(self.now);
            }
            Poll::Pending => {
                self.read_pending |= PENDING_CLIENT;
                return false;
            }
        }
        true
    }

    fn poll_read_server(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.core.want_read_server() || !self.replication_room(cx) {
            return false;
        }
        if self.read_pending & PENDING_SERVER != 0 {
            return false;
        }
        let Some(server) = self.server.as_mut() else {
            return false;
        };
        let gen = server.gen;
        if let Some(progress) = self.poll_splice_down(cx, gen) {
            return progress;
        }
        let Some(server) = self.server.as_mut() else {
            return false;
        };
        let wanted = match &server.decoder {
            // Resume protocol in bulk: reads end on frame boundaries.
            Some(d) if server.read_size == READ_SIZE => Some(d.wanted(&server.rbuf)),
            _ => None,
        };
        let read = match wanted {
            Some(wanted) => poll_read_frames(
                &mut server.conn,
                cx,
                &mut server.rbuf,
                wanted,
                &mut server.read_size,
            ),
            _ => poll_read_adaptive(
                &mut server.conn,
                cx,
                &mut server.rbuf,
                &mut server.read_size,
            ),
        };
        match read {
            Poll::Ready(Ok(0)) => {
                self.sample_acks();
                self.core.on_server_eof(gen, self.now);
            }
            Poll::Ready(Ok(_)) => {
                if let Some(decoder) = &server.decoder {
                    // Resume protocol: whole frames; DATA payloads are split
                    // off the read buffer without copying.
                    loop {
                        match decoder.decode(&mut server.rbuf) {
                            Ok(Some(frame)) => self.core.on_server_frame(gen, frame, self.now),
                            Ok(None) => break,
                            Err(e) => {
                                slog!(
                                    self,
                                    warn!(leg.gen = gen.0, error = %e, "server broke the resume protocol")
                                );
                                self.core.on_server_protocol_error(gen, &e, self.now);
                                break;
                            }
                        }
                        if self.core.leg_gen() != Some(gen) {
                            break;
                        }
                    }
                } else {
                    let chunk = take_read(&mut server.rbuf, server.read_size);
                    self.core.on_server_data(gen, chunk, self.now);
                }
                if let Some(server) = self.server.as_mut() {
                    release_idle(&mut server.rbuf, server.read_size);
                }
            }
            Poll::Ready(Err(e)) => {
                slog!(
                    self,
                    debug!(leg.gen = gen.0, error = %e, "server read failed")
                );
                self.server_failed(gen);
            }
            Poll::Pending => {
                self.read_pending |= PENDING_SERVER;
                return false;
            }
        }
        true
    }

    /// Whether a direction in bulk goes by splice(2): `ack = "none"`, both
    /// connections plain TCP, no failover tap (it replicates the bytes, which
    /// a splice never brings into user space), the core agreeing (see
    /// [`SessionCore::can_pass_through`]) and this thread's pipe at hand.
    fn splice_ok(&self, dir: Dir, read_size: usize) -> bool {
        read_size == READ_SIZE
            && self.backend.splice
            && self.tap.is_none()
            && matches!(self.client, Conn::Tcp(_))
            && self
                .server
                .as_ref()
                .is_some_and(|s| matches!(s.conn, Conn::Tcp(_)) && s.decoder.is_none())
            && self.core.can_pass_through(dir)
            && transport::splice::ready()
    }

    /// The most one splice moves: what the pipe holds, but no more than the
    /// session's `buffer_limit` (what the destination does not take is
    /// held, like a read).
    fn splice_max(&self) -> usize {
        let limit = usize::try_from(self.backend.buffer_limit).unwrap_or(usize::MAX);
        transport::splice::PIPE_SIZE.min(limit).max(READ_MIN)
    }

    /// Client to server by splice, when [`Driver::splice_ok`]: `None` to read
    /// the usual way instead, else whether anything happened.
    fn poll_splice_up(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        if !self.splice_ok(Dir::Up, self.client_read_size) {
            return None;
        }
        let (Conn::Tcp(client), Some(server)) = (&self.client, &self.server) else {
            return None;
        };
        let Conn::Tcp(to) = &server.conn else {
            return None;
        };
        let gen = server.gen;
        let r = match transport::splice::poll_relay(client, to, self.splice_max(), cx) {
            Poll::Pending => return Some(false),
            Poll::Ready(Err(e)) => {
                slog!(self, debug!(error = %e, "client read failed"));
                self.core.on_client_error(self.now);
                return Some(true);
            }
            Poll::Ready(Ok(r)) => r,
        };
        if r.read == 0 {
            self.client_eof = true;
            self.core.on_client_eof(self.now);
            return Some(true);
        }
        // An idle session after this holds no read buffer.
        if self.client_rbuf.is_empty() {
            self.client_rbuf = BytesMut::new();
        }
        adapt_read_size(&mut self.client_read_size, r.read, READ_SIZE);
        self.listener.bytes_up.inc_by(r.read as u64);
        if let Some(s) = self.server.as_mut() {
            s.written += r.written as u64;
        }
        self.core.on_passed_through(Dir::Up, r.written, self.now);
        if let Some(rest) = r.rest {
            self.core.on_client_data(rest, self.now);
        }
        if let Some(e) = r.write_error {
            slog!(
                self,
                debug!(leg.gen = gen.0, error = %e, "server write failed")
            );
            self.server_failed(gen);
        }
        Some(true)
    }

    /// Server to client by splice, the same way.
    fn poll_splice_down(&mut self, cx: &mut Context<'_>, gen: Generation) -> Option<bool> {
        let read_size = self.server.as_ref()?.read_size;
        if !self.splice_ok(Dir::Down, read_size) {
            return None;
        }
        let (Conn::Tcp(to), Some(server)) = (&self.client, &self.server) else {
            return None;
        };
        let Conn::Tcp(from) = &server.conn else {
            return None;
        };
        let r = match transport::splice::poll_relay(from, to, self.splice_max(), cx) {
            Poll::Pending => return Some(false),
            Poll::Ready(Err(e)) => {
                slog!(
                    self,
                    debug!(leg.gen = gen.0, error = %e, "server read failed")
                );
                self.server_failed(gen);
                return Some(true);
            }
            Poll::Ready(Ok(r)) => r,
        };
        if r.read == 0 {
            self.sample_acks();
            self.core.on_server_eof(gen, self.now);
            return Some(true);
        }
        if let Some(s) = self.server.as_mut() {
            if s.rbuf.is_empty() {
                s.rbuf = BytesMut::new();
            }
            adapt_read_size(&mut s.read_size, r.read, READ_SIZE);
        }
        self.listener.bytes_down.inc_by(r.written as u64);
        self.core.on_passed_through(Dir::Down, r.written, self.now);
        if let Some(rest) = r.rest {
            self.core.on_server_data(gen, rest, self.now);
        }
        if let Some(e) = r.write_error {
            slog!(self, debug!(error = %e, "client write failed"));
            self.core.on_client_error(self.now);
        }
        Some(true)
    }

    fn poll_timers(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        // The core's deadline (hold timeout, reconnect backoff), and the hard
        // end of a graceful close.
        let mut deadline = self.core.deadline();
        if let Some(since) = self.closing_since {
            let hard = (since + CLOSE_GRACE).into_std();
            deadline = Some(deadline.map_or(hard, |d| d.min(hard)));
        }
        if deadline != self.timer_at {
            self.timer_at = deadline;
            match deadline {
                Some(d) => self.timer.reset(Instant::from_std(d)),
                // An idle session keeps no timer.
                None => self.timer.0 = None,
            }
        }
        if self.timer_at.is_some() && self.timer.poll(cx).is_ready() {
            self.timer_at = None;
            if self
                .closing_since
                .is_some_and(|s| Instant::now() >= s + CLOSE_GRACE)
            {
                // The client would not take its last bytes in time.
                self.core.on_client_error(self.now);
            } else {
                self.core.on_timeout(self.now);
            }
            progress = true;
        }
        // `ack = "tcp"`: sample while bytes are in flight.
        if matches!(self.backend.ack, AckMode::Tcp)
            && self.server.is_some()
            && self.core.stream(Dir::Up).in_flight() > 0
        {
            if !self.ack_timer_armed {
                self.ack_timer.reset(Instant::now() + ACK_SAMPLE_INTERVAL);
                self.ack_timer_armed = true;
            }
            if self.ack_timer.poll(cx).is_ready() {
                self.ack_timer_armed = false;
                self.sample_acks();
                progress = true;
            }
        } else {
            self.ack_timer_armed = false;
        }
        if self.mem_timer_armed && self.mem_timer.poll(cx).is_ready() {
            self.mem_timer_armed = false;
            progress = true;
        }
        progress
    }

    /// While held, listens for "server is up" from the backend's prober and
    /// other sessions; keeps the backend's count of held sessions.
    fn poll_server_up(&mut self, cx: &mut Context<'_>) -> bool {
        // `max_held_sessions`: a session that lost its server holds only if
        // the backend has room; otherwise it ends (`too_many_held`).
        let holding = self.core.is_holding();
        if holding && self.holding.is_none() {
            if self.shared_backend.try_start_holding() {
                self.holding = Some(self.shared_backend.clone());
            } else {
                slog!(
                    self,
                    debug!("max_held_sessions reached: closing the session instead of holding it")
                );
                self.core.on_hold_refused(self.now);
                return true;
            }
        } else if !holding {
            if let Some(b) = self.holding.take() {
                b.stop_holding();
            }
        }
        let held = self.core.is_held();
        if held != self.held {
            self.shared_backend.set_held(held);
            self.held = held;
        }
        if !held {
            if self.up_fut.take().is_some() {
                // A session with a leg keeps no listening future (it holds
                // the receiver): listen afresh when held again.
                self.up_rx = Some(self.shared_backend.subscribe());
            }
            return false;
        }
        if !holding {
            // A first connect that has not failed: an announcement could
            // only speed up a reconnect that is not waiting (the watch
            // keeps it for later), so don't set up the future for it.
            return false;
        }
        if self.up_fut.is_none() {
            let Some(mut rx) = self.up_rx.take() else {
                return false;
            };
            self.up_fut = Some(Box::pin(async move {
                let server = match rx.changed().await {
                    Ok(()) => Some(rx.borrow_and_update().1),
                    Err(_) => None,
                };
                (rx, server)
            }));
        }
        let fut = self.up_fut.as_mut().expect("armed above");
        let Poll::Ready((rx, server)) = fut.as_mut().poll(cx) else {
            return false;
        };
        self.up_fut = None;
        let Some(server) = server else {
            return false; // the backend is gone: no more announcements
        };
        self.up_rx = Some(rx);
        self.core.on_server_up(server, self.now);
        true
    }

    fn account_memory(&mut self) {
        let now = self.core.buffered_bytes();
        self.status.update(&self.core, self.legs > 0);
        let active = self.core.last_activity();
        if active != self.active_published {
            self.active_published = active;
            self.status.set_active(active);
        }
        if now == self.mem_counted {
            // The gauges are shared by every session: no atomic write
            // (and no contended cache line) when nothing changed.
            return;
        }
        self.shared_backend
            .metrics
            .replay_buffer
            .add(now as i64 - self.mem_counted as i64);
        if now > self.mem_counted {
            self.shared
                .buffer_used
                .fetch_add(now - self.mem_counted, Ordering::Relaxed);
        } else if now < self.mem_counted {
            self.shared
                .buffer_used
                .fetch_sub(self.mem_counted - now, Ordering::Relaxed);
        }
        self.mem_counted = now;
    }

    fn release_memory(&mut self) {
        self.shared_backend
            .metrics
            .replay_buffer
            .sub(self.mem_counted as i64);
        self.shared
            .buffer_used
            .fetch_sub(self.mem_counted, Ordering::Relaxed);
        self.mem_counted = 0;
    }

    fn drain_events(&mut self) {
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::LegUp {
                    gen,
                    server,
                    resumed,
                    replay,
                    held,
                } => {
                    let addr = self
                        .backend
                        .servers
                        .get(server)
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    let up = self.core.stream(Dir::Up);
                    if resumed {
                        let m = &self.shared_backend.metrics;
                        m.resumes.inc();
                        m.replayed_up.inc_by(replay);
                        self.replayed += replay;
                        if let Some(h) = held {
                            m.hold_duration.observe(h.as_secs_f64());
                        }
                        slog!(
                            self,
                            info!(
                                leg.gen = gen.0,
                                server.addr = %addr,
                                up.acked = up.acked(),
                                up.read = up.read(),
                                down.sent = self.core.stream(Dir::Down).sent(),
                                replay_bytes = replay,
                                held_ms = held.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
                                "leg resumed"
                            )
                        );
                    } else {
                        slog!(self, debug!(leg.gen = gen.0, server.addr = %addr, "leg up"));
                    }
                }
                Event::EarlyData { bytes } => {
                    self.shared_backend.metrics.early_data.inc_by(bytes);
                    slog!(self, debug!(bytes, "early data sent after the HELLO"));
                }
                Event::Welcomed { server, version } => {
                    self.shared_backend.welcomed(server, version);
                }
                Event::LegFailed {
                    gen,
                    server,
                    reason,
                } => {
                    let addr = self
                        .backend
                        .servers
                        .get(server)
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    let m = &self.shared_backend.metrics;
                    match reason {
                        LegFailure::ConnectRefused
                        | LegFailure::ConnectTimeout
                        | LegFailure::ConnectError => m.connect_failed(reason.as_str()),
                        _ => m.leg_failed(reason.as_str()),
                    }
                    slog!(
                        self,
                        debug!(
                            leg.gen = gen.0,
                            server.addr = %addr,
                            reason = reason.as_str(),
                            "leg failed"
                        )
                    );
                }
                Event::HoldStarted => slog!(self, debug!("holding")),
                Event::Closed { .. } => {}
            }
        }
    }
}

/// A timer allocated when first armed, so that a session that never needs
/// it (or, for the core's deadline, does not need it now) holds no `Sleep`.
struct LazyTimer(Option<Pin<Box<Sleep>>>);

impl LazyTimer {
    fn reset(&mut self, at: Instant) {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.0 = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Pending while never armed.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// Reads from `conn` into `buf`, adapting `size` (see `READ_SIZE`).
///
/// At the smallest size, with no spare room in `buf`, the read goes to a
/// scratch array on the stack and only the bytes read are copied into
/// `buf`: a session waiting for input holds no read buffer, and a small
/// message costs one allocation of its own size. Larger reads go straight
/// into `buf`, which is reused in place once its chunks are released.
fn poll_read_adaptive(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    size: &mut usize,
) -> Poll<io::Result<usize>> {
    if *size == READ_MIN && buf.capacity() == buf.len() {
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_MIN];
        let mut rb = tokio::io::ReadBuf::uninit(&mut scratch);
        std::task::ready!(tokio::io::AsyncRead::poll_read(Pin::new(conn), cx, &mut rb))?;
        let n = rb.filled().len();
        buf.extend_from_slice(rb.filled());
        adapt_read_size(size, n, READ_MIN);
        return Poll::Ready(Ok(n));
    }
    if buf.capacity() - buf.len() < *size / 4 {
        buf.reserve(*size);
    }
    let spare = buf.capacity() - buf.len();
    let n = std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(conn), cx, buf))?;
    adapt_read_size(size, n, spare);
    Poll::Ready(Ok(n))
}

/// Reads at most `wanted` bytes (the rest of the frame being read and the
/// next frame's header) into `buf`, reserving room for all of them first:
/// the read ends on a frame boundary, so when the next frame's header asks
/// the decoder for room, at most that header is copied, never a partial
/// 64 KiB frame.
fn poll_read_frames(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    wanted: usize,
    size: &mut usize,
) -> Poll<io::Result<usize>> {
    use bytes::BufMut;
    if buf.capacity() - buf.len() < wanted {
        buf.reserve(wanted);
    }
    let mut limited = (&mut *buf).limit(wanted);
    let n = std::task::ready!(tokio_util::io::poll_read_buf(
        Pin::new(conn),
        cx,
        &mut limited
    ))?;
    adapt_frame_read_size(size, n, wanted);
    Poll::Ready(Ok(n))
}

/// [`adapt_read_size`] after a read of at most `wanted` bytes that ends on
/// a frame boundary: a read of the last few bytes of a frame says nothing
/// about the traffic, so it does not shrink the read size.
pub(crate) fn adapt_frame_read_size(size: &mut usize, n: usize, wanted: usize) {
    if wanted >= READ_MIN {
        adapt_read_size(size, n, wanted.min(READ_SIZE));
    }
}

/// Grows the read size while reads fill the space they were given (bulk),
/// shrinks it while they return little (requests, responses, idle).
pub(crate) fn adapt_read_size(size: &mut usize, n: usize, spare: usize) {
    if n >= spare {
        *size = (*size * 2).min(READ_SIZE);
    } else if n < *size / 8 {
        *size = (*size / 2).max(READ_MIN);
    }
}

/// Everything read into `buf`, as one chunk. At the smallest read size the
/// buffer is not kept afterwards (see [`release_idle`]), so the chunk takes
/// its allocation whole: `split` would first allocate a header shared by
/// the two halves, only for the empty one to be dropped (an allocation and
/// a free per small message).
fn take_read(buf: &mut BytesMut, size: usize) -> bytes::Bytes {
    if size == READ_MIN {
        std::mem::take(buf).freeze()
    } else {
        buf.split().freeze()
    }
}

/// Drops an empty read buffer at the smallest read size, so it keeps no
/// allocation alive (the chunks split off it keep theirs while they live).
fn release_idle(buf: &mut BytesMut, size: usize) {
    if size == READ_MIN && buf.is_empty() {
        *buf = BytesMut::new();
    }
}
