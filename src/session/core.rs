//! \[pure\] The session state machine: legs, hold, reconnect, replay and ack
//! tracking for every ack mode.
//!
//! [`SessionCore`] takes inputs (`on_*` methods, each with `now`) and hands back
//! outputs: the next bytes to write to the server or the client
//! ([`SessionCore::next_write`]), [`Action`]s for the shell (connect, close a
//! leg, deliver a FIN), [`Event`]s to log and count, and a deadline for its
//! timer. It owns no sockets, no clock and no task: `driver.rs` does. Because
//! it is plain data, a session can be tested deterministically, exported and
//! rebuilt.

use std::collections::VecDeque;
use std::fmt;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::{AckMode, BackendConfig, OnServerClose};
use crate::framing::{FrameError, Scanner};
use crate::proto::{
    self, ClientAddr, ErrorCode, Frame, Hello, Incoming, Link, LinkConfig, ProtoError,
};
use crate::stream::{Dir, Offset, ReplayBuffer, Stream};

mod failover;
pub mod snapshot;

pub use failover::{Replicated, ReplicatedError};
pub use snapshot::{SnapshotError, SNAPSHOT_VERSION};

/// Resume protocol: how late an ACK to the server may be.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// A session's random 128-bit id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u128);

impl SessionId {
    pub fn random() -> SessionId {
        SessionId(rand::random())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The number of a leg within its session: 0, 1, 2, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a session ended: a fixed set, used as a log field and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both directions closed normally, the client first.
    ClientClosed,
    /// Both directions closed normally, the server first (or a server close
    /// ended the session: `ack = "none"` or `on_server_close = "close"`).
    ServerClosed,
    /// `ack = "none"`: no server accepted the connection.
    ServerUnreachable,
    /// `ack = "none"`: the server connection failed.
    ServerError,
    /// No working server for `hold_timeout`.
    HoldTimeout,
    /// The client connection failed (reset, IO error).
    ClientError,
    /// A frame longer than `max_frame`.
    FrameTooLarge,
    /// Bytes that break the configured framing.
    MalformedFrame,
    /// A re-sent preamble got a different answer than the original.
    PreambleMismatch,
    /// holdfast shut down (drain timeout or fast stop).
    Shutdown,
    /// A resume-protocol server broke the protocol or refused the session.
    ProtocolError,
    /// A resume-protocol server ended the session (ABORT).
    ServerAborted,
    /// The session would have had to hold while its backend already held
    /// `max_held_sessions`: closed gracefully instead.
    TooManyHeld,
    /// No byte in either direction for the listener's `idle_timeout`:
    /// closed gracefully.
    IdleTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; 14] = [
        CloseReason::ClientClosed,
        CloseReason::ServerClosed,
        CloseReason::ServerUnreachable,
        CloseReason::ServerError,
        CloseReason::HoldTimeout,
        CloseReason::ClientError,
        CloseReason::FrameTooLarge,
        CloseReason::MalformedFrame,
        CloseReason::PreambleMismatch,
        CloseReason::Shutdown,
        CloseReason::ProtocolError,
        CloseReason::ServerAborted,
        CloseReason::TooManyHeld,
        CloseReason::IdleTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ServerClosed => "server_closed",
            CloseReason::ServerUnreachable => "server_unreachable",
            CloseReason::ServerError => "server_error",
            CloseReason::HoldTimeout => "hold_timeout",
            CloseReason::ClientError => "client_error",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::MalformedFrame => "malformed_frame",
            CloseReason::PreambleMismatch => "preamble_mismatch",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::ServerAborted => "server_aborted",
            CloseReason::TooManyHeld => "too_many_held",
            CloseReason::IdleTimeout => "idle_timeout",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a leg (or an attempt to start one) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegFailure {
    /// The server closed its side (FIN) when that is not the normal end.
    Closed,
    /// The server connection was reset or failed with an IO error.
    Error,
    /// The server answered with one of `retry_responses`.
    RetryResponse,
    /// A connect attempt was refused.
    ConnectRefused,
    /// A connect attempt timed out (`connect_timeout`).
    ConnectTimeout,
    /// A connect attempt failed otherwise (unreachable, resolution, ...).
    ConnectError,
    /// Resume protocol: nothing heard from the server for `dead_peer_timeout`.
    DeadPeer,
    /// Resume protocol: no WELCOME within `connect_timeout`.
    HandshakeTimeout,
    /// Resume protocol: the server refused for now (`limit`).
    Refused,
}

impl LegFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            LegFailure::Closed => "closed",
            LegFailure::Error => "error",
            LegFailure::RetryResponse => "retry_response",
            LegFailure::ConnectRefused => "connect_refused",
            LegFailure::ConnectTimeout => "connect_timeout",
            LegFailure::ConnectError => "connect_error",
            LegFailure::DeadPeer => "dead_peer",
            LegFailure::HandshakeTimeout => "handshake_timeout",
            LegFailure::Refused => "refused",
        }
    }

    fn is_connect(self) -> bool {
        matches!(
            self,
            LegFailure::ConnectRefused | LegFailure::ConnectTimeout | LegFailure::ConnectError
        )
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Connect to `backend.servers[server]`; report with `on_connected` or
    /// `on_connect_failed` tagged `gen`.
    Connect { gen: Generation, server: usize },
    /// Drop the connection (or the connect attempt) of leg `gen`.
    CloseLeg { gen: Generation },
    /// Shut down the write side of leg `gen`: the client's FIN, delivered.
    ShutdownServer { gen: Generation },
    /// Shut down the write side of the client connection: the server's FIN
    /// (or the session's graceful end), delivered.
    ShutdownClient,
}

/// Something to log and count.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A leg is connected. `resumed` when it is not the session's first;
    /// `replay` is what it will re-send; `held` how long the session had no
    /// working leg.
    LegUp {
        gen: Generation,
        server: usize,
        resumed: bool,
        replay: u64,
        held: Option<Duration>,
    },
    /// A leg or a connect attempt failed; the session holds and retries
    /// (unless it ends: a `Closed` event follows then).
    LegFailed {
        gen: Generation,
        server: usize,
        reason: LegFailure,
    },
    /// The session started to hold (no working leg).
    HoldStarted,
    /// A resume-protocol server answered a HELLO with a WELCOME of this
    /// version (the shell remembers whether it takes early data).
    Welcomed { server: usize, version: u8 },
    /// Bytes of the up stream went as early data, before the WELCOME.
    EarlyData { bytes: u64 },
    /// The session ends: no more inputs matter.
    Closed { reason: CloseReason },
}

#[derive(Debug)]
enum LegState {
    /// Waiting until `at` to connect to `server`.
    Waiting {
        at: Instant,
        server: usize,
    },
    /// The shell is connecting.
    Connecting {
        gen: Generation,
        server: usize,
    },
    Up(Box<Leg>),
    /// No leg, and none will be made (the session is ending, or the server
    /// closed and the session runs on half-closed).
    None,
}

