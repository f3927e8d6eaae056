//! The active's end of the replication link: one task that connects to the
//! standby, authenticates, writes every record sessions hand it, sends
//! heartbeats, and reconnects when the link breaks.
//!
//! Sessions call [`Replicator::send`], which never blocks: records queue in
//! order on a channel. The task keeps a shadow [`Mirror`] of what it sent
//! (the same chunks, shared, not copied), so that after a reconnect it can
//! rebuild every live session on the standby ([`MirrorSession::resend`])
//! before it carries on. While the link is down, records only update the
//! shadow.
//!
//! Ordering, not delivery: a record handed over before a write to the
//! client is queued first, but nothing waits for the standby to have it.
//! The delay between the two is part of the residual gap (docs/failover.md).
//!
//! Bounded: the records queued and not yet written to the link count
//! against [`BACKLOG_LIMIT`]; over it, sessions stop reading (their client
//! and their server) until the link catches up ([`Replicator::poll_room`]),
//! so a session never runs further ahead of its standby than that, and
//! memory stays bounded when the link is slower than the proxy. Each write
//! to the link carries at most [`WRITE_BATCH`] bytes, so heartbeats are
//! never queued behind an unbounded batch. While the link is down records
//! only update the shadow and nothing waits.
//!
//! Owns the link's lifecycle; what to replicate and when is the session's.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::codec::Record;
use super::link::{self, LinkError, RecordWriter};
use super::mirror::{Mirror, MirrorSession};
use crate::config::Secret;

/// First and longest wait between two connection attempts.
const RETRY_INITIAL: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Longest a connect plus handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Most bytes of records queued for the link and not yet written; over
/// it, sessions wait before reading more.
pub const BACKLOG_LIMIT: u64 = 4 << 20;
/// Most bytes one write to the link carries.
pub const WRITE_BATCH: usize = 256 << 10;

/// Hands records to the replication task.
#[derive(Debug, Clone)]
pub struct Replicator {
    tx: mpsc::UnboundedSender<Msg>,
    backlog: Arc<Backlog>,
}

/// What reaches the replication task.
#[derive(Debug)]
enum Msg {
    Record(Record),
    /// The records that rebuild one session on a standby
    /// ([`MirrorSession::resend`]), taken once every record queued before
    /// this message is in the shadow; `None` for a session it does not
    /// have.
    Snapshot(
        crate::session::SessionId,
        tokio::sync::oneshot::Sender<Option<Vec<Record>>>,
    ),
}

/// Bytes queued for the link, and the sessions waiting for room.
#[derive(Debug, Default)]
struct Backlog {
    bytes: AtomicU64,
    room: Arc<Notify>,
    /// The task ended: nothing is written any more, and nobody waits.
    closed: std::sync::atomic::AtomicBool,
}

impl Backlog {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.room.notify_waiters();
    }

    fn has_room(&self) -> bool {
        self.bytes.load(Ordering::Acquire) < BACKLOG_LIMIT || self.closed.load(Ordering::Acquire)
    }

    /// The task took `n` bytes of records off the queue (written, or only
    /// absorbed while the link is down): wakes the sessions waiting once
    /// the backlog is under the limit again.
    fn taken(&self, n: u64) {
        let before = self.bytes.fetch_sub(n, Ordering::AcqRel);
        if before >= BACKLOG_LIMIT && before - n < BACKLOG_LIMIT {
            self.room.notify_waiters();
        }
    }
}

/// What a record costs against the backlog: its data, plus a little for
/// the record itself (so that many small ones count too).
fn cost(r: &Record) -> u64 {
    let data = match r {
        Record::Read { data, .. } | Record::Written { data, .. } => data.len() as u64,
        _ => 0,
    };
    data + 32
}

/// A session's wait for room in the backlog ([`Replicator::poll_room`]).
#[derive(Default)]
pub struct RoomWait(Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>);

impl std::fmt::Debug for RoomWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "RoomWait(waiting)"
        } else {
            "RoomWait"
        })
    }
}

impl Replicator {
    /// Starts the task: it connects to `peer` (the standby's `listen`),
    /// proves `key`, and sends a heartbeat every `heartbeat`; it ends when
    /// `shutdown` is cancelled or every [`Replicator`] is dropped.
    pub fn spawn(
        peer: String,
        key: Secret,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) -> (Replicator, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        let task = {
            let backlog = backlog.clone();
            tokio::spawn(async move {
                run(peer, key, heartbeat, rx, backlog.clone(), shutdown).await;
                backlog.close();
            })
        };
        (Replicator { tx, backlog }, task)
    }

