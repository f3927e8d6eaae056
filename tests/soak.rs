//! The soak test: 30 sessions across `ack = "tcp"`, `ack = "response"`
//! (lines) and the resume protocol run while a seeded RNG injects a fault
//! every ~100 ms: server SIGKILL + restart, relay cuts and resets, black
//! holes, slow periods, 1-byte segments and one direction closed. No client
//! sees a reset or an early EOF; streams are byte-exact (tcp: at most one
//! discontinuity per fault that could reach it, and the last 1,000 lines,
//! sent once every tcp session echoes on a leg made after a final cut,
//! exact); afterwards the replay buffers and the session registry are
//! empty.
//!
//! `HOLDFAST_SOAK_SECS` sets the duration (default 5), `HOLDFAST_SOAK_SEED`
//! replays a run (the seed is printed).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::relay::{Relay, Side};
use common::*;
use holdfast::server::{ResumeListener, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const PER_MODE: usize = 10;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Sum of every sample of `metric` in the text exposition.
fn metric_sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A resume-protocol echo service in this process (auto acks): it outlives
/// every fault of the soak (a SIGKILLed resume service is the ledger test's
/// subject, tests/resume_protocol.rs).
async fn resume_echo(key: Vec<u8>) -> String {
    let mut cfg = ServerConfig::new(key);
    cfg.resume_timeout = Duration::from_secs(60);
    let l = Arc::new(ResumeListener::bind("127.0.0.1:0", cfg).await.unwrap());
    let addr = l.local_addr().to_string();
    tokio::spawn(async move {
        while let Ok(mut s) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A tcp-ack client: writes numbered lines until `stop`, then 1,000 more,
/// and checks the echo. A fault may lose the bytes in its window (the
/// server host's receive queue), so the stream may jump: each jump (with
/// the torn line before it, if any) is a discontinuity. Returns them. A reset or an early EOF is an error.
async fn tcp_client(
    addr: String,
    id: usize,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<usize, String> {
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| e.to_string())?;
    let (r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            w.write_all(format!("{seq:08}\n").as_bytes())
                .await
                .map_err(|e| format!("tcp client {id}: write: {e}"))?;
            seq += 1;
            if seq % 16 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        for k in 0..1000 {
            w.write_all(format!("{:08}\n", seq + k).as_bytes())
                .await
                .map_err(|e| e.to_string())?;
        }
        w.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<u64, String>(seq + 1000)
    });
    let mut r = BufReader::new(r);
    let mut line = String::new();
    let (mut next, mut discontinuities, mut tail_exact) = (0u64, 0usize, 0u64);
    // A torn line and the jump right after it are one discontinuity (where
    // two legs meet).
    let mut torn = false;
    loop {
        line.clear();
        let n = r
            .read_line(&mut line)
            .await
            .map_err(|e| format!("tcp client {id}: read (reset?): {e}"))?;
        if n == 0 {
            break;
        }
        progress.fetch_add(1, Ordering::Relaxed);
        match line.trim_end().parse::<u64>() {
            Ok(seq) if seq == next && line.len() == 9 => {
                next += 1;
                tail_exact += 1;
                torn = false;
            }
            Ok(seq) if line.len() == 9 => {
                if !torn {
                    discontinuities += 1;
                }
                torn = false;
                tail_exact = 1;
                next = seq + 1;
            }
            _ => {
                if !torn {
                    discontinuities += 1;
                }
                torn = true;
                tail_exact = 0;
            }
        }
    }
    let sent = writer.await.unwrap()?;
    if next != sent {
        return Err(format!(
            "tcp client {id}: the stream ended at {next}, sent {sent}"
        ));
    }
    if tail_exact < 1000 {
        return Err(format!(
            "tcp client {id}: only {tail_exact} exact lines at the end"
        ));
    }
    Ok(discontinuities)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_30_sessions_under_random_faults() {
    let secs = env_u64("HOLDFAST_SOAK_SECS").unwrap_or(5);
    let seed = env_u64("HOLDFAST_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }) | 1;
    println!("soak: HOLDFAST_SOAK_SEED={seed} HOLDFAST_SOAK_SECS={secs}");
    let mut rng = Rng(seed);

    let dir = std::env::temp_dir().join(format!("holdfast-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = pattern(32, 7);
    let key_file = dir.join("resume.key");
    std::fs::write(&key_file, &key).unwrap();

    let mut server = Server::start("127.0.0.1:0", "echo").await;
    let plain = Relay::start(server.addr.clone()).await;
    let resume = Relay::start(resume_echo(key).await).await;
    let h = start_running(&format!(
        r#"
[[listener]]
name = "tcp"
listen = "127.0.0.1:0"
backend = "tcp"

[[listener]]
name = "lines"
listen = "127.0.0.1:0"
backend = "lines"

[[listener]]
name = "resume"
listen = "127.0.0.1:0"
backend = "resume"

[[backend]]
name = "tcp"
servers = ["{plain}"]
ack = "tcp"
hold_timeout = "60s"

[[backend]]
name = "lines"
servers = ["{plain}"]
ack = "response"
framing = "lines"
hold_timeout = "60s"

[[backend]]
name = "resume"
servers = ["{resume}"]
protocol = "resume"
resume = {{ secret_file = "{key}", heartbeat_interval = "100ms", dead_peer_timeout = "400ms" }}
hold_timeout = "60s"
"#,
        plain = plain.addr,
        resume = resume.addr,
        key = key_file.display(),
    ))
    .await;

    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tcp = Vec::new();
    let mut exact = Vec::new();
    for id in 0..PER_MODE {
        let (p, s) = (progress.clone(), stop.clone());
        tcp.push(tokio::spawn(tcp_client(h.addrs[0].clone(), id, p, s)));
        for (k, addr) in [&h.addrs[1], &h.addrs[2]].into_iter().enumerate() {
            let (p, s) = (progress.clone(), stop.clone());
            let stream = connect(addr).await;
            let cid = 100 * (k + 1) + id;
            exact.push(tokio::spawn(verified_lines_until(stream, cid, p, s)));
        }
    }

    // Faults, one every ~100 ms, until the time is up. Counted per relay:
    // a tcp-ack session may lose its window once per fault on its path.
    let mut plain_faults = 0usize;
    let mut log = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        let relay = if rng.below(2) == 0 { &plain } else { &resume };
        let on_plain = std::ptr::eq(relay, &plain);
        let fault = rng.below(8);
        let what = match fault {
            0 => {
                server.kill().await;
                server.restart().await;
                plain_faults += 1;
                "server SIGKILL + restart"
            }
            1 => {
                relay.cut();
                "cut"
            }
            2 => {
                relay.reset();
                "reset"
            }
            3 => {
                relay.set_blackhole(true);
                tokio::time::sleep(Duration::from_millis(50 + rng.below(400))).await;
                relay.set_blackhole(false);
                "black hole"
            }
            4 => {
                relay.set_slow(
                    20_000 + rng.below(200_000),
                    Duration::from_millis(rng.below(20)),
                );
                tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
                relay.set_fast();
                "slow link"
            }
            5 => {
                relay.set_split(true);
                tokio::time::sleep(Duration::from_millis(50 + rng.below(200))).await;
                relay.set_split(false);
                "1-byte segments"
            }
            6 => {
                relay.close_one_way(if rng.below(2) == 0 {
                    Side::Up
                } else {
                    Side::Down
                });
                "one direction closed"
            }
            _ => "quiet",
        };
        if on_plain && [1, 2, 3, 6].contains(&fault) {
            plain_faults += 1;
        }
        log.push(format!(
            "{what}{}",
            if fault == 0 {
                ""
            } else if on_plain {
                " (plain)"
            } else {
                " (resume)"
            }
        ));
        tokio::time::sleep(Duration::from_millis(50 + rng.below(100))).await;
    }
    // A last cut of the plain path. A fault can outlive its end (the relay
    // may go on acking a tcp session's bytes on a connection whose server
    // side died, and pass them on to nobody), and the final lines below
    // must travel on legs made after every fault. Like any cut it may cost
    // each tcp session its window once.
    let cut_at: std::collections::HashMap<String, u64> =
        h.rt.shared
            .session_views()
            .into_iter()
            .filter(|v| v.listener == "tcp")
            .map(|v| (v.id, v.leg_generation))
            .collect();
    plain.cut();
    plain_faults += 1;
    log.push("final cut (plain)".to_string());
    println!("soak: {} faults: {log:?}", log.len());
    let before = progress.load(Ordering::Relaxed);
    // Some traffic after the last fault, then everyone finishes: every tcp
    // session on a leg made after the cut, with 100 lines' worth of echoes
    // read from it (per session: `down.read` when that leg was first seen,
    // and whether they came).
    let mut fresh: std::collections::HashMap<String, (u64, bool)> = Default::default();
    let mut n = 0;
    loop {
        for v in h.rt.shared.session_views() {
            if cut_at.get(&v.id).is_some_and(|&g| v.leg_generation > g) {
                let (at, done) = fresh.entry(v.id).or_insert((v.down.read, false));
                *done |= v.down.read >= *at + 900;
            }
        }
        let tcp_ready = cut_at
            .keys()
            .all(|id| fresh.get(id).is_some_and(|&(_, done)| done));
        if (tcp_ready && progress.load(Ordering::Relaxed) >= before + 200) || n >= 5000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        n += 1;
    }
    stop.store(true, Ordering::Relaxed);

    for c in exact {
        let sent = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a client hung"))
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(sent > 0, "seed {seed}: a client made no progress");
    }
    for c in tcp {
        let jumps = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a tcp client hung"))
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(
            jumps <= plain_faults,
            "seed {seed}: {jumps} discontinuities for {plain_faults} faults on the tcp path"
        );
    }

    // Memory back to baseline: no replay buffer, no session (and every
    // session counted as closed: the count follows the registry).
    let mut n = 0;
    loop {
        let text = h.rt.metrics.encode();
        let buffered = metric_sum(&text, "holdfast_replay_buffer_bytes");
        let sessions = h.rt.shared.session_views().len();
        let closed = metric_sum(&text, "holdfast_sessions_closed_total");
        if buffered == 0.0 && sessions == 0 && closed == (3 * PER_MODE) as f64 {
            assert_eq!(h.rt.shared.buffer_used.load(Ordering::Relaxed), 0);
            assert_eq!(
                metric_sum(&text, "holdfast_client_resets_total"),
                0.0,
                "seed {seed}: a client got a reset"
            );
            let clean = text
                .lines()
                .filter(|l| {
                    l.starts_with("holdfast_sessions_closed_total")
                        && l.contains("reason=\"client_closed\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
            assert_eq!(
                clean, closed,
                "seed {seed}: every session closed by its client\n{text}"
            );
            break;
        }
        n += 1;
        assert!(
            n < 1000,
            "seed {seed}: {buffered} bytes still buffered, {sessions} sessions open, {closed} closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.shutdown.stop.cancel();
    server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}
