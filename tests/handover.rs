//! Hand-over of listening sockets and live sessions to a new process,
//! against the real binary: five consecutive `kill -USR2` upgrades while a
//! client connects in a tight loop (never refused, never reset, every echo
//! exact) and a session opened before the first upgrade carries on through
//! all of them; a `--takeover` with an invalid config, and one that fails
//! after receiving the sockets (both exit non-zero; the running process
//! keeps serving and, for the second, logs why); 100 sessions streaming
//! verified requests through every ack mode, the resume protocol and a
//! Unix listener and server across ten upgrades; a new process that dies in the middle of the session
//! hand-over, which leaves every session with the old one; and a core
//! holdfast (a resume-protocol listener) upgraded under load, whose
//! sessions move with their links to the edge.
mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Starts `holdfast run --config cfg`; every later generation inherits
/// its stderr, so one [`Log`] sees them all.
fn spawn_logged(cfg: &std::path::Path) -> (tokio::process::Child, Log) {
    spawn_logged_with(cfg, &[], &[])
}

/// [`spawn_logged`] with extra arguments (`--takeover`) and environment
/// variables (the test hooks).
fn spawn_logged_with(
    cfg: &std::path::Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (tokio::process::Child, Log) {
    let mut child = Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .args(args)
        .envs(envs.iter().copied())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::unbounded_channel();
    let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(l)) = reader.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let log = Log {
        lines,
        seen: String::new(),
        unmatched: Vec::new(),
    };
    (child, log)
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

/// SIGUSR2 to the current generation (the last of `generations`); waits
/// until a new one runs and returns its pid, recorded in `generations` and
/// in `guard`.
async fn start_upgrade(log: &mut Log, generations: &mut Vec<u32>, guard: &mut KillOnDrop) -> u32 {
    let old = *generations.last().expect("a generation");
    kill("-USR2", old);
    let running = log
        .until("holdfast running", |l| !generations.contains(&pid_of(l)))
        .await;
    let pid = pid_of(&running);
    generations.push(pid);
    guard.0 = pid;
    pid
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

/// A client that connects, echoes one line and closes, in a tight loop.
struct Looper {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

impl Looper {
    fn start(addr: &str) -> Looper {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            let addr = addr.to_string();
            async move {
                let (mut ok, mut errors) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let r = async {
                        let mut c = tokio::net::TcpStream::connect(&addr).await?;
                        echo_once(&mut c, format!("ping {ok}\n").as_bytes()).await
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
        Looper { stop, task }
    }

    /// Stops it: no connection may have been refused, reset or left
    /// unanswered, and some must have been made.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let (ok, errors) = self.task.await.unwrap();
        assert!(
            errors.is_empty(),
            "{} failed connections: {errors:?}",
            errors.len()
        );
        assert!(ok > 0, "the looping client made no round trip");
    }
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

/// A first generation, running on `config(socket, server, extra)` in a
/// fresh `temp_dir(tag)`, once its listener and hand-over socket listen.
struct First {
    child: tokio::process::Child,
    log: Log,
    dir: PathBuf,
    socket: PathBuf,
    /// The listener's address.
    addr: String,
    pid: u32,
    guard: KillOnDrop,
}

async fn start_first(tag: &str, server: &str, extra: &str) -> First {
    let dir = temp_dir(tag);
    let socket = dir.join("run").join("handover.sock");
    let cfg = dir.join("holdfast.toml");
    std::fs::write(&cfg, config(&socket, server, extra)).unwrap();
    let (child, mut log) = spawn_logged(&cfg);
    let listening = log.until("listening", |l| l.contains("listener=")).await;
    let addr = field(&listening, "addr").unwrap().to_string();
    let pid = child.id().unwrap();
    let guard = KillOnDrop(pid);
    log.until("hand-over socket listening", |l| pid_of(l) == pid)
        .await;
    First {
        child,
        log,
        dir,
        socket,
        addr,
        pid,
        guard,
    }
}

/// A session in mid-bulk (`ack = "none"`, both directions spliced by then)
/// handed over three times: its echo arrives whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_mid_bulk_survives_upgrades() {
    mid_bulk_upgrades("bulk-upgrades", "").await;
}

/// The same with `[runtime] worker_threads = 1` in both generations
/// (tokio's current-thread scheduler: the session tasks and the hand-over's
/// async side share one thread; its export runs on blocking threads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_mid_bulk_survives_upgrades_on_one_thread() {
    mid_bulk_upgrades("bulk-upgrades-1t", "\n[runtime]\nworker_threads = 1\n").await;
}

/// The same with `[runtime] scheduler = "work-stealing"` (tokio's
/// multi-thread scheduler) in both generations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_mid_bulk_survives_upgrades_under_work_stealing() {
    mid_bulk_upgrades(
        "bulk-upgrades-ws",
        "\n[runtime]\nworker_threads = 2\nscheduler = \"work-stealing\"\n",
    )
    .await;
}

/// `holdfast_thread_sessions` per thread, from the admin endpoint.
async fn thread_sessions(admin: &str) -> Vec<i64> {
    let mut s = connect(admin).await;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    (0..)
        .map_while(|i| {
            let series = format!("holdfast_thread_sessions{{thread=\"{i}\"}} ");
            raw.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .map(|v| v.trim().parse().unwrap())
        })
        .collect()
}

/// Sessions per thread (`[runtime] scheduler = "per-thread"`, two
/// threads): forty clients connected one after another end up twenty on
/// each thread, whichever thread accepted them (one that has more sessions
/// than the other moves its new client there), and an upgrade's new
/// process deals the forty it takes over to its two threads in turn. Every
/// client's echo is byte-exact before, after, and with clients closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_shared_out_over_the_threads_and_across_an_upgrade() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let extra = "\n[runtime]\nworker_threads = 2\nscheduler = \"per-thread\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let mut first = start_first("threads", &server.addr, extra).await;
    let log = &mut first.log;
    let admin = log.until("admin endpoint listening", |_| true).await;
    let admin = field(&admin, "addr").unwrap().to_string();

    let mut clients = Vec::new();
    for i in 0..40 {
        let mut c = connect(&first.addr).await;
        echo_once(&mut c, format!("hello {i}\n").as_bytes())
            .await
            .unwrap();
        clients.push(c);
    }
    assert_eq!(thread_sessions(&admin).await, vec![20, 20]);

    let old = first.pid;
    let mut generations = vec![old];
    let pid = start_upgrade(log, &mut generations, &mut first.guard).await;
    let taken = log.until("sessions taken over", |_| true).await;
    assert_eq!(field(&taken, "sessions"), Some("40"), "{taken}");
    log.until("holdfast stopped", |l| pid_of(l) == old).await;
    assert_eq!(thread_sessions(&admin).await, vec![20, 20]);
    for (i, c) in clients.iter_mut().enumerate() {
        echo_once(c, format!("after the upgrade {i}\n").as_bytes())
            .await
            .unwrap();
    }
    // Half the clients leave, then the rest: each session is counted down
    // on the thread it was counted on.
    for c in clients.drain(..20) {
        drop(c);
    }
    for _ in 0..20 {
        log.until("session closed", |_| true).await;
    }
    assert_eq!(thread_sessions(&admin).await.iter().sum::<i64>(), 20);
    for (i, c) in clients.iter_mut().enumerate() {
        echo_once(c, format!("still here {i}\n").as_bytes())
            .await
            .unwrap();
    }
    drop(clients);
    for _ in 0..20 {
        log.until("session closed", |_| true).await;
    }
    assert_eq!(thread_sessions(&admin).await, vec![0, 0]);
    kill("-TERM", pid);
    log.until("holdfast stopped", |l| pid_of(l) == pid).await;
    let _ = std::fs::remove_dir_all(&first.dir);
}

async fn mid_bulk_upgrades(tag: &str, extra: &str) {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let First {
        child: _first,
        mut log,
        dir,
        addr,
        mut pid,
        mut guard,
        ..
    } = start_first(tag, &server.addr, extra).await;

    let data = pattern(192 << 20, 21);
    let (mut r, mut w) = connect(&addr).await.into_split();
    let sent = data.clone();
    // The last 16 MiB wait for the last upgrade: on a loaded machine an
    // upgrade can take long enough for the rest of the stream to go
    // through, and a session that ended has nothing left to move.
    let (last_upgrade_done, mut go) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let hold_at = sent.len() - (16 << 20);
        for (i, chunk) in sent.chunks(64 * 1024).enumerate() {
            if i * 64 * 1024 == hold_at {
                let _ = (&mut go).await;
            }
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let progress = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn({
        let progress = progress.clone();
        async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(got);
                }
                got.extend_from_slice(&buf[..n]);
                progress.store(got.len() as u64, Ordering::Relaxed);
            }
        }
    });
    let mut generations = vec![pid];
    for round in 1..=3u64 {
        // Each upgrade with bulk flowing (its reads at full size).
        progress_past(&progress, round * (40 << 20), "echo before an upgrade").await;
        pid = start_upgrade(&mut log, &mut generations, &mut guard).await;
        log.until("hand-over socket listening", |l| pid_of(l) == pid)
            .await;
        let taken = log.until("sessions taken over", |_| true).await;
        assert_eq!(
            field(&taken, "sessions"),
            Some("1"),
            "round {round}: the session moved in mid-bulk: {taken}"
        );
        // It runs in the new process, and its pause was measured there:
        // from its export in the old process to its first run here.
        assert_eq!(field(&taken, "running"), Some("1"), "{taken}");
        let pause: u64 = field(&taken, "pause_max_us")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no pause_max_us: {taken}"));
        assert!(pause > 0, "a pause across two processes: {taken}");
        let handed = log.until("sessions handed over", |_| true).await;
        assert!(
            field(&handed, "answered_p99_us").is_some(),
            "the old process's summary: {handed}"
        );
    }
    let _ = last_upgrade_done.send(());
    let got = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the echo ends")
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", log.seen));
    writer.await.unwrap().unwrap();
    assert_bytes_eq(&got, &data, "echo across three hand-overs in mid-bulk");
    kill("-TERM", pid);
    log.until("holdfast stopped", |l| pid_of(l) == pid).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn five_upgrades_by_sigusr2_never_refuse_a_connection() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let First {
        child: mut first,
        mut log,
        dir,
        socket,
        addr,
        mut pid,
        mut guard,
    } = start_first("upgrades", &server.addr, "").await;
    // The hand-over socket is private: 0600 in a 0700 directory.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);

    // A session opened before the upgrade.
    let mut long = connect(&addr).await;
    echo_once(&mut long, b"before\n").await.unwrap();

    // A client connecting in a tight loop throughout.
    let looper = Looper::start(&addr);

    let mut generations = vec![pid];
    for round in 0..5 {
        let old = pid;
        pid = start_upgrade(&mut log, &mut generations, &mut guard).await;
        log.until("hand-over socket listening", |l| pid_of(l) == pid)
            .await;
        log.until("holdfast stopped", |l| pid_of(l) == old).await;
        // The session opened before the first upgrade lives on in the new
        // process: same connection, same server connection.
        echo_once(&mut long, format!("after upgrade {round}\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", log.seen));
        if round == 0 {
            let status = tokio::time::timeout(STEP, first.wait())
                .await
                .expect("the first process exits")
                .unwrap();
            assert!(status.success(), "{status:?}");
        }
    }

    looper.finish().await;

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

