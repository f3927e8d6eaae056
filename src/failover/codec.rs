//! The replication stream's records and their byte format: what the active
//! tells the standby about each session, after the link's handshake
//! ([`super::link`]). Pure: no sockets, no clock.
//!
//! Every record is a 29-byte header and a payload, big-endian:
//!
//! ```text
//! type u8 | session id u128 (0 for a heartbeat) | value u64 | payload length u32 | payload
//! ```
//!
//! | type | record | value | payload |
//! |---|---|---|---|
//! | 1 | `Session` | 0 | up and down offsets the data that follows starts at (u64 each), kernel state (40 B), client and local address, listener and backend name |
//! | 2 | `Read` | up offset of the first byte | the client bytes holdfast read |
//! | 3 | `Written` | down offset of the first byte | the bytes holdfast wrote to the client |
//! | 4 | `ClientAcked` | down offset the client's TCP acknowledged | snd_wnd, rcv_wnd, TCP timestamp clock (u32 each) |
//! | 5 | `ServerAcked` | up offset the server confirmed (the replay position) | none |
//! | 6 | `Closed` | 0 | none |
//! | 7 | `Heartbeat` | sequence number | none |
//! | 8 | `Synced` | down offset written so far | none |
//!
//! `Written` and `ServerAcked` records are staged by the standby and take
//! effect together at the next `Synced`: a response and the acknowledgement
//! of the request it answers become one step, so a link cut between them
//! can neither make a standby re-send an answer and replay its request
//! (a duplicate) nor skip a request whose answer it lacks.
//!
//! Addresses are `family u8 (4 or 6) | ip | port u16`; names are
//! `length u8 | utf-8`. The decoder returns `Ok(None)` until a whole record
//! is buffered and never reads past one; payloads are split off without a
//! copy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::repair::{KernelState, ENCODED_LEN};
use crate::session::SessionId;

pub const HEADER_LEN: usize = 29;
/// Largest payload of a `Read` or `Written` record; the encoder of a
/// sender splits larger chunks.
pub const MAX_DATA: usize = 256 * 1024;
/// Largest payload of any other record.
const MAX_CONTROL: usize = 1024;

mod ty {
    pub const SESSION: u8 = 1;
    pub const READ: u8 = 2;
    pub const WRITTEN: u8 = 3;
    pub const CLIENT_ACKED: u8 = 4;
    pub const SERVER_ACKED: u8 = 5;
    pub const CLOSED: u8 = 6;
    pub const HEARTBEAT: u8 = 7;
    pub const SYNCED: u8 = 8;
}

/// A new client connection, as the active accepted and captured it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub id: SessionId,
    pub listener: String,
    pub backend: String,
    /// The client's address (the restored socket's peer).
    pub client: SocketAddr,
    /// The address the client connected to (the service address and port).
    pub local: SocketAddr,
    pub state: KernelState,
    /// Where the `Read` records that follow start: 0 for a new connection;
    /// the server-acked offset when the active re-sends a live session to a
    /// standby that (re)connected.
    pub read_from: u64,
    /// Where the `Written` records that follow start: 0, or the
    /// client-acked offset on a re-send.
    pub written_from: u64,
}

/// One record of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Session(Box<NewSession>),
    /// Client bytes holdfast read, from up offset `offset`. Sent before (or
    /// with) forwarding them: the client's TCP may see them acknowledged.
    Read {
        id: SessionId,
        offset: u64,
        data: Bytes,
    },
    /// Bytes holdfast wrote to the client, from down offset `offset`. Sent
    /// before writing them: the standby must be able to re-send them.
    Written {
        id: SessionId,
        offset: u64,
        data: Bytes,
    },
    /// The client's TCP acknowledged down bytes up to `offset` (written −
    /// SIOCOUTQ), with the latest windows and timestamp clock (`tcp_info`,
    /// `TCP_TIMESTAMP`, no pause).
    ClientAcked {
        id: SessionId,
        offset: u64,
        snd_wnd: u32,
        rcv_wnd: u32,
        timestamp: u32,
    },
    /// The server confirmed up bytes up to `offset`: a standby's new leg
    /// replays from here.
    ServerAcked {
        id: SessionId,
        offset: u64,
    },
    Closed {
        id: SessionId,
    },
    Heartbeat {
        seq: u64,
    },
    /// The `Written` and `ServerAcked` records since the last `Synced` take
    /// effect together; `offset` is where the written bytes end.
    Synced {
        id: SessionId,
        offset: u64,
    },
}

