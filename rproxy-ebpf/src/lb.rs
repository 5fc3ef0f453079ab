//! The service decision, one for every hook and family (after Cilium's `lb4_local`/`lb6_local`):
//! given a packet's tuple and where it comes from (`Origin`), whether it belongs to a translated
//! flow, opens one to a chosen backend, or is refused ([`decide`], [`decide_new`]). The hooks
//! apply the decision: DNAT (and hairpin SNAT) on the pod path, DNAT or DNAT + SNAT and
//! forwarding on the external devices, a new destination for a host-network socket.
use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::bpf_get_prandom_u32};
use rproxy_common::{
    AffinityKey, AffinityMatch, AffinityValue, BE_F_ACTIVE, BE_F_LOCAL, BE_F_TERMINATING, Backend,
    CONFIG_F_EXTERNAL_CLUSTER_IP, CT_NAT_EXTERNAL, CtValue, SCOPE_EXTERNAL, SCOPE_LOCAL, SVC_F_AFFINITY,
    SVC_F_BY_CLIENT_ADDRESS, SVC_F_CLUSTER_IP, SVC_F_ETP_LOCAL, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER,
    SVC_F_NODE_PORT, SVC_F_SOURCE_RANGE, ServiceKey, ServiceValue, SrcRange, Stat, proto,
};

use crate::{
    conntrack,
    family::Family,
    maps::{AFFINITY_MATCH, BE_FILTER, CONFIG, DIRECT_FILTER, FilterMap, SVC_FILTER, count},
    parse::Packet,
};

/// Frontends that serve traffic from outside the cluster.
const NORTH_SOUTH: u16 = SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER;

/// Where a packet (or a connection) comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A pod, on the host side of its veth: every frontend, with all its backends.
    Pod,
    /// An external device: the north-south frontends (and `ClusterIP`s routed to the node, with
    /// `CONFIG_F_EXTERNAL_CLUSTER_IP`), with only this node's backends under
    /// `externalTrafficPolicy: Local`.
    External,
    /// A host-network socket (the socket hooks): every frontend, as from a pod; the node counts
    /// as one client for affinity and is never refused by source ranges.
    Host,
    /// A pod's TCP socket at `connect()` (the socket hooks): every frontend, as from a pod,
    /// except those with `ClientIP` affinity or source ranges, which are keyed by the pod's
    /// address, not known before the connection is routed: those `Pass`, and the pod path
    /// translates the connection's packets.
    PodSocket,
}

/// What the datapath does with a packet ([`decide`]).
pub enum Decision<F: Family> {
    /// Not for a frontend this origin reaches: the packet passes untouched.
    Pass,
    /// A packet of a translated flow: its service-direction entry (whose key is
    /// `conntrack::service_key(pkt)`), valid for this program run.
    Established { ct: *mut CtValue<F::Addr> },
    /// A new flow to frontend `svc` (slot 0, external scope).
    New(NewFlow<F>),
    /// A new flow refused without a word: a source outside `loadBalancerSourceRanges` (counted).
    Drop,
    /// A new flow to frontend `svc` that gets no backend (counted): rejected with ICMP port
    /// unreachable when the frontend has no endpoint at all (`svc.count == 0`, kube-proxy's
    /// `REJECT`), else dropped (no local endpoint, a slot being rewritten).
    NoBackend { svc: ServiceValue },
}

/// A new flow's frontend and backend.
pub struct NewFlow<F: Family> {
    pub svc: ServiceValue,
    pub backend_id: u32,
    pub be: Backend<F::Addr>,
}

/// The decision for packet `pkt` from `origin` at `now`: conntrack first ([`existing`]), then
/// [`decide_new`].
#[inline(always)]
pub fn decide<F: Family>(pkt: &Packet<F>, origin: Origin, now: u64) -> Decision<F> {
    let backend_gone = match existing(pkt, origin) {
        Existing::Live(ct) => return Decision::Established { ct },
        Existing::BackendGone => true,
        Existing::None => false,
    };
    let decision = decide_new::<F>(pkt.daddr, pkt.dport, pkt.proto, pkt.saddr, origin, now);
    if backend_gone && !matches!(decision, Decision::Pass) {
        count(Stat::BackendGone);
    }
    decision
}

