//! \[pure\] Lines: a frame ends at LF, so a CRLF line ends at its LF too.
//!
//! Owns the offset where the current line starts and finds LFs with `memchr`.
//! It keeps no line bytes at all, and does not interpret CR.

use super::{room, FrameError};

/// Frame boundaries of a stream of LF-terminated lines.
#[derive(Debug, Clone)]
pub struct LinesScanner {
    /// Largest frame in bytes, its LF included.
    max_frame: usize,
    /// Bytes fed so far, including those of calls that returned an error.
    pos: u64,
    /// Offset of the current (incomplete) line's first byte: the end of the
    /// last line, or 0. Always `<= pos`, and `pos - start <= max_frame` unless
    /// poisoned.
    start: u64,
    /// The first error; once set, every call returns it.
    error: Option<FrameError>,
}

impl LinesScanner {
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            pos: 0,
            start: 0,
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

    /// Pushes the end of every line completed by `data`. Lines completed before
    /// an error are still pushed.
    pub fn scan(&mut self, data: &[u8], ends: &mut Vec<u64>) -> Result<(), FrameError> {
        let base = self.pos;
        self.pos += data.len() as u64;
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        // No line can outgrow max_frame within `data` when the current one
        // may take all of it (later lines start later): then find the line
        // ends in one pass, without a limit check per line.
        if self.start.saturating_add(self.max_frame as u64) >= self.pos {
            for j in memchr::memchr_iter(b'\n', data) {
                self.start = base + j as u64 + 1;
                ends.push(self.start);
            }
            self.check_invariants();
            return Ok(());
        }
        let mut i = 0;
        while i < data.len() {
            let at = base + i as u64;
            // The current line may take bytes up to `start + max_frame`.
            let window = room(self.start, self.max_frame, at, data.len() - i);
            if window == 0 {
                let e = FrameError::TooLarge {
                    start: self.start,
                    limit: self.max_frame,
                };
                self.error = Some(e.clone());
                return Err(e);
            }
            match memchr::memchr(b'\n', &data[i..i + window]) {
                Some(j) => {
                    i += j + 1;
                    self.start = base + i as u64;
                    ends.push(self.start);
                }
                None => i += window,
            }
        }
        self.check_invariants();
        Ok(())
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    fn check_invariants(&self) {
        debug_assert!(self.start <= self.pos);
        debug_assert!(self.pos - self.start <= self.max_frame as u64);
    }
}

#[path = "snapshot/lines.rs"]
mod snapshot;
