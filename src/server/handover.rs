//! Moving a live session of the server library to another process (a
//! holdfast hand-over of a `protocol = "resume"` listener): the session
//! task parks at its next turn and encodes the session's whole state (both
//! streams' offsets, the down stream's replay buffer, the up bytes the
//! application has not read, the current leg's [`Link`] with its unsent
//! frames and unread bytes); the other process rebuilds the session from
//! it, with the leg's socket when it is plain TCP or Unix. A TLS leg cannot
//! move (rustls's state stays here): it is closed once the session is
//! taken, and the initiator resumes with the new process, which replays
//! from the offsets in its RESUME as after any broken transport.
//!
//! Layout (`snapshot_codec`): version 1; the id, `restored`, the client
//! address, the ack policy, the queue and send limits; the down stream,
//! `down_fin`, the unread up chunks, `up_have`, `up_fin`, `consumed`,
//! `app_acked`, `epoch`, `app_gone`; then the leg: absent, or its kind
//! (0 TCP, 1 Unix: its descriptor travels beside the state), its epoch,
//! link, unread bytes and what is left of its WELCOME; last, when the
//! session has no leg, when it lost the last one.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::session::{Hold, Identity, Inner, Leg, Shared};
use super::{AckPolicy, Ctx, Entry, ResumableSession};
use crate::proto::{ClientAddr, Link};
use crate::snapshot_codec::{Reader, Writer};
use crate::stream::Stream;
use crate::transport::Conn;

const LAYOUT: u8 = 1;

/// Longest a hand-over waits for a session task to park.
const PARK_TIMEOUT: Duration = Duration::from_secs(1);

/// A parked session's state, and the descriptor of its leg when that can
/// move.
#[derive(Debug)]
pub struct Parked {
    pub state: Vec<u8>,
    pub leg: Option<(OwnedFd, LegKind)>,
}

/// The socket under a leg that moves with its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegKind {
    Tcp,
    Unix,
}

impl LegKind {
    fn of(conn: &Conn) -> Option<LegKind> {
        match conn {
            Conn::Tcp(_) => Some(LegKind::Tcp),
            Conn::Unix(_) => Some(LegKind::Unix),
            _ => None,
        }
    }
}

/// Called by the session task, with its lock held, when asked to park.
/// A leg whose descriptor cannot be duplicated is left out, like a TLS one
/// (the initiator resumes).
pub(crate) fn park(
    shared: &Shared,
    g: &Inner,
    leg: &mut Option<Leg>,
    lost_at: Instant,
    now: Instant,
) -> Parked {
    let fd = leg.take().map(|l| {
        let (l, fd) = duplicate(l);
        *leg = Some(l);
        fd
    });
    let leg = leg.as_ref();
    let moving = match (leg, fd.flatten()) {
        (Some(l), Some((fd, kind))) => Some((l, fd, kind)),
        _ => None,
    };
    let mut out = Vec::with_capacity(
        64 + g.down.buffered() as usize + g.up_queued + leg.map_or(0, |l| l.rbuf.len()),
    );
    let mut w = Writer::new(&mut out, now);
    w.u8(LAYOUT);
    w.raw(&shared.id);
    w.bool(shared.restored);
    shared.client.write_snapshot(&mut w);
    w.u8(match shared.policy {
        AckPolicy::Auto => 0,
        AckPolicy::Manual => 1,
    });
    w.usize(shared.queue_limit);
    w.u64(shared.send_limit);
    g.down.write_snapshot(&mut w);
    w.bool(g.down_fin);
    w.usize(g.up.len());
    for b in &g.up {
        w.bytes(b);
    }
    w.u64(g.up_have);
    w.option(g.up_fin, |w, o| w.u64(o));
    w.u64(g.consumed);
    w.u64(g.app_acked);
    w.u64(g.epoch);
    w.bool(g.app_gone);
    match &moving {
        Some((l, _, kind)) => {
            w.bool(true);
            w.u8(match kind {
                LegKind::Tcp => 0,
                LegKind::Unix => 1,
            });
            w.u64(l.epoch);
            l.link.write_snapshot(&mut w);
            w.bytes(&l.rbuf);
            w.option(l.pre.as_ref(), |w, p| w.bytes(p));
        }
        None => {
            w.bool(false);
            // A leg that stays here closes: lost now, as far as the new
            // process can tell.
            w.instant(if leg.is_some() { now } else { lost_at });
        }
    }
    Parked {
        state: out,
        leg: moving.map(|(_, fd, kind)| (fd, kind)),
    }
}

