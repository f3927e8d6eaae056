//! The standby mode of `holdfast run`, up to the takeover: accept the
//! active's replication link, mirror it ([`super::standby::follow`]) until
//! it falls silent, then take every mirrored session over
//! ([`super::takeover::take_over`]). The proxy then runs each taken session
//! (`Control::Adopt`) and starts its listeners.

use std::io;

use tokio::net::TcpListener;

use super::announce::Announcer;
use super::link::{self, RecordReader};
use super::mirror::Mirror;
use super::standby::{follow, Ended};
use super::takeover::{take_over, Report};
use crate::config::{FailoverConfig, FailoverRole};

/// Follows the active until it dies, then takes over. Returns the
/// takeover's report (the service address is this host's from then on).
pub async fn standby_until_takeover(cfg: &FailoverConfig) -> io::Result<Report> {
    let FailoverRole::Standby {
        listen,
        service_address,
        prefix,
        interface,
    } = &cfg.role
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a standby configuration",
        ));
    };
    // Opened now: at takeover it would cost an RCU grace period.
    let mut announcer = Announcer::open(interface)?;
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(listen = %listen, service.address = %service_address, "failover: standby, waiting for the active");
    loop {
        let (mut s, peer) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        if let Err(e) = link::handshake_standby(&mut s, &cfg.key.0).await {
            tracing::warn!(peer = %peer, error = %e, "replication link: handshake failed");
            continue;
        }
        tracing::info!(peer = %peer, "replication link up");
        let mut mirror = Mirror::new();
        let mut reader = RecordReader::new(s);
        match follow(&mut reader, &mut mirror, cfg.dead_peer_timeout).await {
            Ended::Silent(silence) => {
                let sessions = mirror.into_sessions();
                tracing::warn!(
                    silence_ms = silence.as_millis() as u64,
                    sessions = sessions.len(),
                    "failover: the active is silent; taking over"
                );
                let (address, prefix) = (*service_address, *prefix);
                let (report, announcer) = tokio::task::spawn_blocking(move || {
                    let r = take_over(sessions, &mut announcer, address, prefix);
                    (r, announcer)
                })
                .await
                .map_err(io::Error::other)?;
                // Closing the AF_PACKET socket waits for an RCU grace period
                // (15-33 ms measured): not on the takeover's path.
                std::thread::spawn(move || drop(announcer));
                let report = report.map_err(io::Error::other)?;
                for (id, e) in &report.failed {
                    tracing::warn!(session.id = %id, error = %e, "failover: session not taken over");
                }
                tracing::info!(
                    sessions = report.taken.len(),
                    failed = report.failed.len(),
                    restore_us = report.restore.as_micros() as u64,
                    claim_us = report.claim.as_micros() as u64,
                    live_us = report.live.as_micros() as u64,
                    "failover: took over"
                );
                return Ok(report);
            }
            Ended::Closed => {
                tracing::info!(peer = %peer, "replication link closed by the active");
            }
            Ended::Broken(e) => {
                tracing::warn!(peer = %peer, error = %e, "replication link broken");
            }
            Ended::Invalid(e) => {
                tracing::warn!(peer = %peer, error = %e, "replication link: invalid record; dropped");
            }
        }
    }
}
