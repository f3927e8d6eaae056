//! Pure validation: raw → Config, every error at once.
//!
//! Owns the rules (units, enum values, ranges, defaults, cross references
//! between listeners and backends) and the error format: key path, 1-based
//! line and column, a lowercase message naming the value and the limit.
//! Reading the TOML shape is `raw`'s job; nothing here touches a socket or
//! resolves a name.
use std::collections::HashMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use super::raw::{
    self, RawBackend, RawBackendTls, RawConfig, RawFailover, RawFraming, RawListenerTls, RawSize,
    RawSni, RawSocket, Sp, Span,
};
use super::units::{fmt_duration, fmt_size, parse_duration, parse_size, Endpoint};
use super::{
    AccessLog, AckMode, AdminConfig, BackendConfig, BackendProtocol, Config, FailoverConfig,
    FailoverRole, Framing, HandoverConfig, Keepalive, LengthPrefixed, Lifecycle, Limits,
    ListenerConfig, ListenerProtocol, LogConfig, OnServerClose, ResumeSettings, RuntimeConfig,
    Scheduler, Secret, SocketOptions,
};
use super::{BackendTls, Built, CertKey, ListenerTls, SniName, SniRoute, TlsVersion};
use crate::transport::tls;

/// Most `[runtime] worker_threads` accepted: far more threads than any host
/// has CPUs is a typo, not a setting.
const MAX_WORKER_THREADS: i64 = 1024;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path, e.g. `backend[1].buffer_limit`.
    pub key: String,
    /// 1-based line and column of the offending value or key (0 when unknown).
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Every problem found in a config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.key, self.message)
        } else {
            write!(
                f,
                "{} (line {}, col {}): {}",
                self.key, self.line, self.col, self.message
            )
        }
    }
}
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
impl std::error::Error for ConfigError {}
impl std::error::Error for ConfigErrors {}

/// Key of the single error for a file that is not valid TOML.
pub(super) const SYNTAX_KEY: &str = "toml";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

const DEFAULT_BUFFER_MEMORY: u64 = 256 * MIB;
const DEFAULT_MAX_SESSIONS: i64 = 10_000;
const DEFAULT_FD_RESERVE: i64 = 64;
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_BUSY_WITHIN: Duration = Duration::from_millis(100);
const DEFAULT_BUFFER_LIMIT: u64 = MIB;
const MIN_BUFFER_LIMIT: u64 = KIB;
const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(1);
const DEFAULT_RETRY_MAX: Duration = Duration::from_millis(200);
const DEFAULT_MAX_FRAME: u64 = 64 * KIB;
const DEFAULT_MAX_FRAME_LENGTH_PREFIXED: u64 = 8 * MIB;
const DEFAULT_KEEPALIVE: Keepalive = Keepalive {
    idle: Duration::from_secs(60),
    interval: Duration::from_secs(10),
    count: 6,
};
const DEFAULT_BACKEND_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// Linux takes TCP_KEEPIDLE and TCP_KEEPINTVL in whole seconds up to this.
const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// Redis answers this while it loads its data set.
const RESP_RETRY_DEFAULT: &str = "-LOADING";
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses and validates a config file's text.
pub fn parse(src: &str) -> Result<Config, ConfigErrors> {
    let mut report = Report::new(src);
    let config = match raw::parse_document(src) {
        Ok(doc) => {
            let raw = raw::read(&doc, &mut report);
            Some(check(&raw, &mut report))
        }
        Err(e) => {
            let msg = e.message().trim().replace('\n', "; ");
            report.error(SYNTAX_KEY, &e.span(), format!("syntax error: {msg}"));
            None
        }
    };
    match config {
        Some(config) if report.errors.is_empty() => Ok(config),
        _ => Err(report.into_errors()),
    }
}

/// Reads and validates a config file. An unreadable file is one error whose
/// key is the path.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(src) => parse(&src),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            key: path.display().to_string(),
            line: 0,
            col: 0,
            message: format!("cannot read the file: {}", lowercase_first(&e.to_string())),
        }])),
    }
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Collects errors, turning byte spans into line:column.
pub(super) struct Report<'s> {
    src: &'s str,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
}

impl<'s> Report<'s> {
    fn new(src: &'s str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Report {
            src,
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        let col = self
            .src
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line, col + 1)
    }

    pub(super) fn error(&mut self, key: &str, span: &Span, message: impl Into<String>) {
        let (line, col) = span
            .as_ref()
            .map_or((0, 0), |span| self.position(span.start));
        self.errors.push(ConfigError {
            key: key.to_owned(),
            line,
            col,
            message: message.into(),
        });
    }

    fn at<T>(&mut self, field: &Sp<T>, message: impl Into<String>) {
        self.error(&field.key, &field.span, message);
    }

    /// Errors in file order; those without a position last.
    fn into_errors(mut self) -> ConfigErrors {
        self.errors.sort_by_key(|e| (e.line == 0, e.line, e.col));
        ConfigErrors(self.errors)
    }
}

