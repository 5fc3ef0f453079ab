//! North-south: packets arriving on the node's external devices for a `NodePort` (a node
//! address), an externalIP or a `LoadBalancer` ingress IP, and the replies of the flows this node
//! forwarded to other nodes. The same code runs at XDP and at TC ingress (`--xdp-mode tc`, and
//! in XDP modes for what XDP hands up, see `fib::Route::NoNeigh`).
//!
//! - Backend on this node (and every backend under `externalTrafficPolicy: Local`): DNAT and
//!   hand to the stack, which routes to the pod; the reply is translated back by
//!   `rpx_ext_egress` as it leaves through the external device. The backend sees the client.
//! - Backend on another node (`externalTrafficPolicy: Cluster`): DNAT and SNAT to this node's
//!   address towards that node (from the FIB) and a port allocated by inserting the reply entry
//!   with `BPF_NOEXIST` (so two flows never share one), then forwarded from the hook. Replies
//!   come back here, are translated back to the client and forwarded to it.
//! - `ClusterIP` frontends take outside clients' packets routed to the node too, as kube-proxy's
//!   rules do (a backend here: DNAT; elsewhere: DNAT and SNAT), unless the agent runs with
//!   `--external-cluster-ip false` (Cilium's default): then those packets pass untouched.
use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use rproxy_common::{
    BE_F_LOCAL, CONFIG_F_EXTERNAL_CLUSTER_IP, CT_NAT_EXTERNAL, CT_NAT_SNAT, CtKey4, CtValue4, FlowKind, SCOPE_LOCAL,
    SVC_F_CLUSTER_IP, SVC_F_ETP_LOCAL, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT, ServiceKey4, Stat,
    icmp as icmp_msg, snat,
};

use crate::{
    conntrack::{self, BPF_NOEXIST},
    ctx::Ctx,
    fib::{self, Route},
    icmp, lb,
    maps::{CONFIG, CT4, SNAT_CURSOR, SVC4, count},
    nat::{self, Tuple4},
    parse::{self, Packet4},
    related,
};

/// What the entry point does with the packet.
pub enum Action {
    /// Hand to the stack (translated or not).
    Pass,
    Drop,
    /// Transmit through this device (XDP: `XDP_TX` if it is the ingress device).
    Redirect(u32),
    /// TC only: transmit through this device, the kernel resolving the next hop's MAC.
    RedirectNeigh(u32),
    /// Send back out of the device it came in on (an ICMP error to the sender): `XDP_TX`, or a
    /// TC redirect to the ingress device's egress.
    Bounce,
}

const NORTH_SOUTH: u16 = SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER;

