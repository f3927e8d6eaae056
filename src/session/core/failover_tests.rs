//! Tests of [`SessionCore::from_replicated`]: the rebuilt core replays
//! exactly `[A, R)` to its new leg, writes the rest of `[C, W)` and then the
//! new leg's responses from `W` on; and a seeded simulation that fails a
//! session over at a random point and checks every response exactly once, in
//! order.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::super::tests::{backend, frame, lines, response_modes, Harness};
use super::{Replicated, ReplicatedError};
use crate::config::{AckMode, BackendConfig};
use crate::session::core::{Event, SessionCore, SessionId};
use crate::stream::Dir;

const ID: SessionId = SessionId(0xfa11_0e7e);

/// A harness around a rebuilt core; `client_rx` holds what the client had
/// before (`seen`, the stream's first bytes).
fn harness(cfg: BackendConfig, r: Replicated, seen: &[u8]) -> Harness {
    let now = Instant::now();
    let core = SessionCore::from_replicated(ID, Arc::new(cfg), 0, r, now).expect("rebuilt");
    let mut h = Harness::new(backend(AckMode::Tcp, 1));
    h.core = core;
    h.now = now;
    h.t0 = now;
    h.legs.clear();
    h.events.clear();
    h.client_rx = seen.to_vec();
    h.pump();
    h
}

/// Splits `b` into chunks of 1, 2, 3, ... bytes.
fn chunks(b: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let (mut i, mut n) = (0, 1);
    while i < b.len() {
        let j = (i + n).min(b.len());
        out.push(Bytes::copy_from_slice(&b[i..j]));
        i = j;
        n += 1;
    }
    out
}

fn reqs(mode: &AckMode, range: std::ops::Range<usize>) -> Vec<u8> {
    range
        .flat_map(|i| frame(mode, format!("request {i}").as_bytes()))
        .collect()
}

fn resps(mode: &AckMode, range: std::ops::Range<usize>) -> Vec<u8> {
    range
        .flat_map(|i| frame(mode, format!("answer {i}").as_bytes()))
        .collect()
}

#[test]
fn replays_exactly_the_unanswered_requests_and_answers_from_w_on() {
    for mode in response_modes() {
        for snapshots in [false, true] {
            // The active read requests 0..6 and half of 6; the server answered
            // 0..3 (A = end of request 2); the client got answers 0..3.
            let a = reqs(&mode, 0..3).len() as u64;
            let unanswered = reqs(&mode, 3..6);
            let partial = &frame(&mode, b"request 6")[..5];
            let up = [&unanswered[..], partial].concat();
            let seen = resps(&mode, 0..3);
            let r = Replicated {
                server_acked: a,
                unacked_up: chunks(&up),
                down_from: seen.len() as u64,
                unsent_down: Vec::new(),
            };
            let mut h = harness(backend(mode.clone(), 1), r, &seen);
            h.snapshots = snapshots;
            assert_eq!(h.legs.len(), 1, "{mode:?}: a connect at once");
            assert!(h.core.is_held(), "{mode:?}");
            let g = h.connect_last();
            assert_eq!(h.rx_stream(g), &up[..], "{mode:?}: exactly [A, R) replayed");
            assert!(h.events.iter().any(|e| matches!(
                e,
                Event::LegUp { resumed: true, replay, .. } if *replay == up.len() as u64
            )));
            // The answers to 3..6 arrive (in odd pieces): delivered after W.
            let answers = resps(&mode, 3..6);
            for c in chunks(&answers) {
                h.server(g, &c);
            }
            assert_eq!(h.client_rx, resps(&mode, 0..6), "{mode:?}");
            let up_stream = h.core.stream(Dir::Up);
            assert_eq!(up_stream.acked(), a + unanswered.len() as u64, "{mode:?}");
            // The client finishes request 6 and sends 7; both answered.
            let rest = [&frame(&mode, b"request 6")[5..], &reqs(&mode, 7..8)[..]].concat();
            h.client(&rest);
            h.server(g, &resps(&mode, 6..8));
            assert_eq!(h.client_rx, resps(&mode, 0..8), "{mode:?}");
            assert_eq!(h.rx_stream(g), &[&up[..], &rest[..]].concat()[..]);
            assert_eq!(h.core.stream(Dir::Up).buffered(), 0, "{mode:?}");
            // A normal end.
            h.client_eof();
            h.server_eof(g);
            assert!(h.client_fin, "{mode:?}");
            assert!(h.core.done().is_some(), "{mode:?}");
        }
    }
}

