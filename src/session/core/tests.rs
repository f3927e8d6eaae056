//! Tests of the session core: a small shell harness, example tests per ack
//! mode, and (in `sim.rs`) a seeded simulation of random interleavings.
//!
//! The harness plays the async shell: it executes [`Action`]s, pumps
//! `next_write` in chunks of a configurable size, and records what each leg's
//! server and the client received. It calls `check_invariants` after every
//! input. It never decides anything about offsets: that is the core's job,
//! and the tests assert it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::config::{
    AckMode, BackendConfig, BackendProtocol, Endpoint, Framing, LengthPrefixed, OnServerClose,
    SocketOptions,
};
use crate::stream::Dir;

#[path = "sim.rs"]
pub(super) mod sim;

// ---- configs ----

pub(crate) fn backend(ack: AckMode, servers: usize) -> BackendConfig {
    BackendConfig {
        name: "test".into(),
        servers: (0..servers)
            .map(|i| Endpoint::Tcp(format!("127.0.0.1:{}", 7001 + i)))
            .collect(),
        protocol: BackendProtocol::Tcp,
        ack,
        buffer_limit: 1 << 20,
        hold_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(1),
        retry_initial: Duration::from_millis(1),
        retry_max: Duration::from_millis(200),
        on_server_close: OnServerClose::Reconnect,
        greeting: 0,
        preamble: 0,
        retry_responses: Vec::new(),
        max_held_sessions: None,
        splice: false,
        socket: SocketOptions {
            nodelay: true,
            keepalive: None,
            user_timeout: None,
        },
        tls: None,
    }
}

pub(super) fn lines() -> AckMode {
    AckMode::Response(Framing::Lines { max_frame: 1024 })
}

pub(super) fn length_prefixed() -> AckMode {
    AckMode::Response(Framing::LengthPrefixed(LengthPrefixed {
        length_field_offset: 0,
        length_field_length: 4,
        big_endian: true,
        length_adjustment: 0,
        max_frame: 1024,
    }))
}

pub(super) fn resp() -> AckMode {
    AckMode::Response(Framing::Resp { max_frame: 1024 })
}

/// Every ack mode, with the response framings.
pub(super) fn all_modes() -> Vec<AckMode> {
    vec![
        AckMode::None,
        AckMode::Tcp,
        lines(),
        length_prefixed(),
        resp(),
    ]
}

pub(super) fn response_modes() -> Vec<AckMode> {
    vec![lines(), length_prefixed(), resp()]
}

/// One frame carrying `payload` in the framing of `mode` (raw bytes for the
/// modes without framing).
pub(super) fn frame(mode: &AckMode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match mode {
        AckMode::Response(Framing::Lines { .. }) => {
            out.extend_from_slice(payload);
            out.push(b'\n');
        }
        AckMode::Response(Framing::LengthPrefixed(_)) => {
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            out.extend_from_slice(payload);
        }
        AckMode::Response(Framing::Resp { .. }) => {
            out.extend_from_slice(format!("${}\r\n", payload.len()).as_bytes());
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
        }
        AckMode::None | AckMode::Tcp | AckMode::Resume(_) => out.extend_from_slice(payload),
    }
    out
}

// ---- the harness ----

/// What one leg's server saw.
#[derive(Debug)]
pub(super) struct LegRec {
    pub server: usize,
    /// When the core asked to connect.
    pub asked_at: Instant,
    /// `Some(up.sent)` once connected: the stream offset of its first byte.
    pub base: Option<u64>,
    /// The connect attempt was answered (connected or failed).
    pub resolved: bool,
    /// Bytes written to this leg's server, in order (preamble included).
    pub rx: Vec<u8>,
    /// How many of `rx` were the re-sent preamble (not stream bytes).
    pub pre: usize,
    /// The client's FIN was delivered (`ShutdownServer`).
    pub fin: bool,
    /// `CloseLeg` was issued.
    pub closed: bool,
}

pub(super) struct Harness {
    pub core: SessionCore,
    pub now: Instant,
    pub t0: Instant,
    /// Indexed by generation.
    pub legs: Vec<LegRec>,
    /// Everything the client received, and whether it got the FIN.
    pub client_rx: Vec<u8>,
    pub client_fin: bool,
    /// Everything the client sent.
    pub client_tx: Vec<u8>,
    pub events: Vec<Event>,
    /// Largest write to a server / to the client.
    pub up_max: usize,
    pub down_max: usize,
    /// While set, the shell doesn't write in that direction (a slow socket).
    pub stall_up: bool,
    pub stall_down: bool,
    /// Export and re-import the core at the end of every pump (a quiescent
    /// point): the session must go on exactly as without.
    pub snapshots: bool,
}