/// Raw → Config. Every check runs; a value that failed its own check is
/// `None` below, so rules that depend on it are skipped instead of
/// piling follow-on errors onto one mistake. The returned Config is only
/// used when no error was reported.
fn check(raw: &RawConfig, r: &mut Report) -> Config {
    let admin = raw.admin.as_ref().and_then(|a| {
        let Some(listen) = &a.listen else {
            r.error(
                &format!("{}.listen", a.at.key),
                &a.at.span,
                "missing key \"listen\"",
            );
            return None;
        };
        match Endpoint::parse(&listen.value) {
            Ok(Endpoint::Unix(_)) => {
                r.at(listen, "the admin endpoint is tcp only (use host:port)");
                None
            }
            Ok(Endpoint::Systemd(_)) => {
                r.at(
                    listen,
                    format!(
                        "{:?}: the admin endpoint cannot be a systemd socket; it is tcp only (use host:port)",
                        listen.value
                    ),
                );
                None
            }
            Ok(ep) => Some(AdminConfig { listen: ep }),
            Err(e) => {
                r.at(listen, e);
                None
            }
        }
    });
    let handover = raw.handover.as_ref().and_then(|h| {
        let busy_within = duration(r, &h.busy_within, DEFAULT_BUSY_WITHIN);
        let Some(socket) = &h.socket else {
            r.error(
                &format!("{}.socket", h.at.key),
                &h.at.span,
                "missing key \"socket\"",
            );
            return None;
        };
        let path = std::path::PathBuf::from(&socket.value);
        if !path.is_absolute() {
            r.at(socket, "must be an absolute path");
            return None;
        }
        if path.file_name().is_none() || path.parent().is_none() {
            r.at(socket, "must name a socket file inside a directory");
            return None;
        }
        Some(HandoverConfig {
            socket: path,
            busy_within: busy_within?,
        })
    });
    let mut buffer_memory = size(r, &raw.limits.buffer_memory, DEFAULT_BUFFER_MEMORY);
    if buffer_memory == Some(0) {
        if let Some(f) = &raw.limits.buffer_memory {
            r.at(f, format!("{} is 0 bytes; it must be more", f.value));
        }
        buffer_memory = None;
    }
    let max_sessions = integer(
        r,
        &raw.limits.max_sessions,
        DEFAULT_MAX_SESSIONS,
        1..=i64::from(u32::MAX),
    );
    let fd_reserve = integer(r, &raw.limits.fd_reserve, DEFAULT_FD_RESERVE, 0..=1_000_000);
    let drain_timeout = duration(r, &raw.lifecycle.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    let worker_threads = match &raw.runtime.worker_threads {
        None => None,
        f => integer(r, f, 1, 1..=MAX_WORKER_THREADS).and_then(|n| usize::try_from(n).ok()),
    };
    // Unset: decided by the listeners (below).
    let scheduler = match &raw.runtime.scheduler {
        None => None,
        f => choice(
            r,
            f,
            "scheduler",
            &[
                ("per-thread", Some(Scheduler::PerThread)),
                ("work-stealing", Some(Scheduler::WorkStealing)),
            ],
            Scheduler::PerThread,
        ),
    };
    let access = raw
        .log
        .access
        .as_ref()
        .and_then(|a| match a.value.as_str() {
            "" => {
                r.at(a, "is empty; use \"stdout\" or a file path");
                None
            }
            "stdout" | "-" => Some(AccessLog::Stdout),
            path => Some(AccessLog::File(std::path::PathBuf::from(path))),
        });

    let backends: Vec<BackendConfig> = raw
        .backends
        .iter()
        .map(|b| backend(b, buffer_memory, r))
        .collect();
    unique_names(raw.backends.iter().map(|b| &b.name), "backend", r);
    let backend_names: Vec<&str> = raw
        .backends
        .iter()
        .filter_map(|b| b.name.as_ref().map(|n| n.value.as_str()))
        .collect();

    if raw.listeners.is_empty() {
        r.error("listener", &None, "at least one [[listener]] is required");
    }
    unique_names(raw.listeners.iter().map(|l| &l.name), "listener", r);
    let mut listens: HashMap<Endpoint, &Sp<String>> = HashMap::new();
    let mut listeners = Vec::new();
    for l in &raw.listeners {
        let name = required_name(r, &l.at, &l.name);
        let listen = required(r, &l.at, &l.listen, "listen").and_then(|f| {
            let ep = Endpoint::parse(&f.value).map_err(|e| r.at(f, e)).ok()?;
            // Several listeners may each ask for a kernel-chosen port.
            if ep.port() != Some(0) {
                if let Some(first) = listens.get(&ep) {
                    let (line, _) = first.span.as_ref().map_or((0, 0), |s| r.position(s.start));
                    r.at(
                        f,
                        format!(
                            "{:?} is already the listen address of {} (line {line})",
                            f.value,
                            first.key.trim_end_matches(".listen")
                        ),
                    );
                } else {
                    listens.insert(ep.clone(), f);
                }
            }
            Some(ep)
        });
        let backend = required(r, &l.at, &l.backend, "backend").and_then(|f| {
            let found = backend_names.iter().position(|n| *n == f.value);
            if found.is_none() {
                let known = if backend_names.is_empty() {
                    "there is no [[backend]]".to_owned()
                } else {
                    format!("backends: {}", backend_names.join(", "))
                };
                r.at(f, format!("no backend named {:?} ({known})", f.value));
            }
            // Index into the backends with a name, which is the index into
            // all backends whenever the file is valid.
            found
        });
        let is_resume = l.protocol.as_ref().is_some_and(|p| p.value == "resume");
        let resume = resume_settings(r, &l.resume, &l.at, is_resume, true);
        let protocol = choice(
            r,
            &l.protocol,
            "protocol",
            &[("tcp", Some(true)), ("resume", Some(false))],
            true,
        )
        .and_then(|tcp| {
            if tcp {
                Some(ListenerProtocol::Tcp)
            } else {
                resume.map(ListenerProtocol::Resume)
            }
        });
        let socket = socket(r, &l.socket, None);
        let sni: Vec<(SniRoute, &RawSni)> = l
            .sni
            .iter()
            .filter_map(|s| sni_route(r, s, &backend_names).map(|route| (route, s)))
            .collect();
        unique_sni(r, &l.sni);
        if is_resume {
            // TLS on a resume listener is terminated by the server library
            // for every transport of a session (a resume makes a new
            // handshake): SNI may choose a certificate, not a backend.
            for raw in &l.sni {
                if let Some(b) = &raw.backend {
                    r.at(
                        b,
                        "a resume listener cannot route by sni: its sessions outlive their connections; leave backend out (sni entries may still bring their own cert and key)",
                    );
                }
            }
        }
        let tls = match &l.tls {
            Some(t) => listener_tls(r, t, &sni),
            None => {
                if let Some(first) = l.sni.first() {
                    r.error(
                        &format!("{}.sni", l.at.key),
                        &first.at.span,
                        "sni routes need tls on the listener (add tls = { cert = ..., key = ... })",
                    );
                }
                None
            }
        };
        let max_sessions = optional_count(r, &l.max_sessions);
        let max_sessions_per_client = optional_count(r, &l.max_sessions_per_client);
        let idle_timeout = l
            .idle_timeout
            .is_some()
            .then(|| positive(r, &l.idle_timeout, Duration::ZERO))
            .flatten();
        listeners.push(ListenerConfig {
            max_sessions,
            max_sessions_per_client,
            idle_timeout,
            name: name.unwrap_or_default(),
            listen: listen.unwrap_or(Endpoint::Tcp(String::new())),
            backend: backend.unwrap_or(0),
            protocol: protocol.unwrap_or(ListenerProtocol::Tcp),
            socket,
            tls,
            sni: sni.into_iter().map(|(route, _)| route).collect(),
        });
    }

    let failover = raw
        .failover
        .as_ref()
        .and_then(|f| failover(r, f, &raw.listeners, &listeners));

    Config {
        admin,
        limits: Limits {
            buffer_memory: buffer_memory.unwrap_or(0),
            max_sessions: max_sessions.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            fd_reserve: fd_reserve.map_or(0, |n| usize::try_from(n).unwrap_or(0)),
        },
        lifecycle: Lifecycle {
            drain_timeout: drain_timeout.unwrap_or_default(),
        },
        runtime: RuntimeConfig {
            worker_threads,
            // A resume-protocol listener's sessions run with the listener's
            // own tasks, on one thread under "per-thread": such a config
            // keeps tokio's work-stealing scheduler unless it says so.
            scheduler: scheduler.unwrap_or(
                if listeners
                    .iter()
                    .any(|l: &ListenerConfig| matches!(l.protocol, ListenerProtocol::Resume(_)))
                {
                    Scheduler::WorkStealing
                } else {
                    Scheduler::PerThread
                },
            ),
        },
        log: LogConfig { access },
        handover,
        failover,
        listeners,
        backends,
    }
}

/// Smallest key accepted in `resume.secret_file`.
const MIN_SECRET: usize = 32;
/// Largest: a key file is a few random bytes, never a device or a log.
const MAX_SECRET: u64 = 4096;

/// Reads a regular file of at most `MAX_SECRET` bytes (never a device, a
/// FIFO or a huge file: `holdfast check` must not hang or run out of memory).
fn read_small_file(path: &str) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_SECRET {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} bytes; a key file holds at most {MAX_SECRET}",
                meta.len()
            ),
        ));
    }
    std::fs::read(path)
}

