//! \[pure\] Length-prefixed frames, with the header rules of tokio-util's
//! `LengthDelimitedCodec`: `length_field_offset` bytes, then a big or little
//! endian unsigned length field of `length_field_length` bytes; the payload
//! after the header is the field's value plus `length_adjustment` bytes.
//!
//! Owns the header bytes of the current frame (at most 8, the length field)
//! and the count of payload bytes still to come, which it skips
//! arithmetically. Validating the configuration is `config`'s job; an invalid
//! field width poisons the scanner instead of panicking.

use super::FrameError;
use crate::config::LengthPrefixed;

/// Frame boundaries of a stream of length-prefixed frames.
#[derive(Debug, Clone)]
pub struct LengthScanner {
    cfg: LengthPrefixed,
    /// `length_field_offset + length_field_length`.
    header_len: usize,
    /// Bytes fed so far, including those of calls that returned an error.
    pos: u64,
    /// Offset of the current frame's first byte: the end of the last frame, or
    /// 0. Always `<= pos`.
    start: u64,
    state: State,
    /// The length field's bytes seen so far, in stream order.
    field: [u8; 8],
    /// The first error; once set, every call returns it.
    error: Option<FrameError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `have` bytes of the current frame's header seen, `have < header_len`.
    Header { have: usize },
    /// The header is done; `remaining > 0` payload bytes are still to come.
    Payload { remaining: u64 },
}

impl LengthScanner {
    pub fn new(cfg: LengthPrefixed) -> Self {
        let error = if (1..=8).contains(&cfg.length_field_length) {
            None
        } else {
            Some(FrameError::Malformed {
                offset: 0,
                what: "length_field_length must be 1 to 8 bytes",
            })
        };
        Self {
            cfg,
            header_len: cfg
                .length_field_offset
                .saturating_add(cfg.length_field_length),
            pos: 0,
            start: 0,
            state: State::Header { have: 0 },
            field: [0; 8],
            error,
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
            let avail = data.len() - i;
            match self.state {
                State::Header { have } => {
                    let take = (self.header_len - have).min(avail);
                    // Keep the part of data[i..i + take] that is length field.
                    let field_start = self.cfg.length_field_offset;
                    let lo = have.max(field_start);
                    let hi = (have + take).min(self.header_len);
                    if lo < hi {
                        self.field[lo - field_start..hi - field_start]
                            .copy_from_slice(&data[i + lo - have..i + hi - have]);
                    }
                    i += take;
                    if have + take < self.header_len {
                        self.state = State::Header { have: have + take };
                    } else {
                        match self.payload_len() {
                            Ok(0) => self.end_frame(base + i as u64, ends),
                            Ok(n) => self.state = State::Payload { remaining: n },
                            Err(e) => {
                                self.error = Some(e.clone());
                                return Err(e);
                            }
                        }
                    }
                }
                State::Payload { remaining } => {
                    let take = remaining.min(avail as u64);
                    i += take as usize;
                    if take == remaining {
                        self.end_frame(base + i as u64, ends);
                    } else {
                        self.state = State::Payload {
                            remaining: remaining - take,
                        };
                    }
                }
            }
        }
        self.check_invariants();
        Ok(())
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Decodes the complete header: the payload bytes that follow it.
    fn payload_len(&self) -> Result<u64, FrameError> {
        let field = &self.field[..self.cfg.length_field_length];
        let value = if self.cfg.big_endian {
            field.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b))
        } else {
            field
                .iter()
                .rev()
                .fold(0u64, |v, &b| (v << 8) | u64::from(b))
        };
        let adjusted = i128::from(value) + i128::from(self.cfg.length_adjustment);
        if adjusted < 0 {
            return Err(FrameError::Malformed {
                offset: self.start + self.cfg.length_field_offset as u64,
                what: "length field plus length_adjustment is negative",
            });
        }
        let total = self.header_len as u128 + adjusted as u128;
        if total > self.cfg.max_frame as u128 {
            return Err(FrameError::TooLarge {
                start: self.start,
                limit: self.cfg.max_frame,
            });
        }
        // Now `adjusted <= max_frame`, so it fits in a u64.
        Ok(adjusted as u64)
    }

    fn end_frame(&mut self, end: u64, ends: &mut Vec<u64>) {
        ends.push(end);
        self.start = end;
        self.state = State::Header { have: 0 };
    }

    fn check_invariants(&self) {
        debug_assert!(self.start <= self.pos);
        match self.state {
            State::Header { have } => {
                debug_assert!(have < self.header_len);
                debug_assert_eq!(self.start + have as u64, self.pos);
            }
            State::Payload { remaining } => debug_assert!(remaining > 0),
        }
    }
}

#[path = "snapshot/length.rs"]
mod snapshot;
