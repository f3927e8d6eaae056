//! Phases a running holdfast goes through, and the shutdown triggers.
//!
//! A [`Phase`] is published on a `watch` channel only after the thing it names
//! is true (`Running` once every listener is bound and accepting), so tests and
//! the binary wait on it instead of sleeping. The shutdown trigger is a
//! [`Shutdown`] value passed to `proxy::run`: tests cancel its tokens, the
//! binary maps signals onto them.

use tokio_util::sync::CancellationToken;

/// Where a running holdfast is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Validating and binding.
    Starting,
    /// Every listener is bound and accepting.
    Running,
    /// No longer accepting; open sessions run until they end or
    /// `drain_timeout` passes.
    Draining,
    /// Every session has ended.
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        }
    }
}

/// The two ways to stop: drain (SIGTERM) and stop now (SIGINT).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop accepting, let sessions finish for up to `drain_timeout`, then
    /// close the rest gracefully.
    pub drain: CancellationToken,
    /// Close every session now (gracefully, for at most a short grace).
    pub stop: CancellationToken,
    /// Cancelled when a new process took over (before `drain`): this
    /// process is no longer the service's main process.
    pub handed_over: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Records that a new process took over.
    pub fn handed_over(&self) {
        self.handed_over.cancel();
    }

    /// Maps SIGTERM to drain and SIGINT to stop (a second signal of either
    /// kind stops at once). Runs until both have fired.
    pub async fn from_signals(self, signals: StopSignals) -> std::io::Result<()> {
        let StopSignals { mut term, mut int } = signals;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    if self.drain.is_cancelled() {
                        tracing::info!("second SIGTERM: stopping now");
                        self.stop.cancel();
                    } else {
                        tracing::info!("SIGTERM: draining");
                        self.drain.cancel();
                    }
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping now");
                    self.stop.cancel();
                }
            }
            if self.stop.is_cancelled() {
                return Ok(());
            }
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment they are registered: register
/// them before anything can signal the process (before "holdfast running"
/// is logged), not in the task that waits for them, which may run later
/// than a signal arrives (their default action would kill the process).
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Registers both; from here on they no longer kill the process.
    pub fn register() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SIGTERM that comes after the signals are registered but before
    /// anything waits for them neither kills the process nor is lost: the
    /// waiting task, started later, drains.
    #[tokio::test]
    async fn a_sigterm_before_anyone_waits_is_caught_and_drains() {
        let signals = StopSignals::register().unwrap();
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM)
            .unwrap();
        let shutdown = Shutdown::new();
        let waiter = tokio::spawn(shutdown.clone().from_signals(signals));
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            shutdown.drain.cancelled(),
        )
        .await
        .expect("the early SIGTERM drains");
        assert!(!shutdown.stop.is_cancelled());
        waiter.abort();
    }
}
