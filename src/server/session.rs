//! One session of the server library: the state shared between the
//! application's [`ResumableSession`](super::ResumableSession) handle and
//! the session task, and the task itself, which owns the current transport
//! and its [`Link`], installs a newer leg when a resume is routed here,
//! waits up to `resume_timeout` when the transport fails, and ends the
//! session on completion, ABORT or timeout.
//!
//! Offsets: the down [`Stream`]'s `sent` is the highest offset ever handed
//! to a leg (it is rewound only when a new leg is installed), so a resume's
//! `recv_offset` is checked against `[acked, sent]`. Up bytes are pushed to
//! the application's queue once; bytes replayed below `up_have` (possible
//! with `AckPolicy::Manual`, where the WELCOME states the application's
//! ack) are skipped.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Notify;

use super::handshake::Known;
use super::{hex, AckPolicy, Ctx, ServerConfig, ServerError, SessionId};
use crate::proto::{
    ClientAddr, Decoder, ErrorCode, Frame, Hello, Incoming, Link, LinkConfig, ProtoError,
};
use crate::session::driver::{adapt_frame_read_size, adapt_read_size, READ_MIN, READ_SIZE};
use crate::stream::Stream;
use crate::transport::Conn;

/// Most chunks per vectored write.
const MAX_IOV: usize = 64;

/// A transport that passed the handshake, waiting for the session task.
pub(crate) struct PendingLeg {
    conn: Conn,
    /// Bytes read past the HELLO (none from a v1 initiator; kept anyway).
    rbuf: BytesMut,
    /// The WELCOME, to write before anything else.
    welcome: Bytes,
    /// The initiator's `recv_offset`: the down stream resumes here.
    down_from: u64,
    /// The WELCOME's `recv_offset`: the up stream resumes here.
    up_from: u64,
    peer_max_frame: u32,
    peer_window: u32,
    peer_heartbeat_ms: u32,
    epoch: u64,
}

impl PendingLeg {
    pub(crate) fn new(
        conn: Conn,
        rbuf: BytesMut,
        hello: &Hello,
        welcome: Bytes,
        up_from: u64,
    ) -> PendingLeg {
        PendingLeg {
            conn,
            rbuf,
            welcome,
            down_from: hello.recv_offset,
            up_from,
            peer_max_frame: hello.max_frame,
            peer_window: hello.window,
            peer_heartbeat_ms: hello.heartbeat_ms,
            epoch: hello.epoch,
        }
    }
}

/// What the application handle and the session task share.
pub(crate) struct Inner {
    /// The down stream: the application appends, legs send and replay.
    pub(crate) down: Stream,
    /// The application shut the down stream.
    pub(crate) down_fin: bool,
    /// Up bytes received, not yet read by the application.
    pub(crate) up: VecDeque<Bytes>,
    /// Always the sum of `up`'s lengths.
    pub(crate) up_queued: usize,
    /// Up-stream offset just past the last byte queued: always
    /// `consumed + up_queued`.
    pub(crate) up_have: u64,
    /// The initiator's FIN offset, once received.
    pub(crate) up_fin: Option<u64>,
    /// Up bytes read by the application.
    pub(crate) consumed: u64,
    /// Up bytes the application acked (`AckPolicy::Manual`); `<= consumed`.
    pub(crate) app_acked: u64,
    /// The last accepted epoch.
    pub(crate) epoch: u64,
    /// A newer leg routed here by a handshake.
    pub(crate) pending: Option<PendingLeg>,
    /// Set once, when the session ends (`Complete` for a normal end).
    pub(crate) end: Option<ServerError>,
    /// The application dropped its handle.
    pub(crate) app_gone: bool,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
    /// A hand-over's hold on the session task (`super::handover`).
    pub(crate) hold: Hold,
    /// The session's state, encoded by the task when it parked.
    pub(crate) parked: Option<super::handover::Parked>,
}

