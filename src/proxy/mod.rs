//! The running proxy: binds listeners, accepts clients, starts one session
//! task per client, and drains on shutdown.
//!
//! The task tree is one [`TaskTracker`] for sessions and one
//! [`CancellationToken`] that closes them; accept loops never await a server
//! connect (sessions connect in their own tasks) and never end on an accept
//! error. It owns no per-session logic: that is `session`.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Endpoint, ListenerConfig, ListenerProtocol};
use crate::lifecycle::{Phase, Shutdown};
use crate::metrics::{Metrics, REJECT_THREAD_MOVE, REJECT_TLS_HANDSHAKE, REJECT_TLS_TIMEOUT};
use crate::session::driver::{Driver, Ended, SessionCtx, Shared};
use crate::session::{SessionCore, SessionId};
use crate::transport::{self, BindError, Conn, Listener};

pub mod access;
pub mod backend;
pub mod limits;
pub mod workers;

use access::AccessLogger;
use limits::{Admission, FdBudget, ListenerLimits, Slot};

pub use backend::Backend;

/// How long an accept loop pauses when the process is out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long sessions get to close after the drain timeout or a stop.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Every listener of a config, bound.
#[derive(Debug)]
pub struct Bound {
    listeners: Vec<Listener>,
    admin: Option<tokio::net::TcpListener>,
}

impl Bound {
    /// The real address of each listener, in config order (useful with port 0).
    pub fn local_endpoints(&self) -> Vec<Endpoint> {
        self.listeners.iter().map(|l| l.local_endpoint()).collect()
    }

    /// The admin endpoint's real address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Binds one listener, plain or resume-protocol.
async fn bind_listener(l: &ListenerConfig) -> Result<Listener, BindError> {
    match &l.protocol {
        crate::config::ListenerProtocol::Tcp => Listener::bind(&l.listen, &l.socket).await,
        crate::config::ListenerProtocol::Resume(settings) => {
            Listener::bind_resume(&l.listen, settings, l.tls.as_ref()).await
        }
    }
}

/// Binds every listener of `config` (all or nothing).
pub async fn bind(config: &Config) -> Result<Bound, BindError> {
    bind_with(config, Inherited::default()).await
}

/// Listening sockets received from the previous process in a hand-over.
#[derive(Debug, Default)]
pub struct Inherited {
    /// By listener name.
    pub listeners: HashMap<String, std::os::fd::OwnedFd>,
    pub admin: Option<std::os::fd::OwnedFd>,
}

/// Binds every listener of `config`, taking a listener's socket from
/// `inherited` when one of that name was handed over (a listener only the
/// new config has is bound fresh; inherited sockets no listener names are
/// closed here).
pub async fn bind_with(config: &Config, mut inherited: Inherited) -> Result<Bound, BindError> {
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let listener = match inherited.listeners.remove(&l.name) {
            Some(fd) => {
                tracing::info!(listener = %l.name, "listener taken over");
                match &l.protocol {
                    crate::config::ListenerProtocol::Tcp => Listener::adopt(&l.name, fd)?,
                    crate::config::ListenerProtocol::Resume(settings) => {
                        Listener::adopt_resume(&l.name, &l.listen, fd, settings, l.tls.as_ref())?
                    }
                }
            }
            None => bind_listener(l).await?,
        };
        listeners.push(listener);
    }
    for name in inherited.listeners.keys() {
        tracing::info!(listener = %name, "handed-over listener not in the new config: closed");
    }
    let admin = match &config.admin {
        Some(_) if inherited.admin.is_some() => {
            let fd = inherited.admin.take().expect("checked");
            let std_listener = std::net::TcpListener::from(fd);
            let io_err = |source| BindError::Io {
                endpoint: "admin (handed over)".into(),
                source,
            };
            std_listener.set_nonblocking(true).map_err(io_err)?;
            Some(tokio::net::TcpListener::from_std(std_listener).map_err(io_err)?)
        }
        Some(a) => match &a.listen {
            Endpoint::Tcp(addr) => Some(
                tokio::net::TcpListener::bind(addr.as_str())
                    .await
                    .map_err(|source| BindError::Io {
                        endpoint: format!("admin {addr}"),
                        source,
                    })?,
            ),
            // validate allows only host:port here.
            Endpoint::Unix(_) | Endpoint::Systemd(_) => None,
        },
        None => None,
    };
    Ok(Bound { listeners, admin })
}

/// Runs the proxy until `shutdown` says stop and every session has ended.
/// Publishes phases on `phase`.
pub async fn run(
    config: Config,
    bound: Bound,
    shutdown: Shutdown,
    phase: watch::Sender<Phase>,
) -> io::Result<()> {
    let (_keep, reloads) = mpsc::channel(1);
    run_with(config, bound, shutdown, phase, Runtime::default(), reloads).await
}

/// What a running proxy shares with the admin endpoint and embedders.
#[derive(Clone)]
pub struct Runtime {
    pub metrics: Metrics,
    pub shared: Arc<Shared>,
    /// `[runtime] scheduler = "per-thread"`: the session threads beside
    /// the one the proxy runs on (None: sessions run on the proxy's runtime).
    pub workers: Option<Arc<workers::Workers>>,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            metrics: Metrics::new(),
            shared: Arc::new(Shared::new(u64::MAX)),
            workers: None,
        }
    }
}

impl Runtime {
    /// A runtime for `config` (its global buffer memory limit).
    pub fn for_config(config: &Config) -> Runtime {
        Runtime {
            metrics: Metrics::new(),
            shared: Arc::new(Shared::new(config.limits.buffer_memory)),
            workers: None,
        }
    }
}

