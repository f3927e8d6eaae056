//! Sessions that outlive their server: real example-server child processes
//! SIGKILLed and restarted on the same address under many clients, for
//! `ack = "tcp"` and for `ack = "response"` with each framing; hold tests.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: usize = 20;
const KILLS: usize = 20;

fn config(server: &str, ack: &str, extra: &str) -> String {
    let keys = format!("ack = \"{ack}\"\nhold_timeout = \"20s\"\n{extra}");
    one_listener_config(&[server], &keys, "")
}

/// ack = "response", framing = "lines": 20 pipelining clients, 20 SIGKILLs:
/// every request answered exactly once, in order, no reset, no EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_lines_survive_20_kills_with_20_clients() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let mut server = Server::start("127.0.0.1:0", "lines").await;
    let proxy = Proxy::start(&config(&server.addr, "response", "framing = \"lines\"")).await;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let addr = proxy.addr(0);
        let progress = progress.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            verified_lines_until(connect(&addr).await, id, progress, stop).await
        }));
    }
    chaos(&mut server, KILLS, progress.clone()).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.await.expect("join").unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(total > (KILLS * 50) as u64, "traffic flowed: {total}");
    proxy.stop().await;
}

/// ack = "tcp" with an echo server, 20 clients, 20 SIGKILLs. The documented
/// window of `tcp`: bytes the server host's TCP acknowledged that its process
/// never read are lost, and bytes the process read before holdfast saw them
/// acknowledged are sent again. So each kill may cause at most one
/// discontinuity in a client's echoed stream (a skip, a repeat, or one torn
/// line where two legs meet), never a reset or an EOF, and everything after
/// the last kill arrives exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ack_survives_20_kills_with_20_clients() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let proxy = Proxy::start(&config(&server.addr, "tcp", "")).await;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let addr = proxy.addr(0);
        let progress = progress.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (r, mut w) = stream.into_split();
            let writer = tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    w.write_all(format!("{seq:08}\n").as_bytes())
                        .await
                        .map_err(|e| format!("client {id}: write: {e}"))?;
                    seq += 1;
                    if seq % 16 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                // After the chaos: 1,000 more lines that must all arrive exactly.
                for k in 0..1000 {
                    w.write_all(format!("{:08}\n", seq + k).as_bytes())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                w.shutdown().await.map_err(|e| e.to_string())?;
                Ok::<u64, String>(seq + 1000)
            });
            let mut r = tokio::io::BufReader::new(r);
            let mut line = String::new();
            let mut next = 0u64;
            let mut discontinuities = 0usize;
            let mut tail_exact = 0u64;
            loop {
                line.clear();
                let n = r
                    .read_line(&mut line)
                    .await
                    .map_err(|e| format!("client {id}: read (reset?): {e}"))?;
                if n == 0 {
                    break;
                }
                progress.fetch_add(1, Ordering::Relaxed);
                match line.trim_end().parse::<u64>() {
                    Ok(seq) if seq == next && line.len() == 9 => {
                        next += 1;
                        tail_exact += 1;
                    }
                    Ok(seq) if line.len() == 9 => {
                        discontinuities += 1;
                        tail_exact = 1;
                        next = seq + 1;
                    }
                    _ => {
                        // A torn line where two legs meet.
                        discontinuities += 1;
                        tail_exact = 0;
                    }
                }
            }
            let sent = writer.await.unwrap()?;
            if next != sent {
                return Err(format!(
                    "client {id}: the stream ended at {next}, sent {sent}"
                ));
            }
            if tail_exact < 1000 {
                return Err(format!(
                    "client {id}: only {tail_exact} exact lines at the end"
                ));
            }
            Ok::<(u64, usize), String>((sent, discontinuities))
        }));
    }
    chaos(&mut server, KILLS, progress.clone()).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (sent, disc) = c.await.expect("join").unwrap_or_else(|e| panic!("{e}"));
        // A torn line and the skip after it come from the same kill.
        assert!(
            disc <= 2 * KILLS,
            "{disc} discontinuities for {KILLS} kills"
        );
        total += sent;
    }
    eprintln!("tcp ack: {total} lines across {KILLS} kills");
    proxy.stop().await;
}

