//! Scanners snapshotted at every byte of a stream go on exactly as the
//! originals; broken snapshots are errors.

use std::time::Instant;

use super::*;
use crate::config::{Framing, LengthPrefixed};

fn encode(s: &Scanner) -> Vec<u8> {
    let mut out = Vec::new();
    s.write_snapshot(&mut Writer::new(&mut out, Instant::now()));
    out
}

fn decode(b: &[u8]) -> Result<Scanner> {
    let mut r = Reader::new(b, Instant::now());
    let s = Scanner::read_snapshot(&mut r, "scanner")?;
    r.finish().map(|_| s)
}

fn cases() -> Vec<(Framing, Vec<u8>)> {
    let lp = LengthPrefixed {
        length_field_offset: 2,
        length_field_length: 4,
        big_endian: true,
        length_adjustment: -4,
        max_frame: 256,
    };
    vec![
        (
            Framing::Lines { max_frame: 64 },
            b"GET a\r\nSET a 1\n\nQUIT\r\npartial".to_vec(),
        ),
        (
            Framing::LengthPrefixed(lp),
            vec![0, 1, 0, 0, 0, 6, b'h', b'i', 0, 2, 0, 0, 0, 4, 0, 3, 0, 0],
        ),
        (
            Framing::Resp { max_frame: 256 },
            b"*2\r\n*2\r\n:1\r\n*1\r\n+x\r\n$2\r\nab\r\n-ERR e\r\n:-12\r\n$-1\r\nPING\n$3\r\nab"
                .to_vec(),
        ),
        // Poisoned scanners keep their error.
        (Framing::Lines { max_frame: 4 }, b"ab\nabcdefgh\nx".to_vec()),
        (
            Framing::Resp { max_frame: 256 },
            b"+OK\r\n:12x\r\n".to_vec(),
        ),
    ]
}

/// Feeds `data` in two parts split at `at`, snapshotting in between.
fn scan_split(framing: &Framing, data: &[u8], at: usize) -> (Vec<u64>, Vec<u64>) {
    let mut a = Scanner::new(framing);
    let mut ends = Vec::new();
    let _ = a.scan(&data[..at], &mut ends);
    let bytes = encode(&a);
    let mut b = decode(&bytes).expect("a scanner's own snapshot reads back");
    assert!(b.same_kind(&a));
    assert_eq!(encode(&b), bytes, "decode then encode is the identity");
    let (mut ends_a, mut ends_b) = (ends.clone(), ends);
    let ra = a.scan(&data[at..], &mut ends_a);
    let rb = b.scan(&data[at..], &mut ends_b);
    assert_eq!(ra, rb, "{framing:?} split at {at}");
    assert_eq!(a.position(), b.position());
    (ends_a, ends_b)
}

#[test]
fn scanners_resume_mid_frame_at_every_byte() {
    for (framing, data) in cases() {
        for at in 0..=data.len() {
            let (a, b) = scan_split(&framing, &data, at);
            assert_eq!(a, b, "{framing:?} split at {at}");
        }
    }
}

#[test]
fn truncated_or_inconsistent_scanners_are_errors() {
    for (framing, data) in cases() {
        let mut s = Scanner::new(&framing);
        let _ = s.scan(&data[..data.len() / 2], &mut Vec::new());
        let bytes = encode(&s);
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "{framing:?} cut at {len}");
        }
        assert!(
            decode(&[&bytes[..], &[0]].concat()).is_err(),
            "trailing byte"
        );
    }
    assert!(decode(&[3]).is_err(), "unknown framing tag");
    // A line scanner whose line started after its position.
    let mut out = Vec::new();
    let mut w = Writer::new(&mut out, Instant::now());
    w.u8(0);
    w.usize(64);
    w.u64(5);
    w.u64(6);
    w.u8(0);
    assert!(decode(&out).is_err());
}

/// Every `FrameError::Malformed` message in the scanners' sources is one
/// `MALFORMED` lists, so a poisoned scanner's error reads back exactly.
#[test]
fn malformed_messages_are_all_listed() {
    let sources = [
        include_str!("../lines.rs"),
        include_str!("../length.rs"),
        include_str!("../resp.rs"),
    ];
    let mut found = 0;
    for src in sources {
        for (i, _) in src
            .match_indices("what: \"")
            .chain(src.match_indices("malformed("))
        {
            let rest = &src[i..];
            let Some(q) = rest.find('"') else { continue };
            // Only string literals on the same line as the marker.
            if rest[..q].contains('\n') {
                continue;
            }
            let text = &rest[q + 1..];
            let text = &text[..text.find('"').unwrap()];
            assert!(MALFORMED.contains(&text), "{text:?} missing from MALFORMED");
            found += 1;
        }
    }
    assert!(found >= MALFORMED.len(), "found only {found} messages");
}