/// A configuration reload for a running proxy: the new, validated config,
/// and where to say whether it was applied.
pub struct ReloadRequest {
    pub config: Config,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// What a hand-over asks of the running proxy.
pub enum Control {
    /// The listening sockets and the session registry (old process).
    Export { reply: oneshot::Sender<Export> },
    /// Stop accepting: the new process accepts on the same sockets now
    /// (old process, once the new one confirmed its listeners).
    StopAccepting { reply: oneshot::Sender<()> },
    /// Accept again: the hand-over failed after `StopAccepting`.
    ResumeAccepting,
    /// What the new process needs to take sessions over ([`Importer`]),
    /// used from the hand-over's own thread, off the runtime.
    Importer { reply: oneshot::Sender<Importer> },
    /// Host failover, standby: the client connections just taken over;
    /// each runs as a session rebuilt at its replicated offsets.
    Adopt {
        taken: Vec<crate::failover::takeover::Taken>,
    },
}

/// The listening sockets of a running proxy, for a hand-over. Holding it
/// keeps them open; nothing stops accepting.
pub struct Export {
    /// By name, in config order.
    pub listeners: Vec<(String, Arc<Listener>)>,
    /// A duplicate of the admin endpoint's socket.
    pub admin: Option<std::os::fd::OwnedFd>,
    /// Every open session, to export one by one.
    pub shared: Arc<Shared>,
}

/// The ack mode of a backend as a hand-over compares it: a session moves
/// only to a backend that keeps the same mode and framing.
pub fn ack_kind(ack: &crate::config::AckMode) -> String {
    use crate::config::AckMode;
    match ack {
        AckMode::None => "none".into(),
        AckMode::Tcp => "tcp".into(),
        AckMode::Response(f) => format!("response {f:?}"),
        AckMode::Resume(_) => "resume".into(),
    }
}

/// [`run`] with a given [`Runtime`] (metrics registry and session registry),
/// so the admin endpoint and tests can see into it, and a channel of
/// reloads (SIGHUP in the binary).
pub async fn run_with(
    config: Config,
    bound: Bound,
    shutdown: Shutdown,
    phase: watch::Sender<Phase>,
    rt: Runtime,
    reloads: mpsc::Receiver<ReloadRequest>,
) -> io::Result<()> {
    let (_keep, control) = mpsc::channel(1);
    run_full(config, bound, shutdown, phase, rt, reloads, control).await
}

/// [`run_with`] that also answers hand-over requests for its listening
/// sockets (`exports`; the binary's `[handover]` socket).
pub async fn run_full(
    config: Config,
    bound: Bound,
    shutdown: Shutdown,
    phase: watch::Sender<Phase>,
    rt: Runtime,
    mut reloads: mpsc::Receiver<ReloadRequest>,
    mut control: mpsc::Receiver<Control>,
) -> io::Result<()> {
    let shared = if rt.shared.buffer_limit() == config.limits.buffer_memory {
        rt.shared.clone()
    } else {
        Arc::new(Shared::new(config.limits.buffer_memory))
    };
    rt.metrics
        .set_buffer_memory_limit(config.limits.buffer_memory);
    let stop_admin = CancellationToken::new();
    let mut admin_fd = None;
    if let Some(admin) = bound.admin {
        use std::os::fd::AsFd;
        admin_fd = admin.as_fd().try_clone_to_owned().ok();
        tracing::info!(addr = %admin.local_addr()?, "admin endpoint listening");
        let rt = Runtime {
            metrics: rt.metrics.clone(),
            shared: shared.clone(),
            workers: rt.workers.clone(),
        };
        tokio::spawn(crate::admin::serve(
            admin,
            rt,
            phase.subscribe(),
            stop_admin.clone(),
        ));
    }
    // Host failover, active role: one replication task for the process.
    let stop_replication = CancellationToken::new();
    let replicator = match &config.failover {
        Some(crate::config::FailoverConfig {
            role: crate::config::FailoverRole::Active { peer },
            key,
            heartbeat_interval,
            ..
        }) => {
            tracing::info!(peer = %peer, "failover: active, replicating sessions to the standby");
            let (r, _task) = crate::failover::active::Replicator::spawn(
                peer.clone(),
                key.clone(),
                *heartbeat_interval,
                stop_replication.clone(),
            );
            Some(r)
        }
        _ => None,
    };
    let mut proxy = Running {
        metrics: rt.metrics.clone(),
        shared,
        sessions: TaskTracker::new(),
        close_sessions: CancellationToken::new(),
        open: Arc::new(AtomicUsize::new(0)),
        fds: Arc::new(FdBudget::for_process(config.limits.fd_reserve)),
        backends: HashMap::new(),
        listeners: Vec::new(),
        access: open_access_log(&config)?,
        config: config.clone(),
        replicator,
        workers: rt.workers.clone(),
    };
    let backends = proxy.backends_for(&config);
    for (listener, cfg) in bound.listeners.into_iter().zip(config.listeners.iter()) {
        proxy.start_listener(listener, cfg, &config, &backends);
    }
    proxy.backends = backends;
    tracing::info!(
        listeners = config.listeners.len(),
        backends = config.backends.len(),
        pid = std::process::id(),
        "holdfast running"
    );
    phase.send_replace(Phase::Running);

    loop {
        tokio::select! {
            _ = shutdown.drain.cancelled() => break,
            _ = shutdown.stop.cancelled() => break,
            Some(req) = control.recv() => match req {
                Control::Export { reply } => {
                    let export = Export {
                        listeners: proxy
                            .listeners
                            .iter()
                            .map(|l| (l.name.clone(), l.listener.clone()))
                            .collect(),
                        admin: admin_fd.as_ref().and_then(|fd| fd.try_clone().ok()),
                        shared: proxy.shared.clone(),
                    };
                    let _ = reply.send(export);
                }
                Control::StopAccepting { reply } => {
                    proxy.stop_accepting().await;
                    let _ = reply.send(());
                }
                Control::ResumeAccepting => proxy.resume_accepting(),
                Control::Importer { reply } => {
                    let _ = reply.send(proxy.importer());
                }
                Control::Adopt { taken } => {
                    for t in taken {
                        let id = t.session.id();
                        if let Err(e) = proxy.adopt(t) {
                            tracing::warn!(session.id = %id, error = %e, "failover: session closed: it cannot be resumed here");
                        }
                    }
                }
            },
            Some(req) = reloads.recv() => {
                let res = proxy.reload(req.config).await;
                match &res {
                    Ok(()) => {
                        proxy.metrics.reload("ok");
                        tracing::info!(
                            listeners = proxy.config.listeners.len(),
                            backends = proxy.config.backends.len(),
                            "configuration reloaded"
                        );
                    }
                    Err(e) => {
                        proxy.metrics.reload("error");
                        tracing::error!(error = %e, "reload failed: keeping the running configuration");
                    }
                }
                let _ = req.done.send(res);
            }
        }
    }
    let open = proxy.open.clone();
    for l in proxy.listeners.drain(..) {
        l.stop.cancel();
        for join in l.joins {
            let _ = join.await;
        }
    }
    let sessions = proxy.sessions.clone();
    sessions.close();
    if !shutdown.stop.is_cancelled() {
        phase.send_replace(Phase::Draining);
        let drain = proxy.config.lifecycle.drain_timeout;
        tracing::info!(
            sessions = open.load(Ordering::Relaxed),
            drain_timeout_ms = drain.as_millis() as u64,
            "draining"
        );
        tokio::select! {
            _ = sessions.wait() => {}
            _ = tokio::time::sleep(drain) => {
                tracing::info!(sessions = open.load(Ordering::Relaxed), "drain timeout: closing sessions");
            }
            _ = shutdown.stop.cancelled() => {}
        }
    }
    proxy.close_sessions.cancel();
    proxy.shared.close_sessions();
    if tokio::time::timeout(STOP_GRACE, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = open.load(Ordering::Relaxed),
            "sessions still open after the stop grace; exiting anyway"
        );
    }
    for b in proxy.backends.values() {
        b.stop_probe();
    }
    stop_admin.cancel();
    stop_replication.cancel();
    phase.send_replace(Phase::Stopped);
    tracing::info!(pid = std::process::id(), "holdfast stopped");
    Ok(())
}

/// The state of a running proxy that a reload changes.
struct Running {
    metrics: Metrics,
    shared: Arc<Shared>,
    sessions: TaskTracker,
    close_sessions: CancellationToken,
    open: Arc<AtomicUsize>,
    /// `RLIMIT_NOFILE` and `[limits] fd_reserve`.
    fds: Arc<FdBudget>,
    /// By backend name.
    backends: HashMap<String, Arc<Backend>>,
    listeners: Vec<RunningListener>,
    access: Option<Arc<AccessLogger>>,
    config: Config,
    /// Host failover, active role: the replication task's handle.
    replicator: Option<crate::failover::active::Replicator>,
    /// The session threads beside this one, when sessions run per thread.
    workers: Option<Arc<workers::Workers>>,
}

