//! rproxy's eBPF programs. Thin entry points; the work is in one module per concern.
//!
//! - `rpx_from_pod` (TC ingress, host side of a pod veth): packets leaving a pod. `ClusterIP`
//!   DNAT for TCP and UDP, with conntrack.
//! - `rpx_to_pod` (TC egress, host side of a pod veth): packets entering a pod. Reverse NAT of
//!   replies from backends, and of ICMP errors about translated flows (`related`).
//! - `rpx_xdp_ext` (XDP) and `rpx_ext_ingress` (TC ingress) on the node's external devices:
//!   north-south service traffic, and the replies of the flows forwarded to other nodes (`nodeport`).
//! - `rpx_ext_egress` (TC egress, external devices): reverse NAT of north-south replies from this
//!   node's backends, and of ICMP errors about those flows (`related`).
//! - `rpx_sock_*` (cgroup socket hooks, IPv4 and IPv6): host-network processes connecting or
//!   sending to a service address, and pods' TCP connects, go to a backend directly (`sock`).
//! - `rpx_tc_noop`, `rpx_xdp_noop`: return at once; the baselines of the benchmarks.
//!
//! The code is the same for IPv4 and IPv6 (`family`). Each packet program handles IPv4 itself
//! and tail-calls its IPv6 half (`rpx_…6`), and the IPv6 north-south programs their SNAT and
//! ICMP stages (`rproxy_common::calls`): IPv6's path does not fit the 512-byte stack beside
//! IPv4's. The program functions are `#[inline(always)]` into the wrappers aya's macros make,
//! which would otherwise add a frame to every call chain.
//!
//! Packets a program does not translate are returned with `TC_ACT_UNSPEC` (TCX "next"), so other
//! programs on the same hook still see them and the packet continues untouched.
#![no_std]
#![no_main]
// Inline assembly for single-instruction unaligned packet loads (`ctx::load_u32`); the crate is
// built with `RUSTC_BOOTSTRAP=1`, as aya-build does.
#![feature(asm_experimental_arch)]
#![expect(clippy::inline_always, reason = "eBPF helpers must be inlined into each program")]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go to the helpers by reference: by value, each is a copy on the 512-byte stack"
)]

mod conntrack;
mod csum;
mod ctx;
mod family;
mod fib;
mod icmp;
mod icmp6;
mod lb;
mod maps;
mod nat;
mod nodeport;
mod observe;
mod parse;
mod pod;
mod related;
mod related6;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use ctx::Ctx;
use family::{Family, V4, V6};
use nodeport::Action;
use parse::{ETH_P_IP_BE, ETH_P_IPV6_BE};
use pod::Verdict;
use rproxy_common::{Stat, calls};

use crate::maps::count;

const PASS: i32 = TC_ACT_UNSPEC;
#[allow(
    clippy::cast_possible_wrap,
    clippy::unnecessary_cast,
    reason = "TC_ACT_SHOT (2) is u32 or i32 depending on the bindings' target"
)]
const DROP: i32 = TC_ACT_SHOT as i32;

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_from_pod(ctx: TcContext) -> i32 {
    let verdict = match parse::ether_type(&ctx) {
        Some(ETH_P_IP_BE) => match parse::parse_ipv4(&ctx) {
            Some(pkt) => pod::from_pod::<V4>(&ctx, &pkt),
            None => Ok(Verdict::Pass),
        },
        // Not TCP or UDP: the IPv6 half would pass it. New flows go to the half.
        Some(ETH_P_IPV6_BE) => match parse::parse_ipv6_but_source(&ctx)
            .map(|pkt| pod::from_pod_inline::<V6>(&ctx, pkt, || parse::ipv6_source(&ctx)))
        {
            None => Ok(Verdict::Pass),
            Some(Some(verdict)) => verdict,
            Some(None) => {
                ctx.tail_call(calls::FROM_POD6);
                return PASS;
            }
        },
        _ => Ok(Verdict::Pass),
    };
    pod_action(&ctx, verdict)
}