/// What conntrack holds for a packet ([`existing`]).
pub enum Existing<F: Family> {
    /// A translated flow whose frontend and backend exist: its service-direction entry, valid
    /// for this program run.
    Live(*mut CtValue<F::Addr>),
    /// A translated flow whose backend's entry is gone: a live backend is picked (a TCP peer
    /// answers with RST).
    BackendGone,
    /// No translated flow (none, another origin's, or one of a removed frontend: a new flow at
    /// the same address starts afresh, otherwise the packet passes).
    None,
}

/// Whether `pkt` from `origin` belongs to a translated flow: no service lookup, only the
/// checks, two array loads, that its frontend and backend still exist.
#[inline(always)]
pub fn existing<F: Family>(pkt: &Packet<F>, origin: Origin) -> Existing<F> {
    let key = conntrack::service_key(pkt);
    let Some(ct) = F::conntrack().get_ptr_mut(key) else {
        return Existing::None;
    };
    // SAFETY: valid map value pointer for this run.
    let value = unsafe { &*ct };
    let external = value.nat_flags & CT_NAT_EXTERNAL != 0;
    if external != (origin == Origin::External) || !frontend_alive::<F>(value.rev_nat_id, pkt.daddr, pkt.dport) {
        // A flow of the other origin at this tuple (one tuple is one connection: this packet's
        // is a new one), or of a removed frontend: over. Both its entries go, so that a new
        // flow here does not leave the old one's reply entry behind, translating replies for
        // nobody (found by the datapath fuzzer).
        conntrack::remove_flow::<F>(&key, &key.pair(value));
        return Existing::None;
    }
    if backend::<F>(value.backend_id).is_some() { Existing::Live(ct) } else { Existing::BackendGone }
}

/// The decision for a new flow from `client` to `(daddr, dport, proto)` from `origin` at `now`
/// (see [`Decision`]): the frontend, its source ranges, its traffic policy, then a backend (with
/// session affinity).
#[inline(always)]
pub fn decide_new<F: Family>(
    daddr: F::Addr,
    dport: u16,
    proto: u8,
    client: F::Addr,
    origin: Origin,
    now: u64,
) -> Decision<F> {
    let Some((svc_key, svc)) = lookup_service::<F>(daddr, dport, proto) else {
        return Decision::Pass;
    };
    let external = origin == Origin::External;
    if external && svc.flags & NORTH_SOUTH == 0 && !(svc.flags & SVC_F_CLUSTER_IP != 0 && external_cluster_ip()) {
        return Decision::Pass;
    }
    if origin == Origin::PodSocket && svc.flags & SVC_F_BY_CLIENT_ADDRESS != 0 {
        return Decision::Pass;
    }
    // loadBalancerSourceRanges first: a source outside them learns nothing, not even that there
    // is no endpoint.
    if origin != Origin::Host && !source_allowed::<F>(&svc, client) {
        count(Stat::SourceRangeDrop);
        return Decision::Drop;
    }
    // Under externalTrafficPolicy Local only this node's endpoints take a flow from outside
    // (none here: dropped, as kube-proxy does, so that load balancers go by the health check);
    // without any endpoint at all the flow is rejected whatever the policy.
    let etp_local = external && svc.flags & SVC_F_ETP_LOCAL != 0 && svc.count != 0;
    let (key, value) = if etp_local {
        let key = ServiceKey { scope: SCOPE_LOCAL, ..svc_key };
        // SAFETY: copied out at once.
        let Some(local) = (unsafe { F::services().get(key) }).copied() else {
            count(Stat::NoBackend);
            return Decision::NoBackend { svc };
        };
        (key, local)
    } else {
        (svc_key, svc)
    };
    let affinity_client = if origin == Origin::Host { None } else { Some(client) };
    if let Some((backend_id, be)) = select_backend_for::<F>(&key, &value, affinity_client, now, etp_local) {
        Decision::New(NewFlow { svc, backend_id, be })
    } else {
        count(Stat::NoBackend);
        Decision::NoBackend { svc }
    }
}