/// `secret_file` of `table`: required, a regular file of at least
/// `MIN_SECRET` bytes, read now.
fn secret_file(
    r: &mut Report,
    table: &Sp<()>,
    f: &Option<Sp<String>>,
    what: &str,
) -> Option<Secret> {
    let Some(f) = f else {
        r.error(
            &format!("{}.secret_file", table.key),
            &table.span,
            "missing key \"secret_file\" (a file with at least 32 random bytes)",
        );
        return None;
    };
    match read_small_file(&f.value) {
        Err(e) => {
            r.at(f, format!("cannot read {:?}: {e}", f.value));
            None
        }
        Ok(bytes) if bytes.len() < MIN_SECRET => {
            r.at(
                f,
                format!(
                    "{:?} holds {} bytes; {what} needs at least {MIN_SECRET}",
                    f.value,
                    bytes.len()
                ),
            );
            None
        }
        Ok(bytes) => Some(Secret(bytes.into())),
    }
}

/// `resume = { ... }`: required with protocol = "resume", an error otherwise.
/// Reads the secret file (every file a config names is checked before
/// anything is bound).
fn resume_settings(
    r: &mut Report,
    raw: &Option<raw::RawResume>,
    at: &Sp<()>,
    is_resume: bool,
    listener: bool,
) -> Option<ResumeSettings> {
    let Some(raw) = raw else {
        if is_resume {
            r.error(
                &format!("{}.resume", at.key),
                &at.span,
                "protocol = \"resume\" needs resume = { secret_file = \"...\" }",
            );
        }
        return None;
    };
    if !is_resume {
        r.error(
            &raw.at.key,
            &raw.at.span,
            "resume settings only apply with protocol = \"resume\"",
        );
        return None;
    }
    let key = secret_file(r, &raw.at, &raw.secret_file, "a resume key");
    let heartbeat_interval = positive(r, &raw.heartbeat_interval, Duration::from_secs(1));
    let dead_peer_timeout = positive(r, &raw.dead_peer_timeout, Duration::from_secs(3));
    if let (Some(h), Some(d), Some(f)) = (
        heartbeat_interval,
        dead_peer_timeout,
        raw.dead_peer_timeout.as_ref(),
    ) {
        if d <= h {
            r.at(
                f,
                format!(
                    "dead_peer_timeout ({}) must be longer than heartbeat_interval ({})",
                    fmt_duration(d),
                    fmt_duration(h)
                ),
            );
        }
    }
    let bounded = |r: &mut Report, f: &Option<Sp<RawSize>>, default: u64, min: u64, max: u64| {
        let v = size(r, f, default)?;
        if v < min || v > max {
            if let Some(f) = f {
                r.at(
                    f,
                    format!(
                        "{} is outside {}..={}",
                        fmt_size(v),
                        fmt_size(min),
                        fmt_size(max)
                    ),
                );
            }
            return None;
        }
        Some(v as u32)
    };
    let resume_timeout = match (&raw.resume_timeout, listener) {
        (Some(f), false) => {
            r.at(
                f,
                "resume_timeout only applies to listeners (a backend waits hold_timeout)",
            );
            None
        }
        (f, _) => positive(r, f, Duration::from_secs(300)),
    };
    let early_data = match (&raw.early_data, listener) {
        (Some(f), true) => {
            r.at(
                f,
                "early_data only applies to backends (the initiator sends it)",
            );
            None
        }
        (f, _) => Some(f.as_ref().map_or(true, |f| f.value)),
    };
    let max_frame = bounded(r, &raw.max_frame, 64 << 10, 1 << 10, 16 << 20);
    let window = bounded(r, &raw.window, 4 << 20, 1 << 10, (1 << 31) - 1);
    if let (Some(m), Some(w), Some(f)) = (max_frame, window, raw.window.as_ref()) {
        if w < m {
            r.at(f, "window must be at least max_frame");
        }
    }
    Some(ResumeSettings {
        key: key?,
        heartbeat_interval: heartbeat_interval?,
        dead_peer_timeout: dead_peer_timeout?,
        max_frame: max_frame?,
        window: window?,
        resume_timeout: resume_timeout?,
        early_data: early_data?,
    })
}