fn open_access_log(config: &Config) -> io::Result<Option<Arc<AccessLogger>>> {
    match &config.log.access {
        Some(target) => AccessLogger::open(target)
            .map(|l| Some(Arc::new(l)))
            .map_err(|e| io::Error::new(e.kind(), format!("access log: {e}"))),
        None => Ok(None),
    }
}

/// Takes sessions over in the new process of a hand-over, from a plain
/// thread: the listeners' current settings, the backends and the session
/// registry, and the runtime the sessions run on. Taking a session over
/// (decoding its state, wrapping its sockets) does not wait for the
/// runtime to schedule anything, so the old process's pause does not grow
/// with how busy this process already is.
pub struct Importer {
    listeners: Vec<(String, watch::Receiver<Arc<AcceptCtx>>, Arc<Listener>)>,
    backends: HashMap<String, Arc<Backend>>,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    /// With sessions per thread: the threads the sessions taken over are
    /// dealt to, in turn (else all run on `runtime`).
    workers: Option<Arc<workers::Workers>>,
    started: Arc<Started>,
}

/// The sessions of a hand-over that started running here, and the pause
/// each one saw: from the moment it stopped moving bytes in the old
/// process to its first run here (both read from CLOCK_MONOTONIC).
#[derive(Default)]
struct Started {
    /// Sessions started, and the pauses of those whose old process said
    /// when they paused.
    state: std::sync::Mutex<(usize, Vec<Duration>)>,
    changed: std::sync::Condvar,
}

impl Started {
    fn record(&self, paused_ns: u64) {
        let now = crate::handover::monotonic_ns();
        let Ok(mut s) = self.state.lock() else { return };
        s.0 += 1;
        if paused_ns != 0 {
            s.1.push(Duration::from_nanos(now.saturating_sub(paused_ns)));
        }
        self.changed.notify_all();
    }
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer").finish_non_exhaustive()
    }
}

impl Importer {
    /// Waits (blocking) until `n` sessions taken over have started running
    /// here, or `timeout`; returns how many did and the pause each one saw
    /// (from its export in the old process to its first run here).
    pub fn wait_started(&self, n: usize, timeout: Duration) -> (usize, Vec<Duration>) {
        let deadline = std::time::Instant::now() + timeout;
        let Ok(mut s) = self.started.state.lock() else {
            return (0, Vec::new());
        };
        while s.0 < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            s = match self.started.changed.wait_timeout(s, left) {
                Ok((s, _)) => s,
                Err(_) => return (0, Vec::new()),
            };
        }
        (s.0, std::mem::take(&mut s.1))
    }

    /// Prepares each session of a batch and says which were taken. Those
    /// taken start with [`Importer::start`], once the old process has the
    /// answer.
    pub fn import_batch(
        &self,
        sessions: Vec<crate::handover::IncomingSession>,
    ) -> (Vec<bool>, Prepared) {
        let mut prepared = Prepared(Vec::with_capacity(sessions.len()));
        let verdicts = sessions
            .into_iter()
            .map(|s| {
                let (id, listener) = (s.entry.id.clone(), s.entry.listener.clone());
                // Its sockets and timers belong to the runtime it will run
                // on (a resume-protocol listener's sessions stay with the
                // listener's tasks, on this one, as when accepted).
                let (rt, placed) = match &self.workers {
                    Some(w) if s.entry.client != crate::session::driver::SockKind::Resumable => {
                        let (rt, placed) = w.deal();
                        (rt, Some(placed))
                    }
                    _ => (&self.runtime, None),
                };
                let _rt = rt.enter();
                self.import(s, rt, placed)
                    .map(|p| prepared.0.push(p))
                    .inspect_err(|e| {
                        tracing::warn!(session.id = %id, listener = %listener, error = %e, "hand-over: cannot take this session; the old process keeps it");
                    })
                    .is_ok()
            })
            .collect();
        (verdicts, prepared)
    }

    /// Starts the sessions of a batch once the old process knows we took
    /// them (`answered`), or drops them untouched (their sockets stay the
    /// old process's) when it may not.
    ///
    /// Each session's first run happens here, on the calling thread, before
    /// its task takes it over: under a saturated CPU a task woken from
    /// outside the runtime waited 0.3 to 0.8 ms (p50) for a worker, and its
    /// pause with it. The first run moves whatever piled up during the
    /// pause, as any run does; the next runs are the task's.
    pub fn start(&self, batch: Prepared, answered: bool) {
        if !answered {
            return;
        }
        for p in batch.0 {
            let _rt = p.runtime.enter();
            if let Some(r) = p.resumable {
                r.start();
            }
            let run = SessionRun::TakenOver(first_run((p.make)()));
            spawn_session(&p.ctx, &p.session, p.id, p.peer, p.slot, run, p.span);
        }
    }

    /// Prepares a session taken over from the old process: its sockets,
    /// its core, its place under the limits; [`Importer::start`] starts it.
    fn import(
        &self,
        s: crate::handover::IncomingSession,
        runtime: &tokio::runtime::Handle,
        placed: Option<workers::Placed>,
    ) -> Result<PreparedSession, String> {
        let crate::handover::IncomingSession {
            entry,
            snapshot,
            rbuf,
            resumable,
            replication,
            client,
            server,
        } = s;
        let Some((_, l, listener)) = self
            .listeners
            .iter()
            .find(|(name, _, _)| *name == entry.listener)
        else {
            return Err(format!("no listener {:?} in this config", entry.listener));
        };
        let ctx = l.borrow().clone();
        let now = tokio::time::Instant::now().into_std();
        let core = SessionCore::import(
            &snapshot,
            |name| self.backends.get(name).map(|b| b.config.clone()),
            now,
        )
        .map_err(|e| format!("session state: {e}"))?;
        let backend = self.backends[&core.backend().name].clone();
        if ack_kind(&backend.config.ack) != entry.ack {
            return Err(format!(
                "backend {:?} changed its ack mode ({} here, {} there)",
                backend.config.name,
                ack_kind(&backend.config.ack),
                entry.ack
            ));
        }
        let (client, resumable) = match (entry.client, listener.resume()) {
            (crate::session::driver::SockKind::Resumable, Some(r)) => {
                let (session, imported) = r
                    .import_session(&resumable, client)
                    .map_err(|e| format!("resumable session: {e}"))?;
                (Conn::Resumable(Box::new(session)), Some(imported))
            }
            (crate::session::driver::SockKind::Resumable, None) => {
                return Err(format!(
                    "listener {:?} is not a resume-protocol listener here",
                    entry.listener
                ))
            }
            (_, Some(_)) => {
                return Err(format!(
                    "listener {:?} is a resume-protocol listener here",
                    entry.listener
                ))
            }
            (kind, None) => (
                kind.wrap(client.ok_or("no client socket arrived")?)
                    .map_err(|e| format!("client socket: {e}"))?,
                None,
            ),
        };
        let server = match (&entry.server, server) {
            (Some(leg), Some(fd)) => Some((
                crate::session::core::Generation(leg.gen),
                leg.kind
                    .wrap(fd)
                    .map_err(|e| format!("server socket: {e}"))?,
                bytes::BytesMut::from(&rbuf[..]),
                leg.written,
            )),
            _ => None,
        };
        let ip = entry
            .peer
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip());
        let mut slot = ctx.admission().count(ip);
        if let Some(placed) = placed {
            slot.set_thread(placed);
        }
        let session = SessionCtx {
            backend,
            listener: ctx.session.listener.clone(),
            shared: self.shared.clone(),
        };
        let id = core.id();
        let backend_name = core.backend().name.clone();
        // Host failover: the session's replication, carried on here once
        // the old process knows we took it (before that its records would
        // describe a session this process might not run).
        let replication = match (&entry.replication, &ctx.replicator) {
            (Some(r), Some(replicator)) => Some((
                replicator.clone(),
                replication_records(&replication, id)?,
                r.counters,
            )),
            (Some(_), None) => {
                tracing::warn!(session.id = %id, listener = %entry.listener, "hand-over: the session was replicated to a failover standby, and this process does not replicate its listener: it carries on unreplicated");
                None
            }
            (None, _) => None,
        };
        // The session task is built only after the answer went out: the
        // answer waits for the decoding above, not for this.
        let (peer, close) = (entry.peer.clone(), ctx.close_sessions.clone());
        let task_session = session.clone();
        let (started, paused_ns) = (self.started.clone(), entry.paused_ns);
        let span = session_span(id, &ctx.listener_name, &backend_name);
        let driver_span = span.clone();
        let make = move || -> RunFuture {
            let tap = replication.map(|(replicator, records, counters)| {
                crate::failover::tap::Tap::adopted(replicator, id, records, counters)
            });
            let restored = crate::session::driver::Restored {
                client_eof: entry.client_eof,
                age: std::time::Duration::from_millis(entry.age_ms),
                legs: entry.legs,
                replayed: entry.replayed,
                server,
                tap,
            };
            let mut driver = Driver::restored(core, client, peer, task_session, close, restored);
            driver.set_span(driver_span);
            let run = Box::pin(driver.run());
            // Its first poll follows at once: the pause ends here.
            started.record(paused_ns);
            run
        };
        Ok(PreparedSession {
            runtime: runtime.clone(),
            ctx,
            session,
            id,
            peer: entry.peer,
            slot,
            span,
            // A resumable client's own task, too (dropped unstarted, it is
            // forgotten here).
            resumable,
            make: Box::new(make),
        })
    }
}

