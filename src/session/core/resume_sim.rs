//! A seeded simulation of the session core with a resume-protocol backend.
//!
//! A client streams random bytes; a model server that speaks the protocol
//! (its own [`Link`] and [`Stream`], a session that outlives its transports)
//! consumes them exactly once and echoes them. Transports are cut (reset or
//! FIN), connects refused, HELLOs refused for now (`limit`) or as a session
//! that already exists; every write and delivery is partial and time moves at
//! random, so heartbeats, dead peers and delayed ACKs happen too. After every
//! step the core's invariants hold, the client has a prefix of its own
//! stream back and the server a prefix of it; at the end both have all of it.
//!
//! As in `sim.rs`, every seed also runs with the core exported and rebuilt
//! at random quiescent points, and both runs must be identical.

use bytes::{Bytes, BytesMut};

use super::super::tests::sim::{assert_same, run_seeds_with, Rng, Tally};
use super::*;
use crate::proto::{Decoder, Link, LinkConfig, Welcome};
use crate::stream::Stream;

/// The server's side of a transport.
#[derive(Debug, Default)]
struct Wire {
    /// The connect was answered.
    resolved: bool,
    /// The core closed it (`CloseLeg`).
    closed: bool,
    /// Cut by the simulation (the core was told).
    cut: bool,
    /// The server refused its HELLO: it reads nothing more on it (early
    /// data included), as a real acceptor closes after a REFUSE.
    refused: bool,
    /// Everything the core wrote on it.
    written: Vec<u8>,
    /// Written by the core, not yet decoded by the server.
    to_server: BytesMut,
    /// Written by the server, not yet delivered to the core.
    to_core: BytesMut,
}

/// A resume-aware server holding the one session.
struct Server {
    /// The client's bytes it consumed (and acknowledges), in order.
    got: Vec<u8>,
    /// Its stream to the client: the echo of what it consumed.
    down: Stream,
    /// It has welcomed the session once.
    known: bool,
    /// The leg its link serves, and the link.
    link: Option<(Generation, Link)>,
}

struct RSim {
    rng: Rng,
    core: SessionCore,
    backend: Arc<BackendConfig>,
    now: Instant,
    t0: Instant,
    /// Indexed by generation.
    wires: Vec<Wire>,
    srv: Server,
    plan: Vec<u8>,
    client_tx: usize,
    client_rx: Vec<u8>,
    client_fin: bool,
    events: Vec<Event>,
    calm_after: u64,
    /// Per server: refuses connects until then.
    down_until: Instant,
    snaps: Option<(Rng, Tally)>,
}

fn server_link_config() -> LinkConfig {
    LinkConfig {
        max_frame: 4096,
        window: 1 << 16,
        heartbeat: Duration::from_millis(50),
        // The model server never gives up on a transport itself.
        dead_peer_timeout: Duration::from_secs(3600),
        ack_delay: Duration::from_millis(5),
    }
}

impl RSim {
    fn new(seed: u64, snapshots: bool) -> RSim {
        let mut rng = Rng::new(seed);
        let mut cfg = (*resume_backend()).clone();
        cfg.buffer_limit = rng.range(256, 8192);
        cfg.hold_timeout = Duration::from_secs(3600);
        cfg.retry_initial = Duration::from_millis(rng.range(1, 5));
        cfg.retry_max = Duration::from_millis(rng.range(5, 200));
        let backend = Arc::new(cfg);
        let n = rng.range(0, 20_000);
        let plan = (0..n).map(|_| rng.next() as u8).collect();
        let t0 = Instant::now();
        let core = SessionCore::new(SessionId(0xfeed_beef), backend.clone(), 0, t0);
        let mut sim = RSim {
            calm_after: rng.range(50, 3000),
            rng,
            core,
            backend,
            now: t0,
            t0,
            wires: Vec::new(),
            srv: Server {
                got: Vec::new(),
                down: Stream::new(),
                known: false,
                link: None,
            },
            plan,
            client_tx: 0,
            client_rx: Vec::new(),
            client_fin: false,
            events: Vec::new(),
            down_until: t0,
            snaps: snapshots.then(|| (Rng::new(seed ^ 0x5eed_5a9e), Tally::default())),
        };
        sim.drain();
        sim
    }