/// The working connection to a server.
#[derive(Debug)]
struct Leg {
    gen: Generation,
    server: usize,
    /// `up.sent` (= `up.acked`) when the leg started: tcp acks count from here.
    base: Offset,
    /// Bytes to write before the stream's: the preamble's requests
    /// (response mode) or the HELLO (resume protocol).
    prefix_out: Bytes,
    /// Preamble responses still expected, in order, byte for byte.
    preamble_expect: VecDeque<Bytes>,
    /// Response frames seen on this leg that were greetings.
    greeting_seen: u32,
    /// The client's FIN was handed to the shell for this leg.
    fin_sent: bool,
    /// The server closed its side (only kept when that ends the session).
    server_eof: bool,
    /// Response mode: server bytes not yet forming a whole frame.
    resp: Option<Box<RespLeg>>,
    /// Resume protocol: the HELLO sent, until the WELCOME arrives.
    hello: Option<Box<Hello>>,
    /// Resume protocol: when the HELLO was queued (handshake timeout).
    hello_at: Instant,
    /// Resume protocol: the established leg.
    link: Option<Box<Link>>,
    /// Resume protocol, a new session's leg to a server known to speak
    /// version 2: until the WELCOME, the up stream's first bytes go after
    /// the HELLO as they come (early data, up to `EARLY_DATA_MAX`).
    early: bool,
}

#[derive(Debug)]
struct RespLeg {
    scanner: Scanner,
    /// Leg-local server bytes `[start, end)` not yet released as frames.
    pending: ReplayBuffer,
    /// `[pending.start, deliver_to)` are whole frames approved for the
    /// client, moved to the down stream in one go by `flush_responses`.
    deliver_to: u64,
}

/// Frames the up stream's next unsent bytes, up to
/// [`proto::EARLY_DATA_MAX`] of the stream in all, as one DATA frame after
/// what `prefix_out` still holds (the HELLO, or what is left of it), and
/// counts them as sent: early data (protocol §3.6). Returns the bytes
/// framed.
fn early_data(up: &mut Stream, prefix_out: &mut Bytes) -> u64 {
    let room = (proto::EARLY_DATA_MAX as u64).saturating_sub(up.sent());
    let n = up.unsent().min(room) as usize;
    if n == 0 {
        return 0;
    }
    let mut out = bytes::BytesMut::with_capacity(prefix_out.len() + proto::HEADER_LEN + n);
    out.extend_from_slice(prefix_out);
    out.extend_from_slice(&proto::data_header(n));
    let mut left = n;
    for chunk in up.buffer().chunks_after(up.sent()) {
        let k = chunk.len().min(left);
        out.extend_from_slice(&chunk[..k]);
        left -= k;
        if left == 0 {
            break;
        }
    }
    *prefix_out = out.freeze();
    up.on_sent(n as u64);
    n as u64
}

/// A vector one call borrows from its thread for as long as it runs (frame
/// ends found in a chunk, response pieces on their way down), so that no
/// session keeps one between calls: an idle session holds none. Dropping
/// it gives it back, emptied; one that grew past [`SCRATCH_KEEP`] entries
/// is freed instead.
struct Scratch<T: Pooled>(Vec<T>);

/// Most entries a thread's scratch vector keeps room for between calls.
const SCRATCH_KEEP: usize = 4096;

/// The element types with a scratch vector per thread.
trait Pooled: Sized + 'static {
    fn slot() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<Self>>>;
}

thread_local! {
    static SCRATCH_ENDS: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
    static SCRATCH_PIECES: std::cell::Cell<Vec<Bytes>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Pooled for u64 {
    fn slot() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<u64>>> {
        &SCRATCH_ENDS
    }
}

impl Pooled for Bytes {
    fn slot() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<Bytes>>> {
        &SCRATCH_PIECES
    }
}

impl<T: Pooled> Scratch<T> {
    /// The thread's vector (empty), or a new one while another call holds it.
    fn take() -> Scratch<T> {
        Scratch(
            T::slot()
                .try_with(std::cell::Cell::take)
                .unwrap_or_default(),
        )
    }
}

impl<T: Pooled> std::ops::Deref for Scratch<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T: Pooled> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.0
    }
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        if v.capacity() > SCRATCH_KEEP {
            return;
        }
        v.clear();
        // (During the thread's own exit there is nothing to give back to.)
        let _ = T::slot().try_with(|slot| slot.set(v));
    }
}

/// A first-in first-out queue of a session's actions, which come one or
/// two at a time (a connect, a shutdown, a close): the oldest is held
/// inline, so most never allocate, and the rest go to a queue that is
/// freed once drained, so an idle session holds no allocation for them.
#[derive(Debug)]
struct Queue<T> {
    /// The oldest item; `None` only when `rest` is empty too.
    head: Option<T>,
    rest: VecDeque<T>,
}

impl<T> Queue<T> {
    const fn new() -> Queue<T> {
        Queue {
            head: None,
            rest: VecDeque::new(),
        }
    }

    fn push_back(&mut self, item: T) {
        if self.head.is_none() {
            self.head = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    fn pop_front(&mut self) -> Option<T> {
        let item = self.head.take()?;
        self.head = self.rest.pop_front();
        if self.head.is_none() && self.rest.capacity() != 0 {
            self.rest = VecDeque::new();
        }
        Some(item)
    }

    fn is_empty(&self) -> bool {
        self.head.is_none()
    }
}

/// The pure state of one session.
pub struct SessionCore {
    id: SessionId,
    backend: Arc<BackendConfig>,
    /// Client to server.
    up: Stream,
    /// Server to client. `acked` = `sent` = bytes written to the client.
    down: Stream,
    leg: LegState,
    /// The generation the next leg gets.
    next_gen: Generation,
    /// Whether any leg has been up (later ones are resumes).
    had_leg: bool,
    /// Failed connect attempts since the last working leg.
    attempts: u32,
    /// Retry responses in a row (reset by a real answer): their backoff grows.
    retries: u32,
    /// Since when the session has had no working leg (or no progress).
    hold_since: Option<Instant>,
    /// `up.acked` when the hold started: progress past it ends the hold.
    hold_acked: Offset,
    /// Response mode: request frame scanner over the up stream (boxed: 120
    /// bytes that sessions of the other modes do not carry).
    req_scanner: Option<Box<Scanner>>,
    /// Response mode: ends of the requests read and not yet answered, in order.
    req_ends: VecDeque<Offset>,
    /// Response mode: end of the last request frame scanned.
    req_last_end: Offset,
    /// Resume protocol: the server has accepted this session once (later
    /// legs resume it).
    resume_known: bool,
    /// Resume protocol: the most of the up stream ever sent (a WELCOME may
    /// say the server consumed up to here).
    up_sent_high: Offset,
    /// Why the session failed, in words, for the log.
    error: Option<String>,
    /// The client's address, for the resume protocol's HELLO.
    client_addr: ClientAddr,
    /// Requests answered so far (for the preamble).
    answered: u64,
    /// Captured preamble: (request, original response), in order.
    preamble: Vec<(Bytes, Bytes)>,
    /// Greeting frames delivered to the client so far.
    greeting_delivered: u32,
    /// [`Action::ShutdownClient`] was issued.
    client_fin_queued: bool,
    /// The client's FIN was delivered (shutdown of the client write side).
    client_fin_sent: bool,
    /// Who closed first, for the normal end.
    first_closer: Option<CloseReason>,
    /// A graceful end is under way: deliver `down`, FIN the client, stop.
    ending: Option<CloseReason>,
    done: Option<CloseReason>,
    actions: Queue<Action>,
    events: VecDeque<Event>,
    rng: u64,
    /// The listener's `idle_timeout`: `None` never ends a session for
    /// silence.
    idle_timeout: Option<Duration>,
    /// When the last byte moved between the client and holdfast (read from
    /// it or written to it); the session start before that.
    last_activity: Instant,
}

impl fmt::Debug for SessionCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCore")
            .field("id", &self.id)
            .field("up", &(self.up.read(), self.up.sent(), self.up.acked()))
            .field(
                "down",
                &(self.down.read(), self.down.sent(), self.down.acked()),
            )
            .field("leg", &self.leg)
            .field("done", &self.done)
            .finish()
    }
}

