//! Prometheus metrics on an explicit [`Registry`] (never the global one).
//!
//! Every name is a constant with the `holdfast_` prefix; labels come only
//! from configured names (listener, backend) or fixed enums (reasons,
//! directions), never from an address or a session id. Sessions get
//! pre-labelled handles ([`ListenerMetrics`], [`BackendMetrics`]) so the hot
//! path never looks a label up. This module owns no sockets: `admin` serves
//! the text format.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const CLIENT_CONNECTIONS_ACCEPTED: &str = "holdfast_client_connections_accepted_total";
pub const CLIENT_CONNECTIONS_REJECTED: &str = "holdfast_client_connections_rejected_total";
pub const SESSIONS: &str = "holdfast_sessions";
pub const SESSIONS_HELD: &str = "holdfast_sessions_held";
pub const SESSIONS_CLOSED: &str = "holdfast_sessions_closed_total";
pub const BYTES: &str = "holdfast_bytes_total";
pub const SERVER_CONNECT_ATTEMPTS: &str = "holdfast_server_connect_attempts_total";
pub const SERVER_CONNECT_FAILURES: &str = "holdfast_server_connect_failures_total";
pub const SERVER_CONNECT_DURATION: &str = "holdfast_server_connect_duration_seconds";
pub const LEGS_FAILED: &str = "holdfast_legs_failed_total";
pub const RESUMES: &str = "holdfast_resumes_total";
pub const REPLAYED_BYTES: &str = "holdfast_replayed_bytes_total";
pub const EARLY_DATA_BYTES: &str = "holdfast_early_data_bytes_total";
pub const REPLAY_BUFFER_BYTES: &str = "holdfast_replay_buffer_bytes";
pub const HOLD_DURATION: &str = "holdfast_hold_duration_seconds";
pub const CLIENT_RESETS: &str = "holdfast_client_resets_total";
pub const FAILOVER_GAP: &str = "holdfast_failover_gap_total";
pub const CONFIG_RELOADS: &str = "holdfast_config_reloads_total";
pub const BUILD_INFO: &str = "holdfast_build_info";
pub const BUFFER_MEMORY_FULL: &str = "holdfast_buffer_memory_full_total";
pub const BUFFER_MEMORY_LIMIT: &str = "holdfast_buffer_memory_limit_bytes";
pub const THREAD_SESSIONS: &str = "holdfast_thread_sessions";

/// Why a client connection was refused at accept.
pub const REJECT_MAX_SESSIONS: &str = "max_sessions";
/// A client's TLS handshake failed (bad or no certificate, plaintext, ...).
pub const REJECT_TLS_HANDSHAKE: &str = "tls_handshake";
/// A client did not finish its TLS handshake in `handshake_timeout`.
pub const REJECT_TLS_TIMEOUT: &str = "tls_timeout";
/// The client's IP address had `max_sessions_per_client` open sessions on
/// the listener.
pub const REJECT_PER_CLIENT: &str = "per_client_limit";
/// Moving an accepted client to a less busy session thread failed (its
/// socket could not leave one thread's epoll or join the other's).
pub const REJECT_THREAD_MOVE: &str = "thread_move";
/// The process was within `fd_reserve` descriptors of `RLIMIT_NOFILE`.
pub const REJECT_FD_RESERVE: &str = "fd_reserve";