/// `rpx_from_pod`'s IPv6 half (`rproxy_common::calls`).
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_from_pod6(ctx: TcContext) -> i32 {
    let verdict = match parse::parse_ipv6(&ctx) {
        Some(pkt) => pod::from_pod::<V6>(&ctx, &pkt),
        None => Ok(Verdict::Pass),
    };
    pod_action(&ctx, verdict)
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_to_pod(ctx: TcContext) -> i32 {
    let verdict = match parse::ether_type(&ctx) {
        Some(ETH_P_IP_BE) => match parse::parse_ipv4(&ctx) {
            Some(pkt) => pod::to_pod::<V4>(&ctx, &pkt),
            // Not TCP or UDP: perhaps an ICMP error about a translated flow.
            None => related::rev_nat::<V4>(&ctx, false).map(|()| Verdict::Pass),
        },
        Some(ETH_P_IPV6_BE) => {
            let Some(pkt) = parse::parse_ipv6(&ctx) else {
                // Not TCP or UDP: perhaps an ICMPv6 error about a translated flow, for the half.
                ctx.tail_call(calls::TO_POD6);
                return PASS;
            };
            pod::to_pod::<V6>(&ctx, &pkt)
        }
        _ => Ok(Verdict::Pass),
    };
    pod_action(&ctx, verdict)
}

/// `rpx_to_pod`'s IPv6 half: what is not TCP or UDP (`rpx_to_pod` translates those itself),
/// perhaps an ICMPv6 error about a translated flow.
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_to_pod6(ctx: TcContext) -> i32 {
    pod_action(&ctx, related::rev_nat::<V6>(&ctx, false).map(|()| Verdict::Pass))
}

#[classifier]
pub fn rpx_tc_noop(_ctx: TcContext) -> i32 {
    PASS
}

#[xdp]
pub fn rpx_xdp_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[xdp]")]
#[inline(always)]
pub fn rpx_xdp_ext(ctx: XdpContext) -> u32 {
    match parse::ether_type(&ctx) {
        Some(ETH_P_IP_BE) => xdp_verdict(&ctx, external_ingress::<_, V4>(&ctx)),
        // Established flows and replies with a cached route are translated here; the rest
        // (new flows, ICMPv6, what needs the FIB or an ICMPv6 error) in the IPv6 half.
        Some(ETH_P_IPV6_BE) => {
            if let Some(action) = parse::parse_ipv6(&ctx).and_then(|pkt| nodeport::ingress_inline(&ctx, &pkt)) {
                return xdp_verdict(&ctx, Ok(action));
            }
            ctx.tail_call(calls::XDP_EXT6);
            xdp_action::XDP_PASS
        }
        _ => xdp_action::XDP_PASS,
    }
}

/// `rpx_xdp_ext`'s IPv6 half.
#[xdp]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[xdp]")]
#[inline(always)]
pub fn rpx_xdp_ext6(ctx: XdpContext) -> u32 {
    xdp_verdict(&ctx, external_ingress::<_, V6>(&ctx))
}

/// The IPv6 north-south SNAT stage at XDP (`nodeport::snat_stage`).
#[xdp]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[xdp]")]
#[inline(always)]
pub fn rpx_xdp_ext6_snat(ctx: XdpContext) -> u32 {
    let action = parse::parse_ipv6(&ctx).map_or(Action::Drop, |pkt| nodeport::snat_stage(&ctx, &pkt));
    xdp_verdict(&ctx, Ok(action))
}

/// The IPv6 north-south ICMP stage at XDP: an ICMPv6 error, perhaps about a flow this node
/// source-translated (`nodeport::snat_error`).
#[xdp]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[xdp]")]
#[inline(always)]
pub fn rpx_xdp_ext6_icmp(ctx: XdpContext) -> u32 {
    xdp_verdict(&ctx, Ok(nodeport::snat_error::<_, V6>(&ctx)))
}

/// The XDP action of the external path's `action`.
#[inline(always)]
#[expect(clippy::needless_pass_by_value, reason = "consumed by the match; a reference adds nothing")]
fn xdp_verdict(ctx: &XdpContext, action: Result<Action, i64>) -> u32 {
    match action {
        Ok(Action::Pass | Action::RedirectNeigh(_)) => xdp_action::XDP_PASS,
        Ok(Action::Drop) => xdp_action::XDP_DROP,
        Ok(Action::Bounce) => xdp_action::XDP_TX,
        Ok(Action::Redirect(ifindex)) => {
            if ifindex == ctx::Ctx::ingress_ifindex(ctx) {
                xdp_action::XDP_TX
            } else {
                // SAFETY: plain helper; returns XDP_REDIRECT, or XDP_ABORTED on a bad index.
                #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "an XDP action")]
                let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
                action
            }
        }
        Ok(Action::Fail) | Err(_) => {
            count(Stat::RewriteFail);
            xdp_action::XDP_DROP
        }
    }
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_ext_ingress(ctx: TcContext) -> i32 {
    if vlan_tagged(&ctx) {
        return PASS;
    }
    match parse::ether_type(&ctx) {
        Some(ETH_P_IP_BE) => tc_action(&ctx, external_ingress::<_, V4>(&ctx)),
        Some(ETH_P_IPV6_BE) => {
            if parse::parse_ipv6(&ctx).is_none_or(|pkt| nodeport::ingress_acts_on(&pkt)) {
                ctx.tail_call(calls::EXT_INGRESS6);
            }
            PASS
        }
        _ => PASS,
    }
}

/// A frame whose 802.1Q tag the kernel holds in the skb (`vlan_present`: it took the tag off at
/// receive, or a VLAN device above set it for transmit): it belongs to a VLAN device on top of
/// this one, which is served when `--devices` lists it. XDP passes a frame that still carries
/// its tag (the ether type is not IP), but cannot see a tag the NIC or the kernel already took
/// off (docs/datapath.md, "External devices of other kinds").
#[inline(always)]
fn vlan_tagged(ctx: &TcContext) -> bool {
    // SAFETY: the context's field, read in place (the verifier rewrites the access).
    unsafe { (&raw const (*ctx.skb.skb).vlan_present).read_volatile() != 0 }
}

/// `rpx_ext_ingress`'s IPv6 half.
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_ext_ingress6(ctx: TcContext) -> i32 {
    tc_action(&ctx, external_ingress::<_, V6>(&ctx))
}

/// The IPv6 north-south SNAT stage at TC (`nodeport::snat_stage`).
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_ext_ingress6_snat(ctx: TcContext) -> i32 {
    let action = parse::parse_ipv6(&ctx).map_or(Action::Drop, |pkt| nodeport::snat_stage(&ctx, &pkt));
    tc_action(&ctx, Ok(action))
}

/// The IPv6 north-south ICMP stage at TC (`nodeport::snat_error`).
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_ext_ingress6_icmp(ctx: TcContext) -> i32 {
    tc_action(&ctx, Ok(nodeport::snat_error::<_, V6>(&ctx)))
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_ext_egress(ctx: TcContext) -> i32 {
    if vlan_tagged(&ctx) {
        return PASS;
    }
    let action = match parse::ether_type(&ctx) {
        Some(ETH_P_IP_BE) => match parse::parse_ipv4(&ctx) {
            Some(pkt) => nodeport::egress::<V4>(&ctx, &pkt),
            // Not TCP or UDP: perhaps an ICMP error about a flow to a backend here.
            None => related::rev_nat::<V4>(&ctx, true).map(|()| Action::Pass),
        },
        Some(ETH_P_IPV6_BE) => {
            let Some(pkt) = parse::parse_ipv6(&ctx) else {
                // Not TCP or UDP: perhaps an ICMPv6 error about a flow to a backend here.
                ctx.tail_call(calls::EXT_EGRESS6);
                return PASS;
            };
            nodeport::egress::<V6>(&ctx, &pkt)
        }
        _ => Ok(Action::Pass),
    };
    tc_action(&ctx, action)
}

/// `rpx_ext_egress`'s IPv6 half: what is not TCP or UDP, perhaps an ICMPv6 error about a flow
/// to a backend here.
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
#[inline(always)]
pub fn rpx_ext_egress6(ctx: TcContext) -> i32 {
    tc_action(&ctx, related::rev_nat::<V6>(&ctx, true).map(|()| Action::Pass))
}

#[cgroup_sock_addr(connect4)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

#[cgroup_sock_addr(connect6)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

#[cgroup_sock(sock_release)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock]")]
pub fn rpx_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}

/// A packet of family `F` arriving on an external device, at XDP or TC: a TCP or UDP packet to
/// a frontend (or a reply of a flow this node source-translated), or an ICMP error about such a
/// flow.
#[inline(always)]
fn external_ingress<C: Ctx, F: Family>(ctx: &C) -> Result<Action, i64> {
    match F::parse(ctx) {
        Some(pkt) => nodeport::ingress::<C, F>(ctx, &pkt),
        // Not TCP or UDP: perhaps an ICMP error about a flow this node SNATed.
        None if F::STAGES => {
            ctx.tail_call(C::ICMP6_CALL);
            Ok(Action::Pass)
        }
        None => Ok(nodeport::snat_error::<C, F>(ctx)),
    }
}

/// The TC verdict of the pod path's `verdict` (an error: a rewrite failed half-way, dropped).
#[inline(always)]
#[expect(clippy::needless_pass_by_value, reason = "consumed by the match; a reference adds nothing")]
fn pod_action(ctx: &TcContext, verdict: Result<Verdict, i64>) -> i32 {
    match verdict {
        Ok(Verdict::Pass) => PASS,
        Ok(Verdict::Drop) => DROP,
        Ok(Verdict::Bounce) => tc_action(ctx, Ok(Action::Bounce)),
        Err(_) => {
            count(Stat::RewriteFail);
            DROP
        }
    }
}

#[inline(always)]
#[expect(clippy::needless_pass_by_value, reason = "consumed by the match; a reference adds nothing")]
fn tc_action(ctx: &TcContext, r: Result<Action, i64>) -> i32 {
    #[expect(clippy::cast_possible_truncation, reason = "TC actions are small integers")]
    match r {
        Ok(Action::Pass) => PASS,
        Ok(Action::Drop) => DROP,
        // SAFETY: plain helpers; they return TC_ACT_REDIRECT, or TC_ACT_SHOT on a bad index.
        Ok(Action::Redirect(ifindex)) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Ok(Action::RedirectNeigh(ifindex)) => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        // SAFETY: as above.
        Ok(Action::Bounce) => unsafe { bpf_redirect(ctx::Ctx::ingress_ifindex(ctx), 0) as i32 },
        Ok(Action::Fail) | Err(_) => {
            count(Stat::RewriteFail);
            DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects programs that could reach a panic path at load time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
