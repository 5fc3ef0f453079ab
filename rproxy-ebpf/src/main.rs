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
mod fib;
mod icmp;
mod lb;
mod maps;
mod nat;
mod nodeport;
mod parse;
mod related;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use nat::Tuple4;
use nodeport::Action;
use parse::Packet4;
use rproxy_common::{Backend4, CT_DIR_REPLY, CT_NAT_SNAT, CtKey4, FlowKind, Stat, hairpin};

use crate::maps::{RNAT4, count};

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
    from_pod(&ctx).unwrap_or_else(|_| {
        count(Stat::RewriteFail);
        DROP
    })
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
pub fn rpx_to_pod(ctx: TcContext) -> i32 {
    to_pod(&ctx).unwrap_or_else(|_| {
        count(Stat::RewriteFail);
        DROP
    })
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
    match nodeport::ingress(&ctx) {
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
    tc_action(&ctx, nodeport::ingress(&ctx))
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "signature required by #[classifier]")]
pub fn rpx_ext_egress(ctx: TcContext) -> i32 {
    tc_action(&ctx, nodeport::egress(&ctx))
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

/// `ClusterIP` DNAT of a packet sent by a pod.
#[inline(always)]
fn from_pod(ctx: &TcContext) -> Result<i32, i64> {
    let Some(pkt) = parse::parse_ipv4(ctx) else {
        return Ok(PASS);
    };
    if pkt.fragment {
        count(Stat::Fragment);
        return Ok(PASS);
    }
    if pkt.daddr == hairpin::ADDR {
        return hairpin_reply(ctx, &pkt);
    }
    if !lb::may_be_service(&pkt) {
        // A new connection straight to a backend from the source port of a translated flow to
        // it: see `direct_syn`.
        if conntrack::is_syn(&pkt) && lb::may_be_backend_dst(&pkt) {
            return Ok(direct_syn(&pkt));
        }
        return Ok(PASS);
    }
    // Conntrack first: an established flow needs no service lookup, only the check (two array
    // loads) that its frontend and backend still exist.
    let ct_key = conntrack::service_key(&pkt);
    let now = conntrack::now_ns();
    let mut backend_gone = false;
    if let Some(ct) = maps::CT4.get_ptr_mut(ct_key) {
        // SAFETY: valid map value pointer for this run.
        let (backend_id, rev_nat_id, nat_flags) = unsafe { ((*ct).backend_id, (*ct).rev_nat_id, (*ct).nat_flags) };
        if lb::frontend_alive(rev_nat_id, &pkt) {
            if let Some(be) = lb::backend(backend_id) {
                conntrack::account(ct, &ct_key, conntrack::fwd_bits(&pkt), conntrack::is_syn(&pkt), now);
                to_backend(ctx, &pkt, &be, FlowKind::of(nat_flags) == FlowKind::Hairpin)?;
                count(Stat::Established);
                return Ok(PASS);
            }
            // The backend was removed: pick a live one (a TCP peer will answer with RST).
            backend_gone = true;
        }
        // A removed frontend: its flows are no longer translated (below: a new one at the same
        // address starts afresh, otherwise the packet passes).
    }
    let Some((svc_key, svc)) = lb::lookup_service(&pkt) else {
        return Ok(PASS);
    };
    if backend_gone {
        count(Stat::BackendGone);
    }
    if !lb::source_allowed(&svc, &pkt) {
        count(Stat::SourceRangeDrop);
        return Ok(DROP);
    }
    let Some((backend_id, be)) = lb::select_backend_for(&svc_key, &svc, pkt.saddr, now, false) else {
        count(Stat::NoBackend);
        // No endpoints: port unreachable back into the pod, as kube-proxy rejects.
        if icmp::reject(ctx, &pkt, &svc, now) {
            return Ok(tc_action(ctx, Ok(Action::Bounce)));
        }
        return Ok(DROP);
    };
    // The pod reaches itself: its source is translated too (`rproxy_common::hairpin`).
    let looped = be.addr == pkt.saddr;
    let (nat, flags) = if looped { ((hairpin::ADDR, pkt.sport), CT_NAT_SNAT) } else { ((pkt.saddr, pkt.sport), 0) };
    // The replies come back on (backend, nat): a live flow of another frontend there (the pod
    // reused its source port towards this backend) keeps it, and this flow is dropped; a flow
    // that is over gives it up.
    let reply = CtKey4 {
        saddr: be.addr,
        daddr: nat.0,
        sport: be.port,
        dport: nat.1,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let stale = match conntrack::reply_holder(&reply, (pkt.daddr, pkt.dport), now) {
        conntrack::Holder::Live => {
            count(Stat::CtClash);
            return Ok(DROP);
        }
        conntrack::Holder::Stale(other) => Some(other),
        conntrack::Holder::Free => None,
    };
    if conntrack::create_nat(&pkt, backend_id, &be, svc.rev_nat_id, nat, flags, now).is_err() {
        count(Stat::CtInsertFail);
        return Ok(DROP);
    }
    // The replaced flow's client side, unless this flow's own entry took its place.
    if let Some(other) = stale.filter(|other| *other != ct_key) {
        let _ = maps::CT4.remove(other);
    }
    to_backend(ctx, &pkt, &be, looped)?;
    count(Stat::NewFlow);
    Ok(PASS)
}

/// Translates a pod's packet to backend `be`: its destination, and with `looped` (a hairpin
/// flow, `rproxy_common::hairpin`) its source too.
#[inline(always)]
fn to_backend(ctx: &TcContext, pkt: &Packet4, be: &Backend4, looped: bool) -> Result<(), i64> {
    if looped {
        nat::rewrite_tuple(
            ctx,
            pkt,
            &Tuple4 { saddr: hairpin::ADDR, daddr: be.addr, dport: be.port, ..Tuple4::of(pkt) },
        )
    } else {
        nat::dnat(ctx, pkt, be.addr, be.port)
    }
}

/// A pod's bare SYN straight to a backend's address and port (no frontend), from a source port
/// whose reply tuple a translated flow holds: the pod connected to a Service, and now to the
/// backend itself from the same port (its kernel hands a port out again once the destination
/// differs). Were that flow's entry left, the backend's SYN-ACK would be translated to the
/// service address and the pod would never see it. A flow that is over gives the tuple up (both
/// its entries go, the new connection passes); a live one keeps it, and the SYN is dropped and
/// counted: two live connections must not share one reply tuple.
#[inline(always)]
fn direct_syn(pkt: &Packet4) -> i32 {
    let reply = conntrack::reverse_reply_key(pkt);
    match conntrack::reply_holder(&reply, (pkt.daddr, pkt.dport), conntrack::now_ns()) {
        conntrack::Holder::Free => PASS,
        conntrack::Holder::Stale(other) => {
            conntrack::remove_flow(&reply, &other);
            PASS
        }
        conntrack::Holder::Live => {
            count(Stat::CtClash);
            DROP
        }
    }
}

/// A pod's reply to a hairpin flow (to `rproxy_common::hairpin::ADDR`): back to the service
/// address as its source and the pod's own address as its destination; the host then routes it
/// into the pod. Anything else to that address passes (and goes nowhere).
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet4) -> Result<i32, i64> {
    let key = conntrack::reply_key(pkt);
    let Some(ct) = maps::CT4.get_ptr_mut(key) else {
        return Ok(PASS);
    };
    // SAFETY: valid map value pointer for this run; copied out.
    let v = unsafe { *ct };
    if v.kind() != FlowKind::Hairpin {
        return Ok(PASS);
    }
    conntrack::account(ct, &key, conntrack::rev_bits(pkt), false, conntrack::now_ns());
    let new = Tuple4 { saddr: v.pair_addr, sport: v.pair_port, daddr: v.nat_addr, dport: v.nat_port };
    nat::rewrite_tuple(ctx, pkt, &new)?;
    count(Stat::RevNat);
    Ok(PASS)
}

/// Reverse NAT of a backend's reply on its way into the client pod.
#[inline(always)]
fn to_pod(ctx: &TcContext) -> Result<i32, i64> {
    let Some(pkt) = parse::parse_ipv4(ctx) else {
        // Not TCP or UDP: perhaps an ICMP error about a translated flow.
        related::rev_nat(ctx, false)?;
        return Ok(PASS);
    };
    if pkt.fragment || !lb::may_be_backend(&pkt) {
        return Ok(PASS);
    }
    let ct_key = conntrack::reply_key(&pkt);
    let Some(ct) = maps::CT4.get_ptr_mut(ct_key) else {
        return Ok(PASS);
    };
    // SAFETY: valid map value pointer for this run.
    let rev_nat_id = unsafe { (*ct).rev_nat_id };
    let Some(rn) = RNAT4.get(u32::from(rev_nat_id)).copied().filter(|rn| rn.addr != 0) else {
        return Ok(PASS);
    };
    conntrack::account(ct, &ct_key, conntrack::rev_bits(&pkt), false, conntrack::now_ns());
    nat::snat(ctx, &pkt, rn.addr, rn.port)?;
    count(Stat::RevNat);
    Ok(PASS)
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
