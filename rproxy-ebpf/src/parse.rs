//! Header parsing. Every access is bounds-checked against `data_end`; the IPv4 header length
//! comes from IHL, so options are honoured. Anything not understood yields `None` and the
//! caller passes the packet untouched.
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use rproxy_common::proto;

use crate::ctx::Ctx;

/// Deepest header bytes the programs look at: Ethernet + IPv4 with full options + TCP.
#[expect(clippy::cast_possible_truncation, reason = "14 + 60 + 20")]
pub const MAX_HDR: u32 = (EthHdr::LEN + 60 + TcpHdr::LEN) as u32;
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// IPv4 `frags` field: "more fragments" flag and offset mask (host order).
pub const IP_MF: u16 = 0x2000;
const IP_DF: u16 = 0x4000;
pub const IP_OFFMASK: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offsets of the IPv4 header fields the NAT rewrites.
pub const IP_TTL_OFF: usize = EthHdr::LEN + 8;
pub const IP_CSUM_OFF: usize = EthHdr::LEN + 10;
pub const IP_SADDR_OFF: usize = EthHdr::LEN + 12;
pub const IP_DADDR_OFF: usize = EthHdr::LEN + 16;

/// An IPv4 TCP or UDP packet: the tuple in wire byte order and where its L4 header starts.
#[derive(Clone, Copy)]
pub struct Packet4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// IPv4 fragment (first or later): not translated.
    pub fragment: bool,
    /// IPv4 time to live.
    pub ttl: u8,
    /// IPv4 "don't fragment" flag.
    pub df: bool,
    /// IPv4 total length (host order).
    pub tot_len: u16,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
}

impl Packet4 {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == proto::TCP { self.l4_off + 16 } else { self.l4_off + 6 }
    }
    #[inline(always)]
    pub fn sport_off(&self) -> usize {
        self.l4_off
    }
    #[inline(always)]
    pub fn dport_off(&self) -> usize {
        self.l4_off + 2
    }
}

/// Pointer to a `T` at `off` bytes into the packet, or `None` if it would cross `data_end`.
#[inline(always)]
pub fn ptr_at<C: Ctx, T>(ctx: &C, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Parses Ethernet + IPv4 + TCP/UDP. `None` for anything else (ARP, IPv6, ICMP, truncated
/// frames, bad IHL): the caller passes such packets untouched.
#[inline(always)]
pub fn parse_ipv4<C: Ctx>(ctx: &C) -> Option<Packet4> {
    ctx.make_headers_linear();
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return None;
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let fragment = frags & (IP_MF | IP_OFFMASK) != 0;
    let saddr = u32::from_ne_bytes(ip.src_addr);
    let daddr = u32::from_ne_bytes(ip.dst_addr);
    let proto = ip.proto;
    let l4_off = EthHdr::LEN + ihl;
    let ttl = ip.ttl;
    let df = frags & IP_DF != 0;
    let tot_len = u16::from_be_bytes(ip.tot_len);
    let mut pkt = Packet4 { saddr, daddr, sport: 0, dport: 0, proto, tcp_flags: 0, fragment, ttl, df, tot_len, l4_off };
    if fragment {
        // Later fragments carry no L4 header; report the packet so the caller can count it.
        return Some(pkt);
    }
    match proto {
        proto::TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, l4_off)?;
            // SAFETY: bounds-checked by ptr_at; the flags byte (offset 13) lies inside the
            // checked 20-byte header. It is read through the same pointer on purpose: a second
            // ptr_at would be folded away by LLVM as redundant, and the verifier does not relate
            // a recomputed pointer to the one it checked.
            let (src, dst, tcp_flags) = unsafe { ((*tcp).source, (*tcp).dest, *tcp.cast::<u8>().add(13)) };
            pkt.sport = u16::from_ne_bytes(src);
            pkt.dport = u16::from_ne_bytes(dst);
            pkt.tcp_flags = tcp_flags;
        }
        proto::UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, l4_off)?;
            // SAFETY: bounds-checked by ptr_at.
            let udp = unsafe { &*udp };
            pkt.sport = u16::from_ne_bytes(udp.src);
            pkt.dport = u16::from_ne_bytes(udp.dst);
        }
        _ => return None,
    }
    Some(pkt)
}
