//! Tests of the framing scanners: example tables, every example fed split at
//! every byte, and property tests against trivial reference encoders.

use super::resp::{MAX_DEPTH, MAX_HEADER_LINE};
use super::*;
use crate::config::LengthPrefixed;

/// What a scanner reports for a whole stream: the frame ends, then the error
/// that stopped it, if any.
type Outcome = (Vec<u64>, Option<FrameError>);

/// Feeds `chunks` in order to a new scanner; also checks that position counts
/// every byte and that an error poisons the scanner.
fn feed<'a>(framing: &Framing, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut scanner = Scanner::new(framing);
    let mut ends = Vec::new();
    let mut fed = 0;
    for chunk in chunks {
        fed += chunk.len() as u64;
        let result = scanner.scan(chunk, &mut ends);
        assert_eq!(scanner.position(), fed);
        if let Err(e) = result {
            let seen = ends.len();
            assert_eq!(scanner.scan(b"\n+OK\r\n", &mut ends), Err(e.clone()));
            assert_eq!(scanner.scan(b"", &mut ends), Err(e.clone()));
            assert_eq!(ends.len(), seen, "a poisoned scanner reported frames");
            return (ends, Some(e));
        }
    }
    (ends, None)
}

/// Feeds `input` whole, split in two at every byte, and one byte at a time;
/// all must report the same. Returns that.
fn fed_every_way(framing: &Framing, input: &[u8]) -> Outcome {
    let whole = feed(framing, [input]);
    for cut in 0..=input.len() {
        let (a, b) = input.split_at(cut);
        assert_eq!(feed(framing, [a, b]), whole, "split at {cut}");
    }
    assert_eq!(feed(framing, input.chunks(1)), whole, "byte by byte");
    whole
}

/// Splits `input` before each of `cuts` (taken modulo its length + 1).
fn split<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.push(input.len());
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for cut in cuts {
        chunks.push(&input[from..cut]);
        from = cut;
    }
    chunks
}

fn lines(max_frame: usize) -> Framing {
    Framing::Lines { max_frame }
}

fn resp(max_frame: usize) -> Framing {
    Framing::Resp { max_frame }
}

fn length(offset: usize, width: usize, big_endian: bool, adjustment: i64, max: usize) -> Framing {
    Framing::LengthPrefixed(LengthPrefixed {
        length_field_offset: offset,
        length_field_length: width,
        big_endian,
        length_adjustment: adjustment,
        max_frame: max,
    })
}

fn too_large(start: u64, limit: usize) -> Option<FrameError> {
    Some(FrameError::TooLarge { start, limit })
}

/// The offset of a Malformed error, any message.
fn malformed_at(outcome: &Outcome) -> Option<u64> {
    match outcome.1 {
        Some(FrameError::Malformed { offset, .. }) => Some(offset),
        _ => None,
    }
}

const BIG: usize = 1 << 20;

#[test]
fn lines_examples() {
    let ok: &[(&[u8], &[u64])] = &[
        (b"", &[]),
        (b"a\n", &[2]),
        (b"a\r\nbb\n\n", &[3, 6, 7]),
        (b"\n\n\r\n", &[1, 2, 4]),
        (b"no newline yet", &[]),
        (b"one\ntwo\r\nthr", &[4, 9]),
        (b"\r\r\n", &[3]),
    ];
    for &(input, ends) in ok {
        assert_eq!(fed_every_way(&lines(BIG), input), (ends.to_vec(), None));
    }
    let limited: &[(&[u8], &[u64], Option<FrameError>)] = &[
        (b"abc\n", &[4], None),
        // Exactly max_frame bytes and no LF yet: not known to be too large.
        (b"ab\nabcd", &[3], None),
        (b"abcd\n", &[], too_large(0, 4)),
        (b"ab\nabcde", &[3], too_large(3, 4)),
        (b"ab\n\nabc\r\n", &[3, 4], too_large(4, 4)),
    ];
    for &(input, ends, ref error) in limited {
        assert_eq!(
            fed_every_way(&lines(4), input),
            (ends.to_vec(), error.clone()),
            "{input:?}"
        );
    }
    assert_eq!(fed_every_way(&lines(0), b"\n"), (vec![], too_large(0, 0)));
}

