//! A small network of "hosts" for one test: a network namespace per host,
//! each with an `eth0` (and more interfaces on demand) joined to bridges
//! that live in a namespace of their own, so nothing touches the machine's
//! own interfaces or routes.
//!
//! Names are unique per test run (`hf<pid>x<n>-<host>`); everything is
//! deleted when the [`Lab`] is dropped, also when the test panics, and
//! namespaces left by a run whose process is gone are deleted at the next
//! start. Needs root and iproute2: without them [`Lab::new`] prints a SKIP
//! line and returns `None` (the test then passes), unless
//! `HOLDFAST_REQUIRE_NETNS=1` is set, as CI does where namespaces work.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);
const BRIDGE: &str = "br";

pub struct Lab {
    prefix: String,
    hosts: Vec<String>,
}

fn skip(test: &str, why: &str) -> Option<Lab> {
    if std::env::var("HOLDFAST_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{test}: network namespaces required (HOLDFAST_REQUIRE_NETNS=1) but {why}");
    }
    eprintln!("SKIP {test}: {why}");
    None
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes namespaces named by this helper whose process no longer runs.
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("hf")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Lab {
    /// The bridge namespace, or `None` (after a SKIP line) where namespaces
    /// cannot be made.
    pub fn new(test: &str) -> Option<Lab> {
        if !rustix::process::geteuid().is_root() {
            return skip(test, "not root");
        }
        remove_stale();
        let prefix = format!(
            "hf{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            prefix,
            hosts: Vec::new(),
        };
        let br = lab.ns(BRIDGE);
        if let Err(e) = ip(&["netns", "add", &br]) {
            return skip(test, &format!("cannot create a network namespace: {e}"));
        }
        lab.hosts.push(BRIDGE.to_string());
        Some(lab)
    }

    /// The namespace name of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Runs `ip -n <host's namespace> args…`; panics on failure.
    pub fn ip(&self, host: &str, args: &[&str]) -> String {
        let ns = self.ns(host);
        let mut all = vec!["-n", ns.as_str()];
        all.extend_from_slice(args);
        ip(&all).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds a host with `eth0` on bridge `br0` and the given `addr/prefix`es.
    pub fn host(&mut self, host: &str, addrs: &[&str]) {
        assert!(
            host.len() <= 10,
            "host name {host:?} too long for a veth name"
        );
        let ns = self.ns(host);
        ip(&["netns", "add", &ns]).unwrap_or_else(|e| panic!("{e}"));
        self.hosts.push(host.to_string());
        self.ip(host, &["link", "set", "lo", "up"]);
        self.attach(host, "eth0", "br0", addrs);
    }

    /// Gives `host` one more interface, `ifname`, on `bridge` (made on first
    /// use), with the given addresses, and waits (polling, with a deadline)
    /// until its link is up.
    pub fn attach(&mut self, host: &str, ifname: &str, bridge: &str, addrs: &[&str]) {
        let br_ns = self.ns(BRIDGE);
        if !self
            .ip(BRIDGE, &["link", "show"])
            .contains(&format!(": {bridge}:"))
        {
            self.ip(BRIDGE, &["link", "add", bridge, "type", "bridge"]);
            self.ip(BRIDGE, &["link", "set", bridge, "up"]);
        }
        let port = format!("{host}-{ifname}");
        ip(&[
            "link",
            "add",
            ifname,
            "netns",
            &self.ns(host),
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &br_ns,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        self.ip(BRIDGE, &["link", "set", &port, "master", bridge, "up"]);
        for a in addrs {
            self.ip(host, &["addr", "add", a, "dev", ifname]);
        }
        self.ip(host, &["link", "set", ifname, "up"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .ip(host, &["link", "show", ifname])
            .contains("LOWER_UP")
        {
            assert!(Instant::now() < deadline, "{host}: {ifname} never came up");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Cuts `host`'s interface `ifname` off the network: its bridge port
    /// goes down, so nothing it sends (resets of a dying kernel included)
    /// reaches anyone.
    pub fn cut(&self, host: &str, ifname: &str) {
        self.ip(
            BRIDGE,
            &["link", "set", &format!("{host}-{ifname}"), "down"],
        );
    }

    /// Runs a command inside `host`'s namespace (`ip netns exec`), for
    /// diagnostics: its output, or the error.
    pub fn exec(&self, host: &str, cmd: &[&str]) -> String {
        let ns = self.ns(host);
        let mut all = vec!["netns", "exec", ns.as_str()];
        all.extend_from_slice(cmd);
        ip(&all).unwrap_or_else(|e| e)
    }

    /// The MAC address of `host`'s `eth0`.
    pub fn mac(&self, host: &str) -> String {
        let out = self.ip(host, &["link", "show", "eth0"]);
        out.split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no MAC in {out}"))
            .to_string()
    }

    /// Runs `f` on a new thread that lives in `host`'s network namespace:
    /// every socket it makes belongs to that host.
    pub fn spawn<F, T>(&self, host: &str, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.ns(host));
        let name = format!("netns-{host}");
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .expect("spawn thread")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in self.hosts.iter().rev() {
            let _ = ip(&["netns", "del", &self.ns(h)]);
        }
    }
}
