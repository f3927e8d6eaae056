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

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, Endpoint, ListenerConfig};
use crate::lifecycle::{Phase, Shutdown};
use crate::metrics::{Metrics, REJECT_MAX_SESSIONS};
use crate::session::driver::{Driver, SessionCtx, Shared};
use crate::session::{SessionCore, SessionId};
use crate::transport::{self, BindError, Conn, Listener};

pub mod backend;

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

/// Binds every listener of `config` (all or nothing).
pub async fn bind(config: &Config) -> Result<Bound, BindError> {
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        listeners.push(Listener::bind(&l.listen).await?);
    }
    let admin = match &config.admin {
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
    run_with(config, bound, shutdown, phase, Runtime::default()).await
}

/// What a running proxy shares with the admin endpoint and embedders.
#[derive(Clone)]
pub struct Runtime {
    pub metrics: Metrics,
    pub shared: Arc<Shared>,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            metrics: Metrics::new(),
            shared: Arc::new(Shared::new(u64::MAX)),
        }
    }
}

impl Runtime {
    /// A runtime for `config` (its global buffer memory limit).
    pub fn for_config(config: &Config) -> Runtime {
        Runtime {
            metrics: Metrics::new(),
            shared: Arc::new(Shared::new(config.limits.buffer_memory)),
        }
    }
}

/// [`run`] with a given [`Runtime`] (metrics registry and session registry),
/// so the admin endpoint and tests can see into it.
pub async fn run_with(
    config: Config,
    bound: Bound,
    shutdown: Shutdown,
    phase: watch::Sender<Phase>,
    rt: Runtime,
) -> io::Result<()> {
    let shared = if rt.shared.buffer_limit == config.limits.buffer_memory {
        rt.shared.clone()
    } else {
        Arc::new(Shared::new(config.limits.buffer_memory))
    };
    let backends: Vec<Arc<Backend>> = config
        .backends
        .iter()
        .map(|b| Backend::new(Arc::new(b.clone()), rt.metrics.backend(&b.name)))
        .collect();
    let stop_probers = CancellationToken::new();
    if let Some(admin) = bound.admin {
        tracing::info!(addr = %admin.local_addr()?, "admin endpoint listening");
        let rt = Runtime {
            metrics: rt.metrics.clone(),
            shared: shared.clone(),
        };
        tokio::spawn(crate::admin::serve(
            admin,
            rt,
            phase.subscribe(),
            stop_probers.clone(),
        ));
    }
    for b in &backends {
        tokio::spawn(b.clone().probe(stop_probers.clone()));
    }
    let sessions = TaskTracker::new();
    let close_sessions = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut accept_loops = Vec::new();
    for (listener, cfg) in bound.listeners.into_iter().zip(config.listeners.iter()) {
        tracing::info!(listener = %cfg.name, addr = %listener.local_endpoint(), "listening");
        let ctx = AcceptCtx {
            listener_name: Arc::from(cfg.name.as_str()),
            session: SessionCtx {
                backend: backends[cfg.backend].clone(),
                listener: rt.metrics.listener(&cfg.name),
                shared: shared.clone(),
            },
            sessions: sessions.clone(),
            close_sessions: close_sessions.clone(),
            open: open.clone(),
            max_sessions: config.limits.max_sessions,
            cfg: cfg.clone(),
        };
        accept_loops.push(tokio::spawn(accept_loop(
            listener,
            ctx,
            stop_accepting.clone(),
        )));
    }
    tracing::info!(
        listeners = config.listeners.len(),
        backends = config.backends.len(),
        "holdfast running"
    );
    phase.send_replace(Phase::Running);

    tokio::select! {
        _ = shutdown.drain.cancelled() => {}
        _ = shutdown.stop.cancelled() => {}
    }
    stop_accepting.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    sessions.close();
    if !shutdown.stop.is_cancelled() {
        phase.send_replace(Phase::Draining);
        let drain = config.lifecycle.drain_timeout;
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
    close_sessions.cancel();
    if tokio::time::timeout(STOP_GRACE, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = open.load(Ordering::Relaxed),
            "sessions still open after the stop grace; exiting anyway"
        );
    }
    stop_probers.cancel();
    phase.send_replace(Phase::Stopped);
    tracing::info!("holdfast stopped");
    Ok(())
}

struct AcceptCtx {
    listener_name: Arc<str>,
    session: SessionCtx,
    sessions: TaskTracker,
    close_sessions: CancellationToken,
    open: Arc<AtomicUsize>,
    max_sessions: usize,
    cfg: ListenerConfig,
}

async fn accept_loop(listener: Listener, ctx: AcceptCtx, stop: CancellationToken) {
    let mut out_of_fds = false;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((conn, peer)) => {
                out_of_fds = false;
                start_session(&ctx, conn, peer);
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

fn start_session(ctx: &AcceptCtx, conn: Conn, peer: String) {
    let lm = &ctx.session.listener;
    if ctx.open.load(Ordering::Relaxed) >= ctx.max_sessions {
        lm.rejected(REJECT_MAX_SESSIONS);
        tracing::warn!(listener = %ctx.listener_name, client.addr = %peer, limit = ctx.max_sessions, "max_sessions reached: refusing client");
        return;
    }
    lm.accepted.inc();
    if let Conn::Tcp(s) = &conn {
        if let Err(e) = transport::apply_tcp_options(socket2::SockRef::from(s), &ctx.cfg.socket) {
            tracing::debug!(error = %e, "setting client socket options failed");
        }
    }
    let backend = ctx.session.backend.config.clone();
    let first = ctx.session.backend.pick_server();
    let id = SessionId::random();
    let now = tokio::time::Instant::now().into_std();
    let core = SessionCore::new(id, backend.clone(), first, now);
    let driver = Driver::new(
        core,
        conn,
        peer.clone(),
        ctx.session.clone(),
        ctx.close_sessions.child_token(),
    );
    let lm = lm.clone();
    let span = tracing::info_span!("session", session.id = %id, listener = %ctx.listener_name, backend = %backend.name);
    let open = ctx.open.clone();
    open.fetch_add(1, Ordering::Relaxed);
    ctx.sessions.spawn(
        async move {
            tracing::info!(client.addr = %peer, "session opened");
            lm.sessions.inc();
            let s = driver.run().await;
            open.fetch_sub(1, Ordering::Relaxed);
            lm.sessions.dec();
            lm.closed(s.reason.as_str());
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
                "session closed"
            );
        }
        .instrument(span),
    );
}