#[test]
fn length_examples() {
    let be4 = length(0, 4, true, 0, BIG);
    let cases: &[(&Framing, &[u8], &[u64])] = &[
        (&be4, b"", &[]),
        (&be4, b"\0\0\0\x03abc", &[7]),
        (&be4, b"\0\0\0\0", &[4]),
        (&be4, b"\0\0\0\0\0\0\0\x01x\0\0\0\x02yy\0\0", &[4, 9, 15]),
        (&length(0, 2, false, 0, BIG), b"\x03\0abc\x01\x01", &[5]),
        (&length(0, 1, true, 0, BIG), b"\x02ab\x00\x01c", &[3, 4, 6]),
        (&length(0, 8, true, 0, BIG), b"\0\0\0\0\0\0\0\x02xy", &[10]),
        (&length(0, 8, false, 0, BIG), b"\x02\0\0\0\0\0\0\0xy", &[10]),
        // Two bytes (a magic, say) before the field.
        (&length(2, 2, true, 0, BIG), b"MM\0\x01zMM\0\0", &[5, 9]),
        // The field counts the header too.
        (&length(0, 2, true, -2, BIG), b"\0\x05abc\0\x02", &[5, 7]),
        (&length(1, 2, true, -3, BIG), b"T\0\x04xT\0\x03", &[4, 7]),
        // The field leaves out a trailer byte.
        (&length(0, 1, true, 1, BIG), b"\x02ab!\x00!", &[4, 6]),
        // Exactly max_frame.
        (&length(0, 4, true, 0, 7), b"\0\0\0\x03abc", &[7]),
    ];
    for &(framing, input, ends) in cases {
        assert_eq!(
            fed_every_way(framing, input),
            (ends.to_vec(), None),
            "{input:?}"
        );
    }
}

#[test]
fn length_errors() {
    // Known as soon as the header is decoded, before any payload.
    let small = length(0, 4, true, 0, 6);
    assert_eq!(
        fed_every_way(&small, b"\0\0\0\x03"),
        (vec![], too_large(0, 6))
    );
    assert_eq!(
        fed_every_way(&small, b"\0\0\0\x01x\0\0\0\x09"),
        (vec![5], too_large(5, 6))
    );
    // A field too big for any frame, and one that would overflow.
    let wide = length(0, 8, true, i64::MAX, usize::MAX);
    assert_eq!(
        fed_every_way(&wide, &[0xff; 8]),
        (vec![], too_large(0, usize::MAX))
    );
    // A field smaller than -length_adjustment.
    let neg = fed_every_way(&length(0, 2, true, -2, BIG), b"\0\x02\0\x01");
    assert_eq!(malformed_at(&neg), Some(2));
    assert_eq!(neg.0, vec![2]);
    let neg = fed_every_way(&length(3, 1, true, -5, BIG), b"abc\x04");
    assert_eq!(malformed_at(&neg), Some(3));
    // An unvalidated config poisons the scanner instead of panicking.
    for width in [0, 9] {
        assert_eq!(
            malformed_at(&feed(&length(0, width, true, 0, BIG), [&b"x"[..]])),
            Some(0)
        );
    }
}

