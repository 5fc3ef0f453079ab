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
use core::mem::MaybeUninit;

use aya_ebpf::programs::TcContext;
use rproxy_common::{
    BE_F_LOCAL, Backend, CT_DIR_REPLY, CT_DIR_SERVICE, CT_NAT_EXTERNAL, CT_NAT_SNAT, CtValue, FlowKind, Stat,
    monitor::{HOOK_EXTERNAL_IN, HOOK_EXTERNAL_OUT},
    snat,
};

use crate::{
    conntrack::{self, Entry},
    ctx::Ctx,
    family::{Family, IcmpError, V6},
    fib::{self, Route},
    lb::{self, Decision, NewFlow, Origin},
    maps::{SNAT_SCRATCH, count},
    nat::{self, Tuple},
    observe,
    parse::Packet,
    related::{self, Quote},
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
    /// A rewrite failed half-way (a helper error): dropped and counted (`RewriteFail`).
    Fail,
}

/// Whether `ingress` may act on this TCP or UDP packet: a reply of a source-translated flow, or
/// a packet to a frontend. The entry programs ask before tail-calling their IPv6 half.
#[inline(always)]
pub fn ingress_acts_on<F: Family>(pkt: &Packet<F>) -> bool {
    !pkt.fragment && (lb::may_be_backend(pkt) || lb::may_be_service(pkt))
}

/// `ingress`'s common cases at XDP, which the entry program runs inline for IPv6: a packet
/// `ingress` passes, a packet of an established flow, and a reply of a source-translated one,
/// when the route cache has the way (fresh, and the packet fits its MTU) and the TTL allows
/// forwarding. `None`: the rest of `ingress` is needed (the entry program tail-calls its IPv6
/// half, which also answers what needs an ICMP error or a FIB lookup).
#[inline(always)]
pub fn ingress_inline<C: Ctx, F: Family>(ctx: &C, pkt: &Packet<F>) -> Option<Action> {
    if pkt.fragment {
        return Some(Action::Pass);
    }
    let (ct, dir) = if lb::may_be_backend(pkt)
        && let Some(ct) = F::conntrack().get_ptr_mut(conntrack::reply_key(pkt))
        // SAFETY: valid map value pointer for this run.
        && unsafe { &*ct }.kind() == FlowKind::ExternalSnat
    {
        (ct, CT_DIR_REPLY)
    } else if !lb::may_be_service(pkt) {
        return Some(Action::Pass);
    } else if let lb::Existing::Live(ct) = lb::existing(pkt, Origin::External) {
        (ct, CT_DIR_SERVICE)
    } else {
        return None;
    };
    // SAFETY: valid map value pointer for this run.
    let v = unsafe { &*ct };
    let new = if dir == CT_DIR_REPLY {
        Tuple { saddr: v.pair_addr, daddr: v.nat_addr, sport: v.pair_port, dport: v.nat_port }
    } else {
        Tuple { saddr: v.nat_addr, daddr: v.pair_addr, sport: v.nat_port, dport: v.pair_port }
    };
    let now = conntrack::now_ns();
    let route = if v.kind() == FlowKind::ExternalSnat {
        if pkt.ttl <= 1 {
            return None;
        }
        Some(fib::cached_only::<C, F>(ctx, pkt.proto, pkt.ip_len, new.saddr, new.daddr, now)?)
    } else {
        None
    };
    let (bits, syn) = if dir == CT_DIR_REPLY {
        (conntrack::rev_bits(pkt), false)
    } else {
        (conntrack::fwd_bits(pkt), conntrack::is_syn(pkt))
    };
    conntrack::account::<F>(ct, dir, pkt.proto, bits, syn, now);
    if nat::rewrite_tuple(ctx, pkt, &new).is_err() {
        return Some(Action::Fail);
    }
    count(if dir == CT_DIR_REPLY { Stat::RevNat } else { Stat::Established });
    Some(match route {
        None => Action::Pass,
        Some(r) => forward(ctx, &r),
    })
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
    if lb::may_be_backend(pkt)
        && let Some(ct) = F::conntrack().get_ptr_mut(conntrack::reply_key(pkt))
        // North-south SNAT only (a hairpin flow's replies never come from outside).
        // SAFETY: valid map value pointer for this run.
        && unsafe { &*ct }.kind() == FlowKind::ExternalSnat
    {
        return Ok(snat_reply(ctx, pkt, ct));
    }
    // Most of what reaches a node's external devices is not for a frontend: one array load
    // lets it pass.
    if !lb::may_be_service(pkt) {
        return Ok(Action::Pass);
    }
    let now = conntrack::now_ns();
    let flow = match lb::decide(pkt, Origin::External, now) {
        Decision::Pass => return Ok(Action::Pass),
        Decision::Established { ct } => return Ok(established(ctx, pkt, ct)),
        Decision::Drop => {
            observe::dropped(ctx, HOOK_EXTERNAL_IN, Stat::SourceRangeDrop, pkt, 0, 0);
            return Ok(Action::Drop);
        }
        Decision::NoBackend { svc } => {
            observe::dropped(ctx, HOOK_EXTERNAL_IN, Stat::NoBackend, pkt, svc.rev_nat_id, 0);
            return Ok(if F::reject(ctx, pkt, &svc, now) { Action::Bounce } else { Action::Drop });
        }
        Decision::New(flow) => flow,
    };
    // A backend here (every backend under externalTrafficPolicy Local): DNAT, and the stack
    // routes the packet to the pod, which sees the client.
    let be = &flow.be;
    if flow.svc.flags & rproxy_common::SVC_F_ETP_LOCAL != 0 || be.flags & BE_F_LOCAL != 0 {
        // As on the pod path: the tuple the replies come back on is never shared by two live
        // connections (`conntrack::open`). A client that reaches one backend through two
        // frontends from one source port (two NodePorts, a NodePort and a load balancer's
        // address; many clients behind one NAT) gets another source port for the second, as
        // netfilter's NAT gives it (`port_remapped`); the replies get the client's own back.
        let rev_nat_id = flow.svc.rev_nat_id;
        let nat = (pkt.saddr, pkt.sport);
        let opened = conntrack::open_or_remap(pkt, flow.backend_id, be, rev_nat_id, nat, CT_NAT_EXTERNAL, now);
        let sport = match opened {
            Ok(port) => port,
            Err(why) => {
                observe::count_drop(ctx, HOOK_EXTERNAL_IN, why, pkt, rev_nat_id, flow.backend_id);
                return Ok(Action::Drop);
            }
        };
        let new = Tuple { sport, daddr: be.addr, dport: be.port, ..Tuple::of(pkt) };
        nat::rewrite_tuple(ctx, pkt, &new)?;
        observe::translated(ctx, HOOK_EXTERNAL_IN, Stat::NewFlow, pkt, flow.svc.rev_nat_id, flow.backend_id);
        return Ok(Action::Pass);
    }
    if F::STAGES {
        return Ok(enter_snat_stage(ctx, &flow));
    }
    let mut entry = MaybeUninit::uninit();
    Ok(to_remote(ctx, pkt, flow.backend_id, be, flow.svc.rev_nat_id, entry.as_mut_ptr()))
}

