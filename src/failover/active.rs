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
//! Owns the link's lifecycle; what to replicate and when is the session's.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::mpsc;
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

/// Hands records to the replication task.
#[derive(Debug, Clone)]
pub struct Replicator {
    tx: mpsc::UnboundedSender<Record>,
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
        let task = tokio::spawn(run(peer, key, heartbeat, rx, shutdown));
        (Replicator { tx }, task)
    }

    /// Queues one record. Never blocks; a record sent after the task ended
    /// is dropped.
    pub fn send(&self, r: Record) {
        let _ = self.tx.send(r);
    }
}

async fn run(
    peer: String,
    key: Secret,
    heartbeat: Duration,
    mut rx: mpsc::UnboundedReceiver<Record>,
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
        let attempt = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => r,
            _ = shutdown.cancelled() => return,
        };
        let stream = match attempt {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(peer = %peer, error = %e, "replication link: cannot connect");
                if !wait_and_absorb(&mut rx, &mut shadow, retry, &shutdown).await {
                    return;
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
            Err(_) => {
                tracing::warn!(peer = %peer, "replication link: connect timed out");
                if !wait_and_absorb(&mut rx, &mut shadow, retry, &shutdown).await {
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
        match serve(&mut w, &mut rx, &mut shadow, heartbeat, &shutdown).await {
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

/// Waits `delay` while keeping the shadow current. `false` when the task
/// should end.
async fn wait_and_absorb(
    rx: &mut mpsc::UnboundedReceiver<Record>,
    shadow: &mut Mirror,
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
                Some(r) => absorb(shadow, &r),
                None => return false,
            },
        }
    }
}

/// Carries records and heartbeats until the link breaks (`Err`) or the task
/// should end (`Ok`).
async fn serve(
    w: &mut RecordWriter<TcpStream>,
    rx: &mut mpsc::UnboundedReceiver<Record>,
    shadow: &mut Mirror,
    heartbeat: Duration,
    shutdown: &CancellationToken,
) -> Result<(), LinkError> {
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    w.flush().await?;
    loop {
        tokio::select! {
            r = rx.recv() => {
                let Some(r) = r else { return Ok(()) };
                absorb(shadow, &r);
                w.push(&r);
                // Whatever else is queued goes in the same write.
                while let Ok(r) = rx.try_recv() {
                    absorb(shadow, &r);
                    w.push(&r);
                }
                w.flush().await?;
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

    #[tokio::test]
    async fn replicates_heartbeats_and_rebuilds_sessions_after_a_reconnect() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = l.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let (rep, task) = Replicator::spawn(
            peer,
            Secret(KEY.into()),
            Duration::from_millis(5),
            shutdown.clone(),
        );
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
}
