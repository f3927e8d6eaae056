//! `cargo bench --bench tls`: what a TLS listener costs against a plain one,
//! in the same run, rounds interleaved to cancel drift.
//!
//! - **handshakes per second**: clients connect, shake hands (TLS 1.3,
//!   ECDSA P-256 certificate from rcgen, ring provider), send one line and
//!   read its answer, and close; `--conns` at a time for `--secs`. The plain
//!   listener does the same without TLS (connections per second).
//! - **bulk throughput**: one client streams `--mib` MiB through holdfast
//!   (`ack = "none"`) to the example echo server and reads it all back.
//!
//! Both listeners are in one in-process holdfast and share one backend (the
//! example server as a child process). It measures; it asserts nothing.
//!
//! Arguments (after `--`): `--rounds N` (5), `--secs S` (2), `--conns N`
//! (16), `--mib N` (256).

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::config;
use holdfast::lifecycle::{Phase, Shutdown};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

struct Args {
    rounds: usize,
    secs: f64,
    conns: usize,
    mib: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 5,
        secs: 2.0,
        conns: 16,
        mib: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            "--bench" => {}
            "--rounds" => a.rounds = val("--rounds").parse().expect("--rounds N"),
            "--secs" => a.secs = val("--secs").parse().expect("--secs S"),
            "--conns" => a.conns = val("--conns").parse().expect("--conns N"),
            "--mib" => a.mib = val("--mib").parse().expect("--mib N"),
            other => panic!("unknown argument {other:?} (see the top of benches/tls.rs)"),
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
    rt.block_on(run(args))
}

/// Where a client connects: plain TCP or TLS.
#[derive(Clone)]
enum Target {
    Plain(String),
    Tls(String, Arc<rustls::ClientConfig>),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Target {
    async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        match self {
            Target::Plain(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Target::Tls(addr, config) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let name = ServerName::try_from("localhost").expect("name");
                let c = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, s)
                    .await?;
                Ok(Box::new(c))
            }
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("holdfast-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["localhost".to_string()])?.self_signed(&key)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.der().to_vec()))?;
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );

    let mut server = tokio::process::Command::new(BIN)
        .args([
            "example-server",
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "echo",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let line = BufReader::new(server.stdout.take().expect("stdout"))
        .lines()
        .next_line()
        .await?
        .expect("listening line");
    let server_addr = line
        .strip_prefix("listening ")
        .expect("address")
        .to_string();

    let toml = format!(
        r#"
[[listener]]
name = "plain"
listen = "127.0.0.1:0"
backend = "b"

[[listener]]
name = "tls"
listen = "127.0.0.1:0"
backend = "b"
tls = {{ cert = "{}", key = "{}" }}

[[backend]]
name = "b"
servers = ["{server_addr}"]
ack = "none"
"#,
        cert_path.display(),
        key_path.display()
    );
    let cfg = config::parse(&toml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bound = holdfast::proxy::bind(&cfg).await?;
    let addrs: Vec<String> = bound
        .local_endpoints()
        .iter()
        .map(|e| e.to_string())
        .collect();
    let shutdown = Shutdown::new();
    let (tx, mut phase) = watch::channel(Phase::Starting);
    tokio::spawn(holdfast::proxy::run(cfg, bound, shutdown.clone(), tx));
    phase.wait_for(|p| *p == Phase::Running).await?;
    let targets = [
        ("plain", Target::Plain(addrs[0].clone())),
        ("tls", Target::Tls(addrs[1].clone(), client)),
    ];

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut bulk: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for round in 0..args.rounds {
        for (i, (name, t)) in targets.iter().enumerate() {
            let r = connect_rate(t, args.conns, args.secs).await;
            eprintln!("round {round} {name}: {r:.0} connections/s");
            rates[i].push(r);
        }
        for (i, (name, t)) in targets.iter().enumerate() {
            let mbs = throughput(t, args.mib).await?;
            eprintln!("round {round} {name}: {mbs:.0} MiB/s");
            bulk[i].push(mbs);
        }
    }
    println!();
    println!(
        "| listener | connections/s (handshake + 1 line + close), median (min–max) | bulk echo MiB/s, median (min–max) |"
    );
    println!("|---|---|---|");
    for (i, (name, _)) in targets.iter().enumerate() {
        println!(
            "| {name} | {} | {} |",
            summary(&mut rates[i], 0),
            summary(&mut bulk[i], 0)
        );
    }
    shutdown.stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn summary(v: &mut [f64], digits: usize) -> String {
    v.sort_by(f64::total_cmp);
    let med = v[v.len() / 2];
    format!(
        "{med:.digits$} ({:.digits$}–{:.digits$})",
        v[0],
        v[v.len() - 1]
    )
}

/// New connections per second: each connects (and shakes hands), sends a
/// line, reads it back, and closes.
async fn connect_rate(t: &Target, conns: usize, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (t, done, stop) = (t.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 6];
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = t.connect().await else {
                    continue;
                };
                if s.write_all(b"hello\n").await.is_err() || s.read_exact(&mut buf).await.is_err() {
                    continue;
                }
                let _ = s.shutdown().await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// MiB/s of one client's echo stream of `mib` MiB.
async fn throughput(t: &Target, mib: usize) -> anyhow::Result<f64> {
    let s = t.connect().await?;
    let (mut r, mut w) = tokio::io::split(s);
    let total = mib << 20;
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            w.write_all(&chunk).await?;
            sent += chunk.len();
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < total {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    writer.await??;
    anyhow::ensure!(got == total, "echoed {got} of {total} bytes");
    Ok(got as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}
