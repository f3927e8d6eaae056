//! \[pure\] The byte codec of session snapshots: a [`Writer`] that appends
//! to a `Vec<u8>` and a bounds-checked [`Reader`] whose every read returns a
//! [`SnapshotError`] naming the field and the byte where it went wrong.
//!
//! Integers are unsigned LEB128 varints (at most 10 bytes for a `u64`);
//! session ids are 16 bytes big endian; byte strings are a varint length then
//! the raw bytes; booleans are one byte, 0 or 1; an `Option` is a byte, 0 for
//! `None` or 1 then the value. An [`Instant`] is stored relative to the
//! export's `now` as a zigzag varint of signed nanoseconds, a [`Duration`] as
//! a varint of nanoseconds (both saturate past 292 and 584 years).
//!
//! It owns the primitive encodings only: what a snapshot contains and in
//! which order is `session::core::snapshot`'s, and each piece (streams,
//! scanners, links) encodes itself beside its own type. It never panics on
//! hostile input.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Offsets and counters read from a snapshot are at most this: legitimate
/// sessions never come near it, and arithmetic on them cannot overflow.
pub(crate) const MAX_COUNTER: u64 = 1 << 62;

/// Why a snapshot could not be read: what was wrong, and at which byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotError {
    what: String,
    at: usize,
}

impl SnapshotError {
    pub(crate) fn new(what: impl Into<String>, at: usize) -> SnapshotError {
        SnapshotError {
            what: what.into(),
            at,
        }
    }

    /// What was wrong.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The byte of the snapshot where it was noticed.
    pub fn at(&self) -> usize {
        self.at
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid session snapshot at byte {}: {}",
            self.at, self.what
        )
    }
}

impl std::error::Error for SnapshotError {}

/// Appends encoded values to a buffer.
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
    now: Instant,
}

impl<'a> Writer<'a> {
    /// A writer whose instants are stored relative to `now`.
    pub(crate) fn new(out: &'a mut Vec<u8>, now: Instant) -> Writer<'a> {
        Writer { out, now }
    }

    pub(crate) fn raw(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.out.push(v as u8);
    }

    pub(crate) fn u64(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.out.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.u64(u64::from(v));
    }

    pub(crate) fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }

    pub(crate) fn i64(&mut self, v: i64) {
        self.u64(((v << 1) ^ (v >> 63)) as u64);
    }

    pub(crate) fn u128(&mut self, v: u128) {
        self.raw(&v.to_be_bytes());
    }

    /// A length, then the bytes.
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.usize(b.len());
        self.raw(b);
    }

    pub(crate) fn duration(&mut self, d: Duration) {
        self.u64(d.as_nanos().min(u128::from(u64::MAX)) as u64);
    }

    /// `t` relative to the writer's `now`.
    pub(crate) fn instant(&mut self, t: Instant) {
        let nanos = |d: Duration| d.as_nanos().min(i64::MAX as u128) as i64;
        let rel = if t >= self.now {
            nanos(t - self.now)
        } else {
            -nanos(self.now - t)
        };
        self.i64(rel);
    }

    /// 0 for `None`, or 1 and the value.
    pub(crate) fn option<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v);
            }
        }
    }
}

/// Reads encoded values from a snapshot, checking every bound. Byte strings
/// come out as copies of their own (a replay chunk rebuilt from a snapshot
/// is an allocation of its own, as one read from a socket is: it pins no
/// other session's or chunk's memory).
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    now: Instant,
}

pub(crate) type Result<T> = std::result::Result<T, SnapshotError>;