/// Hands the new flow to the SNAT stage (`rproxy_common::calls`), which picks up from
/// [`snat_stage`]. Returns only when it cannot: the packet is dropped, as the flow is not set up.
#[inline(always)]
fn enter_snat_stage<C: Ctx, F: Family>(ctx: &C, flow: &NewFlow<F>) -> Action {
    let Some(s) = SNAT_SCRATCH.get_ptr_mut(0) else {
        return Action::Drop;
    };
    // SAFETY: per-CPU slot; nothing else runs on this CPU until the stage has read it.
    unsafe {
        (*s).backend_id = flow.backend_id;
        (*s).rev_nat_id = flow.svc.rev_nat_id;
    }
    ctx.tail_call(C::SNAT6_CALL);
    Action::Drop
}

/// The SNAT stage: a new IPv6 flow to another node's backend, as [`enter_snat_stage`] left it
/// (the packet still untouched, so parsed again), continued in [`to_remote`] with the flow's
/// entries built in the same per-CPU scratch (`maps::SnatScratch`), not on the stack.
#[inline(always)]
pub fn snat_stage<C: Ctx>(ctx: &C, pkt: &Packet<V6>) -> Action {
    let Some(s) = SNAT_SCRATCH.get_ptr_mut(0) else {
        return Action::Drop;
    };
    // SAFETY: per-CPU slot written by the program that tail-called this one.
    let (backend_id, rev_nat_id) = unsafe { ((*s).backend_id, (*s).rev_nat_id) };
    // The backend went away between the two programs: as if it had before.
    let Some(be) = lb::backend::<V6>(backend_id) else {
        count(Stat::BackendGone);
        return Action::Drop;
    };
    // SAFETY: as above; only this program uses the entry while it runs.
    to_remote(ctx, pkt, backend_id, &be, rev_nat_id, unsafe { &raw mut (*s).entry })
}

