//! A live session's published status, for the admin endpoint's `/sessions`.
//!
//! The session task stores its offsets here (relaxed atomics, once per turn
//! of its loop); readers take a consistent-enough snapshot without touching
//! the task. It owns nothing else.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::core::{SessionCore, SessionId};
use crate::config::BackendConfig;
use crate::stream::Dir;

/// What a session is doing, as `/sessions` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Connecting its first leg.
    Connecting = 0,
    /// A leg is up.
    Up = 1,
    /// No working leg: holding the client.
    Held = 2,
    /// Ending.
    Closing = 3,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Connecting,
            1 => State::Up,
            2 => State::Held,
            _ => State::Closing,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Up => "up",
            State::Held => "held",
            State::Closing => "closing",
        }
    }
}

/// The published status of one session.
#[derive(Debug)]
pub struct SessionStatus {
    pub id: SessionId,
    /// Shared with the listener's metrics (no copy per session).
    pub listener: Arc<str>,
    /// The backend's config, for its name (no copy per session).
    pub backend: Arc<BackendConfig>,
    pub client: String,
    pub started: Instant,
    state: AtomicU8,
    /// When bytes last moved between the client and holdfast, in
    /// milliseconds since `started`.
    active_ms: AtomicU64,
    generation: AtomicU64,
    up: [AtomicU64; 3],
    down: [AtomicU64; 3],
    buffered: AtomicU64,
    /// Rung (set) when someone asked the session task for something since
    /// it last looked: a close, or a hand-over's export request. Checked on
    /// every turn of the task's loop, so the common case is one atomic load.
    bell: AtomicBool,
    /// How others reach the session task (see [`Self::request_export`],
    /// [`Self::close`]).
    handover: Mutex<Handover>,
}

/// Where a session task answers a hand-over's request to export it: the
/// exported session, or why it stays in this process. The hand-over decides
/// where the answer goes (its own thread's queue, not a task that the runtime
/// must first schedule).
pub struct ExportReply(
    Box<dyn FnOnce(Result<super::driver::Exported, &'static str>) -> bool + Send>,
);

impl ExportReply {
    pub fn new(
        f: impl FnOnce(Result<super::driver::Exported, &'static str>) -> bool + Send + 'static,
    ) -> ExportReply {
        ExportReply(Box::new(f))
    }

    /// Answers; false when the hand-over is gone (the session then carries
    /// on here: whatever it sent is dropped, and with it the verdict).
    pub fn send(self, r: Result<super::driver::Exported, &'static str>) -> bool {
        (self.0)(r)
    }
}

impl std::fmt::Debug for ExportReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportReply")
    }
}

#[derive(Debug, Default)]
struct Handover {
    /// The task the bell wakes, as it last registered.
    task: Option<Waker>,
    /// A pending export request.
    reply: Option<ExportReply>,
    /// Asked to close (by the process's shutdown, or a failover gap).
    close: bool,
    /// The session is ending: no export.
    closing: bool,
}

/// A snapshot, as JSON.
#[derive(Debug, Serialize)]
pub struct SessionView {
    pub id: String,
    pub listener: String,
    pub backend: String,
    pub client: String,
    pub state: &'static str,
    pub leg_generation: u64,
    pub up: StreamView,
    pub down: StreamView,
    pub buffered_bytes: u64,
    pub age_seconds: f64,
    /// Since bytes last moved between the client and holdfast.
    pub idle_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct StreamView {
    pub read: u64,
    pub sent: u64,
    pub acked: u64,
}

impl SessionStatus {
    pub fn new(
        id: SessionId,
        listener: Arc<str>,
        backend: Arc<BackendConfig>,
        client: String,
        started: Instant,
    ) -> SessionStatus {
        SessionStatus {
            id,
            listener,
            backend,
            client,
            started,
            state: AtomicU8::new(State::Connecting as u8),
            active_ms: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            up: Default::default(),
            down: Default::default(),
            buffered: AtomicU64::new(0),
            bell: AtomicBool::new(false),
            handover: Mutex::new(Handover::default()),
        }
    }

    fn handover(&self) -> std::sync::MutexGuard<'_, Handover> {
        self.handover.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rings the bell: the task looks at what it was asked at its next turn.
    fn ring(&self, h: &Handover) {
        self.bell.store(true, Ordering::Release);
        if let Some(task) = &h.task {
            task.wake_by_ref();
        }
    }

