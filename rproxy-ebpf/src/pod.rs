//! The pod path: packets leaving a pod (`rpx_from_pod`, TC ingress on the host side of its veth)
//! are translated to a backend (DNAT; and SNAT to the hairpin address when the backend is the
//! pod itself); packets entering a pod (`rpx_to_pod`, TC egress on the same device) that are a
//! backend's replies are translated back to come from the service.
use aya_ebpf::programs::TcContext;
use rproxy_common::{
    Backend, CT_DIR_REPLY, CT_DIR_SERVICE, CT_NAT_DIRECT, CT_NAT_SNAT, CtValue, FlowKind, Stat,
    monitor::{HOOK_FROM_POD, HOOK_TO_POD},
    proto,
};

use crate::{
    conntrack::{self, Holder},
    family::Family,
    lb::{self, Decision, NewFlow, Origin},
    maps::count,
    nat::{self, Tuple},
    observe,
    parse::Packet,
};

/// What to do with the packet: pass it on, drop it, or send it back into the pod (an ICMP error
/// written in its place).
pub enum Verdict {
    Pass,
    Drop,
    Bounce,
}

/// A packet a pod sent: to a service (translated), to the hairpin address (a reply of the pod
/// to a connection to itself), or a new connection straight to a backend (see `direct_syn`).
#[inline(always)]
pub fn from_pod<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> Result<Verdict, i64> {
    if pkt.fragment {
        count(Stat::Fragment);
        return Ok(Verdict::Pass);
    }
    if F::same(pkt.daddr, F::HAIRPIN) {
        return hairpin_reply(ctx, pkt);
    }
    let bit = lb::dst_bit(pkt);
    if !lb::may_be_service_at(bit) {
        // A connection straight to a backend whose source port this path translated.
        if lb::may_be_direct_dst_at(pkt, bit)
            && let Some(ct) = direct_flow(pkt)
        {
            return established(ctx, pkt, ct, conntrack::now_ns());
        }
        // A new connection straight to a backend from the source port of a translated flow to
        // it: see `direct_syn`.
        if conntrack::is_syn(pkt) && lb::may_be_backend_dst_at(bit) {
            return direct_syn(ctx, pkt);
        }
        return Ok(Verdict::Pass);
    }
    let now = conntrack::now_ns();
    match lb::decide(pkt, Origin::Pod, now) {
        Decision::Pass => Ok(Verdict::Pass),
        Decision::Established { ct } => established(ctx, pkt, ct, now),
        Decision::Drop => {
            observe::dropped(ctx, HOOK_FROM_POD, Stat::SourceRangeDrop, pkt, 0, 0);
            Ok(Verdict::Drop)
        }
        Decision::NoBackend { svc } => {
            observe::dropped(ctx, HOOK_FROM_POD, Stat::NoBackend, pkt, svc.rev_nat_id, 0);
            // No endpoints: port unreachable back into the pod, as kube-proxy rejects.
            Ok(if F::reject(ctx, pkt, &svc, now) { Verdict::Bounce } else { Verdict::Drop })
        }
        Decision::New(NewFlow { svc, backend_id, be }) => {
            // The pod reaches itself: its source is translated too (`rproxy_common::hairpin`).
            let looped = F::same(be.addr, pkt.saddr);
            // The backend sees the pod's address with, for TCP, its port folded into the SNAT
            // range (`conntrack::pod_port`: never the tuple of the pod's untracked connections
            // straight to a backend); a pod reaching itself, the hairpin address and its port.
            let (nat, flags) = if looped {
                ((F::HAIRPIN, pkt.sport), CT_NAT_SNAT)
            } else if pkt.proto == proto::TCP {
                ((pkt.saddr, conntrack::pod_port(pkt.sport)), 0)
            } else {
                ((pkt.saddr, pkt.sport), 0)
            };
            // The replies come back on (backend, nat): a live flow of another frontend there
            // (the pod reused its source port towards this backend) keeps it, and this flow
            // gets another port of the range (`PortRemapped`); a flow that is over gives it up.
            let opened = conntrack::open_or_remap(pkt, backend_id, &be, svc.rev_nat_id, nat, flags, now)
                .map(|port| (nat.0, port));
            let nat = match opened {
                Ok(nat) => nat,
                Err(why) => {
                    observe::count_drop(ctx, HOOK_FROM_POD, why, pkt, svc.rev_nat_id, backend_id);
                    return Ok(Verdict::Drop);
                }
            };
            let new = Tuple { saddr: nat.0, sport: nat.1, daddr: be.addr, dport: be.port };
            nat::rewrite_tuple(ctx, pkt, &new)?;
            observe::translated(ctx, HOOK_FROM_POD, Stat::NewFlow, pkt, svc.rev_nat_id, backend_id);
            Ok(Verdict::Pass)
        }
    }
}

