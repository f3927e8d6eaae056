//! Test harness: holdfast in-process on port 0, killable example-server child
//! processes, and byte-exact checkers. Shared by the integration tests.
#![allow(dead_code)]

pub mod pki;
pub mod relay;

use std::process::Stdio;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use holdfast::config::{self, Endpoint};
use holdfast::lifecycle::{Phase, Shutdown};
use holdfast::proxy::{ReloadRequest, Runtime};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// Logs to the test's captured output; `RUST_LOG=holdfast=debug` for more.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// holdfast running in this process.
pub struct Proxy {
    pub endpoints: Vec<Endpoint>,
    pub shutdown: Shutdown,
    pub phase: watch::Receiver<Phase>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Proxy {
    /// Parses `toml`, binds, runs, and returns once the phase is Running.
    pub async fn start(toml: &str) -> Proxy {
        init_logging();
        let cfg = config::parse(toml).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let bound = holdfast::proxy::bind(&cfg).await.expect("bind");
        let endpoints = bound.local_endpoints();
        let shutdown = Shutdown::new();
        let (tx, mut phase) = watch::channel(Phase::Starting);
        let task = tokio::spawn(holdfast::proxy::run(cfg, bound, shutdown.clone(), tx));
        phase
            .wait_for(|p| *p == Phase::Running)
            .await
            .expect("proxy runs");
        Proxy {
            endpoints,
            shutdown,
            phase,
            task,
        }
    }

    /// The TCP address of listener `i`.
    pub fn addr(&self, i: usize) -> String {
        match &self.endpoints[i] {
            Endpoint::Tcp(a) => a.clone(),
            Endpoint::Unix(p) => panic!("listener {i} is unix:{}", p.display()),
            Endpoint::Systemd(n) => panic!("listener {i} is systemd:{n}"),
        }
    }

    /// Stops it and waits for the Stopped phase.
    pub async fn stop(mut self) {
        self.shutdown.stop.cancel();
        self.phase
            .wait_for(|p| *p == Phase::Stopped)
            .await
            .expect("stops");
        self.task.await.expect("join").expect("run ok");
    }
}

/// A real example-server child process, killable with SIGKILL and
/// restartable on the same address.
pub struct Server {
    child: Option<Child>,
    pub addr: String,
    mode: String,
    greeting: Option<String>,
}

impl Server {
    /// Starts `holdfast example-server` on `listen` (`127.0.0.1:0` or
    /// `unix:/path`) and waits until it is listening.
    pub async fn start(listen: &str, mode: &str) -> Server {
        Server::start_with(listen, mode, None).await
    }

    pub async fn start_with(listen: &str, mode: &str, greeting: Option<&str>) -> Server {
        let mut s = Server {
            child: None,
            addr: listen.to_string(),
            mode: mode.to_string(),
            greeting: greeting.map(str::to_string),
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "example-server",
            "--listen",
            &self.addr,
            "--mode",
            &self.mode,
        ]);
        if let Some(g) = &self.greeting {
            cmd.args(["--greeting", g]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn example server");
        let out = child.stdout.take().expect("stdout");
        let line = BufReader::new(out)
            .lines()
            .next_line()
            .await
            .expect("read")
            .expect("example server printed its address");
        self.addr = line
            .strip_prefix("listening ")
            .expect("listening line")
            .to_string();
        self.child = Some(child);
    }

    /// SIGKILL, and wait until the process is gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().expect("kill");
            c.wait().await.expect("wait");
        }
    }

