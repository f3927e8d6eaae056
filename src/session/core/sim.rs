//! A seeded simulation of random interleavings of the session core.
//!
//! For each seed, a client sends random bytes (`tcp`) or request lines
//! (`response` with lines) in random chunks, a model server per leg consumes
//! and answers them, crashes (reset or FIN), refuses connects for a while,
//! and every write is partial; time moves at random. After every step the
//! core's invariants are checked, and at the end the bytes each side got are
//! compared with what it was owed. A failure names its seed; set
//! `HOLDFAST_SIM_SEEDS` to run more seeds.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::*;

/// xorshift64*: tiny, deterministic, good enough to pick steps.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `p` percent.
    fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `ack = "tcp"`; the server echoes what it consumed when `echo`.
    Tcp { echo: bool },
    /// `ack = "response"`, lines; the server answers each line with itself.
    Lines { greeting: bool, preamble: bool },
}

const GREETING: &[u8] = b"HELLO from the server\n";

/// The model server behind one leg.
#[derive(Debug, Default)]
struct SrvLeg {
    /// Bytes of the leg's `rx` consumed (tcp: and acked) or scanned (lines).
    consumed: usize,
    /// Bytes the server has yet to write back.
    out: VecDeque<u8>,
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
    /// After this many steps nothing fails any more, so the session can end.
    calm_after: u64,
}

impl Sim {
    fn new(seed: u64, kind: Kind) -> Sim {
        let mut rng = Rng::new(seed);
        let servers = rng.range(1, 3) as usize;
        let mut cfg = backend(AckMode::Tcp, servers);
        let mut plan = Vec::new();
        match kind {
            Kind::Tcp { .. } => {
                let n = rng.range(0, 3000);
                plan.extend((0..n).map(|_| rng.next() as u8));
            }
            Kind::Lines { greeting, preamble } => {
                cfg.ack = AckMode::Response(Framing::Lines { max_frame: 64 });
                cfg.greeting = greeting as u32;
                cfg.preamble = preamble as u32;
                for i in 0..rng.range(0, 150) {
                    let pad = rng.below(20) as usize;
                    plan.extend_from_slice(format!("r{i}-").as_bytes());
                    plan.extend((0..pad).map(|_| b'a' + rng.below(26) as u8));
                    plan.push(b'\n');
                }
            }
        }
        let mut expect = Vec::new();
        match kind {
            Kind::Tcp { echo: false } => {}
            Kind::Tcp { echo: true } => expect.extend_from_slice(&plan),
            Kind::Lines { greeting, .. } => {
                if greeting {
                    expect.extend_from_slice(GREETING);
                }
                expect.extend_from_slice(&plan);
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
                    if matches!(self.kind, Kind::Lines { greeting: true, .. }) {
                        self.srv(gen).out.extend(GREETING);
                    }
                }
            }
            // The server consumes (and, tcp, acks) what it received.
            53..=64 => {
                let Some(gen) = self.up_leg() else { return };
                let rx_len = self.h.legs[gen.0 as usize].rx.len();
                match self.kind {
                    Kind::Tcp { echo } => {
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
                    Kind::Lines { .. } => {
                        // Answer every whole line received.
                        let consumed = self.srv(gen).consumed;
                        let leg = &self.h.legs[gen.0 as usize];
                        if let Some(last_nl) = leg.rx[consumed..].iter().rposition(|&b| b == b'\n')
                        {
                            let end = consumed + last_nl + 1;
                            let lines = leg.rx[consumed..end].to_vec();
                            let s = self.srv(gen);
                            s.consumed = end;
                            s.out.extend(lines);
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
                if self.server_finished(gen) {
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
                if self.rng.pct(50) {
                    self.h.server_error(gen);
                } else {
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
                    4 => core.on_connected(gen, now),
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
    fn check(&self) {
        let h = &self.h;
        h.core.check_invariants();
        assert!(
            self.expect.starts_with(&h.client_rx),
            "the client got a byte it wasn't owed, out of order or twice"
        );
        let down_read = h.core.stream(Dir::Down).read() as usize;
        if let Kind::Lines { .. } = self.kind {
            assert!(
                down_read == 0 || self.expect[down_read - 1] == b'\n',
                "half a response frame was released towards the client"
            );
        }
        // Every leg got the client's stream from its base, in order.
        for (g, leg) in h.legs.iter().enumerate() {
            if let Some(base) = leg.base {
                let base = base as usize;
                let got = &leg.rx[leg.pre..];
                assert_eq!(
                    got,
                    &h.client_tx[base..base + got.len()],
                    "leg {g} got bytes that are not the client's stream"
                );
            }
        }
    }

    /// What must hold at the end.
    fn check_end(&self) {
        let h = &self.h;
        assert_eq!(h.core.done(), Some(CloseReason::ClientClosed));
        assert!(h.client_fin, "the client got no FIN");
        assert_eq!(h.client_tx, self.plan, "the client sent everything");
        assert!(
            h.client_rx == self.expect,
            "the client got {} bytes of {}",
            h.client_rx.len(),
            self.expect.len()
        );
        if let Kind::Tcp { .. } = self.kind {
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

fn run(seed: u64, kind: Kind) -> u64 {
    let mut sim = Sim::new(seed, kind);
    let mut step = 0;
    while sim.h.core.done().is_none() {
        sim.step(step);
        sim.check();
        step += 1;
        assert!(step < 200_000, "the session never ended: {:?}", sim.h.core);
    }
    // Nothing is left for anyone after the end.
    assert!(sim.h.core.next_write(Dir::Up).is_none());
    assert!(sim.h.core.next_write(Dir::Down).is_none());
    assert!(sim.h.core.deadline().is_none());
    sim.check_end();
    sim.h.legs.len() as u64
}

fn seeds() -> u64 {
    std::env::var("HOLDFAST_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

fn run_seeds(kind_of: impl Fn(u64) -> Kind) {
    let n = seeds();
    let mut legs = 0;
    for seed in 0..n {
        let kind = kind_of(seed);
        match catch_unwind(AssertUnwindSafe(|| run(seed, kind))) {
            Ok(l) => legs += l,
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
    // A simulation that never failed a leg would test nothing.
    assert!(legs > 2 * n, "only {legs} legs in {n} sessions");
}

#[test]
fn sim_tcp() {
    run_seeds(|seed| Kind::Tcp {
        echo: seed % 2 == 0,
    });
}

#[test]
fn sim_response_lines() {
    run_seeds(|seed| Kind::Lines {
        greeting: seed % 3 == 1,
        preamble: seed % 4 >= 2,
    });
}