/// A new flow to a backend on another node: DNAT and SNAT, and forwarded from here. The FIB
/// first (it names the SNAT address), then state (built in `entry`, any storage the caller
/// has), then the rewrite.
#[inline(always)]
fn to_remote<C: Ctx, F: Family>(
    ctx: &C,
    pkt: &Packet<F>,
    backend_id: u32,
    be: &Backend<F::Addr>,
    rev_nat_id: u16,
    entry: *mut Entry<F::Addr>,
) -> Action {
    let route = match usable_route::<C, F>(ctx, pkt, None, be.addr) {
        Ok(r) => r,
        Err(action) => return action,
    };
    let src = match route {
        Route::Ready { src, .. } | Route::NoNeigh { src, .. } => src,
        Route::TooBig { .. } | Route::Unusable => return Action::Drop,
    };
    let now = conntrack::now_ns();
    let flags = CT_NAT_EXTERNAL | CT_NAT_SNAT;
    // SAFETY: the caller's storage for an entry, written whole before it is read.
    let e = unsafe {
        entry.write(conntrack::reply_entry(pkt, backend_id, be, rev_nat_id, (src, 0), flags, now));
        &mut *entry
    };
    let Some(port) = conntrack::allocate_port::<F, { snat::TRIES }, { snat::RECLAIM_TRIES }>(&mut e.key, &e.value, now)
    else {
        observe::count_drop(ctx, HOOK_EXTERNAL_IN, Stat::SnatExhausted, pkt, rev_nat_id, backend_id);
        return Action::Drop;
    };
    e.make_service(pkt);
    if F::conntrack().insert(&e.key, &e.value, conntrack::BPF_ANY).is_err() {
        e.make_reply_key();
        let _ = F::conntrack().remove(&e.key);
        observe::count_drop(ctx, HOOK_EXTERNAL_IN, Stat::CtInsertFail, pkt, rev_nat_id, backend_id);
        return Action::Drop;
    }
    if nat::rewrite_tuple(ctx, pkt, &Tuple { saddr: src, daddr: be.addr, sport: port, dport: be.port }).is_err() {
        return Action::Fail;
    }
    observe::translated(ctx, HOOK_EXTERNAL_IN, Stat::NewFlow, pkt, rev_nat_id, backend_id);
    forward(ctx, &route)
}

/// A packet of a known north-south flow from the client (its service-direction entry `ct`).
#[inline(always)]
fn established<C: Ctx, F: Family>(ctx: &C, pkt: &Packet<F>, ct: *mut CtValue<F::Addr>) -> Action {
    // SAFETY: valid map value pointer for this run.
    let v = unsafe { &*ct };
    let new = Tuple { saddr: v.nat_addr, daddr: v.pair_addr, sport: v.nat_port, dport: v.pair_port };
    let now = conntrack::now_ns();
    // A backend on another node: forwarded from here. On this node: handed to the stack.
    let route = if v.kind() == FlowKind::ExternalSnat {
        match usable_route::<C, F>(ctx, pkt, Some((new.saddr, now)), new.daddr) {
            Ok(r) => Some(r),
            Err(action) => return action,
        }
    } else {
        None
    };
    conntrack::account::<F>(ct, CT_DIR_SERVICE, pkt.proto, conntrack::fwd_bits(pkt), conntrack::is_syn(pkt), now);
    if nat::rewrite_tuple(ctx, pkt, &new).is_err() {
        return Action::Fail;
    }
    observe::translated(ctx, HOOK_EXTERNAL_IN, Stat::Established, pkt, v.rev_nat_id, v.backend_id);
    match route {
        None => Action::Pass,
        Some(r) => forward(ctx, &r),
    }
}

/// A backend's reply to a flow whose source this node translated (its reply entry `ct`): back
/// to the client, from the service address.
#[inline(always)]
fn snat_reply<C: Ctx, F: Family>(ctx: &C, pkt: &Packet<F>, ct: *mut CtValue<F::Addr>) -> Action {
    // SAFETY: valid map value pointer for this run.
    let v = unsafe { &*ct };
    let new = Tuple { saddr: v.pair_addr, daddr: v.nat_addr, sport: v.pair_port, dport: v.nat_port };
    let now = conntrack::now_ns();
    let route = match usable_route::<C, F>(ctx, pkt, Some((new.saddr, now)), new.daddr) {
        Ok(r) => r,
        Err(action) => return action,
    };
    conntrack::account::<F>(ct, CT_DIR_REPLY, pkt.proto, conntrack::rev_bits(pkt), false, now);
    if nat::rewrite_tuple(ctx, pkt, &new).is_err() {
        return Action::Fail;
    }
    observe::translated(ctx, HOOK_EXTERNAL_IN, Stat::RevNat, pkt, v.rev_nat_id, v.backend_id);
    forward(ctx, &route)
}

