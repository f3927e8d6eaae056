//! Configuration: the TOML file an operator writes, turned into a fully typed
//! [`Config`] with no "must be Some at runtime" options.
//!
//! Two layers (see STYLE.md §5): `raw` mirrors the TOML with serde and spans,
//! `validate` is a pure step that checks everything and reports every error at
//! once with its key path and line:column. `units` parses sizes, durations and
//! endpoints. This module owns no sockets: binding and connecting live in
//! `transport`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

pub use crate::transport::tls::{CertKey, SniName};

mod raw;
mod units;
mod validate;

pub use units::{parse_duration, parse_size, Endpoint};
pub use validate::{load, parse, ConfigError, ConfigErrors};

/// A validated holdfast configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[admin]`: the admin HTTP endpoint; `None` when the table is absent.
    pub admin: Option<AdminConfig>,
    /// `[limits]`: process-wide limits.
    pub limits: Limits,
    /// `[lifecycle]`: shutdown behaviour.
    pub lifecycle: Lifecycle,
    /// `[runtime]`: the async runtime's threads (read at start only).
    pub runtime: RuntimeConfig,
    /// `[log]`: the access log.
    pub log: LogConfig,
    /// `[handover]`: where a running holdfast hands its listeners to a new
    /// process; `None` when the table is absent (no hand-over).
    pub handover: Option<HandoverConfig>,
    /// `[failover]`: host failover to a standby holdfast (docs/failover.md);
    /// `None` when the table is absent.
    pub failover: Option<FailoverConfig>,
    /// `[[listener]]` tables, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// `[[backend]]` tables, in file order.
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// `listen`: address of the admin HTTP endpoint (TCP only).
    pub listen: Endpoint,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HandoverConfig {
    /// `socket`: path of the Unix socket a running holdfast listens on for
    /// `holdfast run --takeover` (mode 0600, in a directory only we can use).
    pub socket: std::path::PathBuf,
    /// `busy_within` (default 100 ms): a session that moved bytes to or
    /// from its client this recently is handed over alone, with nothing
    /// queued ahead of it; the others go in pipelined batches. Zero hands
    /// every session over in batches.
    pub busy_within: std::time::Duration,
}

/// `[failover]`, validated: the secret read, the addresses parsed, the
/// covered listeners resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverConfig {
    pub role: FailoverRole,
    /// `secret_file`: the key both ends prove on the replication link (at
    /// least 32 bytes, as for the resume protocol).
    pub key: Secret,
    /// `heartbeat_interval` (default 10 ms): the active sends a heartbeat
    /// (with the acknowledged offsets) at least this often.
    pub heartbeat_interval: Duration,
    /// `dead_peer_timeout` (default 100 ms): the standby takes over when the
    /// active was silent this long. Longer than `heartbeat_interval`.
    pub dead_peer_timeout: Duration,
    /// `listeners`: indexes into [`Config::listeners`] of the listeners whose
    /// client connections a standby takes over (default: every plain TCP
    /// listener).
    pub listeners: Vec<usize>,
}