    /// Carries out the core's actions and collects its events.
    fn drain(&mut self) {
        loop {
            while let Some(e) = self.core.poll_event() {
                self.events.push(e);
            }
            let Some(action) = self.core.poll_action() else {
                break;
            };
            match action {
                Action::Connect { gen, .. } if (gen.0 as usize) < self.wires.len() => {
                    let w = &self.wires[gen.0 as usize];
                    assert!(!w.resolved && !w.closed, "connect {gen} issued again");
                }
                Action::Connect { gen, .. } => {
                    assert_eq!(gen.0 as usize, self.wires.len(), "generations count up");
                    self.wires.push(Wire::default());
                }
                Action::CloseLeg { gen } => {
                    self.wires[gen.0 as usize].closed = true;
                    self.server_lost(gen);
                }
                Action::ShutdownServer { .. } => panic!("resume legs send FIN frames"),
                Action::ShutdownClient => {
                    assert!(!self.client_fin, "two FINs to the client");
                    assert_eq!(
                        self.client_rx.len() as u64,
                        self.core.stream(Dir::Down).read()
                    );
                    self.client_fin = true;
                    self.core.on_client_shutdown(self.now);
                }
            }
        }
    }

    /// The server's end of transport `gen` is gone.
    fn server_lost(&mut self, gen: Generation) {
        if self.srv.link.as_ref().is_some_and(|(g, _)| *g == gen) {
            self.srv.link = None;
        }
    }

    fn calm(&self, step: u64) -> bool {
        step >= self.calm_after
    }

    /// The current leg, if up and its transport alive.
    fn live_leg(&self) -> Option<Generation> {
        let gen = self.core.leg_gen()?;
        let w = &self.wires[gen.0 as usize];
        (!w.closed && !w.cut).then_some(gen)
    }

    /// The server reads and handles every whole frame on `gen`.
    fn server_reads(&mut self, gen: Generation, calm: bool) {
        let d = Decoder::new(1 << 20);
        loop {
            let buf = &mut self.wires[gen.0 as usize].to_server;
            let Some(frame) = d.decode(buf).expect("the core sends valid frames") else {
                return;
            };
            self.server_frame(gen, frame, calm);
        }
    }

    fn server_frame(&mut self, gen: Generation, frame: Frame, calm: bool) {
        let now = self.now;
        if self.wires[gen.0 as usize].refused {
            return;
        }
        if let Frame::Hello(h) = frame {
            let version = h.check(&KEY).expect("a valid HELLO");
            // Now and then a server that speaks only version 1 (one that
            // was replaced by an older build): it reads early data as the
            // DATA after its WELCOME, and the core must not count on it.
            let version = if !calm && self.rng.pct(10) {
                1
            } else {
                version
            };
            let answer = if !h.resume && self.srv.known {
                Frame::Refuse {
                    code: ErrorCode::SessionExists,
                    reason: "already welcomed".into(),
                }
            } else if !calm && self.rng.pct(10) {
                Frame::Refuse {
                    code: ErrorCode::Limit,
                    reason: "busy".into(),
                }
            } else {
                let srv = &mut self.srv;
                assert!(
                    (srv.down.acked()..=srv.down.read()).contains(&h.recv_offset),
                    "the core resumes our stream where we have it"
                );
                srv.down.resume_from(h.recv_offset);
                srv.known = true;
                let mut w = Welcome {
                    version,
                    resumed: h.resume,
                    restored: false,
                    session_id: h.session_id,
                    recv_offset: srv.got.len() as u64,
                    max_frame: 4096,
                    window: 1 << 16,
                    heartbeat_ms: 50,
                    token: [0; 32],
                };
                let bytes = w.encode(&KEY, &h.token);
                let link = Link::new(
                    server_link_config(),
                    h.max_frame,
                    h.window,
                    srv.got.len() as u64,
                    now,
                );
                srv.link = Some((gen, link));
                self.wires[gen.0 as usize].to_core.extend_from_slice(&bytes);
                return;
            };
            let mut b = BytesMut::new();
            proto::encode(&answer, &mut b);
            self.wires[gen.0 as usize].to_core.extend_from_slice(&b);
            self.wires[gen.0 as usize].refused = true;
            return;
        }
        let srv = &mut self.srv;
        let Some((g, link)) = &mut srv.link else {
            panic!("{frame:?} before the WELCOME");
        };
        assert_eq!(*g, gen, "a frame on a transport the server closed");
        match link.on_frame(frame, &mut srv.down, now) {
            Ok(Incoming::Data(b)) => {
                srv.got.extend_from_slice(&b);
                srv.down.push(b);
            }
            Ok(Incoming::Fin(_)) => srv.down.set_fin(),
            Ok(Incoming::Acked(_) | Incoming::Ping) => {}
            Ok(Incoming::Abort { code, reason }) => panic!("the core aborted: {code}: {reason}"),
            Err(e) => panic!("the core broke the protocol: {e}"),
        }
    }