    /// The session task's side: ready once the bell rang since the last
    /// time this returned ready (then see [`Self::take_export`]: an export
    /// request, or else a close). `registered` is the task waker this task
    /// last gave the bell; while it is the same, a poll costs one atomic load.
    #[inline]
    pub(crate) fn poll_bell(
        &self,
        cx: &mut Context<'_>,
        registered: &mut Option<Waker>,
    ) -> Poll<()> {
        let same_task = registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if same_task && !self.bell.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        if !same_task {
            // Registered before the bell is looked at: a ring after the look
            // wakes this task.
            self.handover().task = Some(cx.waker().clone());
            *registered = Some(cx.waker().clone());
        }
        if self.bell.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Asks the session to close gracefully (at its next turn).
    pub fn close(&self) {
        let mut h = self.handover();
        h.close = true;
        self.ring(&h);
    }

    /// Asks the session task to export itself for a hand-over: it answers on
    /// `reply` at its next quiescent point. Returns false (and drops `reply`)
    /// when a request is already pending.
    pub fn request_export(&self, reply: ExportReply) -> bool {
        let mut h = self.handover();
        if h.reply.is_some() || h.closing {
            return false;
        }
        h.reply = Some(reply);
        self.ring(&h);
        true
    }

    /// The session task's side, after the bell rang: the pending export
    /// request, if the bell rang for one (None: it rang to close).
    pub(crate) fn take_export(&self) -> Option<ExportReply> {
        self.handover().reply.take()
    }

    /// The session is ending: a pending export request is answered, later
    /// ones are refused at once.
    pub(crate) fn mark_closing(&self) {
        let mut h = self.handover();
        h.closing = true;
        if let Some(reply) = h.reply.take() {
            let _ = reply.send(Err("closing"));
        }
    }

    /// After an export that did not happen: a close asked for meanwhile
    /// (its ring was taken for the export) rings again.
    pub(crate) fn rearm(&self) {
        let h = self.handover();
        if h.close {
            self.ring(&h);
        }
    }

    /// Publishes the core's current offsets and state.
    pub fn update(&self, core: &SessionCore, had_leg: bool) {
        let state = if core.done().is_some() {
            State::Closing
        } else if let Some(gen) = core.leg_gen() {
            self.generation.store(gen.0, Ordering::Relaxed);
            State::Up
        } else if had_leg {
            State::Held
        } else {
            State::Connecting
        };
        self.state.store(state as u8, Ordering::Relaxed);
        for (dir, cells) in [(Dir::Up, &self.up), (Dir::Down, &self.down)] {
            let s = core.stream(dir);
            cells[0].store(s.read(), Ordering::Relaxed);
            cells[1].store(s.sent(), Ordering::Relaxed);
            cells[2].store(s.acked(), Ordering::Relaxed);
        }
        self.buffered
            .store(core.buffered_bytes(), Ordering::Relaxed);
    }

    /// Publishes when bytes last moved between the client and holdfast
    /// (the caller does it only when that changed).
    pub fn set_active(&self, at: Instant) {
        self.active_ms
            .store(self.ms_since_start(at), Ordering::Relaxed);
    }

    fn ms_since_start(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.started);
        d.as_secs() * 1000 + u64::from(d.subsec_millis())
    }

    /// How long before `now` bytes last moved between the client and
    /// holdfast, as last published (to the millisecond; zero when published
    /// by a task whose clock read came after `now`).
    pub fn idle(&self, now: Instant) -> Duration {
        let since = self
            .ms_since_start(now)
            .saturating_sub(self.active_ms.load(Ordering::Relaxed));
        Duration::from_millis(since)
    }

    /// Whether bytes moved between the client and holdfast less than `d`
    /// before `now`.
    pub fn active_within(&self, now: Instant, d: Duration) -> bool {
        self.idle(now) < d
    }

