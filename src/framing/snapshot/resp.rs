//! Snapshot encoding of a [`RespScanner`]: `max_frame`, `pos`, `start`, the
//! state (0 type, 1 simple with `cr`, 2 inline, 3 number with its fields, 4
//! bulk with the bytes to come, 5 bulk CR, 6 bulk LF), the stack of open
//! arrays, the error. A child of `resp.rs` (see `framing::snapshot`).

use super::{Number, RespScanner, State, MAX_DEPTH, MAX_HEADER_LINE};
use crate::framing::snapshot::{read_error, write_error};
use crate::snapshot_codec::{Reader, Result, Writer};

impl RespScanner {
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        w.usize(self.max_frame);
        w.u64(self.pos);
        w.u64(self.start);
        match self.state {
            State::Type => w.u8(0),
            State::Simple { cr } => {
                w.u8(1);
                w.bool(cr);
            }
            State::Inline => w.u8(2),
            State::Number(n) => {
                w.u8(3);
                w.u8(n.kind);
                w.u64(n.start);
                w.u32(n.len);
                w.bool(n.neg);
                w.u32(n.digits);
                w.u64(n.value);
                w.bool(n.cr);
            }
            State::Bulk { remaining } => {
                w.u8(4);
                w.u64(remaining);
            }
            State::BulkCr => w.u8(5),
            State::BulkLf => w.u8(6),
        }
        w.usize(self.stack.len());
        for &n in &self.stack {
            w.u64(n);
        }
        write_error(w, &self.error);
    }

    pub(crate) fn read_snapshot(r: &mut Reader, what: &str) -> Result<RespScanner> {
        let max_frame = r.usize(what)?;
        let pos = r.counter(what)?;
        let start = r.counter(what)?;
        let state = match r.tag(7, what)? {
            0 => State::Type,
            1 => State::Simple { cr: r.bool(what)? },
            2 => State::Inline,
            3 => State::Number(Number {
                kind: r.u8(what)?,
                start: r.counter(what)?,
                len: r.u32(what)?,
                neg: r.bool(what)?,
                digits: r.u32(what)?,
                value: r.u64(what)?,
                cr: r.bool(what)?,
            }),
            4 => State::Bulk {
                remaining: r.counter(what)?,
            },
            5 => State::BulkCr,
            _ => State::BulkLf,
        };
        let depth = r.count(1, what)?;
        r.check(depth <= MAX_DEPTH, || {
            format!("{what}: {depth} open arrays")
        })?;
        let mut stack = Vec::with_capacity(depth);
        for _ in 0..depth {
            stack.push(r.counter(what)?);
        }
        let s = RespScanner {
            max_frame,
            pos,
            start,
            state,
            stack,
            error: read_error(r, what)?,
        };
        r.check(s.start <= s.pos, || format!("{what}: frame start past pos"))?;
        if s.error.is_some() {
            return Ok(s);
        }
        let state_ok = match s.state {
            State::Type => !s.stack.is_empty() || s.start == s.pos,
            State::Number(n) => {
                matches!(n.kind, b':' | b'$' | b'*')
                    && (1..=MAX_HEADER_LINE).contains(&n.len)
                    && n.start >= s.start
                    && n.start.checked_add(u64::from(n.len)) == Some(s.pos)
            }
            State::Bulk { remaining } => remaining > 0,
            _ => true,
        };
        let ok =
            s.pos - s.start <= s.max_frame as u64 && s.stack.iter().all(|&n| n > 0) && state_ok;
        r.check(ok, || format!("{what}: inconsistent state {:?}", s.state))?;
        Ok(s)
    }
}
