//! Hand-over of listening sockets to a new holdfast process (an upgrade).
//!
//! The old process listens on `[handover] socket`; the new one
//! (`holdfast run --takeover`) connects, and the old one sends one message:
//! a versioned JSON [`Manifest`] (the listeners by name, in order, with their
//! endpoints) with the listening descriptors attached (SCM_RIGHTS). The new
//! process checks the version and that it received exactly as many
//! descriptors as the manifest names, wraps them as `OwnedFd` at once, starts
//! serving, and answers one byte ([`ACK`]). Until that byte arrives the old
//! process keeps accepting: both processes hold the same sockets, so no
//! connection is refused at any moment.
//!
//! Then the sessions travel, pipelined: the old process asks a few sessions
//! at a time ([`WINDOW`]; a busy one alone) to pause and export themselves,
//! sends whatever has exported as a [`Batch`] (sockets attached, states in
//! the payload) without waiting for the answer to the previous one, and a
//! thread of its own reads the new process's verdicts in order and releases
//! each session: taken (it ends here without a shutdown) or not (it carries
//! on here). The new process takes each batch over on a thread of its own,
//! answers, and only then starts the sessions (their first run on that
//! thread too). Neither side's steps wait for an async runtime to schedule
//! a task, so a busy process does not lengthen the pauses.
//!
//! This module owns the wire format and the socket calls (through `rustix`,
//! no `unsafe` here); what to export and how to serve what arrives belong to
//! `proxy` and the binary.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// The manifest version this build speaks.
pub const VERSION: u32 = 1;
/// The byte the new process sends once it serves every listener it took.
pub const ACK: u8 = 1;
/// Most descriptors one hand-over carries (listeners plus admin).
pub const MAX_FDS: usize = 64;
/// Largest manifest accepted.
const MAX_MANIFEST: usize = 64 * 1024;

/// What a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A `[[listener]]`, matched by name.
    Listener,
    /// The `[admin]` endpoint.
    Admin,
}

/// One descriptor of the hand-over, in the order the descriptors travel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// The listener's name (empty for admin).
    pub name: String,
    /// Its bound address, for logs and checks.
    pub endpoint: String,
}

/// What travels with the descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The old process's pid, for logs.
    pub pid: u32,
    /// One entry per descriptor, in order.
    pub entries: Vec<Entry>,
}

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("hand-over io: {0}")]
    Io(#[from] io::Error),
    #[error("hand-over peer runs as uid {peer}, we run as uid {ours}")]
    WrongUid { peer: u32, ours: u32 },
    #[error("hand-over manifest version {got}, this build speaks {VERSION}")]
    Version { got: u32 },
    #[error("hand-over manifest names {expected} descriptors, {got} arrived")]
    FdCount { expected: usize, got: usize },
    #[error("hand-over control message truncated (MSG_CTRUNC): descriptors were lost")]
    Truncated,
    #[error("hand-over manifest is {0} bytes, more than allowed")]
    TooLarge(usize),
    #[error("hand-over manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    #[error("hand-over batch: a resumable session's entry does not agree with its client kind")]
    Resumable,
    #[error("the new process closed the hand-over before confirming")]
    NoAck,
    #[error("hand-over batch names {expected} payload bytes, {got} arrived")]
    Blob { expected: u64, got: u64 },
}

/// Sends `manifest` with `fds` (one per entry, in order) on `sock`.
pub fn send(
    sock: &UnixStream,
    manifest: &Manifest,
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandoverError> {
    if fds.len() != manifest.entries.len() {
        return Err(HandoverError::FdCount {
            expected: manifest.entries.len(),
            got: fds.len(),
        });
    }
    let json = serde_json::to_vec(manifest)?;
    if json.len() > MAX_MANIFEST || fds.len() > MAX_FDS {
        return Err(HandoverError::TooLarge(json.len()));
    }
    let len = (json.len() as u32).to_be_bytes();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(HandoverError::TooLarge(json.len()));
    }
    let iov = [IoSlice::new(&len), IoSlice::new(&json)];
    let sent = rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)
        .map_err(io::Error::from)?;
    // The descriptors went with the first byte; the rest is plain bytes.
    let mut rest = [len.as_slice(), json.as_slice()].concat();
    rest.drain(..sent);
    let mut w = sock;
    w.write_all(&rest)?;
    Ok(())
}

/// Receives a manifest and its descriptors from `sock`, wrapped as
/// `OwnedFd` at once (so they close on any error below).
pub fn recv(sock: &UnixStream) -> Result<(Manifest, Vec<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; 4 + MAX_MANIFEST];
    let (mut got, fds) = recv_fds(sock, &mut buf, MAX_FDS)?;
    if got == 0 {
        return Err(HandoverError::NoAck);
    }
    let mut r = sock;
    while got < 4 {
        let n = r.read(&mut buf[got..4])?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_MANIFEST {
        return Err(HandoverError::TooLarge(len));
    }
    if got < 4 + len {
        r.read_exact(&mut buf[got..4 + len])?;
    }
    let manifest = Manifest::decode(&buf[4..4 + len], fds.len())?;
    Ok((manifest, fds))
}

impl Manifest {
    /// Parses a manifest's JSON and checks it against what arrived: the
    /// version, and one descriptor per entry. Pure: the fuzz target and
    /// its corpus test call it directly.
    pub fn decode(json: &[u8], fds: usize) -> Result<Manifest, HandoverError> {
        if json.len() > MAX_MANIFEST {
            return Err(HandoverError::TooLarge(json.len()));
        }
        let manifest: Manifest = serde_json::from_slice(json)?;
        if manifest.version != VERSION {
            return Err(HandoverError::Version {
                got: manifest.version,
            });
        }
        if fds != manifest.entries.len() {
            return Err(HandoverError::FdCount {
                expected: manifest.entries.len(),
                got: fds,
            });
        }
        Ok(manifest)
    }
}