/// Which end of the replication link this holdfast is.
#[derive(Debug, Clone, PartialEq)]
pub enum FailoverRole {
    /// Serves clients and streams session state to `peer` (`host:port`, the
    /// standby's `listen`).
    Active { peer: String },
    /// Listens for the active on `listen` (`host:port`) and claims
    /// `service_address` on `interface` when it dies.
    Standby {
        listen: String,
        service_address: std::net::Ipv4Addr,
        /// The prefix length the address is added with (`/24` in
        /// `service_address = "10.0.0.100/24"`; 32 when none is written).
        prefix: u8,
        interface: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// `buffer_memory`: bytes held in replay buffers across all sessions
    /// (default 256 MiB). A session that would exceed it stops reading from its
    /// client until memory is released.
    pub buffer_memory: u64,
    /// `max_sessions`: open sessions across all listeners (default 10,000).
    pub max_sessions: usize,
    /// `fd_reserve`: file descriptors kept free for server connections
    /// (default 64). Within this many of `RLIMIT_NOFILE`, new clients are
    /// closed at once so that reconnects to servers never run out.
    pub fd_reserve: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    /// `drain_timeout`: on SIGTERM, how long open sessions may run before they
    /// are closed (default 30 s).
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuntimeConfig {
    /// `worker_threads`: threads that run sessions; `None` (the default) is
    /// one per CPU the process may use; 1 is tokio's current-thread
    /// scheduler. Read at start: a reload does not change it.
    pub worker_threads: Option<usize>,
    /// `scheduler`: how sessions are spread over the threads; unset,
    /// per-thread unless a listener speaks the resume protocol.
    pub scheduler: Scheduler,
}

/// `[runtime] scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduler {
    /// `"per-thread"`: a current-thread runtime on each thread; every
    /// thread accepts clients and runs the sessions it accepted.
    #[default]
    PerThread,
    /// `"work-stealing"`: tokio's multi-thread runtime; sessions move
    /// between threads as they become ready.
    WorkStealing,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogConfig {
    /// `access`: one JSON line per session end, to `"stdout"` or a file
    /// (appended); `None` (the default) writes none.
    pub access: Option<AccessLog>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Stdout,
    File(std::path::PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: Endpoint,
    /// Index into [`Config::backends`].
    pub backend: usize,
    pub protocol: ListenerProtocol,
    pub socket: SocketOptions,
    /// `tls`: clients speak TLS to this listener; `None` for plain TCP.
    pub tls: Option<ListenerTls>,
    /// `sni`: backends (and certificates) chosen by the client's SNI name;
    /// needs `tls`. A name that matches no entry goes to `backend`.
    pub sni: Vec<SniRoute>,
    /// `max_sessions`: open sessions of this listener; `None` (the default)
    /// leaves only `[limits] max_sessions`.
    pub max_sessions: Option<usize>,
    /// `max_sessions_per_client`: open sessions of this listener from one
    /// client IP address; `None` (the default) is unlimited.
    pub max_sessions_per_client: Option<usize>,
    /// `idle_timeout`: a session with no byte in either direction for this
    /// long is closed gracefully; `None` (the default) never.
    pub idle_timeout: Option<Duration>,
}

/// A listener's `tls` table, with its files read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    /// `cert`, `key`: the default certificate chain and key (PEM files).
    pub cert: PathBuf,
    pub key: PathBuf,
    pub pair: CertKey,
    /// `client_ca`: clients must present a certificate signed by one of
    /// these (PEM); `None` asks for no client certificate.
    pub client_ca: Option<PathBuf>,
    pub client_ca_certs: Vec<CertificateDer<'static>>,
    /// `min_version`: `"1.2"` (default) or `"1.3"`.
    pub min_version: TlsVersion,
    /// `alpn`: protocols offered, in preference order (default none).
    pub alpn: Vec<String>,
    /// `handshake_timeout` (default 10 s).
    pub handshake_timeout: Duration,
    /// The rustls config built from the fields above.
    pub server: Built<rustls::ServerConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// One `[[listener.sni]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SniRoute {
    /// `name`: `"host.example.com"` or `"*.example.com"`.
    pub name: SniName,
    /// `backend`: index into [`Config::backends`]; `None` keeps the
    /// listener's backend.
    pub backend: Option<usize>,
    /// `cert` + `key`: the certificate for this name; `None` uses the
    /// listener's.
    pub pair: Option<CertKey>,
}

/// A backend's `tls` table: holdfast speaks TLS to its servers.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendTls {
    /// `ca`: the CA certificates (PEM) that server certificates must chain to.
    pub ca: PathBuf,
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// The name each server's certificate must carry, per server
    /// (`server_name`, or the host of the server's address).
    pub server_names: Vec<ServerName<'static>>,
    /// `cert` + `key`: holdfast's client certificate, for mutual TLS.
    pub client: Option<(PathBuf, PathBuf, CertKey)>,
    /// `alpn`: protocols offered to servers (default none).
    pub alpn: Vec<String>,
    /// The rustls config built from the fields above.
    pub client_config: Built<rustls::ClientConfig>,
}

/// Something built from the other fields of its struct (a rustls config):
/// shared, and ignored by `==`, which compares what it was built from.
#[derive(Clone)]
pub struct Built<T>(pub Arc<T>);

impl<T> PartialEq for Built<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> std::fmt::Debug for Built<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Built(..)")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ListenerProtocol {
    Tcp,
    /// The resume protocol: an edge holdfast (or any initiator of
    /// docs/protocol.md) connects; sessions survive its transport breaking.
    Resume(ResumeSettings),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendProtocol {
    Tcp,
    /// The resume protocol (docs/protocol.md): the server acknowledges.
    Resume,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    /// At least one; tried round robin across sessions, next on failure.
    pub servers: Vec<Endpoint>,
    pub protocol: BackendProtocol,
    /// `ack` (+ `framing` for `response`).
    pub ack: AckMode,
    /// `buffer_limit`: replay buffer bytes per session (default 1 MiB).
    pub buffer_limit: u64,
    /// `hold_timeout`: how long a session waits with no server (default 30 s).
    pub hold_timeout: Duration,
    /// `connect_timeout`: per connect attempt (default 1 s).
    pub connect_timeout: Duration,
    /// `retry_initial`: first reconnect delay (default 1 ms).
    pub retry_initial: Duration,
    /// `retry_max`: cap of the exponential reconnect backoff (default 200 ms).
    pub retry_max: Duration,
    /// `on_server_close`: what a server close does to a session.
    pub on_server_close: OnServerClose,
    /// `greeting`: response frames a server sends on connect (response mode).
    pub greeting: u32,
    /// `preamble`: the session's first N requests, re-sent on every later leg.
    pub preamble: u32,
    /// `retry_responses`: response prefixes meaning "not processed, try again".
    pub retry_responses: Vec<Vec<u8>>,
    /// `max_held_sessions`: sessions of this backend that may hold at once;
    /// beyond it a session that would have to hold is closed instead
    /// (`too_many_held`). `None` (the default) is unlimited.
    pub max_held_sessions: Option<usize>,
    /// `splice`: with `ack = "none"`, move bulk between plain TCP
    /// connections with splice(2), not through user space (default true;
    /// always false for the other modes).
    pub splice: bool,
    pub socket: SocketOptions,
    /// `tls`: TLS to the servers; `None` for plain TCP.
    pub tls: Option<BackendTls>,
}

/// How holdfast learns that a server consumed bytes (DESIGN.md, "Ack source").
#[derive(Debug, Clone, PartialEq)]
pub enum AckMode {
    None,
    Tcp,
    Response(Framing),
    /// `protocol = "resume"`: the server says what it consumed.
    Resume(ResumeSettings),
}

/// `resume = { ... }` of a backend speaking the resume protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeSettings {
    /// The shared key from `secret_file` (at least 32 bytes).
    pub key: Secret,
    /// `heartbeat_interval` (default 1 s): a PING after this long idle.
    pub heartbeat_interval: Duration,
    /// `dead_peer_timeout` (default 3 s): a silent server's leg is dead.
    pub dead_peer_timeout: Duration,
    /// `max_frame` (default 64 KiB): largest DATA frame accepted.
    pub max_frame: u32,
    /// `window` (default 4 MiB): unacknowledged bytes the server may send.
    pub window: u32,
    /// Listeners only: `resume_timeout` (default 5 min), how long a session
    /// whose initiator's transport broke waits for it to resume.
    pub resume_timeout: Duration,
    /// Backends only: `early_data` (default true), a new session's first
    /// bytes go with its HELLO to a server known to speak version 2.
    pub early_data: bool,
}

