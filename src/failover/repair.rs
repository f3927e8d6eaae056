//! A client TCP connection's kernel state: read once on the active, right
//! after accept, and rebuilt from it on the standby with TCP_REPAIR.
//!
//! The active calls [`capture`] before the session reads or writes a byte.
//! That is the only moment the socket is in repair mode (about 10 µs); from
//! then on holdfast counts offsets itself, and the kernel state a standby
//! needs is `KernelState` plus two offsets: the client bytes holdfast `read`
//! and the bytes written to the client that its TCP `acked` (SIOCOUTQ).
//!
//! The standby calls [`restore`] for every session first, while the service
//! address is not yet its own (IP_TRANSPARENT lets it bind and connect), then
//! claims the address ([`super::announce`]), and only then calls
//! [`leave_repair_and_send`] on each socket. The measured sequence and the
//! traps it avoids are in docs/failover.md.
//!
//! This module owns the order of the calls and the meaning of the values;
//! the `unsafe` wrappers are in [`super::sys`]. Sessions, replication and
//! the address belong elsewhere.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use super::sys::{self, Queue, Repair, RepairOpt, RepairWindow};
use crate::transport::sockopt;

/// `tcpi_options` bits (byte 5 of `struct tcp_info`).
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
/// Offsets in `struct tcp_info` (Linux >= 6.8 for the windows).
const TCPI_OPTIONS: usize = 5;
const TCPI_WSCALE: usize = 6;
const TCPI_BYTES_RECEIVED: usize = 128;
const TCPI_RCV_OOOPACK: usize = 224;
const TCPI_SND_WND: usize = 228;
const TCPI_RCV_WND: usize = 232;
/// `TCPOPT_*` codes for TCP_REPAIR_OPTIONS.
const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// Largest window scale the kernel accepts (RFC 7323).
const MAX_WSCALE: u8 = 14;
/// How often [`capture`] re-reads the receive queue when segments keep
/// arriving between its two reads.
const CAPTURE_TRIES: usize = 16;
/// Encoded size of a [`KernelState`].
pub const ENCODED_LEN: usize = 40;

/// What a standby needs, besides offsets, to rebuild one client connection.
/// Read once at accept by [`capture`]; never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelState {
    /// The sequence number of the first byte holdfast writes to the client
    /// (down offset 0): the kernel's `write_seq` at capture.
    pub send_seq: u32,
    /// The sequence number of the first byte holdfast reads from the client
    /// (up offset 0): `rcv_nxt` minus what was queued and unread at capture.
    pub recv_seq: u32,
    /// The MSS both ends agreed on (`mss_clamp`, read in repair mode).
    pub mss_clamp: u32,
    /// TCP options negotiated in the handshake.
    pub options: TcpOptions,
    /// The window state at capture (`TCP_REPAIR_WINDOW`).
    pub window: RepairWindow,
    /// `TCP_TIMESTAMP` at capture: the connection's timestamp clock in ms
    /// (bit 0 is the kernel's usec flag, clear in ms mode).
    pub timestamp: u32,
}

/// The options negotiated in the handshake, from `tcp_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpOptions {
    pub timestamps: bool,
    pub sack: bool,
    /// `(snd_wscale, rcv_wscale)` when window scaling was negotiated.
    pub wscale: Option<(u8, u8)>,
}

/// Where the standby resumes a connection, in holdfast's own offsets, and
/// the latest window and clock the active reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    /// Client bytes holdfast read (up `read`): the restored `rcv_nxt`.
    pub read: u64,
    /// Bytes written to the client that its TCP acknowledged: the restored
    /// `snd_una`. Everything written after it is re-sent by
    /// [`leave_repair_and_send`].
    pub acked: u64,
    /// The client's receive window (`tcpi_snd_wnd`), 0 for the captured one.
    pub snd_wnd: u32,
    /// The window the active advertised (`tcpi_rcv_wnd`), 0 for the captured one.
    pub rcv_wnd: u32,
    /// The timestamp clock to restore; see [`timestamp_after`].
    pub timestamp: u32,
}

/// A repair step failed: which one, and the kernel's answer.
#[derive(Debug, thiserror::Error)]
#[error("tcp repair: {step}: {source}")]
pub struct RepairError {
    pub step: &'static str,
    #[source]
    pub source: io::Error,
}

trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, RepairError>;
}

impl<T> Step<T> for io::Result<T> {
    fn step(self, step: &'static str) -> Result<T, RepairError> {
        self.map_err(|source| RepairError { step, source })
    }
}

