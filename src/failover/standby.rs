//! The standby's side of the replication link, up to the decision: apply
//! every record to the [`Mirror`] and watch for silence. Silence for
//! `dead_peer_timeout` means the active's host is gone, and the caller runs
//! [`super::takeover::take_over`]. Every other ending is not a reason to
//! claim the service address: a clean close is an active that stopped on
//! purpose (or whose process died on a live host, whose kernel then closed
//! the client connections itself), and a broken or invalid link is dropped
//! and rebuilt when the active reconnects.
//!
//! Heartbeat loss does not prove the active's kernel is dead (a paused host
//! keeps its address): fence the active before announcing
//! (docs/failover.md).

use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::time::Instant;

use super::link::{LinkError, RecordReader};
use super::mirror::{Mirror, MirrorError};

/// Why [`follow`] returned.
#[derive(Debug)]
pub enum Ended {
    /// No record for `dead_peer_timeout`: take over. Carries the silence
    /// measured since the last record.
    Silent(Duration),
    /// The active closed the link between records.
    Closed,
    /// The link failed.
    Broken(LinkError),
    /// A record did not fit the mirror.
    Invalid(MirrorError),
}

/// Mirrors the active until the link ends or falls silent.
pub async fn follow<R: AsyncRead + Unpin>(
    reader: &mut RecordReader<R>,
    mirror: &mut Mirror,
    dead_peer_timeout: Duration,
) -> Ended {
    let mut last = Instant::now();
    loop {
        match tokio::time::timeout(dead_peer_timeout, reader.next()).await {
            Ok(Ok(Some(r))) => {
                last = Instant::now();
                if let Err(e) = mirror.apply(r, last.into_std()) {
                    return Ended::Invalid(e);
                }
            }
            Ok(Ok(None)) => return Ended::Closed,
            Ok(Err(e)) => return Ended::Broken(e),
            Err(_) => return Ended::Silent(last.elapsed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::failover::codec::{self, Record};
    use crate::session::SessionId;

    fn wire(records: &[Record]) -> Vec<u8> {
        let mut b = BytesMut::new();
        for r in records {
            codec::encode(r, &mut b);
        }
        b.to_vec()
    }

    /// Follows a link that carries `bytes`, then ends (`close`) or stays
    /// open and silent.
    async fn follow_bytes(bytes: &[u8], close: bool, m: &mut Mirror, timeout: Duration) -> Ended {
        let (mut active, standby) = tokio::io::duplex(4096);
        active.write_all(bytes).await.unwrap();
        let active = (!close).then_some(active);
        let ended = follow(&mut RecordReader::new(standby), m, timeout).await;
        drop(active);
        ended
    }

    #[tokio::test(start_paused = true)]
    async fn silence_after_heartbeats_means_take_over() {
        let mut m = Mirror::new();
        let beats = wire(&[Record::Heartbeat { seq: 1 }, Record::Heartbeat { seq: 2 }]);
        let ended = follow_bytes(&beats, false, &mut m, Duration::from_millis(50)).await;
        assert!(
            matches!(ended, Ended::Silent(d) if d >= Duration::from_millis(50)),
            "{ended:?}"
        );
        assert_eq!(m.heartbeat, 2);
    }

    #[tokio::test]
    async fn a_closed_or_bad_link_is_not_a_takeover() {
        let long = Duration::from_secs(60);
        let beat = wire(&[Record::Heartbeat { seq: 1 }]);
        let ended = follow_bytes(&beat, true, &mut Mirror::new(), long).await;
        assert!(matches!(ended, Ended::Closed), "{ended:?}");

        let unknown = wire(&[Record::Closed { id: SessionId(7) }]);
        let ended = follow_bytes(&unknown, false, &mut Mirror::new(), long).await;
        assert!(
            matches!(ended, Ended::Invalid(MirrorError::Unknown(_))),
            "{ended:?}"
        );

        let ended = follow_bytes(&[0xee; 40], false, &mut Mirror::new(), long).await;
        assert!(
            matches!(ended, Ended::Broken(LinkError::Codec(_))),
            "{ended:?}"
        );
    }
}