impl ResumableSession {
    /// Parks the session task at its next turn and returns the session's
    /// state; until [`release_handover`](Self::release_handover) the
    /// session reads, writes and times nothing (a newer transport routed to
    /// it meanwhile waits). Fails when the session is ending or the task
    /// does not park within a second.
    pub async fn park_for_handover(&self) -> Result<Parked, &'static str> {
        let shared = &self.shared;
        {
            let mut g = shared.lock();
            if g.end.is_some() {
                return Err("closing");
            }
            g.hold = Hold::Asked;
        }
        shared.notify.notify_one();
        let deadline = tokio::time::Instant::now() + PARK_TIMEOUT;
        loop {
            {
                let mut g = shared.lock();
                if g.hold == Hold::Parked {
                    if let Some(p) = g.parked.take() {
                        return Ok(p);
                    }
                }
                if g.end.is_some() {
                    g.hold = Hold::Running;
                    return Err("closing");
                }
            }
            if tokio::time::timeout_at(deadline, shared.parked_notify.notified())
                .await
                .is_err()
            {
                let mut g = shared.lock();
                if g.hold == Hold::Parked {
                    if let Some(p) = g.parked.take() {
                        return Ok(p);
                    }
                }
                g.hold = Hold::Running;
                drop(g);
                shared.notify.notify_one();
                return Err("the session task did not pause in time");
            }
        }
    }

    /// Ends a hold: `taken` means the new process runs the session now
    /// (the task here ends without a shutdown); otherwise it carries on as
    /// if nothing happened.
    pub fn release_handover(&self, taken: bool) {
        let mut g = self.shared.lock();
        g.parked = None;
        g.hold = if taken {
            Hold::HandedOver
        } else {
            Hold::Running
        };
        drop(g);
        self.shared.notify.notify_one();
    }
}

/// A session rebuilt from a previous process's state, registered with its
/// listener but not running: [`start`](Self::start) runs it once that
/// process knows it was taken; dropped unstarted, it is forgotten (the
/// previous process keeps it).
pub struct Imported {
    shared: Arc<Shared>,
    ctx: Arc<Ctx>,
    leg: Option<Leg>,
    lost_at: Instant,
    started: bool,
}

impl std::fmt::Debug for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imported")
            .field("id", &super::hex(&self.shared.id))
            .finish_non_exhaustive()
    }
}

impl Imported {
    /// Runs the session task (inside a tokio runtime).
    pub fn start(mut self) {
        self.started = true;
        let leg = self.leg.take();
        tokio::spawn(super::session::run_from(
            self.shared.clone(),
            self.ctx.clone(),
            leg,
            self.lost_at,
        ));
    }
}

impl Drop for Imported {
    fn drop(&mut self) {
        if !self.started {
            let mut t = self.ctx.table.lock().expect("session table lock");
            t.end(&self.shared.id, &self.shared, None, Duration::ZERO);
        }
    }
}

impl super::ResumeListener {
    /// Rebuilds a session parked by another process ([`Parked`]): `leg` is
    /// the descriptor that travelled with it. The session is registered
    /// (a resume of it is routed here from now on) and returned with its
    /// task not yet running. Must be called within a tokio runtime.
    pub fn import_session(
        &self,
        state: &[u8],
        leg: Option<OwnedFd>,
    ) -> Result<(ResumableSession, Imported), String> {
        let now = Instant::now();
        let ctx = &self.ctx;
        let (shared, leg, lost_at) = decode(state, leg, now)?;
        {
            let mut t = ctx.table.lock().expect("session table lock");
            if matches!(t.map.get(&shared.id), Some(Entry::Live(_))) {
                return Err("a session with this id is already live here".into());
            }
            t.map.insert(shared.id, Entry::Live(shared.clone()));
        }
        let imported = Imported {
            shared: shared.clone(),
            ctx: ctx.clone(),
            leg,
            lost_at,
            started: false,
        };
        Ok((ResumableSession { shared }, imported))
    }
}

type Decoded = (Arc<Shared>, Option<Leg>, Instant);

