//! The properties the fuzz targets check, one function per target, shared by
//! the cargo-fuzz crate (`fuzz/fuzz_targets/*.rs`, through `#[path]`) and by
//! `tests/fuzz_corpus.rs`, which runs every seed corpus file through them on
//! stable. Each function takes the raw fuzz input and panics only when a
//! property fails; inputs that are merely invalid must be rejected with an
//! error by the code under test, never a panic.
//!
//! It lives in a subdirectory so that cargo does not build it as a test of
//! its own. It owns no corpus files: `fuzz/corpus/<target>/` holds those.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};

use bytes::{Bytes, BytesMut};
use holdfast::config::{self, Framing, LengthPrefixed};
use holdfast::framing::Scanner;
use holdfast::proto::{
    self, ClientAddr, Decoder, Frame, Hello, ProtoError, Welcome, HEADER_LEN, MAX_CONTROL,
    MAX_MAX_FRAME, MIN_MAX_FRAME,
};

/// The fixed resume key of every target.
pub const KEY: [u8; 32] = *b"holdfast fuzz key, 32 bytes long";

/// A target's check of one input.
pub type Check = fn(&[u8]);

/// The corpus directories under `fuzz/corpus/`, with the check of each.
pub const TARGETS: &[(&str, Check)] = &[
    ("proto_frames", proto_frames),
    ("proto_handshake", proto_handshake),
    ("framing", framing),
    ("config_parse", config_parse),
    ("handover_manifest", handover_manifest),
    ("handover_batch", handover_batch),
    ("snapshot", snapshot),
    ("resumable_state", resumable_state),
];

/// A deterministic stream of numbers from one seed (splitmix64), for split
/// points derived from the input.
struct Splits(u64);

impl Splits {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Cuts `data` into pieces: mostly 1 to 16 bytes, sometimes the rest.
    /// Empty data is one empty piece, as the whole-stream side feeds it.
    fn cut<'a>(&mut self, mut data: &'a [u8]) -> Vec<&'a [u8]> {
        if data.is_empty() {
            return vec![data];
        }
        let mut pieces = Vec::new();
        while !data.is_empty() {
            let r = self.next();
            let n = if r & 0xf00 == 0 {
                data.len()
            } else {
                1 + (r % 16) as usize
            };
            let (head, tail) = data.split_at(n.min(data.len()));
            pieces.push(head);
            data = tail;
        }
        pieces
    }
}

// ---------------------------------------------------------------- proto_frames

/// What a decoder made of a byte stream: the frames, then the first error (if
/// any), and how many bytes it consumed.
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<Frame>,
    error: Option<ProtoError>,
    consumed: usize,
}

fn decode_pieces(decoder: &Decoder, pieces: &[&[u8]]) -> Decoded {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    for piece in pieces {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        frames,
                        error: Some(e),
                        consumed: fed - buf.len(),
                    }
                }
            }
        }
    }
    Decoded {
        frames,
        error: None,
        consumed: fed - buf.len(),
    }
}

fn decode_one(decoder: &Decoder, bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = decoder
        .decode(&mut buf)
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is whole");
    assert!(
        buf.is_empty(),
        "{} bytes after a re-encoded frame",
        buf.len()
    );
    frame
}

/// A HELLO for checking WELCOMEs against.
fn reference_hello() -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        resume: true,
        session_id: [0x5a; 16],
        epoch: 3,
        recv_offset: 1000,
        max_frame: 65536,
        window: 1 << 20,
        heartbeat_ms: 1000,
        client: ClientAddr::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 40000),
        token: [0; 32],
    }
}

