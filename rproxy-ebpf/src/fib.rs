//! Forwarding from the hook: the kernel's FIB lookup (`bpf_fib_lookup`) gives the egress device,
//! the MAC addresses and, on request, the source address the node would use towards a
//! destination (`BPF_FIB_LOOKUP_SRC`, the address north-south SNAT translates to).
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC,
        bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup,
};
use network_types::eth::EthHdr;

use crate::{
    csum,
    ctx::Ctx,
    parse::{IP_TTL_OFF, ptr_at},
};

const AF_INET: u8 = 2;

/// Where a packet to some address leaves.
pub enum Route {
    /// Egress device and the Ethernet addresses to write.
    Ready { ifindex: u32, smac: [u8; 6], dmac: [u8; 6], src: u32 },
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
        // into the length union on FRAG_NEEDED.
        let src = (*p).__bindgen_anon_3.ipv4_src;
        match u32::try_from(r).unwrap_or(u32::MAX) {
            BPF_FIB_LKUP_RET_SUCCESS => Route::Ready { ifindex: (*p).ifindex, smac: (*p).smac, dmac: (*p).dmac, src },
            BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeigh { ifindex: (*p).ifindex, src },
            BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig { mtu: (*p).__bindgen_anon_1.mtu_result },
            _ => Route::Unusable,
        }
    }
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
