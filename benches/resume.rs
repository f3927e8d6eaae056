//! `cargo bench --bench resume`: how long a held session takes to resume
//! after its server comes back, and what each ack mode costs in throughput.
//!
//! Two measurements, printed as tables with the machine they ran on:
//!
//! - **resume latency**: an in-process server (so `listen()` can be
//!   timestamped exactly) is crashed (listener dropped, connections reset
//!   with SO_LINGER 0), kept down for a seeded random 50–300 ms, and
//!   re-listened on the same port; the time from `listen()` returning to the
//!   first byte holdfast replays into it is one sample. holdfast runs with
//!   the default backoff (`retry_initial`, `retry_max`), `ack = "response"`,
//!   `framing = "lines"`, and a client that always has one request in flight.
//! - **ack-mode throughput**: bulk echo through holdfast with `ack = "none"`,
//!   `"tcp"` and `"response"`, rounds interleaved to cancel drift, against
//!   the example server as a child process.
//!
//! It measures; it asserts nothing about speed. It owns no holdfast logic:
//! holdfast runs in-process through `config::parse`, `proxy::bind` and
//! `proxy::run`, as any embedder would.
//!
//! Arguments (after `--`): `--restarts N` (100), `--seed N` (1), `--rounds N`
//! (5), `--secs S` (2), `--only resume|throughput`.

mod common;

use common::*;
use std::io;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

struct Args {
    restarts: usize,
    seed: u64,
    rounds: usize,
    secs: f64,
    only: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        restarts: 100,
        seed: 1,
        rounds: 5,
        secs: 2.0,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            // cargo bench passes `--bench` to harness = false targets.
            "--bench" => {}
            "--restarts" => a.restarts = val("--restarts").parse().expect("--restarts N"),
            "--seed" => a.seed = val("--seed").parse().expect("--seed N"),
            "--rounds" => a.rounds = val("--rounds").parse().expect("--rounds N"),
            "--secs" => a.secs = val("--secs").parse().expect("--secs S"),
            "--only" => a.only = Some(val("--only")),
            other => panic!("unknown argument {other:?} (see the top of benches/resume.rs)"),
        }
    }
    a
}

fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    print_machine();
    rt.block_on(async {
        if args.only.as_deref() != Some("throughput") {
            resume_latency(&args).await?;
        }
        if args.only.as_deref() != Some("resume") {
            throughput(&args).await?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------- resume

/// Binds `addr` with SO_REUSEADDR and listens.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// What one incarnation of the in-process server reports.
enum ServerEvent {
    /// The first byte of this incarnation arrived at this instant.
    FirstByte(Instant),
    /// A whole line was answered.
    Answered,
}

/// One incarnation of the in-process line server: accepts, answers each
/// line with itself, reports the first byte and every answer. Aborting the
/// returned set drops the listener and every connection; the connections
/// have SO_LINGER 0, so the drop resets them, like a crash.
fn serve_incarnation(
    listener: TcpListener,
    events: mpsc::UnboundedSender<ServerEvent>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    set.spawn(async move {
        // Owned by this task: aborting it drops the listener and aborts
        // every connection task.
        let mut conns = JoinSet::new();
        let first = Arc::new(AtomicBool::new(false));
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            while conns.try_join_next().is_some() {}
            let _ = s.set_nodelay(true);
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            let events = events.clone();
            let first = first.clone();
            conns.spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    // fill_buf returns as soon as the first byte is readable.
                    let Ok(buf) = r.fill_buf().await else { return };
                    if buf.is_empty() {
                        return;
                    }
                    if !first.swap(true, Ordering::Relaxed) {
                        let _ = events.send(ServerEvent::FirstByte(Instant::now()));
                    }
                    match r.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line.last() != Some(&b'\n') || w.write_all(&line).await.is_err() {
                        return;
                    }
                    let _ = events.send(ServerEvent::Answered);
                }
            });
        }
    });
    set
}