/// An edge config for the load test: one listener per ack mode and one
/// speaking the resume protocol to `core`, all in front of `server`, and a
/// Unix listener in front of `unix_server` (`ack = "tcp"`, which counts
/// Unix acks from the bytes written: carried in the hand-over), with
/// `handover_keys` added to `[handover]`.
fn edge_config(
    socket: &std::path::Path,
    handover_keys: &str,
    server: &str,
    core: &str,
    key: &std::path::Path,
    unix_listen: &str,
    unix_server: &str,
) -> String {
    let mut out = format!(
        "[lifecycle]\ndrain_timeout = \"5s\"\n\n[handover]\nsocket = \"{}\"\n{handover_keys}",
        socket.display()
    );
    let modes = [
        ("none", "ack = \"none\"".to_string()),
        ("tcp", "ack = \"tcp\"".to_string()),
        ("response", "ack = \"response\"\nframing = \"lines\"".to_string()),
        (
            "resume",
            format!(
                "protocol = \"resume\"\nresume = {{ secret_file = \"{}\", heartbeat_interval = \"100ms\", dead_peer_timeout = \"2s\" }}",
                key.display()
            ),
        ),
    ];
    for (name, ack) in modes {
        let to = if name == "resume" { core } else { server };
        out.push_str(&format!(
            "\n[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nbackend = \"{name}\"\n\n[[backend]]\nname = \"{name}\"\nservers = [\"{to}\"]\n{ack}\n"
        ));
    }
    out.push_str(&format!(
        "\n[[listener]]\nname = \"unix\"\nlisten = \"{unix_listen}\"\nbackend = \"unix\"\n\n[[backend]]\nname = \"unix\"\nservers = [\"{unix_server}\"]\nack = \"tcp\"\n"
    ));
    out
}