thread_local! {
    /// What `Harness::new` sets `snapshots` to.
    pub(super) static SNAPSHOTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Harness {
    pub fn new(cfg: BackendConfig) -> Harness {
        let t0 = Instant::now();
        let core = SessionCore::new(SessionId(0x1234_5678_9abc_def0_1122), Arc::new(cfg), 0, t0);
        let mut h = Harness {
            core,
            now: t0,
            t0,
            legs: Vec::new(),
            client_rx: Vec::new(),
            client_fin: false,
            client_tx: Vec::new(),
            events: Vec::new(),
            up_max: usize::MAX,
            down_max: usize::MAX,
            stall_up: false,
            stall_down: false,
            snapshots: SNAPSHOTS.with(|s| s.get()),
        };
        h.pump();
        h
    }

    /// Replaces the core by one rebuilt from its snapshot, as a new process
    /// would, and returns the snapshot. The rebuilt core encodes to the same
    /// bytes; actions it issues again are carried out by the next pump.
    pub fn reimport(&mut self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.core.export(self.now, &mut bytes);
        let backend = self.core.backend().clone();
        let mut core = SessionCore::import(
            &bytes,
            |name| (name == backend.name).then(|| backend.clone()),
            self.now,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        core.check_invariants();
        assert!(
            export_again(&mut core, self.now) == bytes,
            "a rebuilt core encodes to the same bytes"
        );
        self.core = core;
        bytes
    }

    pub fn with_mode(mode: AckMode) -> Harness {
        Harness::new(backend(mode, 1))
    }

    /// The newest leg's generation.
    pub fn last(&self) -> Generation {
        Generation(self.legs.len() as u64 - 1)
    }

    fn leg(&mut self, gen: Generation) -> &mut LegRec {
        &mut self.legs[gen.0 as usize]
    }

    /// Executes every queued action and collects the events.
    fn drain(&mut self) {
        loop {
            while let Some(e) = self.core.poll_event() {
                self.events.push(e);
            }
            let Some(action) = self.core.poll_action() else {
                break;
            };
            match action {
                Action::Connect { gen, server } if (gen.0 as usize) < self.legs.len() => {
                    // Issued again by an imported core: the same attempt.
                    let leg = self.leg(gen);
                    assert!(
                        !leg.resolved && !leg.closed && leg.server == server,
                        "connect of leg {gen} issued again after it was answered"
                    );
                }
                Action::Connect { gen, server } => {
                    assert_eq!(gen.0, self.legs.len() as u64, "generations count up");
                    assert!(server < self.core.backend().servers.len());
                    self.legs.push(LegRec {
                        server,
                        asked_at: self.now,
                        base: None,
                        resolved: false,
                        rx: Vec::new(),
                        pre: 0,
                        fin: false,
                        closed: false,
                    });
                }
                Action::CloseLeg { gen } => self.leg(gen).closed = true,
                Action::ShutdownServer { gen } => {
                    let up_read = self.core.stream(Dir::Up).read();
                    let leg = self.leg(gen);
                    assert!(!leg.closed && !leg.fin, "shutdown of a dead leg {gen}");
                    let base = leg.base.expect("shutdown of a connected leg");
                    assert_eq!(
                        base + (leg.rx.len() - leg.pre) as u64,
                        up_read,
                        "the client's FIN reaches the server after every byte"
                    );
                    self.leg(gen).fin = true;
                    self.core.on_server_shutdown(gen, self.now);
                }
                Action::ShutdownClient => {
                    assert!(!self.client_fin, "two FINs to the client");
                    assert_eq!(
                        self.core.stream(Dir::Down).read(),
                        self.client_rx.len() as u64,
                        "the FIN reaches the client after every byte"
                    );
                    self.client_fin = true;
                    self.core.on_client_shutdown(self.now);
                }
            }
            self.core.check_invariants();
        }
    }

    /// Writes until nothing is left to write (or a direction is stalled).
    pub fn pump(&mut self) {
        loop {
            self.drain();
            let mut progress = false;
            if !self.stall_up {
                if let (Some(gen), Some(bytes)) =
                    (self.core.leg_gen(), self.core.next_write(Dir::Up))
                {
                    let n = bytes.len().min(self.up_max);
                    let leg = self.leg(gen);
                    assert!(!leg.closed && !leg.fin, "write to a dead leg {gen}");
                    leg.rx.extend_from_slice(&bytes[..n]);
                    let sent = self.core.stream(Dir::Up).sent();
                    self.core.on_server_written(gen, n, self.now);
                    let stream_bytes = self.core.stream(Dir::Up).sent() - sent;
                    self.leg(gen).pre += n - stream_bytes as usize;
                    progress = true;
                }
            }
            if !self.stall_down {
                if let Some(bytes) = self.core.next_write(Dir::Down) {
                    assert!(!self.client_fin, "bytes after the FIN to the client");
                    let n = bytes.len().min(self.down_max);
                    self.client_rx.extend_from_slice(&bytes[..n]);
                    self.core.on_client_written(n, self.now);
                    progress = true;
                }
            }
            self.core.check_invariants();
            if !progress {
                self.drain();
                if self.snapshots {
                    self.reimport();
                    // Actions issued again (a connect in flight).
                    self.drain();
                }
                return;
            }
        }
    }
}

/// Exports a core that was just imported, with the actions import issued
/// again still pending (export wants them carried out first).
pub(super) fn export_again(core: &mut SessionCore, now: Instant) -> Vec<u8> {
    let pending = std::mem::replace(&mut core.actions, Queue::new());
    let mut out = Vec::new();
    core.export(now, &mut out);
    core.actions = pending;
    out
}

/// Inputs, each followed by a pump.
impl Harness {
    pub fn client(&mut self, data: &[u8]) {
        self.client_tx.extend_from_slice(data);
        self.core
            .on_client_data(Bytes::copy_from_slice(data), self.now);
        self.pump();
    }

    pub fn client_eof(&mut self) {
        self.core.on_client_eof(self.now);
        self.pump();
    }

    pub fn connected(&mut self, gen: Generation) {
        let sent = self.core.stream(Dir::Up).sent();
        let leg = self.leg(gen);
        assert!(!leg.resolved, "leg {gen} resolved twice");
        leg.resolved = true;
        leg.base = Some(sent);
        self.core.on_connected(gen, false, self.now);
        self.pump();
    }

    pub fn refused(&mut self, gen: Generation) {
        let leg = self.leg(gen);
        assert!(!leg.resolved, "leg {gen} resolved twice");
        leg.resolved = true;
        self.core
            .on_connect_failed(gen, LegFailure::ConnectRefused, self.now);
        self.pump();
    }

    pub fn server(&mut self, gen: Generation, data: &[u8]) {
        self.core
            .on_server_data(gen, Bytes::copy_from_slice(data), self.now);
        self.pump();
    }

    pub fn acked(&mut self, gen: Generation, n: u64) {
        self.core.on_server_acked(gen, n, self.now);
        self.pump();
    }

    pub fn server_eof(&mut self, gen: Generation) {
        self.core.on_server_eof(gen, self.now);
        self.pump();
    }

    pub fn server_error(&mut self, gen: Generation) {
        self.core.on_server_error(gen, self.now);
        self.pump();
    }

    /// Moves the clock by `d` and fires the timer.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.core.on_timeout(self.now);
        self.pump();
    }

    /// Moves the clock to the core's deadline and fires the timer.
    pub fn fire_deadline(&mut self) {
        let d = self.core.deadline().expect("a deadline");
        self.now = self.now.max(d);
        self.core.on_timeout(self.now);
        self.pump();
    }

    /// The newest leg, which must be connecting; connects it.
    pub fn connect_last(&mut self) -> Generation {
        let gen = self.last();
        assert!(!self.legs[gen.0 as usize].resolved, "no connect pending");
        self.connected(gen);
        gen
    }

    /// Stream bytes leg `gen` received (without a re-sent preamble).
    pub fn rx_stream(&self, gen: Generation) -> &[u8] {
        let leg = &self.legs[gen.0 as usize];
        &leg.rx[leg.pre..]
    }

    pub fn closed_events(&self) -> Vec<CloseReason> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Closed { reason } => Some(*reason),
                _ => None,
            })
            .collect()
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---- data both ways, half-close both ways ----

