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
use rproxy_common::{RouteKey, RouteValue, route};

use crate::{
    conntrack::BPF_ANY,
    ctx::{Ctx, ptr_at},
    family::Family,
};

/// Where a packet to some address leaves.
pub enum Route<F: Family> {
    /// Egress device and the Ethernet addresses to write; the route's MTU (XDP only: an skb's
    /// lookup does not report it).
    Ready { ifindex: u32, smac: [u8; 6], dmac: [u8; 6], src: F::Addr, mtu: u16 },
    /// Routed through `ifindex`, but the next hop's MAC is not known yet: TC hands the packet to
    /// `bpf_redirect_neigh`, XDP passes it up untouched (TC then handles it).
    NoNeigh { ifindex: u32, src: F::Addr },
    /// The packet is bigger than the route's MTU (`mtu`).
    TooBig { mtu: u16 },
    /// No route, forwarding disabled, …
    Unusable,
}

/// Looks up the route from `saddr` (`None`: the node picks one and reports it in `src`) to
/// `daddr` for a packet of protocol `proto` and IP length `ip_len` that arrived on this
/// context's device, checking the length against the route's MTU.
#[inline(always)]
pub fn lookup<C: Ctx, F: Family>(ctx: &C, proto: u8, ip_len: u16, saddr: Option<F::Addr>, daddr: F::Addr) -> Route<F> {
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
    let flags = if saddr.is_none() { BPF_FIB_LOOKUP_SRC } else { 0 };
    #[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "64-byte struct")]
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: `p` points to the zeroed struct on this stack frame (all-zero is a valid
    // bpf_fib_lookup: integers and unions of them); the context pointer is this program's.
    unsafe {
        (*p).family = F::AF;
        (*p).l4_protocol = proto;
        (*p).ifindex = ctx.ingress_ifindex();
        // Without a source the zeroed one stays (no zero address is built: IPv6's would be a
        // `memset` call).
        if let Some(saddr) = saddr {
            F::fib_set_src(p, saddr);
        }
        F::fib_set_dst(p, daddr);
        (*p).__bindgen_anon_1.tot_len = ctx.mtu_len(ip_len);
        let r = fib_lookup(ctx.as_ptr(), p, size, flags);
        // The helper fills the source address union for the family, and the MTU into the
        // length union on FRAG_NEEDED and, at XDP (which always checks it), on success.
        let src = F::fib_src(p);
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

/// The route cache's key for a packet of protocol `proto` from `saddr` to `daddr` that arrived on
/// this context's device, and its entry if that is at most `route::VALID_NS` old at `now`.
#[inline(always)]
fn cache_entry<C: Ctx, F: Family>(
    ctx: &C,
    proto: u8,
    saddr: F::Addr,
    daddr: F::Addr,
    now: u64,
) -> (RouteKey<F::Addr>, Option<RouteValue>) {
    let key = RouteKey { ifindex: ctx.ingress_ifindex(), saddr, daddr, proto, _pad: [0, 0, 0] };
    // SAFETY: copied out at once (an update replaces the element rather than writing into it).
    let fresh = unsafe { F::routes().get(key) }.copied().filter(|v| now.wrapping_sub(v.checked_ns) < route::VALID_NS);
    (key, fresh)
}

/// A cached route as the FIB lookup would report it, from `src`.
#[inline(always)]
fn ready<F: Family>(v: &RouteValue, src: F::Addr) -> Route<F> {
    Route::Ready { ifindex: v.ifindex, smac: v.smac, dmac: v.dmac, src, mtu: v.mtu }
}

/// The route cache's fresh entry for (`saddr`, `daddr`, `proto`) on this context's device, as a
/// ready route, if the packet (IP length `ip_len`) fits its MTU; `None` otherwise (no entry, a
/// stale one, too big): [`cached`] then asks the FIB. XDP only (TC has no cache).
#[inline(always)]
pub fn cached_only<C: Ctx, F: Family>(
    ctx: &C,
    proto: u8,
    ip_len: u16,
    saddr: F::Addr,
    daddr: F::Addr,
    now: u64,
) -> Option<Route<F>> {
    if C::SKB {
        return None;
    }
    let v = cache_entry::<C, F>(ctx, proto, saddr, daddr, now).1?;
    (ip_len <= v.mtu).then(|| ready(&v, saddr))
}

/// `lookup` from `saddr` (not zero) to `daddr`, at XDP through the route cache: a result at
/// most `route::VALID_NS` old at `now` for the same ingress device, addresses and protocol is
/// used as it is (its MTU checked against `ip_len`); otherwise the FIB is asked, and a complete
/// result is remembered. See `rproxy_common::route`.
#[inline(always)]
pub fn cached<C: Ctx, F: Family>(
    ctx: &C,
    proto: u8,
    ip_len: u16,
    saddr: F::Addr,
    daddr: F::Addr,
    now: u64,
) -> Route<F> {
    if C::SKB {
        return lookup(ctx, proto, ip_len, Some(saddr), daddr);
    }
    let (key, fresh) = cache_entry::<C, F>(ctx, proto, saddr, daddr, now);
    if let Some(v) = fresh {
        return if ip_len > v.mtu { Route::TooBig { mtu: v.mtu } } else { ready(&v, saddr) };
    }
    let r = lookup(ctx, proto, ip_len, Some(saddr), daddr);
    if let Route::Ready { ifindex, smac, dmac, mtu, .. } = r
        && mtu != 0
    {
        let v = RouteValue { checked_ns: now, ifindex, mtu, smac, dmac, _pad: [0, 0, 0, 0, 0, 0] };
        let _ = F::routes().insert(key, v, BPF_ANY);
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