/// Runs a session's driver once, here, and returns it for its task to go
/// on with (or, if that run ended it, its end). The run's wake-ups go to a
/// no-op waker: tokio keeps each socket's readiness until a read or write
/// finds it gone, and the task polls the driver as soon as it has it, so
/// whatever became ready in between is seen then.
fn first_run<T: Send + 'static>(
    mut run: std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    let waker = std::task::Waker::from(Arc::new(Noop));
    let mut cx = std::task::Context::from_waker(&waker);
    match run.as_mut().poll(&mut cx) {
        std::task::Poll::Pending => run,
        std::task::Poll::Ready(end) => Box::pin(std::future::ready(end)),
    }
}

/// Decodes the replication records a hand-over carried for session `id`:
/// they must rebuild that session (a `Session` record first, every other
/// one about it).
fn replication_records(
    bytes: &[u8],
    id: SessionId,
) -> Result<Vec<crate::failover::codec::Record>, String> {
    use crate::failover::codec::{self, Record};
    let mut buf = bytes::BytesMut::from(bytes);
    let mut out = Vec::new();
    while !buf.is_empty() {
        match codec::decode(&mut buf) {
            Ok(Some(r)) => out.push(r),
            Ok(None) => return Err("replication records: truncated".into()),
            Err(e) => return Err(format!("replication records: {e}")),
        }
    }
    let about = |r: &Record| match r {
        Record::Session(n) => Some(n.id),
        Record::Read { id, .. }
        | Record::Written { id, .. }
        | Record::ClientAcked { id, .. }
        | Record::ServerAcked { id, .. }
        | Record::Closed { id }
        | Record::Synced { id, .. } => Some(*id),
        _ => None,
    };
    match out.first() {
        Some(Record::Session(n)) if n.id == id => {}
        _ => return Err("replication records: they do not start with this session".into()),
    }
    if out
        .iter()
        .any(|r| about(r) != Some(id) || matches!(r, Record::Closed { .. }))
    {
        return Err("replication records: one is not about this session".into());
    }
    Ok(out)
}

struct RunningListener {
    name: String,
    /// Shared with its accept loop (and a hand-over while one runs).
    listener: Arc<Listener>,
    listen: Endpoint,
    /// A listener is kept across a reload only if its socket is the same
    /// kind: plain, or resume with the same settings.
    protocol: crate::config::ListenerProtocol,
    /// Swapped on reload: the next accepted client uses the new settings.
    ctx: watch::Sender<Arc<AcceptCtx>>,
    /// Its open sessions (total and per client), kept across reloads.
    limits: Arc<ListenerLimits>,
    stop: CancellationToken,
    /// Its accept loops, one per session thread (none while a hand-over
    /// stopped them).
    joins: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// The backends of `config`: the running one where its settings are
    /// unchanged, a new one (which replaces the old for new legs) otherwise.
    fn backends_for(&self, config: &Config) -> HashMap<String, Arc<Backend>> {
        let mut out = HashMap::new();
        for b in &config.backends {
            let backend = match self.backends.get(&b.name) {
                Some(old) if *old.config == *b => old.clone(),
                old => {
                    let new = Backend::new(Arc::new(b.clone()), self.metrics.backend(&b.name));
                    tokio::spawn(new.clone().probe());
                    if let Some(old) = old {
                        old.replace_with(new.clone());
                    }
                    new
                }
            };
            out.insert(b.name.clone(), backend);
        }
        out
    }

    fn accept_ctx(
        &self,
        cfg: &ListenerConfig,
        config: &Config,
        backends: &HashMap<String, Arc<Backend>>,
        limits: Arc<ListenerLimits>,
    ) -> Arc<AcceptCtx> {
        let backend_name = &config.backends[cfg.backend].name;
        let session = SessionCtx {
            backend: backends[backend_name].clone(),
            listener: self.metrics.listener(&cfg.name),
            shared: self.shared.clone(),
        };
        // Certificates were read and checked when the config was loaded: a
        // reload builds a new acceptor, which new handshakes use. A resume
        // listener's TLS is the server library's (`set_resume_tls`).
        let tls = cfg
            .tls
            .as_ref()
            .filter(|_| cfg.protocol == ListenerProtocol::Tcp);
        let tls = tls.map(|t| ListenerTlsCtx {
            acceptor: tokio_rustls::TlsAcceptor::from(t.server.0.clone()),
            handshake_timeout: t.handshake_timeout,
            routes: cfg
                .sni
                .iter()
                .map(|route| {
                    let mut ctx = session.clone();
                    if let Some(b) = route.backend {
                        ctx.backend = backends[&config.backends[b].name].clone();
                    }
                    (route.name.clone(), ctx)
                })
                .collect(),
        });
        Arc::new(AcceptCtx {
            listener_name: Arc::from(cfg.name.as_str()),
            session,
            tls,
            sessions: self.sessions.clone(),
            close_sessions: self.close_sessions.clone(),
            open: self.open.clone(),
            max_sessions: config.limits.max_sessions,
            limits,
            fds: self.fds.clone(),
            access: self.access.clone(),
            cfg: cfg.clone(),
            replicator: self.replicator.clone().filter(|_| {
                // Only the listeners `[failover] listeners` names.
                config.failover.as_ref().is_some_and(|f| {
                    f.listeners
                        .iter()
                        .any(|&i| config.listeners.get(i).is_some_and(|l| l.name == cfg.name))
                })
            }),
            workers: self.workers.clone(),
        })
    }