#[test]
fn data_both_ways_client_closes_first() {
    for mode in all_modes() {
        let mut h = Harness::with_mode(mode.clone());
        h.up_max = 3;
        h.down_max = 2;
        // Bytes before the leg is up wait in the replay buffer.
        let req1 = frame(&mode, b"hello");
        h.client(&req1);
        assert_eq!(h.legs.len(), 1, "{mode:?}");
        let g = h.connect_last();
        assert_eq!(h.rx_stream(g), &req1[..], "{mode:?}");

        // A response in two pieces: response mode delivers whole frames only.
        let resp1 = frame(&mode, b"world!");
        h.server(g, &resp1[..4]);
        if matches!(mode, AckMode::Response(_)) {
            assert!(h.client_rx.is_empty(), "{mode:?}: half a frame delivered");
        } else {
            assert_eq!(h.client_rx, &resp1[..4], "{mode:?}");
        }
        h.server(g, &resp1[4..]);
        assert_eq!(h.client_rx, resp1, "{mode:?}");
        if mode == AckMode::Tcp {
            h.acked(g, req1.len() as u64);
        }
        assert_eq!(
            h.core.stream(Dir::Up).acked(),
            req1.len() as u64,
            "{mode:?}"
        );

        // The client sends more and closes while the server is slow: the FIN
        // waits for every byte.
        h.stall_up = true;
        let req2 = frame(&mode, b"bye");
        h.client(&req2);
        h.client_eof();
        assert!(!h.legs[0].fin, "{mode:?}: FIN before the bytes");
        h.stall_up = false;
        h.pump();
        assert!(h.legs[0].fin, "{mode:?}: no FIN to the server");
        assert_eq!(h.rx_stream(g), cat(&[&req1, &req2]), "{mode:?}");
        assert!(!h.client_fin && h.core.done().is_none(), "{mode:?}");

        // The server still talks after the client's FIN (half-close).
        let resp2 = frame(&mode, b"ciao");
        h.stall_down = true;
        h.server(g, &resp2);
        if mode == AckMode::Tcp {
            h.acked(g, (req1.len() + req2.len()) as u64);
        }
        h.server_eof(g);
        assert!(!h.client_fin, "{mode:?}: FIN before the bytes");
        h.stall_down = false;
        h.pump();
        assert_eq!(h.client_rx, cat(&[&resp1, &resp2]), "{mode:?}");
        assert!(h.client_fin, "{mode:?}: no FIN to the client");
        assert_eq!(h.core.done(), Some(CloseReason::ClientClosed), "{mode:?}");
        assert_eq!(h.closed_events(), [CloseReason::ClientClosed], "{mode:?}");
        assert!(h.legs[0].closed, "{mode:?}: the leg is closed at the end");
        assert_eq!(h.legs.len(), 1, "{mode:?}: no reconnect");
        assert_eq!(h.core.deadline(), None);
    }
}

#[test]
fn data_both_ways_server_closes_first() {
    for mode in all_modes() {
        let mut cfg = backend(mode.clone(), 1);
        // Only `none` and `on_server_close = "close"` let a server close end
        // the session.
        cfg.on_server_close = OnServerClose::Close;
        let mut h = Harness::new(cfg);
        h.down_max = 1;
        let g = h.connect_last();
        let req1 = frame(&mode, b"ping");
        h.client(&req1);
        let resp1 = frame(&mode, b"pong");
        h.stall_down = true;
        h.server(g, &resp1);
        if mode == AckMode::Tcp {
            h.acked(g, req1.len() as u64);
        }
        h.server_eof(g);
        assert!(!h.client_fin, "{mode:?}: FIN before the bytes");
        h.stall_down = false;
        h.pump();
        assert_eq!(h.client_rx, resp1, "{mode:?}");
        assert!(
            h.client_fin,
            "{mode:?}: the server's FIN reaches the client"
        );
        assert!(h.core.done().is_none(), "{mode:?}: the client still sends");

        // The client keeps sending on its half, then closes.
        let req2 = frame(&mode, b"more");
        h.client(&req2);
        assert_eq!(h.rx_stream(g), cat(&[&req1, &req2]), "{mode:?}");
        h.client_eof();
        assert!(h.legs[0].fin, "{mode:?}");
        assert_eq!(h.core.done(), Some(CloseReason::ServerClosed), "{mode:?}");
        assert_eq!(h.legs.len(), 1, "{mode:?}: no reconnect");
    }
}

