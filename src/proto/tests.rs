//! The resume protocol's codec and handshake: round trips, the worked
//! example of docs/protocol.md byte for byte, every handshake error, and
//! decoding split at every byte.

use std::net::{IpAddr, Ipv4Addr};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

const KEY: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = i as u8;
        i += 1;
    }
    k
};
const SID: [u8; 16] = [
    0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x00,
];

fn hello() -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        resume: false,
        session_id: SID,
        epoch: 0,
        recv_offset: 0,
        max_frame: 65536,
        window: 1 << 20,
        heartbeat_ms: 1000,
        client: ClientAddr::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 40000),
        token: [0; 32],
    }
}

fn welcome(recv_offset: u64, resumed: bool) -> Welcome {
    Welcome {
        version: 1,
        resumed,
        restored: false,
        session_id: SID,
        recv_offset,
        max_frame: 65536,
        window: 1 << 20,
        heartbeat_ms: 1000,
        token: [0; 32],
    }
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, ProtoError> {
    let d = Decoder::new(65536);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = d.decode(&mut buf)? {
        out.push(f);
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(out)
}

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// docs/protocol.md §6, byte for byte.
#[test]
fn worked_example_bytes() {
    let mut h = hello();
    let frame = h.encode(&KEY);
    let want_head = hex("01 00 00 00 5b 48 46 52 50 01 01 00 00
         11 22 33 44 55 66 77 88 99 aa bb cc dd ee ff 00
         00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
         00 01 00 00 00 10 00 00 00 00 03 e8
         04 c0 00 02 0a 9c 40");
    assert_eq!(&frame[..want_head.len()], &want_head[..]);
    assert_eq!(frame.len(), want_head.len() + 32);
    assert_eq!(&frame[want_head.len()..], &h.token);
    // The token is the HMAC of the context and the 59 bytes before it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&KEY).unwrap();
    mac.update(b"HFRP/1 HELLO");
    mac.update(&frame[5..5 + 59]);
    assert_eq!(&mac.finalize().into_bytes()[..], &h.token);

    let mut w = welcome(0, false);
    let frame = w.encode(&KEY, &h.token);
    let want = hex("02 00 00 00 48 01 00 00 00
         11 22 33 44 55 66 77 88 99 aa bb cc dd ee ff 00
         00 00 00 00 00 00 00 00
         00 01 00 00 00 10 00 00 00 00 03 e8");
    assert_eq!(&frame[..want.len()], &want[..]);
    assert_eq!(frame.len(), want.len() + 32);

    let mut out = BytesMut::new();
    encode(&Frame::Data(Bytes::from_static(b"hello\n")), &mut out);
    assert_eq!(&out[..], &hex("10 00 00 00 06 68 65 6c 6c 6f 0a")[..]);
    out.clear();
    encode(&Frame::Ack(6), &mut out);
    assert_eq!(&out[..], &hex("11 00 00 00 08 00 00 00 00 00 00 00 06")[..]);
    out.clear();
    encode(&Frame::Data(Bytes::from_static(b"ok2\n")), &mut out);
    assert_eq!(&out[..], &hex("10 00 00 00 04 6f 6b 32 0a")[..]);

    // Step 4: the resume. The acceptor's down stream has acked 0, sent 7:
    // the initiator's recv_offset 3 is possible; its up stream has acked 6,
    // sent 12: the acceptor's recv_offset 12 is possible.
    let mut h2 = hello();
    h2.resume = true;
    h2.epoch = 1;
    h2.recv_offset = 3;
    let f = h2.encode(&KEY);
    assert_eq!(f[5 + 6], 1, "flags RESUME");
    assert_eq!(h2.check(&KEY), Ok(1));
    check_offset("recv_offset", h2.recv_offset, 0, 7).unwrap();
    let mut w2 = welcome(12, true);
    w2.encode(&KEY, &h2.token);
    w2.check(&KEY, &h2, 6, 12).unwrap();
}

#[test]
fn every_frame_round_trips() {
    let mut h = hello();
    let mut bytes = BytesMut::new();
    bytes.extend_from_slice(&h.encode(&KEY));
    let mut w = welcome(5, false);
    bytes.extend_from_slice(&w.encode(&KEY, &h.token));
    let frames = vec![
        Frame::Refuse {
            code: ErrorCode::StaleEpoch,
            reason: "epoch 3 is not above 4".into(),
        },
        Frame::Data(Bytes::from(vec![7u8; 5000])),
        Frame::Ack(u64::MAX),
        Frame::Fin(42),
        Frame::Abort {
            code: ErrorCode::Other(999),
            reason: "bye ☃".into(),
        },
        Frame::Ping,
    ];
    for f in &frames {
        encode(f, &mut bytes);
    }
    let got = decode_all(&bytes).unwrap();
    assert_eq!(got[0], Frame::Hello(h));
    assert_eq!(got[1], Frame::Welcome(w));
    assert_eq!(&got[2..], &frames[..]);
}

#[test]
fn ipv6_and_unknown_client_addresses() {
    for client in [
        ClientAddr::Unknown,
        ClientAddr::Ip("2001:db8::1".parse().unwrap(), 443),
    ] {
        let mut h = hello();
        h.client = client;
        let f = h.encode(&KEY);
        let got = decode_all(&f).unwrap();
        assert_eq!(got, vec![Frame::Hello(h.clone())]);
        assert!(h.verify(&KEY));
    }
}

/// Any split of a stream of frames decodes to the same frames.
#[test]
fn decoding_split_at_every_byte() {
    let mut h = hello();
    let mut bytes = BytesMut::new();
    bytes.extend_from_slice(&h.encode(&KEY));
    encode(&Frame::Data(Bytes::from_static(b"abcdef")), &mut bytes);
    encode(&Frame::Ack(3), &mut bytes);
    encode(&Frame::Ping, &mut bytes);
    encode(&Frame::Fin(6), &mut bytes);
    let want = decode_all(&bytes).unwrap();
    let d = Decoder::new(65536);
    // One byte at a time.
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in bytes.iter() {
        buf.extend_from_slice(&[*b]);
        while let Some(f) = d.decode(&mut buf).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, want);
    // Two pieces, split everywhere.
    for cut in 0..=bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        let mut got = Vec::new();
        while let Some(f) = d.decode(&mut buf).unwrap() {
            got.push(f);
        }
        buf.extend_from_slice(&bytes[cut..]);
        while let Some(f) = d.decode(&mut buf).unwrap() {
            got.push(f);
        }
        assert_eq!(got, want, "cut at {cut}");
    }
}

#[test]
fn handshake_errors_have_their_codes() {
    let key2 = [9u8; 32];
    // Wrong magic.
    let mut h = hello();
    let mut f = BytesMut::from(&h.encode(&KEY)[..]);
    f[5] = b'X';
    assert_eq!(decode_all(&f).unwrap_err().code, ErrorCode::BadMagic);
    // Unknown versions; otherwise the highest common one.
    let mut h = hello();
    h.version_min = 3;
    h.version_max = 4;
    h.encode(&KEY);
    assert_eq!(
        h.check(&KEY).unwrap_err().code,
        ErrorCode::UnsupportedVersion
    );
    for ((min, max), chosen) in [((1, 1), 1), ((1, 2), 2), ((2, 3), 2), ((1, 9), 2)] {
        let mut h = hello();
        (h.version_min, h.version_max) = (min, max);
        h.encode(&KEY);
        assert_eq!(h.check(&KEY).unwrap(), chosen, "{min}..={max}");
    }
    // Bad token: another key, or a field changed after signing.
    let mut h = hello();
    h.encode(&KEY);
    assert_eq!(h.check(&key2).unwrap_err().code, ErrorCode::BadToken);
    h.recv_offset = 1;
    assert_eq!(h.check(&KEY).unwrap_err().code, ErrorCode::BadToken);
    // A new session with an epoch or offset.
    let mut h = hello();
    h.epoch = 1;
    h.encode(&KEY);
    assert_eq!(h.check(&KEY).unwrap_err().code, ErrorCode::Malformed);
    // Limits.
    let mut h = hello();
    h.max_frame = 10;
    h.encode(&KEY);
    assert_eq!(h.check(&KEY).unwrap_err().code, ErrorCode::Malformed);
    let mut h = hello();
    h.window = 1000;
    h.encode(&KEY);
    assert_eq!(h.check(&KEY).unwrap_err().code, ErrorCode::Malformed);
    // Impossible offsets, both ways.
    let e = check_offset("recv_offset", 8, 0, 7).unwrap_err();
    assert_eq!(e.code, ErrorCode::ImpossibleOffset);
    assert!(e.detail.contains("8 is outside 0..=7"), "{e}");
    assert!(check_offset("recv_offset", 2, 3, 7).is_err());
    let mut h = hello();
    h.resume = true;
    h.epoch = 4;
    h.encode(&KEY);
    let mut w = welcome(100, true);
    w.encode(&KEY, &h.token);
    assert_eq!(
        w.check(&KEY, &h, 0, 50).unwrap_err().code,
        ErrorCode::ImpossibleOffset
    );
    // A WELCOME made for another HELLO does not verify.
    let mut other = hello();
    other.epoch = 0;
    other.encode(&key2);
    let mut w = welcome(0, false);
    w.encode(&KEY, &other.token);
    assert_eq!(
        w.check(&KEY, &h, 0, 0).unwrap_err().code,
        ErrorCode::BadToken
    );
}

#[test]
fn oversize_and_truncated_frames() {
    let d = Decoder::new(2048);
    // DATA over max_frame: refused from the header alone.
    let mut buf = BytesMut::from(&data_header(4096)[..]);
    let e = d.decode(&mut buf).unwrap_err();
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    // A handshake over 1024 bytes.
    let mut buf = BytesMut::from(&[ty::HELLO, 0, 0, 8, 0][..]);
    assert_eq!(
        d.decode(&mut buf).unwrap_err().code,
        ErrorCode::FrameTooLarge
    );
    // ACK with a wrong length.
    let mut buf = BytesMut::from(&[ty::ACK, 0, 0, 0, 4, 0, 0, 0, 1][..]);
    assert_eq!(d.decode(&mut buf).unwrap_err().code, ErrorCode::Malformed);
    // Unknown type.
    let mut buf = BytesMut::from(&[0x7f, 0, 0, 0, 0][..]);
    assert_eq!(d.decode(&mut buf).unwrap_err().code, ErrorCode::Malformed);
    // Truncated: need more, never an error or a panic.
    let mut h = hello();
    let f = h.encode(&KEY);
    for cut in 0..f.len() {
        let mut buf = BytesMut::from(&f[..cut]);
        assert_eq!(d.decode(&mut buf), Ok(None), "cut at {cut}");
    }
    // A HELLO whose token is cut short inside a complete frame.
    let mut short = BytesMut::from(&f[..f.len() - 1]);
    short[4] -= 1;
    assert_eq!(d.decode(&mut short).unwrap_err().code, ErrorCode::Malformed);
    // Empty DATA.
    let mut buf = BytesMut::from(&data_header(0)[..]);
    assert_eq!(d.decode(&mut buf).unwrap_err().code, ErrorCode::Malformed);
}

#[test]
fn data_payloads_are_not_copied() {
    let mut buf = BytesMut::new();
    encode(&Frame::Data(Bytes::from(vec![1u8; 3000])), &mut buf);
    let base = buf.as_ptr();
    let Some(Frame::Data(b)) = Decoder::new(4096).decode(&mut buf).unwrap() else {
        panic!("data");
    };
    assert_eq!(b.as_ptr(), base.wrapping_add(HEADER_LEN));
}

proptest! {
    /// Garbage never panics, whatever the split.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..300) {
        let d = Decoder::new(1024);
        let cut = cut.min(bytes.len());
        let mut buf = BytesMut::from(&bytes[..cut]);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return Ok(()),
            }
        }
        buf.extend_from_slice(&bytes[cut..]);
        while let Ok(Some(_)) = d.decode(&mut buf) {}
    }

    /// Random HELLOs round-trip and verify.
    #[test]
    fn hellos_round_trip(epoch: u64, recv in any::<u64>(), resume: bool, max_frame in 1024u32..=(16 << 20), hb: u32) {
        let mut h = hello();
        h.epoch = epoch;
        h.recv_offset = recv;
        h.resume = resume;
        h.max_frame = max_frame;
        h.window = max_frame;
        h.heartbeat_ms = hb;
        let f = h.encode(&KEY);
        let got = decode_all(&f).unwrap();
        prop_assert_eq!(&got, &vec![Frame::Hello(h.clone())]);
        prop_assert!(h.verify(&KEY));
    }
}