/// Checks that the peer of a hand-over connection runs as our uid.
pub fn check_peer(sock: &UnixStream) -> Result<(), HandoverError> {
    let cred = rustix::net::sockopt::socket_peercred(sock).map_err(io::Error::from)?;
    let peer = cred.uid.as_raw();
    let ours = rustix::process::geteuid().as_raw();
    if peer != ours {
        return Err(HandoverError::WrongUid { peer, ours });
    }
    Ok(())
}

/// Binds the hand-over socket at `path`: its directory is created private
/// (0700) when missing, and the socket is bound at a temporary name, made
/// 0600, then renamed over `path`, so a process connecting there always
/// finds a listening socket (the previous holder's, then ours).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, HandoverError> {
    let err = |source| HandoverError::Socket {
        path: path.display().to_string(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let tmp = dir.join(format!(
        ".{}.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(listener)
}

/// Connects to a running holdfast's hand-over socket and receives its
/// listeners. The returned stream is where [`ACK`] goes.
pub fn connect(path: &Path) -> Result<(UnixStream, Manifest, Vec<OwnedFd>), HandoverError> {
    let sock = UnixStream::connect(path).map_err(|source| HandoverError::Socket {
        path: path.display().to_string(),
        source,
    })?;
    check_peer(&sock)?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let (manifest, fds) = recv(&sock)?;
    Ok((sock, manifest, fds))
}

/// Waits for the new process's [`ACK`] (or its failure: EOF, an error).
pub fn wait_ack(sock: &UnixStream) -> Result<(), HandoverError> {
    let mut b = [0u8; 1];
    let mut r = sock;
    match r.read(&mut b)? {
        1 if b[0] == ACK => Ok(()),
        _ => Err(HandoverError::NoAck),
    }
}

/// The old process's side: answers hand-over requests on `listener` until
/// one succeeds. For each connection from our uid:
/// 1. sends the listening sockets and waits for the new process's [`ACK`]
///    (until then every socket stays open and accepting here, so no
///    connection is refused);
/// 2. stops accepting here (the new process accepts on the same sockets);
/// 3. exports the sessions in batches of [`BATCH`]: each session task
///    pauses only while its own batch travels, and carries on here if the
///    new process does not take it;
/// 4. sends the final batch and, once confirmed, marks Unix socket files
///    as no longer ours and starts the drain (`shutdown.drain`) for the
///    sessions that stay (TLS, resume-protocol clients).
///
/// A failure (the new process exits, times out, sends garbage) is logged;
/// sessions not yet taken stay here, accepting resumes, and this process
/// keeps serving.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    control: tokio::sync::mpsc::Sender<crate::proxy::Control>,
    shutdown: crate::lifecycle::Shutdown,
    ack_timeout: std::time::Duration,
    busy_within: std::time::Duration,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "hand-over socket unusable: upgrades disabled");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = shutdown.drain.cancelled() => return,
            _ = shutdown.stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "hand-over accept failed");
                    continue;
                }
            },
        };
        let mut stopped = false;
        match hand_over(stream, &control, ack_timeout, busy_within, &mut stopped).await {
            Ok(export) => {
                for (_, l) in &export.listeners {
                    l.keep_socket_file();
                }
                tracing::info!(
                    listeners = export.listeners.len(),
                    "hand-over confirmed by the new process: draining what stays"
                );
                shutdown.handed_over();
                shutdown.drain.cancel();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "hand-over failed: this process keeps serving");
                if stopped {
                    let _ = control.send(crate::proxy::Control::ResumeAccepting).await;
                }
            }
        }
    }
}

/// Pause and total-time figures of one hand-over's session export.
#[derive(Debug, Default)]
struct ExportStats {
    taken: usize,
    stayed: usize,
    /// Sessions asked alone, having moved bytes within `busy_within`.
    alone: usize,
    /// Per taken session: from its pause (the export) to the verdict here.
    answered: Vec<std::time::Duration>,
}

