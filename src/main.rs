//! The holdfast binary: command line, logging, exit codes. Everything else is
//! in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use holdfast::config;
use holdfast::demo::server::Mode;
use holdfast::lifecycle::{Phase, Shutdown, StopSignals};

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when listeners cannot be bound or the runtime fails.
const EXIT_RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "A connection-preserving TCP proxy"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Take the listening sockets over from the holdfast running on
        /// `[handover] socket` (an upgrade); it then drains and exits.
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config file; print every error with its key and line.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show holdfast keeping clients connected while their server is killed
    /// and restarted every ~2 s.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Number of clients.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Milliseconds between server kills.
        #[arg(long, default_value_t = 2000)]
        kill_every_ms: u64,
    },
    /// Run the example line server alone (what the demo restarts).
    ExampleServer {
        #[arg(long)]
        listen: String,
        #[arg(long, value_enum, default_value_t = Mode::Lines)]
        mode: Mode,
        /// A greeting the server writes on every connection.
        #[arg(long)]
        greeting: Option<String>,
    },
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr is a pipe whose reader
        // went away, say journald restarting) is lost, not reported with
        // `eprintln!`, which would panic the task that logged: a session,
        // or the task that turns SIGTERM into a drain.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// How SIGUSR2 starts the next process: the binary's path as resolved at
/// startup (`current_exe()`; once the file is replaced, `/proc/self/exe`
/// reads "… (deleted)", but this path names the new binary) and our
/// arguments, plus `--takeover`.
#[derive(Clone)]
struct Upgrade {
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
}

