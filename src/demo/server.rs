//! The example server: a tiny line-protocol daemon to put behind holdfast in
//! the demo, the tests and the benchmarks.
//!
//! Modes: `lines` answers each whole line with the same line (a response
//! frame per request frame), `echo` echoes bytes as they arrive, `sink` reads
//! and discards. It prints `listening ADDR` once bound, so a parent process
//! can wait for it. It knows nothing of holdfast.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, UnixListener};

/// What the example server does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Lines,
    Echo,
    Sink,
}

/// Runs the example server on `listen` (`host:port` or `unix:/path`) forever.
pub async fn run(listen: &str, mode: Mode, greeting: Option<String>) -> io::Result<()> {
    if let Some(path) = listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)?;
        println!("listening unix:{path}");
        loop {
            let (s, _) = l.accept().await?;
            tokio::spawn(serve(s, mode, greeting.clone()));
        }
    } else {
        let addr: std::net::SocketAddr = listen
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{listen}: {e}")))?;
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        let l: TcpListener = sock.listen(1024)?;
        println!("listening {}", l.local_addr()?);
        loop {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            tokio::spawn(serve(s, mode, greeting.clone()));
        }
    }
}

async fn serve<S>(s: S, mode: Mode, greeting: Option<String>) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(s);
    if let Some(g) = greeting {
        w.write_all(g.as_bytes()).await?;
    }
    match mode {
        Mode::Lines => {
            // Answers are batched: written once no more whole request is
            // buffered, as a pipelining server would.
            let mut r = BufReader::with_capacity(64 * 1024, r);
            let mut out = Vec::with_capacity(64 * 1024);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = r.read_until(b'\n', &mut line).await?;
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                out.extend_from_slice(&line);
                if !r.buffer().contains(&b'\n') || out.len() >= 64 * 1024 {
                    w.write_all(&out).await?;
                    out.clear();
                }
            }
            w.write_all(&out).await?;
        }
        Mode::Echo => {
            let mut r = r;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n]).await?;
            }
        }
        Mode::Sink => {
            let mut r = r;
            let mut buf = vec![0u8; 64 * 1024];
            while r.read(&mut buf).await? > 0 {}
        }
    }
    w.shutdown().await
}