/// The `p` quantile (0 to 1, nearest rank) of `d` in µs; sorts `d`. 0 when
/// empty.
pub fn quantile_us(d: &mut [std::time::Duration], p: f64) -> u64 {
    if d.is_empty() {
        return 0;
    }
    d.sort_unstable();
    let i = ((d.len() as f64 * p).ceil() as usize).clamp(1, d.len()) - 1;
    d[i].as_micros() as u64
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process of the
/// machine (what `std::time::Instant` reads on Linux), so a pause that
/// starts in the old process can end in the new one.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// How long a session task may take to answer an export request (it
/// answers at its next quiescent point: microseconds, unless it is stuck).
const EXPORT_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// One hand-over attempt; returns what was handed over once confirmed.
/// Sets `stopped` once this process stopped accepting.
async fn hand_over(
    stream: tokio::net::UnixStream,
    control: &tokio::sync::mpsc::Sender<crate::proxy::Control>,
    ack_timeout: std::time::Duration,
    busy_within: std::time::Duration,
    stopped: &mut bool,
) -> Result<crate::proxy::Export, HandoverError> {
    use crate::proxy::Control;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    check_peer(&stream)?;
    let (reply, export) = tokio::sync::oneshot::channel();
    let gone = || io::Error::other("the proxy is stopping");
    control
        .send(Control::Export { reply })
        .await
        .map_err(|_| gone())?;
    let export = export.await.map_err(|_| gone())?;
    let stream = std::sync::Arc::new(stream);
    let (sock, export) = {
        let sock = stream.clone();
        tokio::task::spawn_blocking(move || -> Result<_, HandoverError> {
            send_listeners(&sock, &export, ack_timeout)?;
            Ok((sock, export))
        })
        .await
        .map_err(io::Error::other)??
    };
    // The new process accepts on every listener now.
    let (reply, done) = tokio::sync::oneshot::channel();
    control
        .send(Control::StopAccepting { reply })
        .await
        .map_err(|_| gone())?;
    done.await.map_err(|_| gone())?;
    *stopped = true;
    let started = std::time::Instant::now();
    let mut stats = {
        let shared = export.shared.clone();
        tokio::task::spawn_blocking(move || export_sessions(sock, shared, ack_timeout, busy_within))
            .await
            .map_err(io::Error::other)??
    };
    let total = started.elapsed();
    let a = &mut stats.answered;
    let (p50, p99, max) = (
        quantile_us(a, 0.50),
        quantile_us(a, 0.99),
        quantile_us(a, 1.0),
    );
    // (Each session's pause itself ends when the new process first runs
    // it: that process logs it.)
    tracing::info!(
        sessions = stats.taken,
        stayed = stats.stayed,
        alone = stats.alone,
        total_ms = total.as_secs_f64() * 1000.0,
        answered_p50_us = p50,
        answered_p99_us = p99,
        answered_max_us = max,
        "hand-over: sessions handed over"
    );
    Ok(export)
}

/// Sends the listening sockets and waits for the new process's [`ACK`].
fn send_listeners(
    stream: &UnixStream,
    export: &crate::proxy::Export,
    ack_timeout: std::time::Duration,
) -> Result<(), HandoverError> {
    let mut entries = Vec::new();
    let mut fds = Vec::new();
    for (name, l) in &export.listeners {
        match l.handover_fd() {
            Some(fd) => {
                entries.push(Entry {
                    kind: Kind::Listener,
                    name: name.clone(),
                    endpoint: l.local_endpoint().to_string(),
                });
                fds.push(fd);
            }
            None => {
                tracing::warn!(listener = %name, "a listener without a descriptor to hand over")
            }
        }
    }
    if let Some(fd) = &export.admin {
        entries.push(Entry {
            kind: Kind::Admin,
            name: String::new(),
            endpoint: String::new(),
        });
        use std::os::fd::AsFd;
        fds.push(fd.as_fd());
    }
    let manifest = Manifest {
        version: VERSION,
        pid: std::process::id(),
        entries,
    };
    send(stream, &manifest, &fds)?;
    tracing::info!(
        descriptors = fds.len(),
        "hand-over: listeners sent; waiting for the new process"
    );
    stream.set_read_timeout(Some(ack_timeout))?;
    wait_ack(stream)
}

/// Sessions asked to export themselves and not yet answered for (no reply
/// yet, or exported and waiting for the new process's verdict). Each
/// session's pause runs from its export to its first run in the new
/// process, so it waits behind at most this many others; sessions that are
/// slow to reach a quiescent point (busy ones, on a loaded machine) hold up
/// only themselves.
///
/// A busy session (bytes moved to or from its client within `[handover]
/// busy_within`) goes alone instead: asked only when nothing else is in
/// flight, and nothing else asked until the new process has it, so its
/// pause waits behind no other session's export, import or first run.
/// Idle sessions, which a byte is unlikely to reach during a pause, go
/// [`WINDOW`] at a time. Pipelined, busy sessions' pauses took a quarter of
/// a millisecond to a millisecond of queueing on a loaded machine
/// (docs/benchmarks.md, "Busy sessions alone").
const WINDOW: usize = 8;

/// Whether the next session may be asked to export itself now, with
/// `in_flight` sessions asked and not yet answered for, one of them busy
/// and alone (`alone_in_flight`), the next one busy (`busy`).
fn may_ask(in_flight: usize, alone_in_flight: bool, busy: bool) -> bool {
    if busy {
        in_flight == 0
    } else {
        !alone_in_flight && in_flight < WINDOW
    }
}

/// What reaches the hand-over's coordinating thread.
enum Event {
    /// A session task's answer to its export request.
    Reply(
        crate::session::core::SessionId,
        Result<Box<crate::session::driver::Exported>, &'static str>,
    ),
    /// The new process answered one batch.
    Answered(Answered),
    /// Reading answers failed: every batch not answered stays here.
    Broken(HandoverError),
    /// The new process confirmed the final (`done`) batch.
    Finished,
}

/// The verdicts on one batch, as the answer thread applied them.
struct Answered {
    taken: usize,
    stayed: usize,
    /// Per taken session: from its export to its verdict here.
    answered: Vec<std::time::Duration>,
}

/// What the coordinating thread hands to the answer thread, in the order
/// the batches went out.
enum InFlight {
    Batch(Vec<crate::session::driver::Exported>),
    Done,
}

/// Exports every session, pipelined: the coordinating thread (this one)
/// keeps up to [`WINDOW`] sessions asked, sends each batch of whatever
/// sessions have exported themselves as soon as they have (at most
/// [`BATCH`] at once: one session alone when that is all that is ready), and
/// never waits for a batch's answer before sending the next; the answer
/// thread reads the verdicts in order and releases each session. Runs on
/// blocking threads, so no step of a session's pause waits for the async
/// runtime to schedule the hand-over. A failure gives every session not
/// yet taken back to its task here.
fn export_sessions(
    sock: std::sync::Arc<UnixStream>,
    shared: std::sync::Arc<crate::session::driver::Shared>,
    ack_timeout: std::time::Duration,
    busy_within: std::time::Duration,
) -> Result<ExportStats, HandoverError> {
    let _urgent = Urgent::raise();
    sock.set_write_timeout(Some(ack_timeout))?;
    sock.set_read_timeout(Some(ack_timeout))?;
    let (events_tx, events) = std::sync::mpsc::channel::<Event>();
    let (inflight, inflight_rx) = std::sync::mpsc::channel::<InFlight>();
    let answers = {
        let sock = sock.clone();
        let events_tx = events_tx.clone();
        std::thread::Builder::new()
            .name("holdfast-handover-answers".into())
            .spawn(move || read_answers(&sock, inflight_rx, &events_tx))?
    };
    let mut pump = Pump {
        sock: &sock,
        events_tx,
        events: &events,
        inflight,
        stats: ExportStats::default(),
        asked: std::collections::HashMap::new(),
        ready: Vec::new(),
        unanswered: 0,
        busy_within,
        alone: false,
    };
    let result = pump.run(&shared);
    let stats = std::mem::take(&mut pump.stats);
    // What was exported and not sent goes back to its task; the answer
    // thread ends once the batches it has are answered or given back.
    drop(pump);
    if result.is_err() {
        // Verdicts the new process already wrote stay readable; later writes
        // of its own fail, so it starts none of the sessions we keep.
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
    let _ = answers.join();
    result.map(|()| stats)
}

/// The coordinating thread's state.
struct Pump<'a> {
    sock: &'a UnixStream,
    events_tx: std::sync::mpsc::Sender<Event>,
    events: &'a std::sync::mpsc::Receiver<Event>,
    inflight: std::sync::mpsc::Sender<InFlight>,
    stats: ExportStats,
    /// Asked, no reply yet: when.
    asked: std::collections::HashMap<crate::session::core::SessionId, std::time::Instant>,
    /// Exported, not yet sent.
    ready: Vec<crate::session::driver::Exported>,
    /// Sent, no verdict yet.
    unanswered: usize,
    /// `[handover] busy_within`: a session that moved bytes this recently
    /// goes alone.
    busy_within: std::time::Duration,
    /// A busy session is in flight alone.
    alone: bool,
}

impl Pump<'_> {
    fn run(&mut self, shared: &crate::session::driver::Shared) -> Result<(), HandoverError> {
        let mut tried = std::collections::HashSet::new();
        let mut queue = std::collections::VecDeque::new();
        loop {
            if queue.is_empty() && self.asked.is_empty() && self.ready.is_empty() {
                // Sessions not asked yet (a TLS handshake that was under way
                // may have added some since the last look).
                if let Ok(m) = shared.sessions.lock() {
                    queue.extend(m.values().filter(|s| tried.insert(s.id)).cloned());
                }
                if queue.is_empty() {
                    break;
                }
            }
            loop {
                let in_flight = self.asked.len() + self.ready.len() + self.unanswered;
                if in_flight == 0 {
                    self.alone = false;
                }
                let Some(s) = queue.front() else { break };
                let alone = !self.busy_within.is_zero()
                    && s.active_within(std::time::Instant::now(), self.busy_within);
                if !may_ask(in_flight, self.alone, alone) {
                    break;
                }
                self.alone = alone;
                self.stats.alone += usize::from(alone);
                let Some(s) = queue.pop_front() else { break };
                let (tx, id) = (self.events_tx.clone(), s.id);
                let reply = crate::session::status::ExportReply::new(move |r| {
                    tx.send(Event::Reply(id, r.map(Box::new))).is_ok()
                });
                if s.request_export(reply) {
                    self.asked.insert(id, std::time::Instant::now());
                } else {
                    self.stats.stayed += 1;
                }
            }
            // Whatever else is ready right now goes in the same batch.
            while let Ok(ev) = self.events.try_recv() {
                self.apply(ev)?;
            }
            if !self.ready.is_empty() {
                self.send_ready()?;
                continue;
            }
            if self.asked.is_empty() && self.unanswered == 0 {
                continue;
            }
            let wait = self.asked.values().min().map_or(EXPORT_REPLY_TIMEOUT, |t| {
                EXPORT_REPLY_TIMEOUT.saturating_sub(t.elapsed())
            });
            match self.events.recv_timeout(wait) {
                Ok(ev) => self.apply(ev)?,
                Err(_) => {
                    // Sessions stuck past the timeout stay here (a late reply
                    // still moves them, or finds the hand-over gone).
                    let before = self.asked.len();
                    self.asked.retain(|_, t| t.elapsed() < EXPORT_REPLY_TIMEOUT);
                    self.stats.stayed += before - self.asked.len();
                }
            }
        }
        // Every session answered for: the final batch.
        let done = Batch {
            version: VERSION,
            sessions: Vec::new(),
            done: true,
        };
        send_batch(self.sock, &done, &[], &[])?;
        self.inflight
            .send(InFlight::Done)
            .map_err(|_| HandoverError::NoAck)?;
        loop {
            match self.events.recv() {
                Ok(Event::Finished) => return Ok(()),
                Ok(ev) => self.apply(ev)?,
                Err(_) => return Err(HandoverError::NoAck),
            }
        }
    }

    fn apply(&mut self, ev: Event) -> Result<(), HandoverError> {
        match ev {
            Event::Reply(id, r) => {
                self.asked.remove(&id);
                match r {
                    Ok(e) => self.ready.push(*e),
                    Err(why) => {
                        tracing::debug!(reason = why, "hand-over: a session stays in this process");
                        self.stats.stayed += 1;
                    }
                }
            }
            Event::Answered(a) => {
                self.unanswered -= a.taken + a.stayed;
                self.stats.taken += a.taken;
                self.stats.stayed += a.stayed;
                self.stats.answered.extend(a.answered);
            }
            Event::Broken(e) => return Err(e),
            Event::Finished => {}
        }
        Ok(())
    }

    /// Sends the exported sessions, [`BATCH`] at a time.
    fn send_ready(&mut self) -> Result<(), HandoverError> {
        while !self.ready.is_empty() {
            let n = self.ready.len().min(BATCH);
            let batch: Vec<_> = self.ready.drain(..n).collect();
            // On failure the batch is dropped here: its sessions carry on.
            send_exported(self.sock, &batch)?;
            self.unanswered += n;
            self.inflight
                .send(InFlight::Batch(batch))
                .map_err(|_| HandoverError::NoAck)?;
        }
        Ok(())
    }
}