#[test]
fn tcp_mode_replays_from_the_server_acked_offset() {
    let up = b"0123456789abcdef".to_vec();
    let r = Replicated {
        server_acked: 1000,
        unacked_up: chunks(&up),
        down_from: 7,
        unsent_down: Vec::new(),
    };
    let mut h = harness(backend(AckMode::Tcp, 1), r, b"xxxxxxx");
    let g = h.connect_last();
    assert_eq!(h.rx_stream(g), &up[..]);
    h.acked(g, 10);
    assert_eq!(h.core.stream(Dir::Up).acked(), 1010);
    // The server fails: the next leg replays from 1010.
    h.server_error(g);
    let g2 = h.connect_last();
    assert_eq!(h.rx_stream(g2), &up[10..]);
    h.server(g2, b"reply");
    assert_eq!(h.client_rx, b"xxxxxxxreply");
    assert_eq!(h.core.stream(Dir::Down).sent(), 12);
}

#[test]
fn the_rest_of_the_unacked_client_bytes_is_written_first() {
    let mode = lines();
    let all = resps(&mode, 0..4);
    // The client has acknowledged answer 0; the restored socket re-sent 3
    // bytes more; the rest of answers 1..4 is the core's to write.
    let c = resps(&mode, 0..1).len() + 3;
    let r = Replicated {
        server_acked: reqs(&mode, 0..4).len() as u64,
        unacked_up: chunks(&reqs(&mode, 4..5)),
        down_from: c as u64,
        unsent_down: chunks(&all[c..]),
    };
    let mut h = harness(backend(mode.clone(), 1), r, &all[..c]);
    h.down_max = 4;
    h.pump();
    assert_eq!(h.client_rx, all, "written before any leg is up");
    let g = h.connect_last();
    assert_eq!(h.rx_stream(g), &reqs(&mode, 4..5)[..]);
    h.server(g, &resps(&mode, 4..5));
    assert_eq!(h.client_rx, resps(&mode, 0..5));
}

#[test]
fn a_greeting_is_swallowed_once_the_client_got_bytes() {
    let mode = lines();
    for (seen, expect_greeting) in [(resps(&mode, 0..1), false), (Vec::new(), true)] {
        let mut cfg = backend(mode.clone(), 1);
        cfg.greeting = 1;
        let answered = if seen.is_empty() { 0 } else { 1 };
        let r = Replicated {
            server_acked: reqs(&mode, 0..answered).len() as u64,
            unacked_up: chunks(&reqs(&mode, answered..answered + 1)),
            down_from: seen.len() as u64,
            unsent_down: Vec::new(),
        };
        let mut h = harness(cfg, r, &seen);
        let g = h.connect_last();
        h.server(g, b"hello from the server\n");
        h.server(g, &resps(&mode, answered..answered + 1));
        let want = if expect_greeting {
            [&b"hello from the server\n"[..], &resps(&mode, 0..1)].concat()
        } else {
            resps(&mode, 0..2)
        };
        assert_eq!(h.client_rx, want);
    }
}

#[test]
fn unsupported_sessions_are_refused() {
    let now = Instant::now();
    let r = Replicated::default();
    let none = SessionCore::from_replicated(ID, Arc::new(backend(AckMode::None, 1)), 0, r, now);
    assert_eq!(none.unwrap_err(), ReplicatedError::AckMode("none"));
    let mut cfg = backend(lines(), 1);
    cfg.preamble = 1;
    let pre = SessionCore::from_replicated(ID, Arc::new(cfg), 0, Replicated::default(), now);
    assert!(matches!(pre, Err(ReplicatedError::Preamble(_))));
    // Client bytes that break the framing.
    let bad = Replicated {
        unacked_up: vec![Bytes::from(vec![b'x'; 2000])],
        ..Replicated::default()
    };
    let res = SessionCore::from_replicated(ID, Arc::new(backend(lines(), 1)), 0, bad, now);
    assert!(matches!(res, Err(ReplicatedError::Framing(_))));
}

