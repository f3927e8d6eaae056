//! \[pure\] One direction of a session: its 64-bit offsets and its replay buffer.
//!
//! A [`Stream`] counts `read` (bytes taken from the source), `sent` (bytes
//! handed to the current destination) and `acked` (bytes the destination
//! confirmed it consumed), and keeps exactly the bytes `[acked, read)` as shared
//! [`Bytes`] chunks in a [`ReplayBuffer`]. It knows nothing of sockets, legs or
//! ack modes: the session core decides when offsets move.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// A byte position in one direction of a session, from its first byte.
pub type Offset = u64;

/// The two byte streams of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

impl Dir {
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

/// Bytes `[start, end)` of a stream as a queue of shared chunks.
///
/// Pushing and acking never copy payload: acks pop whole chunks and trim the
/// front one with `Bytes::advance`-style slicing.
#[derive(Debug, Clone, Default)]
pub struct ReplayBuffer {
    chunks: VecDeque<Bytes>,
    /// Offset of the first byte of `chunks[0]`.
    start: Offset,
    /// Total bytes held: always the sum of the chunk lengths.
    len: u64,
}

impl ReplayBuffer {
    pub fn new(start: Offset) -> Self {
        ReplayBuffer {
            chunks: VecDeque::new(),
            start,
            len: 0,
        }
    }

    /// Offset of the first byte held.
    pub fn start(&self) -> Offset {
        self.start
    }

    /// Offset just past the last byte held.
    pub fn end(&self) -> Offset {
        self.start + self.len
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of chunks held.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Appends a chunk at `end()`. Empty chunks are ignored.
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len() as u64;
        if self.chunks.capacity() == 0 {
            // Room for one chunk first (a `VecDeque` would take four): a
            // session that moves one message at a time, or waits after one,
            // keeps 32 bytes here instead of 128. It grows as usual after.
            self.chunks.reserve_exact(1);
        }
        self.chunks.push_back(chunk);
    }

    /// Moves the start of an empty buffer past `n` bytes that went from
    /// source to destination without being held (spliced).
    pub fn skip(&mut self, n: u64) {
        debug_assert!(self.is_empty(), "only an empty buffer skips bytes");
        if self.is_empty() {
            self.start += n;
        }
    }

    /// Drops every byte before `offset` (clamped to `[start, end]`).
    pub fn release_to(&mut self, offset: Offset) {
        let offset = offset.clamp(self.start, self.end());
        let mut n = offset - self.start;
        self.start = offset;
        self.len -= n;
        while n > 0 {
            let front = self.chunks.front_mut().expect("len counts the chunks");
            let flen = front.len() as u64;
            if flen <= n {
                n -= flen;
                self.chunks.pop_front();
            } else {
                // `advance` moves the view: no refcount traffic, unlike a
                // `split_to` whose result is dropped at once.
                front.advance(n as usize);
                n = 0;
            }
        }
    }

    /// Removes the bytes before `offset` and appends them, as shared chunks,
    /// to `out` (the last one split if `offset` falls inside it).
    pub fn pop_to(&mut self, offset: Offset, out: &mut Vec<Bytes>) {
        let offset = offset.clamp(self.start, self.end());
        let mut n = offset - self.start;
        self.start = offset;
        self.len -= n;
        while n > 0 {
            let front = self.chunks.front_mut().expect("len counts the chunks");
            let flen = front.len() as u64;
            if flen <= n {
                n -= flen;
                out.push(self.chunks.pop_front().expect("front exists"));
            } else {
                out.push(front.split_to(n as usize));
                n = 0;
            }
        }
    }

    /// The bytes from `offset` to the end of the chunk holding it, shared (no
    /// copy). `None` when `offset` is not within `[start, end)`.
    pub fn chunk_from(&self, offset: Offset) -> Option<Bytes> {
        if offset < self.start || offset >= self.end() {
            return None;
        }
        // Writes mostly happen near the tail: search from the back.
        let mut chunk_end = self.end();
        for chunk in self.chunks.iter().rev() {
            let chunk_start = chunk_end - chunk.len() as u64;
            if offset >= chunk_start {
                return Some(chunk.slice((offset - chunk_start) as usize..));
            }
            chunk_end = chunk_start;
        }
        None
    }

    /// Up to `max` chunks covering `[offset, end)`, for vectored writes; the
    /// first is trimmed to start at `offset`.
    pub fn chunks_from(&self, offset: Offset, max: usize, out: &mut Vec<Bytes>) {
        if offset < self.start || offset >= self.end() || max == 0 {
            return;
        }
        let mut chunk_start = self.start;
        for chunk in self.chunks.iter() {
            let chunk_end = chunk_start + chunk.len() as u64;
            if chunk_end > offset {
                if out.len() >= max {
                    return;
                }
                if offset > chunk_start {
                    out.push(chunk.slice((offset - chunk_start) as usize..));
                } else {
                    out.push(chunk.clone());
                }
            }
            chunk_start = chunk_end;
        }
    }

