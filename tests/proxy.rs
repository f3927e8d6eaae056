//! The foundation: holdfast as a plain proxy (`ack = "none"`) over TCP and
//! Unix sockets, half-close both ways, refused servers, many sessions,
//! draining, and the real binary.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

fn plain_config(server: &str) -> String {
    proxy_config(server, r#"ack = "none""#)
}

/// One listener in front of `server`, the backend with `keys`.
fn proxy_config(server: &str, keys: &str) -> String {
    one_listener_config(&[server], keys, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_64mib_over_tcp_is_byte_exact() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let proxy = Proxy::start(&plain_config(&server.addr)).await;
    let data = pattern(64 << 20, 1);
    let got = send_and_collect(connect(&proxy.addr(0)).await, data.clone())
        .await
        .expect("no error at the client");
    assert_bytes_eq(&got, &data, "64 MiB echoed through holdfast");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_64mib_over_unix_listener_and_unix_server() {
    let dir = std::env::temp_dir().join(format!("holdfast-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server_path = dir.join("server.sock");
    let listen_path = dir.join("listen.sock");
    let server = Server::start(&format!("unix:{}", server_path.display()), "echo").await;
    let toml = format!(
        r#"
[[listener]]
name = "l"
listen = "unix:{}"
backend = "b"

[[backend]]
name = "b"
servers = ["{}"]
ack = "none"
"#,
        listen_path.display(),
        server.addr
    );
    let proxy = Proxy::start(&toml).await;
    let data = pattern(64 << 20, 2);
    let client = UnixStream::connect(&listen_path)
        .await
        .expect("connect unix");
    let got = send_and_collect(client, data.clone())
        .await
        .expect("no error");
    assert_bytes_eq(&got, &data, "64 MiB over unix sockets");
    proxy.stop().await;
    assert!(
        !listen_path.exists(),
        "the listener's socket file is removed on stop"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The client's FIN reaches the server after every byte; the server then
/// answers and closes, and the client gets every byte and then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_server_after_all_bytes() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap().to_string();
    let proxy = Proxy::start(&plain_config(&server_addr)).await;
    let srv = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap(); // until the client's FIN
                                                // Still writable after the client's half-close.
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        got
    });
    let mut c = connect(&proxy.addr(0)).await;
    let data = pattern(1 << 20, 3);
    c.write_all(&data).await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, format!("got {} bytes", data.len()));
    assert_bytes_eq(&srv.await.unwrap(), &data, "server received");
    proxy.stop().await;
}

/// The server's FIN reaches the client after every byte; the client can go
/// on sending, and the server receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_half_close_reaches_client_and_client_keeps_sending() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap().to_string();
    let proxy = Proxy::start(&plain_config(&server_addr)).await;
    let greeting = pattern(300_000, 4);
    let g2 = greeting.clone();
    let srv = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        s.write_all(&g2).await.unwrap();
        s.shutdown().await.unwrap(); // FIN first
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut c = connect(&proxy.addr(0)).await;
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_bytes_eq(&got, &greeting, "client received before EOF");
    let after = pattern(200_000, 5);
    c.write_all(&after).await.unwrap();
    c.shutdown().await.unwrap();
    assert_bytes_eq(&srv.await.unwrap(), &after, "server received after its FIN");
    proxy.stop().await;
}

/// A server SIGKILLed in mid-bulk (both directions spliced by then): a
/// plain proxy ends the session, and what the client got is exactly the
/// start of its echo: nothing lost before the cut, reordered or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_in_mid_bulk_leaves_an_exact_prefix() {
    for round in 0..3u64 {
        let mut server = Server::start("127.0.0.1:0", "echo").await;
        let proxy = Proxy::start(&plain_config(&server.addr)).await;
        let data = pattern(256 << 20, 10 + round);
        let (mut r, mut w) = connect(&proxy.addr(0)).await.into_split();
        let sent = data.clone();
        // The writer fails once the session is closed: that is expected.
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(64 * 1024) {
                if w.write_all(chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut killed = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf))
                .await
                .expect("the session ends after the kill")
            {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            // Far enough into bulk for both directions to go by splice.
            if !killed && got.len() >= (8 << 20) + (round as usize) * 777_777 {
                server.kill().await;
                killed = true;
            }
        }
        assert!(killed, "round {round}: the echo ended before the kill");
        assert!(
            got.len() < data.len(),
            "round {round}: the cut came in mid-stream"
        );
        assert_bytes_eq(
            &got,
            &data[..got.len()],
            "what the client got before the cut",
        );
        writer.abort();
        proxy.stop().await;
    }
}

/// No server listening: a plain proxy closes the client cleanly (EOF, not a
/// reset) after trying every server once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_servers_close_the_client_cleanly() {
    // Two ports nobody listens on.
    let (a, b) = {
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        (l1.local_addr().unwrap(), l2.local_addr().unwrap())
    };
    let toml = one_listener_config(&[&a.to_string(), &b.to_string()], "ack = \"none\"", "");
    let proxy = Proxy::start(&toml).await;
    let mut c = connect(&proxy.addr(0)).await;
    let mut got = Vec::new();
    let res = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
        .await
        .expect("closed in time");
    assert!(res.is_ok(), "a clean EOF, not a reset: {res:?}");
    assert!(got.is_empty());
    proxy.stop().await;
}