    fn start_listener(
        &mut self,
        listener: Listener,
        cfg: &ListenerConfig,
        config: &Config,
        backends: &HashMap<String, Arc<Backend>>,
    ) {
        tracing::info!(listener = %cfg.name, addr = %listener.local_endpoint(), "listening");
        let limits = Arc::new(ListenerLimits::default());
        let (ctx, _) = watch::channel(self.accept_ctx(cfg, config, backends, limits.clone()));
        let stop = CancellationToken::new();
        if let Some(resume) = listener.resume() {
            // TLS handshakes run inside the server library: count its
            // refusals as a TLS listener's.
            let lm = self.metrics.listener(&cfg.name);
            resume.set_on_reject(Some(Arc::new(move |why| lm.rejected(why.as_str()))));
        }
        let listener = Arc::new(listener);
        let joins = accept_loops(&self.workers, &cfg.name, &listener, &ctx, &stop);
        self.listeners.push(RunningListener {
            name: cfg.name.clone(),
            listener,
            listen: cfg.listen.clone(),
            protocol: cfg.protocol.clone(),
            ctx,
            limits,
            stop,
            joins,
        });
    }

    /// Stops every accept loop (the listening sockets stay open). A
    /// resume-protocol listener stops accepting connections, but sessions
    /// whose handshake was already under way still reach the proxy (and so
    /// the hand-over, which looks for new sessions until it is done).
    async fn stop_accepting(&mut self) {
        for l in &mut self.listeners {
            if let Some(r) = l.listener.resume() {
                r.pause_accepting();
                continue;
            }
            l.stop.cancel();
            for join in std::mem::take(&mut l.joins) {
                let _ = join.await;
            }
        }
    }

    /// Restarts the accept loops `stop_accepting` stopped.
    fn resume_accepting(&mut self) {
        for l in &mut self.listeners {
            if let Some(r) = l.listener.resume() {
                r.resume_accepting();
                tracing::info!(listener = %l.name, "accepting again");
            } else if l.stop.is_cancelled() {
                l.stop = CancellationToken::new();
                l.joins = accept_loops(&self.workers, &l.name, &l.listener, &l.ctx, &l.stop);
                tracing::info!(listener = %l.name, "accepting again");
            }
        }
    }

    /// What the hand-over's thread needs to take sessions over.
    fn importer(&self) -> Importer {
        Importer {
            listeners: self
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.ctx.subscribe(), l.listener.clone()))
                .collect(),
            backends: self.backends.clone(),
            shared: self.shared.clone(),
            runtime: tokio::runtime::Handle::current(),
            workers: self.workers.clone(),
            started: Arc::default(),
        }
    }

    /// Host failover, standby: runs a client connection taken over from the
    /// dead active as a session rebuilt at the replicated offsets (a new
    /// leg replays what the server had not answered), and watches it for a
    /// gap ([`crate::failover::gap`]): one found closes it with a reset and
    /// counts it (`holdfast_failover_gap_total`).
    fn adopt(&self, t: crate::failover::takeover::Taken) -> Result<(), String> {
        use crate::failover::repair;
        let crate::failover::takeover::Taken {
            session,
            conn,
            unsent,
        } = t;
        let new = &session.new;
        let Some(l) = self.listeners.iter().find(|l| l.name == new.listener) else {
            let _ = repair::abort(conn);
            return Err(format!("no listener {:?} in this config", new.listener));
        };
        let ctx = l.ctx.borrow().clone();
        let Some(backend) = self.backends.get(&new.backend).cloned() else {
            let _ = repair::abort(conn);
            return Err(format!("no backend {:?} in this config", new.backend));
        };
        let unsent_len: u64 = unsent.iter().map(|b| b.len() as u64).sum();
        let replicated = crate::session::core::Replicated {
            server_acked: session.server_acked,
            unacked_up: session.unacked_up(),
            down_from: session.written - unsent_len,
            unsent_down: unsent,
        };
        let now = tokio::time::Instant::now().into_std();
        let core = match SessionCore::from_replicated(
            new.id,
            backend.config.clone(),
            backend.pick_server(),
            replicated,
            now,
        ) {
            Ok(core) => core,
            Err(e) => {
                let _ = repair::abort(conn);
                return Err(e.to_string());
            }
        };
        let mut core = core;
        core.set_client_addr(crate::proto::ClientAddr::Ip(
            new.client.ip(),
            new.client.port(),
        ));
        core.set_idle_timeout(ctx.cfg.idle_timeout, now);
        // With sessions per thread, the sessions taken over are dealt to
        // the threads in turn: registered with that thread's runtime, run
        // there.
        let (rt, placed) = match &self.workers {
            Some(w) => {
                let (rt, placed) = w.deal();
                (Some(rt.clone()), Some(placed))
            }
            None => (None, None),
        };
        let _on = rt.as_ref().map(|rt| rt.enter());
        let watch_fd = conn.try_clone().map_err(|e| e.to_string())?;
        let std = std::net::TcpStream::from(conn);
        std.set_nonblocking(true).map_err(|e| e.to_string())?;
        let client = Conn::Tcp(tokio::net::TcpStream::from_std(std).map_err(|e| e.to_string())?);
        let mut slot = ctx.admission().count(Some(new.client.ip()));
        if let Some(placed) = placed {
            slot.set_thread(placed);
        }
        let session_ctx = SessionCtx {
            backend: backend.clone(),
            listener: ctx.session.listener.clone(),
            shared: self.shared.clone(),
        };
        let peer = new.client.to_string();
        let mut driver = Driver::new(
            core,
            client,
            peer.clone(),
            session_ctx.clone(),
            ctx.close_sessions.clone(),
        );
        let name = backend.config.name.clone();
        let span = session_span(new.id, &ctx.listener_name, &name);
        driver.set_span(span.clone());
        tokio::spawn(watch_gap(
            watch_fd,
            ctx.close_sessions.clone(),
            driver.status(),
            ctx.session.listener.clone(),
            new.id,
            peer.clone(),
        ));
        let run = SessionRun::Now(Box::pin(driver.run()));
        spawn_session(&ctx, &session_ctx, new.id, peer, slot, run, span);
        Ok(())
    }

    /// Applies a new configuration: listeners present in both (same name and
    /// address) keep their socket and take the new settings for new clients;
    /// new listeners are bound first (any failure leaves everything as it
    /// was); removed listeners stop accepting while their sessions run on;
    /// changed backends apply to new sessions and to new legs of live ones.
    async fn reload(&mut self, config: Config) -> Result<(), String> {
        if config.admin != self.config.admin {
            tracing::warn!("[admin] changes take effect at the next restart");
        }
        if config.runtime != self.config.runtime {
            tracing::warn!("[runtime] changes take effect at the next restart");
        }
        if config.handover != self.config.handover {
            tracing::warn!("[handover] changes take effect at the next restart or upgrade");
        }
        // Reopen the access log (rotation) and bind what is new before
        // touching anything.
        let access = open_access_log(&config).map_err(|e| e.to_string())?;
        let mut fresh = Vec::new();
        for cfg in &config.listeners {
            let kept = self.listeners.iter().any(|l| {
                l.name == cfg.name && l.listen == cfg.listen && l.protocol == cfg.protocol
            });
            if !kept {
                let listener = bind_listener(cfg)
                    .await
                    .map_err(|e| format!("listener {:?}: {e}", cfg.name))?;
                fresh.push((cfg.clone(), listener));
            }
        }
        self.access = access;
        let backends = self.backends_for(&config);
        // Stop removed (or moved) listeners; their sessions continue.
        let mut kept = Vec::new();
        for l in self.listeners.drain(..) {
            let still = config
                .listeners
                .iter()
                .any(|c| c.name == l.name && c.listen == l.listen && c.protocol == l.protocol);
            if still {
                kept.push(l);
            } else {
                tracing::info!(listener = %l.name, addr = %l.listen, "listener removed");
                l.stop.cancel();
                // Its socket is closed once its accept loops have returned:
                // when the reload reports success, nobody connects there.
                for join in l.joins {
                    let _ = join.await;
                }
            }
        }
        self.listeners = kept;
        for l in &self.listeners {
            let cfg = config
                .listeners
                .iter()
                .find(|c| c.name == l.name)
                .expect("kept listeners are in the new config");
            l.ctx
                .send_replace(self.accept_ctx(cfg, &config, &backends, l.limits.clone()));
            l.listener.set_resume_tls(cfg.tls.as_ref());
        }
        for (cfg, listener) in fresh {
            self.start_listener(listener, &cfg, &config, &backends);
        }
        // Backends no longer named stop probing once their sessions are gone.
        for (name, old) in &self.backends {
            if !backends.contains_key(name) {
                old.stop_probe();
            }
        }
        self.shared.set_buffer_limit(config.limits.buffer_memory);
        self.metrics
            .set_buffer_memory_limit(config.limits.buffer_memory);
        self.fds.set_reserve(config.limits.fd_reserve);
        self.backends = backends;
        self.config = config;
        Ok(())
    }
}

