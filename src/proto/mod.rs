//! \[pure\] The resume protocol (HFRP/1, `docs/protocol.md`): frames, their
//! codec, the handshake messages with their HMAC tokens, and the offset
//! checks both sides make.
//!
//! Decoding never copies DATA payloads (they are split off the read buffer
//! as `Bytes`) and never trusts a length before checking it against the
//! limit. This module owns no sockets and no session state: the proxy and
//! the server library drive it.

use std::fmt;
use std::net::IpAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub mod link;

pub use link::{Incoming, Link, LinkConfig};

/// "HFRP".
pub const MAGIC: [u8; 4] = *b"HFRP";
/// The oldest protocol version this implementation speaks.
pub const VERSION: u8 = 1;
/// The newest: version 2 lets an initiator send early data (§3.6).
pub const VERSION_MAX: u8 = 2;
/// Most up-stream bytes an initiator sends as early data, before the
/// WELCOME of a new session (version 2): the smallest `max_frame` and
/// `window` an acceptor may announce, so early data never exceeds either.
pub const EARLY_DATA_MAX: usize = MIN_MAX_FRAME as usize;
/// Frame header: type (1) + length (4).
pub const HEADER_LEN: usize = 5;
/// Largest handshake, REFUSE or ABORT payload.
pub const MAX_CONTROL: usize = 1024;
/// Bounds of an announced `max_frame`.
pub const MIN_MAX_FRAME: u32 = 1024;
pub const MAX_MAX_FRAME: u32 = 16 << 20;
/// Length of a token (HMAC-SHA256).
pub const TOKEN_LEN: usize = 32;

const HELLO_CONTEXT: &[u8] = b"HFRP/1 HELLO";
const WELCOME_CONTEXT: &[u8] = b"HFRP/1 WELCOME";

/// Frame types.
pub mod ty {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const REFUSE: u8 = 0x03;
    pub const DATA: u8 = 0x10;
    pub const ACK: u8 = 0x11;
    pub const FIN: u8 = 0x12;
    pub const ABORT: u8 = 0x13;
    pub const PING: u8 = 0x14;
}

/// Error codes carried by REFUSE and ABORT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Malformed,
    BadMagic,
    UnsupportedVersion,
    BadToken,
    SessionExists,
    UnknownSession,
    StaleEpoch,
    ImpossibleOffset,
    FrameTooLarge,
    WindowExceeded,
    Limit,
    Application,
    Timeout,
    /// A code this version does not know (kept for logs).
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::BadMagic => 2,
            ErrorCode::UnsupportedVersion => 3,
            ErrorCode::BadToken => 4,
            ErrorCode::SessionExists => 5,
            ErrorCode::UnknownSession => 6,
            ErrorCode::StaleEpoch => 7,
            ErrorCode::ImpossibleOffset => 8,
            ErrorCode::FrameTooLarge => 9,
            ErrorCode::WindowExceeded => 10,
            ErrorCode::Limit => 11,
            ErrorCode::Application => 12,
            ErrorCode::Timeout => 13,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_u16(c: u16) -> ErrorCode {
        match c {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::BadMagic,
            3 => ErrorCode::UnsupportedVersion,
            4 => ErrorCode::BadToken,
            5 => ErrorCode::SessionExists,
            6 => ErrorCode::UnknownSession,
            7 => ErrorCode::StaleEpoch,
            8 => ErrorCode::ImpossibleOffset,
            9 => ErrorCode::FrameTooLarge,
            10 => ErrorCode::WindowExceeded,
            11 => ErrorCode::Limit,
            12 => ErrorCode::Application,
            13 => ErrorCode::Timeout,
            c => ErrorCode::Other(c),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::BadMagic => "bad_magic",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::SessionExists => "session_exists",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::StaleEpoch => "stale_epoch",
            ErrorCode::ImpossibleOffset => "impossible_offset",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::WindowExceeded => "window_exceeded",
            ErrorCode::Limit => "limit",
            ErrorCode::Application => "application",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Other(_) => "other",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.as_str(), self.to_u16())
    }
}