    /// Starts it again on the same address.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill before restart");
        self.spawn().await;
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` on `stream` while reading everything back until EOF; returns
/// what came back. Half-closes after the last byte.
pub async fn send_and_collect<S>(stream: S, data: Vec<u8>) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(256 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await?;
    writer.await.expect("join")?;
    Ok(got)
}

/// Asserts two byte strings are equal, reporting the first difference.
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: got {} bytes, want {}; first difference at byte {first}",
            got.len(),
            want.len()
        );
    }
}

/// Connects over TCP with a timeout.
/// One listener `l` (127.0.0.1, a port the kernel picks) in front of
/// backend `b` at `servers` with `backend_keys`, then the tables in `extra`.
pub fn one_listener_config(servers: &[&str], backend_keys: &str, extra: &str) -> String {
    listener_config_with("", servers, backend_keys, extra)
}

/// [`one_listener_config`] with `listener_keys` in the listener's table.
pub fn listener_config_with(
    listener_keys: &str,
    servers: &[&str],
    backend_keys: &str,
    extra: &str,
) -> String {
    let servers = servers
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[[listener]]
name = "l"
listen = "127.0.0.1:0"
backend = "b"
{listener_keys}

[[backend]]
name = "b"
servers = [{servers}]
{backend_keys}
{extra}"#
    )
}

pub async fn connect(addr: &str) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// A line client that pipelines numbered requests and verifies each
/// response is its request, in order; returns how many it verified.
pub async fn line_client(
    addr: String,
    id: usize,
    requests: u64,
    window: u64,
) -> Result<u64, String> {
    let stream = TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    let mut seq = 0;
    while seq < requests {
        let n = window.min(requests - seq);
        let mut batch = String::new();
        for k in 0..n {
            batch.push_str(&format!("c{id} r{:06}\n", seq + k));
        }
        w.write_all(batch.as_bytes())
            .await
            .map_err(|e| format!("client {id}: write: {e}"))?;
        for k in 0..n {
            line.clear();
            let got = r
                .read_line(&mut line)
                .await
                .map_err(|e| format!("client {id}: read: {e}"))?;
            if got == 0 {
                return Err(format!("client {id}: EOF after {} responses", seq + k));
            }
            let want = format!("c{id} r{:06}\n", seq + k);
            if line != want {
                return Err(format!("client {id}: got {line:?}, want {want:?}"));
            }
        }
        seq += n;
    }
    w.shutdown().await.map_err(|e| e.to_string())?;
    line.clear();
    let n = r.read_line(&mut line).await.map_err(|e| e.to_string())?;
    if n != 0 {
        return Err(format!(
            "client {id}: extra bytes after the last response: {line:?}"
        ));
    }
    Ok(seq)
}

/// Polls `cond` every 10 ms for at most 10 s.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// holdfast in-process with its runtime (metrics, session registry) and a
/// reload channel, for tests that look inside.
pub struct Running {
    /// Listener addresses, in config order.
    pub addrs: Vec<String>,
    /// The admin endpoint's address ("" without `[admin]`).
    pub admin: String,
    pub rt: Runtime,
    pub reload: mpsc::Sender<ReloadRequest>,
    pub shutdown: Shutdown,
    pub phase: watch::Receiver<Phase>,
}

/// Parses `toml`, binds, runs with a runtime the test can see, and returns
/// once the phase is Running.
pub async fn start_running(toml: &str) -> Running {
    init_logging();
    let cfg = config::parse(toml).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    let bound = holdfast::proxy::bind(&cfg).await.expect("bind");
    let addrs = bound
        .local_endpoints()
        .iter()
        .map(|e| e.to_string())
        .collect();
    let admin = bound
        .admin_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let rt = Runtime::for_config(&cfg);
    let (reload, reloads) = mpsc::channel(1);
    let shutdown = Shutdown::new();
    let (tx, mut phase) = watch::channel(Phase::Starting);
    tokio::spawn(holdfast::proxy::run_with(
        cfg,
        bound,
        shutdown.clone(),
        tx,
        rt.clone(),
        reloads,
    ));
    phase
        .wait_for(|p| *p == Phase::Running)
        .await
        .expect("proxy runs");
    Running {
        addrs,
        admin,
        rt,
        reload,
        shutdown,
        phase,
    }
}

/// Kills and restarts `server` `kills` times, each time after `progress`
/// moved by 50 (so every restart happens under load).
pub async fn chaos(server: &mut Server, kills: usize, progress: Arc<AtomicU64>) {
    for _ in 0..kills {
        let before = progress.load(Ordering::Relaxed);
        let mut n = 0;
        while progress.load(Ordering::Relaxed) < before + 50 && n < 2000 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            n += 1;
        }
        server.kill().await;
        server.restart().await;
    }
}

/// Pipelines verified line requests (8 at a time, of varied lengths) over
/// `stream` until `stop`, counting each verified response in `progress`;
/// then half-closes and expects a clean EOF. Returns the requests sent.
pub async fn verified_lines_until<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    id: usize,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<u64, String> {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    let mut seq = 0u64;
    let mut line = String::new();
    let request = |seq: u64, k: u64| {
        format!(
            "c{id} r{:07} {}\n",
            seq + k,
            "x".repeat((k * 37 % 200) as usize)
        )
    };
    while !stop.load(Ordering::Relaxed) {
        let batch: String = (0..8).map(|k| request(seq, k)).collect();
        w.write_all(batch.as_bytes())
            .await
            .map_err(|e| format!("client {id}: write failed: {e}"))?;
        for k in 0..8 {
            line.clear();
            let n = r
                .read_line(&mut line)
                .await
                .map_err(|e| format!("client {id}: read failed (reset?): {e}"))?;
            if n == 0 {
                return Err(format!("client {id}: EOF at request {}", seq + k));
            }
            let want = request(seq, k);
            if line != want {
                return Err(format!("client {id}: got {line:?}, want {want:?}"));
            }
            progress.fetch_add(1, Ordering::Relaxed);
        }
        seq += 8;
    }
    w.shutdown().await.map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)
        .await
        .map_err(|e| format!("client {id}: final read: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "client {id}: {} extra bytes at the end",
            rest.len()
        ));
    }
    Ok(seq)
}
