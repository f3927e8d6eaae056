//! A seeded simulation of random interleavings of the session core.
//!
//! For each seed, a client sends random bytes (`none`, `tcp`) or requests
//! (`response` with lines, length-prefixed or RESP frames, with or without
//! a greeting, a preamble and "try again" responses) in random chunks, a
//! model server per leg consumes and answers them, crashes (reset or FIN),
//! refuses connects for a while, and every write is partial; time moves at
//! random. After every step the core's invariants are checked, and at the
//! end the bytes each side got are compared with what it was owed.
//!
//! Every seed runs twice: once as is, and once with the core exported and
//! rebuilt from its snapshot at random quiescent points (a hand-over to a
//! new process). Both runs must be identical: the bytes every server and
//! the client got, the events, the close reason, the final state. A failure
//! names its seed; set `HOLDFAST_SIM_SEEDS` to run more seeds, and
//! `HOLDFAST_SIM_SEED=N` (with `HOLDFAST_SIM_TRACE=1` for every step) to
//! run seed N alone.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::framing::Scanner;

use super::*;

/// xorshift64*: tiny, deterministic, good enough to pick steps.
pub(in crate::session::core) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `p` percent.
    pub fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `ack = "none"`: a plain proxy; the server echoes what it consumed,
    /// and its failure ends the session.
    None,
    /// `ack = "tcp"`; the server echoes what it consumed when `echo`.
    Tcp { echo: bool },
    /// `ack = "response"`; the server answers each request with itself.
    Response {
        framing: Fr,
        greeting: bool,
        preamble: bool,
        /// The server sometimes answers "try again" (`retry_responses`).
        retry: bool,
    },
}

/// The framings of `Kind::Response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fr {
    Lines,
    Length,
    Resp,
}

impl Fr {
    fn framing(self) -> Framing {
        match self {
            Fr::Lines => Framing::Lines { max_frame: 64 },
            Fr::Length => Framing::LengthPrefixed(LengthPrefixed {
                length_field_offset: 0,
                length_field_length: 4,
                big_endian: true,
                length_adjustment: 0,
                max_frame: 128,
            }),
            Fr::Resp => Framing::Resp { max_frame: 128 },
        }
    }

