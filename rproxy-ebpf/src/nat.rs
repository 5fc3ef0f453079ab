//! Packet rewriting with the kernel's incremental checksum helpers.
//!
//! Address changes update the IPv4 header checksum (`bpf_l3_csum_replace`) and the L4 checksum
//! with `BPF_F_PSEUDO_HDR` (the pseudo header covers the addresses). For `CHECKSUM_PARTIAL` skbs,
//! which veth hands to TC, the kernel helper then adjusts only the pseudo-header seed kept in the
//! checksum field, and a port change (not in the pseudo header) leaves it alone, so the final
//! checksum computed on transmit is right. UDP uses `BPF_F_MARK_MANGLED_0`: a zero checksum
//! ("none") stays zero, and a computed zero is written as 0xffff.
//!
//! A failure after the checksum helpers ran leaves the packet inconsistent; the caller drops it
//! (and counts `RewriteFail`) rather than pass it on.
use aya_ebpf::programs::TcContext;
use rproxy_common::proto;

use crate::{
    csum,
    ctx::Ctx,
    parse::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Packet4, ptr_at},
};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

#[inline(always)]
fn l4_flags(pkt: &Packet4, size: u64) -> u64 {
    if pkt.proto == proto::UDP { size | BPF_F_MARK_MANGLED_0 } else { size }
}

/// Replaces one address (at `addr_off`) and one port (at `port_off`), fixing both checksums.
///
/// The checksum helpers go first: they may make the skb writable and so move its data, which
/// invalidates packet pointers. The new values are then stored with direct packet access (the
/// verifier makes the skb writable in the program prologue), which is cheaper than
/// `bpf_skb_store_bytes`.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one call site per direction, all fields are needed")]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet4,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let csum_off = pkt.l4_csum_off();
    if old_addr != new_addr {
        ctx.l4_csum_replace(csum_off, u64::from(old_addr), u64::from(new_addr), l4_flags(pkt, 4) | BPF_F_PSEUDO_HDR)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(new_addr), 4)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(new_port), l4_flags(pkt, 2))?;
    }
    let addr: *mut u32 = ptr_at(ctx, addr_off).ok_or(-1i64)?;
    let port: *mut u16 = ptr_at(ctx, port_off).ok_or(-1i64)?;
    // SAFETY: both bounds-checked against data_end after the last helper call; unaligned
    // because IPv4 options and the Ethernet header leave no alignment guarantee.
    unsafe {
        addr.write_unaligned(new_addr);
        port.write_unaligned(new_port);
    }
    Ok(())
}

/// DNAT: destination address and port become the backend's (both in wire order).
#[inline(always)]
pub fn dnat(ctx: &TcContext, pkt: &Packet4, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(ctx, pkt, IP_DADDR_OFF, pkt.daddr, addr, pkt.dport_off(), pkt.dport, port)
}

/// Reverse NAT: source address and port become the service's (both in wire order).
#[inline(always)]
pub fn snat(ctx: &TcContext, pkt: &Packet4, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(ctx, pkt, IP_SADDR_OFF, pkt.saddr, addr, pkt.sport_off(), pkt.sport, port)
}

/// A packet's IPv4 tuple, wire byte order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tuple4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl Tuple4 {
    #[inline(always)]
    pub fn of(pkt: &Packet4) -> Self {
        Self { saddr: pkt.saddr, daddr: pkt.daddr, sport: pkt.sport, dport: pkt.dport }
    }
}

/// The source and destination ports as the one 32-bit word they form at the start of the TCP or
/// UDP header (memory order).
#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    let s = sport.to_ne_bytes();
    let d = dport.to_ne_bytes();
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// Rewrites the whole tuple (any of the four fields may change), on TC or XDP, with the
/// checksums updated incrementally (see `csum`).
#[inline(always)]
pub fn rewrite_tuple<C: Ctx>(ctx: &C, pkt: &Packet4, new: &Tuple4) -> Result<(), i64> {
    let addrs = csum::diff(&[pkt.saddr, pkt.daddr], &[new.saddr, new.daddr]);
    let ports = csum::diff(&[ports_word(pkt.sport, pkt.dport)], &[ports_word(new.sport, new.dport)]);
    csum::update(ctx, pkt, addrs, ports)?;
    let ip: *mut [u32; 2] = ptr_at(ctx, IP_SADDR_OFF).ok_or(-1i64)?;
    let l4: *mut u32 = ptr_at(ctx, pkt.l4_off).ok_or(-1i64)?;
    // SAFETY: bounds-checked after the last helper call (which may move skb data); unaligned
    // because IP options and the Ethernet header leave no alignment guarantee.
    unsafe {
        ip.write_unaligned([new.saddr, new.daddr]);
        l4.write_unaligned(ports_word(new.sport, new.dport));
    }
    Ok(())
}
