//! A fault-injecting TCP relay for tests: forwards connections to a target,
//! and can cut every connection (reset) or black-hole traffic (stop
//! forwarding without closing, so only heartbeats can notice).
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A relay on 127.0.0.1:0 towards `target`.
pub struct Relay {
    pub addr: String,
    /// Bumped to cut every live connection.
    cut: watch::Sender<u64>,
    blackhole: Arc<AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (cut, cut_rx) = watch::channel(0u64);
        let blackhole = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let bh = blackhole.clone();
        let acc = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((a, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::Relaxed);
                let target = target.clone();
                let mut cut_rx = cut_rx.clone();
                let bh = bh.clone();
                tokio::spawn(async move {
                    let Ok(b) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = a.set_nodelay(true);
                    let _ = b.set_nodelay(true);
                    cut_rx.borrow_and_update();
                    let (ar, aw) = a.into_split();
                    let (br, bw) = b.into_split();
                    let up = pipe(ar, bw, bh.clone());
                    let down = pipe(br, aw, bh);
                    tokio::select! {
                        _ = cut_rx.changed() => {}
                        _ = async { tokio::join!(up, down) } => {}
                    }
                    // Dropping the halves closes both connections; the
                    // peers see EOF or a reset depending on unread data.
                });
            }
        });
        Relay {
            addr,
            cut,
            blackhole,
            accepted,
            task,
        }
    }

    /// Closes every live connection through the relay.
    pub fn cut(&self) {
        self.cut.send_modify(|c| *c += 1);
    }

    /// While on, nothing passes in either direction (the relay stops
    /// reading, so senders stall as on a dead link); the connections stay
    /// open.
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A black hole forwards nothing and reads nothing: the sender's
        // window fills and it stalls, as on a dead link.
        while blackhole.load(Ordering::Relaxed) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => {
                // Bytes read as the black hole opened wait for it to close:
                // like TCP over a dead link, nothing is lost or reordered
                // inside a connection, it only stops.
                while blackhole.load(Ordering::Relaxed) {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
