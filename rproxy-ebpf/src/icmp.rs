//! ICMP errors (`rproxy_common::icmp`): for north-south packets this node cannot forward, and
//! port unreachable for new flows to a frontend without backends (`reject`, kube-proxy's
//! `REJECT`). The packet is rewritten in place into the error and sent back out of the device
//! it came in on.
//!
//! The reply is 70 bytes: Ethernet (the addresses swapped), IPv4 (from the address the packet
//! was sent to, TTL 64, precedence "internetwork control" like the kernel's errors), ICMP
//! (type, code, and the next-hop MTU for fragmentation needed), then the quote: the packet's
//! IPv4 header and the first 8 bytes of its payload, as they arrived (before any translation),
//! so the sender's stack finds the socket they belong to. Both checksums are computed over the
//! new bytes with `bpf_csum_diff`. A TC packet's checksum state is left as it came: complete
//! from a wire, or, from a pod, partial with its start in the old L4 header. The latter is
//! harmless: the error goes straight back into the pod through its veth, which computes no
//! checksum on the way, and the receiving stack takes a partial checksum as verified (the one
//! written here is right anyway).
use aya_ebpf::helpers::bpf_csum_diff;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use rproxy_common::{Stat, icmp, proto};

use crate::{
    csum,
    ctx::{Ctx, ptr_at},
    family::V4,
    maps::{ICMP_LIMIT, count},
    parse::{ETH_P_IP_BE, Packet},
};

const ETH_LEN: usize = EthHdr::LEN;
/// An IPv4 header without options: the reply's, and the only kind quoted.
const IP_LEN: usize = Ipv4Hdr::LEN;
/// Offset of an ICMP header after an IPv4 header without options.
pub const ICMP_OFF: usize = ETH_LEN + IP_LEN;
/// The quoted header and payload bytes: an IPv4 header without options and 8 bytes.
pub const QUOTE_LEN: usize = IP_LEN + 8;
/// ICMP header and quote.
const ICMP_LEN: usize = 8 + QUOTE_LEN;
const REPLY_LEN: usize = ETH_LEN + IP_LEN + ICMP_LEN;
/// `IPTOS_PREC_INTERNETCONTROL`, the kernel's TOS for ICMP errors.
const TOS: u8 = 0xc0;
const TTL: u8 = 64;

/// Turns `pkt` into the ICMP error `typ`/`code` (`mtu`: the next-hop MTU of fragmentation
/// needed, else 0) to its sender. `false` when it is not sent: a header with options, the rate
/// limit, or a helper failure (the caller drops the packet).
#[inline(always)]
pub fn reply<C: Ctx>(ctx: &C, pkt: &Packet<V4>, typ: u8, code: u8, mtu: u16, now: u64) -> bool {
    if pkt.l4_off != ICMP_OFF || !allowed(now) {
        return false;
    }
    build(ctx, pkt, typ, code, mtu).is_ok()
}

/// One more ICMP error from this CPU within its budget (see `rproxy_common::icmp`; one budget
/// for both families).
#[inline(always)]
pub fn allowed(now: u64) -> bool {
    let Some(next) = ICMP_LIMIT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, only this CPU uses it while this program runs.
    let next = unsafe { &mut *next };
    let earliest = now.saturating_sub(icmp::BURST * icmp::INTERVAL_NS);
    let at = if *next < earliest { earliest } else { *next };
    if at > now {
        return false;
    }
    *next = at + icmp::INTERVAL_NS;
    true
}

#[inline(always)]
fn build<C: Ctx>(ctx: &C, pkt: &Packet<V4>, typ: u8, code: u8, mtu: u16) -> Result<(), i64> {
    // Word arrays built from their elements: zero-filled arrays filled in afterwards, or byte
    // arrays filled with `copy_from_slice`, make LLVM call the `memset`/`memcpy` subprograms,
    // whose calls the verifier rejects in this program.
    let eth: *mut [u16; 6] = ptr_at(ctx, 0).ok_or(-1i64)?;
    let quoted: *mut [u32; QUOTE_LEN / 4] = ptr_at(ctx, ETH_LEN).ok_or(-1i64)?;
    // SAFETY: both bounds-checked; copied out before the packet is resized and rewritten.
    let (macs, quote) = unsafe { (eth.read_unaligned(), quoted.read_unaligned()) };

    // ICMP header and quote, checksummed as one (words in memory order).
    let m = mtu.to_be_bytes();
    let (head, rest) = (u32::from_ne_bytes([typ, code, 0, 0]), u32::from_ne_bytes([0, 0, m[0], m[1]]));
    let q = quote;
    let mut msg = [head, rest, q[0], q[1], q[2], q[3], q[4], q[5], q[6]];
    let c = checksum(&mut msg)?.to_ne_bytes();
    msg[0] = u32::from_ne_bytes([typ, code, c[0], c[1]]);

    #[expect(clippy::cast_possible_truncation, reason = "56")]
    let l = ((IP_LEN + ICMP_LEN) as u16).to_be_bytes();
    let (first, third) = (u32::from_ne_bytes([0x45, TOS, l[0], l[1]]), u32::from_ne_bytes([TTL, proto::ICMP, 0, 0]));
    let mut ip = [first, 0, third, pkt.daddr, pkt.saddr];
    let c = checksum(&mut ip)?.to_ne_bytes();
    ip[2] = u32::from_ne_bytes([TTL, proto::ICMP, c[0], c[1]]);

    #[expect(clippy::cast_possible_truncation, reason = "70")]
    ctx.set_len(REPLY_LEN as u32)?;
    let out_eth: *mut [u16; 7] = ptr_at(ctx, 0).ok_or(-1i64)?;
    let out_ip: *mut [u32; IP_LEN / 4] = ptr_at(ctx, ETH_LEN).ok_or(-1i64)?;
    let out_msg: *mut [u32; ICMP_LEN / 4] = ptr_at(ctx, ICMP_OFF).ok_or(-1i64)?;
    // Back to the sender: its MAC becomes the destination.
    let eth = [macs[3], macs[4], macs[5], macs[0], macs[1], macs[2], ETH_P_IP_BE];
    // SAFETY: bounds-checked after the resize, which invalidated earlier packet pointers;
    // unaligned as the Ethernet header leaves no alignment guarantee.
    unsafe {
        out_eth.write_unaligned(eth);
        out_ip.write_unaligned(ip);
        out_msg.write_unaligned(msg);
    }
    count(Stat::IcmpSent);
    Ok(())
}

/// The Internet checksum of `words` (its checksum field zero), as stored in memory.
#[inline(always)]
fn checksum<const N: usize>(words: &mut [u32; N]) -> Result<u16, i64> {
    #[expect(clippy::cast_possible_truncation, reason = "N is 5 or 9")]
    let size = (N * 4) as u32;
    // SAFETY: `words` lives on this program's stack, initialised, `size` bytes.
    let d = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words.as_mut_ptr(), size, 0) };
    if d < 0 {
        return Err(d);
    }
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a 32-bit wsum on success")]
    Ok(csum::fold_complement(d as u32))
}