/// A core holdfast's listener and backend: a resume-protocol listener on
/// `listen` (with the `tls` line given, "" for none) in front of a line
/// server with response acks.
fn core_config(listen: &str, key: &std::path::Path, tls: &str, server: &str) -> String {
    format!(
        r#"
[[listener]]
name = "from-edge"
listen = "{listen}"
backend = "lines"
protocol = "resume"
resume = {{ secret_file = "{}", heartbeat_interval = "100ms", dead_peer_timeout = "2s", resume_timeout = "60s" }}
{tls}

[[backend]]
name = "lines"
servers = ["{server}"]
ack = "response"
framing = "lines"
"#,
        key.display()
    )
}

/// Waits (polling a counter, no fixed sleep) until `progress` passes `target`.
async fn progress_past(progress: &AtomicU64, target: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + STEP;
    while progress.load(Ordering::Relaxed) < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: progress stuck at {} (want {target})",
            progress.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The edge holdfast (the real binary, upgraded by the tests) in front of
/// a line server directly and through a core holdfast (in this process)
/// over the resume protocol; `clients` sessions per listener stream
/// verified requests until `stop`.
struct LoadRig {
    _server: Server,
    _unix_server: Server,
    _core: Running,
    dir: PathBuf,
    edge: tokio::process::Child,
    log: Log,
    addrs: Vec<String>,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Result<u64, String>>>,
}

impl LoadRig {
    async fn start(tag: &str, clients: usize) -> LoadRig {
        Self::start_with(tag, clients, &[], "").await
    }

    async fn start_with(
        tag: &str,
        clients: usize,
        envs: &[(&str, &str)],
        handover_keys: &str,
    ) -> LoadRig {
        let server = Server::start("127.0.0.1:0", "lines").await;
        let dir = temp_dir(tag);
        let key = dir.join("resume.key");
        std::fs::write(&key, pattern(48, 7)).unwrap();
        let core = start_running(&core_config("127.0.0.1:0", &key, "", &server.addr)).await;
        let unix_server = Server::start(
            &format!("unix:{}", dir.join("lines.sock").display()),
            "lines",
        )
        .await;
        let unix_listen = format!("unix:{}", dir.join("edge.sock").display());
        let socket = dir.join("run").join("handover.sock");
        let cfg = dir.join("edge.toml");
        std::fs::write(
            &cfg,
            edge_config(
                &socket,
                handover_keys,
                &server.addr,
                &core.addrs[0],
                &key,
                &unix_listen,
                &unix_server.addr,
            ),
        )
        .unwrap();
        let (edge, mut log) = spawn_logged_with(&cfg, &[], envs);
        let mut addrs = Vec::new();
        for name in ["none", "tcp", "response", "resume"] {
            let l = log
                .until("listening", |l| l.contains(&format!("listener={name} ")))
                .await;
            addrs.push(field(&l, "addr").unwrap().to_string());
        }
        log.until("listening", |l| l.contains("listener=unix "))
            .await;
        addrs.push(unix_listen);
        let pid = edge.id().unwrap();
        log.until("hand-over socket listening", |l| pid_of(l) == pid)
            .await;
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..clients * addrs.len() {
            let addr = &addrs[i % addrs.len()];
            let (progress, stop) = (progress.clone(), stop.clone());
            tasks.push(match addr.strip_prefix("unix:") {
                Some(path) => {
                    let stream = tokio::net::UnixStream::connect(path).await.unwrap();
                    tokio::spawn(verified_lines_until(stream, i, progress, stop))
                }
                None => {
                    let stream = connect(addr).await;
                    tokio::spawn(verified_lines_until(stream, i, progress, stop))
                }
            });
        }
        LoadRig {
            _server: server,
            _unix_server: unix_server,
            _core: core,
            dir,
            edge,
            log,
            addrs,
            progress,
            stop,
            clients: tasks,
        }
    }

    /// Lets every client make progress: `n` more verified responses.
    async fn flowing(&self, n: u64, what: &str) {
        let now = self.progress.load(Ordering::Relaxed);
        progress_past(&self.progress, now + n, what).await;
    }

    /// Stops the clients; each must have ended cleanly with every response
    /// verified (no reset, no EOF, nothing lost, duplicated or reordered).
    /// Then drains the edge process `pid` with SIGTERM.
    async fn finish(mut self, pid: u32) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for c in std::mem::take(&mut self.clients) {
            let r = tokio::time::timeout(STEP, c)
                .await
                .unwrap_or_else(|_| panic!("a client did not finish; log:\n{}", self.log.seen))
                .unwrap();
            total += r.unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log.seen));
        }
        kill("-TERM", pid);
        self.log
            .until("holdfast stopped", |l| pid_of(l) == pid)
            .await;
        let _ = std::fs::remove_dir_all(&self.dir);
        total
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_live_sessions_survive_ten_upgrades() {
    let mut rig = LoadRig::start("load", 20).await;
    rig.flowing(400, "before the upgrades").await;
    let mut pid = rig.edge.id().unwrap();
    let mut guard = KillOnDrop(pid);
    let mut generations = vec![pid];

    // A client connecting in a tight loop throughout.
    let looper = Looper::start(&rig.addrs[0]);

    let mut handed = Vec::new();
    for round in 0..10 {
        let old = pid;
        pid = start_upgrade(&mut rig.log, &mut generations, &mut guard).await;
        let line = rig.log.until("sessions handed over", |_| true).await;
        handed.push(line);
        rig.log
            .until("holdfast stopped", |l| pid_of(l) == old)
            .await;
        rig.log
            .until("hand-over socket listening", |l| pid_of(l) == pid)
            .await;
        rig.flowing(200, &format!("after upgrade {round}")).await;
    }
    looper.finish().await;
    let (mut sessions, mut alone) = (0, 0);
    for line in &handed {
        eprintln!("{line}");
        let n: usize = field(line, "sessions").unwrap().parse().unwrap();
        assert!(n >= 100, "only {n} sessions handed over: {line}");
        sessions += n;
        alone += field(line, "alone").unwrap().parse::<usize>().unwrap();
    }
    // Every client streams without a break, so (but for one stalled past
    // `busy_within` on a loaded machine) each session is busy and goes alone.
    assert!(
        alone * 2 > sessions,
        "{alone} of {sessions} sessions went alone"
    );
    let total = rig.finish(pid).await;
    assert!(total > 0);
}

