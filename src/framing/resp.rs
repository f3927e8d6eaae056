//! \[pure\] Redis RESP2 frames: a frame is one top-level value (`+` simple
//! string, `-` error, `:` integer, `$` bulk string, `*` array of values) or, at
//! top level only, an inline command: a line whose first byte is none of
//! `+-:$*`, ending at LF as Redis accepts it.
//!
//! Owns the parse state of the current frame: a fixed stack of the element
//! counts still expected by the open arrays, the number being read from a
//! header line (parsed byte by byte, never buffered), and the bulk payload
//! bytes still to come, which it skips arithmetically. It does not check what
//! the values mean (that a request is a command, for instance).

use super::{room, FrameError};

/// Arrays nested deeper than this are malformed.
pub(super) const MAX_DEPTH: usize = 64;
/// `:`, `$` and `*` header lines longer than this (type byte and CRLF
/// included) are malformed.
pub(super) const MAX_HEADER_LINE: u32 = 64;

/// Frame boundaries of a RESP2 stream.
#[derive(Debug, Clone)]
pub struct RespScanner {
    /// Largest frame in bytes, headers and CRLFs included.
    max_frame: usize,
    /// Bytes fed so far, including those of calls that returned an error.
    pos: u64,
    /// Offset of the current frame's first byte: the end of the last frame, or
    /// 0. Always `<= pos`, and `pos - start <= max_frame` unless poisoned.
    start: u64,
    state: State,
    /// For each open array, outermost first, the elements still to come, the
    /// one being read included. All are `> 0`; at most `MAX_DEPTH` of them.
    stack: Vec<u64>,
    /// The first error; once set, every call returns it.
    error: Option<FrameError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the type byte of a value (of a new frame when `stack` is empty).
    Type,
    /// In a `+` or `-` line, which ends at the first CRLF; `cr`: the last byte
    /// seen was CR.
    Simple { cr: bool },
    /// In an inline command, which ends at the first LF.
    Inline,
    /// In a `:`, `$` or `*` header line.
    Number(Number),
    /// In a bulk string's payload; `remaining > 0` bytes are still to come.
    Bulk { remaining: u64 },
    /// After a bulk string's payload, expecting CR.
    BulkCr,
    /// After a bulk string's payload and CR, expecting LF.
    BulkLf,
}

/// A header line being read: `kind` (`:`, `$` or `*`), then an optional `-`,
/// digits, CR, LF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Number {
    kind: u8,
    /// Offset of the type byte.
    start: u64,
    /// Bytes of the line seen, type byte included.
    len: u32,
    neg: bool,
    digits: u32,
    value: u64,
    /// CR seen; LF must follow.
    cr: bool,
}