/// The answer thread: reads the verdict on each batch in the order they
/// went out and releases its sessions (taken: the task ends here; not
/// taken: it carries on). After a failure it still honours every verdict
/// that had arrived, and gives the rest back.
fn read_answers(
    sock: &UnixStream,
    inflight: std::sync::mpsc::Receiver<InFlight>,
    events: &std::sync::mpsc::Sender<Event>,
) {
    let _urgent = Urgent::raise();
    let mut broken = false;
    for item in inflight {
        let batch = match item {
            InFlight::Done => {
                let ev = match recv_verdicts(sock, 0) {
                    Ok(_) => Event::Finished,
                    Err(e) => Event::Broken(e),
                };
                let _ = events.send(ev);
                continue;
            }
            InFlight::Batch(b) => b,
        };
        let mut got = recv_verdicts(sock, batch.len());
        if got.is_err() && !broken {
            // Whatever the new process writes from now on fails, so it
            // starts none of what we keep; an answer it wrote before this
            // point is still there to read, and is honoured: the sessions
            // it names run there, not here.
            let _ = sock.shutdown(std::net::Shutdown::Both);
            if let Ok(v) = recv_verdicts(sock, batch.len()) {
                got = Ok(v);
            }
        }
        match got {
            Ok(verdicts) => {
                let mut a = Answered {
                    taken: 0,
                    stayed: 0,
                    answered: Vec::with_capacity(batch.len()),
                };
                for (e, taken) in batch.into_iter().zip(verdicts) {
                    if taken {
                        a.taken += 1;
                        a.answered.push(e.paused_at.elapsed());
                    } else {
                        a.stayed += 1;
                    }
                    let _ = e.verdict.send(taken);
                }
                let _ = events.send(Event::Answered(a));
            }
            Err(e) => {
                // Dropping the batch resumes its sessions here.
                drop(batch);
                if !broken {
                    broken = true;
                    let _ = events.send(Event::Broken(e));
                }
            }
        }
    }
}