/// Whether `ClusterIP` frontends take traffic from outside (`CONFIG_F_EXTERNAL_CLUSTER_IP`).
#[inline(always)]
fn external_cluster_ip() -> bool {
    CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_F_EXTERNAL_CLUSTER_IP != 0)
}

/// Whether the packet's destination may be a frontend (`rproxy_common::filter`); `false`
/// means it certainly is not.
#[inline(always)]
pub fn may_be_service<F: Family>(pkt: &Packet<F>) -> bool {
    may_be_service_at(dst_bit(pkt))
}

/// The filter bit of the packet's destination (`rproxy_common::filter`), which the frontend,
/// backend and direct filters share: computed once where a packet meets several.
#[inline(always)]
pub fn dst_bit<F: Family>(pkt: &Packet<F>) -> u32 {
    F::filter_bit(pkt.daddr, pkt.dport, pkt.proto)
}

/// [`may_be_service`] with the destination's bit ([`dst_bit`]).
#[inline(always)]
pub fn may_be_service_at(bit: u32) -> bool {
    has_bit(&SVC_FILTER, bit)
}

/// Whether the packet's source may be a backend, i.e. the packet a backend's reply
/// (`rproxy_common::filter`); `false` means it certainly is not.
#[inline(always)]
pub fn may_be_backend<F: Family>(pkt: &Packet<F>) -> bool {
    has_bit(&BE_FILTER, F::filter_bit(pkt.saddr, pkt.sport, pkt.proto))
}

/// Whether the packet's destination (its bit `bit`, [`dst_bit`]) may be a backend (a pod
/// reaching one directly); `false` means it certainly is not.
#[inline(always)]
pub fn may_be_backend_dst_at(bit: u32) -> bool {
    has_bit(&BE_FILTER, bit)
}

/// Whether the packet's destination (its bit `bit`, [`dst_bit`]) may be a backend a pod has a
/// connection to whose source port the pod path translated (`DIRECT_FILTER`); `false` means no
/// such connection exists. Only TCP connections are ever translated so (`pod::direct_syn`).
#[inline(always)]
pub fn may_be_direct_dst_at<F: Family>(pkt: &Packet<F>, bit: u32) -> bool {
    pkt.proto == proto::TCP && DIRECT_FILTER.get(bit >> 6).is_some_and(|w| *w != 0)
}

/// Marks the packet's destination for [`may_be_direct_dst_at`]: one word per 64 filter bits,
/// set to 1 by every writer (a plain store: no read-modify-write to race), never cleared.
#[inline(always)]
pub fn mark_direct_dst<F: Family>(pkt: &Packet<F>) {
    if let Some(w) = DIRECT_FILTER.get_ptr_mut(dst_bit(pkt) >> 6) {
        // SAFETY: valid map value pointer for this run; an aligned 8-byte store.
        unsafe { *w = 1 };
    }
}

/// Whether bit `bit` of a filter map is set.
#[inline(always)]
fn has_bit(words: &FilterMap, bit: u32) -> bool {
    words.get(bit >> 6).is_some_and(|w| w & (1u64 << (bit & 63)) != 0)
}

/// Whether the frontend with rev-NAT id `rev_nat_id` still exists and is `(addr, port)`: the
/// agent deletes a removed frontend's rev-NAT entry, and its address and port tell a later
/// frontend that got the same id apart.
#[inline(always)]
pub fn frontend_alive<F: Family>(rev_nat_id: u16, addr: F::Addr, port: u16) -> bool {
    F::rev_nat().get(u32::from(rev_nat_id)).is_some_and(|r| r.port == port && F::same(r.addr, addr))
}

/// Whether a new flow from `source` may open to the frontend `svc`: always, unless it has
/// `loadBalancerSourceRanges` (`SVC_F_SOURCE_RANGE`) and none of them holds the source.
#[inline(always)]
pub fn source_allowed<F: Family>(svc: &ServiceValue, source: F::Addr) -> bool {
    if svc.flags & SVC_F_SOURCE_RANGE == 0 {
        return true;
    }
    let data = SrcRange { rev_nat_id: svc.rev_nat_id, _pad: 0, addr: source };
    F::src_ranges().get(&Key::new(SrcRange::<F::Addr>::ID_BITS + F::ADDR_BITS, data)).is_some()
}

