//! Snapshot encoding of a [`LengthScanner`]: its settings (offset, width,
//! endianness, adjustment, `max_frame`), `pos`, `start`, the state (0
//! header with the bytes seen, 1 payload with the bytes to come), the length
//! field's bytes, the error. A child of `length.rs` (see `framing::snapshot`).

use super::{LengthScanner, State};
use crate::config::LengthPrefixed;
use crate::framing::snapshot::{read_error, write_error};
use crate::snapshot_codec::{Reader, Result, Writer};

impl LengthScanner {
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        let c = &self.cfg;
        w.usize(c.length_field_offset);
        w.usize(c.length_field_length);
        w.bool(c.big_endian);
        w.i64(c.length_adjustment);
        w.usize(c.max_frame);
        w.u64(self.pos);
        w.u64(self.start);
        match self.state {
            State::Header { have } => {
                w.u8(0);
                w.usize(have);
            }
            State::Payload { remaining } => {
                w.u8(1);
                w.u64(remaining);
            }
        }
        w.raw(&self.field);
        write_error(w, &self.error);
    }

    pub(crate) fn read_snapshot(r: &mut Reader, what: &str) -> Result<LengthScanner> {
        let cfg = LengthPrefixed {
            length_field_offset: r.usize(what)?,
            length_field_length: r.usize(what)?,
            big_endian: r.bool(what)?,
            length_adjustment: r.i64(what)?,
            max_frame: r.usize(what)?,
        };
        // `new` derives `header_len` (and poisons a bad width).
        let mut s = LengthScanner::new(cfg);
        s.pos = r.counter(what)?;
        s.start = r.counter(what)?;
        s.state = match r.tag(2, what)? {
            0 => State::Header {
                have: r.usize(what)?,
            },
            _ => State::Payload {
                remaining: r.counter(what)?,
            },
        };
        s.field = r.array(what)?;
        let error = read_error(r, what)?;
        let poisoned_by_config = s.error.is_some();
        s.error = error;
        if s.error.is_some() {
            return r
                .check(s.start <= s.pos, || format!("{what}: frame start past pos"))
                .map(|_| s);
        }
        r.check(!poisoned_by_config, || {
            format!("{what}: length field of {} bytes", cfg.length_field_length)
        })?;
        let ok = s.start <= s.pos
            && match s.state {
                State::Header { have } => have < s.header_len && s.start + have as u64 == s.pos,
                State::Payload { remaining } => remaining > 0,
            };
        r.check(ok, || format!("{what}: inconsistent state {:?}", s.state))?;
        Ok(s)
    }
}
