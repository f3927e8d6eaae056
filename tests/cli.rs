//! The binary's command line: `check` on good and bad files, `run` with a
//! bad config, Unix listener hygiene, the accept loop surviving EMFILE, and
//! held sessions on both session threads resuming after a server restart.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

fn holdfast(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run holdfast")
}

#[test]
fn check_accepts_the_example_config() {
    let out = holdfast(&["check", "--config", "config/holdfast.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok (1 listener, 1 backend)"), "{stdout}");
}

#[test]
fn check_reports_every_error_with_its_line_and_exits_64() {
    let out = holdfast(&[
        "check",
        "--config",
        "tests/fixtures/invalid/three-errors.toml",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "listener[0].backend (line 5, col 11): no backend named \"ordrs\"",
        "backend[0].buffer_limit (line 10, col 16): \"12 parsecs\" is not a size",
        "backend[0].colour (line 11, col 1): unknown key \"colour\"",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
}

#[test]
fn check_on_a_missing_file_exits_64() {
    let out = holdfast(&["check", "--config", "no/such/file.toml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/file.toml"));
}

#[test]
fn run_refuses_an_invalid_config_before_binding() {
    let out = holdfast(&[
        "run",
        "--config",
        "tests/fixtures/invalid/three-errors.toml",
    ]);
    assert_eq!(out.status.code(), Some(64));
}

type Log = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// Where a running binary listens: its (one) listener, and its admin
/// endpoint when it has one.
struct Addrs {
    listener: String,
    admin: Option<String>,
}

/// The real binary under `ulimit -n limit`; returns it, its log, and the
/// addresses from its "listening" lines once it is running.
async fn run_with_fd_limit(
    limit: u32,
    cfg: &std::path::Path,
) -> (tokio::process::Child, Log, Addrs) {
    let mut child = tokio::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "ulimit -n {limit} && exec {BIN} run --config {}",
                cfg.display()
            ),
        ])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut listener, mut admin) = (None, None);
    while let Some(line) = log.next_line().await.unwrap() {
        let addr = line
            .find("addr=")
            .and_then(|i| line[i + 5..].split_whitespace().next())
            .map(str::to_string);
        if line.contains("admin endpoint listening") {
            admin = addr;
        } else if line.contains("listening") && addr.is_some() {
            listener = addr;
        }
        if line.contains("holdfast running") {
            break;
        }
    }
    let listener = listener.expect("listening address");
    (child, log, Addrs { listener, admin })
}

/// One listener `l` in front of backend `b` at `server` (`ack = "response"`,
/// lines), then `extra`.
fn lines_config(server: &str, extra: &str) -> String {
    one_listener_config(&[server], "ack = \"response\"\nframing = \"lines\"", extra)
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("holdfast-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn unix_listener_config(path: &std::path::Path) -> String {
    format!(
        r#"
[[listener]]
name = "l"
listen = "unix:{}"
backend = "b"

[[backend]]
name = "b"
servers = ["127.0.0.1:9"]
ack = "none"
"#,
        path.display()
    )
}

/// A socket file left by a dead process is replaced; one that a live process
/// listens on makes holdfast refuse to start, with a clear message.
#[tokio::test]
async fn unix_listener_replaces_stale_socket_and_refuses_a_live_one() {
    let dir = tmpdir("unix");
    let path = dir.join("l.sock");
    // Stale: bound and dropped without unlinking.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let cfg = holdfast::config::parse(&unix_listener_config(&path)).unwrap();
    let bound = holdfast::proxy::bind(&cfg)
        .await
        .expect("stale socket replaced");
    // Live: `bound` listens there now.
    let err = holdfast::proxy::bind(&cfg)
        .await
        .expect_err("live socket refused");
    let msg = err.to_string();
    assert!(msg.contains("another process is listening"), "{msg}");
    drop(bound);
    // A regular file is never removed.
    std::fs::write(&path, b"not a socket").unwrap();
    let err = holdfast::proxy::bind(&cfg).await.expect_err("file refused");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert!(path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The real binary with only 64 file descriptors: a burst of clients runs it
/// out of descriptors; the accept loop logs, backs off and keeps serving, and
/// once the burst is gone a new client is proxied normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loop_survives_emfile() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let dir = tmpdir("emfile");
    let cfg = dir.join("holdfast.toml");
    // The reserve off: this test is about the accept loop at EMFILE itself.
    let cfg_text = one_listener_config(
        &[&server.addr],
        "ack = \"none\"",
        "[limits]\nfd_reserve = 0\n",
    );
    std::fs::write(&cfg, cfg_text).unwrap();
    let (mut child, mut log, addrs) = run_with_fd_limit(64, &cfg).await;
    let addr = addrs.listener;
    // 100 clients: each session needs two descriptors, so this exhausts 64.
    let mut burst = Vec::new();
    for _ in 0..100 {
        burst.push(connect(&addr).await);
    }
    // Wait for the accept loop to report it.
    let saw = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("out of resources") {
                return true;
            }
        }
        false
    })
    .await
    .expect("an EMFILE log line in time");
    assert!(saw);
    drop(burst);
    // Keep draining the log so the child never blocks on stderr.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    // A new client is served once descriptors are free again (the burst's
    // sessions and the connections still queued behind them wind down first,
    // so try until one is served, for at most 10 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = connect(&addr).await;
        c.write_all(b"still here").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
        if got == b"still here" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never served again after EMFILE"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.start_kill().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `fd_reserve` (default 64) under `ulimit -n 128`: a burst of 100 idle
