//! Snapshot encoding of a [`LinesScanner`]: `max_frame`, `pos`, `start`, the
//! error. A child of `lines.rs` (see `framing::snapshot`).

use super::LinesScanner;
use crate::framing::snapshot::{read_error, write_error};
use crate::snapshot_codec::{Reader, Result, Writer};

impl LinesScanner {
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        w.usize(self.max_frame);
        w.u64(self.pos);
        w.u64(self.start);
        write_error(w, &self.error);
    }

    pub(crate) fn read_snapshot(r: &mut Reader, what: &str) -> Result<LinesScanner> {
        let s = LinesScanner {
            max_frame: r.usize(what)?,
            pos: r.counter(what)?,
            start: r.counter(what)?,
            error: read_error(r, what)?,
        };
        r.check(
            s.start <= s.pos && (s.error.is_some() || s.pos - s.start <= s.max_frame as u64),
            || {
                format!(
                    "{what}: line at {} not within {} bytes of {}",
                    s.start, s.max_frame, s.pos
                )
            },
        )?;
        Ok(s)
    }
}