/// Reads a freshly accepted connection's kernel state. Call it before the
/// session reads or writes anything: offset 0 in each direction is where the
/// application stands at this moment. The socket is in repair mode only
/// inside this call, and leaves it without a window probe; incoming segments
/// are processed and acknowledged throughout, only the application's own
/// sends would fail meanwhile. Needs CAP_NET_ADMIN.
pub fn capture(fd: BorrowedFd<'_>) -> Result<KernelState, RepairError> {
    sys::set_repair(fd, Repair::On).step("enter repair")?;
    let inside = capture_in_repair(fd);
    let left = sys::set_repair(fd, Repair::OffNoWindowProbe).step("leave repair");
    // Leaving repair resets sk_reuse; a listener restarted on this port
    // would get EADDRINUSE while the connection lives.
    let reuse = sys::set_reuseaddr(fd).step("SO_REUSEADDR after repair");
    let (send_seq, recv_seq, mss_clamp, window) = inside?;
    left?;
    reuse?;
    let (info, len) = sys::tcp_info(fd).step("TCP_INFO")?;
    let options = parse_options(&info, len).step("TCP_INFO options")?;
    let timestamp = sys::timestamp(fd).step("get TCP_TIMESTAMP")?;
    Ok(KernelState {
        send_seq,
        recv_seq,
        mss_clamp,
        options,
        window,
        timestamp,
    })
}

fn capture_in_repair(fd: BorrowedFd<'_>) -> Result<(u32, u32, u32, RepairWindow), RepairError> {
    sys::set_repair_queue(fd, Queue::Send).step("select send queue")?;
    // write_seq: the next byte the application writes.
    let send_seq = sys::queue_seq(fd).step("get send TCP_QUEUE_SEQ")?;
    sys::set_repair_queue(fd, Queue::Recv).step("select receive queue")?;
    // rcv_nxt moves while we look (repair mode still receives): take it
    // between two equal readings of the unread byte count.
    let mut recv_seq = None;
    for _ in 0..CAPTURE_TRIES {
        let before = sockopt::inq(fd).step("SIOCINQ")?;
        let rcv_nxt = sys::queue_seq(fd).step("get receive TCP_QUEUE_SEQ")?;
        let after = sockopt::inq(fd).step("SIOCINQ")?;
        if before == after {
            recv_seq = Some(rcv_nxt.wrapping_sub(before as u32));
            break;
        }
    }
    let recv_seq = recv_seq
        .ok_or_else(|| io::Error::new(io::ErrorKind::Interrupted, "receive queue kept moving"))
        .step("read receive sequence")?;
    sys::set_repair_queue(fd, Queue::None).step("select no queue")?;
    // Inside repair TCP_MAXSEG answers mss_clamp, outside it mss_cache.
    let mss_clamp = sys::maxseg(fd).step("get TCP_MAXSEG")?;
    let window = sys::repair_window(fd).step("get TCP_REPAIR_WINDOW")?;
    Ok((send_seq, recv_seq, mss_clamp, window))
}

fn parse_options(info: &[u8], len: usize) -> io::Result<TcpOptions> {
    if len <= TCPI_WSCALE {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "short tcp_info"));
    }
    let bits = info[TCPI_OPTIONS];
    let ws = info[TCPI_WSCALE];
    Ok(TcpOptions {
        timestamps: bits & TCPI_OPT_TIMESTAMPS != 0,
        sack: bits & TCPI_OPT_SACK != 0,
        wscale: (bits & TCPI_OPT_WSCALE != 0).then_some((ws & 0x0f, ws >> 4)),
    })
}

/// The client's receive window and the window holdfast advertises
/// (`tcpi_snd_wnd`, `tcpi_rcv_wnd`), read with no pause. The active sends
/// them to the standby now and then, for [`Offsets`].
pub fn windows(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let (info, len) = sys::tcp_info(fd)?;
    if len < TCPI_RCV_WND + 4 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel tcp_info has no tcpi_snd_wnd/tcpi_rcv_wnd",
        ));
    }
    let u32_at = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"));
    Ok((u32_at(TCPI_SND_WND), u32_at(TCPI_RCV_WND)))
}

/// In-order bytes the kernel received on this connection
/// (`tcpi_bytes_received`) and segments it queued out of order
/// (`tcpi_rcv_ooopack`), read with no pause: what [`super::gap`] watches
/// after a takeover.
pub fn receive_progress(fd: BorrowedFd<'_>) -> io::Result<(u64, u32)> {
    let (info, len) = sys::tcp_info(fd)?;
    if len < TCPI_RCV_OOOPACK + 4 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel tcp_info has no tcpi_rcv_ooopack",
        ));
    }
    let received = u64::from_ne_bytes(
        info[TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8]
            .try_into()
            .expect("8 bytes"),
    );
    let ooo = u32::from_ne_bytes(
        info[TCPI_RCV_OOOPACK..TCPI_RCV_OOOPACK + 4]
            .try_into()
            .expect("4 bytes"),
    );
    Ok((received, ooo))
}