    /// One frame carrying `payload` (a request, and its echo as response).
    fn frame(self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Fr::Lines => {
                out.extend_from_slice(payload);
                out.push(b'\n');
            }
            Fr::Length => {
                out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                out.extend_from_slice(payload);
            }
            Fr::Resp => {
                out.extend_from_slice(
                    format!("*2\r\n$4\r\nECHO\r\n${}\r\n", payload.len()).as_bytes(),
                );
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    /// The "not processed, try again" response, and its configured prefix.
    fn retry(self) -> (Vec<u8>, Vec<u8>) {
        match self {
            Fr::Lines => (b"LOADING\n".to_vec(), b"LOADING".to_vec()),
            Fr::Length => {
                let f = self.frame(b"LOADING");
                (f.clone(), f)
            }
            Fr::Resp => (b"-LOADING wait\r\n".to_vec(), b"-LOADING".to_vec()),
        }
    }

    /// Offsets just past each whole frame of `data`.
    fn ends(self, data: &[u8]) -> Vec<u64> {
        let mut ends = Vec::new();
        Scanner::new(&self.framing())
            .scan(data, &mut ends)
            .expect("the simulation's frames are well formed");
        ends
    }
}

/// The greeting's payload (`greeting = 1`).
const GREETING: &[u8] = b"HELLO from the server";

/// The model server behind one leg.
#[derive(Debug, Default)]
struct SrvLeg {
    /// Bytes of the leg's `rx` consumed (tcp: and acked) or scanned (lines).
    consumed: usize,
    /// Bytes the server has yet to write back.
    out: VecDeque<u8>,
    /// It answered "try again": it answers nothing more on this leg.
    retrying: bool,
    /// It closed its side (or crashed with a FIN): it sends nothing more.
    fin: bool,
}

/// Partial writes, one at a time, for the simulation.
impl Harness {
    fn write_up_once(&mut self, max: usize) -> bool {
        let (Some(gen), Some(bytes)) = (self.core.leg_gen(), self.core.next_write(Dir::Up)) else {
            assert!(
                !self.core.has_up_writes(),
                "has_up_writes matches next_write"
            );
            return false;
        };
        assert!(
            self.core.has_up_writes(),
            "has_up_writes matches next_write"
        );
        let mut slices = [std::io::IoSlice::new(&[]); 4];
        let k = self.core.up_io_slices(&mut slices);
        assert!(
            k > 0 && slices[0][..] == bytes[..],
            "io slices match next_write"
        );
        let n = bytes.len().min(max);
        let leg = &mut self.legs[gen.0 as usize];
        assert!(!leg.closed && !leg.fin, "write to a dead leg {gen}");
        leg.rx.extend_from_slice(&bytes[..n]);
        let sent = self.core.stream(Dir::Up).sent();
        self.core.on_server_written(gen, n, self.now);
        let stream_bytes = self.core.stream(Dir::Up).sent() - sent;
        self.legs[gen.0 as usize].pre += n - stream_bytes as usize;
        self.pump();
        true
    }

    fn write_down_once(&mut self, max: usize) -> bool {
        let Some(bytes) = self.core.next_write(Dir::Down) else {
            return false;
        };
        assert!(!self.client_fin, "bytes after the FIN to the client");
        let mut slices = [std::io::IoSlice::new(&[]); 4];
        let k = self.core.down_io_slices(&mut slices);
        assert!(
            k > 0 && slices[0][..] == bytes[..],
            "io slices match next_write"
        );
        let n = bytes.len().min(max);
        self.client_rx.extend_from_slice(&bytes[..n]);
        self.core.on_client_written(n, self.now);
        self.pump();
        true
    }
}

struct Sim {
    rng: Rng,
    kind: Kind,
    h: Harness,
    /// Model state per generation (default for legs never connected).
    srv: Vec<SrvLeg>,
    /// Per server: refuses connects until then.
    down_until: Vec<Instant>,
    /// What the client will send, and how much of it it has.
    plan: Vec<u8>,
    /// What the client must receive in the end.
    expect: Vec<u8>,
    /// Response mode: where the frames of `expect` end (the client may
    /// only ever have whole frames).
    expect_ends: Vec<u64>,
    /// After this many steps nothing fails any more, so the session can end.
    calm_after: u64,
    /// When snapshotting: its own generator (the run's steps draw the same
    /// numbers as without), and what the snapshots caught.
    snaps: Option<(Rng, Tally)>,
    /// How many bytes `check` compared: of the client's, of each leg's.
    checked: (usize, Vec<usize>),
    /// A server crashed.
    crashed: bool,
}

impl Sim {
    fn new(seed: u64, kind: Kind, snapshots: bool) -> Sim {
        let mut rng = Rng::new(seed);
        let servers = rng.range(1, 3) as usize;
        let mut cfg = backend(AckMode::Tcp, servers);
        let mut plan = Vec::new();
        let mut expect = Vec::new();
        let mut expect_ends = Vec::new();
        match kind {
            Kind::None | Kind::Tcp { .. } => {
                if kind == Kind::None {
                    cfg.ack = AckMode::None;
                }
                let n = rng.range(0, 3000);
                plan.extend((0..n).map(|_| rng.next() as u8));
                if matches!(kind, Kind::None | Kind::Tcp { echo: true }) {
                    expect.extend_from_slice(&plan);
                }
            }
            Kind::Response {
                framing,
                greeting,
                preamble,
                retry,
            } => {
                cfg.ack = AckMode::Response(framing.framing());
                cfg.greeting = greeting as u32;
                cfg.preamble = preamble as u32;
                if retry {
                    cfg.retry_responses = vec![framing.retry().1];
                }
                for i in 0..rng.range(0, 150) {
                    let pad = rng.below(20) as usize;
                    let mut payload = format!("r{i}-").into_bytes();
                    payload.extend((0..pad).map(|_| b'a' + rng.below(26) as u8));
                    plan.extend_from_slice(&framing.frame(&payload));
                }
                if greeting {
                    expect.extend_from_slice(&framing.frame(GREETING));
                }
                expect.extend_from_slice(&plan);
                expect_ends = framing.ends(&expect);
            }
        }
        cfg.buffer_limit = rng.range(64, 4096);
        cfg.hold_timeout = Duration::from_secs(3600);
        cfg.retry_initial = Duration::from_millis(rng.range(1, 5));
        cfg.retry_max = Duration::from_millis(rng.range(5, 200));
        let mut h = Harness::new(cfg);
        h.stall_up = true;
        h.stall_down = true;
        let now = h.now;
        Sim {
            calm_after: rng.range(50, 3000),
            rng,
            kind,
            h,
            srv: Vec::new(),
            down_until: vec![now; servers],
            plan,
            expect,
            expect_ends,
            snaps: snapshots.then(|| (Rng::new(seed ^ 0x5eed_5a9e), Tally::default())),
            checked: (0, Vec::new()),
            crashed: false,
        }
    }

    fn calm(&self, step: u64) -> bool {
        step >= self.calm_after
    }

    /// The model of the current leg, if one is up.
    fn up_leg(&self) -> Option<Generation> {
        self.h.core.leg_gen()
    }

    fn srv(&mut self, gen: Generation) -> &mut SrvLeg {
        while self.srv.len() <= gen.0 as usize {
            self.srv.push(SrvLeg::default());
        }
        &mut self.srv[gen.0 as usize]
    }

    /// Whether the current leg's server has done everything it was asked
    /// and got the client's FIN: it may close normally.
    fn server_finished(&mut self, gen: Generation) -> bool {
        let leg = &self.h.legs[gen.0 as usize];
        let (fin, rx) = (leg.fin, leg.rx.len());
        let s = self.srv(gen);
        fin && s.consumed == rx && s.out.is_empty()
    }

    fn step(&mut self, step: u64) {
        let calm = self.calm(step);
        let r = self.rng.below(100);
        let now = self.h.now;
        if std::env::var_os("HOLDFAST_SIM_TRACE").is_some() {
            eprintln!(
                "step {step} r {r} {:?} rx {} ev {:?}",
                self.h.core,
                self.h.client_rx.len(),
                self.h.events.last()
            );
        }
        match r {
            // The client sends a chunk.
            0..=14 => {
                let sent = self.h.client_tx.len();
                if sent < self.plan.len() && self.h.core.want_read_client() {
                    let n = (self.rng.range(1, 40) as usize).min(self.plan.len() - sent);
                    let chunk = self.plan[sent..sent + n].to_vec();
                    self.h.client(&chunk);
                }
            }
            // The client closes once it has sent everything.
            15..=16 => {
                if self.h.client_tx.len() == self.plan.len()
                    && !self.h.core.stream(Dir::Up).fin_read()
                {
                    self.h.client_eof();
                }
            }
            // Partial writes to the server and to the client.
            17..=31 => {
                let max = self.rng.range(1, 64) as usize;
                self.h.write_up_once(max);
            }
            32..=44 => {
                let max = self.rng.range(1, 64) as usize;
                self.h.write_down_once(max);
            }
            // A connect attempt is answered.
            45..=52 => {
                let Some(gen) = self.h.legs.len().checked_sub(1) else {
                    return;
                };
                let gen = Generation(gen as u64);
                let leg = &self.h.legs[gen.0 as usize];
                if leg.resolved || leg.closed {
                    return;
                }
                let server = leg.server;
                let refuse = !calm && (now < self.down_until[server] || self.rng.pct(10));
                if refuse {
                    let reason = match self.rng.below(3) {
                        0 => LegFailure::ConnectRefused,
                        1 => LegFailure::ConnectTimeout,
                        _ => LegFailure::ConnectError,
                    };
                    self.h.legs[gen.0 as usize].resolved = true;
                    self.h.core.on_connect_failed(gen, reason, now);
                    self.h.pump();
                } else {
                    self.h.connected(gen);
                    if let Kind::Response {
                        framing,
                        greeting: true,
                        ..
                    } = self.kind
                    {
                        self.srv(gen).out.extend(framing.frame(GREETING));
                    }
                }
            }
            // The server consumes (and, tcp, acks) what it received.
            53..=64 => {
                let Some(gen) = self.up_leg() else { return };
                if self.srv(gen).fin {
                    return;
                }
                let rx_len = self.h.legs[gen.0 as usize].rx.len();
                match self.kind {
                    Kind::None | Kind::Tcp { .. } => {
                        let echo = !matches!(self.kind, Kind::Tcp { echo: false });
                        let consumed = self.srv(gen).consumed;
                        let k = self.rng.range(0, (rx_len - consumed) as u64) as usize;
                        if k == 0 {
                            return;
                        }
                        let bytes = self.h.legs[gen.0 as usize].rx[consumed..consumed + k].to_vec();
                        // The echo of what the server consumed reaches the
                        // core before the ack: otherwise a crash in between
                        // loses it, as tcp mode documents.
                        self.srv(gen).consumed += k;
                        if echo {
                            self.h.server(gen, &bytes);
                        }
                        self.h.acked(gen, (consumed + k) as u64);
                    }
                    Kind::Response { framing, retry, .. } => {
                        // Answer every whole request received, or (now and
                        // then) the first one with "try again".
                        let consumed = self.srv(gen).consumed;
                        if self.srv(gen).retrying {
                            return;
                        }
                        let rx = self.h.legs[gen.0 as usize].rx[consumed..].to_vec();
                        let ends = framing.ends(&rx);
                        let Some(&last) = ends.last() else { return };
                        if retry && !calm && self.rng.pct(15) {
                            let s = self.srv(gen);
                            s.out.extend(framing.retry().0);
                            s.retrying = true;
                        } else {
                            let s = self.srv(gen);
                            s.consumed += last as usize;
                            s.out.extend(&rx[..last as usize]);
                        }
                    }
                }
            }
            // The server writes some of its answers.
            65..=79 => {
                let Some(gen) = self.up_leg() else { return };
                if !self.h.core.want_read_server() {
                    return;
                }
                let want = self.rng.range(1, 48) as usize;
                let out = &mut self.srv(gen).out;
                if out.is_empty() {
                    return;
                }
                let n = want.min(out.len());
                let chunk: Vec<u8> = out.drain(..n).collect();
                self.h.server(gen, &chunk);
            }
            // The server closes normally once it is done.
            80..=83 => {
                let Some(gen) = self.up_leg() else { return };
                if !self.srv(gen).fin && self.server_finished(gen) {
                    self.srv(gen).fin = true;
                    self.h.server_eof(gen);
                }
            }
            // The server crashes (and maybe stays down a while).
            84..=86 => {
                if calm {
                    return;
                }
                let Some(gen) = self.up_leg() else { return };
                let server = self.h.legs[gen.0 as usize].server;
                if self.kind == Kind::None && self.rng.pct(80) {
                    // A plain proxy's session ends with its server: rarer.
                    return;
                }
                self.crashed = true;
                if self.rng.pct(50) || self.srv(gen).fin {
                    self.h.server_error(gen);
                } else {
                    self.srv(gen).fin = true;
                    self.h.server_eof(gen);
                }
                if self.rng.pct(50) {
                    self.down_until[server] = now + Duration::from_millis(self.rng.range(1, 300));
                }
            }
            // A stale generation speaks.
            87..=89 => {
                let newest = self.h.legs.len() as u64;
                if newest < 2 {
                    return;
                }
                let gen = Generation(self.rng.below(newest - 1));
                if Some(gen) == self.up_leg() {
                    return;
                }
                let core = &mut self.h.core;
                match self.rng.below(6) {
                    0 => core.on_server_data(gen, Bytes::from_static(b"STALE\n"), now),
                    1 => core.on_server_eof(gen, now),
                    2 => core.on_server_error(gen, now),
                    3 => core.on_server_acked(gen, self.rng.below(1 << 20), now),
                    4 => core.on_connected(gen, false, now),
                    _ => core.on_connect_failed(gen, LegFailure::ConnectRefused, now),
                }
                self.h.pump();
            }
            // Time passes; timers fire.
            90..=95 => self
                .h
                .advance(Duration::from_micros(self.rng.below(20_000))),
            _ => {
                if let Some(d) = self.h.core.deadline() {
                    if d <= now + Duration::from_secs(1) {
                        self.h.fire_deadline();
                    }
                }
            }
        }
    }

    /// What must hold after every step.
    /// (Incremental: each byte is compared once.)
    fn check(&mut self) {
        let h = &self.h;
        h.core.check_invariants();
        let (from, to) = (self.checked.0, h.client_rx.len());
        assert!(
            to <= self.expect.len() && h.client_rx[from..] == self.expect[from..to],
            "the client got a byte it wasn't owed, out of order or twice"
        );
        self.checked.0 = to;
        let down_read = h.core.stream(Dir::Down).read();
        if let Kind::Response { .. } = self.kind {
            assert!(
                down_read == 0 || self.expect_ends.binary_search(&down_read).is_ok(),
                "half a response frame was released towards the client"
            );
        }
        // Every leg got the client's stream from its base, in order.
        self.checked.1.resize(h.legs.len(), 0);
        for (g, leg) in h.legs.iter().enumerate() {
            if let Some(base) = leg.base {
                let base = base as usize;
                let got = &leg.rx[leg.pre..];
                let from = self.checked.1[g];
                assert_eq!(
                    &got[from..],
                    &h.client_tx[base + from..base + got.len()],
                    "leg {g} got bytes that are not the client's stream"
                );
                self.checked.1[g] = got.len();
            }
        }
    }

    /// What must hold at the end.
    fn check_end(&self) {
        let h = &self.h;
        if self.kind == Kind::None
            && (self.crashed || h.core.done() != Some(CloseReason::ClientClosed))
        {
            // The server failed (a crash with a FIN looks like its normal
            // end) or was never reached: the session ended gracefully with
            // what the client had been sent.
            let ended = [
                CloseReason::ClientClosed,
                CloseReason::ServerClosed,
                CloseReason::ServerError,
                CloseReason::ServerUnreachable,
            ];
            assert!(
                ended.contains(&h.core.done().unwrap()),
                "{:?}",
                h.core.done()
            );
            assert!(h.client_fin, "the client got no FIN");
            return;
        }
        assert_eq!(h.core.done(), Some(CloseReason::ClientClosed));
        assert!(h.client_fin, "the client got no FIN");
        assert_eq!(h.client_tx, self.plan, "the client sent everything");
        assert!(
            h.client_rx == self.expect,
            "the client got {} bytes of {}",
            h.client_rx.len(),
            self.expect.len()
        );
        if let Kind::None | Kind::Tcp { .. } = self.kind {
            // Each leg starts exactly where the previous one's acks ended, so
            // what the servers consumed, leg after leg, is the client's stream.
            let mut consumed = Vec::new();
            for (g, leg) in h.legs.iter().enumerate() {
                let Some(base) = leg.base else { continue };
                assert_eq!(base as usize, consumed.len(), "leg {g} replays from acked");
                let n = self.srv.get(g).map_or(0, |s| s.consumed);
                consumed.extend_from_slice(&leg.rx[..n]);
            }
            assert!(
                consumed == h.client_tx,
                "the servers consumed the client's stream"
            );
        }
    }
}

/// What the snapshots of a run caught the session doing (each counts
/// snapshots taken in that state).
#[derive(Debug, Default, Clone, Copy)]
pub(in crate::session::core) struct Tally {
    pub snapshots: u64,
    /// Held: waiting for its next connect.
    pub waiting: u64,
    pub connecting: u64,
    pub up: u64,
    /// No leg and none to come.
    pub no_leg: u64,
    /// One direction closed, the session going on.
    pub half_closed: u64,
    /// A graceful end under way.
    pub ending: u64,
    /// Response mode: a request or a response frame half read.
    pub mid_frame: u64,
    /// Resume protocol: a HELLO not answered yet; an established link.
    pub handshake: u64,
    pub link: u64,
}

impl Tally {
    /// Counts the state of `core`.
    pub fn add(&mut self, core: &SessionCore) {
        self.snapshots += 1;
        match &core.leg {
            LegState::Waiting { .. } => self.waiting += 1,
            LegState::Connecting { .. } => self.connecting += 1,
            LegState::None => self.no_leg += 1,
            LegState::Up(leg) => {
                self.up += 1;
                let pending = leg.resp.as_ref().is_some_and(|r| !r.pending.is_empty());
                if pending || (core.req_scanner.is_some() && core.req_last_end < core.up.read()) {
                    self.mid_frame += 1;
                }
                self.handshake += leg.hello.is_some() as u64;
                self.link += leg.link.is_some() as u64;
            }
        }
        if core.up.fin_read() != core.down.fin_read() {
            self.half_closed += 1;
        }
        self.ending += core.ending.is_some() as u64;
    }

    pub fn merge(&mut self, o: Tally) {
        let Tally {
            snapshots,
            waiting,
            connecting,
            up,
            no_leg,
            half_closed,
            ending,
            mid_frame,
            handshake,
            link,
        } = o;
        self.snapshots += snapshots;
        self.waiting += waiting;
        self.connecting += connecting;
        self.up += up;
        self.no_leg += no_leg;
        self.half_closed += half_closed;
        self.ending += ending;
        self.mid_frame += mid_frame;
        self.handshake += handshake;
        self.link += link;
    }
}

/// A leg as its server saw it: server, base, connect answered, bytes
/// received, preamble bytes among them, FIN delivered, closed.
type LegOutcome = (usize, Option<u64>, bool, Vec<u8>, usize, bool, bool);

/// Everything a run produced that anyone outside the core could see, and
/// the core's final state.
#[derive(Debug, PartialEq)]
struct Outcome {
    client_rx: Vec<u8>,
    client_fin: bool,
    client_tx: Vec<u8>,
    legs: Vec<LegOutcome>,
    events: Vec<Event>,
    done: Option<CloseReason>,
    steps: u64,
    elapsed: Duration,
    /// The final state, exported.
    state: Vec<u8>,
}

fn run(seed: u64, kind: Kind, snapshots: bool) -> (Outcome, Tally) {
    let mut sim = Sim::new(seed, kind, snapshots);
    let mut step = 0;
    while sim.h.core.done().is_none() {
        sim.step(step);
        sim.check();
        if let Some((rng, tally)) = &mut sim.snaps {
            // A quiescent point: every step ends with a pump.
            if rng.pct(20) {
                tally.add(&sim.h.core);
                sim.h.reimport();
                sim.h.pump();
                sim.check();
            }
        }
        step += 1;
        assert!(step < 200_000, "the session never ended: {:?}", sim.h.core);
    }
    // Nothing is left for anyone after the end.
    assert!(sim.h.core.next_write(Dir::Up).is_none());
    assert!(sim.h.core.next_write(Dir::Down).is_none());
    assert!(sim.h.core.deadline().is_none());
    sim.check_end();
    let h = &sim.h;
    let mut state = Vec::new();
    h.core.export(h.now, &mut state);
    let outcome = Outcome {
        client_rx: h.client_rx.clone(),
        client_fin: h.client_fin,
        client_tx: h.client_tx.clone(),
        legs: h
            .legs
            .iter()
            .map(|l| {
                (
                    l.server,
                    l.base,
                    l.resolved,
                    l.rx.clone(),
                    l.pre,
                    l.fin,
                    l.closed,
                )
            })
            .collect(),
        events: h.events.clone(),
        done: h.core.done(),
        steps: step,
        elapsed: h.now - h.t0,
        state,
    };
    (outcome, sim.snaps.map(|(_, t)| t).unwrap_or_default())
}

/// Panics, saying which part differs, unless both runs are alike.
pub(in crate::session::core) fn assert_same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    plain: &T,
    snapped: &T,
) {
    if plain != snapped {
        let (a, b) = (format!("{plain:?}"), format!("{snapped:?}"));
        let at = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
        let from = at.saturating_sub(80);
        panic!(
            "with snapshots, {what} differs from the run without, at char {at}:\n  without: …{}\n  with:    …{}",
            &a[from..(at + 80).min(a.len())],
            &b[from..(at + 80).min(b.len())],
        );
    }
}

/// `HOLDFAST_SIM_SEED=N`: run seed N alone (to trace it); what a whole
/// run must have covered is then not checked.
fn one_seed() -> Option<u64> {
    std::env::var("HOLDFAST_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
}

fn seeds() -> u64 {
    std::env::var("HOLDFAST_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

/// Runs every seed without and with snapshots, and `same` on both runs'
/// outcomes; `run` returns a run's outcome, its legs and what its snapshots
/// caught. Fails unless there were more than `legs_per_session` legs per
/// session. Returns all the snapshots caught.
pub(in crate::session::core) fn run_seeds_with<K: std::fmt::Debug + Copy, O>(
    legs_per_session: u64,
    kind_of: impl Fn(u64) -> K,
    run: impl Fn(u64, K, bool) -> (O, u64, Tally),
    same: impl Fn(&O, &O),
) -> Tally {
    let n = seeds();
    let mut legs = 0;
    let mut tally = Tally::default();
    let only = one_seed();
    let range = only.map_or(0..n, |s| s..s + 1);
    for seed in range {
        let kind = kind_of(seed);
        let both = catch_unwind(AssertUnwindSafe(|| {
            let (plain, l, _) = run(seed, kind, false);
            let (snapped, _, t) = run(seed, kind, true);
            same(&plain, &snapped);
            (l, t)
        }));
        match both {
            Ok((l, t)) => {
                legs += l;
                tally.merge(t);
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("seed {seed} ({kind:?}): {msg}");
            }
        }
    }
    if only.is_some() {
        return tally;
    }
    // A simulation that never failed a leg would test nothing.
    assert!(
        legs > legs_per_session * n,
        "only {legs} legs in {n} sessions"
    );
    assert!(tally.snapshots > n, "only {} snapshots", tally.snapshots);
    tally
}

fn run_seeds(kind_of: impl Fn(u64) -> Kind) -> Tally {
    let tally = run_seeds_with(
        // A plain proxy does not reconnect.
        if kind_of(0) == Kind::None { 1 } else { 2 },
        kind_of,
        |seed, kind, snapshots| {
            let (o, t) = run(seed, kind, snapshots);
            let legs = o.legs.len() as u64;
            (o, legs, t)
        },
        |a, b| {
            assert_same("the bytes the client got", &a.client_rx, &b.client_rx);
            assert_same("the legs (what each server got)", &a.legs, &b.legs);
            assert_same("the events", &a.events, &b.events);
            assert_same("the outcome", a, b);
        },
    );
    // The snapshots caught the session in every state that matters.
    assert!(
        tally.connecting > 0 && tally.up > 0 && tally.half_closed > 0,
        "{tally:?}"
    );
    tally
}

#[test]
fn sim_none() {
    let t = run_seeds(|_| Kind::None);
    // (Never waiting: a plain proxy connects at once or not at all.)
    assert!(
        one_seed().is_some() || (t.ending > 0 && t.no_leg > 0),
        "{t:?}"
    );
}

#[test]
fn sim_tcp() {
    let t = run_seeds(|seed| Kind::Tcp {
        echo: seed % 2 == 0,
    });
    assert!(one_seed().is_some() || t.waiting > 0, "{t:?}");
}

fn response(framing: Fr, seed: u64) -> Kind {
    Kind::Response {
        framing,
        greeting: seed % 3 == 1,
        preamble: seed % 4 >= 2,
        retry: seed % 5 >= 3,
    }
}

#[test]
fn sim_response_lines() {
    let t = run_seeds(|seed| response(Fr::Lines, seed));
    assert!(
        one_seed().is_some() || (t.waiting > 0 && t.mid_frame > 0),
        "{t:?}"
    );
}

#[test]
fn sim_response_length_prefixed() {
    let t = run_seeds(|seed| response(Fr::Length, seed));
    assert!(
        one_seed().is_some() || (t.waiting > 0 && t.mid_frame > 0),
        "{t:?}"
    );
}

#[test]
fn sim_response_resp() {
    let t = run_seeds(|seed| response(Fr::Resp, seed));
    assert!(
        one_seed().is_some() || (t.waiting > 0 && t.mid_frame > 0),
        "{t:?}"
    );
}