impl SessionCore {
    /// A new session; it asks to connect to `first_server` at once.
    pub fn new(
        id: SessionId,
        backend: Arc<BackendConfig>,
        first_server: usize,
        now: Instant,
    ) -> SessionCore {
        let req_scanner = match &backend.ack {
            AckMode::Response(framing) => Some(Box::new(Scanner::new(framing))),
            _ => None,
        };
        let mut core = SessionCore {
            id,
            up: Stream::new(),
            down: Stream::new(),
            leg: LegState::Waiting {
                at: now,
                server: first_server % backend.servers.len().max(1),
            },
            next_gen: Generation(0),
            had_leg: false,
            attempts: 0,
            retries: 0,
            hold_since: Some(now),
            hold_acked: 0,
            req_scanner,
            req_ends: VecDeque::new(),
            req_last_end: 0,
            resume_known: false,
            up_sent_high: 0,
            error: None,
            client_addr: ClientAddr::Unknown,
            answered: 0,
            preamble: Vec::new(),
            greeting_delivered: 0,
            client_fin_queued: false,
            client_fin_sent: false,
            first_closer: None,
            ending: None,
            done: None,
            actions: Queue::new(),
            events: VecDeque::new(),
            rng: (id.0 as u64) ^ ((id.0 >> 64) as u64) | 1,
            idle_timeout: None,
            last_activity: now,
            backend,
        };
        core.step(now);
        core
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The client's address (carried to resume-protocol servers).
    pub fn set_client_addr(&mut self, addr: ClientAddr) {
        self.client_addr = addr;
    }

    /// Why the session failed, in words, when a peer gave a reason.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether server legs carry resume-protocol frames (the shell decodes
    /// them and calls [`SessionCore::on_server_frame`]).
    pub fn framed_legs(&self) -> bool {
        matches!(self.backend.ack, AckMode::Resume(_))
    }

    /// The largest DATA frame this side accepts on a resume leg.
    pub fn max_frame_in(&self) -> u32 {
        match &self.backend.ack {
            AckMode::Resume(s) => s.max_frame,
            _ => 0,
        }
    }

    pub fn backend(&self) -> &Arc<BackendConfig> {
        &self.backend
    }

    pub fn stream(&self, dir: Dir) -> &Stream {
        match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
    }

    /// The current leg's generation, if one is up.
    pub fn leg_gen(&self) -> Option<Generation> {
        match &self.leg {
            LegState::Up(leg) => Some(leg.gen),
            _ => None,
        }
    }

    /// New settings for the session's next legs (a reload). The ack mode
    /// must be the same; the caller checks.
    pub fn set_backend(&mut self, backend: Arc<BackendConfig>) {
        debug_assert!(backend.ack == self.backend.ack);
        let n = backend.servers.len().max(1);
        match &mut self.leg {
            LegState::Waiting { server, .. } | LegState::Connecting { server, .. } => *server %= n,
            _ => {}
        }
        self.backend = backend;
    }

    /// Whether the session has no working leg and wants one.
    pub fn is_held(&self) -> bool {
        matches!(
            self.leg,
            LegState::Waiting { .. } | LegState::Connecting { .. }
        ) && self.done.is_none()
    }

    /// Whether the session lost its server (a leg failed, or a connect
    /// failed) and has none yet: what `max_held_sessions` counts. Unlike
    /// [`SessionCore::is_held`], a first connect that has not failed is not
    /// holding.
    pub fn is_holding(&self) -> bool {
        self.is_held() && (self.had_leg || self.attempts > 0)
    }

    /// The listener's `idle_timeout` (call once, after `new`).
    pub fn set_idle_timeout(&mut self, idle: Option<Duration>, now: Instant) {
        self.idle_timeout = idle;
        self.last_activity = now;
    }

    /// The shell could not count this session as held: its backend holds
    /// `max_held_sessions` already. Ends it gracefully (`too_many_held`).
    pub fn on_hold_refused(&mut self, now: Instant) {
        if self.done.is_none() && self.ending.is_none() {
            self.close_leg();
            self.end_gracefully(CloseReason::TooManyHeld, now);
            self.step(now);
        }
    }

    /// Set once the session is over; the shell then closes everything.
    pub fn done(&self) -> Option<CloseReason> {
        self.done
    }

    /// When bytes last moved between the client and holdfast (the session's
    /// start before that).
    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    /// Bytes this session holds in memory (replay buffers, partial frames,
    /// the captured preamble).
    pub fn buffered_bytes(&self) -> u64 {
        let pending = match &self.leg {
            LegState::Up(leg) => leg.resp.as_ref().map_or(0, |r| r.pending.len()),
            _ => 0,
        };
        let preamble: usize = self.preamble.iter().map(|(a, b)| a.len() + b.len()).sum();
        self.up.buffered() + self.down.buffered() + pending + preamble as u64
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.events.pop_front();
        if e.is_none() && self.events.capacity() != 0 {
            // Events are rare (legs up and failed, the end), and larger than
            // actions: an idle session keeps no queue for them.
            self.events = VecDeque::new();
        }
        e
    }

    /// When the shell must call [`SessionCore::on_timeout`] next.
    pub fn deadline(&self) -> Option<Instant> {
        if self.done.is_some() {
            return None;
        }
        let wait = match self.leg {
            LegState::Waiting { at, .. } => Some(at),
            _ => None,
        };
        let hold = if matches!(self.backend.ack, AckMode::None) || self.ending.is_some() {
            None
        } else {
            self.hold_since.map(|t| t + self.backend.hold_timeout)
        };
        let link = match &self.leg {
            LegState::Up(leg) if leg.hello.is_some() => {
                Some(leg.hello_at + self.backend.connect_timeout)
            }
            LegState::Up(leg) => leg.link.as_ref().map(|l| l.deadline()),
            _ => None,
        };
        let idle = match self.idle_timeout {
            Some(d) if self.ending.is_none() => Some(self.last_activity + d),
            _ => None,
        };
        [wait, hold, link, idle].into_iter().flatten().min()
    }

    /// Whether the shell should read from the client now.
    pub fn want_read_client(&self) -> bool {
        self.done.is_none()
            && self.ending.is_none()
            && !self.up.fin_read()
            && self.up.buffered() < self.backend.buffer_limit
    }

    /// Whether the shell should read from the server of leg `gen` now.
    pub fn want_read_server(&self) -> bool {
        match &self.leg {
            LegState::Up(leg) => {
                let pending = leg.resp.as_ref().map_or(0, |r| r.pending.len());
                // A resume leg is read past the server's FIN: the ACK of
                // ours is still to come.
                self.done.is_none()
                    && (!leg.server_eof || leg.link.is_some())
                    && self.down.buffered() + pending < self.backend.buffer_limit
            }
            _ => false,
        }
    }

    /// The next bytes to write towards `dir`'s destination (shared, not
    /// copied). For `Up` only while a leg is up.
    pub fn next_write(&self, dir: Dir) -> Option<Bytes> {
        if self.done.is_some() {
            return None;
        }
        match dir {
            Dir::Up => match &self.leg {
                LegState::Up(leg) if !leg.prefix_out.is_empty() => Some(leg.prefix_out.clone()),
                LegState::Up(leg) if leg.fin_sent => None,
                LegState::Up(_) => self.up.next_unsent(),
                _ => None,
            },
            Dir::Down => {
                if self.client_fin_queued {
                    None
                } else {
                    self.down.next_unsent()
                }
            }
        }
    }

    /// Up to `max` chunks to write towards the server, for a vectored write.
    pub fn next_writes_up(&self, max: usize, out: &mut Vec<Bytes>) {
        let LegState::Up(leg) = &self.leg else {
            return;
        };
        if self.done.is_some() {
            return;
        }
        if !leg.prefix_out.is_empty() {
            out.push(leg.prefix_out.clone());
        } else if let Some(link) = &leg.link {
            link.wire(max, out);
        } else if leg.hello.is_none() && !leg.fin_sent {
            self.up.buffer().chunks_from(self.up.sent(), max, out);
        }
    }

    /// The same bytes as [`SessionCore::next_writes_up`], as slices
    /// borrowing them (no `Bytes` clones), for a vectored write. Returns how
    /// many slices of `out` it filled.
    pub fn up_io_slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let LegState::Up(leg) = &self.leg else {
            return 0;
        };
        if self.done.is_some() || out.is_empty() {
            return 0;
        }
        if !leg.prefix_out.is_empty() {
            out[0] = IoSlice::new(&leg.prefix_out);
            1
        } else if let Some(link) = &leg.link {
            link.wire_slices(out)
        } else if leg.hello.is_none() && !leg.fin_sent {
            self.up.buffer().io_slices_from(self.up.sent(), out)
        } else {
            0
        }
    }

