//! The load generator behind `bench/compare.sh`: holdfast side by side with
//! direct connections, HAProxy, nginx `stream` and socat, on loopback.
//!
//! `loadgen echo` is the backend for every target but one: a tokio echo
//! server (two worker threads, bytes written back as they arrive) in its own
//! process, so it can be pinned and its CPU is not counted as the proxy's.
//! `loadgen resume-echo KEYFILE` is the backend of the resume-protocol row:
//! the same echo on `holdfast::server` (HFRP/2, `AckPolicy::Auto`).
//! `loadgen relay LISTEN TARGET MS` forwards every connection to `TARGET`,
//! each chunk `MS` milliseconds late in either direction (a link with that
//! one-way delay, where loopback has none; this VM's kernel has no netem).
//! `loadgen send ADDR bulk MIB | rr N | conns N` is a fixed amount of load
//! for `bench/callgrind.sh`, which counts instructions rather than time
//! (`rr` also prints its round trips' p50/p99/p999).
//! `--holdfast-b PATH` adds the rows `holdfast-none-b`, `holdfast-tcp-b` and
//! `holdfast-response-b`:
//! another binary (or a wrapper script setting its environment), measured
//! interleaved with the first, for A/B comparisons on a noisy machine.
//! `loadgen compare` starts the echo server and every proxy as child
//! processes on ports chosen free at run time, runs the rounds interleaved
//! and every other one reversed (A B C, C B A, A B C …, so that no target
//! always runs first), prints a table and writes JSON. It owns no proxy
//! logic; it knows holdfast only as a binary and a config file.
//!
//! Figures per target: bulk echo throughput over 1 and 8 connections with
//! the proxy's CPU (utime + stime of its whole process tree from
//! `/proc/PID/stat`) per GiB, 64-byte round trips over one connection with
//! proxy, echo server and client all pinned to CPU 0, connect-send-close
//! cycles per second, 64-byte round trips on one connection while four
//! others carry bulk (`--beside N` of them per round; 0 skips it), and PSS
//! per idle session.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("echo") => echo_server(),
        Some("resume-echo") => {
            resume_echo_server(args.get(1).context("resume-echo needs a key file")?)
        }
        Some("compare") => compare(Opts::parse(&args[1..])?),
        Some("send") => fixed_load(&args[1..]),
        Some("relay") => delay_relay(&args[1..]),
        _ => {
            eprintln!(
                "usage: loadgen echo | loadgen resume-echo KEYFILE \
                 | loadgen compare [--quick] [--rounds N] [--secs S] \
                 [--rr N] [--beside N] [--idle N] [--holdfast PATH] [--holdfast-b PATH] [--json PATH] \
                 [--only a,b,…] \
                 | loadgen send ADDR bulk MIB | rr N | conns N | beside N \
                 | loadgen relay LISTEN TARGET MS"
            );
            std::process::exit(2)
        }
    }
}

// ------------------------------------------------------------------ echo

/// Where `echo` and `resume-echo` listen: `$LOADGEN_LISTEN`, or a free
/// loopback port (bench/callgrind.sh gives a backend it restarts a fixed
/// address).
fn listen_addr() -> String {
    std::env::var("LOADGEN_LISTEN").unwrap_or_else(|_| "127.0.0.1:0".into())
}

fn echo_server() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind(listen_addr()).await?;
        println!("listening {}", l.local_addr()?);
        loop {
            let (mut s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                // Allocated on first data: an idle connection holds no buffer.
                let mut buf = Vec::new();
                loop {
                    if s.readable().await.is_err() {
                        return;
                    }
                    if buf.is_empty() {
                        buf = vec![0u8; 64 * 1024];
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    })
}

/// `loadgen relay LISTEN TARGET MS`: each connection forwarded to `TARGET`
/// with every chunk delivered `MS` ms after it was read, in order, both ways.
fn delay_relay(args: &[String]) -> anyhow::Result<()> {
    let usage = "loadgen relay LISTEN TARGET MS";
    let listen = args.first().context(usage)?.clone();
    let target = args.get(1).context(usage)?.clone();
    let delay = Duration::from_millis(args.get(2).context(usage)?.parse()?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(&listen).await?;
        println!("listening {}", l.local_addr()?);
        loop {
            let (a, _) = l.accept().await?;
            let target = target.clone();
            tokio::spawn(async move {
                let Ok(b) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let _ = (a.set_nodelay(true), b.set_nodelay(true));
                let (ar, aw) = a.into_split();
                let (br, bw) = b.into_split();
                tokio::spawn(delayed_copy(ar, bw, delay));
                tokio::spawn(delayed_copy(br, aw, delay));
            });
        }
    })
}