/// xorshift64, seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The line server: answers every whole request line it received on leg
/// `g` and has not answered yet, `limit` of them at most, in up to two
/// pieces. Returns how many it answered.
fn answer(h: &mut Harness, answered: &mut usize, limit: usize, rng: &mut Rng) -> usize {
    let g = h.last();
    let rx = h.rx_stream(g).to_vec();
    let whole: Vec<&[u8]> = rx
        .split_inclusive(|&b| b == b'\n')
        .filter(|l| l.ends_with(b"\n"))
        .collect();
    let todo: Vec<u8> = whole
        .iter()
        .skip(*answered)
        .take(limit)
        .flat_map(|l| {
            let n = std::str::from_utf8(&l[1..l.len() - 1]).unwrap();
            format!("a{n}\n").into_bytes()
        })
        .collect();
    let k = whole.len().saturating_sub(*answered).min(limit);
    *answered += k;
    if !todo.is_empty() {
        let cut = rng.below(todo.len() as u64 + 1) as usize;
        h.server(g, &todo[..cut]);
        h.server(g, &todo[cut..]);
    }
    k
}

/// Fails a session over at a random point of a pipelined request stream
/// (`ack = "response"`, lines), as the standby would rebuild it from what
/// the active replicated: every answer reaches the client exactly once, in
/// order.
#[test]
fn sim_failover_at_a_random_point_answers_everything_once() {
    const N: usize = 40;
    // Seeds that failed over with requests to replay, and with client bytes
    // left for the core to write.
    let (mut replays, mut rewrites) = (0, 0);
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let requests: Vec<u8> = (0..N)
            .flat_map(|i| format!("q{i}\n").into_bytes())
            .collect();
        let want: Vec<u8> = (0..N)
            .flat_map(|i| format!("a{i}\n").into_bytes())
            .collect();
        let mut h = Harness::with_mode(lines());
        h.connect_last();
        let mut sent = 0;
        let mut answered = 0;
        let fail_at = rng.below(30);
        for _ in 0..fail_at {
            if sent < requests.len() {
                let n = 1 + rng.below(12) as usize;
                let end = (sent + n).min(requests.len());
                h.client(&requests[sent..end]);
                sent = end;
            }
            h.stall_down = rng.below(3) == 0;
            h.down_max = 1 + rng.below(8) as usize;
            let limit = rng.below(4) as usize;
            answer(&mut h, &mut answered, limit, &mut rng);
        }
        // What the active replicated: A, [A, R), W = everything it put in
        // the down stream (replicated before it is written); the client has
        // `S` bytes, acknowledged `C <= S`; the restored socket re-sent
        // [C, done), the core takes the stream from `from`.
        let up = h.core.stream(Dir::Up);
        let (a, r) = (up.acked(), up.read());
        let unacked_up = vec![up.buffer().copy_range(a, r)];
        let down = h.core.stream(Dir::Down);
        let (s, w) = (down.sent(), down.read());
        let mut stream = h.client_rx.clone();
        stream.extend_from_slice(&down.buffer().copy_range(s, w));
        assert_eq!(stream.len() as u64, w);
        let c = rng.below(s + 1);
        let done = c + rng.below(w - c + 1);
        let from = done;
        replays += usize::from(r > a);
        rewrites += usize::from(from < w);
        let repl = Replicated {
            server_acked: a,
            unacked_up: unacked_up.into_iter().filter(|b| !b.is_empty()).collect(),
            down_from: from,
            unsent_down: vec![Bytes::copy_from_slice(&stream[from as usize..])],
        };
        // The client's view is the stream by offset: what it has is the
        // first `from` bytes (the kernel dedups by sequence number).
        let mut h = harness(backend(lines(), 1), repl, &stream[..from as usize]);
        h.down_max = 1 + rng.below(8) as usize;
        h.connect_last();
        let mut answered = 0;
        while sent < requests.len()
            || answered
                < h.rx_stream(h.last())
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
        {
            if sent < requests.len() {
                let n = 1 + rng.below(12) as usize;
                let end = (sent + n).min(requests.len());
                h.client(&requests[sent..end]);
                sent = end;
            }
            let limit = 1 + rng.below(4) as usize;
            answer(&mut h, &mut answered, limit, &mut rng);
        }
        h.pump();
        assert_eq!(
            String::from_utf8_lossy(&h.client_rx),
            String::from_utf8_lossy(&want),
            "seed {seed}: fail at {fail_at}, A {a} R {r} C {c} W {w}"
        );
        assert_eq!(h.core.stream(Dir::Up).buffered(), 0, "seed {seed}");
    }
    assert!(replays > 100 && rewrites > 100, "{replays} {rewrites}");
}