/// Sends one batch of exported sessions (the answer thread reads the
/// verdicts).
fn send_exported(
    sock: &UnixStream,
    exported: &[crate::session::driver::Exported],
) -> Result<(), HandoverError> {
    use std::os::fd::AsFd;
    let mut fds = Vec::with_capacity(2 * exported.len());
    let mut blob = Vec::with_capacity(2 * exported.len());
    let mut sessions = Vec::with_capacity(exported.len());
    let now = monotonic_ns();
    for e in exported {
        if let Some(fd) = &e.client {
            fds.push(fd.as_fd());
        }
        blob.push(IoSlice::new(&e.snapshot));
        if let Some(leg) = &e.server {
            fds.push(leg.fd.as_fd());
            blob.push(IoSlice::new(&leg.rbuf));
        }
        if let Some(r) = &e.resumable {
            blob.push(IoSlice::new(&r.state));
        }
        if let Some((records, _)) = &e.replication {
            blob.push(IoSlice::new(records));
        }
        sessions.push(SessionEntry {
            id: e.id.to_string(),
            listener: e.listener.clone(),
            peer: e.peer.clone(),
            client: e.client_kind,
            resumable: e.resumable.as_ref().map(|r| ResumableEntry {
                state: r.state.len() as u32,
                leg: r.leg,
            }),
            replication: e
                .replication
                .as_ref()
                .map(|(records, counters)| ReplicationEntry {
                    records: records.len() as u32,
                    counters: *counters,
                }),
            server: e.server.as_ref().map(|l| LegEntry {
                gen: l.gen,
                kind: l.kind,
                rbuf: l.rbuf.len() as u32,
                written: l.written,
            }),
            snapshot: e.snapshot.len() as u32,
            client_eof: e.client_eof,
            age_ms: e.age.as_millis() as u64,
            paused_ns: now.saturating_sub(e.paused_at.elapsed().as_nanos() as u64),
            legs: e.legs,
            replayed: e.replayed,
            ack: e.ack.clone(),
        });
    }
    let batch = Batch {
        version: VERSION,
        sessions,
        done: false,
    };
    send_batch(sock, &batch, &blob, &fds)
}

/// Sessions per batch message (two descriptors each at most, well under
/// the kernel's 253 per message). Small batches keep each session's pause
/// short: a session waits, paused, for its own batch's round trip only.
pub const BATCH: usize = 8;
/// Most descriptors in one batch message.
const MAX_BATCH_FDS: usize = 2 * BATCH;
/// Largest batch header (JSON) accepted.
const MAX_BATCH_HEADER: usize = 1 << 20;
/// Largest batch payload (snapshots and undecoded server bytes) accepted.
const MAX_BATCH_BLOB: u64 = 1 << 32;

/// One session of a batch. Its descriptors travel in order (client, then
/// server when `server` is set); its bytes in the batch's payload, in order
/// (`snapshot` bytes of [`SessionCore::export`](crate::session::core::SessionCore::export),
/// then the leg's `rbuf` bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    /// The session id, for logs.
    pub id: String,
    /// The listener it came through, by name.
    pub listener: String,
    /// The client's address, for logs.
    pub peer: String,
    pub client: crate::session::driver::SockKind,
    /// A client of a resume-protocol listener (`client` is `resumable`):
    /// the server library's state of its session, and its leg's socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumable: Option<ResumableEntry>,
    /// Host failover: the session's replication records (their bytes, in
    /// the payload after the rest) and its tap's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationEntry>,
    pub server: Option<LegEntry>,
    /// Bytes of the core's snapshot.
    pub snapshot: u32,
    /// The client closed its side (read EOF).
    pub client_eof: bool,
    /// How long the session has been open, in milliseconds.
    pub age_ms: u64,
    /// When it stopped moving bytes in the old process: [`monotonic_ns`]
    /// (0: not said). The new process measures the session's pause from it
    /// to its first run there.
    #[serde(default)]
    pub paused_ns: u64,
    pub legs: u64,
    pub replayed: u64,
    /// The backend's ack mode ([`crate::proxy::ack_kind`]): the new process
    /// takes the session only if its backend of that name keeps it.
    pub ack: String,
}

