//! Header parsing. Every access is bounds-checked against `data_end`; the IPv4 header length
//! comes from IHL, so options are honoured, and IPv6 extension headers are walked (at most
//! [`IPV6_EXT_MAX`] of them). Anything not understood yields `None` and the caller passes the
//! packet untouched.
use core::mem::offset_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use rproxy_common::{In6, proto};

use crate::{
    ctx::{Ctx, load_u16, load_u16_at, load_u32_at, load_words_at, ptr_at},
    family::{Family, V4, V6},
};

pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// Offsets of the IPv6 header fields the datapath rewrites.
pub const IP6_HOP_LIMIT_OFF: usize = EthHdr::LEN + 7;
pub const IP6_SADDR_OFF: usize = EthHdr::LEN + 8;
/// IPv6 extension headers walked before the upper-layer header; a packet with more, or with
/// one not walked (AH, ESP, unknown), passes untouched.
pub const IPV6_EXT_MAX: usize = 4;
/// IPv6 extension headers (next-header values).
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
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

/// A TCP or UDP packet of family `F`: the tuple in wire byte order and where its L4 header
/// starts.
pub struct Packet<F: Family> {
    pub saddr: F::Addr,
    pub daddr: F::Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// A fragment (first or later): not translated.
    pub fragment: bool,
    /// Time to live (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// IPv4 "don't fragment" flag (always set for IPv6, whose routers never fragment).
    pub df: bool,
    /// The IP packet's length, headers included (host order).
    pub ip_len: u16,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
}

impl<F: Family> Clone for Packet<F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F: Family> Copy for Packet<F> {}

impl<F: Family> Packet<F> {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == proto::TCP { self.l4_off + 16 } else { self.l4_off + 6 }
    }
}

/// Reads the TCP or UDP ports (and TCP flags) at `pkt.l4_off`; `None` for other protocols or a
/// truncated header.
#[inline(always)]
fn read_l4<C: Ctx, F: Family>(ctx: &C, pkt: &mut Packet<F>) -> Option<()> {
    match pkt.proto {
        proto::TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, pkt.l4_off)?;
            // SAFETY: bounds-checked by ptr_at; the flags byte (offset 13) lies inside the
            // checked 20-byte header. It is read through the same pointer on purpose: a second
            // ptr_at would be folded away by LLVM as redundant, and the verifier does not relate
            // a recomputed pointer to the one it checked.
            let p = tcp.cast::<u8>();
            // SAFETY: as above.
            let (src, dst, tcp_flags) = unsafe { (load_u16(p), load_u16_at::<2>(p), *p.add(13)) };
            pkt.sport = src;
            pkt.dport = dst;
            pkt.tcp_flags = tcp_flags;
        }
        proto::UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, pkt.l4_off)?;
            let p = udp.cast::<u8>();
            // SAFETY: bounds-checked by ptr_at.
            (pkt.sport, pkt.dport) = unsafe { (load_u16(p), load_u16_at::<2>(p)) };
        }
        _ => return None,
    }
    Some(())
}

/// The frame's `EtherType` (wire order), if it has an Ethernet header.
#[inline(always)]
pub fn ether_type<C: Ctx>(ctx: &C) -> Option<u16> {
    ctx.make_headers_linear();
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    Some(unsafe { (*eth).ether_type })
}

/// Parses IPv4 + TCP/UDP after the Ethernet header (whose `EtherType` the caller checked).
/// `None` for anything else (ICMP, truncated frames, bad IHL): the caller passes such packets
/// untouched.
#[inline(always)]
pub fn parse_ipv4<C: Ctx>(ctx: &C) -> Option<Packet<V4>> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let mut pkt = Packet {
        // SAFETY: inside the header bounds-checked above.
        saddr: unsafe { load_u32_at::<{ offset_of!(Ipv4Hdr, src_addr) }>((&raw const *ip).cast()) },
        // SAFETY: as above.
        daddr: unsafe { load_u32_at::<{ offset_of!(Ipv4Hdr, dst_addr) }>((&raw const *ip).cast()) },
        sport: 0,
        dport: 0,
        proto: ip.proto,
        tcp_flags: 0,
        fragment: frags & (IP_MF | IP_OFFMASK) != 0,
        ttl: ip.ttl,
        df: frags & IP_DF != 0,
        ip_len: u16::from_be_bytes(ip.tot_len),
        l4_off: EthHdr::LEN + ihl,
    };
    if pkt.fragment {
        // Later fragments carry no L4 header; report the packet so the caller can count it.
        return Some(pkt);
    }
    read_l4(ctx, &mut pkt)?;
    Some(pkt)
}