#[test]
fn a_reset_after_the_servers_close_makes_no_new_leg() {
    // `on_server_close = "close"`: the server's FIN is the end of the down
    // direction. A reset that follows it (the server process dies after
    // closing) must not start a new leg, whose bytes would follow the FIN.
    for mode in all_modes() {
        let mut cfg = backend(mode.clone(), 1);
        cfg.on_server_close = OnServerClose::Close;
        let mut h = Harness::new(cfg);
        let g = h.connect_last();
        let req = frame(&mode, b"ping");
        h.client(&req);
        let resp = frame(&mode, b"pong");
        h.server(g, &resp);
        if mode == AckMode::Tcp {
            h.acked(g, req.len() as u64);
        }
        h.server_eof(g);
        h.pump();
        assert!(
            h.client_fin,
            "{mode:?}: the server's FIN reaches the client"
        );
        h.server_error(g);
        h.pump();
        assert_eq!(h.legs.len(), 1, "{mode:?}: no reconnect after the close");
        assert_eq!(h.client_rx, resp, "{mode:?}");
        // The client may still close its side; the session then ends.
        h.client_eof();
        h.pump();
        assert!(h.core.done().is_some(), "{mode:?}: the session ends");
    }
}

#[test]
fn none_mode_server_close_ends_the_session_without_the_close_option() {
    let mut h = Harness::with_mode(AckMode::None);
    let g = h.connect_last();
    h.client(b"abc");
    h.server(g, b"xyz");
    h.server_eof(g);
    assert_eq!(h.client_rx, b"xyz");
    assert!(h.client_fin);
    h.client_eof();
    assert_eq!(h.core.done(), Some(CloseReason::ServerClosed));
}

// ---- ack = "none" ----

#[test]
fn none_mode_refused_everywhere_is_server_unreachable() {
    let mut h = Harness::new(backend(AckMode::None, 3));
    for i in 0..3 {
        let g = h.last();
        assert_eq!(g, Generation(i as u64));
        assert_eq!(h.legs[i].server, i, "each server once, in order");
        assert_eq!(h.legs[i].asked_at, h.t0, "no backoff in a plain proxy");
        assert!(!h.client_fin);
        h.refused(g);
    }
    assert_eq!(h.legs.len(), 3, "each server tried once");
    assert!(h.client_fin, "a graceful FIN to the client");
    assert!(h.client_rx.is_empty());
    assert_eq!(h.core.done(), Some(CloseReason::ServerUnreachable));
    assert!(!h.core.want_read_client());
}

#[test]
fn none_mode_server_reset_is_server_error_after_the_bytes() {
    let mut h = Harness::new(backend(AckMode::None, 2));
    let g = h.connect_last();
    h.client(b"request");
    h.stall_down = true;
    h.server(g, b"partial answer");
    h.server_error(g);
    assert!(h.legs[0].closed);
    assert_eq!(h.legs.len(), 1, "a plain proxy doesn't reconnect");
    assert!(!h.client_fin && h.core.done().is_none());
    assert!(!h.core.want_read_client());
    h.stall_down = false;
    h.pump();
    assert_eq!(h.client_rx, b"partial answer");
    assert!(h.client_fin);
    assert_eq!(h.core.done(), Some(CloseReason::ServerError));
    assert_eq!(h.closed_events(), [CloseReason::ServerError]);
}

#[test]
fn none_mode_passed_through_bytes_count_in_order_with_held_ones() {
    let mut h = Harness::with_mode(AckMode::None);
    assert!(!h.core.can_pass_through(Dir::Up), "no leg yet");
    let g = h.connect_last();
    assert!(h.core.can_pass_through(Dir::Up));
    assert!(h.core.can_pass_through(Dir::Down));
    // 100 bytes spliced up, 40 down: read, sent and acked at once (the
    // harness's server and client receive them, outside the core).
    h.legs[g.0 as usize].rx.extend_from_slice(&[b'u'; 100]);
    h.client_rx.extend_from_slice(&[b'd'; 40]);
    h.core.on_passed_through(Dir::Up, 100, h.now);
    h.core.on_passed_through(Dir::Down, 40, h.now);
    h.core.check_invariants();
    for (dir, n) in [(Dir::Up, 100), (Dir::Down, 40)] {
        let st = h.core.stream(dir);
        assert_eq!(
            (st.read(), st.sent(), st.acked(), st.buffered()),
            (n, n, n, 0)
        );
    }
    // Bytes the destination did not take are held as usual, and nothing
    // passes through until they are written.
    h.stall_up = true;
    h.client(b"rest");
    assert!(!h.core.can_pass_through(Dir::Up), "held bytes first");
    h.stall_up = false;
    h.pump();
    assert_eq!(
        &h.rx_stream(g)[100..],
        b"rest",
        "written after the spliced 100"
    );
    assert_eq!(h.core.stream(Dir::Up).sent(), 104);
    assert!(h.core.can_pass_through(Dir::Up));
    // The client's FIN: no more passing through up; the server's close ends
    // the session as usual.
    h.client_eof();
    assert!(!h.core.can_pass_through(Dir::Up));
    h.server_eof(g);
    assert!(!h.core.can_pass_through(Dir::Down));
    assert_eq!(h.core.done(), Some(CloseReason::ClientClosed));
}

#[test]
fn only_none_mode_passes_through() {
    for mode in [AckMode::Tcp, lines()] {
        let mut h = Harness::with_mode(mode);
        h.connect_last();
        assert!(!h.core.can_pass_through(Dir::Up));
        assert!(!h.core.can_pass_through(Dir::Down));
    }
}

// ---- ack = "tcp" ----