/// A protocol violation by the peer: which code to answer with, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct ProtoError {
    pub code: ErrorCode,
    pub detail: String,
}

impl ProtoError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> ProtoError {
        ProtoError {
            code,
            detail: detail.into(),
        }
    }
}

fn malformed(detail: impl Into<String>) -> ProtoError {
    ProtoError::new(ErrorCode::Malformed, detail)
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Refuse { code: ErrorCode, reason: String },
    Data(Bytes),
    Ack(u64),
    Fin(u64),
    Abort { code: ErrorCode, reason: String },
    Ping,
}

/// The client's address, as the PROXY protocol carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    Unknown,
    Ip(IpAddr, u16),
}

/// HELLO (§3.1). `token` is filled in by [`Hello::encode`] and checked by
/// [`Hello::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u8,
    pub version_max: u8,
    pub resume: bool,
    pub session_id: [u8; 16],
    pub epoch: u64,
    pub recv_offset: u64,
    pub max_frame: u32,
    pub window: u32,
    pub heartbeat_ms: u32,
    pub client: ClientAddr,
    pub token: [u8; TOKEN_LEN],
}

/// WELCOME (§3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u8,
    pub resumed: bool,
    pub restored: bool,
    pub session_id: [u8; 16],
    pub recv_offset: u64,
    pub max_frame: u32,
    pub window: u32,
    pub heartbeat_ms: u32,
    pub token: [u8; TOKEN_LEN],
}

fn hmac(key: &[u8], context: &[u8], parts: &[&[u8]]) -> [u8; TOKEN_LEN] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(context);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn tokens_equal(a: &[u8; TOKEN_LEN], b: &[u8; TOKEN_LEN]) -> bool {
    a.ct_eq(b).into()
}

impl Hello {
    /// The payload bytes the token covers.
    fn body(&self) -> BytesMut {
        let mut b = BytesMut::with_capacity(64);
        b.put_slice(&MAGIC);
        b.put_u8(self.version_min);
        b.put_u8(self.version_max);
        b.put_u8(u8::from(self.resume));
        b.put_u8(0);
        b.put_slice(&self.session_id);
        b.put_u64(self.epoch);
        b.put_u64(self.recv_offset);
        b.put_u32(self.max_frame);
        b.put_u32(self.window);
        b.put_u32(self.heartbeat_ms);
        match self.client {
            ClientAddr::Unknown => b.put_u8(0),
            ClientAddr::Ip(IpAddr::V4(a), port) => {
                b.put_u8(4);
                b.put_slice(&a.octets());
                b.put_u16(port);
            }
            ClientAddr::Ip(IpAddr::V6(a), port) => {
                b.put_u8(6);
                b.put_slice(&a.octets());
                b.put_u16(port);
            }
        }
        b
    }

    /// Computes the token with `key` and returns the whole frame.
    pub fn encode(&mut self, key: &[u8]) -> Bytes {
        let body = self.body();
        self.token = hmac(key, HELLO_CONTEXT, &[&body]);
        let mut out = BytesMut::with_capacity(HEADER_LEN + body.len() + TOKEN_LEN);
        out.put_u8(ty::HELLO);
        out.put_u32((body.len() + TOKEN_LEN) as u32);
        out.put_slice(&body);
        out.put_slice(&self.token);
        out.freeze()
    }

    /// Whether the token was made with `key`.
    pub fn verify(&self, key: &[u8]) -> bool {
        tokens_equal(&hmac(key, HELLO_CONTEXT, &[&self.body()]), &self.token)
    }

