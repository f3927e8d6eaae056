//! \[pure\] Snapshot encoding of a resume-protocol leg: the [`Link`] (its
//! settings, the peer's limits, offsets, FIN state, timers and the encoded
//! frames still waiting for the transport, as raw bytes) and the [`Hello`]
//! of a leg still in its handshake. Part of a session snapshot
//! (`session::core::snapshot` owns the layout); a child of `link.rs`, so it
//! reaches the link's private state.
//!
//! `Link`: max_frame, window, heartbeat, dead_peer_timeout, ack_delay (its
//! config), peer_max_frame, peer_window, received, ack_sent, ack_due,
//! fin_in, fin_out, fin_out_acked, last_rx, last_tx, then the wire chunks.
//! `Hello`: its fields in frame order, the token last.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Link, LinkConfig};
use crate::proto::{ClientAddr, Hello, TOKEN_LEN};
use crate::snapshot_codec::{Reader, Result, Writer};

impl ClientAddr {
    /// 0 unknown; 4 and an IPv4 address; 6 and an IPv6 address; then the port.
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        match self {
            ClientAddr::Unknown => w.u8(0),
            ClientAddr::Ip(IpAddr::V4(a), port) => {
                w.u8(4);
                w.raw(&a.octets());
                w.raw(&port.to_be_bytes());
            }
            ClientAddr::Ip(IpAddr::V6(a), port) => {
                w.u8(6);
                w.raw(&a.octets());
                w.raw(&port.to_be_bytes());
            }
        }
    }

    pub(crate) fn read_snapshot(r: &mut Reader<'_>, what: &str) -> Result<ClientAddr> {
        let ip = match r.u8(what)? {
            0 => return Ok(ClientAddr::Unknown),
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>(what)?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>(what)?)),
            t => return Err(r.error(format!("{what}: unknown address family {t}"))),
        };
        Ok(ClientAddr::Ip(ip, u16::from_be_bytes(r.array(what)?)))
    }
}

impl Hello {
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        w.u8(self.version_min);
        w.u8(self.version_max);
        w.bool(self.resume);
        w.raw(&self.session_id);
        w.u64(self.epoch);
        w.u64(self.recv_offset);
        w.u32(self.max_frame);
        w.u32(self.window);
        w.u32(self.heartbeat_ms);
        self.client.write_snapshot(w);
        w.raw(&self.token);
    }

    pub(crate) fn read_snapshot(r: &mut Reader<'_>, what: &str) -> Result<Hello> {
        Ok(Hello {
            version_min: r.u8(what)?,
            version_max: r.u8(what)?,
            resume: r.bool(what)?,
            session_id: r.array(what)?,
            epoch: r.u64(what)?,
            recv_offset: r.counter(what)?,
            max_frame: r.u32(what)?,
            window: r.u32(what)?,
            heartbeat_ms: r.u32(what)?,
            client: ClientAddr::read_snapshot(r, what)?,
            token: r.array::<TOKEN_LEN>(what)?,
        })
    }
}