/// A record the decoder refuses; the link is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replication record: {0}")]
pub struct CodecError(pub String);

fn bad(msg: impl Into<String>) -> CodecError {
    CodecError(msg.into())
}

fn header(out: &mut BytesMut, t: u8, id: SessionId, value: u64, len: usize) {
    out.reserve(HEADER_LEN + len);
    out.put_u8(t);
    out.put_u128(id.0);
    out.put_u64(value);
    out.put_u32(len as u32);
}

fn put_addr(out: &mut BytesMut, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(4);
            out.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(6);
            out.put_slice(&ip.octets());
        }
    }
    out.put_u16(a.port());
}

fn put_name(out: &mut BytesMut, s: &str) {
    // Names are config names (validated, short); cut at 255 bytes anyway.
    let b = &s.as_bytes()[..s.len().min(255)];
    out.put_u8(b.len() as u8);
    out.put_slice(b);
}

/// Appends `r` to `out`. `Read`/`Written` data must be at most
/// [`MAX_DATA`] bytes (and not empty): the sender splits.
pub fn encode(r: &Record, out: &mut BytesMut) {
    match r {
        Record::Session(s) => {
            let mut p = BytesMut::with_capacity(128);
            p.put_u64(s.read_from);
            p.put_u64(s.written_from);
            p.put_slice(&s.state.encode());
            put_addr(&mut p, &s.client);
            put_addr(&mut p, &s.local);
            put_name(&mut p, &s.listener);
            put_name(&mut p, &s.backend);
            header(out, ty::SESSION, s.id, 0, p.len());
            out.put_slice(&p);
        }
        Record::Read { id, offset, data } | Record::Written { id, offset, data } => {
            debug_assert!(!data.is_empty() && data.len() <= MAX_DATA);
            let t = if matches!(r, Record::Read { .. }) {
                ty::READ
            } else {
                ty::WRITTEN
            };
            header(out, t, *id, *offset, data.len());
            out.put_slice(data);
        }
        Record::ClientAcked {
            id,
            offset,
            snd_wnd,
            rcv_wnd,
            timestamp,
        } => {
            header(out, ty::CLIENT_ACKED, *id, *offset, 12);
            out.put_u32(*snd_wnd);
            out.put_u32(*rcv_wnd);
            out.put_u32(*timestamp);
        }
        Record::ServerAcked { id, offset } => header(out, ty::SERVER_ACKED, *id, *offset, 0),
        Record::Closed { id } => header(out, ty::CLOSED, *id, 0, 0),
        Record::Heartbeat { seq } => header(out, ty::HEARTBEAT, SessionId(0), *seq, 0),
        Record::Synced { id, offset } => header(out, ty::SYNCED, *id, *offset, 0),
    }
}