/// Runs `holdfast run --config cfg --takeover` as a new process that takes
/// the listeners, then exits as the first batch of sessions arrives, before
/// answering for it; waits until the running process (logging to `log`)
/// has said the hand-over failed and accepts again.
async fn takeover_dying_at_first_batch(cfg: &std::path::Path, log: &mut Log) {
    let status = tokio::time::timeout(
        STEP,
        Command::new(BIN)
            .args(["run", "--config", cfg.to_str().unwrap(), "--takeover"])
            .env("HOLDFAST_TEST_HANDOVER_FAULT", "exit-on-first-batch")
            .stderr(Stdio::null())
            .status(),
    )
    .await
    .expect("exits in time")
    .unwrap();
    assert!(!status.success(), "{status:?}");
    log.until("hand-over failed", |l| l.contains("keeps serving"))
        .await;
    log.until("accepting again", |_| true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_dying_mid_hand_over_leaves_every_session_alive() {
    let mut rig = LoadRig::start("dying", 5).await;
    rig.flowing(200, "before").await;
    let pid = rig.edge.id().unwrap();
    let _guard = KillOnDrop(pid);
    takeover_dying_at_first_batch(&rig.dir.join("edge.toml"), &mut rig.log).await;
    // Every session carries on in the old process, which accepts again.
    rig.flowing(200, "after the failed hand-over").await;
    let mut c = connect(&rig.addrs[0]).await;
    echo_once(&mut c, b"new client after the failure\n")
        .await
        .unwrap();
    drop(c);
    // And a real upgrade still works afterwards.
    kill("-USR2", pid);
    let running = rig
        .log
        .until("holdfast running", |l| pid_of(l) != pid)
        .await;
    let new = pid_of(&running);
    let _guard2 = KillOnDrop(new);
    rig.log
        .until("holdfast stopped", |l| pid_of(l) == pid)
        .await;
    rig.flowing(200, "after the real upgrade").await;
    rig.finish(new).await;
}

/// A new process that stops answering half-way (it answers its second
/// batch only after the old process gave up waiting): the old process shuts
/// the hand-over socket and keeps every session not answered for; the new
/// process's late answer fails, so it starts none of them, and keeps the
/// first batch it had taken. No session runs in both or in neither: every
/// client's verified stream goes on, whichever process serves it. Every
/// session goes in pipelined batches (`busy_within = "0ms"`), so batches
/// are in flight behind the one that stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_that_stops_answering_never_shares_a_session() {
    let timeout = ("HOLDFAST_TEST_HANDOVER_TIMEOUT_MS", "1000");
    let batched = "busy_within = \"0ms\"\n";
    let mut rig = LoadRig::start_with("stalling", 20, &[timeout], batched).await;
    rig.flowing(200, "before").await;
    let pid = rig.edge.id().unwrap();
    let _guard = KillOnDrop(pid);
    let cfg = rig.dir.join("edge.toml");
    let (mut new, mut new_log) = spawn_logged_with(
        &cfg,
        &["--takeover"],
        &[
            ("HOLDFAST_TEST_HANDOVER_FAULT", "stall-on-second-batch"),
            timeout,
        ],
    );
    rig.log
        .until("hand-over failed", |l| l.contains("keeps serving"))
        .await;
    rig.log.until("accepting again", |_| true).await;
    new_log
        .until("cannot answer the old process", |_| true)
        .await;
    new_log.until("sessions taken over", |_| true).await;
    // Both processes serve now: the sessions of the first batch in the new
    // one, every other one here. Every client still ends cleanly with every
    // response verified: none was lost, and none was served by both.
    rig.flowing(300, "after the stalled hand-over").await;
    rig.finish(pid).await;
    let _ = new.start_kill();
    let _ = new.wait().await;
}

/// A core holdfast (a `protocol = "resume"` listener, with an edge in front
/// of it) upgraded five times while 20 sessions stream verified requests
/// through edge and core: the core hands over its resume listener and its
/// sessions with their links, so the edge never sees a link break (no leg
/// failed, no resume), the core's server legs never break, and every
/// client's stream goes on, nothing lost, duplicated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_hands_over_its_resume_sessions_with_their_links() {
    let mut rig = CoreRig::start("core", false).await;
    rig.upgrades(5).await;
    let resumes = rig.finish().await;
    assert_eq!(resumes, 0.0, "a plain link moves with its session");
}

