//! holdfast: a connection-preserving TCP proxy.
//!
//! Clients keep long-lived connections to holdfast; holdfast keeps its own
//! connections (legs) to the servers behind it, tracks every byte of both
//! directions with 64-bit offsets, and when a server fails it holds the
//! client, reconnects and replays what the server had not consumed.
//!
//! The map, pure core first (no sockets, no clock, no tasks):
//!
//! - [`config`]: the TOML file → a fully typed [`config::Config`], every error
//!   at once with its key and line.
//! - [`stream`]: one direction's `read`/`sent`/`acked` offsets and its replay
//!   buffer of shared chunks.
//! - [`framing`]: frame boundaries (lines, length-prefixed, RESP) for
//!   `ack = "response"`.
//! - [`proto`]: the resume protocol (docs/protocol.md): frames, codec,
//!   handshake tokens, and one established leg ([`proto::Link`]).
//! - [`session`]: `session::core` is the session state machine (legs, hold,
//!   replay, every ack mode); `session::driver` is the task that runs it over
//!   real sockets.
//!
//! The async shell:
//!
//! - [`transport`]: the only place that makes sockets (TCP, Unix), and their
//!   options.
//! - [`proxy`]: binding, accept loops, per-backend state (round robin, the
//!   prober), reload, the access log, draining.
//! - [`admin`] and [`metrics`]: `/metrics`, `/healthz`, `/ready`, `/sessions`.
//! - [`failover`]: host failover with TCP_REPAIR: a client connection's
//!   kernel state captured at accept and rebuilt on a standby, and the claim
//!   of the service address.
//! - [`handover`]: listening sockets to a new process (upgrades), over
//!   SCM_RIGHTS.
//! - [`lifecycle`]: phases and shutdown triggers; [`systemd`]: readiness
//!   notification and socket activation.
//! - [`demo`]: `holdfast demo` and the example server.
//!
//! `unsafe` is denied here and allowed only in `transport::sockopt`,
//! `failover::sys`, `sched` and `systemd`, each block with a `SAFETY` note.
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod demo;
pub mod failover;
pub mod framing;
pub mod handover;
pub mod lifecycle;
pub mod metrics;
pub mod privileges;
pub mod proto;
pub mod proxy;
pub mod sched;
pub mod server;
pub mod session;
mod snapshot_codec;
pub mod stream;
pub mod systemd;
pub mod transport;
