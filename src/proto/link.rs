//! \[pure\] One established HFRP leg, either side: what to put on the wire
//! (DATA within the peer's window and frame size, ACKs in batches, FIN,
//! PING when idle) and what the peer's frames mean for our streams.
//!
//! A [`Link`] lives from WELCOME to the end of its transport. It does not
//! own the streams: the outgoing [`Stream`] (whose replay buffer holds what
//! the peer has not acknowledged) is passed in, and incoming bytes are
//! handed back to the caller as [`Incoming::Data`]. No sockets, no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{data_header, ty, ErrorCode, Frame, ProtoError};
use crate::stream::Stream;

/// Most encoded bytes queued for the transport at once (backpressure: the
/// rest waits in the stream's replay buffer).
const WIRE_MAX: usize = 256 * 1024;

/// Acknowledge at least every this many consumed bytes (an ACK is 13 bytes).
const ACK_EVERY: u64 = 64 * 1024;

/// This side's settings for a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Largest DATA payload we accept (announced in the handshake).
    pub max_frame: u32,
    /// Most unacknowledged bytes the peer may send us (announced).
    pub window: u32,
    /// Send a PING after this long without sending anything.
    pub heartbeat: Duration,
    /// The leg is dead after this long without receiving anything.
    pub dead_peer_timeout: Duration,
    /// Acknowledge consumed bytes at most this late.
    pub ack_delay: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            max_frame: 64 * 1024,
            window: 4 << 20,
            heartbeat: Duration::from_secs(1),
            dead_peer_timeout: Duration::from_secs(3),
            ack_delay: Duration::from_millis(5),
        }
    }
}

/// What a peer's frame meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// The next bytes of the peer's stream.
    Data(Bytes),
    /// The peer confirmed our stream up to here (already applied to it).
    Acked(u64),
    /// The peer's stream ended at this offset.
    Fin(u64),
    /// The peer ended the session.
    Abort { code: ErrorCode, reason: String },
    /// Liveness only.
    Ping,
}

/// An established leg.
#[derive(Debug)]
pub struct Link {
    cfg: LinkConfig,
    peer_max_frame: u32,
    peer_window: u32,
    /// Bytes of the peer's stream received (on any leg).
    received: u64,
    /// The ACK value we last sent (bytes consumed, +1 once the FIN is).
    ack_sent: u64,
    /// When an ACK becomes due for bytes consumed but not acknowledged.
    ack_due: Option<Instant>,
    /// The peer's stream ends here.
    fin_in: Option<u64>,
    /// We sent our FIN at this offset.
    fin_out: Option<u64>,
    /// Our FIN was acknowledged.
    fin_out_acked: bool,
    last_rx: Instant,
    last_tx: Instant,
    /// Encoded frames waiting for the transport.
    wire: VecDeque<Bytes>,
    wire_bytes: usize,
}

impl Link {
    /// A link after the handshake. `received` is where the peer's stream
    /// resumes (what we told it we have); `peer_max_frame`/`peer_window` are
    /// its announced limits.
    pub fn new(
        cfg: LinkConfig,
        peer_max_frame: u32,
        peer_window: u32,
        received: u64,
        now: Instant,
    ) -> Link {
        Link {
            cfg,
            peer_max_frame,
            peer_window,
            received,
            ack_sent: received,
            ack_due: None,
            fin_in: None,
            fin_out: None,
            fin_out_acked: false,
            last_rx: now,
            last_tx: now,
            wire: VecDeque::new(),
            wire_bytes: 0,
        }
    }