fn backend(b: &RawBackend, buffer_memory: Option<u64>, r: &mut Report) -> BackendConfig {
    let name = required_name(r, &b.at, &b.name);
    let servers = required(r, &b.at, &b.servers, "servers").and_then(|list| {
        if list.value.is_empty() {
            r.at(list, "is empty; a backend needs at least one server");
            return None;
        }
        let mut servers = Vec::new();
        for f in list.value.iter().flatten() {
            match Endpoint::parse(&f.value) {
                Ok(Endpoint::Systemd(_)) => r.at(
                    f,
                    format!(
                        "{:?}: systemd:NAME is for listeners only; a server is host:port or unix:/path",
                        f.value
                    ),
                ),
                Ok(ep) if ep.port() == Some(0) => {
                    r.at(
                        f,
                        format!("{:?} has port 0; a server needs a real port", f.value),
                    );
                }
                Ok(ep) => servers.push(ep),
                Err(e) => r.at(f, e),
            }
        }
        (servers.len() == list.value.len()).then_some(servers)
    });
    let protocol = choice(
        r,
        &b.protocol,
        "protocol",
        &[
            ("tcp", Some(BackendProtocol::Tcp)),
            ("resume", Some(BackendProtocol::Resume)),
        ],
        BackendProtocol::Tcp,
    );

    #[derive(Clone, Copy, PartialEq)]
    enum Ack {
        None,
        Tcp,
        Response,
        Resume,
    }
    let is_resume = protocol == Some(BackendProtocol::Resume);
    let ack = choice(
        r,
        &b.ack,
        "ack mode",
        &[
            ("none", Some(Ack::None)),
            ("tcp", Some(Ack::Tcp)),
            ("response", Some(Ack::Response)),
            ("resume", Some(Ack::Resume)),
        ],
        if is_resume { Ack::Resume } else { Ack::Tcp },
    );
    match (&b.ack, ack) {
        (Some(a), Some(k)) if is_resume && k != Ack::Resume => r.at(
            a,
            format!(
                "{:?}: protocol = \"resume\" has its own acks (leave ack out, or ack = \"resume\")",
                a.value
            ),
        ),
        (Some(a), Some(Ack::Resume)) if !is_resume => {
            r.at(a, "ack = \"resume\" needs protocol = \"resume\"")
        }
        _ => {}
    }
    let resume_settings = resume_settings(r, &b.resume, &b.at, is_resume, false);
    let response = ack == Some(Ack::Response);
    // Keys that only mean something with ack = "response".
    let ack_name = b.ack.as_ref().map_or("tcp", |a| a.value.as_str());
    let response_only = |r: &mut Report, key: &str, span: &Span| {
        if ack.is_some() && !response {
            let name = key.rsplit('.').next().unwrap_or(key);
            r.error(
                key,
                span,
                format!("{name} only applies with ack = \"response\" (ack is {ack_name:?})"),
            );
        }
    };

    let framing = match &b.framing {
        Some(f) => {
            response_only(r, &f.key, &f.span);
            framing(r, &f.value, &b.max_frame)
        }
        None => {
            match (&b.ack, &b.max_frame) {
                // `response` is never the default, so `ack` was written.
                (Some(ack), _) if response => r.at(
                    ack,
                    "ack = \"response\" needs a framing key (lines, length-prefixed or resp)",
                ),
                (_, Some(m)) => r.at(m, "max_frame only applies with a framing"),
                _ => {}
            }
            None
        }
    };
    let ack = match ack {
        Some(Ack::None) => Some(AckMode::None),
        Some(Ack::Tcp) => Some(AckMode::Tcp),
        Some(Ack::Response) => framing.map(AckMode::Response),
        Some(Ack::Resume) if is_resume => resume_settings.map(AckMode::Resume),
        _ => None,
    };

    let buffer_limit = size(r, &b.buffer_limit, DEFAULT_BUFFER_LIMIT);
    if let Some(limit) = buffer_limit {
        let (key, span) = b.buffer_limit.as_ref().map_or_else(
            || (format!("{}.buffer_limit", b.at.key), b.at.span.clone()),
            |f| (f.key.clone(), f.span.clone()),
        );
        if limit < MIN_BUFFER_LIMIT {
            r.error(
                &key,
                &span,
                format!("{} is below the minimum of 1 KiB", fmt_size(limit)),
            );
        } else if let Some(memory) = buffer_memory.filter(|m| limit > *m) {
            r.error(
                &key,
                &span,
                format!(
                    "{} is more than limits.buffer_memory ({})",
                    fmt_size(limit),
                    fmt_size(memory)
                ),
            );
        }
    }
    let hold_timeout = positive(r, &b.hold_timeout, DEFAULT_HOLD_TIMEOUT);
    let connect_timeout = positive(r, &b.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    let retry_initial = positive(r, &b.retry_initial, DEFAULT_RETRY_INITIAL);
    let retry_max = positive(r, &b.retry_max, DEFAULT_RETRY_MAX);
    if let (Some(initial), Some(max)) = (retry_initial, retry_max) {
        if initial > max {
            let msg = format!(
                "retry_initial ({}) is longer than retry_max ({})",
                fmt_duration(initial),
                fmt_duration(max)
            );
            match (&b.retry_initial, &b.retry_max) {
                (Some(f), _) | (None, Some(f)) => r.at(f, msg),
                (None, None) => {}
            }
        }
    }
    let on_server_close = choice(
        r,
        &b.on_server_close,
        "on_server_close",
        &[
            ("reconnect", Some(OnServerClose::Reconnect)),
            ("close", Some(OnServerClose::Close)),
        ],
        OnServerClose::Reconnect,
    );

    let frames = |r: &mut Report, f: &Option<Sp<i64>>| {
        if let Some(f) = f {
            response_only(r, &f.key, &f.span);
        }
        integer(r, f, 0, 0..=i64::from(u32::MAX)).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    };
    let greeting = frames(r, &b.greeting);
    let preamble = frames(r, &b.preamble);

    let retry_responses = match &b.retry_responses {
        Some(list) => {
            response_only(r, &list.key, &list.span);
            for f in list.value.iter().flatten().filter(|f| f.value.is_empty()) {
                r.at(f, "an empty prefix would match every response");
            }
            list.value
                .iter()
                .flatten()
                .map(|f| f.value.as_bytes().to_vec())
                .collect()
        }
        None if matches!(ack, Some(AckMode::Response(Framing::Resp { .. }))) => {
            vec![RESP_RETRY_DEFAULT.as_bytes().to_vec()]
        }
        None => Vec::new(),
    };

    let tls = b
        .tls
        .as_ref()
        .and_then(|t| backend_tls(r, t, servers.as_deref(), ack.as_ref(), b));
    let plain = matches!(ack, Some(AckMode::None) | None);
    if let Some(f) = &b.splice {
        if f.value && !plain {
            r.at(
                f,
                "applies only to ack = \"none\" (the other modes keep the bytes for replay)",
            );
        }
    }
    let splice = plain && b.splice.as_ref().map_or(true, |f| f.value);

    BackendConfig {
        name: name.unwrap_or_default(),
        servers: servers.unwrap_or_default(),
        protocol: protocol.unwrap_or(BackendProtocol::Tcp),
        ack: ack.unwrap_or(AckMode::None),
        buffer_limit: buffer_limit.unwrap_or(0),
        hold_timeout: hold_timeout.unwrap_or_default(),
        connect_timeout: connect_timeout.unwrap_or_default(),
        retry_initial: retry_initial.unwrap_or_default(),
        retry_max: retry_max.unwrap_or_default(),
        on_server_close: on_server_close.unwrap_or(OnServerClose::Reconnect),
        greeting: greeting.unwrap_or(0),
        preamble: preamble.unwrap_or(0),
        retry_responses,
        max_held_sessions: optional_count(r, &b.max_held_sessions),
        splice,
        socket: socket(r, &b.socket, Some(DEFAULT_BACKEND_USER_TIMEOUT)),
        tls,
    }
}

/// A certificate and key given as two keys of one table: both or neither;
/// read and checked against each other. `None` when absent or bad (reported).
fn cert_key(
    r: &mut Report,
    at: &Sp<()>,
    cert: &Option<Sp<String>>,
    key: &Option<Sp<String>>,
    required_pair: bool,
) -> Option<(Sp<String>, Sp<String>, CertKey)> {
    match (cert, key) {
        (None, None) => {
            if required_pair {
                required(r, at, cert, "cert");
                required(r, at, key, "key");
            }
            None
        }
        (Some(c), None) => {
            r.error(
                &format!("{}.key", at.key),
                &c.span,
                "cert needs a key (the PEM file with its private key)",
            );
            None
        }
        (None, Some(k)) => {
            r.error(
                &format!("{}.cert", at.key),
                &k.span,
                "key needs a cert (the PEM file with the certificate chain)",
            );
            None
        }
        (Some(c), Some(k)) => match tls::load_cert_key(Path::new(&c.value), Path::new(&k.value)) {
            Ok(pair) => Some((c.clone(), k.clone(), pair)),
            Err((tls::Which::Cert, e)) => {
                r.at(c, e);
                None
            }
            Err((tls::Which::Key, e)) => {
                r.at(k, e);
                None
            }
        },
    }
}

/// `alpn = ["h2", "http/1.1"]`: non-empty names of at most 255 bytes.
fn alpn(r: &mut Report, f: &Option<Sp<Vec<Option<Sp<String>>>>>) -> Option<Vec<String>> {
    let Some(list) = f else {
        return Some(Vec::new());
    };
    let mut ok = true;
    for p in list.value.iter().flatten() {
        if p.value.is_empty() || p.value.len() > 255 {
            r.at(p, "an ALPN protocol name is 1 to 255 bytes");
            ok = false;
        }
    }
    let names: Vec<String> = list
        .value
        .iter()
        .flatten()
        .map(|p| p.value.clone())
        .collect();
    (ok && names.len() == list.value.len()).then_some(names)
}

fn ca_certs(
    r: &mut Report,
    f: &Sp<String>,
) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
    match tls::load_certs(Path::new(&f.value)) {
        Ok(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in &certs {
                if let Err(e) = roots.add(c.clone()) {
                    r.at(
                        f,
                        format!("{:?}: not usable as a CA certificate: {e}", f.value),
                    );
                    return None;
                }
            }
            Some(certs)
        }
        Err(e) => {
            r.at(f, e);
            None
        }
    }
}