/// 1,000 sessions at once through one listener, each byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions() {
    // A deep backlog: 1,000 connects arrive at once.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let server = sock.listen(4096).unwrap();
    let server_addr = server.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = server.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let proxy = Proxy::start(&plain_config(&server_addr)).await;
    let addr = proxy.addr(0);
    // Open all 1,000 before any finishes.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for i in 0..1000u64 {
        let addr = addr.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&addr).await;
            barrier.wait().await;
            let data = pattern(4096 + i as usize, i);
            let got = send_and_collect(c, data.clone()).await.expect("no error");
            assert_bytes_eq(&got, &data, "session bytes");
        }));
    }
    for t in tasks {
        t.await.expect("session ok");
    }
    proxy.stop().await;
}

/// Draining: the proxy stops accepting, open sessions finish, and after
/// `drain_timeout` the rest are closed with a FIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_idle_sessions_after_drain_timeout() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let toml = format!(
        "[lifecycle]\ndrain_timeout = \"300ms\"\n{}",
        plain_config(&server.addr)
    );
    let proxy = Proxy::start(&toml).await;
    let addr = proxy.addr(0);
    let mut c = connect(&addr).await;
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    proxy.shutdown.drain.cancel();
    let mut phase = proxy.phase.clone();
    phase
        .wait_for(|p| *p == holdfast::lifecycle::Phase::Draining)
        .await
        .unwrap();
    // New connections are refused once draining.
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
    // The idle session is closed with a FIN after the drain timeout.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .expect("closed after drain timeout");
    assert!(n.is_ok(), "clean EOF: {n:?}");
    phase
        .wait_for(|p| *p == holdfast::lifecycle::Phase::Stopped)
        .await
        .unwrap();
}

/// Starts the real binary on `cfg` and reads its log until "holdfast
/// running"; returns it, the address of its listener (from the "listening"
/// line) and the rest of its log.
async fn spawn_binary(
    cfg: &std::path::Path,
) -> (
    tokio::process::Child,
    String,
    tokio::io::BufReader<tokio::process::ChildStderr>,
) {
    spawn_binary_logging(cfg, None).await
}

/// [`spawn_binary`] with `RUST_LOG` set (`None`: inherited).
async fn spawn_binary_logging(
    cfg: &std::path::Path,
    rust_log: Option<&str>,
) -> (
    tokio::process::Child,
    String,
    tokio::io::BufReader<tokio::process::ChildStderr>,
) {
    let mut cmd = tokio::process::Command::new(BIN);
    if let Some(l) = rust_log {
        cmd.env("RUST_LOG", l);
    }
    let mut child = cmd
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stderr);
    let mut log = String::new();
    let mut addr = None;
    loop {
        let mut line = String::new();
        let n = tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line)
            .await
            .unwrap();
        assert!(n > 0, "holdfast exited early:\n{log}");
        log.push_str(&line);
        if let Some(i) = line.find("addr=") {
            addr = line[i + 5..].split_whitespace().next().map(str::to_string);
        }
        if line.contains("holdfast running") {
            break;
        }
    }
    let addr = addr.expect("a listening line with addr=");
    (child, addr, lines)
}