    /// The server writes part of what it has queued on `gen`, and the core
    /// reads every whole frame that arrived (while it wants to read).
    fn server_writes(&mut self, gen: Generation) {
        let now = self.now;
        let srv = &mut self.srv;
        if let Some((g, link)) = &mut srv.link {
            if *g == gen {
                let (fin, consumed) = (srv.down.fin_read(), srv.got.len() as u64);
                link.fill(&mut srv.down, fin, consumed, now);
                let mut chunks = Vec::new();
                link.wire(usize::MAX, &mut chunks);
                let all: Vec<u8> = chunks.concat();
                if !all.is_empty() {
                    let n = self.rng.range(1, all.len().min(3000) as u64) as usize;
                    link.on_written(n, now);
                    self.wires[gen.0 as usize]
                        .to_core
                        .extend_from_slice(&all[..n]);
                }
            }
        }
        let d = Decoder::new(self.core.max_frame_in());
        while self.core.leg_gen() == Some(gen) && self.core.want_read_server() {
            let buf = &mut self.wires[gen.0 as usize].to_core;
            let Some(frame) = d.decode(buf).expect("the server sends valid frames") else {
                break;
            };
            self.core.on_server_frame(gen, frame, now);
            self.drain();
        }
    }

    /// Moves bytes: the core to the server (partial), the core to the
    /// client (partial).
    fn write_up(&mut self, max: usize, calm: bool) {
        let Some(gen) = self.live_leg() else { return };
        let mut chunks = Vec::new();
        self.core.next_writes_up(16, &mut chunks);
        let all: Vec<u8> = chunks.concat();
        if all.is_empty() {
            return;
        }
        let n = all.len().min(max);
        let w = &mut self.wires[gen.0 as usize];
        w.written.extend_from_slice(&all[..n]);
        w.to_server.extend_from_slice(&all[..n]);
        self.core.on_server_written(gen, n, self.now);
        self.drain();
        self.server_reads(gen, calm);
    }

    fn write_down(&mut self, max: usize) {
        let Some(b) = self.core.next_write(Dir::Down) else {
            return;
        };
        assert!(!self.client_fin, "bytes after the FIN to the client");
        let n = b.len().min(max);
        self.client_rx.extend_from_slice(&b[..n]);
        self.core.on_client_written(n, self.now);
        self.drain();
    }

    fn step(&mut self, step: u64) {
        let calm = self.calm(step);
        let now = self.now;
        match self.rng.below(100) {
            // The client sends a chunk, or closes once it sent everything.
            0..=12 => {
                if self.client_tx < self.plan.len() && self.core.want_read_client() {
                    let n = (self.rng.range(1, 600) as usize).min(self.plan.len() - self.client_tx);
                    let chunk = Bytes::copy_from_slice(&self.plan[self.client_tx..][..n]);
                    self.client_tx += n;
                    self.core.on_client_data(chunk, now);
                }
            }
            13..=14 => {
                if self.client_tx == self.plan.len() && !self.core.stream(Dir::Up).fin_read() {
                    self.core.on_client_eof(now);
                }
            }
            15..=29 => {
                let max = self.rng.range(1, 2000) as usize;
                self.write_up(max, calm);
            }
            30..=41 => {
                let max = self.rng.range(1, 2000) as usize;
                self.write_down(max);
            }
            // A connect attempt is answered.
            42..=49 => {
                let Some(gen) = self.wires.len().checked_sub(1) else {
                    return;
                };
                let gen = Generation(gen as u64);
                let w = &mut self.wires[gen.0 as usize];
                if w.resolved || w.closed {
                    return;
                }
                w.resolved = true;
                if !calm && (now < self.down_until || self.rng.pct(10)) {
                    self.core
                        .on_connect_failed(gen, LegFailure::ConnectRefused, now);
                } else {
                    let early = self.rng.pct(50);
                    self.core.on_connected(gen, early, now);
                }
            }
            50..=64 => {
                if let Some(gen) = self.live_leg() {
                    self.server_writes(gen);
                }
            }
            // The transport is cut; the server may be unreachable a while.
            65..=67 => {
                if calm {
                    return;
                }
                let Some(gen) = self.live_leg() else { return };
                self.wires[gen.0 as usize].cut = true;
                self.server_lost(gen);
                if self.rng.pct(50) {
                    self.core.on_server_error(gen, now);
                } else {
                    self.core.on_server_eof(gen, now);
                }
                if self.rng.pct(30) {
                    self.down_until = now + Duration::from_millis(self.rng.range(1, 300));
                }
            }
            // A stale generation speaks.
            68..=70 => {
                let newest = self.wires.len() as u64;
                if newest < 2 {
                    return;
                }
                let gen = Generation(self.rng.below(newest - 1));
                if Some(gen) == self.core.leg_gen() {
                    return;
                }
                match self.rng.below(5) {
                    0 => self.core.on_server_frame(gen, Frame::Ping, now),
                    1 => self.core.on_server_error(gen, now),
                    2 => self.core.on_server_eof(gen, now),
                    3 => self.core.on_connected(gen, false, now),
                    _ => self
                        .core
                        .on_connect_failed(gen, LegFailure::ConnectError, now),
                }
            }
            // Time passes; timers fire.
            71..=88 => {
                self.now += Duration::from_micros(self.rng.below(20_000));
                self.core.on_timeout(self.now);
            }
            _ => {
                // Jumping to a handshake timeout (a second away) only now
                // and then: most WELCOMEs come in time.
                let far = self.rng.pct(15);
                if let Some(d) = self.core.deadline() {
                    if d <= now + Duration::from_millis(if far { 1000 } else { 100 }) {
                        self.now = self.now.max(d);
                        self.core.on_timeout(self.now);
                    }
                }
            }
        }
        self.drain();
    }