/// Input: byte 0 picks the decoder's DATA limit, byte 1 seeds the split
/// points, the rest is the stream. Decoding the stream whole and in pieces
/// must give the same frames, error and consumed bytes; every frame must
/// respect its limits and survive a re-encode; HELLOs are checked with
/// [`KEY`] and WELCOMEs against a fixed HELLO.
pub fn proto_frames(data: &[u8]) {
    let Some((&[limit, seed], stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_data = [MIN_MAX_FRAME, 4096, 65536, MAX_MAX_FRAME][usize::from(limit & 3)];
    let decoder = Decoder::new(max_data);
    let whole = decode_pieces(&decoder, &[stream]);
    let split = decode_pieces(&decoder, &Splits(u64::from(seed)).cut(stream));
    assert_eq!(whole, split, "splitting the stream changed the result");
    if whole.error.is_none() {
        // Whatever is left is an incomplete frame.
        assert!(decoder
            .decode(&mut BytesMut::from(&stream[whole.consumed..]))
            .expect("the rest decoded without error before")
            .is_none());
    }
    for frame in &whole.frames {
        check_frame(&decoder, max_data, frame);
    }
}

fn check_frame(decoder: &Decoder, max_data: u32, frame: &Frame) {
    match frame {
        Frame::Hello(h) => {
            if h.check(&KEY).is_ok() {
                assert!(h.verify(&KEY));
            }
            let _ = h.check(&[]);
            let mut again = h.clone();
            let bytes = again.encode(&KEY);
            assert!(again.verify(&KEY));
            assert_eq!(decode_one(decoder, &bytes), Frame::Hello(again));
        }
        Frame::Welcome(w) => {
            let hello = reference_hello();
            let _ = w.check(&KEY, &hello, 0, u64::MAX);
            let mut again = w.clone();
            let bytes = again.encode(&KEY, &hello.token);
            assert!(again.verify(&KEY, &hello.token));
            assert_eq!(decode_one(decoder, &bytes), Frame::Welcome(again));
        }
        Frame::Refuse { code, reason } | Frame::Abort { code, reason } => {
            let mut out = BytesMut::new();
            proto::encode(frame, &mut out);
            assert!(out.len() <= HEADER_LEN + MAX_CONTROL);
            match decode_one(decoder, &out) {
                Frame::Refuse { code: c, reason: r } | Frame::Abort { code: c, reason: r } => {
                    assert_eq!(c, *code);
                    assert!(reason.starts_with(&r), "{reason:?} re-encoded as {r:?}");
                }
                other => panic!("{frame:?} re-encoded as {other:?}"),
            }
        }
        Frame::Data(b) => {
            assert!(!b.is_empty() && b.len() <= max_data as usize);
            round_trip(decoder, frame);
        }
        Frame::Ack(_) | Frame::Fin(_) | Frame::Ping => round_trip(decoder, frame),
    }
}

fn round_trip(decoder: &Decoder, frame: &Frame) {
    let mut out = BytesMut::new();
    proto::encode(frame, &mut out);
    assert_eq!(&decode_one(decoder, &out), frame);
}

// ------------------------------------------------------------- proto_handshake

/// The valid handshake every `proto_handshake` input mutates: a HELLO made
/// with [`KEY`] and the WELCOME that answers it, and their bytes.
pub fn handshake() -> (Hello, Bytes, Welcome, Bytes) {
    let mut hello = Hello {
        version_min: 1,
        version_max: 1,
        resume: false,
        session_id: *b"fuzz session id!",
        epoch: 0,
        recv_offset: 0,
        max_frame: 65536,
        window: 1 << 20,
        heartbeat_ms: 1000,
        client: ClientAddr::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 40000),
        token: [0; 32],
    };
    let hello_bytes = hello.encode(&KEY);
    let mut welcome = Welcome {
        version: 1,
        resumed: false,
        restored: false,
        session_id: hello.session_id,
        recv_offset: 0,
        max_frame: 65536,
        window: 1 << 20,
        heartbeat_ms: 1000,
        token: [0; 32],
    };
    let welcome_bytes = welcome.encode(&KEY, &hello.token);
    (hello, hello_bytes, welcome, welcome_bytes)
}

/// Applies `edits` to `bytes`: each 3 bytes `[op, at, value]` either xors,
/// sets, inserts (`at` modulo the length) or truncates.
pub fn mutate(bytes: &mut Vec<u8>, edits: &[u8]) {
    for edit in edits.chunks_exact(3) {
        let (op, at, value) = (edit[0], usize::from(edit[1]), edit[2]);
        match op % 4 {
            0 if !bytes.is_empty() => {
                let i = at % bytes.len();
                bytes[i] ^= value.max(1);
            }
            1 if !bytes.is_empty() => {
                let i = at % bytes.len();
                bytes[i] = value;
            }
            2 => {
                let i = at % (bytes.len() + 1);
                bytes.insert(i, value);
            }
            3 => bytes.truncate(at),
            _ => {}
        }
    }
}

/// Input: edits for [`mutate`] applied to HELLO ++ WELCOME. Decoding and
/// checking never panic; a decoded HELLO or WELCOME that differs in any field
/// or token from the original never verifies, and the original still checks.
pub fn proto_handshake(data: &[u8]) {
    let (hello, hello_bytes, welcome, welcome_bytes) = handshake();
    let mut bytes = [&hello_bytes[..], &welcome_bytes[..]].concat();
    mutate(&mut bytes, data);
    let decoder = Decoder::new(65536);
    let mut buf = BytesMut::from(&bytes[..]);
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        match frame {
            Frame::Hello(h) => {
                let checked = h.check(&KEY);
                if h == hello {
                    assert_eq!(checked, Ok(1), "the original HELLO no longer checks");
                } else {
                    assert!(!h.verify(&KEY), "a mutated HELLO verifies: {h:?}");
                    assert!(checked.is_err());
                }
            }
            Frame::Welcome(w) => {
                let checked = w.check(&KEY, &hello, 0, 0);
                if w == welcome {
                    assert_eq!(checked, Ok(()), "the original WELCOME no longer checks");
                } else {
                    assert!(
                        !w.verify(&KEY, &hello.token),
                        "a mutated WELCOME verifies: {w:?}"
                    );
                    assert!(checked.is_err());
                }
            }
            _ => {}
        }
    }
}

