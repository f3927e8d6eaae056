//! [pure] The acceptor's handshake decision (docs/protocol.md §3.3): given a
//! HELLO and what this process knows of its session id, accept it (as a new,
//! resumed, restored or already-completed session) or refuse it with the
//! right code. No sockets, no session table: the caller looks the id up and
//! acts on the answer.

use crate::proto::{check_offset, ErrorCode, Hello, ProtoError};

/// What this process knows of a HELLO's session id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    /// Nothing.
    Unknown,
    /// A live session: the last accepted epoch and its down stream's
    /// `acked` and `sent` (the highest offset ever handed to a leg).
    Live {
        epoch: u64,
        down_acked: u64,
        down_sent: u64,
    },
    /// A session that completed recently: its last epoch and the final
    /// length of its down stream.
    Completed { epoch: u64, down_end: u64 },
}

/// What to do with an accepted HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Open a new session.
    New,
    /// Hand the transport to the live session.
    Resume,
    /// Unknown id: ask the application's restore callback (it may still
    /// refuse with `unknown_session`).
    Restore,
    /// Answer with a WELCOME showing everything acknowledged, then close.
    Completed,
}

/// The checks of §3.3, in order. `Hello::check` covers version, token,
/// frame limits and the new-session rules; the checks that need the
/// session table follow.
pub(crate) fn decide(hello: &Hello, key: &[u8], known: Known) -> Result<Decision, ProtoError> {
    hello.check(key)?;
    if !hello.resume {
        return match known {
            Known::Unknown => Ok(Decision::New),
            _ => Err(ProtoError::new(
                ErrorCode::SessionExists,
                "a new session reuses an id in use",
            )),
        };
    }
    match known {
        Known::Unknown => Ok(Decision::Restore),
        Known::Live {
            epoch,
            down_acked,
            down_sent,
        } => {
            check_epoch(hello.epoch, epoch)?;
            check_offset(
                "the initiator's recv_offset",
                hello.recv_offset,
                down_acked,
                down_sent,
            )?;
            Ok(Decision::Resume)
        }
        Known::Completed { epoch, down_end } => {
            check_epoch(hello.epoch, epoch)?;
            check_offset(
                "the initiator's recv_offset",
                hello.recv_offset,
                down_end,
                down_end,
            )?;
            Ok(Decision::Completed)
        }
    }
}

fn check_epoch(got: u64, last: u64) -> Result<(), ProtoError> {
    if got <= last {
        return Err(ProtoError::new(
            ErrorCode::StaleEpoch,
            format!("epoch {got} is not greater than {last}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ClientAddr, TOKEN_LEN};

    const KEY: &[u8] = &[7u8; 32];

    fn hello(resume: bool, epoch: u64, recv_offset: u64) -> Hello {
        let mut h = Hello {
            version_min: 1,
            version_max: 1,
            resume,
            session_id: [1; 16],
            epoch,
            recv_offset,
            max_frame: 65536,
            window: 1 << 20,
            heartbeat_ms: 0,
            client: ClientAddr::Unknown,
            token: [0; TOKEN_LEN],
        };
        h.encode(KEY);
        h
    }

    fn code(r: Result<Decision, ProtoError>) -> ErrorCode {
        r.unwrap_err().code
    }

    #[test]
    fn session_ids_show_as_lowercase_hex() {
        let mut id = [0u8; 16];
        id[0] = 0x0f;
        id[1] = 0xab;
        id[15] = 0x10;
        let want = "0fab0000000000000000000000000010";
        assert_eq!(crate::server::hex(&id), want);
        assert_eq!(crate::server::Hex(id).to_string(), want);
    }

    #[test]
    fn table() {
        let live = Known::Live {
            epoch: 2,
            down_acked: 10,
            down_sent: 20,
        };
        let done = Known::Completed {
            epoch: 1,
            down_end: 5,
        };
        assert_eq!(
            decide(&hello(false, 0, 0), KEY, Known::Unknown),
            Ok(Decision::New)
        );
        assert_eq!(
            code(decide(&hello(false, 0, 0), KEY, live)),
            ErrorCode::SessionExists
        );
        assert_eq!(
            code(decide(&hello(false, 0, 0), KEY, done)),
            ErrorCode::SessionExists
        );
        assert_eq!(
            code(decide(&hello(false, 1, 0), KEY, Known::Unknown)),
            ErrorCode::Malformed
        );
        assert_eq!(
            code(decide(&hello(false, 0, 0), &[8u8; 32], Known::Unknown)),
            ErrorCode::BadToken
        );
        assert_eq!(
            decide(&hello(true, 1, 0), KEY, Known::Unknown),
            Ok(Decision::Restore)
        );
        assert_eq!(
            code(decide(&hello(true, 2, 15), KEY, live)),
            ErrorCode::StaleEpoch
        );
        for ok in [10, 15, 20] {
            assert_eq!(decide(&hello(true, 3, ok), KEY, live), Ok(Decision::Resume));
        }
        for bad in [9, 21] {
            assert_eq!(
                code(decide(&hello(true, 3, bad), KEY, live)),
                ErrorCode::ImpossibleOffset
            );
        }
        assert_eq!(
            decide(&hello(true, 2, 5), KEY, done),
            Ok(Decision::Completed)
        );
        assert_eq!(
            code(decide(&hello(true, 2, 4), KEY, done)),
            ErrorCode::ImpossibleOffset
        );
    }
}