/// Every metric holdfast exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    accepted: IntCounterVec,
    rejected: IntCounterVec,
    sessions: IntGaugeVec,
    held: IntGaugeVec,
    closed: IntCounterVec,
    bytes: IntCounterVec,
    connect_attempts: IntCounterVec,
    connect_failures: IntCounterVec,
    connect_duration: HistogramVec,
    legs_failed: IntCounterVec,
    resumes: IntCounterVec,
    replayed: IntCounterVec,
    early_data: IntCounterVec,
    replay_buffer: IntGaugeVec,
    hold_duration: HistogramVec,
    client_resets: IntCounterVec,
    failover_gap: IntCounterVec,
    reloads: IntCounterVec,
    memory_full: IntCounter,
    memory_limit: IntGauge,
    thread_sessions: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Exponential buckets from 100 µs to about 10 s.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0001, 2.0, 18).expect("valid buckets")
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            r.register(Box::new(c.clone())).expect("register");
            c
        }
        fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric");
            r.register(Box::new(g.clone())).expect("register");
            g
        }
        fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(latency_buckets()),
                labels,
            )
            .expect("metric");
            r.register(Box::new(h.clone())).expect("register");
            h
        }
        let r = &registry.clone();
        let m = Metrics {
            accepted: counter(
                r,
                CLIENT_CONNECTIONS_ACCEPTED,
                "Client connections accepted.",
                &["listener"],
            ),
            rejected: counter(
                r,
                CLIENT_CONNECTIONS_REJECTED,
                "Client connections refused at accept.",
                &["listener", "reason"],
            ),
            sessions: gauge(r, SESSIONS, "Sessions open now.", &["listener"]),
            held: gauge(
                r,
                SESSIONS_HELD,
                "Open sessions with no working leg.",
                &["backend"],
            ),
            closed: counter(
                r,
                SESSIONS_CLOSED,
                "Sessions ended, by reason.",
                &["listener", "reason"],
            ),
            bytes: counter(
                r,
                BYTES,
                "Bytes read from clients (up) and delivered to clients (down).",
                &["listener", "direction"],
            ),
            connect_attempts: counter(
                r,
                SERVER_CONNECT_ATTEMPTS,
                "Connect attempts to servers.",
                &["backend"],
            ),
            connect_failures: counter(
                r,
                SERVER_CONNECT_FAILURES,
                "Failed connect attempts to servers.",
                &["backend", "reason"],
            ),
            connect_duration: histogram(
                r,
                SERVER_CONNECT_DURATION,
                "Time to connect to a server.",
                &["backend"],
            ),
            legs_failed: counter(
                r,
                LEGS_FAILED,
                "Server connections that failed under a session.",
                &["backend", "reason"],
            ),
            resumes: counter(r, RESUMES, "Sessions resumed on a new leg.", &["backend"]),
            early_data: counter(
                r,
                EARLY_DATA_BYTES,
                "Bytes sent to resume-protocol servers with a new session's HELLO (early data).",
                &["backend"],
            ),
            replayed: counter(
                r,
                REPLAYED_BYTES,
                "Bytes sent again on a new leg.",
                &["backend", "direction"],
            ),
            replay_buffer: gauge(
                r,
                REPLAY_BUFFER_BYTES,
                "Bytes held in replay buffers.",
                &["backend"],
            ),
            hold_duration: histogram(
                r,
                HOLD_DURATION,
                "Time from a leg failure to the session resumed.",
                &["backend"],
            ),
            client_resets: counter(
                r,
                CLIENT_RESETS,
                "Client connections holdfast closed with a reset (should stay 0).",
                &["listener", "cause"],
            ),
            failover_gap: counter(
                r,
                FAILOVER_GAP,
                "Sessions a standby took over and closed with a reset: client bytes were acknowledged by the dead active and never replicated.",
                &["listener"],
            ),
            reloads: counter(r, CONFIG_RELOADS, "Configuration reloads.", &["result"]),
            memory_full: {
                let c = IntCounter::new(
                    BUFFER_MEMORY_FULL,
                    "Times [limits] buffer_memory was reached (sessions then stop reading their clients).",
                )
                .expect("metric");
                r.register(Box::new(c.clone())).expect("register");
                c
            },
            memory_limit: {
                let g =
                    IntGauge::new(BUFFER_MEMORY_LIMIT, "[limits] buffer_memory.").expect("metric");
                r.register(Box::new(g.clone())).expect("register");
                g
            },
            thread_sessions: gauge(
                r,
                THREAD_SESSIONS,
                "Sessions running on each session thread ([runtime] scheduler = \"per-thread\").",
                &["thread"],
            ),
            registry,
        };
        let build = gauge(r, BUILD_INFO, "holdfast build information.", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8")
    }

    /// Handles for one listener.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics(std::sync::Arc::new(ListenerHandles {
            metrics: self.clone(),
            name: name.into(),
            accepted: self.accepted.with_label_values(&[name]),
            sessions: self.sessions.with_label_values(&[name]),
            bytes_up: self.bytes.with_label_values(&[name, "up"]),
            bytes_down: self.bytes.with_label_values(&[name, "down"]),
        }))
    }

    /// Handles for one backend.
    pub fn backend(&self, name: &str) -> BackendMetrics {
        BackendMetrics {
            metrics: self.clone(),
            name: name.to_string(),
            held: self.held.with_label_values(&[name]),
            connect_attempts: self.connect_attempts.with_label_values(&[name]),
            connect_duration: self.connect_duration.with_label_values(&[name]),
            resumes: self.resumes.with_label_values(&[name]),
            early_data: self.early_data.with_label_values(&[name]),
            replayed_up: self.replayed.with_label_values(&[name, "up"]),
            replay_buffer: self.replay_buffer.with_label_values(&[name]),
            hold_duration: self.hold_duration.with_label_values(&[name]),
        }
    }

    /// `[limits] buffer_memory` reached: count it.
    pub fn buffer_memory_full(&self) {
        self.memory_full.inc();
    }

    /// Publishes `[limits] buffer_memory`.
    pub fn set_buffer_memory_limit(&self, bytes: u64) {
        self.memory_limit.set(bytes.min(i64::MAX as u64) as i64);
    }

    /// The session count of session thread `i`.
    pub fn thread_sessions(&self, i: usize) -> IntGauge {
        self.thread_sessions.with_label_values(&[&i.to_string()])
    }

    /// A configuration reload finished (`result`: `ok` or `error`).
    pub fn reload(&self, result: &str) {
        self.reloads.with_label_values(&[result]).inc();
    }
}