fn main() -> ExitCode {
    let upgrade = std::env::current_exe().ok().map(|exe| {
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        if !args.iter().any(|a| a == "--takeover") {
            args.push("--takeover".into());
        }
        Upgrade { exe, args }
    });
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener{}, {} backend{})",
                    config.display(),
                    c.listeners.len(),
                    if c.listeners.len() == 1 { "" } else { "s" },
                    c.backends.len(),
                    if c.backends.len() == 1 { "" } else { "s" },
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {} error(s)", config.display(), errors.0.len());
                eprintln!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config, takeover } => {
            init_logging(cli.log_format, "info");
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    tracing::error!("{}: invalid config", config.display());
                    eprintln!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // Before any thread starts: every thread inherits what is left.
            match holdfast::privileges::narrow(holdfast::privileges::needed(&cfg)) {
                Ok(n) if n.had != n.kept => tracing::info!(
                    kept = %holdfast::privileges::names(n.kept),
                    "capabilities: kept what the config needs, dropped the rest"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot drop capabilities");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            }
            let standby = cfg
                .failover
                .clone()
                .filter(|f| matches!(f.role, config::FailoverRole::Standby { .. }));
            if standby.is_some() && takeover {
                tracing::error!("--takeover and [failover] role = \"standby\" do not go together");
                return ExitCode::from(EXIT_CONFIG);
            }
            // Before any thread starts: it unsets LISTEN_* in our environment.
            if let Err(e) = take_systemd_sockets() {
                tracing::error!(error = %e, "cannot use the sockets systemd passed");
                return ExitCode::from(EXIT_RUNTIME);
            }
            let (inherited, ack) = if takeover {
                let Some(h) = &cfg.handover else {
                    tracing::error!("--takeover needs a [handover] socket in the config");
                    return ExitCode::from(EXIT_CONFIG);
                };
                match take_over(&h.socket) {
                    Ok((inherited, sock)) => (inherited, Some(sock)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot take over");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                }
            } else {
                (holdfast::proxy::Inherited::default(), None)
            };
            let (runtime, session_threads) = runtime_with(&cfg.runtime);
            runtime.block_on(async move {
                // A standby follows the active and binds its listeners (on
                // the service address) only once it has taken over.
                let taken = match &standby {
                    None => None,
                    Some(f) => match holdfast::failover::serve::standby_until_takeover(f).await {
                        Ok(report) => Some(report.taken),
                        Err(e) => {
                            tracing::error!(error = %e, "failover: standby failed");
                            return ExitCode::from(EXIT_RUNTIME);
                        }
                    },
                };
                let bound = match holdfast::proxy::bind_with(&cfg, inherited).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                };
                let unused = holdfast::systemd::listen_fd_names();
                if !unused.is_empty() {
                    tracing::warn!(sockets = %unused.join(","), "systemd passed sockets no listener uses");
                }
                let shutdown = Shutdown::new();
                // Registered here, not in the tasks that wait for them: a
                // signal that comes before such a task first runs (right
                // after "holdfast running") would otherwise kill us.
                let stop_signals = match StopSignals::register() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM and SIGINT");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                };
                let sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
                let signals = tokio::spawn(shutdown.clone().from_signals(stop_signals));
                let (phase, phases) = tokio::sync::watch::channel(Phase::Starting);
                let notifier = tokio::spawn(notify_systemd(phases, shutdown.clone()));
                let mut rt = holdfast::proxy::Runtime::for_config(&cfg);
                if session_threads > 1 {
                    match holdfast::proxy::workers::Workers::start(session_threads, &rt.metrics) {
                        Ok(w) => rt.workers = Some(w),
                        Err(e) => {
                            tracing::error!(error = %e, threads = session_threads, "cannot start the session threads");
                            return ExitCode::from(EXIT_RUNTIME);
                        }
                    }
                }
                let workers = rt.workers.clone();
                let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
                let hup = tokio::spawn(reload_on_sighup(
                    sighup,
                    config.clone(),
                    reload_tx,
                    rt.metrics.clone(),
                ));
                let (control_tx, control) = tokio::sync::mpsc::channel(1);
                if let Some(taken) = taken {
                    // The sessions taken over run as soon as the proxy does.
                    let control_tx = control_tx.clone();
                    let mut phases = phase.subscribe();
                    tokio::spawn(async move {
                        if phases.wait_for(|p| *p == Phase::Running).await.is_ok() {
                            let _ = control_tx
                                .send(holdfast::proxy::Control::Adopt { taken })
                                .await;
                        }
                    });
                }
                let handover = tokio::spawn(handover_task(
                    cfg.handover.clone(),
                    ack,
                    phase.subscribe(),
                    control_tx,
                    shutdown.clone(),
                ));
                // Registered before "holdfast running" is logged: SIGUSR2's
                // default action would kill us.
                let usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2());
                let usr2 = tokio::spawn(upgrade_on_sigusr2(usr2, upgrade, cfg.handover.is_some()));
                let res = holdfast::proxy::run_full(cfg, bound, shutdown, phase, rt, reloads, control)
                    .await;
                if let Some(w) = workers {
                    w.shut_down();
                }
                // run dropped the phase sender: the notifier has said STOPPING.
                let _ = notifier.await;
                signals.abort();
                hup.abort();
                handover.abort();
                usr2.abort();
                match res {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "holdfast failed");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            })
        }
        Command::Demo {
            duration,
            clients,
            kill_every_ms,
        } => {
            init_logging(cli.log_format, "warn");
            let opts = holdfast::demo::DemoOptions {
                duration: duration.map(std::time::Duration::from_secs),
                clients,
                kill_every: std::time::Duration::from_millis(kill_every_ms),
            };
            match runtime().block_on(holdfast::demo::run(opts)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ExampleServer {
            listen,
            mode,
            greeting,
        } => {
            let greeting = greeting.map(|g| g.replace("\\n", "\n").replace("\\r", "\r"));
            match runtime().block_on(holdfast::demo::server::run(&listen, mode, greeting)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("example server: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// How long the old process waits for the new one to confirm a hand-over.
const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long either side of a hand-over waits for the other: [`ACK_TIMEOUT`],
/// or `HOLDFAST_TEST_HANDOVER_TIMEOUT_MS` (a test hook, so that a test of a
/// stalled hand-over does not wait a minute).
fn ack_timeout() -> std::time::Duration {
    std::env::var("HOLDFAST_TEST_HANDOVER_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(ACK_TIMEOUT, std::time::Duration::from_millis)
}

/// `--takeover`: connects to the running holdfast's hand-over socket and
/// receives its listening sockets (before the runtime starts).
fn take_over(
    path: &std::path::Path,
) -> Result<
    (holdfast::proxy::Inherited, std::os::unix::net::UnixStream),
    holdfast::handover::HandoverError,
> {
    use holdfast::handover::Kind;
    let (sock, manifest, fds) = holdfast::handover::connect(path)?;
    tracing::info!(
        from.pid = manifest.pid,
        descriptors = fds.len(),
        "hand-over: received listening sockets"
    );
    let mut inherited = holdfast::proxy::Inherited::default();
    for (entry, fd) in manifest.entries.into_iter().zip(fds) {
        match entry.kind {
            Kind::Listener => {
                inherited.listeners.insert(entry.name, fd);
            }
            Kind::Admin => inherited.admin = Some(fd),
        }
    }
    Ok((inherited, sock))
}

/// The hand-over socket. After a takeover: once every listener accepts
/// (phase Running), confirms to the old process (`ack`), tells systemd we
/// are the main process now, and takes the sessions over; then puts our own
/// hand-over socket in place. Then serves hand-overs to the next process.
async fn handover_task(
    handover: Option<holdfast::config::HandoverConfig>,
    ack: Option<std::os::unix::net::UnixStream>,
    mut phases: tokio::sync::watch::Receiver<Phase>,
    control: tokio::sync::mpsc::Sender<holdfast::proxy::Control>,
    shutdown: Shutdown,
) {
    let Some(holdfast::config::HandoverConfig {
        socket: path,
        busy_within,
    }) = handover
    else {
        return;
    };
    if let Some(sock) = ack {
        if phases.wait_for(|p| *p == Phase::Running).await.is_err() {
            return;
        }
        let mut w = &sock;
        if let Err(e) = std::io::Write::write_all(&mut w, &[holdfast::handover::ACK]) {
            tracing::error!(error = %e, "cannot confirm the hand-over; the old process keeps serving too");
        } else {
            tracing::info!("hand-over: listeners confirmed; taking the sessions over");
            let pid = std::process::id();
            if let Err(e) = holdfast::systemd::notify(&format!("MAINPID={pid}\nREADY=1")) {
                tracing::warn!(error = %e, "cannot notify systemd of MAINPID={pid}");
            }
            take_sessions(sock, &control).await;
        }
    } else if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        tracing::error!(socket = %path.display(), "another holdfast answers on the hand-over socket: upgrades disabled (use --takeover to replace it)");
        return;
    }
    let listener = match holdfast::handover::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "upgrades disabled");
            return;
        }
    };
    tracing::info!(socket = %path.display(), pid = std::process::id(), "hand-over socket listening");
    holdfast::handover::serve(listener, control, shutdown, ack_timeout(), busy_within).await;
}

/// The new process's side of the session hand-over: receives batches until
/// the old process says done. Each batch is prepared by the proxy, answered
/// (which sessions we took), and only then started. If the hand-over breaks
/// off, the sessions not answered for stay with the old process.
async fn take_sessions(
    sock: std::os::unix::net::UnixStream,
    control: &tokio::sync::mpsc::Sender<holdfast::proxy::Control>,
) {
    let started = std::time::Instant::now();
    let (reply, importer) = tokio::sync::oneshot::channel();
    let importer = match control
        .send(holdfast::proxy::Control::Importer { reply })
        .await
    {
        Ok(()) => importer.await.ok(),
        Err(_) => None,
    };
    let Some(importer) = importer else {
        tracing::error!("hand-over: the proxy is stopping; sessions stay with the old process");
        return;
    };
    // Fault injection for the tests: a new process that dies half-way.
    let fault = std::env::var("HOLDFAST_TEST_HANDOVER_FAULT").ok();
    let got = tokio::task::spawn_blocking(move || {
        let (taken, refused) = take_batches(&sock, &importer, fault.as_deref());
        (taken, refused, started.elapsed(), importer)
    })
    .await;
    let Ok((taken, refused, total, importer)) = got else {
        tracing::error!("hand-over task failed");
        return;
    };
    // Each session's pause ends at its first run here, just after the
    // answer on its batch: the summary waits (briefly, off the path to
    // the next hand-over socket) for the last ones to start.
    tokio::task::spawn_blocking(move || {
        let (running, mut pauses) = importer.wait_started(taken, std::time::Duration::from_secs(1));
        let mut q = |p| holdfast::handover::quantile_us(&mut pauses, p);
        let (p50, p99, max) = (q(0.50), q(0.99), q(1.0));
        tracing::info!(
            sessions = taken,
            refused,
            total_ms = total.as_secs_f64() * 1000.0,
            running,
            pause_p50_us = p50,
            pause_p99_us = p99,
            pause_max_us = max,
            "hand-over: sessions taken over; the old process drains what stays"
        );
    });
}

/// The new process's hand-over thread: reads each batch as the old process
/// sends it (it does not wait for our answer to send the next), takes its
/// sessions over, answers, and only then lets them start, so a failed
/// answer leaves them all with the old process. Nothing here waits for the
/// runtime to schedule a task. Returns the sessions taken and refused.
fn take_batches(
    sock: &std::os::unix::net::UnixStream,
    importer: &holdfast::proxy::Importer,
    fault: Option<&str>,
) -> (usize, usize) {
    use holdfast::handover;
    let _urgent = handover::Urgent::raise();
    let (mut taken, mut refused, mut batches) = (0usize, 0usize, 0usize);
    if let Err(e) = sock.set_read_timeout(Some(ack_timeout())) {
        tracing::error!(error = %e, "hand-over socket unusable: sessions stay with the old process");
        return (0, 0);
    }
    loop {
        let (batch, blob, fds) = match handover::recv_batch(sock) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "hand-over broke off: sessions not received stay with the old process");
                break;
            }
        };
        if batch.done {
            let _ = handover::send_verdicts(sock, &[]);
            break;
        }
        if fault == Some("exit-on-first-batch") {
            tracing::error!("HOLDFAST_TEST_HANDOVER_FAULT: exiting before answering a batch");
            std::process::exit(EXIT_RUNTIME.into());
        }
        batches += 1;
        if fault == Some("stall-on-second-batch") && batches == 2 {
            // Answers only after the old process stopped waiting.
            tracing::error!("HOLDFAST_TEST_HANDOVER_FAULT: stalling before answering a batch");
            std::thread::sleep(2 * ack_timeout());
        }
        let at = std::time::Instant::now();
        // How long the batch's longest-paused session has been paused.
        let arrived = handover::monotonic_ns();
        let waited_us = batch
            .sessions
            .iter()
            .map(|s| arrived.saturating_sub(s.paused_ns) / 1000)
            .max()
            .unwrap_or(0);
        let bytes = blob.len();
        let sessions = batch.split(blob, fds);
        let n = sessions.len();
        let (verdicts, prepared) = importer.import_batch(sessions);
        let ok = handover::send_verdicts(sock, &verdicts).is_ok();
        let answered_us = at.elapsed().as_micros() as u64;
        // Start the sessions we took only now that the old process knows.
        importer.start(prepared, ok);
        if !ok {
            tracing::error!("hand-over: cannot answer the old process; it keeps this batch");
            refused += n;
            break;
        }
        let t = verdicts.iter().filter(|&&t| t).count();
        taken += t;
        refused += n - t;
        tracing::debug!(
            target: "holdfast::handover",
            sessions = n,
            bytes,
            waited_us,
            answered_us,
            started_us = at.elapsed().as_micros() as u64,
            "hand-over: batch answered"
        );
    }
    (taken, refused)
}

/// SIGUSR2: starts the binary we were started from with our arguments plus
/// `--takeover`; it takes our listeners over, and we drain and exit. If it
/// fails, we keep serving and log its exit status.
async fn upgrade_on_sigusr2(
    usr2: std::io::Result<tokio::signal::unix::Signal>,
    upgrade: Option<Upgrade>,
    enabled: bool,
) {
    let Ok(mut usr2) = usr2 else {
        tracing::warn!("cannot listen for SIGUSR2: upgrades by signal disabled");
        return;
    };
    while usr2.recv().await.is_some() {
        let Some(up) = &upgrade else {
            tracing::error!("SIGUSR2: the path of our binary is unknown; cannot upgrade");
            continue;
        };
        if !enabled {
            tracing::error!("SIGUSR2: no [handover] socket configured; cannot upgrade");
            continue;
        }
        tracing::info!(exe = %up.exe.display(), "SIGUSR2: starting the new process");
        let child = tokio::process::Command::new(&up.exe)
            .args(&up.args)
            .stdin(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                tokio::spawn(async move {
                    match child.wait().await {
                        Ok(s) if s.success() => {}
                        Ok(s) => {
                            tracing::error!(new.pid = pid, status = %s, "the new process failed; this process keeps serving")
                        }
                        Err(e) => {
                            tracing::error!(new.pid = pid, error = %e, "cannot wait for the new process")
                        }
                    }
                });
            }
            Err(e) => {
                tracing::error!(exe = %up.exe.display(), error = %e, "cannot start the new process; this process keeps serving")
            }
        }
    }
}

