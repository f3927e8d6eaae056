//! \[pure\] A versioned binary snapshot of a [`SessionCore`]: everything the
//! session holds, so that a new holdfast process (a hand-over) or a standby
//! (failover) can rebuild it and carry on exactly where it was.
//!
//! [`SessionCore::export`] appends a snapshot to a buffer;
//! [`SessionCore::import`] rebuilds a core from one. It owns the layout; the
//! pieces encode themselves beside their types (`stream::snapshot`,
//! `framing::snapshot`, `proto::snapshot`) with the primitives of
//! `snapshot_codec`. It owns no sockets: the shell passes the client and
//! server connections along by its own means.
//!
//! # Format, version 1
//!
//! Varints are unsigned LEB128; instants are signed nanoseconds relative to
//! the export's `now` (zigzag varint), rebased on the import's `now`; an
//! optional value is a byte 0, or 1 and the value; byte strings (replay
//! data included) are a varint length and the raw bytes.
//!
//! 1. magic `HFSS`, version (varint: 1, or 2 while a new leg that may send
//!    early data awaits its WELCOME, see [`SNAPSHOT_VERSION`]);
//! 2. session id (16 bytes, big endian), backend name (string), ack mode tag
//!    (0 none, 1 tcp, 2 response lines, 3 response length-prefixed, 4
//!    response RESP, 5 resume);
//! 3. the `up` stream, the `down` stream (each: replay buffer start, its
//!    chunks, `sent`, `fin_read`);
//! 4. the leg: 0 waiting (instant, server), 1 connecting (generation,
//!    server), 2 up (see below), 3 none;
//! 5. `next_gen`, `had_leg`, `attempts`, `retries`, `hold_since`,
//!    `hold_acked`, the request scanner (optional), the unanswered request
//!    ends (count, offsets), `req_last_end`, `resume_known`, `up_sent_high`,
//!    `error` (optional string), the client address, `answered`, the
//!    captured preamble (count, then request and response bytes),
//!    `greeting_delivered`, `client_fin_queued`, `client_fin_sent`,
//!    `first_closer`, `ending`, `done` (each an optional close reason, by its
//!    index in [`CloseReason::ALL`]), the backoff generator's state,
//!    `idle_timeout` (optional duration), `last_activity`.
//!
//! An up leg is: generation, server, base, the prefix still to write, the
//! preamble responses expected (count, bytes), greetings seen, `fin_sent`,
//! `server_eof`, the response state (optional: scanner, pending buffer,
//! `deliver_to`), the HELLO (optional), `hello_at`, the link (optional).
//!
//! Import checks the version, every length against the buffer, every tag,
//! and that offsets agree with each other (what `check_invariants` asserts,
//! and what the code relies on: scanners at the end of what they scanned,
//! request ends within the stream, the leg's state matching the ack mode).
//! Scratch buffers are not carried; nor are pending actions and events (see
//! [`SessionCore::export`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{
    AckMode, Action, BackendConfig, CloseReason, Generation, Leg, LegState, RespLeg, SessionCore,
    SessionId,
};
use crate::config::Framing;
use crate::framing::Scanner;
use crate::proto::{ClientAddr, Hello, Link};
pub use crate::snapshot_codec::SnapshotError;
use crate::snapshot_codec::{Reader, Result, Writer};
use crate::stream::{ReplayBuffer, Stream};

/// The newest version [`SessionCore::import`] reads. [`SessionCore::export`]
/// writes it only for a session whose new leg awaits its WELCOME and may
/// send early data (resume protocol version 2), and that is all it adds: a
/// build that reads only version 1 would take that WELCOME's offset 0 as a
/// rewind and send the early bytes again, so it must refuse such a
/// snapshot (a downgrade's hand-over keeps that session with the running
/// process). Every other session is written as version 1, which this build
/// reads too.
pub const SNAPSHOT_VERSION: u32 = 2;
/// Version 1: the same fields, without early data in flight.
const SNAPSHOT_VERSION_1: u32 = 1;

const MAGIC: [u8; 4] = *b"HFSS";