    /// The chunks that cover `[offset, end)`, shared (no copy), the first
    /// trimmed to start at `offset`; nothing when `offset` is not within
    /// `[start, end)`. One search for `offset`, then a forward walk.
    pub fn chunks_after(&self, offset: Offset) -> impl Iterator<Item = Bytes> + '_ {
        let (first, skip) = self.locate(offset).unwrap_or((self.chunks.len(), 0));
        self.chunks
            .range(first..)
            .enumerate()
            .map(move |(i, c)| if i == 0 { c.slice(skip..) } else { c.clone() })
    }

    /// The index of the chunk holding `offset` and where in it `offset`
    /// is, searching from the back (writes mostly happen near the tail).
    fn locate(&self, offset: Offset) -> Option<(usize, usize)> {
        if offset < self.start || offset >= self.end() {
            return None;
        }
        let mut i = self.chunks.len();
        let mut chunk_start = self.end();
        while chunk_start > offset {
            i -= 1;
            chunk_start -= self.chunks[i].len() as u64;
        }
        Some((i, (offset - chunk_start) as usize))
    }

    /// Fills `out` with slices borrowing the chunks that cover `[offset,
    /// end)`, the first trimmed to start at `offset`, for a vectored write
    /// straight from the buffer (no `Bytes` clones, no allocation). Returns
    /// how many slices it filled (0 when `offset` is not within
    /// `[start, end)`).
    pub fn io_slices_from<'a>(&'a self, offset: Offset, out: &mut [IoSlice<'a>]) -> usize {
        if out.is_empty() {
            return 0;
        }
        let Some((first, skip)) = self.locate(offset) else {
            return 0;
        };
        let mut n = 0;
        for (i, chunk) in self.chunks.range(first..).enumerate() {
            if n == out.len() {
                break;
            }
            out[n] = IoSlice::new(if i == 0 { &chunk[skip..] } else { chunk });
            n += 1;
        }
        n
    }

    /// Copies `[from, to)` into one contiguous `Bytes` (for the rare places
    /// that need a frame in one piece: preambles). Clamped to what is held.
    pub fn copy_range(&self, from: Offset, to: Offset) -> Bytes {
        let from = from.max(self.start);
        let to = to.min(self.end());
        if from >= to {
            return Bytes::new();
        }
        let mut out = Vec::with_capacity((to - from) as usize);
        let mut chunk_start = self.start;
        for chunk in self.chunks.iter() {
            let chunk_end = chunk_start + chunk.len() as u64;
            if chunk_end > from && chunk_start < to {
                let a = from.saturating_sub(chunk_start) as usize;
                let b = (to.min(chunk_end) - chunk_start) as usize;
                out.extend_from_slice(&chunk[a..b]);
            }
            if chunk_end >= to {
                break;
            }
            chunk_start = chunk_end;
        }
        Bytes::from(out)
    }

    /// Whether the bytes held from `offset` start with `prefix` (false when
    /// fewer bytes are held).
    pub fn starts_with_at(&self, offset: Offset, prefix: &[u8]) -> bool {
        if offset < self.start || offset + prefix.len() as u64 > self.end() {
            return false;
        }
        let mut rest = prefix;
        let mut chunk_start = self.start;
        for chunk in self.chunks.iter() {
            let chunk_end = chunk_start + chunk.len() as u64;
            if rest.is_empty() {
                break;
            }
            if chunk_end > offset {
                let from = offset.max(chunk_start) - chunk_start;
                let avail = &chunk[from as usize..];
                let k = rest.len().min(avail.len());
                if avail[..k] != rest[..k] {
                    return false;
                }
                rest = &rest[k..];
            }
            chunk_start = chunk_end;
        }
        rest.is_empty()
    }

    /// Iterates over the chunks held, front first.
    pub fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.chunks.iter()
    }

    fn check_invariants(&self) {
        debug_assert_eq!(
            self.len,
            self.chunks.iter().map(|c| c.len() as u64).sum::<u64>(),
            "replay buffer length equals its chunks"
        );
        debug_assert!(self.chunks.iter().all(|c| !c.is_empty()));
    }
}