fn root_store(
    certs: &[rustls::pki_types::CertificateDer<'static>],
) -> std::sync::Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    // Each was added once already while validating.
    let _ = roots.add_parsable_certificates(certs.iter().cloned());
    std::sync::Arc::new(roots)
}

fn listener_tls(
    r: &mut Report,
    t: &RawListenerTls,
    sni: &[(SniRoute, &RawSni)],
) -> Option<ListenerTls> {
    let pair = cert_key(r, &t.at, &t.cert, &t.key, true);
    let client_ca = t.client_ca.as_ref().map(|f| (f, ca_certs(r, f)));
    let min_version = choice(
        r,
        &t.min_version,
        "min_version",
        &[
            ("1.2", Some(TlsVersion::Tls12)),
            ("1.3", Some(TlsVersion::Tls13)),
        ],
        TlsVersion::Tls12,
    );
    let alpn = alpn(r, &t.alpn);
    let handshake_timeout = positive(r, &t.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
    let (cert, key, pair) = pair?;
    let (client_ca, client_ca_certs) = match client_ca {
        Some((f, certs)) => (Some(std::path::PathBuf::from(&f.value)), certs?),
        None => (None, Vec::new()),
    };
    let (min_version, alpn, handshake_timeout) = (min_version?, alpn?, handshake_timeout?);
    // Every SNI certificate must have loaded (else already reported).
    if sni
        .iter()
        .any(|(route, raw)| route.pair.is_none() && raw.cert.is_some())
    {
        return None;
    }
    let settings = tls::ServerSettings {
        default: &pair,
        sni_certs: sni
            .iter()
            .filter_map(|(route, _)| route.pair.as_ref().map(|p| (&route.name, p)))
            .collect(),
        client_ca: client_ca.as_ref().map(|_| root_store(&client_ca_certs)),
        tls12: min_version == TlsVersion::Tls12,
        alpn: &alpn,
    };
    let server = match tls::server_config(&settings) {
        Ok(s) => s,
        Err(e) => {
            r.error(&t.at.key, &t.at.span, e);
            return None;
        }
    };
    Some(ListenerTls {
        cert: cert.value.into(),
        key: key.value.into(),
        pair,
        client_ca,
        client_ca_certs,
        min_version,
        alpn,
        handshake_timeout,
        server: Built(server),
    })
}

/// One `[[listener.sni]]`; `None` when it has an error (reported). A bad
/// certificate leaves the route without one (the listener then fails).
fn sni_route(r: &mut Report, s: &RawSni, backend_names: &[&str]) -> Option<SniRoute> {
    let name = required(r, &s.at, &s.name, "name")
        .and_then(|f| SniName::parse(&f.value).map_err(|e| r.at(f, e)).ok());
    let backend = match &s.backend {
        None => Some(None),
        Some(f) => match backend_names.iter().position(|n| *n == f.value) {
            Some(i) => Some(Some(i)),
            None => {
                r.at(
                    f,
                    format!(
                        "no backend named {:?} (backends: {})",
                        f.value,
                        backend_names.join(", ")
                    ),
                );
                None
            }
        },
    };
    let pair = cert_key(r, &s.at, &s.cert, &s.key, false).map(|(_, _, p)| p);
    Some(SniRoute {
        name: name?,
        backend: backend?,
        pair,
    })
}

fn unique_sni(r: &mut Report, entries: &[RawSni]) {
    let mut seen: HashMap<String, &Sp<String>> = HashMap::new();
    for f in entries.iter().filter_map(|s| s.name.as_ref()) {
        let Ok(name) = SniName::parse(&f.value) else {
            continue;
        };
        let norm = name.to_string();
        if let Some(first) = seen.get(&norm) {
            let (line, _) = first.span.as_ref().map_or((0, 0), |s| r.position(s.start));
            r.at(
                f,
                format!("duplicate sni name {:?} (also line {line})", f.value),
            );
        } else {
            seen.insert(norm, f);
        }
    }
}

/// The host part of `host:port` / `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn backend_tls(
    r: &mut Report,
    t: &RawBackendTls,
    servers: Option<&[Endpoint]>,
    ack: Option<&AckMode>,
    b: &RawBackend,
) -> Option<BackendTls> {
    if ack == Some(&AckMode::Tcp) {
        let how = if b.ack.is_some() {
            "ack = \"tcp\""
        } else {
            "ack = \"tcp\" (the default)"
        };
        r.error(
            &t.at.key,
            &t.at.span,
            format!(
                "tls cannot be used with {how}: the kernel's acks count TLS record bytes, not the plaintext offsets holdfast replays from; use ack = \"response\" or \"none\""
            ),
        );
    }
    let ca = match required(r, &t.at, &t.ca, "ca") {
        Some(f) => ca_certs(r, f).map(|c| (f, c)),
        None => None,
    };
    let client = cert_key(r, &t.at, &t.cert, &t.key, false);
    let alpn = alpn(r, &t.alpn);
    let server_names = match &t.server_name {
        Some(f) => match ServerNameOwned::try_from(f.value.clone()) {
            Ok(n) => servers.map(|s| vec![n; s.len()]),
            Err(_) => {
                r.at(
                    f,
                    format!("{:?} is not a DNS name or an IP address", f.value),
                );
                None
            }
        },
        None => {
            let mut names = Vec::new();
            for ep in servers.unwrap_or_default() {
                match ep {
                    Endpoint::Tcp(addr) => {
                        match ServerNameOwned::try_from(host_of(addr).to_owned()) {
                            Ok(n) => names.push(n),
                            Err(_) => {
                                r.error(
                                &format!("{}.server_name", t.at.key),
                                &t.at.span,
                                format!("cannot use the host of {addr:?} as the TLS server name; set server_name"),
                            );
                                return None;
                            }
                        }
                    }
                    Endpoint::Unix(p) => {
                        r.error(
                            &format!("{}.server_name", t.at.key),
                            &t.at.span,
                            format!(
                                "server \"unix:{}\" has no host name to verify: set server_name",
                                p.display()
                            ),
                        );
                        return None;
                    }
                    // Already reported: systemd sockets are for listeners.
                    Endpoint::Systemd(_) => return None,
                }
            }
            servers.map(|_| names)
        }
    };
    let (ca_f, ca_certs) = ca?;
    let alpn = alpn?;
    let server_names = server_names?;
    if t.cert.is_some() != client.is_some() {
        return None;
    }
    let client_config = match tls::client_config(
        root_store(&ca_certs),
        client.as_ref().map(|(_, _, p)| p),
        &alpn,
    ) {
        Ok(c) => c,
        Err(e) => {
            r.error(&t.at.key, &t.at.span, e);
            return None;
        }
    };
    Some(BackendTls {
        ca: ca_f.value.clone().into(),
        ca_certs,
        server_names,
        client: client.map(|(c, k, p)| (c.value.into(), k.value.into(), p)),
        alpn,
        client_config: Built(client_config),
    })
}