/// length-prefixed framing (4-byte big-endian length) with the echo server:
/// every frame answered exactly once across kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_length_prefixed_survives_kills() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    // The echo server echoes bytes: whole frames come back as whole frames.
    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let proxy = Proxy::start(&config(
        &server.addr,
        "response",
        "framing = { type = \"length-prefixed\", length_field_length = 4 }",
    ))
    .await;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let addr = proxy.addr(0);
        let progress = progress.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut batch = Vec::new();
                let mut want = Vec::new();
                for k in 0..4u64 {
                    let body = pattern(
                        ((seq + k) * 131 % 3000) as usize + 1,
                        seq + k + id as u64 * 1_000_000,
                    );
                    let mut f = (body.len() as u32).to_be_bytes().to_vec();
                    f.extend_from_slice(&body);
                    batch.extend_from_slice(&f);
                    want.extend_from_slice(&f);
                }
                s.write_all(&batch)
                    .await
                    .map_err(|e| format!("client {id}: write: {e}"))?;
                let mut got = vec![0u8; want.len()];
                s.read_exact(&mut got)
                    .await
                    .map_err(|e| format!("client {id}: read (reset/EOF?): {e}"))?;
                if got != want {
                    return Err(format!("client {id}: frames differ at batch {seq}"));
                }
                seq += 4;
                progress.fetch_add(4, Ordering::Relaxed);
            }
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.map_err(|e| e.to_string())?;
            if !rest.is_empty() {
                return Err(format!("client {id}: {} extra bytes", rest.len()));
            }
            Ok::<u64, String>(seq)
        }));
    }
    chaos(&mut server, KILLS, progress.clone()).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("join").unwrap_or_else(|e| panic!("{e}"));
    }
    proxy.stop().await;
}

/// A client that connects while no server is up is accepted and held; its
/// requests are answered once the server starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connecting_with_no_server_is_held_then_served() {
    let mut server = Server::start("127.0.0.1:0", "lines").await;
    let addr = server.addr.clone();
    server.kill().await;
    let proxy = Proxy::start(&config(&addr, "response", "framing = \"lines\"")).await;
    let client = tokio::spawn(line_client(proxy.addr(0), 1, 100, 10));
    // The client is connected and waiting; now the server comes up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!client.is_finished(), "held, not closed");
    server.restart().await;
    let n = client.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, 100);
    proxy.stop().await;
}

/// With the server down past `hold_timeout`, the client gets every response
/// it is owed and then a FIN (a clean EOF, never a reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_timeout_closes_the_client_with_a_fin() {
    let mut server = Server::start("127.0.0.1:0", "lines").await;
    let proxy = Proxy::start(
        &config(&server.addr, "response", "framing = \"lines\"")
            .replace("hold_timeout = \"20s\"", "hold_timeout = \"300ms\""),
    )
    .await;
    let mut c = connect(&proxy.addr(0)).await;
    c.write_all(b"one\n").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"one\n");
    server.kill().await;
    c.write_all(b"two\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .expect("closed after hold_timeout");
    assert!(r.is_ok(), "a FIN, not a reset: {r:?}");
    assert!(rest.is_empty(), "no response to the unanswered request");
    assert!(started.elapsed() >= Duration::from_millis(250));
    proxy.stop().await;
}

/// While the server is down, holdfast reads the client only up to
/// `buffer_limit`, then stops (TCP backpressure: the client's writes block,
/// no drop, no reset); once the server is back everything arrives exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_limit_backpressures_the_client_while_held() {
    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let toml = config(&server.addr, "tcp", "buffer_limit = \"64KiB\"");
    let running = start_running(&toml).await;
    let (addr, rt, shutdown) = (
        running.addrs[0].clone(),
        running.rt.clone(),
        running.shutdown.clone(),
    );

    let c = connect(&addr).await;
    let (mut r, mut w) = c.into_split();
    w.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    r.read_exact(&mut one).await.unwrap();
    server.kill().await;

    // More than the kernel's socket buffers can absorb on loopback (several
    // MiB with autotuning), so the writer must block.
    let data = pattern(32 << 20, 11);
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&d2).await.unwrap();
        w.shutdown().await.unwrap();
    });
    // holdfast stops reading at the limit: its up stream stops growing well
    // short of 32 MiB, while the writer is blocked.
    let mut read = 0;
    for _ in 0..1000 {
        let views = rt.shared.session_views();
        read = views[0].up.read;
        let buffered = views[0].buffered_bytes;
        if read > 64 * 1024 && read == rt.shared.session_views()[0].up.read {
            assert!(buffered <= 64 * 1024 + 64 * 1024, "buffered {buffered}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(read < 1 << 20, "holdfast read {read} bytes while held");
    assert!(
        !writer.is_finished(),
        "the client is backpressured, not dropped"
    );
    assert_eq!(rt.shared.session_views()[0].state, "held");

    server.restart().await;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got))
        .await
        .expect("everything echoed in time")
        .unwrap();
    writer.await.unwrap();
    assert_bytes_eq(&got, &data, "echo after the hold");
    shutdown.stop.cancel();
}