    fn decode(mut p: &[u8]) -> Result<Hello, ProtoError> {
        if p.len() < 4 || p[..4] != MAGIC {
            return Err(ProtoError::new(
                ErrorCode::BadMagic,
                "the HELLO does not start with \"HFRP\"",
            ));
        }
        if p.len() < 53 + TOKEN_LEN {
            return Err(malformed(format!(
                "HELLO of {} bytes is too short",
                p.len()
            )));
        }
        p.advance(4);
        let version_min = p.get_u8();
        let version_max = p.get_u8();
        let flags = p.get_u8();
        if p.get_u8() != 0 {
            return Err(malformed("HELLO reserved byte is not 0"));
        }
        if flags & !1 != 0 {
            return Err(malformed(format!("unknown HELLO flags {flags:#04x}")));
        }
        let mut session_id = [0u8; 16];
        p.copy_to_slice(&mut session_id);
        let epoch = p.get_u64();
        let recv_offset = p.get_u64();
        let max_frame = p.get_u32();
        let window = p.get_u32();
        let heartbeat_ms = p.get_u32();
        let family = p.get_u8();
        let client = match family {
            0 => ClientAddr::Unknown,
            4 if p.len() >= 6 + TOKEN_LEN => {
                let mut a = [0u8; 4];
                p.copy_to_slice(&mut a);
                ClientAddr::Ip(IpAddr::from(a), p.get_u16())
            }
            6 if p.len() >= 18 + TOKEN_LEN => {
                let mut a = [0u8; 16];
                p.copy_to_slice(&mut a);
                ClientAddr::Ip(IpAddr::from(a), p.get_u16())
            }
            4 | 6 => return Err(malformed("HELLO address is truncated")),
            f => return Err(malformed(format!("unknown address family {f}"))),
        };
        if p.len() != TOKEN_LEN {
            return Err(malformed(format!(
                "HELLO has {} bytes where the {TOKEN_LEN}-byte token should end it",
                p.len()
            )));
        }
        let mut token = [0u8; TOKEN_LEN];
        p.copy_to_slice(&mut token);
        Ok(Hello {
            version_min,
            version_max,
            resume: flags & 1 == 1,
            session_id,
            epoch,
            recv_offset,
            max_frame,
            window,
            heartbeat_ms,
            client,
            token,
        })
    }

    /// The acceptor's checks that need no session table (§3.3): version,
    /// token, limits, and the new-session rules. Returns the version to use.
    pub fn check(&self, key: &[u8]) -> Result<u8, ProtoError> {
        let Some(version) = self.version() else {
            return Err(ProtoError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "the initiator speaks versions {}..={}, this acceptor {VERSION}..={VERSION_MAX}",
                    self.version_min, self.version_max
                ),
            ));
        };
        if !self.verify(key) {
            return Err(ProtoError::new(
                ErrorCode::BadToken,
                "the HELLO token does not verify",
            ));
        }
        check_limits(self.max_frame, self.window)?;
        if !self.resume && (self.epoch != 0 || self.recv_offset != 0) {
            return Err(malformed(
                "a new session must have epoch 0 and recv_offset 0",
            ));
        }
        Ok(version)
    }

    /// The highest version both this implementation and the HELLO's
    /// initiator speak, if any: what the acceptor's WELCOME chooses.
    pub fn version(&self) -> Option<u8> {
        let v = self.version_max.min(VERSION_MAX);
        (v >= self.version_min && v >= VERSION).then_some(v)
    }
}

fn check_limits(max_frame: u32, window: u32) -> Result<(), ProtoError> {
    if !(MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&max_frame) {
        return Err(malformed(format!(
            "max_frame {max_frame} is outside {MIN_MAX_FRAME}..={MAX_MAX_FRAME}"
        )));
    }
    if window < max_frame {
        return Err(malformed(format!(
            "window {window} is below max_frame {max_frame}"
        )));
    }
    Ok(())
}

impl Welcome {
    fn body(&self) -> BytesMut {
        let mut b = BytesMut::with_capacity(40);
        b.put_u8(self.version);
        b.put_u8(u8::from(self.resumed) | (u8::from(self.restored) << 1));
        b.put_u16(0);
        b.put_slice(&self.session_id);
        b.put_u64(self.recv_offset);
        b.put_u32(self.max_frame);
        b.put_u32(self.window);
        b.put_u32(self.heartbeat_ms);
        b
    }