type ServerNameOwned = rustls::pki_types::ServerName<'static>;

fn framing(r: &mut Report, f: &RawFraming, max_frame: &Option<Sp<RawSize>>) -> Option<Framing> {
    #[derive(Clone, Copy)]
    enum Kind {
        Lines,
        LengthPrefixed,
        Resp,
    }
    let kind = choice(
        r,
        &Some(f.kind.clone()?),
        "framing",
        &[
            ("lines", Some(Kind::Lines)),
            ("length-prefixed", Some(Kind::LengthPrefixed)),
            ("resp", Some(Kind::Resp)),
        ],
        Kind::Lines,
    )?;
    let (kind_key, kind_span) = f
        .kind
        .as_ref()
        .map(|k| (k.key.clone(), k.span.clone()))
        .unwrap_or_default();
    let default_max = match kind {
        Kind::LengthPrefixed => DEFAULT_MAX_FRAME_LENGTH_PREFIXED,
        Kind::Lines | Kind::Resp => DEFAULT_MAX_FRAME,
    };
    let max = size(r, max_frame, default_max).and_then(|n| {
        let n = usize::try_from(n).ok().filter(|n| *n > 0);
        if n.is_none() {
            if let Some(f) = max_frame {
                r.at(f, format!("{} is 0 bytes; it must be more", f.value));
            }
        }
        n
    });
    match kind {
        Kind::Lines => Some(Framing::Lines { max_frame: max? }),
        Kind::Resp => Some(Framing::Resp { max_frame: max? }),
        Kind::LengthPrefixed => {
            let offset = integer(r, &f.length_field_offset, 0, 0..=i64::from(u32::MAX));
            let width = integer(r, &f.length_field_length, 4, i64::MIN..=i64::MAX).and_then(|n| {
                if [1, 2, 4, 8].contains(&n) {
                    return Some(n);
                }
                if let Some(f) = &f.length_field_length {
                    r.at(
                        f,
                        format!("{n} is not a length field width (use 1, 2, 4 or 8)"),
                    );
                }
                None
            });
            let adjustment = integer(r, &f.length_adjustment, 0, i64::MIN..=i64::MAX);
            let big_endian = f.big_endian.as_ref().map_or(true, |b| b.value);
            let offset = usize::try_from(offset?).ok()?;
            let width = usize::try_from(width?).ok()?;
            let max = max?;
            if max <= offset + width {
                let msg = format!(
                    "{} cannot hold the {} byte header (length_field_offset + length_field_length)",
                    fmt_size(max as u64),
                    offset + width
                );
                match max_frame {
                    Some(m) => r.at(m, msg),
                    None => r.error(
                        &kind_key,
                        &kind_span,
                        format!("the default max_frame {msg}"),
                    ),
                }
                return None;
            }
            Some(Framing::LengthPrefixed(LengthPrefixed {
                length_field_offset: offset,
                length_field_length: width,
                big_endian,
                length_adjustment: adjustment?,
                max_frame: max,
            }))
        }
    }
}

