//! Incremental checksum updates for a rewrite of the whole tuple (addresses and ports).
//!
//! The difference of the old and new words is computed once (`rproxy_common::csum::diff`, RFC
//! 1624 arithmetic), separately for the addresses (which the L4 pseudo header covers) and the
//! ports. On an skb (TC) the kernel's `bpf_l3_csum_replace` / `bpf_l4_csum_replace` apply the
//! differences in their "diff" mode, so `CHECKSUM_PARTIAL` skbs are handled by the kernel (only
//! the pseudo-header part is folded into their seed). On an XDP frame there are no skb checksum
//! states: the checksums in the frame are complete, and the differences are folded into them
//! here. UDP keeps a zero checksum ("none") zero and writes a computed zero as 0xffff, like
//! `BPF_F_MARK_MANGLED_0`.
//!
//! The differences were `bpf_csum_diff` calls until the two of a tuple rewrite measured a sixth
//! of a forwarded packet's program time (`perf`, two-node benchmark); the arithmetic is a few
//! instructions, tested on the host against checksums computed from scratch. Checksums over
//! packet data (`icmp`) still come from `bpf_csum_diff`.
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_l3_csum_replace, bpf_l4_csum_replace},
};
pub use rproxy_common::csum::{add, apply, diff, fold_complement};
use rproxy_common::proto;

use crate::{
    ctx::{Ctx, load_u16, ptr_at, store_u16},
    family::Family,
    parse::{IP_CSUM_OFF, Packet},
};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Updates the L4 checksum (and IPv4's header checksum) for an address difference `addrs` and
/// a port difference `ports` (see `diff`).
#[inline(always)]
pub fn update<C: Ctx, F: Family>(ctx: &C, pkt: &Packet<F>, addrs: u32, ports: u32) -> Result<(), i64> {
    let l4_off = pkt.l4_csum_off();
    #[expect(clippy::cast_possible_truncation, reason = "header offsets are below 100")]
    let l4_off32 = l4_off as u32;
    let udp = pkt.proto == proto::UDP;
    if C::SKB {
        let skb: *mut __sk_buff = ctx.as_ptr().cast();
        let mangled = if udp { BPF_F_MARK_MANGLED_0 } else { 0 };
        // Size 0 in the flags: `to` is a precomputed difference.
        // SAFETY: skb is this program's context; offsets are inside the headers parsed above
        // (the helpers check them against the skb anyway).
        unsafe {
            let r = bpf_l4_csum_replace(skb, l4_off32, 0, u64::from(addrs), BPF_F_PSEUDO_HDR | mangled);
            if r < 0 {
                return Err(r);
            }
            if ports != 0 {
                let r = bpf_l4_csum_replace(skb, l4_off32, 0, u64::from(ports), mangled);
                if r < 0 {
                    return Err(r);
                }
            }
        }
    } else {
        let l4: *mut u16 = ptr_at(ctx, l4_off).ok_or(-1i64)?;
        let l4 = l4.cast::<u8>();
        // SAFETY: bounds-checked; unaligned because IP options leave no alignment guarantee.
        unsafe {
            let old = load_u16(l4);
            if !(udp && old == 0) {
                let new = apply(old, addrs, ports);
                store_u16(l4, if udp && new == 0 { 0xffff } else { new });
            }
        }
    }
    F::fold_ip_csum(ctx, addrs)
}

/// Folds a difference `diff` (see `diff`) into the checksum at `off`: the IPv4 header's (`l3`),
/// or one without a pseudo header (ICMP). TC: the kernel helpers in their "diff" mode; XDP: in
/// the frame.
#[inline(always)]
pub fn fold_diff<C: Ctx>(ctx: &C, off: usize, diff: u32, l3: bool) -> Result<(), i64> {
    if C::SKB {
        let skb: *mut __sk_buff = ctx.as_ptr().cast();
        #[expect(clippy::cast_possible_truncation, reason = "header offsets are below 100")]
        let off = off as u32;
        // SAFETY: skb is this program's context; the helpers check the offset against the skb.
        let r = unsafe {
            if l3 {
                bpf_l3_csum_replace(skb, off, 0, u64::from(diff), 0)
            } else {
                bpf_l4_csum_replace(skb, off, 0, u64::from(diff), 0)
            }
        };
        return if r < 0 { Err(r) } else { Ok(()) };
    }
    let field: *mut u16 = ptr_at(ctx, off).ok_or(-1i64)?;
    let field = field.cast::<u8>();
    // SAFETY: bounds-checked; unaligned for the same reason as in `update`.
    unsafe { store_u16(field, apply(load_u16(field), diff, 0)) };
    Ok(())
}

/// Updates the IPv4 header checksum for a change of one 16-bit header word from `old` to `new`
/// (both as they are in memory); the caller writes the word.
#[inline(always)]
pub fn update_ip_word<C: Ctx>(ctx: &C, old: u16, new: u16) -> Result<(), i64> {
    // The word's difference: its old value's complement plus its new value.
    fold_diff(ctx, IP_CSUM_OFF, u32::from(!old) + u32::from(new), true)
}
