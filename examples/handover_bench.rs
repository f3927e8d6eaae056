//! Benchmark of the live hand-over (`kill -USR2`): per-session pause and
//! total time, for many idle sessions and for a few busy ones.
//!
//! ```sh
//! cargo build --release
//! cargo run --release --example handover_bench -- --idle 9000 --busy 0 --rounds 3
//! cargo run --release --example handover_bench -- --idle 0 --busy 100 --rounds 3
//! ```
//!
//! It starts `holdfast example-server --mode echo` and `holdfast run` (the
//! binary given by `--holdfast`, default `target/release/holdfast`) with one
//! listener (`ack = "tcp"`), opens the sessions, and upgrades holdfast
//! `--rounds` times with SIGUSR2. For each upgrade it prints what the two
//! processes measured: sessions handed over and total time (the old
//! process); each session's pause p50/p99/max, from the moment it stopped
//! moving bytes in the old process to its first run in the new one (the
//! new process, from CLOCK_MONOTONIC timestamps the batches carry); and
//! "answered", from the same moment to the old process having the new
//! one's verdict on its batch (the old process; what earlier versions
//! reported as the pause). Then what the clients saw: every idle session
//! echoes again afterwards; busy sessions (each streaming 16 KiB echo round
//! trips) report the longest gap between two round trips during the upgrade
//! and check every byte.
//!
//! `--busy-interval-us N` paces each busy client to one round trip every
//! `N` µs (default 0: back to back, which saturates a 2-CPU machine); the
//! client's worst gap then includes that interval. `--busy-bytes N` sets
//! the size of a busy round trip (default 16384; 262144 keeps bulk in
//! flight in every busy session when it is handed over). `--busy-within D`
//! sets `[handover] busy_within` (`0ms`: every session in batches). The
//! last line sums up the upgrades' pause p99: range, median, and how many
//! were under 1 ms.
//!
//! `--holdfast-cpu N` runs holdfast (and every generation it starts) on CPU
//! `N` only; with `--client-cpu M` as well, the clients and the echo server
//! run on CPU `M`, so the load does not compete with holdfast for its CPU
//! (a proxy host whose clients are elsewhere).
//!
//! `--client-cpu N` pins the busy clients' threads to CPU `N` (holdfast and
//! the echo server stay free): on a 2-CPU machine, the 100 clients then
//! compete with holdfast for one CPU instead of both.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

struct Opts {
    idle: usize,
    busy: usize,
    rounds: usize,
    holdfast: String,
    client_cpu: Option<usize>,
    /// Busy clients start a round trip every this long (0: back to back).
    busy_interval: Duration,
    /// Bytes of each busy round trip.
    busy_bytes: usize,
    /// Run holdfast (every generation) on this CPU only.
    holdfast_cpu: Option<usize>,
    /// `[handover] busy_within`, when given.
    busy_within: Option<String>,
}

fn parse() -> anyhow::Result<Opts> {
    let mut o = Opts {
        idle: 9000,
        busy: 0,
        rounds: 3,
        holdfast: "target/release/holdfast".into(),
        client_cpu: None,
        busy_interval: Duration::ZERO,
        busy_bytes: 16384,
        holdfast_cpu: None,
        busy_within: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).context("a value after each flag")?;
        match args[i].as_str() {
            "--idle" => o.idle = v.parse()?,
            "--busy" => o.busy = v.parse()?,
            "--rounds" => o.rounds = v.parse()?,
            "--holdfast" => o.holdfast = v.clone(),
            "--client-cpu" => o.client_cpu = Some(v.parse()?),
            "--busy-interval-us" => o.busy_interval = Duration::from_micros(v.parse()?),
            "--busy-bytes" => o.busy_bytes = v.parse()?,
            "--holdfast-cpu" => o.holdfast_cpu = Some(v.parse()?),
            "--busy-within" => o.busy_within = Some(v.clone()),
            f => bail!("unknown flag {f}"),
        }
        i += 2;
    }
    Ok(o)
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t for the calls; pid 0 is the calling
    // thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts `cmd` confined to `cpu` (its children, later holdfast