/// Slot 0 of the service `(addr, port, proto)`, if it is a frontend.
#[inline(always)]
pub fn lookup_service<F: Family>(addr: F::Addr, port: u16, proto: u8) -> Option<(ServiceKey<F::Addr>, ServiceValue)> {
    let key = ServiceKey { addr, port, slot: 0, proto, scope: SCOPE_EXTERNAL, _pad: [0, 0] };
    // SAFETY: the map value is copied out at once; the map is not preallocated, so the element
    // cannot be recycled under us.
    let svc = unsafe { F::services().get(key) }?;
    Some((key, *svc))
}

/// Backend by id; `None` for a free id (the backend was removed).
#[inline(always)]
pub fn backend<F: Family>(id: u32) -> Option<Backend<F::Addr>> {
    let be = *F::backends().get(id)?;
    (be.flags & (BE_F_ACTIVE | BE_F_TERMINATING) != 0).then_some(be)
}

/// Picks one of the service's `count` backend slots uniformly at random. `None` if the service
/// has no backends (or a slot is missing, which the writer's ordering rules out).
#[inline(always)]
pub fn select_backend<F: Family>(key: &ServiceKey<F::Addr>, svc: &ServiceValue) -> Option<(u32, Backend<F::Addr>)> {
    if svc.count == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    // Lemire's multiply-shift maps r uniformly onto 0..count without a division.
    #[expect(clippy::cast_possible_truncation, reason = "(r * count) >> 32 < count, a u16")]
    let slot = ((u64::from(r) * u64::from(svc.count)) >> 32) as u16 + 1;
    let slot_key = ServiceKey { slot, ..*key };
    // SAFETY: copied out at once.
    let id = unsafe { F::services().get(slot_key) }?.backend_id;
    Some((id, backend::<F>(id)?))
}

/// [`select_backend`] for a new flow from `client` (`None`: no affinity, as for the node's own
/// sockets, which count as one client), with `ClientIP` session affinity when the frontend has
/// it (`SVC_F_AFFINITY`): the backend the client's last new flow to this frontend got, if that
/// was within the frontend's timeout, the backend still serves the frontend
/// (`RPX_AFFINITY_MATCH`), exists, and (`local_only`: the `SCOPE_LOCAL` set) is on this node;
/// else a random one. Either way remembered, with the time, for the client's next new flow.
#[inline(always)]
pub fn select_backend_for<F: Family>(
    key: &ServiceKey<F::Addr>,
    svc: &ServiceValue,
    client: Option<F::Addr>,
    now: u64,
    local_only: bool,
) -> Option<(u32, Backend<F::Addr>)> {
    if svc.flags & SVC_F_AFFINITY == 0 {
        return select_backend::<F>(key, svc);
    }
    // The node's sockets: one client, address zero.
    let client = client.unwrap_or_default();
    let akey = AffinityKey { client, rev_nat_id: svc.rev_nat_id, _pad: 0 };
    // SAFETY: copied out at once.
    let remembered = unsafe { F::affinity().get(akey) }.copied();
    let timeout_ns = u64::from(svc.affinity_timeout) * 1_000_000_000;
    // Cheapest check first: an expired entry needs no lookup.
    let kept = remembered.filter(|a| now.saturating_sub(a.last_used_ns) <= timeout_ns).and_then(|a| {
        let matched = AffinityMatch { backend_id: a.backend_id, rev_nat_id: svc.rev_nat_id, _pad: 0 };
        // SAFETY: only the presence is used.
        unsafe { AFFINITY_MATCH.get(matched) }?;
        let be = backend::<F>(a.backend_id).filter(|be| !local_only || be.flags & BE_F_LOCAL != 0)?;
        Some((a.backend_id, be))
    });
    let (id, be) = match kept {
        Some(picked) => picked,
        None => select_backend::<F>(key, svc)?,
    };
    // A full LRU map evicts its least recently used client: that one picks afresh next time.
    let _ = F::affinity().insert(akey, AffinityValue { last_used_ns: now, backend_id: id, _pad: 0 }, 0);
    Some((id, be))
}