/// A fresh directory with `holdfast.toml`: one plain listener in front of
/// `server`, a 500 ms drain.
fn draining_config(tag: &str, server: &str) -> std::path::PathBuf {
    config_dir(
        tag,
        &format!(
            "[lifecycle]\ndrain_timeout = \"500ms\"\n{}",
            plain_config(server)
        ),
    )
}

/// A fresh directory with `toml` as its `holdfast.toml`.
fn config_dir(tag: &str, toml: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("holdfast-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("holdfast.toml"), toml).unwrap();
    dir
}

/// SIGTERM to `child`; waits (bounded) for it to exit.
async fn sigterm_and_wait(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = child.id().unwrap() as i32;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("SIGTERM stops it in time")
        .unwrap()
}

/// The real binary: SIGTERM with an open session drains within
/// `drain_timeout` and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_sigterm_drains_and_exits_zero() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let dir = draining_config("bin", &server.addr);
    let (mut child, addr, _log) = spawn_binary(&dir.join("holdfast.toml")).await;
    let mut c = connect(&addr).await;
    c.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).await.unwrap();
    let started = std::time::Instant::now();
    let status = sigterm_and_wait(&mut child).await;
    assert!(status.success(), "exit status {status:?}");
    let mut rest = Vec::new();
    assert!(
        c.read_to_end(&mut rest).await.is_ok(),
        "client got a clean EOF"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The real binary whose log reader went away (a pipe with no reader, as
/// when the process collecting its stderr dies): every line it logs fails
/// to write. It still serves sessions, ends them, and drains and exits 0 on
/// SIGTERM (a failed log write must not panic the task that logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_without_a_log_reader_still_serves_and_stops() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let dir = draining_config("nolog", &server.addr);
    let (mut child, addr, log) = spawn_binary(&dir.join("holdfast.toml")).await;
    // Nobody reads its stderr from now on: each log write fails (EPIPE).
    drop(log);
    for round in 0..3u8 {
        let mut c = connect(&addr).await;
        let msg = [b'a' + round; 64];
        c.write_all(&msg).await.unwrap();
        let mut buf = [0u8; 64];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg, "session {round} echoed");
        // The session ends and logs its close line.
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
    let status = sigterm_and_wait(&mut child).await;
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The real binary with `[runtime] worker_threads = 1` (tokio's
/// current-thread scheduler: every session, the accept loops, the prober
/// and the signal handlers on one thread): pipelined, verified requests
/// from 20 clients survive three SIGKILLs of the server byte for byte, and
/// SIGTERM drains it and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_on_one_thread_keeps_sessions_through_server_kills() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let dir = config_dir(
        "onethread",
        &format!(
            "[runtime]\nworker_threads = 1\n[lifecycle]\ndrain_timeout = \"2s\"\n{}",
            proxy_config(&server.addr, "ack = \"response\"\nframing = \"lines\"")
        ),
    );
    let (mut child, addr, _log) = spawn_binary(&dir.join("holdfast.toml")).await;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..20 {
        let stream = connect(&addr).await;
        clients.push(tokio::spawn(verified_lines_until(
            stream,
            i,
            progress.clone(),
            stop.clone(),
        )));
    }
    chaos(&mut server, 3, progress.clone()).await;
    // Some answers after the last restart, then the clients finish.
    let after = progress.load(Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(30), async {
        while progress.load(Ordering::Relaxed) < after + 200 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("answers after the last restart");
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let sent = c.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert!(sent > 0);
    }
    let status = sigterm_and_wait(&mut child).await;
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every log line of a session carries its span (session id, listener,
/// backend), from the proxy's lines (opened, closed) and from the driver's
/// (a leg resumed after a server SIGKILL), though the session task no
/// longer runs inside the span.
#[tokio::test]
async fn a_sessions_log_lines_carry_its_span() {
    use tokio::io::AsyncBufReadExt;
    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let dir = config_dir("spanlines", &proxy_config(&server.addr, "ack = \"tcp\""));
    let (mut child, addr, mut log) =
        spawn_binary_logging(&dir.join("holdfast.toml"), Some("info")).await;
    let mut c = connect(&addr).await;
    let mut buf = [0u8; 2];
    c.write_all(b"a\n").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    server.kill().await;
    server.restart().await;
    c.write_all(b"b\n").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"b\n");
    drop(c);
    // A leg may resume more than once: the prober can reach the killed
    // server's listener while the kernel is still closing it, and that
    // leg is reset at once. So: opened, one or more resumed, closed.
    let mut seen: Vec<String> = Vec::new();
    let wanted = ["session opened", "leg resumed", "session closed"];
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut line = String::new();
        while !seen.last().is_some_and(|l| l.contains("session closed")) {
            line.clear();
            assert!(log.read_line(&mut line).await.unwrap() > 0, "log ended");
            if wanted.iter().any(|w| line.contains(w)) {
                seen.push(line.clone());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("lines seen: {seen:?}"));
    let span_of = |l: &str| {
        let at = l.find("session{").unwrap_or_else(|| panic!("no span: {l}"));
        let end = at + l[at..].find('}').unwrap();
        l[at..=end].to_string()
    };
    let span = span_of(&seen[0]);
    assert!(
        span.contains("session.id=") && span.contains("listener=l") && span.contains("backend=b"),
        "{span}"
    );
    assert!(seen[0].contains("session opened"), "{seen:?}");
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(
        seen[1..seen.len() - 1]
            .iter()
            .all(|l| l.contains("leg resumed")),
        "{seen:?}"
    );
    for l in &seen {
        assert_eq!(span_of(l), span, "{l}");
    }
    let status = sigterm_and_wait(&mut child).await;
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new session's first connect makes one connection to its server. The
/// backend prober works only for sessions that lost their server; it used
/// to wake for a session still in its first connect and open a second
/// connection to the server, closed unused a moment later (a race: seen in
/// 1 of 3 runs of 50 sessions before the fix, never after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_opens_one_connection_to_its_server() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = server.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let proxy = Proxy::start(&plain_config(&addr)).await;
    const SESSIONS: usize = 300;
    for i in 0..SESSIONS {
        let mut c = connect(&proxy.addr(0)).await;
        let msg = format!("session {i}\n");
        c.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg.as_bytes());
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
    }
    // Every session has ended (each client saw the server's EOF): a
    // connection made for any of them was accepted by now.
    assert_eq!(accepted.load(Ordering::SeqCst), SESSIONS);
    proxy.stop().await;
}

/// A session in bulk yields after each share of bytes it moves, and its
/// task comes back only after the runtime has looked at the sockets: on
/// one thread, while a bulk echo streams through holdfast, each round
/// trip of a light session waits for a bounded number of bulk bytes, not
/// for the bulk stream's socket buffers to run dry.
#[tokio::test]
async fn a_light_session_waits_for_a_share_of_bulk_not_all_of_it() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = server.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(&proxy_config(&addr, r#"ack = "tcp""#)).await;
    let (mut bulk_r, mut bulk_w) = connect(&proxy.addr(0)).await.into_split();
    let echoed = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 256 * 1024];
        while bulk_w.write_all(&chunk).await.is_ok() {}
    });
    let count = echoed.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n @ 1..) = bulk_r.read(&mut buf).await {
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let mut light = connect(&proxy.addr(0)).await;
    let t0 = std::time::Instant::now();
    let e0 = echoed.load(Ordering::Relaxed);
    let mut worst = 0;
    for i in 0..50u32 {
        let line = format!("{i:063}\n");
        let before = echoed.load(Ordering::Relaxed);
        light.write_all(line.as_bytes()).await.unwrap();
        let mut got = [0u8; 64];
        light.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], line.as_bytes());
        worst = worst.max(echoed.load(Ordering::Relaxed) - before);
    }
    eprintln!(
        "bulk bytes echoed during the slowest light round trip: {worst} ({} in {:?} of 50 round trips)",
        echoed.load(Ordering::Relaxed) - e0,
        t0.elapsed()
    );
    assert!(
        worst < 4 << 20,
        "a light round trip waited for {worst} bytes of bulk"
    );
    writer.abort();
    proxy.stop().await;
}