/// generations included, inherit the mask).
fn confine(cmd: &mut Command, cpu: Option<usize>) {
    use std::os::unix::process::CommandExt;
    if let Some(cpu) = cpu {
        // SAFETY: between fork and exec this only calls
        // sched_setaffinity(2), which is async-signal-safe, on a local set.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

fn field(line: &str, name: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .map(|v| v.trim_matches('"').to_string())
}

/// Lines of holdfast's stderr (every generation shares it).
struct Log(mpsc::Receiver<String>);

impl Log {
    fn until(&self, needle: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        loop {
            let line = self
                .0
                .recv_timeout(Duration::from_secs(120))
                .with_context(|| format!("no {needle:?} line"))?;
            if line.contains(needle) && pred(&line) {
                return Ok(line);
            }
        }
    }
}

fn echo(c: &mut TcpStream, msg: &[u8]) -> anyhow::Result<()> {
    c.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    c.read_exact(&mut buf)?;
    if buf != msg {
        bail!("echo mismatch");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let o = parse()?;
    let mut server = Command::new(&o.holdfast);
    server.args([
        "example-server",
        "--listen",
        "127.0.0.1:0",
        "--mode",
        "echo",
    ]);
    confine(&mut server, o.client_cpu);
    let mut server = server
        .stdout(Stdio::piped())
        .spawn()
        .context("start the echo server")?;
    let mut first = String::new();
    BufReader::new(server.stdout.take().context("stdout")?).read_line(&mut first)?;
    let server_addr = first
        .trim()
        .strip_prefix("listening ")
        .context("echo server address")?
        .to_string();

    let dir = std::env::temp_dir().join(format!("holdfast-handover-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("holdfast.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[limits]
max_sessions = 20000

[lifecycle]
drain_timeout = "5s"

[handover]
socket = "{}"
{busy_within}

[[listener]]
name = "bench"
listen = "127.0.0.1:0"
backend = "echo"

[[backend]]
name = "echo"
servers = ["{server_addr}"]
ack = "tcp"
"#,
            dir.join("run/handover.sock").display(),
            busy_within = o
                .busy_within
                .as_ref()
                .map(|d| format!("busy_within = \"{d}\""))
                .unwrap_or_default(),
        ),
    )?;
    let mut proxy = Command::new(&o.holdfast);
    confine(&mut proxy, o.holdfast_cpu);
    let mut proxy: Child = proxy
        .args(["run", "--config", cfg.to_str().context("path")?])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stderr(Stdio::piped())
        .spawn()
        .context("start holdfast")?;
    let (tx, rx) = mpsc::channel();
    let stderr = proxy.stderr.take().context("stderr")?;
    // HANDOVER_BENCH_LOG=FILE keeps holdfast's log (RUST_LOG=debug shows
    // each batch's timings).
    let mut keep = match std::env::var("HANDOVER_BENCH_LOG") {
        Ok(path) => Some(std::fs::File::create(path)?),
        Err(_) => None,
    };
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = keep.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let log = Log(rx);
    // The listener's address and the hand-over socket, in either order.
    let (mut addr, mut handover) = (None, false);
    while addr.is_none() || !handover {
        let line = log.until("listening", |_| true)?;
        if line.contains("hand-over socket listening") {
            handover = true;
        } else if line.contains("addr=") {
            addr = field(&line, "addr");
        }
    }
    let addr = addr.context("listener address")?;
    let mut pid = proxy.id();

    // Idle sessions: each with its leg up (one echo), then silent.
    let started = Instant::now();
    let mut idle = Vec::with_capacity(o.idle);
    for _ in 0..o.idle {
        let mut c = TcpStream::connect(&addr)?;
        echo(&mut c, b"x")?;
        idle.push(c);
    }
    if o.idle > 0 {
        println!("{} idle sessions open in {:?}", o.idle, started.elapsed());
    }

    // Busy sessions: echo round trips of `busy_bytes` (16 KiB), checked, as
    // fast as they go.
    let stop = Arc::new(AtomicBool::new(false));
    let upgrading = Arc::new(AtomicBool::new(false));
    let worst_gap_us = Arc::new(AtomicU64::new(0));
    // The same clients' worst gap over as long a time with no upgrade.
    let baseline = Arc::new(AtomicBool::new(false));
    let worst_base_us = Arc::new(AtomicU64::new(0));
    let mut busy = Vec::new();
    for id in 0..o.busy {
        let mut c = TcpStream::connect(&addr)?;
        let (stop, upgrading, worst) = (stop.clone(), upgrading.clone(), worst_gap_us.clone());
        let (baseline, worst_base) = (baseline.clone(), worst_base_us.clone());
        let (cpu, interval, bytes) = (o.client_cpu, o.busy_interval, o.busy_bytes as u64);
        busy.push(thread::spawn(move || -> anyhow::Result<u64> {
            if let Some(cpu) = cpu {
                pin(cpu)?;
            }
            let mut n = 0u64;
            let mut last = Instant::now();
            let mut next = last;
            while !stop.load(Ordering::Relaxed) {
                if !interval.is_zero() {
                    next += interval;
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(d);
                    } else {
                        next = Instant::now();
                    }
                }
                let msg: Vec<u8> = (0..bytes)
                    .map(|i| (i * 31 + n * 7 + id as u64) as u8)
                    .collect();
                echo(&mut c, &msg)?;
                let gap = last.elapsed().as_micros() as u64;
                if upgrading.load(Ordering::Relaxed) {
                    worst.fetch_max(gap, Ordering::Relaxed);
                }
                if baseline.load(Ordering::Relaxed) {
                    worst_base.fetch_max(gap, Ordering::Relaxed);
                }
                last = Instant::now();
                n += 1;
            }
            Ok(n)
        }));
    }

    println!("| round | sessions | total ms | pause p50 µs | pause p99 µs | pause max µs | answered p50 µs | answered p99 µs | client worst gap µs | same, no upgrade µs | alone |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut p99s = Vec::new();
    for round in 0..o.rounds {
        thread::sleep(Duration::from_millis(100));
        let quiet = Instant::now();
        worst_base_us.store(0, Ordering::Relaxed);
        baseline.store(true, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(200));
        baseline.store(false, Ordering::Relaxed);
        let quiet = quiet.elapsed();
        worst_gap_us.store(0, Ordering::Relaxed);
        let upgrade = Instant::now();
        upgrading.store(true, Ordering::Relaxed);
        let old = pid;
        // SAFETY: kill(2) with a pid we started (or that our child started).
        if unsafe { libc::kill(old as i32, libc::SIGUSR2) } != 0 {
            bail!("kill -USR2 {old}: {}", std::io::Error::last_os_error());
        }
        let running = log.until("holdfast running", |l| {
            field(l, "pid").is_some_and(|p| p != old.to_string())
        })?;
        pid = field(&running, "pid").context("pid")?.parse()?;
        // The old process's summary, the new one's, and the old one's exit,
        // in whichever order they come.
        let (mut done, mut taken, mut stopped) = (None, None, false);
        while done.is_none() || taken.is_none() || !stopped {
            let line = log.until("", |_| true)?;
            if line.contains("sessions handed over") {
                done = Some(line);
            } else if line.contains("sessions taken over") {
                taken = Some(line);
            } else if line.contains("holdfast stopped")
                && field(&line, "pid") == Some(old.to_string())
            {
                stopped = true;
            }
        }
        let (done, taken) = (done.unwrap_or_default(), taken.unwrap_or_default());
        thread::sleep(Duration::from_millis(100));
        upgrading.store(false, Ordering::Relaxed);
        let upgrade = upgrade.elapsed();
        // A baseline as long as the upgrade's window (at least the 200 ms
        // above).
        if upgrade > quiet {
            worst_base_us.store(0, Ordering::Relaxed);
            baseline.store(true, Ordering::Relaxed);
            thread::sleep(upgrade);
            baseline.store(false, Ordering::Relaxed);
        }
        let f = |k: &str| field(&done, k).unwrap_or_default();
        let t = |k: &str| field(&taken, k).unwrap_or_default();
        p99s.push(t("pause_p99_us").parse::<u64>().unwrap_or(u64::MAX));
        if t("running") != f("sessions") {
            bail!(
                "{} sessions handed over, {} running in the new process",
                f("sessions"),
                t("running")
            );
        }
        println!(
            "| {round} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f("sessions"),
            f("total_ms").parse::<f64>().unwrap_or(0.0),
            t("pause_p50_us"),
            t("pause_p99_us"),
            t("pause_max_us"),
            f("answered_p50_us"),
            f("answered_p99_us"),
            if o.busy > 0 {
                worst_gap_us.load(Ordering::Relaxed).to_string()
            } else {
                "-".into()
            },
            if o.busy > 0 {
                worst_base_us.load(Ordering::Relaxed).to_string()
            } else {
                "-".into()
            },
            f("alone"),
        );
        // Every idle session is still there, on the same connection.
        for c in &mut idle {
            echo(c, b"y").context("an idle session after the upgrade")?;
        }
    }
    stop.store(true, Ordering::Relaxed);
    p99s.sort_unstable();
    if let (Some(first), Some(last)) = (p99s.first(), p99s.last()) {
        println!(
            "pause p99 per upgrade: {first}–{last} µs, median {} µs; under 1 ms in {} of {}",
            p99s[p99s.len() / 2],
            p99s.iter().filter(|&&p| p < 1000).count(),
            p99s.len()
        );
    }
    let mut trips = 0;
    for b in busy {
        trips += b
            .join()
            .map_err(|_| anyhow::anyhow!("busy client panicked"))??;
    }
    if o.busy > 0 {
        println!(
            "busy sessions: {trips} round trips of {} bytes, all verified",
            o.busy_bytes
        );
    }
    println!("all {} idle sessions echoed after every upgrade", o.idle);
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let _ = log.until("holdfast stopped", |l| {
        field(l, "pid") == Some(pid.to_string())
    });
    let _ = proxy.wait();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
