//! Capabilities. `holdfast run` keeps only the capabilities its config
//! needs and drops every other one, before any thread starts (threads
//! inherit the sets), from its bounding set too (so a new process started
//! for a hand-over can gain no more than this one has).
//!
//! What is kept, when the process has it at all:
//! - `CAP_NET_BIND_SERVICE`: listeners on ports below 1024 (also after a
//!   reload);
//! - `CAP_SYS_NICE`: the hand-over threads' raised priority;
//! - `CAP_NET_ADMIN`, with `[failover] role = "active"`: the accept-time
//!   capture (TCP_REPAIR);
//! - `CAP_NET_ADMIN` and `CAP_NET_RAW`, with `role = "standby"`: the
//!   restore (TCP_REPAIR, IP_TRANSPARENT), the service address
//!   (rtnetlink) and the gratuitous ARP (`AF_PACKET`).
//!
//! Everything else (root's CAP_DAC_OVERRIDE, CAP_SYS_ADMIN, CAP_SETUID…)
//! goes. A process with no capabilities is left as it is.

use rustix::thread::{CapabilitySet, CapabilitySets};

use crate::config::{Config, FailoverRole};

/// The capabilities `config` needs.
pub fn needed(config: &Config) -> CapabilitySet {
    let mut keep = CapabilitySet::NET_BIND_SERVICE | CapabilitySet::SYS_NICE;
    match config.failover.as_ref().map(|f| &f.role) {
        Some(FailoverRole::Active { .. }) => keep |= CapabilitySet::NET_ADMIN,
        Some(FailoverRole::Standby { .. }) => {
            keep |= CapabilitySet::NET_ADMIN | CapabilitySet::NET_RAW
        }
        None => {}
    }
    keep
}

/// What [`narrow`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Narrowed {
    /// The permitted set before.
    pub had: CapabilitySet,
    /// The permitted set now.
    pub kept: CapabilitySet,
}

/// Drops every capability of the calling thread not in `keep`: from the
/// bounding set (while CAP_SETPCAP allows it), then from the permitted,
/// effective and inheritable sets (which clears them from the ambient set
/// too). Call it before any other thread exists.
pub fn narrow(keep: CapabilitySet) -> std::io::Result<Narrowed> {
    let sets = rustix::thread::capabilities(None)?;
    if sets.permitted.is_empty() {
        return Ok(Narrowed {
            had: sets.permitted,
            kept: sets.permitted,
        });
    }
    for cap in CapabilitySet::all().iter() {
        if keep.contains(cap) {
            continue;
        }
        // Capabilities this kernel does not know (EINVAL) and a process
        // without CAP_SETPCAP (EPERM) leave the bounding set as it is.
        if rustix::thread::capability_is_in_bounding_set(cap) == Ok(true) {
            let _ = rustix::thread::remove_capability_from_bounding_set(cap);
        }
    }
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: sets.effective & keep,
            permitted: sets.permitted & keep,
            inheritable: sets.inheritable & keep,
        },
    )?;
    Ok(Narrowed {
        had: sets.permitted,
        kept: sets.permitted & keep,
    })
}

/// Capability names, as `/proc/PID/status` decodes them, for the log line.
pub fn names(set: CapabilitySet) -> String {
    let known = [
        (CapabilitySet::NET_BIND_SERVICE, "CAP_NET_BIND_SERVICE"),
        (CapabilitySet::SYS_NICE, "CAP_SYS_NICE"),
        (CapabilitySet::NET_ADMIN, "CAP_NET_ADMIN"),
        (CapabilitySet::NET_RAW, "CAP_NET_RAW"),
    ];
    let names: Vec<&str> = known
        .iter()
        .filter(|(c, _)| set.contains(*c))
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}