#[test]
fn tcp_mode_replays_exactly_from_acked() {
    let mut h = Harness::new(backend(AckMode::Tcp, 2));
    h.up_max = 7;
    let g0 = h.connect_last();
    let data: Vec<u8> = (0..100u8).collect();
    h.client(&data[..60]);
    h.acked(g0, 10);
    h.acked(g0, 25);
    h.acked(g0, 20); // an older ack changes nothing
    assert_eq!(h.core.stream(Dir::Up).acked(), 25);
    h.client(&data[60..]);
    assert_eq!(h.rx_stream(g0), &data[..]);
    h.server(g0, b"down0");
    h.server_error(g0);
    assert!(h.legs[0].closed);

    // Reconnects at once, to the same server, and replays from 25.
    let g1 = h.last();
    assert_eq!(g1, Generation(1));
    assert_eq!(h.legs[1].server, h.legs[0].server);
    assert_eq!(h.legs[1].asked_at, h.now);
    h.connected(g1);
    assert_eq!(h.legs[1].base, Some(25));
    assert_eq!(h.rx_stream(g1), &data[25..]);
    assert!(h.events.contains(&Event::LegUp {
        gen: g1,
        server: 0,
        resumed: true,
        replay: 75,
        held: Some(Duration::ZERO),
    }));

    // Acks on the new leg count from its own first byte.
    h.acked(g1, 5);
    assert_eq!(h.core.stream(Dir::Up).acked(), 30);

    // A stale generation's events are ignored.
    let snapshot = (h.client_rx.clone(), h.core.stream(Dir::Up).acked());
    h.server(g0, b"stale bytes");
    h.acked(g0, 99);
    h.server_eof(g0);
    h.server_error(g0);
    h.core.on_server_written(g0, 50, h.now);
    h.core.on_server_shutdown(g0, h.now);
    h.pump();
    assert_eq!(
        (h.client_rx.clone(), h.core.stream(Dir::Up).acked()),
        snapshot
    );
    assert_eq!(h.core.leg_gen(), Some(g1));
    assert_eq!(h.core.stream(Dir::Up).sent(), 100);
    // A stale connect is closed at once.
    h.core.on_connected(g0, false, h.now);
    assert_eq!(h.core.poll_action(), Some(Action::CloseLeg { gen: g0 }));
    assert_eq!(h.core.leg_gen(), Some(g1));

    // Fails again before any ack on this leg: replays from 30 again.
    h.server_eof(g1);
    let g2 = h.connect_last();
    assert_eq!(h.rx_stream(g2), &data[30..]);
    h.acked(g2, 70);
    h.client_eof();
    assert!(h.legs[2].fin);
    h.server_eof(g2);
    assert_eq!(h.client_rx, b"down0");
    assert_eq!(h.core.done(), Some(CloseReason::ClientClosed));
}

#[test]
fn tcp_mode_server_close_before_everything_acked_is_a_failure() {
    let mut h = Harness::with_mode(AckMode::Tcp);
    let g0 = h.connect_last();
    h.client(b"0123456789");
    h.client_eof();
    assert!(h.legs[0].fin);
    h.acked(g0, 4);
    // The server closes having read only part: not the normal end.
    h.server_eof(g0);
    assert!(h.core.done().is_none());
    assert!(h.legs[0].closed);
    let g1 = h.connect_last();
    assert_eq!(h.rx_stream(g1), b"456789");
    assert!(h.legs[1].fin, "the FIN is delivered again after the replay");
    h.acked(g1, 6);
    h.server_eof(g1);
    assert!(h.client_fin);
    assert_eq!(h.core.done(), Some(CloseReason::ClientClosed));
}

// ---- ack = "response" ----

#[test]
fn response_mode_resends_exactly_the_unanswered_requests() {
    for mode in response_modes() {
        let mut h = Harness::with_mode(mode.clone());
        h.up_max = 5;
        let g0 = h.connect_last();
        let reqs: Vec<Vec<u8>> = (0..5)
            .map(|i| frame(&mode, format!("req-{i}").as_bytes()))
            .collect();
        let resps: Vec<Vec<u8>> = (0..5)
            .map(|i| frame(&mode, format!("RESPONSE-{i}").as_bytes()))
            .collect();
        // Pipelined, in one chunk and then split.
        h.client(&reqs[..3].concat());
        h.client(&reqs[3][..2]);
        h.client(&reqs[3][2..]);
        h.client(&reqs[4]);
        assert_eq!(h.rx_stream(g0), reqs.concat(), "{mode:?}");
        // Two whole answers, then the third cut in the middle.
        let answered = cat(&[&resps[0], &resps[1], &resps[2][..5]]);
        h.server(g0, &answered[..3]);
        h.server(g0, &answered[3..]);
        assert_eq!(h.client_rx, cat(&[&resps[0], &resps[1]]), "{mode:?}");
        let acked = (reqs[0].len() + reqs[1].len()) as u64;
        assert_eq!(h.core.stream(Dir::Up).acked(), acked, "{mode:?}");
        h.server_error(g0);

        let g1 = h.connect_last();
        assert_eq!(h.legs[1].base, Some(acked), "{mode:?}");
        assert_eq!(h.rx_stream(g1), reqs[2..].concat(), "{mode:?}");
        // The new server answers all three, one byte at a time.
        for b in resps[2..].concat() {
            h.server(g1, &[b]);
        }
        assert_eq!(h.client_rx, resps.concat(), "{mode:?}: each response once");
        assert_eq!(h.core.stream(Dir::Up).acked(), reqs.concat().len() as u64);
        h.client_eof();
        h.server_eof(g1);
        assert_eq!(h.core.done(), Some(CloseReason::ClientClosed), "{mode:?}");
    }
}

#[test]
fn response_mode_server_close_with_requests_unanswered_is_a_failure() {
    for mode in response_modes() {
        let mut h = Harness::with_mode(mode.clone());
        let g0 = h.connect_last();
        let (a, b) = (frame(&mode, b"a"), frame(&mode, b"b"));
        h.client(&cat(&[&a, &b]));
        h.client_eof();
        assert!(h.legs[0].fin, "{mode:?}");
        h.server(g0, &frame(&mode, b"A"));
        h.server_eof(g0);
        assert!(h.core.done().is_none(), "{mode:?}: b is unanswered");
        let g1 = h.connect_last();
        assert_eq!(h.rx_stream(g1), b, "{mode:?}");
        assert!(h.legs[1].fin, "{mode:?}");
        h.server(g1, &frame(&mode, b"B"));
        h.server_eof(g1);
        assert_eq!(
            h.client_rx,
            cat(&[&frame(&mode, b"A"), &frame(&mode, b"B")])
        );
        assert_eq!(h.core.done(), Some(CloseReason::ClientClosed), "{mode:?}");
    }
}

