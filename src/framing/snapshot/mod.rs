//! \[pure\] Snapshot encoding of the framing [`Scanner`]s, mid-frame included:
//! a tag (0 lines, 1 length-prefixed, 2 RESP), then the scanner's own fields
//! (`lines.rs`, `length.rs` and `resp.rs` here are child modules of each
//! scanner's file, so they reach its private state). A scanner is read back
//! only if it could have been reached by scanning: its offsets and parse
//! state are checked as its `check_invariants` would.
//!
//! A poisoned scanner keeps its [`FrameError`]; the error's `what` is stored
//! as text and read back as the matching message of this version (a message
//! this version does not know reads back as a generic one).

use super::{FrameError, LengthScanner, LinesScanner, RespScanner, Scanner};
use crate::snapshot_codec::{Reader, Result, Writer};

/// Every `what` of a [`FrameError::Malformed`] the scanners produce (a test
/// checks the scanners' sources against this list).
const MALFORMED: &[&str] = &[
    "length_field_length must be 1 to 8 bytes",
    "length field plus length_adjustment is negative",
    "unknown type byte",
    "header line too long",
    "header line not ended by CRLF",
    "negative length other than -1",
    "number too large",
    "invalid byte in number",
    "bulk string not followed by CRLF",
    "nesting too deep",
];

/// What a snapshot from another version says for a message this one lacks.
const OTHER_MALFORMED: &str = "malformed frame (before a hand-over)";

impl Scanner {
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        match self {
            Scanner::Lines(s) => {
                w.u8(0);
                s.write_snapshot(w);
            }
            Scanner::LengthPrefixed(s) => {
                w.u8(1);
                s.write_snapshot(w);
            }
            Scanner::Resp(s) => {
                w.u8(2);
                s.write_snapshot(w);
            }
        }
    }

    pub(crate) fn read_snapshot(r: &mut Reader, what: &str) -> Result<Scanner> {
        Ok(match r.tag(3, what)? {
            0 => Scanner::Lines(LinesScanner::read_snapshot(r, what)?),
            1 => Scanner::LengthPrefixed(LengthScanner::read_snapshot(r, what)?),
            _ => Scanner::Resp(RespScanner::read_snapshot(r, what)?),
        })
    }

    /// Whether both scan the same framing (not necessarily with the same
    /// limits).
    pub(crate) fn same_kind(&self, other: &Scanner) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

pub(super) fn write_error(w: &mut Writer, e: &Option<FrameError>) {
    w.option(e.as_ref(), |w, e| match e {
        FrameError::TooLarge { start, limit } => {
            w.u8(0);
            w.u64(*start);
            w.usize(*limit);
        }
        FrameError::Malformed { offset, what } => {
            w.u8(1);
            w.u64(*offset);
            w.bytes(what.as_bytes());
        }
    });
}

pub(super) fn read_error(r: &mut Reader, what: &str) -> Result<Option<FrameError>> {
    r.option(what, |r| {
        Ok(match r.tag(2, what)? {
            0 => FrameError::TooLarge {
                start: r.counter(what)?,
                limit: r.usize(what)?,
            },
            _ => {
                let offset = r.counter(what)?;
                let text = r.bytes(what)?;
                let what = MALFORMED
                    .iter()
                    .find(|m| m.as_bytes() == &text[..])
                    .copied()
                    .unwrap_or(OTHER_MALFORMED);
                FrameError::Malformed { offset, what }
            }
        })
    })
}

#[cfg(test)]
mod tests;
