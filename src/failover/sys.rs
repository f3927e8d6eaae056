//! The raw system calls of host failover, and nothing else: TCP_REPAIR and
//! its companions (`linux/tcp.h`), `IP_TRANSPARENT`, `TCP_INFO` as bytes,
//! an `AF_PACKET` send, and the interface look-ups. Every function is a thin,
//! typed wrapper over one call; the order of the calls, and what the values
//! mean, belong to [`super::repair`] and [`super::announce`].
//!
//! This is the only file of `failover` that may use `unsafe`. Each block has
//! a `SAFETY` note; no pointer outlives the call it is passed to.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

// `linux/tcp.h`, level SOL_TCP (6).
const TCP_MAXSEG: libc::c_int = 2;
const TCP_INFO: libc::c_int = 11;
const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_REPAIR_OPTIONS: libc::c_int = 22;
const TCP_TIMESTAMP: libc::c_int = 24;
const TCP_REPAIR_WINDOW: libc::c_int = 29;
// `linux/in.h`, level SOL_IP (0).
const IP_TRANSPARENT: libc::c_int = 19;
// `linux/in6.h`, level SOL_IPV6 (41).
const IPV6_TRANSPARENT: libc::c_int = 75;

/// Bytes of `struct tcp_info` this module asks for (6.18 fills 280).
pub const TCP_INFO_LEN: usize = 280;

/// `TCP_REPAIR` values (0, leaving with a window probe, is not used: the
/// probe's answer could acknowledge bytes not yet queued again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Enter repair mode (1).
    On,
    /// Leave it without a window probe (-1, `TCP_REPAIR_OFF_NO_WP`).
    OffNoWindowProbe,
}

/// `TCP_REPAIR_QUEUE` values: which queue `TCP_QUEUE_SEQ` addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    None = 0,
    Recv = 1,
    Send = 2,
}

/// `struct tcp_repair_window`: the only size 6.18 accepts is these 20 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairOpt {
    pub code: u32,
    pub val: u32,
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `setsockopt` with a value of any plain type.
fn set<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    val: &T,
) -> io::Result<()> {
    // SAFETY: `val` points to a live `T` of exactly the length passed; the
    // kernel only reads it during the call.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
}

/// `setsockopt` with a slice of values (TCP_REPAIR_OPTIONS).
fn set_slice<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    vals: &[T],
) -> io::Result<()> {
    // SAFETY: the slice is valid for `size_of_val(vals)` bytes during the call.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            vals.as_ptr().cast(),
            std::mem::size_of_val(vals) as libc::socklen_t,
        )
    })
}

/// `getsockopt` into a plain value; fails unless the kernel wrote all of it.
fn get<T: Copy + Default>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
) -> io::Result<T> {
    let mut val = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` is a writable `T` of `len` bytes; the kernel writes at
    // most `len` bytes and stores the length it wrote.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&mut val as *mut T).cast(),
            &mut len,
        )
    })?;
    if len as usize != std::mem::size_of::<T>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("getsockopt({level}, {opt}) wrote {len} bytes"),
        ));
    }
    Ok(val)
}

pub fn set_repair(fd: BorrowedFd<'_>, mode: Repair) -> io::Result<()> {
    let v: libc::c_int = match mode {
        Repair::On => 1,
        Repair::OffNoWindowProbe => -1,
    };
    set(fd, libc::SOL_TCP, TCP_REPAIR, &v)
}

pub fn set_repair_queue(fd: BorrowedFd<'_>, q: Queue) -> io::Result<()> {
    set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &(q as libc::c_int))
}

/// The selected queue's sequence number: `write_seq` for the send queue,
/// `rcv_nxt` for the receive queue. Repair mode only.
pub fn queue_seq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get::<u32>(fd, libc::SOL_TCP, TCP_QUEUE_SEQ)
}

/// Sets the selected queue's sequence number (repair mode, before connect).
pub fn set_queue_seq(fd: BorrowedFd<'_>, seq: u32) -> io::Result<()> {
    set(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, &seq)
}

/// `TCP_MAXSEG`: in repair mode the kernel returns `mss_clamp`.
pub fn maxseg(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get::<u32>(fd, libc::SOL_TCP, TCP_MAXSEG)
}

pub fn set_maxseg(fd: BorrowedFd<'_>, mss: u32) -> io::Result<()> {
    set(fd, libc::SOL_TCP, TCP_MAXSEG, &mss)
}

pub fn repair_window(fd: BorrowedFd<'_>) -> io::Result<RepairWindow> {
    get::<RepairWindow>(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW)
}

pub fn set_repair_window(fd: BorrowedFd<'_>, w: &RepairWindow) -> io::Result<()> {
    set(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW, w)
}

pub fn set_repair_options(fd: BorrowedFd<'_>, opts: &[RepairOpt]) -> io::Result<()> {
    set_slice(fd, libc::SOL_TCP, TCP_REPAIR_OPTIONS, opts)
}

/// `TCP_TIMESTAMP`: readable outside repair mode, settable only in it.
pub fn timestamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get::<u32>(fd, libc::SOL_TCP, TCP_TIMESTAMP)
}

pub fn set_timestamp(fd: BorrowedFd<'_>, ts: u32) -> io::Result<()> {
    set(fd, libc::SOL_TCP, TCP_TIMESTAMP, &ts)
}

pub fn set_ip_transparent(fd: BorrowedFd<'_>) -> io::Result<()> {
    set(fd, libc::SOL_IP, IP_TRANSPARENT, &(1 as libc::c_int))
}

pub fn set_ipv6_transparent(fd: BorrowedFd<'_>) -> io::Result<()> {
    set(fd, libc::SOL_IPV6, IPV6_TRANSPARENT, &(1 as libc::c_int))
}

pub fn set_reuseaddr(fd: BorrowedFd<'_>) -> io::Result<()> {
    set(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        &(1 as libc::c_int),
    )
}

/// `struct tcp_info` as the kernel's bytes, and how many it wrote.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<([u8; TCP_INFO_LEN], usize)> {
    let mut buf = [0u8; TCP_INFO_LEN];
    let mut len = TCP_INFO_LEN as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes; the kernel writes at most
    // `len` and stores how many it wrote.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    Ok((buf, len as usize))
}

/// A raw `AF_PACKET` socket with protocol 0: it can send whole Ethernet
/// frames and receives nothing. Opening and closing one waits for an RCU
/// grace period (15–33 ms measured), so the standby opens it in advance.
pub fn packet_socket() -> io::Result<OwnedFd> {
    socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
}

fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one whole Ethernet frame out of interface `ifindex`.
pub fn packet_send(fd: BorrowedFd<'_>, ifindex: u32, dst: [u8; 6], frame: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    sa.sll_ifindex = ifindex as libc::c_int;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&dst);
    // SAFETY: `frame` and `sa` are valid for the lengths passed during the call.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != frame.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short packet send",
        ));
    }
    Ok(())
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn if_index(sock: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFINDEX reads the name and writes `ifru_ifindex` of the
    // ifreq, which is valid and writable for the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) })?;
    // SAFETY: the kernel filled the ifindex member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex } as u32)
}

/// The hardware (MAC) address of interface `name`.
pub fn if_hwaddr(sock: BorrowedFd<'_>, name: &str) -> io::Result<[u8; 6]> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFHWADDR reads the name and writes `ifru_hwaddr`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) })?;
    // SAFETY: the kernel filled the hwaddr member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}
