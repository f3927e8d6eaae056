//! \[pure\] A session rebuilt on a standby from what the active replicated
//! (host failover, `src/failover/`): a child of `core.rs`.
//!
//! The standby knows, per session, the client bytes the active read (`R`),
//! the up offset the server confirmed (`A`, with the bytes `[A, R)`), the
//! bytes the active wrote to the client (`W`) and the offset the client's
//! TCP acknowledged (`C`, with the bytes `[C, W)`). The restored client
//! socket is at `rcv_nxt = R` and `snd_una = C`; leaving repair mode sends
//! what of `[C, W)` fits at once ([`crate::failover::repair::leave_repair_and_send`]
//! returns how much). The core then starts:
//!
//! - up: `acked = sent = A`, `read = R`, the bytes `[A, R)` in the replay
//!   buffer, to be replayed to a new leg. In response mode the request
//!   scanner starts at `A` (always the end of an answered request, a frame
//!   boundary) and scans `[A, R)` again, so the unanswered requests are
//!   known and their answers released in order;
//! - down: `acked = sent` = where the restored socket's re-send stopped
//!   (`W` when it sent everything), with the rest of `[C, W)` to write as
//!   usual. Responses from the new leg follow from `W` on;
//! - no leg, and an immediate [`Action::Connect`]: the shell connects to the
//!   backend and the core replays `[A, R)` (`ack = "tcp"` and
//!   `ack = "response"`).
//!
//! Not supported (the caller closes such a session): `ack = "none"` (no
//! replay, so nothing to resume), the resume protocol (a resume-protocol
//! client resumes against the standby by itself, without TCP_REPAIR; see
//! docs/failover.md) and `preamble` (its captured requests are not
//! replicated). A `greeting` is taken as already delivered when any byte was
//! written to the client (`W > 0`), and swallowed on the new leg; that is
//! exact for a greeting of one frame.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{AckMode, BackendConfig, SessionCore, SessionId};
use crate::framing::Scanner;
use crate::stream::{Offset, Stream};

/// One replicated session's offsets and bytes, as the standby's mirror has
/// them after the restored socket took what it could of `[C, W)`.
#[derive(Debug, Clone, Default)]
pub struct Replicated {
    /// `A`: the up offset the server confirmed.
    pub server_acked: Offset,
    /// The client bytes `[A, R)`, in order.
    pub unacked_up: Vec<Bytes>,
    /// Where the down stream resumes: bytes before this offset are the
    /// client's (acknowledged, or sent again by the restored socket).
    pub down_from: Offset,
    /// The bytes `[down_from, W)` still to write to the client.
    pub unsent_down: Vec<Bytes>,
}

/// Why a replicated session can't be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicatedError {
    #[error("ack = \"{0}\" sessions are not taken over (nothing to replay)")]
    AckMode(&'static str),
    #[error("backend {0:?} has a preamble, which is not replicated")]
    Preamble(String),
    #[error("the replicated client bytes break the request framing: {0}")]
    Framing(String),
}

impl SessionCore {
    /// A session rebuilt from replicated offsets (see the module): no leg,
    /// an [`Action::Connect`](super::Action::Connect) to `first_server`
    /// queued, `[A, R)` to replay and `r.unsent_down` to write to the client.
    /// The caller sets the client address and idle timeout as for
    /// [`SessionCore::new`].
    pub fn from_replicated(
        id: SessionId,
        backend: Arc<BackendConfig>,
        first_server: usize,
        r: Replicated,
        now: Instant,
    ) -> Result<SessionCore, ReplicatedError> {
        let framing = match &backend.ack {
            AckMode::None => return Err(ReplicatedError::AckMode("none")),
            AckMode::Resume(_) => return Err(ReplicatedError::AckMode("resume")),
            AckMode::Tcp => None,
            AckMode::Response(f) => Some(f.clone()),
        };
        if backend.preamble > 0 {
            return Err(ReplicatedError::Preamble(backend.name.clone()));
        }
        let written = r.down_from + r.unsent_down.iter().map(|b| b.len() as u64).sum::<u64>();
        let greeting = backend.greeting;
        // `new` queues the connect (leg 0, nothing sent yet); the streams
        // are set before the shell sees it.
        let mut core = SessionCore::new(id, backend, first_server, now);
        core.up = Stream::starting_at(r.server_acked);
        core.hold_acked = r.server_acked;
        core.up_sent_high = r.server_acked;
        core.req_last_end = r.server_acked;
        core.req_scanner = framing.map(|f| Box::new(Scanner::starting_at(&f, r.server_acked)));
        // Later legs are resumes: the active's leg was the first.
        core.had_leg = true;
        if written > 0 {
            core.greeting_delivered = greeting;
        }
        let mut down = Stream::starting_at(r.down_from);
        for chunk in r.unsent_down {
            if !chunk.is_empty() {
                down.push(chunk);
            }
        }
        core.down = down;
        for chunk in r.unacked_up {
            core.on_client_data(chunk, now);
        }
        if core.done.is_some() {
            return Err(ReplicatedError::Framing(
                "the request scanner failed on [server_acked, read)".into(),
            ));
        }
        core.check_invariants();
        Ok(core)
    }
}

#[cfg(test)]
#[path = "failover_tests.rs"]
mod tests;