/// One direction of a session.
#[derive(Debug, Clone)]
pub struct Stream {
    /// Bytes taken in from the source. Always `>= sent`.
    read: Offset,
    /// Bytes handed to the current destination. Always within `acked..=read`.
    sent: Offset,
    /// Bytes the destination confirmed it consumed. Always `<= sent`.
    acked: Offset,
    /// Exactly the bytes `[acked, read)`.
    buf: ReplayBuffer,
    /// The source closed its side after `read` bytes.
    fin_read: bool,
}

impl Default for Stream {
    fn default() -> Self {
        Stream::new()
    }
}

impl Stream {
    pub fn new() -> Self {
        Stream {
            read: 0,
            sent: 0,
            acked: 0,
            buf: ReplayBuffer::new(0),
            fin_read: false,
        }
    }

    /// A stream whose first byte has offset `start` (a session restored
    /// from durable state resumes its streams mid-way).
    pub fn starting_at(start: Offset) -> Self {
        Stream {
            read: start,
            sent: start,
            acked: start,
            buf: ReplayBuffer::new(start),
            fin_read: false,
        }
    }

    pub fn read(&self) -> Offset {
        self.read
    }
    pub fn sent(&self) -> Offset {
        self.sent
    }
    pub fn acked(&self) -> Offset {
        self.acked
    }
    pub fn fin_read(&self) -> bool {
        self.fin_read
    }
    pub fn buffer(&self) -> &ReplayBuffer {
        &self.buf
    }

    /// Bytes held for replay: `read - acked`.
    pub fn buffered(&self) -> u64 {
        self.read - self.acked
    }

    /// Bytes read but not yet handed to the destination.
    pub fn unsent(&self) -> u64 {
        self.read - self.sent
    }

    /// Bytes handed to the destination and not yet confirmed.
    pub fn in_flight(&self) -> u64 {
        self.sent - self.acked
    }

    /// Takes in a chunk from the source.
    pub fn push(&mut self, chunk: Bytes) {
        debug_assert!(!self.fin_read, "no bytes after the source's FIN");
        self.read += chunk.len() as u64;
        self.buf.push(chunk);
        self.check_invariants();
    }

    /// `n` bytes went from source to destination without being held
    /// (spliced): read, sent and acked at once. Only while nothing is
    /// buffered (`read == acked`), so no byte overtakes a held one.
    pub fn pass_through(&mut self, n: u64) {
        debug_assert!(!self.fin_read, "no bytes after the source's FIN");
        debug_assert_eq!(self.buffered(), 0, "nothing held while passing through");
        if self.buffered() != 0 {
            return;
        }
        self.read += n;
        self.sent = self.read;
        self.acked = self.read;
        self.buf.skip(n);
        self.check_invariants();
    }

    /// The source closed its side.
    pub fn set_fin(&mut self) {
        self.fin_read = true;
    }

    /// The next bytes to hand to the destination, from `sent` (shared).
    pub fn next_unsent(&self) -> Option<Bytes> {
        self.buf.chunk_from(self.sent)
    }

    /// `n` more bytes were handed to the destination.
    pub fn on_sent(&mut self, n: u64) {
        self.sent = (self.sent + n).min(self.read);
        self.check_invariants();
    }

    /// The destination confirmed everything before `offset` (clamped to
    /// `sent`; an older ack is ignored). Returns the bytes newly acked.
    pub fn ack_to(&mut self, offset: Offset) -> u64 {
        let offset = offset.min(self.sent);
        if offset <= self.acked {
            return 0;
        }
        let n = offset - self.acked;
        self.acked = offset;
        self.buf.release_to(offset);
        self.check_invariants();
        n
    }

    /// A new destination says it already consumed everything before
    /// `offset` (at least `acked`, at most `read`): the next byte to hand it
    /// is `offset`.
    pub fn resume_from(&mut self, offset: Offset) {
        let offset = offset.clamp(self.acked, self.read);
        if offset > self.sent {
            self.sent = offset;
        }
        self.ack_to(offset);
        self.sent = offset;
        self.check_invariants();
    }

    /// A new destination starts: hand it everything from `acked` again.
    /// Returns the bytes that will be replayed (`sent - acked` before).
    pub fn rewind(&mut self) -> u64 {
        let n = self.sent - self.acked;
        self.sent = self.acked;
        self.check_invariants();
        n
    }

    pub fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            assert!(
                self.acked <= self.sent,
                "acked {} > sent {}",
                self.acked,
                self.sent
            );
            assert!(
                self.sent <= self.read,
                "sent {} > read {}",
                self.sent,
                self.read
            );
            assert_eq!(
                self.buf.start(),
                self.acked,
                "replay buffer starts at acked"
            );
            assert_eq!(self.buf.end(), self.read, "replay buffer ends at read");
            self.buf.check_invariants();
        }
    }
}

mod snapshot;

#[cfg(test)]
mod tests;