/// Where a hand-over stands with the session task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Running as usual.
    Running,
    /// Asked to park at its next turn.
    Asked,
    /// Parked: it reads, writes and times nothing until released; its
    /// state is in `Inner::parked`.
    Parked,
    /// The new process took the session: the task ends without touching
    /// the transport (whose descriptor the new process holds).
    HandedOver,
}

/// One session.
pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    /// Wakes the session task.
    pub(crate) notify: Notify,
    /// Wakes a hand-over waiting for the task to park (or end).
    pub(crate) parked_notify: Notify,
    pub(crate) id: SessionId,
    pub(crate) restored: bool,
    pub(crate) client: ClientAddr,
    pub(crate) policy: AckPolicy,
    /// Most up bytes queued for the application before reading stops.
    pub(crate) queue_limit: usize,
    /// Most down bytes unacknowledged before writes wait.
    pub(crate) send_limit: u64,
}

impl Inner {
    /// A session's state with nothing queued either way: the down stream
    /// from `down`, the up stream consumed (and acked) up to `up`.
    pub(crate) fn starting(down: Stream, up: u64, epoch: u64) -> Inner {
        Inner {
            down,
            down_fin: false,
            up: VecDeque::new(),
            up_queued: 0,
            up_have: up,
            up_fin: None,
            consumed: up,
            app_acked: up,
            epoch,
            pending: None,
            end: None,
            app_gone: false,
            read_waker: None,
            write_waker: None,
            hold: Hold::Running,
            parked: None,
        }
    }
}

/// What a [`Shared`] is besides its state.
pub(crate) struct Identity {
    pub(crate) id: SessionId,
    pub(crate) restored: bool,
    pub(crate) client: ClientAddr,
    pub(crate) policy: AckPolicy,
    pub(crate) queue_limit: usize,
    pub(crate) send_limit: u64,
}

impl Shared {
    /// A session with `inner` as its state.
    pub(crate) fn from_parts(inner: Inner, who: Identity) -> Arc<Shared> {
        Arc::new(Shared {
            inner: Mutex::new(inner),
            notify: Notify::new(),
            parked_notify: Notify::new(),
            id: who.id,
            restored: who.restored,
            client: who.client,
            policy: who.policy,
            queue_limit: who.queue_limit,
            send_limit: who.send_limit,
        })
    }

    /// A new session (`restored_up`: `None`), or one restored with its up
    /// stream consumed up to the given offset. Its first leg is `first`.
    pub(crate) fn new(
        cfg: &ServerConfig,
        hello: &Hello,
        restored_up: Option<u64>,
        first: PendingLeg,
    ) -> Arc<Shared> {
        let up = restored_up.unwrap_or(0);
        let mut inner = Inner::starting(Stream::starting_at(hello.recv_offset), up, hello.epoch);
        inner.pending = Some(first);
        Shared::from_parts(
            inner,
            Identity {
                id: hello.session_id,
                restored: restored_up.is_some(),
                client: hello.client,
                policy: cfg.ack,
                queue_limit: cfg.link.window as usize,
                send_limit: u64::from(cfg.link.window),
            },
        )
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("session lock")
    }

    /// Whether the new process of a hand-over took this session: its task
    /// here may not have noticed yet (it marks the table's entry moved
    /// when it does), but it serves nothing any more.
    pub(crate) fn handed_over(&self) -> bool {
        self.lock().hold == Hold::HandedOver
    }

    /// What the handshake checks need (called with the table locked).
    pub(crate) fn known(&self) -> Known {
        let g = self.lock();
        if g.end.is_some() {
            return Known::Unknown;
        }
        Known::Live {
            epoch: g.epoch,
            down_acked: g.down.acked(),
            down_sent: g.down.sent(),
        }
    }

    /// Hands an accepted resume to the session task (which closes the
    /// older transport, if any, when it installs this one).
    pub(crate) fn route(&self, cfg: &ServerConfig, hello: &Hello, conn: Conn, rbuf: BytesMut) {
        let mut g = self.lock();
        g.epoch = hello.epoch;
        let up_from = match self.policy {
            AckPolicy::Auto => g.up_have,
            AckPolicy::Manual => g.app_acked,
        };
        let w = super::welcome(cfg, hello, true, false, up_from);
        g.pending = Some(PendingLeg::new(conn, rbuf, hello, w, up_from));
        drop(g);
        self.notify.notify_one();
    }

