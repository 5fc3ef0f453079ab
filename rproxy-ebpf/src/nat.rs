//! The one packet rewrite: a new tuple (addresses and ports, any of them), with the checksums
//! updated incrementally (`csum`): on an skb through the kernel's helpers, which keep
//! `CHECKSUM_PARTIAL` packets right (veth hands those to TC), on an XDP frame in place. UDP keeps
//! a zero checksum ("none") zero.
//!
//! A failure after the checksums changed leaves the packet inconsistent; the caller drops it
//! (and counts `RewriteFail`) rather than pass it on.
use crate::{
    csum,
    ctx::{Ctx, ptr_at, store_u32},
    family::Family,
    parse::Packet,
};

/// A packet's tuple, wire byte order.
pub struct Tuple<F: Family> {
    pub saddr: F::Addr,
    pub daddr: F::Addr,
    pub sport: u16,
    pub dport: u16,
}

impl<F: Family> Clone for Tuple<F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F: Family> Copy for Tuple<F> {}

impl<F: Family> Tuple<F> {
    #[inline(always)]
    pub fn of(pkt: &Packet<F>) -> Self {
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

/// Rewrites the packet's tuple to `new`, on TC or XDP, with the checksums updated (see the
/// module doc). The checksum updates go first: on an skb they may move its data, which
/// invalidates packet pointers; the new values are then stored with direct packet access.
#[inline(always)]
pub fn rewrite_tuple<C: Ctx, F: Family>(ctx: &C, pkt: &Packet<F>, new: &Tuple<F>) -> Result<(), i64> {
    let addrs = F::addr_diff([pkt.saddr, pkt.daddr], [new.saddr, new.daddr]);
    let ports = csum::diff(&[ports_word(pkt.sport, pkt.dport)], &[ports_word(new.sport, new.dport)]);
    csum::update(ctx, pkt, addrs, ports)?;
    F::write_addrs(ctx, new.saddr, new.daddr)?;
    let l4: *mut u32 = ptr_at(ctx, pkt.l4_off).ok_or(-1i64)?;
    // SAFETY: bounds-checked after the last helper call (which may move skb data); unaligned
    // because IP options and the Ethernet header leave no alignment guarantee.
    unsafe { store_u32(l4.cast(), ports_word(new.sport, new.dport)) };
    Ok(())
}
