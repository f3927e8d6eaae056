//! The standby's takeover, in the one order that is safe: rebuild every
//! client socket in repair mode first, then claim and announce the service
//! address, then let each socket run and re-send its unacknowledged bytes.
//!
//! Announcing before a socket exists makes the standby's kernel answer that
//! client's next segment with a reset (2 of 7 runs in the measurements of
//! docs/failover.md). A socket in repair mode receives and acknowledges but
//! sends nothing of its own, so it is safe to hold every socket there while
//! the address moves.
//!
//! Blocking system calls, microseconds each: run it on a thread of its own
//! or in `spawn_blocking`. Owns the order and the timings; resuming each
//! session's server side is the caller's.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::announce::Announcer;
use super::mirror::MirrorSession;
use super::repair::{self, RepairError};
use crate::session::SessionId;

/// One session whose client socket runs on the standby now.
#[derive(Debug)]
pub struct Taken {
    pub session: MirrorSession,
    /// The live client socket (blocking mode).
    pub conn: OwnedFd,
    /// Down bytes due to the client that did not fit into the socket at
    /// once; the caller writes them before anything else.
    pub unsent: Vec<Bytes>,
}

/// What a takeover did.
#[derive(Debug)]
pub struct Report {
    pub taken: Vec<Taken>,
    /// Sessions whose socket could not be rebuilt or started; their clients
    /// are lost (counted and logged by the caller).
    pub failed: Vec<(SessionId, RepairError)>,
    /// Time to rebuild every socket, to claim and announce the address, and
    /// to take every socket out of repair.
    pub restore: Duration,
    pub claim: Duration,
    pub live: Duration,
}

/// Why the takeover as a whole failed: the address could not be claimed
/// (the sockets stay in repair mode and are closed, silently to the
/// clients).
#[derive(Debug, thiserror::Error)]
#[error("claiming the service address {address}: {source}")]
pub struct ClaimError {
    pub address: Ipv4Addr,
    #[source]
    pub source: std::io::Error,
}

/// Takes over `sessions`, claiming `address/prefix` with `announcer` (opened
/// in advance).
pub fn take_over(
    sessions: Vec<MirrorSession>,
    announcer: &mut Announcer,
    address: Ipv4Addr,
    prefix: u8,
) -> Result<Report, ClaimError> {
    let t0 = Instant::now();
    let mut restored = Vec::with_capacity(sessions.len());
    let mut failed = Vec::new();
    for s in sessions {
        let at = s.offsets(Instant::now());
        match repair::restore(&s.new.state, &at, s.new.local, s.new.client) {
            Ok(fd) => restored.push((s, fd)),
            Err(e) => failed.push((s.id(), e)),
        }
    }
    let t1 = Instant::now();
    announcer
        .claim(address, prefix)
        .map_err(|source| ClaimError { address, source })?;
    let t2 = Instant::now();
    let mut taken = Vec::with_capacity(restored.len());
    for (session, conn) in restored {
        let down = session.unacked_down();
        let fresh = repair::fresh_budget(&session.new.state);
        match repair::leave_repair_and_send(conn.as_fd(), &down, fresh) {
            Ok(sent) => {
                let unsent = skip(down, sent);
                taken.push(Taken {
                    session,
                    conn,
                    unsent,
                });
            }
            Err(e) => failed.push((session.id(), e)),
        }
    }
    let t3 = Instant::now();
    Ok(Report {
        taken,
        failed,
        restore: t1 - t0,
        claim: t2 - t1,
        live: t3 - t2,
    })
}

/// `chunks` without their first `n` bytes.
fn skip(chunks: Vec<Bytes>, mut n: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    for c in chunks {
        if n >= c.len() {
            n -= c.len();
        } else {
            out.push(c.slice(n..));
            n = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_drops_whole_and_partial_chunks() {
        let chunks = vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"f"),
        ];
        assert_eq!(skip(chunks.clone(), 0), chunks);
        assert_eq!(
            skip(chunks.clone(), 4),
            vec![Bytes::from_static(b"e"), Bytes::from_static(b"f")]
        );
        assert_eq!(skip(chunks.clone(), 5), vec![Bytes::from_static(b"f")]);
        assert!(skip(chunks, 6).is_empty());
    }
}