/// A packet of an established translated flow (`ct`, its service-direction entry): to the
/// backend, from the flow's source.
#[inline(always)]
fn established<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F>,
    ct: *mut CtValue<F::Addr>,
    now: u64,
) -> Result<Verdict, i64> {
    conntrack::account::<F>(ct, CT_DIR_SERVICE, pkt.proto, conntrack::fwd_bits(pkt), conntrack::is_syn(pkt), now);
    // SAFETY: valid map value pointer for this run.
    let v = unsafe { &*ct };
    let new = Tuple { saddr: v.nat_addr, sport: v.nat_port, daddr: v.pair_addr, dport: v.pair_port };
    nat::rewrite_tuple(ctx, pkt, &new)?;
    observe::translated(ctx, HOOK_FROM_POD, Stat::Established, pkt, v.rev_nat_id, v.backend_id);
    Ok(Verdict::Pass)
}

/// `from_pod`'s common cases, which the entry program runs inline for IPv6: a packet `from_pod`
/// passes, or one of an established flow. `None`: the rest of `from_pod` is needed (the entry
/// program tail-calls its IPv6 half). `pkt` comes without its source address
/// (`parse::parse_ipv6_but_source`), which `source` reads for a packet that may be a Service's.
#[inline(always)]
pub fn from_pod_inline<F: Family>(
    ctx: &TcContext,
    mut pkt: Packet<F>,
    source: impl FnOnce() -> Option<F::Addr>,
) -> Option<Result<Verdict, i64>> {
    if pkt.fragment || F::same(pkt.daddr, F::HAIRPIN) {
        return None;
    }
    let bit = lb::dst_bit(&pkt);
    if !lb::may_be_service_at(bit) {
        let direct = lb::may_be_direct_dst_at(&pkt, bit) || (conntrack::is_syn(&pkt) && lb::may_be_backend_dst_at(bit));
        return if direct { None } else { Some(Ok(Verdict::Pass)) };
    }
    pkt.saddr = source()?;
    match lb::existing(&pkt, Origin::Pod) {
        lb::Existing::Live(ct) => Some(established(ctx, &pkt, ct, conntrack::now_ns())),
        _ => None,
    }
}

/// The service-direction entry of a connection straight to a backend whose source port the pod
/// path translated (`direct_syn`), if `pkt` is one of its packets.
#[inline(always)]
fn direct_flow<F: Family>(pkt: &Packet<F>) -> Option<*mut CtValue<F::Addr>> {
    let ct = F::conntrack().get_ptr_mut(conntrack::service_key(pkt))?;
    // SAFETY: valid map value pointer for this run.
    (unsafe { &*ct }.kind() == FlowKind::Direct).then_some(ct)
}

