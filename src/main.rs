//! The holdfast binary: command line, logging, exit codes. Everything else is
//! in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use holdfast::config;
use holdfast::demo::server::Mode;
use holdfast::lifecycle::{Phase, Shutdown};

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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
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
        Command::Run { config } => {
            init_logging(cli.log_format, "info");
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    tracing::error!("{}: invalid config", config.display());
                    eprintln!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // Before any thread starts: it unsets LISTEN_* in our environment.
            if let Err(e) = take_systemd_sockets() {
                tracing::error!(error = %e, "cannot use the sockets systemd passed");
                return ExitCode::from(EXIT_RUNTIME);
            }
            runtime().block_on(async move {
                let bound = match holdfast::proxy::bind(&cfg).await {
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
                let signals = tokio::spawn(shutdown.clone().from_signals());
                let (phase, phases) = tokio::sync::watch::channel(Phase::Starting);
                let notifier = tokio::spawn(notify_systemd(phases, shutdown.clone()));
                let rt = holdfast::proxy::Runtime::for_config(&cfg);
                let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
                let hup = tokio::spawn(reload_on_sighup(
                    config.clone(),
                    reload_tx,
                    rt.metrics.clone(),
                ));
                let res = holdfast::proxy::run_with(cfg, bound, shutdown, phase, rt, reloads).await;
                // run dropped the phase sender: the notifier has said STOPPING.
                let _ = notifier.await;
                signals.abort();
                hup.abort();
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

/// SIGHUP: read and validate the file again; a bad file changes nothing
/// (its errors are logged and counted), a good one is handed to the proxy.
async fn reload_on_sighup(
    path: PathBuf,
    tx: tokio::sync::mpsc::Sender<holdfast::proxy::ReloadRequest>,
    metrics: holdfast::metrics::Metrics,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
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
    report(holdfast::systemd::stopping(), "STOPPING=1");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