/// The same core with mutual TLS on its resume listener: a TLS link cannot
/// move (rustls's state stays in the old process), so it closes once its
/// session is taken and the edge resumes it with the new process; the
/// session itself (offsets, buffers, the server leg) moved, and no client
/// sees anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_with_tls_links_hands_over_its_sessions_and_edges_resume() {
    let mut rig = CoreRig::start("core-tls", true).await;
    rig.upgrades(5).await;
    let resumes = rig.finish().await;
    assert!(
        resumes >= 20.0,
        "each upgrade's sessions resume their TLS links: {resumes}"
    );
}

/// A core listening on a Unix socket: the socket is handed over (never
/// unlinked by the process that gives it up), its sessions move with their
/// links, and a new session after the upgrades reaches the newest process
/// through the same path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_on_a_unix_socket_hands_over_socket_and_sessions() {
    let mut rig = CoreRig::start_on("core-unix", false, true).await;
    rig.upgrades(3).await;
    assert!(rig.dir.join("core.sock").exists(), "the socket file stays");
    rig.add_client().await;
    rig.flowing(200, "with a client opened after the upgrades")
        .await;
    let resumes = rig.finish().await;
    assert_eq!(resumes, 0.0);
}

/// A core whose upgrade fails half-way (the new process exits as the
/// first batch of sessions arrives): every session, parked for its export,
/// carries on in the old core with its link, and a real upgrade works
/// afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_keeps_its_resume_sessions_when_the_new_process_dies() {
    let mut rig = CoreRig::start("core-dying", false).await;
    let pid = rig.pid;
    let _guard = KillOnDrop(pid);
    takeover_dying_at_first_batch(&rig.cfg, &mut rig.log).await;
    rig.flowing(200, "after the failed hand-over").await;
    rig.upgrades(1).await;
    let resumes = rig.finish().await;
    assert_eq!(resumes, 0.0);
}

