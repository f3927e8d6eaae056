//! Hand-over of listening sockets to a new process, against the real binary:
//! five consecutive `kill -USR2` upgrades while a client connects in a tight
//! loop (never refused, never reset, every echo exact), a session opened
//! before the upgrade (this slice: it stays with the old process and is
//! closed gracefully at `drain_timeout`), and a `--takeover` with an invalid
//! config, and one that fails after receiving the sockets (both exit non-zero;
//! the running process keeps serving and, for the second, logs why).
mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// How long any one step may take before the test fails.
const STEP: Duration = Duration::from_secs(15);

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("holdfast-handover-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The log lines of every process generation: they share one stderr pipe.
struct Log {
    lines: mpsc::UnboundedReceiver<String>,
    seen: String,
    /// Lines read but not yet matched by any wait.
    unmatched: Vec<String>,
}

impl Log {
    /// Reads until a line contains `needle` and satisfies `pred`; returns it.
    async fn until(&mut self, needle: &str, pred: impl Fn(&str) -> bool) -> String {
        // Lines from concurrent tasks come in any order: a line read while
        // waiting for another one is kept for a later wait.
        if let Some(i) = self
            .unmatched
            .iter()
            .position(|l| l.contains(needle) && pred(l))
        {
            return self.unmatched.remove(i);
        }
        loop {
            let line = tokio::time::timeout(STEP, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} line in time; log:\n{}", self.seen))
                .unwrap_or_else(|| panic!("log ended before {needle:?}; log:\n{}", self.seen));
            self.seen.push_str(&line);
            self.seen.push('\n');
            if line.contains(needle) && pred(&line) {
                return line;
            }
            self.unmatched.push(line);
        }
    }
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

fn pid_of(line: &str) -> u32 {
    field(line, "pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid= in {line:?}"))
}

/// Kills the current generation if the test fails half-way (later
/// generations are not our children: `kill_on_drop` does not reach them).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

fn kill(sig: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

async fn echo_once(c: &mut tokio::net::TcpStream, msg: &[u8]) -> std::io::Result<()> {
    c.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(STEP, c.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no echo in time"))??;
    if buf != msg {
        return Err(std::io::Error::other(format!(
            "echo mismatch: sent {:?}, got {:?}",
            String::from_utf8_lossy(msg),
            String::from_utf8_lossy(&buf)
        )));
    }
    Ok(())
}

/// A config with one listener on port 0, plus `extra` tables.
fn config(socket: &std::path::Path, server: &str, extra: &str) -> String {
    format!(
        r#"
[lifecycle]
drain_timeout = "1s"

[handover]
socket = "{}"

[[listener]]
name = "orders"
listen = "127.0.0.1:0"
backend = "b"

[[backend]]
name = "b"
servers = ["{server}"]
ack = "none"
{extra}
"#,
        socket.display(),
    )
}

#[tokio::test]
async fn five_upgrades_by_sigusr2_never_refuse_a_connection() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let dir = temp_dir("upgrades");
    let socket = dir.join("run").join("handover.sock");
    let cfg = dir.join("holdfast.toml");
    std::fs::write(&cfg, config(&socket, &server.addr, "")).unwrap();
    let mut first = Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::unbounded_channel();
    let mut reader = BufReader::new(first.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(l)) = reader.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut log = Log {
        lines,
        seen: String::new(),
        unmatched: Vec::new(),
    };
    let listening = log.until("listening", |l| l.contains("addr=")).await;
    let addr = field(&listening, "addr").unwrap().to_string();
    let mut pid = first.id().unwrap();
    let mut guard = KillOnDrop(pid);
    log.until("hand-over socket listening", |l| pid_of(l) == pid)
        .await;
    // The hand-over socket is private: 0600 in a 0700 directory.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);

    // A session opened before the upgrade.
    let mut long = connect(&addr).await;
    echo_once(&mut long, b"before\n").await.unwrap();

    // A client connecting in a tight loop throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let looper = tokio::spawn({
        let stop = stop.clone();
        let addr = addr.clone();
        async move {
            let mut ok = 0u64;
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("ping {ok}\n");
                let r = async {
                    let mut c = tokio::net::TcpStream::connect(&addr).await?;
                    echo_once(&mut c, msg.as_bytes()).await
                };
                match tokio::time::timeout(STEP, r).await {
                    Ok(Ok(())) => ok += 1,
                    Ok(Err(e)) => errors.push(e.to_string()),
                    Err(_) => errors.push("timed out".into()),
                }
            }
            (ok, errors)
        }
    });

    let mut generations = vec![pid];
    for round in 0..5 {
        let old = pid;
        kill("-USR2", old);
        let running = log
            .until("holdfast running", |l| !generations.contains(&pid_of(l)))
            .await;
        pid = pid_of(&running);
        generations.push(pid);
        guard.0 = pid;
        log.until("hand-over socket listening", |l| pid_of(l) == pid)
            .await;
        if round == 0 {
            // The first generation still serves the session it had while
            // it drains (up to drain_timeout)...
            echo_once(&mut long, b"during\n")
                .await
                .unwrap_or_else(|e| panic!("{e}; log:\n{}", log.seen));
        }
        log.until("holdfast stopped", |l| pid_of(l) == old).await;
        if round == 0 {
            // ...and closes it gracefully (FIN, not a reset) when it ends:
            // this slice does not carry live sessions over.
            let mut buf = [0u8; 1];
            let n = tokio::time::timeout(STEP, long.read(&mut buf))
                .await
                .expect("closed in time")
                .expect("closed gracefully, not reset");
            assert_eq!(n, 0);
            let status = tokio::time::timeout(STEP, first.wait())
                .await
                .expect("the first process exits")
                .unwrap();
            assert!(status.success(), "{status:?}");
        }
    }

    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = looper.await.unwrap();
    assert!(
        errors.is_empty(),
        "{} failed connections: {errors:?}",
        errors.len()
    );
    assert!(ok > 0, "the looping client made no round trip");

    // A takeover whose config is invalid exits with a config error, and the
    // running process keeps serving.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[listener]]\nname = 1\n").unwrap();
    let status = tokio::time::timeout(
        STEP,
        Command::new(BIN)
            .args(["run", "--config", bad.to_str().unwrap(), "--takeover"])
            .stderr(Stdio::null())
            .status(),
    )
    .await
    .expect("exits in time")
    .unwrap();
    assert_eq!(status.code(), Some(64), "{status:?}");
    let mut c = connect(&addr).await;
    echo_once(&mut c, b"still here\n").await.unwrap();
    drop(c);

    // A takeover that fails after receiving the sockets (a new listener
    // cannot bind: the backend's port is taken) exits non-zero before
    // confirming; the running process says why and keeps serving.
    let failing = dir.join("failing.toml");
    let extra = format!(
        "[[listener]]\nname = \"taken\"\nlisten = \"{}\"\nbackend = \"b\"\n",
        server.addr
    );
    std::fs::write(&failing, config(&socket, &server.addr, &extra)).unwrap();
    let status = tokio::time::timeout(
        STEP,
        Command::new(BIN)
            .args(["run", "--config", failing.to_str().unwrap(), "--takeover"])
            .stderr(Stdio::null())
            .status(),
    )
    .await
    .expect("exits in time")
    .unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
    log.until("hand-over failed", |l| l.contains("keeps serving"))
        .await;
    let mut c = connect(&addr).await;
    echo_once(&mut c, b"still here after a failed takeover\n")
        .await
        .unwrap();
    drop(c);

    kill("-TERM", pid);
    log.until("holdfast stopped", |l| pid_of(l) == pid).await;
    let _ = std::fs::remove_dir_all(&dir);
}
