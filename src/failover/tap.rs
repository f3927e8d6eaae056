//! The active's per-session replication hook: what a session driver calls
//! so that the standby's mirror follows the session.
//!
//! A session on a listener named in `[failover] listeners` gets one
//! [`Tap`] (boxed: a session without failover pays one empty pointer). The
//! driver calls it at four points:
//!
//! - [`Tap::read`]: client bytes, before the core (and so the server) sees
//!   them;
//! - [`Tap::sync`]: before every client write: the down bytes the core
//!   added since the last call (`Written`, before they are written), the
//!   server-acked up offset when it moved (`ServerAcked`), then `Synced`,
//!   at which the standby applies both together: a response and the
//!   acknowledgement of the request it answers are one step, so a standby
//!   neither skips a request whose answer it lacks nor replays one whose
//!   answer it re-sends;
//! - [`Tap::client_written`]: after client writes: the client-acked offset
//!   (`written − SIOCOUTQ`), with the windows and the timestamp clock, when
//!   it moved;
//! - [`Tap::closed`]: the session ended (or was handed over).
//!
//! Every record goes to the [`Replicator`], which never blocks; the
//! driver reads nothing more while its backlog is full ([`Tap::poll_room`]).

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use bytes::Bytes;

use super::active::Replicator;
use super::codec::{NewSession, Record};
use super::repair::{self, KernelState};
use crate::session::core::SessionCore;
use crate::session::SessionId;
use crate::stream::Dir;

/// A tap's offsets, carried by a live upgrade ([`Tap::export`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TapCounters {
    pub written: u64,
    pub server_acked: u64,
    pub synced: u64,
    pub client_acked: u64,
}

/// One session's replication state on the active.
#[derive(Debug)]
pub struct Tap {
    replicator: Replicator,
    id: SessionId,
    /// Down bytes replicated (`Written` up to here).
    written: u64,
    /// Up offset last replicated as `ServerAcked`.
    server_acked: u64,
    /// Down offset last replicated as `Synced`.
    synced: u64,
    /// Down offset last replicated as `ClientAcked`.
    client_acked: u64,
    /// Waiting for room in the replication backlog.
    room: super::active::RoomWait,
}

impl Tap {
    /// Announces a new session (captured at accept: `state`) to the standby.
    pub fn new(
        replicator: Replicator,
        id: SessionId,
        listener: &str,
        backend: &str,
        client: SocketAddr,
        local: SocketAddr,
        state: KernelState,
    ) -> Box<Tap> {
        replicator.send(Record::Session(Box::new(NewSession {
            id,
            listener: listener.to_string(),
            backend: backend.to_string(),
            client,
            local,
            state,
            read_from: 0,
            written_from: 0,
        })));
        Box::new(Tap {
            replicator,
            id,
            written: 0,
            server_acked: 0,
            synced: 0,
            client_acked: 0,
            room: Default::default(),
        })
    }

    /// What a live upgrade carries to the new process so that it replicates
    /// the session on from here ([`Tap::adopted`]): the records that rebuild
    /// it on a standby, and this tap's counters. `None` when the
    /// replication task does not have the session (the session then moves
    /// unreplicated).
    pub async fn export(&self) -> Option<(Vec<Record>, TapCounters)> {
        let records = self.replicator.snapshot(self.id).await?;
        Some((
            records,
            TapCounters {
                written: self.written,
                server_acked: self.server_acked,
                synced: self.synced,
                client_acked: self.client_acked,
            },
        ))
    }

    /// The tap of a session taken over in a live upgrade: `records` (what
    /// [`Tap::export`] gave the old process) go to this process's
    /// replication task first, which sends them to the standby on its link
    /// (and again after any reconnect), then the session replicates on from
    /// `counters`.
    pub fn adopted(
        replicator: Replicator,
        id: SessionId,
        records: Vec<Record>,
        counters: TapCounters,
    ) -> Box<Tap> {
        for r in records {
            replicator.send(r);
        }
        Box::new(Tap {
            replicator,
            id,
            written: counters.written,
            server_acked: counters.server_acked,
            synced: counters.synced,
            client_acked: counters.client_acked,
            room: Default::default(),
        })
    }

    /// Ready when the replication link has room for more
    /// ([`Replicator::poll_room`]): the driver reads neither its client nor
    /// its server until then, so the session stays within
    /// [`BACKLOG_LIMIT`](super::active::BACKLOG_LIMIT) of its standby.
    pub fn poll_room(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.replicator.poll_room(&mut self.room, cx)
    }

    /// Client bytes read, from up offset `offset`.
    pub fn read(&self, offset: u64, data: &Bytes) {
        self.replicator.send(Record::Read {
            id: self.id,
            offset,
            data: data.clone(),
        });
    }

    /// Before a client write: the new down bytes, then the server's ack.
    pub fn sync(&mut self, core: &SessionCore) {
        let down = core.stream(Dir::Down);
        if down.read() > self.written {
            for data in down.buffer().chunks_after(self.written) {
                let n = data.len() as u64;
                self.replicator.send(Record::Written {
                    id: self.id,
                    offset: self.written,
                    data,
                });
                self.written += n;
            }
        }
        let acked = core.stream(Dir::Up).acked();
        let moved = acked > self.server_acked;
        if moved {
            self.server_acked = acked;
            self.replicator.send(Record::ServerAcked {
                id: self.id,
                offset: acked,
            });
        }
        if moved || self.written > self.synced {
            // The standby applies the bytes and the ack above together.
            self.synced = self.written;
            self.replicator.send(Record::Synced {
                id: self.id,
                offset: self.written,
            });
        }
    }

    /// After client writes: `sent` bytes written in all; samples how many
    /// the client's TCP acknowledged (no pause).
    pub fn client_written(&mut self, fd: BorrowedFd<'_>, sent: u64) {
        let Ok(acked) = repair::acked(fd, sent) else {
            return;
        };
        if acked <= self.client_acked {
            return;
        }
        let (Ok((snd_wnd, rcv_wnd)), Ok(timestamp)) =
            (repair::windows(fd), repair::timestamp_now(fd))
        else {
            return;
        };
        self.client_acked = acked;
        self.replicator.send(Record::ClientAcked {
            id: self.id,
            offset: acked,
            snd_wnd,
            rcv_wnd,
            timestamp,
        });
    }

    /// The session ended here: the standby forgets it.
    pub fn closed(&self) {
        self.replicator.send(Record::Closed { id: self.id });
    }
}
