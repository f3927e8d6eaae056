//! Limits and hostile clients, end to end: a listener's `max_sessions` and
//! `max_sessions_per_client`, `idle_timeout`, a backend's
//! `max_held_sessions`; a slowloris client, a client that never reads, and a
//! connection flood, none of which may hurt the other sessions.
//! (`fd_reserve` needs its own process under `ulimit -n`: tests/cli.rs.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn config(server: &str, listener_extra: &str, backend_extra: &str) -> String {
    let keys = format!("ack = \"response\"\nframing = \"lines\"\n{backend_extra}");
    listener_config_with(listener_extra, &[server], &keys, "")
}

/// Reads until EOF (or 10 s): what a refused or closed client gets.
async fn read_to_eof(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("a FIN, not a reset");
    got
}

/// A flood beyond the listener's `max_sessions` is accepted and closed at
/// once, counted as `max_sessions`, while the live sessions keep
/// exchanging verified data; once one ends, a new client gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_beyond_listener_max_sessions_is_shed_without_hurting_live_sessions() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let h = start_running(&config(&server.addr, "max_sessions = 4", "")).await;
    let addr = h.addrs[0].clone();
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut live = Vec::new();
    for id in 0..4 {
        let s = connect(&addr).await;
        live.push(tokio::spawn(verified_lines_until(
            s,
            id,
            progress.clone(),
            stop.clone(),
        )));
    }
    wait_for("4 sessions", || h.rt.shared.session_views().len() == 4).await;
    // 200 more connections, each closed at once with nothing received.
    for _ in 0..200 {
        let mut c = connect(&addr).await;
        assert!(read_to_eof(&mut c).await.is_empty());
    }
    let text = h.rt.metrics.encode();
    assert_eq!(
        sample(
            &text,
            "holdfast_client_connections_rejected_total{listener=\"l\",reason=\"max_sessions\"}"
        ),
        200.0
    );
    // The live sessions moved on during and after the flood.
    let before = progress.load(Ordering::Relaxed);
    wait_for("progress after the flood", || {
        progress.load(Ordering::Relaxed) >= before + 100
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in live {
        let sent = c.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert!(sent > 0);
    }
    // Places were given back: a new client is served.
    wait_for("sessions ended", || h.rt.shared.session_views().is_empty()).await;
    let got = line_client(addr, 9, 10, 2).await.unwrap();
    assert_eq!(got, 10);
    h.shutdown.stop.cancel();
}

/// `max_sessions_per_client = 2`: the third connection from 127.0.0.1 is
/// closed at once (`per_client_limit`); the first two are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limit_closes_the_extra_connection() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let h = start_running(&config(&server.addr, "max_sessions_per_client = 2", "")).await;
    let addr = h.addrs[0].clone();
    let mut a = BufReader::new(connect(&addr).await);
    let mut b = BufReader::new(connect(&addr).await);
    wait_for("2 sessions", || h.rt.shared.session_views().len() == 2).await;
    let mut c = connect(&addr).await;
    assert!(read_to_eof(&mut c).await.is_empty());
    assert_eq!(
        sample(
            &h.rt.metrics.encode(),
            "holdfast_client_connections_rejected_total{listener=\"l\",reason=\"per_client_limit\"}"
        ),
        1.0
    );
    for (s, msg) in [(&mut a, "a\n"), (&mut b, "b\n")] {
        s.get_mut().write_all(msg.as_bytes()).await.unwrap();
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        assert_eq!(line, msg);
    }
    drop(a);
    wait_for("a slot freed", || h.rt.shared.session_views().len() == 1).await;
    let got = line_client(addr, 3, 5, 1).await.unwrap();
    assert_eq!(got, 5, "a place under the per-client limit came back");
    h.shutdown.stop.cancel();
}

/// `idle_timeout`: a session with no traffic is closed with a FIN (reason
/// `idle_timeout`) after its last exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_is_closed_gracefully() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let h = start_running(&config(&server.addr, "idle_timeout = \"300ms\"", "")).await;
    let s = connect(&h.addrs[0]).await;
    let mut s = BufReader::new(s);
    s.get_mut().write_all(b"hello\n").await.unwrap();
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    assert_eq!(line, "hello\n");
    // Then silence: holdfast closes with a FIN, not a reset.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("closed for idleness")
        .expect("a FIN");
    assert!(rest.is_empty());
    wait_for("the close counted", || {
        sample(
            &h.rt.metrics.encode(),
            "holdfast_sessions_closed_total{listener=\"l\",reason=\"idle_timeout\"}",
        ) == 1.0
    })
    .await;
    h.shutdown.stop.cancel();
}

/// `max_held_sessions = 1`: when the server dies under two sessions, one
/// holds and the other is closed gracefully (`too_many_held`); the held one
/// is resumed when the server returns, its request answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_held_sessions_a_session_is_closed_instead_of_held() {
    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let h = start_running(&config(&server.addr, "", "max_held_sessions = 1")).await;
    let mut clients = Vec::new();
    for msg in ["one\n", "two\n"] {
        let mut s = BufReader::new(connect(&h.addrs[0]).await);
        s.get_mut().write_all(msg.as_bytes()).await.unwrap();
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        assert_eq!(line, msg);
        clients.push(s);
    }
    server.kill().await;
    for s in &mut clients {
        s.get_mut().write_all(b"again\n").await.unwrap();
    }
    let closed = "holdfast_sessions_closed_total{listener=\"l\",reason=\"too_many_held\"}";
    wait_for("one session refused its hold", || {
        sample(&h.rt.metrics.encode(), closed) == 1.0
    })
    .await;
    server.restart().await;
    let (mut answered, mut ended) = (0, 0);
    for s in &mut clients {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_line(&mut line))
            .await
            .expect("an answer or a FIN")
            .expect("no reset");
        match line.as_str() {
            "again\n" => answered += 1,
            "" => ended += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((answered, ended), (1, 1));
    h.shutdown.stop.cancel();
}