#[test]
fn response_mode_greeting_is_delivered_once() {
    for mode in response_modes() {
        let mut cfg = backend(mode.clone(), 1);
        cfg.greeting = 1;
        let mut h = Harness::new(cfg);
        let hello = frame(&mode, b"HELLO v1");
        let g0 = h.connect_last();
        h.server(g0, &hello);
        assert_eq!(h.client_rx, hello, "{mode:?}");
        let q = frame(&mode, b"q");
        h.client(&q);
        assert_eq!(
            h.core.stream(Dir::Up).acked(),
            0,
            "{mode:?}: a greeting acks nothing"
        );
        h.server_error(g0);
        let g1 = h.connect_last();
        assert_eq!(h.rx_stream(g1), q, "{mode:?}");
        // Greeting and answer in one chunk: the greeting is swallowed.
        h.server(g1, &cat(&[&frame(&mode, b"HELLO v2"), &frame(&mode, b"Q")]));
        assert_eq!(h.client_rx, cat(&[&hello, &frame(&mode, b"Q")]), "{mode:?}");
        assert_eq!(h.core.stream(Dir::Up).acked(), q.len() as u64, "{mode:?}");
    }
}

/// A client that half-closes at once, sending nothing, is still owed the
/// greeting: a server that closes in the middle of it failed, and the next
/// leg's greeting goes to the client (found by the simulation, seed 2881 of
/// `sim_response_resp` with `HOLDFAST_SIM_SEEDS=4000`).
#[test]
fn response_mode_greeting_cut_by_the_servers_close_comes_from_the_next_leg() {
    for mode in response_modes() {
        let mut cfg = backend(mode.clone(), 1);
        cfg.greeting = 1;
        let mut h = Harness::new(cfg);
        h.client_eof();
        let g0 = h.connect_last();
        let hello = frame(&mode, b"HELLO from the server");
        h.server(g0, &hello[..hello.len() - 3]);
        h.server_eof(g0);
        assert!(h.core.done().is_none(), "{mode:?}: the greeting is owed");
        assert!(h.client_rx.is_empty(), "{mode:?}: no partial greeting");
        let g1 = h.connect_last();
        assert_ne!(g0, g1);
        h.server(g1, &hello);
        assert_eq!(h.client_rx, hello, "{mode:?}");
        // Greeting delivered, nothing asked: the server's close ends it.
        h.server_eof(g1);
        assert_eq!(h.core.done(), Some(CloseReason::ClientClosed), "{mode:?}");
        assert!(h.client_fin, "{mode:?}");
    }
}

#[test]
fn response_mode_preamble_is_resent_and_its_answer_swallowed() {
    for mode in response_modes() {
        let mut cfg = backend(mode.clone(), 1);
        cfg.preamble = 1;
        let mut h = Harness::new(cfg);
        let (auth, get) = (frame(&mode, b"AUTH secret"), frame(&mode, b"GET k"));
        let ok = frame(&mode, b"OK");
        let g0 = h.connect_last();
        h.client(&cat(&[&auth, &get]));
        h.server(g0, &ok);
        assert_eq!(h.client_rx, ok, "{mode:?}");
        h.server_eof(g0);
        let g1 = h.connect_last();
        assert_eq!(
            h.legs[1].rx,
            cat(&[&auth, &get]),
            "{mode:?}: preamble + unanswered"
        );
        assert_eq!(h.rx_stream(g1), get, "{mode:?}");
        let val = frame(&mode, b"VALUE");
        h.server(g1, &cat(&[&ok, &val]));
        assert_eq!(
            h.client_rx,
            cat(&[&ok, &val]),
            "{mode:?}: the preamble answer is swallowed"
        );

        // Once more, with everything answered: only the preamble is re-sent.
        h.server_error(g1);
        let g2 = h.connect_last();
        assert_eq!(h.legs[2].rx, auth, "{mode:?}");
        assert!(h.rx_stream(g2).is_empty(), "{mode:?}");
        // A different answer to the preamble ends the session.
        h.server(g2, &frame(&mode, b"DENIED"));
        assert_eq!(
            h.core.done(),
            Some(CloseReason::PreambleMismatch),
            "{mode:?}"
        );
        assert!(h.legs[2].closed, "{mode:?}");
        assert_eq!(h.client_rx, cat(&[&ok, &val]), "{mode:?}");
    }
}

#[test]
fn response_mode_retry_response_restarts_the_leg_after_a_backoff() {
    for mode in response_modes() {
        let mut cfg = backend(mode.clone(), 2);
        let loading = frame(&mode, b"-LOADING dataset in memory");
        let prefix = loading[..loading.len() - b" dataset in memory".len()].to_vec();
        cfg.retry_responses = vec![b"-BUSY".to_vec(), prefix];
        let mut h = Harness::new(cfg);
        let g0 = h.connect_last();
        let req = frame(&mode, b"GET k");
        h.client(&req);
        h.server(g0, &loading);
        assert!(
            h.client_rx.is_empty(),
            "{mode:?}: a retry response is swallowed"
        );
        assert!(h.legs[0].closed, "{mode:?}");
        assert_eq!(h.legs.len(), 1, "{mode:?}: not at once");
        let failed_at = h.now;
        let due = h.core.deadline().expect("a retry is armed");
        let wait = due - failed_at;
        assert!(
            wait >= Duration::from_micros(500) && wait <= Duration::from_millis(1),
            "{mode:?}: backoff {wait:?}"
        );
        h.advance(wait / 2);
        assert_eq!(h.legs.len(), 1, "{mode:?}: before the backoff");
        h.fire_deadline();
        let g1 = h.last();
        assert_eq!(h.legs[1].server, 0, "{mode:?}: the same server");
        h.connected(g1);
        assert_eq!(h.rx_stream(g1), req, "{mode:?}: the request is re-sent");
        let val = frame(&mode, b"VALUE");
        h.server(g1, &val);
        assert_eq!(h.client_rx, val, "{mode:?}");
        assert!(h.events.contains(&Event::LegFailed {
            gen: g0,
            server: 0,
            reason: LegFailure::RetryResponse
        }));
    }
}

