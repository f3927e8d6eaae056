//! Zero-copy relaying for `ack = "none"`: splice(2) from one TCP socket
//! into a pipe and from the pipe into another TCP socket, so the bytes never
//! pass through user space.
//!
//! A pipe holds bytes only inside one call of [`poll_relay`]: what the
//! destination does not take at once is read back out of the pipe before
//! the call returns and handed to the caller as an ordinary chunk. So a
//! pipe is never part of a session's state (a failure, a hand-over or a
//! half-close finds it empty), and one pipe per worker thread serves every
//! session: two descriptors per thread, none per session. What the session
//! does with the counts (offsets, metrics) is the caller's.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes a pipe is asked to hold (`F_SETPIPE_SZ`; the kernel's default,
/// 64 KiB, when that fails): the most one [`poll_relay`] moves. In
/// interleaved runs, 256 KiB took 30% less CPU per GiB than without
/// splice where 64 KiB took 17% less (docs/benchmarks.md).
pub const PIPE_SIZE: usize = 256 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    /// This thread's pipe, created on first use; always empty between calls.
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// Whether this thread has its pipe, creating it on first use. False when
/// it can't be had (out of descriptors): the caller reads and writes the
/// usual way instead.
pub fn ready() -> bool {
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            if let Ok((read, write)) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) {
                // Above /proc/sys/fs/pipe-max-size (1 MiB by default) an
                // unprivileged process is refused: it keeps 64 KiB then.
                let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE);
                *slot = Some(Pipe { read, write });
            }
        }
        slot.is_some()
    })
}

/// What one [`poll_relay`] moved.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Bytes taken from the source; 0 means the source's FIN.
    pub read: usize,
    /// Of those, the bytes the destination took.
    pub written: usize,
    /// The others (`read - written` bytes, in order after the written
    /// ones), read back out of the pipe: the caller holds and writes them.
    pub rest: Option<Bytes>,
    /// The destination failed while taking them (`rest` has what it did
    /// not take).
    pub write_error: Option<io::Error>,
}

/// Moves up to `max` bytes from `src` to `dst` through this thread's pipe.
/// `Pending` (with the waker registered) when `src` has nothing to read;
/// an error when reading `src` failed (nothing was taken from it) or the
/// pipe did not give back what it held (then those bytes are lost, and
/// the caller must end the session).
pub fn poll_relay(
    src: &TcpStream,
    dst: &TcpStream,
    max: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Relayed>> {
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
            let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE);
            *slot = Some(Pipe { read, write });
        }
        let pipe = slot.as_ref().expect("set above");
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        // Source to pipe. The pipe is empty, so EAGAIN is the socket's.
        let n = loop {
            ready!(src.poll_read_ready(cx))?;
            match src.try_io(Interest::READABLE, || {
                Ok(splice(src, None, &pipe.write, None, max, flags)?)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        };
        if n == 0 {
            return Poll::Ready(Ok(Relayed::default()));
        }
        // Pipe to destination, while it takes them. The pipe holds bytes,
        // so EAGAIN is the socket's.
        let mut written = 0;
        let mut write_error = None;
        while written < n {
            match dst.poll_write_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => {
                    write_error = Some(e);
                    break;
                }
                Poll::Ready(Ok(())) => {}
            }
            match dst.try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.read, None, dst, None, n - written, flags)?)
            }) {
                Ok(0) => break,
                Ok(k) => written += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    write_error = Some(e);
                    break;
                }
            }
        }
        // The rest comes back out, so the pipe is empty again.
        let rest = if written < n {
            let mut buf = BytesMut::zeroed(n - written);
            let mut got = 0;
            while got < buf.len() {
                match rustix::io::read(&pipe.read, &mut buf[got..]) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => break,
                }
            }
            if got < buf.len() {
                // Never seen; if it happens, this pipe can't be trusted.
                *slot = None;
                return Poll::Ready(Err(io::Error::other(format!(
                    "splice pipe gave back {got} of {} bytes",
                    n - written
                ))));
            }
            Some(buf.freeze())
        } else {
            None
        };
        Poll::Ready(Ok(Relayed {
            read: n,
            written,
            rest,
            write_error,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Everything arrives, in order, split between spliced bytes and the
    /// rest handed back, whatever the destination takes.
    #[tokio::test]
    async fn relays_every_byte_in_order() {
        let (mut client, src) = pair().await;
        let (dst, mut server) = pair().await;
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                client.write_all(&data).await.unwrap();
                client.shutdown().await.unwrap();
                client
            })
        };
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut dst = dst;
        loop {
            let r = std::future::poll_fn(|cx| poll_relay(&src, &dst, 64 << 10, cx))
                .await
                .unwrap();
            if r.read == 0 {
                break;
            }
            assert!(r.write_error.is_none());
            assert_eq!(r.written + r.rest.as_ref().map_or(0, |b| b.len()), r.read);
            if let Some(rest) = r.rest {
                dst.write_all(&rest).await.unwrap();
            }
        }
        dst.shutdown().await.unwrap();
        drop(writer.await.unwrap());
        let got = reader.await.unwrap();
        assert!(got == data, "{} bytes relayed of {}", got.len(), data.len());
        PIPE.with(|p| {
            if let Some(p) = p.borrow().as_ref() {
                let mut b = [0u8; 1];
                assert!(
                    rustix::io::read(&p.read, &mut b[..]).is_err(),
                    "the pipe is empty between calls"
                );
            }
        });
    }
}