/// A packet on an external device's ingress.
#[inline(always)]
pub fn ingress<C: Ctx>(ctx: &C) -> Result<Action, i64> {
    let Some(pkt) = parse::parse_ipv4(ctx) else {
        // Not TCP or UDP: perhaps an ICMP error about a flow this node SNATed.
        return snat_error(ctx);
    };
    if pkt.fragment {
        return Ok(Action::Pass);
    }
    // Only backends send the replies of SNATed flows: everything else skips the conntrack
    // lookup after one array load. (Not the SNAT range: flows from before a restart with
    // another `--snat-port-range` keep working.)
    if lb::may_be_backend(&pkt) {
        let key = conntrack::reply_key(&pkt);
        if let Some(ct) = CT4.get_ptr_mut(key) {
            // SAFETY: valid map value pointer for this run; copied out.
            let v = unsafe { *ct };
            // North-south SNAT only (a hairpin flow's replies never come from outside).
            if v.kind() == FlowKind::ExternalSnat {
                return snat_reply(ctx, &pkt, ct, &key, &v);
            }
        }
    }
    // Most of what reaches a node's external devices is not for a frontend: one array load
    // lets it pass.
    if !lb::may_be_service(&pkt) {
        return Ok(Action::Pass);
    }
    // Conntrack first, as for pods (`rpx_from_pod`): an established flow needs no service
    // lookup, only the checks (array loads) that its frontend and backend still exist.
    let now = conntrack::now_ns();
    let ct_key = conntrack::service_key(&pkt);
    let mut backend_gone = false;
    if let Some(ct) = CT4.get_ptr_mut(ct_key) {
        // SAFETY: as above.
        let v = unsafe { *ct };
        if v.nat_flags & CT_NAT_EXTERNAL != 0 && lb::frontend_alive(v.rev_nat_id, &pkt) {
            if lb::backend(v.backend_id).is_some() {
                return established(ctx, &pkt, ct, &ct_key, &v, now);
            }
            backend_gone = true;
        }
    }
    let Some((svc_key, svc)) = lb::lookup_service(&pkt) else {
        return Ok(Action::Pass);
    };
    if svc.flags & NORTH_SOUTH == 0 && !(svc.flags & SVC_F_CLUSTER_IP != 0 && external_cluster_ip()) {
        return Ok(Action::Pass);
    }
    if backend_gone {
        count(Stat::BackendGone);
    }
    // loadBalancerSourceRanges first: a source outside them learns nothing, not even that
    // there is no endpoint.
    if !lb::source_allowed(&svc, &pkt) {
        count(Stat::SourceRangeDrop);
        return Ok(Action::Drop);
    }
    // No endpoints at all: rejected, as kube-proxy does (whatever the traffic policy).
    if svc.count == 0 {
        count(Stat::NoBackend);
        return Ok(if icmp::reject(ctx, &pkt, &svc, now) { Action::Bounce } else { Action::Drop });
    }
    // A new flow. Under externalTrafficPolicy Local only this node's endpoints take it (none
    // here: dropped, as kube-proxy does, so that load balancers go by the health check).
    let etp_local = svc.flags & SVC_F_ETP_LOCAL != 0;
    let (key, value) = if etp_local {
        let key = ServiceKey4 { scope: SCOPE_LOCAL, ..svc_key };
        // SAFETY: copied out at once.
        let Some(v) = (unsafe { SVC4.get(key) }) else {
            count(Stat::NoBackend);
            return Ok(Action::Drop);
        };
        (key, *v)
    } else {
        (svc_key, svc)
    };
    let Some((backend_id, be)) = lb::select_backend_for(&key, &value, pkt.saddr, now, etp_local) else {
        count(Stat::NoBackend);
        return Ok(Action::Drop);
    };
    if etp_local || be.flags & BE_F_LOCAL != 0 {
        if conntrack::create_nat(&pkt, backend_id, &be, svc.rev_nat_id, (pkt.saddr, pkt.sport), CT_NAT_EXTERNAL, now)
            .is_err()
        {
            count(Stat::CtInsertFail);
            return Ok(Action::Drop);
        }
        nat::rewrite_tuple(ctx, &pkt, &Tuple4 { daddr: be.addr, dport: be.port, ..Tuple4::of(&pkt) })?;
        count(Stat::NewFlow);
        return Ok(Action::Pass);
    }
    // Remote backend: the FIB first (it names the SNAT address), then state, then the rewrite.
    let route = match usable_route(ctx, &pkt, 0, be.addr, None) {
        Ok(r) => r,
        Err(action) => return Ok(action),
    };
    let src = match route {
        Route::Ready { src, .. } | Route::NoNeigh { src, .. } => src,
        Route::TooBig { .. } | Route::Unusable => return Ok(Action::Drop),
    };
    let flags = CT_NAT_EXTERNAL | CT_NAT_SNAT;
    let (mut reply, reply_value, service_value) =
        conntrack::flow_entries(&pkt, backend_id, &be, svc.rev_nat_id, (src, 0), flags, now);
    let Some(port) = allocate_port(&mut reply, &reply_value, now) else {
        count(Stat::SnatExhausted);
        return Ok(Action::Drop);
    };
    let service_value = CtValue4 { nat_port: port, ..service_value };
    if CT4.insert(ct_key, service_value, conntrack::BPF_ANY).is_err() {
        let _ = CT4.remove(reply);
        count(Stat::CtInsertFail);
        return Ok(Action::Drop);
    }
    nat::rewrite_tuple(ctx, &pkt, &Tuple4 { saddr: src, daddr: be.addr, sport: port, dport: be.port })?;
    count(Stat::NewFlow);
    forward(ctx, &route)
}

/// Whether `ClusterIP` frontends take traffic from outside (`CONFIG_F_EXTERNAL_CLUSTER_IP`).
#[inline(always)]
fn external_cluster_ip() -> bool {
    CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_F_EXTERNAL_CLUSTER_IP != 0)
}