/// The resumable session of a [`SessionEntry`] whose client came through a
/// resume-protocol listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumableEntry {
    /// Bytes of its state (`server::Parked::state`).
    pub state: u32,
    /// The socket of its current leg, when one travels (none: no leg, or a
    /// TLS leg, closed once taken; the initiator resumes).
    pub leg: Option<crate::session::driver::SockKind>,
}

/// The replication of a [`SessionEntry`] (host failover, active).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationEntry {
    /// Bytes of its records (`failover::codec`).
    pub records: u32,
    pub counters: crate::failover::tap::TapCounters,
}

impl SessionEntry {
    /// Descriptors of the client side: its socket, or a resumable session's
    /// leg when one travels.
    fn client_fds(&self) -> usize {
        match &self.resumable {
            Some(r) => usize::from(r.leg.is_some()),
            None => 1,
        }
    }
}

/// The leg (server connection) of a [`SessionEntry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegEntry {
    pub gen: u64,
    pub kind: crate::session::driver::SockKind,
    /// Bytes read from the server, not yet decoded.
    pub rbuf: u32,
    /// Bytes written on the leg.
    pub written: u64,
}

/// A batch of sessions; `done` (with no sessions) ends the hand-over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub version: u32,
    pub sessions: Vec<SessionEntry>,
    pub done: bool,
}

/// A session as the new process receives it.
#[derive(Debug)]
pub struct IncomingSession {
    pub entry: SessionEntry,
    pub snapshot: bytes::Bytes,
    pub rbuf: bytes::Bytes,
    /// A resumable client's state (empty for others).
    pub resumable: bytes::Bytes,
    /// The session's replication records (empty without failover).
    pub replication: bytes::Bytes,
    /// The client's socket (a resumable client's leg, if one travels).
    pub client: Option<OwnedFd>,
    pub server: Option<OwnedFd>,
}

impl Batch {
    /// Descriptors the batch carries.
    pub fn fds(&self) -> usize {
        self.sessions
            .iter()
            .map(|s| s.client_fds() + usize::from(s.server.is_some()))
            .sum()
    }

    /// Payload bytes the batch carries.
    pub fn blob(&self) -> u64 {
        self.sessions
            .iter()
            .map(|s| {
                u64::from(s.snapshot)
                    + s.server.as_ref().map_or(0, |l| u64::from(l.rbuf))
                    + s.resumable.as_ref().map_or(0, |r| u64::from(r.state))
                    + s.replication.as_ref().map_or(0, |r| u64::from(r.records))
            })
            .sum()
    }

    /// Parses a batch header and checks it against what arrived: version,
    /// descriptor count and payload size. Pure (fuzzed).
    pub fn decode(json: &[u8], fds: usize, blob: u64) -> Result<Batch, HandoverError> {
        if json.len() > MAX_BATCH_HEADER {
            return Err(HandoverError::TooLarge(json.len()));
        }
        let batch: Batch = serde_json::from_slice(json)?;
        if batch.version != VERSION {
            return Err(HandoverError::Version { got: batch.version });
        }
        if batch.sessions.len() > BATCH || (batch.done && !batch.sessions.is_empty()) {
            return Err(HandoverError::TooLarge(batch.sessions.len()));
        }
        if batch.sessions.iter().any(|s| {
            (s.client == crate::session::driver::SockKind::Resumable) != s.resumable.is_some()
                || s.resumable.as_ref().and_then(|r| r.leg)
                    == Some(crate::session::driver::SockKind::Resumable)
        }) {
            return Err(HandoverError::Resumable);
        }
        if batch.fds() != fds {
            return Err(HandoverError::FdCount {
                expected: batch.fds(),
                got: fds,
            });
        }
        if batch.blob() != blob {
            return Err(HandoverError::Blob {
                expected: batch.blob(),
                got: blob,
            });
        }
        Ok(batch)
    }

    /// Splits what arrived into sessions.
    pub fn split(self, blob: Vec<u8>, fds: Vec<OwnedFd>) -> Vec<IncomingSession> {
        let blob = bytes::Bytes::from(blob);
        let mut fds = fds.into_iter();
        let mut at = 0usize;
        let mut take = |n: u32| {
            let b = blob.slice(at..at + n as usize);
            at += n as usize;
            b
        };
        let mut out = Vec::with_capacity(self.sessions.len());
        for entry in self.sessions {
            // `decode` checked the counts: these cannot run out.
            let client =
                (entry.client_fds() == 1).then(|| fds.next().expect("descriptor count checked"));
            let server = entry
                .server
                .as_ref()
                .map(|_| fds.next().expect("descriptor count checked"));
            let snapshot = take(entry.snapshot);
            let rbuf = take(entry.server.as_ref().map_or(0, |l| l.rbuf));
            let resumable = take(entry.resumable.as_ref().map_or(0, |r| r.state));
            let replication = take(entry.replication.as_ref().map_or(0, |r| r.records));
            out.push(IncomingSession {
                entry,
                snapshot,
                rbuf,
                resumable,
                replication,
                client,
                server,
            });
        }
        out
    }
}

