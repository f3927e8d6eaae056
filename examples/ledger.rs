//! An append-only ledger on `holdfast::server`: exactly-once across
//! transport breaks and process restarts (SIGKILL included).
//!
//! Each request is a line. The ledger appends it to `DIR/ledger.log` with
//! the session id, the up-stream offset the line ends at and the down-stream
//! offset its response starts at, `fsync`s, acknowledges that up offset
//! (`AckPolicy::Manual`), then answers `ok <record-number>\n`.
//!
//! On start it reads the file back and installs a `restore` callback that
//! gives, for each session id it knows, the last committed up offset (0 for
//! a session that committed nothing yet): a restarted ledger resumes those
//! sessions, the initiator replays only
//! uncommitted lines, and the responses the initiator had not received are
//! regenerated from the records (they are a function of committed state).
//!
//! ```sh
//! cargo run --example ledger -- --listen 127.0.0.1:0 --data DIR --key-file FILE
//! # over mutual TLS (initiators need a certificate signed by ca.pem):
//! cargo run --example ledger -- --listen 127.0.0.1:0 --data DIR --key-file FILE \
//!     --tls-cert server.pem --tls-key server-key.pem --client-ca ca.pem
//! ```
//! prints `listening ADDR` once bound.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Parser;
use holdfast::server::{
    hex, AckPolicy, ResumableSession, ResumeListener, ServerConfig, SessionId, TlsConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(about = "An append-only ledger service speaking holdfast's resume protocol")]
struct Args {
    /// host:port or unix:/path
    #[arg(long)]
    listen: String,
    /// Directory of ledger.log
    #[arg(long)]
    data: PathBuf,
    /// The resume key (at least 32 bytes, used as is)
    #[arg(long)]
    key_file: PathBuf,
    /// Serve over TLS with this certificate chain (PEM; needs --tls-key)
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: initiators must present a certificate signed by one of
    /// these CAs (PEM; needs --tls-cert)
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
}

/// One committed record of a session.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// Up-stream offset just past the request line.
    up_end: u64,
    /// Down-stream offset where its response starts.
    down_start: u64,
    number: u64,
}

/// The ledger file and what it holds, per session.
struct Ledger {
    file: File,
    count: u64,
    sessions: HashMap<SessionId, Vec<Record>>,
}

fn parse_id(s: &str) -> Option<SessionId> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

impl Ledger {
    /// Opens (or creates) `dir/ledger.log`, drops a torn last line (never
    /// fsynced, so never acked) and indexes the records.
    fn open(dir: &Path) -> io::Result<Ledger> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("ledger.log");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut sessions: HashMap<SessionId, Vec<Record>> = HashMap::new();
        let mut count = 0;
        let mut good_len = 0u64;
        file.rewind()?;
        let mut r = io::BufReader::new(&file);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = r.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            let mut f = text.splitn(5, ' ');
            let (Some(id), Some(up), Some(down), Some(no)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                break;
            };
            let (Some(id), Ok(up_end), Ok(down_start), Ok(number)) =
                (parse_id(id), up.parse(), down.parse(), no.parse())
            else {
                break;
            };
            sessions.entry(id).or_default().push(Record {
                up_end,
                down_start,
                number,
            });
            count = number;
            good_len += n as u64;
        }
        drop(r);
        file.set_len(good_len)?;
        Ok(Ledger {
            file,
            count,
            sessions,
        })
    }

    /// Appends and fsyncs one record; returns its number.
    fn append(
        &mut self,
        id: SessionId,
        up_end: u64,
        down_start: u64,
        line: &[u8],
    ) -> io::Result<u64> {
        let number = self.count + 1;
        let mut rec = format!("{} {up_end} {down_start} {number} ", hex(&id)).into_bytes();
        rec.extend_from_slice(line);
        rec.push(b'\n');
        self.file.write_all(&rec)?;
        self.file.sync_data()?;
        self.count = number;
        self.sessions.entry(id).or_default().push(Record {
            up_end,
            down_start,
            number,
        });
        Ok(number)
    }
}

fn response(number: u64) -> String {
    format!("ok {number}\n")
}

/// Serves one session: regenerates responses a restored session's
/// initiator never received, then commits, acks and answers each line.
async fn handle(mut s: ResumableSession, ledger: Arc<Mutex<Ledger>>) -> io::Result<()> {
    let id = s.id();
    if s.is_restored() {
        let written = s.written();
        let records = ledger
            .lock()
            .expect("ledger lock")
            .sessions
            .get(&id)
            .cloned()
            .unwrap_or_default();
        for r in records {
            let resp = response(r.number);
            let end = r.down_start + resp.len() as u64;
            if end > written {
                let from = written.saturating_sub(r.down_start) as usize;
                s.write_all(&resp.as_bytes()[from..]).await?;
            }
        }
    }
    let mut offset = s.consumed();
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            offset += line.len() as u64;
            let down_start = s.written();
            // Blocking file IO in the runtime: acceptable for an example;
            // a real service would batch commits off the runtime.
            let number = ledger.lock().expect("ledger lock").append(
                id,
                offset,
                down_start,
                &line[..line.len() - 1],
            )?;
            s.ack(offset)?;
            s.write_all(response(number).as_bytes()).await?;
        }
    }
    // The initiator's FIN: everything is read (a torn last line is dropped).
    s.ack(s.consumed())?;
    s.shutdown().await
}

/// Runs the ledger on `listen` with its data in `data` (over `tls` if
/// given); calls `ready` with the bound address once listening. Runs until
/// the process ends.
pub async fn serve(
    listen: &str,
    data: &Path,
    key: Vec<u8>,
    tls: Option<TlsConfig>,
    ready: impl FnOnce(&str),
) -> io::Result<()> {
    let ledger = Arc::new(Mutex::new(Ledger::open(data)?));
    let mut cfg = ServerConfig::new(key);
    cfg.ack = AckPolicy::Manual;
    cfg.tls = tls;
    let l2 = ledger.clone();
    // Any session an authenticated initiator resumes is restored: at its
    // last committed offset, or at 0 if none of its requests was committed
    // before a restart (it had opened but stored nothing yet).
    cfg.restore = Some(Arc::new(move |id| {
        Some(
            l2.lock()
                .expect("ledger lock")
                .sessions
                .get(&id)
                .and_then(|r| r.last())
                .map_or(0, |r| r.up_end),
        )
    }));
    let listener = ResumeListener::bind(listen, cfg).await?;
    ready(listener.local_addr());
    loop {
        let s = listener.accept().await?;
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let id = hex(&s.id());
            if let Err(e) = handle(s, ledger).await {
                tracing::info!(session.id = %id, error = %e, "ledger session ended");
            }
        });
    }
}

#[allow(dead_code)] // the tests include this file for `serve`
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(io::stderr)
        .init();
    let args = Args::parse();
    let key = std::fs::read(&args.key_file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.key_file.display()))?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsConfig::from_pem_files(
            cert,
            key,
            args.client_ca.as_deref(),
        )?),
        _ => None,
    };
    serve(&args.listen, &args.data, key, tls, |addr| {
        println!("listening {addr}");
        let _ = io::stdout().flush();
    })
    .await?;
    Ok(())
}
