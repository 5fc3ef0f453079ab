//! ICMP errors about translated flows, conntrack's "related" packets. A backend that has no
//! socket for a datagram, or a router that cannot forward a packet of a flow to a backend,
//! answers with an ICMP error quoting the packet as it was sent on: to the backend's address and
//! port. The client's stack matches the quote against its own sockets, which know the service
//! address, so the error must be translated back like a reply: the quoted packet's destination
//! becomes the service address and port again, and so does the error's own source when the
//! backend sent it. Without this a connected UDP socket never learns that a backend refused it,
//! and path MTU discovery fails on translated TCP flows.
//!
//! Handled on the way into a pod (`rpx_to_pod`: flows translated on the pod path) and out of an
//! external device (`rpx_ext_egress`: north-south flows to this node's backends). Errors with
//! IPv4 options, outer or quoted, and errors about source-translated (north-south SNAT) flows
//! pass untouched.
use aya_ebpf::programs::TcContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use rproxy_common::{CT_DIR_REPLY, CT_NAT_EXTERNAL, CT_NAT_SNAT, CtKey4, Stat, proto};

use crate::{
    csum,
    maps::{CT4, count},
    parse::{ETH_P_IP_BE, IP_CSUM_OFF, IP_SADDR_OFF, ptr_at},
};

/// ICMP types that quote the packet they are about: destination unreachable, time exceeded,
/// parameter problem.
const QUOTING_TYPES: [u8; 3] = [3, 11, 12];
/// Offset of the ICMP header (an outer IPv4 header without options).
const ICMP_OFF: usize = EthHdr::LEN + Ipv4Hdr::LEN;
const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
/// Offset of the quoted IPv4 header, and of what is rewritten: that header (without options)
/// and the first 8 bytes of its payload, as 7 words.
const QUOTE_OFF: usize = ICMP_OFF + 8;
const QUOTE_WORDS: usize = (Ipv4Hdr::LEN + 8) / 4;
/// IPv4 fragment field, host order: "more fragments" and the offset mask.
const IP_MF: u16 = 0x2000;
const IP_OFFMASK: u16 = 0x1fff;

/// Translates an ICMP error about a flow this node translated back for its client (see the
/// module doc): `external` for the north-south hook (entries with `CT_NAT_EXTERNAL`), else the
/// pod path's. Anything else is left untouched; `Err` only when a helper failed after the
/// packet was changed (the caller drops it).
#[inline(always)]
pub fn rev_nat(ctx: &TcContext, external: bool) -> Result<(), i64> {
    // Anything shorter than an error with its quote (ARP, say) is not one: left alone.
    let Some(quote) = ptr_at::<_, [u32; QUOTE_WORDS]>(ctx, QUOTE_OFF) else {
        return Ok(());
    };
    let (Some(eth), Some(outer), Some(icmp)) =
        (ptr_at::<_, EthHdr>(ctx, 0), ptr_at::<_, Ipv4Hdr>(ctx, EthHdr::LEN), ptr_at::<_, [u8; 8]>(ctx, ICMP_OFF))
    else {
        return Ok(());
    };
    // SAFETY: all bounds-checked above; copied out, read unaligned (no alignment guarantee).
    let (ether_type, outer, icmp, old) =
        unsafe { ((*eth).ether_type, outer.read_unaligned(), icmp.read_unaligned(), quote.read_unaligned()) };
    if ether_type != ETH_P_IP_BE
        || outer.version() != 4
        || usize::from(outer.ihl()) != Ipv4Hdr::LEN
        || outer.proto != proto::ICMP
        || u16::from_be_bytes(outer.frags) & (IP_OFFMASK | IP_MF) != 0
        || !QUOTING_TYPES.contains(&icmp[0])
    {
        return Ok(());
    }
    // The quoted packet: a TCP or UDP packet (or its first fragment) without options.
    let [vihl, _, _, _] = old[0].to_ne_bytes();
    let [_, _, f0, f1] = old[1].to_ne_bytes();
    let [ttl, inner_proto, _, _] = old[2].to_ne_bytes();
    if vihl != 0x45 || u16::from_be_bytes([f0, f1]) & IP_OFFMASK != 0 {
        return Ok(());
    }
    if inner_proto != proto::TCP && inner_proto != proto::UDP {
        return Ok(());
    }
    let (client, backend) = (old[3], old[4]);
    let [s0, s1, d0, d1] = old[5].to_ne_bytes();
    let (cport, bport) = (u16::from_ne_bytes([s0, s1]), u16::from_ne_bytes([d0, d1]));
    // The reply entry of the flow: as a packet from the backend to the client.
    let key = CtKey4 {
        saddr: backend,
        daddr: client,
        sport: bport,
        dport: cport,
        proto: inner_proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    let Some(v) = (unsafe { CT4.get(key) }).copied() else {
        return Ok(());
    };
    let want = if external { CT_NAT_EXTERNAL } else { 0 };
    if v.nat_flags & (CT_NAT_EXTERNAL | CT_NAT_SNAT) != want {
        return Ok(());
    }
    // The reply entry's pair is the frontend the client addressed.
    let (vip, vport) = (v.pair_addr, v.pair_port);

    // The quote with the destination back to the frontend, its checksums updated.
    let addr = csum::diff(&mut [backend], &mut [vip])?;
    let [v0, v1] = vport.to_ne_bytes();
    let ports = u32::from_ne_bytes([s0, s1, v0, v1]);
    let port = csum::diff(&mut [old[5]], &mut [ports])?;
    let [_, _, c0, c1] = old[2].to_ne_bytes();
    let ip_csum = csum::apply(u16::from_ne_bytes([c0, c1]), addr, 0).to_ne_bytes();
    let mut new = old;
    new[2] = u32::from_ne_bytes([ttl, inner_proto, ip_csum[0], ip_csum[1]]);
    new[4] = vip;
    new[5] = ports;
    if inner_proto == proto::UDP {
        // The UDP checksum is in the quote (bytes 6..8): pseudo header and port changed. Zero
        // ("none") stays zero, a computed zero is written as 0xffff.
        let [l0, l1, u0, u1] = old[6].to_ne_bytes();
        let udp = u16::from_ne_bytes([u0, u1]);
        if udp != 0 {
            let mut sum = csum::apply(udp, addr, port);
            if sum == 0 {
                sum = 0xffff;
            }
            let u = sum.to_ne_bytes();
            new[6] = u32::from_ne_bytes([l0, l1, u[0], u[1]]);
        }
    }
    // The ICMP checksum covers the quote: one difference for all of it.
    let mut old_words = old;
    let quote_diff = csum::diff(&mut old_words, &mut new)?;
    ctx.l4_csum_replace(ICMP_CSUM_OFF, 0, u64::from(quote_diff), 0)?;
    // The backend's own error comes from the frontend; a router's keeps its address.
    let outer_src = u32::from_ne_bytes(outer.src_addr);
    let new_src = if outer_src == backend { vip } else { outer_src };
    if new_src != outer_src {
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(outer_src), u64::from(new_src), 4)?;
    }
    let quote: *mut [u32; QUOTE_WORDS] = ptr_at(ctx, QUOTE_OFF).ok_or(-1i64)?;
    let src: *mut u32 = ptr_at(ctx, IP_SADDR_OFF).ok_or(-1i64)?;
    // SAFETY: bounds-checked after the helpers, which may move skb data.
    unsafe {
        quote.write_unaligned(new);
        src.write_unaligned(new_src);
    }
    count(Stat::IcmpRelated);
    Ok(())
}