    /// Computes the token (bound to the HELLO's token) and returns the frame.
    pub fn encode(&mut self, key: &[u8], hello_token: &[u8; TOKEN_LEN]) -> Bytes {
        let body = self.body();
        self.token = hmac(key, WELCOME_CONTEXT, &[hello_token, &body]);
        let mut out = BytesMut::with_capacity(HEADER_LEN + body.len() + TOKEN_LEN);
        out.put_u8(ty::WELCOME);
        out.put_u32((body.len() + TOKEN_LEN) as u32);
        out.put_slice(&body);
        out.put_slice(&self.token);
        out.freeze()
    }

    pub fn verify(&self, key: &[u8], hello_token: &[u8; TOKEN_LEN]) -> bool {
        tokens_equal(
            &hmac(key, WELCOME_CONTEXT, &[hello_token, &self.body()]),
            &self.token,
        )
    }

    fn decode(mut p: &[u8]) -> Result<Welcome, ProtoError> {
        if p.len() != 40 + TOKEN_LEN {
            return Err(malformed(format!("WELCOME of {} bytes, want 72", p.len())));
        }
        let version = p.get_u8();
        let flags = p.get_u8();
        if p.get_u16() != 0 {
            return Err(malformed("WELCOME reserved bytes are not 0"));
        }
        if flags & !3 != 0 {
            return Err(malformed(format!("unknown WELCOME flags {flags:#04x}")));
        }
        let mut session_id = [0u8; 16];
        p.copy_to_slice(&mut session_id);
        let recv_offset = p.get_u64();
        let max_frame = p.get_u32();
        let window = p.get_u32();
        let heartbeat_ms = p.get_u32();
        let mut token = [0u8; TOKEN_LEN];
        p.copy_to_slice(&mut token);
        Ok(Welcome {
            version,
            resumed: flags & 1 == 1,
            restored: flags & 2 == 2,
            session_id,
            recv_offset,
            max_frame,
            window,
            heartbeat_ms,
            token,
        })
    }

    /// The initiator's checks (§3.4): token, version, session id, limits,
    /// and that the acceptor's `recv_offset` is one the initiator can
    /// replay from (`up_acked..=up_sent`).
    pub fn check(
        &self,
        key: &[u8],
        hello: &Hello,
        up_acked: u64,
        up_sent: u64,
    ) -> Result<(), ProtoError> {
        if !self.verify(key, &hello.token) {
            return Err(ProtoError::new(
                ErrorCode::BadToken,
                "the WELCOME token does not verify",
            ));
        }
        if self.version < hello.version_min || self.version > hello.version_max {
            return Err(ProtoError::new(
                ErrorCode::UnsupportedVersion,
                format!("the acceptor chose version {}", self.version),
            ));
        }
        if self.session_id != hello.session_id {
            return Err(malformed("the WELCOME names another session"));
        }
        if !hello.resume && self.resumed {
            return Err(malformed("a new session can't be RESUMED"));
        }
        check_limits(self.max_frame, self.window)?;
        check_offset(
            "the acceptor's recv_offset",
            self.recv_offset,
            up_acked,
            up_sent,
        )
    }
}

/// `claimed` must be within `acked..=sent` of the stream it names: a peer
/// can't have consumed bytes that were never sent, and bytes it already
/// acknowledged are gone.
pub fn check_offset(what: &str, claimed: u64, acked: u64, sent: u64) -> Result<(), ProtoError> {
    if claimed < acked || claimed > sent {
        return Err(ProtoError::new(
            ErrorCode::ImpossibleOffset,
            format!("{what} {claimed} is outside {acked}..={sent}"),
        ));
    }
    Ok(())
}