/// Finds a free port of the SNAT range (`Config`) for the reply entry `reply` (its `dport` is
/// set to each candidate in turn) and inserts the entry: the first port after this CPU's cursor
/// that is free, or, among the first `snat::RECLAIM_TRIES`, held by a quietly closed flow
/// (`conntrack::reclaim_snat`). Returns the port (wire order), or `None` after `snat::TRIES`
/// taken ports or with an empty range. See `rproxy_common::snat`.
#[inline(always)]
fn allocate_port(reply: &mut CtKey4, value: &CtValue4, now: u64) -> Option<u16> {
    let config = CONFIG.get(0)?;
    let (first, ports) = (config.snat_port_min, config.snat_port_count());
    if ports == 0 {
        return None;
    }
    let cursor = SNAT_CURSOR.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot; only this CPU touches it while this program runs.
    let mut next = unsafe { *cursor };
    if next == 0 {
        // First use on this CPU: start somewhere random, so CPUs walk different stretches.
        // SAFETY: helper without arguments.
        next = unsafe { bpf_get_prandom_u32() };
    }
    for i in 0..snat::TRIES {
        let offset = next % ports;
        next = offset + 1;
        #[expect(clippy::cast_possible_truncation, reason = "offset < ports <= 65536 - first: no overflow")]
        let p = first.wrapping_add(offset as u16).to_be();
        reply.dport = p;
        // Taking over is tried on the first ports only, the oldest in this CPU's walk: each
        // try adds a copy of `reclaim_snat` for the verifier to check.
        if CT4.insert(*reply, *value, BPF_NOEXIST).is_ok()
            || (i < snat::RECLAIM_TRIES && conntrack::reclaim_snat(reply, value, now))
        {
            // SAFETY: as above. Never 0 here (offset + 1), so the random start happens once.
            unsafe { *cursor = next };
            return Some(p);
        }
    }
    // SAFETY: as above.
    unsafe { *cursor = next };
    None
}

/// A packet of a known north-south flow from the client.
#[inline(always)]
fn established<C: Ctx>(
    ctx: &C,
    pkt: &Packet4,
    ct: *mut CtValue4,
    key: &CtKey4,
    v: &CtValue4,
    now: u64,
) -> Result<Action, i64> {
    let new = Tuple4 { saddr: v.nat_addr, daddr: v.pair_addr, sport: v.nat_port, dport: v.pair_port };
    // A backend on another node: forwarded from here. On this node: handed to the stack.
    let route = if v.kind() == FlowKind::ExternalSnat {
        match usable_route(ctx, pkt, new.saddr, new.daddr, Some(now)) {
            Ok(r) => Some(r),
            Err(action) => return Ok(action),
        }
    } else {
        None
    };
    conntrack::account(ct, key, conntrack::fwd_bits(pkt), conntrack::is_syn(pkt), now);
    nat::rewrite_tuple(ctx, pkt, &new)?;
    count(Stat::Established);
    match route {
        None => Ok(Action::Pass),
        Some(r) => forward(ctx, &r),
    }
}

/// A backend's reply to a flow whose source this node translated: back to the client, from the service address.
#[inline(always)]
fn snat_reply<C: Ctx>(ctx: &C, pkt: &Packet4, ct: *mut CtValue4, key: &CtKey4, v: &CtValue4) -> Result<Action, i64> {
    let new = Tuple4 { saddr: v.pair_addr, daddr: v.nat_addr, sport: v.pair_port, dport: v.nat_port };
    let now = conntrack::now_ns();
    let route = match usable_route(ctx, pkt, new.saddr, new.daddr, Some(now)) {
        Ok(r) => r,
        Err(action) => return Ok(action),
    };
    conntrack::account(ct, key, conntrack::rev_bits(pkt), false, now);
    nat::rewrite_tuple(ctx, pkt, &new)?;
    count(Stat::RevNat);
    forward(ctx, &route)
}

/// An ICMP error about a flow this node source-translated to another node's backend,
/// addressed to the node's address and SNAT port (`related`): its quote becomes the packet the
/// client sent (from the client, to the frontend), the error goes from the frontend (if the
/// backend sent it) to the client, and is forwarded there like the flow's replies. Anything else
/// passes. An error whose TTL would run out is dropped (no error about an error).
#[inline(always)]
fn snat_error<C: Ctx>(ctx: &C) -> Result<Action, i64> {
    let Some(q) = related::parse(ctx) else {
        return Ok(Action::Pass);
    };
    let Some(v) = related::flow(&q) else {
        return Ok(Action::Pass);
    };
    if v.kind() != FlowKind::ExternalSnat || q.dst != q.inner_src() {
        return Ok(Action::Pass);
    }
    if q.ttl <= 1 {
        return Ok(Action::Drop);
    }
    let src = if q.src == q.inner_dst() { v.pair_addr } else { q.src };
    let route = match forwardable::<C>(fib::lookup(ctx, rproxy_common::proto::ICMP, q.tot_len, src, v.nat_addr, false))
    {
        Ok(r) => r,
        Err(action) => return Ok(action),
    };
    let new = related::requote(&q, (v.nat_addr, v.nat_port), (v.pair_addr, v.pair_port));
    related::rewrite(ctx, &q, new, src, v.nat_addr)?;
    forward(ctx, &route)
}

