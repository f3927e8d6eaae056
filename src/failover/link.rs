//! The replication link between an active and a standby holdfast: a TCP
//! stream (any `AsyncRead + AsyncWrite`, so TLS can wrap it) that starts
//! with a mutual HMAC-SHA256 handshake over the `[failover] secret_file`
//! key, then carries [`Record`]s from the active to the standby.
//!
//! Handshake (the standby, which listens, speaks first):
//!
//! ```text
//! standby → active: "HFFO" | version 1 | nonce_s (32 B)
//! active → standby: "HFFO" | version 1 | nonce_a (32 B) | HMAC(key, "holdfast failover active" | nonce_s | nonce_a)
//! standby → active: HMAC(key, "holdfast failover standby" | nonce_a | nonce_s)
//! ```
//!
//! Each side proves the key over a nonce the other chose, so a recorded
//! handshake cannot be replayed: the active streams session data to no one
//! who lacks the key, and the standby takes orders from no one who lacks it.
//! Tokens are compared in constant time. As with the resume protocol, the
//! records after the handshake are not authenticated one by one: run the
//! link over a private network or TLS.
//!
//! Owns the handshake and the buffered record reader and writer; what the
//! records mean to a standby is [`super::mirror`]'s.

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{self, CodecError, Record, MAX_DATA};
use crate::session::SessionId;

pub const MAGIC: [u8; 4] = *b"HFFO";
pub const VERSION: u8 = 1;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const ACTIVE_CONTEXT: &[u8] = b"holdfast failover active";
const STANDBY_CONTEXT: &[u8] = b"holdfast failover standby";
/// Bytes a reader asks for at a time.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("replication link io: {0}")]
    Io(#[from] std::io::Error),
    #[error("replication peer is not a holdfast failover link (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("replication peer speaks version {0}, this build {VERSION}")]
    Version(u8),
    #[error("replication peer failed authentication (a different secret_file?)")]
    Auth,
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("replication link closed inside a record")]
    Truncated,
}

fn mac(key: &[u8], context: &[u8], a: &[u8], b: &[u8]) -> [u8; MAC_LEN] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(context);
    m.update(a);
    m.update(b);
    m.finalize().into_bytes().into()
}

fn check_preamble(p: &[u8]) -> Result<(), LinkError> {
    let magic: [u8; 4] = p[..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(LinkError::Magic(magic));
    }
    if p[4] != VERSION {
        return Err(LinkError::Version(p[4]));
    }
    Ok(())
}

fn preamble(nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + NONCE_LEN + MAC_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(nonce);
    out
}

/// The standby's side of the handshake, on a freshly accepted connection.
pub async fn handshake_standby<S>(s: &mut S, key: &[u8]) -> Result<(), LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let nonce_s: [u8; NONCE_LEN] = rand::random();
    s.write_all(&preamble(&nonce_s)).await?;
    s.flush().await?;
    let mut hello = [0u8; 5 + NONCE_LEN + MAC_LEN];
    s.read_exact(&mut hello).await?;
    check_preamble(&hello)?;
    let nonce_a = &hello[5..5 + NONCE_LEN];
    let want = mac(key, ACTIVE_CONTEXT, &nonce_s, nonce_a);
    if !bool::from(want.ct_eq(&hello[5 + NONCE_LEN..])) {
        return Err(LinkError::Auth);
    }
    s.write_all(&mac(key, STANDBY_CONTEXT, nonce_a, &nonce_s))
        .await?;
    s.flush().await?;
    Ok(())
}

/// The active's side of the handshake, on a fresh connection to the standby.
pub async fn handshake_active<S>(s: &mut S, key: &[u8]) -> Result<(), LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut challenge = [0u8; 5 + NONCE_LEN];
    s.read_exact(&mut challenge).await?;
    check_preamble(&challenge)?;
    let nonce_s = &challenge[5..];
    let nonce_a: [u8; NONCE_LEN] = rand::random();
    let mut hello = preamble(&nonce_a);
    hello.extend_from_slice(&mac(key, ACTIVE_CONTEXT, nonce_s, &nonce_a));
    s.write_all(&hello).await?;
    s.flush().await?;
    let mut answer = [0u8; MAC_LEN];
    s.read_exact(&mut answer).await?;
    let want = mac(key, STANDBY_CONTEXT, &nonce_a, nonce_s);
    if !bool::from(want.ct_eq(&answer)) {
        return Err(LinkError::Auth);
    }
    Ok(())
}

/// Reads records off the link (the standby's end).
pub struct RecordReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    pub fn new(io: R) -> Self {
        RecordReader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// The next record; `None` when the active closed the link between
    /// records.
    pub async fn next(&mut self) -> Result<Option<Record>, LinkError> {
        loop {
            if let Some(r) = codec::decode(&mut self.buf)? {
                return Ok(Some(r));
            }
            self.buf.reserve(READ_CHUNK);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(LinkError::Truncated)
                };
            }
        }
    }
}

