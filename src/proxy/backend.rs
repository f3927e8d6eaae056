//! Per-backend state shared by the sessions of every listener that uses it:
//! round robin, the count of held sessions, and the prober that notices a
//! server coming back within milliseconds.
//!
//! While any session of a backend is held, one prober task tries the
//! backend's servers every `2 × retry_initial` (2 ms by default). When a
//! connect succeeds it parks that connection for the next session that wants
//! the server (so the server sees no stray connection) and tells every held
//! session, which retries at once instead of waiting out its backoff. One
//! cheap probe per backend replaces thousands of fast per-session retries.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::BackendConfig;
use crate::metrics::BackendMetrics;
use crate::transport::{self, Conn};

/// A backend as the running proxy sees it.
pub struct Backend {
    pub config: Arc<BackendConfig>,
    pub metrics: BackendMetrics,
    /// Round robin across sessions.
    next_server: AtomicUsize,
    /// Sessions of this backend that lost their server (what
    /// `max_held_sessions` bounds; a first connect in flight is not one).
    holding: AtomicUsize,
    /// A refusal to hold was warned about and none was admitted since (one
    /// warning per burst).
    refusing: AtomicBool,
    /// Woken when `holding` leaves 0.
    holding_changed: Notify,
    /// A connection the prober made, per server, for the next taker.
    ready: Mutex<Vec<Option<Conn>>>,
    /// Bumped with the server's index each time a server is found up.
    up: watch::Sender<(u64, usize)>,
    /// Resume protocol, per server: its last WELCOME chose version 2, so a
    /// new session's first bytes may go with its HELLO (early data).
    speaks_v2: Vec<AtomicBool>,
    /// Set when a reload changed this backend's settings: new legs of live
    /// sessions move to it.
    successor: Mutex<Option<Arc<Backend>>>,
    /// Stops the prober.
    stop: CancellationToken,
}

impl Backend {
    pub fn new(config: Arc<BackendConfig>, metrics: BackendMetrics) -> Arc<Backend> {
        let n = config.servers.len();
        Arc::new(Backend {
            config,
            metrics,
            next_server: AtomicUsize::new(0),
            holding: AtomicUsize::new(0),
            refusing: AtomicBool::new(false),
            holding_changed: Notify::new(),
            ready: Mutex::new((0..n).map(|_| None).collect()),
            up: watch::channel((0, 0)).0,
            speaks_v2: (0..n).map(|_| AtomicBool::new(false)).collect(),
            successor: Mutex::new(None),
            stop: CancellationToken::new(),
        })
    }

    /// Whether a new session's leg to `server` may send early data: the
    /// backend allows it (`resume.early_data`) and the server's last
    /// WELCOME chose version 2.
    pub fn early_data(&self, server: usize) -> bool {
        matches!(&self.config.ack, crate::config::AckMode::Resume(s) if s.early_data)
            && self
                .speaks_v2
                .get(server)
                .is_some_and(|v| v.load(Ordering::Relaxed))
    }

    /// A WELCOME from `server` chose `version` (an index past this
    /// backend's servers, from before a reload, is ignored).
    pub fn welcomed(&self, server: usize, version: u8) {
        if let Some(v) = self.speaks_v2.get(server) {
            v.store(version >= 2, Ordering::Relaxed);
        }
    }

    /// A reload replaced this backend: live sessions take `new` at their next
    /// leg; this one stops probing.
    pub fn replace_with(&self, new: Arc<Backend>) {
        if let Ok(mut s) = self.successor.lock() {
            *s = Some(new);
        }
        self.stop.cancel();
    }

    /// The newest backend that replaced this one, if any.
    pub fn successor(&self) -> Option<Arc<Backend>> {
        let next = self.successor.lock().ok()?.clone()?;
        Some(next.successor().unwrap_or(next))
    }