/// The ack mode's tag in a snapshot.
fn ack_tag(ack: &AckMode) -> u8 {
    match ack {
        AckMode::None => 0,
        AckMode::Tcp => 1,
        AckMode::Response(Framing::Lines { .. }) => 2,
        AckMode::Response(Framing::LengthPrefixed(_)) => 3,
        AckMode::Response(Framing::Resp { .. }) => 4,
        AckMode::Resume(_) => 5,
    }
}

const ACK_NAMES: [&str; 6] = [
    "none",
    "tcp",
    "response (lines)",
    "response (length-prefixed)",
    "response (resp)",
    "resume",
];

fn write_reason(w: &mut Writer, r: Option<CloseReason>) {
    w.option(r, |w, r| {
        let i = CloseReason::ALL.iter().position(|&x| x == r);
        w.u8(i.expect("every reason is in ALL") as u8);
    });
}

fn read_reason(r: &mut Reader<'_>, what: &str) -> Result<Option<CloseReason>> {
    r.option(what, |r| {
        let i = r.tag(CloseReason::ALL.len() as u8, what)?;
        Ok(CloseReason::ALL[i as usize])
    })
}

fn write_chunks<'a>(w: &mut Writer, chunks: impl ExactSizeIterator<Item = &'a Bytes>) {
    w.usize(chunks.len());
    for c in chunks {
        w.bytes(c);
    }
}

fn read_chunks(r: &mut Reader<'_>, what: &str) -> Result<VecDeque<Bytes>> {
    let n = r.count(1, what)?;
    let mut out = VecDeque::with_capacity(n);
    for _ in 0..n {
        out.push_back(r.bytes(what)?);
    }
    Ok(out)
}

impl SessionCore {
    /// Encodes the whole state of the session for a hand-over, appending to
    /// `out`. Instants are stored relative to `now`.
    ///
    /// Callable only at a quiescent point: the shell has drained
    /// [`SessionCore::poll_action`] and [`SessionCore::poll_event`] and
    /// carried the actions out, so none is encoded. Two of them leave work
    /// that belongs to the old process: a connect in flight (the core is
    /// `Connecting`) and a client shutdown not yet reported
    /// (`on_client_shutdown`); [`SessionCore::import`] issues both again
    /// from the state. A server shutdown ([`Action::ShutdownServer`]) the
    /// shell has not finished is not visible in the state: the shell must
    /// finish it (or issue it again itself) before it exports.
    pub fn export(&self, now: Instant, out: &mut Vec<u8>) {
        debug_assert!(
            self.actions.is_empty() && self.events.is_empty(),
            "export at a quiescent point: drain poll_action and poll_event first"
        );
        // Every field, by name and without `..`: a new field does not
        // compile until it is exported (or said to need no export).
        let SessionCore {
            id,
            backend,
            up,
            down,
            leg,
            next_gen,
            had_leg,
            attempts,
            retries,
            hold_since,
            hold_acked,
            req_scanner,
            req_ends,
            req_last_end,
            resume_known,
            up_sent_high,
            error,
            client_addr,
            answered,
            preamble,
            greeting_delivered,
            client_fin_queued,
            client_fin_sent,
            first_closer,
            ending,
            done,
            actions: _,
            events: _,
            rng,
            idle_timeout,
            last_activity,
        } = self;
        // A new leg that may send early data until its WELCOME: version 2
        // says so (the flag has no field of its own).
        let early = matches!(leg, LegState::Up(l) if l.hello.is_some() && l.early);
        let w = &mut Writer::new(out, now);
        w.raw(&MAGIC);
        w.u32(if early {
            SNAPSHOT_VERSION
        } else {
            SNAPSHOT_VERSION_1
        });
        w.u128(id.0);
        w.bytes(backend.name.as_bytes());
        w.u8(ack_tag(&backend.ack));
        up.write_snapshot(w);
        down.write_snapshot(w);
        match leg {
            LegState::Waiting { at, server } => {
                w.u8(0);
                w.instant(*at);
                w.usize(*server);
            }
            LegState::Connecting { gen, server } => {
                w.u8(1);
                w.u64(gen.0);
                w.usize(*server);
            }
            LegState::Up(leg) => {
                w.u8(2);
                leg.write_snapshot(w);
            }
            LegState::None => w.u8(3),
        }
        w.u64(next_gen.0);
        w.bool(*had_leg);
        w.u32(*attempts);
        w.u32(*retries);
        w.option(*hold_since, |w, t| w.instant(t));
        w.u64(*hold_acked);
        w.option(req_scanner.as_ref(), |w, s| s.write_snapshot(w));
        w.usize(req_ends.len());
        for &e in req_ends {
            w.u64(e);
        }
        w.u64(*req_last_end);
        w.bool(*resume_known);
        w.u64(*up_sent_high);
        w.option(error.as_ref(), |w, e| w.bytes(e.as_bytes()));
        client_addr.write_snapshot(w);
        w.u64(*answered);
        w.usize(preamble.len());
        for (req, resp) in preamble {
            w.bytes(req);
            w.bytes(resp);
        }
        w.u32(*greeting_delivered);
        w.bool(*client_fin_queued);
        w.bool(*client_fin_sent);
        write_reason(w, *first_closer);
        write_reason(w, *ending);
        write_reason(w, *done);
        w.u64(*rng);
        w.option(*idle_timeout, |w, d| w.duration(d));
        w.instant(*last_activity);
    }

