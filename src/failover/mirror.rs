//! The standby's copy of the active's sessions, built from the replication
//! records ([`Record`]). Pure: no sockets; the clock is an input.
//!
//! Per session it keeps what a takeover needs and nothing more:
//! - up (client → server): `read`, `server_acked`, and the bytes
//!   `[server_acked, read)` that a new leg replays to the server;
//! - down (server → client): `written`, `client_acked`, and the bytes
//!   `[client_acked, written)` that the restored socket sends again;
//! - the kernel state from accept, and the latest windows and TCP timestamp
//!   clock (with the moment they arrived, to move the clock forward).
//!
//! Records must be contiguous and within bounds; anything else is a broken
//! link ([`MirrorError`]), and the caller drops the link and the mirror (the
//! active re-sends every live session when it reconnects).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use super::codec::{NewSession, Record};
use super::repair::{timestamp_after, Offsets};
use crate::session::SessionId;

/// One session as the standby knows it.
#[derive(Debug, Clone)]
pub struct MirrorSession {
    pub new: NewSession,
    /// Client bytes the active read: the restored socket's `rcv_nxt`.
    pub read: u64,
    /// Up bytes the server confirmed; always `<= read`.
    pub server_acked: u64,
    /// The bytes `[server_acked, read)`.
    up: VecDeque<Bytes>,
    /// Bytes the active wrote (or was about to write) to the client.
    pub written: u64,
    /// Down bytes the client's TCP acknowledged; always `<= written`.
    pub client_acked: u64,
    /// The bytes `[client_acked, written)`.
    down: VecDeque<Bytes>,
    pub snd_wnd: u32,
    pub rcv_wnd: u32,
    /// The connection's TCP timestamp clock, and when that reading arrived.
    timestamp: (u32, Instant),
    /// `Written` bytes since the last `Synced`, not yet part of `down`.
    staged_down: VecDeque<Bytes>,
    /// Where the staged bytes end (`written` when none are staged).
    staged_written: u64,
    /// A `ServerAcked` since the last `Synced`, not yet applied.
    staged_acked: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    #[error("session {0} announced twice")]
    Duplicate(SessionId),
    #[error("record for unknown session {0}")]
    Unknown(SessionId),
    #[error("session {id}: {what} at offset {got}, expected {want}")]
    NotContiguous {
        id: SessionId,
        what: &'static str,
        got: u64,
        want: u64,
    },
    #[error("session {id}: {what} {got} outside [{low}, {high}]")]
    OutOfRange {
        id: SessionId,
        what: &'static str,
        got: u64,
        low: u64,
        high: u64,
    },
}

/// A record's offset must continue where the session stands.
fn contiguous(id: SessionId, what: &'static str, got: u64, want: u64) -> Result<(), MirrorError> {
    if got == want {
        Ok(())
    } else {
        Err(MirrorError::NotContiguous {
            id,
            what,
            got,
            want,
        })
    }
}

/// `Written` records of `chunks`, the first at `offset`; returns where
/// they end.
fn push_written(
    id: SessionId,
    mut offset: u64,
    chunks: &VecDeque<Bytes>,
    out: &mut Vec<Record>,
) -> u64 {
    for data in chunks {
        out.push(Record::Written {
            id,
            offset,
            data: data.clone(),
        });
        offset += data.len() as u64;
    }
    offset
}

/// Drops the first `n` bytes of a chunk queue.
fn trim(q: &mut VecDeque<Bytes>, mut n: u64) {
    while n > 0 {
        let front = q.front_mut().expect("trim within the queued bytes");
        if front.len() as u64 <= n {
            n -= front.len() as u64;
            q.pop_front();
        } else {
            *front = front.slice(n as usize..);
            n = 0;
        }
    }
}

impl MirrorSession {
    fn new(new: NewSession, now: Instant) -> MirrorSession {
        MirrorSession {
            read: new.read_from,
            server_acked: new.read_from,
            up: VecDeque::new(),
            written: new.written_from,
            client_acked: new.written_from,
            down: VecDeque::new(),
            snd_wnd: new.state.window.snd_wnd,
            rcv_wnd: new.state.window.rcv_wnd,
            timestamp: (new.state.timestamp, now),
            staged_down: VecDeque::new(),
            staged_written: new.written_from,
            staged_acked: None,
            new,
        }
    }

    pub fn id(&self) -> SessionId {
        self.new.id
    }