/// Decodes one record from the front of `buf`, or `Ok(None)` when more
/// bytes are needed (nothing is consumed then).
pub fn decode(buf: &mut BytesMut) -> Result<Option<Record>, CodecError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let t = buf[0];
    let id = SessionId(u128::from_be_bytes(
        buf[1..17].try_into().expect("16 bytes"),
    ));
    let value = u64::from_be_bytes(buf[17..25].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(buf[25..29].try_into().expect("4 bytes")) as usize;
    let (min, max) = match t {
        ty::SESSION => (16 + ENCODED_LEN + 2 * 7 + 2, MAX_CONTROL),
        ty::READ | ty::WRITTEN => (1, MAX_DATA),
        ty::CLIENT_ACKED => (12, 12),
        ty::SERVER_ACKED | ty::CLOSED | ty::HEARTBEAT | ty::SYNCED => (0, 0),
        other => return Err(bad(format!("unknown record type {other}"))),
    };
    if len < min || len > max {
        return Err(bad(format!(
            "record type {t} with a payload of {len} bytes (allowed {min} to {max})"
        )));
    }
    if (t == ty::HEARTBEAT) != (id.0 == 0) {
        return Err(bad(format!("record type {t} with session id {id}")));
    }
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let mut p = buf.split_to(len);
    let r = match t {
        ty::SESSION => Record::Session(Box::new(session(id, &mut p)?)),
        ty::READ => Record::Read {
            id,
            offset: value,
            data: p.freeze(),
        },
        ty::WRITTEN => Record::Written {
            id,
            offset: value,
            data: p.freeze(),
        },
        ty::CLIENT_ACKED => Record::ClientAcked {
            id,
            offset: value,
            snd_wnd: p.get_u32(),
            rcv_wnd: p.get_u32(),
            timestamp: p.get_u32(),
        },
        ty::SERVER_ACKED => Record::ServerAcked { id, offset: value },
        ty::CLOSED => Record::Closed { id },
        ty::SYNCED => Record::Synced { id, offset: value },
        _ => Record::Heartbeat { seq: value },
    };
    Ok(Some(r))
}

fn session(id: SessionId, p: &mut BytesMut) -> Result<NewSession, CodecError> {
    let read_from = p.get_u64();
    let written_from = p.get_u64();
    let state: [u8; ENCODED_LEN] = p[..ENCODED_LEN].try_into().expect("length checked");
    let state = KernelState::decode(&state).ok_or_else(|| bad("kernel state out of range"))?;
    p.advance(ENCODED_LEN);
    let client = get_addr(p)?;
    let local = get_addr(p)?;
    let listener = get_name(p)?;
    let backend = get_name(p)?;
    if !p.is_empty() {
        return Err(bad(format!("{} bytes after a session record", p.len())));
    }
    Ok(NewSession {
        id,
        listener,
        backend,
        client,
        local,
        state,
        read_from,
        written_from,
    })
}

fn get_addr(p: &mut BytesMut) -> Result<SocketAddr, CodecError> {
    let short = || bad("short address");
    let family = *p.first().ok_or_else(short)?;
    let ip_len = match family {
        4 => 4,
        6 => 16,
        other => return Err(bad(format!("address family {other}"))),
    };
    if p.len() < 1 + ip_len + 2 {
        return Err(short());
    }
    p.advance(1);
    let ip = if family == 4 {
        IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(&p[..4]).expect("4 bytes"),
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(&p[..16]).expect("16 bytes"),
        ))
    };
    p.advance(ip_len);
    Ok(SocketAddr::new(ip, p.get_u16()))
}

