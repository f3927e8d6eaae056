//! Every file of every fuzz corpus (`fuzz/corpus/<target>/`) through the
//! check of its target, on stable, as an ordinary test: the seeds and what
//! the fuzzers kept stay regression tests without cargo-fuzz or nightly.
//!
//! The hand-made seeds are written by the ignored `write_seeds` test:
//! `cargo test --test fuzz_corpus -- --ignored write_seeds`.
use std::fs;
use std::net::{IpAddr, Ipv6Addr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use holdfast::proto::{self, ClientAddr, ErrorCode, Frame};

mod fuzz_checks;

use fuzz_checks::{handshake, snapshot_backends, KEY, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The files of a corpus directory, sorted; libFuzzer's `.tmp*` leftovers
/// excluded.
fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_passes_its_check() {
    let mut failures = Vec::new();
    for (target, check) in TARGETS {
        let files = corpus_files(target);
        assert!(
            files.len() >= 5,
            "fuzz/corpus/{target} holds only {} files",
            files.len()
        );
        for path in &files {
            let data = fs::read(path).unwrap();
            if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "failing corpus files: {failures:#?}");
}

/// The unmutated handshake decodes and checks: `proto_handshake`'s baseline
/// is real (an input with no edits must reach both asserts on originals).
#[test]
fn handshake_baseline_checks() {
    let (hello, hello_bytes, welcome, welcome_bytes) = handshake();
    let d = proto::Decoder::new(65536);
    let mut buf = BytesMut::from(&[&hello_bytes[..], &welcome_bytes[..]].concat()[..]);
    assert_eq!(
        d.decode(&mut buf).unwrap(),
        Some(Frame::Hello(hello.clone()))
    );
    assert_eq!(
        d.decode(&mut buf).unwrap(),
        Some(Frame::Welcome(welcome.clone()))
    );
    assert_eq!(hello.check(&KEY), Ok(1));
    assert_eq!(welcome.check(&KEY, &hello, 0, 0), Ok(()));
}

fn frame(f: &Frame) -> Vec<u8> {
    let mut out = BytesMut::new();
    proto::encode(f, &mut out);
    out.to_vec()
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus_dir(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

/// `proto_frames` input: DATA limit selector, split seed, stream.
fn frames_seed(name: &str, limit: u8, seed: u8, stream: &[u8]) {
    write("proto_frames", name, &[&[limit, seed][..], stream].concat());
}

/// `framing` input: framing header, 2 bytes of split seed, stream.
fn framing_seed(name: &str, header: &[u8], stream: &[u8]) {
    write("framing", name, &[header, &[7, 0][..], stream].concat());
}

/// Writes the hand-made seeds. Deterministic; run once after changing it.
#[test]
#[ignore]
fn write_seeds() {
    // proto_frames
    let (hello, hello_bytes, _, welcome_bytes) = handshake();
    let mut resume = hello.clone();
    resume.resume = true;
    resume.epoch = 7;
    resume.recv_offset = 123_456;
    resume.client = ClientAddr::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST), 443);
    let resume_bytes = resume.encode(&KEY);
    let mut unknown = hello.clone();
    unknown.client = ClientAddr::Unknown;
    let unknown_bytes = unknown.encode(&KEY);
    let data = frame(&Frame::Data(bytes::Bytes::from_static(
        b"GET / HTTP/1.1\r\n\r\n",
    )));
    let ack = frame(&Frame::Ack(18));
    let fin = frame(&Frame::Fin(18));
    let ping = frame(&Frame::Ping);
    let abort = frame(&Frame::Abort {
        code: ErrorCode::WindowExceeded,
        reason: "window of 1048576 bytes exceeded".into(),
    });
    let refuse = frame(&Frame::Refuse {
        code: ErrorCode::UnknownSession,
        reason: "no such session".into(),
    });
    frames_seed("hello-new", 2, 0, &hello_bytes);
    frames_seed("hello-resume-v6", 2, 1, &resume_bytes);
    frames_seed("hello-unknown-addr", 2, 2, &unknown_bytes);
    frames_seed("welcome", 2, 3, &welcome_bytes);
    frames_seed("data", 2, 4, &data);
    frames_seed("ack", 2, 5, &ack);
    frames_seed("fin", 2, 6, &fin);
    frames_seed("ping", 2, 7, &ping);
    frames_seed("abort", 2, 8, &abort);
    frames_seed("refuse", 2, 9, &refuse);
    let conversation = [
        &hello_bytes[..],
        &welcome_bytes,
        &data,
        &ack,
        &ping,
        &data,
        &fin,
        &ack,
        &abort,
    ]
    .concat();
    frames_seed("conversation", 2, 10, &conversation);
    frames_seed("conversation-limit-1024", 0, 11, &conversation);
    frames_seed("hello-truncated-header", 2, 12, &hello_bytes[..3]);
    frames_seed("hello-truncated-body", 2, 13, &hello_bytes[..40]);
    frames_seed("data-header-only", 2, 14, &data[..5]);
    let mut big = proto::data_header(2000).to_vec();
    big.extend_from_slice(&[0xab; 64]);
    frames_seed("data-too-large", 0, 15, &big);
    frames_seed("data-empty", 2, 16, &proto::data_header(0));
    frames_seed("unknown-type", 2, 17, &[0x7f, 0, 0, 0, 0]);
    frames_seed(
        "ack-short",
        2,
        18,
        &[proto::ty::ACK, 0, 0, 0, 4, 1, 2, 3, 4],
    );
    let mut bad_magic = hello_bytes.to_vec();
    bad_magic[5] = b'X';
    frames_seed("hello-bad-magic", 2, 19, &bad_magic);
    let mut bad_family = unknown_bytes.to_vec();
    bad_family[5 + 52] = 9;
    frames_seed("hello-bad-family", 2, 20, &bad_family);

    // proto_handshake: edits [op, at, value]; op 0 xor, 1 set, 2 insert,
    // 3 truncate.
    write("proto_handshake", "no-edits", &[]);
    write("proto_handshake", "flip-hello-token", &[0, 95, 1]);
    write("proto_handshake", "flip-hello-session-id", &[0, 13, 0x80]);
    write("proto_handshake", "set-hello-reserved", &[1, 12, 0xff]);
    write("proto_handshake", "flip-welcome-token", &[0, 170, 4]);
    write(
        "proto_handshake",
        "flip-welcome-offset",
        &[0, 96 + 5 + 27, 1],
    );
    write("proto_handshake", "truncate-hello", &[3, 50, 0]);
    write("proto_handshake", "insert-in-hello", &[2, 30, 0]);
    write("proto_handshake", "two-edits", &[0, 20, 1, 0, 95, 1]);

    // framing: lines [0, max_frame le], length-prefixed [1, offset, width
    // (+0x80 little endian), adjustment i16 le, max_frame le], resp [2,
    // max_frame le].
    let lines = [0, 0, 1];
    framing_seed("lines", &lines, b"GET a\r\nSET a 1\nQUIT\r\npartial");
    framing_seed("lines-too-long", &[0, 4, 0], b"abc\nabcdefgh\n");
    framing_seed("lines-empty-lines", &lines, b"\n\n\r\n\n");
    let lp = [1, 2, 4, 0xfc, 0xff, 0, 1]; // offset 2, u32 be, -4, 256
    framing_seed(
        "length-prefixed-trades",
        &lp,
        &[0, 1, 0, 0, 0, 6, b'h', b'i', 0, 2, 0, 0, 0, 4, 0, 3, 0, 0],
    );
    framing_seed(
        "length-prefixed-u16-le",
        &[1, 0, 0x82, 0, 0, 0, 1],
        &[3, 0, b'a', b'b', b'c', 0, 0, 1],
    );
    framing_seed("length-prefixed-negative", &lp, &[0, 1, 0, 0, 0, 2]);
    framing_seed(
        "length-prefixed-too-large",
        &lp,
        &[0, 1, 0, 0, 0x10, 0, 0, 0],
    );
    framing_seed("length-prefixed-width-0", &[1, 0, 0, 0, 0, 0, 1], b"abc");
    framing_seed(
        "length-prefixed-u64",
        &[1, 0, 8, 0, 0, 0xff, 0xff],
        &[0, 0, 0, 0, 0, 0, 0, 2, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    let resp = [2, 0, 1];
    framing_seed(
        "resp-commands",
        &resp,
        b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*2\r\n$3\r\nGET\r\n$1\r\na\r\nPING\n",
    );
    framing_seed(
        "resp-replies",
        &resp,
        b"+OK\r\n-ERR wrong\r\n:42\r\n:-1\r\n$-1\r\n*-1\r\n*0\r\n$0\r\n\r\n",
    );
    framing_seed(
        "resp-nested",
        &resp,
        b"*2\r\n*2\r\n:1\r\n*1\r\n+x\r\n$2\r\nab\r\n",
    );
    framing_seed("resp-bad-bulk-end", &resp, b"$2\r\nabcd\r\n");
    framing_seed("resp-bad-number", &resp, b":12x\r\n");
    framing_seed(
        "resp-too-large",
        &[2, 8, 0],
        b"$20\r\n0123456789abcdefghij\r\n",
    );

    // config_parse: the shipped examples, the invalid fixtures, and a
    // resume backend whose key file does not exist.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (dir, prefix) in [("config", "example"), ("tests/fixtures/invalid", "invalid")] {
        for entry in fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path.file_name().unwrap().to_string_lossy();
                write(
                    "config_parse",
                    &format!("{prefix}-{name}"),
                    &fs::read(&path).unwrap(),
                );
            }
        }
    }
    write(
        "config_parse",
        "resume-missing-key.toml",
        br#"[[listener]]
name = "app"
listen = "127.0.0.1:7300"
backend = "app"

[[backend]]
name = "app"
servers = ["127.0.0.1:7301"]
protocol = "resume"
resume = { secret_file = "/nonexistent/holdfast-fuzz.key", heartbeat_interval = "1s", dead_peer_timeout = "3s" }
"#,
    );
}

/// The `snapshot` seeds `write_snapshot_seeds` writes (the rest of the
/// corpus is what the fuzzer kept).
const SNAPSHOT_SEEDS: [&str; 11] = [
    "tcp-connecting",
    "tcp-held-waiting",
    "tcp-up-data-both-ways",
    "tcp-half-closed",
    "tcp-ending",
    "none-server-closed",
    "lines-mid-frame",
    "length-mid-frame",
    "resp-mid-frame",
    "resume-handshake",
    "resume-link",
];

/// Every seed `write_snapshot_seeds` wrote is a valid snapshot of this
/// version: the target's baseline is real, and a format change that forgot
/// the seeds fails here.
#[test]
fn snapshot_seeds_import() {
    let backends = snapshot_backends();
    for name in SNAPSHOT_SEEDS {
        let path = corpus_dir("snapshot").join(name);
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let r = holdfast::session::SessionCore::import(
            &data,
            |n| backends.iter().find(|b| b.name == n).cloned(),
            std::time::Instant::now(),
        );
        assert!(r.is_ok(), "{}: {}", path.display(), r.unwrap_err());
    }
}

/// Writes the `snapshot` seeds: sessions of every backend of
/// `fuzz_checks::snapshot_backends`, exported in many states. Deterministic
/// (instants are relative); run after a change of the format:
/// `cargo test --test fuzz_corpus -- --ignored write_snapshot_seeds`.
#[test]
#[ignore]
fn write_snapshot_seeds() {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use holdfast::proto::{Decoder, Welcome};
    use holdfast::session::{LegFailure, SessionCore, SessionId};

    let t0 = Instant::now();
    let backends = snapshot_backends();
    let backend = |name: &str| backends.iter().find(|b| b.name == name).unwrap().clone();
    let new = |name: &str| SessionCore::new(SessionId(0x0123_4567_89ab_cdef), backend(name), 0, t0);
    // Carries out the actions (a connect is answered by `connect`).
    let drain = |core: &mut SessionCore| {
        while core.poll_event().is_some() {}
        while let Some(a) = core.poll_action() {
            if a == holdfast::session::Action::ShutdownClient {
                core.on_client_shutdown(t0);
            }
        }
    };
    let connect = |core: &mut SessionCore| {
        drain(core);
        core.on_connected(holdfast::session::Generation(0), false, t0);
        drain(core);
    };
    // Writes up to `max` bytes towards the server; returns them.
    let write_up = |core: &mut SessionCore, max: usize| -> Vec<u8> {
        let mut out = Vec::new();
        core.next_writes_up(8, &mut out);
        let all: Vec<u8> = out.concat();
        let n = all.len().min(max);
        if let Some(gen) = core.leg_gen() {
            core.on_server_written(gen, n, t0);
        }
        drain(core);
        all[..n].to_vec()
    };
    let client = |core: &mut SessionCore, b: &[u8]| {
        core.on_client_data(Bytes::copy_from_slice(b), t0);
        drain(core);
    };
    let server = |core: &mut SessionCore, b: &[u8]| {
        let gen = core.leg_gen().unwrap();
        core.on_server_data(gen, Bytes::copy_from_slice(b), t0);
        drain(core);
    };
    let save = |name: &str, core: &SessionCore| {
        assert!(SNAPSHOT_SEEDS.contains(&name), "{name} is listed");
        let mut out = Vec::new();
        core.export(t0, &mut out);
        write("snapshot", name, &out);
    };

    let mut c = new("tcp");
    drain(&mut c);
    save("tcp-connecting", &c);
    c.on_connect_failed(
        holdfast::session::Generation(0),
        LegFailure::ConnectRefused,
        t0,
    );
    drain(&mut c);
    c.on_connect_failed(
        holdfast::session::Generation(1),
        LegFailure::ConnectRefused,
        t0,
    );
    drain(&mut c);
    save("tcp-held-waiting", &c);

    let mut c = new("tcp");
    connect(&mut c);
    client(&mut c, b"hello ");
    client(&mut c, b"world");
    write_up(&mut c, 8);
    c.on_server_acked(c.leg_gen().unwrap(), 3, t0);
    server(&mut c, b"echo");
    save("tcp-up-data-both-ways", &c);
    c.on_client_eof(t0);
    drain(&mut c);
    save("tcp-half-closed", &c);
    c.on_shutdown(t0 + Duration::from_millis(5));
    drain(&mut c);
    save("tcp-ending", &c);

    let mut c = new("none");
    connect(&mut c);
    client(&mut c, b"GET / HTTP/1.0\r\n\r\n");
    write_up(&mut c, 100);
    server(&mut c, b"HTTP/1.0 200 OK\r\n");
    c.on_server_eof(c.leg_gen().unwrap(), t0);
    drain(&mut c);
    save("none-server-closed", &c);

    let mut c = new("lines");
    connect(&mut c);
    server(&mut c, b"WELCOME\n");
    client(&mut c, b"GET a\nSET b 1\nINC");
    write_up(&mut c, 100);
    server(&mut c, b"a=1\nOK");
    save("lines-mid-frame", &c);

    let mut c = new("length");
    connect(&mut c);
    server(&mut c, &[0, 0, 0, 2, b'h', b'i']);
    client(&mut c, &[0, 0, 0, 3, b'a', b'b', b'c', 0, 0]);
    write_up(&mut c, 5);
    server(&mut c, &[0, 0, 0, 3, b'x']);
    save("length-mid-frame", &c);

    let mut c = new("resp");
    connect(&mut c);
    server(&mut c, b"+HELLO\r\n");
    client(
        &mut c,
        b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*3\r\n$3\r\nSET\r\n$1\r\nb",
    );
    write_up(&mut c, 100);
    server(&mut c, b"*2\r\n*1\r\n:1\r\n$3\r\nab");
    save("resp-mid-frame", &c);

    let mut c = new("resume");
    c.set_client_addr(holdfast::proto::ClientAddr::Ip(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7)),
        40000,
    ));
    connect(&mut c);
    client(&mut c, b"before the welcome");
    let hello_bytes = write_up(&mut c, 1 << 20);
    save("resume-handshake", &c);
    let mut buf = bytes::BytesMut::from(&hello_bytes[..]);
    let Some(Frame::Hello(h)) = Decoder::new(1 << 20).decode(&mut buf).unwrap() else {
        panic!("a HELLO first");
    };
    let mut w = Welcome {
        version: 1,
        resumed: false,
        restored: false,
        session_id: h.session_id,
        recv_offset: 0,
        max_frame: 4096,
        window: 1 << 16,
        heartbeat_ms: 100,
        token: [0; 32],
    };
    w.encode(&KEY, &h.token);
    let gen = c.leg_gen().unwrap();
    c.on_server_frame(gen, Frame::Welcome(w), t0);
    drain(&mut c);
    c.on_server_frame(gen, Frame::Data(Bytes::from_static(b"from the server")), t0);
    drain(&mut c);
    write_up(&mut c, 20);
    c.on_timeout(t0 + Duration::from_millis(2));
    drain(&mut c);
    save("resume-link", &c);
}

/// The valid hand-over batch seeds decode (so the check's asserts run on
/// them), and the broken ones are refused.
#[test]
fn handover_batch_seeds_decode_or_are_refused() {
    for name in [
        "valid-one-idle",
        "valid-with-leg",
        "valid-unix-two",
        "done",
        "done-with-sessions",
        "fd-count-mismatch",
        "blob-mismatch",
        "version-2",
        "unknown-kind",
        "garbage",
        "too-many",
        "valid-resumable-with-link",
        "valid-resumable-no-link",
        "resumable-without-state",
        "state-on-a-tcp-client",
        "resumable-link-fd-missing",
        "valid-with-replication",
    ] {
        let data = fs::read(corpus_dir("handover_batch").join(name)).unwrap();
        let blob = u64::from(u32::from_be_bytes([data[1], data[2], data[3], data[4]]));
        let decoded = holdfast::handover::Batch::decode(&data[5..], data[0] as usize, blob);
        assert_eq!(
            decoded.is_ok(),
            name.starts_with("valid") || name == "done",
            "{name}: {decoded:?}"
        );
    }
}