/// Copies `r` to `w`, each chunk written `delay` after it was read; EOF is
/// passed on (as a shutdown) once the chunks before it are out.
async fn delayed_copy(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at + delay).await;
            if chunk.is_empty() || w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.unwrap_or(0);
        let _ = tx.send((tokio::time::Instant::now(), buf[..n].to_vec()));
        if n == 0 {
            break;
        }
    }
    let _ = writer.await;
}

/// The backend of the resume-protocol row: an echo service on
/// `holdfast::server` (`AckPolicy::Auto`: bytes count as consumed as the
/// service reads them), two worker threads, in its own process.
fn resume_echo_server(key_file: &str) -> anyhow::Result<()> {
    let key = std::fs::read(key_file).with_context(|| format!("reading {key_file}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        use holdfast::server::{AckPolicy, ResumeListener, ServerConfig};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut cfg = ServerConfig::new(key);
        cfg.ack = AckPolicy::Auto;
        let l = ResumeListener::bind(&listen_addr(), cfg).await?;
        println!("listening {}", l.local_addr());
        loop {
            let mut s = l.accept().await?;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
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
    })
}

/// A fixed amount of work against `addr`, for instruction counts under
/// valgrind (`callgrind` counts do not depend on time, so the load is a
/// count, not a duration):
///
/// - `bulk MIB`: one connection writes MIB MiB of 100-byte lines in 64 KiB
///   chunks while reading the echo, then closes;
/// - `rr N`: N 64-byte round trips on one connection;
/// - `conns N`: N connect, 64-byte round trip, close cycles;
/// - `beside N`: N 64-byte round trips on one connection while four others
///   carry bulk (prints their p50/p99 and the bulk's throughput).
fn fixed_load(args: &[String]) -> anyhow::Result<()> {
    let usage = "loadgen send ADDR bulk MIB | rr N | conns N | beside N";
    let addr: SocketAddr = args.first().context(usage)?.parse()?;
    let what = args.get(1).context(usage)?.as_str();
    let n: u64 = args.get(2).context(usage)?.parse()?;
    let t = Instant::now();
    match what {
        "bulk" => {
            let chunk = bulk_chunk();
            let total = n << 20;
            let s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            let mut w = s.try_clone()?;
            let writer = thread::spawn(move || -> std::io::Result<()> {
                let mut left = total;
                while left > 0 {
                    let k = left.min(chunk.len() as u64) as usize;
                    w.write_all(&chunk[..k])?;
                    left -= k as u64;
                }
                w.shutdown(Shutdown::Write)
            });
            let mut r = s;
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                match r.read(&mut buf)? {
                    0 => break,
                    k => got += k as u64,
                }
            }
            writer.join().expect("writer thread")?;
            if got != total {
                bail!("echoed {got} bytes of {total}");
            }
        }
        "rr" => {
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            let mut got = [0u8; 64];
            let mut lat = Vec::with_capacity(n as usize);
            for i in 0..n {
                let req = line64(i);
                let t = Instant::now();
                s.write_all(&req)?;
                s.read_exact(&mut got)?;
                lat.push(t.elapsed());
                if got != req {
                    bail!("wrong echo");
                }
            }
            lat.sort_unstable();
            let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            eprintln!(
                "rr latency: p50 {:.1} µs, p99 {:.1} µs, p999 {:.1} µs",
                q(0.50).as_secs_f64() * 1e6,
                q(0.99).as_secs_f64() * 1e6,
                q(0.999).as_secs_f64() * 1e6
            );
        }
        "conns" => {
            for _ in 0..n {
                round_trip_once(addr)?;
            }
        }
        "beside" => {
            let (mut v, gbit) = beside_bulk(addr, n as usize, &Arc::new(bulk_chunk()))?;
            v.sort_unstable();
            let ms = |p| pct(&v, p).unwrap_or(0.0) / 1e3;
            eprintln!(
                "beside {BESIDE_STREAMS} bulk streams ({gbit:.2} Gbit/s): p50 {:.2} ms, p99 {:.2} ms",
                ms(0.5),
                ms(0.99)
            );
        }
        _ => bail!("{usage}"),
    }
    eprintln!("{what} {n}: {:.3} s", t.elapsed().as_secs_f64());
    Ok(())
}

// ------------------------------------------------------------------ options