fn decode(state: &[u8], fd: Option<OwnedFd>, now: Instant) -> Result<Decoded, String> {
    let mut r = Reader::new(state, now);
    let what = "resumable session";
    let bad = |e: crate::snapshot_codec::SnapshotError| e.to_string();
    let layout = r.u8(what).map_err(bad)?;
    if layout != LAYOUT {
        return Err(format!(
            "resumable session layout {layout}, this process reads {LAYOUT}"
        ));
    }
    let id: [u8; 16] = r.array(what).map_err(bad)?;
    let restored = r.bool(what).map_err(bad)?;
    let client = ClientAddr::read_snapshot(&mut r, what).map_err(bad)?;
    let policy = match r.u8(what).map_err(bad)? {
        0 => AckPolicy::Auto,
        1 => AckPolicy::Manual,
        p => return Err(format!("unknown ack policy {p}")),
    };
    let queue_limit = r.usize(what).map_err(bad)?;
    let send_limit = r.u64(what).map_err(bad)?;
    let down = Stream::read_snapshot(&mut r, "down stream").map_err(bad)?;
    let down_fin = r.bool(what).map_err(bad)?;
    let n = r.count(1, what).map_err(bad)?;
    let mut up = VecDeque::with_capacity(n);
    let mut up_queued = 0usize;
    for _ in 0..n {
        let b = r.bytes(what).map_err(bad)?;
        up_queued += b.len();
        up.push_back(b);
    }
    let up_have = r.counter(what).map_err(bad)?;
    let up_fin = r.option(what, |r| r.counter(what)).map_err(bad)?;
    let consumed = r.counter(what).map_err(bad)?;
    let app_acked = r.counter(what).map_err(bad)?;
    let epoch = r.u64(what).map_err(bad)?;
    let app_gone = r.bool(what).map_err(bad)?;
    if consumed + up_queued as u64 != up_have || app_acked > consumed {
        return Err(format!(
            "up stream offsets disagree: consumed {consumed} + queued {up_queued} != {up_have}, or acked {app_acked} past it"
        ));
    }
    let has_leg = r.bool(what).map_err(bad)?;
    let (leg, lost_at, fd) = if has_leg {
        let kind = match r.u8(what).map_err(bad)? {
            0 => LegKind::Tcp,
            1 => LegKind::Unix,
            k => return Err(format!("unknown leg kind {k}")),
        };
        let leg_epoch = r.u64(what).map_err(bad)?;
        let link = Link::read_snapshot(&mut r, "leg link").map_err(bad)?;
        let rbuf = r.bytes(what).map_err(bad)?;
        let pre = r.option(what, |r| r.bytes(what)).map_err(bad)?;
        if leg_epoch > epoch {
            return Err(format!("leg epoch {leg_epoch} past the session's {epoch}"));
        }
        (Some((kind, leg_epoch, link, rbuf, pre)), now, fd)
    } else {
        (None, r.instant(what).map_err(bad)?, fd)
    };
    r.finish().map_err(bad)?;
    let leg = match (leg, fd) {
        (Some((kind, epoch, link, rbuf, pre)), Some(fd)) => {
            let conn = wrap(kind, fd).map_err(|e| format!("leg socket: {e}"))?;
            let (rd, wr) = tokio::io::split(conn);
            Some(Leg {
                rd,
                wr,
                rbuf: BytesMut::from(&rbuf[..]),
                read_size: crate::session::driver::READ_MIN,
                link,
                pre: pre.filter(|p: &Bytes| !p.is_empty()),
                epoch,
                buffered: false,
                unflushed: false,
            })
        }
        (None, None) => None,
        (Some(_), None) => return Err("the leg's socket did not arrive".into()),
        (None, Some(_)) => return Err("a socket arrived for a session without a leg".into()),
    };
    let mut inner = Inner::starting(down, consumed, epoch);
    inner.down_fin = down_fin;
    inner.up = up;
    inner.up_queued = up_queued;
    inner.up_have = up_have;
    inner.up_fin = up_fin;
    inner.app_acked = app_acked;
    inner.app_gone = app_gone;
    let shared = Shared::from_parts(
        inner,
        Identity {
            id,
            restored,
            client,
            policy,
            queue_limit,
            send_limit,
        },
    );
    Ok((shared, leg, lost_at))
}

/// A duplicate of a plain leg's descriptor (None over TLS, or when it
/// cannot be duplicated): its halves are joined to reach the connection,
/// then split again.
fn duplicate(l: Leg) -> (Leg, Option<(OwnedFd, LegKind)>) {
    let conn = l.rd.unsplit(l.wr);
    let fd = LegKind::of(&conn).and_then(|kind| {
        let fd = conn.fd().ok()?.try_clone_to_owned().ok()?;
        Some((fd, kind))
    });
    let (rd, wr) = tokio::io::split(conn);
    let l = Leg {
        rd,
        wr,
        rbuf: l.rbuf,
        read_size: l.read_size,
        link: l.link,
        pre: l.pre,
        epoch: l.epoch,
        buffered: l.buffered,
        unflushed: l.unflushed,
    };
    (l, fd)
}

fn wrap(kind: LegKind, fd: OwnedFd) -> std::io::Result<Conn> {
    match kind {
        LegKind::Tcp => Conn::from_tcp_fd(fd),
        LegKind::Unix => Conn::from_unix_fd(fd),
    }
}