/// The route to `daddr` (see `fib::lookup`): from `saddr` through the route cache at `now` for
/// a packet of an established flow (`Some(now)`, see `fib::cached`), else from the source the
/// node picks (`saddr` 0, reported in the route). Or, when this hook cannot forward along it, what
/// to do with the still untouched packet: XDP hands an unresolved next hop to TC (`Pass`); no
/// usable route drops and counts; a TTL that forwarding would take to 0, or a packet too big
/// for the route with "don't fragment" set, becomes an ICMP error back to its sender (`icmp`;
/// counted, and dropped when none is sent). Too big without "don't fragment": dropped, as this
/// hook does not fragment.
#[inline(always)]
fn usable_route<C: Ctx>(ctx: &C, pkt: &Packet4, saddr: u32, daddr: u32, now: Option<u64>) -> Result<Route, Action> {
    if pkt.ttl <= 1 {
        count(Stat::TtlExceeded);
        return Err(icmp_error(ctx, pkt, icmp_msg::TIME_EXCEEDED, 0, 0));
    }
    let route = match now {
        Some(now) => fib::cached(ctx, pkt.proto, pkt.tot_len, saddr, daddr, now),
        None => fib::lookup(ctx, pkt.proto, pkt.tot_len, saddr, daddr, true),
    };
    match route {
        Route::TooBig { mtu } => {
            count(Stat::FragNeeded);
            if pkt.df {
                Err(icmp_error(ctx, pkt, icmp_msg::DEST_UNREACH, icmp_msg::FRAG_NEEDED, mtu))
            } else {
                Err(Action::Drop)
            }
        }
        r => forwardable::<C>(r),
    }
}

/// `route` if this hook can forward along it; else what to do with the untouched packet: XDP
/// hands an unresolved next hop to TC (`Pass`), no usable route drops and counts, and a packet
/// too big for the route is dropped (the hook does not fragment).
#[inline(always)]
fn forwardable<C: Ctx>(route: Route) -> Result<Route, Action> {
    match route {
        Route::NoNeigh { .. } if !C::SKB => Err(Action::Pass),
        Route::Unusable => {
            count(Stat::FibFail);
            Err(Action::Drop)
        }
        Route::TooBig { .. } => Err(Action::Drop),
        r => Ok(r),
    }
}

/// `pkt` turned into an ICMP error to its sender, out of the device it came in on; or dropped.
#[inline(always)]
fn icmp_error<C: Ctx>(ctx: &C, pkt: &Packet4, typ: u8, code: u8, mtu: u16) -> Action {
    if icmp::reply(ctx, pkt, typ, code, mtu, conntrack::now_ns()) { Action::Bounce } else { Action::Drop }
}

/// Transmits a rewritten packet along `route`, its TTL decremented.
#[inline(always)]
fn forward<C: Ctx>(ctx: &C, route: &Route) -> Result<Action, i64> {
    if matches!(route, Route::Ready { .. } | Route::NoNeigh { .. }) {
        fib::dec_ttl(ctx)?;
    }
    match route {
        Route::Ready { ifindex, smac, dmac, .. } => {
            fib::set_macs(ctx, smac, dmac)?;
            count(Stat::Forwarded);
            Ok(Action::Redirect(*ifindex))
        }
        Route::NoNeigh { ifindex, .. } => {
            count(Stat::Forwarded);
            Ok(Action::RedirectNeigh(*ifindex))
        }
        Route::TooBig { .. } | Route::Unusable => Ok(Action::Drop),
    }
}

/// A packet leaving through an external device: the reply of a north-south flow to a backend
/// on this node gets the service address back as its source (an ICMP error about such a flow:
/// `related`).
#[inline(always)]
pub fn egress(ctx: &TcContext) -> Result<Action, i64> {
    let Some(pkt) = parse::parse_ipv4(ctx) else {
        // Not TCP or UDP: perhaps an ICMP error about a flow to a backend here.
        related::rev_nat(ctx, true)?;
        return Ok(Action::Pass);
    };
    if pkt.fragment || !lb::may_be_backend(&pkt) {
        return Ok(Action::Pass);
    }
    let key = conntrack::reply_key(&pkt);
    let Some(ct) = CT4.get_ptr_mut(key) else {
        return Ok(Action::Pass);
    };
    // SAFETY: valid map value pointer for this run; copied out.
    let v = unsafe { *ct };
    if v.kind() != FlowKind::External {
        return Ok(Action::Pass);
    }
    conntrack::account(ct, &key, conntrack::rev_bits(&pkt), false, conntrack::now_ns());
    nat::rewrite_tuple(ctx, &pkt, &Tuple4 { saddr: v.pair_addr, sport: v.pair_port, ..Tuple4::of(&pkt) })?;
    count(Stat::RevNat);
    Ok(Action::Pass)
}