impl RespScanner {
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            pos: 0,
            start: 0,
            state: State::Type,
            stack: Vec::new(),
            error: None,
        }
    }

    /// A fresh scanner whose stream starts at `offset` (a frame boundary):
    /// a session rebuilt mid-stream scans on from there.
    pub(crate) fn starting_at(mut self, offset: u64) -> Self {
        debug_assert!(self.pos == 0 && self.start == 0, "a fresh scanner");
        self.pos = offset;
        self.start = offset;
        self
    }

    /// Pushes the end of every frame completed by `data`. Frames completed
    /// before an error are still pushed.
    pub fn scan(&mut self, data: &[u8], ends: &mut Vec<u64>) -> Result<(), FrameError> {
        let base = self.pos;
        self.pos += data.len() as u64;
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut i = 0;
        while i < data.len() {
            let at = base + i as u64;
            // The current frame may take bytes up to `start + max_frame`.
            let window = room(self.start, self.max_frame, at, data.len() - i);
            let step = if window == 0 {
                Err(FrameError::TooLarge {
                    start: self.start,
                    limit: self.max_frame,
                })
            } else {
                self.step(at, &data[i..i + window], ends)
            };
            match step {
                Ok(used) => i += used,
                Err(e) => {
                    self.error = Some(e.clone());
                    return Err(e);
                }
            }
        }
        self.check_invariants();
        Ok(())
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Consumes a prefix of `data` (at least one byte, at offset `at`) in the
    /// current state, up to and including the byte that ends a value if it
    /// does. Returns how many bytes it consumed.
    fn step(&mut self, at: u64, data: &[u8], ends: &mut Vec<u64>) -> Result<usize, FrameError> {
        match self.state {
            State::Type => {
                match data[0] {
                    b'+' | b'-' => self.state = State::Simple { cr: false },
                    kind @ (b':' | b'$' | b'*') => {
                        self.state = State::Number(Number {
                            kind,
                            start: at,
                            len: 1,
                            neg: false,
                            digits: 0,
                            value: 0,
                            cr: false,
                        })
                    }
                    b'\n' if self.stack.is_empty() => self.end_value(at + 1, ends),
                    _ if self.stack.is_empty() => self.state = State::Inline,
                    _ => return Err(malformed(at, "unknown type byte")),
                }
                Ok(1)
            }
            State::Simple { cr } => {
                let mut from = 0;
                while let Some(j) = memchr::memchr(b'\n', &data[from..]) {
                    let lf = from + j;
                    let after_cr = if lf == 0 { cr } else { data[lf - 1] == b'\r' };
                    if after_cr {
                        self.end_value(at + lf as u64 + 1, ends);
                        return Ok(lf + 1);
                    }
                    from = lf + 1;
                }
                self.state = State::Simple {
                    cr: data[data.len() - 1] == b'\r',
                };
                Ok(data.len())
            }
            State::Inline => match memchr::memchr(b'\n', data) {
                Some(j) => {
                    self.end_value(at + j as u64 + 1, ends);
                    Ok(j + 1)
                }
                None => Ok(data.len()),
            },
            State::Number(mut n) => {
                for (k, &b) in data.iter().enumerate() {
                    let at = at + k as u64;
                    n.len += 1;
                    if n.len > MAX_HEADER_LINE {
                        return Err(malformed(at, "header line too long"));
                    }
                    if n.cr {
                        if b != b'\n' {
                            return Err(malformed(at, "header line not ended by CRLF"));
                        }
                        self.end_number(n, at + 1, ends)?;
                        return Ok(k + 1);
                    }
                    match b {
                        b'-' if n.len == 2 => n.neg = true,
                        b'0'..=b'9' => {
                            let d = u64::from(b - b'0');
                            // Lengths and counts may only be negative as -1.
                            if n.neg && n.kind != b':' && (n.digits > 0 || d != 1) {
                                return Err(malformed(at, "negative length other than -1"));
                            }
                            n.value = n
                                .value
                                .checked_mul(10)
                                .and_then(|v| v.checked_add(d))
                                .ok_or_else(|| malformed(at, "number too large"))?;
                            n.digits += 1;
                        }
                        b'\r' if n.digits > 0 => n.cr = true,
                        _ => return Err(malformed(at, "invalid byte in number")),
                    }
                }
                self.state = State::Number(n);
                Ok(data.len())
            }
            State::Bulk { remaining } => {
                let take = remaining.min(data.len() as u64);
                self.state = if take == remaining {
                    State::BulkCr
                } else {
                    State::Bulk {
                        remaining: remaining - take,
                    }
                };
                Ok(take as usize)
            }
            State::BulkCr => {
                if data[0] != b'\r' {
                    return Err(malformed(at, "bulk string not followed by CRLF"));
                }
                self.state = State::BulkLf;
                Ok(1)
            }
            State::BulkLf => {
                if data[0] != b'\n' {
                    return Err(malformed(at, "bulk string not followed by CRLF"));
                }
                self.end_value(at + 1, ends);
                Ok(1)
            }
        }
    }

    /// A header line `n` ended just before `end`.
    fn end_number(&mut self, n: Number, end: u64, ends: &mut Vec<u64>) -> Result<(), FrameError> {
        match n.kind {
            b'$' if !n.neg => {
                // The payload and its CRLF must fit too.
                let size = u128::from(end - self.start) + u128::from(n.value) + 2;
                if size > self.max_frame as u128 {
                    return Err(FrameError::TooLarge {
                        start: self.start,
                        limit: self.max_frame,
                    });
                }
                self.state = match n.value {
                    0 => State::BulkCr,
                    remaining => State::Bulk { remaining },
                };
            }
            b'*' if !n.neg && n.value > 0 => {
                if self.stack.len() == MAX_DEPTH {
                    return Err(malformed(n.start, "nesting too deep"));
                }
                self.stack.push(n.value);
                self.state = State::Type;
            }
            // An integer, a null bulk string, a null or empty array.
            _ => self.end_value(end, ends),
        }
        Ok(())
    }

    /// A value ended just before `end`: it ends its frame, or is one more
    /// element of the innermost open array, which may end in turn.
    fn end_value(&mut self, end: u64, ends: &mut Vec<u64>) {
        self.state = State::Type;
        while let Some(left) = self.stack.last_mut() {
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.stack.pop();
        }
        ends.push(end);
        self.start = end;
    }

    fn check_invariants(&self) {
        debug_assert!(self.start <= self.pos);
        debug_assert!(self.pos - self.start <= self.max_frame as u64);
        debug_assert!(self.stack.len() <= MAX_DEPTH);
        debug_assert!(self.stack.iter().all(|&n| n > 0));
        if self.stack.is_empty() && self.state == State::Type {
            debug_assert_eq!(self.start, self.pos);
        }
    }
}

fn malformed(offset: u64, what: &'static str) -> FrameError {
    FrameError::Malformed { offset, what }
}

#[path = "snapshot/resp.rs"]
mod snapshot;
