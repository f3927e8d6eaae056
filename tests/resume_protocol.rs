//! The resume protocol end to end: holdfast as the initiator towards a
//! resume-aware service (the ledger example, SIGKILLed and restarted:
//! exactly-once), and two holdfasts (edge and core) linked by it across a
//! relay that cuts and black-holes the link.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::relay::Relay;
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("holdfast-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_key(dir: &Path) -> PathBuf {
    let key = dir.join("resume.key");
    std::fs::write(&key, pattern(32, 99)).unwrap();
    key
}

/// The ledger example, built by `cargo test` beside the holdfast binary.
fn ledger_bin() -> PathBuf {
    let bin = Path::new(BIN);
    let p = bin.parent().unwrap().join("examples").join("ledger");
    assert!(
        p.exists(),
        "{} not built (cargo test builds examples)",
        p.display()
    );
    p
}

struct Ledger {
    child: Option<Child>,
    listen: String,
    dir: PathBuf,
    key: PathBuf,
}

impl Ledger {
    async fn start(dir: &Path, key: &Path) -> Ledger {
        let mut l = Ledger {
            child: None,
            listen: format!("unix:{}", dir.join("ledger.sock").display()),
            dir: dir.to_path_buf(),
            key: key.to_path_buf(),
        };
        l.spawn().await;
        l
    }

    async fn spawn(&mut self) {
        let mut child = Command::new(ledger_bin())
            .args(["--listen", &self.listen, "--data"])
            .arg(&self.dir)
            .arg("--key-file")
            .arg(&self.key)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ledger");
        let out = child.stdout.take().unwrap();
        let line = BufReader::new(out).lines().next_line().await.unwrap();
        assert!(
            line.as_deref().is_some_and(|l| l.starts_with("listening ")),
            "ledger said {line:?}"
        );
        self.child = Some(child);
    }

    async fn kill_and_restart(&mut self) {
        let mut c = self.child.take().unwrap();
        c.start_kill().unwrap();
        c.wait().await.unwrap();
        self.spawn().await;
    }

    /// Each client's lines as the ledger stored them, in file order.
    fn records(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("ledger.log"))
            .unwrap()
            .lines()
            .map(|l| l.splitn(5, ' ').nth(4).unwrap_or("").to_string())
            .collect()
    }
}

