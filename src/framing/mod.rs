//! \[pure\] Frame boundaries for `ack = "response"`: lines, length-prefixed and
//! Redis RESP2.
//!
//! A [`Scanner`] is fed a byte stream in chunks of any size, in order, and
//! reports the stream offset just past each complete frame. It never copies or
//! buffers payload bytes (only a few header bytes that may straddle chunks), so
//! the session can keep its chunks shared. It owns no sockets and no bytes.

use crate::config::Framing;

mod length;
mod lines;
mod resp;
mod snapshot;

pub use length::LengthScanner;
pub use lines::LinesScanner;
pub use resp::RespScanner;

#[cfg(test)]
mod tests;

/// A frame that breaks its framing's rules. The caller decides whose fault it
/// is (a request comes from the client, a response from the server).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame starting at `start` is longer than `limit` bytes.
    #[error("frame at offset {start} exceeds max_frame of {limit} bytes")]
    TooLarge { start: u64, limit: usize },
    /// The bytes at `offset` are not valid for this framing.
    #[error("malformed frame at offset {offset}: {what}")]
    Malformed { offset: u64, what: &'static str },
}

/// Incremental frame boundary scanner for one byte stream.
#[derive(Debug, Clone)]
pub enum Scanner {
    Lines(LinesScanner),
    LengthPrefixed(LengthScanner),
    Resp(RespScanner),
}

impl Scanner {
    pub fn new(framing: &Framing) -> Scanner {
        match framing {
            Framing::Lines { max_frame } => Scanner::Lines(LinesScanner::new(*max_frame)),
            Framing::LengthPrefixed(lp) => Scanner::LengthPrefixed(LengthScanner::new(*lp)),
            Framing::Resp { max_frame } => Scanner::Resp(RespScanner::new(*max_frame)),
        }
    }

    /// A new scanner for `framing` whose stream starts at `offset`, which
    /// must be a frame boundary: the ends it reports count from the
    /// stream's first byte, as if the bytes before `offset` had been fed.
    pub fn starting_at(framing: &Framing, offset: u64) -> Scanner {
        match Scanner::new(framing) {
            Scanner::Lines(s) => Scanner::Lines(s.starting_at(offset)),
            Scanner::LengthPrefixed(s) => Scanner::LengthPrefixed(s.starting_at(offset)),
            Scanner::Resp(s) => Scanner::Resp(s.starting_at(offset)),
        }
    }

    /// Feeds the next bytes of the stream. For every frame completed by them,
    /// pushes the stream offset just past its last byte onto `ends` (offsets
    /// count from the first byte ever fed). After an error the scanner is
    /// poisoned: further calls return the same error.
    pub fn scan(&mut self, data: &[u8], ends: &mut Vec<u64>) -> Result<(), FrameError> {
        match self {
            Scanner::Lines(s) => s.scan(data, ends),
            Scanner::LengthPrefixed(s) => s.scan(data, ends),
            Scanner::Resp(s) => s.scan(data, ends),
        }
    }

    /// Bytes fed so far, those of calls that returned an error included.
    pub fn position(&self) -> u64 {
        match self {
            Scanner::Lines(s) => s.position(),
            Scanner::LengthPrefixed(s) => s.position(),
            Scanner::Resp(s) => s.position(),
        }
    }
}

/// How many of the `avail` bytes at stream offset `at` the frame that starts at
/// `start` may still take without growing past `max_frame` bytes.
fn room(start: u64, max_frame: usize, at: u64, avail: usize) -> usize {
    let limit_end = start.saturating_add(max_frame as u64);
    limit_end.saturating_sub(at).min(avail as u64) as usize
}