    /// Rebuilds a core from [`SessionCore::export`]'s bytes. `resolve` maps
    /// the backend name stored in the snapshot to this process's
    /// `Arc<BackendConfig>`; its ack mode must be the snapshot's (its other
    /// settings apply from now on, as after a reload). Instants are rebased
    /// on `now`.
    ///
    /// A leg that was still connecting gets [`Action::Connect`] again for its
    /// generation (the old process's connect is gone), and a client shutdown
    /// that was issued but not reported gets [`Action::ShutdownClient`]
    /// again: poll the actions as after any input. An up leg expects the
    /// caller to attach the same server connection; nothing is re-sent.
    pub fn import(
        buf: &[u8],
        resolve: impl Fn(&str) -> Option<Arc<BackendConfig>>,
        now: Instant,
    ) -> std::result::Result<SessionCore, SnapshotError> {
        let r = &mut Reader::new(buf, now);
        let magic: [u8; 4] = r.array("magic")?;
        r.check(magic == MAGIC, || "not a session snapshot (magic)".into())?;
        let version = r.u32("version")?;
        r.check(
            (SNAPSHOT_VERSION_1..=SNAPSHOT_VERSION).contains(&version),
            || format!("version {version}, this holdfast reads {SNAPSHOT_VERSION_1} to {SNAPSHOT_VERSION}"),
        )?;
        let id = SessionId(r.u128("session id")?);
        let name = r.string("backend name")?;
        let backend =
            resolve(&name).ok_or_else(|| r.error(format!("no backend named {name:?}")))?;
        let tag = r.tag(ACK_NAMES.len() as u8, "ack mode")?;
        r.check(tag == ack_tag(&backend.ack), || {
            format!(
                "backend {name:?} has ack mode {}, the session {}",
                ACK_NAMES[ack_tag(&backend.ack) as usize],
                ACK_NAMES[tag as usize]
            )
        })?;
        // A scanner of the backend's framing, to compare kinds with.
        let framing = match &backend.ack {
            AckMode::Response(f) => Some(Scanner::new(f)),
            _ => None,
        };
        let resume = matches!(backend.ack, AckMode::Resume(_));
        let servers = backend.servers.len().max(1);

        let up = Stream::read_snapshot(r, "up stream")?;
        let down = Stream::read_snapshot(r, "down stream")?;
        r.check(down.acked() == down.sent(), || {
            "down stream: acked is not what was written".into()
        })?;
        let leg = match r.tag(4, "leg")? {
            0 => LegState::Waiting {
                at: r.instant("waiting leg")?,
                server: r.usize("waiting leg")? % servers,
            },
            1 => LegState::Connecting {
                gen: Generation(r.counter("connecting leg")?),
                server: r.usize("connecting leg")? % servers,
            },
            2 => {
                let mut leg = Leg::read_snapshot(r, framing.as_ref(), resume)?;
                leg.early =
                    version == SNAPSHOT_VERSION && leg.hello.as_ref().is_some_and(|h| !h.resume);
                leg.server %= servers;
                r.check(leg.base <= up.sent(), || {
                    format!("leg base {} past up sent {}", leg.base, up.sent())
                })?;
                LegState::Up(Box::new(leg))
            }
            _ => LegState::None,
        };
        let next_gen = Generation(r.counter("next_gen")?);
        let leg_gen = match &leg {
            LegState::Connecting { gen, .. } => Some(*gen),
            LegState::Up(leg) => Some(leg.gen),
            _ => None,
        };
        r.check(leg_gen.map_or(true, |g| g < next_gen), || {
            format!("leg {leg_gen:?} not before next_gen {next_gen}")
        })?;
        let had_leg = r.bool("had_leg")?;
        let attempts = r.small("attempts")?;
        let retries = r.small("retries")?;
        let hold_since = r.option("hold_since", |r| r.instant("hold_since"))?;
        let hold_acked = r.counter("hold_acked")?;
        let req_scanner = r.option("request scanner", |r| {
            Scanner::read_snapshot(r, "request scanner").map(Box::new)
        })?;
        match (&req_scanner, &framing) {
            (None, None) => {}
            (Some(s), Some(f)) if s.same_kind(f) => {}
            _ => return Err(r.error("request scanner does not match the ack mode")),
        }
        if let Some(s) = &req_scanner {
            r.check(s.position() == up.read(), || {
                format!("request scanner at {}, up read {}", s.position(), up.read())
            })?;
        }
        let n = r.count(1, "request ends")?;
        let mut req_ends = VecDeque::with_capacity(n);
        let mut last = up.acked();
        for _ in 0..n {
            let end = r.counter("request ends")?;
            r.check(end > last && end <= up.read(), || {
                format!("request end {end} not within {last} .. {}", up.read())
            })?;
            last = end;
            req_ends.push_back(end);
        }
        let req_last_end = r.counter("req_last_end")?;
        r.check(req_last_end <= up.read(), || {
            format!("req_last_end {req_last_end} past up read {}", up.read())
        })?;
        let resume_known = r.bool("resume_known")?;
        let up_sent_high = r.counter("up_sent_high")?;
        let error = r.option("error", |r| r.string("error"))?;
        let client_addr = ClientAddr::read_snapshot(r, "client address")?;
        let answered = r.counter("answered")?;
        let n = r.count(2, "preamble")?;
        let mut preamble = Vec::with_capacity(n);
        for _ in 0..n {
            preamble.push((r.bytes("preamble")?, r.bytes("preamble")?));
        }
        r.check(
            framing.is_some() || (req_ends.is_empty() && req_last_end == 0 && preamble.is_empty()),
            || "request state of response mode in another ack mode".into(),
        )?;
        let greeting_delivered = r.small("greeting_delivered")?;
        let client_fin_queued = r.bool("client_fin_queued")?;
        let client_fin_sent = r.bool("client_fin_sent")?;
        let first_closer = read_reason(r, "first_closer")?;
        let ending = read_reason(r, "ending")?;
        let done = read_reason(r, "done")?;
        let rng = r.u64("rng")?;
        let idle_timeout = r.option("idle_timeout", |r| r.duration("idle_timeout"))?;
        let last_activity = r.instant("last_activity")?;
        r.finish()?;

        let mut core = SessionCore {
            id,
            backend,
            up,
            down,
            leg,
            next_gen,
            had_leg,
            attempts,
            retries,
            hold_since,
            hold_acked,
            req_scanner,
            req_ends,
            req_last_end,
            resume_known,
            up_sent_high,
            error,
            client_addr,
            answered,
            preamble,
            greeting_delivered,
            client_fin_queued,
            client_fin_sent,
            first_closer,
            ending,
            done,
            actions: super::Queue::new(),
            events: VecDeque::new(),
            rng,
            idle_timeout,
            last_activity,
        };
        if core.done.is_none() {
            if let LegState::Connecting { gen, server } = core.leg {
                core.actions.push_back(Action::Connect { gen, server });
            }
            if core.client_fin_queued && !core.client_fin_sent {
                core.actions.push_back(Action::ShutdownClient);
            }
        }
        core.check_invariants();
        Ok(core)
    }
}

