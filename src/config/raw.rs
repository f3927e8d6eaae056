//! Raw mirror of the TOML file: every table and key holdfast knows, with the
//! TOML type it must have and where in the file it was written.
//!
//! Two steps. First serde reads the whole file into a spanned document tree
//! ([`Node`]): every value and key keeps its byte range. Then [`read`] walks
//! that tree into the `Raw*` structs below, reporting unknown keys and wrong
//! TOML types as it goes and carrying on. This is instead of
//! `#[derive(Deserialize)] #[serde(deny_unknown_fields)]` structs because
//! serde stops at the first error and `#[serde(flatten)]` loses spans, while
//! holdfast reports every error in a file at once.
//!
//! What is not here: units (sizes, durations, endpoints), enum values,
//! defaults and cross-field rules. Those are `validate`'s.
use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::validate::Report;

/// A byte range in the source; `None` when the parser gave none.
pub(super) type Span = Option<Range<usize>>;

/// A TOML value as written, with its byte range in the source.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Node {
    pub span: Span,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Kind {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime(String),
    Array(Vec<Node>),
    /// Keys in file order.
    Table(Vec<Entry>),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Entry {
    pub key: String,
    pub key_span: Span,
    pub value: Node,
}

impl fmt::Display for RawSize {
    /// As written: `"64KiB"` quoted, a number of bytes bare.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawSize::Text(s) => write!(f, "{s:?}"),
            RawSize::Bytes(n) => write!(f, "{n}"),
        }
    }
}

impl Kind {
    /// "a string", "an integer", ...: for "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Kind::String(_) => "a string",
            Kind::Integer(_) => "an integer",
            Kind::Float(_) => "a float",
            Kind::Boolean(_) => "a boolean",
            Kind::Datetime(_) => "a datetime",
            Kind::Array(_) => "an array",
            Kind::Table(_) => "a table",
        }
    }
}

/// Parses TOML syntax into the spanned tree. Errors here are syntax errors.
pub(super) fn parse_document(src: &str) -> Result<Node, toml::de::Error> {
    toml::from_str::<Node>(src)
}

// How toml 0.8 hands out spans: a struct with these private names (the
// protocol behind `toml::Spanned`, from serde_spanned 0.6, which toml 0.8
// pins). `toml::Spanned<T>` itself cannot be used for keys and values here:
// it fails on the one map toml gives without spans (a datetime), which would
// abort the whole file on a datetime anywhere. Covered by the position
// tests: if these names ever changed, every column would come out 0.
const SPANNED: &str = "$__serde_spanned_private_Spanned";
const START: &str = "$__serde_spanned_private_start";
const END: &str = "$__serde_spanned_private_end";
const VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[START, END, VALUE];
/// The single key of the map toml presents a datetime as.
const DATETIME: &str = "$__toml_private_datetime";

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, NodeVisitor { spanned: true })
    }
}

/// The value inside a span wrapper (asking for a span again would loop).
struct Bare(Node);

impl<'de> Deserialize<'de> for Bare {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor { spanned: false }).map(Bare)
    }
}

fn bare(kind: Kind) -> Node {
    Node { span: None, kind }
}

fn expect_key<'de, A: MapAccess<'de>>(map: &mut A, want: &str) -> Result<(), A::Error> {
    match map.next_key::<String>()? {
        Some(k) if k == want => Ok(()),
        _ => Err(de::Error::custom("malformed spanned value")),
    }
}

