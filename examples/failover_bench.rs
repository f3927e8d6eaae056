//! Measurements of host failover (docs/failover.md) with real `holdfast run`
//! processes in network namespaces: the CPU cost of replication per GiB,
//! the longest stall a live stream sees while it is checkpointed
//! continuously (holdfast's replication, and `criu dump --tcp-established
//! --leave-running` for comparison), and the takeover time.
//!
//! It owns no proxy logic: it builds the hosts of `tests/netlab` (client
//! 10.77.0.10, active 10.77.0.1 with the service address 10.77.0.100,
//! standby 10.77.0.2, server 10.77.0.20, replication link 10.77.1.0/24),
//! starts the release `holdfast` binary as active, standby or plain proxy,
//! and drives clients and servers from threads that live in those hosts.
//! Nothing touches the machine's own interfaces. Needs root (namespaces,
//! TCP_REPAIR); without it, it prints SKIP and exits 0.
//!
//! ```text
//! cargo build --release --bin holdfast --example failover_bench
//! sudo target/release/examples/failover_bench cpu [--mib 1024] [--rounds 3] [--dead-ms 1000]
//! sudo target/release/examples/failover_bench stall [--secs 20] [--every-ms 10] [--rounds 1]
//!     [--only direct,holdfast,active,criu]
//! sudo target/release/examples/failover_bench takeover [--conns 1,100,1000] [--dead-ms 50]
//! ```
//!
//! `stall` runs the CRIU row with `criu` from PATH, or the binary named by
//! `CRIU=`; when neither exists it says so and skips that row. On a shared
//! machine, run it under `chrt -f 10` (every process it starts inherits the
//! priority) to keep other work's scheduling noise out of the gaps. The
//! holdfast binary is the one beside this example
//! (`target/release/holdfast`), or `HOLDFAST=`.
//!
//! A standby that takes over while the active is alive (its link silent for
//! `dead_peer_timeout`, under load) is reported as a false takeover, with
//! the logs copied to the directory `KEEP_LOGS=` names, if set. The figures
//! and what they mean are in docs/benchmarks.md ("Host failover").

#[path = "../tests/netlab/mod.rs"]
mod netlab;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netlab::Lab;

const SERVICE: &str = "10.77.0.100:7000";
const SERVER: &str = "10.77.0.20:7001";
const KEY: &[u8] = b"failover-bench-key-0123456789abcdef-0123456789";
const GIB: f64 = (1u64 << 30) as f64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    match args.first().map(String::as_str) {
        Some("cpu") => cpu(
            opt("--mib", "1024").parse().expect("--mib"),
            opt("--rounds", "3").parse().expect("--rounds"),
            opt("--dead-ms", "1000").parse().expect("--dead-ms"),
        ),
        Some("stall") => stall(
            opt("--secs", "20").parse().expect("--secs"),
            opt("--every-ms", "10").parse().expect("--every-ms"),
            &opt("--only", ""),
            opt("--rounds", "1").parse().expect("--rounds"),
        ),
        Some("takeover") => takeover(
            &opt("--conns", "1,100,1000"),
            opt("--dead-ms", "50").parse().expect("--dead-ms"),
            opt("--runs", "1").parse().expect("--runs"),
        ),
        // Internal: the paced stream's server, a plain single-threaded
        // process (what `criu dump` checkpoints).
        Some("pacer") => pacer(
            &args[1],
            args[2].parse().expect("secs"),
            args[3].parse().expect("interval us"),
        ),
        _ => {
            eprintln!(
                "usage: failover_bench cpu [--mib N] [--rounds N] [--dead-ms MS] \
                 | stall [--secs S] [--every-ms MS] [--rounds N] [--only direct,holdfast,active,criu] \
                 | takeover [--conns 1,100,1000] [--dead-ms MS] [--runs N]"
            );
            std::process::exit(2)
        }
    }
}

// ------------------------------------------------------------- the hosts

fn lab(what: &str) -> Lab {
    let Some(mut lab) = Lab::new(what) else {
        std::process::exit(0)
    };
    lab.host("client", &["10.77.0.10/24"]);
    lab.host("active", &["10.77.0.1/24", "10.77.0.100/24"]);
    lab.host("standby", &["10.77.0.2/24"]);
    lab.host("server", &["10.77.0.20/24"]);
    lab.attach("active", "eth1", "br1", &["10.77.1.1/24"]);
    lab.attach("standby", "eth1", "br1", &["10.77.1.2/24"]);
    lab
}