/// A pod's bare SYN straight to a backend's address and port (no frontend), from a source port
/// whose reply tuple a translated flow holds: the pod connected to a Service, and now to the
/// backend itself from the same port (its kernel hands a port out again once the destination
/// differs; the socket hooks connect pods' sockets straight to backends). Since TCP flows take
/// ports of the SNAT range (`from_pod`) this is a flow that kept the pod's port (opened by an
/// earlier release's programs), or a port the pod chose in that range. Were that flow's entry
/// left, the backend's SYN-ACK would be translated to the service address and the pod would
/// never see it. A flow that is over gives the tuple up (both its entries go, the new connection
/// passes untouched). A live one keeps it, and the new connection gets another source port
/// (`conntrack::open_remapped`, `CT_NAT_DIRECT`, counted as `PortRemapped`), as netfilter's NAT
/// would give it: its packets are then looked up in conntrack (`direct_flow`), which the
/// backend's mark in `DIRECT_FILTER` asks for. Two live connections never share one reply tuple;
/// when no port is free the SYN is dropped and counted (`CtClash`).
#[inline(always)]
fn direct_syn<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> Result<Verdict, i64> {
    let reply = conntrack::reverse_reply_key(pkt);
    let now = conntrack::now_ns();
    let backend_id = match conntrack::reply_holder::<F>(&reply, pkt, now) {
        Holder::Free => return Ok(Verdict::Pass),
        Holder::Stale(other) => {
            conntrack::remove_flow::<F>(&reply, &other);
            return Ok(Verdict::Pass);
        }
        Holder::Live { backend_id } => backend_id,
    };
    // Marked first: the flow's next packets must find their way to conntrack.
    lb::mark_direct_dst(pkt);
    let be = Backend { addr: pkt.daddr, port: pkt.dport, proto: pkt.proto, flags: 0 };
    match conntrack::open_remapped(pkt, backend_id, &be, 0, pkt.saddr, CT_NAT_DIRECT, now) {
        Ok(port) => {
            let new = Tuple { sport: port, ..Tuple::of(pkt) };
            nat::rewrite_tuple(ctx, pkt, &new)?;
            observe::translated(ctx, HOOK_FROM_POD, Stat::NewFlow, pkt, 0, backend_id);
            Ok(Verdict::Pass)
        }
        Err(why) => {
            observe::count_drop(ctx, HOOK_FROM_POD, why, pkt, 0, backend_id);
            Ok(Verdict::Drop)
        }
    }
}

/// A pod's reply to a hairpin flow (to `F::HAIRPIN`): back to the service address as its source
/// and the pod's own address as its destination; the host then routes it into the pod.
/// Anything else to that address passes (and goes nowhere).
#[inline(always)]
fn hairpin_reply<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> Result<Verdict, i64> {
    let key = conntrack::reply_key(pkt);
    let Some(ct) = F::conntrack().get_ptr_mut(key) else {
        return Ok(Verdict::Pass);
    };
    // SAFETY: valid map value pointer for this run; copied out.
    let v = unsafe { *ct };
    if v.kind() != FlowKind::Hairpin {
        return Ok(Verdict::Pass);
    }
    conntrack::account::<F>(ct, CT_DIR_REPLY, pkt.proto, conntrack::rev_bits(pkt), false, conntrack::now_ns());
    let new = Tuple { saddr: v.pair_addr, sport: v.pair_port, daddr: v.nat_addr, dport: v.nat_port };
    nat::rewrite_tuple(ctx, pkt, &new)?;
    observe::translated(ctx, HOOK_FROM_POD, Stat::RevNat, pkt, v.rev_nat_id, v.backend_id);
    Ok(Verdict::Pass)
}

/// A packet entering a pod: a backend's reply to a flow translated on the pod path gets the
/// service address back as its source (the conntrack reply entry's pair), while its frontend
/// exists.
#[inline(always)]
pub fn to_pod<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> Result<Verdict, i64> {
    if pkt.fragment || !lb::may_be_backend(pkt) {
        return Ok(Verdict::Pass);
    }
    let key = conntrack::reply_key(pkt);
    let Some(ct) = F::conntrack().get_ptr_mut(key) else {
        return Ok(Verdict::Pass);
    };
    // SAFETY: valid map value pointer for this run; copied out.
    let v = unsafe { *ct };
    let live = match v.kind() {
        FlowKind::EastWest => lb::frontend_alive::<F>(v.rev_nat_id, v.pair_addr, v.pair_port),
        FlowKind::Direct => true,
        _ => false,
    };
    if !live {
        return Ok(Verdict::Pass);
    }
    conntrack::account::<F>(ct, CT_DIR_REPLY, pkt.proto, conntrack::rev_bits(pkt), false, conntrack::now_ns());
    // The client's own address and port: the flow's source port may have been translated
    // (`PortRemapped`); otherwise they are the packet's destination already.
    let new = Tuple { saddr: v.pair_addr, sport: v.pair_port, daddr: v.nat_addr, dport: v.nat_port };
    nat::rewrite_tuple(ctx, pkt, &new)?;
    observe::translated(ctx, HOOK_TO_POD, Stat::RevNat, pkt, v.rev_nat_id, v.backend_id);
    Ok(Verdict::Pass)
}
