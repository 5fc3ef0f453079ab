//! ICMPv6 errors (RFC 4443), IPv6's twin of `icmp`: time exceeded and packet too big for
//! north-south packets this node cannot forward, port unreachable for new flows to a frontend
//! without backends. The packet is rewritten in place into the error and sent back out of the
//! device it came in on; the same per-CPU budget as IPv4's applies (`icmp::allowed`).
//!
//! The reply is 110 bytes: Ethernet (the addresses swapped), IPv6 (from the address the packet
//! was sent to, hop limit 64), ICMPv6 (type, code, checksum, and the MTU for packet too big),
//! then the quote: the packet's first 48 bytes from its IPv6 header on (the header and 8 bytes
//! after it), as they arrived, so the sender's stack finds the socket they belong to. RFC 4443
//! allows up to the minimum MTU; the kernel needs no more to match a socket. The checksum covers
//! the pseudo header (addresses, length, next header 58), summed as the quote is copied.
use network_types::{eth::EthHdr, ip::Ipv6Hdr};
use rproxy_common::{Stat, proto};

use crate::{
    csum,
    ctx::{Ctx, load_words, ptr_at},
    family::V6,
    icmp::allowed,
    maps::count,
    parse::{ETH_P_IPV6_BE, Packet},
};

const ETH_LEN: usize = EthHdr::LEN;
const IP_LEN: usize = Ipv6Hdr::LEN;
/// Offset of the ICMPv6 header in the reply.
const ICMP_OFF: usize = ETH_LEN + IP_LEN;
/// The quoted bytes: the IPv6 header and 8 bytes.
const QUOTE_LEN: usize = IP_LEN + 8;
/// Where the quote goes in the reply.
const QUOTE_OFF: usize = ICMP_OFF + 8;
/// ICMPv6 header and quote.
const ICMP_LEN: usize = 8 + QUOTE_LEN;
const REPLY_LEN: usize = ETH_LEN + IP_LEN + ICMP_LEN;
const HOP_LIMIT: u8 = 64;

/// Turns `pkt` into the ICMPv6 error `typ`/`code` (`info`: the MTU of packet too big, else 0)
/// to its sender. `false` when it is not sent: the rate limit, or a helper failure (the caller
/// drops the packet).
#[inline(always)]
pub fn reply<C: Ctx>(ctx: &C, pkt: &Packet<V6>, typ: u8, code: u8, info: u32, now: u64) -> bool {
    allowed(now) && build(ctx, pkt, typ, code, info).is_ok()
}

#[inline(always)]
fn build<C: Ctx>(ctx: &C, pkt: &Packet<V6>, typ: u8, code: u8, info: u32) -> Result<(), i64> {
    let eth: *mut [u32; 3] = ptr_at(ctx, 0).ok_or(-1i64)?;
    // SAFETY: bounds-checked; copied out before the packet is resized. The destination and the
    // source address as six 16-bit halves, in memory order.
    let [w0, w1, w2] = unsafe { load_words::<3>(eth.cast()) };
    let half = |w: u32, high: bool| -> u16 {
        let [a, b, c, d] = w.to_ne_bytes();
        if high { u16::from_ne_bytes([c, d]) } else { u16::from_ne_bytes([a, b]) }
    };
    let macs = [half(w0, false), half(w0, true), half(w1, false), half(w1, true), half(w2, false), half(w2, true)];
    let (src, dst) = (pkt.daddr, pkt.saddr);
    // A TCP or UDP packet has at least the quote after its Ethernet header. The resize keeps the
    // first bytes, and the quote moves from right after the Ethernet header to after the new
    // IPv6 and ICMPv6 headers: the two places do not overlap, so it is read once as words,
    // summed, and written.
    #[expect(clippy::cast_possible_truncation, reason = "110")]
    ctx.set_len(REPLY_LEN as u32)?;
    let from: *mut [u32; QUOTE_LEN / 4] = ptr_at(ctx, ETH_LEN).ok_or(-1i64)?;
    let to: *mut [u32; QUOTE_LEN / 4] = ptr_at(ctx, QUOTE_OFF).ok_or(-1i64)?;
    #[expect(clippy::cast_possible_truncation, reason = "56")]
    let len = ICMP_LEN as u32;
    // The pseudo header (RFC 8200 8.1) and the message, its checksum zero: 32-bit words in
    // memory order, summed as `bpf_csum_diff` sums them.
    let mut sum = u64::from(len.to_be()) + u64::from(u32::from(proto::ICMPV6).to_be());
    for i in 0..4 {
        sum += u64::from(src[i]) + u64::from(dst[i]);
    }
    sum += u64::from(u32::from_ne_bytes([typ, code, 0, 0])) + u64::from(info.to_be());
    // SAFETY: bounds-checked after the resize.
    let quote: [u32; QUOTE_LEN / 4] = unsafe { load_words(from.cast()) };
    for w in quote {
        sum += u64::from(w);
    }
    for (i, w) in quote.into_iter().enumerate() {
        // SAFETY: as above; a place apart from `from`; unaligned.
        unsafe { to.cast::<u32>().add(i).write_unaligned(w) };
    }
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 32 bits above")]
    let c = csum::fold_complement(sum as u32).to_ne_bytes();

    #[expect(clippy::cast_possible_truncation, reason = "56")]
    let l = (ICMP_LEN as u16).to_be_bytes();
    let out_eth: *mut [u16; 7] = ptr_at(ctx, 0).ok_or(-1i64)?;
    let out_ip: *mut [u32; 2] = ptr_at(ctx, ETH_LEN).ok_or(-1i64)?;
    let out_addrs: *mut [[u32; 4]; 2] = ptr_at(ctx, ETH_LEN + 8).ok_or(-1i64)?;
    let out_icmp: *mut [u32; 2] = ptr_at(ctx, ICMP_OFF).ok_or(-1i64)?;
    // SAFETY: bounds-checked after the resize, which invalidated earlier packet pointers;
    // unaligned as the Ethernet header leaves no alignment guarantee. Back to the sender: its
    // MAC becomes the destination.
    unsafe {
        out_eth.write_unaligned([macs[3], macs[4], macs[5], macs[0], macs[1], macs[2], ETH_P_IPV6_BE]);
        out_ip.write_unaligned([
            u32::from_ne_bytes([0x60, 0, 0, 0]),
            u32::from_ne_bytes([l[0], l[1], proto::ICMPV6, HOP_LIMIT]),
        ]);
        out_addrs.write_unaligned([src, dst]);
        out_icmp.write_unaligned([u32::from_ne_bytes([typ, code, c[0], c[1]]), info.to_be()]);
    }
    count(Stat::IcmpSent);
    Ok(())
}