struct Opts {
    rounds: usize,
    secs: f64,
    rr: usize,
    beside: usize,
    idle: usize,
    holdfast: PathBuf,
    /// The binary of the `holdfast-*-b` rows (A/B runs, interleaved).
    holdfast_b: Option<PathBuf>,
    json: PathBuf,
    only: Option<Vec<String>>,
}

impl Opts {
    fn parse(args: &[String]) -> anyhow::Result<Opts> {
        let mut o = Opts {
            rounds: 3,
            secs: 1.0,
            rr: 10_000,
            beside: 300,
            idle: 9_000,
            holdfast: PathBuf::from("target/release/holdfast"),
            holdfast_b: None,
            json: PathBuf::from("target/compare.json"),
            only: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().context(format!("{a} needs a value"));
            match a.as_str() {
                "--quick" => o.rounds = 1,
                "--rounds" => o.rounds = val()?.parse()?,
                "--secs" => o.secs = val()?.parse()?,
                "--rr" => o.rr = val()?.parse()?,
                "--beside" => o.beside = val()?.parse()?,
                "--idle" => o.idle = val()?.parse()?,
                "--holdfast" => o.holdfast = val()?.into(),
                "--holdfast-b" => o.holdfast_b = Some(val()?.into()),
                "--json" => o.json = val()?.into(),
                "--only" => o.only = Some(val()?.split(',').map(String::from).collect()),
                _ => bail!("unknown option {a}"),
            }
        }
        Ok(o)
    }
}

// ------------------------------------------------------------------ targets

/// A proxy (or none) in front of the echo server.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    child: Option<Child>,
    /// Scratch directory: the config file and the child's log.
    dir: PathBuf,
    /// The echo server behind it (pinned with it for round trips).
    backend_pid: u32,
}