/// clients is shed (`reason=fd_reserve`, one warning for the burst) before
/// descriptors run out, so a live session still reconnects to its server
/// across a SIGKILL + restart and keeps answering byte-exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_reserve_sheds_clients_so_reconnects_never_fail() {
    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let dir = tmpdir("fd-reserve");
    let cfg = dir.join("holdfast.toml");
    std::fs::write(&cfg, lines_config(&server.addr, "")).unwrap();
    let (mut child, mut log, addrs) = run_with_fd_limit(128, &cfg).await;
    let addr = addrs.listener;
    let live = connect(&addr).await;
    let (r, mut w) = live.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    w.write_all(b"before\n").await.unwrap();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "before\n");
    // 100 clients want 200 descriptors of 128: most are shed.
    let mut burst = Vec::new();
    for _ in 0..100 {
        burst.push(connect(&addr).await);
    }
    let (warnings, emfile) = tokio::time::timeout(Duration::from_secs(10), async {
        let (mut warnings, mut emfile) = (0, false);
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("limit reached") && line.contains("fd_reserve") {
                warnings += 1;
            }
            emfile |= line.contains("out of resources");
            if warnings > 0 {
                return (warnings, emfile);
            }
        }
        (warnings, emfile)
    })
    .await
    .expect("an fd_reserve warning in time");
    assert_eq!(warnings, 1, "one warning for the burst");
    assert!(!emfile, "the reserve kept the process off EMFILE");
    let lines = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(l)) = log.next_line().await {
            rest.push(l);
        }
        rest
    });
    // The server dies and comes back: the live session's reconnect gets a
    // descriptor, and a request sent meanwhile is answered once.
    server.kill().await;
    w.write_all(b"during\n").await.unwrap();
    server.restart().await;
    line.clear();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .expect("answered after the restart")
        .unwrap();
    assert_eq!(line, "during\n");
    drop(burst);
    w.shutdown().await.unwrap();
    let mut tail = Vec::new();
    r.read_to_end(&mut tail).await.unwrap();
    assert!(tail.is_empty());
    child.start_kill().unwrap();
    let _ = child.wait().await;
    let rest = lines.await.unwrap();
    assert!(
        !rest.iter().any(|l| l.contains("out of resources")),
        "no EMFILE: {rest:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sessions per thread (`[runtime] worker_threads = 2`): six clients
/// connected one after another run three on each session thread
/// (`holdfast_thread_sessions`); the server is SIGKILLed and each client
/// sends a line while it is down; after the restart every client, on
/// either thread, gets its line back once, in order after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_sessions_on_every_session_thread_resume_after_a_server_restart() {
    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let dir = tmpdir("threads-held");
    let cfg = dir.join("holdfast.toml");
    let extra = "\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[runtime]\nworker_threads = 2\nscheduler = \"per-thread\"\n";
    std::fs::write(&cfg, lines_config(&server.addr, extra)).unwrap();
    let (mut child, mut log, addrs) = run_with_fd_limit(20_000, &cfg).await;
    let (addr, admin) = (addrs.listener, addrs.admin.expect("admin address"));
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    let mut clients = Vec::new();
    for i in 0..6 {
        let (r, mut w) = connect(&addr).await.into_split();
        let mut r = tokio::io::BufReader::new(r);
        w.write_all(format!("first {i}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, format!("first {i}\n"));
        clients.push((r, w));
    }
    let metrics = || async {
        let mut s = connect(&admin).await;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        raw
    };
    let before = metrics().await;
    for t in 0..2 {
        let series = format!("holdfast_thread_sessions{{thread=\"{t}\"}} 3");
        assert!(before.contains(&series), "{series} in:\n{before}");
    }

    server.kill().await;
    for (i, (_, w)) in clients.iter_mut().enumerate() {
        w.write_all(format!("during {i}\n").as_bytes())
            .await
            .unwrap();
    }
    server.restart().await;
    for (i, (r, _)) in clients.iter_mut().enumerate() {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(15), r.read_line(&mut line))
            .await
            .expect("answered after the restart")
            .unwrap();
        assert_eq!(line, format!("during {i}\n"));
    }
    // Every session, on either thread, went on over a new server leg: at
    // least one resume each. (9 for the 6 were seen in 2 of about 150 runs,
    // every line still answered once: probably a session whose leg closed
    // first reconnected at once to the dying server's listener, which the
    // kernel still answered, and lost that leg too; not traced.)
    let after = metrics().await;
    let resumes: u64 = after
        .lines()
        .find_map(|l| l.strip_prefix("holdfast_resumes_total{backend=\"b\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        resumes >= 6,
        "{resumes} resumes for 6 held sessions:\n{after}"
    );
    for (mut r, mut w) in clients {
        w.shutdown().await.unwrap();
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).await.unwrap();
        assert!(tail.is_empty(), "nothing answered twice");
    }
    child.start_kill().unwrap();
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