/// holdfast in front of the ledger (protocol = "resume"); the ledger is
/// SIGKILLed and restarted 10 times under load. Every request is stored
/// exactly once and in order, every client gets exactly one response per
/// request, and no client sees a reset or an EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_is_exactly_once_across_sigkills() {
    const CLIENTS: usize = 5;
    const KILLS: usize = 10;
    let dir = tmpdir("ledger");
    let key = write_key(&dir);
    let mut ledger = Ledger::start(&dir, &key).await;
    let proxy = Proxy::start(&format!(
        r#"
[[listener]]
name = "l"
listen = "127.0.0.1:0"
backend = "ledger"

[[backend]]
name = "ledger"
servers = ["{}"]
protocol = "resume"
resume = {{ secret_file = "{}", heartbeat_interval = "100ms", dead_peer_timeout = "500ms" }}
hold_timeout = "20s"
"#,
        ledger.listen,
        key.display()
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
            let s = connect(&addr).await;
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut seq = 0u64;
            let mut last = 0u64;
            let mut line = String::new();
            while !stop.load(Ordering::Relaxed) {
                let mut batch = String::new();
                for k in 0..4 {
                    batch.push_str(&format!("c{id} r{:06}\n", seq + k));
                }
                w.write_all(batch.as_bytes())
                    .await
                    .map_err(|e| format!("client {id}: write: {e}"))?;
                for k in 0..4 {
                    line.clear();
                    let n = r
                        .read_line(&mut line)
                        .await
                        .map_err(|e| format!("client {id}: read (reset?): {e}"))?;
                    if n == 0 {
                        return Err(format!("client {id}: EOF at request {}", seq + k));
                    }
                    let num: u64 = line
                        .trim_end()
                        .strip_prefix("ok ")
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| format!("client {id}: bad response {line:?}"))?;
                    if num <= last {
                        return Err(format!("client {id}: record {num} after {last}"));
                    }
                    last = num;
                }
                seq += 4;
                progress.fetch_add(4, Ordering::Relaxed);
            }
            w.shutdown().await.map_err(|e| e.to_string())?;
            let mut rest = Vec::new();
            r.read_to_end(&mut rest)
                .await
                .map_err(|e| format!("client {id}: final read: {e}"))?;
            if !rest.is_empty() {
                return Err(format!("client {id}: extra bytes {rest:?}"));
            }
            Ok::<u64, String>(seq)
        }));
    }
    for _ in 0..KILLS {
        let before = progress.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while progress.load(Ordering::Relaxed) < before + 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "no progress after a restart"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ledger.kill_and_restart().await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for c in clients {
        sent.push(c.await.unwrap().unwrap_or_else(|e| panic!("{e}")));
    }
    // The ledger holds each client's requests exactly once, in order.
    let records = ledger.records();
    for (id, n) in sent.iter().enumerate() {
        let mine: Vec<&String> = records
            .iter()
            .filter(|l| l.starts_with(&format!("c{id} ")))
            .collect();
        let want: Vec<String> = (0..*n).map(|s| format!("c{id} r{s:06}")).collect();
        assert_eq!(mine.len(), want.len(), "client {id}: records stored");
        for (g, w) in mine.iter().zip(&want) {
            assert_eq!(*g, w, "client {id}");
        }
    }
    eprintln!("ledger: {} records across {KILLS} SIGKILLs", records.len());
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An edge holdfast (plain listener, resume backend) and a core holdfast
/// (resume listener, plain backend) linked through a relay that is cut 20
/// times and black-holed 5 times (only the heartbeat notices) while
/// clients stream: every byte arrives exactly, both ways, and no client or
/// server notices anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_and_core_survive_a_flaky_link() {
    const CLIENTS: usize = 8;
    let dir = tmpdir("edgecore");
    let key = write_key(&dir);
    let server = Server::start("127.0.0.1:0", "echo").await;
    let core = Proxy::start(&format!(
        r#"
[[listener]]
name = "from-edge"
listen = "127.0.0.1:0"
backend = "echo"
protocol = "resume"
resume = {{ secret_file = "{key}", heartbeat_interval = "50ms", dead_peer_timeout = "250ms", resume_timeout = "30s" }}

[[backend]]
name = "echo"
servers = ["{server}"]
ack = "tcp"
"#,
        key = key.display(),
        server = server.addr
    ))
    .await;
    let relay = Relay::start(core.addr(0)).await;
    let edge = Proxy::start(&format!(
        r#"
[[listener]]
name = "apps"
listen = "127.0.0.1:0"
backend = "core"

[[backend]]
name = "core"
servers = ["{relay}"]
protocol = "resume"
resume = {{ secret_file = "{key}", heartbeat_interval = "50ms", dead_peer_timeout = "250ms" }}
hold_timeout = "30s"
connect_timeout = "500ms"
"#,
        key = key.display(),
        relay = relay.addr
    ))
    .await;

    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let addr = edge.addr(0);
        let progress = progress.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let s = connect(&addr).await;
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                let mut sent = Vec::new();
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let chunk = pattern(1000 + (k as usize * 37) % 3000, k + id as u64 * 1_000_000);
                    w.write_all(&chunk)
                        .await
                        .map_err(|e| format!("client {id}: write: {e}"))?;
                    sent.extend_from_slice(&chunk);
                    k += 1;
                    if k % 8 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                w.shutdown().await.map_err(|e| e.to_string())?;
                Ok::<Vec<u8>, String>(sent)
            });
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = r
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("client {id}: read (reset?): {e}"))?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                progress.fetch_add(n as u64, Ordering::Relaxed);
            }
            let sent = writer.await.unwrap()?;
            if got != sent {
                return Err(format!(
                    "client {id}: echoed {} bytes of {}, first difference at {}",
                    got.len(),
                    sent.len(),
                    got.iter()
                        .zip(&sent)
                        .position(|(a, b)| a != b)
                        .unwrap_or(got.len().min(sent.len()))
                ));
            }
            Ok::<usize, String>(sent.len())
        }));
    }
    let wait_progress = |p: &Arc<AtomicU64>| {
        let p = p.clone();
        async move {
            let before = p.load(Ordering::Relaxed);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while p.load(Ordering::Relaxed) < before + 200_000 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no progress over the link"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    for i in 0..25 {
        wait_progress(&progress).await;
        if i % 5 == 4 {
            // A black hole: nothing passes, nothing closes; the heartbeats
            // stop arriving and both sides declare the leg dead.
            relay.set_blackhole(true);
            tokio::time::sleep(Duration::from_millis(400)).await;
            relay.set_blackhole(false);
            relay.cut();
        } else {
            relay.cut();
        }
    }
    wait_progress(&progress).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
    eprintln!(
        "edge/core: {total} bytes each way, {} link connections",
        relay.accepted.load(Ordering::Relaxed)
    );
    assert!(
        relay.accepted.load(Ordering::Relaxed) > 25,
        "the link was really cut"
    );
    edge.stop().await;
    core.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An echo service on the server library (version 2: it takes early data),
/// on `addr`; dropping what it returns stops it accepting.
async fn library_echo(
    addr: &str,
    key: &Path,
) -> (
    Arc<holdfast::server::ResumeListener>,
    tokio::task::JoinHandle<()>,
) {
    use holdfast::server::{AckPolicy, ResumeListener, ServerConfig};
    let mut cfg = ServerConfig::new(std::fs::read(key).unwrap());
    cfg.ack = AckPolicy::Auto;
    // The address of a listener just dropped is free once its accept task
    // has noticed (a moment later): try until then.
    let mut tries = 0;
    let l = loop {
        match ResumeListener::bind(addr, cfg.clone()).await {
            Ok(l) => break Arc::new(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 1000 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    let l2 = l.clone();
    let task = tokio::spawn(async move {
        while let Ok(mut s) = l2.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (l, task)
}

/// Early data (protocol §3.6): once a server's WELCOME chose version 2,
/// a new session's first bytes go with its HELLO. Here the second client's
/// first line waits in holdfast while the server is down, then goes as
/// early data when it is back (`holdfast_early_data_bytes_total`), and both
/// clients get their lines back exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sessions_first_bytes_go_with_its_hello_to_a_version_2_server() {
    let dir = tmpdir("early-data");
    let key = write_key(&dir);
    let (server, task) = library_echo("127.0.0.1:0", &key).await;
    let server_addr = server.local_addr().to_string();
    let keys = format!(
        "protocol = \"resume\"\nresume = {{ secret_file = {:?} }}\nhold_timeout = \"20s\"",
        key.display().to_string()
    );
    let h = start_running(&one_listener_config(&[&server_addr], &keys, "")).await;
    let early = || {
        let text = h.rt.metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix("holdfast_early_data_bytes_total{backend=\"b\"} "))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    // The first session learns that the server speaks version 2; it has
    // nothing to send before its WELCOME.
    let mut a = connect(&h.addrs[0]).await;
    a.write_all(b"a1\n").await.unwrap();
    let mut got = [0u8; 3];
    a.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"a1\n");
    // The server goes away; a second client's first line is held.
    drop(server);
    task.abort();
    let _ = task.await;
    let mut b = connect(&h.addrs[0]).await;
    b.write_all(b"b1 first line\n").await.unwrap();
    wait_for("the second client's line in holdfast", || {
        h.rt.shared
            .session_views()
            .iter()
            .any(|v| v.up.read == 14 && v.up.sent == 0)
    })
    .await;
    assert_eq!(early(), 0.0, "nothing sent early yet");
    // Back on the same address: the held line goes right after the HELLO.
    let (_server, _task) = library_echo(&server_addr, &key).await;
    let mut got = [0u8; 14];
    b.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"b1 first line\n");
    assert_eq!(early(), 14.0, "the held line went as early data");
    b.write_all(b"b2\n").await.unwrap();
    let mut got = [0u8; 3];
    b.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"b2\n", "and the session goes on after it");
    // The first session carries on (its service task outlived the
    // listener).
    a.write_all(b"a2\n").await.unwrap();
    a.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"a2\n");
}