/// The property fuzzed as `resumable_state` (`tests/fuzz_checks`): any
/// bytes decode to a session or an error, never a panic; a session
/// accepted without a leg (its socket cannot be fuzzed) encodes to bytes
/// that decode again and encode identically (the input itself may differ:
/// varints may be padded). Returns whether the bytes were accepted.
#[doc(hidden)]
pub fn fuzz_parked_state(state: &[u8]) -> bool {
    let now = Instant::now();
    let encode = |(shared, leg, lost_at): Decoded| {
        assert!(leg.is_none(), "a leg without its socket was accepted");
        let g = shared.lock();
        park(&shared, &g, &mut None, lost_at, now).state
    };
    match decode(state, None, now) {
        Err(e) => {
            assert!(!e.is_empty());
            false
        }
        Ok(d) => {
            let once = encode(d);
            let back = decode(&once, None, now).expect("an encoded state decodes");
            assert_eq!(
                encode(back),
                once,
                "an encoded state encodes back identically"
            );
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Frame, LinkConfig};
    use std::net::{IpAddr, Ipv4Addr};

    /// A session in mid-stream: down bytes acked, sent and unsent, up bytes
    /// read and still queued for the application, FIN from the initiator.
    fn session(_now: Instant) -> Arc<Shared> {
        let mut down = Stream::starting_at(1000);
        down.push(Bytes::from_static(b"acked-then-sent-"));
        down.push(Bytes::from_static(b"sent-not-acked-"));
        down.push(Bytes::from_static(b"unsent"));
        down.on_sent(31);
        down.ack_to(1016);
        let mut inner = Inner::starting(down, 500, 7);
        inner.up = [Bytes::from_static(b"queued "), Bytes::from_static(b"up")]
            .into_iter()
            .collect();
        inner.up_queued = 9;
        inner.up_have = 509;
        inner.up_fin = Some(509);
        inner.app_acked = 480;
        inner.hold = Hold::Asked;
        Shared::from_parts(
            inner,
            Identity {
                id: [9; 16],
                restored: true,
                client: ClientAddr::Ip(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 4567),
                policy: AckPolicy::Manual,
                queue_limit: 1 << 20,
                send_limit: 1 << 20,
            },
        )
    }

    fn refused(state: &[u8], fd: Option<OwnedFd>, now: Instant) -> String {
        match decode(state, fd, now) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    fn same_state(a: &Shared, b: &Shared) {
        let (x, y) = (a.lock(), b.lock());
        assert_eq!(
            (x.down.acked(), x.down.sent(), x.down.read()),
            (y.down.acked(), y.down.sent(), y.down.read())
        );
        assert_eq!(
            x.down.buffer().iter().collect::<Vec<_>>(),
            y.down.buffer().iter().collect::<Vec<_>>()
        );
        assert_eq!(x.up, y.up);
        assert_eq!(
            (x.up_queued, x.up_have, x.up_fin, x.consumed, x.app_acked),
            (y.up_queued, y.up_have, y.up_fin, y.consumed, y.app_acked)
        );
        assert_eq!(
            (x.epoch, x.down_fin, x.app_gone),
            (y.epoch, y.down_fin, y.app_gone)
        );
        assert_eq!((a.id, a.restored, a.client), (b.id, b.restored, b.client));
        assert_eq!(
            (a.policy, a.queue_limit, a.send_limit),
            (b.policy, b.queue_limit, b.send_limit)
        );
        assert_eq!(y.hold, Hold::Running);
    }

    #[test]
    fn a_session_without_a_leg_comes_back_whole() {
        let now = Instant::now();
        let s = session(now);
        let lost_at = now - Duration::from_millis(1500);
        let parked = park(&s, &s.lock(), &mut None, lost_at, now);
        assert!(parked.leg.is_none());
        let (back, leg, lost) = decode(&parked.state, None, now).unwrap();
        assert!(leg.is_none());
        same_state(&s, &back);
        // The resume timeout keeps running from when the leg was lost.
        let off = lost.max(lost_at) - lost.min(lost_at);
        assert!(off < Duration::from_millis(2), "{off:?}");
    }

    #[tokio::test]
    async fn a_plain_leg_travels_with_its_socket_and_link() {
        let now = Instant::now();
        let s = session(now);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut peer, _) = l.accept().await.unwrap();
        let cfg = LinkConfig::default();
        let mut link = Link::new(cfg, 65536, 1 << 20, 509, now);
        link.queue(&Frame::Ack(500));
        let (rd, wr) = tokio::io::split(Conn::Tcp(a));
        let mut leg = Some(Leg {
            rd,
            wr,
            rbuf: BytesMut::from(&b"half a frame"[..]),
            read_size: crate::session::driver::READ_MIN,
            link,
            pre: Some(Bytes::from_static(b"rest of the WELCOME")),
            epoch: 7,
            buffered: false,
            unflushed: false,
        });
        let parked = park(&s, &s.lock(), &mut leg, now, now);
        // The leg is still ours until the verdict.
        assert!(leg.is_some());
        let (fd, kind) = parked.leg.expect("a plain leg moves");
        assert_eq!(kind, LegKind::Tcp);
        let (back, got, _) = decode(&parked.state, Some(fd), now).unwrap();
        same_state(&s, &back);
        let mut got = got.expect("the leg");
        let orig = leg.as_ref().unwrap();
        assert_eq!(got.rbuf, orig.rbuf);
        assert_eq!(got.pre, orig.pre);
        assert_eq!(got.epoch, 7);
        assert_eq!(got.link.received(), 509);
        let (mut want, mut have) = (Vec::new(), Vec::new());
        orig.link.wire(16, &mut want);
        got.link.wire(16, &mut have);
        assert_eq!(want, have);
        // The rebuilt leg writes on the same connection.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        got.wr.write_all(b"via the new process").await.unwrap();
        let mut buf = [0u8; 19];
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"via the new process");
    }

    #[test]
    fn a_damaged_state_is_refused_by_name_never_a_panic() {
        let now = Instant::now();
        let s = session(now);
        let parked = park(&s, &s.lock(), &mut None, now, now);
        for cut in 0..parked.state.len() {
            let e = refused(&parked.state[..cut], None, now);
            assert!(!e.is_empty(), "cut at {cut}");
        }
        let mut longer = parked.state.clone();
        longer.push(0);
        refused(&longer, None, now);
        let mut other = parked.state.clone();
        other[0] = 2;
        assert!(refused(&other, None, now).contains("layout 2"));
        // Offsets that disagree: more consumed than the queue allows.
        let bad = session(now);
        bad.lock().consumed = 501;
        let p = park(&bad, &bad.lock(), &mut None, now, now);
        assert!(refused(&p.state, None, now).contains("offsets disagree"));
    }

    #[test]
    fn a_socket_without_a_leg_or_a_leg_without_its_socket_is_refused() {
        let now = Instant::now();
        let s = session(now);
        let parked = park(&s, &s.lock(), &mut None, now, now);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = refused(&parked.state, Some(OwnedFd::from(a)), now);
        assert!(e.contains("without a leg"), "{e}");
    }
    /// The `resumable_state` fuzz seeds: sessions without a leg in several
    /// states (accepted, and they encode back identically), one with a leg
    /// (refused without its socket). Deterministic except for the instants,
    /// which are relative. Regenerate with
    /// `cargo test --lib write_resumable_state_seeds -- --ignored`.
    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let now = Instant::now();
        let mut out = Vec::new();
        let s = session(now);
        out.push((
            "valid-mid-stream",
            park(&s, &s.lock(), &mut None, now, now).state,
        ));
        let lost = now - Duration::from_millis(2500);
        out.push((
            "valid-lost-leg",
            park(&s, &s.lock(), &mut None, lost, now).state,
        ));
        let fresh = session(now);
        {
            let mut g = fresh.lock();
            g.down = Stream::starting_at(0);
            g.up.clear();
            g.up_queued = 0;
            g.up_have = 0;
            g.up_fin = None;
            g.consumed = 0;
            g.app_acked = 0;
            g.epoch = 0;
        }
        out.push((
            "valid-fresh",
            park(&fresh, &fresh.lock(), &mut None, now, now).state,
        ));
        let done = session(now);
        {
            let mut g = done.lock();
            g.down.set_fin();
            g.down_fin = true;
            g.app_gone = true;
        }
        out.push((
            "valid-both-fins",
            park(&done, &done.lock(), &mut None, now, now).state,
        ));
        let mut with_leg = park(&s, &s.lock(), &mut None, now, now).state;
        // The same state with a leg flag and a truncated leg: refused.
        let cut = with_leg.len() - 10;
        with_leg.truncate(cut);
        out.push(("truncated", with_leg));
        out.push(("garbage", vec![0xff; 64]));
        out
    }

    #[test]
    fn the_fuzz_seeds_are_what_they_say() {
        for (name, bytes) in seeds() {
            assert_eq!(
                fuzz_parked_state(&bytes),
                name.starts_with("valid"),
                "{name}"
            );
        }
    }

    #[test]
    #[ignore]
    fn write_resumable_state_seeds() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/resumable_state");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