// --------------------------------------------------------------------- framing

/// The framing an input's header picks, and the header's length: byte 0 picks
/// lines / length-prefixed / resp, the next bytes give `max_frame` (and the
/// length-prefixed knobs, field widths 0 to 8 included, of which only 1 to 8
/// are valid).
pub fn pick_framing(data: &[u8]) -> Option<(Framing, usize)> {
    let u16_at = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]);
    match data.first()? % 3 {
        0 if data.len() >= 3 => Some((
            Framing::Lines {
                max_frame: usize::from(u16_at(1)),
            },
            3,
        )),
        1 if data.len() >= 7 => Some((
            Framing::LengthPrefixed(LengthPrefixed {
                length_field_offset: usize::from(data[1] % 4),
                length_field_length: usize::from(data[2] % 9),
                big_endian: data[2] & 0x80 == 0,
                length_adjustment: i64::from(i16::from_le_bytes([data[3], data[4]])),
                max_frame: usize::from(u16_at(5)),
            }),
            7,
        )),
        2 if data.len() >= 3 => Some((
            Framing::Resp {
                max_frame: usize::from(u16_at(1)),
            },
            3,
        )),
        _ => None,
    }
}

/// Scans `pieces` in order; returns the frame ends, the first error, and the
/// scanner's final position.
fn scan_pieces(
    framing: &Framing,
    pieces: &[&[u8]],
) -> (Vec<u64>, Option<holdfast::framing::FrameError>, u64) {
    let mut scanner = Scanner::new(framing);
    let mut ends = Vec::new();
    let mut error = None;
    let mut fed = 0u64;
    for piece in pieces {
        let before = ends.len();
        let result = scanner.scan(piece, &mut ends);
        fed += piece.len() as u64;
        assert_eq!(scanner.position(), fed);
        if error.is_some() {
            // Poisoned: the same error again, no more frames.
            assert_eq!(result.as_ref().err(), error.as_ref());
            assert_eq!(ends.len(), before);
        } else if let Err(e) = result {
            error = Some(e);
        }
    }
    (ends, error, scanner.position())
}