    /// Whether [`SessionCore::up_io_slices`] would fill any slice: a cheap
    /// test before the shell sets up a vectored write.
    pub fn has_up_writes(&self) -> bool {
        let LegState::Up(leg) = &self.leg else {
            return false;
        };
        if self.done.is_some() {
            return false;
        }
        if !leg.prefix_out.is_empty() {
            true
        } else if let Some(link) = &leg.link {
            link.has_wire()
        } else {
            leg.hello.is_none() && !leg.fin_sent && self.up.unsent() > 0
        }
    }

    /// The bytes to write to the client, as slices borrowing them, for a
    /// vectored write: what [`SessionCore::next_write`]`(Dir::Down)` starts.
    pub fn down_io_slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        if self.done.is_some() || self.client_fin_queued {
            return 0;
        }
        self.down.buffer().io_slices_from(self.down.sent(), out)
    }

    /// Whether the shell may move bytes of `dir` from source to
    /// destination itself (splice(2), `ack = "none"` only) and report them
    /// with [`SessionCore::on_passed_through`]: a leg is up with nothing of
    /// its own to send or parse, the core would read `dir`'s source now, and
    /// everything read in `dir` is written (so no byte overtakes a held one).
    pub fn can_pass_through(&self, dir: Dir) -> bool {
        if !matches!(self.backend.ack, AckMode::None)
            || self.done.is_some()
            || self.ending.is_some()
        {
            return false;
        }
        let LegState::Up(leg) = &self.leg else {
            return false;
        };
        if !leg.prefix_out.is_empty()
            || !leg.preamble_expect.is_empty()
            || leg.resp.is_some()
            || leg.hello.is_some()
            || leg.link.is_some()
        {
            return false;
        }
        match dir {
            Dir::Up => !leg.fin_sent && self.want_read_client() && self.up.buffered() == 0,
            Dir::Down => {
                !leg.server_eof
                    && !self.client_fin_queued
                    && self.want_read_server()
                    && self.down.buffered() == 0
            }
        }
    }

    /// `n` bytes of `dir` went from source to destination outside the core
    /// (see [`SessionCore::can_pass_through`]): read, sent and acked at once.
    pub fn on_passed_through(&mut self, dir: Dir, n: usize, now: Instant) {
        if n == 0 || self.done.is_some() {
            return;
        }
        self.last_activity = now;
        match dir {
            Dir::Up => {
                self.up.pass_through(n as u64);
                self.up_sent_high = self.up_sent_high.max(self.up.sent());
            }
            Dir::Down => self.down.pass_through(n as u64),
        }
        self.step(now);
    }

    // ---- client side inputs ----

    /// Bytes from the client.
    pub fn on_client_data(&mut self, chunk: Bytes, now: Instant) {
        if self.done.is_some() || self.up.fin_read() || chunk.is_empty() {
            return;
        }
        self.last_activity = now;
        let Some(scanner) = &mut self.req_scanner else {
            self.up.push(chunk);
            self.step(now);
            return;
        };
        let mut ends = Scratch::<u64>::take();
        let res = scanner.scan(&chunk, &mut ends);
        let no_reply_possible = matches!(**scanner, Scanner::Resp(_));
        self.up.push(chunk);
        if self.req_ends.capacity() == 0 && !ends.is_empty() {
            // One request at a time is the common case: room for that only
            // (an idle session keeps the queue).
            self.req_ends.reserve_exact(ends.len());
        }
        if no_reply_possible {
            for &end in ends.iter() {
                let start = std::mem::replace(&mut self.req_last_end, end);
                // Redis answers nothing to an empty inline line or an empty
                // array.
                if end - start <= 5 && is_resp_no_reply(&self.up.buffer().copy_range(start, end)) {
                    continue;
                }
                self.req_ends.push_back(end);
            }
        } else if let Some(&last) = ends.last() {
            // Every frame is a request that gets an answer.
            self.req_last_end = last;
            self.req_ends.extend(ends.iter().copied());
        }
        if let Err(e) = res {
            self.abort(frame_reason(&e), now);
            return;
        }
        self.step(now);
    }

    /// The client closed its side (FIN).
    pub fn on_client_eof(&mut self, now: Instant) {
        if self.done.is_some() || self.up.fin_read() {
            return;
        }
        self.up.set_fin();
        self.first_closer.get_or_insert(CloseReason::ClientClosed);
        if self.ending.is_some() || matches!(self.leg, LegState::None) {
            // Nobody to deliver it to: the session is over once the client
            // has what it is owed.
            self.ending.get_or_insert(CloseReason::ClientClosed);
        }
        self.step(now);
    }

    /// The client connection failed (reset, IO error).
    pub fn on_client_error(&mut self, now: Instant) {
        self.abort(CloseReason::ClientError, now);
    }

    /// `n` bytes of the last [`SessionCore::next_write`]`(Dir::Down)` were
    /// written to the client.
    pub fn on_client_written(&mut self, n: usize, now: Instant) {
        if n > 0 {
            self.last_activity = now;
        }
        self.down.on_sent(n as u64);
        let sent = self.down.sent();
        self.down.ack_to(sent);
        self.step(now);
    }

    /// The shell delivered [`Action::ShutdownClient`].
    pub fn on_client_shutdown(&mut self, now: Instant) {
        self.client_fin_sent = true;
        self.step(now);
    }

    // ---- server side inputs ----

    /// Leg `gen` connected. `early_data` (resume protocol): the server is
    /// known to speak version 2, so a new session's first bytes may follow
    /// the HELLO at once, before its WELCOME (§3.6 of the protocol).
    pub fn on_connected(&mut self, gen: Generation, early_data: bool, now: Instant) {
        let server = match self.leg {
            LegState::Connecting { gen: g, server } if g == gen => server,
            _ => {
                // A stale connect: drop it.
                self.actions.push_back(Action::CloseLeg { gen });
                return;
            }
        };
        let resumed = self.had_leg;
        self.had_leg = true;
        self.attempts = 0;
        let replay = self.up.unsent();
        let (prefix_out, preamble_expect) = if resumed && !self.preamble.is_empty() {
            let mut out = Vec::new();
            let mut expect = VecDeque::new();
            for (req, resp) in &self.preamble {
                out.extend_from_slice(req);
                expect.push_back(resp.clone());
            }
            (Bytes::from(out), expect)
        } else {
            (Bytes::new(), VecDeque::new())
        };
        let resp = match &self.backend.ack {
            AckMode::Response(framing) => Some(RespLeg {
                scanner: Scanner::new(framing),
                pending: ReplayBuffer::new(0),
                deliver_to: 0,
            }),
            _ => None,
        };
        let (prefix_out, hello) = match &self.backend.ack {
            AckMode::Resume(settings) => {
                let mut hello = Hello {
                    version_min: proto::VERSION,
                    version_max: proto::VERSION_MAX,
                    resume: self.resume_known,
                    session_id: self.id.0.to_be_bytes(),
                    epoch: if self.resume_known { gen.0.max(1) } else { 0 },
                    recv_offset: if self.resume_known {
                        self.down.read()
                    } else {
                        0
                    },
                    max_frame: settings.max_frame,
                    window: settings.window,
                    heartbeat_ms: settings
                        .heartbeat_interval
                        .as_millis()
                        .min(u32::MAX as u128) as u32,
                    client: self.client_addr,
                    token: [0; 32],
                };
                if !self.resume_known {
                    // A new session's leg sends nothing before the WELCOME
                    // but its early data (no WELCOME ever came, so nothing
                    // was ever acknowledged: it starts from the beginning).
                    self.up.resume_from(0);
                }
                (hello.encode(&settings.key.0), Some(hello))
            }
            _ => (prefix_out, None),
        };
        let hello_sent = hello.is_some();
        self.leg = LegState::Up(Box::new(Leg {
            gen,
            server,
            base: self.up.sent(),
            prefix_out,
            preamble_expect,
            greeting_seen: 0,
            fin_sent: false,
            server_eof: false,
            resp: resp.map(Box::new),
            hello: hello.map(Box::new),
            hello_at: now,
            link: None,
            early: early_data && hello_sent && !self.resume_known,
        }));
        let held = self.hold_since.map(|t| now.saturating_duration_since(t));
        self.events.push_back(Event::LegUp {
            gen,
            server,
            resumed,
            replay,
            held,
        });
        self.step(now);
    }

    /// A connect attempt for leg `gen` failed.
    pub fn on_connect_failed(&mut self, gen: Generation, reason: LegFailure, now: Instant) {
        let server = match self.leg {
            LegState::Connecting { gen: g, server } if g == gen => server,
            _ => return,
        };
        self.events.push_back(Event::LegFailed {
            gen,
            server,
            reason,
        });
        self.attempts += 1;
        let n = self.backend.servers.len().max(1);
        if matches!(self.backend.ack, AckMode::None) {
            // A plain proxy tries each server once, then gives up.
            if self.attempts as usize >= n {
                self.leg = LegState::None;
                self.end_gracefully(CloseReason::ServerUnreachable, now);
            } else {
                self.leg = LegState::Waiting {
                    at: now,
                    server: (server + 1) % n,
                };
            }
            self.step(now);
            return;
        }
        // The same server first, then the others; a full round backs off.
        let delay = if self.attempts as usize % n != 0 {
            Duration::ZERO
        } else {
            self.backoff(self.attempts / n as u32)
        };
        self.leg = LegState::Waiting {
            at: now + delay,
            server: (server + 1) % n,
        };
        self.step(now);
    }

    /// Bytes from the server of leg `gen`.
    pub fn on_server_data(&mut self, gen: Generation, chunk: Bytes, now: Instant) {
        if self.done.is_some() || chunk.is_empty() {
            return;
        }
        let LegState::Up(leg) = &mut self.leg else {
            return;
        };
        if leg.gen != gen {
            return;
        }
        let Some(resp) = &mut leg.resp else {
            self.down.push(chunk);
            self.step(now);
            return;
        };
        let mut ends = Scratch::<u64>::take();
        let res = resp.scanner.scan(&chunk, &mut ends);
        resp.pending.push(chunk);
        if let Err(e) = res {
            // The server broke the framing: that is not the client's fault,
            // but the stream can't be cut into responses any more.
            self.abort(frame_reason(&e), now);
            return;
        }
        // The answered requests are acknowledged once per chunk, not once
        // per frame (`on_response_frame` applies it early where it must).
        let mut ack = None;
        if self.plain_responses() {
            // Nothing to check per frame: each answers the oldest request.
            self.answer_all(&ends, &mut ack);
        } else {
            for &end in ends.iter() {
                if !self.on_response_frame(gen, end, now, &mut ack) {
                    break;
                }
            }
        }
        if let Some(a) = ack {
            self.up.ack_to(a);
        }
        self.flush_responses();
        self.step(now);
    }

    /// Whether response frames need no check of their own now: the greeting
    /// is past, no retry prefixes, no preamble answer expected or captured.
    /// Then each frame only answers the oldest request
    /// ([`SessionCore::answer_all`]), exactly as
    /// [`SessionCore::on_response_frame`] would.
    fn plain_responses(&self) -> bool {
        let LegState::Up(leg) = &self.leg else {
            return false;
        };
        leg.greeting_seen >= self.backend.greeting
            && self.backend.retry_responses.is_empty()
            && leg.preamble_expect.is_empty()
            && (self.answered as u128) >= self.backend.preamble as u128
    }

    /// [`SessionCore::on_response_frame`] for every frame ending at `ends`,
    /// when [`SessionCore::plain_responses`]: pops one request per frame
    /// (while there are any), and delivers up to the last frame.
    fn answer_all(&mut self, ends: &[u64], ack: &mut Option<Offset>) {
        let Some(&last) = ends.last() else { return };
        let LegState::Up(leg) = &mut self.leg else {
            return;
        };
        let resp = leg.resp.as_mut().expect("response mode");
        let n = ends.len().min(self.req_ends.len());
        if let Some(req_end) = self.req_ends.drain(..n).next_back() {
            self.answered += n as u64;
            self.retries = 0;
            *ack = Some(req_end);
        }
        resp.deliver_to = last;
    }

    /// One whole response frame ends at leg-local offset `end`. Returns false
    /// when the leg or the session ended. The up stream offset the answered
    /// requests end at goes to `ack` (for the caller to acknowledge once);
    /// it is applied here before anything that reads `up.acked`.
    fn on_response_frame(
        &mut self,
        gen: Generation,
        end: u64,
        now: Instant,
        ack: &mut Option<Offset>,
    ) -> bool {
        let LegState::Up(leg) = &mut self.leg else {
            return false;
        };
        if leg.gen != gen {
            return false;
        }
        let resp = leg.resp.as_mut().expect("response mode");
        // Frames are consecutive: this one starts where the last one ended,
        // whether that one was approved for the client or swallowed.
        let start = resp.deliver_to.max(resp.pending.start());

        if leg.greeting_seen < self.backend.greeting {
            leg.greeting_seen += 1;
            if self.greeting_delivered < self.backend.greeting {
                self.greeting_delivered += 1;
                resp.deliver_to = end;
            } else {
                self.swallow_response(end);
            }
            return true;
        }
        let is_retry = self
            .backend
            .retry_responses
            .iter()
            .any(|p| resp.pending.starts_with_at(start, p));
        if is_retry {
            if let Some(a) = ack.take() {
                self.up.ack_to(a);
            }
            self.flush_responses();
            self.leg_failed(LegFailure::RetryResponse, now);
            return false;
        }
        if let Some(expected) = leg.preamble_expect.pop_front() {
            if resp.pending.copy_range(start, end) != expected {
                if let Some(a) = ack.take() {
                    self.up.ack_to(a);
                }
                self.flush_responses();
                self.abort(CloseReason::PreambleMismatch, now);
                return false;
            }
            self.swallow_response(end);
            return true;
        }
        if let Some(req_end) = self.req_ends.pop_front() {
            if (self.answered as u128) < self.backend.preamble as u128 {
                // The request starts where the last answered one ended.
                let req_start = ack.unwrap_or(self.up.acked());
                let req = self.up.buffer().copy_range(req_start, req_end);
                self.preamble
                    .push((req, resp.pending.copy_range(start, end)));
            }
            self.answered += 1;
            self.retries = 0;
            *ack = Some(req_end);
        }
        resp.deliver_to = end;
        true
    }

    /// Moves the response frames approved for the client (whole frames, as
    /// the large shared chunks they arrived in) into the down stream.
    fn flush_responses(&mut self) {
        let LegState::Up(leg) = &mut self.leg else {
            return;
        };
        let Some(resp) = leg.resp.as_mut() else {
            return;
        };
        if resp.deliver_to <= resp.pending.start() {
            return;
        }
        let mut pieces = Scratch::<Bytes>::take();
        resp.pending.pop_to(resp.deliver_to, &mut pieces);
        for piece in pieces.drain(..) {
            self.down.push(piece);
        }
    }

    /// Drops the response frame ending at `end` (after delivering the ones
    /// approved before it).
    fn swallow_response(&mut self, end: u64) {
        self.flush_responses();
        if let LegState::Up(leg) = &mut self.leg {
            if let Some(resp) = leg.resp.as_mut() {
                resp.pending.release_to(end);
            }
        }
    }

    /// Resume protocol: one frame from the server of leg `gen`.
    pub fn on_server_frame(&mut self, gen: Generation, frame: Frame, now: Instant) {
        if self.done.is_some() {
            return;
        }
        let LegState::Up(leg) = &mut self.leg else {
            return;
        };
        if leg.gen != gen {
            return;
        }
        let AckMode::Resume(settings) = &self.backend.ack else {
            return;
        };
        if let Some(hello) = &leg.hello {
            match frame {
                Frame::Welcome(w) => {
                    if let Err(e) =
                        w.check(&settings.key.0, hello, self.up.acked(), self.up_sent_high)
                    {
                        self.protocol_error(&e, now);
                        return;
                    }
                    self.events.push_back(Event::Welcomed {
                        server: leg.server,
                        version: w.version,
                    });
                    // A new session's leg sent nothing before the WELCOME
                    // but early data.
                    let early = !hello.resume && self.up.sent() > 0;
                    if early && w.version < 2 {
                        // Version 1 does not take early data: whether this
                        // server read it as the session's first bytes, the
                        // next leg's WELCOME says (a resume: the session
                        // exists now).
                        self.error = Some("server chose version 1 after early data".into());
                        self.resume_known = true;
                        self.leg_failed(LegFailure::Refused, now);
                        self.step(now);
                        return;
                    }
                    if !early {
                        // Resume the up stream where the server says it is
                        // (early data is the new session's first bytes:
                        // what follows it goes on from there).
                        self.up.resume_from(w.recv_offset);
                    }
                    let cfg = LinkConfig {
                        max_frame: settings.max_frame,
                        window: settings.window,
                        heartbeat: settings.heartbeat_interval,
                        dead_peer_timeout: settings.dead_peer_timeout,
                        ack_delay: ACK_DELAY,
                    };
                    leg.link = Some(Box::new(Link::new(
                        cfg,
                        w.max_frame,
                        w.window,
                        self.down.read(),
                        now,
                    )));
                    leg.hello = None;
                    self.resume_known = true;
                }
                Frame::Refuse { code, reason } => {
                    self.error = Some(format!("server refused: {code}: {reason}"));
                    match code {
                        ErrorCode::Limit => self.leg_failed(LegFailure::Refused, now),
                        ErrorCode::SessionExists if !self.resume_known => {
                            // The server got an earlier HELLO we never saw
                            // answered: resume it instead.
                            self.resume_known = true;
                            self.leg_failed(LegFailure::Refused, now);
                        }
                        _ => self.abort(CloseReason::ProtocolError, now),
                    }
                }
                other => {
                    let e = ProtoError::new(
                        ErrorCode::Malformed,
                        format!("expected WELCOME, got {other:?}"),
                    );
                    self.protocol_error(&e, now);
                    return;
                }
            }
            self.step(now);
            return;
        }
        let Some(link) = &mut leg.link else {
            return;
        };
        match link.on_frame(frame, &mut self.up, now) {
            Ok(Incoming::Data(b)) => {
                if !self.down.fin_read() {
                    self.down.push(b);
                }
            }
            Ok(Incoming::Fin(_)) => {
                leg.server_eof = true;
                self.first_closer.get_or_insert(CloseReason::ServerClosed);
                self.down.set_fin();
            }
            Ok(Incoming::Abort { code, reason }) => {
                self.error = Some(format!("server aborted: {code}: {reason}"));
                self.close_leg();
                self.end_gracefully(CloseReason::ServerAborted, now);
            }
            Ok(Incoming::Acked(_) | Incoming::Ping) => {}
            Err(e) => {
                self.protocol_error(&e, now);
                return;
            }
        }
        self.step(now);
    }

    /// Resume protocol: the bytes from the server of leg `gen` are not valid
    /// frames.
    pub fn on_server_protocol_error(&mut self, gen: Generation, e: &ProtoError, now: Instant) {
        if self.leg_gen() == Some(gen) {
            self.protocol_error(e, now);
        }
    }

    /// The server broke the resume protocol: tell it why and end the session.
    fn protocol_error(&mut self, e: &ProtoError, now: Instant) {
        self.error = Some(format!("server broke the resume protocol: {e}"));
        if let LegState::Up(leg) = &mut self.leg {
            if let Some(link) = &mut leg.link {
                link.queue(&Frame::Abort {
                    code: e.code,
                    reason: e.detail.clone(),
                });
            }
        }
        self.abort(CloseReason::ProtocolError, now);
    }

    /// `ack = "tcp"`: the server's TCP confirmed `bytes_acked` bytes of leg
    /// `gen` (`tcpi_bytes_acked`, or bytes written minus the Unix send queue).
    pub fn on_server_acked(&mut self, gen: Generation, bytes_acked: u64, now: Instant) {
        let LegState::Up(leg) = &self.leg else {
            return;
        };
        if leg.gen != gen || !matches!(self.backend.ack, AckMode::Tcp) {
            return;
        }
        let target = leg.base.saturating_add(bytes_acked);
        self.up.ack_to(target);
        self.step(now);
    }

    /// `n` bytes of the last [`SessionCore::next_write`]`(Dir::Up)` (or of
    /// the chunks from `next_writes_up`) were written to the server of `gen`.
    pub fn on_server_written(&mut self, gen: Generation, n: usize, now: Instant) {
        let LegState::Up(leg) = &mut self.leg else {
            return;
        };
        if leg.gen != gen {
            return;
        }
        let mut n = n;
        if !leg.prefix_out.is_empty() {
            let k = n.min(leg.prefix_out.len());
            bytes::Buf::advance(&mut leg.prefix_out, k);
            if leg.prefix_out.is_empty() {
                // An empty `Bytes` still holds its allocation (the HELLO,
                // the preamble): a leg keeps none once it is out.
                leg.prefix_out = Bytes::new();
            }
            n -= k;
        }
        if let Some(link) = &mut leg.link {
            // The link moved `sent` when it framed the bytes.
            link.on_written(n, now);
            self.step(now);
            return;
        }
        self.up.on_sent(n as u64);
        self.up_sent_high = self.up_sent_high.max(self.up.sent());
        if matches!(self.backend.ack, AckMode::None) {
            let sent = self.up.sent();
            self.up.ack_to(sent);
        }
        self.step(now);
    }

    /// The shell delivered [`Action::ShutdownServer`] for `gen`.
    pub fn on_server_shutdown(&mut self, _gen: Generation, now: Instant) {
        self.step(now);
    }

    /// The server of leg `gen` closed its side (FIN).
    pub fn on_server_eof(&mut self, gen: Generation, now: Instant) {
        let LegState::Up(leg) = &mut self.leg else {
            return;
        };
        if leg.gen != gen || self.done.is_some() {
            return;
        }
        if let Some(link) = &leg.link {
            // The transport closed: the normal end only once both FINs were
            // acknowledged; otherwise the leg failed and the session resumes.
            if link.complete() {
                leg.server_eof = true;
                self.step(now);
            } else {
                self.leg_failed(LegFailure::Closed, now);
                self.step(now);
            }
            return;
        }
        if leg.hello.is_some() {
            self.leg_failed(LegFailure::Closed, now);
            self.step(now);
            return;
        }
        let all_answered = match self.backend.ack {
            AckMode::None | AckMode::Resume(_) => true,
            AckMode::Tcp => self.up.acked() >= self.up.read(),
            // Every whole request answered: what may remain unacked after
            // the client's FIN is a partial request (the client stopped
            // mid-frame), which no server will ever answer, so replaying it
            // on a new leg would loop until `hold_timeout`. And the
            // greeting delivered: a client that half-closed at once is
            // still owed it, so a server that closes in the middle of it
            // failed (a new leg's greeting goes to the client).
            AckMode::Response(_) => {
                self.req_ends.is_empty() && self.greeting_delivered >= self.backend.greeting
            }
        };
        let normal_end = leg.fin_sent && all_answered;
        let closes = matches!(self.backend.ack, AckMode::None)
            || self.backend.on_server_close == OnServerClose::Close
            || normal_end;
        if closes {
            leg.server_eof = true;
            if let Some(resp) = &mut leg.resp {
                // A partial response can't be delivered whole: drop it.
                resp.pending = ReplayBuffer::new(resp.pending.end());
            }
            self.first_closer.get_or_insert(CloseReason::ServerClosed);
            self.down.set_fin();
            self.step(now);
        } else {
            self.leg_failed(LegFailure::Closed, now);
            self.step(now);
        }
    }

    /// The server connection of leg `gen` failed (reset, IO error).
    pub fn on_server_error(&mut self, gen: Generation, now: Instant) {
        let LegState::Up(leg) = &self.leg else {
            return;
        };
        if leg.gen != gen || self.done.is_some() {
            return;
        }
        if leg.server_eof && leg.fin_sent {
            // Both directions were done: an error at the very end changes
            // nothing the client will see.
            return;
        }
        if leg.server_eof {
            // The server's close was taken as the end of the session (its
            // FIN is queued for the client): a reset after it ends the leg,
            // and no new leg is made, whose bytes would follow that FIN.
            // What the client still sends has nowhere to go.
            let (gen, server) = (leg.gen, leg.server);
            self.events.push_back(Event::LegFailed {
                gen,
                server,
                reason: LegFailure::Error,
            });
            self.actions.push_back(Action::CloseLeg { gen });
            self.leg = LegState::None;
            self.end_gracefully(CloseReason::ServerClosed, now);
            self.step(now);
            return;
        }
        self.leg_failed(LegFailure::Error, now);
        self.step(now);
    }

    /// A connection to `backend.servers[server]` just succeeded elsewhere (a
    /// probe or another session): a waiting session retries there now rather
    /// than at the end of its backoff.
    pub fn on_server_up(&mut self, server: usize, now: Instant) {
        if let LegState::Waiting { at, .. } = self.leg {
            if at > now && server < self.backend.servers.len() {
                self.leg = LegState::Waiting { at: now, server };
                self.step(now);
            }
        }
    }

    /// The timer armed from [`SessionCore::deadline`] fired.
    pub fn on_timeout(&mut self, now: Instant) {
        self.step(now);
    }

    /// holdfast is shutting down: end gracefully (deliver what the client is
    /// owed, then FIN).
    pub fn on_shutdown(&mut self, now: Instant) {
        if self.done.is_none() {
            self.close_leg();
            self.end_gracefully(CloseReason::Shutdown, now);
            self.step(now);
        }
    }

    // ---- internals ----

    /// A leg failed: hold, replay from `acked`, retry.
    fn leg_failed(&mut self, reason: LegFailure, now: Instant) {
        debug_assert!(!reason.is_connect());
        let (gen, server) = match &self.leg {
            LegState::Up(leg) => (leg.gen, leg.server),
            _ => return,
        };
        self.events.push_back(Event::LegFailed {
            gen,
            server,
            reason,
        });
        self.actions.push_back(Action::CloseLeg { gen });
        if matches!(self.backend.ack, AckMode::None) {
            self.leg = LegState::None;
            let reason = match reason {
                LegFailure::Closed => CloseReason::ServerClosed,
                _ => CloseReason::ServerError,
            };
            self.end_gracefully(reason, now);
            return;
        }
        self.up.rewind();
        // A leg that made no progress since the last failure (a server that
        // accepts and then fails) backs off; otherwise retry at once.
        let no_progress = self.hold_since.is_some();
        self.start_hold(now);
        let delay = if reason == LegFailure::RetryResponse {
            self.retries += 1;
            self.backoff(self.retries)
        } else if no_progress {
            self.attempts += 1;
            self.backoff(self.attempts)
        } else {
            Duration::ZERO
        };
        self.leg = LegState::Waiting {
            at: now + delay,
            server,
        };
    }

    fn start_hold(&mut self, now: Instant) {
        if self.hold_since.is_none() {
            self.hold_since = Some(now);
            self.hold_acked = self.up.acked();
            self.events.push_back(Event::HoldStarted);
        }
    }

    fn close_leg(&mut self) {
        match std::mem::replace(&mut self.leg, LegState::None) {
            LegState::Up(leg) => self.actions.push_back(Action::CloseLeg { gen: leg.gen }),
            LegState::Connecting { gen, .. } => self.actions.push_back(Action::CloseLeg { gen }),
            _ => {}
        }
    }

    /// Exponential backoff with jitter: `retry_initial * 2^(k-1)`, capped at
    /// `retry_max`, then a uniform draw from its upper half.
    fn backoff(&mut self, k: u32) -> Duration {
        let init = self.backend.retry_initial;
        let max = self.backend.retry_max;
        let d = init
            .checked_mul(1u32 << k.saturating_sub(1).min(30))
            .unwrap_or(max)
            .min(max);
        // xorshift64: deterministic per session, no clock.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + frac / 2.0)
    }

    /// Ends the session once the client has every byte it is owed and a FIN.
    fn end_gracefully(&mut self, reason: CloseReason, now: Instant) {
        if self.done.is_some() || self.ending.is_some() {
            return;
        }
        self.ending = Some(reason);
        self.down.set_fin();
        let _ = now;
    }

    /// Ends the session now.
    fn abort(&mut self, reason: CloseReason, _now: Instant) {
        if self.done.is_some() {
            return;
        }
        self.close_leg();
        self.finish(reason);
    }

    fn finish(&mut self, reason: CloseReason) {
        if self.done.is_none() {
            self.done = Some(reason);
            self.events.push_back(Event::Closed { reason });
        }
    }

    /// Moves the state machine forward after any input.
    fn step(&mut self, now: Instant) {
        if self.done.is_some() {
            return;
        }
        // The hold ends once a leg is up and made progress (or has nothing
        // outstanding at all).
        if let LegState::Up(leg) = &self.leg {
            if self.hold_since.is_some()
                && leg.preamble_expect.is_empty()
                && leg.hello.is_none()
                && (self.up.acked() > self.hold_acked || self.up.acked() == self.up.read())
            {
                self.hold_since = None;
            }
        }
        // Hold timeout.
        if let Some(since) = self.hold_since {
            if !matches!(self.backend.ack, AckMode::None)
                && self.ending.is_none()
                && now >= since + self.backend.hold_timeout
            {
                self.close_leg();
                self.end_gracefully(CloseReason::HoldTimeout, now);
            }
        }
        // Idle timeout: nothing moved to or from the client for that long.
        if let Some(idle) = self.idle_timeout {
            if self.ending.is_none() && now >= self.last_activity + idle {
                self.close_leg();
                self.end_gracefully(CloseReason::IdleTimeout, now);
            }
        }
        // Resume protocol: handshake timeout, dead peer, and what the link
        // should send (DATA, ACKs, our FIN, PINGs).
        if let LegState::Up(leg) = &mut self.leg {
            if leg.hello.is_some() && now >= leg.hello_at + self.backend.connect_timeout {
                self.leg_failed(LegFailure::HandshakeTimeout, now);
            } else if leg.hello.is_some() {
                if leg.early {
                    let n = early_data(&mut self.up, &mut leg.prefix_out);
                    if n > 0 {
                        self.up_sent_high = self.up_sent_high.max(self.up.sent());
                        self.events.push_back(Event::EarlyData { bytes: n });
                    }
                }
            } else if let Some(link) = &mut leg.link {
                if link.peer_dead(now) {
                    self.leg_failed(LegFailure::DeadPeer, now);
                } else {
                    let (fin, consumed) = (self.up.fin_read(), self.down.read());
                    link.fill(&mut self.up, fin, consumed, now);
                    self.up_sent_high = self.up_sent_high.max(self.up.sent());
                    leg.fin_sent = self.up.fin_read() && self.up.sent() == self.up.read();
                }
            }
        }
        // Time to connect.
        if let LegState::Waiting { at, server } = self.leg {
            if self.ending.is_none() && now >= at {
                let gen = self.next_gen;
                self.next_gen = Generation(gen.0 + 1);
                self.leg = LegState::Connecting { gen, server };
                if self.hold_since.is_none() {
                    self.start_hold(now);
                }
                self.actions.push_back(Action::Connect { gen, server });
            }
        }
        // Deliver the client's FIN to the server after every byte before it.
        if let LegState::Up(leg) = &mut self.leg {
            if self.up.fin_read()
                && !leg.fin_sent
                && leg.hello.is_none()
                && leg.link.is_none()
                && leg.prefix_out.is_empty()
                && self.up.sent() == self.up.read()
            {
                leg.fin_sent = true;
                self.actions
                    .push_back(Action::ShutdownServer { gen: leg.gen });
            }
        }
        // Deliver the server's FIN (or the graceful end) to the client.
        if self.down.fin_read() && !self.client_fin_queued && self.down.sent() == self.down.read() {
            self.client_fin_queued = true;
            self.actions.push_back(Action::ShutdownClient);
        }
        // Over?
        if self.client_fin_sent {
            if let Some(reason) = self.ending {
                self.close_leg();
                self.finish(reason);
            } else if let LegState::Up(leg) = &self.leg {
                let both = match &leg.link {
                    Some(link) => link.complete(),
                    None => leg.fin_sent && leg.server_eof,
                };
                if both {
                    let reason = self.first_closer.unwrap_or(CloseReason::ClientClosed);
                    self.close_leg();
                    self.finish(reason);
                }
            } else if matches!(self.leg, LegState::None) && self.up.fin_read() {
                let reason = self.first_closer.unwrap_or(CloseReason::ClientClosed);
                self.finish(reason);
            }
        }
        self.check_invariants();
    }

    /// Panics if an invariant is broken (debug builds only).
    pub fn check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        self.up.check_invariants();
        self.down.check_invariants();
        assert!(
            self.down.acked() == self.down.sent(),
            "down acked is written"
        );
        if let Some(&first) = self.req_ends.front() {
            assert!(
                first > self.up.acked(),
                "unanswered requests end past acked"
            );
        }
        assert!(
            self.req_ends.iter().all(|&e| e <= self.up.read()),
            "request ends are within read"
        );
        if let LegState::Up(leg) = &self.leg {
            assert!(leg.base <= self.up.sent(), "leg base within sent");
            if let Some(resp) = &leg.resp {
                assert!(
                    resp.deliver_to <= resp.pending.start(),
                    "approved responses are flushed after every input"
                );
            }
        }
    }
}

