//! The session core with a resume-protocol backend: handshake, data and acks
//! through a `Link`, a broken leg resumed with exact offsets both ways,
//! refusals and protocol errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::tests::backend;
use super::*;
use crate::config::{ResumeSettings, Secret};
use crate::proto::{Decoder, Welcome};

const KEY: [u8; 32] = [7; 32];

#[path = "resume_sim.rs"]
mod sim;

pub(super) fn resume_backend() -> Arc<BackendConfig> {
    let mut b = backend(
        AckMode::Resume(ResumeSettings {
            key: Secret(Arc::from(&KEY[..])),
            heartbeat_interval: Duration::from_millis(100),
            dead_peer_timeout: Duration::from_millis(300),
            max_frame: 4096,
            window: 1 << 16,
            resume_timeout: Duration::from_secs(300),
            early_data: true,
        }),
        1,
    );
    b.protocol = crate::config::BackendProtocol::Resume;
    Arc::new(b)
}

/// Plays the shell and a resume-aware server for one session.
struct Rig {
    core: SessionCore,
    now: Instant,
    gen: Option<Generation>,
    /// What the server received on the current leg, decoded.
    frames: Vec<Frame>,
    wire: BytesMut,
    /// The server's consumed/sent offsets.
    client_got: Vec<u8>,
    /// Export and re-import the core at the end of every pump.
    snapshots: bool,
    /// Legs may send early data (the shell knows the server speaks
    /// version 2).
    early: bool,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(b"", false)
    }

    /// A session whose client sent `first` before its first leg connected,
    /// to a server the shell knows speaks version 2 (early data).
    fn early(first: &'static [u8]) -> Rig {
        Rig::with(first, true)
    }

    fn with(first: &'static [u8], early: bool) -> Rig {
        let now = Instant::now();
        let mut core = SessionCore::new(SessionId(42), resume_backend(), 0, now);
        if !first.is_empty() {
            core.on_client_data(Bytes::from_static(first), now);
        }
        let mut r = Rig {
            core,
            now,
            gen: None,
            frames: Vec::new(),
            wire: BytesMut::new(),
            client_got: Vec::new(),
            snapshots: super::tests::SNAPSHOTS.with(|s| s.get()),
            early,
        };
        r.pump();
        r
    }

    /// Runs actions, moves bytes out of the core to the "server" and the
    /// "client".
    fn pump(&mut self) {
        loop {
            let mut progress = false;
            while let Some(a) = self.core.poll_action() {
                progress = true;
                match a {
                    Action::Connect { gen, .. } => {
                        self.gen = Some(gen);
                        self.frames.clear();
                        self.wire.clear();
                        self.core.on_connected(gen, self.early, self.now);
                    }
                    Action::CloseLeg { gen } => {
                        if self.gen == Some(gen) {
                            self.gen = None;
                        }
                    }
                    Action::ShutdownServer { .. } => panic!("resume legs send FIN frames"),
                    Action::ShutdownClient => self.core.on_client_shutdown(self.now),
                }
            }
            if let Some(gen) = self.gen {
                let mut out = Vec::new();
                self.core.next_writes_up(64, &mut out);
                let n: usize = out.iter().map(|b| b.len()).sum();
                let mut slices = [std::io::IoSlice::new(&[]); 64];
                let k = self.core.up_io_slices(&mut slices);
                assert_eq!(k, out.len(), "as many io slices as chunks");
                assert_eq!(self.core.has_up_writes(), k > 0);
                for (s, b) in slices.iter().zip(&out) {
                    assert_eq!(&s[..], &b[..], "io slices match next_writes_up");
                }
                if n > 0 {
                    progress = true;
                    for b in &out {
                        self.wire.extend_from_slice(b);
                    }
                    self.core.on_server_written(gen, n, self.now);
                    let d = Decoder::new(1 << 20);
                    while let Some(f) = d.decode(&mut self.wire).unwrap() {
                        self.frames.push(f);
                    }
                }
            }
            if let Some(b) = self.core.next_write(Dir::Down) {
                progress = true;
                self.client_got.extend_from_slice(&b);
                self.core.on_client_written(b.len(), self.now);
            }
            self.core.check_invariants();
            if !progress {
                break;
            }
        }
        if self.snapshots {
            // Events are for the shell's logs; this one drops them.
            while self.core.poll_event().is_some() {}
            let mut bytes = Vec::new();
            self.core.export(self.now, &mut bytes);
            let b = resume_backend();
            let mut core = SessionCore::import(&bytes, |_| Some(b.clone()), self.now).unwrap();
            assert!(
                super::tests::export_again(&mut core, self.now) == bytes,
                "a rebuilt core encodes to the same bytes"
            );
            self.core = core;
        }
    }

    fn hello(&self) -> Hello {
        self.frames
            .iter()
            .find_map(|f| match f {
                Frame::Hello(h) => Some(h.clone()),
                _ => None,
            })
            .expect("a HELLO")
    }

    fn welcome(&mut self, recv_offset: u64, resumed: bool) {
        self.welcome_version(1, recv_offset, resumed);
    }

    fn welcome_version(&mut self, version: u8, recv_offset: u64, resumed: bool) {
        let h = self.hello();
        let mut w = Welcome {
            version,
            resumed,
            restored: false,
            session_id: h.session_id,
            recv_offset,
            max_frame: 4096,
            window: 1 << 16,
            heartbeat_ms: 100,
            token: [0; 32],
        };
        w.encode(&KEY, &h.token);
        self.server(Frame::Welcome(w));
    }

    fn server(&mut self, f: Frame) {
        let gen = self.gen.expect("a leg");
        self.core.on_server_frame(gen, f, self.now);
        self.pump();
    }

    /// DATA bytes the server received on this leg.
    fn server_data(&self) -> Vec<u8> {
        self.frames
            .iter()
            .filter_map(|f| match f {
                Frame::Data(b) => Some(b.to_vec()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn acks(&self) -> Vec<u64> {
        self.frames
            .iter()
            .filter_map(|f| match f {
                Frame::Ack(o) => Some(*o),
                _ => None,
            })
            .collect()
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.core.on_timeout(self.now);
        self.pump();
    }
}

/// A session whose resume leg is established (and idle), for measuring.
pub(super) fn established() -> (SessionCore, Instant) {
    let mut r = Rig::new();
    r.welcome(0, false);
    while r.core.poll_event().is_some() {}
    (r.core, r.now)
}

#[test]
fn new_session_then_resume_with_exact_offsets() {
    let mut r = Rig::new();
    let h = r.hello();
    assert!(!h.resume);
    assert_eq!(h.epoch, 0);
    assert_eq!(h.session_id, 42u128.to_be_bytes());
    assert!(h.verify(&KEY));
    // Nothing but the HELLO before the WELCOME.
    r.core.on_client_data(Bytes::from_static(b"hello "), r.now);
    r.pump();
    assert!(r.server_data().is_empty());
    r.welcome(0, false);
    assert_eq!(r.server_data(), b"hello ");
    // The server answers and acknowledges.
    r.server(Frame::Data(Bytes::from_static(b"ok\n")));
    r.server(Frame::Ack(6));
    assert_eq!(r.client_got, b"ok\n");
    assert_eq!(r.core.stream(Dir::Up).acked(), 6);
    // More up bytes, unacknowledged; the down ACK goes out after ack_delay.
    r.core.on_client_data(Bytes::from_static(b"world\n"), r.now);
    r.pump();
    r.advance(Duration::from_millis(5));
    assert_eq!(r.acks(), vec![3]);
    // The leg breaks; the server had consumed "wor" (9) and had sent
    // "ok2\n" that never arrived.
    let gen = r.gen.unwrap();
    r.core.on_server_error(gen, r.now);
    r.pump();
    let h2 = r.hello();
    assert!(h2.resume, "a resume");
    assert!(h2.epoch > 0);
    assert_eq!(h2.recv_offset, 3, "the initiator has ok\\n");
    r.welcome(9, true);
    assert_eq!(
        r.server_data(),
        b"ld\n",
        "replay from the server's offset exactly"
    );
    r.server(Frame::Data(Bytes::from_static(b"ok2\n")));
    assert_eq!(r.client_got, b"ok\nok2\n");
}

#[test]
fn fins_both_ways_end_the_session() {
    let mut r = Rig::new();
    r.welcome(0, false);
    r.core.on_client_data(Bytes::from_static(b"abc"), r.now);
    r.core.on_client_eof(r.now);
    r.pump();
    assert!(r.frames.contains(&Frame::Fin(3)));
    r.server(Frame::Data(Bytes::from_static(b"xyz")));
    r.server(Frame::Fin(3));
    r.server(Frame::Ack(4));
    assert_eq!(r.client_got, b"xyz");
    assert!(r.acks().contains(&4), "the server's FIN acknowledged");
    assert_eq!(r.core.done(), Some(CloseReason::ClientClosed));
}

#[test]
fn refusals_and_protocol_errors() {
    // unknown_session: the session can't go on.
    let mut r = Rig::new();
    r.server(Frame::Refuse {
        code: ErrorCode::UnknownSession,
        reason: "gone".into(),
    });
    assert_eq!(r.core.done(), Some(CloseReason::ProtocolError));
    assert!(r.core.error().unwrap().contains("unknown_session"));
    // A WELCOME with a bad token.
    let mut r = Rig::new();
    let h = r.hello();
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
    w.encode(&[1u8; 32], &h.token);
    r.server(Frame::Welcome(w));
    assert_eq!(r.core.done(), Some(CloseReason::ProtocolError));
    // An impossible offset in the WELCOME of a resume.
    let mut r = Rig::new();
    r.welcome(0, false);
    r.core.on_client_data(Bytes::from_static(b"abcd"), r.now);
    r.pump();
    let gen = r.gen.unwrap();
    r.core.on_server_error(gen, r.now);
    r.pump();
    r.welcome(5, true);
    assert_eq!(r.core.done(), Some(CloseReason::ProtocolError));
    assert!(
        r.core.error().unwrap().contains("impossible_offset"),
        "{:?}",
        r.core.error()
    );
    // An ACK beyond what was sent.
    let mut r = Rig::new();
    r.welcome(0, false);
    r.server(Frame::Ack(10));
    assert_eq!(r.core.done(), Some(CloseReason::ProtocolError));
    // limit: retried, not fatal.
    let mut r = Rig::new();
    r.server(Frame::Refuse {
        code: ErrorCode::Limit,
        reason: "busy".into(),
    });
    assert_eq!(r.core.done(), None);
}

#[test]
fn a_silent_server_is_a_dead_leg_and_the_session_resumes() {
    let mut r = Rig::new();
    r.welcome(0, false);
    let first = r.gen;
    // Heartbeats go out while idle.
    r.advance(Duration::from_millis(100));
    assert!(r.frames.contains(&Frame::Ping));
    // Nothing from the server for dead_peer_timeout: a new leg.
    r.advance(Duration::from_millis(100));
    r.advance(Duration::from_millis(100));
    assert_ne!(r.gen, first, "a new leg after the dead peer");
    assert!(r.hello().resume);
    assert_eq!(r.core.done(), None);
}

#[test]
fn handshake_timeout_retries() {
    let mut r = Rig::new();
    let first = r.gen;
    r.advance(Duration::from_secs(1));
    assert_ne!(r.gen, first);
    assert!(!r.hello().resume, "never accepted: still a new session");
}

#[test]
fn a_server_that_keeps_refusing_ends_in_hold_timeout() {
    let mut r = Rig::new();
    for _ in 0..1000 {
        if r.core.done().is_some() {
            break;
        }
        if r.gen.is_some() && !r.frames.is_empty() {
            r.server(Frame::Refuse {
                code: ErrorCode::Limit,
                reason: "busy".into(),
            });
        }
        r.advance(Duration::from_millis(200));
    }
    assert_eq!(r.core.done(), Some(CloseReason::HoldTimeout));
}

/// Every example above again, with the core exported and rebuilt after
/// every input (at the end of each pump, a quiescent point): a rebuilt
/// session goes on exactly as the original, to the byte.
#[test]
fn examples_with_a_snapshot_after_every_input() {
    assert_eq!(
        include_str!("resume_tests.rs").matches("#[test]\n").count(),
        10 + 1,
        "a new example is listed here too"
    );
    super::tests::SNAPSHOTS.with(|s| s.set(true));
    new_session_then_resume_with_exact_offsets();
    fins_both_ways_end_the_session();
    refusals_and_protocol_errors();
    a_silent_server_is_a_dead_leg_and_the_session_resumes();
    handshake_timeout_retries();
    a_server_that_keeps_refusing_ends_in_hold_timeout();
    early_data_goes_with_a_new_sessions_hello();
    early_data_is_at_most_the_smallest_window_and_waits_without_a_v2_server();
    early_data_answered_by_version_1_is_settled_by_a_resume();
    a_snapshot_with_early_data_in_flight_is_version_2();
}

/// Early data (§3.6): to a server known to speak version 2, a new session's
/// first bytes go right after its HELLO, and so do those its client sends
/// before the WELCOME comes; the WELCOME does not make them go again.
#[test]
fn early_data_goes_with_a_new_sessions_hello() {
    let mut r = Rig::early(b"GET a\n");
    match &r.frames[..] {
        [Frame::Hello(h), Frame::Data(d)] => {
            assert!(!h.resume);
            assert_eq!((h.version_min, h.version_max), (1, 2));
            assert_eq!(&d[..], b"GET a\n");
        }
        other => panic!("expected HELLO and DATA, got {other:?}"),
    }
    r.core.on_client_data(Bytes::from_static(b"GET b\n"), r.now);
    r.pump();
    assert_eq!(r.server_data(), b"GET a\nGET b\n", "early too");
    r.welcome_version(2, 0, false);
    r.core.on_client_data(Bytes::from_static(b"GET c\n"), r.now);
    r.pump();
    assert_eq!(r.server_data(), b"GET a\nGET b\nGET c\n", "every byte once");
    r.server(Frame::Data(Bytes::from_static(b"A\nB\n")));
    r.server(Frame::Ack(18));
    assert_eq!(r.client_got, b"A\nB\n");
    assert_eq!(r.core.stream(Dir::Up).acked(), 18);
}

#[test]
fn early_data_is_at_most_the_smallest_window_and_waits_without_a_v2_server() {
    static BIG: [u8; 5000] = [b'x'; 5000];
    let mut r = Rig::early(&BIG);
    assert_eq!(r.server_data().len(), crate::proto::EARLY_DATA_MAX);
    r.core.on_client_data(Bytes::from_static(b"more"), r.now);
    r.pump();
    assert_eq!(
        r.server_data().len(),
        crate::proto::EARLY_DATA_MAX,
        "in all"
    );
    // Bytes that come after the HELLO count against the same cap.
    let mut r = Rig::early(&BIG[..1000]);
    r.core
        .on_client_data(Bytes::from_static(&BIG[..100]), r.now);
    r.pump();
    assert_eq!(r.server_data().len(), crate::proto::EARLY_DATA_MAX);
    // Unknown server (no early data): the HELLO alone.
    let r = Rig::with(b"GET a\n", false);
    assert!(matches!(&r.frames[..], [Frame::Hello(_)]), "{:?}", r.frames);
}

/// A server that answers early data with a version 1 WELCOME (an older
/// build took the address): the leg is given up, and the next one resumes
/// the session from wherever that server says it is, so nothing is lost or
/// doubled whether it read the early bytes or not.
#[test]
fn early_data_answered_by_version_1_is_settled_by_a_resume() {
    for server_read_it in [true, false] {
        let mut r = Rig::early(b"GET a\n");
        let first = r.gen;
        r.welcome_version(1, 0, false);
        for _ in 0..100 {
            if r.gen != first && r.gen.is_some() {
                break;
            }
            r.advance(Duration::from_millis(1));
        }
        assert_ne!(r.gen, first, "a new leg");
        let h = r.hello();
        assert!(h.resume, "the session exists on the server now");
        let consumed = if server_read_it { 6 } else { 0 };
        r.welcome_version(1, consumed, true);
        let want: &[u8] = if server_read_it { b"" } else { b"GET a\n" };
        assert_eq!(r.server_data(), want);
        r.core.on_client_data(Bytes::from_static(b"GET b\n"), r.now);
        r.pump();
        let want: &[u8] = if server_read_it {
            b"GET b\n"
        } else {
            b"GET a\nGET b\n"
        };
        assert_eq!(r.server_data(), want);
    }
}

/// A build that reads only snapshot version 1 would take the WELCOME's
/// offset 0 after early data as a rewind: a session whose new leg may send
/// early data until its WELCOME is written as version 2 (refused there),
/// any other as 1; version 2 is what carries that leg's permission.
#[test]
fn a_snapshot_with_early_data_in_flight_is_version_2() {
    let version = |r: &mut Rig| {
        // (At a quiescent point: events are for the shell's logs.)
        while r.core.poll_event().is_some() {}
        let mut b = Vec::new();
        r.core.export(r.now, &mut b);
        b[4]
    };
    let mut r = Rig::early(b"GET a\n");
    assert_eq!(version(&mut r), 2);
    r.welcome_version(2, 0, false);
    assert_eq!(version(&mut r), 1);
    let mut r = Rig::early(b"");
    assert_eq!(version(&mut r), 2, "no bytes yet, but they may go early");
    let mut r = Rig::with(b"GET a\n", false);
    assert_eq!(version(&mut r), 1, "a HELLO alone");
}