fn socket(r: &mut Report, s: &RawSocket, default_user_timeout: Option<Duration>) -> SocketOptions {
    let enabled = s.keepalive.as_ref().map_or(true, |k| k.value);
    let keepalive_secs = |r: &mut Report, f: &Option<Sp<String>>, default: Duration| {
        let d = duration(r, f, default)?;
        let ok = d.subsec_nanos() == 0 && (1..=MAX_KEEPALIVE_SECS).contains(&d.as_secs());
        if !ok {
            if let Some(f) = f {
                r.at(
                    f,
                    format!(
                        "{} is not a whole number of seconds from 1s to {MAX_KEEPALIVE_SECS}s",
                        fmt_duration(d)
                    ),
                );
            }
            return None;
        }
        Some(d)
    };
    let keepalive = if enabled {
        let idle = keepalive_secs(r, &s.keepalive_idle, DEFAULT_KEEPALIVE.idle);
        let interval = keepalive_secs(r, &s.keepalive_interval, DEFAULT_KEEPALIVE.interval);
        let count = integer(
            r,
            &s.keepalive_count,
            i64::from(DEFAULT_KEEPALIVE.count),
            1..=127,
        );
        Some(Keepalive {
            idle: idle.unwrap_or_default(),
            interval: interval.unwrap_or_default(),
            count: count.and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        })
    } else {
        // Settings for something switched off are a mistake, not a no-op.
        let given = [
            s.keepalive_idle.as_ref().map(|f| (&f.key, &f.span)),
            s.keepalive_interval.as_ref().map(|f| (&f.key, &f.span)),
            s.keepalive_count.as_ref().map(|f| (&f.key, &f.span)),
        ];
        for (key, span) in given.into_iter().flatten() {
            let name = key.rsplit('.').next().unwrap_or(key);
            r.error(
                key,
                span,
                format!("{name} has no effect with keepalive = false"),
            );
        }
        None
    };
    let user_timeout = match &s.user_timeout {
        None => default_user_timeout,
        Some(f) => match parse_duration(&f.value) {
            Err(e) => {
                r.at(f, e);
                None
            }
            // TCP_USER_TIMEOUT is u32 milliseconds; 0 is the kernel default.
            Ok(d) if d.as_millis() > u128::from(u32::MAX) => {
                r.at(f, format!("{} is longer than 49 days", fmt_duration(d)));
                None
            }
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
        },
    };
    SocketOptions {
        nodelay: s.nodelay.as_ref().map_or(true, |n| n.value),
        keepalive,
        user_timeout,
    }
}

/// A required key; reported missing at its table.
fn required<'f, T>(
    r: &mut Report,
    table: &Sp<()>,
    f: &'f Option<Sp<T>>,
    name: &str,
) -> Option<&'f Sp<T>> {
    if f.is_none() {
        r.error(
            &format!("{}.{name}", table.key),
            &table.span,
            format!("missing key {name:?}"),
        );
    }
    f.as_ref()
}

/// `name`: required, and usable as a metric label.
fn required_name(r: &mut Report, table: &Sp<()>, f: &Option<Sp<String>>) -> Option<String> {
    let f = required(r, table, f, "name")?;
    let ok = !f.value.is_empty()
        && f.value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        r.at(
            f,
            format!(
                "{:?} is not a valid name (use letters, digits, '-', '_' or '.')",
                f.value
            ),
        );
        return None;
    }
    Some(f.value.clone())
}

fn unique_names<'a>(
    names: impl Iterator<Item = &'a Option<Sp<String>>>,
    what: &str,
    r: &mut Report,
) {
    let mut seen: HashMap<&str, &Sp<String>> = HashMap::new();
    for f in names.flatten() {
        if let Some(first) = seen.get(f.value.as_str()) {
            let (line, _) = first.span.as_ref().map_or((0, 0), |s| r.position(s.start));
            r.at(
                f,
                format!(
                    "duplicate {what} name {:?} (also {}, line {line})",
                    f.value,
                    first.key.trim_end_matches(".name")
                ),
            );
        } else {
            seen.insert(&f.value, f);
        }
    }
}

/// One of a fixed set of strings; `None` in `options` marks a value that is
/// planned but not supported yet.
fn choice<T: Copy>(
    r: &mut Report,
    f: &Option<Sp<String>>,
    what: &str,
    options: &[(&str, Option<T>)],
    default: T,
) -> Option<T> {
    let Some(f) = f else {
        return Some(default);
    };
    let supported: Vec<&str> = options
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(n, _)| *n)
        .collect();
    let list = match supported.as_slice() {
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
        [] => String::new(),
    };
    match options.iter().find(|(n, _)| *n == f.value) {
        Some((_, Some(v))) => Some(*v),
        Some((_, None)) => {
            r.at(
                f,
                format!("{what} {:?} is not supported yet (use {list})", f.value),
            );
            None
        }
        None => {
            r.at(f, format!("unknown {what} {:?} (use {list})", f.value));
            None
        }
    }
}

fn size(r: &mut Report, f: &Option<Sp<RawSize>>, default: u64) -> Option<u64> {
    let Some(f) = f else {
        return Some(default);
    };
    let parsed = match &f.value {
        RawSize::Text(s) => parse_size(s),
        RawSize::Bytes(n) => {
            u64::try_from(*n).map_err(|_| format!("{n} is not a size (it is negative)"))
        }
    };
    parsed.map_err(|e| r.at(f, e)).ok()
}

fn duration(r: &mut Report, f: &Option<Sp<String>>, default: Duration) -> Option<Duration> {
    let Some(f) = f else {
        return Some(default);
    };
    parse_duration(&f.value).map_err(|e| r.at(f, e)).ok()
}

/// A duration that must be more than zero.
fn positive(r: &mut Report, f: &Option<Sp<String>>, default: Duration) -> Option<Duration> {
    let d = duration(r, f, default)?;
    if d.is_zero() {
        if let Some(f) = f {
            r.at(f, format!("{:?} is 0; it must be more", f.value));
        }
        return None;
    }
    Some(d)
}