impl Target {
    fn root(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            // SIGTERM first: nginx and HAProxy stop their workers on it.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port free right now (bind 0, release). Racy, acceptable in a benchmark.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A backend process: `loadgen echo` or `loadgen resume-echo`.
struct Backend {
    addr: SocketAddr,
    child: Child,
}

impl Backend {
    fn start(args: &[&str]) -> anyhow::Result<Backend> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(&exe)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut first = String::new();
        {
            let out = child.stdout.as_mut().context("backend stdout")?;
            let mut b = [0u8; 1];
            while out.read(&mut b)? == 1 && b[0] != b'\n' {
                first.push(b[0] as char);
            }
        }
        let addr = first
            .strip_prefix("listening ")
            .with_context(|| format!("{args:?}: no listening line"))?
            .parse()?;
        Ok(Backend { addr, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_target(
    name: &'static str,
    echo: &Backend,
    resume: Option<&(Backend, PathBuf)>,
    opts: &Opts,
    tmp: &Path,
) -> anyhow::Result<Option<Target>> {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut backend_pid = echo.pid();
    let echo = echo.addr;
    if name == "direct" {
        return Ok(Some(Target {
            name,
            addr: echo,
            child: None,
            dir,
            backend_pid,
        }));
    }
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = std::fs::File::create(dir.join("log"))?;
    let mut cmd = match name {
        "holdfast-none"
        | "holdfast-tcp"
        | "holdfast-response"
        | "holdfast-none-b"
        | "holdfast-tcp-b"
        | "holdfast-response-b" => {
            let ack = name.trim_start_matches("holdfast-").trim_end_matches("-b");
            let binary = match &opts.holdfast_b {
                Some(b) if name.ends_with("-b") => b,
                _ => &opts.holdfast,
            };
            let framing = if ack == "response" {
                "framing = \"lines\"\n"
            } else {
                ""
            };
            let cfg = dir.join("holdfast.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[[listener]]\nname = \"bench\"\nlisten = \"{addr}\"\nbackend = \"echo\"\n\n\
                     [[backend]]\nname = \"echo\"\nservers = [\"{echo}\"]\nack = \"{ack}\"\n{framing}"
                ),
            )?;
            let mut c = Command::new(binary);
            c.arg("run").arg("--config").arg(&cfg);
            // Session open/close logs at info would cost CPU the peers
            // (which log nothing here) do not spend.
            c.env("RUST_LOG", "warn");
            c
        }
        "holdfast-resume" => {
            let Some((server, key)) = resume else {
                return Ok(None);
            };
            backend_pid = server.pid();
            let cfg = dir.join("holdfast.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[[listener]]\nname = \"bench\"\nlisten = \"{addr}\"\nbackend = \"echo\"\n\n\
                     [[backend]]\nname = \"echo\"\nservers = [\"{}\"]\nprotocol = \"resume\"\n\
                     resume = {{ secret_file = \"{}\" }}\n",
                    server.addr,
                    key.display()
                ),
            )?;
            let mut c = Command::new(&opts.holdfast);
            c.arg("run").arg("--config").arg(&cfg);
            c.env("RUST_LOG", "warn");
            c
        }
        "haproxy" => {
            if !have("haproxy") {
                return Ok(None);
            }
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 9900\n  nbthread 2\n\
                     defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
                     listen bench\n  bind {addr}\n  server echo {echo}\n"
                ),
            )?;
            let mut c = Command::new("haproxy");
            c.arg("-db").arg("-f").arg(&cfg);
            c
        }
        "nginx" => {
            let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
            if !have("nginx") || !module.exists() {
                return Ok(None);
            }
            let cfg = dir.join("nginx.conf");
            std::fs::write(
                &cfg,
                format!(
                    "load_module {};\ndaemon off;\nworker_processes 2;\nworker_rlimit_nofile 20000;\n\
                     pid {}/nginx.pid;\nerror_log {}/error.log warn;\n\
                     events {{ worker_connections 19000; }}\n\
                     stream {{ server {{ listen {addr}; proxy_pass {echo}; }} }}\n",
                    module.display(),
                    dir.display(),
                    dir.display()
                ),
            )?;
            let mut c = Command::new("nginx");
            c.arg("-p").arg(&dir).arg("-c").arg(&cfg);
            c
        }
        "socat" => {
            if !have("socat") {
                return Ok(None);
            }
            let mut c = Command::new("socat");
            c.arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096,nodelay"
            ))
            .arg(format!("TCP:{echo},nodelay"));
            c
        }
        _ => bail!("unknown target {name}"),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let t = Target {
        name,
        addr,
        child: Some(child),
        dir,
        backend_pid,
    };
    // Ready when a round trip works.
    let start = Instant::now();
    loop {
        if round_trip_once(addr).is_ok() {
            return Ok(Some(t));
        }
        if start.elapsed() > Duration::from_secs(10) {
            let log = std::fs::read_to_string(t.dir.join("log")).unwrap_or_default();
            bail!("{name} did not answer on {addr} within 10 s; log:\n{log}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn round_trip_once(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let req = line64(0);
    s.write_all(&req)?;
    let mut got = [0u8; 64];
    s.read_exact(&mut got)?;
    if got != req {
        bail!("wrong echo");
    }
    Ok(())
}

// ------------------------------------------------------------------ /proc

/// The pid and every descendant, from `/proc/*/stat` parent links.
fn tree(root: u32) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(f) = stat_fields(pid) {
                if let Some(pp) = f.get(1).and_then(|s| s.parse().ok()) {
                    parent.push((pid, pp));
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Fields of `/proc/PID/stat` after the command name: [0] is state,
/// [1] ppid, [11] utime, [12] stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(String::from).collect())
}

/// CPU seconds (user + system) of a process tree.
fn cpu_secs(root: Option<u32>) -> f64 {
    let Some(root) = root else { return 0.0 };
    let tck = clock_ticks();
    tree(root)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            let u: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let s: f64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            (u + s) / tck
        })
        .sum()
}

/// `CLK_TCK`, the unit of `/proc/PID/stat` times.
fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output();
        out.ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// PSS in KiB of a process tree, from `smaps_rollup`.
fn pss_kib(root: u32) -> f64 {
    tree(root)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .sum()
}

/// Pins every thread of every process in the tree to `cpus`.
fn pin_tree(root: u32, cpus: &[usize]) {
    let list = cpus
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for p in tree(root) {
        let _ = Command::new("taskset")
            .args(["-a", "-c", "-p", &list, &p.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Pins the calling thread.
fn pin_self(cpus: &[usize]) {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
    if let Some(tid) = tid {
        let list = cpus
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let _ = Command::new("taskset")
            .args(["-c", "-p", &list, &tid])
            .stdout(Stdio::null())
            .status();
    }
}

// ------------------------------------------------------------------ loads

/// 64 KiB of 100-byte lines, so `ack = "response"` sees whole frames.
fn bulk_chunk() -> Vec<u8> {
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

/// A 64-byte line (63 bytes and a LF).
fn line64(seq: u64) -> [u8; 64] {
    let mut b = [b'x'; 64];
    let head = format!("req {seq:012} ");
    b[..head.len()].copy_from_slice(head.as_bytes());
    b[63] = b'\n';
    b
}

struct Bulk {
    gbit: f64,
    cpu_per_gib: Option<f64>,
}

/// Bulk echo streams through a target: each connection has a thread
/// writing 64 KiB chunks and one reading the echo, until stopped.
struct BulkLoad {
    echoed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    socks: Vec<TcpStream>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl BulkLoad {
    fn start(addr: SocketAddr, conns: usize, chunk: &Arc<Vec<u8>>) -> anyhow::Result<BulkLoad> {
        let mut load = BulkLoad {
            echoed: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            socks: Vec::new(),
            threads: Vec::new(),
        };
        for _ in 0..conns {
            let s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            let mut w = s.try_clone()?;
            let mut r = s.try_clone()?;
            load.socks.push(s);
            let (chunk, stop) = (chunk.clone(), load.stop.clone());
            load.threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if w.write_all(&chunk).is_err() {
                        return;
                    }
                }
            }));
            let counter = load.echoed.clone();
            load.threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Ok(load)
    }

    fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }
}

impl Drop for BulkLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &self.socks {
            let _ = s.shutdown(Shutdown::Both);
        }
        for th in self.threads.drain(..) {
            let _ = th.join();
        }
    }
}

/// `conns` connections each writing 64 KiB chunks and reading the echo
/// concurrently; echoed bytes per second over `secs` after 300 ms.
/// CPU per GiB counts the bytes the proxy carried both ways (2 × echoed).
fn bulk(t: &Target, conns: usize, secs: f64, chunk: &Arc<Vec<u8>>) -> anyhow::Result<Bulk> {
    let load = BulkLoad::start(t.addr, conns, chunk)?;
    thread::sleep(Duration::from_millis(300));
    let (b0, c0, t0) = (load.echoed(), cpu_secs(t.root()), Instant::now());
    thread::sleep(Duration::from_secs_f64(secs));
    let (b1, c1, dt) = (
        load.echoed(),
        cpu_secs(t.root()),
        t0.elapsed().as_secs_f64(),
    );
    drop(load);
    let bytes = (b1 - b0) as f64;
    if bytes == 0.0 {
        bail!("{}: no bytes echoed", t.name);
    }
    Ok(Bulk {
        gbit: bytes * 8.0 / dt / 1e9,
        cpu_per_gib: t
            .root()
            .map(|_| (c1 - c0) / (2.0 * bytes / (1u64 << 30) as f64)),
    })
}

/// Streams of bulk beside the round trips of [`beside_bulk`].
const BESIDE_STREAMS: usize = 4;

/// `n` 64-byte round trips on one connection while [`BESIDE_STREAMS`]
/// other connections carry bulk through the same target, nothing pinned:
/// how long a light session waits behind heavy ones. Returns the round
/// trips' times in ns and the bulk's echo throughput (Gbit/s) meanwhile.
fn beside_bulk(
    addr: SocketAddr,
    n: usize,
    chunk: &Arc<Vec<u8>>,
) -> anyhow::Result<(Vec<u64>, f64)> {
    let load = BulkLoad::start(addr, BESIDE_STREAMS, chunk)?;
    thread::sleep(Duration::from_millis(300));
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut got = [0u8; 64];
    let mut v = Vec::with_capacity(n);
    let (b0, t0) = (load.echoed(), Instant::now());
    for i in 0..n as u64 {
        let req = line64(i);
        let st = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut got)?;
        v.push(st.elapsed().as_nanos() as u64);
        if got != req {
            bail!("wrong echo beside bulk");
        }
    }
    let gbit = (load.echoed() - b0) as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9;
    Ok((v, gbit))
}

/// One connection, one 64-byte request in flight, every echo checked;
/// the proxy, the echo server and this thread all on CPU 0. Returns the
/// round-trip times in ns and the proxy's CPU µs per round trip.
fn round_trips(t: &Target, n: usize) -> anyhow::Result<(Vec<u64>, Option<f64>)> {
    let echo_pid = t.backend_pid;
    if let Some(p) = t.root() {
        pin_tree(p, &[0]);
    }
    pin_tree(echo_pid, &[0]);
    let result = thread::scope(|sc| {
        sc.spawn(|| -> anyhow::Result<(Vec<u64>, Option<f64>)> {
            pin_self(&[0]);
            let mut s = TcpStream::connect(t.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut got = [0u8; 64];
            let mut one = |seq: u64, s: &mut TcpStream| -> anyhow::Result<()> {
                let req = line64(seq);
                s.write_all(&req)?;
                s.read_exact(&mut got)?;
                if got != req {
                    bail!("{}: wrong echo", t.name);
                }
                Ok(())
            };
            for i in 0..1000 {
                one(i, &mut s)?;
            }
            let c0 = cpu_secs(t.root());
            let mut v = Vec::with_capacity(n);
            for i in 0..n as u64 {
                let st = Instant::now();
                one(i, &mut s)?;
                v.push(st.elapsed().as_nanos() as u64);
            }
            let c1 = cpu_secs(t.root());
            Ok((v, t.root().map(|_| (c1 - c0) * 1e6 / n as f64)))
        })
        .join()
        .expect("round-trip thread panicked")
    });
    if let Some(p) = t.root() {
        pin_tree(p, &[0, 1]);
    }
    pin_tree(echo_pid, &[0, 1]);
    result
}

/// Connect, send one 64-byte line, read it back, close: 4 clients in a
/// loop for `secs`. Returns completed cycles per second.
fn conn_rate(t: &Target, secs: f64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let addr = t.addr;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if round_trip_once(addr).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let (d0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    thread::sleep(Duration::from_secs_f64(secs));
    let (d1, dt) = (done.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        let _ = th.join();
    }
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        eprintln!("  {}: {e} connect-send-close cycles failed", t.name);
    }
    Ok((d1 - d0) as f64 / dt)
}

/// PSS delta of the proxy's process tree per session with `n` idle
/// sessions (each has carried one 64-byte line both ways first).
fn idle_memory(t: &Target, n: usize) -> anyhow::Result<Option<f64>> {
    let Some(root) = t.root() else {
        return Ok(None);
    };
    let before = pss_kib(root);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(t.addr)
            .with_context(|| format!("{}: idle connection {i}", t.name))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let req = line64(i as u64);
        s.write_all(&req)?;
        let mut got = [0u8; 64];
        s.read_exact(&mut got)
            .with_context(|| format!("{}: idle connection {i} echo", t.name))?;
        conns.push(s);
    }
    thread::sleep(Duration::from_millis(1000));
    let after = pss_kib(root);
    drop(conns);
    thread::sleep(Duration::from_millis(1500));
    Ok(Some((after - before) / n as f64))
}

// ------------------------------------------------------------------ compare

/// Prints the round trips beside bulk, per target (p50 and p99 against
/// the best peer's), and returns them as JSON.
fn beside_table<'a>(
    names: &[&'a str],
    s: &mut BTreeMap<&'a str, Samples>,
    n: usize,
) -> Vec<serde_json::Value> {
    if n == 0 {
        return Vec::new();
    }
    let mut m: BTreeMap<&str, [Option<f64>; 3]> = BTreeMap::new();
    for name in names {
        let Some(e) = s.get_mut(name) else { continue };
        e.beside_ns.sort_unstable();
        let ms = |p| pct(&e.beside_ns, p).map(|us| us / 1e3);
        m.insert(name, [ms(0.5), ms(0.99), median(&e.beside_gbit)]);
    }
    let best = |i: usize| {
        PEERS
            .iter()
            .filter_map(|p| m.get(p).and_then(|v| v[i]))
            .reduce(f64::min)
    };
    let ratio =
        |v: Option<f64>, b: Option<f64>| v.zip(b).filter(|(_, b)| *b > 0.0).map(|(v, b)| v / b);
    println!();
    println!(
        "{n} 64-byte round trips per round on one connection while {BESIDE_STREAMS} other \
         connections carry bulk through the same target (nothing pinned; latency pooled)"
    );
    println!();
    println!("| target | p50 ms | p99 ms | bulk meanwhile Gbit/s | p50 vs best peer | p99 vs best peer |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut out = Vec::new();
    for name in names {
        let Some(v) = m.get(name) else { continue };
        let r = [ratio(v[0], best(0)), ratio(v[1], best(1))];
        table_row(name, &[v[0], v[1], v[2], r[0], r[1]]);
        out.push(
            json!({"target": name, "p50_ms": v[0], "p99_ms": v[1], "bulk_gbit": v[2],
            "p50_vs_best_peer": r[0], "p99_vs_best_peer": r[1]}),
        );
    }
    out
}

#[derive(Default)]
struct Samples {
    bulk1: Vec<f64>,
    bulk8: Vec<f64>,
    cpu1: Vec<f64>,
    cpu8: Vec<f64>,
    rtt_ns: Vec<u64>,
    rr_cpu_us: Vec<f64>,
    cps: Vec<f64>,
    beside_ns: Vec<u64>,
    beside_gbit: Vec<f64>,
    idle_kib: Option<f64>,
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn pct(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e3)
}

/// One Markdown table row: the name, then each value to 2 decimals.
fn table_row(name: &str, vals: &[Option<f64>]) {
    let cells: Vec<String> = vals.iter().map(|v| fmt(*v, 2)).collect();
    println!("| {name} | {} |", cells.join(" | "));
}

fn fmt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "–".into())
}

