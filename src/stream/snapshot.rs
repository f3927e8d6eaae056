//! \[pure\] Snapshot encoding of a [`Stream`] and a [`ReplayBuffer`]: the
//! offsets and every chunk held, as raw bytes, chunk boundaries kept (they
//! decide how writes are cut, so a rebuilt session writes exactly as the
//! original would have). Part of a session snapshot (`session::core::snapshot`
//! owns the layout).
//!
//! `ReplayBuffer`: start, chunk count, then each chunk (varint length, bytes).
//! `Stream`: its buffer (`[acked, read)`, so `acked` and `read` are implied),
//! `sent`, `fin_read`.

use super::{ReplayBuffer, Stream};
use crate::snapshot_codec::{Reader, Result, Writer, MAX_COUNTER};

impl ReplayBuffer {
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        w.u64(self.start);
        w.usize(self.chunks.len());
        for c in &self.chunks {
            w.bytes(c);
        }
    }

    /// Fails on an empty chunk or an end past 2^62.
    pub(crate) fn read_snapshot(r: &mut Reader<'_>, what: &str) -> Result<ReplayBuffer> {
        let start = r.counter(what)?;
        // Each chunk takes at least its length byte and one byte.
        let n = r.count(2, what)?;
        let mut buf = ReplayBuffer::new(start);
        for _ in 0..n {
            let c = r.bytes(what)?;
            r.check(!c.is_empty(), || format!("{what}: an empty chunk"))?;
            buf.len += c.len() as u64;
            r.check(buf.end() <= MAX_COUNTER, || {
                format!("{what}: ends beyond 2^62")
            })?;
            buf.chunks.push_back(c);
        }
        Ok(buf)
    }
}

impl Stream {
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        self.buf.write_snapshot(w);
        w.u64(self.sent);
        w.bool(self.fin_read);
    }

    /// Fails unless `acked <= sent <= read`.
    pub(crate) fn read_snapshot(r: &mut Reader<'_>, what: &str) -> Result<Stream> {
        let buf = ReplayBuffer::read_snapshot(r, what)?;
        let sent = r.counter(what)?;
        let fin_read = r.bool(what)?;
        let (acked, read) = (buf.start(), buf.end());
        r.check(acked <= sent && sent <= read, || {
            format!("{what}: sent {sent} not within acked {acked} ..= read {read}")
        })?;
        let s = Stream {
            read,
            sent,
            acked,
            buf,
            fin_read,
        };
        s.check_invariants();
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;

    fn round_trip(s: &Stream) -> Stream {
        let now = Instant::now();
        let mut out = Vec::new();
        s.write_snapshot(&mut Writer::new(&mut out, now));
        let mut r = Reader::new(&out, now);
        let back = Stream::read_snapshot(&mut r, "stream").unwrap();
        r.finish().unwrap();
        // Truncated at every length: an error, never a panic.
        for len in 0..out.len() {
            let mut r = Reader::new(&out[..len], now);
            assert!(
                Stream::read_snapshot(&mut r, "stream")
                    .and_then(|_| r.finish())
                    .is_err(),
                "truncated to {len}"
            );
        }
        back
    }

    fn chunks(s: &Stream) -> Vec<Bytes> {
        s.buffer().iter().cloned().collect()
    }

    #[test]
    fn streams_round_trip_with_offsets_chunks_and_fin() {
        let mut s = Stream::new();
        for c in [&b"hello "[..], b"world", b"!", b"more bytes"] {
            s.push(Bytes::copy_from_slice(c));
        }
        s.on_sent(9);
        s.ack_to(3);
        s.set_fin();
        let back = round_trip(&s);
        assert_eq!(
            (back.read(), back.sent(), back.acked(), back.fin_read()),
            (22, 9, 3, true)
        );
        assert_eq!(chunks(&back), chunks(&s), "chunk boundaries kept");
        assert_eq!(back.next_unsent(), s.next_unsent());

        // Empty, and one mid-way from a restored session.
        let back = round_trip(&Stream::new());
        assert_eq!((back.read(), back.buffered()), (0, 0));
        let mut s = Stream::starting_at(1 << 40);
        s.push(Bytes::from_static(b"x"));
        let back = round_trip(&s);
        assert_eq!((back.acked(), back.read()), (1 << 40, (1 << 40) + 1));
    }

    #[test]
    fn inconsistent_streams_are_refused() {
        let now = Instant::now();
        let bad = |sent: u64, chunk: &[u8]| {
            let mut out = Vec::new();
            let mut w = Writer::new(&mut out, now);
            w.u64(10); // start
            w.usize(1);
            w.bytes(chunk);
            w.u64(sent);
            w.bool(false);
            Stream::read_snapshot(&mut Reader::new(&out, now), "up")
        };
        assert!(bad(12, b"abc").is_ok());
        assert!(bad(9, b"abc").is_err(), "sent before acked");
        assert!(bad(14, b"abc").is_err(), "sent past read");
        assert!(bad(10, b"").is_err(), "an empty chunk");
    }
}