/// Pre-labelled metrics of one listener. Every session holds a clone, so
/// it is one `Arc` (a clone of the handles themselves was about 25 atomic
/// increments, a `String` and 200 bytes per session).
#[derive(Clone)]
pub struct ListenerMetrics(std::sync::Arc<ListenerHandles>);

impl std::ops::Deref for ListenerMetrics {
    type Target = ListenerHandles;

    fn deref(&self) -> &ListenerHandles {
        &self.0
    }
}

/// The handles a [`ListenerMetrics`] shares.
pub struct ListenerHandles {
    metrics: Metrics,
    name: std::sync::Arc<str>,
    pub accepted: IntCounter,
    pub sessions: IntGauge,
    pub bytes_up: IntCounter,
    pub bytes_down: IntCounter,
}

impl ListenerHandles {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name, shared (a session's status keeps it).
    pub fn shared_name(&self) -> std::sync::Arc<str> {
        self.name.clone()
    }

    /// The process-wide metrics these handles belong to.
    pub fn all(&self) -> &Metrics {
        &self.metrics
    }

    pub fn rejected(&self, reason: &str) {
        self.metrics
            .rejected
            .with_label_values(&[&*self.name, reason])
            .inc();
    }

    pub fn closed(&self, reason: &str) {
        self.metrics
            .closed
            .with_label_values(&[&*self.name, reason])
            .inc();
    }

    /// A session taken over across a gap was closed (docs/failover.md).
    pub fn failover_gap(&self) {
        self.metrics
            .failover_gap
            .with_label_values(&[&*self.name])
            .inc();
    }

    pub fn client_reset(&self, cause: &str) {
        self.metrics
            .client_resets
            .with_label_values(&[&*self.name, cause])
            .inc();
    }
}

/// Pre-labelled metrics of one backend.
#[derive(Clone)]
pub struct BackendMetrics {
    metrics: Metrics,
    name: String,
    pub held: IntGauge,
    pub connect_attempts: IntCounter,
    pub connect_duration: Histogram,
    pub resumes: IntCounter,
    pub replayed_up: IntCounter,
    pub early_data: IntCounter,
    pub replay_buffer: IntGauge,
    pub hold_duration: Histogram,
}

impl BackendMetrics {
    pub fn connect_failed(&self, reason: &str) {
        self.metrics
            .connect_failures
            .with_label_values(&[&self.name, reason])
            .inc();
    }

    pub fn leg_failed(&self, reason: &str) {
        self.metrics
            .legs_failed
            .with_label_values(&[&self.name, reason])
            .inc();
    }
}