    pub fn view(&self) -> SessionView {
        let stream = |c: &[AtomicU64; 3]| StreamView {
            read: c[0].load(Ordering::Relaxed),
            sent: c[1].load(Ordering::Relaxed),
            acked: c[2].load(Ordering::Relaxed),
        };
        SessionView {
            id: self.id.to_string(),
            listener: self.listener.to_string(),
            backend: self.backend.name.clone(),
            client: self.client.clone(),
            state: State::from_u8(self.state.load(Ordering::Relaxed)).as_str(),
            leg_generation: self.generation.load(Ordering::Relaxed),
            up: stream(&self.up),
            down: stream(&self.down),
            buffered_bytes: self.buffered.load(Ordering::Relaxed),
            age_seconds: self.started.elapsed().as_secs_f64(),
            idle_seconds: self.idle(Instant::now()).as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> SessionStatus {
        let backend = crate::session::core::tests::backend(crate::config::AckMode::None, 1);
        SessionStatus::new(
            SessionId::random(),
            "l".into(),
            Arc::new(backend),
            "127.0.0.1:1".into(),
            Instant::now(),
        )
    }

    #[test]
    fn activity_is_told_apart_by_age() {
        let s = status();
        let t = |ms: u64| s.started + Duration::from_millis(ms);
        let set = |ms: u64| s.set_active(t(ms));
        let d = Duration::from_millis(100);
        assert!(s.active_within(t(99), d), "a new session counts as active");
        set(5_000);
        assert!(s.active_within(t(5_000), d));
        assert!(s.active_within(t(5_099), d));
        assert!(!s.active_within(t(5_100), d));
        assert_eq!(s.idle(t(65_000)), Duration::from_secs(60));
        assert_eq!(s.idle(t(4_990)), Duration::ZERO, "published after `now`");
        // Sessions live for months: no wrap.
        let days_60 = 60 * 86_400_000;
        set(days_60);
        assert!(s.active_within(t(days_60 + 20), d));
        assert!(!s.active_within(t(days_60 + 1_000), d));
    }

    fn reply() -> ExportReply {
        ExportReply::new(|_| true)
    }

    /// One look at the bell from `task`.
    fn look(
        task: &mut tokio_test::task::Spawn<()>,
        s: &SessionStatus,
        registered: &mut Option<Waker>,
    ) -> Poll<()> {
        task.enter(|cx, _| s.poll_bell(cx, registered))
    }

    #[test]
    fn the_bell_wakes_a_task_that_looked_before_it_rang() {
        let s = status();
        let mut registered = None;
        let mut task = tokio_test::task::spawn(());
        // Looked at twice before the ring: the second look is the fast path.
        assert!(look(&mut task, &s, &mut registered).is_pending());
        assert!(look(&mut task, &s, &mut registered).is_pending());
        assert!(!task.is_woken());
        s.close();
        assert!(task.is_woken(), "a close wakes the session's task");
        assert!(look(&mut task, &s, &mut registered).is_ready());
        assert!(s.take_export().is_none(), "it rang to close");
        // Rung once, answered once.
        assert!(look(&mut task, &s, &mut registered).is_pending());
    }

    #[test]
    fn the_bell_wakes_the_task_that_looked_last() {
        let s = status();
        let mut registered = None;
        let mut first = tokio_test::task::spawn(());
        let mut second = tokio_test::task::spawn(());
        assert!(look(&mut first, &s, &mut registered).is_pending());
        // A session moved to another task (a hand-over that was not taken
        // runs it on) must be woken there.
        assert!(look(&mut second, &s, &mut registered).is_pending());
        assert!(s.request_export(reply()));
        assert!(second.is_woken());
        assert!(look(&mut second, &s, &mut registered).is_ready());
        assert!(s.take_export().is_some(), "it rang for the export");
    }

    #[test]
    fn a_bell_rung_before_the_first_look_is_heard() {
        let s = status();
        s.close();
        let mut registered = None;
        let mut task = tokio_test::task::spawn(());
        assert!(look(&mut task, &s, &mut registered).is_ready());
    }

    #[test]
    fn a_close_asked_during_an_export_comes_after_it_was_not_taken() {
        let s = status();
        let mut registered = None;
        let mut task = tokio_test::task::spawn(());
        assert!(s.request_export(reply()));
        assert!(look(&mut task, &s, &mut registered).is_ready());
        let pending = s.take_export();
        assert!(pending.is_some());
        // The shutdown rings while the task is exporting: the one ring is
        // taken by whatever looks next, so the export's end rings again.
        s.close();
        assert!(look(&mut task, &s, &mut registered).is_ready());
        assert!(look(&mut task, &s, &mut registered).is_pending());
        drop(pending);
        s.rearm();
        assert!(look(&mut task, &s, &mut registered).is_ready());
        assert!(s.take_export().is_none(), "the close");
    }

    #[test]
    fn a_closing_session_refuses_exports() {
        let s = status();
        s.mark_closing();
        assert!(!s.request_export(reply()));
    }
}