/// A core (the real binary) behind an edge (in this process), with 20
/// sessions streaming verified requests through both, optionally with
/// mutual TLS between them.
struct CoreRig {
    _server: Server,
    /// The first generation (later ones are not our children).
    _core: tokio::process::Child,
    _pki: common::pki::Pki,
    dir: PathBuf,
    cfg: PathBuf,
    tls: bool,
    log: Log,
    pid: u32,
    generations: Vec<u32>,
    guard: KillOnDrop,
    edge: Running,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Result<u64, String>>>,
}

impl CoreRig {
    async fn start(tag: &str, tls: bool) -> CoreRig {
        Self::start_on(tag, tls, false).await
    }

    /// [`start`](Self::start), the core listening on a Unix socket when
    /// `unix`.
    async fn start_on(tag: &str, tls: bool, unix: bool) -> CoreRig {
        let server = Server::start("127.0.0.1:0", "lines").await;
        let dir = temp_dir(tag);
        let key = dir.join("resume.key");
        std::fs::write(&key, pattern(48, 7)).unwrap();
        let pki = common::pki::Pki::new(&format!("handover-{tag}"));
        let (core_tls, edge_tls) = if tls {
            let (cert, ckey) = pki.leaf("core", "core", 1, &["core.internal"]);
            let (ecert, ekey) = pki.leaf("edge", "edge", 2, &["edge.internal"]);
            let ca = pki.path("ca.pem");
            (
                format!(r#"tls = {{ cert = "{cert}", key = "{ckey}", client_ca = "{ca}" }}"#),
                format!(
                    r#"tls = {{ ca = "{ca}", server_name = "core.internal", cert = "{ecert}", key = "{ekey}" }}"#
                ),
            )
        } else {
            (String::new(), String::new())
        };
        let socket = dir.join("run").join("handover.sock");
        let cfg = dir.join("core.toml");
        let listen = if unix {
            format!("unix:{}", dir.join("core.sock").display())
        } else {
            "127.0.0.1:0".to_string()
        };
        std::fs::write(
            &cfg,
            format!(
                "[lifecycle]\ndrain_timeout = \"2s\"\n\n[handover]\nsocket = \"{}\"\n{}",
                socket.display(),
                core_config(&listen, &key, &core_tls, &server.addr)
            ),
        )
        .unwrap();
        let (core, mut log) = spawn_logged(&cfg);
        let listening = log
            .until("listening", |l| l.contains("listener=from-edge "))
            .await;
        let core_addr = field(&listening, "addr").unwrap().to_string();
        let pid = core.id().unwrap();
        log.until("hand-over socket listening", |l| pid_of(l) == pid)
            .await;
        let edge = start_running(&format!(
            r#"
[[listener]]
name = "front"
listen = "127.0.0.1:0"
backend = "core"

[[backend]]
name = "core"
servers = ["{core_addr}"]
protocol = "resume"
resume = {{ secret_file = "{}", heartbeat_interval = "100ms", dead_peer_timeout = "2s" }}
hold_timeout = "60s"
{edge_tls}
"#,
            key.display()
        ))
        .await;
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for i in 0..20 {
            let stream = connect(&edge.addrs[0]).await;
            clients.push(tokio::spawn(verified_lines_until(
                stream,
                i,
                progress.clone(),
                stop.clone(),
            )));
        }
        let rig = CoreRig {
            _server: server,
            _core: core,
            _pki: pki,
            dir,
            cfg,
            tls,
            log,
            pid,
            generations: vec![pid],
            guard: KillOnDrop(pid),
            edge,
            progress,
            stop,
            clients,
        };
        rig.flowing(400, "before the upgrades").await;
        rig
    }

    async fn flowing(&self, n: u64, what: &str) {
        let now = self.progress.load(Ordering::Relaxed);
        progress_past(&self.progress, now + n, what).await;
    }

    /// One more client, through the edge to the core's current process
    /// (the edge opens a new link for it).
    async fn add_client(&mut self) {
        let stream = connect(&self.edge.addrs[0]).await;
        let id = self.clients.len();
        self.clients.push(tokio::spawn(verified_lines_until(
            stream,
            id,
            self.progress.clone(),
            self.stop.clone(),
        )));
    }

    /// `n` upgrades by SIGUSR2, each handing over all 20 sessions.
    async fn upgrades(&mut self, n: usize) {
        for round in 0..n {
            let old = self.pid;
            self.pid = start_upgrade(&mut self.log, &mut self.generations, &mut self.guard).await;
            let line = self.log.until("sessions handed over", |_| true).await;
            eprintln!("{line}");
            let handed: usize = field(&line, "sessions").unwrap().parse().unwrap();
            assert_eq!(handed, 20, "round {round}: {line}");
            self.log
                .until("holdfast stopped", |l| pid_of(l) == old)
                .await;
            let pid = self.pid;
            self.log
                .until("hand-over socket listening", |l| pid_of(l) == pid)
                .await;
            self.flowing(200, &format!("after upgrade {round}")).await;
        }
    }

    /// Stops the clients (each must end with every response verified),
    /// checks that no server leg of the core broke (and, without TLS, no
    /// link), stops the core, and returns the edge's resumes.
    async fn finish(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        for c in std::mem::take(&mut self.clients) {
            let r = tokio::time::timeout(STEP, c)
                .await
                .unwrap_or_else(|_| panic!("a client did not finish; log:\n{}", self.log.seen))
                .unwrap();
            r.unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log.seen));
        }
        let metrics = self.edge.rt.metrics.encode();
        let count = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                .sum()
        };
        // The core's sessions kept their server legs: none was made again.
        assert!(
            !self.log.seen.contains("leg resumed"),
            "a server leg of the core broke:\n{}",
            self.log.seen
        );
        if !self.tls {
            // And the links never broke.
            assert_eq!(count("holdfast_legs_failed_total"), 0.0, "{metrics}");
            for broken in ["leg lost", "newer leg replaces"] {
                assert!(
                    !self.log.seen.contains(broken),
                    "the core logged {broken:?}:\n{}",
                    self.log.seen
                );
            }
        }
        kill("-TERM", self.pid);
        let pid = self.pid;
        self.log
            .until("holdfast stopped", |l| pid_of(l) == pid)
            .await;
        let _ = std::fs::remove_dir_all(&self.dir);
        count("holdfast_resumes_total")
    }
}