    /// The application is done writing: our FIN goes out after the last
    /// byte.
    pub(crate) fn shutdown_down(&self) {
        let mut g = self.lock();
        if !g.down_fin {
            g.down_fin = true;
            g.down.set_fin();
            drop(g);
            self.notify.notify_one();
        }
    }
}

/// The current transport.
pub(crate) struct Leg {
    pub(crate) rd: ReadHalf<Conn>,
    pub(crate) wr: WriteHalf<Conn>,
    pub(crate) rbuf: BytesMut,
    /// Bytes to ask for per read, `READ_MIN..=READ_SIZE`.
    pub(crate) read_size: usize,
    pub(crate) link: Link,
    /// The WELCOME (or what is left of it) to write first.
    pub(crate) pre: Option<Bytes>,
    pub(crate) epoch: u64,
    /// The transport buffers writes (TLS records): a write may return
    /// before its bytes are on the socket, so it needs flushing.
    pub(crate) buffered: bool,
    /// Bytes written since the last flush (only when `buffered`).
    pub(crate) unflushed: bool,
}

fn install(p: PendingLeg, g: &mut Inner, cfg: &ServerConfig, now: Instant) -> Leg {
    g.down.ack_to(p.down_from);
    g.down.rewind();
    let mut link_cfg: LinkConfig = cfg.link;
    link_cfg.dead_peer_timeout = if p.peer_heartbeat_ms == 0 {
        // The initiator never pings when idle: only the transport tells.
        Duration::from_secs(24 * 3600)
    } else {
        link_cfg
            .dead_peer_timeout
            .max(Duration::from_millis(u64::from(p.peer_heartbeat_ms) * 3))
    };
    let buffered = p.conn.is_buffered();
    let (rd, wr) = tokio::io::split(p.conn);
    Leg {
        buffered,
        unflushed: false,
        rd,
        wr,
        rbuf: p.rbuf,
        read_size: READ_MIN,
        link: Link::new(link_cfg, p.peer_max_frame, p.peer_window, p.up_from, now),
        pre: Some(p.welcome),
        epoch: p.epoch,
    }
}

fn ack_point(g: &Inner, policy: AckPolicy) -> u64 {
    match policy {
        AckPolicy::Auto => g.consumed,
        AckPolicy::Manual => g.app_acked,
    }
}

enum Event {
    Notified,
    Read(io::Result<usize>),
    /// Bytes that came before this side's WELCOME went out (early data,
    /// §3.6), or that a taken-over leg had read and not decoded yet.
    Leftover,
    Wrote(io::Result<usize>),
    Flushed(io::Result<()>),
    Timer,
}

async fn read_some(
    rd: Option<(&mut ReadHalf<Conn>, &mut BytesMut, &mut usize)>,
    dec: &Decoder,
) -> io::Result<usize> {
    match rd {
        Some((rd, buf, size)) if *size == READ_SIZE => {
            // In bulk, as the proxy's sessions do: each read asks for the
            // rest of the frame being read and the next one's header, with
            // room for them reserved first, so reads end on frame
            // boundaries and the decoder never grows the buffer by copying
            // a partial 64 KiB frame (that was about a copy of every byte).
            use bytes::BufMut;
            let wanted = dec.wanted(buf);
            if buf.capacity() - buf.len() < wanted {
                buf.reserve(wanted);
            }
            let n = rd.read_buf(&mut (&mut *buf).limit(wanted)).await?;
            adapt_frame_read_size(size, n, wanted);
            Ok(n)
        }
        Some((rd, buf, size)) => {
            // As the proxy's sessions do: 4 KiB reads while messages are
            // small, up to 64 KiB in bulk (a fresh 64 KiB buffer per read
            // was an allocation per message).
            if buf.capacity() - buf.len() < *size / 4 {
                buf.reserve(*size);
            }
            let spare = buf.capacity() - buf.len();
            let n = rd.read_buf(buf).await?;
            adapt_read_size(size, n, spare);
            Ok(n)
        }
        None => std::future::pending().await,
    }
}

