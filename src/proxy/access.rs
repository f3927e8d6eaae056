//! The access log: one JSON line per session end (`[log] access`), to
//! stdout or appended to a file. A reload reopens the file, so rotating it
//! is `mv` then `kill -HUP`.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::AccessLog;
use crate::session::driver::Summary;

/// Where access lines go.
pub struct AccessLogger {
    out: Mutex<Box<dyn Write + Send>>,
}

/// One access log line.
#[derive(Serialize)]
struct Line<'a> {
    /// Seconds since the Unix epoch at the session's end.
    ts: f64,
    session: String,
    client: &'a str,
    listener: &'a str,
    backend: &'a str,
    reason: &'static str,
    duration_ms: u64,
    bytes_up: u64,
    bytes_down: u64,
    legs: u64,
    replayed_bytes: u64,
}

impl AccessLogger {
    pub fn open(target: &AccessLog) -> io::Result<AccessLogger> {
        let out: Box<dyn Write + Send> = match target {
            AccessLog::Stdout => Box::new(io::stdout()),
            AccessLog::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        Ok(AccessLogger {
            out: Mutex::new(out),
        })
    }

    /// Writes the line for a session that ended.
    pub fn record(&self, session: &str, client: &str, listener: &str, backend: &str, s: &Summary) {
        let line = Line {
            ts: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            session: session.to_string(),
            client,
            listener,
            backend,
            reason: s.reason.as_str(),
            duration_ms: s.duration.as_millis() as u64,
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
            legs: s.legs,
            replayed_bytes: s.replayed,
        };
        let Ok(mut text) = serde_json::to_vec(&line) else {
            return;
        };
        text.push(b'\n');
        if let Ok(mut out) = self.out.lock() {
            if let Err(e) = out.write_all(&text).and_then(|_| out.flush()) {
                tracing::warn!(error = %e, "access log write failed");
            }
        }
    }
}
