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
//! - `rpx_sock_*` (cgroup socket hooks): host-network processes connecting or sending to a
//!   service address go to a backend directly (`sock`).
//! - `rpx_tc_noop`, `rpx_xdp_noop`: return at once; the baselines of the benchmarks.
//!
//! Packets a program does not translate are returned with `TC_ACT_UNSPEC` (TCX "next"), so other
//! programs on the same hook still see them and the packet continues untouched.
#![no_std]
#![no_main]
#![expect(clippy::inline_always, reason = "eBPF helpers must be inlined into each program")]

mod conntrack;
mod csum;
mod ctx;
mod family;
mod fib;
mod icmp;
mod lb;
mod maps;
mod nat;
mod nodeport;
mod parse;
mod pod;
mod related;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use ctx::Ctx;
use family::V4;
use nodeport::Action;
use parse::ETH_P_IP_BE;
use pod::Verdict;
use rproxy_common::Stat;

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
pub fn rpx_from_pod(ctx: TcContext) -> i32 {
    let verdict = match parse::ether_type(&ctx) {
        Some(ETH_P_IP_BE) => match parse::parse_ipv4(&ctx) {
            Some(pkt) => pod::from_pod::<V4>(&ctx, &pkt),
            None => Ok(Verdict::Pass),
        },
        _ => Ok(Verdict::Pass),
    };
    pod_action(&ctx, verdict)
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
pub fn rpx_to_pod(ctx: TcContext) -> i32 {
    let verdict = match parse::ether_type(&ctx) {
        Some(ETH_P_IP_BE) => match parse::parse_ipv4(&ctx) {
            Some(pkt) => pod::to_pod::<V4>(&ctx, &pkt),
            // Not TCP or UDP: perhaps an ICMP error about a translated flow.
            None => related::rev_nat(&ctx, false).map(|()| Verdict::Pass),
        },
        _ => Ok(Verdict::Pass),
    };
    pod_action(&ctx, verdict)
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
pub fn rpx_xdp_ext(ctx: XdpContext) -> u32 {
    match external_ingress(&ctx) {
        Ok(Action::Pass | Action::RedirectNeigh(_)) => xdp_action::XDP_PASS,
        Ok(Action::Drop) => xdp_action::XDP_DROP,
        Ok(Action::Bounce) => xdp_action::XDP_TX,
        Ok(Action::Redirect(ifindex)) => {
            if ifindex == ctx::Ctx::ingress_ifindex(&ctx) {
                xdp_action::XDP_TX
            } else {
                // SAFETY: plain helper; returns XDP_REDIRECT, or XDP_ABORTED on a bad index.
                #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "an XDP action")]
                let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
                action
            }
        }
        Err(_) => {
            count(Stat::RewriteFail);
            xdp_action::XDP_DROP
        }
    }
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
pub fn rpx_ext_ingress(ctx: TcContext) -> i32 {
    tc_action(&ctx, external_ingress(&ctx))
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
pub fn rpx_ext_egress(ctx: TcContext) -> i32 {
    let action = match parse::ether_type(&ctx) {
        Some(ETH_P_IP_BE) => match parse::parse_ipv4(&ctx) {
            Some(pkt) => nodeport::egress::<V4>(&ctx, &pkt),
            // Not TCP or UDP: perhaps an ICMP error about a flow to a backend here.
            None => related::rev_nat(&ctx, true).map(|()| Action::Pass),
        },
        _ => Ok(Action::Pass),
    };
    tc_action(&ctx, action)
}

#[cgroup_sock_addr(connect4)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[cgroup_sock_addr]")]
pub fn rpx_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// A packet arriving on an external device, at XDP or TC: a TCP or UDP packet to a frontend
/// (or a reply of a flow this node source-translated), or an ICMP error about such a flow.
#[inline(always)]
fn external_ingress<C: Ctx>(ctx: &C) -> Result<Action, i64> {
    match parse::ether_type(ctx) {
        Some(ETH_P_IP_BE) => match parse::parse_ipv4(ctx) {
            Some(pkt) => nodeport::ingress::<C, V4>(ctx, &pkt),
            // Not TCP or UDP: perhaps an ICMP error about a flow this node SNATed.
            None => nodeport::snat_error(ctx),
        },
        _ => Ok(Action::Pass),
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
        Err(_) => {
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
