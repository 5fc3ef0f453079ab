//! Forwarding from the hook: the kernel's FIB lookup (`bpf_fib_lookup`) gives the egress device,
//! the MAC addresses and, on request, the source address the node would use towards a
//! destination (`BPF_FIB_LOOKUP_SRC`, the address north-south SNAT translates to). At XDP the
//! packets of established flows use a recent result from the route cache (`cached`,
//! `rproxy_common::route`).
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC,
        bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup,
};
use network_types::eth::EthHdr;
use rproxy_common::{RouteKey4, RouteValue, route};

use crate::{
    conntrack::BPF_ANY,
    csum,
    ctx::Ctx,
    maps::ROUTE4,
    parse::{IP_TTL_OFF, ptr_at},
};

const AF_INET: u8 = 2;

/// Where a packet to some address leaves.
pub enum Route {
    /// Egress device and the Ethernet addresses to write; the route's MTU (XDP only: an skb's
    /// lookup does not report it).
    Ready { ifindex: u32, smac: [u8; 6], dmac: [u8; 6], src: u32, mtu: u16 },
    /// Routed through `ifindex`, but the next hop's MAC is not known yet: TC hands the packet to
    /// `bpf_redirect_neigh`, XDP passes it up untouched (TC then handles it).
    NoNeigh { ifindex: u32, src: u32 },
    /// The packet is bigger than the route's MTU (`mtu`).
    TooBig { mtu: u16 },
    /// No route, forwarding disabled, …
    Unusable,
}

/// Looks up the route from `saddr` (0 with `want_src`: the node picks one and reports it in
/// `src`) to `daddr` for a packet of protocol `proto` and IPv4 total length `tot_len` that
/// arrived on this context's device, checking the length against the route's MTU.
#[inline(always)]
pub fn lookup<C: Ctx>(ctx: &C, proto: u8, tot_len: u16, saddr: u32, daddr: u32, want_src: bool) -> Route {
    let mut slot = core::mem::MaybeUninit::<bpf_fib_lookup>::uninit();
    let p = slot.as_mut_ptr();
    // Zeroed with volatile word stores, and used in place: LLVM otherwise turns the zeroing (or
    // a copy) into a call of the `memset` subprogram, which the verifier rejects in this
    // program (the caller reads a register the call clobbered).
    let words = p.cast::<u32>();
    for i in 0..core::mem::size_of::<bpf_fib_lookup>() / 4 {
        // SAFETY: `i` < 16 words of the 64-byte, 4-aligned struct on this stack frame.
        unsafe { words.add(i).write_volatile(0) };
    }
    let flags = if want_src { BPF_FIB_LOOKUP_SRC } else { 0 };
    #[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "64-byte struct")]
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: `p` points to the zeroed struct on this stack frame (all-zero is a valid
    // bpf_fib_lookup: integers and unions of them); the context pointer is this program's.
    unsafe {
        (*p).family = AF_INET;
        (*p).l4_protocol = proto;
        (*p).ifindex = ctx.ingress_ifindex();
        (*p).__bindgen_anon_3.ipv4_src = saddr;
        (*p).__bindgen_anon_4.ipv4_dst = daddr;
        (*p).__bindgen_anon_1.tot_len = ctx.mtu_len(tot_len);
        let r = fib_lookup(ctx.as_ptr(), p, size, flags);
        // The helper fills the source address union as IPv4 for family AF_INET, and the MTU
        // into the length union on FRAG_NEEDED and, at XDP (which always checks it), on success.
        let src = (*p).__bindgen_anon_3.ipv4_src;
        match u32::try_from(r).unwrap_or(u32::MAX) {
            BPF_FIB_LKUP_RET_SUCCESS => Route::Ready {
                ifindex: (*p).ifindex,
                smac: (*p).smac,
                dmac: (*p).dmac,
                src,
                mtu: (*p).__bindgen_anon_1.mtu_result,
            },
            BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeigh { ifindex: (*p).ifindex, src },
            BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig { mtu: (*p).__bindgen_anon_1.mtu_result },
            _ => Route::Unusable,
        }
    }
}

/// `lookup` from `saddr` (not 0) to `daddr`, at XDP through the route cache: a result at most
/// `route::VALID_NS` old at `now` for the same ingress device, addresses and protocol is used
/// as it is (its MTU checked against `tot_len`); otherwise the FIB is asked, and a complete
/// result is remembered. See `rproxy_common::route`.
#[inline(always)]
pub fn cached<C: Ctx>(ctx: &C, proto: u8, tot_len: u16, saddr: u32, daddr: u32, now: u64) -> Route {
    if C::SKB {
        return lookup(ctx, proto, tot_len, saddr, daddr, false);
    }
    let key = RouteKey4 { ifindex: ctx.ingress_ifindex(), saddr, daddr, proto, _pad: [0; 3] };
    // SAFETY: copied out at once (an update replaces the element rather than writing into it).
    if let Some(v) = unsafe { ROUTE4.get(key) }.copied()
        && now.wrapping_sub(v.checked_ns) < route::VALID_NS
    {
        if tot_len > v.mtu {
            return Route::TooBig { mtu: v.mtu };
        }
        return Route::Ready { ifindex: v.ifindex, smac: v.smac, dmac: v.dmac, src: saddr, mtu: v.mtu };
    }
    let r = lookup(ctx, proto, tot_len, saddr, daddr, false);
    if let Route::Ready { ifindex, smac, dmac, mtu, .. } = r
        && mtu != 0
    {
        let v = RouteValue { checked_ns: now, ifindex, mtu, smac, dmac, _pad: [0; 6] };
        let _ = ROUTE4.insert(key, v, BPF_ANY);
    }
    r
}

/// Writes the Ethernet addresses of a `Route::Ready`.
#[inline(always)]
pub fn set_macs<C: Ctx>(ctx: &C, smac: &[u8; 6], dmac: &[u8; 6]) -> Result<(), i64> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(-1i64)?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*eth).dst_addr = *dmac;
        (*eth).src_addr = *smac;
    }
    Ok(())
}

/// Decrements the TTL of a packet this node forwards, as a router does (the caller has checked
/// that it is above 1), with the header checksum updated.
#[inline(always)]
pub fn dec_ttl<C: Ctx>(ctx: &C) -> Result<(), i64> {
    let word: *mut [u8; 2] = ptr_at(ctx, IP_TTL_OFF).ok_or(-1i64)?;
    // SAFETY: bounds-checked by ptr_at; TTL and protocol, one 16-bit word of the header.
    let [ttl, proto] = unsafe { word.read_unaligned() };
    let new = [ttl.saturating_sub(1), proto];
    csum::update_ip_word(ctx, u16::from_ne_bytes([ttl, proto]), u16::from_ne_bytes(new))?;
    // The checksum helper may have moved the skb's data: check again.
    let word: *mut [u8; 2] = ptr_at(ctx, IP_TTL_OFF).ok_or(-1i64)?;
    // SAFETY: as above.
    unsafe { word.write_unaligned(new) };
    Ok(())
}