    fn check(&self) {
        self.core.check_invariants();
        assert!(
            self.plan[..self.client_tx].starts_with(&self.client_rx),
            "the client got a byte it wasn't owed, out of order or twice"
        );
        assert!(
            self.plan[..self.client_tx].starts_with(&self.srv.got),
            "the server got a byte that is not the client's, or twice"
        );
    }

    fn check_end(&self) {
        assert_eq!(self.core.done(), Some(CloseReason::ClientClosed));
        assert!(self.client_fin, "the client got no FIN");
        assert_eq!(
            self.client_tx,
            self.plan.len(),
            "the client sent everything"
        );
        assert!(
            self.srv.got == self.plan,
            "the server got the client's stream"
        );
        assert!(self.client_rx == self.plan, "the client got the echo");
    }

    /// Replaces the core by one rebuilt from its snapshot.
    fn reimport(&mut self) {
        let mut bytes = Vec::new();
        self.core.export(self.now, &mut bytes);
        let b = self.backend.clone();
        let mut core = SessionCore::import(&bytes, |_| Some(b.clone()), self.now)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            super::super::tests::export_again(&mut core, self.now) == bytes,
            "a rebuilt core encodes to the same bytes"
        );
        self.core = core;
        self.drain();
    }
}

/// What a run produced.
#[derive(Debug, PartialEq)]
struct Outcome {
    client_rx: Vec<u8>,
    server_got: Vec<u8>,
    /// Per transport: answered, closed, cut, what the core wrote on it.
    wires: Vec<(bool, bool, bool, Vec<u8>)>,
    events: Vec<Event>,
    done: Option<CloseReason>,
    steps: u64,
    elapsed: Duration,
    state: Vec<u8>,
}

fn run(seed: u64, snapshots: bool) -> (Outcome, u64, Tally) {
    let mut sim = RSim::new(seed, snapshots);
    let mut step = 0;
    while sim.core.done().is_none() {
        sim.step(step);
        sim.check();
        if let Some((rng, tally)) = &mut sim.snaps {
            if rng.pct(20) {
                tally.add(&sim.core);
                sim.reimport();
                sim.check();
            }
        }
        step += 1;
        assert!(step < 400_000, "the session never ended: {:?}", sim.core);
    }
    assert!(sim.core.deadline().is_none());
    sim.check_end();
    let mut state = Vec::new();
    sim.core.export(sim.now, &mut state);
    let legs = sim.wires.iter().filter(|w| !w.written.is_empty()).count() as u64;
    let outcome = Outcome {
        client_rx: sim.client_rx,
        server_got: sim.srv.got,
        wires: sim
            .wires
            .into_iter()
            .map(|w| (w.resolved, w.closed, w.cut, w.written))
            .collect(),
        events: sim.events,
        done: sim.core.done(),
        steps: step,
        elapsed: sim.now - sim.t0,
        state,
    };
    (outcome, legs, sim.snaps.map(|(_, t)| t).unwrap_or_default())
}

#[test]
fn sim_resume() {
    let t = run_seeds_with(
        1,
        |_| (),
        |seed, (), snapshots| run(seed, snapshots),
        |a: &Outcome, b| {
            assert_same("the bytes the client got", &a.client_rx, &b.client_rx);
            assert_same("the bytes the server got", &a.server_got, &b.server_got);
            assert_same("the transports", &a.wires, &b.wires);
            assert_same("the events", &a.events, &b.events);
            assert_same("the outcome", a, b);
        },
    );
    assert!(
        t.waiting > 0 && t.connecting > 0 && t.handshake > 0 && t.link > 0 && t.half_closed > 0,
        "{t:?}"
    );
}
