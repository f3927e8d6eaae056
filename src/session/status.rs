//! A live session's published status, for the admin endpoint's `/sessions`.
//!
//! The session task stores its offsets here (relaxed atomics, once per turn
//! of its loop); readers take a consistent-enough snapshot without touching
//! the task. It owns nothing else.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

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
    generation: AtomicU64,
    up: [AtomicU64; 3],
    down: [AtomicU64; 3],
    buffered: AtomicU64,
    /// How a hand-over reaches the session task (see [`Self::request_export`]).
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

#[derive(Debug)]
struct Handover {
    /// The session task's own wake-up token (a child of the process's
    /// close token): cancelled to close the session, or to ask for an export.
    wake: CancellationToken,
    /// A pending export request.
    reply: Option<ExportReply>,
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
        wake: CancellationToken,
        started: Instant,
    ) -> SessionStatus {
        SessionStatus {
            id,
            listener,
            backend,
            client,
            started,
            state: AtomicU8::new(State::Connecting as u8),
            generation: AtomicU64::new(0),
            up: Default::default(),
            down: Default::default(),
            buffered: AtomicU64::new(0),
            handover: Mutex::new(Handover {
                wake,
                reply: None,
                closing: false,
            }),
        }
    }

    fn handover(&self) -> std::sync::MutexGuard<'_, Handover> {
        self.handover.lock().unwrap_or_else(|e| e.into_inner())
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
        h.wake.cancel();
        true
    }

    /// The session task's side: the pending export request, if its wake-up
    /// token was cancelled for one (None: it was cancelled to close).
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

    /// After an export that did not happen: a fresh wake-up token.
    pub(crate) fn rearm(&self, wake: CancellationToken) {
        self.handover().wake = wake;
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
        }
    }
}