/// Input: a framing header (see [`pick_framing`]), 2 bytes of split seed,
/// then the stream. Scanning never panics; frame ends are strictly
/// increasing and within `position()`, and scanning whole or in pieces gives
/// the same ends and error.
pub fn framing(data: &[u8]) {
    let Some((framing, header)) = pick_framing(data) else {
        return;
    };
    let Some((seed, stream)) = data[header..].split_first_chunk::<2>() else {
        return;
    };
    let (ends, error, position) = scan_pieces(&framing, &[stream]);
    assert_eq!(position, stream.len() as u64);
    let mut last = 0;
    for &end in &ends {
        assert!(end > last, "frame ends not strictly increasing: {ends:?}");
        assert!(end <= position, "frame end {end} past position {position}");
        last = end;
    }
    let pieces = Splits(u64::from(u16::from_le_bytes(*seed))).cut(stream);
    let split = scan_pieces(&framing, &pieces);
    assert_eq!(
        (ends, error, position),
        split,
        "splitting the stream changed the result"
    );
}

// ---------------------------------------------------------------- config_parse

/// Input: UTF-8 text (other inputs are skipped). Parsing never panics, and
/// its errors display.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(errors) => {
            assert!(!errors.to_string().is_empty());
        }
    }
}

// ----------------------------------------------------------- handover_manifest

/// Input: byte 0 is the number of descriptors that "arrived", the rest the
/// manifest's JSON. Decoding never panics; a manifest it accepts has exactly
/// one entry per descriptor and the current version, and round-trips
/// through JSON.
pub fn handover_manifest(data: &[u8]) {
    let Some((&fds, json)) = data.split_first() else {
        return;
    };
    if let Ok(m) = holdfast::handover::Manifest::decode(json, fds as usize) {
        assert_eq!(m.entries.len(), fds as usize);
        let again = serde_json::to_vec(&m).expect("a manifest serializes");
        let back = holdfast::handover::Manifest::decode(&again, fds as usize)
            .expect("a re-encoded manifest decodes");
        assert_eq!(back, m);
    }
}

// -------------------------------------------------------------- handover_batch

/// Input: byte 0 is the number of descriptors that "arrived", bytes 1..5
/// (big-endian) the payload length, the rest a session batch's JSON
/// header. Decoding never panics; a batch it accepts names exactly those
/// descriptors and payload bytes, the current version, at most
/// `handover::BATCH` sessions (none when it is the final one), and
/// round-trips through JSON.
pub fn handover_batch(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let fds = data[0] as usize;
    let blob = u64::from(u32::from_be_bytes([data[1], data[2], data[3], data[4]]));
    let json = &data[5..];
    if let Ok(b) = holdfast::handover::Batch::decode(json, fds, blob) {
        assert_eq!(b.fds(), fds);
        assert_eq!(b.blob(), blob);
        assert_eq!(b.version, holdfast::handover::VERSION);
        assert!(b.sessions.len() <= holdfast::handover::BATCH);
        assert!(!b.done || b.sessions.is_empty());
        let again = serde_json::to_vec(&b).expect("a batch serializes");
        let back = holdfast::handover::Batch::decode(&again, fds, blob)
            .expect("a re-encoded batch decodes");
        assert_eq!(back, b);
    }
}

// ---------------------------------------------------------------- snapshot

