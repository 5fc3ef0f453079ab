//! Service lookup and backend selection.
use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    maps::{Array, lpm_trie::Key},
};
use rproxy_common::{
    AffinityKey4, AffinityMatch, AffinityValue, BE_F_ACTIVE, BE_F_LOCAL, BE_F_TERMINATING, Backend4, SCOPE_EXTERNAL,
    SVC_F_AFFINITY, SVC_F_SOURCE_RANGE, ServiceKey4, ServiceValue, SrcRange4, filter,
};

use crate::{
    maps::{AFFINITY_MATCH, AFFINITY4, BE_FILTER, BE4, RNAT4, SRC_RANGE4, SVC_FILTER, SVC4},
    parse::Packet4,
};

/// Whether the packet's destination may be a frontend (`rproxy_common::filter`); `false`
/// means it certainly is not.
#[inline(always)]
pub fn may_be_service(pkt: &Packet4) -> bool {
    has_bit(&SVC_FILTER, filter::bit(pkt.daddr, pkt.dport, pkt.proto))
}

/// Whether the packet's source may be a backend, i.e. the packet a backend's reply
/// (`rproxy_common::filter`); `false` means it certainly is not.
#[inline(always)]
pub fn may_be_backend(pkt: &Packet4) -> bool {
    has_bit(&BE_FILTER, filter::bit(pkt.saddr, pkt.sport, pkt.proto))
}

/// Whether the packet's destination may be a backend (a pod reaching one directly);
/// `false` means it certainly is not.
#[inline(always)]
pub fn may_be_backend_dst(pkt: &Packet4) -> bool {
    has_bit(&BE_FILTER, filter::bit(pkt.daddr, pkt.dport, pkt.proto))
}

/// Whether bit `bit` of a filter map is set.
#[inline(always)]
fn has_bit(words: &Array<u64>, bit: u32) -> bool {
    words.get(bit >> 6).is_some_and(|w| w & (1u64 << (bit & 63)) != 0)
}

/// Whether the frontend with rev-NAT id `rev_nat_id` still exists and is the packet's
/// destination: the agent deletes a removed frontend's rev-NAT entry, and its address and port
/// tell a later frontend that got the same id apart.
#[inline(always)]
pub fn frontend_alive(rev_nat_id: u16, pkt: &Packet4) -> bool {
    RNAT4.get(u32::from(rev_nat_id)).is_some_and(|r| r.addr == pkt.daddr && r.port == pkt.dport)
}

/// Whether a new flow from the packet's source may open to the frontend `svc`: always, unless
/// it has `loadBalancerSourceRanges` (`SVC_F_SOURCE_RANGE`) and none of them holds the source.
#[inline(always)]
pub fn source_allowed(svc: &ServiceValue, pkt: &Packet4) -> bool {
    if svc.flags & SVC_F_SOURCE_RANGE == 0 {
        return true;
    }
    let data = SrcRange4 { rev_nat_id: svc.rev_nat_id, _pad: 0, addr: pkt.saddr };
    SRC_RANGE4.get(Key::new(SrcRange4::ID_BITS + 32, data)).is_some()
}

/// Slot 0 of the service `(daddr, dport, proto)`, if the packet is addressed to one.
#[inline(always)]
pub fn lookup_service(pkt: &Packet4) -> Option<(ServiceKey4, ServiceValue)> {
    let key = ServiceKey4 {
        addr: pkt.daddr,
        port: pkt.dport,
        slot: 0,
        proto: pkt.proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    // SAFETY: the map value is copied out at once; the map is not preallocated, so the element
    // cannot be recycled under us.
    let svc = unsafe { SVC4.get(key) }?;
    Some((key, *svc))
}

/// Backend by id; `None` for a free id (the backend was removed).
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend4> {
    let be = *BE4.get(id)?;
    (be.flags & (BE_F_ACTIVE | BE_F_TERMINATING) != 0).then_some(be)
}

/// Picks one of the service's `count` backend slots uniformly at random. `None` if the service
/// has no backends (or a slot is missing, which the writer's ordering rules out).
#[inline(always)]
pub fn select_backend(key: &ServiceKey4, svc: &ServiceValue) -> Option<(u32, Backend4)> {
    if svc.count == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    // Lemire's multiply-shift maps r uniformly onto 0..count without a division.
    #[expect(clippy::cast_possible_truncation, reason = "(r * count) >> 32 < count, a u16")]
    let slot = ((u64::from(r) * u64::from(svc.count)) >> 32) as u16 + 1;
    let slot_key = ServiceKey4 { slot, ..*key };
    // SAFETY: copied out at once.
    let id = unsafe { SVC4.get(slot_key) }?.backend_id;
    Some((id, backend(id)?))
}

/// [`select_backend`] for a new flow from `client`, with `ClientIP` session affinity when the
/// frontend has it (`SVC_F_AFFINITY`): the backend the client's last new flow to this frontend
/// got, if that was within the frontend's timeout, the backend still serves the frontend
/// (`RPX_AFFINITY_MATCH`), exists, and (`local_only`: the `SCOPE_LOCAL` set) is on this node;
/// else a random one. Either way remembered, with the time, for the client's next new flow.
#[inline(always)]
pub fn select_backend_for(
    key: &ServiceKey4,
    svc: &ServiceValue,
    client: u32,
    now: u64,
    local_only: bool,
) -> Option<(u32, Backend4)> {
    if svc.flags & SVC_F_AFFINITY == 0 {
        return select_backend(key, svc);
    }
    let akey = AffinityKey4 { client, rev_nat_id: svc.rev_nat_id, _pad: 0 };
    // SAFETY: copied out at once.
    let remembered = unsafe { AFFINITY4.get(akey) }.copied();
    let timeout_ns = u64::from(svc.affinity_timeout) * 1_000_000_000;
    // Cheapest check first: an expired entry needs no lookup.
    let kept = remembered.filter(|a| now.saturating_sub(a.last_used_ns) <= timeout_ns).and_then(|a| {
        let matched = AffinityMatch { backend_id: a.backend_id, rev_nat_id: svc.rev_nat_id, _pad: 0 };
        // SAFETY: only the presence is used.
        unsafe { AFFINITY_MATCH.get(matched) }?;
        let be = backend(a.backend_id).filter(|be| !local_only || be.flags & BE_F_LOCAL != 0)?;
        Some((a.backend_id, be))
    });
    let (id, be) = match kept {
        Some(picked) => picked,
        None => select_backend(key, svc)?,
    };
    // A full LRU map evicts its least recently used client: that one picks afresh next time.
    let _ = AFFINITY4.insert(akey, AffinityValue { last_used_ns: now, backend_id: id, _pad: 0 }, 0);
    Some((id, be))
}