/// An ICMP error about a flow this node source-translated to another node's backend,
/// addressed to the node's address and SNAT port (`related`): its quote becomes the packet the
/// client sent (from the client, to the frontend), the error goes from the frontend (if the
/// backend sent it) to the client, and is forwarded there like the flow's replies. Anything else
/// passes. An error whose TTL would run out is dropped (no error about an error).
#[inline(always)]
pub fn snat_error<C: Ctx, F: Family>(ctx: &C) -> Action {
    let Some(q) = F::Quoted::parse(ctx) else {
        return Action::Pass;
    };
    let Some(v) = related::flow::<F>(&q) else {
        return Action::Pass;
    };
    if v.kind() != FlowKind::ExternalSnat || q.dst() != q.inner_src() {
        return Action::Pass;
    }
    if q.ttl() <= 1 {
        return Action::Drop;
    }
    let src = if q.src() == q.inner_dst() { v.pair_addr } else { q.src() };
    let route = match forwardable::<C, F>(fib::lookup(ctx, F::ICMP, q.ip_len(), Some(src), v.nat_addr)) {
        Ok(r) => r,
        Err(action) => return action,
    };
    if q.translate(ctx, (v.nat_addr, v.nat_port), (v.pair_addr, v.pair_port), src, v.nat_addr).is_err() {
        return Action::Fail;
    }
    forward(ctx, &route)
}

/// The route to `daddr` (see `fib::lookup`): for a packet of an established flow, from its
/// source through the route cache (`from`: the source and the time now, see `fib::cached`);
/// for a new flow (`None`), from the source the node picks (reported in the route). Or, when this hook cannot forward along it, what
/// to do with the still untouched packet: XDP hands an unresolved next hop to TC (`Pass`); no
/// usable route drops and counts; a TTL that forwarding would take to 0, or a packet too big
/// for the route with "don't fragment" set, becomes an ICMP error back to its sender (`icmp`;
/// counted, and dropped when none is sent). Too big without "don't fragment": dropped, as this
/// hook does not fragment.
#[inline(always)]
fn usable_route<C: Ctx, F: Family>(
    ctx: &C,
    pkt: &Packet<F>,
    from: Option<(F::Addr, u64)>,
    daddr: F::Addr,
) -> Result<Route<F>, Action> {
    if pkt.ttl <= 1 {
        observe::count_drop(ctx, HOOK_EXTERNAL_IN, Stat::TtlExceeded, pkt, 0, 0);
        return Err(icmp_error(ctx, pkt, IcmpError::TimeExceeded));
    }
    let route = match from {
        Some((saddr, now)) => fib::cached(ctx, pkt.proto, pkt.ip_len, saddr, daddr, now),
        None => fib::lookup(ctx, pkt.proto, pkt.ip_len, None, daddr),
    };
    match route {
        Route::TooBig { mtu } => {
            observe::count_drop(ctx, HOOK_EXTERNAL_IN, Stat::FragNeeded, pkt, 0, 0);
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
fn forward<C: Ctx, F: Family>(ctx: &C, route: &Route<F>) -> Action {
    let (ifindex, neigh) = match route {
        Route::Ready { ifindex, .. } => (*ifindex, false),
        Route::NoNeigh { ifindex, .. } => (*ifindex, true),
        Route::TooBig { .. } | Route::Unusable => return Action::Drop,
    };
    if F::dec_ttl(ctx).is_err() {
        return Action::Fail;
    }
    if let Route::Ready { smac, dmac, .. } = route
        && fib::set_macs(ctx, smac, dmac).is_err()
    {
        return Action::Fail;
    }
    count(Stat::Forwarded);
    if neigh { Action::RedirectNeigh(ifindex) } else { Action::Redirect(ifindex) }
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
    conntrack::account::<F>(ct, CT_DIR_REPLY, pkt.proto, conntrack::rev_bits(pkt), false, conntrack::now_ns());
    // The client's own address and port: the flow's source port may have been translated
    // (`PortRemapped`); otherwise they are the packet's destination already.
    let new = Tuple { saddr: v.pair_addr, sport: v.pair_port, daddr: v.nat_addr, dport: v.nat_port };
    nat::rewrite_tuple(ctx, pkt, &new)?;
    observe::translated(ctx, HOOK_EXTERNAL_OUT, Stat::RevNat, pkt, v.rev_nat_id, v.backend_id);
    Ok(Action::Pass)
}
