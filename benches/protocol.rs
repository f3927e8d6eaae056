//! `cargo bench --bench protocol`: what the resume protocol costs against a
//! plain proxy, on the same run.
//!
//! One in-process holdfast with three listeners, each with its own backend:
//!
//! - **plain**: `ack = "none"` to a plain in-process tokio echo server.
//! - **resume**: `protocol = "resume"` (its ack is the server's cumulative
//!   ACK) to an in-process echo service on `holdfast::server`
//!   ([`AckPolicy::Auto`]: bytes count as consumed as the service reads
//!   them).
//! - **resume-tls**: the same over mutual TLS (the backend with `tls = {
//!   ca, server_name, cert, key }`, the service's `ResumeListener` with a
//!   [`TlsConfig`] that requires a client certificate; TLS 1.3, ring,
//!   certificates made by rcgen at start), as an edge↔core link would be.
//!
//! The echo services run the same loop (read up to 64 KiB, write it back),
//! so the difference is the protocol (frames, ACKs, and the server
//! library's buffers) and then TLS. Two measurements, rounds interleaved
//! (plain, resume, resume-tls, plain, ...) to cancel drift:
//!
//! - **bulk**: one connection; the client writes 64 KiB chunks and reads
//!   the echo concurrently; echoed MB/s after a 200 ms warm-up, and the
//!   process's CPU time (`getrusage(RUSAGE_SELF)`, user + sys) per GiB
//!   echoed. Client, holdfast and echo server share this process, so that
//!   CPU time is all three together.
//! - **rr**: one connection, one 64-byte request in flight, each response
//!   checked to be its request; round-trip p50/p99/p999 in µs.
//!
//! It measures; it asserts nothing about speed. holdfast runs in-process
//! through `config::parse`, `proxy::bind` and `proxy::run`.
//!
//! Arguments (after `--`): `--rounds N` (5), `--secs S` (2, bulk seconds
//! per round), `--rr N` (20000 round trips per round), `--only bulk|rr`,
//! `--buffer-limit SIZE` (unset: holdfast's default, 1 MiB; set, it is
//! the `buffer_limit` of both backends, for diagnosis).

mod common;

use common::*;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::server::{AckPolicy, ResumeListener, ServerConfig, TlsConfig};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

struct Args {
    rounds: usize,
    secs: f64,
    rr: usize,
    only: Option<String>,
    buffer_limit: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 5,
        secs: 2.0,
        rr: 20_000,
        only: None,
        buffer_limit: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            // cargo bench passes `--bench` to harness = false targets.
            "--bench" => {}
            "--rounds" => a.rounds = val("--rounds").parse().expect("--rounds N"),
            "--secs" => a.secs = val("--secs").parse().expect("--secs S"),
            "--rr" => a.rr = val("--rr").parse().expect("--rr N"),
            "--only" => a.only = Some(val("--only")),
            "--buffer-limit" => a.buffer_limit = Some(val("--buffer-limit")),
            other => panic!("unknown argument {other:?} (see the top of benches/protocol.rs)"),
        }
    }
    assert!(a.rounds > 0 && a.rr > 0, "--rounds and --rr must be > 0");
    a
}

const SETUPS: [&str; 3] = ["plain", "resume", "resume-tls"];
/// The setup each one is compared with in the "vs resume" column.
const RESUME: usize = 1;

fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    print_machine();
    rt.block_on(async {
        let dir =
            std::env::temp_dir().join(format!("holdfast-bench-protocol-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let result = run(&args, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    })
}

async fn run(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let key = write_key(dir)?;
    let pki = write_pki(dir)?;
    let plain = plain_echo_server().await?;
    let resume = resume_echo_server(std::fs::read(&key)?, None).await?;
    let server_tls = TlsConfig::from_pem_files(&pki.server.0, &pki.server.1, Some(&pki.ca))?;
    let resume_tls = resume_echo_server(std::fs::read(&key)?, Some(server_tls)).await?;
    let limit = match &args.buffer_limit {
        Some(l) => {
            println!("both backends: buffer_limit = {l:?}");
            format!("buffer_limit = {l:?}")
        }
        None => String::new(),
    };
    let proxy = Proxy::start(&format!(
        r#"
[[listener]]
name = "plain"
listen = "127.0.0.1:0"
backend = "plain"

[[backend]]
name = "plain"
servers = ["{plain}"]
ack = "none"
{limit}

[[listener]]
name = "resume"
listen = "127.0.0.1:0"
backend = "resume"

[[backend]]
name = "resume"
servers = ["{resume}"]
protocol = "resume"
resume = {{ secret_file = "{key}" }}
{limit}

[[listener]]
name = "resume-tls"
listen = "127.0.0.1:0"
backend = "resume-tls"

[[backend]]
name = "resume-tls"
servers = ["{resume_tls}"]
protocol = "resume"
resume = {{ secret_file = "{key}" }}
tls = {{ ca = "{ca}", server_name = "core.internal", cert = "{cert}", key = "{ckey}" }}
{limit}
"#,
        plain = plain.addr,
        resume = resume.addr,
        resume_tls = resume_tls.addr,
        key = key.display(),
        ca = pki.ca.display(),
        cert = pki.client.0.display(),
        ckey = pki.client.1.display(),
    ))
    .await?;

    let result = async {
        if args.only.as_deref() != Some("rr") {
            bulk(args, &proxy.addrs).await?;
        }
        if args.only.as_deref() != Some("bulk") {
            request_response(args, &proxy.addrs).await?;
        }
        anyhow::Ok(())
    }
    .await;
    proxy.stop().await;
    plain.task.abort();
    resume.task.abort();
    resume_tls.task.abort();
    result
}

/// PEM files of a CA, a server certificate (for `core.internal`) and a
/// client certificate it signed.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn write_pki(dir: &std::path::Path) -> anyhow::Result<Pki> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key)?;
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem())?;
    let leaf = |name: &str| -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec![format!("{name}.internal")])?
            .signed_by(&key, &ca, &ca_key)?;
        let paths = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&paths.0, cert.pem())?;
        std::fs::write(&paths.1, key.serialize_pem())?;
        Ok(paths)
    };
    Ok(Pki {
        ca: ca_path,
        server: leaf("core")?,
        client: leaf("edge")?,
    })
}

/// 32 random bytes in `dir/resume.key`.
fn write_key(dir: &std::path::Path) -> io::Result<PathBuf> {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let path = dir.join("resume.key");
    std::fs::write(&path, key)?;
    Ok(path)
}

// --------------------------------------------------------------- servers

/// An in-process echo server and its accept task.
struct Server {
    addr: String,
    task: JoinHandle<()>,
}

/// The echo loop both servers run: read up to 64 KiB, write it back.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

async fn plain_echo_server() -> io::Result<Server> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(echo(s));
        }
    });
    Ok(Server { addr, task })
}

async fn resume_echo_server(key: Vec<u8>, tls: Option<TlsConfig>) -> io::Result<Server> {
    let mut cfg = ServerConfig::new(key);
    cfg.ack = AckPolicy::Auto;
    cfg.tls = tls;
    let l = ResumeListener::bind("127.0.0.1:0", cfg).await?;
    let addr = l.local_addr().to_string();
    let task = tokio::spawn(async move {
        while let Ok(session) = l.accept().await {
            tokio::spawn(echo(session));
        }
    });
    Ok(Server { addr, task })
}

// ------------------------------------------------------------------ bulk

/// User + system CPU time of this whole process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the rusage struct it is given, which is
    // a plain C struct for which all-zero bytes are a valid value.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct BulkSample {
    mbs: f64,
    /// Process CPU seconds per GiB echoed.
    cpu_per_gib: f64,
}

/// One connection: a writer sends 64 KiB chunks in a loop while a reader
/// counts the bytes echoed back, over `secs` after a 200 ms warm-up.
async fn measure_bulk(addr: &str, secs: f64) -> anyhow::Result<BulkSample> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.into_split();
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
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
    let c0 = cpu_time();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let b1 = echoed.load(Ordering::Relaxed);
    let c1 = cpu_time();
    let dt = t0.elapsed().as_secs_f64();
    let dead = reader.is_finished() || writer.is_finished();
    writer.abort();
    reader.abort();
    let _ = writer.await;
    let _ = reader.await;
    if dead {
        anyhow::bail!("connection through {addr} ended during the measurement");
    }
    let bytes = (b1 - b0) as f64;
    if bytes == 0.0 {
        anyhow::bail!("nothing echoed through {addr}");
    }
    Ok(BulkSample {
        mbs: bytes / 1e6 / dt,
        cpu_per_gib: (c1 - c0).as_secs_f64() / (bytes / (1u64 << 30) as f64),
    })
}