    /// Queues one record. Never blocks; a record sent after the task ended
    /// is dropped.
    pub fn send(&self, r: Record) {
        let n = cost(&r);
        self.backlog.bytes.fetch_add(n, Ordering::AcqRel);
        if self.tx.send(Msg::Record(r)).is_err() {
            self.backlog.taken(n);
        }
    }

    /// The records that rebuild session `id` on a standby, as its shadow
    /// holds it once every record sent before this call is in (a live
    /// upgrade carries them to the new process, whose replication task
    /// sends them on). `None` when the task has ended or does not know
    /// the session.
    pub async fn snapshot(&self, id: crate::session::SessionId) -> Option<Vec<Record>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Msg::Snapshot(id, tx)).ok()?;
        rx.await.ok().flatten()
    }

    /// Bytes of records queued and not yet written to the link.
    pub fn backlog(&self) -> u64 {
        self.backlog.bytes.load(Ordering::Acquire)
    }

    /// Ready when the backlog is under [`BACKLOG_LIMIT`]; otherwise `cx` is
    /// woken once the link has caught up. `wait` is the caller's own.
    pub fn poll_room(&self, wait: &mut RoomWait, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.backlog.has_room() {
                wait.0 = None;
                return Poll::Ready(());
            }
            let fut = wait
                .0
                .get_or_insert_with(|| Box::pin(self.backlog.room.clone().notified_owned()));
            // Registered before the second look: a wake-up in between is
            // not lost.
            fut.as_mut().enable();
            if self.backlog.has_room() {
                wait.0 = None;
                return Poll::Ready(());
            }
            match fut.as_mut().poll(cx) {
                Poll::Ready(()) => wait.0 = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

async fn run(
    peer: String,
    key: Secret,
    heartbeat: Duration,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    backlog: Arc<Backlog>,
    shutdown: CancellationToken,
) {
    let mut shadow = Mirror::new();
    let mut retry = RETRY_INITIAL;
    loop {
        let connect = async {
            let mut s = TcpStream::connect(&peer).await?;
            s.set_nodelay(true)?;
            link::handshake_active(&mut s, &key.0).await?;
            Ok::<_, LinkError>(s)
        };
        // Records (and snapshot requests) keep being taken while it
        // connects: a standby that does not answer holds nobody up.
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, connect);
        tokio::pin!(connect);
        let attempt = loop {
            tokio::select! {
                r = &mut connect => break r,
                _ = shutdown.cancelled() => return,
                m = rx.recv() => match m {
                    Some(Msg::Record(r)) => {
                        absorb(&mut shadow, &r);
                        backlog.taken(cost(&r));
                    }
                    Some(Msg::Snapshot(id, reply)) => snapshot(&shadow, id, reply),
                    None => return,
                },
            }
        };
        let stream = match attempt {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(peer = %peer, error = %e, "replication link: cannot connect");
                if !wait_and_absorb(&mut rx, &mut shadow, &backlog, retry, &shutdown).await {
                    return;
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
            Err(_) => {
                tracing::warn!(peer = %peer, "replication link: connect timed out");
                if !wait_and_absorb(&mut rx, &mut shadow, &backlog, retry, &shutdown).await {
                    return;
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        retry = RETRY_INITIAL;
        tracing::info!(peer = %peer, sessions = shadow.len(), "replication link up");
        let mut w = RecordWriter::new(stream);
        let now = Instant::now();
        let sessions: Vec<&MirrorSession> = shadow.sessions().collect();
        for s in sessions {
            for r in s.resend(now) {
                w.push(&r);
            }
        }
        match serve(&mut w, &mut rx, &mut shadow, &backlog, heartbeat, &shutdown).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(peer = %peer, error = %e, "replication link down"),
        }
    }
}

/// Applies a record to the shadow; a record that does not fit is a bug in
/// the session that sent it: logged, and left out of the shadow.
fn absorb(shadow: &mut Mirror, r: &Record) {
    if let Err(e) = shadow.apply(r.clone(), Instant::now()) {
        tracing::error!(error = %e, "replication record out of order; not replicated");
    }
}

/// Answers a snapshot request from the shadow.
fn snapshot(
    shadow: &Mirror,
    id: crate::session::SessionId,
    reply: tokio::sync::oneshot::Sender<Option<Vec<Record>>>,
) {
    let _ = reply.send(shadow.get(id).map(|s| s.resend(Instant::now())));
}

/// Waits `delay` while keeping the shadow current. `false` when the task
/// should end.
async fn wait_and_absorb(
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    shadow: &mut Mirror,
    backlog: &Backlog,
    delay: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            _ = shutdown.cancelled() => return false,
            r = rx.recv() => match r {
                Some(Msg::Record(r)) => {
                    absorb(shadow, &r);
                    backlog.taken(cost(&r));
                }
                Some(Msg::Snapshot(id, reply)) => snapshot(shadow, id, reply),
                None => return false,
            },
        }
    }
}

/// Carries records and heartbeats until the link breaks (`Err`) or the task
/// should end (`Ok`).
async fn serve(
    w: &mut RecordWriter<TcpStream>,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    shadow: &mut Mirror,
    backlog: &Backlog,
    heartbeat: Duration,
    shutdown: &CancellationToken,
) -> Result<(), LinkError> {
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    w.flush().await?;
    loop {
        tokio::select! {
            m = rx.recv() => {
                let r = match m {
                    None => return Ok(()),
                    Some(Msg::Snapshot(id, reply)) => {
                        snapshot(shadow, id, reply);
                        continue;
                    }
                    Some(Msg::Record(r)) => r,
                };
                let mut taken = cost(&r);
                absorb(shadow, &r);
                w.push(&r);
                // Whatever else is queued goes in the same write, up to
                // WRITE_BATCH: a heartbeat never waits behind more.
                while w.buffered() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(Msg::Record(r)) => {
                            taken += cost(&r);
                            absorb(shadow, &r);
                            w.push(&r);
                        }
                        Ok(Msg::Snapshot(id, reply)) => snapshot(shadow, id, reply),
                        Err(_) => break,
                    }
                }
                let flushed = w.flush().await;
                // Written, or (link broken) in the shadow, which a
                // reconnect sends again: off the backlog either way.
                backlog.taken(taken);
                flushed?;
            }
            _ = tick.tick() => {
                seq += 1;
                w.push(&Record::Heartbeat { seq });
                w.flush().await?;
            }
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::failover::codec::NewSession;
    use crate::failover::link::RecordReader;
    use crate::failover::repair::{KernelState, TcpOptions};
    use crate::failover::RepairWindow;
    use crate::session::SessionId;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn session(id: SessionId) -> Record {
        Record::Session(Box::new(NewSession {
            id,
            listener: "l".into(),
            backend: "b".into(),
            client: "127.0.0.1:40000".parse().unwrap(),
            local: "127.0.0.1:7000".parse().unwrap(),
            state: KernelState {
                send_seq: 1,
                recv_seq: 2,
                mss_clamp: 1460,
                options: TcpOptions::default(),
                window: RepairWindow::default(),
                timestamp: 10,
            },
            read_from: 0,
            written_from: 0,
        }))
    }

    /// Accepts one link and mirrors it until `until` holds; returns the
    /// mirror and the reader (still open).
    async fn follow(
        l: &tokio::net::TcpListener,
        until: impl Fn(&Mirror) -> bool,
    ) -> (Mirror, RecordReader<TcpStream>) {
        let (mut s, _) = l.accept().await.unwrap();
        link::handshake_standby(&mut s, KEY).await.unwrap();
        let mut r = RecordReader::new(s);
        let mut m = Mirror::new();
        let mut heartbeats = 0;
        while !(until(&m) && heartbeats > 0) {
            let rec = r.next().await.unwrap().expect("record");
            if matches!(rec, Record::Heartbeat { .. }) {
                heartbeats += 1;
            }
            m.apply(rec, Instant::now()).unwrap();
        }
        (m, r)
    }

    fn up(m: &Mirror, id: SessionId) -> Vec<u8> {
        m.get(id)
            .map(|s| s.unacked_up().iter().flat_map(|b| b.to_vec()).collect())
            .unwrap_or_default()
    }

    /// A standby's listener and a replicator connecting to it.
    async fn replicator(
        heartbeat: Duration,
    ) -> (
        tokio::net::TcpListener,
        Replicator,
        tokio::task::JoinHandle<()>,
        CancellationToken,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = l.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let (rep, task) = Replicator::spawn(peer, Secret(KEY.into()), heartbeat, shutdown.clone());
        (l, rep, task, shutdown)
    }

    #[tokio::test]
    async fn replicates_heartbeats_and_rebuilds_sessions_after_a_reconnect() {
        let (l, rep, task, shutdown) = replicator(Duration::from_millis(5)).await;
        let (a, b) = (SessionId(1), SessionId(2));
        rep.send(session(a));
        rep.send(Record::Read {
            id: a,
            offset: 0,
            data: Bytes::from_static(b"GET 1\n"),
        });
        rep.send(session(b));
        rep.send(Record::Closed { id: b });
        let (m, reader) = follow(&l, |m| up(m, a) == b"GET 1\n").await;
        assert_eq!(m.len(), 1, "b was closed");

        // The standby goes away and comes back: the active rebuilds `a`,
        // then carries on where it was.
        drop(reader);
        rep.send(Record::Read {
            id: a,
            offset: 6,
            data: Bytes::from_static(b"GET 2\n"),
        });
        let (m, _reader) = follow(&l, |m| up(m, a) == b"GET 1\nGET 2\n").await;
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(a).unwrap().read, 12);

        shutdown.cancel();
        task.await.unwrap();
    }

    /// A snapshot holds every record sent before it, whether the link is
    /// up or the standby does not answer at all (the task is still
    /// connecting): it never waits for the standby.
    #[tokio::test]
    async fn a_snapshot_has_every_record_sent_before_it_link_or_not() {
        // Nobody accepts on this listener: the handshake never completes.
        let (_l, rep, task, shutdown) = replicator(Duration::from_millis(5)).await;
        let (a, b) = (SessionId(1), SessionId(2));
        rep.send(session(a));
        rep.send(Record::Read {
            id: a,
            offset: 0,
            data: Bytes::from_static(b"GET 1\n"),
        });
        let got = tokio::time::timeout(Duration::from_millis(500), rep.snapshot(a))
            .await
            .expect("answered while the link is still connecting")
            .expect("a known session");
        assert!(matches!(&got[0], Record::Session(n) if n.id == a && n.read_from == 0));
        assert!(got.iter().any(
            |r| matches!(r, Record::Read { id, offset: 0, data } if *id == a && &data[..] == b"GET 1\n")
        ));
        assert_eq!(rep.snapshot(b).await, None, "an unknown session");
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(rep.snapshot(a).await, None, "the task has ended");
    }

    /// Polls `rep.poll_room` once.
    async fn has_room(rep: &Replicator, wait: &mut RoomWait) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(rep.poll_room(wait, cx).is_ready())).await
    }

    #[tokio::test]
    async fn a_stalled_link_holds_sessions_back_until_it_catches_up() {
        let (l, rep, task, shutdown) = replicator(Duration::from_millis(20)).await;
        let (mut s, _) = l.accept().await.unwrap();
        link::handshake_standby(&mut s, KEY).await.unwrap();
        // The standby reads nothing: the link's socket buffers fill, then
        // the backlog.
        let a = SessionId(1);
        rep.send(session(a));
        let chunk = Bytes::from(vec![7u8; 64 << 10]);
        let mut offset = 0u64;
        let mut wait = RoomWait::default();
        while has_room(&rep, &mut wait).await {
            assert!(offset < 1 << 30, "the backlog never filled");
            rep.send(Record::Read {
                id: a,
                offset,
                data: chunk.clone(),
            });
            offset += chunk.len() as u64;
            tokio::task::yield_now().await;
        }
        assert!(rep.backlog() >= BACKLOG_LIMIT);
        // The standby reads again: the waiting session is woken.
        let reader = tokio::spawn(async move {
            let mut r = RecordReader::new(s);
            while let Ok(Some(_)) = r.next().await {}
        });
        tokio::time::timeout(
            Duration::from_secs(30),
            std::future::poll_fn(|cx| rep.poll_room(&mut wait, cx)),
        )
        .await
        .expect("woken once the link caught up");
        assert!(rep.backlog() < BACKLOG_LIMIT);
        shutdown.cancel();
        task.await.unwrap();
        // The link closed with the task.
        reader.await.unwrap();
        // After the task ended nobody waits.
        rep.send(Record::Read {
            id: a,
            offset,
            data: chunk.clone(),
        });
        assert!(has_room(&rep, &mut wait).await);
    }
}