    /// Where [`super::repair::restore`] puts the socket, at `now`.
    pub fn offsets(&self, now: Instant) -> Offsets {
        let (ts, at) = self.timestamp;
        Offsets {
            read: self.read,
            acked: self.client_acked,
            snd_wnd: self.snd_wnd,
            rcv_wnd: self.rcv_wnd,
            timestamp: timestamp_after(ts, now.saturating_duration_since(at)),
        }
    }

    /// The records that rebuild this session on a standby that (re)connects:
    /// `Session` from the acknowledged offsets, the unacknowledged bytes of
    /// both directions, and a `ClientAcked` with the timestamp clock moved
    /// forward to `now`; then what is staged (`Written` bytes and a
    /// `ServerAcked` since the last `Synced`), staged there too: the
    /// `Synced` that applies them is still to come from the session, and
    /// must find them.
    pub fn resend(&self, now: Instant) -> Vec<Record> {
        let id = self.id();
        let mut new = self.new.clone();
        new.read_from = self.server_acked;
        new.written_from = self.client_acked;
        let mut out = vec![Record::Session(Box::new(new))];
        let mut offset = self.server_acked;
        for data in &self.up {
            out.push(Record::Read {
                id,
                offset,
                data: data.clone(),
            });
            offset += data.len() as u64;
        }
        let offset = push_written(id, self.client_acked, &self.down, &mut out);
        out.push(Record::Synced { id, offset });
        out.push(Record::ClientAcked {
            id,
            offset: self.client_acked,
            snd_wnd: self.snd_wnd,
            rcv_wnd: self.rcv_wnd,
            timestamp: self.offsets(now).timestamp,
        });
        push_written(id, self.written, &self.staged_down, &mut out);
        if let Some(offset) = self.staged_acked {
            out.push(Record::ServerAcked { id, offset });
        }
        out
    }

    /// The bytes written to the client that it has not acknowledged, from
    /// `client_acked`: the restored socket sends them again.
    pub fn unacked_down(&self) -> Vec<Bytes> {
        self.down.iter().cloned().collect()
    }

    /// The client bytes the server has not confirmed, from `server_acked`:
    /// a new leg replays them.
    pub fn unacked_up(&self) -> Vec<Bytes> {
        self.up.iter().cloned().collect()
    }

    #[cfg(debug_assertions)]
    fn check_invariants(&self) {
        let up: u64 = self.up.iter().map(|b| b.len() as u64).sum();
        let down: u64 = self.down.iter().map(|b| b.len() as u64).sum();
        assert!(self.server_acked <= self.read && up == self.read - self.server_acked);
        assert!(self.client_acked <= self.written && down == self.written - self.client_acked);
    }
}

/// Every session of the active.
#[derive(Debug, Default, Clone)]
pub struct Mirror {
    sessions: HashMap<SessionId, MirrorSession>,
    /// The last heartbeat's sequence number.
    pub heartbeat: u64,
}