/// Key material: compared and cloned, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Framing {
    /// LF or CRLF terminated lines.
    Lines {
        max_frame: usize,
    },
    LengthPrefixed(LengthPrefixed),
    /// Redis RESP2.
    Resp {
        max_frame: usize,
    },
}

/// The knobs of tokio-util's `LengthDelimitedCodec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthPrefixed {
    /// Bytes before the length field (default 0).
    pub length_field_offset: usize,
    /// Width of the length field: 1, 2, 4 or 8 (default 4).
    pub length_field_length: usize,
    /// Big endian (default true).
    pub big_endian: bool,
    /// Added to the length field to get the bytes that follow it (default 0).
    pub length_adjustment: i64,
    /// Frame bytes: header (offset + width) + length + adjustment.
    /// (Skipping is irrelevant to holdfast, which forwards whole frames.)
    pub max_frame: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnServerClose {
    Reconnect,
    Close,
}

/// Socket knobs shared by listeners (accepted sockets) and backends (server
/// sockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    /// `nodelay` (default true).
    pub nodelay: bool,
    /// `keepalive_idle`/`keepalive_interval`/`keepalive_count`; `None` with
    /// `keepalive = false`. Defaults: on, 60 s, 10 s, 6.
    pub keepalive: Option<Keepalive>,
    /// `user_timeout`: TCP_USER_TIMEOUT; `None` leaves the kernel default.
    /// Default: none for listeners, 30 s for backends.
    pub user_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl Config {
    /// The backend a listener forwards to.
    pub fn backend_of(&self, listener: &ListenerConfig) -> &BackendConfig {
        &self.backends[listener.backend]
    }
}
#[cfg(test)]
mod tests;