/// SIGHUP: read and validate the file again; a bad file changes nothing
/// (its errors are logged and counted), a good one is handed to the proxy.
async fn reload_on_sighup(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    path: PathBuf,
    tx: tokio::sync::mpsc::Sender<holdfast::proxy::ReloadRequest>,
    metrics: holdfast::metrics::Metrics,
) {
    let Ok(mut hup) = hup else {
        tracing::warn!("cannot listen for SIGHUP: reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reloading");
        if let Err(e) = holdfast::systemd::reloading() {
            tracing::warn!(error = %e, "cannot notify systemd of RELOADING=1");
        }
        let ready = || {
            if let Err(e) = holdfast::systemd::ready() {
                tracing::warn!(error = %e, "cannot notify systemd of READY=1");
            }
        };
        let config = match config::load(&path) {
            Ok(c) => c,
            Err(errors) => {
                metrics.reload("error");
                for e in &errors.0 {
                    tracing::error!(error = %e, "reload: invalid config");
                }
                tracing::error!(
                    errors = errors.0.len(),
                    "reload rejected: keeping the running configuration"
                );
                ready();
                continue;
            }
        };
        let (done, result) = tokio::sync::oneshot::channel();
        if tx
            .send(holdfast::proxy::ReloadRequest { config, done })
            .await
            .is_err()
        {
            return;
        }
        let _ = result.await;
        ready();
    }
}