const ALL: [&str; 11] = [
    "direct",
    "holdfast-none",
    "holdfast-none-b",
    "holdfast-tcp",
    "holdfast-response",
    "holdfast-resume",
    "holdfast-tcp-b",
    "holdfast-response-b",
    "haproxy",
    "nginx",
    "socat",
];
const PEERS: [&str; 3] = ["haproxy", "nginx", "socat"];

fn compare(opts: Opts) -> anyhow::Result<()> {
    let echo = Backend::start(&["echo"])?;
    let tmp = std::env::temp_dir().join(format!("holdfast-compare-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;

    let names: Vec<&'static str> = ALL
        .iter()
        .copied()
        .filter(|n| {
            opts.only
                .as_ref()
                .map_or(!n.ends_with("-b") || opts.holdfast_b.is_some(), |o| {
                    o.iter().any(|x| x == n)
                })
        })
        .collect();
    // The resume row's backend: an echo service on holdfast's server
    // library, with a fresh random key.
    let resume = if names.contains(&"holdfast-resume") {
        let key = tmp.join("resume.key");
        let mut k = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
        std::fs::write(&key, k)?;
        let key_arg = key.to_string_lossy().into_owned();
        Some((Backend::start(&["resume-echo", &key_arg])?, key))
    } else {
        None
    };
    let mut targets = Vec::new();
    for n in &names {
        match start_target(n, &echo, resume.as_ref(), &opts, &tmp)? {
            Some(t) => targets.push(t),
            None => eprintln!("skipped {n}: not installed"),
        }
    }
    let chunk = Arc::new(bulk_chunk());
    let mut s: BTreeMap<&str, Samples> = BTreeMap::new();
    for round in 0..opts.rounds {
        // Every other round runs the targets in reverse: a target's place in
        // the round moves its figures (the second of two holdfast rows made
        // more connections per second whichever binary it was), so each
        // target takes each place equally often.
        let order: Vec<&Target> = if round % 2 == 1 {
            targets.iter().rev().collect()
        } else {
            targets.iter().collect()
        };
        for t in order {
            let e = s.entry(t.name).or_default();
            let b1 = bulk(t, 1, opts.secs, &chunk)?;
            let b8 = bulk(t, 8, opts.secs, &chunk)?;
            let (mut rtt, rcpu) = round_trips(t, opts.rr)?;
            let cps = conn_rate(t, opts.secs)?;
            if opts.beside > 0 {
                let (v, gbit) = beside_bulk(t.addr, opts.beside, &chunk)?;
                e.beside_ns.extend(v);
                e.beside_gbit.push(gbit);
            }
            rtt.sort_unstable();
            eprintln!(
                "round {round} {:<18} bulk1 {:6.2} Gbit/s  bulk8 {:6.2} Gbit/s  rr p50 {:6.1} µs  {:7.0} conn/s",
                t.name,
                b1.gbit,
                b8.gbit,
                pct(&rtt, 0.5).unwrap_or(0.0),
                cps
            );
            e.bulk1.push(b1.gbit);
            e.bulk8.push(b8.gbit);
            e.cpu1.extend(b1.cpu_per_gib);
            e.cpu8.extend(b8.cpu_per_gib);
            e.rtt_ns.extend(rtt);
            e.rr_cpu_us.extend(rcpu);
            e.cps.push(cps);
        }
    }
    for t in &targets {
        let kib = idle_memory(t, opts.idle)?;
        eprintln!(
            "{:<18} idle: {} KiB PSS per session ({} sessions)",
            t.name,
            fmt(kib, 2),
            opts.idle
        );
        s.entry(t.name).or_default().idle_kib = kib;
    }
    drop(targets);
    drop(resume);
    drop(echo);
    let _ = std::fs::remove_dir_all(&tmp);

    // Table.
    let mut rows = Vec::new();
    println!();
    println!(
        "rounds {}, {} s per bulk/conn-rate run, {} round trips per round, {} idle sessions; \
         backend: loadgen echo (in its own process); median of rounds, latency pooled",
        opts.rounds, opts.secs, opts.rr, opts.idle
    );
    println!();
    println!("| target | bulk 1 conn Gbit/s | bulk 8 conns Gbit/s | CPU s/GiB (1 conn) | CPU s/GiB (8) | p50 µs | p99 µs | p999 µs | CPU µs per round trip | conn/s | PSS KiB per idle session |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut med: BTreeMap<&str, [Option<f64>; 10]> = BTreeMap::new();
    for n in &names {
        let Some(e) = s.get_mut(n) else { continue };
        e.rtt_ns.sort_unstable();
        let m = [
            median(&e.bulk1),
            median(&e.bulk8),
            median(&e.cpu1),
            median(&e.cpu8),
            pct(&e.rtt_ns, 0.5),
            pct(&e.rtt_ns, 0.99),
            pct(&e.rtt_ns, 0.999),
            median(&e.rr_cpu_us),
            median(&e.cps),
            e.idle_kib,
        ];
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(m[0], 2),
            fmt(m[1], 2),
            fmt(m[2], 2),
            fmt(m[3], 2),
            fmt(m[4], 1),
            fmt(m[5], 1),
            fmt(m[6], 1),
            fmt(m[7], 1),
            fmt(m[8], 0),
            fmt(m[9], 2),
        );
        rows.push(json!({
            "target": n,
            "bulk1_gbit": {"median": m[0], "rounds": e.bulk1},
            "bulk8_gbit": {"median": m[1], "rounds": e.bulk8},
            "cpu_s_per_gib_1": {"median": m[2], "rounds": e.cpu1},
            "cpu_s_per_gib_8": {"median": m[3], "rounds": e.cpu8},
            "rtt_us": {"p50": m[4], "p99": m[5], "p999": m[6], "samples": e.rtt_ns.len()},
            "rr_cpu_us": {"median": m[7], "rounds": e.rr_cpu_us},
            "conn_per_s": {"median": m[8], "rounds": e.cps},
            "idle_pss_kib_per_session": m[9],
        }));
        med.insert(n, m);
    }

    // Goals: ratios against the best peer of this run.
    let best = |i: usize, higher: bool| -> Option<f64> {
        PEERS
            .iter()
            .filter_map(|p| med.get(p).and_then(|m| m[i]))
            .reduce(|a, b| if (a > b) == higher { a } else { b })
    };
    let ratio = |v: Option<f64>, b: Option<f64>| match (v, b) {
        (Some(v), Some(b)) if b > 0.0 => Some(v / b),
        _ => None,
    };
    let haproxy_idle = med.get("haproxy").and_then(|m| m[9]);
    println!();
    println!("ratios against the best peer of this run (throughput and conn/s: higher is better, goal ≥ 1.2 for none/tcp bulk, ≥ 1.0 otherwise; CPU and latency: lower is better, goal ≤ 0.8 for CPU/GiB, ≤ 1.0 for latency; idle memory vs HAProxy, goal ≤ 1.0)");
    println!();
    println!("| holdfast | bulk 1 | bulk 8 | CPU/GiB 1 | CPU/GiB 8 | p50 | p99 | conn/s | idle PSS vs HAProxy |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for n in [
        "holdfast-none",
        "holdfast-none-b",
        "holdfast-tcp",
        "holdfast-tcp-b",
        "holdfast-response",
        "holdfast-response-b",
        "holdfast-resume",
    ] {
        let Some(m) = med.get(n) else { continue };
        let r = [
            ratio(m[0], best(0, true)),
            ratio(m[1], best(1, true)),
            ratio(m[2], best(2, false)),
            ratio(m[3], best(3, false)),
            ratio(m[4], best(4, false)),
            ratio(m[5], best(5, false)),
            ratio(m[8], best(8, true)),
            ratio(m[9], haproxy_idle),
        ];
        table_row(n, &r);
        ratios.push(
            json!({"target": n, "bulk1": r[0], "bulk8": r[1], "cpu1": r[2], "cpu8": r[3],
            "p50": r[4], "p99": r[5], "conn_per_s": r[6], "idle_vs_haproxy": r[7]}),
        );
    }
    let beside = beside_table(&names, &mut s, opts.beside);
    let doc = json!({
        "rounds": opts.rounds, "secs": opts.secs, "rr": opts.rr, "idle": opts.idle,
        "nproc": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "results": rows, "ratios_vs_best_peer": ratios, "beside_bulk": beside,
    });
    if let Some(d) = opts.json.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&doc)?)?;
    println!();
    println!("wrote {}", opts.json.display());
    Ok(())
}