impl Mirror {
    pub fn new() -> Mirror {
        Mirror::default()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn get(&self, id: SessionId) -> Option<&MirrorSession> {
        self.sessions.get(&id)
    }

    /// Every session, by reference.
    pub fn sessions(&self) -> impl Iterator<Item = &MirrorSession> {
        self.sessions.values()
    }

    /// Every session, for a takeover.
    pub fn into_sessions(self) -> Vec<MirrorSession> {
        self.sessions.into_values().collect()
    }

    /// Applies one record that arrived at `now`.
    pub fn apply(&mut self, r: Record, now: Instant) -> Result<(), MirrorError> {
        let id = match &r {
            Record::Session(s) => s.id,
            Record::Read { id, .. }
            | Record::Written { id, .. }
            | Record::ClientAcked { id, .. }
            | Record::ServerAcked { id, .. }
            | Record::Synced { id, .. }
            | Record::Closed { id } => *id,
            Record::Heartbeat { seq } => {
                self.heartbeat = *seq;
                return Ok(());
            }
        };
        if let Record::Session(new) = r {
            if self.sessions.contains_key(&id) {
                return Err(MirrorError::Duplicate(id));
            }
            self.sessions.insert(id, MirrorSession::new(*new, now));
            return Ok(());
        }
        let s = self.sessions.get_mut(&id).ok_or(MirrorError::Unknown(id))?;
        match r {
            Record::Read { offset, data, .. } => {
                contiguous(id, "client bytes read", offset, s.read)?;
                s.read += data.len() as u64;
                s.up.push_back(data);
            }
            Record::Written { offset, data, .. } => {
                // Staged until the next `Synced`.
                contiguous(id, "bytes written to the client", offset, s.staged_written)?;
                s.staged_written += data.len() as u64;
                s.staged_down.push_back(data);
            }
            Record::Synced { offset, .. } => {
                let end = s.staged_written;
                contiguous(id, "end of the written bytes at a sync", offset, end)?;
                s.down.extend(s.staged_down.drain(..));
                s.written = s.staged_written;
                if let Some(acked) = s.staged_acked.take() {
                    trim(&mut s.up, acked - s.server_acked);
                    s.server_acked = acked;
                }
            }
            Record::ClientAcked {
                offset,
                snd_wnd,
                rcv_wnd,
                timestamp,
                ..
            } => {
                if offset < s.client_acked || offset > s.written {
                    return Err(MirrorError::OutOfRange {
                        id,
                        what: "client-acknowledged offset",
                        got: offset,
                        low: s.client_acked,
                        high: s.written,
                    });
                }
                trim(&mut s.down, offset - s.client_acked);
                s.client_acked = offset;
                s.snd_wnd = snd_wnd;
                s.rcv_wnd = rcv_wnd;
                s.timestamp = (timestamp, now);
            }
            Record::ServerAcked { offset, .. } => {
                // Staged until the next `Synced`.
                let low = s.staged_acked.unwrap_or(s.server_acked);
                if offset < low || offset > s.read {
                    return Err(MirrorError::OutOfRange {
                        id,
                        what: "server-acknowledged offset",
                        got: offset,
                        low,
                        high: s.read,
                    });
                }
                s.staged_acked = Some(offset);
            }
            Record::Closed { .. } => {
                self.sessions.remove(&id);
                return Ok(());
            }
            Record::Session(_) | Record::Heartbeat { .. } => unreachable!("handled above"),
        }
        #[cfg(debug_assertions)]
        s.check_invariants();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::failover::repair::{KernelState, TcpOptions};
    use crate::failover::RepairWindow;

    fn new_session(id: u128, read_from: u64, written_from: u64) -> Record {
        Record::Session(Box::new(NewSession {
            id: SessionId(id),
            listener: "l".into(),
            backend: "b".into(),
            client: "10.0.0.10:40000".parse().unwrap(),
            local: "10.0.0.100:7000".parse().unwrap(),
            state: KernelState {
                send_seq: 1000,
                recv_seq: 2000,
                mss_clamp: 1460,
                options: TcpOptions::default(),
                window: RepairWindow {
                    snd_wnd: 100,
                    rcv_wnd: 200,
                    ..RepairWindow::default()
                },
                timestamp: 5000,
            },
            read_from,
            written_from,
        }))
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    /// Client bytes read, from `offset`.
    fn read(id: SessionId, offset: u64, s: &'static str) -> Record {
        Record::Read {
            id,
            offset,
            data: b(s),
        }
    }

    /// Bytes written to the client, from `offset`.
    fn written(id: SessionId, offset: u64, s: &'static str) -> Record {
        Record::Written {
            id,
            offset,
            data: b(s),
        }
    }

    fn concat(v: Vec<Bytes>) -> Vec<u8> {
        v.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn tracks_both_directions_and_trims_on_acks() {
        let t0 = Instant::now();
        let id = SessionId(1);
        let mut m = Mirror::new();
        m.apply(new_session(1, 0, 0), t0).unwrap();
        for (off, d) in [(0, "GET a\n"), (6, "GET b\n")] {
            m.apply(
                Record::Read {
                    id,
                    offset: off,
                    data: b(d),
                },
                t0,
            )
            .unwrap();
        }
        m.apply(written(id, 0, "A\n"), t0).unwrap();
        m.apply(Record::ServerAcked { id, offset: 8 }, t0).unwrap(); // mid-chunk
                                                                     // Staged: nothing moves before the `Synced`.
        let s = m.get(id).unwrap();
        assert_eq!((s.server_acked, s.written), (0, 0));
        m.apply(Record::Synced { id, offset: 2 }, t0).unwrap();
        let s = m.get(id).unwrap();
        assert_eq!((s.read, s.server_acked), (12, 8));
        assert_eq!(concat(s.unacked_up()), b"T b\n");
        assert_eq!(concat(s.unacked_down()), b"A\n");
        let o = s.offsets(t0 + Duration::from_millis(10));
        assert_eq!((o.read, o.acked, o.snd_wnd, o.rcv_wnd), (12, 0, 100, 200));
        assert_eq!(o.timestamp, 5012, "captured clock + 10 ms + 2 ms margin");

        let t1 = t0 + Duration::from_millis(50);
        m.apply(
            Record::ClientAcked {
                id,
                offset: 1,
                snd_wnd: 7,
                rcv_wnd: 8,
                timestamp: 9000,
            },
            t1,
        )
        .unwrap();
        let s = m.get(id).unwrap();
        assert_eq!(concat(s.unacked_down()), b"\n");
        let o = s.offsets(t1);
        assert_eq!(
            (o.acked, o.snd_wnd, o.rcv_wnd, o.timestamp),
            (1, 7, 8, 9002)
        );

        m.apply(Record::Heartbeat { seq: 3 }, t1).unwrap();
        assert_eq!(m.heartbeat, 3);
        m.apply(Record::Closed { id }, t1).unwrap();
        assert!(m.is_empty());
    }

    /// A link cut between a response (`Written`) and the acknowledgement of
    /// the request it answers (`ServerAcked`), or before their `Synced`,
    /// leaves the mirror where it was: the standby then replays the request
    /// and the client gets its answer once, from the new leg.
    #[test]
    fn a_response_and_its_acknowledgement_take_effect_together() {
        let t0 = Instant::now();
        let id = SessionId(4);
        let mut m = Mirror::new();
        m.apply(new_session(4, 0, 0), t0).unwrap();
        let read = read(id, 0, "GET a\n");
        m.apply(read, t0).unwrap();
        let answer = written(id, 0, "A\n");
        // Cut after the response alone, and after the response and the ack.
        for cut in [1, 2] {
            let mut cut_mirror = m.clone();
            cut_mirror.apply(answer.clone(), t0).unwrap();
            if cut == 2 {
                cut_mirror
                    .apply(Record::ServerAcked { id, offset: 6 }, t0)
                    .unwrap();
            }
            let s = cut_mirror.get(id).unwrap();
            assert_eq!((s.server_acked, s.written), (0, 0), "cut {cut}");
            assert_eq!(concat(s.unacked_up()), b"GET a\n", "replayed");
            assert!(s.unacked_down().is_empty(), "nothing re-sent");
        }
        m.apply(answer, t0).unwrap();
        m.apply(Record::ServerAcked { id, offset: 6 }, t0).unwrap();
        m.apply(Record::Synced { id, offset: 2 }, t0).unwrap();
        let s = m.get(id).unwrap();
        assert_eq!((s.server_acked, s.written), (6, 2));
        assert!(s.unacked_up().is_empty(), "nothing replayed");
        assert_eq!(concat(s.unacked_down()), b"A\n", "re-sent if unacked");
        // A sync that does not end where the written bytes end is refused.
        assert!(m.apply(Record::Synced { id, offset: 3 }, t0).is_err());
    }

    #[test]
    fn a_resent_session_starts_at_its_offsets() {
        let t0 = Instant::now();
        let id = SessionId(2);
        let mut m = Mirror::new();
        m.apply(new_session(2, 1 << 33, 77), t0).unwrap();
        m.apply(read(id, 1 << 33, "x"), t0).unwrap();
        m.apply(written(id, 77, "y"), t0).unwrap();
        m.apply(Record::Synced { id, offset: 78 }, t0).unwrap();
        let s = m.get(id).unwrap();
        assert_eq!((s.read, s.written, s.client_acked), ((1 << 33) + 1, 78, 77));
    }

    #[test]
    fn a_resent_session_rebuilds_an_equal_mirror() {
        let t0 = Instant::now();
        let id = SessionId(3);
        let mut m = Mirror::new();
        m.apply(new_session(3, 0, 0), t0).unwrap();
        m.apply(read(id, 0, "GET a\nGET b\n"), t0).unwrap();
        m.apply(Record::ServerAcked { id, offset: 6 }, t0).unwrap();
        m.apply(written(id, 0, "A\n"), t0).unwrap();
        m.apply(written(id, 2, "B\n"), t0).unwrap();
        m.apply(Record::Synced { id, offset: 4 }, t0).unwrap();
        m.apply(
            Record::ClientAcked {
                id,
                offset: 2,
                snd_wnd: 7,
                rcv_wnd: 8,
                timestamp: 9000,
            },
            t0,
        )
        .unwrap();
        let later = t0 + Duration::from_millis(100);
        let mut again = Mirror::new();
        for r in m.get(id).unwrap().resend(later) {
            again.apply(r, later).unwrap();
        }
        let (a, b2) = (m.get(id).unwrap(), again.get(id).unwrap());
        assert_eq!(
            (b2.read, b2.server_acked, b2.written, b2.client_acked),
            (12, 6, 4, 2)
        );
        assert_eq!(concat(b2.unacked_up()), b"GET b\n");
        assert_eq!(concat(b2.unacked_down()), b"B\n");
        let (oa, ob) = (a.offsets(later), b2.offsets(later));
        assert_eq!(
            (oa.read, oa.acked, oa.snd_wnd, oa.rcv_wnd),
            (ob.read, ob.acked, ob.snd_wnd, ob.rcv_wnd)
        );
        // The clock never goes back; the margin is added once more.
        assert_eq!(ob.timestamp, oa.timestamp + 2);
    }

    /// A link that comes up (or a live upgrade that snapshots the session)
    /// between a session's `Written`/`ServerAcked` records and the `Synced`
    /// that applies them: the resent session has them staged, so the
    /// `Synced` still to come fits.
    #[test]
    fn a_resent_session_keeps_what_is_staged() {
        let t0 = Instant::now();
        let id = SessionId(5);
        let mut m = Mirror::new();
        m.apply(new_session(5, 0, 0), t0).unwrap();
        m.apply(read(id, 0, "GET a\nGET b\n"), t0).unwrap();
        m.apply(written(id, 0, "A\n"), t0).unwrap();
        m.apply(Record::Synced { id, offset: 2 }, t0).unwrap();
        // Staged: the answer to the second request and the ack of the first.
        m.apply(written(id, 2, "B"), t0).unwrap();
        m.apply(written(id, 3, "\n"), t0).unwrap();
        m.apply(Record::ServerAcked { id, offset: 6 }, t0).unwrap();
        let mut again = Mirror::new();
        for r in m.get(id).unwrap().resend(t0) {
            again.apply(r, t0).unwrap();
        }
        let s = again.get(id).unwrap();
        assert_eq!((s.server_acked, s.written), (0, 2), "staged, not applied");
        assert_eq!(concat(s.unacked_down()), b"A\n");
        let sync = Record::Synced { id, offset: 4 };
        m.apply(sync.clone(), t0).unwrap();
        again.apply(sync, t0).expect("the sync still to come fits");
        let (a, b2) = (m.get(id).unwrap(), again.get(id).unwrap());
        assert_eq!(
            (b2.read, b2.server_acked, b2.written),
            (a.read, a.server_acked, a.written)
        );
        assert_eq!((b2.server_acked, b2.written), (6, 4));
        assert_eq!(concat(b2.unacked_up()), b"GET b\n");
        assert_eq!(concat(b2.unacked_down()), b"A\nB\n");
    }

    #[test]
    fn refuses_records_that_break_the_stream() {
        let t0 = Instant::now();
        let id = SessionId(1);
        let mut m = Mirror::new();
        m.apply(new_session(1, 0, 0), t0).unwrap();
        m.apply(read(id, 0, "abc"), t0).unwrap();
        let cases = [
            (new_session(1, 0, 0), MirrorError::Duplicate(id)),
            (
                Record::Closed { id: SessionId(9) },
                MirrorError::Unknown(SessionId(9)),
            ),
            (
                read(id, 4, "d"),
                MirrorError::NotContiguous {
                    id,
                    what: "client bytes read",
                    got: 4,
                    want: 3,
                },
            ),
            (
                written(id, 1, "d"),
                MirrorError::NotContiguous {
                    id,
                    what: "bytes written to the client",
                    got: 1,
                    want: 0,
                },
            ),
            (
                Record::ServerAcked { id, offset: 4 },
                MirrorError::OutOfRange {
                    id,
                    what: "server-acknowledged offset",
                    got: 4,
                    low: 0,
                    high: 3,
                },
            ),
            (
                Record::ClientAcked {
                    id,
                    offset: 1,
                    snd_wnd: 0,
                    rcv_wnd: 0,
                    timestamp: 0,
                },
                MirrorError::OutOfRange {
                    id,
                    what: "client-acknowledged offset",
                    got: 1,
                    low: 0,
                    high: 0,
                },
            ),
        ];
        for (r, want) in cases {
            assert_eq!(m.apply(r, t0), Err(want));
        }
    }
}