    /// Stops the prober (the backend is gone from the config, or holdfast
    /// is stopping).
    pub fn stop_probe(&self) {
        self.stop.cancel();
    }

    /// The first server for a new session (round robin).
    pub fn pick_server(&self) -> usize {
        self.next_server.fetch_add(1, Ordering::Relaxed) % self.config.servers.len().max(1)
    }

    /// A session has no working leg now (`held`), or has one again: the
    /// `holdfast_sessions_held` gauge.
    pub fn set_held(&self, held: bool) {
        if held {
            self.metrics.held.inc();
        } else {
            self.metrics.held.dec();
        }
    }

    /// A session lost its server and must hold: counts it, unless the
    /// backend already has `max_held_sessions` holding (then `false`: the
    /// session is to be closed instead).
    pub fn try_start_holding(&self) -> bool {
        let max = self.config.max_held_sessions.unwrap_or(usize::MAX);
        let before = self
            .holding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        let ok = before.is_ok();
        if before == Ok(0) {
            // The prober has someone to probe for.
            self.holding_changed.notify_one();
        }
        if ok {
            self.refusing.store(false, Ordering::Relaxed);
        } else if !self.refusing.swap(true, Ordering::Relaxed) {
            tracing::warn!(backend = %self.config.name, limit = max, "max_held_sessions reached: sessions that lose their server are closed (too_many_held) until one resumes");
        }
        ok
    }

    /// A session counted by [`Backend::try_start_holding`] stopped holding.
    pub fn stop_holding(&self) {
        self.holding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Sessions that lost their server (or failed their first connect)
    /// and wait for one: what the prober works for.
    fn holding(&self) -> usize {
        self.holding.load(Ordering::Acquire)
    }

    /// A probed connection to `server`, if one is waiting.
    pub fn take_ready(&self, server: usize) -> Option<Conn> {
        self.ready.lock().ok()?.get_mut(server)?.take()
    }

    /// Tells held sessions that `server` accepted a connection.
    pub fn announce_up(&self, server: usize) {
        self.up.send_modify(|(epoch, s)| {
            *epoch += 1;
            *s = server;
        });
    }

    /// A receiver for "server is up" announcements.
    pub fn subscribe(&self) -> watch::Receiver<(u64, usize)> {
        self.up.subscribe()
    }

    /// Probes the servers while sessions hold (lost their server or failed
    /// to connect), until `stop`. A session in its first connect is no
    /// reason: probing for it opened (and closed) a second connection to
    /// the server per new session.
    pub async fn probe(self: Arc<Self>) {
        let stop = self.stop.clone();
        let interval = (self.config.retry_initial * 2).max(Duration::from_millis(1));
        // Announce only a server that was down at its previous probe (or at
        // the first): one that accepts and then fails sessions must not make
        // them skip their backoff.
        let mut was_down = vec![true; self.config.servers.len()];
        loop {
            while self.holding() == 0 {
                // Nobody waits: drop parked connections, sleep until someone holds.
                if let Ok(mut r) = self.ready.lock() {
                    r.iter_mut().for_each(|c| *c = None);
                }
                let notified = self.holding_changed.notified();
                if self.holding() > 0 {
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = notified => {}
                }
            }
            for (i, endpoint) in self.config.servers.iter().enumerate() {
                let parked = self.ready.lock().map(|r| r[i].is_some()).unwrap_or(true);
                if parked {
                    continue;
                }
                let attempt =
                    transport::connect(endpoint, &self.config.socket, self.config.connect_timeout);
                let res = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = attempt => r,
                };
                match res {
                    Ok(conn) => {
                        if let Ok(mut r) = self.ready.lock() {
                            r[i] = Some(conn);
                        }
                        if was_down[i] {
                            tracing::debug!(backend = %self.config.name, server.addr = %endpoint, "probe: server is up");
                            self.announce_up(i);
                        }
                        was_down[i] = false;
                    }
                    Err(_) => was_down[i] = true,
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
