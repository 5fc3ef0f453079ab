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
use rproxy_common::{BE_F_LOCAL, CT_NAT_EXTERNAL, CT_NAT_SNAT, CtKey, CtValue, FlowKind, Stat, snat};

use crate::{
    conntrack::{self, BPF_NOEXIST},
    ctx::Ctx,
    family::{Family, IcmpError, V4},
    fib::{self, Route},
    lb::{self, Decision, Origin},
    maps::{CONFIG, SNAT_CURSOR, count},
    nat::{self, Tuple},
    parse::Packet,
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

/// A TCP or UDP packet on an external device's ingress.
#[inline(always)]
pub fn ingress<C: Ctx, F: Family>(ctx: &C, pkt: &Packet<F>) -> Result<Action, i64> {
    if pkt.fragment {
        return Ok(Action::Pass);
    }
    // Only backends send the replies of SNATed flows: everything else skips the conntrack
    // lookup after one array load. (Not the SNAT range: flows from before a restart with
    // another `--snat-port-range` keep working.)
    if lb::may_be_backend(pkt) {
        let key = conntrack::reply_key(pkt);
        if let Some(ct) = F::conntrack().get_ptr_mut(key) {
            // SAFETY: valid map value pointer for this run; copied out.
            let v = unsafe { *ct };
            // North-south SNAT only (a hairpin flow's replies never come from outside).
            if v.kind() == FlowKind::ExternalSnat {
                return snat_reply(ctx, pkt, ct, &key, &v);
            }
        }
    }
    // Most of what reaches a node's external devices is not for a frontend: one array load
    // lets it pass.
    if !lb::may_be_service(pkt) {
        return Ok(Action::Pass);
    }
    let now = conntrack::now_ns();
    let (svc, backend_id, be) = match lb::decide(pkt, Origin::External, now) {
        Decision::Pass => return Ok(Action::Pass),
        Decision::Established { key, ct, value } => return established(ctx, pkt, ct, &key, &value, now),
        Decision::Drop => return Ok(Action::Drop),
        Decision::NoBackend { svc } => {
            return Ok(if F::reject(ctx, pkt, &svc, now) { Action::Bounce } else { Action::Drop });
        }
        Decision::New { svc, backend_id, be } => (svc, backend_id, be),
    };
    // A backend here (every backend under externalTrafficPolicy Local): DNAT, and the stack
    // routes the packet to the pod, which sees the client.
    if svc.flags & rproxy_common::SVC_F_ETP_LOCAL != 0 || be.flags & BE_F_LOCAL != 0 {
        let nat = (pkt.saddr, pkt.sport);
        if conntrack::create_nat(pkt, backend_id, &be, svc.rev_nat_id, nat, CT_NAT_EXTERNAL, now).is_err() {
            count(Stat::CtInsertFail);
            return Ok(Action::Drop);
        }
        nat::rewrite_tuple(ctx, pkt, &Tuple { daddr: be.addr, dport: be.port, ..Tuple::of(pkt) })?;
        count(Stat::NewFlow);
        return Ok(Action::Pass);
    }
    // Remote backend: the FIB first (it names the SNAT address), then state, then the rewrite.
    let route = match usable_route::<C, F>(ctx, pkt, F::Addr::default(), be.addr, None) {
        Ok(r) => r,
        Err(action) => return Ok(action),
    };
    let src = match route {
        Route::Ready { src, .. } | Route::NoNeigh { src, .. } => src,
        Route::TooBig { .. } | Route::Unusable => return Ok(Action::Drop),
    };
    let flags = CT_NAT_EXTERNAL | CT_NAT_SNAT;
    let (mut reply, reply_value, service_value) =
        conntrack::flow_entries(pkt, backend_id, &be, svc.rev_nat_id, (src, 0), flags, now);
    let Some(port) = allocate_port::<F>(&mut reply, &reply_value, now) else {
        count(Stat::SnatExhausted);
        return Ok(Action::Drop);
    };
    let service_value = CtValue { nat_port: port, ..service_value };
    if F::conntrack().insert(conntrack::service_key(pkt), service_value, conntrack::BPF_ANY).is_err() {
        let _ = F::conntrack().remove(reply);
        count(Stat::CtInsertFail);
        return Ok(Action::Drop);
    }
    nat::rewrite_tuple(ctx, pkt, &Tuple { saddr: src, daddr: be.addr, sport: port, dport: be.port })?;
    count(Stat::NewFlow);
    forward(ctx, &route)
}

/// Finds a free port of the SNAT range (`Config`) for the reply entry `reply` (its `dport` is
/// set to each candidate in turn) and inserts the entry: the first port after this CPU's cursor
/// that is free, or, among the first `snat::RECLAIM_TRIES`, held by a quietly closed flow
/// (`conntrack::reclaim_snat`). Returns the port (wire order), or `None` after `snat::TRIES`
/// taken ports or with an empty range. See `rproxy_common::snat`.
#[inline(always)]
fn allocate_port<F: Family>(reply: &mut CtKey<F::Addr>, value: &CtValue<F::Addr>, now: u64) -> Option<u16> {
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
        if F::conntrack().insert(*reply, *value, BPF_NOEXIST).is_ok()
            || (i < snat::RECLAIM_TRIES && conntrack::reclaim_snat::<F>(reply, value, now))
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
fn established<C: Ctx, F: Family>(
    ctx: &C,
    pkt: &Packet<F>,
    ct: *mut CtValue<F::Addr>,
    key: &CtKey<F::Addr>,
    v: &CtValue<F::Addr>,
    now: u64,
) -> Result<Action, i64> {
    let new = Tuple { saddr: v.nat_addr, daddr: v.pair_addr, sport: v.nat_port, dport: v.pair_port };
    // A backend on another node: forwarded from here. On this node: handed to the stack.
    let route = if v.kind() == FlowKind::ExternalSnat {
        match usable_route::<C, F>(ctx, pkt, new.saddr, new.daddr, Some(now)) {
            Ok(r) => Some(r),
            Err(action) => return Ok(action),
        }
    } else {
        None
    };
    conntrack::account::<F>(ct, key, conntrack::fwd_bits(pkt), conntrack::is_syn(pkt), now);
    nat::rewrite_tuple(ctx, pkt, &new)?;
    count(Stat::Established);
    match route {
        None => Ok(Action::Pass),
        Some(r) => forward(ctx, &r),
    }
}

/// A backend's reply to a flow whose source this node translated: back to the client, from the service address.
#[inline(always)]
fn snat_reply<C: Ctx, F: Family>(
    ctx: &C,
    pkt: &Packet<F>,
    ct: *mut CtValue<F::Addr>,
    key: &CtKey<F::Addr>,
    v: &CtValue<F::Addr>,
) -> Result<Action, i64> {
    let new = Tuple { saddr: v.pair_addr, daddr: v.nat_addr, sport: v.pair_port, dport: v.nat_port };
    let now = conntrack::now_ns();
    let route = match usable_route::<C, F>(ctx, pkt, new.saddr, new.daddr, Some(now)) {
        Ok(r) => r,
        Err(action) => return Ok(action),
    };
    conntrack::account::<F>(ct, key, conntrack::rev_bits(pkt), false, now);
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
pub fn snat_error<C: Ctx>(ctx: &C) -> Result<Action, i64> {
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
    let route =
        match forwardable::<C, V4>(fib::lookup(ctx, rproxy_common::proto::ICMP, q.tot_len, src, v.nat_addr, false)) {
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
fn usable_route<C: Ctx, F: Family>(
    ctx: &C,
    pkt: &Packet<F>,
    saddr: F::Addr,
    daddr: F::Addr,
    now: Option<u64>,
) -> Result<Route<F>, Action> {
    if pkt.ttl <= 1 {
        count(Stat::TtlExceeded);
        return Err(icmp_error(ctx, pkt, IcmpError::TimeExceeded));
    }
    let route = match now {
        Some(now) => fib::cached(ctx, pkt.proto, pkt.ip_len, saddr, daddr, now),
        None => fib::lookup(ctx, pkt.proto, pkt.ip_len, saddr, daddr, true),
    };
    match route {
        Route::TooBig { mtu } => {
            count(Stat::FragNeeded);
            if pkt.df { Err(icmp_error(ctx, pkt, IcmpError::TooBig(mtu))) } else { Err(Action::Drop) }
        }
        r => forwardable::<C, F>(r),
    }
}

/// `route` if this hook can forward along it; else what to do with the untouched packet: XDP
/// hands an unresolved next hop to TC (`Pass`), no usable route drops and counts, and a packet
/// too big for the route is dropped (the hook does not fragment).
#[inline(always)]
fn forwardable<C: Ctx, F: Family>(route: Route<F>) -> Result<Route<F>, Action> {
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
fn icmp_error<C: Ctx, F: Family>(ctx: &C, pkt: &Packet<F>, error: IcmpError) -> Action {
    if F::icmp_error(ctx, pkt, error, conntrack::now_ns()) { Action::Bounce } else { Action::Drop }
}

/// Transmits a rewritten packet along `route`, its TTL decremented.
#[inline(always)]
fn forward<C: Ctx, F: Family>(ctx: &C, route: &Route<F>) -> Result<Action, i64> {
    if matches!(route, Route::Ready { .. } | Route::NoNeigh { .. }) {
        F::dec_ttl(ctx)?;
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

/// A TCP or UDP packet leaving through an external device: the reply of a north-south flow to
/// a backend on this node gets the service address back as its source, while its frontend
/// exists.
#[inline(always)]
pub fn egress<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> Result<Action, i64> {
    if pkt.fragment || !lb::may_be_backend(pkt) {
        return Ok(Action::Pass);
    }
    let key = conntrack::reply_key(pkt);
    let Some(ct) = F::conntrack().get_ptr_mut(key) else {
        return Ok(Action::Pass);
    };
    // SAFETY: valid map value pointer for this run; copied out.
    let v = unsafe { *ct };
    if v.kind() != FlowKind::External || !lb::frontend_alive::<F>(v.rev_nat_id, v.pair_addr, v.pair_port) {
        return Ok(Action::Pass);
    }
    conntrack::account::<F>(ct, &key, conntrack::rev_bits(pkt), false, conntrack::now_ns());
    nat::rewrite_tuple(ctx, pkt, &Tuple { saddr: v.pair_addr, sport: v.pair_port, ..Tuple::of(pkt) })?;
    count(Stat::RevNat);
    Ok(Action::Pass)
}
