//! What the shared packet code needs from a program context, for TC (`TcContext`, an skb) and
//! XDP (`XdpContext`, a raw frame), and bounds-checked packet access (`ptr_at`). The
//! north-south path runs the same code on both hooks.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_skb_change_tail, bpf_xdp_adjust_tail},
    maps::ProgramArray,
    programs::{TcContext, XdpContext},
};
use rproxy_common::{Stat, calls};

use crate::maps::{CALLS_TC, CALLS_XDP, count};

/// Deepest header bytes the programs look at: Ethernet + IPv6 with extension headers (or IPv4
/// with full options) + TCP. TC makes at least this much of the packet linear.
pub const MAX_HDR: u32 = 14 + 40 + 64 + 20;

pub trait Ctx: EbpfContext + Sized {
    /// Start of the packet's linear data.
    fn data(&self) -> usize;
    /// End of the packet's linear data.
    fn data_end(&self) -> usize;
    /// Makes the headers directly readable where the hook may hold them in fragments (TC: GSO/GRO
    /// skbs). On failure the bounds checks fail and the packet passes untouched.
    fn make_headers_linear(&self);
    /// Index of the device the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Cuts or extends the packet to `len` bytes (new bytes are zero on TC, undefined on XDP).
    /// Invalidates packet pointers.
    fn set_len(&self, len: u32) -> Result<(), i64>;
    /// The packet's length as the route's MTU check wants it (`bpf_fib_lookup`'s `tot_len`):
    /// the IP packet's length, or 0 for a TC GSO packet, which the FIB lookup then checks
    /// segment by segment against the device's MTU.
    fn mtu_len(&self, ip_len: u16) -> u16;
    /// Whether the checksum helpers of an skb are available (TC), or checksums are rewritten
    /// in the frame (XDP).
    const SKB: bool;
    /// This hook's program array (`rproxy_common::calls`).
    fn calls() -> &'static ProgramArray;
    /// This hook's slots of the IPv6 north-south stages: a new flow to another node's backend,
    /// an ICMPv6 error.
    const SNAT6_CALL: u32;
    const ICMP6_CALL: u32;

    /// Tail-calls the program in slot `index` of this hook's array. Returns only if the slot is
    /// empty (counted as `Stat::TailCallFail`).
    #[inline(always)]
    fn tail_call(&self, index: u32) {
        // SAFETY: this program's context, and an array of programs of this hook's type.
        unsafe { Self::calls().tail_call(self, index) };
        count(Stat::TailCallFail);
    }
}

impl Ctx for TcContext {
    const SKB: bool = true;
    const SNAT6_CALL: u32 = calls::EXT_INGRESS6_SNAT;
    const ICMP6_CALL: u32 = calls::EXT_INGRESS6_ICMP;

    #[inline(always)]
    fn calls() -> &'static ProgramArray {
        &CALLS_TC
    }

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn make_headers_linear(&self) {
        let linear = self.data_end().saturating_sub(self.data());
        let want = if self.len() < MAX_HDR { self.len() } else { MAX_HDR };
        if linear < want as usize {
            let _ = self.pull_data(want);
        }
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context's skb pointer is valid for the whole program run.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn set_len(&self, len: u32) -> Result<(), i64> {
        // SAFETY: the context's skb; the helper checks the length.
        let r = unsafe { bpf_skb_change_tail(self.skb.skb, len, 0) };
        if r < 0 { Err(r) } else { Ok(()) }
    }

    #[inline(always)]
    fn mtu_len(&self, ip_len: u16) -> u16 {
        // SAFETY: as above.
        if unsafe { (*self.skb.skb).gso_size } != 0 { 0 } else { ip_len }
    }
}

impl Ctx for XdpContext {
    const SKB: bool = false;
    const SNAT6_CALL: u32 = calls::XDP_EXT6_SNAT;
    const ICMP6_CALL: u32 = calls::XDP_EXT6_ICMP;

    #[inline(always)]
    fn calls() -> &'static ProgramArray {
        &CALLS_XDP
    }

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn make_headers_linear(&self) {
        // XDP sees the frame's first buffer, which holds the headers of any sane frame.
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        #[expect(clippy::cast_possible_truncation, reason = "ifindex is a u32 in xdp_md")]
        let i = XdpContext::ingress_ifindex(self) as u32;
        i
    }

    #[inline(always)]
    fn set_len(&self, len: u32) -> Result<(), i64> {
        #[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "frame lengths < 2^31")]
        let delta = len as i32 - (self.data_end() - self.data()) as i32;
        // SAFETY: the context's xdp_md; the helper checks the new length against the buffer.
        let r = unsafe { bpf_xdp_adjust_tail(self.ctx, delta) };
        if r < 0 { Err(r) } else { Ok(()) }
    }

    #[inline(always)]
    fn mtu_len(&self, ip_len: u16) -> u16 {
        ip_len
    }
}

/// Pointer to a `T` at `off` bytes into the packet, or `None` if it would cross `data_end`.
#[inline(always)]
pub fn ptr_at<C: Ctx, T>(ctx: &C, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// `N` 32-bit words of packet data at `p` (any alignment; memory order). LLVM reads unaligned
/// data byte by byte, and left alone keeps the bytes apart, in a register and a stack slot
/// each, until it needs the words: an IPv6 address would take sixteen of the 512 bytes of stack
/// a program has. The barrier makes the words whole as they are read.
///
/// # Safety
/// `p .. p + 4 * N` is bounds-checked packet data.
#[inline(always)]
pub unsafe fn load_words<const N: usize>(p: *const u8) -> [u32; N] {
    #[expect(clippy::cast_ptr_alignment, reason = "read with read_unaligned")]
    let w = p.cast::<u32>();
    // SAFETY: the caller's; unaligned reads.
    let words = core::array::from_fn(|i| unsafe { w.add(i).read_unaligned() });
    core::hint::black_box(words)
}