/// Writes some of `chunks`; with nothing to write, flushes what a buffering
/// transport (TLS) still holds when `flush` says so.
async fn write_some(wr: Option<&mut WriteHalf<Conn>>, chunks: &[Bytes], flush: bool) -> Event {
    match wr {
        Some(wr) if !chunks.is_empty() => {
            // On the stack: no allocation per write.
            let mut slices = [IoSlice::new(&[]); MAX_IOV + 1];
            let n = chunks.len().min(slices.len());
            for (s, c) in slices.iter_mut().zip(&chunks[..n]) {
                *s = IoSlice::new(c);
            }
            Event::Wrote(wr.write_vectored(&slices[..n]).await)
        }
        Some(wr) if flush => Event::Flushed(wr.flush().await),
        _ => std::future::pending().await,
    }
}

/// The session task of a new session (its first leg is pending).
pub(crate) async fn run(shared: Arc<Shared>, ctx: Arc<Ctx>) {
    run_from(shared, ctx, None, Instant::now()).await;
}

/// The session task, from `leg` (or none, lost at `lost_at`): a session
/// taken over from a previous process starts here.
pub(crate) async fn run_from(
    shared: Arc<Shared>,
    ctx: Arc<Ctx>,
    mut leg: Option<Leg>,
    mut lost_at: Instant,
) {
    let cfg = &ctx.cfg;
    let id = super::Hex(shared.id);
    let dec = Decoder::new(cfg.link.max_frame);
    let mut chunks: Vec<Bytes> = Vec::new();
    // Kept across turns of the loop (a new `Notified` and a new timer per
    // turn registered and dropped a waiter and a timer entry, under locks,
    // several times per message): the timer moves only when the deadline
    // does, and `notified` is renewed once it fired.
    let mut notified = std::pin::pin!(shared.notify.notified());
    let mut timer_at = Instant::now();
    let mut timer = std::pin::pin!(tokio::time::sleep_until(timer_at.into()));
    // A leg taken over from a previous process may hold whole frames it read
    // and had not decoded yet.
    let mut leftover = leg.as_ref().is_some_and(|l| !l.rbuf.is_empty());
    let end: ServerError = loop {
        let now = Instant::now();
        chunks.clear();
        // A hand-over's hold comes first: a parked task touches nothing.
        let hold = {
            let mut g = shared.lock();
            if g.hold == Hold::Asked {
                // A resumed leg routed here goes in first: it travels too.
                if let Some(p) = g.pending.take() {
                    tracing::info!(session.id = %id, leg.epoch = p.epoch, down.from = p.down_from, up.from = p.up_from, "leg established");
                    leg = Some(install(p, &mut g, cfg, now));
                }
                let parked = super::handover::park(&shared, &g, &mut leg, lost_at, now);
                g.parked = Some(parked);
                g.hold = Hold::Parked;
                shared.parked_notify.notify_one();
            }
            g.hold
        };
        match hold {
            Hold::Running => {}
            Hold::Asked | Hold::Parked => {
                notified.as_mut().await;
                notified.set(shared.notify.notified());
                continue;
            }
            Hold::HandedOver => {
                // Our copies of the transport close without a shutdown: the
                // new process holds the connection (a TLS leg, which cannot
                // move, closes: the initiator resumes with the new process).
                drop(leg);
                ctx.table
                    .lock()
                    .expect("session table lock")
                    .moved(&shared.id, &shared);
                tracing::info!(session.id = %id, "session handed over to the new process");
                return;
            }
        }
        let deadline;
        let read_ok;
        {
            let mut g = shared.lock();
            if let Some(p) = g.pending.take() {
                if let Some(old) = &leg {
                    tracing::info!(session.id = %id, old.epoch = old.epoch, new.epoch = p.epoch, "newer leg replaces the current one");
                }
                tracing::info!(session.id = %id, leg.epoch = p.epoch, down.from = p.down_from, up.from = p.up_from, "leg established");
                let l = install(p, &mut g, cfg, now);
                // What the handshake read past the HELLO is early data.
                leftover = !l.rbuf.is_empty();
                leg = Some(l);
            }
            if g.app_gone {
                // Nobody reads any more: discard (and so acknowledge).
                g.up.clear();
                g.up_queued = 0;
                g.consumed = g.up_have;
                g.app_acked = g.up_have;
            }
            if g.down.buffered() < shared.send_limit {
                if let Some(w) = g.write_waker.take() {
                    w.wake();
                }
            }
            match leg.as_mut() {
                Some(l) => {
                    if l.link.complete() && !l.link.has_wire() && l.pre.is_none() {
                        break ServerError::Complete;
                    }
                    if l.link.peer_dead(now) {
                        tracing::info!(session.id = %id, "leg lost: the initiator went silent");
                        leg = None;
                        lost_at = now;
                        continue;
                    }
                    let consumed = ack_point(&g, shared.policy);
                    let Inner { down, down_fin, .. } = &mut *g;
                    l.link.fill(down, *down_fin, consumed, now);
                    if let Some(p) = &l.pre {
                        chunks.push(p.clone());
                    }
                    l.link.wire(MAX_IOV, &mut chunks);
                    deadline = l.link.deadline();
                }
                None => {
                    if now >= lost_at + cfg.resume_timeout {
                        break ServerError::ResumeTimeout(cfg.resume_timeout);
                    }
                    deadline = lost_at + cfg.resume_timeout;
                }
            }
            read_ok = g.up_queued < shared.queue_limit;
        }
        let ev = {
            let (rd, wr, unflushed) = match leg.as_mut() {
                Some(Leg {
                    rd,
                    wr,
                    rbuf,
                    read_size,
                    unflushed,
                    ..
                }) => (Some((rd, rbuf, read_size)), Some(wr), *unflushed),
                None => (None, None, false),
            };
            let rd = if read_ok { rd } else { None };
            if deadline != timer_at {
                timer_at = deadline;
                timer.as_mut().reset(deadline.into());
            }
            if leftover && rd.is_some() {
                // (Decoded once reading is allowed: not while the
                // application's queue is full.)
                leftover = false;
                Event::Leftover
            } else {
                tokio::select! {
                    _ = notified.as_mut() => {
                        notified.set(shared.notify.notified());
                        Event::Notified
                    }
                    r = read_some(rd, &dec) => Event::Read(r),
                    w = write_some(wr, &chunks, unflushed) => w,
                    _ = timer.as_mut() => Event::Timer,
                }
            }
        };
        let now = Instant::now();
        match ev {
            Event::Notified | Event::Timer => {}
            Event::Wrote(Ok(n)) if n > 0 => {
                let l = leg.as_mut().expect("wrote on a leg");
                let mut n = n;
                if let Some(p) = l.pre.take() {
                    if n >= p.len() {
                        n -= p.len();
                    } else {
                        l.pre = Some(p.slice(n..));
                        n = 0;
                    }
                }
                l.link.on_written(n, now);
                l.unflushed = l.buffered;
            }
            Event::Flushed(Ok(())) => {
                let l = leg.as_mut().expect("flushed a leg");
                l.unflushed = false;
            }
            Event::Flushed(Err(e)) => {
                tracing::debug!(session.id = %id, error = %e, "leg lost: flush failed");
                leg = None;
                lost_at = now;
            }
            Event::Wrote(r) => {
                tracing::debug!(session.id = %id, result = ?r, "leg lost: write failed");
                leg = None;
                lost_at = now;
            }
            Event::Leftover | Event::Read(Ok(1..)) => {
                let l = leg.as_mut().expect("read on a leg");
                let r = if matches!(ev, Event::Leftover) && l.epoch != 0 && l.pre.is_some() {
                    // Early data only opens a new session (§3.6): a resume's
                    // initiator waits for our WELCOME, which says where to
                    // resume.
                    Err(ProtoError::new(
                        ErrorCode::Malformed,
                        "DATA before the WELCOME of a resume",
                    ))
                } else {
                    on_read(&shared, l, &dec, now)
                };
                match r {
                    Ok(None) => {}
                    Ok(Some(e)) => break e,
                    Err(e) => {
                        tracing::warn!(session.id = %id, code = e.code.as_str(), detail = %e.detail, "initiator broke the protocol: aborting the session");
                        l.link.queue(&Frame::Abort {
                            code: e.code,
                            reason: e.detail.clone(),
                        });
                        flush(l).await;
                        break ServerError::Protocol(e);
                    }
                }
            }
            Event::Read(r) => {
                tracing::info!(session.id = %id, result = ?r.map(|_| "eof"), "leg lost: transport closed");
                leg = None;
                lost_at = now;
            }
        }
    };
    if let Some(l) = leg.as_mut() {
        if matches!(end, ServerError::Complete) {
            flush(l).await;
            let _ = l.wr.shutdown().await;
        }
    }
    drop(leg);
    let completed = {
        let mut g = shared.lock();
        let c = matches!(end, ServerError::Complete)
            .then(|| (g.epoch, g.up_fin.unwrap_or(g.up_have), g.down.read()));
        g.end = Some(end.clone());
        shared.parked_notify.notify_one();
        for w in [g.read_waker.take(), g.write_waker.take()]
            .into_iter()
            .flatten()
        {
            w.wake();
        }
        c
    };
    let ttl = (cfg.link.dead_peer_timeout * 2).max(Duration::from_secs(10));
    ctx.table
        .lock()
        .expect("session table lock")
        .end(&shared.id, &shared, completed, ttl);
    tracing::info!(session.id = %id, reason = %end, "session closed");
}