impl Link {
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        let c = &self.cfg;
        w.u32(c.max_frame);
        w.u32(c.window);
        w.duration(c.heartbeat);
        w.duration(c.dead_peer_timeout);
        w.duration(c.ack_delay);
        w.u32(self.peer_max_frame);
        w.u32(self.peer_window);
        w.u64(self.received);
        w.u64(self.ack_sent);
        w.option(self.ack_due, |w, t| w.instant(t));
        w.option(self.fin_in, |w, f| w.u64(f));
        w.option(self.fin_out, |w, f| w.u64(f));
        w.bool(self.fin_out_acked);
        w.instant(self.last_rx);
        w.instant(self.last_tx);
        w.usize(self.wire.len());
        for b in &self.wire {
            w.bytes(b);
        }
    }

    /// Fails unless the offsets agree: the ACK sent is at most what was
    /// received (plus one for the peer's FIN), which ends at `received`.
    pub(crate) fn read_snapshot(r: &mut Reader<'_>, what: &str) -> Result<Link> {
        let cfg = LinkConfig {
            max_frame: r.u32(what)?,
            window: r.u32(what)?,
            heartbeat: r.duration(what)?,
            dead_peer_timeout: r.duration(what)?,
            ack_delay: r.duration(what)?,
        };
        let peer_max_frame = r.u32(what)?;
        let peer_window = r.u32(what)?;
        let received = r.counter(what)?;
        let ack_sent = r.counter(what)?;
        let ack_due = r.option(what, |r| r.instant(what))?;
        let fin_in = r.option(what, |r| r.counter(what))?;
        let fin_out = r.option(what, |r| r.counter(what))?;
        let fin_out_acked = r.bool(what)?;
        let last_rx = r.instant(what)?;
        let last_tx = r.instant(what)?;
        let n = r.count(1, what)?;
        let mut wire = VecDeque::with_capacity(n);
        let mut wire_bytes = 0;
        for _ in 0..n {
            let b = r.bytes(what)?;
            wire_bytes += b.len();
            wire.push_back(b);
        }
        r.check(fin_in.map_or(true, |f| f == received), || {
            format!("{what}: the peer's FIN at {fin_in:?}, {received} bytes received")
        })?;
        r.check(ack_sent <= received + u64::from(fin_in.is_some()), || {
            format!("{what}: ACK {ack_sent} sent past {received} bytes received")
        })?;
        r.check(!fin_out_acked || fin_out.is_some(), || {
            format!("{what}: our FIN acknowledged but never sent")
        })?;
        Ok(Link {
            cfg,
            peer_max_frame,
            peer_window,
            received,
            ack_sent,
            ack_due,
            fin_in,
            fin_out,
            fin_out_acked,
            last_rx,
            last_tx,
            wire,
            wire_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::proto::{Decoder, Frame};
    use crate::stream::Stream;

    fn snapshot<T>(v: &T, now: Instant, write: impl Fn(&T, &mut Writer)) -> Vec<u8> {
        let mut out = Vec::new();
        write(v, &mut Writer::new(&mut out, now));
        out
    }

    /// Reads `bytes` back (at `now`), and checks that every truncation fails.
    fn read<T>(bytes: &[u8], now: Instant, read: impl Fn(&mut Reader) -> Result<T>) -> T {
        for len in 0..bytes.len() {
            let mut r = Reader::new(&bytes[..len], now);
            assert!(
                read(&mut r).and_then(|_| r.finish()).is_err(),
                "cut at {len}"
            );
        }
        let mut r = Reader::new(bytes, now);
        let v = read(&mut r).unwrap();
        r.finish().unwrap();
        v
    }

    fn wire(link: &Link) -> Vec<Bytes> {
        let mut out = Vec::new();
        link.wire(usize::MAX, &mut out);
        out
    }

    fn frames(link: &mut Link, now: Instant) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        for c in wire(link) {
            buf.extend_from_slice(&c);
        }
        link.on_written(buf.len(), now);
        let d = Decoder::new(1 << 20);
        let mut frames = Vec::new();
        while let Some(f) = d.decode(&mut buf).unwrap() {
            frames.push(f);
        }
        frames
    }

    #[test]
    fn hellos_round_trip() {
        let now = Instant::now();
        for client in [
            ClientAddr::Unknown,
            ClientAddr::Ip(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 4567),
            ClientAddr::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST), 443),
        ] {
            let mut h = Hello {
                version_min: 1,
                version_max: 1,
                resume: true,
                session_id: 42u128.to_be_bytes(),
                epoch: 3,
                recv_offset: 1234,
                max_frame: 4096,
                window: 1 << 16,
                heartbeat_ms: 100,
                client,
                token: [0; 32],
            };
            let _ = h.encode(&[7; 32]);
            let bytes = snapshot(&h, now, Hello::write_snapshot);
            let back = read(&bytes, now, |r| Hello::read_snapshot(r, "hello"));
            assert_eq!(back, h);
            assert!(back.verify(&[7; 32]), "the token survives");
        }
    }

    #[test]
    fn links_round_trip_and_go_on_alike() {
        let t0 = Instant::now();
        let cfg = LinkConfig {
            max_frame: 4096,
            window: 8192,
            heartbeat: Duration::from_millis(100),
            dead_peer_timeout: Duration::from_millis(300),
            ack_delay: Duration::from_millis(5),
        };
        let mut out = Stream::new();
        out.push(Bytes::from(vec![1u8; 10_000]));
        out.set_fin();
        let mut l = Link::new(cfg, 3000, 7000, 17, t0);
        let now = t0 + Duration::from_millis(2);
        l.on_frame(Frame::Data(Bytes::from_static(b"abc")), &mut out, now)
            .unwrap();
        l.fill(&mut out, true, 19, now);
        assert!(l.has_wire(), "frames waiting for the transport");
        // Exported at `now`, imported one second later: the timers move along.
        let bytes = snapshot(&l, now, Link::write_snapshot);
        let later = now + Duration::from_secs(1);
        let mut back = read(&bytes, later, |r| Link::read_snapshot(r, "link"));
        assert_eq!(wire(&back), wire(&l));
        assert_eq!(back.received(), 20);
        assert_eq!(back.deadline(), l.deadline() + Duration::from_secs(1));
        assert_eq!(snapshot(&back, later, Link::write_snapshot), bytes);
        // Both go on alike: the same frames, acks and FINs.
        let mut out2 = out.clone();
        let d = Duration::from_millis(10);
        assert_eq!(frames(&mut l, now + d), frames(&mut back, later + d));
        l.on_frame(Frame::Ack(7000), &mut out, now + d).unwrap();
        back.on_frame(Frame::Ack(7000), &mut out2, later + d)
            .unwrap();
        l.fill(&mut out, true, 20, now + d);
        back.fill(&mut out2, true, 20, later + d);
        assert_eq!(frames(&mut l, now + d), frames(&mut back, later + d));
        assert_eq!(out.sent(), out2.sent());
    }

    #[test]
    fn inconsistent_links_are_refused() {
        let now = Instant::now();
        let l = Link::new(LinkConfig::default(), 4096, 8192, 5, now);
        let good = snapshot(&l, now, Link::write_snapshot);
        let mut r = Reader::new(&good, now);
        Link::read_snapshot(&mut r, "link").unwrap();
        // ack_sent (the byte after received) set past received + 1.
        let mut bad = good.clone();
        let at = good.windows(2).position(|w| w == [5, 5]).unwrap();
        bad[at + 1] = 7;
        let mut r = Reader::new(&bad, now);
        assert!(Link::read_snapshot(&mut r, "link").is_err());
        // An unknown address family.
        let mut r = Reader::new(&[9, 0, 0], now);
        assert!(ClientAddr::read_snapshot(&mut r, "client").is_err());
    }
}