#[test]
fn response_mode_frame_too_large() {
    for mode in response_modes() {
        let small = match &mode {
            AckMode::Response(Framing::Lines { .. }) => {
                AckMode::Response(Framing::Lines { max_frame: 16 })
            }
            AckMode::Response(Framing::Resp { .. }) => {
                AckMode::Response(Framing::Resp { max_frame: 16 })
            }
            AckMode::Response(Framing::LengthPrefixed(lp)) => {
                AckMode::Response(Framing::LengthPrefixed(LengthPrefixed {
                    max_frame: 16,
                    ..*lp
                }))
            }
            _ => unreachable!(),
        };
        // From the client.
        let mut h = Harness::with_mode(small.clone());
        let g0 = h.connect_last();
        h.client(&frame(&small, b"ok"));
        h.client(&frame(&small, &[b'x'; 40])[..30]);
        assert_eq!(h.core.done(), Some(CloseReason::FrameTooLarge), "{mode:?}");
        assert!(h.legs[0].closed);
        // From the server.
        let mut h = Harness::with_mode(small.clone());
        let g0b = h.connect_last();
        assert_eq!(g0, g0b);
        h.client(&frame(&small, b"ok"));
        h.server(g0, &frame(&small, &[b'y'; 40])[..30]);
        assert_eq!(h.core.done(), Some(CloseReason::FrameTooLarge), "{mode:?}");
        assert!(h.client_rx.is_empty());
        assert_eq!(h.closed_events(), [CloseReason::FrameTooLarge]);
    }
}

// ---- hold, backoff, reconnect order ----

#[test]
fn hold_retries_same_server_then_others_then_backs_off() {
    let mut cfg = backend(AckMode::Tcp, 3);
    cfg.retry_initial = Duration::from_millis(1);
    cfg.retry_max = Duration::from_millis(20);
    let mut h = Harness::new(cfg);
    // Leg 0 on server 0 fails: server 0 again at once, then 1 and 2.
    let g0 = h.connect_last();
    h.client(b"abc");
    h.server_error(g0);
    let mut delays = Vec::new();
    let mut order = Vec::new();
    for _ in 0..30 {
        let g = h.last();
        let leg = &h.legs[g.0 as usize];
        order.push(leg.server);
        delays.push(leg.asked_at - h.legs[g.0 as usize - 1].asked_at.max(h.t0));
        h.refused(g);
        if h.legs.len() as u64 == g.0 + 1 {
            h.fire_deadline();
        }
    }
    assert_eq!(
        &order[..7],
        [0, 1, 2, 0, 1, 2, 0],
        "the same server first, then the others"
    );
    // Within a round: no wait. Between rounds: 1, 2, 4, 8, 16, 20, 20... ms
    // with jitter in the upper half.
    for (i, d) in delays.iter().enumerate() {
        if i % 3 != 0 || i == 0 {
            assert_eq!(*d, Duration::ZERO, "attempt {i}");
        } else {
            let full = Duration::from_millis(1 << (i / 3 - 1)).min(Duration::from_millis(20));
            assert!(
                *d >= full / 2 && *d <= full,
                "attempt {i}: {d:?} vs {full:?}"
            );
        }
    }
    assert!(h.core.done().is_none());
    assert!(h.core.is_held());
    // A server comes back: the bytes are replayed.
    let g = h.connect_last();
    assert_eq!(h.rx_stream(g), b"abc");
    assert!(!h.core.is_held());
}

#[test]
fn hold_from_the_start_then_hold_timeout_delivers_then_fins() {
    let mut cfg = backend(AckMode::Tcp, 2);
    cfg.hold_timeout = Duration::from_secs(2);
    let mut h = Harness::new(cfg);
    // No server at start.
    h.refused(h.last());
    assert_eq!(h.legs[1].server, 1);
    h.refused(h.last());
    h.client(b"held bytes");
    let g = loop {
        let g = h.last();
        if h.legs[g.0 as usize].resolved {
            h.fire_deadline();
        } else if h.now - h.t0 > Duration::from_millis(500) {
            break g;
        } else {
            h.refused(g);
        }
    };
    // One comes up, talks, and dies before acking anything.
    h.connected(g);
    assert_eq!(h.rx_stream(g), b"held bytes");
    h.stall_down = true;
    h.server(g, b"last words");
    h.server_error(g);
    // Nobody else answers until the hold times out.
    while h.core.done().is_none() && !h.core.stream(Dir::Down).fin_read() {
        let g = h.last();
        if !h.legs[g.0 as usize].resolved && !h.legs[g.0 as usize].closed {
            h.refused(g);
        }
        h.fire_deadline();
        assert!(
            h.now - h.t0 <= Duration::from_secs(2),
            "the hold outlived hold_timeout"
        );
    }
    assert_eq!(h.now - h.t0, Duration::from_secs(2), "hold since the start");
    assert!(h.legs.iter().all(|l| l.closed || l.resolved));
    assert!(!h.client_fin, "FIN before the bytes");
    assert!(!h.core.want_read_client());
    h.stall_down = false;
    h.pump();
    assert_eq!(h.client_rx, b"last words");
    assert!(h.client_fin);
    assert_eq!(h.core.done(), Some(CloseReason::HoldTimeout));
    assert_eq!(h.core.deadline(), None);
}

#[test]
fn hold_applies_backpressure_at_buffer_limit() {
    let mut cfg = backend(AckMode::Tcp, 1);
    cfg.buffer_limit = 10;
    let mut h = Harness::new(cfg);
    assert!(h.core.want_read_client());
    h.client(b"012345");
    assert!(h.core.want_read_client());
    h.client(b"6789");
    assert!(!h.core.want_read_client(), "stops reading at the limit");
    assert_eq!(h.core.buffered_bytes(), 10);
    let g = h.connect_last();
    assert!(!h.core.want_read_client(), "sent is not acked");
    h.acked(g, 4);
    assert!(h.core.want_read_client());
    assert_eq!(h.rx_stream(g), b"0123456789");
}

