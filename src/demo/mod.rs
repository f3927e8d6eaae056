//! `holdfast demo`: holdfast in front of the example line server, which is
//! SIGKILLed and restarted every few seconds, with clients that pipeline
//! numbered requests and verify every response.
//!
//! It prints one line a second and a summary at the end; it succeeds only if
//! no client saw a reset and no response was lost, duplicated or reordered.
//! It uses the library as any embedder would: `config::parse`, `proxy::bind`,
//! `proxy::run`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::config::{self, Endpoint};
use crate::lifecycle::{Phase, Shutdown};

pub mod server;

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Stop after this long; `None` runs until Ctrl-C.
    pub duration: Option<Duration>,
    pub clients: usize,
    /// Time between server kills.
    pub kill_every: Duration,
}

/// Requests each client keeps in flight.
const WINDOW: usize = 8;
/// How long the server stays dead before it is restarted.
const DOWNTIME: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Stats {
    answered: AtomicU64,
    restarts: AtomicU64,
    resets: AtomicU64,
    lost: AtomicU64,
    longest_stall_us: AtomicU64,
}

/// Runs the demo; `Ok(true)` when nothing was lost and no client was reset.
pub async fn run(opts: DemoOptions) -> io::Result<bool> {
    let exe = std::env::current_exe()?;
    let (mut child, server_addr) = start_server(&exe, "127.0.0.1:0").await?;
    let toml = format!(
        r#"
[[listener]]
name = "demo"
listen = "127.0.0.1:0"
backend = "lines"

[[backend]]
name = "lines"
servers = ["{server_addr}"]
ack = "response"
framing = "lines"
hold_timeout = "30s"
"#
    );
    let cfg = config::parse(&toml).map_err(|e| io::Error::other(e.to_string()))?;
    let bound = crate::proxy::bind(&cfg)
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    let Endpoint::Tcp(proxy_addr) = bound.local_endpoints()[0].clone() else {
        return Err(io::Error::other("demo listener is not TCP"));
    };
    let shutdown = Shutdown::new();
    let (phase_tx, mut phase_rx) = tokio::sync::watch::channel(Phase::Starting);
    let proxy = tokio::spawn(crate::proxy::run(cfg, bound, shutdown.clone(), phase_tx));
    phase_rx
        .wait_for(|p| *p == Phase::Running)
        .await
        .map_err(|_| io::Error::other("proxy ended before running"))?;

    println!(
        "holdfast demo: {} clients -> holdfast {proxy_addr} (ack = \"response\", lines) -> example server {server_addr}",
        opts.clients
    );
    println!(
        "the server is SIGKILLed every {:?} and restarted {:?} later; Ctrl-C ends the demo",
        opts.kill_every, DOWNTIME
    );

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..opts.clients {
        clients.push(tokio::spawn(client(
            id,
            proxy_addr.clone(),
            stats.clone(),
            stop.clone(),
        )));
    }

    let started = Instant::now();
    let mut next_kill = tokio::time::Instant::now() + opts.kill_every;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_answered = 0;
    let end = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = async { match end { Some(e) => tokio::time::sleep_until(e).await, None => std::future::pending().await } } => break,
            _ = tokio::time::sleep_until(next_kill) => {
                child.start_kill()?;
                child.wait().await?;
                tokio::time::sleep(DOWNTIME).await;
                child = start_server(&exe, &server_addr).await?.0;
                stats.restarts.fetch_add(1, Ordering::Relaxed);
                next_kill = tokio::time::Instant::now() + opts.kill_every;
            }
            _ = tick.tick() => {
                let answered = stats.answered.load(Ordering::Relaxed);
                println!(
                    "{:>4}s  answered {:>8} (+{:>6}/s)  server restarts {:>3}  client resets {}  lost responses {}  longest stall {:.0} ms",
                    started.elapsed().as_secs(),
                    answered,
                    answered - last_answered,
                    stats.restarts.load(Ordering::Relaxed),
                    stats.resets.load(Ordering::Relaxed),
                    stats.lost.load(Ordering::Relaxed),
                    stats.longest_stall_us.load(Ordering::Relaxed) as f64 / 1000.0,
                );
                last_answered = answered;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    shutdown.stop.cancel();
    let _ = proxy.await;
    let _ = child.start_kill();

    let resets = stats.resets.load(Ordering::Relaxed);
    let lost = stats.lost.load(Ordering::Relaxed);
    println!(
        "summary: {:.0} s, {} requests answered, {} server restarts, client resets: {resets}, lost responses: {lost}, longest stall {:.0} ms",
        started.elapsed().as_secs_f64(),
        stats.answered.load(Ordering::Relaxed),
        stats.restarts.load(Ordering::Relaxed),
        stats.longest_stall_us.load(Ordering::Relaxed) as f64 / 1000.0,
    );
    Ok(resets == 0 && lost == 0)
}

/// Starts the example server; returns it with the address it bound.
async fn start_server(exe: &std::path::Path, listen: &str) -> io::Result<(Child, String)> {
    let mut child = Command::new(exe)
        .args(["example-server", "--listen", listen, "--mode", "lines"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines
        .next_line()
        .await?
        .ok_or_else(|| io::Error::other("example server exited before listening"))?;
    let addr = first
        .strip_prefix("listening ")
        .ok_or_else(|| io::Error::other(format!("unexpected example server output: {first}")))?
        .to_string();
    Ok((child, addr))
}

/// One client: pipelines `WINDOW` numbered requests at a time and checks
/// that each response is exactly its request, in order.
async fn client(id: usize, addr: String, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let stream = match TcpStream::connect(&addr).await {
        Ok(s) => s,
        Err(_) => {
            stats.resets.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut seq: u64 = 0;
    let mut line = String::new();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut batch = String::new();
        for k in 0..WINDOW as u64 {
            batch.push_str(&format!("client {id} request {:08} hello\n", seq + k));
        }
        if w.write_all(batch.as_bytes()).await.is_err() {
            stats.resets.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for k in 0..WINDOW as u64 {
            line.clear();
            match r.read_line(&mut line).await {
                Ok(0) | Err(_) => {
                    stats.resets.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(_) => {}
            }
            let expected = format!("client {id} request {:08} hello\n", seq + k);
            if line != expected {
                stats.lost.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.answered.fetch_add(1, Ordering::Relaxed);
            }
            let gap = last.elapsed().as_micros() as u64;
            stats.longest_stall_us.fetch_max(gap, Ordering::Relaxed);
            last = Instant::now();
        }
        seq += WINDOW as u64;
    }
    let _ = w.shutdown().await;
}