/// Sends a batch: `[u32 header length][u64 payload length][header][payload]`,
/// with `fds` attached to the first bytes.
pub fn send_batch(
    sock: &UnixStream,
    batch: &Batch,
    blob: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandoverError> {
    let json = serde_json::to_vec(batch)?;
    let blob_len: u64 = blob.iter().map(|b| b.len() as u64).sum();
    if fds.len() != batch.fds() || fds.len() > MAX_BATCH_FDS || blob_len != batch.blob() {
        return Err(HandoverError::FdCount {
            expected: batch.fds(),
            got: fds.len(),
        });
    }
    let mut head = Vec::with_capacity(12 + json.len());
    head.extend_from_slice(&(json.len() as u32).to_be_bytes());
    head.extend_from_slice(&blob_len.to_be_bytes());
    head.extend_from_slice(&json);
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(HandoverError::TooLarge(fds.len()));
    }
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&head)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(io::Error::from)?;
    let mut w = sock;
    w.write_all(&head[sent..])?;
    for part in blob {
        w.write_all(part)?;
    }
    Ok(())
}

/// One `recvmsg` into `buf` with room for `max_fds` descriptors, wrapped
/// as `OwnedFd` at once (so they close on any error). A truncated control
/// message (MSG_CTRUNC: descriptors were lost) is an error.
fn recv_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<(usize, Vec<OwnedFd>), HandoverError> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(max_fds))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(HandoverError::Truncated);
    }
    Ok((msg.bytes, fds))
}

/// Receives a batch; descriptors are wrapped as `OwnedFd` at once.
pub fn recv_batch(sock: &UnixStream) -> Result<(Batch, Vec<u8>, Vec<OwnedFd>), HandoverError> {
    let mut head = [0u8; 12];
    // Only the fixed header with the descriptors: the rest is read plainly.
    let (got, fds) = recv_fds(sock, &mut head, MAX_BATCH_FDS)?;
    if got == 0 {
        return Err(HandoverError::NoAck);
    }
    let mut r = sock;
    r.read_exact(&mut head[got..])?;
    let json_len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let blob_len = u64::from_be_bytes(head[4..].try_into().expect("8 bytes"));
    if json_len > MAX_BATCH_HEADER {
        return Err(HandoverError::TooLarge(json_len));
    }
    if blob_len > MAX_BATCH_BLOB {
        return Err(HandoverError::Blob {
            expected: MAX_BATCH_BLOB,
            got: blob_len,
        });
    }
    let mut json = vec![0u8; json_len];
    r.read_exact(&mut json)?;
    let batch = Batch::decode(&json, fds.len(), blob_len)?;
    let mut blob = vec![0u8; blob_len as usize];
    r.read_exact(&mut blob)?;
    Ok((batch, blob, fds))
}

/// The new process's answer to a batch: one byte per session, 1 when it
/// took the session (it serves it from now on), 0 when the old process
/// keeps it.
pub fn send_verdicts(sock: &UnixStream, taken: &[bool]) -> Result<(), HandoverError> {
    let mut msg = Vec::with_capacity(4 + taken.len());
    msg.extend_from_slice(&(taken.len() as u32).to_be_bytes());
    msg.extend(taken.iter().map(|&t| u8::from(t)));
    let mut w = sock;
    w.write_all(&msg)?;
    Ok(())
}

/// Reads the answer to a batch of `n` sessions.
pub fn recv_verdicts(sock: &UnixStream, n: usize) -> Result<Vec<bool>, HandoverError> {
    let mut len = [0u8; 4];
    let mut r = sock;
    r.read_exact(&mut len).map_err(|_| HandoverError::NoAck)?;
    let got = u32::from_be_bytes(len) as usize;
    if got != n {
        return Err(HandoverError::FdCount { expected: n, got });
    }
    let mut v = vec![0u8; n];
    r.read_exact(&mut v).map_err(|_| HandoverError::NoAck)?;
    Ok(v.into_iter().map(|b| b == 1).collect())
}

/// Raises the calling thread's scheduling priority for as long as it is
/// kept: nice −10 (the hand-over's own threads: each session's pause waits
/// on them, and on a machine whose CPUs are saturated an ordinary thread
/// woken by a message can wait a millisecond or more to run) and a short
/// time slice ([`URGENT_SLICE`]: under EEVDF a woken thread with a short
/// slice gets an earlier deadline and so runs sooner). Without the
/// privilege (CAP_SYS_NICE, or root) the nice value stays; the slice needs
/// none. Dropping it restores both, so a pooled thread goes back to its
/// pool as it came. Real-time scheduling was tried and is not used: it cut
/// the busy pauses further but stalled sessions for up to a second now and
/// then (docs/benchmarks.md, "Hand-over").
pub struct Urgent {
    tid: rustix::process::Pid,
    before: Option<i32>,
    /// The nice value while raised, when the short slice was set.
    sliced: Option<i32>,
    /// Dropped on the thread that raised it (the nice value is per thread).
    _thread: std::marker::PhantomData<*const ()>,
}

/// The nice value the hand-over's threads run at while they work.
const URGENT_NICE: i32 = -10;

/// The time slice the hand-over's threads run with while they work. With
/// busy sessions going alone, their pauses' p99 was under 1 ms in 108 of
/// 130 upgrades with it and 97 of 130 without; the idle hand-over of 9,000
/// sessions took 10% longer (docs/benchmarks.md, "A short slice").
const URGENT_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