fn get_name(p: &mut BytesMut) -> Result<String, CodecError> {
    let len = *p.first().ok_or_else(|| bad("missing name"))? as usize;
    if p.len() < 1 + len {
        return Err(bad("short name"));
    }
    p.advance(1);
    let name = p.split_to(len);
    String::from_utf8(name.to_vec()).map_err(|_| bad("name is not utf-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::repair::TcpOptions;
    use crate::failover::RepairWindow;

    fn records() -> Vec<Record> {
        let id = SessionId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        vec![
            Record::Session(Box::new(NewSession {
                id,
                listener: "orders".into(),
                backend: "orders-db".into(),
                client: "10.77.0.10:40000".parse().unwrap(),
                local: "[2001:db8::1]:7000".parse().unwrap(),
                state: KernelState {
                    send_seq: 1,
                    recv_seq: u32::MAX,
                    mss_clamp: 1460,
                    options: TcpOptions {
                        timestamps: true,
                        sack: true,
                        wscale: Some((7, 7)),
                    },
                    window: RepairWindow {
                        snd_wl1: 1,
                        snd_wnd: 65535,
                        max_window: 65535,
                        rcv_wnd: 65483,
                        rcv_wup: 1,
                    },
                    timestamp: 123_456,
                },
                read_from: 0,
                written_from: 1 << 40,
            })),
            Record::Read {
                id,
                offset: 0,
                data: Bytes::from_static(b"GET 1\n"),
            },
            Record::Written {
                id,
                offset: u64::MAX - 3,
                data: Bytes::from_static(b"ok"),
            },
            Record::ClientAcked {
                id,
                offset: 2,
                snd_wnd: 1 << 20,
                rcv_wnd: 3,
                timestamp: 99,
            },
            Record::ServerAcked { id, offset: 6 },
            Record::Closed { id },
            Record::Heartbeat { seq: 42 },
            Record::Synced { id, offset: 9 },
        ]
    }

    #[test]
    fn every_record_round_trips_fed_one_byte_at_a_time() {
        let want = records();
        let mut wire = BytesMut::new();
        for r in &want {
            encode(r, &mut wire);
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            let before = buf.len();
            match decode(&mut buf).unwrap() {
                Some(r) => got.push(r),
                None => assert_eq!(buf.len(), before, "nothing consumed on None"),
            }
        }
        assert!(buf.is_empty());
        assert_eq!(got, want);
    }

    #[test]
    fn a_buffer_of_many_records_decodes_in_order_and_keeps_the_rest() {
        let want = records();
        let mut wire = BytesMut::new();
        for r in &want {
            encode(r, &mut wire);
        }
        wire.put_slice(&[ty::READ, 0]); // the start of the next record
        let mut got = Vec::new();
        while let Some(r) = decode(&mut wire).unwrap() {
            got.push(r);
        }
        assert_eq!(got, want);
        assert_eq!(&wire[..], &[ty::READ, 0]);
    }

    fn raw(t: u8, id: u128, len: u32, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(t);
        b.put_u128(id);
        b.put_u64(0);
        b.put_u32(len);
        b.put_slice(payload);
        b
    }

    #[test]
    fn refuses_malformed_records() {
        for (buf, want) in [
            (raw(9, 1, 0, &[]), "unknown record type 9"),
            (raw(ty::READ, 1, 0, &[]), "payload of 0 bytes"),
            (
                raw(ty::READ, 1, MAX_DATA as u32 + 1, &[]),
                "payload of 262145 bytes",
            ),
            (
                raw(ty::CLIENT_ACKED, 1, 11, &[0; 11]),
                "payload of 11 bytes",
            ),
            (raw(ty::CLOSED, 1, 1, &[0]), "payload of 1 bytes"),
            (raw(ty::HEARTBEAT, 1, 0, &[]), "session id"),
            (raw(ty::CLOSED, 0, 0, &[]), "session id"),
        ] {
            let err = decode(&mut buf.clone()).unwrap_err();
            assert!(err.0.contains(want), "{err} should say {want}");
        }
        // A session record whose kernel state a kernel would refuse.
        let mut wire = BytesMut::new();
        encode(&records()[0], &mut wire);
        wire[HEADER_LEN + 16 + 12] = 0xff;
        assert!(decode(&mut wire).unwrap_err().0.contains("kernel state"));
        // Trailing bytes inside a session record.
        let mut wire = BytesMut::new();
        encode(&records()[0], &mut wire);
        let len = u32::from_be_bytes(wire[25..29].try_into().unwrap()) + 1;
        wire[25..29].copy_from_slice(&len.to_be_bytes());
        wire.put_u8(0);
        assert!(decode(&mut wire)
            .unwrap_err()
            .0
            .contains("after a session record"));
    }
}