/// An optional count of sessions: absent is `None` (no limit), otherwise 1
/// to 4294967295.
fn optional_count(r: &mut Report, f: &Option<Sp<i64>>) -> Option<usize> {
    f.as_ref()?;
    integer(r, f, 0, 1..=i64::from(u32::MAX)).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

fn integer(
    r: &mut Report,
    f: &Option<Sp<i64>>,
    default: i64,
    range: RangeInclusive<i64>,
) -> Option<i64> {
    let Some(f) = f else {
        return Some(default);
    };
    if !range.contains(&f.value) {
        r.at(
            f,
            format!(
                "{} is out of range ({} to {})",
                f.value,
                range.start(),
                range.end()
            ),
        );
        return None;
    }
    Some(f.value)
}

/// `[failover]`: the role's keys, the secret, the timers, and the listeners
/// a standby can take over (plain TCP over IPv4: a TLS session or a Unix
/// socket cannot be rebuilt with TCP_REPAIR).
fn failover(
    r: &mut Report,
    f: &RawFailover,
    raw_listeners: &[raw::RawListener],
    listeners: &[ListenerConfig],
) -> Option<FailoverConfig> {
    let key = secret_file(r, &f.at, &f.secret_file, "a failover key");
    let heartbeat_interval = positive(r, &f.heartbeat_interval, Duration::from_millis(10));
    let dead_peer_timeout = positive(r, &f.dead_peer_timeout, Duration::from_millis(100));
    if let (Some(h), Some(d)) = (heartbeat_interval, dead_peer_timeout) {
        if d <= h {
            let field = f
                .dead_peer_timeout
                .as_ref()
                .or(f.heartbeat_interval.as_ref());
            if let Some(field) = field {
                r.at(
                    field,
                    format!(
                        "dead_peer_timeout ({}) must be longer than heartbeat_interval ({})",
                        fmt_duration(d),
                        fmt_duration(h)
                    ),
                );
            }
        }
    }
    let tcp_address = |r: &mut Report, field: &Sp<String>| match Endpoint::parse(&field.value) {
        Ok(Endpoint::Tcp(a)) => Some(a),
        Ok(_) => {
            r.at(field, "the replication link is tcp only (use host:port)");
            None
        }
        Err(e) => {
            r.at(field, e);
            None
        }
    };
    let only_for = |r: &mut Report, field: &Option<Sp<String>>, role: &str| {
        if let Some(field) = field {
            let name = field.key.rsplit('.').next().unwrap_or_default();
            r.at(field, format!("{name} applies to role = \"{role}\" only"));
        }
    };
    let role = match f.role.as_ref().map(|s| s.value.as_str()) {
        None => {
            required(r, &f.at, &f.role, "role");
            None
        }
        Some("active") => {
            only_for(r, &f.listen, "standby");
            only_for(r, &f.service_address, "standby");
            only_for(r, &f.interface, "standby");
            let peer = required(r, &f.at, &f.peer, "peer").and_then(|p| tcp_address(r, p));
            peer.map(|peer| FailoverRole::Active { peer })
        }
        Some("standby") => {
            only_for(r, &f.peer, "active");
            let listen = required(r, &f.at, &f.listen, "listen").and_then(|l| tcp_address(r, l));
            let service = required(r, &f.at, &f.service_address, "service_address")
                .and_then(|s| service_address(r, s));
            let interface = required(r, &f.at, &f.interface, "interface").and_then(|i| {
                let ok = !i.value.is_empty()
                    && i.value.len() < 16
                    && !i.value.contains(['/', ' ', '\0']);
                if !ok {
                    r.at(i, format!("{:?} is not an interface name", i.value));
                }
                ok.then(|| i.value.clone())
            });
            match (listen, service, interface) {
                (Some(listen), Some((service_address, prefix)), Some(interface)) => {
                    Some(FailoverRole::Standby {
                        listen,
                        service_address,
                        prefix,
                        interface,
                    })
                }
                _ => None,
            }
        }
        Some(_) => {
            if let Some(field) = &f.role {
                r.at(
                    field,
                    format!("unknown role {:?} (use active or standby)", field.value),
                );
            }
            None
        }
    };
    let covered = covered_listeners(r, f, raw_listeners, listeners);
    Some(FailoverConfig {
        role: role?,
        key: key?,
        heartbeat_interval: heartbeat_interval?,
        dead_peer_timeout: dead_peer_timeout?,
        listeners: covered?,
    })
}

/// `service_address = "a.b.c.d/len"` (or without `/len`: 32).
fn service_address(r: &mut Report, f: &Sp<String>) -> Option<(std::net::Ipv4Addr, u8)> {
    let (ip, prefix) = match f.value.split_once('/') {
        Some((ip, len)) => (ip, len.parse::<u8>().ok().filter(|l| (1..=32).contains(l))),
        None => (f.value.as_str(), Some(32)),
    };
    match (ip.parse::<std::net::Ipv4Addr>(), prefix) {
        (Ok(ip), Some(prefix)) if !ip.is_unspecified() => Some((ip, prefix)),
        _ => {
            r.at(
                f,
                format!(
                    "{:?} is not an IPv4 address with an optional prefix length (like \"10.0.0.100/24\")",
                    f.value
                ),
            );
            None
        }
    }
}

/// The listeners a standby takes over: named in `listeners`, or every plain
/// TCP listener when the key is absent.
fn covered_listeners(
    r: &mut Report,
    f: &RawFailover,
    raw_listeners: &[raw::RawListener],
    listeners: &[ListenerConfig],
) -> Option<Vec<usize>> {
    let repairable = |l: &ListenerConfig| {
        matches!(l.listen, Endpoint::Tcp(_))
            && l.tls.is_none()
            && l.protocol == ListenerProtocol::Tcp
    };
    let Some(names) = &f.listeners else {
        let all: Vec<usize> = (0..listeners.len())
            .filter(|&i| repairable(&listeners[i]))
            .collect();
        if all.is_empty() && !listeners.is_empty() {
            r.error(
                &format!("{}.listeners", f.at.key),
                &f.at.span,
                "no listener can fail over: only plain tcp listeners can (no tls, no unix socket, no resume protocol)",
            );
            return None;
        }
        return Some(all);
    };
    let mut out = Vec::new();
    let mut ok = true;
    for name in names.value.iter().flatten() {
        let found = raw_listeners
            .iter()
            .position(|l| l.name.as_ref().is_some_and(|n| n.value == name.value));
        match found.and_then(|i| listeners.get(i).map(|l| (i, l))) {
            None => {
                r.at(name, format!("no listener named {:?}", name.value));
                ok = false;
            }
            Some((_, l)) if !repairable(l) => {
                r.at(
                    name,
                    format!(
                        "listener {:?} cannot fail over: only plain tcp listeners can (no tls, no unix socket, no resume protocol)",
                        name.value
                    ),
                );
                ok = false;
            }
            Some((i, _)) if out.contains(&i) => {
                r.at(name, format!("listener {:?} is named twice", name.value));
                ok = false;
            }
            Some((i, _)) => out.push(i),
        }
    }
    ok.then_some(out)
}