    /// Bytes of the peer's stream received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn fin_in(&self) -> Option<u64> {
        self.fin_in
    }

    /// Both FINs sent and acknowledged: the session is complete.
    pub fn complete(&self) -> bool {
        self.fin_out_acked && self.fin_in.is_some_and(|f| self.ack_sent > f)
    }

    /// Handles one frame from the peer. `out` is the stream we send.
    pub fn on_frame(
        &mut self,
        frame: Frame,
        out: &mut Stream,
        now: Instant,
    ) -> Result<Incoming, ProtoError> {
        self.last_rx = now;
        match frame {
            Frame::Data(b) => {
                if let Some(f) = self.fin_in {
                    return Err(ProtoError::new(
                        ErrorCode::Malformed,
                        format!("DATA after the peer's FIN at {f}"),
                    ));
                }
                let n = b.len() as u64;
                if self.received + n - self.ack_sent.min(self.received) > u64::from(self.cfg.window)
                {
                    return Err(ProtoError::new(
                        ErrorCode::WindowExceeded,
                        format!(
                            "{} bytes unacknowledged, window {}",
                            self.received + n - self.ack_sent,
                            self.cfg.window
                        ),
                    ));
                }
                self.received += n;
                Ok(Incoming::Data(b))
            }
            Frame::Ack(o) => {
                let limit = out.sent() + u64::from(self.fin_out.is_some());
                if o < out.acked() || o > limit {
                    return Err(super::check_offset("ACK", o, out.acked(), limit).unwrap_err());
                }
                out.ack_to(o.min(out.sent()));
                if self.fin_out.is_some_and(|f| o > f) {
                    self.fin_out_acked = true;
                }
                Ok(Incoming::Acked(o))
            }
            Frame::Fin(o) => {
                if o != self.received || self.fin_in.is_some_and(|f| f != o) {
                    return Err(ProtoError::new(
                        ErrorCode::Malformed,
                        format!("FIN at {o}, but {} bytes were received", self.received),
                    ));
                }
                self.fin_in = Some(o);
                Ok(Incoming::Fin(o))
            }
            Frame::Abort { code, reason } => Ok(Incoming::Abort { code, reason }),
            Frame::Ping => Ok(Incoming::Ping),
            Frame::Hello(_) | Frame::Welcome(_) | Frame::Refuse { .. } => Err(ProtoError::new(
                ErrorCode::Malformed,
                "a handshake frame on an established leg",
            )),
        }
    }

    /// Queues what should go out now: an ACK for `consumed` (bytes of the
    /// peer's stream the caller has taken responsibility for) when due, DATA
    /// from `out` within the peer's window, our FIN once `out_fin` and all
    /// of `out` is queued, and a PING when idle.
    pub fn fill(&mut self, out: &mut Stream, out_fin: bool, consumed: u64, now: Instant) {
        // ACKs: batched, but never later than ack_delay, and at once for a FIN.
        let ack_target =
            consumed.min(self.received) + u64::from(self.fin_in.is_some_and(|f| consumed >= f));
        if ack_target > self.ack_sent {
            let due = *self.ack_due.get_or_insert(now + self.cfg.ack_delay);
            // Often enough that a sender bounded by less than our window
            // (holdfast's buffer_limit) never waits for the ack timer.
            let threshold = u64::from(self.cfg.window / 2).min(ACK_EVERY);
            if ack_target - self.ack_sent >= threshold
                || now >= due
                || ack_target > self.fin_in.unwrap_or(u64::MAX)
            {
                self.push_control(ty::ACK, ack_target);
                self.ack_sent = ack_target;
                self.ack_due = None;
            }
        }
        // DATA within the window, in one walk over the unsent chunks (a
        // search from `sent` per frame was quadratic in the chunks queued).
        let mut in_flight = out.sent() - out.acked();
        let mut taken = 0u64;
        'chunks: for mut chunk in out.buffer().chunks_after(out.sent()) {
            while !chunk.is_empty() {
                let room = u64::from(self.peer_window).saturating_sub(in_flight);
                if self.wire_bytes >= WIRE_MAX || room == 0 {
                    break 'chunks;
                }
                let take = chunk
                    .len()
                    .min(self.peer_max_frame as usize)
                    .min(room as usize);
                self.push(Bytes::copy_from_slice(&data_header(take)));
                self.push(chunk.split_to(take));
                in_flight += take as u64;
                taken += take as u64;
            }
        }
        out.on_sent(taken);
        // FIN after the last byte.
        if out_fin && self.fin_out.is_none() && out.sent() == out.read() {
            self.fin_out = Some(out.read());
            self.push_control(ty::FIN, out.read());
        }
        // Heartbeat.
        if self.wire.is_empty() && now >= self.last_tx + self.cfg.heartbeat {
            let mut b = BytesMut::with_capacity(5);
            b.put_u8(ty::PING);
            b.put_u32(0);
            self.push(b.freeze());
        }
    }

    /// Queues a frame this side decided on (ABORT).
    pub fn queue(&mut self, frame: &Frame) {
        let mut b = BytesMut::new();
        super::encode(frame, &mut b);
        self.push(b.freeze());
    }

    fn push_control(&mut self, t: u8, v: u64) {
        let mut b = BytesMut::with_capacity(13);
        b.put_u8(t);
        b.put_u32(8);
        b.put_u64(v);
        self.push(b.freeze());
    }

    fn push(&mut self, b: Bytes) {
        self.wire_bytes += b.len();
        if self.wire.capacity() == 0 {
            // A message's header and payload, or one control frame: room
            // for two, not the four a first push would make (an idle
            // session keeps the queue).
            self.wire.reserve_exact(2);
        }
        self.wire.push_back(b);
    }

    /// Encoded bytes waiting for the transport, for a vectored write.
    pub fn wire(&self, max: usize, out: &mut Vec<Bytes>) {
        out.extend(self.wire.iter().take(max).cloned());
    }

    /// The same as [`Link::wire`], as slices borrowing the queued frames
    /// (no `Bytes` clones). Returns how many slices of `out` it filled.
    pub fn wire_slices<'a>(&'a self, out: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, b) in out.iter_mut().zip(self.wire.iter()) {
            *slot = std::io::IoSlice::new(b);
            n += 1;
        }
        n
    }

    pub fn has_wire(&self) -> bool {
        !self.wire.is_empty()
    }

    /// `n` bytes of the queued wire went out.
    pub fn on_written(&mut self, mut n: usize, now: Instant) {
        if n > 0 {
            self.last_tx = now;
        }
        self.wire_bytes -= n;
        while n > 0 {
            let front = self.wire.front_mut().expect("written bytes were queued");
            if front.len() <= n {
                n -= front.len();
                self.wire.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// Whether the peer has been silent past the dead-peer timeout.
    pub fn peer_dead(&self, now: Instant) -> bool {
        now >= self.last_rx + self.cfg.dead_peer_timeout
    }

    /// The next time `fill` or `peer_dead` may change their answer.
    pub fn deadline(&self) -> Instant {
        let mut d =
            (self.last_rx + self.cfg.dead_peer_timeout).min(self.last_tx + self.cfg.heartbeat);
        if let Some(a) = self.ack_due {
            d = d.min(a);
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LinkConfig {
        LinkConfig {
            max_frame: 4096,
            window: 8192,
            heartbeat: Duration::from_millis(100),
            dead_peer_timeout: Duration::from_millis(300),
            ack_delay: Duration::from_millis(5),
        }
    }

    fn drain(link: &mut Link, now: Instant) -> Vec<Frame> {
        let mut chunks = Vec::new();
        link.wire(usize::MAX, &mut chunks);
        let mut buf = BytesMut::new();
        for c in &chunks {
            buf.extend_from_slice(c);
        }
        link.on_written(buf.len(), now);
        let d = super::super::Decoder::new(1 << 20);
        let mut frames = Vec::new();
        while let Some(f) = d.decode(&mut buf).unwrap() {
            frames.push(f);
        }
        frames
    }

    #[test]
    fn data_respects_window_and_frame_size() {
        let now = Instant::now();
        let mut out = Stream::new();
        out.push(Bytes::from(vec![1u8; 20_000]));
        let mut l = Link::new(cfg(), 3000, 7000, 0, now);
        l.fill(&mut out, false, 0, now);
        let frames = drain(&mut l, now);
        let sizes: Vec<usize> = frames
            .iter()
            .map(|f| match f {
                Frame::Data(b) => b.len(),
                _ => panic!("{f:?}"),
            })
            .collect();
        assert_eq!(sizes, vec![3000, 3000, 1000], "window 7000, frames of 3000");
        assert_eq!(out.sent(), 7000);
        // An ACK opens the window again.
        assert_eq!(
            l.on_frame(Frame::Ack(4000), &mut out, now),
            Ok(Incoming::Acked(4000))
        );
        assert_eq!(out.acked(), 4000);
        l.fill(&mut out, false, 0, now);
        assert_eq!(drain(&mut l, now).len(), 2);
        assert_eq!(out.sent(), 11_000);
    }

    #[test]
    fn acks_are_batched_and_timely() {
        let now = Instant::now();
        let mut out = Stream::new();
        let mut l = Link::new(cfg(), 4096, 8192, 0, now);
        let _ = l
            .on_frame(Frame::Data(Bytes::from(vec![0u8; 100])), &mut out, now)
            .unwrap();
        l.fill(&mut out, false, 100, now);
        assert!(drain(&mut l, now).is_empty(), "not yet due");
        let later = now + Duration::from_millis(5);
        l.fill(&mut out, false, 100, later);
        assert_eq!(drain(&mut l, later), vec![Frame::Ack(100)]);
        // Half the window at once: no waiting.
        let _ = l
            .on_frame(Frame::Data(Bytes::from(vec![0u8; 4096])), &mut out, later)
            .unwrap();
        l.fill(&mut out, false, 4196, later);
        assert_eq!(drain(&mut l, later), vec![Frame::Ack(4196)]);
    }

    #[test]
    fn fins_and_completion() {
        let now = Instant::now();
        let mut out = Stream::new();
        out.push(Bytes::from_static(b"abc"));
        out.set_fin();
        let mut l = Link::new(cfg(), 4096, 8192, 0, now);
        l.fill(&mut out, true, 0, now);
        assert_eq!(
            drain(&mut l, now),
            vec![Frame::Data(Bytes::from_static(b"abc")), Frame::Fin(3)]
        );
        let _ = l
            .on_frame(Frame::Data(Bytes::from_static(b"xy")), &mut out, now)
            .unwrap();
        assert_eq!(
            l.on_frame(Frame::Fin(2), &mut out, now),
            Ok(Incoming::Fin(2))
        );
        l.fill(&mut out, true, 2, now);
        assert_eq!(drain(&mut l, now), vec![Frame::Ack(3)], "FIN acked at once");
        assert!(!l.complete());
        l.on_frame(Frame::Ack(4), &mut out, now).unwrap();
        assert!(l.complete());
    }

    #[test]
    fn peer_errors() {
        let now = Instant::now();
        let mut out = Stream::new();
        out.push(Bytes::from_static(b"abc"));
        let mut l = Link::new(cfg(), 4096, 8192, 0, now);
        l.fill(&mut out, false, 0, now);
        drain(&mut l, now);
        // An ACK beyond what was sent.
        let e = l.on_frame(Frame::Ack(4), &mut out, now).unwrap_err();
        assert_eq!(e.code, ErrorCode::ImpossibleOffset);
        // A window overrun.
        let e = l
            .on_frame(Frame::Data(Bytes::from(vec![0u8; 9000])), &mut out, now)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::WindowExceeded);
        // A FIN at the wrong offset; DATA after FIN.
        let mut l = Link::new(cfg(), 4096, 8192, 0, now);
        assert!(l.on_frame(Frame::Fin(5), &mut out, now).is_err());
        l.on_frame(Frame::Fin(0), &mut out, now).unwrap();
        assert!(l
            .on_frame(Frame::Data(Bytes::from_static(b"x")), &mut out, now)
            .is_err());
    }

    #[test]
    fn heartbeats_and_dead_peers() {
        let now = Instant::now();
        let mut out = Stream::new();
        let mut l = Link::new(cfg(), 4096, 8192, 0, now);
        l.fill(&mut out, false, 0, now);
        assert!(drain(&mut l, now).is_empty());
        let t = now + Duration::from_millis(100);
        assert_eq!(l.deadline(), t);
        l.fill(&mut out, false, 0, t);
        assert_eq!(drain(&mut l, t), vec![Frame::Ping]);
        assert!(!l.peer_dead(now + Duration::from_millis(299)));
        assert!(l.peer_dead(now + Duration::from_millis(300)));
        l.on_frame(Frame::Ping, &mut out, now + Duration::from_millis(200))
            .unwrap();
        assert!(!l.peer_dead(now + Duration::from_millis(400)));
    }
}

#[path = "snapshot.rs"]
mod snapshot;