/// Writes records onto the link (the active's end), buffered until
/// [`RecordWriter::flush`].
pub struct RecordWriter<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> RecordWriter<W> {
    pub fn new(io: W) -> Self {
        RecordWriter {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Bytes queued and not yet flushed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Queues one record. `Read` and `Written` data longer than
    /// [`MAX_DATA`] is split into several records; empty data is skipped.
    pub fn push(&mut self, r: &Record) {
        match r {
            Record::Read { id, offset, data } => self.push_data(true, *id, *offset, data),
            Record::Written { id, offset, data } => self.push_data(false, *id, *offset, data),
            other => codec::encode(other, &mut self.buf),
        }
    }

    fn push_data(&mut self, read: bool, id: SessionId, mut offset: u64, data: &Bytes) {
        let mut data = data.clone();
        while !data.is_empty() {
            let part = data.split_to(data.len().min(MAX_DATA));
            let n = part.len() as u64;
            let r = if read {
                Record::Read {
                    id,
                    offset,
                    data: part,
                }
            } else {
                Record::Written {
                    id,
                    offset,
                    data: part,
                }
            };
            codec::encode(&r, &mut self.buf);
            offset += n;
        }
    }

    /// The link itself (to read its send queue, for example).
    pub fn get_ref(&self) -> &W {
        &self.io
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.buf.len()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        self.io.write_all(&self.buf).await?;
        self.buf.clear();
        self.io.flush().await?;
        Ok(())
    }

    /// Queues and writes one record.
    pub async fn send(&mut self, r: &Record) -> Result<(), LinkError> {
        self.push(r);
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[tokio::test]
    async fn handshake_succeeds_with_the_same_key() {
        let (mut a, mut s) = tokio::io::duplex(1024);
        let (ra, rs) = tokio::join!(
            handshake_active(&mut a, KEY),
            handshake_standby(&mut s, KEY)
        );
        ra.unwrap();
        rs.unwrap();
    }

    #[tokio::test]
    async fn each_side_refuses_a_peer_with_another_key() {
        let (mut a, mut s) = tokio::io::duplex(1024);
        let other = b"another key of at least 32 bytes!!";
        let standby = async move {
            // Refuses, sends no answer and closes.
            handshake_standby(&mut s, KEY).await
        };
        let (ra, rs) = tokio::join!(handshake_active(&mut a, other), standby);
        assert!(matches!(rs, Err(LinkError::Auth)), "{rs:?}");
        assert!(matches!(ra, Err(LinkError::Io(_))), "{ra:?}");

        // A standby with the wrong key is caught by the active.
        let (mut a, mut s) = tokio::io::duplex(1024);
        let standby = async {
            let nonce: [u8; NONCE_LEN] = [7; NONCE_LEN];
            s.write_all(&preamble(&nonce)).await.unwrap();
            let mut hello = [0u8; 5 + NONCE_LEN + MAC_LEN];
            s.read_exact(&mut hello).await.unwrap();
            s.write_all(&[0u8; MAC_LEN]).await.unwrap();
            s
        };
        let (ra, _s) = tokio::join!(handshake_active(&mut a, KEY), standby);
        assert!(matches!(ra, Err(LinkError::Auth)), "{ra:?}");
    }

    #[tokio::test]
    async fn refuses_a_peer_that_is_not_a_failover_link() {
        let mut io = tokio_test::io::Builder::new()
            .read(b"HFRP\x01")
            .read(&[0; NONCE_LEN])
            .build();
        let r = handshake_active(&mut io, KEY).await;
        assert!(
            matches!(r, Err(LinkError::Magic(m)) if &m == b"HFRP"),
            "{r:?}"
        );
        let mut io = tokio_test::io::Builder::new()
            .read(b"HFFO\x02")
            .read(&[0; NONCE_LEN])
            .build();
        let r = handshake_active(&mut io, KEY).await;
        assert!(matches!(r, Err(LinkError::Version(2))), "{r:?}");
    }

    #[tokio::test]
    async fn records_survive_reads_split_at_every_byte_and_big_data_is_split() {
        let id = SessionId(5);
        let big = Bytes::from((0..MAX_DATA + 10).map(|i| i as u8).collect::<Vec<_>>());
        let mut w = RecordWriter::new(Vec::new());
        w.push(&Record::Heartbeat { seq: 1 });
        w.push(&Record::Read {
            id,
            offset: 100,
            data: big.clone(),
        });
        w.push(&Record::Written {
            id,
            offset: 0,
            data: Bytes::new(),
        });
        w.push(&Record::Closed { id });
        w.flush().await.unwrap();
        let wire = w.io;
        let mut b = tokio_test::io::Builder::new();
        for byte in &wire[..200] {
            b.read(std::slice::from_ref(byte));
        }
        b.read(&wire[200..]);
        let mut r = RecordReader::new(b.build());
        let mut got = Vec::new();
        while let Some(rec) = r.next().await.unwrap() {
            got.push(rec);
        }
        assert_eq!(
            got,
            [
                Record::Heartbeat { seq: 1 },
                Record::Read {
                    id,
                    offset: 100,
                    data: big.slice(..MAX_DATA),
                },
                Record::Read {
                    id,
                    offset: 100 + MAX_DATA as u64,
                    data: big.slice(MAX_DATA..),
                },
                Record::Closed { id },
            ]
        );
        // A link that ends inside a record is an error, not an end.
        let mut r = RecordReader::new(&wire[..10]);
        assert!(matches!(r.next().await, Err(LinkError::Truncated)));
    }
}