/// Parses IPv6 + TCP/UDP after the Ethernet header, walking hop-by-hop, routing, destination
/// options and fragment headers. A fragment (first or later) is reported with `fragment` set
/// and is not translated, as for IPv4. `None` for anything else (ICMPv6, including neighbour
/// discovery and MLD, which the datapath never touches; AH, ESP; truncated headers).
#[inline(always)]
pub fn parse_ipv6<C: Ctx>(ctx: &C) -> Option<Packet<V6>> {
    parse_ipv6_fields::<C, true>(ctx)
}

/// [`parse_ipv6`] but for the source address, left zero: for a caller that may decide from the
/// rest, and reads the source ([`ipv6_source`]) only once it needs it. Four loads, and the four
/// stack slots that keep the words across the decision's map lookups, are a quarter of what the
/// commonest packet of all costs, a pod's packet that no Service concerns.
#[inline(always)]
pub fn parse_ipv6_but_source<C: Ctx>(ctx: &C) -> Option<Packet<V6>> {
    parse_ipv6_fields::<C, false>(ctx)
}

/// The source address of the frame's IPv6 header (see [`parse_ipv6_but_source`]).
#[inline(always)]
pub fn ipv6_source<C: Ctx>(ctx: &C) -> Option<In6> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    Some(unsafe { load_words_at::<{ offset_of!(Ipv6Hdr, src_addr) }, 4>(ip.cast_const().cast()) })
}

#[inline(always)]
fn parse_ipv6_fields<C: Ctx, const SOURCE: bool>(ctx: &C) -> Option<Packet<V6>> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.version() != 6 {
        return None;
    }
    let mut next = ip.next_hdr;
    let mut off = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut fragment = false;
    // TCP or UDP right after the fixed header (nearly every packet) skips the walk's tests.
    if next != proto::TCP && next != proto::UDP {
        for _ in 0..IPV6_EXT_MAX {
            match next {
                IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                    let ext: *mut [u8; 2] = ptr_at(ctx, off)?;
                    // SAFETY: bounds-checked by ptr_at.
                    let [nh, len] = unsafe { *ext };
                    next = nh;
                    off += (usize::from(len) + 1) * 8;
                }
                IPV6_FRAGMENT => {
                    let ext: *mut [u8; 2] = ptr_at(ctx, off)?;
                    // SAFETY: bounds-checked by ptr_at.
                    next = unsafe { (*ext)[0] };
                    fragment = true;
                    off += 8;
                }
                _ => break,
            }
        }
    }
    let mut pkt = Packet {
        // SAFETY: inside the header bounds-checked above.
        saddr: if SOURCE {
            unsafe { load_words_at::<{ offset_of!(Ipv6Hdr, src_addr) }, 4>((&raw const *ip).cast()) }
        } else {
            [0; 4]
        },
        // SAFETY: as above.
        daddr: unsafe { load_words_at::<{ offset_of!(Ipv6Hdr, dst_addr) }, 4>((&raw const *ip).cast()) },
        sport: 0,
        dport: 0,
        proto: next,
        tcp_flags: 0,
        fragment,
        ttl: ip.hop_limit,
        df: true,
        ip_len: u16::from_be_bytes(ip.payload_len).saturating_add(40),
        l4_off: off,
    };
    if fragment {
        return Some(pkt);
    }
    read_l4(ctx, &mut pkt)?;
    Some(pkt)
}
