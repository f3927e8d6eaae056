//! Shared by the benchmark programs: the machine line, holdfast run
//! in-process on port 0, and small statistics.
#![allow(dead_code)]

use std::io;
use std::time::Duration;

use holdfast::config::{self, Endpoint};
use holdfast::lifecycle::{Phase, Shutdown};
use tokio::sync::watch;

/// Prints the machine the numbers come from.
pub fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    println!("machine: nproc {cpus}, cpu {model}, kernel {kernel}");
}

/// holdfast in this process, listening on the addresses of its config.
pub struct Proxy {
    pub addrs: Vec<String>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl Proxy {
    pub async fn start(toml: &str) -> anyhow::Result<Proxy> {
        let cfg = config::parse(toml).map_err(|e| anyhow::anyhow!("bench config:\n{e}"))?;
        let bound = holdfast::proxy::bind(&cfg).await?;
        let addrs = bound
            .local_endpoints()
            .into_iter()
            .map(|e| match e {
                Endpoint::Tcp(a) => a,
                Endpoint::Unix(p) => panic!("unix listener {}", p.display()),
                Endpoint::Systemd(n) => panic!("systemd listener {n}"),
            })
            .collect();
        let shutdown = Shutdown::new();
        let (tx, mut phase) = watch::channel(Phase::Starting);
        let task = tokio::spawn(holdfast::proxy::run(cfg, bound, shutdown.clone(), tx));
        phase.wait_for(|p| *p == Phase::Running).await?;
        Ok(Proxy {
            addrs,
            shutdown,
            task,
        })
    }

    pub async fn stop(self) {
        self.shutdown.stop.cancel();
        let _ = self.task.await;
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
