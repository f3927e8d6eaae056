//! `holdfast run` keeps only the capabilities its config needs
//! (`src/privileges.rs`): started as root, the process's permitted,
//! effective and bounding sets hold nothing else. Without root (nothing to
//! drop) the test prints SKIP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const NET_BIND_SERVICE: u64 = 1 << 10;
const NET_ADMIN: u64 = 1 << 12;
const NET_RAW: u64 = 1 << 13;
const SYS_NICE: u64 = 1 << 23;

struct Started {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `holdfast run` with `toml` (its `KEY` replaced by a key file's
/// path) and returns once its log says `ready`.
fn start(name: &str, toml: &str, ready: &str) -> Started {
    let dir = std::env::temp_dir().join(format!("holdfast-priv-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("failover.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let cfg = dir.join("holdfast.toml");
    std::fs::write(&cfg, toml.replace("KEY", key.to_str().unwrap())).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn holdfast");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let want = ready.to_string();
    std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log.push_str(&line);
            log.push('\n');
            if line.contains(&want) {
                let _ = tx.send(Ok(log.clone()));
            }
        }
        let _ = tx.send(Err(log));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(_)) => {}
        other => panic!("{name}: holdfast never logged {ready:?}: {other:?}"),
    }
    Started { child, dir }
}

/// `CapPrm`, `CapEff` and `CapBnd` of `pid`.
fn caps(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    (field("CapPrm:"), field("CapEff:"), field("CapBnd:"))
}

fn root_with_caps(test: &str) -> bool {
    let (prm, _, _) = caps(std::process::id());
    let all = NET_BIND_SERVICE | NET_ADMIN | NET_RAW | SYS_NICE;
    if prm & all != all || prm == all {
        eprintln!("SKIP {test}: this process has no capabilities to drop");
        return false;
    }
    true
}

const PLAIN: &str = r#"
[[listener]]
name = "svc"
listen = "127.0.0.1:0"
backend = "b"

[[backend]]
name = "b"
servers = ["127.0.0.1:1"]
"#;

#[test]
fn a_plain_proxy_keeps_only_low_ports_and_priority() {
    if !root_with_caps("a_plain_proxy_keeps_only_low_ports_and_priority") {
        return;
    }
    let p = start("plain", PLAIN, "holdfast running");
    let (prm, eff, bnd) = caps(p.child.id());
    assert_eq!(prm, NET_BIND_SERVICE | SYS_NICE, "permitted {prm:x}");
    assert_eq!(eff, prm, "effective {eff:x}");
    assert_eq!(bnd, prm, "bounding {bnd:x}");
}

#[test]
fn a_failover_active_keeps_net_admin_and_a_standby_net_raw_too() {
    if !root_with_caps("a_failover_active_keeps_net_admin_and_a_standby_net_raw_too") {
        return;
    }
    let active = format!(
        "[failover]\nrole = \"active\"\npeer = \"127.0.0.1:1\"\nsecret_file = \"KEY\"\n{PLAIN}"
    );
    let p = start("active", &active, "holdfast running");
    let (prm, eff, bnd) = caps(p.child.id());
    assert_eq!(
        prm,
        NET_BIND_SERVICE | SYS_NICE | NET_ADMIN,
        "permitted {prm:x}"
    );
    assert_eq!((eff, bnd), (prm, prm));
    drop(p);

    let standby = format!(
        "[failover]\nrole = \"standby\"\nlisten = \"127.0.0.1:0\"\nsecret_file = \"KEY\"\n\
         service_address = \"127.0.0.200/8\"\ninterface = \"lo\"\n{PLAIN}"
    );
    let p = start("standby", &standby, "waiting for the active");
    let (prm, eff, bnd) = caps(p.child.id());
    assert_eq!(
        prm,
        NET_BIND_SERVICE | SYS_NICE | NET_ADMIN | NET_RAW,
        "permitted {prm:x}"
    );
    assert_eq!((eff, bnd), (prm, prm));
}