fn frame_reason(e: &FrameError) -> CloseReason {
    match e {
        FrameError::TooLarge { .. } => CloseReason::FrameTooLarge,
        FrameError::Malformed { .. } => CloseReason::MalformedFrame,
    }
}

/// A RESP request Redis sends no reply to: an empty inline line, `*0` or `*-1`.
fn is_resp_no_reply(frame: &[u8]) -> bool {
    matches!(frame, b"\n" | b"\r\n" | b"*0\r\n" | b"*-1\r\n")
        || frame.iter().all(|b| b.is_ascii_whitespace())
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod resume_tests;

#[cfg(test)]
mod queue_tests {
    use super::Queue;
    use std::collections::VecDeque;
    proptest::proptest! {
        /// `Queue` against a `VecDeque` model: the same items out in the same
        /// order, whatever the interleaving of pushes and pops, and nothing
        /// allocated once it is drained.
        #[test]
        fn the_session_queue_is_first_in_first_out(ops in proptest::collection::vec(proptest::option::of(0u32..1000), 0..200)) {
            let mut q = Queue::new();
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Some(v) => {
                        q.push_back(v);
                        model.push_back(v);
                    }
                    None => proptest::prop_assert_eq!(q.pop_front(), model.pop_front()),
                }
                proptest::prop_assert_eq!(q.is_empty(), model.is_empty());
            }
            while let Some(v) = model.pop_front() {
                proptest::prop_assert_eq!(q.pop_front(), Some(v));
            }
            proptest::prop_assert_eq!(q.pop_front(), None);
            proptest::prop_assert_eq!(q.rest.capacity(), 0);
        }
    }
}