impl Urgent {
    pub fn raise() -> Urgent {
        let tid = rustix::thread::gettid();
        let before = rustix::process::getpriority_process(Some(tid))
            .ok()
            .filter(|&n| n > URGENT_NICE)
            .filter(|_| rustix::process::setpriority_process(Some(tid), URGENT_NICE).is_ok());
        let nice = match before {
            Some(_) => Ok(URGENT_NICE),
            None => rustix::process::getpriority_process(Some(tid)),
        };
        let sliced = nice
            .ok()
            .filter(|&n| crate::sched::set_thread_slice(URGENT_SLICE, n).is_ok());
        Urgent {
            tid,
            before,
            sliced,
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if let Some(n) = self.sliced {
            let _ = crate::sched::set_thread_slice(std::time::Duration::ZERO, n);
        }
        if let Some(n) = self.before {
            let _ = rustix::process::setpriority_process(Some(self.tid), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn manifest(n: usize) -> Manifest {
        Manifest {
            version: VERSION,
            pid: 1,
            entries: (0..n)
                .map(|i| Entry {
                    kind: Kind::Listener,
                    name: format!("l{i}"),
                    endpoint: "127.0.0.1:1".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_busy_session_goes_alone_and_idle_ones_fill_the_window() {
        // A busy session waits until nothing is in flight…
        assert!(may_ask(0, false, true));
        assert!(!may_ask(1, false, true));
        assert!(!may_ask(WINDOW - 1, false, true));
        // …and nothing is asked behind it until it is answered for.
        assert!(!may_ask(1, true, false));
        assert!(!may_ask(1, true, true));
        // Idle sessions go up to WINDOW at a time.
        assert!(may_ask(0, false, false));
        assert!(may_ask(WINDOW - 1, false, false));
        assert!(!may_ask(WINDOW, false, false));
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let ms = |v: &[u64]| -> Vec<std::time::Duration> {
            v.iter()
                .map(|&m| std::time::Duration::from_millis(m))
                .collect()
        };
        let mut d = ms(&[5, 1, 4, 2, 3, 10, 9, 8, 7, 6]);
        assert_eq!(quantile_us(&mut d, 0.5), 5_000);
        assert_eq!(quantile_us(&mut d, 0.99), 10_000);
        assert_eq!(quantile_us(&mut d, 1.0), 10_000);
        assert_eq!(quantile_us(&mut d, 0.0), 1_000);
        assert_eq!(quantile_us(&mut [], 0.99), 0);
    }

    #[test]
    fn a_pause_stamp_reads_the_clock_instant_reads() {
        // The old process stamps a pause as `monotonic_ns() - elapsed`
        // since an `Instant`: that lands between two readings taken around
        // the `Instant` only if both read the same clock.
        let before = monotonic_ns();
        let at = std::time::Instant::now();
        let after = monotonic_ns();
        let stamp = monotonic_ns().saturating_sub(at.elapsed().as_nanos() as u64);
        // (Off by the time between the stamp's two clock reads: ns.)
        let slack = 10_000;
        assert!(
            (before - slack..=after + slack).contains(&stamp),
            "{before} <= {stamp} <= {after}"
        );
    }

    #[test]
    fn a_batch_without_pause_stamps_still_decodes() {
        // A batch from a holdfast before `paused_ns` existed.
        let json = br#"{"version":1,"done":false,"sessions":[{"id":"a","listener":"l",
            "peer":"127.0.0.1:1","client":"tcp","server":null,"snapshot":0,
            "client_eof":false,"age_ms":1,"legs":1,"replayed":0,"ack":"tcp"}]}"#;
        let b = Batch::decode(json, 1, 0).unwrap();
        assert_eq!(b.sessions[0].paused_ns, 0);
    }

    #[test]
    fn listeners_travel_with_their_manifest() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let m = manifest(2);
        send(&a, &m, &[l1.as_fd(), l2.as_fd()]).unwrap();
        let (got, fds) = recv(&b).unwrap();
        assert_eq!(got, m);
        assert_eq!(fds.len(), 2);
        let back = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(back.local_addr().unwrap(), l1.local_addr().unwrap());
        check_peer(&b).unwrap();
    }

    #[test]
    fn wrong_version_and_count_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut m = manifest(0);
        m.version = 99;
        send(&a, &m, &[]).unwrap();
        assert!(matches!(recv(&b), Err(HandoverError::Version { got: 99 })));

        // A manifest naming one descriptor, sent with none.
        let (a, b) = UnixStream::pair().unwrap();
        let json = serde_json::to_vec(&manifest(1)).unwrap();
        let mut w = &a;
        w.write_all(&(json.len() as u32).to_be_bytes()).unwrap();
        w.write_all(&json).unwrap();
        assert!(matches!(
            recv(&b),
            Err(HandoverError::FdCount {
                expected: 1,
                got: 0
            })
        ));
    }

    #[test]
    fn truncated_descriptors_are_an_error() {
        // More descriptors than the receiver has room for: the kernel sets
        // MSG_CTRUNC and closes the ones that did not fit.
        let (a, b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..MAX_FDS + 8).map(|_| l.as_fd()).collect();
        let json = serde_json::to_vec(&manifest(fds.len())).unwrap();
        let len = (json.len() as u32).to_be_bytes();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        let iov = [IoSlice::new(&len), IoSlice::new(&json)];
        rustix::net::sendmsg(&a, &iov, &mut control, SendFlags::empty()).unwrap();
        assert!(matches!(recv(&b), Err(HandoverError::Truncated)));
    }

    #[test]
    fn ack_or_eof() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[ACK]).unwrap();
        wait_ack(&b).unwrap();
        drop(a);
        assert!(matches!(wait_ack(&b), Err(HandoverError::NoAck)));
    }

    /// The calling thread's nice value, from /proc.
    fn nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command's closing parenthesis start at field 3.
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        rest[19 - 3].parse().unwrap()
    }

    #[test]
    fn urgent_raises_the_thread_and_gives_back_what_it_had() {
        std::thread::spawn(|| {
            let before = nice();
            let urgent = Urgent::raise();
            if urgent.before.is_some() {
                assert_eq!(nice(), URGENT_NICE);
            } else {
                eprintln!("no privilege to raise the priority: nothing changed");
                assert_eq!(nice(), before);
            }
            drop(urgent);
            assert_eq!(nice(), before);
        })
        .join()
        .unwrap();
    }
}