#[test]
fn resp_examples() {
    let nested = b"*3\r\n*1\r\n:1\r\n*0\r\n*2\r\n$-1\r\n*-1\r\n";
    let cases: &[(&[u8], &[u64])] = &[
        (b"", &[]),
        (b"+OK\r\n", &[5]),
        (b"+\r\n-ERR bad\r\n", &[3, 13]),
        (b":42\r\n:-7\r\n:0\r\n", &[5, 10, 14]),
        (b"$3\r\nfoo\r\n", &[9]),
        (b"$0\r\n\r\n", &[6]),
        (b"$-1\r\n*-1\r\n*0\r\n", &[5, 10, 14]),
        (b"$4\r\n\r\n\r\n\r\n", &[10]),
        (b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n+OK\r\n", &[20, 25]),
        (nested, &[nested.len() as u64]),
        (b"*1\r\n*1\r\n*1\r\n+x\r\n", &[16]),
        // A simple string ends at the first CRLF; a bare CR or LF is content.
        (b"+a\rb\nc\r\n", &[8]),
        // Inline commands end at LF.
        (b"PING\r\nPING\nGET k\r\n", &[6, 11, 18]),
        (b"\r\n\n", &[2, 3]),
        (b"PING\r\n*1\r\n$4\r\nPING\r\n", &[6, 20]),
        (b"+OK\r\n$5\r\nhel", &[5]),
    ];
    for &(input, ends) in cases {
        assert_eq!(
            fed_every_way(&resp(BIG), input),
            (ends.to_vec(), None),
            "{input:?}"
        );
    }
    // As deep as allowed.
    let mut deep = b"*1\r\n".repeat(MAX_DEPTH);
    deep.extend_from_slice(b":1\r\n");
    assert_eq!(
        fed_every_way(&resp(BIG), &deep),
        (vec![deep.len() as u64], None)
    );
    // The longest header line allowed.
    let mut long = b":".to_vec();
    long.resize(MAX_HEADER_LINE as usize - 2, b'0');
    long.extend_from_slice(b"\r\n");
    assert_eq!(
        fed_every_way(&resp(BIG), &long),
        (vec![long.len() as u64], None)
    );
}

#[test]
fn resp_malformed() {
    let cases: &[(&[u8], u64)] = &[
        (b"$3\r\nfooX", 7),
        (b"$3\r\nfoo\rX", 8),
        (b"$0\r\n\n", 4),
        (b":abc\r\n", 1),
        (b":\r\n", 1),
        (b":-\r\n", 2),
        (b":1-\r\n", 2),
        (b":1\rX", 3),
        (b":1\n", 2),
        (b"$-2\r\n", 2),
        (b"$-0\r\n", 2),
        (b"$-10\r\n", 3),
        (b"*-\r\n", 2),
        (b"$ 3\r\n", 1),
        (b"*1\r\n!", 4),
        (b"*2\r\n+a\r\nPING\r\n", 8),
        (b"+OK\r\n:99999999999999999999\r\n", 25),
    ];
    for &(input, offset) in cases {
        let outcome = fed_every_way(&resp(BIG), input);
        assert_eq!(
            malformed_at(&outcome),
            Some(offset),
            "{input:?}: {outcome:?}"
        );
    }
    let mut deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
    deep.extend_from_slice(b":1\r\n");
    assert_eq!(
        malformed_at(&fed_every_way(&resp(BIG), &deep)),
        Some(4 * MAX_DEPTH as u64)
    );
    let mut long = b":".to_vec();
    long.resize(MAX_HEADER_LINE as usize + 5, b'0');
    let at = MAX_HEADER_LINE as u64;
    assert_eq!(malformed_at(&fed_every_way(&resp(BIG), &long)), Some(at));
}

#[test]
fn resp_too_large() {
    /// max_frame, input, frame ends, start of the frame too large.
    type Case<'a> = (usize, &'a [u8], &'a [u64], Option<u64>);
    let cases: &[Case] = &[
        (9, b"$3\r\nfoo\r\n", &[9], None),
        // Known from the declared length, before any payload.
        (8, b"$3\r\n", &[], Some(0)),
        (10, b"+OK\r\n$20\r\n", &[5], Some(5)),
        (10, b"$18446744073709551615\r\n", &[], Some(0)),
        // Known once the frame has more than max_frame bytes.
        (10, b"+aaaaaaaaa", &[], None),
        (10, b"+aaaaaaaaaa", &[], Some(0)),
        (10, b"+OK\r\n+aaaaaaaaaaaa", &[5], Some(5)),
        (10, b"*2\r\n+a\r\n+bb\r\n", &[], Some(0)),
        (5, b"PING\r\nPING\r\n", &[], Some(0)),
        (6, b"PING\r\nPING\r\n", &[6, 12], None),
    ];
    for &(max, input, ends, start) in cases {
        let error = start.and_then(|start| too_large(start, max));
        assert_eq!(
            fed_every_way(&resp(max), input),
            (ends.to_vec(), error),
            "{input:?}"
        );
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// Concatenates `frames`; returns the stream and each frame's end.
    fn concat(frames: &[Vec<u8>]) -> (Vec<u8>, Vec<u64>) {
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for frame in frames {
            stream.extend_from_slice(frame);
            ends.push(stream.len() as u64);
        }
        (stream, ends)
    }

    fn line() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec(any::<u8>().prop_filter("no LF", |&b| b != b'\n'), 0..20),
            any::<bool>(),
        )
            .prop_map(|(mut line, crlf)| {
                if crlf {
                    line.push(b'\r');
                }
                line.push(b'\n');
                line
            })
    }

    #[derive(Debug, Clone)]
    enum Value {
        Simple(u8, Vec<u8>),
        Int(i64),
        Bulk(Option<Vec<u8>>),
        Array(Option<Vec<Value>>),
    }

    fn encode(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Simple(kind, s) => {
                out.push(*kind);
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            Value::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Value::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Value::Bulk(Some(b)) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Value::Array(None) => out.extend_from_slice(b"*-1\r\n"),
            Value::Array(Some(items)) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    encode(item, out);
                }
            }
        }
    }

    fn value() -> impl Strategy<Value = Value> {
        // Simple strings hold no CRLF; a lone CR or LF is fine.
        let simple = (
            prop::sample::select(&b"+-"[..]),
            prop::collection::vec(any::<u8>(), 0..12),
        )
            .prop_filter("no CRLF", |(_, s)| !s.windows(2).any(|w| w == b"\r\n"))
            .prop_map(|(kind, s)| Value::Simple(kind, s));
        let leaf = prop_oneof![
            simple,
            any::<i64>().prop_map(Value::Int),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..30)).prop_map(Value::Bulk),
        ];
        leaf.prop_recursive(6, 40, 5, |inner| {
            prop::option::of(prop::collection::vec(inner, 0..5)).prop_map(Value::Array)
        })
    }

    fn resp_frame() -> impl Strategy<Value = Vec<u8>> {
        let inline =
            prop::collection::vec(any::<u8>().prop_filter("no LF", |&b| b != b'\n'), 0..20)
                .prop_filter("not a type byte", |l| {
                    l.first().map_or(true, |b| !b"+-:$*".contains(b))
                })
                .prop_map(|mut l| {
                    l.push(b'\n');
                    l
                });
        prop_oneof![
            4 => value().prop_map(|v| {
                let mut out = Vec::new();
                encode(&v, &mut out);
                out
            }),
            1 => inline,
        ]
    }

    /// A length-prefixed config and frames encoded for it.
    fn length_frames() -> impl Strategy<Value = (Framing, Vec<Vec<u8>>)> {
        (
            0usize..4,
            prop::sample::select(&[1usize, 2, 4, 8][..]),
            any::<bool>(),
            -12i64..12,
        )
            .prop_flat_map(|(offset, width, big_endian, adjustment)| {
                let frame = (prop::collection::vec(any::<u8>(), 0..40), any::<u8>());
                let frames = prop::collection::vec(frame, 0..12).prop_map(move |frames| {
                    frames
                        .into_iter()
                        .map(|(mut payload, magic)| {
                            // The field can't go below zero: pad the payload.
                            let min = adjustment.max(0) as usize;
                            if payload.len() < min {
                                payload.resize(min, magic);
                            }
                            let value = (payload.len() as i64 - adjustment) as u64;
                            let field = value.to_be_bytes();
                            let mut field = field[8 - width..].to_vec();
                            if !big_endian {
                                field.reverse();
                            }
                            let mut frame = vec![magic; offset];
                            frame.extend_from_slice(&field);
                            frame.extend_from_slice(&payload);
                            frame
                        })
                        .collect::<Vec<_>>()
                });
                (
                    Just(length(offset, width, big_endian, adjustment, BIG)),
                    frames,
                )
            })
    }

    fn cuts() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(any::<usize>(), 0..8)
    }

    /// Bytes rich in what the scanners look at.
    fn garbage() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            3 => prop::sample::select(&b"+-:$*\r\n0123456789-\x00\x01\x02\x04"[..]),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..200)
    }

    /// The lines scanner, one byte at a time: a line ends at each LF; the
    /// stream is broken once a line holds more than `max` bytes.
    fn lines_model(input: &[u8], max: usize) -> Outcome {
        let (mut ends, mut start) = (Vec::new(), 0u64);
        for (o, &b) in input.iter().enumerate() {
            let end = o as u64 + 1;
            if end - start > max as u64 {
                let e = FrameError::TooLarge { start, limit: max };
                return (ends, Some(e));
            }
            if b == b'\n' {
                ends.push(end);
                start = end;
            }
        }
        (ends, None)
    }

    /// Up to a few hundred bytes, LFs dense or sparse: blocks of 64 and
    /// their remainders, lines across them.
    fn long_input() -> impl Strategy<Value = Vec<u8>> {
        (1u32..40).prop_flat_map(|lf_in| {
            prop::collection::vec(
                (0..lf_in).prop_map(|k| if k == 0 { b'\n' } else { b'a' + (k % 26) as u8 }),
                0..700,
            )
        })
    }

    proptest! {
        #[test]
        fn lines_match_a_byte_by_byte_model(
            input in long_input(),
            cuts in cuts(),
            max in 1usize..200,
        ) {
            prop_assert_eq!(feed(&lines(max), split(&input, &cuts)), lines_model(&input, max));
        }

        #[test]
        fn lines_find_every_line(frames in prop::collection::vec(line(), 0..20), cuts in cuts()) {
            let (stream, ends) = concat(&frames);
            prop_assert_eq!(feed(&lines(BIG), split(&stream, &cuts)), (ends, None));
        }

        #[test]
        fn length_finds_every_frame((framing, frames) in length_frames(), cuts in cuts()) {
            let (stream, ends) = concat(&frames);
            prop_assert_eq!(feed(&framing, split(&stream, &cuts)), (ends, None));
        }

        #[test]
        fn resp_finds_every_frame(frames in prop::collection::vec(resp_frame(), 0..10), cuts in cuts()) {
            let (stream, ends) = concat(&frames);
            prop_assert_eq!(feed(&resp(BIG), split(&stream, &cuts)), (ends, None));
        }

        #[test]
        fn garbage_splits_do_not_matter(
            input in garbage(),
            cuts in cuts(),
            max in 0usize..64,
            adjustment in -4i64..4,
        ) {
            for framing in [
                lines(max),
                resp(max),
                resp(BIG),
                length(1, 1, true, adjustment, max),
                length(0, 2, false, adjustment, max),
            ] {
                let whole = feed(&framing, [&input[..]]);
                prop_assert_eq!(feed(&framing, split(&input, &cuts)), whole);
            }
        }
    }
}
