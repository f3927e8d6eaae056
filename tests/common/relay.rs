//! A fault-injecting TCP relay for tests: forwards connections to a target,
//! and can, on every live connection, scripted by the test at any moment:
//! - cut them (close; the peers see EOF, or a reset if data was unread),
//! - reset them (`SO_LINGER` 0 on close: the peers see RST),
//! - black-hole traffic (stop forwarding without closing, so only
//!   heartbeats can notice),
//! - slow the link (a bandwidth cap in bytes/s and a delay per chunk),
//! - split writes into 1-byte segments,
//! - close one direction (shut down the write side towards one peer).
//!
//! Bytes are never lost, duplicated or reordered inside a connection: a
//! relay fault is what a real link can do.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A direction through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// From the connecting side towards the target.
    Up,
    /// From the target back to the connecting side.
    Down,
}

/// How a connection is ended by [`Relay::cut`] or [`Relay::reset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    None,
    Close,
    Reset,
}

/// The link's shape, read by every pipe before each chunk.
#[derive(Debug, Default)]
struct Shape {
    blackhole: AtomicBool,
    /// Bytes per second; 0 is uncapped.
    rate: AtomicU64,
    /// Microseconds of delay per chunk.
    delay_us: AtomicU64,
    /// Write every byte as its own segment.
    split: AtomicBool,
}

/// A relay on 127.0.0.1:0 towards `target`.
pub struct Relay {
    pub addr: String,
    /// Bumped (with how) to end every live connection.
    end: watch::Sender<(u64, End)>,
    /// Bumped to shut down the write side of one direction of every live
    /// connection.
    half_up: watch::Sender<u64>,
    half_down: watch::Sender<u64>,
    shape: Arc<Shape>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (end, end_rx) = watch::channel((0u64, End::None));
        let (half_up, half_up_rx) = watch::channel(0u64);
        let (half_down, half_down_rx) = watch::channel(0u64);
        let shape = Arc::new(Shape::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let sh = shape.clone();
        let acc = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((a, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::Relaxed);
                let target = target.clone();
                let mut end_rx = end_rx.clone();
                let mut hu = half_up_rx.clone();
                let mut hd = half_down_rx.clone();
                let sh = sh.clone();
                tokio::spawn(async move {
                    let Ok(b) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = a.set_nodelay(true);
                    let _ = b.set_nodelay(true);
                    end_rx.borrow_and_update();
                    hu.borrow_and_update();
                    hd.borrow_and_update();
                    let (mut ar, mut aw) = a.into_split();
                    let (mut br, mut bw) = b.into_split();
                    let how = {
                        let up = pipe(&mut ar, &mut bw, &sh, hu);
                        let down = pipe(&mut br, &mut aw, &sh, hd);
                        tokio::select! {
                            r = end_rx.changed() => match r {
                                Ok(()) => end_rx.borrow().1,
                                Err(_) => End::Close,
                            },
                            _ = async { tokio::join!(up, down) } => End::Close,
                        }
                    };
                    if how == End::Reset {
                        // SO_LINGER 0: closing sends RST instead of FIN (a
                        // zero linger never blocks the close).
                        let _ =
                            socket2::SockRef::from(ar.as_ref()).set_linger(Some(Duration::ZERO));
                        let _ =
                            socket2::SockRef::from(br.as_ref()).set_linger(Some(Duration::ZERO));
                    }
                    // Dropping the halves closes both connections.
                });
            }
        });
        Relay {
            addr,
            end,
            half_up,
            half_down,
            shape,
            accepted,
            task,
        }
    }

    /// Closes every live connection through the relay (FIN, or a reset
    /// where data was unread).
    pub fn cut(&self) {
        self.end.send_modify(|(n, how)| {
            *n += 1;
            *how = End::Close;
        });
    }

    /// Resets every live connection mid-stream: both peers see RST.
    pub fn reset(&self) {
        self.end.send_modify(|(n, how)| {
            *n += 1;
            *how = End::Reset;
        });
    }

    /// While on, nothing passes in either direction (the relay stops
    /// reading, so senders stall as on a dead link); the connections stay
    /// open.
    pub fn set_blackhole(&self, on: bool) {
        self.shape.blackhole.store(on, Ordering::Relaxed);
    }

    /// A slow link: at most `bytes_per_sec` (0: uncapped) and `delay` after
    /// every chunk, until [`Relay::set_fast`].
    pub fn set_slow(&self, bytes_per_sec: u64, delay: Duration) {
        self.shape.rate.store(bytes_per_sec, Ordering::Relaxed);
        self.shape
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Back to full speed.
    pub fn set_fast(&self) {
        self.set_slow(0, Duration::ZERO);
    }

    /// While on, every byte is written as its own segment (nodelay, one
    /// write per byte).
    pub fn set_split(&self, on: bool) {
        self.shape.split.store(on, Ordering::Relaxed);
    }

    /// Shuts down the write side of `side` on every live connection: the
    /// peer downstream of that direction reads EOF; the other direction
    /// keeps flowing.
    pub fn close_one_way(&self, side: Side) {
        match side {
            Side::Up => self.half_up.send_modify(|n| *n += 1),
            Side::Down => self.half_down.send_modify(|n| *n += 1),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn wait_open(shape: &Shape) {
    while shape.blackhole.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Forwards `r` to `w` as `shape` says, until EOF, an error, or a one-way
/// close of this direction (then `w` is shut down and reading stops).
async fn pipe(
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
    shape: &Shape,
    mut half: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A black hole forwards nothing and reads nothing: the sender's
        // window fills and it stalls, as on a dead link.
        wait_open(shape).await;
        let n = tokio::select! {
            res = r.read(&mut buf) => match res {
                Ok(0) | Err(_) => {
                    let _ = w.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            changed = half.changed() => {
                if changed.is_ok() {
                    let _ = w.shutdown().await;
                }
                return;
            }
        };
        // Bytes read as the black hole opened wait for it to close: like
        // TCP over a dead link, nothing is lost or reordered inside a
        // connection, it only stops.
        wait_open(shape).await;
        let rate = shape.rate.load(Ordering::Relaxed);
        let delay = Duration::from_micros(shape.delay_us.load(Ordering::Relaxed));
        let chunk = &buf[..n];
        let mut rest = chunk;
        let mut written = true;
        // One segment per byte while split is on (looked at per byte: once
        // it is turned off, the rest goes at once, so the fault ends when
        // it is ended, not when a 64 KiB chunk has dribbled out).
        while written && !rest.is_empty() && shape.split.load(Ordering::Relaxed) {
            written = w.write_all(&rest[..1]).await.is_ok();
            rest = &rest[1..];
            // Let the kernel send it before the next write (nodelay is on).
            tokio::task::yield_now().await;
        }
        if written && !rest.is_empty() {
            written = w.write_all(rest).await.is_ok();
        }
        if !written {
            return;
        }
        let mut pause = delay;
        if rate > 0 {
            pause += Duration::from_secs_f64(n as f64 / rate as f64);
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}