/// Writes what the link has queued, bounded in time (before an ABORT or a
/// final close).
async fn flush(l: &mut Leg) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let mut chunks = Vec::new();
            if let Some(p) = l.pre.take() {
                chunks.push(p);
            }
            l.link.wire(MAX_IOV, &mut chunks);
            if chunks.is_empty() {
                return;
            }
            for c in &chunks {
                if l.wr.write_all(c).await.is_err() {
                    return;
                }
            }
            let n = chunks.iter().map(Bytes::len).sum();
            l.link.on_written(n, Instant::now());
            if l.wr.flush().await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// Decodes and applies every whole frame read. `Ok(Some(_))`: the session
/// ends (the initiator aborted); `Err`: the initiator broke the protocol.
fn on_read(
    shared: &Shared,
    l: &mut Leg,
    dec: &Decoder,
    now: Instant,
) -> Result<Option<ServerError>, crate::proto::ProtoError> {
    let mut g = shared.lock();
    let mut wake_reader = false;
    let result = loop {
        let frame = match dec.decode(&mut l.rbuf) {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(None),
            Err(e) => break Err(e),
        };
        match l.link.on_frame(frame, &mut g.down, now) {
            Ok(Incoming::Data(b)) => {
                let start = l.link.received() - b.len() as u64;
                let skip = g.up_have.saturating_sub(start);
                if skip < b.len() as u64 {
                    let b = b.slice(skip as usize..);
                    g.up_have += b.len() as u64;
                    g.up_queued += b.len();
                    g.up.push_back(b);
                    wake_reader = true;
                }
            }
            Ok(Incoming::Fin(o)) => {
                g.up_fin = Some(o);
                wake_reader = true;
            }
            Ok(Incoming::Acked(_)) | Ok(Incoming::Ping) => {}
            Ok(Incoming::Abort { code, reason }) => {
                tracing::info!(session.id = %hex(&shared.id), code = code.as_str(), reason = %reason, "the initiator aborted the session");
                break Ok(Some(ServerError::PeerAborted { code, reason }));
            }
            Err(e) => break Err(e),
        }
    };
    if wake_reader {
        if let Some(w) = g.read_waker.take() {
            w.wake();
        }
    }
    result
}