#[test]
fn reserved_bytes_must_be_zero() {
    let mut h = hello();
    let mut f = BytesMut::from(&h.encode(&KEY)[..]);
    f[5 + 7] = 1;
    assert_eq!(decode_all(&f).unwrap_err().code, ErrorCode::Malformed);
    let mut w = welcome(0, false);
    let mut f = BytesMut::from(&w.encode(&KEY, &h.token)[..]);
    f[5 + 3] = 1;
    assert_eq!(decode_all(&f).unwrap_err().code, ErrorCode::Malformed);
}

#[test]
fn wanted_ends_reads_on_frame_boundaries() {
    let d = Decoder::new(64 * 1024);
    // No header yet: the largest DATA frame and the next header.
    assert_eq!(d.wanted(&[]), 5 + 64 * 1024 + 5);
    assert_eq!(d.wanted(&[ty::DATA, 0]), 5 + 64 * 1024 + 5 - 2);
    // A header of a 1000-byte DATA frame, and 400 bytes of it.
    let mut b = BytesMut::new();
    b.extend_from_slice(&data_header(1000));
    assert_eq!(d.wanted(&b), 1000 + 5);
    b.extend_from_slice(&[0u8; 400]);
    assert_eq!(d.wanted(&b), 600 + 5);
    // At least a header's worth, and no more than the limits allow.
    b.extend_from_slice(&[0u8; 600]);
    assert_eq!(d.wanted(&b), 5);
    assert_eq!(d.wanted(&data_header(u32::MAX as usize)), 64 * 1024 + 5);
    // A read of `wanted` bytes then decodes the frame and leaves the next
    // header whole.
    let mut wire = BytesMut::new();
    encode(&Frame::Data(Bytes::from(vec![7u8; 3000])), &mut wire);
    encode(&Frame::Ack(9), &mut wire);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&wire[..10]);
    let k = d.wanted(&buf);
    buf.extend_from_slice(&wire[10..10 + k]);
    assert!(matches!(d.decode(&mut buf), Ok(Some(Frame::Data(p))) if p.len() == 3000));
    assert_eq!(&buf[..], &wire[3005..3010]);
}
