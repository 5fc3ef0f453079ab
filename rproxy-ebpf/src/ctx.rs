//! What the shared packet code needs from a program context, for TC (`TcContext`, an skb) and
//! XDP (`XdpContext`, a raw frame), and bounds-checked packet access (`ptr_at`). The
//! north-south path runs the same code on both hooks.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_skb_change_tail, bpf_xdp_adjust_tail},
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
    /// This hook's slots of the IPv6 north-south stages: a new flow to another node's backend,
    /// an ICMPv6 error.
    const SNAT6_CALL: u32;
    const ICMP6_CALL: u32;

    /// Tail-calls the program in slot `index` of this hook's program array
    /// (`rproxy_common::calls`). Returns only if the slot is empty (counted as
    /// `Stat::TailCallFail`).
    fn tail_call(&self, index: u32);
}

impl Ctx for TcContext {
    const SKB: bool = true;
    const SNAT6_CALL: u32 = calls::EXT_INGRESS6_SNAT;
    const ICMP6_CALL: u32 = calls::EXT_INGRESS6_ICMP;

    #[inline(always)]
    fn tail_call(&self, index: u32) {
        // SAFETY: this program's context, and an array of programs of this hook's type.
        unsafe { CALLS_TC.tail_call(self, index) };
        count(Stat::TailCallFail);
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
    fn tail_call(&self, index: u32) {
        // SAFETY: this program's context, and an array of programs of this hook's type.
        unsafe { CALLS_XDP.tail_call(self, index) };
        count(Stat::TailCallFail);
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

/// One 32-bit load of packet data at `$p + $off` (`$off` a constant expression, which may use
/// const generics), zero-extended; the body of [`load_u32_at`] and [`load_words_at`]. To be
/// used inside `unsafe`, under their safety contract.
macro_rules! load32 {
    ($p:expr, $off:expr) => {{
        let v: u64;
        // The load neither writes memory nor touches the stack.
        core::arch::asm!(
            "{v} = *(u32 *)({p} + {off})",
            p = in(reg) $p,
            off = const $off,
            v = lateout(reg) v,
            options(pure, readonly, nostack, preserves_flags),
        );
        // A 32-bit load zeroes the register's upper half; told so, LLVM leaves out the shifts
        // that would clear it again wherever the word is compared or spilled as 64 bits.
        core::hint::assert_unchecked(v >> 32 == 0);
        #[expect(clippy::cast_possible_truncation, reason = "a 32-bit load, zero-extended")]
        let v = v as u32;
        v
    }};
}

/// `N` 32-bit words of packet data at `p` (any alignment; memory order), one load instruction
/// each ([`load_u32`]).
///
/// # Safety
/// `p .. p + 4 * N` is bounds-checked packet data.
#[inline(always)]
pub unsafe fn load_words<const N: usize>(p: *const u8) -> [u32; N] {
    // SAFETY: the caller's.
    unsafe { load_words_at::<0, N>(p) }
}

/// `N` 32-bit words of packet data at `p + OFF`, each word's offset a constant of its load
/// instruction ([`load_u32_at`]) once the loop is unrolled and the match folded: one
/// instruction a word, where a pointer of its own takes three (copy, add, load). Words past
/// the sixteenth (none today) take the long way.
///
/// # Safety
/// `p + OFF .. p + OFF + 4 * N` is bounds-checked packet data.
#[inline(always)]
pub unsafe fn load_words_at<const OFF: usize, const N: usize>(p: *const u8) -> [u32; N] {
    const { assert!(OFF + 4 * N <= i16::MAX as usize, "a load's offset is a signed 16-bit field") };
    macro_rules! word {
        ($i:expr, $($n:literal)*) => {
            match $i {
                // SAFETY: the caller's.
                $($n => unsafe { load32!(p, OFF + 4 * $n) },)*
                // SAFETY: the caller's.
                i => unsafe { load_u32(p.add(OFF + 4 * i)) },
            }
        };
    }
    core::array::from_fn(|i| word!(i, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15))
}

/// The 32-bit word of packet data at `p` (any alignment; memory order), read with one load
/// instruction. Header fields are byte arrays (alignment 1), which LLVM reads byte by byte,
/// shifting and or-ing the bytes together (and, left alone, keeps each byte in a register and
/// a stack slot of its own until it needs the word): an IPv6 address cost 16 loads and 16
/// slots of the 512-byte stack. The kernel allows unaligned packet loads where the CPU does
/// (the verifier's strict alignment is off unless a program asks for it), as C programs, whose
/// header structs have aligned fields, rely on.
///
/// # Safety
/// `p .. p + 4` is bounds-checked packet data.
#[inline(always)]
pub unsafe fn load_u32(p: *const u8) -> u32 {
    // SAFETY: the caller's.
    unsafe { load_u32_at::<0>(p) }
}

/// The 32-bit word of packet data at `p + OFF` ([`load_u32`]), the offset carried by the load
/// instruction itself: a header's field read from the header's pointer, without a register
/// for the field's address.
///
/// # Safety
/// `p + OFF .. p + OFF + 4` is bounds-checked packet data.
#[inline(always)]
pub unsafe fn load_u32_at<const OFF: usize>(p: *const u8) -> u32 {
    const { assert!(OFF <= i16::MAX as usize, "a load's offset is a signed 16-bit field") };
    // SAFETY: the caller's.
    unsafe { load32!(p, OFF) }
}

/// The 16-bit field of packet data at `p` (any alignment; memory order), with one load
/// instruction ([`load_u32`]).
///
/// # Safety
/// `p .. p + 2` is bounds-checked packet data.
#[inline(always)]
pub unsafe fn load_u16(p: *const u8) -> u16 {
    // SAFETY: the caller's.
    unsafe { load_u16_at::<0>(p) }
}

/// The 16-bit field of packet data at `p + OFF`, the offset in the load instruction
/// ([`load_u32_at`]).
///
/// # Safety
/// `p + OFF .. p + OFF + 2` is bounds-checked packet data.
#[inline(always)]
pub unsafe fn load_u16_at<const OFF: usize>(p: *const u8) -> u16 {
    const { assert!(OFF <= i16::MAX as usize, "a load's offset is a signed 16-bit field") };
    let v: u64;
    // SAFETY: as `load_u32`'s, for 2 bytes.
    unsafe {
        core::arch::asm!(
            "{v} = *(u16 *)({p} + {off})",
            p = in(reg) p,
            off = const OFF,
            v = lateout(reg) v,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    #[expect(clippy::cast_possible_truncation, reason = "a 16-bit load, zero-extended")]
    let v = v as u16;
    v
}

/// Writes the 32-bit word `v` (memory order) to packet data at `p` (any alignment) with one
/// store instruction (see [`load_u32`]; LLVM would store byte by byte).
///
/// # Safety
/// `p .. p + 4` is bounds-checked packet data, and no helper that may move it has run since.
#[inline(always)]
pub unsafe fn store_u32(p: *mut u8, v: u32) {
    // SAFETY: the caller's; the store touches only those 4 bytes.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({p} + 0) = {v}",
            p = in(reg) p,
            v = in(reg) u64::from(v),
            options(nostack, preserves_flags),
        );
    }
}

/// Writes the 16-bit field `v` (memory order) to packet data at `p` (any alignment) with one
/// store instruction.
///
/// # Safety
/// As for [`store_u32`], for 2 bytes.
#[inline(always)]
pub unsafe fn store_u16(p: *mut u8, v: u16) {
    // SAFETY: the caller's.
    unsafe {
        core::arch::asm!(
            "*(u16 *)({p} + 0) = {v}",
            p = in(reg) p,
            v = in(reg) u64::from(v),
            options(nostack, preserves_flags),
        );
    }
}

/// Writes `N` 32-bit words (memory order) to packet data at `p` (any alignment), one store
/// instruction each.
///
/// # Safety
/// As for [`store_u32`], for `4 * N` bytes.
#[inline(always)]
pub unsafe fn store_words<const N: usize>(p: *mut u8, words: &[u32; N]) {
    for (i, w) in words.iter().enumerate() {
        // SAFETY: the caller's.
        unsafe { store_u32(p.add(4 * i), *w) };
    }
}