/// Closes a connection with a reset (SO_LINGER 0): for a session that
/// cannot continue, so that its client learns it now rather than after
/// minutes of retransmissions.
pub fn abort(fd: OwnedFd) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(Duration::ZERO))?;
    drop(fd);
    Ok(())
}

/// The connection's timestamp clock now, read with no pause.
pub fn timestamp_now(fd: BorrowedFd<'_>) -> io::Result<u32> {
    sys::timestamp(fd)
}

/// How many of the `written` bytes the client's TCP acknowledged: `written`
/// minus the send queue (SIOCOUTQ = write_seq − snd_una).
pub fn acked(fd: BorrowedFd<'_>, written: u64) -> io::Result<u64> {
    Ok(written.saturating_sub(sockopt::outq(fd)?))
}

/// A timestamp clock read `elapsed` ago, moved forward to now, plus a 2 ms
/// margin: a TSval that goes backwards fails the client's PAWS check, one a
/// little ahead is harmless. Bit 0 stays clear (ms clock).
pub fn timestamp_after(ts: u32, elapsed: Duration) -> u32 {
    let ms = elapsed.as_nanos().div_ceil(1_000_000) as u32;
    ts.wrapping_add(ms).wrapping_add(2) & !1
}

/// Rebuilds one client connection, in repair mode, bound to `local` (the
/// service address, which need not be this host's yet: IP_TRANSPARENT) and
/// connected to `peer` without a packet. Nothing is sent until
/// [`leave_repair_and_send`]; segments from the client are received and
/// acknowledged meanwhile, so the caller announces the address only after
/// every socket is restored. Needs CAP_NET_ADMIN.
pub fn restore(
    state: &KernelState,
    at: &Offsets,
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<OwnedFd, RepairError> {
    let sock = Socket::new(Domain::for_address(local), Type::STREAM, None).step("socket")?;
    let fd = sock.as_fd();
    let rcv_nxt = state.recv_seq.wrapping_add(at.read as u32);
    let snd_una = state.send_seq.wrapping_add(at.acked as u32);
    sys::set_repair(fd, Repair::On).step("enter repair")?;
    sys::set_repair_queue(fd, Queue::Send).step("select send queue")?;
    sys::set_queue_seq(fd, snd_una).step("set send TCP_QUEUE_SEQ")?;
    sys::set_repair_queue(fd, Queue::Recv).step("select receive queue")?;
    sys::set_queue_seq(fd, rcv_nxt).step("set receive TCP_QUEUE_SEQ")?;
    sys::set_repair_queue(fd, Queue::None).step("select no queue")?;
    match local {
        SocketAddr::V4(_) => sys::set_ip_transparent(fd),
        SocketAddr::V6(_) => sys::set_ipv6_transparent(fd),
    }
    .step("IP_TRANSPARENT")?;
    sock.bind(&SockAddr::from(local)).step("bind")?;
    // Without this, a repair connect leaves mss_cache at 524.
    sys::set_maxseg(fd, state.mss_clamp).step("set TCP_MAXSEG")?;
    sock.connect(&SockAddr::from(peer)).step("repair connect")?;
    sys::set_timestamp(fd, at.timestamp).step("set TCP_TIMESTAMP")?;
    sys::set_repair_options(fd, &repair_options(state)).step("set TCP_REPAIR_OPTIONS")?;
    let snd_wnd = if at.snd_wnd == 0 {
        state.window.snd_wnd
    } else {
        at.snd_wnd
    };
    let rcv_wnd = if at.rcv_wnd == 0 {
        state.window.rcv_wnd
    } else {
        at.rcv_wnd
    };
    let window = RepairWindow {
        snd_wl1: rcv_nxt,
        snd_wnd,
        max_window: state.window.max_window.max(snd_wnd),
        rcv_wnd,
        rcv_wup: rcv_nxt,
    };
    sys::set_repair_window(fd, &window).step("set TCP_REPAIR_WINDOW")?;
    Ok(OwnedFd::from(sock))
}

fn repair_options(state: &KernelState) -> Vec<RepairOpt> {
    let mut opts = vec![RepairOpt {
        code: TCPOPT_MSS,
        val: state.mss_clamp,
    }];
    if let Some((snd, rcv)) = state.options.wscale {
        opts.push(RepairOpt {
            code: TCPOPT_WINDOW,
            val: u32::from(snd) | u32::from(rcv) << 16,
        });
    }
    if state.options.sack {
        opts.push(RepairOpt {
            code: TCPOPT_SACK_PERM,
            val: 0,
        });
    }
    if state.options.timestamps {
        opts.push(RepairOpt {
            code: TCPOPT_TIMESTAMP,
            val: 0,
        });
    }
    opts
}

/// The most bytes a takeover re-sends as new data: 8 segments, which leave
/// at once within the restored socket's initial congestion window of 10
/// (see [`leave_repair_and_send`]).
pub fn fresh_budget(state: &KernelState) -> usize {
    8 * state.mss_clamp as usize
}

/// Takes a restored socket out of repair mode (no window probe) and hands
/// the kernel `unacked`: the bytes written to the client after
/// [`Offsets::acked`], then anything due to it that was never written.
///
/// Up to `fresh` bytes ([`fresh_budget`]) go out as new data, at once: put
/// into the repair send queue they would count as sent and wait for a
/// retransmission timer (1–3 s: a restored socket has no RTT sample) if the
/// failure lost them. More than that go into the repair send queue, as
/// sent. That matters when `acked` is stale (it is sampled): the client may
/// have acknowledged bytes far beyond it, the kernel drops every segment
/// whose ACK is beyond what it has sent ("ack of unsent data"), data
/// included, and new data beyond the initial congestion window waits for
/// ACKs: the two ends would wait on each other for good. Queued as sent,
/// every ACK the client can send is acceptable, and what the failure lost is
/// retransmitted by the kernel (SACK, TLP or RTO).
///
/// Queues or sends what fits without blocking and returns how many bytes of
/// `unacked` that was; the caller writes the rest as usual. Also re-sets
/// SO_REUSEADDR, which leaving repair clears, so that a listener on the
/// service port can be opened afterwards.
pub fn leave_repair_and_send<B: AsRef<[u8]>>(
    fd: BorrowedFd<'_>,
    unacked: &[B],
    fresh: usize,
) -> Result<usize, RepairError> {
    let total: usize = unacked.iter().map(|c| c.as_ref().len()).sum();
    let sock = SockRef::from(&fd);
    let mut done = 0;
    if total > fresh {
        // One buffer, so that the queue holds few, full segments: each
        // queued segment counts against the congestion window.
        let all: Vec<u8> = unacked
            .iter()
            .flat_map(|c| c.as_ref().iter().copied())
            .collect();
        sys::set_repair_queue(fd, Queue::Send).step("select send queue")?;
        done = send_from(&sock, &[all], 0, total).step("queue unacked bytes as sent")?;
        sys::set_repair_queue(fd, Queue::None).step("select no queue")?;
    }
    sys::set_repair(fd, Repair::OffNoWindowProbe).step("leave repair")?;
    sys::set_reuseaddr(fd).step("SO_REUSEADDR after repair")?;
    if total <= fresh {
        done = send_from(&sock, unacked, 0, total).step("send unacked bytes")?;
    }
    Ok(done)
}

/// Sends up to `limit` bytes of `chunks`, starting `skip` bytes in, without
/// blocking; returns how many went.
fn send_from<B: AsRef<[u8]>>(
    sock: &SockRef<'_>,
    chunks: &[B],
    mut skip: usize,
    limit: usize,
) -> io::Result<usize> {
    let mut sent = 0;
    for chunk in chunks {
        let mut chunk = chunk.as_ref();
        if skip >= chunk.len() {
            skip -= chunk.len();
            continue;
        }
        chunk = &chunk[skip..];
        skip = 0;
        while !chunk.is_empty() && sent < limit {
            let part = &chunk[..chunk.len().min(limit - sent)];
            match sock.send_with_flags(part, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
                Ok(n) => {
                    sent += n;
                    chunk = &chunk[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(sent),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if sent == limit {
            break;
        }
    }
    Ok(sent)
}

impl KernelState {
    /// Fixed little-endian layout, [`ENCODED_LEN`] bytes, for replication.
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut out = [0u8; ENCODED_LEN];
        let (snd_ws, rcv_ws) = self.options.wscale.unwrap_or((0, 0));
        let mut flags = 0;
        if self.options.timestamps {
            flags |= TCPI_OPT_TIMESTAMPS;
        }
        if self.options.sack {
            flags |= TCPI_OPT_SACK;
        }
        if self.options.wscale.is_some() {
            flags |= TCPI_OPT_WSCALE;
        }
        let words = [
            self.send_seq,
            self.recv_seq,
            self.mss_clamp,
            u32::from_le_bytes([flags, snd_ws, rcv_ws, 0]),
            self.window.snd_wl1,
            self.window.snd_wnd,
            self.window.max_window,
            self.window.rcv_wnd,
            self.window.rcv_wup,
            self.timestamp,
        ];
        for (slot, w) in out.chunks_exact_mut(4).zip(words) {
            slot.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// The inverse of [`KernelState::encode`]; `None` for values a kernel
    /// would refuse (unknown option bits, a window scale above 14).
    pub fn decode(buf: &[u8; ENCODED_LEN]) -> Option<KernelState> {
        let w = |i: usize| u32::from_le_bytes(buf[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let [flags, snd_ws, rcv_ws, pad] = w(3).to_le_bytes();
        let known = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE;
        if flags & !known != 0 || pad != 0 || snd_ws > MAX_WSCALE || rcv_ws > MAX_WSCALE {
            return None;
        }
        let wscale = flags & TCPI_OPT_WSCALE != 0;
        if !wscale && (snd_ws, rcv_ws) != (0, 0) {
            return None;
        }
        Some(KernelState {
            send_seq: w(0),
            recv_seq: w(1),
            mss_clamp: w(2),
            options: TcpOptions {
                timestamps: flags & TCPI_OPT_TIMESTAMPS != 0,
                sack: flags & TCPI_OPT_SACK != 0,
                wscale: wscale.then_some((snd_ws, rcv_ws)),
            },
            window: RepairWindow {
                snd_wl1: w(4),
                snd_wnd: w(5),
                max_window: w(6),
                rcv_wnd: w(7),
                rcv_wup: w(8),
            },
            timestamp: w(9),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KernelState {
        KernelState {
            send_seq: 0xfedc_ba98,
            recv_seq: 7,
            mss_clamp: 1460,
            options: TcpOptions {
                timestamps: true,
                sack: true,
                wscale: Some((7, 14)),
            },
            window: RepairWindow {
                snd_wl1: 1,
                snd_wnd: 2,
                max_window: 3,
                rcv_wnd: 4,
                rcv_wup: 5,
            },
            timestamp: 0x1234_5678,
        }
    }

    #[test]
    fn encode_round_trips() {
        let s = sample();
        assert_eq!(KernelState::decode(&s.encode()), Some(s));
        let plain = KernelState {
            options: TcpOptions::default(),
            ..s
        };
        assert_eq!(KernelState::decode(&plain.encode()), Some(plain));
    }

    #[test]
    fn decode_refuses_what_a_kernel_would() {
        let mut b = sample().encode();
        b[12] |= 0x10; // unknown option bit
        assert_eq!(KernelState::decode(&b), None);
        let mut b = sample().encode();
        b[14] = 15; // rcv_wscale above 14
        assert_eq!(KernelState::decode(&b), None);
        let mut b = sample().encode();
        b[12] &= !TCPI_OPT_WSCALE; // scale values without the option
        assert_eq!(KernelState::decode(&b), None);
    }

    #[test]
    fn options_follow_tcp_info() {
        let mut info = [0u8; 8];
        info[TCPI_OPTIONS] = TCPI_OPT_SACK | TCPI_OPT_WSCALE;
        info[TCPI_WSCALE] = 0x97; // rcv 9, snd 7
        let o = parse_options(&info, 8).unwrap();
        assert_eq!(
            o,
            TcpOptions {
                timestamps: false,
                sack: true,
                wscale: Some((7, 9)),
            }
        );
        let opts = repair_options(&KernelState {
            options: o,
            ..sample()
        });
        assert_eq!(
            opts,
            vec![
                RepairOpt {
                    code: TCPOPT_MSS,
                    val: 1460
                },
                RepairOpt {
                    code: TCPOPT_WINDOW,
                    val: 7 | 9 << 16
                },
                RepairOpt {
                    code: TCPOPT_SACK_PERM,
                    val: 0
                },
            ]
        );
        assert!(parse_options(&info, 6).is_err());
    }

    #[test]
    fn timestamps_move_forward_with_margin_and_stay_even() {
        assert_eq!(timestamp_after(1000, Duration::ZERO), 1002);
        assert_eq!(timestamp_after(1000, Duration::from_micros(1)), 1002);
        assert_eq!(timestamp_after(1000, Duration::from_millis(5)), 1006);
        assert_eq!(timestamp_after(u32::MAX - 1, Duration::from_millis(3)), 2);
    }
}