/// A slowloris client (one byte of a never-ending line now and then) holds
/// no more than its own small buffer; a client that never reads stalls only
/// its own session (its server side is backpressured within
/// `buffer_limit`), while other sessions run to completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_non_reading_clients_hurt_only_themselves() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let h = start_running(&config(&server.addr, "", "buffer_limit = \"64KiB\"")).await;
    let addr = h.addrs[0].clone();
    // Slowloris: 200 single bytes of one unfinished line.
    let slow_addr = addr.clone();
    let slow = tokio::spawn(async move {
        let mut s = connect(&slow_addr).await;
        for _ in 0..200 {
            s.write_all(b"z").await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        s
    });
    // The non-reader: writes up to 256 MiB of lines and never reads the
    // echo; kernel socket buffers take some MiB, then its writes stall.
    let mut stuck = connect(&addr).await;
    let writer = tokio::spawn(async move {
        let mut buf = Vec::new();
        for _ in 0..64 {
            buf.extend_from_slice(&[b'x'; 1023]);
            buf.push(b'\n');
        }
        let mut sent = 0usize;
        while sent < 256 << 20 {
            match tokio::time::timeout(Duration::from_millis(500), stuck.write_all(&buf)).await {
                Ok(Ok(())) => sent += buf.len(),
                Ok(Err(e)) => panic!("the non-reader was reset: {e}"),
                Err(_) => break, // backpressured, as it should be
            }
        }
        (stuck, sent)
    });
    // Meanwhile, 8 ordinary clients run 500 verified requests each.
    let mut ok = Vec::new();
    for id in 0..8 {
        ok.push(tokio::spawn(line_client(addr.clone(), id, 500, 8)));
    }
    for c in ok {
        assert_eq!(c.await.unwrap().unwrap(), 500);
    }
    let (stuck, sent) = writer.await.unwrap();
    assert!(sent < 256 << 20, "the non-reader was backpressured");
    let slow = slow.await.unwrap();
    // What each hostile session holds is bounded by its own buffers: per
    // direction, `buffer_limit` plus one read (64 KiB) past it.
    let views = h.rt.shared.session_views();
    assert_eq!(views.len(), 2, "only the two hostile sessions remain");
    for v in &views {
        assert!(
            v.buffered_bytes <= 2 * (64 * 1024 + 64 * 1024),
            "session {} holds {} bytes",
            v.id,
            v.buffered_bytes
        );
    }
    let slowloris = views
        .iter()
        .find(|v| v.up.read == 200)
        .expect("the slowloris session read its 200 bytes");
    // Its 200 bytes, kept for replay, and their echo, held until the line
    // is whole: nothing more.
    assert!(slowloris.buffered_bytes <= 2 * 200, "{slowloris:?}");
    drop((stuck, slow));
    for _ in 0..1000 {
        if h.rt.shared.session_views().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = h.rt.shared.session_views();
    assert!(left.is_empty(), "{left:?}");
    h.shutdown.stop.cancel();
}

/// `[limits] buffer_memory` bounds the replay buffers of all sessions
/// together: with the server down, sessions stop reading their clients once
/// the total is reached (counted once, logged once); when the server is
/// back, every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_memory_bounds_all_sessions_together() {
    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let toml = format!(
        "[limits]\nbuffer_memory = \"256KiB\"\n{}",
        config(&server.addr, "", "buffer_limit = \"200KiB\"")
            .replace("ack = \"response\"\nframing = \"lines\"", "ack = \"tcp\"")
    );
    let running = start_running(&toml).await;
    let addr = running.addrs[0].clone();
    // Four sessions, each with a leg up, then the server dies.
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut c = connect(&addr).await;
        c.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        conns.push(c);
    }
    server.kill().await;
    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        // More than loopback socket buffers absorb, so writers must block.
        let data = pattern(16 << 20, 40 + i as u64);
        tasks.push(tokio::spawn(async move {
            let got = send_and_collect(c, data.clone()).await.expect("no reset");
            assert_bytes_eq(&got, &data, "echo after the hold");
        }));
    }
    let rt = running.rt.clone();
    wait_for("buffer_memory reached", || {
        sample(&rt.metrics.encode(), "holdfast_buffer_memory_full_total") >= 1.0
    })
    .await;
    // Held in all: the limit plus at most one read per session beyond it.
    let used = running
        .rt
        .shared
        .buffer_used
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(used <= (256 << 10) + 4 * (64 << 10), "{used} bytes held");
    assert!(
        tasks.iter().all(|t| !t.is_finished()),
        "clients are backpressured"
    );
    assert_eq!(
        sample(&rt.metrics.encode(), "holdfast_buffer_memory_limit_bytes"),
        (256 << 10) as f64
    );
    server.restart().await;
    for t in tasks {
        t.await.unwrap();
    }
    running.shutdown.stop.cancel();
}