impl<'a> Reader<'a> {
    /// A reader whose instants are rebased on `now`.
    pub(crate) fn new(buf: &'a [u8], now: Instant) -> Reader<'a> {
        Reader { buf, pos: 0, now }
    }

    /// An error about the value that ends at the current position.
    pub(crate) fn error(&self, what: impl Into<String>) -> SnapshotError {
        SnapshotError::new(what, self.pos)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless every byte was read.
    pub(crate) fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(self.error(format!("{} bytes after the end", self.remaining())));
        }
        Ok(())
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "{what}: truncated ({n} bytes needed, {} left)",
                self.remaining()
            )));
        }
        let buf: &'a [u8] = self.buf;
        let s = &buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn bool(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.error(format!("{what}: {b} is not a boolean"))),
        }
    }

    /// A tag below `count` (an enum variant).
    pub(crate) fn tag(&mut self, count: u8, what: &str) -> Result<u8> {
        let t = self.u8(what)?;
        if t >= count {
            return Err(self.error(format!("{what}: unknown tag {t}")));
        }
        Ok(t)
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8(what)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(self.error(format!("{what}: varint overflows 64 bits")));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.error(format!("{what}: varint longer than 10 bytes")))
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32> {
        let v = self.u64(what)?;
        u32::try_from(v).map_err(|_| self.error(format!("{what}: {v} does not fit 32 bits")))
    }

    pub(crate) fn usize(&mut self, what: &str) -> Result<usize> {
        let v = self.u64(what)?;
        usize::try_from(v).map_err(|_| self.error(format!("{what}: {v} does not fit a usize")))
    }

    /// An offset or a counter: at most [`MAX_COUNTER`].
    pub(crate) fn counter(&mut self, what: &str) -> Result<u64> {
        let v = self.u64(what)?;
        if v > MAX_COUNTER {
            return Err(self.error(format!("{what}: {v} is beyond 2^62")));
        }
        Ok(v)
    }

    /// A small counter (`u32` fields that only ever count up by one).
    pub(crate) fn small(&mut self, what: &str) -> Result<u32> {
        let v = self.u32(what)?;
        if v > i32::MAX as u32 {
            return Err(self.error(format!("{what}: {v} is beyond 2^31")));
        }
        Ok(v)
    }

    pub(crate) fn i64(&mut self, what: &str) -> Result<i64> {
        let v = self.u64(what)?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    pub(crate) fn u128(&mut self, what: &str) -> Result<u128> {
        Ok(u128::from_be_bytes(self.array(what)?))
    }

    /// A length-prefixed byte string.
    pub(crate) fn bytes(&mut self, what: &str) -> Result<Bytes> {
        self.slice(what).map(Bytes::copy_from_slice)
    }

    /// A length-prefixed byte string, borrowed from the snapshot.
    pub(crate) fn slice(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.usize(what)?;
        if n > self.remaining() {
            return Err(self.error(format!(
                "{what}: length {n} past the end ({} bytes left)",
                self.remaining()
            )));
        }
        self.take(n, what)
    }

    pub(crate) fn string(&mut self, what: &str) -> Result<String> {
        let b = self.slice(what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(self.error(format!("{what}: not UTF-8"))),
        }
    }

    /// A count of items that take at least `min_size` bytes each: never more
    /// than the bytes left could hold (no allocation from a hostile count).
    pub(crate) fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.usize(what)?;
        if n.saturating_mul(min_size.max(1)) > self.remaining() {
            return Err(self.error(format!(
                "{what}: {n} items cannot fit in {} bytes",
                self.remaining()
            )));
        }
        Ok(n)
    }

    pub(crate) fn duration(&mut self, what: &str) -> Result<Duration> {
        Ok(Duration::from_nanos(self.u64(what)?))
    }

    /// An instant, rebased on the reader's `now`.
    pub(crate) fn instant(&mut self, what: &str) -> Result<Instant> {
        let rel = self.i64(what)?;
        let d = Duration::from_nanos(rel.unsigned_abs());
        let t = if rel >= 0 {
            self.now.checked_add(d)
        } else {
            self.now.checked_sub(d)
        };
        t.ok_or_else(|| self.error(format!("{what}: {rel} ns from now is not a time")))
    }

    pub(crate) fn option<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<Option<T>> {
        match self.tag(2, what)? {
            0 => Ok(None),
            _ => f(self).map(Some),
        }
    }

    /// Fails with `what` unless `ok`.
    pub(crate) fn check(&self, ok: bool, what: impl FnOnce() -> String) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(self.error(what()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_round_trip() {
        let now = Instant::now();
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf, now);
        let ints = [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX];
        for v in ints {
            w.u64(v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            w.i64(v);
        }
        w.u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        w.bytes(b"replay");
        w.bool(true);
        w.duration(Duration::new(3, 7));
        w.instant(now + Duration::from_millis(5));
        w.instant(now - Duration::from_millis(5));
        w.option(Some(9u64), |w, v| w.u64(v));
        w.option(None::<u64>, |w, v| w.u64(v));
        let mut r = Reader::new(&buf, now);
        for v in ints {
            assert_eq!(r.u64("int").unwrap(), v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(r.i64("signed").unwrap(), v);
        }
        assert_eq!(
            r.u128("id").unwrap(),
            0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10
        );
        assert_eq!(&r.bytes("b").unwrap()[..], b"replay");
        assert!(r.bool("b").unwrap());
        assert_eq!(r.duration("d").unwrap(), Duration::new(3, 7));
        assert_eq!(r.instant("t").unwrap(), now + Duration::from_millis(5));
        assert_eq!(r.instant("t").unwrap(), now - Duration::from_millis(5));
        assert_eq!(r.option("o", |r| r.u64("v")).unwrap(), Some(9));
        assert_eq!(r.option("o", |r| r.u64("v")).unwrap(), None);
        r.finish().unwrap();
    }

    #[test]
    fn hostile_input_is_an_error() {
        fn r(b: &[u8]) -> Reader<'_> {
            Reader::new(b, Instant::now())
        }
        assert!(r(&[0x80; 11]).u64("x").is_err(), "too long");
        assert!(r(&[0xff; 9]).u64("x").is_err(), "truncated");
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert!(r(&over).u64("x").is_err(), "past 64 bits");
        assert!(r(&[5, 1, 2]).bytes("x").is_err(), "length past the end");
        assert!(r(&[2]).bool("x").is_err());
        assert!(r(&[3]).tag(3, "x").is_err());
        assert!(r(&[100, 0]).count(1, "x").is_err());
        let e = r(&[0xff, 0xff, 0xff, 0xff, 0x1f]).u32("field").unwrap_err();
        assert!(e.to_string().contains("field"), "{e}");
        let mut rd = r(&[1, 2]);
        rd.u8("a").unwrap();
        assert_eq!(rd.finish().unwrap_err().at(), 1);
    }
}
