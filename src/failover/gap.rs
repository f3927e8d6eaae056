//! Telling, after a takeover, a session that resumed from one that is stuck
//! across a gap: the client's TCP saw bytes acknowledged by the dead active
//! that the standby never got, so its retransmissions all start beyond the
//! restored `rcv_nxt`. The standby's kernel queues them out of order and the
//! in-order byte count never moves again; without a decision the client
//! would retransmit for about 15 minutes (`tcp_retries2`) and time out.
//!
//! Pure: fed `tcpi_bytes_received` and `tcpi_rcv_ooopack`
//! ([`super::repair::receive_progress`]) and the time. A session counts as
//! across a gap when segments kept arriving out of order while no in-order
//! byte arrived for `patience`; the caller then closes it deliberately
//! ([`super::repair::abort`]) and counts it (`failover_gap`). A client that
//! sends nothing at all after the takeover is not detected: there is
//! nothing to see.

use std::time::{Duration, Instant};

/// Watches one taken-over connection.
#[derive(Debug, Clone)]
pub struct GapWatch {
    received: u64,
    ooo: u32,
    progress_at: Instant,
}

/// What [`GapWatch::check`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// In-order bytes arrived since the last check: the session resumed.
    Resumed,
    /// Nothing decisive yet.
    Waiting,
    /// Out-of-order segments and no in-order byte for `patience`.
    Gap,
}

impl GapWatch {
    /// Starts watching, with the counters read right after the takeover.
    pub fn new(received: u64, ooo: u32, now: Instant) -> GapWatch {
        GapWatch {
            received,
            ooo,
            progress_at: now,
        }
    }

    pub fn check(&mut self, received: u64, ooo: u32, now: Instant, patience: Duration) -> Verdict {
        if received > self.received {
            self.received = received;
            self.ooo = ooo;
            self.progress_at = now;
            return Verdict::Resumed;
        }
        if ooo > self.ooo && now.saturating_duration_since(self.progress_at) >= patience {
            return Verdict::Gap;
        }
        Verdict::Waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_resumes_and_only_out_of_order_arrivals_without_progress_are_a_gap() {
        let t0 = Instant::now();
        let p = Duration::from_secs(3);
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut w = GapWatch::new(100, 5, t0);
        assert_eq!(
            w.check(100, 5, at(5000), p),
            Verdict::Waiting,
            "idle: nothing to see"
        );
        assert_eq!(
            w.check(100, 9, at(1000), p),
            Verdict::Waiting,
            "a loss, not yet patience"
        );
        assert_eq!(
            w.check(132, 9, at(1500), p),
            Verdict::Resumed,
            "the hole was filled"
        );
        assert_eq!(
            w.check(132, 12, at(4000), p),
            Verdict::Waiting,
            "2.5 s since progress"
        );
        assert_eq!(w.check(132, 12, at(4500), p), Verdict::Gap);
    }
}