async fn bulk(args: &Args, addrs: &[String]) -> anyhow::Result<()> {
    let mut mbs: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    for round in 0..args.rounds {
        for (i, label) in SETUPS.iter().enumerate() {
            let s = measure_bulk(&addrs[i], args.secs).await?;
            eprintln!(
                "bulk round {round} {label}: {:.1} MB/s, {:.2} CPU s/GiB",
                s.mbs, s.cpu_per_gib
            );
            mbs[i].push(s.mbs);
            cpu[i].push(s.cpu_per_gib);
        }
    }
    let med: Vec<f64> = mbs.iter().map(|v| median(v)).collect();
    let cpu_med: Vec<f64> = cpu.iter().map(|v| median(v)).collect();
    println!();
    println!("## bulk echo throughput: 1 connection");
    println!(
        "client writes 64 KiB chunks and reads the echo concurrently; {} interleaved rounds x {} s \
         per setup after 200 ms warm-up; MB = 10^6 bytes; CPU = getrusage(RUSAGE_SELF) user+sys of \
         the whole process (client, holdfast and echo server) per GiB echoed",
        args.rounds, args.secs
    );
    println!();
    println!(
        "| setup | median MB/s | min | max | vs plain | vs resume | median CPU s/GiB | min | max |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, label) in SETUPS.iter().enumerate() {
        println!(
            "| {label} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            med[i],
            min(&mbs[i]),
            max(&mbs[i]),
            med[i] / med[0],
            med[i] / med[RESUME],
            cpu_med[i],
            min(&cpu[i]),
            max(&cpu[i]),
        );
    }
    Ok(())
}

// -------------------------------------------------------------------- rr

/// One connection, one 64-byte request in flight, `n` round trips after
/// 1000 unmeasured ones; every response is checked against its request.
async fn measure_rr(addr: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut req = [0u8; 64];
    let mut resp = [0u8; 64];
    let mut samples = Vec::with_capacity(n);
    for seq in 0..(1000 + n) as u64 {
        req[..8].copy_from_slice(&seq.to_be_bytes());
        let t = Instant::now();
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        let dt = t.elapsed();
        if resp != req {
            anyhow::bail!("round trip {seq} through {addr}: response is not the request");
        }
        if seq >= 1000 {
            samples.push(dt);
        }
    }
    Ok(samples)
}

async fn request_response(args: &Args, addrs: &[String]) -> anyhow::Result<()> {
    let mut all: [Vec<Duration>; 3] = Default::default();
    let mut p50s: [Vec<f64>; 3] = Default::default();
    for round in 0..args.rounds {
        for (i, label) in SETUPS.iter().enumerate() {
            let mut s = measure_rr(&addrs[i], args.rr).await?;
            s.sort();
            let p = |q| us(percentile(&s, q));
            eprintln!(
                "rr round {round} {label}: p50 {:.1} us, p99 {:.1} us, p999 {:.1} us",
                p(0.50),
                p(0.99),
                p(0.999)
            );
            p50s[i].push(p(0.50));
            all[i].extend(s);
        }
    }
    for v in &mut all {
        v.sort();
    }
    let pct = |i: usize, q: f64| us(percentile(&all[i], q));
    println!();
    println!("## request/response: 64 bytes, 1 connection, one in flight");
    println!(
        "{} interleaved rounds x {} round trips per setup (after 1000 warm-up ones), each response \
         checked; percentiles over all rounds pooled, in microseconds",
        args.rounds, args.rr
    );
    println!();
    println!("| setup | p50 µs | p99 µs | p999 µs | mean µs | per-round p50 min–max | p50 vs plain | p99 vs plain | p50 vs resume |");
    println!("|---|---:|---:|---:|---:|---|---:|---:|---:|");
    for (i, label) in SETUPS.iter().enumerate() {
        let mean = all[i].iter().map(|d| us(*d)).sum::<f64>() / all[i].len() as f64;
        println!(
            "| {label} | {:.1} | {:.1} | {:.1} | {mean:.1} | {:.1}–{:.1} | {:.2} | {:.2} | {:.2} |",
            pct(i, 0.50),
            pct(i, 0.99),
            pct(i, 0.999),
            min(&p50s[i]),
            max(&p50s[i]),
            pct(i, 0.50) / pct(0, 0.50),
            pct(i, 0.99) / pct(0, 0.99),
            pct(i, 0.50) / pct(RESUME, 0.50),
        );
    }
    Ok(())
}

// ----------------------------------------------------------------- stats

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}