/// The client: one request in flight at all times, each response checked
/// to be its request. Counts answers; reports the first error and stops.
async fn one_outstanding_client(
    addr: String,
    answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let s = TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    let mut seq: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let req = format!("request {seq:010}\n");
        w.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        line.clear();
        let n = r
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("EOF after {seq} responses"));
        }
        if line != req {
            return Err(format!("got {line:?}, want {req:?}"));
        }
        seq += 1;
        answered.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

async fn resume_latency(args: &Args) -> anyhow::Result<()> {
    let first = listen("127.0.0.1:0".parse()?)?;
    let addr = first.local_addr()?;
    let proxy = Proxy::start(&format!(
        r#"
[[listener]]
name = "bench"
listen = "127.0.0.1:0"
backend = "lines"

[[backend]]
name = "lines"
servers = ["{addr}"]
ack = "response"
framing = "lines"
"#
    ))
    .await?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut server = serve_incarnation(first, tx);
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = tokio::spawn(one_outstanding_client(
        proxy.addrs[0].clone(),
        answered.clone(),
        stop.clone(),
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);

    // Warm up: the session is up and answering.
    wait_answers(&mut rx, 100).await?;

    let mut samples: Vec<Duration> = Vec::with_capacity(args.restarts);
    let mut downtimes = Vec::with_capacity(args.restarts);
    for i in 0..args.restarts {
        // Crash: listener and connections dropped, connections reset.
        server.abort_all();
        while server.join_next().await.is_some() {}
        drop(rx);
        let down = Duration::from_millis(rng.gen_range(50..=300));
        downtimes.push(down);
        tokio::time::sleep(down).await;

        let (tx, new_rx) = mpsc::unbounded_channel();
        rx = new_rx;
        let l = listen(addr)?;
        let listened = Instant::now();
        server = serve_incarnation(l, tx);
        let first_byte = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match rx.recv().await {
                    Some(ServerEvent::FirstByte(t)) => return Some(t),
                    Some(ServerEvent::Answered) => {}
                    None => return None,
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("restart {i}: no byte within 10 s"))?
        .ok_or_else(|| anyhow::anyhow!("restart {i}: server ended"))?;
        samples.push(first_byte.saturating_duration_since(listened));
        // The session works again before the next crash.
        wait_answers(&mut rx, 20).await?;
        if client.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let client_result = tokio::time::timeout(Duration::from_secs(5), client).await;
    server.abort_all();
    proxy.stop().await;
    match client_result {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => anyhow::bail!("client failed: {e}"),
        Ok(Err(e)) => anyhow::bail!("client panicked: {e}"),
        Err(_) => anyhow::bail!("client did not stop"),
    }

    let n = samples.len();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean_down = downtimes.iter().map(|d| ms(*d)).sum::<f64>() / downtimes.len().max(1) as f64;
    println!();
    println!("## resume latency: server listen() -> first replayed byte");
    println!(
        "default backoff (retry_initial 1ms, retry_max 200ms), ack = \"response\", lines; \
         in-process server crashed (RST) and down 50-300 ms (seed {}, mean {:.0} ms)",
        args.seed, mean_down
    );
    println!(
        "client requests answered: {} (each response checked)",
        answered.load(Ordering::Relaxed)
    );
    println!();
    println!("| resumes | p50 ms | p99 ms | max ms | min ms | mean ms |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {n} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(samples[n - 1]),
        ms(samples[0]),
        samples.iter().map(|d| ms(*d)).sum::<f64>() / n as f64,
    );
    if n != args.restarts {
        anyhow::bail!("measured {n} resumes, wanted {}", args.restarts);
    }
    Ok(())
}

async fn wait_answers(
    rx: &mut mpsc::UnboundedReceiver<ServerEvent>,
    n: usize,
) -> anyhow::Result<()> {
    let mut got = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while got < n {
            match rx.recv().await {
                Some(ServerEvent::Answered) => got += 1,
                Some(ServerEvent::FirstByte(_)) => {}
                None => return,
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("only {got} of {n} answers within 10 s"))?;
    Ok(())
}

// ------------------------------------------------------------ throughput

/// The example server as a child process.
async fn example_server(mode: &str) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(BIN)
        .args(["example-server", "--listen", "127.0.0.1:0", "--mode", mode])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().expect("piped stdout");
    let line = BufReader::new(out)
        .lines()
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("example server exited"))?;
    let addr = line
        .strip_prefix("listening ")
        .ok_or_else(|| anyhow::anyhow!("unexpected output {line:?}"))?
        .to_string();
    Ok((child, addr))
}

/// 64 KiB of 100-byte lines (99 bytes and a LF), ending on a line boundary.
fn line_chunk() -> Vec<u8> {
    let mut v = Vec::with_capacity(64 * 1024);
    let mut i = 0u64;
    while v.len() + 100 <= 64 * 1024 {
        let mut line = format!("line {i:08} ").into_bytes();
        line.resize(99, b'x');
        line.push(b'\n');
        v.extend_from_slice(&line);
        i += 1;
    }
    v
}

/// One connection: a writer sends `chunk` in a loop while a reader counts
/// the bytes echoed back; returns echoed MB/s over `secs` after a warm-up.
async fn measure(addr: &str, chunk: Arc<Vec<u8>>, secs: f64) -> anyhow::Result<f64> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.into_split();
    let echoed = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(async move {
        loop {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let counter = echoed.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b0 = echoed.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let b1 = echoed.load(Ordering::Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    let dead = reader.is_finished() || writer.is_finished();
    writer.abort();
    reader.abort();
    let _ = writer.await;
    let _ = reader.await;
    if dead {
        anyhow::bail!("connection through {addr} ended during the measurement");
    }
    Ok((b1 - b0) as f64 / 1e6 / dt)
}

async fn throughput(args: &Args) -> anyhow::Result<()> {
    let (_echo, echo_addr) = example_server("echo").await?;
    let (_lines, lines_addr) = example_server("lines").await?;
    // (label, ack, server mode, framing)
    let modes: [(&str, &str, &str, &str); 4] = [
        ("none", "none", "echo", ""),
        ("tcp", "tcp", "echo", ""),
        ("response", "response", "lines", "framing = \"lines\""),
        ("none, lines server", "none", "lines", ""),
    ];
    let mut toml = String::new();
    for (i, (_, ack, server, framing)) in modes.iter().enumerate() {
        let addr = if *server == "echo" {
            &echo_addr
        } else {
            &lines_addr
        };
        toml.push_str(&format!(
            "[[listener]]\nname = \"l{i}\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b{i}\"\n\n\
             [[backend]]\nname = \"b{i}\"\nservers = [\"{addr}\"]\nack = \"{ack}\"\n{framing}\n\n"
        ));
    }
    let proxy = Proxy::start(&toml).await?;
    let chunk = Arc::new(line_chunk());

    let mut results: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..args.rounds {
        for (i, (label, ..)) in modes.iter().enumerate() {
            let mbs = measure(&proxy.addrs[i], chunk.clone(), args.secs).await?;
            eprintln!("round {round} {label}: {mbs:.1} MB/s");
            results[i].push(mbs);
        }
    }
    proxy.stop().await;

    let medians: Vec<f64> = results.iter().map(|r| median(r)).collect();
    println!();
    println!("## throughput by ack mode: 1 connection, echoed bytes");
    println!(
        "client writes 64 KiB chunks of 100-byte lines and reads the echo concurrently; \
         {} interleaved rounds x {} s per mode; MB = 10^6 bytes",
        args.rounds, args.secs
    );
    println!();
    println!("| ack | server | median MB/s | min | max | vs none |");
    println!("|---|---|---:|---:|---:|---:|");
    for (i, (label, _, server, _)) in modes.iter().enumerate() {
        let r = &results[i];
        let min = r.iter().copied().fold(f64::INFINITY, f64::min);
        let max = r.iter().copied().fold(0.0, f64::max);
        let vs = if i == 2 {
            // response runs against the lines server: compare it with
            // none against the same server too.
            format!(
                "{:.2} ({:.2} vs none on lines server)",
                medians[i] / medians[0],
                medians[i] / medians[3]
            )
        } else {
            format!("{:.2}", medians[i] / medians[0])
        };
        println!(
            "| {label} | {server} | {:.1} | {min:.1} | {max:.1} | {vs} |",
            medians[i]
        );
    }
    Ok(())
}
