//! Claiming the service address on the standby: adding it to an interface
//! (rtnetlink `RTM_NEWADDR`) and announcing it with gratuitous ARP, so that
//! the neighbours' caches move to this host's MAC address at once.
//!
//! Both sockets are opened in advance by [`Announcer::open`]: opening and
//! closing an `AF_PACKET` socket waits for an RCU grace period (15–33 ms
//! measured), which must not fall inside a takeover. Announcing is the last
//! step of a takeover: every client socket is restored before, or the
//! standby's kernel would answer the clients' segments with resets.
//!
//! IPv4 only (IPv6 would announce with an unsolicited neighbour
//! advertisement). Owns the frame and message layouts; the `unsafe` calls
//! are in [`super::sys`]. Needs CAP_NET_ADMIN (and CAP_NET_RAW for the
//! packet socket).

use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};

use socket2::{Domain, Protocol, Socket, Type};

use super::sys;

const BROADCAST: [u8; 6] = [0xff; 6];
/// Ethernet header (14) + ARP for IPv4 over Ethernet (28).
pub const GARP_LEN: usize = 42;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

// rtnetlink (`linux/netlink.h`, `linux/rtnetlink.h`, `linux/if_addr.h`).
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWADDR: u16 = 20;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

/// A gratuitous ARP frame: `oper` 1 (request) or 2 (reply), both with the
/// sender and target protocol address set to `ip`. Some hosts update their
/// cache on one, some on the other; the standby sends both.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr, oper: u16) -> [u8; GARP_LEN] {
    let mut f = [0u8; GARP_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&oper.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    let target_mac = if oper == ARP_REPLY { BROADCAST } else { [0; 6] };
    f[32..38].copy_from_slice(&target_mac);
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// An `RTM_NEWADDR` request adding `ip/prefix` to interface `ifindex`.
pub fn newaddr_message(seq: u32, ifindex: u32, ip: Ipv4Addr, prefix: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    m.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
                                              // struct ifaddrmsg: family, prefix length, flags, scope (universe), index.
    m.extend_from_slice(&[libc::AF_INET as u8, prefix, 0, 0]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    for ty in [IFA_LOCAL, IFA_ADDRESS] {
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&ip.octets());
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m
}

/// The kernel's answer to request `seq`: `Ok` for an ack, the errno else.
pub fn parse_ack(buf: &[u8], seq: u32) -> io::Result<()> {
    if buf.len() < NLMSG_HDRLEN + 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink answer",
        ));
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    let got_seq = u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
    if ty != NLMSG_ERROR || got_seq != seq {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected netlink answer type {ty} seq {got_seq}"),
        ));
    }
    let errno = i32::from_ne_bytes(buf[16..20].try_into().expect("4 bytes"));
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-errno))
    }
}

/// The interface the standby claims the service address on, with both
/// sockets open and its index and MAC address looked up.
pub struct Announcer {
    packet: OwnedFd,
    netlink: Socket,
    ifindex: u32,
    mac: [u8; 6],
    seq: u32,
}

impl Announcer {
    /// Opens the sockets and looks `ifname` up in the calling thread's
    /// network namespace.
    pub fn open(ifname: &str) -> io::Result<Announcer> {
        let packet = sys::packet_socket()?;
        let ifindex = sys::if_index(packet.as_fd(), ifname)?;
        let mac = sys::if_hwaddr(packet.as_fd(), ifname)?;
        let netlink = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(libc::NETLINK_ROUTE)),
        )?;
        Ok(Announcer {
            packet,
            netlink,
            ifindex,
            mac,
            seq: 0,
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Adds `ip/prefix` to the interface; an address already there is fine.
    pub fn add_address(&mut self, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let msg = newaddr_message(self.seq, self.ifindex, ip, prefix);
        (&self.netlink).write_all(&msg)?;
        let mut buf = [0u8; 1024];
        let n = (&self.netlink).read(&mut buf)?;
        match parse_ack(&buf[..n], self.seq) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Sends a gratuitous ARP request and reply for `ip`.
    pub fn announce(&self, ip: Ipv4Addr) -> io::Result<()> {
        for oper in [ARP_REQUEST, ARP_REPLY] {
            let frame = garp_frame(self.mac, ip, oper);
            sys::packet_send(self.packet.as_fd(), self.ifindex, BROADCAST, &frame)?;
        }
        Ok(())
    }

    /// [`Announcer::add_address`], then [`Announcer::announce`].
    pub fn claim(&mut self, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        self.add_address(ip, prefix)?;
        self.announce(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_request_and_reply_layout() {
        let mac = [2, 0, 0, 0, 0, 9];
        let ip = Ipv4Addr::new(10, 77, 0, 100);
        let req = garp_frame(mac, ip, ARP_REQUEST);
        let want_req: [u8; GARP_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 9, 0x08, 0x06, // ethernet
            0, 1, 0x08, 0, 6, 4, 0, 1, // htype, ptype, hlen, plen, request
            2, 0, 0, 0, 0, 9, 10, 77, 0, 100, // sender
            0, 0, 0, 0, 0, 0, 10, 77, 0, 100, // target
        ];
        assert_eq!(req, want_req);
        let rep = garp_frame(mac, ip, ARP_REPLY);
        assert_eq!(&rep[20..22], &[0, 2]);
        assert_eq!(&rep[32..38], &BROADCAST);
        assert_eq!(&rep[38..42], &[10, 77, 0, 100]);
    }

    #[test]
    fn newaddr_message_layout_and_acks() {
        let m = newaddr_message(7, 3, Ipv4Addr::new(10, 0, 0, 1), 24);
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWADDR);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 24, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 3);
        assert_eq!(&m[28..32], &[10, 0, 0, 1]);
        assert_eq!(&m[36..40], &[10, 0, 0, 1]);

        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[8..12].copy_from_slice(&7u32.to_ne_bytes());
        assert!(parse_ack(&ack, 7).is_ok());
        assert!(parse_ack(&ack, 8).is_err());
        ack[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(
            parse_ack(&ack, 7).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        assert!(parse_ack(&ack[..10], 7).is_err());
    }
}