/// Takes the sockets systemd passed (socket activation) into the table that
/// `systemd:NAME` listeners bind from.
fn take_systemd_sockets() -> Result<(), holdfast::systemd::ListenFdsError> {
    let names = holdfast::systemd::init_listen_fds()?;
    if !names.is_empty() {
        tracing::info!(sockets = %names.join(","), "systemd passed sockets");
    }
    Ok(())
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) READY=1 once every listener
/// is bound and accepting (phase Running), and STOPPING=1 as soon as a
/// shutdown starts. Ends when the proxy stops.
async fn notify_systemd(mut phases: tokio::sync::watch::Receiver<Phase>, shutdown: Shutdown) {
    let report = |r: std::io::Result<()>, what: &str| {
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot notify systemd of {what}");
        }
    };
    let mut ready = false;
    loop {
        let phase = *phases.borrow_and_update();
        match phase {
            Phase::Starting => {}
            Phase::Running if !ready => {
                ready = true;
                report(holdfast::systemd::ready(), "READY=1");
            }
            Phase::Running => {}
            Phase::Draining | Phase::Stopped => break,
        }
        tokio::select! {
            changed = phases.changed() => if changed.is_err() { break },
            _ = shutdown.drain.cancelled() => break,
            _ = shutdown.stop.cancelled() => break,
        }
    }
    if !shutdown.handed_over.is_cancelled() {
        // After a hand-over the new process is the service: not stopping.
        report(holdfast::systemd::stopping(), "STOPPING=1");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    let cfg = holdfast::config::RuntimeConfig {
        scheduler: holdfast::config::Scheduler::WorkStealing,
        ..Default::default()
    };
    runtime_with(&cfg).0
}

/// The runtime `holdfast run` starts on, and how many session threads it
/// has in all ([`holdfast::proxy::workers::Workers`], started on it).
///
/// `[runtime] scheduler = "per-thread"` (the default): a current-thread
/// runtime here and, once it runs, one more on each further session
/// thread; a session stays on the thread that accepted it, so a new
/// session or a wake-up never wakes another thread. `"work-stealing"`:
/// tokio's multi-thread scheduler with `worker_threads` workers.
/// `worker_threads` (default: one per CPU the process may use) counts the
/// session threads either way; 1 is one current-thread runtime.
fn runtime_with(cfg: &holdfast::config::RuntimeConfig) -> (tokio::runtime::Runtime, usize) {
    use holdfast::config::Scheduler;
    let threads = cfg.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let (mut b, workers) = match (cfg.scheduler, threads) {
        (_, 1) | (Scheduler::PerThread, _) => {
            (tokio::runtime::Builder::new_current_thread(), threads)
        }
        (Scheduler::WorkStealing, n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            (b, 1)
        }
    };
    b.enable_all();
    (b.build().expect("tokio runtime"), workers)
}