struct AcceptCtx {
    listener_name: Arc<str>,
    session: SessionCtx,
    tls: Option<ListenerTlsCtx>,
    sessions: TaskTracker,
    close_sessions: CancellationToken,
    open: Arc<AtomicUsize>,
    max_sessions: usize,
    limits: Arc<ListenerLimits>,
    fds: Arc<FdBudget>,
    access: Option<Arc<AccessLogger>>,
    cfg: ListenerConfig,
    /// Host failover, active role, on a listener it covers.
    replicator: Option<crate::failover::active::Replicator>,
    /// With sessions per thread: where an accepted client runs.
    workers: Option<Arc<workers::Workers>>,
}

/// A TLS listener's acceptor and SNI routes.
struct ListenerTlsCtx {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
    /// SNI pattern → the session context of its backend.
    routes: Vec<(crate::config::SniName, SessionCtx)>,
}

impl ListenerTlsCtx {
    /// The session context for a client that asked for `sni`.
    fn route<'a>(&'a self, sni: Option<&str>, default: &'a SessionCtx) -> &'a SessionCtx {
        sni.and_then(|name| {
            crate::transport::tls::best_match(self.routes.iter().map(|(n, _)| n), name)
        })
        .map_or(default, |i| &self.routes[i].1)
    }
}

/// Starts a listener's accept loops: one on this runtime and, when sessions
/// run per thread, one on each other session thread, on a duplicate of the
/// listening socket (a thread that cannot have one takes none of this
/// listener's clients, with a warning).
fn accept_loops(
    workers: &Option<Arc<workers::Workers>>,
    name: &str,
    listener: &Arc<Listener>,
    ctx: &watch::Sender<Arc<AcceptCtx>>,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut joins = vec![tokio::spawn(accept_loop(
        listener.clone(),
        ctx.subscribe(),
        stop.clone(),
    ))];
    for (i, rt) in workers.iter().flat_map(|w| w.others()).enumerate() {
        let dup = {
            let _in = rt.enter();
            listener.duplicate()
        };
        match dup {
            Ok(Some(dup)) => {
                joins.push(rt.spawn(accept_loop(Arc::new(dup), ctx.subscribe(), stop.clone())))
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(listener = %name, thread = i + 1, error = %e, "cannot accept on this session thread: it takes none of this listener's clients");
            }
        }
    }
    joins
}