struct NodeVisitor {
    /// Whether a map may be the span wrapper rather than a table.
    spanned: bool,
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(bare(Kind::Boolean(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(bare(Kind::Integer(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v)
            .map(|v| bare(Kind::Integer(v)))
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(bare(Kind::Float(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(bare(Kind::String(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(bare(Kind::String(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(bare(Kind::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let Some(mut key) = map.next_key::<Key>()? else {
            return Ok(bare(Kind::Table(Vec::new())));
        };
        if self.spanned && key.name == START {
            let start: usize = map.next_value()?;
            expect_key(&mut map, END)?;
            let end: usize = map.next_value()?;
            expect_key(&mut map, VALUE)?;
            let Bare(mut node) = map.next_value()?;
            node.span = Some(start..end);
            return Ok(node);
        }
        if key.name == DATETIME {
            return Ok(bare(Kind::Datetime(map.next_value()?)));
        }
        let mut entries = Vec::new();
        loop {
            let mut value: Node = map.next_value()?;
            // Implicit tables (`a.b = 1` makes `a`) have no span of their own.
            if value.span.is_none() {
                value.span.clone_from(&key.span);
            }
            entries.push(Entry {
                key: key.name,
                key_span: key.span,
                value,
            });
            match map.next_key::<Key>()? {
                Some(k) => key = k,
                None => return Ok(bare(Kind::Table(entries))),
            }
        }
    }
}

/// A table key and, when toml knows it, where it was written.
struct Key {
    name: String,
    span: Span,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(Key {
            name: v.to_owned(),
            span: None,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
        expect_key(&mut map, START)?;
        let start: usize = map.next_value()?;
        expect_key(&mut map, END)?;
        let end: usize = map.next_value()?;
        expect_key(&mut map, VALUE)?;
        Ok(Key {
            name: map.next_value()?,
            span: Some(start..end),
        })
    }
}

/// A value read from the file with its key path (`backend[1].buffer_limit`)
/// and position: everything an error about it needs.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Sp<T> {
    pub value: T,
    pub key: String,
    pub span: Span,
}

/// A size as written: `"64KiB"` or a number of bytes.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RawSize {
    Text(String),
    Bytes(i64),
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct RawConfig {
    pub admin: Option<RawAdmin>,
    pub limits: RawLimits,
    pub lifecycle: RawLifecycle,
    pub runtime: RawRuntime,
    pub log: RawLog,
    pub handover: Option<RawHandover>,
    pub failover: Option<RawFailover>,
    /// `[[listener]]`, in file order.
    pub listeners: Vec<RawListener>,
    pub backends: Vec<RawBackend>,
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawAdmin {
    pub at: Sp<()>,
    pub listen: Option<Sp<String>>,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct RawLimits {
    pub buffer_memory: Option<Sp<RawSize>>,
    pub max_sessions: Option<Sp<i64>>,
    pub fd_reserve: Option<Sp<i64>>,
}

/// `[lifecycle]`
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct RawLifecycle {
    pub drain_timeout: Option<Sp<String>>,
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct RawRuntime {
    pub worker_threads: Option<Sp<i64>>,
    pub scheduler: Option<Sp<String>>,
}

/// `[handover]`
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawHandover {
    pub at: Sp<()>,
    pub socket: Option<Sp<String>>,
    pub busy_within: Option<Sp<String>>,
}

/// `[failover]`
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawFailover {
    pub at: Sp<()>,
    pub role: Option<Sp<String>>,
    pub listen: Option<Sp<String>>,
    pub peer: Option<Sp<String>>,
    pub secret_file: Option<Sp<String>>,
    pub heartbeat_interval: Option<Sp<String>>,
    pub dead_peer_timeout: Option<Sp<String>>,
    pub service_address: Option<Sp<String>>,
    pub interface: Option<Sp<String>>,
    pub listeners: Option<Sp<Vec<Option<Sp<String>>>>>,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct RawLog {
    pub access: Option<Sp<String>>,
}

/// One `[[listener]]`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawListener {
    /// The table itself: key `listener[i]`, span of the table.
    pub at: Sp<()>,
    pub name: Option<Sp<String>>,
    pub listen: Option<Sp<String>>,
    pub backend: Option<Sp<String>>,
    pub protocol: Option<Sp<String>>,
    pub max_sessions: Option<Sp<i64>>,
    pub max_sessions_per_client: Option<Sp<i64>>,
    pub idle_timeout: Option<Sp<String>>,
    pub resume: Option<RawResume>,
    pub socket: RawSocket,
    pub tls: Option<RawListenerTls>,
    /// `[[listener.sni]]`, in file order.
    pub sni: Vec<RawSni>,
}

/// A listener's `tls = { ... }` (or `[listener.tls]`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawListenerTls {
    pub at: Sp<()>,
    pub cert: Option<Sp<String>>,
    pub key: Option<Sp<String>>,
    pub client_ca: Option<Sp<String>>,
    pub min_version: Option<Sp<String>>,
    pub alpn: Option<Sp<Vec<Option<Sp<String>>>>>,
    pub handshake_timeout: Option<Sp<String>>,
}

/// One `[[listener.sni]]`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawSni {
    pub at: Sp<()>,
    pub name: Option<Sp<String>>,
    pub backend: Option<Sp<String>>,
    pub cert: Option<Sp<String>>,
    pub key: Option<Sp<String>>,
}

/// A backend's `tls = { ... }` (or `[backend.tls]`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawBackendTls {
    pub at: Sp<()>,
    pub ca: Option<Sp<String>>,
    pub server_name: Option<Sp<String>>,
    pub cert: Option<Sp<String>>,
    pub key: Option<Sp<String>>,
    pub alpn: Option<Sp<Vec<Option<Sp<String>>>>>,
}

/// Socket keys, written directly in a `[[listener]]` or `[[backend]]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct RawSocket {
    pub nodelay: Option<Sp<bool>>,
    pub keepalive: Option<Sp<bool>>,
    pub keepalive_idle: Option<Sp<String>>,
    pub keepalive_interval: Option<Sp<String>>,
    pub keepalive_count: Option<Sp<i64>>,
    pub user_timeout: Option<Sp<String>>,
}

/// One `[[backend]]`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawBackend {
    pub at: Sp<()>,
    pub name: Option<Sp<String>>,
    pub servers: Option<Sp<Vec<Option<Sp<String>>>>>,
    pub protocol: Option<Sp<String>>,
    pub ack: Option<Sp<String>>,
    pub framing: Option<Sp<RawFraming>>,
    pub max_frame: Option<Sp<RawSize>>,
    pub buffer_limit: Option<Sp<RawSize>>,
    pub hold_timeout: Option<Sp<String>>,
    pub connect_timeout: Option<Sp<String>>,
    pub retry_initial: Option<Sp<String>>,
    pub retry_max: Option<Sp<String>>,
    pub on_server_close: Option<Sp<String>>,
    pub greeting: Option<Sp<i64>>,
    pub preamble: Option<Sp<i64>>,
    pub retry_responses: Option<Sp<Vec<Option<Sp<String>>>>>,
    pub splice: Option<Sp<bool>>,
    pub max_held_sessions: Option<Sp<i64>>,
    pub resume: Option<RawResume>,
    pub socket: RawSocket,
    pub tls: Option<RawBackendTls>,
}

/// `resume = { secret_file = "...", ... }` of a backend (protocol = "resume").
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawResume {
    pub at: Sp<()>,
    pub secret_file: Option<Sp<String>>,
    pub heartbeat_interval: Option<Sp<String>>,
    pub dead_peer_timeout: Option<Sp<String>>,
    pub max_frame: Option<Sp<RawSize>>,
    pub window: Option<Sp<RawSize>>,
    pub resume_timeout: Option<Sp<String>>,
    pub early_data: Option<Sp<bool>>,
}

/// `framing = "lines"` or `framing = { type = "length-prefixed", ... }`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawFraming {
    /// The name, or the table's `type`; `None` when that was missing or
    /// not a string (already reported).
    pub kind: Option<Sp<String>>,
    pub length_field_offset: Option<Sp<i64>>,
    pub length_field_length: Option<Sp<i64>>,
    pub big_endian: Option<Sp<bool>>,
    pub length_adjustment: Option<Sp<i64>>,
}

/// Keys of the length-prefixed framing table besides `type`.
const LENGTH_KEYS: &[&str] = &[
    "length_field_offset",
    "length_field_length",
    "big_endian",
    "length_adjustment",
];

/// Walks the document into [`RawConfig`], reporting unknown keys and wrong
/// types. Never stops early.
pub(super) fn read(doc: &Node, report: &mut Report) -> RawConfig {
    let mut raw = RawConfig::default();
    let Some(mut top) = Table::new(doc, String::new(), report) else {
        return raw;
    };
    if let Some(mut t) = top.table("admin", report) {
        raw.admin = Some(RawAdmin {
            listen: t.string("listen", report),
            at: t.at(),
        });
        t.finish(report);
    }
    if let Some(mut t) = top.table("limits", report) {
        raw.limits = RawLimits {
            buffer_memory: t.size("buffer_memory", report),
            max_sessions: t.integer("max_sessions", report),
            fd_reserve: t.integer("fd_reserve", report),
        };
        t.finish(report);
    }
    if let Some(mut t) = top.table("lifecycle", report) {
        raw.lifecycle = RawLifecycle {
            drain_timeout: t.duration("drain_timeout", report),
        };
        t.finish(report);
    }
    if let Some(mut t) = top.table("runtime", report) {
        raw.runtime = RawRuntime {
            worker_threads: t.integer("worker_threads", report),
            scheduler: t.string("scheduler", report),
        };
        t.finish(report);
    }
    if let Some(mut t) = top.table("handover", report) {
        raw.handover = Some(RawHandover {
            socket: t.string("socket", report),
            busy_within: t.string("busy_within", report),
            at: t.at(),
        });
        t.finish(report);
    }
    if let Some(mut t) = top.table("failover", report) {
        raw.failover = Some(RawFailover {
            role: t.string("role", report),
            listen: t.string("listen", report),
            peer: t.string("peer", report),
            secret_file: t.string("secret_file", report),
            heartbeat_interval: t.duration("heartbeat_interval", report),
            dead_peer_timeout: t.duration("dead_peer_timeout", report),
            service_address: t.string("service_address", report),
            interface: t.string("interface", report),
            listeners: t.strings("listeners", report),
            at: t.at(),
        });
        t.finish(report);
    }
    if let Some(mut t) = top.table("log", report) {
        raw.log = RawLog {
            access: t.string("access", report),
        };
        t.finish(report);
    }
    for mut t in top.array_of_tables("listener", report) {
        raw.listeners.push(RawListener {
            name: t.string("name", report),
            listen: t.string("listen", report),
            backend: t.string("backend", report),
            protocol: t.string("protocol", report),
            max_sessions: t.integer("max_sessions", report),
            max_sessions_per_client: t.integer("max_sessions_per_client", report),
            idle_timeout: t.duration("idle_timeout", report),
            resume: raw_resume(&mut t, report),
            socket: socket(&mut t, report),
            tls: listener_tls(&mut t, report),
            sni: t
                .array_of_tables("sni", report)
                .into_iter()
                .map(|mut s| {
                    let raw = RawSni {
                        name: s.string("name", report),
                        backend: s.string("backend", report),
                        cert: s.string("cert", report),
                        key: s.string("key", report),
                        at: s.at(),
                    };
                    s.finish(report);
                    raw
                })
                .collect(),
            at: t.at(),
        });
        t.finish(report);
    }
    for mut t in top.array_of_tables("backend", report) {
        raw.backends.push(RawBackend {
            name: t.string("name", report),
            servers: t.strings("servers", report),
            protocol: t.string("protocol", report),
            ack: t.string("ack", report),
            framing: framing(&mut t, report),
            max_frame: t.size("max_frame", report),
            buffer_limit: t.size("buffer_limit", report),
            hold_timeout: t.duration("hold_timeout", report),
            connect_timeout: t.duration("connect_timeout", report),
            retry_initial: t.duration("retry_initial", report),
            retry_max: t.duration("retry_max", report),
            on_server_close: t.string("on_server_close", report),
            greeting: t.integer("greeting", report),
            preamble: t.integer("preamble", report),
            retry_responses: t.strings("retry_responses", report),
            splice: t.boolean("splice", report),
            max_held_sessions: t.integer("max_held_sessions", report),
            resume: raw_resume(&mut t, report),
            socket: socket(&mut t, report),
            tls: backend_tls(&mut t, report),
            at: t.at(),
        });
        t.finish(report);
    }
    top.finish(report);
    raw
}

/// `resume = { ... }` of a listener or a backend.
fn raw_resume(t: &mut Table, report: &mut Report) -> Option<RawResume> {
    let mut r = t.table("resume", report)?;
    let raw = RawResume {
        secret_file: r.string("secret_file", report),
        heartbeat_interval: r.duration("heartbeat_interval", report),
        dead_peer_timeout: r.duration("dead_peer_timeout", report),
        max_frame: r.size("max_frame", report),
        window: r.size("window", report),
        resume_timeout: r.duration("resume_timeout", report),
        early_data: r.boolean("early_data", report),
        at: r.at(),
    };
    r.finish(report);
    Some(raw)
}

fn socket(t: &mut Table, report: &mut Report) -> RawSocket {
    RawSocket {
        nodelay: t.boolean("nodelay", report),
        keepalive: t.boolean("keepalive", report),
        keepalive_idle: t.duration("keepalive_idle", report),
        keepalive_interval: t.duration("keepalive_interval", report),
        keepalive_count: t.integer("keepalive_count", report),
        user_timeout: t.duration("user_timeout", report),
    }
}

fn listener_tls(t: &mut Table, report: &mut Report) -> Option<RawListenerTls> {
    let mut s = t.table("tls", report)?;
    let raw = RawListenerTls {
        cert: s.string("cert", report),
        key: s.string("key", report),
        client_ca: s.string("client_ca", report),
        min_version: s.string("min_version", report),
        alpn: s.strings("alpn", report),
        handshake_timeout: s.duration("handshake_timeout", report),
        at: s.at(),
    };
    s.finish(report);
    Some(raw)
}

fn backend_tls(t: &mut Table, report: &mut Report) -> Option<RawBackendTls> {
    let mut s = t.table("tls", report)?;
    let raw = RawBackendTls {
        ca: s.string("ca", report),
        server_name: s.string("server_name", report),
        cert: s.string("cert", report),
        key: s.string("key", report),
        alpn: s.strings("alpn", report),
        at: s.at(),
    };
    s.finish(report);
    Some(raw)
}

fn framing(t: &mut Table, report: &mut Report) -> Option<Sp<RawFraming>> {
    let (node, key) = t.take("framing")?;
    let mut raw = RawFraming {
        kind: None,
        length_field_offset: None,
        length_field_length: None,
        big_endian: None,
        length_adjustment: None,
    };
    match &node.kind {
        Kind::String(s) => {
            raw.kind = Some(Sp {
                value: s.clone(),
                key: key.clone(),
                span: node.span.clone(),
            });
        }
        Kind::Table(_) => {
            let mut f = Table::new(node, key.clone(), report)?;
            raw.kind = f.string("type", report);
            if !f.has("type") {
                report.error(
                    &format!("{key}.type"),
                    &node.span,
                    "missing key \"type\" (lines, length-prefixed or resp)",
                );
            }
            // `lines` and `resp` take no knobs: for them these are unknown.
            let plain = raw
                .kind
                .as_ref()
                .is_some_and(|k| k.value == "lines" || k.value == "resp");
            if !plain {
                raw.length_field_offset = f.integer(LENGTH_KEYS[0], report);
                raw.length_field_length = f.integer(LENGTH_KEYS[1], report);
                raw.big_endian = f.boolean(LENGTH_KEYS[2], report);
                raw.length_adjustment = f.integer(LENGTH_KEYS[3], report);
            }
            f.finish(report);
        }
        other => {
            report.error(
                &key,
                &node.span,
                format!(
                    "expected a framing name (lines, length-prefixed or resp) or a table, found {}",
                    other.describe()
                ),
            );
        }
    };
    Some(Sp {
        value: raw,
        key,
        span: node.span.clone(),
    })
}

/// A TOML table being read: hands out its keys and reports the rest as
/// unknown when finished.
struct Table<'a> {
    path: String,
    span: Span,
    entries: &'a [Entry],
    used: Vec<bool>,
}

impl<'a> Table<'a> {
    fn new(node: &'a Node, path: String, report: &mut Report) -> Option<Self> {
        match &node.kind {
            Kind::Table(entries) => Some(Table {
                path,
                span: node.span.clone(),
                entries,
                used: vec![false; entries.len()],
            }),
            other => {
                report.error(
                    &path,
                    &node.span,
                    format!("expected a table, found {}", other.describe()),
                );
                None
            }
        }
    }

    fn at(&self) -> Sp<()> {
        Sp {
            value: (),
            key: self.path.clone(),
            span: self.span.clone(),
        }
    }

    fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.key == name)
    }

    /// The value of `name` and its key path, marking it known.
    fn take(&mut self, name: &str) -> Option<(&'a Node, String)> {
        let i = self.entries.iter().position(|e| e.key == name)?;
        self.used[i] = true;
        Some((&self.entries[i].value, self.key(name)))
    }

    /// Reports every key nobody took.
    fn finish(self, report: &mut Report) {
        for (entry, used) in self.entries.iter().zip(&self.used) {
            if !*used {
                let span = entry.key_span.as_ref().or(entry.value.span.as_ref());
                report.error(
                    &self.key(&entry.key),
                    &span.cloned(),
                    format!("unknown key {:?}", entry.key),
                );
            }
        }
    }

    fn table(&mut self, name: &str, report: &mut Report) -> Option<Table<'a>> {
        let (node, key) = self.take(name)?;
        Table::new(node, key, report)
    }

    /// `[[name]]`: each element as a table keyed `name[i]`.
    fn array_of_tables(&mut self, name: &str, report: &mut Report) -> Vec<Table<'a>> {
        let Some((node, key)) = self.take(name) else {
            return Vec::new();
        };
        let Kind::Array(items) = &node.kind else {
            report.error(
                &key,
                &node.span,
                format!(
                    "expected an array of tables ([[{name}]]), found {}",
                    node.kind.describe()
                ),
            );
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| Table::new(item, format!("{key}[{i}]"), report))
            .collect()
    }

    /// Takes `name` and converts it with `f`, which says what it expected
    /// when the TOML type is wrong.
    fn typed<T>(
        &mut self,
        name: &str,
        report: &mut Report,
        f: impl FnOnce(&Kind) -> Result<T, String>,
    ) -> Option<Sp<T>> {
        let (node, key) = self.take(name)?;
        match f(&node.kind) {
            Ok(value) => Some(Sp {
                value,
                key,
                span: node.span.clone(),
            }),
            Err(msg) => {
                report.error(&key, &node.span, msg);
                None
            }
        }
    }

    fn string(&mut self, name: &str, report: &mut Report) -> Option<Sp<String>> {
        self.typed(name, report, |k| match k {
            Kind::String(s) => Ok(s.clone()),
            other => Err(format!("expected a string, found {}", other.describe())),
        })
    }

    fn boolean(&mut self, name: &str, report: &mut Report) -> Option<Sp<bool>> {
        self.typed(name, report, |k| match k {
            Kind::Boolean(b) => Ok(*b),
            other => Err(format!(
                "expected a boolean (true or false), found {}",
                other.describe()
            )),
        })
    }

    fn integer(&mut self, name: &str, report: &mut Report) -> Option<Sp<i64>> {
        self.typed(name, report, |k| match k {
            Kind::Integer(n) => Ok(*n),
            other => Err(format!("expected an integer, found {}", other.describe())),
        })
    }

    fn size(&mut self, name: &str, report: &mut Report) -> Option<Sp<RawSize>> {
        self.typed(name, report, |k| match k {
            Kind::String(s) => Ok(RawSize::Text(s.clone())),
            Kind::Integer(n) => Ok(RawSize::Bytes(*n)),
            other => Err(format!(
                "expected a size like \"64KiB\" or a number of bytes, found {}",
                other.describe()
            )),
        })
    }

    fn duration(&mut self, name: &str, report: &mut Report) -> Option<Sp<String>> {
        self.typed(name, report, |k| match k {
            Kind::String(s) => Ok(s.clone()),
            Kind::Integer(n) => Err(format!(
                "{n} needs a unit: write a string like \"{n}s\" or \"{n}ms\""
            )),
            other => Err(format!(
                "expected a duration like \"30s\", found {}",
                other.describe()
            )),
        })
    }

    /// An array of strings; each element keyed `name[i]`, `None` where it
    /// was not a string (reported).
    fn strings(&mut self, name: &str, report: &mut Report) -> Option<Sp<Vec<Option<Sp<String>>>>> {
        let (node, key) = self.take(name)?;
        let Kind::Array(items) = &node.kind else {
            report.error(
                &key,
                &node.span,
                format!(
                    "expected an array of strings, found {}",
                    node.kind.describe()
                ),
            );
            return None;
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            out.push(match &item.kind {
                Kind::String(s) => Some(Sp {
                    value: s.clone(),
                    key: item_key,
                    span: item.span.clone(),
                }),
                other => {
                    report.error(
                        &item_key,
                        &item.span,
                        format!("expected a string, found {}", other.describe()),
                    );
                    None
                }
            });
        }
        Some(Sp {
            value: out,
            key,
            span: node.span.clone(),
        })
    }
}