/// The backends a `snapshot` input may name: one per ack mode, each named
/// after it (`none`, `tcp`, `lines`, `length`, `resp`, `resume`).
pub fn snapshot_backends() -> Vec<std::sync::Arc<config::BackendConfig>> {
    use config::{
        AckMode, BackendConfig, BackendProtocol, Endpoint, OnServerClose, ResumeSettings, Secret,
        SocketOptions,
    };
    use std::time::Duration;
    let modes = [
        ("none", AckMode::None),
        ("tcp", AckMode::Tcp),
        ("lines", AckMode::Response(Framing::Lines { max_frame: 64 })),
        (
            "length",
            AckMode::Response(Framing::LengthPrefixed(LengthPrefixed {
                length_field_offset: 0,
                length_field_length: 4,
                big_endian: true,
                length_adjustment: 0,
                max_frame: 256,
            })),
        ),
        ("resp", AckMode::Response(Framing::Resp { max_frame: 256 })),
        (
            "resume",
            AckMode::Resume(ResumeSettings {
                key: Secret(std::sync::Arc::from(&KEY[..])),
                heartbeat_interval: Duration::from_millis(100),
                dead_peer_timeout: Duration::from_millis(300),
                max_frame: 4096,
                window: 1 << 16,
                resume_timeout: Duration::from_secs(300),
                early_data: true,
            }),
        ),
    ];
    modes
        .into_iter()
        .map(|(name, ack)| {
            std::sync::Arc::new(BackendConfig {
                name: name.into(),
                servers: vec![
                    Endpoint::Tcp("127.0.0.1:7001".into()),
                    Endpoint::Tcp("127.0.0.1:7002".into()),
                ],
                protocol: if name == "resume" {
                    BackendProtocol::Resume
                } else {
                    BackendProtocol::Tcp
                },
                ack,
                buffer_limit: 1 << 20,
                hold_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(1),
                retry_initial: Duration::from_millis(1),
                retry_max: Duration::from_millis(200),
                on_server_close: OnServerClose::Reconnect,
                greeting: 1,
                preamble: 1,
                retry_responses: vec![b"-LOADING".to_vec()],
                max_held_sessions: None,
                splice: false,
                socket: SocketOptions {
                    nodelay: true,
                    keepalive: None,
                    user_timeout: None,
                },
                tls: None,
            })
        })
        .collect()
}

/// `SessionCore::import` never panics. A snapshot it accepts is a session
/// whose invariants hold, that exports to bytes it reads back identically,
/// and that takes a few inputs of every kind without panicking.
pub fn snapshot(data: &[u8]) {
    use holdfast::session::SessionCore;
    use holdfast::stream::Dir;
    use std::time::{Duration, Instant};

    let backends = snapshot_backends();
    let resolve = |name: &str| backends.iter().find(|b| b.name == name).cloned();
    let now = Instant::now();
    let Ok(mut core) = SessionCore::import(data, resolve, now) else {
        return;
    };
    core.check_invariants();
    // Actions import issued again (a connect in flight): carried out.
    while core.poll_action().is_some() {}
    let mut again = Vec::new();
    core.export(now, &mut again);
    let mut back = SessionCore::import(&again, resolve, now).expect("an export reads back");
    while back.poll_action().is_some() {}
    let mut twice = Vec::new();
    back.export(now, &mut twice);
    assert!(again == twice, "an export reads back as the same session");

    let mut t = now;
    for round in 0..3 {
        while core.poll_action().is_some() {}
        while core.poll_event().is_some() {}
        if let Some(gen) = core.leg_gen() {
            let mut out = Vec::new();
            core.next_writes_up(1, &mut out);
            if let Some(b) = out.first() {
                core.on_server_written(gen, b.len().min(9), t);
            }
            if core.framed_legs() {
                core.on_server_frame(gen, Frame::Ping, t);
                core.on_server_frame(gen, Frame::Ack(2), t);
            } else if !core.stream(Dir::Down).fin_read() {
                // (A new leg's bytes after the server's FIN reached the
                // client are a known gap of the core, not of snapshots.)
                core.on_server_data(gen, Bytes::from_static(b"+OK\r\n"), t);
                core.on_server_acked(gen, 3, t);
            }
        }
        if let Some(b) = core.next_write(Dir::Down) {
            core.on_client_written(b.len().min(7), t);
        }
        core.on_client_data(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), t);
        if round == 1 {
            core.on_client_eof(t);
        }
        t += Duration::from_millis(400);
        core.on_timeout(t);
        let _ = core.deadline();
        core.check_invariants();
    }
}

// --------------------------------------------------------- resumable_state

/// A resumable session's parked state (what a hand-over of a
/// resume-protocol listener carries, `server::Parked::state`): decoding
/// never panics, and a state accepted without a leg encodes back to the
/// same bytes (`server::fuzz_parked_state` asserts both).
pub fn resumable_state(data: &[u8]) {
    holdfast::server::fuzz_parked_state(data);
}