fn holdfast_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HOLDFAST") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("holdfast"))
        .expect("target dir")
}

/// The role of a holdfast process in one run.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Plain,
    Active,
    Standby,
}

struct Backend<'a> {
    ack: &'a str,
    framing: Option<&'a str>,
}

fn write_config(dir: &Path, role: Role, backend: &Backend, dead_ms: u64) -> PathBuf {
    let key = dir.join("failover.key");
    std::fs::write(&key, KEY).expect("key");
    let failover = match role {
        Role::Plain => String::new(),
        Role::Active => "role = \"active\"\npeer = \"10.77.1.2:7100\"\n".to_string(),
        Role::Standby => "role = \"standby\"\nlisten = \"10.77.1.2:7100\"\n\
             service_address = \"10.77.0.100/24\"\ninterface = \"eth0\"\n"
            .to_string(),
    };
    let failover = if role == Role::Plain {
        failover
    } else {
        format!(
            "[failover]\n{failover}secret_file = \"{}\"\nheartbeat_interval = \"10ms\"\n\
             dead_peer_timeout = \"{dead_ms}ms\"\n\n",
            key.display()
        )
    };
    let framing = backend
        .framing
        .map(|f| format!("framing = \"{f}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "{failover}[[listener]]\nname = \"svc\"\nlisten = \"{SERVICE}\"\nbackend = \"b\"\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"{SERVER}\"]\nack = \"{}\"\n{framing}\
         retry_initial = \"5ms\"\nretry_max = \"50ms\"\n",
        backend.ack
    );
    let name = match role {
        Role::Plain => "plain.toml",
        Role::Active => "active.toml",
        Role::Standby => "standby.toml",
    };
    let path = dir.join(name);
    std::fs::write(&path, text).expect("config");
    path
}

/// A child process in a host (`ip netns exec` execs: the PID is the
/// program's), stderr in a file, killed by its PID when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(lab: &Lab, host: &str, prog: &Path, args: &[&str], log: PathBuf) -> Proc {
        let err = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(host)])
            .arg(prog)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn");
        Proc { child, log }
    }

    fn holdfast(lab: &Lab, host: &str, config: &Path, dir: &Path) -> Proc {
        Proc::start(
            lab,
            host,
            &holdfast_bin(),
            &["run", "--config", config.to_str().unwrap()],
            dir.join(format!("{host}.log")),
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "never logged {what:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// utime + stime of the process (every thread, live or gone), seconds.
    fn cpu(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("/proc/PID/stat");
        let rest = stat.rsplit_once(") ").expect("stat format").1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat(5); `rest` starts at field 3.
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        ticks as f64 / clk_tck()
    }

    /// Peak resident memory of the process (VmHWM), MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn clk_tck() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A holdfast serving `SERVICE`: plain, or an active replicating to a
/// standby (both started, the link up).
struct Proxy {
    main: Proc,
    standby: Option<Proc>,
}

fn start_proxy(lab: &Lab, dir: &Path, failover: bool, backend: &Backend, dead_ms: u64) -> Proxy {
    let standby = failover.then(|| {
        let cfg = write_config(dir, Role::Standby, backend, dead_ms);
        let p = Proc::holdfast(lab, "standby", &cfg, dir);
        p.wait_log("waiting for the active");
        p
    });
    let role = if failover { Role::Active } else { Role::Plain };
    let cfg = write_config(dir, role, backend, dead_ms);
    let main = Proc::holdfast(lab, "active", &cfg, dir);
    main.wait_log("holdfast running");
    if let Some(s) = &standby {
        main.wait_log("replication link up");
        s.wait_log("replication link up");
    }
    Proxy { main, standby }
}

fn temp_dir(lab: &Lab) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("holdfast-failover-bench-{}", lab.ns("x")));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn machine() {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cpus} CPUs, kernel {}, load average {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

fn connect(addr: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {addr}: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

// ------------------------------------------------------ CPU per GiB

/// Bulk data through holdfast, server to client (`down`) and client to
/// server (`up`), with `ack = "tcp"`; plain and active+standby, rounds
/// interleaved. Figures: throughput and CPU seconds per GiB of the active
/// (the proxy) and of the standby.
fn cpu(mib: u64, rounds: usize, dead_ms: u64) {
    let lab = lab("failover_bench cpu");
    let dir = temp_dir(&lab);
    machine();
    let bytes = mib << 20;
    let backend = Backend {
        ack: "tcp",
        framing: None,
    };
    println!(
        "bulk {mib} MiB per run, one connection, ack = \"tcp\", {rounds} rounds, \
         heartbeat 10 ms, dead_peer_timeout {dead_ms} ms"
    );
    println!(
        "{:<5} {:<9} {:>5} {:>10} {:>14} {:>15} {:>13}",
        "dir",
        "proxy",
        "round",
        "MiB/s",
        "proxy CPU s/GiB",
        "standby CPU s/GiB",
        "proxy peak RSS MiB"
    );
    let mut sums: std::collections::BTreeMap<(String, String), Vec<Figures>> = Default::default();
    for dirn in ["down", "up"] {
        for round in 0..rounds {
            for failover in [false, true] {
                let proxy = start_proxy(&lab, &dir, failover, &backend, dead_ms);
                let up = dirn == "up";
                let server = lab.spawn("server", move || bulk_server(bytes, up));
                std::thread::sleep(Duration::from_millis(50));
                let (c0, s0) = (
                    proxy.main.cpu(),
                    proxy.standby.as_ref().map_or(0.0, Proc::cpu),
                );
                let elapsed = lab
                    .spawn("client", move || bulk_client(bytes, up))
                    .join()
                    .expect("client");
                let (c1, s1) = (
                    proxy.main.cpu(),
                    proxy.standby.as_ref().map_or(0.0, Proc::cpu),
                );
                let rss = proxy.main.peak_rss_mib();
                let name = if failover { "active" } else { "plain" };
                if let Some(s) = proxy
                    .standby
                    .as_ref()
                    .filter(|s| s.log().contains("taking over"))
                {
                    let log = s.log();
                    let line = log
                        .lines()
                        .find(|l| l.contains("taking over"))
                        .unwrap_or("");
                    println!(
                        "{dirn:<5} {name:<9} {round:>5} FALSE TAKEOVER during the transfer (the active \
                         alive, peak RSS {rss:.0} MiB): {line}"
                    );
                    if let Ok(keep) = std::env::var("KEEP_LOGS") {
                        for f in ["active.log", "standby.log"] {
                            let _ = std::fs::copy(dir.join(f), Path::new(&keep).join(f));
                        }
                    }
                    drop(proxy);
                    let _ = server.join();
                    // Give the service address back to the active's host.
                    let _ = lab.exec(
                        "standby",
                        &["ip", "addr", "del", "10.77.0.100/24", "dev", "eth0"],
                    );
                    let _ = lab.exec("client", &["ip", "neigh", "flush", "all"]);
                    continue;
                }
                let Ok(elapsed) = elapsed else {
                    println!("{dirn:<5} {name:<9} {round:>5} transfer failed: {elapsed:?}");
                    drop(proxy);
                    let _ = server.join();
                    continue;
                };
                server.join().expect("server");
                let gib = bytes as f64 / GIB;
                let rate = bytes as f64 / (1u64 << 20) as f64 / elapsed.as_secs_f64();
                let (pc, sc) = ((c1 - c0) / gib, (s1 - s0) / gib);
                println!(
                    "{dirn:<5} {name:<9} {round:>5} {rate:>10.0} {pc:>14.3} {:>15} {rss:>13.0}",
                    if failover {
                        format!("{sc:.3}")
                    } else {
                        "-".into()
                    }
                );
                sums.entry((dirn.into(), name.into()))
                    .or_default()
                    .push((rate, pc, sc));
                drop(proxy);
            }
        }
    }
    println!("median over rounds:");
    for ((dirn, name), v) in sums {
        let med = |f: fn(&Figures) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        println!(
            "{dirn:<5} {name:<9} {:>10.0} MiB/s {:>8.3} proxy CPU s/GiB {:>8.3} standby CPU s/GiB",
            med(|t| t.0),
            med(|t| t.1),
            med(|t| t.2)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Throughput (MiB/s), proxy CPU s/GiB, standby CPU s/GiB of one run.
type Figures = (f64, f64, f64);

/// One connection: `up`, read `bytes` and answer one byte; else write
/// `bytes`, then wait for the client's EOF.
fn bulk_server(bytes: u64, up: bool) {
    let l = TcpListener::bind(SERVER).expect("bind server");
    let (mut s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    if up {
        let mut got = 0u64;
        while got < bytes {
            match s.read(&mut buf) {
                Ok(n) if n > 0 => got += n as u64,
                _ => return,
            }
        }
        let _ = s.write_all(b"k");
    } else {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            if s.write_all(&buf[..n]).is_err() {
                return;
            }
            left -= n as u64;
        }
    }
    let _ = s.read(&mut buf);
}

/// The transfer's duration, or what stopped it (a stall of 10 s included).
fn bulk_client(bytes: u64, up: bool) -> Result<Duration, String> {
    let mut c = connect(SERVICE);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let t = Instant::now();
    let mut done = 0u64;
    if up {
        while done < bytes {
            let n = (bytes - done).min(buf.len() as u64) as usize;
            c.write_all(&buf[..n])
                .map_err(|e| format!("write after {done} bytes: {e}"))?;
            done += n as u64;
        }
        c.read_exact(&mut buf[..1])
            .map_err(|e| format!("the server's answer: {e}"))?;
    } else {
        while done < bytes {
            match c.read(&mut buf) {
                Ok(0) => return Err(format!("EOF after {done} bytes")),
                Ok(n) => done += n as u64,
                Err(e) => return Err(format!("read after {done} bytes: {e}")),
            }
        }
    }
    let e = t.elapsed();
    let _ = c.shutdown(Shutdown::Both);
    Ok(e)
}

// ------------------------------------------------------ stall

/// Bytes per chunk of the paced stream: sequence number, the time it was
/// due (ns since the epoch, CLOCK_REALTIME: one clock for every process
/// here), padding.
const CHUNK: usize = 64;

fn pacer(listen: &str, secs: u64, interval_us: u64) {
    let l = TcpListener::bind(listen).expect("pacer bind");
    let (mut s, _) = l.accept().expect("pacer accept");
    drop(l);
    s.set_nodelay(true).unwrap();
    let (start, start_ns) = (Instant::now(), now_ns());
    let n = secs * 1_000_000 / interval_us;
    for i in 0..n {
        let due = start + Duration::from_micros(i * interval_us);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let mut chunk = [0u8; CHUNK];
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        // When the chunk was due, not when it left: a frozen sender's
        // chunks count as late too.
        let due_ns = start_ns + i * interval_us * 1000;
        chunk[8..16].copy_from_slice(&due_ns.to_le_bytes());
        if s.write_all(&chunk).is_err() {
            return;
        }
    }
    // The client closes after the last chunk (a proxy in `ack = "tcp"`
    // would take a server's close for a failure and reconnect).
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 16];
    let _ = s.read(&mut b);
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// What the stream's client saw: gaps between consecutive chunks and each
/// chunk's lateness (arrival − when it was due).
struct Seen {
    chunks: u64,
    gaps: Vec<Duration>,
    delays: Vec<Duration>,
}

fn stream_client(addr: &str, chunks: u64) -> Seen {
    let mut c = connect(addr);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut chunk = [0u8; CHUNK];
    let (mut gaps, mut delays) = (Vec::new(), Vec::new());
    let mut last: Option<Instant> = None;
    let mut expect = 0u64;
    while expect < chunks {
        if let Err(e) = c.read_exact(&mut chunk) {
            panic!("stream client: chunk {expect}: {e}");
        }
        let now = Instant::now();
        let at = now_ns();
        let seq = u64::from_le_bytes(chunk[..8].try_into().unwrap());
        let sent = u64::from_le_bytes(chunk[8..16].try_into().unwrap());
        assert_eq!(seq, expect, "stream out of order");
        expect += 1;
        delays.push(Duration::from_nanos(at.saturating_sub(sent)));
        if let Some(l) = last {
            gaps.push(now - l);
        }
        last = Some(now);
    }
    Seen {
        chunks: expect,
        gaps,
        delays,
    }
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn criu_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CRIU") {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("criu"))
            .find(|p| p.exists())
    })
}

/// `--only` keys of the stall rows.
const ROW_KEYS: [(&str, &str); 4] = [
    ("direct", "direct"),
    ("holdfast", "holdfast"),
    ("active", "holdfast active+standby"),
    ("criu", "direct + criu dump"),
];

/// The dumps of one CRIU row: how many, how long each took, failures.
#[derive(Default)]
struct Dumps {
    times: Vec<Duration>,
    failed: u64,
    first_error: Option<String>,
}

/// A paced stream (64 bytes every 1 ms, `secs` long): straight from a
/// plain server process, through holdfast, through an active holdfast that
/// replicates to a standby, and straight from the plain process while
/// `criu dump --tcp-established --leave-running` checkpoints it every
/// `every_ms`. The client records the gaps between chunks. Rounds run the
/// rows interleaved.
fn stall(secs: u64, every_ms: u64, only: &str, rounds: usize) {
    let lab = lab("failover_bench stall");
    let dir = temp_dir(&lab);
    machine();
    let criu = criu_bin();
    match &criu {
        Some(p) => {
            let v = Command::new(p).arg("--version").output();
            let v = v
                .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " "))
                .unwrap_or_default();
            println!("criu: {} ({})", p.display(), v.trim());
        }
        None => println!(
            "SKIP the CRIU row: no `criu` in PATH and no CRIU= (CRIU 4.1 or later is needed)"
        ),
    }
    let backend = Backend {
        ack: "tcp",
        framing: None,
    };
    let interval_us = 1000;
    println!(
        "paced stream: {CHUNK} B every {} ms for {secs} s, one connection",
        interval_us as f64 / 1e3
    );
    println!(
        "{:<34} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "row", "chunks", "gap p50", "gap p99", "gap p999", "gap max", "late p99", "late max"
    );
    let rows: Vec<&str> = if criu.is_some() {
        vec![
            "direct",
            "holdfast",
            "holdfast active+standby",
            "direct + criu dump",
        ]
    } else {
        vec!["direct", "holdfast", "holdfast active+standby"]
    };
    let rows: Vec<&str> = rows
        .into_iter()
        .filter(|r| only.is_empty() || only.split(',').any(|o| ROW_KEYS.contains(&(o, *r))))
        .collect();
    for (round, row) in (0..rounds).flat_map(|r| rows.iter().map(move |row| (r, *row))) {
        if rounds > 1 && row == rows[0] {
            println!("round {round}");
        }
        let proxy = match row {
            "holdfast" => Some(start_proxy(&lab, &dir, false, &backend, 1000)),
            "holdfast active+standby" => Some(start_proxy(&lab, &dir, true, &backend, 1000)),
            _ => None,
        };
        // Started from a thread in the server's network namespace, not with
        // `ip netns exec` (which also gives it a mount namespace of its
        // own): criu then sees a process in its own namespaces but one.
        let exe = std::env::current_exe().unwrap();
        let log = dir.join("pacer.log");
        let pacer = lab
            .spawn("server", move || {
                let err = std::fs::File::create(&log).expect("log file");
                // A session leader, as criu wants of the root of a tree.
                let child = Command::new("setsid")
                    .arg(exe)
                    .args(["pacer", SERVER, &secs.to_string(), &interval_us.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(err)
                    .spawn()
                    .expect("spawn pacer");
                Proc { child, log }
            })
            .join()
            .expect("pacer");
        std::thread::sleep(Duration::from_millis(100));
        let addr = if proxy.is_some() { SERVICE } else { SERVER };
        let chunks = secs * 1_000_000 / interval_us;
        let client = lab.spawn("client", move || stream_client(addr, chunks));
        let (seen, dumps) = if row == "direct + criu dump" {
            let stop = Arc::new(AtomicBool::new(false));
            let (criu, pid, images) = (
                criu.clone().unwrap(),
                pacer.child.id(),
                dir.join("criu-images"),
            );
            let stop2 = stop.clone();
            let dumper = lab.spawn("server", move || {
                criu_loop(&criu, pid, &images, every_ms, &stop2)
            });
            let seen = client.join().expect("client");
            stop.store(true, Ordering::Relaxed);
            (seen, Some(dumper.join().expect("criu loop")))
        } else {
            (client.join().expect("client"), None)
        };
        report_stream(row, seen);
        if let Some(d) = dumps {
            let mut t = d.times.clone();
            if t.is_empty() {
                println!("  criu: no dump succeeded");
            } else {
                println!(
                    "  criu dumps: {} ok, {} failed; duration min {} p50 {} p99 {} max {} ms",
                    t.len(),
                    d.failed,
                    ms(pct(&mut t, 0.0)),
                    ms(pct(&mut t, 0.5)),
                    ms(pct(&mut t, 0.99)),
                    ms(pct(&mut t, 1.0))
                );
            }
            if let Some(e) = d.first_error {
                println!("  criu: first failure: {e}");
            }
        }
        drop(pacer);
        drop(proxy);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn report_stream(row: &str, mut s: Seen) {
    if s.gaps.is_empty() {
        println!("{row:<34} no chunks");
        return;
    }
    // Where the long gaps were: chunk index (≈ ms into the stream) and size.
    let mut long: Vec<(usize, Duration)> = s
        .gaps
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, g)| *g > Duration::from_millis(5))
        .collect();
    let n_long = long.len();
    long.sort_by_key(|g| std::cmp::Reverse(g.1));
    let worst: Vec<String> = long
        .iter()
        .take(4)
        .map(|(i, g)| format!("{} ms at chunk {}", ms(*g), i + 1))
        .collect();
    println!(
        "{row:<34} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        s.chunks,
        ms(pct(&mut s.gaps, 0.5)),
        ms(pct(&mut s.gaps, 0.99)),
        ms(pct(&mut s.gaps, 0.999)),
        ms(pct(&mut s.gaps, 1.0)),
        ms(pct(&mut s.delays, 0.99)),
        ms(pct(&mut s.delays, 1.0))
    );
    println!("  gaps over 5 ms: {n_long}; longest: {}", worst.join(", "));
}

/// `criu dump -t PID --tcp-established --leave-running` into a fresh images
/// directory every `every_ms` (the next one right away when a dump takes
/// longer), until `stop`. Runs in the server's namespace, as the process.
fn criu_loop(criu: &Path, pid: u32, images: &Path, every_ms: u64, stop: &AtomicBool) -> Dumps {
    let mut d = Dumps::default();
    let every = Duration::from_millis(every_ms);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) && Path::new(&format!("/proc/{pid}")).exists() {
        let _ = std::fs::remove_dir_all(images);
        std::fs::create_dir_all(images).expect("images dir");
        let t = Instant::now();
        let out = Command::new(criu)
            .args(["dump", "-t", &pid.to_string()])
            .args(["--tcp-established", "--leave-running", "-v2"])
            .arg("--images-dir")
            .arg(images)
            .args(["-o", "dump.log"])
            .stdin(Stdio::null())
            .output()
            .expect("run criu");
        let took = t.elapsed();
        if out.status.success() {
            d.times.push(took);
        } else if !stop.load(Ordering::Relaxed) {
            d.failed += 1;
            if d.first_error.is_none() {
                let log = std::fs::read_to_string(images.join("dump.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                d.first_error = Some(format!(
                    "{} {}; log tail: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim(),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ));
            }
        }
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    let _ = std::fs::remove_dir_all(images);
    d
}

// ------------------------------------------------------ takeover

const LINE: usize = 32;

fn line(i: u64) -> [u8; LINE] {
    let mut l = [b' '; LINE];
    let s = format!("{i:030}");
    l[..30].copy_from_slice(s.as_bytes());
    l[LINE - 1] = b'\n';
    l
}

/// Per connection, what its reader saw.
#[derive(Default)]
struct Conn {
    /// Answers received, in order.
    got: AtomicU64,
    /// Time (ns since the bench's base instant) of the first answer after
    /// the kill; 0 before.
    first_after: AtomicU64,
    /// The connection ended (EOF, reset) or an answer was wrong.
    ended: Mutex<Option<String>>,
}

/// `conns` sessions with `ack = "response"` against `example-server
/// --mode lines`; each client sends a 32-byte numbered line every
/// `interval` and checks every answer in order. Then the active's host
/// fails (both links cut, SIGKILL); the figures are the standby's own
/// (detection, restore, claim, live) and, per connection, the time from the
/// cut of the service link to the first answer after it.
fn takeover(conns: &str, dead_ms: u64, runs: usize) {
    machine();
    println!("heartbeat 10 ms, dead_peer_timeout {dead_ms} ms, ack = \"response\", lines");
    let backend = Backend {
        ack: "response",
        framing: Some("lines"),
    };
    for n in conns
        .split(',')
        .map(|c| c.parse::<usize>().expect("--conns"))
    {
        for _ in 0..runs {
            // Fresh hosts every run: the failed active stays cut off and the
            // standby owns the service address.
            let lab = lab("failover_bench takeover");
            let dir = temp_dir(&lab);
            takeover_run(&lab, &dir, &backend, n, dead_ms);
            let _ = std::fs::remove_dir_all(&dir);
            drop(lab);
            // Deleting namespaces that held a thousand sockets keeps the
            // kernel busy for a while after `ip netns del` returns; the next
            // run waits, or its hosts compete with that clean-up.
            std::thread::sleep(Duration::from_secs(5));
        }
    }
}

fn takeover_run(lab: &Lab, dir: &Path, backend: &Backend, n: usize, dead_ms: u64) {
    let server = Proc::start(
        lab,
        "server",
        &holdfast_bin(),
        &["example-server", "--listen", SERVER, "--mode", "lines"],
        dir.join("server.log"),
    );
    let mut proxy = start_proxy(lab, dir, true, backend, dead_ms);
    // One line per connection every `interval`: 10 000 lines/s in all at
    // most, at least one every 1 ms per connection.
    let interval = Duration::from_micros((n as u64 * 100).max(1000));
    let state: Arc<Vec<Conn>> = Arc::new((0..n).map(|_| Conn::default()).collect());
    let base = Instant::now();
    let killed_at = Arc::new(AtomicU64::new(u64::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (state, killed_at, stop) = (state.clone(), killed_at.clone(), stop.clone());
        lab.spawn("client", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(takeover_clients(state, interval, base, killed_at, stop, n))
        })
    };
    // Every connection answered for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    let early = |p: &Proxy| p.standby.as_ref().unwrap().log().contains("taking over");
    while state.iter().any(|c| c.got.load(Ordering::Relaxed) < 20) && !early(&proxy) {
        if Instant::now() > deadline {
            let log = proxy.standby.as_ref().unwrap().log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "connections never all answered; standby's log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The replication link's backlog before the failure: what the active's
    // kernel holds unacknowledged (Send-Q) and what the standby's kernel
    // holds unread (Recv-Q), sampled with `ss` a few times.
    let mut backlog = Vec::new();
    for _ in 0..5 {
        let q = |host: &str, dst: &str, col: usize| -> u64 {
            lab.exec(host, &["ss", "-Htn", "dst", dst])
                .split_whitespace()
                .nth(col)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        backlog.push((q("active", "10.77.1.2", 2), q("standby", "10.77.1.1", 1)));
        std::thread::sleep(Duration::from_millis(60));
    }
    if early(&proxy) {
        // The active is alive: a false takeover (split brain), reported.
        let log = proxy.standby.as_ref().unwrap().log();
        let line = log
            .lines()
            .find(|l| l.contains("taking over"))
            .unwrap_or("");
        println!(
            "--- {n} connections: FALSE TAKEOVER before any failure (the active alive): {line}"
        );
        if let Ok(keep) = std::env::var("KEEP_LOGS") {
            for f in ["active.log", "standby.log"] {
                let _ = std::fs::copy(dir.join(f), Path::new(&keep).join(f));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = client.join();
        return;
    }
    // The host fails: its service link is cut (the moment that counts,
    // "the failure": nothing it sends reaches the client after it), then its
    // replication link, then it is killed.
    let cut = Instant::now();
    lab.cut("active", "eth0");
    let t0 = base.elapsed().as_nanos() as u64;
    let t0_wall = now_ns();
    killed_at.store(t0, Ordering::Relaxed);
    lab.cut("active", "eth1");
    proxy.main.kill();
    let cut_took = cut.elapsed();
    let standby = proxy.standby.take().unwrap();
    standby.wait_log("failover: took over");
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::Relaxed);
    client.join().expect("client");
    let log = standby.log();
    let field = |line: &str, key: &str| -> String {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or("?")
            .to_string()
    };
    let taking = log
        .lines()
        .find(|l| l.contains("taking over"))
        .unwrap_or("");
    let took = log
        .lines()
        .find(|l| l.contains("failover: took over"))
        .unwrap_or("");
    let after = |l: &str| {
        log_time_ns(l).map_or("?".to_string(), |t| {
            format!("{:.2}", (t as f64 - (t0_wall % DAY_NS) as f64) / 1e6)
        })
    };
    println!("--- {n} connections, one line each every {interval:?}");
    println!(
        "replication link before the failure (5 samples, bytes): active Send-Q {:?}, standby Recv-Q {:?}",
        backlog.iter().map(|b| b.0).collect::<Vec<_>>(),
        backlog.iter().map(|b| b.1).collect::<Vec<_>>()
    );
    println!(
        "failure: service link cut, replication link cut, SIGKILL: {} ms of commands \
         (times below are from the service link's cut)",
        ms(cut_took)
    );
    println!(
        "standby: silence detected {} ms after the cut (silence_ms={}); took over {} ms after the cut; \
         restore {} us, claim + ARP {} us, leave repair + re-send {} us; sessions {}, failed {}",
        after(taking),
        field(taking, "silence_ms"),
        after(took),
        field(took, "restore_us"),
        field(took, "claim_us"),
        field(took, "live_us"),
        field(took, "sessions"),
        field(took, "failed")
    );
    let gaps = log.matches("failover_gap").count();
    let mut firsts = Vec::new();
    let mut ended = Vec::new();
    for (i, c) in state.iter().enumerate() {
        let f = c.first_after.load(Ordering::Relaxed);
        if let Some(e) = c.ended.lock().unwrap().clone() {
            ended.push(format!("#{i}: {e}"));
        } else if f > 0 {
            firsts.push(Duration::from_nanos(f - t0));
        }
    }
    if firsts.is_empty() {
        println!("client: no connection resumed");
    } else {
        let k = firsts.len();
        println!(
            "client: cut -> first answer after it, {k} of {n} connections: min {} p50 {} p90 {} p99 {} max {} ms",
            ms(pct(&mut firsts, 0.0)),
            ms(pct(&mut firsts, 0.5)),
            ms(pct(&mut firsts, 0.9)),
            ms(pct(&mut firsts, 0.99)),
            ms(pct(&mut firsts, 1.0))
        );
    }
    if !ended.is_empty() || gaps > 0 {
        println!(
            "client: {} connections ended ({} logged as failover_gap by the standby): {}",
            ended.len(),
            gaps,
            ended.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        );
    }
    drop(standby);
    drop(proxy);
    drop(server);
}

const DAY_NS: u64 = 86_400 * 1_000_000_000;

/// The time of day of a log line (`2026-12-07T04:30:01.123456Z …`), ns.
fn log_time_ns(line: &str) -> Option<u64> {
    let ts = line.split_whitespace().next()?;
    let time = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut it = time.split(':');
    let h: u64 = it.next()?.parse().ok()?;
    let m: u64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.parse().ok()?;
    Some((h * 3600 + m * 60) * 1_000_000_000 + (s * 1e9) as u64)
}

async fn takeover_clients(
    state: Arc<Vec<Conn>>,
    interval: Duration,
    base: Instant,
    killed_at: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    n: usize,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tasks = Vec::new();
    for i in 0..n {
        let s = loop {
            match tokio::net::TcpStream::connect(SERVICE).await {
                Ok(s) => break s,
                Err(e) => {
                    eprintln!("connect {i}: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        s.set_nodelay(true).unwrap();
        let (mut r, mut w) = s.into_split();
        let (state, killed_at, stop) = (state.clone(), killed_at.clone(), stop.clone());
        // Spread the connections' sends over the interval.
        let offset = interval * i as u32 / n as u32;
        tasks.push(tokio::spawn(async move {
            let writer = async {
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    if w.write_all(&line(k)).await.is_err() {
                        return;
                    }
                    k += 1;
                }
                let _ = w.shutdown().await;
            };
            let conn = &state[i];
            let reader = async {
                let mut buf = [0u8; LINE];
                let mut k = 0u64;
                loop {
                    match r.read_exact(&mut buf).await {
                        Ok(_) => {}
                        Err(e) => {
                            if !stop.load(Ordering::Relaxed) {
                                *conn.ended.lock().unwrap() = Some(format!("{e} at line {k}"));
                            }
                            return;
                        }
                    }
                    if buf != line(k) {
                        *conn.ended.lock().unwrap() = Some(format!("wrong answer at line {k}"));
                        return;
                    }
                    k += 1;
                    conn.got.store(k, Ordering::Relaxed);
                    let now = base.elapsed().as_nanos() as u64;
                    if now > killed_at.load(Ordering::Relaxed)
                        && conn.first_after.load(Ordering::Relaxed) == 0
                    {
                        conn.first_after.store(now, Ordering::Relaxed);
                    }
                }
            };
            tokio::select! {
                _ = async { tokio::join!(writer, reader) } => {}
                _ = async {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                } => {}
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