impl Leg {
    fn write_snapshot(&self, w: &mut Writer) {
        let Leg {
            gen,
            server,
            base,
            prefix_out,
            preamble_expect,
            greeting_seen,
            fin_sent,
            server_eof,
            resp,
            hello,
            hello_at,
            link,
            early: _,
        } = self;
        w.u64(gen.0);
        w.usize(*server);
        w.u64(*base);
        w.bytes(prefix_out);
        write_chunks(w, preamble_expect.iter());
        w.u32(*greeting_seen);
        w.bool(*fin_sent);
        w.bool(*server_eof);
        w.option(resp.as_ref(), |w, resp| {
            let RespLeg {
                scanner,
                pending,
                deliver_to,
            } = &**resp;
            scanner.write_snapshot(w);
            pending.write_snapshot(w);
            w.u64(*deliver_to);
        });
        w.option(hello.as_ref(), |w, h| h.write_snapshot(w));
        w.instant(*hello_at);
        w.option(link.as_ref(), |w, l| l.write_snapshot(w));
    }

    /// `framing`: a scanner of the backend's framing in response mode;
    /// `resume`: whether the backend speaks the resume protocol.
    fn read_snapshot(r: &mut Reader<'_>, framing: Option<&Scanner>, resume: bool) -> Result<Leg> {
        let what = "up leg";
        let gen = Generation(r.counter(what)?);
        let server = r.usize(what)?;
        let base = r.counter(what)?;
        let prefix_out = r.bytes(what)?;
        let preamble_expect = read_chunks(r, what)?;
        let greeting_seen = r.small(what)?;
        let fin_sent = r.bool(what)?;
        let server_eof = r.bool(what)?;
        let resp = r.option(what, |r| {
            let scanner = Scanner::read_snapshot(r, "response scanner")?;
            let pending = ReplayBuffer::read_snapshot(r, "pending responses")?;
            let deliver_to = r.counter(what)?;
            r.check(scanner.position() == pending.end(), || {
                format!(
                    "response scanner at {}, pending ends at {}",
                    scanner.position(),
                    pending.end()
                )
            })?;
            r.check(deliver_to <= pending.start(), || {
                format!("deliver_to {deliver_to} past pending {}", pending.start())
            })?;
            Ok(RespLeg {
                scanner,
                pending,
                deliver_to,
            })
        })?;
        let resp_ok = match (&resp, framing) {
            (None, None) => true,
            (Some(resp), Some(f)) => resp.scanner.same_kind(f),
            _ => false,
        };
        r.check(resp_ok, || {
            "response state does not match the ack mode".into()
        })?;
        let hello = r.option(what, |r| Hello::read_snapshot(r, "hello"))?;
        let hello_at = r.instant(what)?;
        let link = r.option(what, |r| Link::read_snapshot(r, "link"))?;
        let proto_ok = if resume {
            hello.is_some() != link.is_some()
        } else {
            hello.is_none() && link.is_none()
        };
        r.check(proto_ok, || {
            "handshake and link state do not match the ack mode".into()
        })?;
        Ok(Leg {
            gen,
            server,
            base,
            prefix_out,
            preamble_expect,
            greeting_seen,
            fin_sent,
            server_eof,
            resp: resp.map(Box::new),
            hello: hello.map(Box::new),
            hello_at,
            link: link.map(Box::new),
            // From the snapshot's version (`SessionCore::import`).
            early: false,
        })
    }
}

#[cfg(test)]
mod tests;