async fn accept_loop(
    listener: Arc<Listener>,
    ctx: watch::Receiver<Arc<AcceptCtx>>,
    stop: CancellationToken,
) {
    let mut out_of_fds = false;
    // What accepted sockets start with; a listener whose options match its
    // config (bound by holdfast, or handed over from one) needs no
    // setsockopt per client.
    let inherited = listener.accepted_options();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let ctx = ctx.borrow().clone();
        match accepted {
            Ok((conn, peer)) => {
                out_of_fds = false;
                start_session(&ctx, conn, peer, inherited.as_ref());
            }
            Err(e) if is_resource_exhaustion(&e) => {
                if !out_of_fds {
                    tracing::warn!(listener = %ctx.listener_name, error = %e, "accept failed: out of resources; backing off");
                    out_of_fds = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
            Err(e) => {
                tracing::debug!(listener = %ctx.listener_name, error = %e, "accept failed");
            }
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl AcceptCtx {
    /// The limits a client of this listener is counted against.
    fn admission(&self) -> Admission<'_> {
        Admission {
            global_open: &self.open,
            global_max: self.max_sessions,
            listener: &self.limits,
            listener_max: self.cfg.max_sessions,
            per_client_max: self.cfg.max_sessions_per_client,
            fds: &self.fds,
        }
    }
}

/// `inherited`: the socket options `conn` was accepted with, when known.
fn start_session(
    ctx: &Arc<AcceptCtx>,
    conn: Conn,
    transport::Peer { text: peer, addr }: transport::Peer,
    inherited: Option<&crate::config::SocketOptions>,
) {
    let lm = &ctx.session.listener;
    let admission = ctx.admission();
    let ip = addr.map(|a| a.ip());
    let mut slot = match admission.admit(ip) {
        Ok(slot) => slot,
        Err((refusal, limit)) => {
            // Accepted and closed at once (dropping `conn`); one warning
            // per burst of refusals, not one per client.
            lm.rejected(refusal.as_str());
            if ctx.limits.first_of_burst(refusal) {
                tracing::warn!(listener = %ctx.listener_name, client.addr = %peer, reason = refusal.as_str(), limit, "limit reached: closing new clients until a session ends");
            } else {
                tracing::debug!(listener = %ctx.listener_name, client.addr = %peer, reason = refusal.as_str(), "limit reached: closing the client");
            }
            return;
        }
    };
    // (After a reload changed the listener's options, they differ.)
    let inherited = inherited == Some(&ctx.cfg.socket);
    if let (Conn::Tcp(s), false) = (&conn, inherited) {
        if let Err(e) = transport::apply_tcp_options(socket2::SockRef::from(s), &ctx.cfg.socket) {
            tracing::debug!(error = %e, "setting client socket options failed");
        }
    }
    let placement = match &ctx.workers {
        Some(w) if !matches!(conn, Conn::Resumable(_)) => w.place(),
        _ => workers::Placement::Here(workers::Placed::none()),
    };
    match placement {
        workers::Placement::Here(placed) => slot.set_thread(placed),
        workers::Placement::There(rt, placed) => {
            slot.set_thread(placed);
            // Out of this thread's epoll, into the other's.
            let moving = match conn.into_unregistered() {
                Ok(m) => m,
                Err(e) => return move_failed(ctx, &peer, &e),
            };
            let ctx = ctx.clone();
            ctx.sessions.clone().spawn_on(
                async move {
                    match moving.register() {
                        Ok(conn) => start_placed(&ctx, conn, peer, addr, slot),
                        Err(e) => move_failed(&ctx, &peer, &e),
                    }
                },
                rt,
            );
            return;
        }
    }
    start_placed(ctx, conn, peer, addr, slot);
}

/// A client whose socket could not leave one session thread's epoll or
/// join another's: closed (dropped) and counted as refused.
fn move_failed(ctx: &AcceptCtx, peer: &str, e: &io::Error) {
    ctx.session.listener.rejected(REJECT_THREAD_MOVE);
    tracing::warn!(listener = %ctx.listener_name, client.addr = %peer, reason = REJECT_THREAD_MOVE, error = %e, "cannot move the client to another session thread: closing it");
}

/// [`start_session`] on the session thread the client runs on: its TLS
/// handshake, if any, then its session.
fn start_placed(
    ctx: &Arc<AcceptCtx>,
    conn: Conn,
    peer: String,
    addr: Option<std::net::SocketAddr>,
    slot: Slot,
) {
    let lm = &ctx.session.listener;
    let Some(tls) = &ctx.tls else {
        lm.accepted.inc();
        run_session(ctx, &ctx.session, conn, peer, addr, slot);
        return;
    };
    // The handshake runs in its own task: a slow or silent client holds up
    // nobody (its max_sessions slot is counted meanwhile).
    let timeout = tls.handshake_timeout;
    let acceptor = tls.acceptor.clone();
    let ctx = ctx.clone();
    ctx.sessions.clone().spawn(async move {
        let lm = &ctx.session.listener;
        let handshake = tokio::select! {
            r = transport::tls::accept(&acceptor, conn, timeout) => r,
            _ = ctx.close_sessions.cancelled() => return,
        };
        match handshake {
            Ok(conn) => {
                lm.accepted.inc();
                let tls = ctx.tls.as_ref().expect("tls listener");
                let session = tls.route(conn.sni(), &ctx.session);
                run_session(&ctx, session, conn, peer, addr, slot);
            }
            Err(transport::tls::HandshakeError::Failed(e))
                if e.kind() == io::ErrorKind::UnexpectedEof =>
            {
                // Closed before finishing a ClientHello: a port probe (or a
                // holdfast prober parking a connection), not a refusal.
                drop(slot);
                tracing::debug!(listener = %ctx.listener_name, client.addr = %peer, error = %e, "client closed during the tls handshake");
            }
            Err(e) => {
                drop(slot);
                let (reason, error) = match e {
                    transport::tls::HandshakeError::Timeout => (
                        REJECT_TLS_TIMEOUT,
                        format!("no handshake within {} ms", timeout.as_millis()),
                    ),
                    transport::tls::HandshakeError::Failed(e) => (REJECT_TLS_HANDSHAKE, e.to_string()),
                };
                lm.rejected(reason);
                tracing::warn!(listener = %ctx.listener_name, client.addr = %peer, reason, error = %error, "tls handshake failed: closing the client");
            }
        }
    });
}

/// Spawns the session task of an accepted (and, on a TLS listener,
/// handshaken) client, which holds `slot` until it ends.
fn run_session(
    ctx: &AcceptCtx,
    session: &SessionCtx,
    conn: Conn,
    peer: String,
    addr: Option<std::net::SocketAddr>,
    slot: Slot,
) {
    let lm = &session.listener;
    let backend = session.backend.config.clone();
    let first = session.backend.pick_server();
    let id = SessionId::random();
    let now = tokio::time::Instant::now().into_std();
    let mut core = SessionCore::new(id, backend.clone(), first, now);
    if let Some(addr) = addr {
        core.set_client_addr(crate::proto::ClientAddr::Ip(addr.ip(), addr.port()));
    }
    core.set_idle_timeout(ctx.cfg.idle_timeout, now);
    let tap = ctx
        .replicator
        .as_ref()
        .and_then(|r| failover_tap(r, ctx, &conn, id, &backend.name, &peer));
    let mut driver = Driver::new(
        core,
        conn,
        peer.clone(),
        session.clone(),
        ctx.close_sessions.clone(),
    );
    if let Some(tap) = tap {
        driver.set_tap(tap);
    }
    let span = session_span(id, &ctx.listener_name, &backend.name);
    driver.set_span(span.clone());
    let _ = lm;
    let run = SessionRun::Now(Box::pin(driver.run()));
    spawn_session(ctx, session, id, peer, slot, run, span);
}

/// Host failover, active role: captures the client connection's kernel
/// state (the one TCP_REPAIR pause, before any byte moved) and announces
/// the session to the standby. None (the session runs unreplicated, with a
/// warning) when the capture fails: no CAP_NET_ADMIN, or not plain TCP.
fn failover_tap(
    r: &crate::failover::active::Replicator,
    ctx: &AcceptCtx,
    conn: &Conn,
    id: SessionId,
    backend: &str,
    peer: &str,
) -> Option<Box<crate::failover::tap::Tap>> {
    let Conn::Tcp(s) = conn else {
        tracing::warn!(listener = %ctx.listener_name, "failover: only plain TCP clients are replicated");
        return None;
    };
    let (Ok(client), Ok(local)) = (s.peer_addr(), s.local_addr()) else {
        return None;
    };
    match crate::failover::repair::capture(std::os::fd::AsFd::as_fd(s)) {
        Ok(state) => Some(crate::failover::tap::Tap::new(
            r.clone(),
            id,
            &ctx.listener_name,
            backend,
            client,
            local,
            state,
        )),
        Err(e) => {
            tracing::warn!(listener = %ctx.listener_name, client.addr = %peer, error = %e, "failover: cannot capture the connection's TCP state; the session is not replicated");
            None
        }
    }
}

/// How long a session taken over may see client segments only out of order
/// before it counts as across a gap.
const GAP_PATIENCE: Duration = Duration::from_secs(1);
/// How often a taken-over session's receive counters are read.
const GAP_POLL: Duration = Duration::from_millis(50);

/// Watches a session taken over until in-order client bytes arrive (it
/// resumed) or until only out-of-order ones did for `GAP_PATIENCE` (a gap:
/// bytes the dead active's kernel acknowledged and never replicated). A gap
/// closes the session deliberately, with a reset, counted and logged.
async fn watch_gap(
    fd: std::os::fd::OwnedFd,
    close: CancellationToken,
    status: Arc<crate::session::status::SessionStatus>,
    lm: crate::metrics::ListenerMetrics,
    id: SessionId,
    peer: String,
) {
    use crate::failover::{gap, repair};
    use std::os::fd::AsFd;
    let Ok((received, ooo)) = repair::receive_progress(fd.as_fd()) else {
        return;
    };
    let mut watch = gap::GapWatch::new(received, ooo, std::time::Instant::now());
    loop {
        tokio::select! {
            _ = close.cancelled() => return,
            _ = tokio::time::sleep(GAP_POLL) => {}
        }
        let Ok((received, ooo)) = repair::receive_progress(fd.as_fd()) else {
            return;
        };
        match watch.check(received, ooo, std::time::Instant::now(), GAP_PATIENCE) {
            gap::Verdict::Resumed => return,
            gap::Verdict::Waiting => {}
            gap::Verdict::Gap => {
                lm.failover_gap();
                tracing::warn!(session.id = %id, client.addr = %peer, reason = "failover_gap", "failover: client bytes were acknowledged by the dead active and never replicated; closing the session with a reset");
                // SO_LINGER 0 on the shared socket: its last close resets.
                let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
                status.close();
                return;
            }
        }
    }
}

/// The sessions of one hand-over batch this process took, built and not
/// yet started ([`Importer::start`]).
pub struct Prepared(Vec<PreparedSession>);

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Prepared").field(&self.0.len()).finish()
    }
}

/// Dropped unstarted, it closes this process's copies of the session's
/// sockets without a shutdown: the old process's stay as they were.
struct PreparedSession {
    /// The runtime its sockets are registered with, which runs its task.
    runtime: tokio::runtime::Handle,
    ctx: Arc<AcceptCtx>,
    session: SessionCtx,
    id: SessionId,
    peer: String,
    slot: Slot,
    span: tracing::Span,
    resumable: Option<crate::server::Imported>,
    make: Box<dyn FnOnce() -> RunFuture + Send>,
}

/// A session's driver, running. Boxed once: awaiting a future captured by
/// the task's own future would hold the driver twice in every session task.
type RunFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Ended> + Send>>;

/// What a session task runs.
enum SessionRun {
    /// A new session: at once.
    Now(RunFuture),
    /// A session taken over from the old process, once the old process
    /// knows we took it, after its driver's first run
    /// ([`Importer::start`]).
    TakenOver(RunFuture),
}

/// The span of a session's log lines. The session task does not run in
/// it: entering a span on every poll cost 5% of a round trip's
/// instructions at the default log level, so each line enters it (the
/// driver's `slog!`, `in_scope` here).
fn session_span(id: SessionId, listener: &str, backend: &str) -> tracing::Span {
    tracing::info_span!("session", session.id = %id, listener = %listener, backend = %backend)
}

/// Spawns a session's task, which holds `slot` until it ends; its log
/// lines go in `span` ([`session_span`], the one its driver has).
fn spawn_session(
    ctx: &AcceptCtx,
    session: &SessionCtx,
    id: SessionId,
    peer: String,
    slot: Slot,
    run: SessionRun,
    span: tracing::Span,
) {
    let lm = session.listener.clone();
    let access = ctx.access.clone();
    let listener_name = ctx.listener_name.clone();
    let backend_name = session.backend.config.name.clone();
    ctx.sessions.spawn(async move {
        let run = match run {
            SessionRun::Now(run) => {
                span.in_scope(|| tracing::info!(client.addr = %peer, "session opened"));
                run
            }
            SessionRun::TakenOver(run) => {
                span.in_scope(|| tracing::debug!(client.addr = %peer, "session taken over"));
                run
            }
        };
        lm.sessions.inc();
        let s = match run.await {
            Ended::Closed(s) => s,
            Ended::HandedOver(h) => {
                drop(slot);
                lm.sessions.dec();
                lm.closed("handed_over");
                span.in_scope(|| {
                    tracing::info!(
                        reason = "handed_over",
                        bytes_up = h.bytes_up,
                        bytes_down = h.bytes_down,
                        legs = h.legs,
                        duration_ms = h.duration.as_millis() as u64,
                        "session handed over to the new process"
                    )
                });
                return;
            }
        };
        drop(slot);
        lm.sessions.dec();
        lm.closed(s.reason.as_str());
        span.in_scope(|| {
            if s.client_reset {
                lm.client_reset(s.reason.as_str());
                tracing::warn!(
                    reason = s.reason.as_str(),
                    "client input unread at close: the client got a reset"
                );
            }
            tracing::info!(
                reason = s.reason.as_str(),
                bytes_up = s.bytes_up,
                bytes_down = s.bytes_down,
                legs = s.legs,
                replayed_bytes = s.replayed,
                duration_ms = s.duration.as_millis() as u64,
                error = s.error.as_deref().unwrap_or(""),
                "session closed"
            );
        });
        if let Some(log) = access {
            log.record(&id.to_string(), &peer, &listener_name, &backend_name, &s);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::codec::{self, NewSession, Record};
    use crate::failover::repair::{KernelState, TcpOptions};
    use crate::failover::RepairWindow;

    fn new_session(id: SessionId) -> Record {
        Record::Session(Box::new(NewSession {
            id,
            listener: "l".into(),
            backend: "b".into(),
            client: "127.0.0.1:40000".parse().unwrap(),
            local: "127.0.0.1:7000".parse().unwrap(),
            state: KernelState {
                send_seq: 1,
                recv_seq: 2,
                mss_clamp: 1460,
                options: TcpOptions::default(),
                window: RepairWindow::default(),
                timestamp: 10,
            },
            read_from: 0,
            written_from: 0,
        }))
    }

    fn encoded(records: &[Record]) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        for r in records {
            codec::encode(r, &mut out);
        }
        out.to_vec()
    }

    /// A driver's first run on the hand-over thread (`first_run`): a
    /// session that run ended comes back as its end, and one left waiting
    /// on a socket is woken in its task by what arrived after that run,
    /// though the run's own waker was a no-op.
    #[tokio::test]
    async fn a_first_run_hands_its_task_the_end_or_a_driver_still_woken() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ended = first_run(Box::pin(async { 7u8 }));
        assert_eq!(ended.await, 7);

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut near = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut far, _) = l.accept().await.unwrap();
        let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = polled.clone();
        let run = first_run(Box::pin(async move {
            seen.store(true, Ordering::Relaxed);
            let mut b = [0u8; 1];
            far.read_exact(&mut b).await.unwrap();
            b[0]
        }));
        assert!(
            polled.load(Ordering::Relaxed),
            "the first run happened here"
        );
        // Readable only after the no-op-woken run registered interest.
        near.write_all(b"x").await.unwrap();
        let task = tokio::spawn(run);
        let got = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task saw what arrived after the first run")
            .unwrap();
        assert_eq!(got, b'x');
    }

    #[test]
    fn carried_replication_records_must_rebuild_exactly_this_session() {
        let (a, b) = (SessionId(1), SessionId(2));
        let read = |id| Record::Read {
            id,
            offset: 0,
            data: bytes::Bytes::from_static(b"x"),
        };
        let ok = encoded(&[new_session(a), read(a)]);
        assert_eq!(replication_records(&ok, a).unwrap().len(), 2);
        let refused = |bytes: &[u8], id| replication_records(bytes, id).unwrap_err();
        assert!(refused(&ok, b).contains("do not start with this session"));
        assert!(refused(&encoded(&[read(a)]), a).contains("do not start"));
        assert!(refused(&encoded(&[new_session(a), read(b)]), a).contains("not about this session"));
        assert!(
            refused(&encoded(&[new_session(a), Record::Closed { id: a }]), a)
                .contains("not about this session")
        );
        assert!(refused(&ok[..ok.len() - 1], a).contains("truncated"));
        assert!(refused(&[0xee; 16], a).starts_with("replication records"));
    }
}