/// Encodes a frame that is not a handshake message into `out`. DATA is
/// copied; the hot path writes [`data_header`] and the payload `Bytes` with
/// a vectored write instead.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Hello(_) | Frame::Welcome(_) => {
            panic!("HELLO and WELCOME are encoded with their key")
        }
        Frame::Refuse { code, reason } | Frame::Abort { code, reason } => {
            let t = if matches!(frame, Frame::Refuse { .. }) {
                ty::REFUSE
            } else {
                ty::ABORT
            };
            let reason = truncate_utf8(reason, MAX_CONTROL - 2);
            out.put_u8(t);
            out.put_u32((2 + reason.len()) as u32);
            out.put_u16(code.to_u16());
            out.put_slice(reason.as_bytes());
        }
        Frame::Data(b) => {
            out.put_slice(&data_header(b.len()));
            out.put_slice(b);
        }
        Frame::Ack(o) => {
            out.put_u8(ty::ACK);
            out.put_u32(8);
            out.put_u64(*o);
        }
        Frame::Fin(o) => {
            out.put_u8(ty::FIN);
            out.put_u32(8);
            out.put_u64(*o);
        }
        Frame::Ping => {
            out.put_u8(ty::PING);
            out.put_u32(0);
        }
    }
}

/// The header of a DATA frame of `len` bytes.
pub fn data_header(len: usize) -> [u8; HEADER_LEN] {
    let l = (len as u32).to_be_bytes();
    [ty::DATA, l[0], l[1], l[2], l[3]]
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Incremental frame decoder. Feed it the bytes read into a `BytesMut`;
/// `decode` returns `Ok(None)` until a whole frame is there.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// Largest DATA payload accepted (what this side announced).
    max_data: u32,
}

impl Decoder {
    pub fn new(max_data: u32) -> Decoder {
        Decoder { max_data }
    }

    pub fn set_max_data(&mut self, max_data: u32) {
        self.max_data = max_data;
    }

    /// How many more bytes complete the frame at the front of `buf` and
    /// bring the next frame's header (before a whole header is there, as
    /// for the largest DATA frame). A read of at most this many ends on a
    /// frame boundary, so a buffer reserved for it never has to copy a
    /// partial frame to grow. A length over the limits counts as the limit
    /// (`decode` rejects it).
    pub fn wanted(&self, buf: &[u8]) -> usize {
        let max = (self.max_data as usize).max(MAX_CONTROL);
        let frame = if buf.len() < HEADER_LEN {
            max
        } else {
            (u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize).min(max)
        };
        (HEADER_LEN + frame + HEADER_LEN)
            .saturating_sub(buf.len())
            .max(HEADER_LEN)
    }

    /// Decodes one frame from the front of `buf`, or `Ok(None)` when more
    /// bytes are needed. DATA payloads are split off `buf` without copying.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let t = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        let limit = match t {
            ty::DATA => self.max_data,
            ty::HELLO | ty::WELCOME | ty::REFUSE | ty::ABORT => MAX_CONTROL as u32,
            ty::ACK | ty::FIN => 8,
            ty::PING => 0,
            other => return Err(malformed(format!("unknown frame type {other:#04x}"))),
        };
        if len > limit {
            let code = if t == ty::DATA || len > MAX_CONTROL as u32 {
                ErrorCode::FrameTooLarge
            } else {
                ErrorCode::Malformed
            };
            return Err(ProtoError::new(
                code,
                format!("frame type {t:#04x} of {len} bytes exceeds its limit of {limit}"),
            ));
        }
        let total = HEADER_LEN + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(len as usize);
        let frame = match t {
            ty::DATA => {
                if len == 0 {
                    return Err(malformed("empty DATA frame"));
                }
                Frame::Data(payload.freeze())
            }
            ty::ACK | ty::FIN => {
                if len != 8 {
                    return Err(malformed(format!("ACK/FIN payload of {len} bytes, want 8")));
                }
                let v = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
                if t == ty::ACK {
                    Frame::Ack(v)
                } else {
                    Frame::Fin(v)
                }
            }
            ty::PING => Frame::Ping,
            ty::HELLO => Frame::Hello(Hello::decode(&payload)?),
            ty::WELCOME => Frame::Welcome(Welcome::decode(&payload)?),
            _ => {
                if len < 2 {
                    return Err(malformed("REFUSE/ABORT without a code"));
                }
                let code = ErrorCode::from_u16(u16::from_be_bytes([payload[0], payload[1]]));
                let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                if t == ty::REFUSE {
                    Frame::Refuse { code, reason }
                } else {
                    Frame::Abort { code, reason }
                }
            }
        };
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests;