#[test]
fn shutdown_delivers_then_fins() {
    for mode in all_modes() {
        let mut h = Harness::with_mode(mode.clone());
        let g = h.connect_last();
        h.client(&frame(&mode, b"q"));
        h.stall_down = true;
        h.server(g, &frame(&mode, b"a"));
        h.core.on_shutdown(h.now);
        h.pump();
        assert!(h.legs[0].closed, "{mode:?}");
        assert!(!h.client_fin, "{mode:?}");
        h.stall_down = false;
        h.pump();
        assert_eq!(h.client_rx, frame(&mode, b"a"), "{mode:?}");
        assert!(h.client_fin, "{mode:?}");
        assert_eq!(h.core.done(), Some(CloseReason::Shutdown), "{mode:?}");
    }
}

#[test]
fn client_error_ends_at_once() {
    for mode in all_modes() {
        let mut h = Harness::with_mode(mode.clone());
        let g = h.connect_last();
        h.client(&frame(&mode, b"q"));
        h.core.on_client_error(h.now);
        h.pump();
        assert_eq!(h.core.done(), Some(CloseReason::ClientError), "{mode:?}");
        assert!(h.legs[0].closed, "{mode:?}");
        h.server(g, &frame(&mode, b"a"));
        assert!(h.client_rx.is_empty(), "{mode:?}");
    }
}

#[test]
fn idle_timeout_counts_client_bytes_either_way_then_fins() {
    for mode in all_modes() {
        let mut h = Harness::with_mode(mode.clone());
        h.core
            .set_idle_timeout(Some(Duration::from_secs(10)), h.now);
        let g = h.connect_last();
        assert_eq!(h.core.deadline(), Some(h.t0 + Duration::from_secs(10)));
        // A byte from the client at 4 s moves the deadline to 14 s.
        h.now += Duration::from_secs(4);
        h.client(&frame(&mode, b"ping"));
        assert_eq!(h.core.deadline(), Some(h.t0 + Duration::from_secs(14)));
        // A byte to the client at 9 s moves it to 19 s.
        h.now += Duration::from_secs(5);
        h.acked(g, h.core.stream(Dir::Up).read());
        h.server(g, &frame(&mode, b"ping"));
        let idle_at = h.t0 + Duration::from_secs(19);
        assert!(h.core.deadline().is_some_and(|d| d <= idle_at), "{mode:?}");
        while h.core.done().is_none() {
            h.fire_deadline();
            assert!(h.now <= idle_at, "{mode:?}: idle past the timeout");
        }
        assert_eq!(h.now, idle_at, "{mode:?}");
        assert!(h.client_fin, "{mode:?}: a graceful FIN");
        assert!(h.legs[g.0 as usize].closed);
        assert_eq!(h.core.done(), Some(CloseReason::IdleTimeout), "{mode:?}");
        assert_eq!(h.core.deadline(), None);
    }
}

#[test]
fn idle_timeout_off_by_default_and_hold_refusal_ends_gracefully() {
    let mut h = Harness::with_mode(lines());
    let g = h.connect_last();
    assert_eq!(h.core.deadline(), None, "no idle deadline by default");
    assert!(!h.core.is_holding(), "a working leg is not holding");
    h.client(b"req\n");
    h.server(g, b"partial");
    // The server dies: the session would hold.
    h.server_error(g);
    assert!(h.core.is_holding());
    h.core.on_hold_refused(h.now);
    h.pump();
    assert_eq!(h.core.done(), Some(CloseReason::TooManyHeld));
    assert!(h.client_fin);
    assert_eq!(h.client_rx, b"", "no half response reaches the client");
    // A first connect in flight is not holding; a failed one is.
    let mut h = Harness::with_mode(AckMode::Tcp);
    assert!(h.core.is_held() && !h.core.is_holding());
    h.refused(h.last());
    assert!(h.core.is_holding());
}

/// Every example above again, with the core exported and rebuilt after
/// every input (at the end of each pump, a quiescent point): a rebuilt
/// session goes on exactly as the original, to the byte.
#[test]
fn examples_with_a_snapshot_after_every_input() {
    assert_eq!(
        include_str!("tests.rs").matches("#[test]\n").count(),
        24 + 1,
        "a new example is listed here too"
    );
    super::tests::SNAPSHOTS.with(|s| s.set(true));
    data_both_ways_client_closes_first();
    data_both_ways_server_closes_first();
    a_reset_after_the_servers_close_makes_no_new_leg();
    none_mode_server_close_ends_the_session_without_the_close_option();
    none_mode_refused_everywhere_is_server_unreachable();
    none_mode_server_reset_is_server_error_after_the_bytes();
    none_mode_passed_through_bytes_count_in_order_with_held_ones();
    only_none_mode_passes_through();
    tcp_mode_replays_exactly_from_acked();
    tcp_mode_server_close_before_everything_acked_is_a_failure();
    response_mode_resends_exactly_the_unanswered_requests();
    response_mode_server_close_with_requests_unanswered_is_a_failure();
    response_mode_greeting_is_delivered_once();
    response_mode_greeting_cut_by_the_servers_close_comes_from_the_next_leg();
    response_mode_preamble_is_resent_and_its_answer_swallowed();
    response_mode_retry_response_restarts_the_leg_after_a_backoff();
    response_mode_frame_too_large();
    hold_retries_same_server_then_others_then_backs_off();
    hold_from_the_start_then_hold_timeout_delivers_then_fins();
    hold_applies_backpressure_at_buffer_limit();
    shutdown_delivers_then_fins();
    client_error_ends_at_once();
    idle_timeout_counts_client_bytes_either_way_then_fins();
    idle_timeout_off_by_default_and_hold_refusal_ends_gracefully();
}
